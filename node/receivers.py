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


def receive(config: Config, index: int, sockets: dict[int, socket.socket], stop: threading.Event,
            on_ready: Callable[[], None] = lambda: None,
            every_second: Callable[[], None] = lambda: None) -> None:
    """One receiver: serve the sockets until `stop` is set."""
    from .service import open_archive

    spool = spool_dir(config, index)
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)  # pynetdicom and the fast path spool received data sets here
    archive = open_archive(config)
    ae = build_ae(config)
    committer = Committer(archive, config)
    try:
        start_servers(ae, config, archive, sockets, committer)
        if index == 0 and (pending := committer.resume_pending()):
            log.info("%d storage commitment reports to deliver from before the restart", pending)
        on_ready()
        while not stop.wait(1.0):
            every_second()
    finally:
        ae.shutdown()
        archive.close()


def _child(config: Config, index: int, sockets: dict[int, socket.socket], parent: int) -> None:
    """Entry point of a spawned receiver."""
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

    receive(config, index, sockets, stop, lambda: log.info("receiver %d ready", index), parent_alive)


def _die_with(parent: int) -> None:
    """Ask Linux to kill this process when the node process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the request
        os._exit(1)


class Children:
    """The spawned receivers 1..n-1 of this node."""

    def __init__(self, config: Config, sockets: dict[int, socket.socket], count: int):
        self._args = (config, sockets, os.getpid())
        self._context = multiprocessing.get_context("spawn")
        self._procs: dict[int, multiprocessing.Process] = {}
        self._started: dict[int, float] = {}
        for index in range(1, count):
            self._start(index)

    def _start(self, index: int) -> None:
        config, sockets, parent = self._args
        proc = self._context.Process(target=_child, args=(config, index, sockets, parent),
                                     name=f"receiver-{index}", daemon=True)
        proc.start()
        self._procs[index], self._started[index] = proc, time.monotonic()

    def supervise(self) -> None:
        """Restart a receiver that exited on its own (not more often than every few seconds)."""
        for index, proc in list(self._procs.items()):
            if proc.is_alive():
                continue
            if time.monotonic() - self._started[index] < _RESTART_DELAY:
                continue
            log.error("receiver %d exited (code %s): restarting it", index, proc.exitcode)
            self._start(index)

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
