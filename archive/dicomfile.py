"""Reading what the index needs from a received instance, without decoding its pixels.

`inspect()` walks the top-level elements of the data set once (large values are
skipped, not read), checks that the data set is complete, and returns the attributes
that the index stores. It raises `InvalidInstance` with a reason a peer can be told.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_TEXT = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "StudyID", "Modality",
         "SeriesDescription", "BodyPartExamined", "SpecificCharacterSet")
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_WANTED = frozenset(tag_for_keyword(kw) for kw in _TEXT + _UIDS + ("SeriesNumber", "InstanceNumber"))


class InvalidInstance(ValueError):
    """The received data set cannot be stored. `status` is the DIMSE failure class."""

    def __init__(self, reason: str, status: str = "cannot-understand"):
        super().__init__(reason)
        self.status = status  # "cannot-understand" | "mismatch"


def valid_uid(value: object) -> bool:
    """A UID as PS3.5 9.1 defines it: at most 64 characters, digits and dots."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


@dataclass(frozen=True)
class InstanceHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    dataset_offset: int   # where the data set starts in the Part 10 file
    attrs: dict           # descriptive attributes for the index (strings or None)


_FAILED = object()  # a value pydicom could not convert


def _decode(raw: dict) -> dict:
    """keyword -> converted value of the collected elements, in the data set's character set.

    Uses pydicom's element conversion directly: a Dataset would look up the Specific
    Character Set again for every element.
    """
    encodings = None
    if 0x00080005 in raw:
        try:
            encodings = convert_encodings(convert_raw_data_element(raw[0x00080005]).value or None)
        except Exception:
            encodings = None
    values = {}
    for tag, element in raw.items():
        try:
            values[keyword_for_tag(tag)] = convert_raw_data_element(element, encoding=encodings).value
        except Exception:  # a malformed descriptive value is not a reason to refuse the image
            values[keyword_for_tag(tag)] = _FAILED
    return values


def _text(value) -> str | None:
    if value is None or value is _FAILED or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(value) -> int | None:
    try:
        return None if value in (None, "", _FAILED) else int(value)
    except Exception:
        return None


def inspect(path: Path, expected_sop_class: str | None = None,
            expected_sop_instance: str | None = None) -> InstanceHeader:
    """Validate the Part 10 file at `path` (as written by the receiver) and read its header."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 132 + 12:
            raise InvalidInstance("not a DICOM Part 10 stream")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[128:132] != b"DICM":
                raise InvalidInstance("not a DICOM Part 10 stream")
            return _inspect(buf, expected_sop_class, expected_sop_instance)


class _Malformed(ValueError):
    pass


# Explicit VR value representations with a 4-byte length (PS3.5 Table 7.1-1)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD


def check_structure(buf, pos: int, end: int, implicit: bool, little: bool,
                    collect: dict | None = None) -> int:
    """Walk every element header in `buf[pos:end]` without decoding values.

    Lengths must fit, undefined-length sequences and encapsulated pixel data must be
    closed by their delimiters (PS3.5 7.1, 7.5, A.4). Returns the number of top-level
    elements; raises `_Malformed`. `buf` is any buffer (an mmap of the received file):
    a few struct reads per element, much cheaper than a full parse. The top-level
    elements whose tags are in `_WANTED` are put in `collect` as pydicom RawDataElements.
    """
    count, pos = _elements(buf, pos, end, implicit, little, in_item=False, collect=collect)
    return count


def _elements(buf, pos: int, end: int, implicit: bool, little: bool, in_item: bool,
              collect: dict | None = None) -> tuple[int, int]:
    order = "<" if little else ">"
    count = 0
    head = struct.Struct(order + "HHI")
    explicit = struct.Struct(order + "HH2sH")
    long_length = struct.Struct(order + "I")
    while True:
        if pos >= end:
            if in_item:
                raise _Malformed("an item has no delimiter")
            return count, pos
        if end - pos < 8:
            raise _Malformed("an element header is cut off")
        group, elem, length = head.unpack_from(buf, pos)
        if group == 0xFFFE:
            if in_item and elem == _ITEM_END:
                return count, pos + 8
            raise _Malformed(f"unexpected delimiter (FFFE,{elem:04X})")
        vr = None
        if not implicit:
            _, _, vr, length = explicit.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise _Malformed("an element header is cut off")
                (length,) = long_length.unpack_from(buf, pos + 8)
                pos += 4
        pos += 8
        count += 1
        if length != _UNDEFINED:
            if length > end - pos:
                raise _Malformed(f"element ({group:04X},{elem:04X}) is longer than the data left")
            if collect is not None and (tag := group << 16 | elem) in _WANTED:
                collect[tag] = RawDataElement(BaseTag(tag), vr and vr.decode("ascii", "replace"), length,
                                              bytes(buf[pos:pos + length]), pos, implicit, little)
            pos += length
        elif (group, elem) == (0x7FE0, 0x0010) and vr in (b"OB", b"OW"):
            pos = _items(buf, pos, end, little, None)           # encapsulated fragments
        elif vr == b"UN":                                        # PS3.5 6.2.2: implicit VR LE inside
            pos = _items(buf, pos, end, True, True)
        elif implicit or vr == b"SQ":
            pos = _items(buf, pos, end, little, implicit)
        else:
            raise _Malformed(f"element ({group:04X},{elem:04X}) has an undefined length")


def _items(buf, pos: int, end: int, little: bool, implicit: bool | None) -> int:
    """Items up to the sequence delimiter; `implicit` None: fragments (no data sets inside)."""
    item = struct.Struct(("<" if little else ">") + "HHI")
    while True:
        if end - pos < 8:
            raise _Malformed("a sequence has no delimiter")
        group, elem, length = item.unpack_from(buf, pos)
        pos += 8
        if group != 0xFFFE or elem not in (_ITEM, _SEQUENCE_END):
            raise _Malformed(f"({group:04X},{elem:04X}) where an item was expected")
        if elem == _SEQUENCE_END:
            return pos
        if length == _UNDEFINED and implicit is not None:
            _, pos = _elements(buf, pos, end, implicit, little, in_item=True)
        elif length == _UNDEFINED or length > end - pos:
            raise _Malformed("an item is longer than the data left")
        else:
            pos += length


def _file_meta(buf) -> tuple[int, str]:
    """Where the data set starts (after the group 0002 elements) and its transfer syntax."""
    meta: dict = {}
    pos, end = 132, len(buf)
    while end - pos >= 8 and buf[pos:pos + 2] == b"\x02\x00":
        group, elem, vr, length = struct.unpack_from("<HH2sH", buf, pos)
        pos += 8
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        if length > end - pos:
            raise InvalidInstance("file meta information is truncated")
        tag = group << 16 | elem
        meta[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii", "replace"), length, bytes(buf[pos:pos + length]),
                                   pos, False, True)
        pos += length
    try:
        syntax = Dataset(meta).get("TransferSyntaxUID")
    except Exception as exc:
        raise InvalidInstance(f"file meta information cannot be read: {exc}") from None
    if not syntax:
        raise InvalidInstance("file meta information has no Transfer Syntax UID")
    return pos, str(syntax)


def dataset_offset(fh) -> int:
    """Where the data set starts in the open Part 10 file `fh` (after the file meta group)."""
    fh.seek(0)
    head = fh.read(132)
    if head[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 stream")
    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _file_meta(buf)[0]


def _inspect(buf, sop_class: str | None, sop_instance: str | None) -> InstanceHeader:
    offset, syntax = _file_meta(buf)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    data_set, start = buf, offset
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            data_set, start = zlib.decompressobj(-zlib.MAX_WBITS).decompress(buf[offset:]), 0
        except zlib.error as exc:
            raise InvalidInstance(f"deflated data set cannot be inflated: {exc}") from None
    raw: dict = {}
    try:
        count = check_structure(data_set, start, len(data_set), implicit, little, raw)
    except _Malformed as exc:
        raise InvalidInstance(f"data set is truncated or malformed: {exc}") from None
    if count == 0:
        raise InvalidInstance("data set is empty")
    values = _decode(raw)
    uids = {kw: values.get(kw) for kw in _UIDS}
    for keyword, value in uids.items():
        if value is _FAILED:
            raise InvalidInstance(f"{keyword} cannot be decoded")
        value = None if value is None else str(value)
        if not value:
            raise InvalidInstance(f"{keyword} is missing")
        if not valid_uid(value):
            raise InvalidInstance(f"{keyword} is not a valid UID (at most 64 digits and dots)")
        uids[keyword] = value
    if sop_class is not None and uids["SOPClassUID"] != sop_class:
        raise InvalidInstance("SOP Class UID in the data set differs from the request", "mismatch")
    if sop_instance is not None and uids["SOPInstanceUID"] != sop_instance:
        raise InvalidInstance("SOP Instance UID in the data set differs from the request", "mismatch")
    attrs = {kw: _text(values.get(kw)) for kw in _TEXT}
    attrs["SeriesNumber"] = _int(values.get("SeriesNumber"))
    attrs["InstanceNumber"] = _int(values.get("InstanceNumber"))
    return InstanceHeader(uids["SOPClassUID"], uids["SOPInstanceUID"], uids["StudyInstanceUID"],
                          uids["SeriesInstanceUID"], syntax, offset, attrs)
