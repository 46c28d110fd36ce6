"""The C-STORE fast path: receive a data set and answer it without pynetdicom's generic DIMSE code.

pynetdicom decodes every command set with pydicom, dispatches it through its service
classes and builds the response with validating setters: ~3 ms of CPU per instance, more
than the durable write itself (../shared/notes/ingest-performance.md). This module handles
the one message a receiving node gets by the thousand, a C-STORE-RQ on an accepted
context, in the DUL thread where the P-DATA arrives:

    command set (Implicit VR LE, group 0000) -> parsed here with struct
    data set fragments                       -> spool file (Part 10: file meta + data set)
    last fragment                            -> store(...) -> C-STORE-RSP, pre-encoded, sent

C-FIND requests, once pynetdicom has read them, are answered in the association thread
(`FastDIMSE.get_msg`): the index gives each match already encoded (`Query.encoded`), and
each pending response goes out as one P-DATA-TF holding a pre-encoded command set and the
identifier, where pynetdicom's generic path spent ~1 ms per match.

Everything else (C-ECHO, requests on contexts the node did not accept, malformed command
sets, C-STORE without a data set, C-FIND in Big Endian) goes to pynetdicom's own path
unchanged. The encoders
below write a handful of fixed elements and are checked byte for byte against pydicom and
pynetdicom in tests/test_fastpath.py; the path is only installed on the pynetdicom version
it was written against.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind)
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"
ENABLED = pynetdicom.__version__ == PYNETDICOM_VERSION

C_STORE_RQ, C_STORE_RSP, C_FIND_RSP, NO_DATA_SET, DATA_SET = 0x0001, 0x8001, 0x8020, 0x0101, 0x0001

# (status, error comment) for a stored file: what the archive decided
StoreFunction = Callable[[str, str, str, str], tuple[int, str]]
# (calling AE, SOP class, identifier, cancelled?, explicit VR?) -> (status, comment, encoded match | None)...
FindFunction = Callable[[str, str, Callable[[], Dataset], Callable[[], bool], bool],
                        Iterator[tuple[int, str, bytes | None]]]
FIND_MODELS = {PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind}
LITTLE_ENDIAN = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


# -- the few encoders ----------------------------------------------------------------------

def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_store_rsp(message_id: int, sop_class: str, sop_instance: str, status: int,
                     comment: str = "") -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian."""
    body = (_implicit(0x00000002, _pad(sop_class, b"\0"))
            + _implicit(0x00000100, struct.pack("<H", C_STORE_RSP))
            + _implicit(0x00000120, struct.pack("<H", message_id))
            + _implicit(0x00000800, struct.pack("<H", NO_DATA_SET))
            + _implicit(0x00000900, struct.pack("<H", status))
            + (_implicit(0x00000902, _pad(comment[:64], b" ")) if comment else b"")
            + _implicit(0x00001000, _pad(sop_instance, b"\0")))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def encode_find_rsp(message_id: int, sop_class: str, status: int) -> bytes:
    """A pending C-FIND-RSP command set (PS3.7 9.3.2.2), an identifier follows."""
    body = (_implicit(0x00000002, _pad(sop_class, b"\0"))
            + _implicit(0x00000100, struct.pack("<H", C_FIND_RSP))
            + _implicit(0x00000120, struct.pack("<H", message_id))
            + _implicit(0x00000800, struct.pack("<H", DATA_SET))
            + _implicit(0x00000900, struct.pack("<H", status)))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, command: bytes, data_set: bytes, max_pdu: int) -> list[P_DATA]:
    """A message as P-DATA primitives, fragmented as pynetdicom's DIMSEMessage.encode_msg does."""
    size = max_pdu - 6 if max_pdu else max(len(command), len(data_set), 1)
    pieces = []
    for control, stream in ((1, command), (0, data_set)):
        chunks = [stream[i:i + size] for i in range(0, len(stream), size)] or [b""]
        for n, chunk in enumerate(chunks):
            last = 2 if n == len(chunks) - 1 else 0
            primitive = P_DATA()
            primitive.presentation_data_value_list.append((context_id, bytes([control | last]) + chunk))
            pieces.append(primitive)
    return pieces


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set as its last fragment (PS3.8 9.3.5)."""
    return struct.pack(">BBIIBB", 0x04, 0, len(command) + 6, len(command) + 2, context_id, 0x03) + command


def _explicit(group_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF) + b"OB\0\0" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 7.1)."""
    elements = (_explicit(0x00020001, b"OB", b"\0\1")
                + _explicit(0x00020002, b"UI", _pad(sop_class, b"\0"))
                + _explicit(0x00020003, b"UI", _pad(sop_instance, b"\0"))
                + _explicit(0x00020010, b"UI", _pad(transfer_syntax, b"\0"))
                + _explicit(0x00020012, b"UI", _pad(PYNETDICOM_IMPLEMENTATION_UID, b"\0"))
                + _explicit(0x00020013, b"SH", _pad(PYNETDICOM_IMPLEMENTATION_VERSION, b" "))
                + (_explicit(0x00020016, b"AE", _pad(source_ae, b" ")) if source_ae else b""))
    return (b"\0" * 128 + b"DICM" + _explicit(0x00020000, b"UL", struct.pack("<I", len(elements)))
            + elements)


# -- the command set -------------------------------------------------------------------------

@dataclass(frozen=True)
class StoreRequest:
    message_id: int
    sop_class: str
    sop_instance: str


def parse_store_rq(command: bytes) -> StoreRequest | None:
    """The C-STORE-RQ in an encoded command set, or None for anything else (or malformed)."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, elem, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group != 0 or length > end - offset:
            return None
        values[elem] = command[offset:offset + length]
        offset += length
    try:
        field, = struct.unpack("<H", values[0x0100])
        message_id, = struct.unpack("<H", values[0x0110])
        data_set_type, = struct.unpack("<H", values[0x0800])
        sop_class = values[0x0002].rstrip(b"\0 ").decode("ascii")
        sop_instance = values[0x1000].rstrip(b"\0 ").decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != C_STORE_RQ or data_set_type == NO_DATA_SET or not sop_class or not sop_instance:
        return None
    return StoreRequest(message_id, sop_class, sop_instance)


# -- the DIMSE provider ----------------------------------------------------------------------

class _Incoming:
    """A data set being spooled. A write error (disk full) is kept, not raised: the rest of
    the data set is read and dropped so that the association survives and gets a status."""

    def __init__(self, request: StoreRequest, context_id: int, head: bytes):
        self.request, self.context_id = request, context_id
        self.error: OSError | None = None
        fd, self.path = tempfile.mkstemp(suffix=".dcm")
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.write(head)

    def write(self, data) -> None:
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


class FastDIMSE(DIMSEServiceProvider):
    """Handles C-STORE-RQ itself; hands every other message to pynetdicom, fragment by fragment."""

    def __init__(self, assoc, store: StoreFunction, find: FindFunction | None = None):
        super().__init__(assoc)
        self._store, self._find = store, find
        self._command = bytearray()
        self._incoming: _Incoming | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._fragment(context_id, data)

    def get_msg(self, block: bool = False):
        """The association thread asks for the next request: a C-FIND is answered here."""
        context_id, message = super().get_msg(block)
        if type(message) is C_FIND and self._find is not None and self._finds(message, context_id):
            self._answer_find(message, context_id)
            return None, None
        return context_id, message

    def _finds(self, request: C_FIND, context_id: int) -> bool:
        context = self.assoc._accepted_cx.get(context_id)
        return (request.is_valid_request and request.Identifier is not None and context is not None
                and context.abstract_syntax == request.AffectedSOPClassUID
                and context.abstract_syntax in FIND_MODELS and context.transfer_syntax[0] in LITTLE_ENDIAN)

    def _answer_find(self, request: C_FIND, context_id: int) -> None:
        """Matches go out as they are read, each a pre-encoded command set and identifier in
        one P-DATA-TF; the final response through pynetdicom."""
        explicit = self.assoc._accepted_cx[context_id].transfer_syntax[0] == ExplicitVRLittleEndian
        message_id = request.MessageID
        self.cancel_req = {}
        commands: dict[int, bytes] = {}
        answers = self._find(self.assoc.requestor.ae_title, request.AffectedSOPClassUID,
                             lambda: decode(request.Identifier, not explicit, True, False),
                             lambda: message_id in self.cancel_req, explicit)
        for status, comment, identifier in answers:
            if identifier is None:
                break
            if status not in commands:
                commands[status] = encode_find_rsp(message_id, request.AffectedSOPClassUID, status)
            self._let_peer_speak()
            self._send_pending(context_id, commands[status], identifier)
        else:
            status, comment = 0x0000, ""
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
        while self.dul.socket is not None and self.dul.socket.ready and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _stock(self, context_id: int, data: bytes) -> None:
        single = P_DATA()
        single.presentation_data_value_list = [[context_id, data]]
        super().receive_primitive(single)

    def _fragment(self, context_id: int, data: bytes) -> None:
        control = data[0]
        if self.message is not None:                       # pynetdicom is assembling this one
            self._stock(context_id, data)
        elif self._incoming is not None:
            if control & 1 or context_id != self._incoming.context_id:
                log.warning("protocol error from %s: data set fragments interrupted",
                            self.assoc.requestor.ae_title)
                self.drop()
                self.dul.event_queue.put("Evt19")          # invalid PDU: A-ABORT
                return
            self._incoming.write(memoryview(data)[1:])
            if control & 2:
                self._answer()
        elif not control & 1:                               # data set without a command set
            self._stock(context_id, data)
        else:
            self._command += memoryview(data)[1:]
            if control & 2:
                command, self._command = bytes(self._command), bytearray()
                self._start(context_id, command)

    def _start(self, context_id: int, command: bytes) -> None:
        request = parse_store_rq(command)
        context = self.assoc._accepted_cx.get(context_id)
        if (request is None or context is None or context.abstract_syntax != request.sop_class
                or self.dul.state_machine.current_state != "Sta6"):
            self._stock(context_id, b"\x03" + command)
            return
        head = file_meta(request.sop_class, request.sop_instance, context.transfer_syntax[0],
                         self.assoc.requestor.ae_title)
        try:
            self._incoming = _Incoming(request, context_id, head)
        except OSError as exc:
            log.error("cannot open a spool file: %s", exc)
            self.dul.event_queue.put("Evt19")

    def _answer(self) -> None:
        incoming, self._incoming = self._incoming, None
        request = incoming.request
        incoming.close()
        try:
            if incoming.error is not None:
                full = incoming.error.errno in (errno.ENOSPC, errno.EDQUOT)
                log.error("spooling %s failed: %s", request.sop_instance, incoming.error)
                status, comment = (0xA700, "no space left on the node") if full else (
                    0x0110, "processing failure")
            else:
                status, comment = self._store(incoming.path, request.sop_class, request.sop_instance,
                                              self.assoc.requestor.ae_title)
        except Exception:
            log.exception("C-STORE from %s failed", self.assoc.requestor.ae_title)
            status, comment = 0x0110, "processing failure"
        finally:
            incoming.discard()
        rsp = encode_store_rsp(request.message_id, request.sop_class, request.sop_instance, status, comment)
        self.dul.socket.send(p_data_tf(incoming.context_id, rsp))

    def drop(self) -> None:
        if self._incoming is not None:
            self._incoming.close()
            self._incoming.discard()
            self._incoming = None


class FastSocket(AssociationSocket):
    """Reads a PDU with `recv_into` one buffer instead of 4 KiB `recv` calls appended together."""

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


def request_handler(store: StoreFunction, find: FindFunction | None = None) -> type[RequestHandler]:
    """A pynetdicom RequestHandler whose associations use the fast path (when enabled)."""

    class FastRequestHandler(RequestHandler):
        def _create_association(self):
            assoc = super()._create_association()
            assoc.dimse = FastDIMSE(assoc, store, find)
            assoc.dul.socket.__class__ = FastSocket
            return assoc

    return FastRequestHandler
