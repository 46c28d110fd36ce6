"""The admin pages (/admin, the role "admin" only: viewer/roles.py): the node at a glance (health, queues,
activity), users, everyone's share links, API tokens, the audit trail (search, CSV export) and the settings.

Plain server-rendered pages with forms (no script needed, a phone included); each change is a POST that
carries the session's CSRF token, is audited (and sent to the ATNA repository as a Security Alert), and is
answered by the page again, saying what was done. Reading the audit trail is audited too (Audit Log Used).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import hmac
import io
import logging
import os
import time
import unicodedata
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from archive import facts, metrics, status
from router import queue

from . import accounts, tokens
from .base import ARCHIVE, CONFIG, SESSION, form, render, run
from .health import Check, Readiness, counts_registry
from .views import _audit

log = logging.getLogger(__name__)
PAGE = 100                       # audit rows and share links a page
CSV_LIMIT = 1_000_000            # audit rows one CSV export holds at most (newest first)
_DAY = 86400


def routes(app: web.Application) -> None:
    app[GLANCE] = Glance()
    r = app.router
    r.add_get("/admin", overview)
    r.add_get("/admin/users", users_page)
    r.add_post("/admin/users", add_user)
    r.add_post("/admin/users/{name}/{change}", change_user)
    r.add_get("/admin/shares", shares_page)
    r.add_post("/admin/shares/{share}/revoke", revoke_share)
    r.add_get("/admin/tokens", tokens_page)
    r.add_post("/admin/tokens", create_token)
    r.add_post("/admin/tokens/{name}/revoke", revoke_token)
    r.add_get("/admin/audit", audit_page)
    r.add_get("/admin/audit.csv", audit_csv, allow_head=False)     # streamed: a HEAD would get the body too
    r.add_get("/admin/settings", settings_page)


def _page(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    response = render(request, template, section=template.removeprefix("admin_").removesuffix(".html"), **context)
    response.set_status(status)
    return response


def _when(seconds: float | None) -> str:
    """A time as an admin reads it: local, to the minute ("" for none)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


# -- the node at a glance -------------------------------------------------------------------------

class Glance:
    """What the overview reads, kept between page views: the readiness checks (S3's answer is kept
    S3_CHECK_EVERY seconds) and the archive's counts (a minute: they count whole tables)."""

    COUNTS_EVERY = 60.0

    def __init__(self):
        self.readiness: Readiness | None = None
        self.counts: tuple[float, dict] | None = None

    def health(self, config, index) -> list[dict]:
        """The readiness checks of /readyz that this process can make, without writing (the index's check
        here is a read; /readyz's own also writes, and checks the receivers)."""
        if self.readiness is None:
            self.readiness = Readiness(config, index, receivers=0)
        try:
            self.archive_counts(index)
            answer = Check("index", True)
        except Exception as exc:             # whatever the engine says, in one line, without values
            answer = Check("index", False, f"the index cannot be read ({type(exc).__name__})")
        return [dataclasses.asdict(check) for check in (answer, self.readiness.disk(), self.readiness.key_file(),
                                                        self.readiness.s3())]

    def archive_counts(self, index) -> dict:
        now = time.monotonic()
        if self.counts is None or now - self.counts[0] > self.COUNTS_EVERY:
            self.counts = (now, dataclasses.asdict(status.counts(index)))
        return self.counts[1]


GLANCE = web.AppKey("admin_glance", Glance)


def _queues(config, index, glance: Glance) -> dict:
    from archive import atna, offload
    from router.deid import store as deid_store

    found = {"jobs": dict(sorted(queue.counts_by_state(index).items())),
             "exports": dict(sorted(deid_store.counts_by_state(index).items())), "offload": None, "audit": None,
             "counts": glance.archive_counts(index)}
    if config.storage.backend == "s3":
        s = offload.status(index, config.node.name if config.index.url else None)
        found["offload"] = {"pending": s.pending, "retrying": s.retrying, "failed": s.failed,
                            "oldest": _when(s.oldest_pending)}
    if config.audit.repository:
        count, oldest = atna.waiting(index, config.node.name)
        found["audit"] = {"waiting": count, "oldest": _when(oldest), "repository": config.audit.repository}
    stat = os.statvfs(config.data_dir)
    found["free_gib"] = round(stat.f_bavail * stat.f_frsize / 2 ** 30, 1)
    return found


ACTIVITY = (   # what /metrics counted since the node started, added up over its labels
    ("m3dicom_associations_open", "DICOM associations open now"),
    ("m3dicom_receivers_listening", "Receiving processes listening"),
    ("m3dicom_associations", "Associations accepted"),
    ("m3dicom_associations_rejected", "Associations rejected"),
    ("m3dicom_tls_handshake_failures", "TLS handshakes failed"),
    ("m3dicom_instances_received", "Instances received"),
    ("m3dicom_received_bytes", "Bytes received"),
    ("m3dicom_stores_refused", "C-STOREs refused"),
    ("m3dicom_s3_errors", "S3 errors"),
)


def _activity() -> list[tuple[str, float]] | None:
    """The node's counters at a glance (None: metrics are off, [metrics] port = 0)."""
    if metrics.multiprocess() is None:
        return None
    totals = dict.fromkeys((name for name, _ in ACTIVITY), 0.0)
    for family in counts_registry().collect():
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in totals and not sample.name.endswith("_created"):
                totals[name] += sample.value
    return [(label, totals[name]) for name, label in ACTIVITY]


async def overview(request: web.Request) -> web.Response:
    config, index, glance = request.app[CONFIG], request.app[ARCHIVE].index, request.app[GLANCE]
    health = await run(request, glance.health, config, index)
    queues = await run(request, _queues, config, index, glance)
    activity = await run(request, _activity)
    port = config.router.dashboard_port if config.router.enabled else 0
    return _page(request, "admin_overview.html", health=health, queues=queues, activity=activity,
                 dashboard=port, metrics_address=f"{config.metrics.host}:{config.metrics.port}"
                 if config.metrics.port else None)


# -- users ----------------------------------------------------------------------------------------

DONE = {   # what a page says after a change (Post/Redirect/Get: reloading it repeats nothing)
    "added": "{name} added as {role}{reach}: give them their password in person",
    "password": "{name}'s password is changed and their sessions have ended",
    "role": "{name} is now {role}{reach}; their sessions have ended",
    "sessions": "{name}'s sessions have ended ({count})",
    "disable": "{name} is disabled and their sessions have ended",
    "enable": "{name} can log in again",
    "link": "the link made by {name} is revoked: it opens nothing from now on",
    "token": "token {name} is revoked: it opens nothing from its next request on",
}


def _a(role: str) -> str:
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}" if role else ""


def _done(request: web.Request, code: str, name: str, role: str = "", reach: str | None = None,
          count: int = 0) -> web.HTTPSeeOther:
    """Back to the page (303), which then says what was done."""
    values = {k: v for k, v in {"done": code, "name": name, "role": role, "reach": reach or "", "count": count}.items()
              if v}
    values["sig"] = _signed(request, values)
    page = "/admin/" + request.path.split("/")[2]          # /admin/users/NAME/role -> /admin/users
    return web.HTTPSeeOther(f"{page}?{urlencode(values)}")


def _signed(request: web.Request, values: dict) -> str:
    """The notice's values signed with the session's CSRF token: a link made elsewhere shows no notice."""
    message = urlencode(sorted((k, str(v)) for k, v in values.items() if k != "sig")).encode()
    return hmac.new(request[SESSION].csrf.encode(), message, hashlib.sha256).hexdigest()[:32]


def _said(request: web.Request) -> str | None:
    """The message of a `_done` redirect, made from DONE's words and the values it names (escaped, short)."""
    query = request.query
    words = DONE.get(query.get("done", ""))
    if words is None or not hmac.compare_digest(query.get("sig", "").encode("utf-8", "replace"),
                                                _signed(request, dict(query)).encode()):
        return None
    role = query.get("role", "")
    reach = query.get("reach", "")[:64]
    count = query.get("count", "0")
    return words.format(name=query.get("name", "")[:64], role=_a(role if role in accounts.ROLES else ""),
                        reach=f" of the studies referred by {reach}" if reach else "",
                        count=int(count) if count.isascii() and count.isdigit() and len(count) < 9 else 0)


async def users_page(request: web.Request, error: str | None = None, status: int = 200,
                     filled: dict | None = None) -> web.Response:
    rows = await run(request, accounts.user_rows, request.app[ARCHIVE].index, None,
                     request.app[CONFIG].viewer.session_idle_minutes)
    for row in rows:
        row["last_seen"] = _when(row["last_seen"])
        row["created"] = _when(row["created_at"])
    return _page(request, "admin_users.html", status, users=rows, roles=accounts.ROLES, done=_said(request),
                 error=error, me=request[SESSION].user.name, filled=filled or {"role": "clinician"})


async def add_user(request: web.Request) -> web.Response:
    fields = await form(request)
    name, role = str(fields.get("name", "")).strip(), str(fields.get("role", "clinician"))
    referring = str(fields.get("referring", "")).strip() or None if role == "reader" else None   # "readers only"
    index = request.app[ARCHIVE].index
    try:
        accounts.check_user(name, str(fields.get("password", "")), role, referring)
        user = await run(request, lambda: accounts.add_user(index, name, str(fields["password"]), role,
                                                            referring=referring))
    except accounts.AccountError as exc:
        await _changed(request, "user_add", name[:64].replace(": ", " ") or "-", str(exc), "refused")
        return await users_page(request, error=str(exc), status=400,
                                filled={"name": name[:64], "role": role, "referring": referring or ""})
    await _changed(request, "user_add", user.name, f"role {user.role}" + (
        f" (studies referred by {user.referring})" if user.referring else ""))
    raise _done(request, "added", user.name, user.role, user.referring)


CHANGES = {"password": "user_password", "role": "user_role", "disable": "user_disable", "enable": "user_enable",
           "sessions": "user_sessions"}


async def change_user(request: web.Request) -> web.Response:
    name, change = request.match_info["name"], request.match_info["change"]
    if change not in CHANGES:
        raise web.HTTPNotFound(text="No such change.")
    fields = await form(request)
    index, me = request.app[ARCHIVE].index, request[SESSION].user.name
    try:
        if change == "password":
            done = await run(request, accounts.set_password, index, name, str(fields.get("password", "")))
            said, detail = _done(request, change, name), "password reset"
        elif change == "role":
            role = str(fields.get("role", ""))
            referring = str(fields.get("referring", "")).strip() or None if role == "reader" else None
            done = await run(request, accounts.set_role, index, name, role, referring)
            said, detail = _done(request, change, name, role, referring), f"role {role}" + (
                f" (studies referred by {referring})" if referring else "")
        elif change == "disable":
            if name == me:
                raise accounts.AccountError("you cannot disable your own account (another admin can)")
            done = await run(request, accounts.disable_user, index, name, True)
            said, detail = _done(request, change, name), "disabled"
        elif change == "enable":
            done = await run(request, accounts.enable_user, index, name)
            said, detail = _done(request, change, name), "enabled"
        else:
            ended = await run(request, accounts.end_sessions, index, name)
            done, said, detail = True, _done(request, change, name, count=ended), f"{ended} sessions ended"
    except accounts.AccountError as exc:
        await _changed(request, CHANGES[change], name, str(exc), "refused")
        return await users_page(request, error=str(exc), status=400)
    if not done:
        return await users_page(request, error=f"there is no user {name!r}", status=404)
    await _changed(request, CHANGES[change], name, detail)
    if change in ("password", "role", "disable", "sessions") and name == me:
        raise web.HTTPSeeOther("/login")             # their own session ended with the others
    raise said


async def _changed(request: web.Request, action: str, account: str, detail: str, outcome: str = "ok") -> None:
    """An account or token changed by an admin: the viewer's audit, and a Security Alert for the ATNA
    repository (viewer/atna.py reads the account from the detail's start)."""
    await _audit(request, action, outcome, detail=f"{account}: {detail}"[:500])


# -- share links ----------------------------------------------------------------------------------

def _offset(request: web.Request) -> int:
    try:
        return max(0, min(int(request.query.get("offset", "0")), 10 ** 7))
    except ValueError:
        return 0


async def shares_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    everything, offset = request.query.get("all") == "1", _offset(request)
    index = request.app[ARCHIVE].index
    rows = await run(request, accounts.all_shares, index, not everything, PAGE + 1, offset)
    studies = await run(request, facts.listed_studies, index, [r["study_uid"] for r in rows])
    now = time.time()
    for row in rows:
        row["state"] = "revoked" if row["revoked_at"] else "expired" if row["expires_at"] <= now else "open"
        row["created"], row["expires"] = _when(row["created_at"]), _when(row["expires_at"])
        row["study"] = studies.get(row["study_uid"]) or {}
    return _page(request, "admin_shares.html", status, shares=rows[:PAGE], more=len(rows) > PAGE, offset=offset,
                 everything=everything, page=PAGE, done=_said(request), error=error)


async def revoke_share(request: web.Request) -> web.Response:
    link_id = request.match_info["share"]
    index = request.app[ARCHIVE].index
    link = await run(request, accounts.share, index, link_id) if len(link_id) <= 32 else None
    if link is None or not await run(request, accounts.revoke_share, index, link_id):
        return await shares_page(request, error="that link does not exist or is already revoked", status=404)
    await _audit(request, "share_revoke", study_uid=link["study_uid"],
                 detail=f"{link_id} (made by {link['created_by']})")
    raise _done(request, "link", link["created_by"])


# -- API tokens -----------------------------------------------------------------------------------

async def tokens_page(request: web.Request, done: str | None = None, error: str | None = None,
                      made: str | None = None, status: int = 200) -> web.Response:
    rows = await run(request, tokens.listed, request.app[ARCHIVE].index)
    now = time.time()
    for row in rows:
        row["state"] = ("revoked" if row["revoked_at"] else
                        "expired" if row["expires_at"] is not None and row["expires_at"] <= now else "live")
        row["created"], row["expires"], row["used"] = (_when(row["created_at"]), _when(row["expires_at"]) or "never",
                                                       _when(row["last_used"]) or "never")
    return _page(request, "admin_tokens.html", status, tokens=rows, scopes=tokens.SCOPES,
                 done=done or _said(request), error=error,
                 made=made)


async def create_token(request: web.Request) -> web.Response:
    fields = await form(request)
    name, scope, days = str(fields.get("name", "")).strip(), str(fields.get("scope", "read")), fields.get("days", "")
    try:
        lifetime = float(days) if str(days).strip() else None
    except ValueError:
        return await tokens_page(request, error="days: a number, or empty for a token that lasts until revoked",
                                 status=400)
    try:
        made = await run(request, tokens.create, request.app[ARCHIVE].index, name, scope, lifetime)
    except tokens.TokenError as exc:
        return await tokens_page(request, error=str(exc), status=400)
    await _changed(request, "token_create", f"token:{name}", f"scope {scope}")
    return await tokens_page(request, done=f"token {name} made: copy it now, it is not shown again", made=made)


async def revoke_token(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await run(request, tokens.revoke, request.app[ARCHIVE].index, name):
        return await tokens_page(request, error="that token does not exist or is already revoked", status=404)
    await _changed(request, "token_revoke", f"token:{name}", "revoked")
    raise _done(request, "token", name)


# -- the audit trail ------------------------------------------------------------------------------

FILTERS = {"who": "Who", "action": "Action", "study": "Study UID", "outcome": "Outcome"}


def _filters(query) -> tuple[dict, dict, str | None]:
    """(the search's filters for accounts.audit_search, the form's values, what is wrong with them)."""
    values = {name: str(query.get(name, "")).strip()[:200] for name in (*FILTERS, "from", "to")}
    filters = {name: values[name] for name in FILTERS if values[name]}
    for name, key, shift in (("from", "since", 0), ("to", "until", _DAY)):
        if values[name]:
            try:
                day = datetime.datetime.strptime(values[name], "%Y-%m-%d")
            except ValueError:
                return filters, values, f"{name}: a date, YYYY-MM-DD"
            filters[key] = time.mktime(day.timetuple()) + shift      # "to" includes its day
    before = query.get("before", "")
    if before.isascii() and before.isdigit() and len(before) < 19:
        filters["before"] = int(before)
    return filters, values, None


async def audit_page(request: web.Request) -> web.Response:
    filters, values, error = _filters(request.query)
    index = request.app[ARCHIVE].index
    rows = [] if error else await run(request, accounts.audit_search, index, filters, PAGE + 1)
    for row in rows:
        row["when"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
    actions = sorted({*accounts.AUDIT_ACTIONS, *([values["action"]] if values["action"] else [])})
    searched = {k: v for k, v in values.items() if v}
    more = None
    if len(rows) > PAGE:
        more = "/admin/audit?" + urlencode({**searched, "before": rows[PAGE - 1]["seq"]})
    await _audit(request, "audit_search", detail=_described(request, searched))
    return _page(request, "admin_audit.html", 400 if error else 200, rows=rows[:PAGE], values=values, error=error,
                 actions=actions, labels=FILTERS, more=more, csv="/admin/audit.csv?" + urlencode(searched))


def _described(request: web.Request, searched: dict) -> str:
    """What was read of the audit trail, as the address that reads it again (the ATNA message's URI)."""
    return f"{request.path}?{urlencode(searched)}".rstrip("?")[:500]


FORMULA = tuple("=+-@|\uff1d\uff0b\uff0d\uff20")       # and their full-width forms, which some locales read alike


def _trimmed(c: str) -> bool:
    """What an importer may trim before it reads a formula: spaces, controls, invisible format characters, quotes."""
    return c.isspace() or c in "\"'" or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def _cell(value) -> str:
    """A CSV cell a spreadsheet shows as text: a value that starts like a formula (a user name typed at the
    login page, "=HYPERLINK(...)"), also behind spaces, quotes or control characters an importer may trim, is
    written behind an apostrophe (OWASP's CSV injection advice)."""
    text = "" if value is None else str(value)
    if text and (_trimmed(text[0]) or text.startswith(FORMULA)):
        return "'" + text
    return text


async def audit_csv(request: web.Request) -> web.StreamResponse:
    """Every record the search finds, newest first, streamed in pages (memory stays bounded)."""
    filters, values, error = _filters(request.query)
    if error:
        raise web.HTTPBadRequest(text=error)
    index = request.app[ARCHIVE].index
    await _audit(request, "audit_export", detail=_described(request, {k: v for k, v in values.items() if v}))
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="m3dicom-audit-{time.strftime("%Y%m%d-%H%M%S")}.csv"'})
    await response.prepare(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["seq", "time (UTC)", *accounts.AUDIT_COLUMNS[2:]])
    written, session = 0, request[SESSION]
    while written < CSV_LIMIT:
        if written and not await run(request, accounts.still_open, index, session,
                                     request.app[CONFIG].viewer.session_idle_minutes):
            log.warning("audit export: the session that asked for it ended (logged out, disabled or demoted): "
                        "cut short after %d rows", written)
            break
        rows = await run(request, accounts.audit_search, index, filters, 1000)
        for row in rows:
            when = datetime.datetime.fromtimestamp(row["time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            writer.writerow([row["seq"], when, *(_cell(row[c]) for c in accounts.AUDIT_COLUMNS[2:])])
        await response.write(out.getvalue().encode())
        out.seek(0)
        out.truncate()
        written += len(rows)
        if len(rows) < 1000:
            break
        filters["before"] = rows[-1]["seq"]
    await response.write_eof()
    return response


# -- settings -------------------------------------------------------------------------------------

_SECRET_WORDS = ("token", "key", "secret", "password", "signature", "credential")


def _secret_free(value) -> str:
    """A setting as shown: a URL's credentials (its user information, the values of query parameters named
    like a secret) replaced by ***."""
    text = str(value)
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return "(a URL that cannot be read)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{k}=***" if any(w in k.lower() for w in _SECRET_WORDS) else f"{k}={v}" if sep else k
                     for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _settings(config) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every setting: (section, [(name, value, help)]); a nested section ([storage.s3], [remote.NAME]) by
    its dotted name, after its parent."""
    found = []

    def shown(value) -> str:
        """As the settings file writes it (TOML): true / false, a list, a string; "(not set)" for none."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if value is None or value == "":
            return "(not set)"
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value)) or "(none)"
        return _secret_free(value)

    def walk(prefix: str, section) -> None:
        rows, nested = [], []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{prefix}.{f.name}", value))
            else:
                rows.append((f.name, shown(value), f.metadata.get("help", "")))
        found.append((prefix, rows))
        for name, value in nested:
            walk(name, value)

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            walk(f.name, value)
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    walk(f"{f.name}.{name}", item)
    return [(name, rows) for name, rows in found if rows]


async def settings_page(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    return _page(request, "admin_settings.html", sections=_settings(config))
