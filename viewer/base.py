"""What every part of the viewer's web app shares: the application's and requests' keys, reading
a form's or JSON request's body within its limit, rendering a page, running work off the event
loop. The app (app.py), its routes (views.py) and the upload (upload.py) import this module,
never each other upward: create_app imports the routes, and nothing imports the app.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

import jinja2
from aiohttp import web
from multidict import MultiDict

from archive import Archive, dicomfile

from .images import Images
from .logins import LoginGate, Refusals
from .roles import rights
from .settings import Settings

COOKIE = "m3session"
JOB_ID = re.compile(r"^[0-9a-f]{16}$")

CONFIG = web.AppKey("config", Settings)
ARCHIVE = web.AppKey("archive", Archive)
IMAGES = web.AppKey("images", Images)
PLUGINS = web.AppKey("plugins", dict)
SECRET = web.AppKey("secret", bytes)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
EVENTS = web.AppKey("events", object)
LOGINS = web.AppKey("logins", LoginGate)
REFUSALS = web.AppKey("refusals", Refusals)      # refused API tokens per address (one audit row a minute)
DENIALS = web.AppKey("denials", Refusals)        # refused rights and reach, per caller (one audit row a minute)
CLOCK = web.AppKey("clock", object)
OHIF_ON = web.AppKey("ohif", bool)                # OHIF is served at /ohif/
SESSION = web.RequestKey("session", object)     # accounts.Session | None
FORM = web.RequestKey("form", MultiDict)        # the form fields, once read
BODY_LIMIT = 64 << 10                            # a form's or a JSON request's body (uploads have their own)
FORM_FIELDS = 100


def valid_uid(value: str) -> bool:
    """A UID as ingest takes one (PS3.5 9.1: no component with a leading zero): no stored instance has another."""
    return dicomfile.valid_uid(value)


class SlowBody(Exception):
    """The client sends its request body too slowly (viewer.body_timeout, viewer.min_body_rate)."""


class Pace:
    """A request body must keep coming: no wait for the client's next bytes longer than `timeout` seconds, and
    at least `min_rate` bytes a second over each minute (0: no rate). A client trickling bytes to hold a
    connection (and a spool directory) is cut off; a slow link is not. Made by `paced`; `got(n)` per chunk."""

    WINDOW = 60.0

    def __init__(self, timeout: float, min_rate: int, deadline: asyncio.Timeout):
        self.timeout, self.min_rate, self._deadline = timeout, min_rate, deadline
        self._loop = asyncio.get_running_loop()
        self._window, self._bytes = self._loop.time(), 0

    def got(self, size: int) -> None:
        now = self._loop.time()
        self._bytes += size
        if now - self._window >= self.WINDOW:
            if self._bytes < self.min_rate * (now - self._window):
                raise SlowBody(f"less than {self.min_rate} bytes a second over a minute (viewer.min_body_rate)")
            self._window, self._bytes = now, 0
        self._deadline.reschedule(now + self.timeout)


@asynccontextmanager
async def paced(request: web.Request) -> AsyncIterator[Pace]:
    """Read a request body within the pace the settings ask (`Pace`): SlowBody otherwise."""
    viewer = request.app[CONFIG].viewer
    try:
        async with asyncio.timeout(viewer.body_timeout) as deadline:
            yield Pace(viewer.body_timeout, viewer.min_body_rate, deadline)
    except TimeoutError:
        raise SlowBody(f"no byte of the body for {viewer.body_timeout:g} s (viewer.body_timeout)") from None


def too_slow(why: SlowBody) -> web.HTTPRequestTimeout:
    """408, and the connection closed once answered (what is still coming is not waited for)."""
    return web.HTTPRequestTimeout(text=json.dumps({"error": f"the request body came too slowly: {why}"}),
                                  content_type="application/json", headers={"Connection": "close"})


async def _small_body(request: web.Request) -> bytes:
    """The body of a form or JSON request, at most BODY_LIMIT bytes (413 past it, before more is
    read): client_max_size is the upload's, and /login is open to anyone."""
    if request.content_length is not None and request.content_length > BODY_LIMIT:
        raise web.HTTPRequestEntityTooLarge(max_size=BODY_LIMIT, actual_size=request.content_length)
    body = bytearray()
    try:
        async with paced(request) as pace:
            async for chunk in request.content.iter_chunked(8192):
                pace.got(len(chunk))
                body += chunk
                if len(body) > BODY_LIMIT:
                    raise web.HTTPRequestEntityTooLarge(max_size=BODY_LIMIT, actual_size=len(body))
    except SlowBody as exc:
        raise too_slow(exc) from None
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
                                                               may=rights(session), **context)
    return web.Response(text=html, content_type="text/html")
