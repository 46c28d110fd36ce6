"""DICOM TLS (PS3.15 Annex B.9, BCP 195): contexts, and a server no peer can hold shut.

pynetdicom 3.0.4 wraps each accepted socket inside its accept loop with no timeout, so one
idle TCP connection to the TLS port blocks every later association. `TLSAssociationServer`
accepts plain sockets and does the handshake in the connection's own thread, with a
deadline, logging each failed handshake with the peer address and the reason.

Until a connection has sent its whole A-ASSOCIATE-RQ it is *pending*: its TLS handshake
(`dicom.tls_handshake_timeout`) and its request (the ARTIM timer, `dicom.artim_timeout`,
PS3.8 9.1.5) are bounded in time, and `Admission` bounds how many there are, per process
and per source address, so that pending connections never take association slots
(`dicom.max_associations` counts associations only) and one address cannot keep others
out. The request is then handed to pynetdicom's association (see scp.fastpath), unless
`Slots` refuses it: one address, or the plain port, may hold only its share of the
association slots (A-ASSOCIATE-RJ, local-limit-exceeded).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from pynetdicom.transport import ThreadedAssociationServer

from archive import metrics

from .slots import ADMISSION_TIMEOUT, Busy, Held, SharedCounts
from .wire import PDUError, PDURefused, PDUTimeout, abort_pdu, read_pdu, reject_pdu

log = logging.getLogger(__name__)

# TLS 1.2 suites: forward secret (ECDHE) and AEAD only. TLS 1.3 suites all are.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 at least; TLS 1.2 suites forward secret and AEAD only (BCP 195)."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(certificate: Path, private_key: Path, ca_certificates: Path,
                   require_client_certificate: bool = True) -> ssl.SSLContext:
    """The TLS port's context; raises a clear error when a file is missing or unreadable."""
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.load_cert_chain(certificate, private_key)
        ctx.load_verify_locations(cafile=ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise RuntimeError(f"TLS set-up failed ({exc}); check dicom.certificate, dicom.private_key "
                           f"and dicom.ca_certificates ({certificate}, {private_key}, {ca_certificates}); "
                           "`m3dicom certs init` makes development ones") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    # No session tickets: DICOM peers open a new TLS session per association (storescu, a modality's process
    # per study), so the two TLS 1.3 tickets sent after each handshake were never used, and made and encrypted
    # they cost 1.3 ms of the receiver's CPU per association (a third of its handshake). (TLS 1.2 resumption by
    # session ID is OpenSSL's cache's, which Python cannot turn off: docs/security.md.)
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(ca_certificates: Path, certificate: Path | None = None,
                   private_key: Path | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(cafile=ca_certificates)
    ctx.check_hostname = check_hostname
    if certificate:
        ctx.load_cert_chain(certificate, private_key)
    return ctx


def remote_tls(remote, config) -> tuple[ssl.SSLContext, str] | None:
    """`tls_args` for an association to a [remote.NAME] node: its overrides, else [dicom]'s."""
    if not remote.tls:
        return None
    d = config.dicom
    context = client_context(remote.ca_certificates or d.ca_certificates, remote.certificate or d.certificate,
                             remote.private_key or d.private_key)
    return context, remote.server_name or remote.host


def no_delay(event) -> None:
    """EVT_CONN_OPEN handler for outgoing associations: turn Nagle off.

    pynetdicom writes a DIMSE message as several PDUs; with Nagle on, the second one waits
    for the peer's delayed ACK (~40 ms per message: a C-FIND took 50 ms whatever it found).
    """
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def source_of(address) -> str:
    """The source a connection counts against: its IPv4 address, or its IPv6 /64 (one host
    usually holds a whole /64, so single IPv6 addresses would be free for the asking)."""
    host = str(address[0]).split("%", 1)[0] if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class _Pending:
    """A connection not yet associated; `sock` is the socket to shut down to evict it."""

    __slots__ = ("sock", "source", "since", "evicted")

    def __init__(self, sock: socket.socket, source: str):
        self.sock, self.source, self.since, self.evicted = sock, source, time.monotonic(), False


class Admission:
    """Connections not yet associated: at most `total`, at most `per_source` from one source.

    When all `total` places are taken, a newcomer takes the place of the oldest connection
    of the source holding the most (shut down under its thread) if that source holds at
    least two more than the newcomer's; a newcomer from a source holding none takes the
    place of the oldest connection of any other source. Whoever opens the most connections
    waits, not the others; many sources with one connection each do not keep a new one out,
    since a handshake takes milliseconds and the oldest go first.
    """

    def __init__(self, total: int, per_source: int):
        self.total, self.per_source = total, per_source
        self._lock = threading.Lock()
        self._by_source: dict[str, list[_Pending]] = {}
        self._count = 0

    def admit(self, sock: socket.socket, address) -> tuple[_Pending | None, str]:
        """(the pending entry, "") or (None, why the connection is refused)."""
        source = source_of(address)
        with self._lock:
            mine = self._by_source.get(source, [])
            if len(mine) >= self.per_source:
                return None, f"{len(mine)} connections from it not yet associated (dicom.max_pending_per_source)"
            if self._count >= self.total:
                largest = max(self._by_source.values(), key=len)
                if len(largest) >= len(mine) + 2:
                    self._evict(largest[0])
                elif not mine:
                    self._evict(min((held[0] for held in self._by_source.values()), key=lambda e: e.since))
                else:
                    return None, (f"{self._count} connections not yet associated (dicom.max_pending_connections), "
                                  f"{len(mine)} of them from it")
            entry = _Pending(sock, source)
            self._by_source.setdefault(source, []).append(entry)
            self._count += 1
            return entry, ""

    def holds(self, entry: _Pending, sock: socket.socket) -> None:
        """The entry's connection is now `sock` (its TLS wrapper)."""
        with self._lock:
            entry.sock = sock
            if entry.evicted:
                self._shutdown(sock)

    def release(self, entry: _Pending) -> None:
        """The connection is associated or closed; call before closing its socket."""
        with self._lock:
            self._remove(entry)

    def _evict(self, entry: _Pending) -> None:
        entry.evicted = True
        self._remove(entry)
        self._shutdown(entry.sock)

    def _remove(self, entry: _Pending) -> None:
        held = self._by_source.get(entry.source)
        if held is not None and entry in held:
            held.remove(entry)
            self._count -= 1
            if not held:
                del self._by_source[entry.source]

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        # the socket level only: its thread, blocked in a read or a handshake, wakes up and closes it
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class Reports:
    """One log line per kind and source every `interval` seconds, counting those not logged:
    a peer opening connections by the hundred does not write a line for each."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log):
        self.interval, self.logger = interval, logger
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def allow(self, kind: str, source: str) -> tuple[bool, int]:
        """(whether to log now, how many of this kind and source were not logged since the last)."""
        now = time.monotonic()
        with self._lock:
            last, skipped = self._last.get((kind, source), (None, 0))
            if last is not None and now - last < self.interval:
                self._last[(kind, source)] = (last, skipped + 1)
                return False, skipped + 1
            if len(self._last) > 4096:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
            self._last[(kind, source)] = (now, 0)
        return True, skipped

    def warning(self, kind: str, source: str, message: str, *args, level: int = logging.WARNING) -> bool:
        """Log the line unless one of its kind and source was logged within `interval`; whether it was."""
        allowed, skipped = self.allow(kind, source)
        if not allowed:
            return False
        if skipped:
            message += f" ({skipped} more from {source} since the last report)"
        self.logger.log(level, message, *args)
        return True


class Slots:
    """The association slots of the node, shared by the TLS and plain servers of every receiving process.

    pynetdicom counts the associations of its own process. Before an association is created, the
    servers ask here: at most `total`, at most `per_source` from one source (`source_of`), and at
    most `plain` on the plain port, so that neither one address nor peers without a certificate
    can take every slot. This process's associations are counted as pynetdicom counts them, by
    their live threads; those of the other receiving processes by what they publish in `shared`
    (scp.slots). A refused request is answered with an A-ASSOCIATE-RJ (rejected-transient,
    local-limit-exceeded) and logged at most once per address every 10 s.

    An association counts while its thread lives and its connection is open: one that was
    aborted or released frees its slot as soon as its socket is closed (pynetdicom sets
    `AssociationSocket.socket` to None then, and EVT_CONN_CLOSE publishes it to the others),
    not when its threads have wound down.
    """

    def __init__(self, ae, total: int, per_source: int | None = None, plain: int | None = None,
                 shared: SharedCounts | None = None):
        self._ae = ae
        self.total = total
        self.per_source = per_source or total
        self.plain = plain or total
        self.shared = shared
        self.lock = threading.Lock()   # held from the check until the new association's thread runs
        self.reports = Reports()

    @classmethod
    def of(cls, ae, dicom, shared: SharedCounts | None = None) -> "Slots":
        """From the [dicom] settings (0: the documented share of `max_associations`)."""
        total = dicom.max_associations
        return cls(ae, total, dicom.max_associations_per_source or max(1, total // 2),
                   dicom.plain_max_associations or max(1, total * 3 // 4), shared)

    def held(self, closed=None) -> Held:
        """The associations this process holds (not counting `closed`, whose connection has ended)."""
        held = Held()
        for a in self._ae.active_associations:
            if a.is_acceptor and a is not closed and _connected(a):
                held.total += 1
                held.by_source[source_of(a.requestor.address)] += 1
                if getattr(getattr(a, "_server", None), "ssl_context", None) is None:
                    held.plain += 1
        return held

    @contextmanager
    def admitting(self, source: str, tls: bool) -> Iterator[str]:
        """Why one more association from `source` is refused, or "": start it inside the block,
        which no other thread or receiving process enters meanwhile. Refused too when the other
        receiving processes' counts cannot be read within `ADMISSION_TIMEOUT` (one of them stalled)."""
        deadline = time.monotonic() + ADMISSION_TIMEOUT
        if not self.lock.acquire(timeout=ADMISSION_TIMEOUT):
            yield "associations from other peers still wait for admission"
            return
        try:
            if self.shared is None:
                yield self.refusal(source, tls)
                return
            try:
                self.shared.hold(deadline)
            except Busy as exc:
                yield str(exc)
                return
            try:
                yield self.refusal(source, tls)
                self.shared.publish(self.held())
            finally:
                self.shared.__exit__()
        finally:
            self.lock.release()

    def refusal(self, source: str, tls: bool) -> str:
        """Why one more association from `source` is refused, or "" (call inside `admitting`)."""
        held = self.held()
        total, plain, mine = held.total, held.plain, held.by_source[source]
        if self.shared is not None:
            others = self.shared.others(source)
            total, plain, mine = total + others[0], plain + others[1], mine + others[2]
        if total >= self.total:
            return f"already {total} associations (dicom.max_associations)"
        if mine >= self.per_source:
            return f"already {mine} associations from {source} (dicom.max_associations_per_source)"
        if not tls and plain >= self.plain:
            return f"already {plain} associations on the plain port (dicom.plain_max_associations)"
        return ""

    def publish(self, event=None) -> None:
        """Tell the other receiving processes what this one holds (EVT_CONN_CLOSE, and every second):
        skipped when the table cannot be had within a second (the next one tries again)."""
        if self.shared is not None:   # a connection the peer closed (FIN) keeps its socket object until its threads end
            self.shared.publish_within(partial(self.held, closed=getattr(event, "assoc", None)), 1.0)


class TLSAssociationServer(ThreadedAssociationServer):
    """A threaded association server that no peer can hold shut.

    Each connection is *pending* until its A-ASSOCIATE-RQ has come whole: its TLS handshake
    and its request are read in the connection's own thread, each with a deadline, and
    `Admission` bounds pending connections in number, per source too. Only then is an
    association created, so `max_associations` counts associations, not idle sockets. The
    request is read here only when the request handler takes it over
    (`takes_association_request`, scp.fastpath); otherwise pynetdicom reads it.

    With `listening_socket`, it serves a socket made (and shared with other receiving
    processes) by the caller instead of binding its own: accepting is non-blocking, so a
    process that loses the race for a connection goes back to waiting.
    """

    def __init__(self, *args, handshake_timeout: float = 5.0, artim_timeout: float = 10.0,
                 max_pending: int = 64, max_pending_per_source: int = 32, max_associate_rq_size: int = 262144,
                 listening_socket: socket.socket | None = None, slots: Slots | None = None,
                 on_handshake_failure: Callable[[str, str], None] | None = None, **kwargs):
        self.handshake_timeout, self.artim_timeout = handshake_timeout, artim_timeout
        self.on_handshake_failure = on_handshake_failure   # (peer address, reason): the audit trail's alert
        self.max_associate_rq_size = max_associate_rq_size
        self._admission = Admission(max_pending, max_pending_per_source)
        self._reports = Reports()
        self._lock = threading.Lock()
        self._entries: dict[socket.socket, _Pending] = {}
        self._requests: dict[socket.socket, bytearray] = {}
        self._shared = listening_socket
        super().__init__(*args, **kwargs)
        self.slots = slots or Slots(self.ae, self.ae.maximum_associations)
        self._reads_request = getattr(self.RequestHandlerClass, "takes_association_request", False)

    def service_actions(self) -> None:
        """Nothing. pynetdicom's runs a full `gc.collect()` every 60th pass of the accept loop (every
        3 s idle, more often under load): ~5 ms of the receiver's CPU per association, the largest
        single cost of a one-instance association. The collector's own thresholds free what
        associations leave in cycles; the heap from before listening is frozen (node.receivers)."""

    def server_bind(self) -> None:
        if self._shared is None:
            return super().server_bind()
        self.socket.close()
        self.socket = self._shared
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._shared is None:
            return super().server_activate()
        self.socket.setblocking(False)

    def server_close(self) -> None:
        if self._shared is None:
            return super().server_close()
        # no shutdown(): the socket stays open in the other receivers; the owner closes it

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        sock.setblocking(True)  # the listening socket may be non-blocking; connections are not
        # Without it, a small write (the A-ASSOCIATE-AC, a
        # C-STORE-RSP) can wait for the peer's delayed ACK: ~30 ms per association.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request, client_address) -> None:
        """In the accept loop: admit the connection as pending, or close it at once."""
        entry, refusal = self._admission.admit(request, client_address)
        if entry is None:
            self._reports.warning("refused", source_of(client_address), "connection from %s refused: %s",
                                  _peer(client_address), refusal)
            metrics.get().connections_refused.labels("pending-limit").inc()
            self.shutdown_request(request)
            return
        with self._lock:
            self._entries[request] = entry
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self._entries.pop(request, None)
            self._admission.release(entry)
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self._lock:
            entry = self._entries.pop(request)
        sock, pdu, ready = request, None, False
        try:
            if self.ssl_context is not None:
                sock = self._handshake(request, client_address, entry)
            ready = sock is not None
            if ready and self._reads_request:
                pdu = self._association_request(sock, client_address, entry)
                ready = pdu is not None
        except Exception as exc:   # never a dead thread that keeps its pending place
            log.error("connection from %s failed before its association: %s", _peer(client_address), exc)
            ready = False
        finally:
            self._admission.release(entry)
        if ready:
            try:
                sock.settimeout(self.ae.network_timeout)   # no read or write waits forever on a silent peer
            except OSError:
                ready = False
        if not ready:
            self._close(entry.sock)   # the latest socket of the connection (its TLS wrapper, if any)
            return
        if pdu is not None:
            with self._lock:
                self._requests[sock] = pdu
        refusal = ""
        try:
            with self.slots.admitting(entry.source, self.ssl_context is not None) as refusal:
                if not refusal:
                    super().process_request_thread(sock, client_address)   # starts the association's thread
        finally:
            with self._lock:
                self._requests.pop(sock, None)
        if refusal:
            self.slots.reports.warning("slots", entry.source, "association from %s rejected: %s",
                                       _peer(client_address), refusal)
            metrics.get().associations_rejected.labels("limit").inc()
            self._reject(sock, pdu is not None)

    def take_association_request(self, sock: socket.socket) -> bytearray | None:
        """The A-ASSOCIATE-RQ read from `sock` before its association existed (for the request handler)."""
        with self._lock:
            return self._requests.pop(sock, None)

    def _handshake(self, sock: socket.socket, peer, entry: _Pending) -> ssl.SSLSocket | None:
        try:
            sock.settimeout(self.handshake_timeout)   # the whole handshake: CPython keeps one deadline
            tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._admission.holds(entry, tls)
            tls.do_handshake()
            log.debug("TLS %s %s with %s", tls.version(), tls.cipher()[0], _peer(peer))
            return tls
        except (ssl.SSLError, OSError) as exc:
            if entry.evicted:
                kind, reason = "evicted", "closed to make room for other addresses (dicom.max_pending_connections)"
            elif isinstance(exc, TimeoutError):
                kind, reason = "timeout", f"timed out after {self.handshake_timeout:g} s (dicom.tls_handshake_timeout)"
            else:
                kind, reason = "error", getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            metrics.get().tls_handshake_failures.labels(kind).inc()
            said = self._reports.warning("handshake", entry.source, "TLS handshake from %s failed: %s", _peer(peer),
                                         reason)
            if said and kind == "error" and self.on_handshake_failure is not None:   # as often as the log says it
                try:
                    self.on_handshake_failure(str(peer[0]), str(reason))
                except Exception as exc:
                    log.error("audit: the failed handshake could not be recorded (%s)", type(exc).__name__)
            return None

    def _association_request(self, sock: socket.socket, peer, entry: _Pending) -> bytearray | None:
        """The A-ASSOCIATE-RQ, whole, within the ARTIM timer; None when the connection is to be closed."""
        try:
            pdu = read_pdu(sock, {0x01: self.max_associate_rq_size, 0x07: 64},
                           time.monotonic() + self.artim_timeout, exclusive=True)
            return pdu if pdu[0] == 0x01 else None   # an A-ABORT: the peer gave up (PS3.8 AA-2)
        except PDURefused as exc:
            self._reports.warning("request", entry.source, "association request from %s aborted: %s",
                                  _peer(peer), exc)
            metrics.get().connections_refused.labels("bad-request").inc()
            self._abort(sock, exc.reason)
        except PDUTimeout as exc:
            metrics.get().connections_refused.labels("request-timeout").inc()
            self._reports.warning("request", entry.source, "association request from %s closed: not complete "
                                  "within %g s (dicom.artim_timeout; %s)", _peer(peer), self.artim_timeout, exc)
        except PDUError as exc:
            if entry.evicted:
                self._reports.warning("request", entry.source, "connection from %s closed to make room for other "
                                      "addresses (dicom.max_pending_connections)", _peer(peer))
            else:
                log.debug("connection from %s closed before its association request: %s", _peer(peer), exc)
        return None

    def _reject(self, sock: socket.socket, request_read: bool) -> None:
        """A-ASSOCIATE-RJ (rejected-transient, service-provider presentation, local-limit-exceeded:
        PS3.8 9.3.4) after the request has come whole, then close."""
        if not request_read:
            try:
                read_pdu(sock, {0x01: self.max_associate_rq_size}, time.monotonic() + self.artim_timeout,
                         exclusive=True)
            except PDUError:
                self._close(sock)
                return
        self._answer(sock, reject_pdu(0x02, 0x03, 0x02))
        self._close(sock)

    @classmethod
    def _abort(cls, sock: socket.socket, reason: int) -> None:
        cls._answer(sock, abort_pdu(reason))

    @staticmethod
    def _answer(sock: socket.socket, pdu: bytes) -> None:
        """Send a last PDU (A-ABORT, A-ASSOCIATE-RJ), then read (briefly) what is still coming, so
        that closing does not reset the connection before the peer has read it."""
        try:
            sock.settimeout(1.0)
            sock.sendall(pdu)
            scratch = bytearray(65536)
            deadline = time.monotonic() + 0.5
            sock.settimeout(0.05)
            while time.monotonic() < deadline and sock.recv_into(scratch):
                pass
        except OSError:
            pass

    def _close(self, sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _connected(assoc) -> bool:
    """Whether the association still holds its slot: its connection is open, and it is not in Sta13 (released
    or aborted, only waiting for the peer to close; a slot counted until that close was processed refused
    the next association of a peer that sends again at once)."""
    sock = getattr(assoc.dul, "socket", None)
    if sock is None or sock.socket is None:
        return False
    machine = getattr(assoc.dul, "state_machine", None)
    return getattr(machine, "current_state", None) != "Sta13"


def _peer(address) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)
