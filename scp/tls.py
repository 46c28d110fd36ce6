"""DICOM TLS (PS3.15 Annex B.9, BCP 195): contexts and a server that handshakes off the accept loop.

pynetdicom 3.0.4 wraps each accepted socket inside its accept loop with no timeout, so one
idle TCP connection to the TLS port blocks every later association. `TLSAssociationServer`
accepts plain sockets and does the handshake in the connection's own thread, with a
deadline, logging each failed handshake with the peer address and the reason.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

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


class TLSAssociationServer(ThreadedAssociationServer):
    """A threaded association server whose TLS handshakes cannot block the accept loop.

    With `listening_socket`, it serves a socket made (and shared with other receiving
    processes) by the caller instead of binding its own: accepting is non-blocking, so a
    process that loses the race for a connection goes back to waiting.
    """

    def __init__(self, *args, handshake_timeout: float = 10.0, max_pending_handshakes: int = 64,
                 listening_socket: socket.socket | None = None, **kwargs):
        self.handshake_timeout = handshake_timeout
        self._pending = threading.BoundedSemaphore(max_pending_handshakes)
        self._shared = listening_socket
        super().__init__(*args, **kwargs)

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
        # Without it, a small write (the A-ASSOCIATE-AC after TLS 1.3 session tickets, a
        # C-STORE-RSP) can wait for the peer's delayed ACK: ~30 ms per association.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request_thread(self, request, client_address) -> None:
        if self.ssl_context is not None:
            request = self._handshake(request, client_address)
            if request is None:
                return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: socket.socket, peer) -> ssl.SSLSocket | None:
        if not self._pending.acquire(blocking=False):
            log.warning("TLS handshake from %s refused: too many handshakes in progress", _peer(peer))
            sock.close()
            return None
        try:
            previous = sock.gettimeout()
            sock.settimeout(self.handshake_timeout)
            tls = self.ssl_context.wrap_socket(sock, server_side=True)
            tls.settimeout(previous)
            log.debug("TLS %s %s with %s", tls.version(), tls.cipher()[0], _peer(peer))
            return tls
        except (ssl.SSLError, OSError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (
                getattr(exc, "reason", None) or str(exc) or type(exc).__name__)
            log.warning("TLS handshake from %s failed: %s", _peer(peer), reason)
            sock.close()
            return None
        finally:
            self._pending.release()


def _peer(address) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)
