"""The node's Application Entity: presentation contexts, policy, TLS and plain listeners."""
from __future__ import annotations

import logging
import socket
import threading
from functools import partial

import pynetdicom
from pynetdicom import _config as pynetdicom_config
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove, Verification)
from pydicom import uid

from archive import Archive

from . import audit, fastpath, handlers, retrieve, wire
from .commitment import Committer
from .settings import Settings
from .slots import SharedCounts
from .tls import Reports, Slots, TLSAssociationServer, server_context, source_of

log = logging.getLogger(__name__)
SHUTDOWN_POLL = 0.05   # seconds: how soon a listener notices that it is shut down

TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
    uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K, uid.RLELossless,
]


class _Context(PresentationContext):
    """A supported context that is cheap to copy.

    pynetdicom deep-copies every supported context for each association; with every
    storage SOP class times 16 transfer syntaxes that cost ~200 ms of CPU per
    association. UIDs are immutable strings, so copying the list is enough.
    """

    def __deepcopy__(self, memo):
        clone = object.__new__(_Context)        # a quarter of copy.copy's cost: its attributes, as they are
        clone.__dict__.update(self.__dict__)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


SERVICES = [  # identifiers and commitment requests: uncompressed syntaxes only
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
    StorageCommitmentPushModel,
]


def _context(abstract_syntax: str, transfer_syntaxes: list) -> _Context:
    cx = _Context()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(transfer_syntaxes)
    return cx


def supported_contexts() -> list[PresentationContext]:
    contexts = [_context(Verification, TRANSFER_SYNTAXES)]
    contexts += [_context(sop_class, TRANSFER_SYNTAXES[:3]) for sop_class in SERVICES]
    for storage in AllStoragePresentationContexts:
        cx = _context(storage.abstract_syntax, TRANSFER_SYNTAXES)
        # SCP/SCU role selection: a C-GET requestor asks to be the storage SCP
        cx.scu_role = cx.scp_role = True
        contexts.append(cx)
    return contexts


PEER_MESSAGE_CHARS = 300   # of a pynetdicom line about a peer (it may quote a whole refused value)


class PeerChatter(logging.Filter):
    """pynetdicom's own warnings and errors about an association a peer opened: at most one line
    per peer address (IPv6: /64) every 10 s, naming the address.

    pynetdicom logs a refused value whole at ERROR (an AE title with a line feed, a 60 KB UID),
    and a peer may send such requests by the hundred; the node logs its own line for each
    refusal (rate-limited as well), so the rest is chatter. Kept rather than silenced: it is
    the only word on failures the node does not report itself. A handler filter: it sees the
    records of every pynetdicom logger; the association is found from the logging thread
    (the association's own thread or its DUL's)."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self._reports = Reports(interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith("pynetdicom"):
            return True
        source = _peer_source(threading.current_thread())
        if source is None:
            return True
        allowed, skipped = self._reports.allow("pynetdicom", source)
        if allowed:
            try:
                message = record.getMessage()
            except Exception:
                message = str(record.msg)
            record.msg = message[:PEER_MESSAGE_CHARS] + (f" (peer {source}; {skipped} more lines from pynetdicom about it not logged)"
                                    if skipped else f" (peer {source})")
            record.args = None
        return allowed


def _peer_source(thread: threading.Thread) -> str | None:
    """The source (scp.tls.source_of) of the peer whose association `thread` serves, if any."""
    assoc = thread if isinstance(thread, Association) else (
        getattr(thread, "assoc", None) if isinstance(thread, DULServiceProvider) else None)
    if assoc is None or not assoc.is_acceptor:
        return None
    try:
        return source_of(assoc.requestor.address)
    except Exception:
        return None


def configure_pynetdicom() -> None:
    """pynetdicom's settings for a receiving node (see notes/ingest-performance.md).

    Received data sets are streamed to a spool file and sent ones streamed from their file
    (memory stays bounded for any size, bytes are never re-encoded); pynetdicom's per-event
    debug handlers are off on the hot path, and it logs no identifiers (patient names) at INFO.
    """
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # C-MOVE / C-GET send stored files as they are
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # identifiers carry patient data, and formatting them costs ~1 ms per C-FIND match
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def build_ae(config: Settings) -> AE:
    d = config.dicom
    ae = retrieve.NodeAE(ae_title=config.node.ae_title)
    ae.maximum_associations = d.max_associations
    ae.maximum_pdu_size = d.max_pdu_size
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    ae.network_timeout = d.network_timeout
    ae.require_called_aet = d.require_called_aet
    ae.require_calling_aet = list(d.allowed_calling_aets)
    return ae


def event_handlers(archive: Archive, config: Settings, committer: Committer | None = None) -> list:
    committer = committer or Committer(archive, config)
    return [
        (evt.EVT_N_ACTION, committer.handle_action),
        (evt.EVT_C_STORE, handlers.handle_store, [archive]),
        (evt.EVT_C_FIND, handlers.handle_find, [archive, config]),
        (evt.EVT_C_MOVE, retrieve.handle_move, [archive, config]),
        (evt.EVT_C_GET, retrieve.handle_get, [archive, config]),
        (evt.EVT_ESTABLISHED, retrieve.sends_stored_files),
        (evt.EVT_REQUESTED, handlers.handle_requested, [archive]),
        (evt.EVT_ESTABLISHED, handlers.handle_established),
        (evt.EVT_REJECTED, handlers.handle_rejected),
        (evt.EVT_CONN_CLOSE, handlers.handle_closed),
    ]


class FastPathError(RuntimeError):
    """The fast path is asked for on a pynetdicom it was not written for."""


def check_fast_path() -> None:
    """Refuse, saying what to do, to run the fast path on another pynetdicom than the one whose
    internals it relies on (scp/fastpath.py lists them): it could answer wrongly, not only slowly."""
    if not fastpath.ENABLED:
        raise FastPathError(f"pynetdicom {pynetdicom.__version__} is installed, but the C-STORE fast path was written "
                            f"for {fastpath.PYNETDICOM_VERSION}: install pynetdicom=={fastpath.PYNETDICOM_VERSION}, "
                            "or set dicom.fast_path = false (pynetdicom's generic path, slower)")


def start_servers(ae: AE, config: Settings, archive: Archive, sockets: dict[int, socket.socket],
                  committer: Committer | None = None, shared: SharedCounts | None = None) -> list:
    """Serve the listening `sockets` (by port: TLS, and plain when configured); non-blocking. With `shared`,
    the association limits count the other receiving processes' associations too (scp.slots)."""
    d = config.dicom
    tls = server_context(d.certificate, d.private_key, d.ca_certificates, d.require_client_certificate)
    bound = event_handlers(archive, config, committer)
    # the contexts go to the servers, not to AE.supported_contexts: that setter makes plain
    # copies, which pynetdicom would deep-copy for every association (SharedContexts: not even those)
    contexts = supported_contexts()
    handler = None
    if d.fast_path:
        check_fast_path()
        contexts = fastpath.SharedContexts(contexts)
        handler = fastpath.request_handler(partial(handlers.store, archive), partial(handlers.find, archive, config),
                                           limits=wire.Limits.of(d), reception=handlers.Reception.of(config))
    else:
        log.warning("dicom.fast_path = false: C-STORE and C-FIND take pynetdicom's slower generic path, and PDU "
                    "lengths and command sets are not bounded by the node")
    slots = Slots.of(ae, d, shared)   # one pool for both ports: a share per address, a reserve for TLS
    if shared is not None:
        bound = [*bound, (evt.EVT_CONN_CLOSE, slots.publish)]   # a closed association's slot is free for all
    alert = _security_alert(archive, config) if archive.audit is not None else None
    servers = [serve(ae, sockets[d.port], bound, contexts, tls, config, handler, slots, alert)]
    if d.plain_port:
        servers.append(serve(ae, sockets[d.plain_port], bound, contexts, None, config, handler, slots))
    return servers


def _security_alert(archive: Archive, config: Settings):
    """A peer that failed node authentication (its TLS handshake): a Security Alert in the audit trail."""
    def alert(address: str, reason: str) -> None:
        audit.alert(archive.audit, address, config.node.ae_title, f"TLS handshake failed: {reason}")
    return alert


def serve(ae: AE, sock: socket.socket, bound: list, contexts: list, ssl_context, config: Settings,
          request_handler=None, slots: Slots | None = None, alert=None) -> TLSAssociationServer:
    """Serve the listening `sock` in a thread (TLS when `ssl_context`), with the [dicom] limits
    on connections not yet associated, and on associations (`slots`, shared between ports)."""
    d = config.dicom
    address = sock.getsockname()[:2]
    extra = {"request_handler": request_handler} if request_handler is not None else {}
    server = ae.make_server(address, contexts=contexts, ssl_context=ssl_context,
                            evt_handlers=bound, server_class=TLSAssociationServer,
                            handshake_timeout=d.tls_handshake_timeout, artim_timeout=d.artim_timeout,
                            max_pending=d.max_pending_connections, max_pending_per_source=d.max_pending_per_source,
                            max_associate_rq_size=d.max_associate_rq_size, listening_socket=sock,
                            slots=slots or Slots.of(ae, d), on_handshake_failure=alert, **extra)
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown() stops it, shutdown() expects it
    # a short poll: shutdown() waits for the loop to notice it (socketserver's default 0.5 s made every stop slow)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL},
                              name=f"listener-{address[1]}", daemon=True)
    thread.start()
    return server
