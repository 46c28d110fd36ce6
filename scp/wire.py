"""DICOM wire code the node writes by hand: the few encoders, reading a PDU and its data values, parsing a
command set.

Speed forces it (../shared/notes/ingest-performance.md): pynetdicom builds and parses every
command set through pydicom (~3 ms per C-STORE) and reads a PDU in 4 KiB pieces after
allocating whatever its header claims. Everything here is small and kept in one place: the
encoders are checked byte for byte against pydicom and pynetdicom (tests/test_fastpath.py),
and the PDU reader and the parser are fuzzed (tests/test_hostile_network.py).

Nothing a peer merely claims is allocated: `read_pdu` checks a PDU's declared length against
what the node allows (`Limits`) before reading it, grows its buffer as the bytes arrive and
gives up at a deadline.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu_primitives import P_DATA

C_STORE_RQ, C_STORE_RSP, C_FIND_RSP, NO_DATA_SET, DATA_SET = 0x0001, 0x8001, 0x8020, 0x0101, 0x0001

# A command set holds a dozen short elements (~200 bytes for a C-STORE-RQ): 64 KiB is generous.
MAX_COMMAND_SET = 64 << 10
# A PDU buffer is allocated at most this far ahead of the bytes that have arrived.
GROW_STEP = 1 << 20
# After the node aborted an association, what the peer still sends is read and dropped up to this.
DISCARD_LIMIT = 4 << 20
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


@dataclass(frozen=True)
class Limits:
    """What a peer may send, in bytes (from the [dicom] settings)."""
    max_pdu: int            # P-DATA-TF: the maximum PDU length the node advertises
    max_associate_rq: int   # A-ASSOCIATE-RQ and the other control PDUs
    max_identifier: int     # a data set pynetdicom assembles in memory (identifier, N-ACTION list)

    @classmethod
    def of(cls, dicom) -> "Limits":
        return cls(dicom.max_pdu_size, dicom.max_associate_rq_size, dicom.max_identifier_size)

    def pdu_lengths(self) -> dict[int, int]:
        """The longest PDU of each type the node reads inside an association."""
        lengths = dict.fromkeys(PDU_NAMES, self.max_associate_rq)
        lengths[0x04] = self.max_pdu
        return lengths


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


# -- reading a PDU ---------------------------------------------------------------------------

class PDUError(Exception):
    """A PDU that was not read whole; the message says why, for one log line."""


class PeerClosed(PDUError):
    """The connection closed or failed before the whole PDU came (`received` bytes of it did)."""

    def __init__(self, message: str, received: int):
        super().__init__(message)
        self.received = received


class PDUTimeout(PDUError):
    """The peer stopped sending in the middle of a PDU."""


class PDURefused(PDUError):
    """An unknown or unexpected PDU type, or a length over the limit: the peer gets an A-ABORT."""

    def __init__(self, message: str, reason: int):
        super().__init__(message)
        self.reason = reason   # A-ABORT reason (PS3.8 9.3.8): 1 unrecognised PDU, 2 unexpected, 6 invalid value


def read_pdu(sock, lengths: Mapping[int, int], deadline: float, exclusive: bool = False) -> bytearray:
    """One whole PDU (header included) from `sock`, of a type in `lengths` and at most that long.

    The declared length is checked before anything is allocated for it, and the buffer grows
    by at most GROW_STEP ahead of the bytes received. `deadline` (time.monotonic()) bounds the
    whole PDU: with `exclusive` (nobody else uses the socket) each read waits only until then;
    otherwise each read waits at most the socket's own timeout and the deadline is checked
    between reads. Raises PeerClosed, PDUTimeout or PDURefused.
    """
    header = bytearray(6)
    _fill(sock, header, 0, deadline, exclusive)
    pdu_type, _, length = struct.unpack(">BBL", header)
    name = PDU_NAMES.get(pdu_type)
    if name is None:
        raise PDURefused(f"unknown PDU type 0x{pdu_type:02X}", 0x01)
    limit = lengths.get(pdu_type)
    if limit is None:
        raise PDURefused(f"unexpected {name}", 0x02)
    if length > limit:
        raise PDURefused(f"{name} of {length} bytes, over the limit of {limit}", 0x06)
    total = 6 + length
    buffer = bytearray(min(total, 6 + GROW_STEP))
    buffer[:6] = header
    received = 6
    while received < total:
        if received == len(buffer):
            buffer.extend(bytes(min(GROW_STEP, total - len(buffer))))
        received = _fill(sock, buffer, received, deadline, exclusive, name, total)
    return buffer


def _fill(sock, buffer: bytearray, start: int, deadline: float, exclusive: bool, name: str = "PDU header",
          total: int = 6) -> int:
    """Read into buffer[start:] until it is full; returns its length."""
    end = len(buffer)
    with memoryview(buffer) as view:
        while start < end:
            try:
                if exclusive:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                count = sock.recv_into(view[start:], end - start)
            except TimeoutError:
                count = None   # the deadline decides
            except OSError as exc:   # reset, TLS record errors, closed under us
                raise PeerClosed(f"{name} cut off at {start} of {total} bytes ({exc.__class__.__name__})",
                                 start) from None
            if count == 0:
                raise PeerClosed(f"{name} cut off at {start} of {total} bytes", start)
            start += count or 0
            if start < end and time.monotonic() >= deadline:
                raise PDUTimeout(f"{name} stalled at {start} of {total} bytes")
    return end


class PDataValues:
    """A P-DATA-TF as read (`read_pdu`), its presentation data values given one at a time as (context ID,
    value) pairs, each value (message control header, then the fragment) a memoryview into the PDU, where
    pynetdicom's decoding copies every fragment four times and keeps a list of them all (a PDU of 170,000
    one-byte items held 44 MiB that way). The DUL's state machine takes it as it takes pynetdicom's
    P_DATA_TF (`to_primitive`), and hands it to the association's DIMSE provider, which reads the values once."""

    __slots__ = ("pdu",)

    def __init__(self, pdu: bytearray):
        """Raises ValueError when the items do not add up to the PDU (PS3.8 9.3.5.1)."""
        offset, end = 6, len(pdu)
        while offset < end:
            if end - offset < 5:
                raise ValueError(f"a presentation data value item cut off at {offset} of {end} bytes")
            (length,) = struct.unpack_from(">I", pdu, offset)
            if length < 1 or length > end - offset - 4:
                raise ValueError(f"a presentation data value item of {length} bytes at {offset} of {end}")
            offset += 4 + length
        self.pdu = pdu

    @property
    def presentation_data_value_list(self) -> Iterator[tuple[int, memoryview]]:
        pdu = self.pdu
        offset, end = 6, len(pdu)
        view = memoryview(pdu)
        while offset < end:
            length, context_id = struct.unpack_from(">IB", pdu, offset)
            yield context_id, view[offset + 5:offset + 4 + length]
            offset += 4 + length

    def to_primitive(self) -> "PDataValues":
        return self


def abort_pdu(reason: int = 0x00) -> bytes:
    """An A-ABORT PDU from the service provider (source 2, PS3.8 9.3.8)."""
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): result 1 permanent / 2 transient, its source and reason."""
    return struct.pack(">BBIBBBB", 0x03, 0, 4, 0, result, source, reason)


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
