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
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from scp.commitment import Committer
from scp.server import build_ae, start_servers

from .config import Config

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
_RESTART_DELAY = 5.0


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


def spool_dir(config: Config, index: int) -> Path:
    return config.data_dir / "spool" / f"r{index}"


def _make_spool(spool: Path) -> None:
    for directory in (spool.parent, spool):
        directory.mkdir(mode=0o700, exist_ok=True)


def receive(config: Config, index: int, sockets: dict[int, socket.socket], stop: threading.Event,
            on_ready: Callable[[], None] = lambda: None,
            every_second: Callable[[], None] = lambda: None) -> None:
    """One receiver: serve the sockets until `stop` is set."""
    from .service import open_archive

    spool = spool_dir(config, index)
    _make_spool(spool)
    tempfile.tempdir = str(spool)  # pynetdicom and the fast path spool received data sets here

    def tick() -> None:
        if not spool.is_dir():       # removed under us (by hand, or a cleaner): receiving needs it
            log.warning("spool directory %s was missing: recreated", spool)
            _make_spool(spool)
        every_second()
    archive = open_archive(config)
    ae = build_ae(config)
    committer = Committer(archive, config)
    try:
        start_servers(ae, config, archive, sockets, committer)
        if index == 0 and (pending := committer.resume_pending()):
            log.info("%d storage commitment reports to deliver from before the restart", pending)
        on_ready()
        while not stop.wait(1.0):
            tick()
    finally:
        ae.shutdown()
        archive.close()


def _receiver(config: Config, index: int, sockets: dict[int, socket.socket], stop: threading.Event,
              parent_alive: Callable[[], None]) -> None:
    receive(config, index, sockets, stop, lambda: log.info("receiver %d ready", index), parent_alive)


def _child(config: Config, parent: int, target: Callable, *args) -> None:
    """Entry point of a spawned process: dies with the node, stops on SIGTERM, runs `target`."""
    _die_with(parent)
    from .service import configure_libraries

    logging.basicConfig(level=config.log.level, format=LOG_FORMAT)
    configure_libraries()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def parent_alive() -> None:
        if os.getppid() != parent:
            stop.set()

    target(config, *args, stop, parent_alive)


def _die_with(parent: int) -> None:
    """Ask Linux to kill this process when the node process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


def receiver_workers(config: Config, sockets: dict[int, socket.socket], count: int) -> dict[str, tuple]:
    """The spawned receivers 1..count-1, as `Children` workers."""
    return {f"receiver-{index}": (_receiver, index, sockets) for index in range(1, count)}


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
            self._start(name)

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
