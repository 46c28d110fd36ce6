"""Reading what the index needs from a received instance, without decoding its pixels.

`inspect()` walks the elements of the data set once (large values are skipped, not
read; sequences are walked into, to a bounded depth), checks that the data set is
complete, and returns the attributes that the index stores. It raises `InvalidInstance`
with a reason a peer can be told.

Nothing a data set merely claims is allocated before it is checked against `Limits`:
a deflated data set is inflated in bounded chunks into an unlinked temporary file (never
whole in memory) and refused past a size and a ratio; sequences nested deeper than a
limit are refused before any recursion gets deep; and `check_pixels()` compares the
pixel matrix a data set declares (and each JPEG / JPEG-LS / JPEG 2000 codestream's own
header) with a limit before a decoder allocates it. `read_dataset()` is pydicom's
reading of a stored file behind the same checks: every reader that hands a file to
pydicom (viewer, plug-ins) goes through it.
"""
from __future__ import annotations

import io
import mmap
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.charset import CODES_TO_ENCODINGS, convert_encodings, default_encoding, handled_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.multival import MultiValue
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from .matching import without_nul

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

_TEXT = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "AccessionNumber", "StudyDescription", "ReferringPhysicianName", "StudyID", "Modality",
         "SeriesDescription", "BodyPartExamined", "SpecificCharacterSet")
_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_IMAGE = ("Rows", "Columns", "BitsAllocated", "NumberOfFrames")    # what QIDO-RS returns of an instance
_IMAGE_TAGS = frozenset(tag_for_keyword(kw) for kw in _IMAGE)       # indexed when sound, never a refusal
_US_IMAGE = ("Rows", "Columns", "BitsAllocated")                     # US: 0-65535 whatever VR a file wrote
_WANTED = frozenset(tag_for_keyword(kw) for kw in _TEXT + _UIDS + _IMAGE + ("SeriesNumber", "InstanceNumber"))

# The longest value the index takes, per VR: its maximum length in characters (PS3.5 Table
# 6.2-1; PN: 64 per component group, three groups) times 4 bytes, the widest UTF-8 character,
# which also leaves room for ISO 2022 escape sequences and for writers that overrun the
# standard a little. A longer value is refused (it would be copied into memory, the index and
# every C-FIND match); values the index does not take are skipped, whatever their length.
_VR_MAX_CHARACTERS = {"CS": 16, "DA": 8, "IS": 12, "LO": 64, "PN": 3 * 64 + 2, "SH": 16, "TM": 14, "UI": 64,
                      "US": 16}   # US: 2 bytes a value; a longer image attribute is stored, not indexed
_MAX_VALUES = {"SpecificCharacterSet": 8}   # the collected attributes with more than one value
MAX_VALUE_BYTES = {tag: 4 * _VR_MAX_CHARACTERS[dictionary_VR(tag)] * _MAX_VALUES.get(keyword_for_tag(tag), 1)
                   for tag in _WANTED}


class InvalidInstance(ValueError):
    """The received data set cannot be stored. `status` is the DIMSE failure class."""

    def __init__(self, reason: str, status: str = "cannot-understand"):
        super().__init__(reason)
        self.status = status  # "cannot-understand" | "mismatch"


class PixelsTooLarge(InvalidInstance):
    """Decoding the pixel data would allocate more than `Limits.max_pixel_bytes`."""


INFLATE_RATIO_GRACE = 64 << 20   # the ratio limit applies once a data set has inflated past this
_INFLATE_CHUNK = 1 << 20         # inflated bytes held in memory at a time


@dataclass(frozen=True)
class Limits:
    """What a data set may make the node allocate or walk (the `[ingest]` settings).

    Real data sets stay far below every default: deflated ones rarely inflate more than
    a few times, sequences rarely nest past 6 levels.
    """
    max_inflated_bytes: int = 1 << 30     # a deflated data set inflates to at most this
    max_inflate_ratio: int = 100          # ... and, past INFLATE_RATIO_GRACE, to at most this many times its size
    max_sequence_depth: int = 32          # items inside items inside ...
    max_pixel_bytes: int = 1 << 30        # Rows x Columns x Frames x Samples x bytes per sample, decoded


DEFAULT_LIMITS = Limits()


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


def _encodings(raw: dict) -> list[str]:
    """The Python codecs of the data set's Specific Character Set (pydicom's default repertoire
    when it has none or it cannot be read)."""
    if 0x00080005 in raw:
        try:
            return convert_encodings(convert_raw_data_element(raw[0x00080005]).value or None)
        except Exception:
            pass
    return convert_encodings(None)


def _decodes_exactly(value: bytes, encodings: list[str]) -> bool:
    """Whether `value` decodes in its character set, strictly: no byte invalid in it, no
    replacement character (U+FFFD) in the result.

    pydicom replaces what it cannot decode (and logs a warning): two Patient IDs that
    differ only there (b"\\xffPAT", b"\\xfePAT" in UTF-8) would become one patient. Decoded
    here as pydicom does (PS3.5 6.1.2.5: a part that starts with an escape sequence in the
    character set it names), but without its fallbacks.
    """
    try:
        if b"\x1b" not in value:
            text = value.decode(encodings[0])
        else:
            text = "".join(_strict_fragment(part, encodings) for part in _ESCAPED_PARTS.findall(value))
    except LookupError:     # an unknown character set: pydicom reads it as ISO 8859-1, where every byte
        return b"\x1b" not in value                                              # is a character
    except (UnicodeError, ValueError):
        return False
    return "\ufffd" not in text


_ESCAPED_PARTS = re.compile(b"(^[^\x1b]+|[\x1b][^\x1b]*)")


def _strict_fragment(part: bytes, encodings: list[str]) -> str:
    if not part.startswith(b"\x1b"):
        return part.decode(encodings[0])
    length = 4 if part.startswith((b"\x1b$(", b"\x1b$)")) else 3
    encoding = CODES_TO_ENCODINGS.get(part[:length])
    if encoding is None or (encoding not in encodings and encoding != default_encoding):
        raise ValueError("an escape sequence to a character set the data set does not declare")
    return part.decode(encoding) if encoding in handled_encodings else part[length:].decode(encoding)


def _decode(raw: dict, encodings: list[str]) -> dict:
    """keyword -> converted value of the collected elements, in the data set's character set.

    Uses pydicom's element conversion directly: a Dataset would look up the Specific
    Character Set again for every element.
    """
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
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    if not text.isascii():   # lone surrogates (undecodable bytes) cannot be stored as UTF-8
        text = text.encode("utf-8", "replace").decode("utf-8")
    return without_nul(text) or None


def _int(value) -> int | None:
    """An IS value as an integer the index holds (IS's own range, PS3.5 6.2: -2^31 to 2^31 - 1, what an
    INTEGER column takes on either engine), else None: the instance is stored as it is, that number is not
    indexed (C-FIND answers it empty)."""
    try:
        number = None if value in (None, "", _FAILED) else int(value)
    except Exception:
        return None
    return number if number is None or -(1 << 31) <= number < 1 << 31 else None


def inspect(path: Path, expected_sop_class: str | None = None,
            expected_sop_instance: str | None = None, limits: Limits = DEFAULT_LIMITS) -> InstanceHeader:
    """Validate the Part 10 file at `path` (as written by the receiver) and read its header.

    A deflated data set is inflated into an unlinked temporary file next to `path` (the
    receiver's spool, inside the data directory): memory stays bounded whatever it claims.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size < 132 + 12:
            raise InvalidInstance("not a DICOM Part 10 stream")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[128:132] != b"DICM":
                raise InvalidInstance("not a DICOM Part 10 stream")
            return _inspect(buf, expected_sop_class, expected_sop_instance, limits, Path(path).parent)


def inspect_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS, spool: Path | None = None) -> InstanceHeader:
    """`inspect` of a Part 10 file held in memory (a deflated one is inflated into `spool`)."""
    if len(data) < 132 + 12 or data[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 stream")
    if spool is None and syntax_of(data) == DeflatedExplicitVRLittleEndian:
        raise ValueError("a deflated data set is inspected with a spool directory")
    return _inspect(data, None, None, limits, spool)


def read_dataset(path: Path, limits: Limits = DEFAULT_LIMITS, pixels: bool = False) -> Dataset:
    """pydicom's reading of the stored Part 10 file at `path`, after the checks of `inspect()`.

    pydicom inflates a deflated data set whole in memory and walks sequences recursively:
    the file is first inspected within `limits` (a deflate bomb or a data set nested too
    deep raises `InvalidInstance` before pydicom sees it), and with `pixels` the declared
    pixel matrix is checked too (`PixelsTooLarge`) before anyone decodes it.
    """
    inspect(Path(path), limits=limits)
    ds = dcmread(path, stop_before_pixels=not pixels)
    if pixels:
        check_pixels(ds, limits.max_pixel_bytes)
    return ds


class _Malformed(ValueError):
    pass


class _Refused(_Malformed):
    """Well-formed perhaps, but over a limit: the message is told as it is."""


# Explicit VR value representations with a 4-byte length (PS3.5 Table 7.1-1)
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD


def check_structure(buf, pos: int, end: int, implicit: bool, little: bool,
                    collect: dict | None = None, max_depth: int = DEFAULT_LIMITS.max_sequence_depth) -> int:
    """Walk every element header in `buf[pos:end]` without decoding values.

    Lengths must fit, sequences (of defined or undefined length) must hold items, undefined
    lengths and encapsulated pixel data must be closed by their delimiters (PS3.5 7.1, 7.5,
    A.4), and items may nest at most `max_depth` deep. Returns the number of top-level
    elements; raises `_Malformed` (`_Refused` past the depth). `buf` is any buffer (an mmap
    of the received file): a few struct reads per element, much cheaper than a full parse.
    The top-level elements whose tags are in `_WANTED` are put in `collect` as pydicom
    RawDataElements.
    """
    walker = _Walker(buf, little, max_depth)
    count, pos = walker.elements(pos, end, implicit, 0, False, collect)
    return count


class _Walker:
    """The element walk of one data set: recursion is bounded by `max_depth`."""

    def __init__(self, buf, little: bool, max_depth: int):
        order = "<" if little else ">"
        self.buf, self.little, self.max_depth = buf, little, max_depth
        self.head = struct.Struct(order + "HHI")
        self.explicit = struct.Struct(order + "HH2sH")
        self.long_length = struct.Struct(order + "I")

    def elements(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool,
                 collect: dict | None = None) -> tuple[int, int]:
        """Elements up to `end`, or (`in_item`) up to an item delimiter before it."""
        buf, head = self.buf, self.head
        count, previous = 0, -1
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
            tag = group << 16 | elem
            if tag <= previous:     # PS3.5 7.1: ascending, each once (readers disagree on which of two counts)
                raise _Refused(f"element ({group:04X},{elem:04X}) " + ("appears twice" if tag == previous else
                                                                     "is out of ascending tag order"))
            previous = tag
            vr = None
            if not implicit:
                _, _, vr, length = self.explicit.unpack_from(buf, pos)
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise _Malformed("an element header is cut off")
                    (length,) = self.long_length.unpack_from(buf, pos + 8)
                    pos += 4
            pos += 8
            count += 1
            if length != _UNDEFINED:
                if length > end - pos:
                    raise _Malformed(f"element ({group:04X},{elem:04X}) is longer than the data left")
                if collect is not None and tag in _WANTED:
                    if length > MAX_VALUE_BYTES[tag]:    # checked before a byte of it is copied
                        if tag not in _IMAGE_TAGS:       # an odd image size is not indexed, not refused
                            raise _Refused(f"{keyword_for_tag(tag)} longer than {MAX_VALUE_BYTES[tag]} bytes")
                    else:
                        collect[tag] = RawDataElement(BaseTag(tag), vr and vr.decode("ascii", "replace"), length,
                                                      bytes(buf[pos:pos + length]), pos, implicit, self.little)
                if length >= 8 and _is_sequence(vr, group, elem, implicit):
                    try:                         # walked for its depth; bounded by its length either way
                        self.items(pos, pos + length, implicit, depth, defined=True)
                    except _Refused:
                        raise
                    except _Malformed:           # tolerant when reading, as pydicom is (implicit VR items
                        pass                     # in an explicit VR file): its length alone was checked
                pos += length
            elif (group, elem) == (0x7FE0, 0x0010) and vr in (b"OB", b"OW"):
                pos = self.items(pos, end, None, depth)              # encapsulated fragments
            elif vr == b"UN":                                        # PS3.5 6.2.2: implicit VR LE inside
                inside = self if self.little else _Walker(buf, True, self.max_depth)
                pos = inside.items(pos, end, True, depth)
            elif implicit or vr == b"SQ":
                pos = self.items(pos, end, implicit, depth)
            else:
                raise _Malformed(f"element ({group:04X},{elem:04X}) has an undefined length")

    def items(self, pos: int, end: int, implicit: bool | None, depth: int, defined: bool = False) -> int:
        """Items up to the sequence delimiter, or (`defined`) exactly up to `end`.

        `implicit` None: fragments (no data sets inside).
        """
        buf, head = self.buf, self.head
        while True:
            if defined and pos == end:
                return pos
            if end - pos < 8:
                raise _Malformed("a sequence has no delimiter")
            group, elem, length = head.unpack_from(buf, pos)
            pos += 8
            if group != 0xFFFE or elem not in (_ITEM, _SEQUENCE_END):
                raise _Malformed(f"({group:04X},{elem:04X}) where an item was expected")
            if elem == _SEQUENCE_END:
                if defined:
                    raise _Malformed("a sequence delimiter in a sequence of defined length")
                return pos
            if implicit is not None:
                if depth >= self.max_depth:
                    raise _Refused(f"sequences nested deeper than {self.max_depth} (ingest.max_sequence_depth)")
                if length == _UNDEFINED:
                    _, pos = self.elements(pos, end, implicit, depth + 1, True)
                    continue
                if length > end - pos:
                    raise _Malformed("an item is longer than the data left")
                self.elements(pos, pos + length, implicit, depth + 1, False)
                pos += length
            elif length == _UNDEFINED or length > end - pos:
                raise _Malformed("an item is longer than the data left")
            else:
                pos += length


def _is_sequence(vr: bytes | None, group: int, elem: int, implicit: bool) -> bool:
    """Whether a value of defined length holds items: explicit SQ, or implicit and SQ in the dictionary."""
    if not implicit:
        return vr == b"SQ"
    try:
        return dictionary_VR(group << 16 | elem) == "SQ"
    except KeyError:
        return False


_TRANSFER_SYNTAX = 0x00020010


def _file_meta(buf, read_syntax: bool = True) -> tuple[int, str]:
    """Where the data set starts (after the group 0002 elements) and its transfer syntax.

    Only the Transfer Syntax UID is read (the other elements are skipped, whatever their
    length); the elements must come in ascending order, each once: a data set that starts
    with group 0002 elements of its own (a second Transfer Syntax UID) is refused.
    """
    meta: dict = {}
    pos, end, previous = 132, len(buf), -1
    while end - pos >= 8 and buf[pos:pos + 2] == b"\x02\x00":
        group, elem, vr, length = struct.unpack_from("<HH2sH", buf, pos)
        pos += 8
        if vr in _LONG_VRS:
            if end - pos < 4:
                raise InvalidInstance("file meta information is truncated")
            (length,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        if length > end - pos:
            raise InvalidInstance("file meta information is truncated")
        tag = group << 16 | elem
        if tag <= previous:
            raise InvalidInstance(f"file meta element (0002,{elem:04X}) repeated or out of order")
        previous = tag
        if tag == _TRANSFER_SYNTAX and read_syntax:
            if length > MAX_VALUE_BYTES[0x00080016]:       # a UID's limit, as SOP Class UID's
                raise InvalidInstance("file meta information: Transfer Syntax UID too long")
            meta[tag] = RawDataElement(BaseTag(tag), vr.decode("ascii", "replace"), length,
                                       bytes(buf[pos:pos + length]), pos, False, True)
        pos += length
    if not read_syntax:                 # only where the data set starts (its SHA-256)
        return pos, ""
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
        return _file_meta(buf, read_syntax=False)[0]


def dataset_offset_of(data: bytes) -> int:
    """`dataset_offset` of a Part 10 file held in memory."""
    if data[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 stream")
    return _file_meta(data, read_syntax=False)[0]


def syntax_of(data: bytes) -> str:
    """The Transfer Syntax UID of a Part 10 file held in memory."""
    if data[128:132] != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 stream")
    return _file_meta(data)[1]


def _inflate(buf, offset: int, limits: Limits, out) -> int:
    """Inflate `buf[offset:]` into the file `out`, a chunk at a time; returns the inflated size.

    Refused past `limits.max_inflated_bytes`, or past `max_inflate_ratio` times the
    deflated size once more than INFLATE_RATIO_GRACE came out (a deflate bomb stops there).
    """
    deflated = len(buf) - offset
    ceiling = min(limits.max_inflated_bytes, max(INFLATE_RATIO_GRACE, limits.max_inflate_ratio * deflated))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for start in range(offset, len(buf), _INFLATE_CHUNK):
        data = buf[start:start + _INFLATE_CHUNK]   # a copy: no view of the mmap outlives an error
        while data:
            try:
                chunk = inflater.decompress(data, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise InvalidInstance(f"deflated data set cannot be inflated: {exc}") from None
            total += len(chunk)
            if total > ceiling:
                raise InvalidInstance(_too_deflated(ceiling, limits))
            out.write(chunk)
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
        if inflater.eof:
            break
    if not inflater.eof:
        raise InvalidInstance("deflated data set is cut off (the deflate stream does not end)")
    return total


def _too_deflated(ceiling: int, limits: Limits) -> str:
    """The reason, whole in a DIMSE Error Comment (64 characters)."""
    if ceiling >= limits.max_inflated_bytes:
        return f"inflated data set over {limits.max_inflated_bytes >> 20} MiB (ingest.max_inflated_bytes)"
    return f"deflated data set inflates over {limits.max_inflate_ratio}x (ingest.max_inflate_ratio)"


@contextmanager
def undeflated(path: Path, limits: Limits = DEFAULT_LIMITS) -> Iterator[Path]:
    """The stored file as a reader may hand it to pydicom: `path`, checked (`inspect`: structure,
    nesting), or for a deflated data set an inflated copy next to it in Explicit VR Little Endian,
    made a MiB at a time within the `[ingest]` limits: pydicom would inflate it whole in memory (and
    keep the deflated bytes too). The copy is removed when the block ends."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        inspect(path, limits=limits)
        yield path
        return
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=path.parent)
    plain = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
            head = io.BytesIO()
            write_file_meta_info(head, meta, enforce_standard=False)
            out.write(b"\0" * 128 + b"DICM" + head.getvalue())
            offset = dataset_offset(source)
            with mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _inflate(buf, offset, limits, out)
        inspect(plain, limits=limits)
        yield plain
    finally:
        plain.unlink(missing_ok=True)


def _inspect(buf, sop_class: str | None, sop_instance: str | None, limits: Limits = DEFAULT_LIMITS,
             spool: Path | None = None) -> InstanceHeader:
    offset, syntax = _file_meta(buf)
    if syntax != DeflatedExplicitVRLittleEndian:
        return _header(buf, offset, syntax, sop_class, sop_instance, limits)
    with tempfile.TemporaryFile(dir=spool) as inflated:     # unlinked: nothing is left behind
        if _inflate(buf, offset, limits, inflated) == 0:
            raise InvalidInstance("data set is empty")
        inflated.flush()
        with mmap.mmap(inflated.fileno(), 0, access=mmap.ACCESS_READ) as data_set:
            header = _header(data_set, 0, syntax, sop_class, sop_instance, limits)
    return InstanceHeader(header.sop_class_uid, header.sop_instance_uid, header.study_uid, header.series_uid,
                          syntax, offset, header.attrs)


def _header(data_set, start: int, syntax: str, sop_class: str | None, sop_instance: str | None,
            limits: Limits) -> InstanceHeader:
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    raw: dict = {}
    try:
        count = check_structure(data_set, start, len(data_set), implicit, little, raw, limits.max_sequence_depth)
    except _Refused as exc:
        raise InvalidInstance(str(exc)) from None
    except _Malformed as exc:
        raise InvalidInstance(f"data set is truncated or malformed: {exc}") from None
    if count == 0:
        raise InvalidInstance("data set is empty")
    encodings = _encodings(raw)
    patient_id = raw.get(0x00100020)
    if patient_id is not None and not _decodes_exactly(patient_id.value, encodings):
        # refused, not filed: an ID read with replacement characters would be another
        # patient's ID too, and no query could name it
        raise InvalidInstance("PatientID is not valid in the Specific Character Set")
    values = _decode(raw, encodings)
    if values.get("PatientID") is _FAILED:
        raise InvalidInstance("PatientID cannot be decoded")
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
    for keyword in _IMAGE:
        number = _int(values.get(keyword))
        attrs[keyword] = None if keyword in _US_IMAGE and number is not None and not 0 <= number <= 0xFFFF else number
    return InstanceHeader(uids["SOPClassUID"], uids["SOPInstanceUID"], uids["StudyInstanceUID"],
                          uids["SeriesInstanceUID"], syntax, start, attrs)


# -- pixel data: what decoding would allocate ----------------------------------------------------

_ENCAPSULATED_CHECKED = 1 << 16    # bytes of a fragment's start read for a codestream header


def check_pixels(ds: Dataset, max_pixel_bytes: int) -> None:
    """Refuse (`PixelsTooLarge`) pixel data whose decoding would allocate more than `max_pixel_bytes`.

    The decoded size is what the data set declares: Rows x Columns x Number of Frames x
    Samples per Pixel x whole bytes per sample (Bits Allocated). Compressed pixel data
    (JPEG 2000, JPEG-LS, JPEG: each frame's codestream carries its own size, which is
    what the decoder allocates) must not be larger than that declaration either.
    A data set without pixel data passes.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    frames, samples = _int(ds.get("NumberOfFrames", 1)), _int(ds.get("SamplesPerPixel", 1))
    bits = _int(ds.get("BitsAllocated", 8))
    if not rows or not columns or rows < 0 or columns < 0:
        raise PixelsTooLarge("the pixel data has no valid Rows and Columns")
    frames, samples, bits = max(frames or 1, 1), max(samples or 1, 1), max(bits or 8, 1)
    frame_bytes = rows * columns * samples * ((bits + 7) // 8)
    declared = frame_bytes * frames
    if declared > max_pixel_bytes:
        raise PixelsTooLarge(f"the pixel data declares {_size(declared)} decoded, over {_size(max_pixel_bytes)} "
                             "(ingest.max_pixel_bytes)")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    for header in _codestream_headers(ds.PixelData, syntax.is_little_endian):
        size = _codestream_size(header)
        if size is None:
            continue
        height, width, components, precision = size
        if height > rows or width > columns or components > samples:
            raise PixelsTooLarge(f"a compressed frame is {width} x {height} x {components}, larger than the "
                                 f"declared {columns} x {rows} x {samples}")
        if height * width * components * ((precision + 7) // 8) > max(frame_bytes, 1) * 2:
            raise PixelsTooLarge("a compressed frame decodes to more than the declared frame size")


def _size(count: int) -> str:
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.1f} MiB"


def _codestream_headers(pixel_data: bytes, little: bool = True):
    """The start of each fragment of encapsulated pixel data (after the Basic Offset Table)."""
    item = struct.Struct("<HHI" if little else ">HHI")
    pos, end, first = 0, len(pixel_data), True
    with memoryview(pixel_data) as view:
        while end - pos >= 8:
            group, elem, length = item.unpack_from(view, pos)
            pos += 8
            if group != 0xFFFE or elem != _ITEM or length == _UNDEFINED:
                return
            if not first:
                yield bytes(view[pos:pos + min(length, _ENCAPSULATED_CHECKED)])
            first = False
            pos += length


def _codestream_size(data: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, components, precision) from a JPEG / JPEG-LS SOF or a JPEG 2000 SIZ
    marker at the start of `data`; None when it is no codestream start (a continuation)."""
    try:
        if data[:2] == b"\xff\xd8":                               # JPEG, JPEG-LS: SOI, segments, SOFn
            pos = 2
            while pos + 4 <= len(data):
                marker = data[pos + 1]
                if data[pos] != 0xFF:
                    return None
                if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
                    precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
                    return height, width, components, precision
                (length,) = struct.unpack_from(">H", data, pos + 2)
                pos += 2 + length
            return None
        pos = 0
        if data[:8] == b"\x00\x00\x00\x0cjP  ":                  # a JP2 file: boxes up to the codestream
            pos = 12
            while pos + 8 <= len(data) and data[pos + 4:pos + 8] != b"jp2c":
                (length,) = struct.unpack_from(">I", data, pos)
                if length < 8:
                    return None
                pos += length
            pos += 8
        if data[pos:pos + 4] == b"\xff\x4f\xff\x51":              # JPEG 2000: SOC, SIZ
            xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, pos + 8)
            (components,) = struct.unpack_from(">H", data, pos + 40)
            precision = (data[pos + 42] & 0x7F) + 1
            return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0), components, precision
    except (struct.error, IndexError):
        return None
    return None
