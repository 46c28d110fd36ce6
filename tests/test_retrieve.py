"""C-MOVE and C-GET: dcmtk movescu / getscu (plain port), dcmtk storescp +tls as the destination."""
from __future__ import annotations

import os
import shutil
import subprocess

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pydicom.uid import generate_uid

from helpers import arrived, data_file, dataset_sha256, wait_for
from test_interop_dcmtk import unique_copies

pytestmark = pytest.mark.interop
ENV = {**os.environ, "TCP_NODELAY": "1"}


def one_study(directory, count: int) -> list:
    """CT_small copies in one new study and series, written by dcmtk (as storescu sends them)."""
    study, series = generate_uid(), generate_uid()
    copies = []
    for i in range(count):
        path = directory / f"ct{i}.dcm"
        shutil.copy(data_file("CT_small.dcm"), path)
        subprocess.run(["dcmodify", "-nb", "-m", f"(0020,000D)={study}", "-m", f"(0020,000E)={series}",
                        "-m", f"(0008,0018)={generate_uid()}", "-m", f"(0020,0013)={i + 1}", str(path)],
                       check=True, capture_output=True)
        copies.append(path)
    return copies


def _study(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture
def filled(make_node, storescp, tmp_path):
    port, _ = storescp
    node = make_node(remote={"DEST": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                      "server_name": "localhost"}})
    files = one_study(tmp_path, 3) + unique_copies(["JPEG2000.dcm", "MR_small_RLE.dcm"], tmp_path)
    for path in files:  # each in its own syntax, proposed explicitly
        extra = {"JPEG2000.dcm": ["-xw"], "MR_small_RLE.dcm": ["-xr"]}.get(path.name, [])
        node.storescu(path, extra=["-R", *extra])
    return node, files


def movescu(node, *keys, destination="STORESCP"):
    cmd = ["movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", "M3DICOM", "-aem", destination]
    for key in keys:
        cmd += ["-k", key]
    return subprocess.run(cmd + ["127.0.0.1", str(node.plain_port)], capture_output=True, text=True,
                          timeout=120, env=ENV)


def test_movescu_study_arrives_byte_identical(filled, storescp):
    node, files = filled
    _, received = storescp
    study = _study(files[0])
    same_study = [f for f in files if _study(f) == study]
    result = movescu(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    assert result.returncode == 0, result.stderr
    got = wait_for(lambda: len(arrived(received)) >= len(same_study) and arrived(received), what="the moved instances")
    assert sorted(dataset_sha256(p) for p in got) == sorted(dataset_sha256(f) for f in same_study)
    assert len(same_study) == 3 and "Final Move Response (Success)" in result.stderr


def test_movescu_each_syntax_and_unknown_destination(filled, storescp):
    node, files = filled
    _, received = storescp
    for path in files[2:]:  # JPEG 2000 and RLE stay compressed, as stored
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        series = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        result = movescu(node, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={_study(path)}",
                         f"SeriesInstanceUID={series}", f"SOPInstanceUID={uid}")
        assert result.returncode == 0, result.stderr
        got = wait_for(lambda: [p for p in arrived(received) if uid in p.name], what=path.name)
        assert dataset_sha256(got[0]) == dataset_sha256(path)
    unknown = movescu(node, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={_study(files[0])}",
                      destination="NOWHERE")
    assert "Refused: MoveDestinationUnknown" in unknown.stderr
    assert "C-MOVE from MOVESCU to unknown destination 'NOWHERE'" in node.log()


def test_getscu_series_comes_back_on_the_same_association(filled, tmp_path):
    node, files = filled
    out = tmp_path / "got"
    out.mkdir()
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    result = subprocess.run(["getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "M3DICOM", "+B", "-od", str(out),
                             "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                             "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
                             "127.0.0.1", str(node.plain_port)], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    got = sorted(dataset_sha256(p) for p in out.iterdir())
    assert got == sorted(dataset_sha256(f) for f in files[:3])


def test_a_damaged_blob_is_reported_in_the_failed_list(filled):
    node, files = filled
    study = _study(files[0])
    same_study = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
                  if _study(f) == study]
    (blob_id,), = node.rows("SELECT blob_id FROM instances WHERE sop_instance_uid=?", (same_study[0],))
    (blob,) = [p for p in node.blob_files() if p.name == blob_id]
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0x01
    blob.write_bytes(bytes(data))

    ae = AE(ae_title="PACS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", node.plain_port, ae_title="M3DICOM")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    responses = list(assoc.send_c_move(identifier, "STORESCP", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    status, final = responses[-1]
    expected_status = 0xA702 if len(same_study) == 1 else 0xB000
    assert status.Status == expected_status
    assert status.NumberOfFailedSuboperations == 1
    assert same_study[0] in list(pydicom.multival.MultiValue(str, final.FailedSOPInstanceUIDList)
                                 if not isinstance(final.FailedSOPInstanceUIDList, str)
                                 else [final.FailedSOPInstanceUIDList])
    assert "cannot be read back" in node.log()
