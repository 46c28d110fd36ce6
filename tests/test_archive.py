"""Ingest through the archive API: outcomes, duplicates, recovery, no peer value in a path."""
from __future__ import annotations


import pydicom
import pytest
from pydicom.uid import generate_uid

from archive import Archive, Outcome
from helpers import dataset_sha256, data_file


def copy_with(tmp_path, name="CT_small.dcm", **changes):
    ds = pydicom.dcmread(data_file(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    path = tmp_path / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def archive(tmp_path):
    a = Archive(tmp_path / "data")
    yield a
    a.close()


def test_store_indexes_hierarchy_and_logs_a_change(archive):
    result = archive.ingest_file(data_file("CT_small.dcm"))
    assert result.outcome is Outcome.STORED
    (row,) = archive.index.query(
        "SELECT p.patient_id, p.patient_name, s.study_date, se.modality, i.sha256, i.size "
        "FROM instances i JOIN series se ON i.series_pk=se.pk JOIN studies s ON se.study_pk=s.pk "
        "JOIN patients p ON s.patient_pk=p.pk")
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    assert row["patient_id"] == ds.PatientID and row["patient_name"] == str(ds.PatientName)
    assert row["study_date"] == ds.StudyDate and row["modality"] == "CT"
    assert row["sha256"] == dataset_sha256(data_file("CT_small.dcm"))
    assert row["size"] == data_file("CT_small.dcm").stat().st_size
    (change,) = archive.index.changes_since(0)
    assert change["kind"] == "stored" and change["sop_instance_uid"] == ds.SOPInstanceUID


def test_stored_blob_reads_back_byte_identical(archive):
    archive.ingest_file(data_file("MR_small.dcm"))
    (row,) = archive.index.query("SELECT blob_id FROM instances")
    assert archive.storage.read_all(row["blob_id"]) == data_file("MR_small.dcm").read_bytes()


def test_same_bytes_twice_is_idempotent(archive):
    archive.ingest_file(data_file("CT_small.dcm"))
    assert archive.ingest_file(data_file("CT_small.dcm")).outcome is Outcome.ALREADY_STORED
    assert len(archive.index.changes_since(0)) == 1
    assert len(list(archive.storage.blob_ids())) == 1


def two_versions(tmp_path):
    """Two files with one SOP Instance UID and different bytes."""
    uid = generate_uid()
    return (copy_with(tmp_path, SOPInstanceUID=uid, StudyDescription="first"),
            copy_with(tmp_path, SOPInstanceUID=uid, StudyDescription="second"))


@pytest.mark.parametrize("policy,outcome,kept,changes", [
    ("keep-first", Outcome.DUPLICATE_KEPT_FIRST, 0, ["stored"]),
    ("replace", Outcome.REPLACED, 1, ["stored", "replaced", "blob_removed"]),
])
def test_different_bytes_follow_the_duplicates_policy(tmp_path, policy, outcome, kept, changes):
    archive = Archive(tmp_path / "data", duplicates=policy)
    versions = two_versions(tmp_path)
    archive.ingest_file(versions[0])
    assert archive.ingest_file(versions[1]).outcome is outcome
    (row,) = archive.index.query("SELECT sha256, blob_id FROM instances")
    assert row["sha256"] == dataset_sha256(versions[kept])
    assert list(archive.storage.blob_ids()) == [row["blob_id"]]
    assert [c["kind"] for c in archive.index.changes_since(0)] == changes


def test_refusals_leave_nothing(archive, tmp_path):
    bad = copy_with(tmp_path, SOPInstanceUID="1.2.3", StudyInstanceUID="../../x")
    assert archive.ingest_file(bad).outcome is Outcome.INVALID
    assert archive.ingest_file(data_file("CT_small.dcm"), sop_instance_uid="1.2.3").outcome is Outcome.MISMATCH
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"hello")
    assert archive.ingest_file(not_dicom).outcome is Outcome.INVALID
    assert archive.index.query("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert list(archive.storage.blob_ids()) == []


def test_blob_paths_are_opaque(archive, tmp_path):
    archive.ingest_file(data_file("CT_small.dcm"))
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    names = [p.name for p in archive.data_dir.rglob("*")]
    assert not any(str(ds.SOPInstanceUID) in n or str(ds.PatientID) in n for n in names)


def test_index_failure_removes_the_blob(archive, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("index broke")

    monkeypatch.setattr(archive, "_commit", broken)  # our own seam, not a library internal
    assert archive.ingest_file(data_file("CT_small.dcm")).outcome is Outcome.FAILURE
    assert list(archive.storage.blob_ids()) == []


def test_recover_removes_orphans_and_partials(archive):
    archive.ingest_file(data_file("CT_small.dcm"))
    orphan = archive.storage.create([b"written but never indexed"])
    cut_off = archive.storage.root / "ab" / ("ab" + "0" * 30)
    cut_off.write_bytes(b"M3BLOB half a header")
    assert archive.recover() == 2
    assert not archive.storage.exists(orphan.blob_id) and not cut_off.exists()
    assert len(list(archive.storage.blob_ids())) == 1


def test_decrypted_copies_stay_in_the_data_directory_and_a_crash_leaves_none(archive):
    result = archive.ingest_file(data_file("CT_small.dcm"))
    (row,) = archive.index.query("SELECT blob_id, sha256 FROM instances")
    with archive.exported(row["blob_id"], row["sha256"]) as path:
        assert path.parent == archive.data_dir / "exports"
        assert oct(path.parent.stat().st_mode & 0o777) == "0o700" and oct(path.stat().st_mode & 0o777) == "0o600"
        assert pydicom.dcmread(path).SOPInstanceUID == result.sop_instance_uid
    assert not path.exists()
    (archive.exports / "tmpcut.dcm").write_bytes(b"decrypted, then the process was killed")
    archive.recover()
    assert list(archive.exports.iterdir()) == []


def test_migrations_are_recorded(tmp_path):
    Archive(tmp_path / "d").close()
    again = Archive(tmp_path / "d")  # reopening applies nothing twice
    rows = again.index.query("SELECT name FROM _sqlite_migrations")
    assert [r[0] for r in rows] == ["0001_initial", "0002_query", "0003_offload", "0004_jobs", "0005_viewer",
                                      "0006_integrity"]
    assert again.index.query("PRAGMA journal_mode")[0][0] == "wal"
