"""Roles: every route of the viewer, asked by each kind of caller (nobody, a share link's guest, a reader, a
clinician, an admin, a read and a write API token), answers as viewer/roles.py's table says; a reader
reaches the studies of their referring physician only, in every list, search, page, image and event."""
from __future__ import annotations

import asyncio
import re

import pydicom
import pytest
from sqlalchemy import text

from archive import Archive
from helpers import synthetic_instances
from node.config import from_dict
from router import queue
from viewer import accounts, roles, tokens
from node import owners
from viewer.app import create_app

PASSWORD = "a long enough password"
PEOPLE = {"rita": ("reader", "Who^Rita"), "carl": ("clinician", None), "ada": ("admin", None)}


def _study(directory, patient: str, referring: str, count: int = 1):
    paths = synthetic_instances(directory, count, patient=patient, patient_id=patient[-1])
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.ReferringPhysicianName = referring
        ds.save_as(path)
    return paths


@pytest.fixture
def world(tmp_path):
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "viewer": {"tls": False}}, tmp_path)
    archive = Archive(config.data_dir)
    owners.migrate(archive.index)           # every owner's tables, as `m3dicom serve` makes them (deid_exports)
    for name, (role, referring) in PEOPLE.items():
        accounts.add_user(archive.index, name, PASSWORD, role, referring=referring)
    studies = {}
    for key, referring in (("mine", "WHO^RITA"), ("other", "Else^Body")):   # names match case-insensitively
        (path,) = _study(tmp_path / key, f"Patient^{key}", referring)
        result = archive.ingest_file(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        job = queue.create(archive.index, study_uid=result.study_uid, plugin="mammo_cad", params={},
                           inputs=[result.sop_instance_uid])
        studies[key] = {"study": result.study_uid, "series": ds.SeriesInstanceUID,
                        "instance": result.sop_instance_uid, "job": job}
    share, _ = accounts.create_share(archive.index, accounts.shared_secret(archive.index, archive.keyring,
                                                                            config.data_dir),
                                     studies["mine"]["study"], "carl", 1)
    read = tokens.create(archive.index, "reading-script", "read")
    write = tokens.create(archive.index, "sending-script", "write")
    yield config, archive, studies, share, {"read": read, "write": write}
    archive.close()


class Caller:
    """An aiohttp test client logged in as someone (or a token, or nobody), that sends the CSRF token."""

    def __init__(self, client, csrf: str = "", bearer: str | None = None):
        self.client, self.csrf, self.bearer = client, csrf, bearer

    async def ask(self, method: str, path: str) -> int:
        headers = {"X-CSRF-Token": self.csrf} if self.csrf else {}
        if self.bearer:
            headers["Authorization"] = f"Bearer {self.bearer}"
        async with self.client.request(method, path, headers=headers, allow_redirects=False,
                                       data=b"" if method == "POST" else None) as response:
            if response.content_type != "text/event-stream":
                await response.read()
            return response.status


async def _callers(aiohttp_client, world) -> dict[str, Caller]:
    """One client each (its own cookies), all on one server of one app."""
    config, archive, studies, share, made = world
    first = await aiohttp_client(create_app(config, archive))
    callers = {}
    for who in ("nobody", *PEOPLE, "guest", "token-read", "token-write"):
        client = first if not callers else await aiohttp_client(first.server)
        if who in PEOPLE:
            response = await client.post("/login", data={"user": who, "password": PASSWORD}, allow_redirects=False)
            assert response.status == 302, who
        elif who == "guest":
            response = await client.get(f"/s/{share}", allow_redirects=False)
            assert response.status == 302
        csrf = ""
        if who in PEOPLE or who == "guest":
            page = await (await client.get(f"/studies/{studies['mine']['study']}")).text()
            csrf = re.search(r'name="csrf-token" content="([^"]*)"', page).group(1)
        callers[who] = Caller(client, csrf, made.get(who.removeprefix("token-")) if who.startswith("token") else None)
    return callers


def _path(canonical: str, ids: dict) -> str:
    values = {**ids, "frames": "1", "tag": "7fe00010", "name": "report.json", "tail": "", "token": "x.y.z",
              "share": "no-such-link", "change": "sessions"}
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), canonical).replace("{name}", "nobody")


def _routes(app) -> list[tuple[str, str]]:
    found = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        found.append((route.method, route.resource.canonical))
    return sorted(set(found))


def test_every_route_has_a_right_and_every_role_its_rights(world):
    config, archive, *_ = world
    app = create_app(config, archive)
    missing = [r for r in _routes(app) if roles.right_of(*r) is None]
    assert not missing, f"routes without a right in viewer/roles.py ROUTES: {missing}"
    assert set(roles.RIGHTS) == set(accounts.ROLES)
    assert roles.RIGHTS["reader"] < roles.RIGHTS["clinician"] < roles.RIGHTS["admin"]
    assert roles.right_of("GET", "/admin/anything/new") == roles.ADMINISTER
    assert roles.right_of("DELETE", "/api/studies") is None           # not listed: refused to everyone


# answered 403 by the handler itself, whatever the role: an invalid share link, a static directory (no listing),
# the study list to a share link's guest (it opens one study)
HANDLERS_REFUSE = {("GET", "/s/{token}"): "all", ("GET", "/static"): "all", ("GET", "/vendor/x3dom"): "all",
                   ("GET", "/api/studies"): "guest", ("GET", "/studies"): "guest"}


def _granted(who: str) -> frozenset[str]:
    if who in PEOPLE:
        return roles.RIGHTS[PEOPLE[who][0]]
    return {"nobody": frozenset(), "guest": roles.SHARE_RIGHTS, "token-read": roles.TOKEN_RIGHTS["read"],
            "token-write": roles.TOKEN_RIGHTS["write"]}[who]


async def test_every_route_answers_each_caller_as_the_table_says(world, aiohttp_client):
    config, archive, studies, share, made = world
    callers = await _callers(aiohttp_client, world)
    app = next(iter(callers.values())).client.server.app
    wrong = []
    for method, canonical in _routes(app):
        right = roles.right_of(method, canonical)
        path = _path(canonical, studies["mine"])
        token_route = canonical.startswith("/dicomweb")
        for who, caller in callers.items():
            if who.startswith("token") and not token_route:
                continue                           # tokens open DICOMweb only (elsewhere: 404 with a hint)
            status = await caller.ask(method, path)
            granted = _granted(who)
            if HANDLERS_REFUSE.get((method, canonical)) in ("all", who):
                ok = status == 403 or (who == "nobody" and status in (401, 302))
            elif right == roles.PUBLIC:
                ok = status not in (401, 403) and status < 500
            elif who == "nobody":
                ok = status in (401, 302)
            elif right == roles.SIGNED_IN or right in granted:
                ok = status not in (401, 403) and status < 500
            else:
                ok = status == 403
            if not ok:
                wrong.append((who, method, canonical, status))
    assert not wrong, "\n".join(map(str, wrong))


async def test_a_reader_reaches_the_studies_of_their_referring_physician_only(world, aiohttp_client):
    config, archive, studies, share, made = world
    callers = await _callers(aiohttp_client, world)
    rita, carl = callers["rita"], callers["carl"]
    app = rita.client.server.app
    differ = []
    for method, canonical in _routes(app):
        if roles.right_of(method, canonical) != roles.READ or not re.search(r"\{(study|instance|job)\}", canonical):
            continue
        mine, other = _path(canonical, studies["mine"]), _path(canonical, studies["other"])
        if canonical == "/studies/{study}/model/{job}":   # another's job under one's own study
            other = _path(canonical, {**studies["mine"], "job": studies["other"]["job"]})
        own, theirs = await rita.ask(method, mine), await carl.ask(method, mine)
        if own != theirs:
            differ.append(("own study", canonical, own, theirs))
        refused = await rita.ask(method, other)
        if refused != 404:
            differ.append(("another's study", canonical, refused))
        page = canonical.startswith("/studies/{study}") and "model" not in canonical
        if page and await carl.ask(method, other) == 404:
            differ.append(("the clinician is refused too", canonical))
    assert not differ, "\n".join(map(str, differ))

    # lists and searches: the study list, QIDO at each level, whatever the reader asks for
    listed = await (await rita.client.get("/api/studies")).json()
    assert [s["study_uid"] for s in listed["studies"]] == [studies["mine"]["study"]]
    everyone = await (await carl.client.get("/api/studies")).json()
    assert len(everyone["studies"]) == 2
    for path in ("/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances",
                 "/dicomweb/studies?ReferringPhysicianName=*", "/dicomweb/studies?ReferringPhysicianName=Else*",
                 "/dicomweb/studies?00080090=Else*&includefield=all"):
        async with rita.client.get(path) as response:
            assert response.status == 200, path
            assert {item["0020000D"]["Value"][0] for item in await response.json()} == {studies["mine"]["study"]}, path
    assert await rita.ask("GET", f"/dicomweb/studies?StudyInstanceUID={studies['other']['study']}") == 204
    # her own study's path with another's series or instance in it finds nothing either
    mine, other = studies["mine"], studies["other"]
    for path in (f"/dicomweb/studies/{mine['study']}/series/{other['series']}/instances/{other['instance']}",
                 f"/dicomweb/studies/{mine['study']}/series/{mine['series']}/instances/{other['instance']}/metadata",
                 f"/dicomweb/studies/{mine['study']}/series/{other['series']}/metadata"):
        assert await rita.ask("GET", path) in (404, 204), path
    # what a reader may not do: share, analyse, upload, STOW, administer
    study = studies["mine"]["study"]
    for method, path in (("POST", f"/api/studies/{study}/share"), ("POST", f"/api/studies/{study}/jobs"),
                         ("POST", "/api/upload"), ("POST", "/dicomweb/studies"), ("GET", "/admin"),
                         ("GET", f"/api/studies/{study}/shares")):
        assert await rita.ask(method, path) == 403, path
    page = await (await rita.client.get(f"/studies/{study}")).text()
    assert 'id="share-panel"' not in page and 'data-analyse="no"' in page
    assert 'id="upload-box"' not in await (await rita.client.get("/studies")).text()
    assert "/admin" not in await (await carl.client.get("/studies")).text()
    assert 'href="/admin"' in await (await callers["ada"].client.get("/studies")).text()


async def test_a_reader_is_told_only_of_their_studies_events(world, aiohttp_client, tmp_path):
    config, archive, studies, share, made = world
    callers = await _callers(aiohttp_client, world)
    async with callers["rita"].client.get("/api/events") as stream:
        assert stream.status == 200
        await stream.content.readuntil(b"\n\n")                          # ": connected"
        arrived = {}
        for key, referring in (("other", "Else^Body"), ("mine", "Who^Rita")):   # another's first
            (path,) = _study(tmp_path / f"new-{key}", f"Patient^{key}2", referring)
            arrived[key] = archive.ingest_file(path).study_uid
        told = b""
        async with asyncio.timeout(15):
            while arrived["mine"].encode() not in told:
                told += await stream.content.readany()
    assert arrived["other"].encode() not in told


def test_roles_are_set_on_the_command_line_and_a_reader_needs_a_name(tmp_path):
    archive = Archive(tmp_path / "var")
    accounts.migrate(archive.index)
    with pytest.raises(accounts.AccountError, match="referring physician"):
        accounts.add_user(archive.index, "rex", PASSWORD, "reader")
    with pytest.raises(accounts.AccountError, match="wildcards alone"):
        accounts.add_user(archive.index, "rex", PASSWORD, "reader", referring="*")
    with pytest.raises(accounts.AccountError, match="not starting with a wildcard"):
        accounts.add_user(archive.index, "rex", PASSWORD, "reader", referring="*A*")
    with pytest.raises(accounts.AccountError, match="at most 8 names"):
        accounts.add_user(archive.index, "rex", PASSWORD, "reader", referring="A\\" * 9 + "A")
    with pytest.raises(accounts.AccountError, match="only a reader"):
        accounts.add_user(archive.index, "rex", PASSWORD, "clinician", referring="Who^Rita")
    accounts.add_user(archive.index, "boss", PASSWORD, "admin")
    with pytest.raises(accounts.AccountError, match="only enabled admin"):
        accounts.set_role(archive.index, "boss", "clinician")
    with pytest.raises(accounts.AccountError, match="only enabled admin"):
        accounts.disable_user(archive.index, "boss", keep_an_admin=True)
    rows = archive.index.read(text("SELECT name, role, referring FROM users"))
    assert [tuple(r) for r in rows] == [("boss", "admin", None)]
    archive.close()


# -- found by the attack pass ------------------------------------------------------------------------------

async def test_a_notification_stream_ends_when_its_session_loses_its_rights(world, aiohttp_client, monkeypatch):
    from viewer import views

    monkeypatch.setattr(views, "STREAM_RECHECK", 0.5)
    config, archive, studies, share, made = world
    callers = await _callers(aiohttp_client, world)

    async def ended(caller, change) -> bool:
        async with caller.client.get("/api/events") as stream:
            await stream.content.readuntil(b"\n\n")
            change()
            try:
                async with asyncio.timeout(15):
                    while await stream.content.readany():
                        pass
            except TimeoutError:
                return False
            return True
    assert await ended(callers["carl"], lambda: accounts.set_role(archive.index, "carl", "reader", "Who^Rita"))
    link = archive.index.read(text("SELECT id FROM share_links"))[0][0]
    assert await ended(callers["guest"], lambda: accounts.revoke_share(archive.index, link))
    assert await ended(callers["rita"], lambda: accounts.disable_user(archive.index, "rita"))


async def test_a_reader_learns_nothing_of_other_studies_from_counts_refusals_or_case(tmp_path, aiohttp_client):
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "viewer": {"tls": False},
                        "query": {"case_insensitive_names": False}}, tmp_path)
    archive = Archive(config.data_dir)
    accounts.migrate(archive.index)
    accounts.add_user(archive.index, "rita", PASSWORD, "reader", referring="Who^Rita")
    found = {}
    for key, referring in (("mine", "Who^Rita"), ("upper", "WHO^RITA")):     # one patient, another physician
        (path,) = synthetic_instances(tmp_path / key, 1, patient="Patient^One", patient_id="P1")
        ds = pydicom.dcmread(path)
        ds.ReferringPhysicianName = referring
        ds.save_as(path)
        found[key] = archive.ingest_file(path).study_uid
    try:
        client = await aiohttp_client(create_app(config, archive))
        await client.post("/login", data={"user": "rita", "password": PASSWORD})
        for path in ("/dicomweb/studies?fuzzymatching=true", "/dicomweb/studies?PatientName=Pat*&fuzzymatching=true",
                     "/dicomweb/series?fuzzymatching=true"):
            async with client.get(path) as answer:
                assert {i["0020000D"]["Value"][0] for i in await answer.json()} == {found["mine"]}, path
        listed = await (await client.get("/api/studies")).json()
        assert [s["study_uid"] for s in listed["studies"]] == [found["mine"]]
        counts = await (await client.get("/dicomweb/studies?includefield=all")).json()
        assert not {"00201200", "00201202", "00201204"} & set(counts[0])       # the patient's other studies: unsaid
        for _ in range(3):
            assert (await client.get(f"/api/studies/{found['upper']}")).status == 404
        refused = archive.index.read(text("SELECT user_name, outcome, study_uid FROM audit "
                                          "WHERE action = 'read_refused'"))
        assert [tuple(r) for r in refused] == [("rita", "refused", found["upper"])]      # one a minute
    finally:
        archive.close()


async def test_a_physician_of_several_names_and_refused_rights_in_the_audit(world, aiohttp_client):
    config, archive, studies, share, made = world
    accounts.add_user(archive.index, "nina", PASSWORD, "reader", referring="NOBODY^ATALL\\Else^Body")
    client = await aiohttp_client(create_app(config, archive))
    await client.post("/login", data={"user": "nina", "password": PASSWORD})
    listed = await (await client.get("/api/studies")).json()
    assert [s["study_uid"] for s in listed["studies"]] == [studies["other"]["study"]]
    # a right refused (a read token storing, a reader sharing) is audited, once a minute per caller
    program = await aiohttp_client(client.server)
    for _ in range(3):
        answer = await program.post("/dicomweb/studies", data=b"x", headers={
            "Authorization": f"Bearer {made['read']}", "Content-Type": "multipart/related; boundary=x"})
        assert answer.status == 403
    rows = archive.index.read(text("SELECT user_name, detail FROM audit WHERE action = 'right_refused'"))
    assert [r[0] for r in rows] == ["token:reading-script"] and "needs the right 'store'" in rows[0][1]
    # a name stored before the rules (a leading wildcard, by an edit of the index) opens nothing
    with archive.index.write() as conn:
        conn.execute(text("UPDATE users SET referring = '*' WHERE name = 'nina'"))
    fresh = await aiohttp_client(client.server)
    await fresh.post("/login", data={"user": "nina", "password": PASSWORD})
    assert (await (await fresh.get("/api/studies")).json())["studies"] == []
    assert (await fresh.get(f"/api/studies/{studies['other']['study']}")).status == 404
