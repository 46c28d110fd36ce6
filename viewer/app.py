"""The clinician web viewer: an aiohttp application (`create_app(config)`).

Pages are Jinja2 templates with plain JavaScript modules (no build step); X3DOM comes from
the npm registry (installed by `make install`) and is served from here: hospitals run
offline; so is OHIF, at /ohif/ (viewer/ohif.py). Every request passes these middlewares: security headers (CSP, nosniff,
frame-ancestors, referrers only within the site), errors (what a handler did not expect is
one log line and a 500 without details, never a traceback in the answer), the session (cookie
-> a user, or a share link limited to one study), and CSRF (every state-changing request
comes from this site, by its Origin or Referer, and carries the session's token; a login,
which has no session yet, is checked by its origin alone). /dicomweb (dicomweb.py, wado.py) also takes
API tokens (`Authorization: Bearer`): such a call carries no cookie, so there is nothing for CSRF to forge.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from pathlib import Path
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from archive import Archive, metrics
from archive.storage import BlobNotOffloaded

from . import accounts, admin, authorize, deid, dicomweb, events, ohif, views, wado
from .base import (ARCHIVE, CLOCK, CONFIG, COOKIE, DENIALS, EVENTS, IMAGES, LOGINS, OHIF_ON, PLUGINS, REFUSALS, SECRET,
                   SESSION, TEMPLATES, form, run)
from .images import Images
from .logins import LoginGate, Refusals
from .settings import Settings

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
X3DOM = ROOT / "viewer" / "vendor" / "node_modules" / "x3dom"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PUBLIC = ("/login", "/static/", "/s/", "/favicon.ico")


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


@web.middleware
async def counted(request: web.Request, handler):
    """Each request counted and timed by route (its pattern, never the path: it holds UIDs and share
    tokens), method and status (`archive.metrics`)."""
    started, status = time.perf_counter(), 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499                 # the client went away first (nginx's word for it)
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        measure = metrics.get()
        measure.http_requests.labels(route, request.method if request.method in _METHODS else "other",
                                     str(status)).inc()
        measure.http_request_seconds.labels(route).observe(time.perf_counter() - started)


@web.middleware
async def security_headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["X-Frame-Options"] = "DENY"
    # referrers within the site only (share links never leave in one); "no-referrer" would make the
    # browser send "Origin: null" with the site's own forms, and the CSRF check needs their origin
    headers["Referrer-Policy"] = "same-origin"
    headers["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    if request.app[CONFIG].viewer.tls:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    if not request.path.startswith("/static/") and "Cache-Control" not in headers:
        headers["Cache-Control"] = "no-store"
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def errors(request: web.Request, handler):
    """An exception a handler did not turn into an answer: one log line (the route, the exception's
    type and where it was raised; no values, which may be patient data) and a plain 500."""
    try:
        return await handler(request)
    except (web.HTTPException, asyncio.CancelledError, ConnectionResetError):
        raise
    except BlobNotOffloaded as exc:         # on another node, not in S3 yet: the client may try again
        raise views.not_here(request.match_info.get("instance", "?"), exc) from None
    except HttpProcessingError as exc:      # a body aiohttp could not parse: the client's, not ours
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the request could not be read ({exc.message})"[:300]}),
                                 content_type="application/json") from None
    except Exception as exc:
        resource = request.match_info.route.resource
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        log.error("%s %s failed: %s%s", request.method, resource.canonical if resource else "(no route)",
                  type(exc).__name__, f" at {Path(where.filename).name}:{where.lineno}" if where else "")
        log.debug("the traceback", exc_info=exc)
        why = "the viewer failed on this request; its log says where"
        if request.path.startswith("/api/"):
            raise web.HTTPInternalServerError(text=json.dumps({"error": why}), content_type="application/json") \
                from None
        raise web.HTTPInternalServerError(text=why) from None


@web.middleware
async def sessions(request: web.Request, handler):
    """request[SESSION]: the session of the cookie (or None); pages need one, the API answers 401."""
    if dicomweb.is_dicomweb(request):       # programs too: an API token, or the session; 401, never a redirect
        return await dicomweb.authenticate(request, handler)
    app = request.app
    token = request.cookies.get(COOKIE)
    now = app[CLOCK]()
    request[SESSION] = await run(request, accounts.session, app[ARCHIVE].index, token,
                                   app[CONFIG].viewer.session_idle_minutes, now) if token else None
    if request[SESSION] is None and token and not request.path.startswith(PUBLIC):
        closed = await run(request, accounts.closed_share, app[ARCHIVE].index, token, now)
        if closed:                            # a guest whose link was revoked or ran out is told so (403)
            return views.link_closed(request, closed)
    if request[SESSION] is None and not request.path.startswith(PUBLIC) and request.path != "/":
        if request.path.startswith("/api/"):
            raise web.HTTPUnauthorized(text='{"error": "log in first"}', content_type="application/json")
        if request.headers.get("Authorization", "").lower().startswith("bearer "):   # a program, a wrong prefix
            raise web.HTTPNotFound(text='{"error": "no such path: DICOMweb is under /dicomweb (for example '
                                        '/dicomweb/studies)"}', content_type="application/json")
        raise web.HTTPFound(f"/login?next={quote(request.rel_url.raw_path_qs, safe='/')}")
    return await handler(request)


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL or Origin, default ports made explicit; None otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


def own_origins(request: web.Request) -> set[tuple[str, str, int]]:
    """The viewer's own origins: viewer.public_url, and the address this request was sent to
    (its Host header, which a browser always sets to the site it is talking to)."""
    v = request.app[CONFIG].viewer
    schemes = ("https",) if v.tls else ("http", "https")      # without TLS: perhaps behind a TLS proxy
    found = {_origin(f"{scheme}://{request.host}") for scheme in schemes}
    if v.public_url:
        found.add(_origin(v.public_url))
    return {o for o in found if o is not None}


def cross_site(request: web.Request) -> str | None:
    """Where a state-changing request comes from, when that is not this site (else None).

    A browser sends the page's Origin with every POST (a page of this site: its own, thanks to
    Referrer-Policy same-origin); without one, its Referer is checked. A request with neither
    comes from no browser page (a script, a test client) and has nothing to forge.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return None
        origin = referer
    if _origin(origin) in own_origins(request):
        return None
    return (_origin(origin) or ("", origin.strip()[:60] or "an empty origin", 0))[1]


@web.middleware
async def csrf(request: web.Request, handler):
    """State-changing requests must come from this site (Origin, else Referer), a login included,
    and carry the session's CSRF token (header or form field); a login has no session yet."""
    if dicomweb.by_token(request):
        return await handler(request)
    if request.method not in SAFE_METHODS and (elsewhere := cross_site(request)) is not None:
        log.warning("%s %s refused: sent from another site (%s)", request.method,
                    request.path if request.path in ("/login", "/logout") else "(a page's request)", elsewhere)
        why = (f"this request was sent from another site ({elsewhere}), not from the viewer's own pages: open the "
               "viewer at its own address and try again")
        if request.path.startswith("/api/"):
            raise web.HTTPForbidden(text=json.dumps({"error": why}), content_type="application/json")
        raise web.HTTPForbidden(text=why[0].upper() + why[1:] + ".")
    if request.method not in SAFE_METHODS and request.path != "/login":
        session = request[SESSION]
        sent = request.headers.get("X-CSRF-Token")
        if sent is None and request.content_type == "application/x-www-form-urlencoded":
            sent = (await form(request)).get("csrf")
        if session is None or not sent or not accounts.hmac.compare_digest(sent.encode("utf-8", "replace"),
                                                                            session.csrf.encode()):
            raise web.HTTPForbidden(text='{"error": "missing or wrong CSRF token: reload the page"}',
                                    content_type="application/json")
    return await handler(request)


def create_app(config: Settings, archive: Archive | None = None, clock=time.time) -> web.Application:
    """The viewer for `config`'s node (its own archive connection unless one is given)."""
    app = web.Application(middlewares=[counted, security_headers, errors, sessions, csrf, authorize.authorized],
                          client_max_size=(config.viewer.max_upload_mb + 1) << 20)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[LOGINS] = LoginGate(config.viewer.login_waiting)
    app[REFUSALS] = Refusals()
    app[DENIALS] = Refusals()
    app[TEMPLATES] = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)

    async def resources(app: web.Application):
        from gpu_workers.plugin import discover
        from archive import open as open_archive

        opened = archive or open_archive(config)
        app[ARCHIVE] = opened
        app[IMAGES] = Images(opened, config.viewer.image_cache_mb, config.viewer.decode_memory_mb)
        app[PLUGINS] = discover(config.router.plugins)
        app[SECRET] = accounts.shared_secret(opened.index, opened.keyring, config.data_dir)
        app[EVENTS] = events.Broker(opened.index, config.viewer.max_event_streams,
                                    config.viewer.max_event_streams_per_address)
        yield
        await app[EVENTS].close()
        if archive is None:
            opened.close()

    app.cleanup_ctx.append(resources)
    views.routes(app)
    admin.routes(app)
    deid.routes(app)
    dicomweb.routes(app)
    wado.routes(app)
    app.router.add_static("/static/", HERE / "static", follow_symlinks=False)
    if X3DOM.is_dir():
        app.router.add_static("/vendor/x3dom/", X3DOM, follow_symlinks=False)
    app[OHIF_ON] = config.viewer.ohif and ohif.installed()
    if app[OHIF_ON]:
        ohif.routes(app)
    elif config.viewer.ohif:
        log.warning("OHIF is not installed (viewer/vendor/ohif): `make install` installs it; /ohif/ answers 404")
    return app
