"""Hostile input over a real association: refused with a clear status, nothing written outside."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage

from helpers import data_file, dataset_offset

pytestmark = pytest.mark.interop


def _raw_file(path: Path, sop_instance: str, dataset_bytes: bytes, sop_class: str = CTImageStorage) -> Path:
    """A Part 10 file whose meta announces `sop_instance` and whose data set is `dataset_bytes`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.3.4"
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    buf = BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + dataset_bytes)
    return path


def _ct_with(**changes) -> bytes:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()[dataset_offset(buf.getvalue()):]


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory, pki):
    """One node for the refusals (each leaves nothing behind: the tests check it); started once."""
    from helpers import Node

    node = Node(tmp_path_factory.mktemp("hostile") / "node", pki, router={"enabled": False}).start()
    yield node
    node.stop()


@pytest.fixture
def node(hostile_target):
    """The shared node, its log read from here on (`node.log()` is what this test made it write)."""
    whole, start = hostile_target.log, len(hostile_target.log())
    hostile_target.log = lambda: whole()[start:]
    yield hostile_target
    hostile_target.log = whole


@pytest.fixture(autouse=True)
def datasets_sent_from_files(monkeypatch):
    """pynetdicom's chunked send streams a file's bytes untouched (it does not parse them)."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send_raw(node, path: Path) -> int | None:
    """Send the file's bytes untouched."""
    assoc = node.associate("HOSTILE", CTImageStorage)
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status else None
    finally:
        assoc.release()


def _files_outside(node, roots) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            found += [os.path.join(dirpath, n) for n in names if "passwd" in n or n.endswith(".dcm")]
    return found


HOSTILE_UIDS = {
    "path traversal": "../../etc/passwd",
    "absolute path": "/etc/passwd",
    "over-long": "1." + "2" * 70,
    "non-numeric": "1.2.abc.4",
    "leading zero": "1.02.3",
    "trailing dot": "1.2.3.",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_UIDS))
@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_hostile_uids_are_refused(node, tmp_path, keyword, case):
    value = HOSTILE_UIDS[case]
    pynetdicom_config.ENFORCE_UID_CONFORMANCE = False
    sop_instance = value if keyword == "SOPInstanceUID" else generate_uid()
    changes = {keyword: value}
    if keyword != "SOPInstanceUID":
        changes["SOPInstanceUID"] = sop_instance
    path = _raw_file(tmp_path / "hostile.bin", sop_instance, _ct_with(**changes))
    try:
        status = _send_raw(node, path)
    except ValueError:  # pynetdicom will not put it in a C-STORE-RQ: put it in the data set only
        path = _raw_file(tmp_path / "hostile.bin", generate_uid(), _ct_with(**changes))
        status = _send_raw(node, path)
    assert status == 0xC000, f"status {status}"
    assert f"{keyword} is not a valid UID" in node.log()
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]
    assert node.blob_files() == []
    assert not (Path("/etc") / "passwd.dcm").exists()
    assert _files_outside(node, [node.data_dir.parent]) == [], "a peer value became a file name"
    assert "refused (0xC000)" in node.log()


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uids_are_refused(node, tmp_path, keyword):
    sop_instance = generate_uid()
    changes = {keyword: None}
    if keyword != "SOPInstanceUID":
        changes["SOPInstanceUID"] = sop_instance
    status = _send_raw(node, _raw_file(tmp_path / "x.bin", sop_instance, _ct_with(**changes)))
    assert status == 0xC000
    assert f"{keyword} is missing" in node.log()
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]


def test_truncated_dataset_is_refused(node, tmp_path):
    data = _ct_with(SOPInstanceUID=(uid := generate_uid()))
    status = _send_raw(node, _raw_file(tmp_path / "t.bin", uid, data[: len(data) - 1000]))
    assert status == 0xC000
    assert "truncated" in node.log()
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)] and node.blob_files() == []


def test_garbage_is_refused(node, tmp_path):
    uid = generate_uid()
    garbage = struct.pack("<HHI", 0x0008, 0x0018, 0xFFFFFFF0) + os.urandom(2000)
    assert _send_raw(node, _raw_file(tmp_path / "g.bin", uid, garbage)) == 0xC000


def test_dataset_not_matching_the_request_is_refused_with_a900(node, tmp_path):
    data = _ct_with(SOPInstanceUID=generate_uid())
    status = _send_raw(node, _raw_file(tmp_path / "m.bin", generate_uid(), data))
    assert status == 0xA900
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]


def test_node_keeps_serving_after_hostile_input(make_node, tmp_path):
    node = make_node(router={"enabled": False})
    _send_raw(node, _raw_file(tmp_path / "g.bin", generate_uid(), b"\xff" * 64))
    node.storescu(data_file("CT_small.dcm"))
    assert node.rows("SELECT COUNT(*) FROM instances") == [(1,)]
