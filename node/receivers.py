"""Receiving processes: pynetdicom is bound by the GIL, so the node scales across cores with processes.

The node process creates the listening sockets once; every receiver (the node process
itself and `dicom.receivers - 1` spawned children) accepts on those same sockets, and the
kernel hands each connection to one of them. Nothing else can take the port (no
SO_REUSEPORT). Each receiver has its own AE, spool directory and index connection (SQLite
serialises the writes across processes). Children die with the node (PR_SET_PDEATHSIG),
are stopped with it, and are restarted if one of them exits on its own.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import json
import logging
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import pydicom.config

from archive import metrics
from scp.commitment import Committer
from scp.slots import Held, SharedCounts, Table
from scp.server import PeerChatter, build_ae, configure_pynetdicom, start_servers

from .config import Config

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
_RESTART_DELAY = 5.0
# What a peer sends reaches log lines (an AE title, a UID, pynetdicom's messages quoting a refused
# value): each argument of a line is cut to MAX_LOG_VALUE characters, its message to MAX_LOG_MESSAGE,
# the whole line (a traceback included) to MAX_LOG_LINE.
MAX_LOG_VALUE = 200
MAX_LOG_MESSAGE = 1000
MAX_LOG_LINE = 16000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """`text` with every control character escaped (\\n, \\x1b, ...): it cannot start a forged
    log line or drive a terminal."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                                              else f"\\u{ord(m.group()):04x}"), text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more characters]"


class OneLineFormatter(logging.Formatter):
    """Every record the node logs becomes one line: control characters escaped, each argument
    and the message cut short, a traceback on the same line (its line breaks written \\n).

    Installed on the node's log handlers in every process (`configure_libraries`),
    around the formatter they had."""

    def __init__(self, inner: logging.Formatter | None = None):
        super().__init__(LOG_FORMAT)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        clone = logging.makeLogRecord(record.__dict__)
        try:
            if isinstance(record.args, tuple):
                clone.args = tuple(_short(arg) for arg in record.args)
            message = clone.getMessage()
        except Exception:   # arguments that do not fit the message: show both, as logging would not
            message = f"{record.msg!r} {record.args!r}"
        clone.msg, clone.args = _cut(message, MAX_LOG_MESSAGE), None
        text = self.inner.format(clone) if self.inner is not None else super().format(clone)
        if isinstance(self.inner, JsonFormatter):   # one line already; cut, it would be JSON no more
            return text
        return _cut(one_line(text), MAX_LOG_LINE)


class JsonFormatter(logging.Formatter):
    """`[log] format = "json"`: one JSON object per line (time in UTC, level, process, logger, message and
    any traceback), ASCII only, so that no character a peer sent can break the line or the object."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "level": record.levelname, "process": record.processName, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = _cut(self.formatException(record.exc_info), MAX_LOG_LINE)
        return json.dumps(entry)


def banner(config: Config):
    """How `m3dicom serve` prints its start lines on standard output (where to send, the first admin's
    password): as they are, or as JSON records with `log.format = "json"`."""
    if config.log.format != "json":
        return lambda line: print(line, flush=True)
    formatter = JsonFormatter()

    def say(line: str) -> None:
        record = logging.LogRecord("m3dicom", logging.INFO, __file__, 0, line, None, None)
        print(formatter.format(record), flush=True)
    return say


def configure_logging(config: Config, stream=None) -> None:
    """The node's log in this process: `log.level`, `log.format`, one line per record (`one_line_logs`)."""
    logging.basicConfig(level=config.log.level, format=LOG_FORMAT, stream=stream)
    if config.log.format == "json":
        for handler in logging.getLogger().handlers:
            if not isinstance(handler.formatter, (JsonFormatter, OneLineFormatter)):
                handler.setFormatter(JsonFormatter())
    one_line_logs()


def _short(arg):
    """An argument as it may appear in a line: numbers as they are (for %d), anything whose text is
    longer than MAX_LOG_VALUE as that text, cut."""
    if isinstance(arg, (int, float)) or arg is None:
        return arg
    text = arg.decode("ascii", "backslashreplace") if isinstance(arg, (bytes, bytearray)) else str(arg)
    return _cut(text, MAX_LOG_VALUE) if len(text) > MAX_LOG_VALUE else arg


def configure_libraries() -> None:
    """Settings of pynetdicom and pydicom for a node's process (see notes/ingest-performance.md).

    pynetdicom's are the DICOM services' (`scp.server.configure_pynetdicom`); pydicom's value
    validation is off on the hot path: the archive validates what it needs itself. Every log
    line is one line, escaped and cut short (`one_line_logs`): peers' values reach the log.
    """
    configure_pynetdicom()
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # what peers send reaches log lines: one line per record, escaped and cut short, in every process
    one_line_logs()


def one_line_logs(root: logging.Logger | None = None) -> None:
    """Make every handler of the root logger write one line per record (`OneLineFormatter`), and
    keep pynetdicom's own warnings about a peer to one line per address every 10 s."""
    for handler in (root or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, OneLineFormatter):
            handler.setFormatter(OneLineFormatter(handler.formatter))
        if not any(isinstance(f, PeerChatter) for f in handler.filters):
            handler.addFilter(PeerChatter())


def receiver_count(config: Config) -> int:
    """`dicom.receivers`, or one per usable CPU core (at most 4) when it is 0."""
    return config.dicom.receivers or max(1, min(4, len(os.sched_getaffinity(0))))


def listen(config: Config) -> dict[int, socket.socket]:
    """The listening sockets (TLS port, and the plain one when configured), by port."""
    d = config.dicom
    family = socket.AF_INET6 if ":" in d.host else socket.AF_INET
    sockets = {}
    for port in [d.port] + ([d.plain_port] if d.plain_port else []):
        try:
            sockets[port] = socket.create_server((d.host, port), family=family, backlog=128)
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            raise RuntimeError(f"cannot listen on {d.host}:{port}: {exc.strerror or exc}") from None
    return sockets


def association_table(config: Config, count: int) -> Table:
    """The shared memory in which the `count` receivers publish their associations, so that the limits
    hold for the node (scp.slots)."""
    return Table.create(count, config.dicom.max_associations)


def spool_dir(config: Config, index: int) -> Path:
    return config.data_dir / "spool" / f"r{index}"


def _make_spool(spool: Path) -> None:
    for directory in (spool.parent, spool):
        directory.mkdir(mode=0o700, exist_ok=True)


def receive(config: Config, index: int, sockets: dict[int, socket.socket], stop: threading.Event,
            on_ready: Callable[[], None] = lambda: None,
            every_second: Callable[[], None] = lambda: None, table: Table | None = None,
            on_stop: Callable[[], None] = lambda: None) -> None:
    """One receiver: serve the sockets until `stop` is set; its associations count in `table`
    (`association_table`, row `index`) with the other receivers'. `on_stop`: called first when it stops."""
    from archive import open as open_archive   # the node migrated the index before it started this process

    spool = spool_dir(config, index)
    _make_spool(spool)
    tempfile.tempdir = str(spool)  # pynetdicom and the fast path spool received data sets here

    def tick() -> None:
        if not spool.is_dir():       # removed under us (by hand, or a cleaner): receiving needs it
            log.warning("spool directory %s was missing: recreated", spool)
            _make_spool(spool)
        measure.associations_open.set(len(ae.active_associations))   # what pynetdicom holds, whatever happened
        for server in servers[:1]:
            server.slots.publish()      # in case a closed association's EVT_CONN_CLOSE never came
        every_second()
    measure = metrics.get()
    archive = open_archive(config)
    ae = build_ae(config)
    committer = Committer(archive, config)
    listening = metrics.get().receivers_listening
    shared = SharedCounts(table, index) if table is not None else None
    servers = []
    try:
        if shared is not None:
            # a restarted receiver: what its predecessor held is gone (its pid, in the row, is dead anyway)
            shared.publish_within(Held, 1.0)
        gc.collect()
        gc.freeze()   # the start-up heap (libraries, dictionaries) is never garbage: collections skip it
        servers = start_servers(ae, config, archive, sockets, committer, shared)
        listening.inc()
        if index == 0 and (pending := committer.resume_pending()):
            log.info("%d storage commitment reports to deliver from before the restart", pending)
        on_ready()
        while not stop.wait(1.0):
            tick()
    finally:
        on_stop()
        listening.set(0)
        archive.index.stopping()     # an index another process keeps locked fails what waits, not the stop
        ae.shutdown()
        archive.close()
        if shared is not None:
            shared.close()


def _receiver(config: Config, index: int, sockets: dict[int, socket.socket], table: Table, stop: threading.Event,
              parent_alive: Callable[[], None]) -> None:
    receive(config, index, sockets, stop, lambda: log.info("receiver %d ready", index), parent_alive, table)


def _child(config: Config, parent: int, target: Callable, *args) -> None:
    """Entry point of a spawned process: dies with the node, stops on SIGTERM, runs `target`."""
    _die_with(parent)

    configure_logging(config)
    configure_libraries()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def parent_alive() -> None:
        if os.getppid() != parent:
            stop.set()

    try:
        target(config, *args, stop, parent_alive)
    except Exception:   # one record in the node's log format (multiprocessing would print a bare traceback)
        log.exception("%s failed", multiprocessing.current_process().name)
        sys.exit(1)


def _die_with(parent: int) -> None:
    """Ask Linux to kill this process when the node process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


def receiver_workers(config: Config, sockets: dict[int, socket.socket], count: int, table: Table) -> dict[str, tuple]:
    """The spawned receivers 1..count-1, as `Children` workers."""
    return {f"receiver-{index}": (_receiver, index, sockets, table) for index in range(1, count)}


class Children:
    """The node's spawned processes (receivers 1..n-1, the offloader, ...), by name.

    A worker is `(target, *args)`; the process calls `target(config, *args, stop, parent_alive)`
    where `stop` is a threading.Event set on SIGTERM and `parent_alive()` should be called
    now and then (it sets `stop` when the node is gone).
    """

    def __init__(self, config: Config, workers: dict[str, tuple]):
        self._config, self._parent = config, os.getpid()
        self._workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[str, multiprocessing.Process] = {}
        self._started: dict[str, float] = {}
        for name in workers:
            self._start(name)

    def _start(self, name: str) -> None:
        # not daemonic: the router's Dask cluster has processes of its own; PR_SET_PDEATHSIG and
        # stop() end them with the node
        proc = self._context.Process(target=_child, args=(self._config, self._parent, *self._workers[name]),
                                     name=name, daemon=False)
        proc.start()
        self._procs[name], self._started[name] = proc, time.monotonic()

    def supervise(self) -> None:
        """Restart a process that exited on its own (not more often than every few seconds)."""
        for name, proc in list(self._procs.items()):
            if proc.is_alive():
                continue
            if time.monotonic() - self._started[name] < _RESTART_DELAY:
                continue
            log.error("%s exited (code %s): restarting it", name, proc.exitcode)
            metrics.process_gone(proc.pid)
            self._start(name)

    def terminate(self, but: tuple[str, ...] = ()) -> None:
        """Tell every process (`but` those named) to stop (SIGTERM), without waiting; then SIGCONT, as systemd
        does: a process someone stopped (SIGSTOP, a debugger) acts on the SIGTERM instead of being killed at
        the end of `stop`'s wait (the attack pass: a node with a stopped receiver took 17 s to stop)."""
        for name, proc in self._procs.items():
            if name not in but and proc.is_alive():
                proc.terminate()
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def stop(self, timeout: float = 15.0) -> None:
        self.terminate()
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
