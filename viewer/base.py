"""What every part of the viewer's web app shares: the application's and requests' keys, reading
a form's or JSON request's body within its limit, rendering a page, running work off the event
loop. The app (app.py), its routes (views.py) and the upload (upload.py) import this module,
never each other upward: create_app imports the routes, and nothing imports the app.
"""
from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qsl

import jinja2
from aiohttp import web
from multidict import MultiDict

from archive import Archive

from .images import Images
from .logins import LoginGate
from .settings import Settings

COOKIE = "m3session"
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
JOB_ID = re.compile(r"^[0-9a-f]{16}$")

CONFIG = web.AppKey("config", Settings)
ARCHIVE = web.AppKey("archive", Archive)
IMAGES = web.AppKey("images", Images)
PLUGINS = web.AppKey("plugins", dict)
SECRET = web.AppKey("secret", bytes)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
EVENTS = web.AppKey("events", object)
LOGINS = web.AppKey("logins", LoginGate)
CLOCK = web.AppKey("clock", object)
OHIF_ON = web.AppKey("ohif", bool)                # OHIF is served at /ohif/
SESSION = web.RequestKey("session", object)     # accounts.Session | None
FORM = web.RequestKey("form", MultiDict)        # the form fields, once read
BODY_LIMIT = 64 << 10                            # a form's or a JSON request's body (uploads have their own)
FORM_FIELDS = 100


def valid_uid(value: str) -> bool:
    return bool(UID.match(value)) and len(value) <= 64


async def _small_body(request: web.Request) -> bytes:
    """The body of a form or JSON request, at most BODY_LIMIT bytes (413 past it, before more is
    read): client_max_size is the upload's, and /login is open to anyone."""
    if request.content_length is not None and request.content_length > BODY_LIMIT:
        raise web.HTTPRequestEntityTooLarge(max_size=BODY_LIMIT, actual_size=request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_chunked(8192):
        body += chunk
        if len(body) > BODY_LIMIT:
            raise web.HTTPRequestEntityTooLarge(max_size=BODY_LIMIT, actual_size=len(body))
    return bytes(body)


async def form(request: web.Request) -> MultiDict:
    """The fields of a form the pages send (application/x-www-form-urlencoded, UTF-8, at most
    BODY_LIMIT bytes and FORM_FIELDS fields); 400 or 413 with a reason otherwise."""
    if FORM in request:
        return request[FORM]
    if request.content_type not in ("application/x-www-form-urlencoded", ""):
        raise web.HTTPBadRequest(text="Send this form from its page (application/x-www-form-urlencoded).")
    try:
        fields = parse_qsl((await _small_body(request)).decode(), keep_blank_values=True, max_num_fields=FORM_FIELDS)
    except ValueError:                      # not UTF-8, too many fields
        raise web.HTTPBadRequest(text="The form could not be read: go back, reload the page and send it again.") \
            from None
    request[FORM] = MultiDict(fields)
    return request[FORM]


async def json_body(request: web.Request, default=None):
    """The request's JSON (at most BODY_LIMIT bytes); `default` when it has no body; 400 when it
    is not JSON."""
    if not request.can_read_body:
        return default
    try:
        return json.loads((await _small_body(request)).decode())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the parser's depth
        raise web.HTTPBadRequest(text='{"error": "expected JSON"}', content_type="application/json") from None


async def run(request: web.Request, function, *args):
    """CPU or disk work off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def render(request: web.Request, template: str, **context) -> web.Response:
    session = request.get(SESSION)
    html = request.app[TEMPLATES].get_template(template).render(session=session, csrf=session.csrf if session else "",
                                                               **context)
    return web.Response(text=html, content_type="text/html")
