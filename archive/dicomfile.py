"""Reading what the index needs from a received instance, without decoding its pixels.

`inspect()` walks the top-level elements of the data set once (large values are
skipped, not read), checks that the data set is complete, and returns the attributes
that the index stores. It raises `InvalidInstance` with a reason a peer can be told.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.filereader import data_element_generator, read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LAST_INDEXED_TAG = 0x00200013  # InstanceNumber: everything the index needs lies below it

_TEXT = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "StudyID", "Modality",
         "SeriesDescription", "BodyPartExamined", "SpecificCharacterSet")


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


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed descriptive value is not a reason to refuse the image
        return None
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:
        return None


def inspect(path: Path, expected_sop_class: str | None = None,
            expected_sop_instance: str | None = None) -> InstanceHeader:
    """Validate the Part 10 file at `path` (as written by the receiver) and read its header."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(128)
        if fh.read(4) != b"DICM":
            raise InvalidInstance("not a DICOM Part 10 stream")
        try:
            meta = read_file_meta_info(path)
        except Exception as exc:
            raise InvalidInstance(f"file meta information cannot be read: {exc}") from None
        offset = 132 + 12 + int(meta[0x00020000].value)
        syntax = str(meta.get("TransferSyntaxUID", ""))
        fh.seek(offset)
        return _walk(fh, size, offset, syntax, expected_sop_class, expected_sop_instance)


def _walk(fh: BinaryIO, size: int, offset: int, syntax: str, sop_class: str | None,
          sop_instance: str | None) -> InstanceHeader:
    stream: BinaryIO = fh
    end = size
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            stream = BytesIO(zlib.decompress(fh.read(), -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise InvalidInstance(f"deflated data set cannot be inflated: {exc}") from None
        end = len(stream.getbuffer())
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    start = stream.tell()
    raw = {}
    count = 0
    try:
        for elem in data_element_generator(stream, implicit, little, defer_size=256):
            count += 1
            if elem.tag <= _LAST_INDEXED_TAG:
                raw[elem.tag] = elem
    except Exception as exc:
        raise InvalidInstance(f"data set cannot be parsed: {exc}") from None
    if count == 0:
        raise InvalidInstance("data set is empty")
    if stream.tell() != end:
        raise InvalidInstance(f"data set is truncated or has trailing garbage "
                              f"(parsed {stream.tell() - start} of {end - start} bytes)")
    ds = Dataset(raw)
    ds.set_original_encoding(implicit, little)
    try:
        uids = {kw: ds.get(kw) for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                          "SeriesInstanceUID")}
    except Exception as exc:
        raise InvalidInstance(f"UIDs cannot be decoded: {exc}") from None
    for keyword, value in uids.items():
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
    attrs = {kw: _text(ds, kw) for kw in _TEXT}
    attrs["SeriesNumber"] = _int(ds, "SeriesNumber")
    attrs["InstanceNumber"] = _int(ds, "InstanceNumber")
    return InstanceHeader(uids["SOPClassUID"], uids["SOPInstanceUID"], uids["StudyInstanceUID"],
                          uids["SeriesInstanceUID"], syntax, offset, attrs)
