"""The audit trail on its way to the repository: syslog over TLS (RFC 5424 messages in RFC 5425's octet
counting framing), as IHE ATNA's Record Audit Event transaction (ITI-20) sends it.

`Sender` takes the oldest messages of the outbox (`archive.atna`), sends them on one TLS connection and only
then removes them. Syslog over TLS has no acknowledgement: after a batch the connection is looked at, and a
repository that has closed it gets the batch again on a new connection. A message may so arrive twice; none
is lost. While the repository cannot be reached the messages wait in the index, and the sender tries again,
after 1 s, then longer, up to a minute.
"""
from __future__ import annotations

import datetime
import fcntl
import logging
import os
import select
import socket
import ssl
import struct
import termios
import threading
import time

from . import atna
from .index import Index

log = logging.getLogger(__name__)

PRI = 10 * 8 + 5          # facility 10 (security/authorization), severity 5 (notice): IHE ITI TF-2 3.20.6
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
BATCH = 100
BATCH_BYTES = 64 << 10    # a batch is cut here too: a slow link (25 KB/s) still has it acknowledged within ACK_WAIT
CONNECT_TIMEOUT = 10.0
MAX_RETRY_DELAY = 60.0
ACK_WAIT = 10.0           # seconds a batch may wait for the repository's TCP acknowledgement
LAST_ROUND = 3.0          # seconds the sender goes on sending at the node's stop


def frame(xml: bytes, hostname: str, app: str, procid: str, when: float) -> bytes:
    """One RFC 5424 message carrying `xml`, with RFC 5425's length in front."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")
    message = f"<{PRI}>1 {stamp} {_printable(hostname, 255)} {_printable(app, 48)} {_printable(procid, 128)} " \
              f"{MSGID} - ".encode("ascii") + BOM + xml
    return f"{len(message)} ".encode("ascii") + message


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields: printable US-ASCII without spaces, or "-"."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


class Sender:
    """Sends the outbox to `host:port` over TLS (`context`: the node's certificate, the repository's CA)."""

    def __init__(self, index: Index, node: str, host: str, port: int, context: ssl.SSLContext, app: str = "m3dicom",
                 hostname: str | None = None):
        self.index, self.node, self.host, self.port, self.context = index, node, host, port, context
        self.app, self.hostname = app, hostname or socket.gethostname()
        self.procid = str(os.getpid())
        self.sock: ssl.SSLSocket | None = None
        self.delay, self.failing = 1.0, False
        self.ack_wait, self.timeout = ACK_WAIT, CONNECT_TIMEOUT

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        while not stop.is_set():
            try:
                sent = self.step()
            except Exception as exc:      # the index away: the next round tries again
                log.warning("audit: the outbox could not be read (%s)", type(exc).__name__)
                sent = -1
            if sent == 0:
                stop.wait(idle)
            elif sent < 0:
                stop.wait(self.delay)
                self.delay = min(MAX_RETRY_DELAY, self.delay * 2)
        self.last_round()
        self.close()

    def last_round(self, seconds: float = LAST_ROUND) -> None:
        """At the node's stop: what waits (the node's Application Stop among it) is sent while the repository
        takes it, for at most `seconds`; a repository that is failing is not waited for, and what is left
        waits in the outbox for the next start."""
        deadline = time.monotonic() + seconds            # each wait (connect, send, acknowledgement) within it
        self.ack_wait = self.timeout = min(ACK_WAIT, CONNECT_TIMEOUT, seconds)
        if self.sock is not None:
            self.sock.settimeout(self.timeout)
        while not self.failing and time.monotonic() < deadline:
            self.ack_wait = self.timeout = max(0.1, min(self.timeout, deadline - time.monotonic()))
            if self.sock is not None:
                self.sock.settimeout(self.timeout)
            try:
                if self.step() <= 0:
                    return
            except Exception:           # the index away: the next start sends it
                return

    def step(self) -> int:
        """Send one batch: the number sent, 0 when none waited, -1 when the repository could not take them."""
        batch = atna.take(self.index, self.node, BATCH)
        if not batch:
            return 0
        frames = [frame(xml, self.hostname, self.app, self.procid, when) for _, when, xml in batch]
        size = 0
        for count, one in enumerate(frames):
            size += len(one)
            if size > BATCH_BYTES and count:
                batch, frames = batch[:count], frames[:count]
                break
        data = b"".join(frames)
        try:
            if self.sock is not None and self._closed_by_peer(self.sock, 0):   # closed while idle: a new one
                self.close()
            sock = self.sock or self._connect()
            sock.sendall(data)
            if not self._acknowledged(sock, self.ack_wait):
                raise ConnectionError(f"the repository acknowledged nothing for {self.ack_wait:g} s")
            if self._closed_by_peer(sock):
                raise ConnectionError("the repository closed the connection")
        except (OSError, ssl.SSLError) as exc:
            self.close()
            if not self.failing:
                waiting = atna.waiting(self.index, self.node)[0]
                log.warning("audit: repository %s:%s cannot take messages (%s); %d wait in the index, sent once it "
                            "answers", self.host, self.port, getattr(exc, "strerror", None) or exc, waiting)
            self.failing = True
            return -1
        atna.sent(self.index, [seq for seq, _, _ in batch])
        if self.failing:
            log.info("audit: repository %s:%s takes messages again", self.host, self.port)
        self.failing, self.delay = False, 1.0
        return len(batch)

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            self.sock = self.context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        return self.sock

    @staticmethod
    def _closed_by_peer(sock: ssl.SSLSocket, wait: float = 0.05) -> bool:
        """A repository sends no application data: a connection that reads as ended (or reset) is one it
        closed. What else arrives (a TLS 1.3 session ticket, a key update) is read and means nothing."""
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable and not sock.pending():
            return False
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            while True:
                if sock.recv(4096) == b"":
                    return True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        except (OSError, ssl.SSLError):
            return True
        finally:
            sock.settimeout(timeout)

    @staticmethod
    def _acknowledged(sock: ssl.SSLSocket, within: float = ACK_WAIT) -> bool:
        """Every byte sent acknowledged by the repository's TCP (Linux's SIOCOUTQ: bytes not yet acknowledged):
        only then are the messages removed, so a repository that vanished without closing the connection (a
        crash, a cut cable) has them sent again instead of lost in a send buffer."""
        deadline = time.monotonic() + within
        while True:
            try:
                left = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                return True           # not Linux's TCP: the kernel cannot say; sendall's word is taken
            if left == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
