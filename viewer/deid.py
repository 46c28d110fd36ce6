"""De-identified copies from the study page (admins): the study's exports, and a new one queued for the router.

The copies are made and sent by the router (`router/deid/`), as a rule's are; this page only queues an export
and shows each one's state, counts and last error. An admin may send to the configured destinations only: the
[remote.NAME] nodes, the [dicomweb.NAME] servers and the s3:// places the rules name (`m3dicom deid` takes any).
"""
from __future__ import annotations

from aiohttp import web

from archive.inputs import uid_kind
from router.deid import store

from . import views
from .base import ARCHIVE, CONFIG, SESSION, json_body, run


def routes(app: web.Application) -> None:
    app.router.add_get("/api/studies/{study}/exports", api_exports)
    app.router.add_post("/api/studies/{study}/exports", api_export)


def destinations(config) -> list[str]:
    places = {d for rule in config.router.rules for d in rule.deid_to if d.startswith("s3://")}
    return sorted(config.remote) + sorted(config.dicomweb) + sorted(places)


async def api_exports(request: web.Request) -> web.Response:
    study_uid = views._study(request, request.match_info["study"])
    config = request.app[CONFIG]
    found = await run(request, lambda: store.exports(request.app[ARCHIVE].index, study_uid, limit=20))
    off = _no_router(config)
    return views._json({"exports": [e.as_json() for e in found], "profiles": sorted(config.deid),
                        "destinations": destinations(config), "why_not": off or (
                            None if config.deid else "no [deid.NAME] profile is configured (docs/deid.md)")})


async def api_export(request: web.Request) -> web.Response:
    views._people_only(request)
    study_uid = views._study(request, request.match_info["study"])
    body = await json_body(request)
    config = request.app[CONFIG]
    if (not isinstance(body, dict) or not isinstance(body.get("profile"), str) or not isinstance(body.get("to"), str)
            or not (body["profile"].isprintable() and body["to"].isprintable())):
        # a control character (NUL) is no profile's or destination's name; PostgreSQL's audit could not keep it
        return views._json({"error": "expected {profile, to}"}, status=400)
    profile, to = body["profile"], body["to"]
    off = _no_router(config)
    why = off or (
        f"no [deid.{profile}] profile" if profile not in config.deid else
        f"{to!r} is not a configured destination ({', '.join(destinations(config)) or 'none'})"
        if to not in destinations(config) else None)
    if why is None:
        why = await run(request, _secret_missing, config, profile)
    if why is None and await run(request, uid_kind, request.app[ARCHIVE].index, study_uid) != "study":
        why = "the study has no instances here"
    if why:
        await views._audit(request, "deid_export", "refused", study_uid=study_uid, detail=why[:300])
        return views._json({"error": why}, status=409 if off else 400)
    made = await run(request, lambda: store.create(
        request.app[ARCHIVE].index, study_uid=study_uid, profile=profile, destination=to,
        max_attempts=config.router.max_attempts, created_by=request[SESSION].user.name))
    await views._audit(request, "deid_export", study_uid=study_uid, detail=f"{to} (deid:{profile}, export {made})")
    return views._json({"export": made}, status=201)


def _no_router(config) -> str | None:
    """Why an export queued here would never run (views._no_router, said of copies rather than analyses)."""
    if views._no_router(config) is None:
        return None
    return ("de-identified copies cannot be sent from this node: its router is off (router.enabled = false), so "
            "an export would wait for ever; `m3dicom deid STUDY --to DESTINATION` sends one by hand")


def _secret_missing(config, profile: str) -> str | None:
    from router.deid.export import ExportError, read_secret

    try:
        read_secret(config, profile)
    except ExportError as exc:
        return str(exc)
    return None
