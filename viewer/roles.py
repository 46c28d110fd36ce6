"""Who may do what: the viewer's roles, the right each route needs, checked in one place (`authorized`).

| right | what it allows | reader | clinician | admin | share link | API token |
|---|---|---|---|---|---|---|
| read | the list, pages, images, reports, downloads, OHIF, QIDO, WADO | own studies | all | all | its study | all |
| analyse | start and cancel analysis jobs | - | yes | yes | - | - |
| share | make share links, list a study's links, revoke one's own | - | yes | yes | - | - |
| store | upload files, STOW-RS | - | yes | yes | - | scope write |
| administer | /admin: users, everyone's share links, API tokens, audit search, queues, settings | - | - | yes | - | - |

A reader's "own studies" are those whose Referring Physician's Name matches the reader's
(`m3dicom user add NAME --role reader --referring "FAMILY^GIVEN"`, matched as C-FIND matches it: the
whole name, case aside by default, `*` and `?` as wildcards, several names separated by backslashes):
a study of anyone else's is answered 404, as
one that does not exist, and lists and searches show only theirs. An admin also revokes anyone's share
link. Every route the app serves has its right in ROUTES; a route missing from it is refused to
everyone (and tests/test_roles.py fails), so a new route cannot be open by mistake. No HTTP here: the
middleware that applies this is authorize.py.
"""
from __future__ import annotations

from pydicom.dataset import Dataset

from archive.query import STUDY_ROOT, Query, matches

from .accounts import AccountError, check_role

PUBLIC, SIGNED_IN = "public", "signed in"        # no session needed; any session (logging out)
READ, ANALYSE, SHARE, STORE, ADMINISTER = "read", "analyse", "share", "store", "administer"
RIGHTS = {
    "reader": frozenset({READ}),
    "clinician": frozenset({READ, ANALYSE, SHARE, STORE}),
    "admin": frozenset({READ, ANALYSE, SHARE, STORE, ADMINISTER}),
}
ROLES = tuple(RIGHTS)
LIMITED = frozenset({"reader"})                  # roles that see their own studies only
SHARE_RIGHTS = frozenset({READ})
TOKEN_RIGHTS = {"read": frozenset({READ}), "write": frozenset({READ, STORE})}
WHAT = {READ: "read studies", ANALYSE: "run analyses", SHARE: "share studies", STORE: "store studies",
        ADMINISTER: "administer the node"}

# (method, route): HEAD is checked as GET. Prefixes (a route ending in "*") cover a static tree.
ROUTES = {
    ("GET", "/"): PUBLIC, ("GET", "/login"): PUBLIC, ("POST", "/login"): PUBLIC, ("GET", "/s/{token}"): PUBLIC,
    ("GET", "/static*"): PUBLIC, ("GET", "/vendor/x3dom*"): PUBLIC,
    ("POST", "/logout"): SIGNED_IN,
    ("GET", "/studies"): READ, ("GET", "/studies/{study}"): READ, ("GET", "/studies/{study}/model/{job}"): READ,
    ("GET", "/api/studies"): READ, ("GET", "/api/studies/{study}"): READ,
    ("GET", "/api/studies/{study}/findings"): READ, ("GET", "/api/studies/{study}/analysis"): READ,
    ("GET", "/api/studies/{study}/jobs"): READ, ("GET", "/api/studies/{study}/plugins"): READ,
    ("GET", "/api/jobs/{job}/files/{name}"): READ, ("GET", "/api/instances/{instance}/info"): READ,
    ("GET", "/api/instances/{instance}/render"): READ, ("GET", "/api/instances/{instance}/sr"): READ,
    ("GET", "/api/instances/{instance}/download"): READ, ("GET", "/api/events"): READ,
    ("GET", "/dicomweb*"): READ, ("GET", "/ohif*"): READ,
    ("POST", "/api/studies/{study}/jobs"): ANALYSE, ("POST", "/api/jobs/{job}/cancel"): ANALYSE,
    ("POST", "/api/studies/{study}/share"): SHARE, ("GET", "/api/studies/{study}/shares"): SHARE,
    ("POST", "/api/shares/{share}/revoke"): SHARE,
    ("POST", "/api/upload"): STORE, ("POST", "/dicomweb/studies"): STORE, ("POST", "/dicomweb/studies/{study}"): STORE,
    ("GET", "/admin*"): ADMINISTER, ("POST", "/admin*"): ADMINISTER,
    ("GET", "/api/studies/{study}/exports"): ADMINISTER, ("POST", "/api/studies/{study}/exports"): ADMINISTER,
}


def right_of(method: str, route: str) -> str | None:
    """The right a request needs (None: the route is not in ROUTES, which refuses it)."""
    method = "GET" if method in ("HEAD", "OPTIONS") else method
    found = ROUTES.get((method, route))
    if found is not None:
        return found
    for (m, pattern), right in ROUTES.items():
        if m == method and pattern.endswith("*") and (route == pattern[:-1] or route.startswith(pattern[:-1] + "/")):
            return right
    return None


def rights(session) -> frozenset[str]:
    """What a viewer session (accounts.Session) may do."""
    if session is None:
        return frozenset()
    if session.is_share:
        return SHARE_RIGHTS
    return RIGHTS.get(session.user.role, frozenset())


def limited(session) -> str | None:
    """The Referring Physician's Name a reader's studies carry ("" when none is set: nothing is theirs);
    None for everyone else (their reach is all studies, or a share link's one)."""
    if session is None or session.is_share or session.user.role not in LIMITED:
        return None
    try:            # a name stored before the rules it must meet (a leading "*"): nothing is the reader's
        check_role(session.user.role, session.user.referring)
    except AccountError:
        return ""
    return session.user.referring or ""


def restrict(identifier: Dataset, referring: str | None) -> Dataset | None:
    """A C-FIND identifier narrowed to a reader's studies (`limited`): their name replaces whatever the
    caller asked of the attribute, so a reader cannot search beyond them. None: nothing can match (a
    reader without a name)."""
    if referring is None:
        return identifier
    if not referring:
        return None
    identifier.ReferringPhysicianName = referring
    return identifier


def reaches(index, referring: str, study_uid: str, case_insensitive: bool = True) -> bool:
    """Whether the study is one of a reader's (a study-level C-FIND for it and their name finds it)."""
    if not referring:
        return False
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.ReferringPhysicianName = referring
    return matches(index, Query(STUDY_ROOT, ds, case_insensitive_names=case_insensitive))
