"""DICOM JSON (PS3.18 F.2) of a data set read by pydicom, written from its raw elements.

pydicom's `Dataset.to_json_dict` converts every element to its Python value first (and stores it
back in the data set): ~15 ms for a CT slice of 280 elements, so 9 s for the metadata of a
600-slice series that OHIF asks for when it opens a study. Here the common elements (explicit or
dictionary VR, text in ASCII, numbers, small binary values) are written straight from their bytes
as pydicom would write them; any other element (a sequence, a name with several groups, a text with
another character set, a number pydicom would refuse, an ambiguous VR ...) is handed to pydicom
itself, one element at a time. tests/test_dicomjson.py compares the two on every element of every
test file of pydicom and of this project, and on generated values: the same JSON as pydicom's
`to_json_dict()` when it reads values leniently (as it does by default; with suppress_invalid_tags it
reads strictly and drops a value it finds invalid, such as an IS of "1.0" or an LO over 64
characters, which is kept here), except that NaN and infinities are null (JSON has no such numbers).
"""
from __future__ import annotations

import base64
import math
import re
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# how pydicom removes the padding of text values (tests/test_dicomjson.py holds it to that)
_WHOLE = {"LT", "ST", "UT", "UR"}                                 # not split on backslashes
_EACH_RSTRIP = {"LO", "SH", "UC"}                                 # split, then each value right-stripped
_RSTRIP_SPLIT = {"AS", "CS", "DA", "DT", "TM", "UI", "PN", "IS", "DS"}   # right-stripped, then split
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_BINARY = {"OB", "OW", "OF", "OD", "OL", "OV"}
_SIZES = {"H": 2, "h": 2, "I": 4, "i": 4, "f": 4, "d": 8, "Q": 8, "q": 8}


def to_json_dict(ds: Dataset) -> dict[str, dict]:
    """{tag as 8 hex digits: element} as `ds.to_json_dict(suppress_invalid_tags=True)` gives it."""
    little = ds.is_little_endian if ds.is_little_endian is not None else True
    out: dict[str, dict] = {}
    for tag, raw in list(ds.items()):              # as read: RawDataElements, nothing converted
        element = _fast(raw) if little and isinstance(raw, RawDataElement) else None
        if element is None:
            try:
                element = ds[tag].to_json_dict(None, 0)
            except Exception:                 # as pydicom's suppress_invalid_tags: the element is left out
                continue
        out[f"{int(tag):08X}"] = _finite(element)
    return out


def _finite(element: dict) -> dict:
    """NaN and infinities (an FD, FL or DS may hold them) as null: JSON has no such numbers, and one of them
    makes a browser's JSON.parse refuse a whole study's metadata (pydicom would write NaN)."""
    values = element.get("Value")
    if values and element.get("vr") in ("FD", "FL", "DS", "OD", "OF"):
        element["Value"] = [v if not isinstance(v, float) or math.isfinite(v) else None for v in values]
    elif values and element.get("vr") == "SQ":
        for item in values:
            for key, nested in item.items():
                item[key] = _finite(nested)
    return element


def _vr(raw: RawDataElement) -> str | None:
    if raw.VR:
        return raw.VR
    if raw.tag >> 16 & 1 or raw.tag & 0xFFFF == 0:     # private, or a group length: pydicom knows better
        return None
    try:
        vr = dictionary_VR(raw.tag)
    except KeyError:
        return None
    return vr if " " not in vr else None               # "US or SS": decided by pydicom from the data set


def _fast(raw: RawDataElement) -> dict | None:
    """The element as pydicom writes it, or None when pydicom must say (see the module's docstring)."""
    vr = _vr(raw)
    if vr is None or vr == "UN" or raw.value is None:      # UN: pydicom may know the VR after all
        return None
    data = raw.value
    if not data:
        return {"vr": vr} if vr != "SQ" else None
    if vr in _NUMBERS:
        code = _NUMBERS[vr]
        if len(data) % _SIZES[code]:
            return None
        values = list(struct.unpack(f"<{len(data) // _SIZES[code]}{code}", data))
        if code in "fd" and not all(map(math.isfinite, values)):
            return None
        return {"vr": vr, "Value": values}
    if vr in _BINARY:
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode()}
    if vr == "AT":
        if len(data) % 4:
            return None
        pairs = struct.unpack(f"<{len(data) // 2}H", data)
        return {"vr": vr, "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)]}
    if not data.isascii() or b"\x1b" in data:
        return None                                    # another character set: pydicom's
    if b"\x00" in data and (vr in ("AE", "UR") or b"\x00" in data.rstrip(b" \x00")):
        return None                                    # a NUL that is not trailing padding
    text = data.decode("ascii")
    if vr in _WHOLE:                                   # one value, backslashes and all
        value = text.rstrip(" ") if vr == "UR" else text.rstrip(" \x00")
        return {"vr": vr, "Value": [value]} if value else {"vr": vr}
    if vr in _EACH_RSTRIP:
        items = [item.rstrip(" \x00") for item in text.split("\\")]
    elif vr == "AE":
        items = [item.strip(" ") for item in text.split("\\")]
    elif vr in _RSTRIP_SPLIT:
        items = text.rstrip(" \x00").split("\\")
        if vr == "UI":
            items = [item.strip(" ") for item in items]
    else:
        return None
    if items == [""]:
        return {"vr": vr}
    if vr in ("IS", "DS"):
        return _numbers(vr, items)
    if vr == "PN":
        if len(items) > 1 or "=" in items[0]:
            return None
        return {"vr": vr, "Value": [{"Alphabetic": items[0]}]}
    return {"vr": vr, "Value": items}


def _numbers(vr: str, items: list[str]) -> dict | None:
    """IS and DS values as numbers; None (pydicom's to say, or refuse) for anything but plain decimals."""
    items = [item.strip(" ") for item in items]
    if not all((_INTEGER if vr == "IS" else _DECIMAL).fullmatch(item) for item in items):
        return None
    values = [int(item) for item in items] if vr == "IS" else [float(item) for item in items]
    if vr == "DS" and not all(map(math.isfinite, values)) or vr == "IS" and not all(
            -(2 ** 31) <= v < 2 ** 31 for v in values):
        return None
    return {"vr": vr, "Value": values}
