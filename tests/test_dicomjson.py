"""viewer/dicomjson.py writes the DICOM JSON of WADO-RS metadata from raw elements: it must be pydicom's
`to_json_dict`, element for element, on every test file there is and on generated values."""
from __future__ import annotations

import io
import json
import logging
import math
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, strategies as st
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from helpers import _pydicom_data_dir
from viewer.dicomjson import to_json_dict


def _files() -> list[str]:
    extra = _pydicom_data_dir()
    return sorted(get_testdata_files("*")) + sorted(str(p) for p in (extra.glob("*.dcm") if extra else ()))


def _pydicoms(read) -> dict:
    """pydicom's JSON: whole when it can, else with its suppress_invalid_tags (which drops more than the
    invalid element: a whole sequence around it)."""
    try:
        return read().to_json_dict()
    except Exception:
        return read().to_json_dict(suppress_invalid_tags=True)


def _nulled(value):
    """pydicom's JSON with NaN and infinities as null (JSON has none; dicomjson writes null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulled(v) for v in value]
    return value


def _same_as_pydicom(data: bytes) -> None:
    def read() -> Dataset:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)

    ours, theirs = to_json_dict(read()), _nulled(_pydicoms(read))
    for key in theirs:
        assert ours.get(key) == theirs[key], key
    for key in set(ours) - set(theirs):        # only where pydicom's suppressing dropped more than it had to
        assert ours[key] == _nulled(read()[int(key, 16)].to_json_dict(None, 0)), key


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        yield
        logging.disable(logging.NOTSET)


def test_every_test_file_is_written_as_pydicom_writes_it():
    checked = 0
    for name in _files():
        if not Path(name).is_file():
            continue
        data = Path(name).read_bytes()
        try:
            pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception:
            continue
        _same_as_pydicom(data)
        checked += 1
    assert checked > 100


TEXT = st.text(st.sampled_from("AZaz09 .^\\-_=*+e\x00"), max_size=24)
STRING_VRS = {"AE": 0x00400001, "AS": 0x00101010, "CS": 0x00080060, "DA": 0x00080020, "DS": 0x00280030,
              "DT": 0x0008002A, "IS": 0x00200013, "LO": 0x00081030, "LT": 0x00204000, "PN": 0x00100010,
              "SH": 0x00080050, "ST": 0x00081040, "TM": 0x00080030, "UC": 0x00081084, "UI": 0x00080018,
              "UR": 0x00081190, "UT": 0x00180027}


LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _part10(elements: list[tuple[int, str, bytes]], implicit: bool) -> bytes:
    """A Part 10 file of these elements' bytes exactly as given (pydicom's writer would validate and pad)."""
    meta = Dataset()
    meta.file_meta = FileMetaDataset()
    meta.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.file_meta.MediaStorageSOPClassUID, meta.file_meta.MediaStorageSOPInstanceUID = "1.2.3", "1.2.3.4"
    out = io.BytesIO()
    meta.save_as(out, enforce_file_format=True)
    for tag, vr, value in sorted(elements):
        out.write(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
        if implicit:
            out.write(struct.pack("<I", len(value)))
        elif vr in LONG:
            out.write(vr.encode() + b"\0\0" + struct.pack("<I", len(value)))
        else:
            out.write(vr.encode() + struct.pack("<H", len(value)))
        out.write(value)
    return out.getvalue()


@given(values=st.fixed_dictionaries({vr: TEXT for vr in STRING_VRS}),
       numbers=st.lists(st.integers(0, 65535), max_size=4), implicit=st.booleans())
def test_generated_values_are_written_as_pydicom_writes_them(values, numbers, implicit):
    """Padding, backslashes, empty values, numbers that are not numbers: whatever the bytes, the same JSON
    (or the element handed to pydicom)."""
    elements = [(STRING_VRS[vr], vr, text.encode()) for vr, text in values.items()]
    if numbers:
        elements += [(0x00280010, "US", struct.pack("<H", numbers[0])),
                     (0x00280106, "US", struct.pack(f"<{len(numbers)}H", *numbers))]
    _same_as_pydicom(_part10(elements, implicit))


def test_nan_and_infinities_are_null_and_the_json_strict():
    """The attack pass: one FD of NaN or a DS of 1e400 made a whole study's metadata answer invalid JSON
    (NaN, Infinity), which browsers' JSON.parse, and so OHIF, refuse."""
    data = _part10([(0x00189087, "FD", struct.pack("<2d", float("nan"), 2.5)), (0x00180050, "DS", b"1e400 "),
                    (0x00281050, "DS", b"40\\-inf"), (0x00189089, "FL", struct.pack("<f", float("inf")))], False)
    out = to_json_dict(pydicom.dcmread(io.BytesIO(data), force=True))
    assert out["00189087"]["Value"] == [None, 2.5] and out["00180050"]["Value"] == [None]
    assert out["00281050"]["Value"] == [40.0, None] and out["00189089"]["Value"] == [None]
    json.dumps(out, allow_nan=False)
