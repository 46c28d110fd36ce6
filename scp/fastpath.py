"""The C-STORE fast path: receive a data set and answer it without pynetdicom's generic DIMSE code.

pynetdicom decodes every command set with pydicom, dispatches it through its service
classes and builds the response with validating setters: ~3 ms of CPU per instance, more
than the durable write itself (../shared/notes/ingest-performance.md). This module handles
the one message a receiving node gets by the thousand, a C-STORE-RQ on an accepted
context, in the DUL thread where the P-DATA arrives:

    command set (Implicit VR LE, group 0000) -> parsed here with struct
    data set fragments                       -> spool file (Part 10: file meta + data set), not copied before
    last fragment                            -> store(...) -> C-STORE-RSP, pre-encoded, sent

C-FIND requests, once pynetdicom has read them, are answered in the association thread
(`FastDIMSE.get_msg`): the index gives each match already encoded (`Query.encoded`), and
each pending response goes out as one P-DATA-TF holding a pre-encoded command set and the
identifier, where pynetdicom's generic path spent ~1 ms per match.

Everything else (C-ECHO, requests on contexts the node did not accept, malformed command
sets, C-STORE without a data set, C-FIND in Big Endian) goes to pynetdicom's own path
unchanged.

Nothing a peer merely claims is allocated (DESIGN.md): `wire.read_pdu` checks a PDU's declared
length against what the node allows before reading it (the advertised maximum PDU for
P-DATA-TF, `dicom.max_associate_rq_size` for the others), grows its buffer as the bytes
arrive and gives up at a deadline, so a half-sent PDU cannot hold a thread. A command set
is at most `MAX_COMMAND_SET`, and a data set that pynetdicom assembles in memory (C-FIND
identifiers, N-ACTION lists) at most `dicom.max_identifier_size`. Past any of these the
association is aborted (A-ABORT) and one line is logged. The hand-written wire code (encoders,
PDU reader, command-set parser) is in `scp.wire`; the path is only installed on the
pynetdicom version it was written against: on another one the node refuses to start unless
`dicom.fast_path = false` (`scp.server.check_fast_path`), and CI runs the receive, query and
retrieve tests with it off too (`make test-stock-path`).

pynetdicom 3.0.4 internals this relies on (check each when PYNETDICOM_VERSION changes):
- `RequestHandler._create_association` builds the association, whose `dimse` is replaced and
  whose `dul` and `dul.socket` get their classes swapped after construction (`FastDUL`,
  `FastSocket`): their `__init__` state is what ours extend. It deep-copies `server.contexts` into
  `acceptor.supported_contexts`, which nothing writes to afterwards (`SharedContexts`, the servers'
  contexts, skip the copy).
- `DIMSEServiceProvider.receive_primitive(P_DATA)` is called by the DUL thread for each
  P-DATA; `get_msg(block)` is how the association thread takes a whole message.
- `Association._accepted_cx`: the accepted presentation contexts by context ID.
- A P-DATA-TF is not decoded by pynetdicom (`wire.PDataValues`: no copies of the fragments): the state
  machine's DT-2 and AR-7 take it off `_recv_pdu` and give its `to_primitive()` to `dimse.receive_primitive`
  alone (`FastDIMSE`'s), which reads its values once; EVT_DATA_RECV and EVT_PDU_RECV are not triggered for it
  (the node binds neither). A fragment on a context not in `_accepted_cx` aborts the association.
- `StateMachine.do_action` raises `InvalidEventError` for an event its state has no action for (having
  logged it): pynetdicom's reactor thread dies of it; `FastDUL.run_reactor` ends there the same way, quietly,
  and drops the message being received (`FastDIMSE.drop`: its spool file).
- `DULServiceProvider._read_pdu_data` (reads a PDU off the socket), `_decode_pdu`,
  `_recv_pdu` (its queue of decoded PDUs) and `receive_pdu(wait, timeout)`.
- `AssociationSocket.ready` and `recv(n)`, and its attributes as its `__init__` sets them.
- `pynetdicom._config.LOG_HANDLER_LEVEL` (`scp.server.configure_pynetdicom`).
- Reactors that wait for events (`FastAssociation._run_reactor`, `FastDUL.run_reactor`): copies of
  pynetdicom's `Association._run_reactor` and `DULServiceProvider.run_reactor` loops with the 1 ms
  sleeps replaced by waits; the association is given its class before it starts (`assoc.__class__`,
  as `scp.retrieve.sends_stored_files` does); `FastDUL.run` replaces the thread's target (bound before
  the class swap; `PASS_CONTEXTVARS` not honoured). They rely on: every put to `event_queue`,
  `to_provider_queue`, `to_user_queue` and `dimse.msg_queue` going through `Queue.put` (swapped to
  `WakingQueue`); `_reactor_checkpoint` cleared by a local `send_*()`, which then waits for
  `_is_paused` (`WakingCheckpoint`); `Association._kill`, `kill()`, `_dul_ready`, `is_established`,
  `network_timeout_response`, `_serve_request`; `DULServiceProvider._kill_thread`, `kill_dul`,
  `stop_dul` (the FSM calls `kill_dul` on every move to Sta1), `artim_timer`, `_idle_timer`
  (`Timer._start_time`, `remaining`, `timeout`), `_process_recv_primitive`, `_is_transport_event`;
  `AssociationSocket._is_connected`. EVT_FSM_TRANSITION and EVT_PDU_SENT are not triggered for the
  replayed A-ASSOCIATE-AC (the node binds neither).
- Association requests seen before (`Requests`): `_read_pdu_data` decodes an A-ASSOCIATE-RQ itself
  (so `_decode_pdu`'s EVT_DATA_RECV / EVT_PDU_RECV are not triggered for it: the node binds neither);
  AE-6 calls `A_ASSOCIATE_RQ.to_primitive()` and writes to the primitive only when it rejects the
  protocol version; `A_ASSOCIATE._presentation_context_definition_list` holds the proposed contexts;
  `ACSE._negotiate_as_acceptor` calls the name `negotiate_as_acceptor` imported into `pynetdicom.acse`
  (replaced by `_negotiate`), with the server's supported contexts, the same for all its associations;
  `DULServiceProvider._send(pdu)`; AE-7 takes the accept primitive off `to_provider_queue`, sends the
  A-ASSOCIATE-AC and goes to Sta6 (`FastStateMachine` does the same with the bytes sent before);
  `StateMachine.transition` and `current_state`; `ServiceUser.ae_title` does not write to the primitive.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import select
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

import pynetdicom
from pynetdicom import acse, evt, presentation
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import LOGGER as ASSOCIATION_LOGGER
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import LOGGER as DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode
from pynetdicom.fsm import InvalidEventError, StateMachine
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, P_DATA, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification, MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind)
from pynetdicom.transport import AssociationSocket, RequestHandler

from archive import metrics

from .handlers import counted_query
from .retrieve import FileSendingAssociation
from .tls import Reports, source_of
from .wire import (DISCARD_LIMIT, MAX_COMMAND_SET, PDU_NAMES, Limits, PDataValues, PDUError, PeerClosed,
                   StoreRequest, encode_find_rsp, encode_store_rsp, file_meta, p_data, p_data_tf, parse_store_rq,
                   read_pdu)

log = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"
ENABLED = pynetdicom.__version__ == PYNETDICOM_VERSION

# (status, error comment) for a stored file: what the archive decided
StoreFunction = Callable[[str, str, str, object], tuple[int, str]]   # (path, SOP class, SOP instance, association)
# (calling AE, SOP class, identifier, cancelled?, explicit VR?) -> (status, comment, encoded match | None)...
FindFunction = Callable[[str, str, Callable[[], Dataset], Callable[[], bool], bool],
                        Iterator[tuple[int, str, bytes | None]]]
FIND_MODELS = {PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind}
LITTLE_ENDIAN = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


# -- the DIMSE provider ----------------------------------------------------------------------

class _Incoming:
    """A data set being spooled. A write error (disk full) is kept, not raised: the rest of
    the data set is read and dropped so that the association survives and gets a status.
    So is a refusal by the node's limits on one C-STORE (`tally`, a `scp.handlers.Tally`:
    size, free disk space, pace), and the spool file is removed at once."""

    def __init__(self, request: StoreRequest, context_id: int, head: bytes, tally=None):
        self.request, self.context_id = request, context_id
        self.error: OSError | None = None
        self.tally = tally
        fd, self.path = tempfile.mkstemp(suffix=".dcm")
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.write(head)

    @property
    def refusal(self):
        return None if self.tally is None else self.tally.refusal

    def write(self, data) -> None:
        if self.tally is not None and (self.tally.refusal is not None or self.tally.add(len(data)) is not None):
            if not self.file.closed:
                self.close()
                self.discard()        # nothing of a refused data set stays on disk
            return
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as exc:
                self.error = exc

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as exc:
            self.error = self.error or exc

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


WAIT_CAP = 1.0   # seconds: the longest a reactor waits without an event (its timers are looked at that often)


class WakingQueue(queue.Queue):
    """A queue whose `put` also wakes the thread that waits for it (`wake`)."""
    wake: Callable[[], None]

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


class WakingCheckpoint(threading.Event):
    """An Event whose `clear` also wakes the association's reactor (`wake`), so that it pauses at once."""
    wake: Callable[[], None]

    def clear(self) -> None:
        super().clear()
        self.wake()


class FastAssociation(FileSendingAssociation):
    """pynetdicom's association, whose reactor waits for an event instead of polling every millisecond.

    pynetdicom's association thread and DUL thread each wake a thousand times a second to look at
    their queues: with 16 associations that is 32,000 wake-ups a second, each taking the GIL, which
    is what made several associations at once slower than one. Here the association's thread
    sleeps until a DIMSE message or a primitive is queued for it, its DUL stops, it is killed, or its
    network timeout comes (`wake`). The class is set on the association before it starts."""

    def wait_for_events(self) -> None:
        self._wakeup = threading.Event()
        self.wake = self._wakeup.set
        for waiting in (self.dimse.msg_queue, self.dul.to_user_queue):
            waiting.__class__ = WakingQueue
            waiting.wake = self.wake
        # a local send_*() (a commitment report on the open association) clears the checkpoint, then waits
        # for the reactor to pause there: it is woken to do so at once
        self._reactor_checkpoint.__class__ = WakingCheckpoint
        self._reactor_checkpoint.wake = self.wake

    def kill(self) -> None:
        self._kill = True
        self.wake()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's `Association._run_reactor`, waiting where it slept a millisecond."""
        self._is_paused = False
        idle = False
        while not self._kill:
            if idle:
                timer = self.dul._idle_timer
                remaining = WAIT_CAP if timer.timeout is None else max(0.0, min(WAIT_CAP, timer.remaining))
                self._wakeup.wait(remaining)
            self._wakeup.clear()
            self._is_paused = True            # as pynetdicom's: a local send_*() may pause the reactor
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)
            idle = self.dimse.msg_queue.empty()
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOCIATION_LOGGER.info("Association Released")
                self.is_released, self.is_established = True, False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                ASSOCIATION_LOGGER.info("Association Aborted" + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort")
                                                                 else ""))
                self.dul.receive_pdu(wait=False)
                self.is_aborted, self.is_established = True, False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if self.dul.stopped or not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                ASSOCIATION_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class FastDIMSE(DIMSEServiceProvider):
    """Handles C-STORE-RQ itself; hands every other message to pynetdicom, fragment by fragment.

    It runs in the DUL thread, where an exception would stop the DUL and leave the peer
    waiting: any failure here aborts the association, with one log line.
    """

    reports: Reports | None = None   # set by the request handler: lines about a peer, rate-limited

    def __init__(self, assoc, store: StoreFunction, find: FindFunction | None, limits: Limits, reception=None):
        super().__init__(assoc)
        self._store, self._find, self._limits = store, find, limits
        self._reception = reception   # scp.handlers.Reception: the limits on one C-STORE's data set
        self._command = bytearray()
        self._incoming: _Incoming | None = None
        # bytes of the message pynetdicom is assembling: its command set, its data set in memory
        self._stock_command = self._stock_data = 0
        self.aborted = False

    def receive_primitive(self, primitive: PDataValues) -> None:
        try:
            for context_id, data in primitive.presentation_data_value_list:
                if self.aborted:
                    return
                self._fragment(context_id, data)
        except Exception as exc:
            log.debug("P-DATA from %s failed", _peer(self.assoc), exc_info=True)
            self._abort(f"its P-DATA could not be handled ({_brief(exc)})", error=True)

    def get_msg(self, block: bool = False):
        """The association thread asks for the next request: a C-FIND is answered here."""
        context_id, message = super().get_msg(block)
        if type(message) is C_FIND and self._find is not None and self._finds(message, context_id):
            try:
                self._answer_find(message, context_id)
            except Exception as exc:   # the peer is gone, or the final response cannot be sent
                log.debug("C-FIND from %s failed", _peer(self.assoc), exc_info=True)
                log.error("C-FIND from %s failed (%s): association aborted", _peer(self.assoc), _brief(exc))
                self.assoc.abort()
            return None, None
        return context_id, message

    def _finds(self, request: C_FIND, context_id: int) -> bool:
        context = self.assoc._accepted_cx.get(context_id)
        return (request.is_valid_request and request.Identifier is not None and context is not None
                and context.abstract_syntax == request.AffectedSOPClassUID
                and context.abstract_syntax in FIND_MODELS and context.transfer_syntax[0] in LITTLE_ENDIAN)

    def _answer_find(self, request: C_FIND, context_id: int) -> None:
        """Matches go out as they are read, each a pre-encoded command set and identifier in
        one P-DATA-TF; the final response through pynetdicom. A query that fails on the way
        ends with 0xC001 (unable to process)."""
        syntax = self.assoc._accepted_cx[context_id].transfer_syntax[0]
        explicit = syntax == ExplicitVRLittleEndian
        counted_query(self.assoc, request, str(syntax))
        message_id = request.MessageID
        self.cancel_req = {}
        commands: dict[int, bytes] = {}
        answers = self._find(self.assoc.requestor.ae_title, request.AffectedSOPClassUID,
                             lambda: decode(request.Identifier, not explicit, True, False),
                             lambda: message_id in self.cancel_req, explicit)
        try:
            for status, comment, identifier in answers:
                if identifier is None:
                    break
                if status not in commands:
                    commands[status] = encode_find_rsp(message_id, request.AffectedSOPClassUID, status)
                self._let_peer_speak()
                self._send_pending(context_id, commands[status], identifier)
            else:
                status, comment = 0x0000, ""
        except Exception as exc:
            log.debug("C-FIND from %s failed", _peer(self.assoc), exc_info=True)
            log.error("C-FIND from %s failed (%s): answered 0xC001", _peer(self.assoc), _brief(exc))
            status, comment = 0xC001, "the node could not process the query"
        finally:
            close = getattr(answers, "close", None)
            if close is not None:
                close()
        final = C_FIND()
        final.MessageIDBeingRespondedTo = message_id
        final.AffectedSOPClassUID = request.AffectedSOPClassUID
        final.Status = status
        if comment:
            final.ErrorComment = comment[:64]
        self.send_msg(final, context_id)
        self.cancel_req = {}

    def _send_pending(self, context_id: int, command: bytes, identifier: bytes) -> None:
        if self.maximum_pdu_size and 12 + len(command) + len(identifier) > self.maximum_pdu_size:
            for piece in p_data(context_id, command, identifier, self.maximum_pdu_size):
                self.dul.send_pdu(piece)
            return
        both = P_DATA()
        both.presentation_data_value_list = [[context_id, b"\x03" + command], [context_id, b"\x02" + identifier]]
        self.dul.send_pdu(both)

    def _let_peer_speak(self, limit: float = 0.5) -> None:
        """pynetdicom's DUL thread reads the socket only when it has nothing to send: while
        responses stream out, hold the next one back as long as the peer has something to
        say (a C-CANCEL), so that it is read and honoured."""
        deadline = time.monotonic() + limit
        while (sock := self.dul.socket) is not None and sock.ready and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _stock(self, context_id: int, data: bytes | memoryview) -> None:
        single = P_DATA()
        single.presentation_data_value_list = [[context_id, bytes(data)]]
        super().receive_primitive(single)
        if self.message is None:   # complete (or not started): the next message counts from zero
            self._stock_command = self._stock_data = 0

    def _fragment(self, context_id: int, data: memoryview) -> None:
        if not data:
            self._abort("a presentation data value without its message control header")
            return
        control, size = data[0], len(data) - 1
        if context_id not in self.assoc._accepted_cx:       # PS3.8 9.3.5.1: only an accepted context
            self._abort(f"a presentation data value on presentation context {context_id}, which was not accepted")
            return
        if self.message is not None:                       # pynetdicom is assembling this one
            if self._within_limits(control, size):
                self._stock(context_id, data)
        elif self._incoming is not None:
            if control & 1 or context_id != self._incoming.context_id:
                self._abort("data set fragments interrupted")
                return
            self._incoming.write(memoryview(data)[1:])
            refusal = self._incoming.refusal
            if refusal is not None and refusal.abort:     # it does not arrive: no status can wait for it
                self._abort(refusal.comment)
                return
            if control & 2:
                self._answer()
        elif not control & 1:                               # PS3.7 6.3.1: the command set comes first
            self._abort("a data set fragment without a command set")
        elif len(self._command) + size > MAX_COMMAND_SET:
            self._abort(f"a command set longer than {MAX_COMMAND_SET} bytes")
        else:
            self._command += memoryview(data)[1:]
            if control & 2:
                command, self._command = bytes(self._command), bytearray()
                self._start(context_id, command)

    def _within_limits(self, control: int, size: int) -> bool:
        """Whether pynetdicom may take this fragment of the message it assembles: its command
        set stays under MAX_COMMAND_SET, and a data set it holds in memory (everything but a
        C-STORE's, spooled to a file) under `dicom.max_identifier_size`."""
        if control & 1:
            if self._stock_command + size > MAX_COMMAND_SET:
                self._abort(f"a command set longer than {MAX_COMMAND_SET} bytes")
                return False
            self._stock_command += size
        elif getattr(self.message, "_data_set_file", None) is None:
            if self._stock_data + size > self._limits.max_identifier:
                self._abort(f"a {type(self.message).__name__} data set longer than {self._limits.max_identifier} "
                            "bytes (dicom.max_identifier_size)")
                return False
            self._stock_data += size
        elif self._reception is not None:   # a C-STORE pynetdicom spools (the fast path left it): the same size limit
            self._stock_data += size
            if self._stock_data > self._reception.max_bytes:
                self._abort(f"a C-STORE data set longer than {self._reception.max_bytes} bytes "
                            "(ingest.max_instance_bytes)")
                return False
        return True

    def _start(self, context_id: int, command: bytes) -> None:
        request = parse_store_rq(command)
        context = self.assoc._accepted_cx.get(context_id)
        if (request is None or context is None or context.abstract_syntax != request.sop_class
                or self.dul.state_machine.current_state != "Sta6"):
            self._stock_command = len(command)
            self._stock(context_id, b"\x03" + command)
            return
        head = file_meta(request.sop_class, request.sop_instance, context.transfer_syntax[0],
                         self.assoc.requestor.ae_title)
        tally = self._reception.start() if self._reception is not None else None   # refused at once: disk short
        try:
            try:
                self._incoming = _Incoming(request, context_id, head, tally)
            except FileNotFoundError:        # the spool directory was removed under us: make it again
                spool = Path(tempfile.gettempdir())
                for directory in (spool.parent, spool):
                    directory.mkdir(mode=0o700, exist_ok=True)
                log.warning("spool directory %s was missing: recreated", spool)
                self._incoming = _Incoming(request, context_id, head, tally)
        except OSError as exc:
            self._abort(f"cannot open a spool file ({exc})", error=True)

    def _answer(self) -> None:
        incoming, self._incoming = self._incoming, None
        request = incoming.request
        incoming.close()
        try:
            if incoming.refusal is not None:                  # the node's limits on one C-STORE
                status, comment = incoming.refusal.status, incoming.refusal.comment
                log.warning("C-STORE from %s refused (0x%04X): %s", _peer(self.assoc), status, comment)
                _refused(status)
            elif incoming.error is not None:
                full = incoming.error.errno in (errno.ENOSPC, errno.EDQUOT)
                log.error("spooling %s failed: %s", request.sop_instance, incoming.error)
                status, comment = (0xA700, "no space left on the node") if full else (
                    0x0110, "processing failure")
                _refused(status)
            else:   # counted by the store function
                status, comment = self._store(incoming.path, request.sop_class, request.sop_instance, self.assoc)
        except Exception as exc:
            log.debug("C-STORE from %s failed", _peer(self.assoc), exc_info=True)
            log.error("C-STORE from %s failed (%s): answered 0x0110", _peer(self.assoc), _brief(exc))
            status, comment = 0x0110, "processing failure"
            _refused(status)
        finally:
            incoming.discard()
        rsp = encode_store_rsp(request.message_id, request.sop_class, request.sop_instance, status, comment)
        sock = self.dul.socket
        if sock is not None:   # None: the peer is gone, nobody to answer
            sock.send(p_data_tf(incoming.context_id, rsp))

    def _abort(self, reason: str, error: bool = False) -> None:
        """A-ABORT the association (PS3.8 Evt19), once, with one log line."""
        if self.aborted:
            return
        self.aborted = True
        _report(self.reports, self.assoc, logging.ERROR if error else logging.WARNING, "abort",
                "association from %s aborted: %s", _peer(self.assoc), reason)
        self.drop()
        if isinstance(self.dul.socket, FastSocket):
            self.dul.socket.discarding = True
        self.dul.event_queue.put("Evt19")

    def drop(self) -> None:
        """Forget the message being received, and its spool file (the association ends)."""
        self._command = bytearray()
        if self._incoming is not None:
            self._incoming.close()
            self._incoming.discard()
            self._incoming = None
        message, self.message = self.message, None
        spooled = getattr(message, "_data_set_file", None)   # pynetdicom's C-STORE spool file
        if spooled is not None:
            try:
                spooled.close()
                os.unlink(spooled.name)
            except OSError:
                pass


class FastDUL(DULServiceProvider):
    """pynetdicom's DUL, reading each PDU with `read_pdu`.

    pynetdicom allocates whatever length a PDU header declares and then waits, without a
    timeout, until that many bytes came: a peer could make it allocate gigabytes, or hold the
    thread (and its association slot) forever with a half-sent PDU. Here a PDU longer than the
    node allows, or one that does not arrive whole within the network timeout, aborts the
    association with one log line. `pdu_lengths` is set by the request handler.
    """

    pdu_lengths: dict[int, int] = {}

    reports: Reports | None = None   # set by the request handler: lines about a peer, rate-limited
    requests: Requests | None = None  # set by the request handler: association requests seen lately
    negotiated: "_Negotiated | None" = None   # this association's request, when it is remembered

    def _read_pdu_data(self) -> None:
        sock = self.socket
        if sock.discarding:
            sock.discard()
            return
        raw = sock.take_pending()
        if raw is None:
            try:
                raw = read_pdu(sock.socket, self.pdu_lengths, time.monotonic() + (self.network_timeout or 60.0))
            except PeerClosed as exc:
                if exc.received:
                    log.info("connection from %s closed: %s", _peer(self.assoc), exc)
                self.event_queue.put("Evt17")
                return
            except PDUError as exc:   # refused or stalled: the stream is out of step
                _report(self.reports, self.assoc, logging.WARNING, "abort", "association from %s aborted: %s",
                        _peer(self.assoc), exc)
                sock.discarding = True
                self.event_queue.put("Evt19")
                return
        try:
            if raw[0] == 0x04:
                pdu, event = PDataValues(raw), "Evt10"
            elif raw[0] == 0x01 and self.requests is not None:
                pdu, event = self.requests.decoded(bytes(raw)), "Evt6"
                self.negotiated = getattr(pdu, "negotiated", None)
            else:
                pdu, event = self._decode_pdu(raw)
        except Exception as exc:
            _report(self.reports, self.assoc, logging.WARNING, "abort",
                    "association from %s aborted: its %s could not be decoded (%s)", _peer(self.assoc),
                    PDU_NAMES.get(raw[0], "PDU"), _brief(exc))
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    _wakeup_fd = -1                      # an eventfd, open while the reactor runs: written to wake it (`_wake`)
    _wakeup_lock: threading.Lock
    stopped = False                      # the reactor has ended (set before the association is woken)

    def wait_for_events(self) -> None:
        """Make the reactor wait for an event instead of polling every millisecond: data on the socket,
        a primitive to send or an event queued by another thread, being stopped (called before start)."""
        self._wakeup_lock = threading.Lock()
        for waiting in (self.event_queue, self.to_provider_queue):
            waiting.__class__ = WakingQueue
            waiting.wake = self._wake

    def run(self) -> None:
        """The thread's body: this reactor (the thread's target is pynetdicom's, bound before the class was
        set; pynetdicom's `PASS_CONTEXTVARS`, off in the node, is not honoured)."""
        with self._wakeup_lock:          # opened here: a thread that never starts leaves no descriptor
            self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.run_reactor()

    def _wake(self) -> None:
        with self._wakeup_lock:              # never a write to a closed (perhaps reused) descriptor
            if self._wakeup_fd >= 0:
                os.eventfd_write(self._wakeup_fd, 1)

    def run_reactor(self) -> None:
        """pynetdicom's DUL reactor, except that where it slept a millisecond before looking again, it
        waits (`_wait`) until there is something to do. Each pass does what pynetdicom's does."""
        self._idle_timer.start()
        busy = True
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if not busy:
                        self._wait()
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:   # as pynetdicom: an A-ABORT bypassing the state machine
                    DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                    DUL_LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source, abort_pdu.reason_diagnostic = 0x02, 0x00
                    self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted, self.assoc.is_established = True, False
                    self.assoc._kill = self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    busy = False
                    continue
                try:
                    self.state_machine.do_action(event)
                except InvalidEventError:
                    # pynetdicom logged it: e.g. the association thread's A-RELEASE-RP after the peer's P-DATA
                    # in Sta8 made the DUL abort (Sta13). pynetdicom's reactor ended here with a traceback, its
                    # spool file left: this one ends as it did, quietly, and drops the file (below).
                    break
                busy = True
        finally:
            drop = getattr(self.assoc.dimse, "drop", None)
            if drop is not None:
                drop()                        # a data set cut off by the end: its spool file goes
            with self._wakeup_lock:
                if self._wakeup_fd >= 0:
                    os.close(self._wakeup_fd)
                    self._wakeup_fd = -1
            self.stopped = True
            wake = getattr(self.assoc, "wake", None)
            if wake is not None:
                wake()                        # the association's reactor sees `stopped`, and ends

    def _wait(self) -> None:
        """Until the socket has data, something is queued, the reactor is woken, or WAIT_CAP (the ARTIM
        timer's remaining time when sooner) has passed."""
        if not self.event_queue.empty() or not self.to_provider_queue.empty():
            return
        poller = select.poll()
        poller.register(self._wakeup_fd, select.POLLIN)
        sock = self.socket
        if sock is not None and sock.socket is not None and sock._is_connected:
            if sock.pending is not None or (isinstance(sock.socket, ssl.SSLSocket) and sock.socket.pending()):
                return
            try:
                poller.register(sock.socket.fileno(), select.POLLIN)
            except (OSError, ValueError):
                return
        timeout = WAIT_CAP
        if self.artim_timer._start_time is not None:
            timeout = min(timeout, max(0.0, self.artim_timer.remaining))
        poller.poll(timeout * 1000)
        try:
            os.eventfd_read(self._wakeup_fd)
        except (BlockingIOError, OSError):
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's (stopped only in Sta1), waking the reactor so that it sees it is stopped."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        while self.is_alive():
            self.join(0.05)
        return True

    def _send(self, pdu) -> None:
        """As pynetdicom's; the A-ASSOCIATE-AC answering a remembered request is kept, encoded."""
        known = self.negotiated
        if known is None or known.accepted is not None or not isinstance(pdu, A_ASSOCIATE_AC):
            return super()._send(pdu)
        known.accepted = pdu.encode()
        self.socket.send(known.accepted)
        if self.requests is not None:
            self.requests.remember(known)

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):
        """As pynetdicom's, but a wait ends as soon as the DUL has stopped (the connection is
        over): the association thread waited `acse_timeout` for an A-ASSOCIATE indication that
        an aborted or closed connection never gives, holding an association slot meanwhile."""
        if not wait:
            return super().receive_pdu(wait, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            primitive = super().receive_pdu(True, step)
            if primitive is not None:
                return primitive
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if (self._kill_thread or not self.is_alive()) and self.to_user_queue.empty():
                return None


class FastSocket(AssociationSocket):
    """Reads a PDU with `recv_into` one buffer instead of 4 KiB `recv` calls appended together;
    hands over the A-ASSOCIATE-RQ the server read before the association existed (`pending`)."""

    pending: bytearray | None = None
    discarding = False   # after an abort: what still comes is dropped, up to DISCARD_LIMIT
    _discarded = 0

    @property
    def ready(self) -> bool:
        return self.pending is not None or super().ready

    def take_pending(self) -> bytearray | None:
        pdu, self.pending = self.pending, None
        return pdu

    def discard(self) -> None:
        """Drop what the peer still sends after the node aborted (PS3.8 Sta13): the A-ABORT
        is not reset away by closing on unread data; a peer that goes on sending past
        DISCARD_LIMIT is cut off."""
        try:
            count = self.socket.recv_into(bytearray(65536)) if self.socket is not None else 0
        except OSError:
            count = 0
        self._discarded += count
        if not count or self._discarded > DISCARD_LIMIT:
            self.close()

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        received = 0
        with memoryview(buffer) as view:
            while received < nr_bytes:
                count = self.socket.recv_into(view[received:], nr_bytes - received)
                if not count:
                    break
                received += count
        if received < nr_bytes:  # the peer closed the connection: what came, as pynetdicom's recv does
            del buffer[received:]
        return buffer


def _refused(status: int) -> None:
    metrics.get().stores_refused.labels(f"0x{status:04X}").inc()


def _peer(assoc) -> str:
    requestor = assoc.requestor
    try:
        address = f"{requestor.address}:{requestor.port}"
    except Exception:
        address = "?"
    return f"{requestor.ae_title or '?'} ({address})"


def _report(reports: Reports | None, assoc, level: int, kind: str, message: str, *args) -> None:
    """A line about a peer: with `reports`, at most one of each kind per address every 10 s (a peer
    that opens and spoils associations by the hundred does not write a line for each)."""
    if reports is None:
        log.log(level, message, *args)
        return
    try:
        source = source_of(assoc.requestor.address)
    except Exception:
        source = "?"
    reports.warning(kind, source, message, *args, level=level)


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}"


# -- association requests seen before -----------------------------------------------------

REMEMBERED_REQUESTS = 32   # distinct A-ASSOCIATE-RQ PDUs whose decoding and negotiation a server keeps
REMEMBERED_REQUEST_BYTES = 32768   # and the largest kept (a modality's, ~130 contexts: 5-10 KB; decoded ~30x)

# user information a request may carry and still be remembered: items that no event handler answers
_PLAIN_USER_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                     ImplementationVersionNameNotification, SCP_SCU_RoleSelectionNegotiation)


class _Negotiated:
    """What one A-ASSOCIATE-RQ (its exact bytes) gives: the request as pynetdicom decodes it, and the
    presentation contexts' results, filled by the first association that negotiates them."""
    __slots__ = ("key", "pdu", "results", "accepted")

    def __init__(self, key: bytes, pdu: "_RememberedRQ"):
        self.key, self.pdu, self.results = key, pdu, None
        self.accepted: bytes | None = None    # the A-ASSOCIATE-AC PDU sent to it, encoded


class _Proposed(list):
    """A remembered request's presentation contexts, carrying its `_Negotiated` (for `_negotiate`)."""
    negotiated: _Negotiated


class _RememberedRQ(A_ASSOCIATE_RQ):
    """A decoded A-ASSOCIATE-RQ whose primitive is made once, then shared by every association whose
    request has the same bytes. Nothing on the acceptor's path writes to it (pynetdicom 3.0.4: AE-6
    writes only when it rejects the protocol version, and such a request is not remembered)."""
    primitive: A_ASSOCIATE
    negotiated: _Negotiated

    def to_primitive(self) -> A_ASSOCIATE:
        return self.primitive


class Requests:
    """The association requests a server has seen lately, by the SHA-256 of their bytes.

    Modalities send the same A-ASSOCIATE-RQ for every association (the same titles, the same
    ~130 presentation contexts); pynetdicom decodes it, validates each UID twice and negotiates
    every context each time: ~15 ms of CPU, half of what a one-instance association costs the
    receiver. A request with the same bytes is decoded, and its contexts negotiated, once. What
    depends on the peer or the moment (its address, the AE title and limit checks, the event
    handlers that may reject it, user identity) runs for every association; requests with user
    information beyond `_PLAIN_USER_ITEMS` are not remembered. A request is remembered once it has
    been accepted (its A-ASSOCIATE-AC sent: a peer that is refused fills nothing), and only up to
    `REMEMBERED_REQUEST_BYTES`: a decoded request holds ~30 times its size. Bounded:
    `REMEMBERED_REQUESTS`, least recently used out first (~30 MB at most); a peer sending endless
    different requests only evicts."""

    def __init__(self, size: int = REMEMBERED_REQUESTS):
        self._size, self._lock, self._entries = size, threading.Lock(), OrderedDict()

    def decoded(self, raw: bytes) -> _RememberedRQ | A_ASSOCIATE_RQ:
        key = hashlib.sha256(raw).digest()
        with self._lock:
            known = self._entries.get(key)
            if known is not None:
                self._entries.move_to_end(key)
                return known.pdu
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(raw)
        if len(raw) > REMEMBERED_REQUEST_BYTES:
            return pdu
        primitive = pdu.to_primitive()
        if pdu.protocol_version != 0x0001 or not all(isinstance(item, _PLAIN_USER_ITEMS)
                                                      for item in primitive.user_information):
            return pdu
        pdu.__class__ = _RememberedRQ
        pdu.primitive = primitive
        known = pdu.negotiated = _Negotiated(key, pdu)
        proposed = _Proposed(primitive.presentation_context_definition_list)
        proposed.negotiated = known
        primitive._presentation_context_definition_list = proposed
        return pdu

    def remember(self, known: _Negotiated) -> None:
        """Keep `known` (its request was accepted, its A-ASSOCIATE-AC sent)."""
        with self._lock:
            self._entries[known.key] = known
            self._entries.move_to_end(known.key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class FastStateMachine(StateMachine):
    """pynetdicom's state machine, except for AE-7 (send the A-ASSOCIATE-AC) on a remembered request
    answered before: the same bytes are sent again, without building and encoding the PDU (~1.5 ms)."""

    def do_action(self, event: str) -> None:
        known = self.dul.negotiated
        if event != "Evt7" or self.current_state != "Sta3" or known is None or known.accepted is None:
            return super().do_action(event)
        self.dul.to_provider_queue.get(False)   # the accept primitive, as AE-7 takes it
        self.dul.socket.send(known.accepted)
        self.transition("Sta6")


_NEGOTIATE = presentation.negotiate_as_acceptor


def _negotiate(rq_contexts, ac_contexts, roles=None):
    """`pynetdicom.presentation.negotiate_as_acceptor`, computed once for a remembered request (the
    server's supported contexts are the same for all its associations: `Requests` is kept per server): each
    association gets its own shallow copies of the result contexts."""
    known = getattr(rq_contexts, "negotiated", None)
    if known is None:
        return _NEGOTIATE(rq_contexts, ac_contexts, roles)
    if known.results is None:
        known.results = _NEGOTIATE(rq_contexts, ac_contexts, roles)
    results, ac_roles = known.results
    return [_clone(cx) for cx in results], list(ac_roles)


def _clone(context):
    """A shallow copy of a negotiated presentation context (its attributes, as they are: its transfer syntax
    list is shared, and never changed after negotiation; copy.copy costs 4x)."""
    clone = object.__new__(type(context))
    clone.__dict__.update(context.__dict__)
    return clone


class SharedContexts(list):
    """The server's supported presentation contexts, given to each association as they are: pynetdicom
    deep-copies them for every association (~0.7 ms of CPU, a tenth of what the receiver does in Python per
    one-instance association), yet only reads them (to negotiate, which `_negotiate` even does once per kind
    of request). Each association still gets its own list. `scp.server.start_servers` gives them to its
    servers when the fast path is on (the pynetdicom version this was checked against)."""

    def __deepcopy__(self, memo):
        return list(self)


def request_handler(store: StoreFunction, find: FindFunction | None = None, *,
                    limits: Limits, reception=None) -> type[RequestHandler]:
    """A pynetdicom RequestHandler whose associations use the fast path (when enabled);
    `reception` (a `scp.handlers.Reception`) bounds each C-STORE's data set as it arrives."""
    lengths = limits.pdu_lengths()
    reports = Reports(logger=log)   # a peer's aborted associations: one line per address every 10 s
    acse.negotiate_as_acceptor = _negotiate   # the same for any other request

    class FastRequestHandler(RequestHandler):
        takes_association_request = True   # the server may read the A-ASSOCIATE-RQ first (scp.tls)

        def _create_association(self):
            assoc = super()._create_association()
            assoc.dimse = FastDIMSE(assoc, store, find, limits, reception)
            assoc.dul.__class__ = FastDUL
            assoc.dul.pdu_lengths = lengths
            assoc.dul.reports = assoc.dimse.reports = reports
            # one memory per server: what a request gave depends on the server's contexts and settings too
            requests = getattr(self.server, "remembered_requests", None)
            if requests is None:
                requests = self.server.remembered_requests = Requests()
            assoc.dul.requests = requests
            assoc.dul.state_machine.__class__ = FastStateMachine
            assoc.__class__ = FastAssociation
            assoc.dul.wait_for_events()
            assoc.wait_for_events()
            sock = assoc.dul.socket
            sock.__class__ = FastSocket
            take = getattr(self.server, "take_association_request", None)
            if take is not None:
                sock.pending = take(self.request)
            return assoc

    return FastRequestHandler
