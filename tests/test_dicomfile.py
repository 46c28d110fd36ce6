"""`archive.dicomfile.inspect` against pydicom, over every Part 10 file shipped offline."""
from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest

from archive.dicomfile import InvalidInstance, _TEXT, inspect
from helpers import _PYDICOM_FILES, _pydicom_data_dir, data_file

CHARSET_FILES = _PYDICOM_FILES.parent / "charset_files"
# Files pydicom reads lazily although they are cut short: the node refuses them, rightly.
KNOWN_BROKEN = {"emri_small_jpeg_2k_lossless_too_short.dcm", "MR_truncated.dcm", "SC_rgb_jpeg.dcm",
                "rtplan_truncated.dcm"}


def part10_files() -> list[Path]:
    roots = [r for r in (_PYDICOM_FILES, CHARSET_FILES, _pydicom_data_dir()) if r]
    files = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.stat().st_size < 8_000_000:
                with open(path, "rb") as fh:
                    if fh.read(132)[128:] == b"DICM":
                        files.append(path)
    return files


def _pydicom_reads(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            list(ds.iterall())
        return ds
    except Exception:
        return None


def test_inspect_agrees_with_pydicom_on_every_shipped_file():
    files = part10_files()
    assert len(files) > 150, "pydicom-data is not installed"
    checked = 0
    for path in files:
        ds = _pydicom_reads(path)
        try:
            header = inspect(path)
        except InvalidInstance as exc:
            if ds is None or path.name in KNOWN_BROKEN:
                continue
            uids = [ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
            assert "UID" in str(exc) and not all(uids) or "valid UID" in str(exc), f"{path.name}: {exc}"
            continue
        assert ds is not None and path.name not in KNOWN_BROKEN, f"{path.name} accepted but broken"
        assert header.sop_instance_uid == ds.SOPInstanceUID and header.series_uid == ds.SeriesInstanceUID
        assert header.transfer_syntax == ds.file_meta.TransferSyntaxUID
        for keyword in _TEXT:
            value = ds.get(keyword)
            expected = None if value in (None, "") else (
                "\\".join(map(str, value)) if isinstance(value, pydicom.multival.MultiValue) else str(value))
            assert header.attrs[keyword] == expected, f"{path.name} {keyword}"
        checked += 1
    assert checked > 150


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "image_dfl.dcm", "rtplan.dcm"])
def test_cut_inside_an_element_is_refused(name, tmp_path):
    data = data_file(name).read_bytes()
    inspect(data_file(name))
    header_end = data.index(b"DICM") + 200
    refused = 0
    for cut in range(len(data) - 1, header_end, -max(1, (len(data) - header_end) // 40)):
        path = tmp_path / "cut.dcm"
        path.write_bytes(data[:cut])
        try:
            inspect(path)
        except InvalidInstance:
            refused += 1
    assert refused >= 35, f"only {refused} of ~40 cuts refused"


def test_non_ascii_names_are_decoded_in_their_character_set():
    for name in ("chrH31.dcm", "chrX1.dcm", "chrRuss.dcm", "chrGreek.dcm", "chrJapMulti.dcm"):
        path = CHARSET_FILES / name
        assert inspect(path).attrs["PatientName"] == str(pydicom.dcmread(path).PatientName), name
