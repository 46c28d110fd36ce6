"""`archive.dicomfile.inspect` against pydicom, over every Part 10 file shipped offline."""
from __future__ import annotations

import struct
import tracemalloc
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage

from archive.dicomfile import MAX_VALUE_BYTES, InvalidInstance, _IMAGE, _TEXT, inspect
from helpers import _PYDICOM_FILES, _pydicom_data_dir, data_file
from test_hostile_data import element, item, part10, text_value, uid_value

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
        for keyword in _IMAGE:                      # numbers: any byte order, explicit or implicit VR
            value = ds.get(keyword)
            try:
                expected = None if value in (None, "") else int(value)
            except (TypeError, ValueError):         # a list of values: not indexed
                expected = None
            assert header.attrs[keyword] == expected, f"{path.name} {keyword}"
        checked += 1
    assert checked > 150


def test_an_image_size_the_index_cannot_take_is_stored_not_indexed(tmp_path):
    """Rows, Columns, Bits Allocated and Number of Frames are indexed for QIDO-RS; an odd value (33 values, a
    VR of 4 bytes, a number out of range) was never a reason to refuse an image and is not one now."""
    from pydicom.dataelem import DataElement

    for keyword, vr, value in (("Rows", "US", list(range(33))), ("Columns", "UL", 70000), ("BitsAllocated", "SS", -1),
                               ("NumberOfFrames", "IS", "99999999999")):
        ds = pydicom.dcmread(data_file("CT_small.dcm"))
        ds[keyword] = DataElement(ds[keyword].tag if keyword in ds else 0x00280008, vr, value)
        path = tmp_path / f"{keyword}.dcm"
        ds.save_as(path, enforce_file_format=True)
        header = inspect(path)
        assert header.attrs[keyword] is None, keyword
        assert header.attrs["Rows" if keyword != "Rows" else "Columns"] == 128


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


# -- issue 14, second round: identifying values, value lengths, element order -----------------------

def data_set(uid: str, patient_id: bytes = b"PID1", charset: bytes | None = None, name: bytes = b"Doe^Jane",
             extra: bytes = b"") -> bytes:
    """An explicit VR LE data set in ascending tag order; `extra` goes after (0010,0020)."""
    return ((element(0x00080005, b"CS", charset) if charset is not None else b"")
            + element(0x00080016, b"UI", uid_value(CTImageStorage)) + element(0x00080018, b"UI", uid_value(uid))
            + element(0x00100010, b"PN", name + b" " * (len(name) % 2))
            + element(0x00100020, b"LO", patient_id + b" " * (len(patient_id) % 2)) + extra
            + element(0x0020000D, b"UI", uid_value(generate_uid()))
            + element(0x0020000E, b"UI", uid_value(generate_uid())))


def written(tmp_path, data: bytes, uid: str, syntax: str | None = None) -> Path:
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(part10(data, uid, syntax) if syntax else part10(data, uid))
    return path


def test_a_patient_id_not_valid_in_its_character_set_is_refused_never_read_with_replacements(tmp_path):
    uid = generate_uid()
    for raw in (b"\xffPAT", b"\xfePAT", b"P\xc3AT", b"\xef\xbf\xbdPAT"):   # invalid UTF-8; U+FFFD itself
        with pytest.raises(InvalidInstance, match=r"^PatientID is not valid in the Specific Character Set$"):
            inspect(written(tmp_path, data_set(uid, raw, b"ISO_IR 192"), uid))
    # in a character set where every byte is a character, the two IDs are two patients
    ids = {inspect(written(tmp_path, data_set(uid, raw, charset), uid)).attrs["PatientID"]
           for raw in (b"\xffPAT", b"\xfePAT") for charset in (b"ISO_IR 100", None)}
    assert ids == {"\xffPAT", "\xfePAT"}
    utf8 = inspect(written(tmp_path, data_set(uid, "Ž-PAT".encode(), b"ISO_IR 192"), uid))
    assert utf8.attrs["PatientID"] == "Ž-PAT"
    # ISO 2022 code extensions: valid JIS X 0208 passes, a broken escape sequence does not
    jis = "\x1b$B" + "\x3b\x33\x45\x44" + "\x1b(B"
    header = inspect(written(tmp_path, data_set(uid, jis.encode("latin-1"), b"\\ISO 2022 IR 87"), uid))
    assert header.attrs["PatientID"] == "山田"
    with pytest.raises(InvalidInstance, match="PatientID is not valid"):
        inspect(written(tmp_path, data_set(uid, b"\x1b$B\xff\xff\x1b(B", b"\\ISO 2022 IR 87"), uid))
    # the UIDs were already exact: a byte outside digits and dots is refused
    with pytest.raises(InvalidInstance, match="SOPInstanceUID is not a valid UID"):
        inspect(written(tmp_path, data_set("1.2.3").replace(uid_value("1.2.3"), b"1.2\xff3\0"), "1.2.3"))


def test_each_value_the_index_takes_is_capped_at_its_vr_length_and_never_copied_whole(tmp_path):
    uid = generate_uid()
    name_cap = MAX_VALUE_BYTES[0x00100010]
    assert name_cap == 4 * (3 * 64 + 2)                      # PS3.5 6.2: PN 64 per component group, x 4 bytes
    inspect(written(tmp_path, data_set(uid, name=b"Q" * name_cap), uid))
    with pytest.raises(InvalidInstance, match=rf"^PatientName longer than {name_cap} bytes$"):
        inspect(written(tmp_path, data_set(uid, name=b"Q" * (name_cap + 2)), uid))
    with pytest.raises(InvalidInstance, match=r"^PatientID longer than 256 bytes$"):
        inspect(written(tmp_path, data_set(uid, patient_id=b"P" * 258), uid))
    # 100 MiB in an implicit VR data set: refused without reading the value
    huge = (struct.pack("<HHI", 0x0008, 0x0016, len(uid_value(CTImageStorage))) + uid_value(CTImageStorage)
            + struct.pack("<HHI", 0x0008, 0x0018, len(uid_value(uid))) + uid_value(uid)
            + struct.pack("<HHI", 0x0010, 0x0010, 100 << 20) + b"Q" * (100 << 20))
    path = written(tmp_path, huge, uid, ImplicitVRLittleEndian)
    del huge
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInstance, match="PatientName longer than"):
            inspect(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak >> 20} MiB allocated"
    # values the index does not take may be long (a long description in a sequence, private data)
    inspect(written(tmp_path, data_set(uid, extra=element(0x00191010, b"OB", b"\0" * (1 << 20))), uid))


def test_elements_out_of_order_or_repeated_are_refused_at_any_level(tmp_path):
    uid = generate_uid()
    twice = data_set(uid, extra=element(0x00100020, b"LO", b"DUPTAG-B"))
    with pytest.raises(InvalidInstance, match=r"^element \(0010,0020\) appears twice$"):
        inspect(written(tmp_path, twice, uid))
    backwards = data_set(uid, extra=element(0x00100010, b"PN", text_value("Other^Name")))
    with pytest.raises(InvalidInstance, match=r"^element \(0010,0010\) is out of ascending tag order$"):
        inspect(written(tmp_path, backwards, uid))
    inner = element(0x00081150, b"UI", uid_value(CTImageStorage)) + element(0x00081150, b"UI", uid_value(uid))
    for undefined in (False, True):
        sequence = (element(0x00081140, b"SQ", item(inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0), 0xFFFFFFFF)
                            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), 0xFFFFFFFF) if undefined
                    else element(0x00081140, b"SQ", item(inner)))
        data = data_set(uid).replace(element(0x00100010, b"PN", b"Doe^Jane"),
                                     sequence + element(0x00100010, b"PN", b"Doe^Jane"))
        with pytest.raises(InvalidInstance, match=r"element \(0008,1150\) appears twice"):
            inspect(written(tmp_path, data, uid))
    # a second Transfer Syntax UID at the start of the data set (group 0002) is refused too
    meta_again = element(0x00020010, b"UI", uid_value(ImplicitVRLittleEndian)) + data_set(uid)
    with pytest.raises(InvalidInstance, match=r"file meta element \(0002,0010\) repeated or out of order"):
        inspect(written(tmp_path, meta_again, uid))
