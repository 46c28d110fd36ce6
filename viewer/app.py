"""The clinician web viewer: an aiohttp application (`create_app(config)`).

Pages are Jinja2 templates with plain JavaScript modules (no build step); X3DOM comes from
the npm registry (installed by `make install`) and is served from here: hospitals run
offline. Every request passes three middlewares: security headers (CSP, nosniff,
frame-ancestors, no referrer), the session (cookie -> a user, or a share link limited to
one study), and CSRF (every state-changing request carries the session's token).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import jinja2
from aiohttp import web

from archive import Archive
from node.config import Config

from . import accounts
from .images import Images

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
X3DOM = ROOT / "viewer" / "vendor" / "node_modules" / "x3dom"
COOKIE = "m3session"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
JOB_ID = re.compile(r"^[0-9a-f]{16}$")

CONFIG = web.AppKey("config", Config)
ARCHIVE = web.AppKey("archive", Archive)
IMAGES = web.AppKey("images", Images)
PLUGINS = web.AppKey("plugins", dict)
SECRET = web.AppKey("secret", bytes)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
EVENTS = web.AppKey("events", object)
CLOCK = web.AppKey("clock", object)
SESSION = web.RequestKey("session", object)     # accounts.Session | None

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PUBLIC = ("/login", "/static/", "/s/", "/favicon.ico")


def valid_uid(value: str) -> bool:
    return bool(UID.match(value)) and len(value) <= 64


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
    headers["Referrer-Policy"] = "no-referrer"          # share links must never leave in a Referer
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
async def sessions(request: web.Request, handler):
    """request[SESSION]: the session of the cookie (or None); pages need one, the API answers 401."""
    app = request.app
    token = request.cookies.get(COOKIE)
    now = app[CLOCK]()
    request[SESSION] = await run(request, accounts.session, app[ARCHIVE].index, token,
                                   app[CONFIG].viewer.session_idle_minutes, now) if token else None
    if request[SESSION] is None and not request.path.startswith(PUBLIC) and request.path != "/":
        if request.path.startswith("/api/"):
            raise web.HTTPUnauthorized(text='{"error": "log in first"}', content_type="application/json")
        raise web.HTTPFound(f"/login?next={request.path}")
    return await handler(request)


@web.middleware
async def csrf(request: web.Request, handler):
    """State-changing requests must carry the session's CSRF token (header or form field)."""
    if request.method not in SAFE_METHODS and request.path != "/login":
        session = request[SESSION]
        sent = request.headers.get("X-CSRF-Token")
        if sent is None and request.content_type == "application/x-www-form-urlencoded":
            sent = (await request.post()).get("csrf")
        if session is None or not sent or not accounts.hmac.compare_digest(sent, session.csrf):
            raise web.HTTPForbidden(text='{"error": "missing or wrong CSRF token: reload the page"}',
                                    content_type="application/json")
    return await handler(request)


async def run(request: web.Request, function, *args):
    """CPU or disk work off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def render(request: web.Request, template: str, **context) -> web.Response:
    session = request.get(SESSION)
    html = request.app[TEMPLATES].get_template(template).render(session=session, csrf=session.csrf if session else "",
                                                               **context)
    return web.Response(text=html, content_type="text/html")


def create_app(config: Config, archive: Archive | None = None, clock=time.time) -> web.Application:
    """The viewer for `config`'s node (its own archive connection unless one is given)."""
    from . import events, views

    app = web.Application(middlewares=[security_headers, sessions, csrf],
                          client_max_size=(config.viewer.max_upload_mb + 1) << 20)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[TEMPLATES] = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)

    async def resources(app: web.Application):
        from gpu_workers.plugin import discover
        from node.service import open_archive

        opened = archive or open_archive(config)
        app[ARCHIVE] = opened
        app[IMAGES] = Images(opened, config.viewer.image_cache_mb)
        app[PLUGINS] = discover(config.router.plugins)
        app[SECRET] = accounts.secret_key(config.data_dir)
        app[EVENTS] = events.Broker(opened.index)
        yield
        await app[EVENTS].close()
        if archive is None:
            opened.close()

    app.cleanup_ctx.append(resources)
    views.routes(app)
    app.router.add_static("/static/", HERE / "static", follow_symlinks=False)
    if X3DOM.is_dir():
        app.router.add_static("/vendor/x3dom/", X3DOM, follow_symlinks=False)
    return app
