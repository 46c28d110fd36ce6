"""Routes of the viewer: pages, and the JSON API the pages' scripts use.

Every path parameter is checked against what it must be (a UID: digits and dots; a job id:
16 hex digits; a job file: one of that job's results by name) before anything is looked up:
nothing from a URL becomes a path. A share-link session sees one study: its pages, its
images, its results; the list, uploads, jobs and sharing answer 403.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, fields
from urllib.parse import quote, unquote, urlsplit

from aiohttp import web
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import exc as sa_exc

from archive import facts
from archive.dicomfile import InvalidInstance
from archive.query import STUDY_LIST_ORDER, STUDY_ROOT, Query
from archive.storage import BlobNotOffloaded
from router import queue
from router.api import JobRequestError, plugins_for_study, request_job
from router.jobs import IllegalTransition

from . import accounts, analysis, atna, roles, upload
from .base import (ARCHIVE, CLOCK, CONFIG, COOKIE, EVENTS, IMAGES, JOB_ID, LOGINS, OHIF_ON, PLUGINS, SECRET, SESSION,
                   json_body, render, run, valid_uid)
from .base import form as read_form
from .images import IMAGE_LIMIT, NotAnImage
from .images import Busy as ImagesBusy
from .events import TooManyStreams
from .logins import Busy, source_of

log = logging.getLogger(__name__)
PAGE = 50
SEARCH_FIELDS = {"name": "Patient name", "id": "Patient ID", "accession": "Accession number", "modality": "Modality",
                 "from": "From", "to": "To"}
SEARCH_MAX_CHARS = 128           # one search field (DICOM's own are at most 64)
DEFAULT_NEXT = "/studies"
# a path of this site and nothing else: a single "/", then only what RFC 3986 allows in a path
# and query (no controls, spaces, backslashes, "#" or non-ASCII, which browsers drop or rewrite)
_NEXT = re.compile(r"^/(?![/\\])[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]{0,2000}$")
_EVENT_ID = re.compile(r"^[0-9]{1,18}$")
STREAM_RECHECK = 5.0     # seconds between two checks that a notification stream's session still holds its rights
REACH_KEPT = 60.0        # seconds a reader's stream trusts its answer for a study
WRONG = "Wrong user name or password."
SLOWED = (" After several failed logins each new try waits a little longer (at most {max:g} seconds); this "
          "resets 15 minutes after the last failed login.")
BUSY_ACCOUNT = ("This account is locked for a moment: too many logins to it are being tried at once, which can "
                "mean someone is guessing its password. Wait a minute, then log in again. If it stays locked, tell "
                "your administrator.")
# what the holder of a share link that opens nothing reads (accounts.share_refusal says which)
_ASK = "If you still need to see the study, ask the person who shared it with you for a new link."
LINK_CLOSED = {
    "revoked": {"title": "Link withdrawn", "heading": "This link has been withdrawn",
                "lines": ["The person who shared this study has revoked the link, so it no longer opens the study.",
                          _ASK]},
    "expired": {"title": "Link expired", "heading": "This link has expired",
                "lines": ["A share link opens its study for a limited time only, and this one's time is over.", _ASK]},
    "invalid": {"title": "Link not valid", "heading": "This link is not valid",
                "lines": ["It is not a link this viewer made, or part of it is missing: check that you opened the "
                          "whole link, as it was sent to you.", _ASK]},
}
for _message in LINK_CLOSED.values():
    _message.update(action=("/login", "Log in with your own account"))
SHARE_ONLY = {"title": "One study only", "heading": "This link opens one study only",
              "lines": ["You opened a share link: it shows the study that was shared with you, read-only, and "
                        "nothing else. To see other studies, log in with your own account."],
              "action": ("/", "Back to the shared study")}
BUSY_ADDRESS = ("Too many logins are being tried at once from your network address. Wait a minute, then log in "
                "again. If this keeps happening, tell your administrator.")


def routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", home)
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/s/{token}", open_share)
    r.add_get("/studies", studies_page)
    r.add_get("/studies/{study}", study_page)
    r.add_get("/studies/{study}/model/{job}", model_page)
    r.add_get("/api/studies", api_studies)
    r.add_get("/api/studies/{study}", api_study)
    r.add_get("/api/studies/{study}/findings", api_findings)
    r.add_get("/api/studies/{study}/analysis", api_analysis)
    r.add_get("/api/studies/{study}/jobs", api_jobs)
    r.add_get("/api/studies/{study}/plugins", api_plugins)
    r.add_post("/api/studies/{study}/jobs", api_start_job)
    r.add_post("/api/studies/{study}/share", api_share)
    r.add_get("/api/studies/{study}/shares", api_shares)
    r.add_post("/api/shares/{share}/revoke", api_revoke)
    r.add_post("/api/jobs/{job}/cancel", api_cancel)
    r.add_get("/api/jobs/{job}/files/{name}", api_job_file)
    r.add_get("/api/instances/{instance}/info", api_info)
    r.add_get("/api/instances/{instance}/render", api_render)
    r.add_get("/api/instances/{instance}/sr", api_sr)
    r.add_get("/api/instances/{instance}/download", api_download, allow_head=False)     # streamed (as below)
    r.add_post("/api/upload", upload.handle)
    r.add_get("/api/events", api_events, allow_head=False)   # streamed: a HEAD would be sent a body


# -- helpers ---------------------------------------------------------------------------------

def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _forbidden(why: str) -> web.HTTPForbidden:
    return web.HTTPForbidden(text=json.dumps({"error": why}), content_type="application/json")


def _not_found(what: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": f"no such {what}"}), content_type="application/json")


def _address(request: web.Request) -> str:
    return request.remote or "?"


async def _audit(request: web.Request, action: str, outcome: str = "ok", *, who: str | None = None, **extra) -> None:
    """An audit record; `who` (an attempted login, a link) names the actor instead of the session's user."""
    session = request.get(SESSION)
    actor = who or (session.who if session else None)
    archive = request.app[ARCHIVE]

    def write() -> None:
        accounts.audit(archive.index, actor, action, outcome, address=_address(request), **extra)
        atna.record(archive, request.app[CONFIG].node.ae_title, actor, action, outcome, _address(request),
                    extra.get("study_uid"), extra.get("detail") or "")
    await run(request, write)


def _bad_request(why: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": why}), content_type="application/json")


def _page(request: web.Request, status: int, message: dict) -> web.Response:
    """A page that says what happened and what to do (message.html), with its HTTP status."""
    response = render(request, "message.html", **message)
    response.set_status(status)
    return response


def link_closed(request: web.Request, why: str) -> web.Response:
    """What the holder of a share session gets once its link is revoked or has run out (the sessions
    middleware): the page that says so, or for the API a 403 whose JSON says so too (`link`: why),
    so that an open page can show the same words instead of failing images."""
    message = LINK_CLOSED[why]
    if request.path.startswith("/api/"):
        return _json({"error": f"{message['heading']}: {' '.join(message['lines'])}", "link": why,
                      "heading": message["heading"], "lines": message["lines"]}, status=403)
    return _page(request, 403, message)


def _people_only(request: web.Request) -> None:
    if request[SESSION].is_share:
        raise _forbidden("a share link opens one study, read-only")


def _study(request: web.Request, study_uid: str) -> str:
    """The study UID of the path, checked (format, and a share session's one study)."""
    if not valid_uid(study_uid):
        raise _not_found("study")
    session = request[SESSION]
    if session.is_share and study_uid != session.study_uid:
        raise _forbidden("a share link opens one study, read-only")
    return study_uid


async def _instance(request: web.Request) -> tuple[str, str]:
    """(SOP Instance UID, its study) of the path, checked."""
    uid = request.match_info["instance"]
    if not valid_uid(uid):
        raise _not_found("instance")
    study_uid = await run(request, facts.study_of_instance, request.app[ARCHIVE].index, uid)
    if study_uid is None:
        raise _not_found("instance")
    return uid, _study(request, study_uid)


async def _job(request: web.Request) -> queue.JobRecord:
    job_id = request.match_info["job"]
    if not JOB_ID.match(job_id):
        raise _not_found("job")
    try:
        job = await run(request, queue.get, request.app[ARCHIVE].index, job_id)
    except queue.JobNotFound:
        raise _not_found("job") from None
    _study(request, job.study_uid)
    return job


# -- pages -----------------------------------------------------------------------------------

async def home(request: web.Request) -> web.Response:
    session = request[SESSION]
    if session is None:
        raise web.HTTPFound("/login")
    raise web.HTTPFound(f"/studies/{session.study_uid}" if session.is_share else "/studies")


async def login_page(request: web.Request) -> web.Response:
    return render(request, "login.html", next=_next(request.query.get("next", "")), error=None, user="")


def _next(target: str) -> str:
    """Only a path on this site (never another host) to go back to after logging in.

    Browsers drop tabs and line feeds anywhere in a URL and read a backslash as a slash, so
    "/<TAB>/evil.example" becomes "//evil.example", another host: the target must be plain
    URL characters, start with exactly one "/", and still be such a path once percent-decoded,
    without dot segments.
    """
    if not _NEXT.match(target):
        return DEFAULT_NEXT
    decoded = unquote(target)
    path = decoded.split("?", 1)[0]
    if (decoded.startswith(("//", "/\\")) or "\\" in decoded or any(c < " " or c == "\x7f" for c in decoded)
            or any(segment in (".", "..") for segment in path.split("/"))):
        return DEFAULT_NEXT
    parts = urlsplit(target)
    return DEFAULT_NEXT if parts.scheme or parts.netloc else target


def _login_answer(request: web.Request, form, status: int, error: str) -> web.Response:
    response = render(request, "login.html", next=_next(str(form.get("next", ""))), error=error,
                      user=str(form.get("user", ""))[:64])
    response.set_status(status)
    if status == 429:
        response.headers["Retry-After"] = "60"
    return response


async def login(request: web.Request) -> web.Response:
    """Attempts for one account or from one address are checked one after another, each after
    the delay that the failures before it earned (logins.py); a flood is answered 429 unchecked."""
    form = await read_form(request)
    name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))[:1024]
    index, address = request.app[ARCHIVE].index, source_of(_address(request))     # IPv6: its /64
    try:
        async with request.app[LOGINS].turn(name, address):
            delay = await run(request, accounts.failure_delay, index, name, address)
            await asyncio.sleep(delay)
            user = await run(request, accounts.authenticate, index, name, password, address)
    except Busy as busy:
        await _audit(request, "login", "refused", who=name or None,
                     detail=f"too many attempts at once {'for this account' if busy.account else 'from this address'}")
        return _login_answer(request, form, 429, BUSY_ACCOUNT if busy.account else BUSY_ADDRESS)
    if user is None:
        await _audit(request, "login", "refused", who=name or None, detail="wrong user name or password")
        slowed = SLOWED.format(max=accounts.MAX_DELAY) if delay >= 1 else ""
        return _login_answer(request, form, 401, WRONG + slowed)
    token, session = await run(request, lambda: accounts.open_session(
        index, user=user, hours=request.app[CONFIG].viewer.session_hours, now=request.app[CLOCK]()))
    request[SESSION] = session
    await _audit(request, "login")
    response = web.HTTPFound(_next(str(form.get("next", ""))))
    _set_cookie(request, response, token)
    raise response


def _set_cookie(request: web.Request, response, token: str) -> None:
    response.set_cookie(COOKIE, token, httponly=True, secure=request.app[CONFIG].viewer.tls, samesite="Strict",
                        path="/", max_age=int(request.app[CONFIG].viewer.session_hours * 3600))


async def logout(request: web.Request) -> web.Response:
    await run(request, accounts.close_session, request.app[ARCHIVE].index, request.cookies.get(COOKIE))
    await _audit(request, "logout")
    response = web.HTTPFound("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def open_share(request: web.Request) -> web.Response:
    """A share link: a session for one study, read-only. The token is never logged."""
    index, now = request.app[ARCHIVE].index, request.app[CLOCK]()
    token = request.match_info["token"]
    found = await run(request, accounts.open_share, index, request.app[SECRET], token, now)
    if found is None:
        why = await run(request, accounts.share_refusal, index, request.app[SECRET], token, now)
        await _audit(request, "share_open", "refused", who="share:?", detail=f"{why} link")
        return _page(request, 403, LINK_CLOSED[why])
    link_id, study_uid = found
    hours = min(request.app[CONFIG].viewer.session_hours, 12.0)
    token, session = await run(request, lambda: accounts.open_session(index, share_id=link_id, study_uid=study_uid,
                                                                        hours=hours, now=now))
    request[SESSION] = session
    await _audit(request, "share_open", study_uid=study_uid)
    response = web.HTTPFound(f"/studies/{study_uid}")
    _set_cookie(request, response, token)
    raise response


async def studies_page(request: web.Request) -> web.Response:
    if request[SESSION].is_share:
        return _page(request, 403, SHARE_ONLY)
    return render(request, "studies.html", query=dict(request.query))


async def study_page(request: web.Request) -> web.Response:
    study_uid = _study(request, request.match_info["study"])
    detail = await run(request, _study_detail, request.app[ARCHIVE].index, study_uid)
    if detail is None:
        raise web.HTTPNotFound(text="no such study")
    await _audit(request, "view", study_uid=study_uid)
    return render(request, "study.html", study=detail, share_days=request.app[CONFIG].viewer.share_link_days,
                  ohif=request.app[OHIF_ON])


async def model_page(request: web.Request) -> web.Response:
    job = await _job(request)
    results = await run(request, queue.results, request.app[ARCHIVE].index, job.id)
    names = {r["name"] for r in results if r["kind"] == "file"}
    if "model.x3d" not in names:
        raise web.HTTPNotFound(text="this job made no 3D model")
    await _audit(request, "view_model", study_uid=job.study_uid, detail=job.id)
    return render(request, "model.html", job=job, phone="model-phone.x3d" in names)


# -- studies ---------------------------------------------------------------------------------

def _identifier(params) -> Dataset:
    """The search as a C-FIND identifier. Its values are not validated by pydicom here (the query
    checks them and says what is wrong): pydicom's warnings would write them, patient data, to the log."""
    name = params.get("name", "").strip()
    low, high = params.get("from", "").replace("-", ""), params.get("to", "").replace("-", "")
    values = {"QueryRetrieveLevel": "STUDY", "PatientName": name if ("*" in name or not name) else f"*{name}*",
              "PatientID": params.get("id", "").strip(), "StudyDate": f"{low}-{high}" if (low or high) else "",
              "ModalitiesInStudy": params.get("modality", "").strip().upper(),
              "AccessionNumber": params.get("accession", "").strip(), "StudyInstanceUID": "", "StudyTime": "",
              "StudyDescription": ""}
    ds = Dataset()
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), value, validation_mode=pydicom_config.IGNORE))
    return ds


def _search(index, params: dict, page: int, order: str = "date", descending: bool = True,
            referring: str | None = None, case_insensitive: bool = True) -> dict:
    """One page of the list; `referring`: a reader's, whose studies alone are searched (roles.limited)."""
    identifier = roles.restrict(_identifier(params), referring)
    query = Query(STUDY_ROOT, identifier, case_insensitive_names=case_insensitive) if identifier is not None else None
    rows = [] if query is None else facts.study_page(index, query, order=order, descending=descending,
                                                     limit=PAGE + 1, offset=page * PAGE)
    found = [{"study_uid": r["StudyInstanceUID"], "patient_name": r["PatientName"], "patient_id": r["PatientID"],
              "date": r["StudyDate"], "time": r["StudyTime"], "description": r["StudyDescription"],
              "accession": r["AccessionNumber"], "modalities": r["ModalitiesInStudy"],
              "images": r["images"], "results": r["results"]} for r in rows[:PAGE]]
    jobs = queue.jobs_of_studies(index, [s["study_uid"] for s in found]) if found else {}
    for study in found:
        newest = [job.as_json() for job in jobs.get(study["study_uid"], [])]
        study["jobs"] = dict(sorted(Counter(job["state"] for job in newest).items()))   # by state
        # findings / nothing-found / done / failed / running / queued (viewer/analysis.py)
        study["analysis"] = analysis.study_verdict(newest)
    return {"studies": found, "page": page, "more": len(rows) > PAGE, "sort": order,
            "order": "desc" if descending else "asc"}


def _search_params(query) -> dict[str, str]:
    """The search fields of the query string, each checked for its length (400 past it)."""
    params = {}
    for key, label in SEARCH_FIELDS.items():
        value = query.get(key, "")
        if len(value) > SEARCH_MAX_CHARS:
            raise _bad_request(f"{label}: at most {SEARCH_MAX_CHARS} characters; shorten it and search again")
        params[key] = value
    return params


# what SQLite says when a statement is too big or too complex for it (bad input, not a broken node)
_TOO_COMPLEX = ("too large", "too complex", "too many", "too big")


async def api_studies(request: web.Request) -> web.Response:
    _people_only(request)
    try:
        page = max(0, min(int(request.query.get("page", "0")), 10000))
    except ValueError:
        raise _bad_request("page must be a number") from None
    params = _search_params(request.query)
    order, direction = request.query.get("sort", "date"), request.query.get("order", "desc")
    if order not in STUDY_LIST_ORDER or direction not in ("asc", "desc"):
        raise _bad_request(f"sort by one of {', '.join(STUDY_LIST_ORDER)}, order asc or desc")
    try:
        result = await run(request, _search, request.app[ARCHIVE].index, params, page, order, direction == "desc",
                           roles.limited(request[SESSION]),
                           # the list's search ignores case (it always has); a reader's name as the node's setting says
                           request.app[CONFIG].query.case_insensitive_names or roles.limited(request[SESSION]) is None)
    except ValueError as exc:                  # QueryError, or a value pydicom will not take
        raise _bad_request(str(exc)[:300] or "this search cannot be run") from None
    except sa_exc.OperationalError as exc:       # the database refused the statement as too large
        if not any(words in str(exc) for words in _TOO_COMPLEX):
            raise
        raise _bad_request("this search is too complex: use fewer values or wildcards") from None
    return _json(result)


def _study_detail(index, study_uid: str) -> dict | None:
    found = facts.study(index, study_uid)
    if found is None:
        return None
    study = {f.name: getattr(found, f.name) for f in fields(found) if f.name != "series"}
    study["series"] = [{"series_uid": se.series_uid, "modality": se.modality, "number": se.number,
                        "description": se.description, "instances": [asdict(i) for i in se.instances],
                        "result": any(i.job_id for i in se.instances)} for se in found.series]
    return study


MAX_VIEWS_PER_SERIES = 16     # images of one mammography series whose laterality and view are read


def _labelled_study(index, images, study_uid: str) -> dict | None:
    """The study with a label for each series that tells it apart ("MG R CC", not two "MG 1"; a
    result series names the plug-in and the series it was made from) and each mammogram's
    laterality, view and orientation (the hanging)."""
    detail = _study_detail(index, study_uid)
    if detail is None:
        return None
    facts = {}
    for series in detail["series"]:
        if series["result"] or not series["instances"]:
            continue
        # a mammography series may hold several views: each image's is read (a few, each header once)
        each = series["modality"] in analysis.PROJECTION_MODALITIES
        for position, instance in enumerate(series["instances"][:MAX_VIEWS_PER_SERIES if each else 1]):
            try:
                found = images.facts(instance["sop_instance_uid"])
            except Exception as exc:          # an unreadable header: the series keeps a plain label
                log.debug("no facts for a series of study %s: %s", study_uid, type(exc).__name__)
                break
            if position == 0:
                facts[series["series_uid"]] = found
            if each:
                instance.update({k: found[k] for k in ("laterality", "view", "orientation")})
        if series["modality"] in analysis.CROSS_SECTIONAL_MODALITIES:
            # the letters at the image's edges (A, P, R, L, H, F): its first image's orientation
            try:
                series["image_orientation"] = analysis.image_orientation(
                    images.dataset(series["instances"][0]["sop_instance_uid"]))
            except Exception as exc:          # an unreadable header: no letters
                log.debug("no orientation for a series of study %s: %s", study_uid, type(exc).__name__)
    jobs = queue.jobs(index, study_uid=study_uid, limit=1000)
    analysis.label_series(detail["series"], facts, {j.id: j.inputs for j in jobs}, {j.id: j.plugin for j in jobs})
    return detail


async def api_study(request: web.Request) -> web.Response:
    study_uid = _study(request, request.match_info["study"])
    detail = await run(request, _labelled_study, request.app[ARCHIVE].index, request.app[IMAGES], study_uid)
    if detail is None:
        raise _not_found("study")
    return _json(detail)


def _job_findings(archive, study_uid: str) -> list[tuple[str, dict]]:
    """(job id, findings.json) of the study's succeeded jobs that wrote one, newest first."""
    out = []
    for job_id, blob_id in queue.succeeded_files(archive.index, study_uid, "findings.json"):
        try:
            findings = json.loads(archive.storage.read_all(blob_id))
        except ValueError:
            log.warning("job %s: its findings.json is not JSON", job_id)
            continue
        out.append((job_id, findings if isinstance(findings, dict) else {}))
    return out


def _findings(archive, study_uid: str) -> dict:
    """Marks to overlay, by source instance: the newest succeeded job that wrote findings.json for
    an image claims it (a later job supersedes an earlier one), its marks and its outcome; a
    later job that found nothing on an image leaves no earlier mark on it."""
    out: dict[str, dict] = {}
    for job_id, findings in _job_findings(archive, study_uid):
        outcomes = analysis.outcomes_of(findings)
        marks: dict[str, dict] = {}
        for kind in ("clusters", "calcifications"):
            for mark in findings.get(kind) or []:
                uid = mark.get("sop_instance_uid") if isinstance(mark, dict) else None
                if uid:
                    marks.setdefault(uid, {"clusters": [], "calcifications": []})[kind].append(mark)
        for uid in {*outcomes, *marks}:
            if uid not in out:
                out[uid] = {"clusters": [], "calcifications": [], **marks.get(uid, {}), "job_id": job_id,
                            "outcome": outcomes.get(uid, {}).get("outcome")}
    return out


def _analysis(index, archive, plugins, study_uid: str) -> dict:
    detail = _study_detail(index, study_uid)
    if detail is None:
        return {"images": {}}
    takes = plugins_for_study(index, plugins, study_uid)
    jobs = queue.jobs(index, study_uid=study_uid, limit=1000)
    outcomes = {job_id: analysis.outcomes_of(f) for job_id, f in _job_findings(archive, study_uid)}
    titles = {name: getattr(plugin, "title", name) for name, plugin in plugins.items()}
    return {"images": analysis.image_states(detail["series"], takes, jobs, outcomes, titles)}


async def api_analysis(request: web.Request) -> web.Response:
    """Each source image's state for each analysis that takes it: not run, queued, running, found
    nothing, found, done, failed (with the reason in plain words). See viewer/analysis.py."""
    study_uid = _study(request, request.match_info["study"])
    return _json(await run(request, _analysis, request.app[ARCHIVE].index, request.app[ARCHIVE],
                           request.app[PLUGINS], study_uid))


async def api_findings(request: web.Request) -> web.Response:
    study_uid = _study(request, request.match_info["study"])
    return _json(await run(request, _findings, request.app[ARCHIVE], study_uid))


# -- jobs --------------------------------------------------------------------------------------

async def api_jobs(request: web.Request) -> web.Response:
    study_uid = _study(request, request.match_info["study"])
    found = await run(request, lambda: queue.jobs(request.app[ARCHIVE].index, study_uid=study_uid))
    out = []
    for job in found:
        item = {k: v for k, v in job.as_json().items() if k not in ("lease_expires", "worker")}
        if job.errors:                           # the last failure as people read it, the technical text apart
            item["reason"], item["technical"] = analysis.plain_reason(job.errors[-1])
        item["files"] = [r["name"] for r in await run(request, queue.results, request.app[ARCHIVE].index, job.id)
                         if r["kind"] == "file"]
        out.append(item)
    return _json({"jobs": out})


async def api_plugins(request: web.Request) -> web.Response:
    from gpu_workers.plugin import describe

    study_uid = _study(request, request.match_info["study"])
    plugins = request.app[PLUGINS]
    takes = await run(request, plugins_for_study, request.app[ARCHIVE].index, plugins, study_uid)
    off = _no_router(request.app[CONFIG])
    return _json({"plugins": [{**describe(plugins[name]), "series": series} for name, series in sorted(takes.items())],
                  "can_start": roles.ANALYSE in roles.rights(request[SESSION]) and off is None, "why_not": off})


def _no_router(config) -> str | None:
    """Why a job started here would never run, or None: no router on this node ([router] enabled = false) and
    no index shared with nodes that may run one ([index] url)."""
    if config.router.enabled or config.index.url:
        return None
    return ("analyses cannot be started on this node: its router is off (router.enabled = false), so a job "
            "would wait for ever; `m3dicom plugin run` runs a plug-in on files without one")


async def api_start_job(request: web.Request) -> web.Response:
    _people_only(request)
    study_uid = _study(request, request.match_info["study"])
    body = await json_body(request)
    series = body.get("series") if isinstance(body, dict) else None
    if (not isinstance(body, dict) or not isinstance(body.get("params", {}), dict)
            or not (series is None or isinstance(series, list) and all(isinstance(s, str) for s in series))):
        raise _bad_request("expected {plugin, params, series: [series UIDs] or none}")
    config = request.app[CONFIG]
    if (off := _no_router(config)) is not None:
        await _audit(request, "job", "refused", study_uid=study_uid, detail="the router is off")
        return _json({"error": off}, status=409)
    try:
        made = await run(request, lambda: request_job(
            request.app[ARCHIVE].index, request.app[PLUGINS], study_uid=study_uid, plugin=str(body.get("plugin", "")),
            params=body.get("params", {}), series=body.get("series") or None,
            created_by=request[SESSION].user.name, max_attempts=config.router.max_attempts))
    except JobRequestError as exc:
        await _audit(request, "job", "refused", study_uid=study_uid, detail=str(exc))
        return _json({"error": str(exc)}, status=400)
    await _audit(request, "job", study_uid=study_uid, detail=f"{body.get('plugin')}: {', '.join(made)}")
    return _json({"jobs": made}, status=201)


async def api_cancel(request: web.Request) -> web.Response:
    _people_only(request)
    job = await _job(request)
    from router.api import cancel
    try:
        await run(request, cancel, request.app[ARCHIVE].index, job.id)
    except IllegalTransition as exc:
        return _json({"error": str(exc)}, status=409)
    await _audit(request, "job_cancel", study_uid=job.study_uid, detail=job.id)
    return _json({"cancelled": job.id})


async def api_job_file(request: web.Request) -> web.Response:
    job = await _job(request)
    name = request.match_info["name"]
    results = await run(request, queue.results, request.app[ARCHIVE].index, job.id)
    match = next((r for r in results if r["kind"] == "file" and r["name"] == name), None)
    if match is None:                                    # only this job's files, by their recorded names
        raise _not_found("file")
    data = await run(request, request.app[ARCHIVE].storage.read_all, match["blob_id"])
    await _audit(request, "download", study_uid=job.study_uid, detail=f"{job.id}/{name}")
    media_type = match["media_type"].split(";")[0]
    headers = {"Cache-Control": "private, max-age=3600", "Vary": "Accept-Encoding", "X-Content-Size": str(len(data))}
    if _compressible(media_type) and len(data) > 4096 and "gzip" in request.headers.get("Accept-Encoding", ""):
        data = await run(request, _gzip, data)                # an X3D scene: a third of its size, for phones
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=data, content_type=media_type, headers=headers)


def _compressible(media_type: str) -> bool:
    return media_type.startswith("text/") or media_type.endswith(("+xml", "/xml", "/json", "+json"))


def _gzip(data: bytes) -> bytes:
    """gzip at level 1: 4.4 MB of X3D in about 60 ms (level 6 takes eight times as long for 15% less)."""
    import zlib

    packer = zlib.compressobj(1, wbits=31)
    return packer.compress(data) + packer.flush()


# -- sharing -----------------------------------------------------------------------------------

async def api_share(request: web.Request) -> web.Response:
    _people_only(request)
    study_uid = _study(request, request.match_info["study"])
    config = request.app[CONFIG].viewer
    body = await json_body(request, {})
    try:
        days = float(body.get("days", config.share_link_days) if isinstance(body, dict) else "not a number")
    except (ValueError, TypeError, OverflowError):
        raise _bad_request("days must be a number") from None
    if not 0 < days <= 90:
        return _json({"error": "a link lasts between 0 and 90 days"}, status=400)
    if await run(request, _study_detail, request.app[ARCHIVE].index, study_uid) is None:
        raise _not_found("study")
    token, expires = await run(request, accounts.create_share, request.app[ARCHIVE].index, request.app[SECRET],
                               study_uid, request[SESSION].user.name, days)
    await _audit(request, "share", study_uid=study_uid, detail=f"until {time.strftime('%Y-%m-%d %H:%M', time.localtime(expires))}")
    base = config.public_url or f"{'https' if config.tls else 'http'}://{request.host}"
    return _json({"url": f"{base.rstrip('/')}/s/{quote(token)}", "expires": expires}, status=201)


def _may_revoke(user: accounts.User, created_by: str | None) -> bool:
    """A link is revoked by the clinician who made it, or by an admin."""
    return user.role == "admin" or created_by == user.name


async def api_shares(request: web.Request) -> web.Response:
    _people_only(request)
    study_uid = _study(request, request.match_info["study"])
    user = request[SESSION].user
    shares = await run(request, accounts.shares, request.app[ARCHIVE].index, study_uid)
    return _json({"shares": [{**s, "can_revoke": _may_revoke(user, s["created_by"])} for s in shares]})


async def api_revoke(request: web.Request) -> web.Response:
    _people_only(request)
    link_id = request.match_info["share"]
    if not (0 < len(link_id) <= 32) or not link_id.isascii() or not link_id.replace("-", "").replace("_", "").isalnum():
        raise _not_found("share link")
    index = request.app[ARCHIVE].index
    link = await run(request, accounts.share, index, link_id)
    if link is None:
        raise _not_found("share link")
    if not _may_revoke(request[SESSION].user, link["created_by"]):
        await _audit(request, "share_revoke", "refused", study_uid=link["study_uid"],
                     detail=f"{link_id}: made by another user")
        raise _forbidden("only the person who made this link, or an admin, can revoke it")
    if not await run(request, accounts.revoke_share, index, link_id):
        raise _not_found("share link")
    await _audit(request, "share_revoke", study_uid=link["study_uid"], detail=link_id)
    return _json({"revoked": link_id})


# -- instances -----------------------------------------------------------------------------------

async def _decoded(request: web.Request, uid: str):
    """The instance's decoded pixels; 422 when a stored file's pixel data cannot be decoded (cut
    short, an impossible bit depth, a codestream of noise): the file's fault, not the request's."""
    try:
        return await run(request, request.app[IMAGES].decode, uid)
    except NotAnImage:
        raise
    except Exception as exc:
        log.warning("instance %s: its pixel data cannot be decoded (%s)", uid, type(exc).__name__)
        why = f"this image cannot be shown: its pixel data cannot be decoded ({str(exc)[:200] or type(exc).__name__})"
        raise web.HTTPUnprocessableEntity(text=json.dumps({"error": why}), content_type="application/json") from None


def _unreadable(uid: str, exc: Exception) -> web.HTTPException:
    """422 for a stored file that cannot be read within the limits (a deflate bomb, nesting too
    deep: docs/security.md) or at all (a damaged header); 503 for one that another node holds and
    has not offloaded yet (`not_here`)."""
    if isinstance(exc, BlobNotOffloaded):
        return not_here(uid, exc)
    if isinstance(exc, InvalidInstance):
        log.warning("instance %s cannot be read: %s", uid, exc)
        why = f"this object cannot be read: {exc}"
    else:
        log.warning("instance %s: its header cannot be read (%s)", uid, type(exc).__name__)
        why = f"this image cannot be shown: its header cannot be read ({type(exc).__name__})"
    return web.HTTPUnprocessableEntity(text=json.dumps({"error": why}), content_type="application/json")


def not_here(uid: str, exc: BlobNotOffloaded) -> web.HTTPServiceUnavailable:
    """503: the instance exists, on another node that has not put it in S3 yet (storage.remote_wait_seconds)."""
    log.warning("instance %s cannot be read here: %s", uid, exc)
    why = f"this object is not available on this node yet: {exc}"
    return web.HTTPServiceUnavailable(text=json.dumps({"error": why}), content_type="application/json",
                                      headers={"Retry-After": "10"})


async def _dataset(request: web.Request, uid: str):
    """The stored data set without its pixel data or other large values; 422 when it cannot be read."""
    try:
        return await run(request, request.app[IMAGES].dataset, uid)
    except Exception as exc:
        raise _unreadable(uid, exc) from None


async def _with_pixels(request: web.Request, uid: str, work, picture_pixels: int = 0):
    """`work(decoded)` on the instance's pixels, decoded (once) and shown within the viewer's memory
    for images (images.MemoryBudget, viewer.decode_memory_mb): NotAnImage when it is not shown, 422
    when it cannot be read or decoded, 503 when that memory stays taken by other images."""
    images = request.app[IMAGES]
    try:
        need, decoded = await run(request, images.prepare, uid, picture_pixels)
    except NotAnImage:
        raise
    except Exception as exc:
        raise _unreadable(uid, exc) from None
    try:
        async with images.budget.hold(need):
            decoded = decoded or await _decoded(request, uid)
            return await run(request, work, decoded)
    except ImagesBusy as exc:
        raise web.HTTPServiceUnavailable(text=json.dumps({"error": str(exc)}), content_type="application/json",
                                         headers={"Retry-After": "10"}) from None


async def api_info(request: web.Request) -> web.Response:
    uid, _ = await _instance(request)
    try:
        info = await _with_pixels(request, uid, lambda decoded: decoded.info)
    except NotAnImage as exc:
        try:
            header = await run(request, request.app[IMAGES].header, uid)
        except Exception as error:
            raise _unreadable(uid, error) from None
        return _json({"image": False, "sop_class_uid": header.sop_class_uid, "why": str(exc),
                      "modality": header.modality})
    return _json({"image": True, **info})


def _numbers(query, names, kind=float):
    try:
        return [kind(query[n]) if n in query else None for n in names]
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "bad number in the query"}', content_type="application/json") from None


async def api_render(request: web.Request) -> web.Response:
    uid, _ = await _instance(request)
    q = request.query
    x, y, w, h, width, height, frame = _numbers(q, ("x", "y", "w", "h", "width", "height", "frame"), int)
    center, window = _numbers(q, ("wc", "ww"))
    fmt = q.get("format", "png")
    if fmt not in ("png", "jpeg"):
        raise web.HTTPBadRequest(text='{"error": "format: png or jpeg"}', content_type="application/json")
    region = (x, y, w, h) if None not in (x, y, w, h) else None
    size = (width, height) if (width, height) != (None, None) else None
    picture = min(abs(width or IMAGE_LIMIT), IMAGE_LIMIT) * min(abs(height or IMAGE_LIMIT), IMAGE_LIMIT)
    try:
        data = await _with_pixels(request, uid, lambda decoded: request.app[IMAGES].render(
            uid, frame=frame or 0, region=region, size=size, window=(center, window) if None not in (center, window)
            else None, fmt=fmt, decoded=decoded), picture)
    except NotAnImage as exc:
        raise web.HTTPUnprocessableEntity(text=json.dumps({"error": str(exc)}), content_type="application/json")
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}), content_type="application/json") from None
    return web.Response(body=data, content_type=f"image/{fmt}", headers={"Cache-Control": "private, max-age=3600"})


SR_MAX_DEPTH, SR_MAX_ITEMS = 8, 5000     # what the report view shows of an SR's content tree at most


def _first(ds, keyword: str):
    """The first item of a sequence, or None (absent, empty, or not a sequence)."""
    sequence = ds.get(keyword)
    return sequence[0] if isinstance(sequence, Sequence) and len(sequence) else None


def _meaning(ds, keyword: str) -> str:
    code = _first(ds, keyword)
    return str(code.get("CodeMeaning", "")) if code is not None else ""


def _sr_value(item) -> str:
    kind = str(item.get("ValueType", ""))
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item, "ConceptCodeSequence")
    if kind == "NUM":
        measured = _first(item, "MeasuredValueSequence")
        if measured is None:
            return ""
        unit = _first(measured, "MeasurementUnitsCodeSequence")
        return analysis.measured(measured.get("NumericValue", ""), unit.get("CodeValue", "") if unit is not None else "")
    if kind in ("UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
        return str(item.get({"UIDREF": "UID", "DATETIME": "DateTime", "DATE": "Date", "TIME": "Time",
                             "PNAME": "PersonName"}[kind], ""))
    if kind == "SCOORD":
        return f"{item.get('GraphicType', '')} {list(item.get('GraphicData', None) or [])[:4]}"
    return ""


def _sr_items(sequence, depth: int = 0, budget: list[int] | None = None) -> list[dict]:
    """The content tree as the report view shows it; whatever an item holds (an empty code
    sequence, a value pydicom cannot convert), the rest of the report is still shown."""
    budget = [SR_MAX_ITEMS] if budget is None else budget
    items = []
    for item in sequence if isinstance(sequence, Sequence) else []:
        if budget[0] <= 0:
            break
        budget[0] -= 1
        try:
            entry = {"name": _meaning(item, "ConceptNameCodeSequence"), "type": str(item.get("ValueType", "")),
                     "value": _sr_value(item)}
            if entry["type"] == "IMAGE":        # the page names it ("MG R CC") when it is in the study
                reference = _first(item, "ReferencedSOPSequence")
                entry["image"] = str(reference.get("ReferencedSOPInstanceUID", "")) if reference is not None else ""
            children = item.get("ContentSequence") if depth < SR_MAX_DEPTH else None
        except Exception:                      # a value pydicom cannot read: shown as such
            entry, children = {"name": "", "type": "", "value": "(this item cannot be read)"}, None
        entry["children"] = _sr_items(children, depth + 1, budget) if children is not None else []
        items.append(entry)
    return items


async def api_sr(request: web.Request) -> web.Response:
    uid, _ = await _instance(request)
    ds = await _dataset(request, uid)
    if not isinstance(ds.get("ContentSequence"), Sequence):
        raise web.HTTPUnprocessableEntity(text='{"error": "not a structured report"}', content_type="application/json")
    title = _meaning(ds, "ConceptNameCodeSequence") or "Report"
    items = await run(request, _sr_items, ds.ContentSequence)
    try:
        table = await run(request, analysis.report_findings, ds)
    except Exception as exc:                  # a report too odd for the table: its tree is still shown
        log.warning("instance %s: no findings table (%s)", uid, type(exc).__name__)
        table = {"findings": [], "algorithm": None}
    return _json({"title": title, "items": items, **table})


async def api_download(request: web.Request) -> web.StreamResponse:
    """The instance as received, streamed from its verified decrypted copy (any size, bounded memory)."""
    uid, study_uid = await _instance(request)
    with ExitStack() as stack:
        path = await run(request, lambda: stack.enter_context(request.app[IMAGES].exported(uid)))
        response = web.StreamResponse(headers={"Content-Type": "application/dicom",
                                               "Content-Disposition": f'attachment; filename="{uid}.dcm"'})
        response.content_length = path.stat().st_size
        await response.prepare(request)
        with open(path, "rb") as fh:
            while chunk := await run(request, fh.read, 1 << 20):
                await response.write(chunk)
        await response.write_eof()
        # recorded before the decrypted copy goes: whoever sees it gone sees the download audited
        await _audit(request, "download", study_uid=study_uid, detail=uid)
    return response


# -- notifications ---------------------------------------------------------------------------------

async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: job progress and results, as the change log records them."""
    session = request[SESSION]
    broker = request.app[EVENTS]
    try:                                        # a few per session and per address (viewer.max_event_streams)
        subscription = broker.subscribe(session.token_hash, source_of(_address(request)))
    except TooManyStreams as exc:
        refusal = _json({"error": str(exc)}, 429)
        refusal.headers["Retry-After"] = "30"
        refusal.force_close()                   # its connection too (a TLS connection holds 256 KiB)
        return refusal
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b": connected\n\n")
        last_seen = request.headers.get("Last-Event-ID", "")
        backlog = await run(request, broker.missed, int(last_seen)) if _EVENT_ID.match(last_seen) else []
        sent = quiet = 0
        referring, reach = roles.limited(session), {}       # a reader: events of their studies only
        insensitive = request.app[CONFIG].query.case_insensitive_names
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while True:
            if loop.time() - checked >= STREAM_RECHECK:      # logged out, disabled, demoted, link revoked: it ends
                checked = loop.time()
                if not await run(request, accounts.still_open, request.app[ARCHIVE].index, session,
                                 request.app[CONFIG].viewer.session_idle_minutes, request.app[CLOCK]()):
                    break
            if backlog:
                event = backlog.pop(0)
            else:
                try:
                    event = await asyncio.wait_for(subscription.get(), timeout=1)
                except asyncio.TimeoutError:        # a closed connection frees its stream within a second
                    if request.transport is None or request.transport.is_closing():
                        break
                    quiet += 1
                    if quiet % 15 == 0:
                        await response.write(b": keep-alive\n\n")
                    continue
            if event["seq"] <= sent or (session.is_share and event.get("study_uid") != session.study_uid):
                continue
            if referring is not None:
                study = event.get("study_uid")
                if study not in reach or loop.time() - reach[study][1] > REACH_KEPT:   # a study's physician may be
                    if len(reach) > 10000:                                             # corrected: asked again
                        reach.clear()
                    reach[study] = (bool(study) and await run(request, roles.reaches, request.app[ARCHIVE].index,
                                                              referring, study, insensitive), loop.time())
                if not reach[study][0]:
                    continue
            sent = event["seq"]
            await response.write(f"id: {event['seq']}\nevent: change\ndata: {json.dumps(event, default=str)}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        broker.unsubscribe(subscription)
    return response
