"""The operator's endpoints, on an address of their own ([metrics]), plain HTTP, never on the viewer's port.

- `/metrics`: Prometheus' text format. What the node's processes counted (archive/metrics.py, added up
  across processes by prometheus-client's multiprocess mode), and what is read at each scrape: the offload
  queue by state and the age of its oldest item, jobs by state, the data directory's free space. With
  `metrics.token_file` it asks for `Authorization: Bearer <token>` (401 otherwise, without a hint).
- `/healthz`: 200 while this process answers (liveness).
- `/readyz`: 200 when the node can take instances, else 503; both with each check and, when one fails,
  why: the index takes a write, the data directory's disk is above storage.min_free_bytes, the key file
  is readable, S3 answers (when blobs go there), every receiving process is listening.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time

from aiohttp import web

from archive import metrics
from archive.index import Index

from .health import Check, Readiness, counts_directory, counts_registry
from .settings import Settings

log = logging.getLogger(__name__)
CHECK_EVERY = 5.0            # seconds between two rounds of readiness checks
STALE = 20.0                 # seconds after which a round of checks that has not finished is a failure


class OpsRefused(RuntimeError):
    """The endpoints cannot start (the port is taken, the token file is unreadable or empty)."""


def token_of(config: Settings, warn: bool = True) -> str | None:
    """The bearer token /metrics asks for (metrics.token_file: one line), or None."""
    path = config.metrics.token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode & 0o077
    except (OSError, UnicodeDecodeError) as exc:
        raise OpsRefused(f"metrics.token_file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise OpsRefused(f"metrics.token_file {path} holds no token: one line of 16 printable characters or more, "
                         "without spaces (for example: openssl rand -hex 32)")
    if mode and warn:
        log.warning("metrics.token_file %s can be read by other users: chmod 600 it", path)
    return token


def listen(config: Settings) -> socket.socket:
    from .serve import listen_on

    return listen_on(config.metrics.host, config.metrics.port, "/metrics", OpsRefused, backlog=64)


class Monitor:
    """The readiness checks, run every CHECK_EVERY seconds in a thread of their own: /readyz and the
    `m3dicom_ready` gauges read the latest results, and never wait for a check (an index locked by another
    program would hold a write for its busy timeout). Results older than STALE say the checks are stuck."""

    def __init__(self, readiness: Readiness, clock=time.monotonic):
        self.readiness, self.clock = readiness, clock
        self._latest: tuple[float, list[Check]] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                checks = self.readiness.slow()
            except Exception as exc:     # a check that raised instead of saying why: not ready, and why
                checks = [Check("checks", False, f"a check failed: {type(exc).__name__}")]
            self._latest = (self.clock(), checks)
            if self._stop.wait(CHECK_EVERY):
                return

    def latest(self) -> list[Check]:
        """The background checks' latest results, and this machine's checks made now."""
        try:
            quick = self.readiness.quick()
        except Exception as exc:
            quick = [Check("checks", False, f"a check failed: {type(exc).__name__}")]
        if self._latest is None:
            return [Check("index", False, "the first check is running"), *quick]
        when, checks = self._latest
        age = self.clock() - when
        if age > STALE:
            checks = [*checks, Check("checks", False, f"the index and S3 checks have not finished for {age:.0f} s "
                                                      "(is the index locked by another program?)")]
        return [*checks, *quick]

    @property
    def ran(self) -> bool:
        return self._latest is not None

    def close(self) -> None:
        self._stop.set()


class NodeState:
    """Gauges read from the index and the disk at each scrape (a prometheus-client custom collector), and
    the readiness checks, one gauge each (alert on `m3dicom_ready == 0`)."""

    def __init__(self, config: Settings, index: Index, monitor: Monitor, clock=time.time):
        self.config, self.index, self.monitor, self.clock = config, index, monitor, clock

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        ready = GaugeMetricFamily("m3dicom_ready", "1 when the check passes (as /readyz says), by check.",
                                  labels=["check"])
        for check in self.monitor.latest():
            ready.add_metric([check.name], 1.0 if check.ok else 0.0)
        yield ready
        try:
            yield from self._read()
        except Exception as exc:   # the counters are still served; the index's state is what is missing
            log.warning("/metrics: the index's state could not be read (%s)", type(exc).__name__)

    def _read(self):
        from prometheus_client.core import GaugeMetricFamily

        from archive import offload
        from router import queue

        free = GaugeMetricFamily("m3dicom_data_dir_free_bytes", "Free bytes on the data directory's disk.")
        stat = os.statvfs(self.config.data_dir)
        free.add_metric([], stat.f_bavail * stat.f_frsize)
        yield free
        jobs = GaugeMetricFamily("m3dicom_jobs", "Analysis jobs in the index, by state.", labels=["state"])
        for state, count in sorted(queue.counts_by_state(self.index).items()):
            jobs.add_metric([state], count)
        yield jobs
        if getattr(self.config, "audit", None) is not None and self.config.audit.repository:
            from archive import atna

            count, oldest_audit = atna.waiting(self.index, self.config.node.name)
            waiting = GaugeMetricFamily("m3dicom_audit_waiting", "ATNA audit messages not yet taken by the "
                                        "repository.")
            waiting.add_metric([], count)
            yield waiting
            age = GaugeMetricFamily("m3dicom_audit_oldest_waiting_seconds", "Age of the oldest of them (0: none).")
            age.add_metric([], max(0.0, self.clock() - oldest_audit) if oldest_audit else 0.0)
            yield age
        if self.config.storage.backend != "s3":
            return
        shared = bool(self.config.index.url)
        s = offload.status(self.index, self.config.node.name if shared else None)
        queued = GaugeMetricFamily("m3dicom_offload_queue", "Blobs in the offload queue, by state.", labels=["state"])
        for state, count in (("pending", s.pending), ("retrying", s.retrying), ("failed", s.failed),
                             ("removing", s.removing)):
            queued.add_metric([state], count)
        yield queued
        oldest = GaugeMetricFamily("m3dicom_offload_oldest_pending_seconds",
                                   "Age of the oldest blob waiting for S3 (0: none).")
        oldest.add_metric([], max(0.0, self.clock() - s.oldest_pending) if s.oldest_pending else 0.0)
        yield oldest


OPS = web.AppKey("ops", dict)


def create_app(config: Settings, index: Index, receivers: int, token: str | None,
               refusal: str | None = None) -> web.Application:
    """/metrics, /healthz and /readyz for `config`'s node, reading `index` (this process's own connection).
    `refusal`: why /metrics cannot be served (its token file became unreadable): 503 with it."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    monitor = Monitor(Readiness(config, index, receivers))
    registry = counts_registry()
    registry.register(NodeState(config, index, monitor))
    app = web.Application(client_max_size=1024)
    app[OPS] = {"monitor": monitor}
    lock = asyncio.Lock()     # one scrape at a time: a flood waits, it does not multiply the work

    async def stop_monitor(app: web.Application) -> None:
        monitor.close()
    app.on_cleanup.append(stop_monitor)

    def authorised(request: web.Request) -> bool:
        if token is None:
            return refusal is None
        sent = request.headers.get("Authorization", "")
        return sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].encode("utf-8", "replace"), token.encode())

    async def scrape(request: web.Request) -> web.Response:
        if refusal is not None:
            raise web.HTTPServiceUnavailable(text=f"503: {refusal}\n")
        if not authorised(request):
            raise web.HTTPUnauthorized(text="401: Unauthorized\n", headers={"WWW-Authenticate": "Bearer"})
        async with lock:
            body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(request: web.Request) -> web.Response:
        for _ in range(30):              # just started: the first round of checks takes a moment
            if monitor.ran:
                break
            await asyncio.sleep(0.1)
        checks = await asyncio.get_running_loop().run_in_executor(None, monitor.latest)   # disk and files: a
        ready = all(c.ok for c in checks)                                                   # hung mount waits there
        said = authorised(request)    # beyond loopback, reasons (paths, names) only for the token's holder
        body = {"ready": ready, "checks": {c.name: {"ok": c.ok, **({"reason": c.reason} if c.reason and said else {})}
                                           for c in checks}}
        return web.json_response(body, status=200 if ready else 503, headers={"Cache-Control": "no-store"},
                                 dumps=lambda v: json.dumps(v, indent=1))

    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _run(config: Settings, sock: socket.socket, stop: threading.Event, receivers: int) -> None:
    from archive import open_index

    from .serve import MalformedRequestsInOneLine

    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestsInOneLine) for f in server_log.filters):
        server_log.addFilter(MalformedRequestsInOneLine())
    token, refusal = None, None
    try:
        token = token_of(config)
    except OpsRefused as exc:    # the node checked it at its start: it has gone since; /metrics says so
        refusal = str(exc)
        log.error("%s: /metrics answers 503 until the node restarts", exc)
    if metrics.multiprocess():
        counts_directory(metrics.multiprocess())
    index = open_index(config)
    try:
        runner = web.AppRunner(create_app(config, index, receivers, token, refusal), access_log=None,
                               keepalive_timeout=30.0)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.5)
        finally:
            await runner.cleanup()
    finally:
        index.close()


def run(config: Settings, sock: socket.socket, stop: threading.Event, receivers: int) -> None:
    """Serve the endpoints on `sock` until `stop` (the node's "ops" process)."""
    asyncio.run(_run(config, sock, stop, receivers))


def address(config: Settings) -> str:
    m = config.metrics
    host = f"[{m.host}]" if ":" in m.host else m.host
    return f"http://{host}:{m.port}/metrics"

