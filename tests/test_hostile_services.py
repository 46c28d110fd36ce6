"""Hostile requests to the DIMSE services (issue 14, items 7, 9, 10, 17): each gets a clear
failure status, no association thread dies, and the node keeps storing afterwards."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelMove)

from helpers import M3DICOM, ROOT, data_file, free_port, synthetic_instances, wait_for

pytestmark = pytest.mark.interop


def _study_query(**keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _find(assoc, identifier) -> list[tuple[int, str]]:
    return [(int(status.Status), str(status.get("ErrorComment", "")))
            for status, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)]


@pytest.fixture
def stored(node, tmp_path):
    """The node with one small study in it, and its stored state."""
    node.storescu(*synthetic_instances(tmp_path / "before", 2, patient="Before^Attack"))
    return node, node.stored_state()


# -- item 7: query complexity, and no exception kills an association ---------------------------

@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_a_thousand_wildcards_get_a_failure_status_at_once(stored, tmp_path, tls):
    node, before = stored
    assoc = node.associate("QUERIER", StudyRootQueryRetrieveInformationModelFind, tls=tls)
    try:
        started = time.monotonic()
        answers = _find(assoc, _study_query(PatientName="\\".join(f"A{i}*" for i in range(1000))))
        took = time.monotonic() - started
        assert answers == [(0xC000, "PatientName: 1000 wildcard or range values, at most 32")]
        assert took < 5, f"the refusal took {took:.1f}s"
        # the same association still answers
        assert _find(assoc, _study_query(PatientName="Before*"))[-1] == (0x0000, "")
    finally:
        assoc.release()
    assert "Expression tree is too large" not in node.log()
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_an_index_failure_answers_0xc001_and_the_association_lives(stored, tmp_path):
    """Whatever goes wrong in the index, the requestor gets a failure status, not a silence of
    a dead association thread; the log has one line, no traceback."""
    node, _ = stored
    assoc = node.associate("QUERIER", StudyRootQueryRetrieveInformationModelFind)
    try:
        node.rows("ALTER TABLE studies RENAME TO studies_gone")   # a real SQLite error in the node
        try:
            started = time.monotonic()
            answers = _find(assoc, _study_query(PatientName="Before*"))
            assert answers == [(0xC001, "the node could not process the query")]
            assert time.monotonic() - started < 5
        finally:
            node.rows("ALTER TABLE studies_gone RENAME TO studies")
        assert _find(assoc, _study_query(PatientName="Before*"))[-1] == (0x0000, "")
    finally:
        assoc.release()
    log = node.log()
    assert "C-FIND from QUERIER failed: OperationalError: no such table: studies" in log
    assert "Traceback" not in log
    node.still_serves(tmp_path)


# -- item 9: the data set's SOP class must be the context's ------------------------------------

def test_an_mr_data_set_on_a_ct_context_is_refused_with_a900(stored, tmp_path, monkeypatch):
    from pynetdicom import _config as pynetdicom_config

    from test_hostile import _raw_file

    node, before = stored
    mr = pydicom.dcmread(data_file("MR_small.dcm"))
    mr.SOPInstanceUID = generate_uid()
    buf = BytesIO()
    pydicom.filewriter.write_dataset(_implicit(buf), mr)
    # the command says CT (as the file meta does) and the data set is MR
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    says_ct = _raw_file(tmp_path / "says-ct.dcm", mr.SOPInstanceUID, buf.getvalue(), CTImageStorage)
    # the command says MR, on the CT context
    says_mr = mr
    for sent, comment in ((says_ct, "SOP Class UID in the data set differs from the request"),
                          (says_mr, "MR Image Storage sent on a CT Image Storage context")):
        assoc = node.associate("CARELESS", CTImageStorage, transfer_syntaxes=[ImplicitVRLittleEndian])
        try:
            ct_context, = assoc.accepted_contexts
            monkeypatch.setattr(assoc, "_get_valid_context", lambda *args, **kwargs: ct_context)
            response = assoc.send_c_store(sent)
            assert response.Status == 0xA900, f"0x{response.Status:04X}"
            assert response.ErrorComment == comment
        finally:
            assoc.release()
    assert node.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (mr.SOPInstanceUID,)) == [(0,)]
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def _implicit(buf):
    from pydicom.filebase import DicomFileLike

    out = DicomFileLike(buf)
    out.is_little_endian, out.is_implicit_VR = True, True
    return out


# -- item 10: one node per data directory -------------------------------------------------------

def test_a_second_node_on_the_same_data_directory_refuses_and_touches_nothing(stored, tmp_path):
    node, before = stored
    spools = sorted(p for p in (node.data_dir / "spool").iterdir())
    marker = spools[0] / "left-by-the-running-node"
    marker.write_bytes(b"x")
    config = node.config_path.read_text().replace(str(node.port), str(free_port())).replace(
        str(node.plain_port), str(free_port()))
    second = tmp_path / "second.toml"
    second.write_text(config)
    result = subprocess.run(M3DICOM + ["serve", "--config", str(second)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"is in use by another m3dicom serve (pid {node.proc.pid})" in result.stderr
    assert marker.exists(), "the second start deleted the running node's spool"
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_a_receiver_whose_spool_vanished_recreates_it(stored, tmp_path):
    node, _ = stored
    import shutil

    shutil.rmtree(node.data_dir / "spool")
    node.still_serves(tmp_path)
    assert (node.data_dir / "spool").is_dir()
    assert oct((node.data_dir / "spool").stat().st_mode & 0o777) == "0o700"


def test_a_node_killed_hard_leaves_no_lock_behind(node, tmp_path):
    node.kill9()
    wait_for(lambda: not _listening(node.port), what="the port to close")
    node.start()
    node.still_serves(tmp_path)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# -- item 17: a C-MOVE destination that refuses connections --------------------------------------

def test_a_move_to_a_destination_that_refuses_connections_fails_its_sub_operations(make_node, tmp_path):
    closed = free_port()   # nothing listens there
    node = make_node(remote={"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": closed, "tls": False}},
                     router={"enabled": False})
    paths = synthetic_instances(tmp_path / "study", 3, patient="Move^Test")
    node.storescu(*paths)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    uids = sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)
    assoc = node.associate("PACS", StudyRootQueryRetrieveInformationModelMove)
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", study
        responses = list(assoc.send_c_move(identifier, "DEST", StudyRootQueryRetrieveInformationModelMove))
        # unknown destinations keep 0xA801
        unknown = list(assoc.send_c_move(identifier, "NOWHERE", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    status, failed = responses[-1]
    assert status.Status == 0xA702, f"0x{status.Status:04X}"
    assert status.NumberOfFailedSuboperations == 3 and status.NumberOfCompletedSuboperations == 0
    assert f"DEST (127.0.0.1:{closed})" in status.ErrorComment and "refused" in status.ErrorComment
    listed = failed.FailedSOPInstanceUIDList
    assert sorted([listed] if isinstance(listed, str) else list(listed)) == uids
    assert unknown[-1][0].Status == 0xA801
    assert f"C-MOVE from PACS to DEST (127.0.0.1:{closed}) failed: " in node.log()
    node.still_serves(tmp_path)


def test_a_start_that_fails_prints_no_admin_password_and_makes_no_user(make_node):
    """New-user pass: a busy viewer port (or viewer.tls = false beyond loopback) stopped the start
    after the admin's password, shown only once, had been printed and the user made."""
    node = make_node(start=False, viewer={"enabled": True}, router={"enabled": False})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", node.settings["viewer"]["port"]))
        busy.listen()
        result = subprocess.run(M3DICOM + ["serve", "--config", str(node.config_path)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "8443" not in result.stderr
    assert str(node.settings["viewer"]["port"]) in result.stderr
    assert "password" not in result.stdout + result.stderr
    assert node.rows("SELECT COUNT(*) FROM users") == [(0,)]
    node.start()                                                  # the port free again: the admin now
    assert "created user admin with password" in node.log()


# -- second round: retrieve keys are unique keys (get_wildcard.py) --------------------------------

def _getter(node, tls: bool = True):
    """A C-GET requestor (Patient and Study Root) that takes CT instances: (association, SOP Instance UIDs got)."""
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelGet,
                                      StudyRootQueryRetrieveInformationModelGet)

    got = []

    def on_store(event):
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    assoc = node.associate("GETTER", PatientRootQueryRetrieveInformationModelGet,
                           StudyRootQueryRetrieveInformationModelGet, CTImageStorage, tls=tls,
                           ext_neg=[build_role(CTImageStorage, scp_role=True)],
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return assoc, got


def _get(assoc, sop_class, **keys):
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    return [status for status, _ in assoc.send_c_get(identifier, sop_class)][-1]


def _two_patients(node, tmp_path):
    node.storescu(*synthetic_instances(tmp_path / "a", 2, patient="Alpha^A", patient_id="PAT-A"))
    node.storescu(*synthetic_instances(tmp_path / "b", 2, patient="Beta^B", patient_id="PAT-B"))
    return node, node.stored_state()


@pytest.fixture
def two_patients(node, tmp_path):
    return _two_patients(node, tmp_path)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_wildcards_in_retrieve_keys_are_refused(two_patients, tmp_path, tls):
    """PatientID '*' was refused, but '?*', '*?' and '\\\\?*' retrieved every instance of every patient."""
    from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelGet as PATIENT_GET,
                                      StudyRootQueryRetrieveInformationModelGet as STUDY_GET)

    node, before = two_patients
    assoc, got = _getter(node, tls)
    try:
        for pid in ("*", "?*", "*?", "\\?*", "PAT-?", "PAT*"):
            status = _get(assoc, PATIENT_GET, QueryRetrieveLevel="PATIENT", PatientID=pid)
            assert (status.Status, status.ErrorComment) == (0xC000, "PatientID: no wildcards in a retrieve's unique keys")
        status = _get(assoc, STUDY_GET, QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.*")
        assert (status.Status, status.ErrorComment) == (0xC000, "StudyInstanceUID: no wildcards in a retrieve's "
                                                                "unique keys")
        status = _get(assoc, PATIENT_GET, QueryRetrieveLevel="PATIENT", PatientID="")
        assert (status.Status, status.ErrorComment) == (0xC000, "a PATIENT retrieve needs PatientID")
        assert got == [], "a refused retrieve sent instances"
        status = _get(assoc, PATIENT_GET, QueryRetrieveLevel="PATIENT", PatientID="PAT-A")   # still works
        assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 2 and len(got) == 2
    finally:
        assoc.release()
    assert "C-GET from GETTER refused (0xC000): PatientID: no wildcards" in node.log()
    assert "Traceback" not in node.log()
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_a_retrieve_of_more_than_the_limit_is_refused_before_any_is_sent(make_node, tmp_path):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as STUDY_GET

    node, before = _two_patients(make_node(query={"max_retrieve_instances": 3}, router={"enabled": False}), tmp_path)
    study = node.rows("SELECT study_uid FROM studies LIMIT 1")[0][0]
    assoc, got = _getter(node)
    try:   # all of both studies at once: 4 instances, over query.max_retrieve_instances (3)
        both = "\\".join(uid for (uid,) in node.rows("SELECT study_uid FROM studies"))
        status = _get(assoc, STUDY_GET, QueryRetrieveLevel="STUDY", StudyInstanceUID=both)
        assert (status.Status, status.ErrorComment) == (0xA702, "4 instances, at most 3: retrieve less at once")
        assert got == []
        status = _get(assoc, STUDY_GET, QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
        assert status.Status == 0x0000 and len(got) == 2
    finally:
        assoc.release()
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_a_refused_move_connects_to_no_destination(make_node, tmp_path, storescp):
    port, received = storescp
    node = make_node(remote={"DEST": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                      "server_name": "localhost"}})
    node.storescu(*synthetic_instances(tmp_path / "a", 2, patient="Alpha^A", patient_id="PAT-A"))
    assoc = node.associate("PACS", StudyRootQueryRetrieveInformationModelMove)
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", "*?"
        responses = list(assoc.send_c_move(identifier, "STORESCP", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    status, _ = responses[-1]
    assert (status.Status, status.ErrorComment) == (0xC000, "StudyInstanceUID: no wildcards in a retrieve's "
                                                            "unique keys")
    assert list(received.iterdir()) == []
    assert "C-MOVE from PACS refused (0xC000)" in node.log() and "Traceback" not in node.log()
    node.still_serves(tmp_path)


def test_a_retrieve_reads_its_matches_a_page_at_a_time(tmp_path, monkeypatch):
    from archive import Archive
    from scp import retrieve

    archive = Archive(tmp_path / "var")
    try:
        paths = synthetic_instances(tmp_path / "s", 5, patient="Paged^P", patient_id="PAGED")
        for path in paths[:4]:
            archive.ingest_file(path)
        monkeypatch.setattr(retrieve, "PAGE", 2)
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID = "PATIENT", "PAGED"
        from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet

        found = retrieve.matches(archive, PatientRootQueryRetrieveInformationModelGet, identifier, 10)
        archive.ingest_file(paths[4])   # indexed after the count: not sent by this retrieve
        reader, pages = archive.index.reader, []
        monkeypatch.setattr(archive.index, "reader", lambda *a, **k: pages.append(1) or reader(*a, **k))
        uids = [m.sop_instance_uid for m in found]
        assert found.count == 4 and len(uids) == 4 and len(pages) == 2   # two pages of two
        assert uids == [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths[:4]]
    finally:
        archive.close()
