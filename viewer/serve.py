"""Running the viewer: TLS, the listening socket, the first admin, and logs without share links or
patient data."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import secrets
import socket
import ssl
import threading

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_log import AccessLogger
from yarl import URL

from archive.index import Index

from . import accounts
from .settings import Settings, loopback

log = logging.getLogger(__name__)
ADMIN_PASSWORD_ENV = "M3DICOM_ADMIN_PASSWORD"


class ViewerRefused(RuntimeError):
    """The viewer will not start with these settings (it says which and why)."""


def check(config: Settings, index: Index, users: bool = True) -> None:
    """Beyond loopback, the viewer needs TLS and (`users`) at least one user."""
    v = config.viewer
    if loopback(v.host):
        return
    if not v.tls:
        raise ViewerRefused(f"viewer.host = {v.host!r} is reachable from the network: set viewer.tls = true")
    if users and accounts.count_users(index) == 0:
        raise ViewerRefused(f"viewer.host = {v.host!r} is reachable from the network and there is no user: "
                            "add one with `m3dicom user add NAME --role admin`")


def first_admin(index: Index, say=print) -> None:
    """On a node's first start: an admin account, its password printed once (or taken from the
    environment), so that a newcomer can log in at once."""
    if accounts.count_users(index):
        return
    given = os.environ.get(ADMIN_PASSWORD_ENV)
    password = given or secrets.token_urlsafe(12)
    accounts.add_user(index, "admin", password, "admin")
    if given:
        say(f"viewer: created user admin with the password from ${ADMIN_PASSWORD_ENV}")
    else:
        say(f"viewer: created user admin with password {password} (shown once; change it with "
            "`m3dicom user add admin --role admin --replace`)")


def ssl_context(config: Settings) -> ssl.SSLContext | None:
    from scp.tls import harden

    v, d = config.viewer, config.dicom
    if not v.tls:
        return None
    context = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    certificate, key = v.certificate or d.certificate, v.private_key or d.private_key
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise ViewerRefused(f"viewer TLS set-up failed ({exc}); check viewer.certificate / viewer.private_key "
                            f"({certificate}, {key})") from None
    return context


def listen_on(host: str, port: int, what: str, refused: type[Exception], backlog: int = 128) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is); `refused` says why when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise refused(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}") from None


def listen(config: Settings) -> socket.socket:
    return listen_on(config.viewer.host, config.viewer.port, "the viewer", ViewerRefused)


# query keys whose values are no patient data (page and rendering parameters): written as sent;
# any other value (a search's name, ID, accession number, a login page's target) is not
LOGGED_QUERY_KEYS = frozenset({"page", "width", "height", "x", "y", "w", "h", "frame", "wc", "ww", "format"})
_PLAIN_KEY = re.compile(r"^[a-z_]{1,20}$")
_PLAIN_VALUE = re.compile(r"^[0-9A-Za-z.+-]{0,16}$")
ACCESS_LOG_FORMAT = '%a %t "%r" %s %b %Tf "%{User-Agent}i"'    # no Referer: it can carry a study search


def loggable(url: URL) -> str:
    """The path and query of a request as the access log may show them: a share link's token
    blanked, the value of every query key outside LOGGED_QUERY_KEYS written as REDACTED."""
    path = "/s/REDACTED" if url.path.startswith("/s/") else url.raw_path
    keys = []
    for key, value in url.query.items():
        if not _PLAIN_KEY.match(key):
            keys.append("REDACTED=REDACTED")
        elif key in LOGGED_QUERY_KEYS and _PLAIN_VALUE.match(value):
            keys.append(f"{key}={value}")
        else:
            keys.append(f"{key}=REDACTED")
    return path + ("?" + "&".join(keys) if keys else "")


class RedactedAccessLogger(AccessLogger):
    """The access log without share-link tokens or query values that may be patient data (the
    study search sends names, IDs and accession numbers in the query string)."""

    def __init__(self, logger: logging.Logger, log_format: str = ACCESS_LOG_FORMAT) -> None:
        super().__init__(logger, ACCESS_LOG_FORMAT)

    def _format_line(self, request, response, time):
        line = super()._format_line(request, response, time)
        if request is None:
            return line
        first = f"{request.method} {loggable(request.rel_url)} HTTP/{request.version.major}.{request.version.minor}"
        return [(key, first if key == "first_request_line" else value) for key, value in line]


class AtDebug(logging.Filter):
    """The access log's line per request belongs to DEBUG (at INFO the node writes a line per association and
    per job; requests are counted by /metrics): aiohttp writes it at INFO, so it is lowered here, and
    dropped unless the node logs at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


class MalformedRequestsInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse (a request line over 8190 bytes, a bad header) with
    a traceback that quotes the start of the request, a study search's patient name included:
    one line instead, with what was wrong and not what was sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "refused a malformed HTTP request (%s %s)", (exc.code, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


ACCEPT_RETRY = 0.1            # seconds before accepting again after accept() failed (file descriptors ran out)
MAX_FIRST_BYTE_WAITING = 512  # connections that have sent nothing yet (and are in their TLS handshake); more: closed


class HttpsSite(web.SockSite):
    """The viewer's HTTPS socket, each connection's first byte looked at before its TLS handshake: plain
    http:// sent to this port (not a TLS handshake record, 0x16) gets a plain-text 400 naming the https://
    address, where the handshake would fail without a word. A connection that sends nothing for
    `first_byte_timeout` seconds is closed."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, ssl_context: ssl.SSLContext,
                 first_byte_timeout: float):
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._wait, self._connections, self._refused = first_byte_timeout, set(), 0

    async def start(self) -> None:
        await web.BaseSite.start(self)                   # registered with the runner; the socket is ours to serve
        self._sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(asyncio.get_running_loop()))

    async def stop(self) -> None:
        self._accepting.cancel()
        await super().stop()

    async def _accept(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:                       # out of file descriptors (EMFILE), of memory ...: the
                self._refused += 1                       # port must not die of it (asyncio's server pauses too)
                if self._refused == 1 or self._refused % 1000 == 0:
                    log.error("viewer: cannot accept connections (%s; %d refused so far): %d connections wait for "
                              "their first byte", exc.strerror or exc, self._refused, len(self._connections))
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            if len(self._connections) >= MAX_FIRST_BYTE_WAITING:     # a flood of silent connections: no more
                conn.close()
                continue
            task = asyncio.create_task(self._first_byte(loop, conn))
            self._connections.add(task)                  # held until done (the loop keeps weak references)
            task.add_done_callback(self._connections.discard)

    async def _first_byte(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        readable = loop.create_future()
        loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout(self._wait):
                await readable
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(conn.fileno())
        try:
            first = conn.recv(1, socket.MSG_PEEK) if readable.done() else b""
            if first == b"\x16":
                await loop.connect_accepted_socket(self._runner.server, conn, ssl=self._ssl_context)
                return
            if first:
                conn.recv(1 << 16)                       # read: closed with it unread, the answer would be reset
                host, port = conn.getsockname()[:2]
                conn.sendall(("HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                              f"This port speaks HTTPS: use https://{f'[{host}]' if ':' in host else host}:{port}/\n"
                              ).encode())
        except (OSError, ssl.SSLError):                  # a handshake that failed, a client gone
            pass
        conn.close()


async def _run(config: Settings, sock: socket.socket, stop: threading.Event, ready=None) -> None:
    from .app import create_app

    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestsInOneLine) for f in server_log.filters):
        server_log.addFilter(MalformedRequestsInOneLine())

    # keepalive_timeout: aiohttp closes a connection whose request is not complete this long after it opened or
    # after its previous answer (whatever arrived meanwhile): the header timeout (bodies: base.paced)
    access = logging.getLogger("viewer.access")
    if not any(isinstance(f, AtDebug) for f in access.filters):
        access.addFilter(AtDebug())
    runner = web.AppRunner(create_app(config), access_log_class=RedactedAccessLogger, access_log=access,
                           keepalive_timeout=config.viewer.header_timeout)
    await runner.setup()
    context = ssl_context(config)
    site = HttpsSite(runner, sock, context, config.viewer.header_timeout) if context else web.SockSite(runner, sock)
    await site.start()
    gc.freeze()             # what start-up made (modules, dictionaries, the app) is never collected: the collector's
    #                         full passes no longer walk it while a request waits (QIDO's p95 at 1M instances)
    if ready:
        ready()
    try:
        while not stop.is_set():
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()


def run(config: Settings, sock: socket.socket, stop: threading.Event, ready=None) -> None:
    asyncio.run(_run(config, sock, stop, ready))


def address(config: Settings) -> str:
    v = config.viewer
    return v.public_url or f"{'https' if v.tls else 'http'}://{v.host}:{v.port}/"
