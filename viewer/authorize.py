"""The middleware that applies viewer/roles.py to every request: the right of the request's route, for the
session's role, a share link or an API token (403 when it is not granted), and a reader's reach (a study of
someone else's, named in the path by itself, by an instance or by a job, is answered 404 as one that does
not exist).
"""
from __future__ import annotations

import json
import logging

from aiohttp import web

from archive import facts
from router import queue

from . import accounts, roles
from .base import ARCHIVE, CLOCK, CONFIG, DENIALS, JOB_ID, SESSION, render, run, valid_uid
from .dicomweb import CALLER

log = logging.getLogger(__name__)


def _studies_of(index, match_info) -> list[str] | None:
    """The studies a request's path names, each of its study, instance and job resolved (None: one of them
    does not exist, or is not an id of its kind)."""
    found = []
    for name in ("study", "instance", "job"):
        value = match_info.get(name)
        if value is None:
            continue
        if name == "job":
            if not JOB_ID.match(value):
                return None
            try:
                found.append(queue.get(index, value).study_uid)
            except queue.JobNotFound:
                return None
            continue
        if not valid_uid(value):
            return None
        found.append(value if name == "study" else facts.study_of_instance(index, value))
    return None if None in found else found


PAGES = {403: ("Not open to you", "This page is not open to you"), 404: ("Not found", "There is no such study")}


def refusal(request: web.Request, status: type[web.HTTPException], why: str) -> web.HTTPException:
    """A refusal in the request's language: JSON for the API and DICOMweb, a page that says why (and leads
    back) for a browser."""
    if request.path.startswith(("/api/", "/dicomweb", "/ohif/")) or request.method not in ("GET", "HEAD"):
        return status(text=json.dumps({"error": why}), content_type="application/json")
    title, heading = PAGES[status.status_code]
    page = render(request, "message.html", title=title, heading=heading, lines=[why[0].upper() + why[1:] + "."],
                  action=("/", "Back to your studies"))
    return status(text=page.text, content_type="text/html")


async def _refused(request: web.Request, who: str, action: str, why: str, study: str | None = None) -> None:
    """An audit record of a refused right or reach: the first a minute for each caller, with how many more
    came since (someone probing leaves a trace, not a row per request; DENIALS remembers 4096 callers)."""
    denials = request.app[DENIALS]
    earlier = denials.note(f"{action}:{who}", request.app[CLOCK]())
    if denials.forgotten:
        log.warning("%d refused requests of callers past the %d remembered were not audited", denials.forgotten,
                    denials.sources)
        denials.forgotten = 0
    if earlier is None:
        return
    detail = (f"{request.method} {request.match_info.route.resource.canonical}: {why}"
              + (f" (and {earlier} more such refusals since the previous record)" if earlier else ""))
    await run(request, lambda: accounts.audit(request.app[ARCHIVE].index, who, action, "refused", study_uid=study,
                                              detail=detail, address=request.remote))


@web.middleware
async def authorized(request: web.Request, handler):
    """The right of the request's route, for the session's role, a share link or an API token; a reader's
    request for a study of someone else's is answered as for a study that does not exist."""
    resource = request.match_info.route.resource
    if resource is None:                        # no route matched: aiohttp's own 404 / 405
        return await handler(request)
    right = roles.right_of(request.method, resource.canonical)
    if right is None:
        log.error("%s %s: the route has no right in viewer/roles.py ROUTES; refused", request.method,
                  resource.canonical)
        raise refusal(request, web.HTTPForbidden, "this address is not open to anyone (the node's own error: "
                                                  "its log says which route)")
    if right == roles.PUBLIC:
        return await handler(request)
    caller = request.get(CALLER)
    session = request.get(SESSION)
    if session is None and caller is not None and caller.token:          # an API token
        granted = roles.TOKEN_RIGHTS["write" if caller.write else "read"]
    else:
        granted = roles.rights(session)
    if right == roles.SIGNED_IN:
        return await handler(request)
    if right not in granted:
        who = session.who if session is not None else caller.who if caller is not None else "?"
        await _refused(request, who, "right_refused", f"needs the right {right!r}")
        if session is not None and session.is_share:
            raise refusal(request, web.HTTPForbidden, "a share link opens one study, read-only")
        role = session.user.role if session is not None else "this token"
        raise refusal(request, web.HTTPForbidden, f"{roles.WHAT[right]} is not open to the role {role!r} "
                                                  "(ask an administrator)")
    referring = roles.limited(session)
    if referring is not None:
        index = request.app[ARCHIVE].index
        insensitive = request.app[CONFIG].query.case_insensitive_names
        studies = await run(request, _studies_of, index, request.match_info)
        if studies is None or not all([await run(request, roles.reaches, index, referring, s, insensitive)
                                       for s in set(studies)]):
            await _refused(request, session.who, "read_refused", "not one of the reader's studies",
                           next(iter(studies), None) if studies else None)
            raise refusal(request, web.HTTPNotFound, "no such study")
    return await handler(request)
