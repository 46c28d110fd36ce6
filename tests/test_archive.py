"""Ingest through the archive API: outcomes, duplicates, recovery, no peer value in a path."""
from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import text

from archive import Archive, Outcome, status
from archive.crypto import IntegrityError
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
def archive(tmp_path, index_url):
    """An archive whose index is SQLite or PostgreSQL (each test that takes it runs on both)."""
    a = Archive(tmp_path / "data", index_url=index_url)
    yield a
    a.close()


def test_store_indexes_hierarchy_and_logs_a_change(archive):
    result = archive.ingest_file(data_file("CT_small.dcm"))
    assert result.outcome is Outcome.STORED
    (row,) = archive.index.read(
        text("SELECT p.patient_id, p.patient_name, s.study_date, se.modality, i.sha256, i.size "
             "FROM instances i JOIN series se ON i.series_pk=se.pk JOIN studies s ON se.study_pk=s.pk "
             "JOIN patients p ON s.patient_pk=p.pk"))
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    assert row.patient_id == ds.PatientID and row.patient_name == str(ds.PatientName)
    assert row.study_date == ds.StudyDate and row.modality == "CT"
    assert row.sha256 == dataset_sha256(data_file("CT_small.dcm"))
    assert row.size == data_file("CT_small.dcm").stat().st_size
    (change,) = archive.index.changes_since(0)
    assert change.kind == "stored" and change.sop_instance_uid == ds.SOPInstanceUID


def test_stored_blob_reads_back_byte_identical(archive):
    archive.ingest_file(data_file("MR_small.dcm"))
    (row,) = archive.index.read(text("SELECT blob_id FROM instances"))
    assert archive.storage.read_all(row.blob_id) == data_file("MR_small.dcm").read_bytes()


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
def test_different_bytes_follow_the_duplicates_policy(tmp_path, index_url, policy, outcome, kept, changes):
    archive = Archive(tmp_path / "data", index_url=index_url, duplicates=policy)
    versions = two_versions(tmp_path)
    archive.ingest_file(versions[0])
    assert archive.ingest_file(versions[1]).outcome is outcome
    (row,) = archive.index.read(text("SELECT sha256, blob_id FROM instances"))
    assert row.sha256 == dataset_sha256(versions[kept])
    assert list(archive.storage.blob_ids()) == [row.blob_id]
    assert [c.kind for c in archive.index.changes_since(0)] == changes


def test_refusals_leave_nothing(archive, tmp_path):
    bad = copy_with(tmp_path, SOPInstanceUID="1.2.3", StudyInstanceUID="../../x")
    assert archive.ingest_file(bad).outcome is Outcome.INVALID
    assert archive.ingest_file(data_file("CT_small.dcm"), sop_instance_uid="1.2.3").outcome is Outcome.MISMATCH
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"hello")
    assert archive.ingest_file(not_dicom).outcome is Outcome.INVALID
    assert archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0] == 0
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


def test_verified_reads_small_instances_in_memory_checked_like_exported(archive):
    result = archive.ingest_file(data_file("CT_small.dcm"))
    (row,) = archive.index.read(text("SELECT blob_id, sha256, size FROM instances"))
    data = archive.verified(row.blob_id, row.sha256, row.size)
    with archive.exported(row.blob_id, row.sha256) as path:
        assert data == path.read_bytes() and pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == \
            result.sop_instance_uid
    assert archive.verified(row.blob_id, row.sha256, row.size - 1) is None          # larger: use exported
    with pytest.raises(IntegrityError, match="does not match its indexed SHA-256"):
        archive.verified(row.blob_id, "0" * 64, row.size)


def test_recover_removes_orphans_and_partials(archive, tmp_path, monkeypatch):
    kept = [archive.ingest_file(copy_with(tmp_path, SOPInstanceUID=generate_uid())) for _ in range(3)]
    orphans = [archive.storage.create([b"written but never indexed %d" % n]) for n in range(3)]
    cut_off = archive.storage.root / "ab" / ("ab" + "0" * 30)
    cut_off.write_bytes(b"M3BLOB half a header")
    # the node's blobs are looked up a batch at a time (not the whole index read): batches of 2 here
    lookup = archive.index.blobs_referenced
    monkeypatch.setattr(archive.index, "blobs_referenced", lambda ids: lookup(ids, batch=2))
    assert archive.recover() == 4
    assert not any(archive.storage.exists(o.blob_id) for o in orphans) and not cut_off.exists()
    assert len(list(archive.storage.blob_ids())) == len(kept) == 3


def test_decrypted_copies_stay_in_the_data_directory_and_a_crash_leaves_none(archive):
    result = archive.ingest_file(data_file("CT_small.dcm"))
    (row,) = archive.index.read(text("SELECT blob_id, sha256 FROM instances"))
    with archive.exported(row.blob_id, row.sha256) as path:
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
    assert [tuple(r) for r in again.index.read(text("SELECT version_num FROM alembic_version_archive"))] == [
        ("archive_0006",)]
    assert [writer_pragma(again.index, name) for name in ("journal_mode", "synchronous", "foreign_keys")] == [
        "wal", 2, 1]


def writer_pragma(index, name: str):
    """A pragma's value on the index's writer connection (the readers' are their own)."""
    with index.write() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


# -- integrity: a study belongs to one patient, a series to one study ------------------------------

def instance(tmp_path, *, study, patient_id, name="Doe^Jane", series=None, **changes):
    """A CT_small copy with a fresh SOP Instance UID in `study` / `series` (new unless given)."""
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientName = study, series or generate_uid(), name
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def hierarchy(archive) -> set[tuple]:
    return {tuple(r) for r in archive.index.read(
        text("SELECT i.sop_instance_uid, se.series_uid, st.study_uid, p.patient_id, p.patient_name FROM instances i "
             "JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk "
             "JOIN patients p ON p.pk = st.patient_pk"))}


def test_a_study_of_another_patient_or_a_series_of_another_study_is_refused_and_recorded(archive, tmp_path):
    study_a, series_a, study_b = generate_uid(), generate_uid(), generate_uid()
    assert archive.ingest_file(instance(tmp_path, study=study_a, series=series_a, patient_id="A")).outcome \
        is Outcome.STORED
    assert archive.ingest_file(instance(tmp_path, study=study_b, patient_id="B")).outcome is Outcome.STORED
    before, blobs = hierarchy(archive), set(archive.storage.blob_ids())
    cases = [(instance(tmp_path, study=study_a, patient_id="B"), "study belongs to another patient", "PatientID",
              "A", "B"),
             (instance(tmp_path, study=study_a, patient_id=None), "study belongs to another patient", "PatientID",
              "A", ""),
             (instance(tmp_path, study=study_b, series=series_a, patient_id="B"), "series belongs to another study",
              "StudyInstanceUID", study_a, study_b)]
    for path, reason, attribute, held, said in cases:
        result = archive.ingest_file(path, calling_ae="MODALITY")
        assert result.outcome is Outcome.CONFLICT and result.reason.startswith(reason) and result.study_uid is None
        uid = pydicom.dcmread(path).SOPInstanceUID
        assert [tuple(r) for r in archive.index.read(
            text("SELECT attribute, index_value, instance_value, action, calling_ae FROM conflicts "
                 "WHERE sop_instance_uid = :uid"), {"uid": uid})] == [(attribute, held, said, "refused", "MODALITY")]
    assert hierarchy(archive) == before and set(archive.storage.blob_ids()) == blobs
    assert [c.kind for c in archive.index.changes_since(0)] == ["stored", "stored"]
    assert archive.index.integrity() == {"stored": 0, "refused": 3, "quarantined": 0, "discarded": 0,
                                         "in_quarantine": 0}


def test_demographics_are_never_written_over_and_each_difference_is_recorded(archive, tmp_path):
    study = generate_uid()
    archive.ingest_file(instance(tmp_path, study=study, patient_id="P", name="Doe^Jane", PatientSex=""))
    renamed = instance(tmp_path, study=generate_uid(), patient_id="P", name="Roe^Joan", PatientSex="F")
    assert archive.ingest_file(renamed).outcome is Outcome.STORED
    # another name: perhaps another person, so its sex does not fill the blank either (new-user pass)
    assert tuple(archive.index.read(text("SELECT patient_name, sex FROM patients"))[0]) == ("Doe^Jane", None)
    same = instance(tmp_path, study=study, patient_id="P", name="DOE^JANE^^", PatientSex="F")  # same name, case
    assert archive.ingest_file(same).outcome is Outcome.STORED
    (patient,) = archive.index.read(text("SELECT patient_name, sex FROM patients"))
    assert tuple(patient) == ("Doe^Jane", "F")            # the first name kept, the empty sex filled in
    assert [tuple(r) for r in archive.index.read(text("SELECT attribute, index_value, instance_value, action "
                                                      "FROM conflicts ORDER BY attribute"))] == [
        ("PatientName", "Doe^Jane", "Roe^Joan", "stored"), ("PatientSex", None, "F", "stored")]
    (row,) = archive.index.read(text("SELECT blob_id FROM instances WHERE sop_instance_uid = :uid"),
                                 {"uid": pydicom.dcmread(renamed).SOPInstanceUID})
    assert archive.storage.read_all(row.blob_id) == renamed.read_bytes()   # the file keeps its own name


def test_instances_without_a_patient_id_get_a_patient_per_study(archive, tmp_path):
    first, second = generate_uid(), generate_uid()
    for study, name in ((first, "Unknown^One"), (second, "Unknown^Two"), (first, "Unknown^One")):
        assert archive.ingest_file(instance(tmp_path, study=study, patient_id=None, name=name)).outcome \
            is Outcome.STORED
    names = {r[2]: r[4] for r in hierarchy(archive)}
    assert names == {first: "Unknown^One", second: "Unknown^Two"}
    assert archive.index.read(text("SELECT COUNT(*) FROM patients WHERE patient_id=''"))[0][0] == 2
    assert archive.index.read(text("SELECT COUNT(*) FROM conflicts"))[0][0] == 0
    assert archive.ingest_file(instance(tmp_path, study=first, patient_id="X")).outcome is Outcome.CONFLICT


def test_duplicates_and_analysis_results_still_go_through(tmp_path, index_url):
    archive = Archive(tmp_path / "data", index_url=index_url, duplicates="replace")
    study = generate_uid()
    path = instance(tmp_path, study=study, patient_id="P")
    assert archive.ingest_file(path).outcome is Outcome.STORED
    assert archive.ingest_file(path).outcome is Outcome.ALREADY_STORED
    uid = pydicom.dcmread(path).SOPInstanceUID
    moved = instance(tmp_path, study=study, patient_id="Q", SOPInstanceUID=uid)  # a new version, another patient
    assert archive.ingest_file(moved).outcome is Outcome.CONFLICT
    result = instance(tmp_path, study=study, patient_id="P", Modality="OT")     # what a plug-in makes from it
    assert archive.ingest_file(result, job_id="job-1").outcome is Outcome.STORED
    assert {r[3] for r in hierarchy(archive)} == {"P"} and len(hierarchy(archive)) == 2


def test_quarantine_keeps_the_instance_outside_the_hierarchy_and_recovery_keeps_it(tmp_path, index_url):
    archive = Archive(tmp_path / "data", index_url=index_url, on_conflict="quarantine")
    study = generate_uid()
    archive.ingest_file(instance(tmp_path, study=study, patient_id="A"))
    other = instance(tmp_path, study=study, patient_id="B")
    first, again = archive.ingest_file(other), archive.ingest_file(other)
    assert first.outcome is again.outcome is Outcome.QUARANTINED and first.reason.startswith("quarantined: study")
    (row,) = archive.index.read(text("SELECT blob_id, sha256, reason FROM quarantine"))
    assert row.sha256 == dataset_sha256(other) and row.reason == "study belongs to another patient"
    assert archive.recover() == 0 and archive.storage.read_all(row.blob_id) == other.read_bytes()
    assert len(list(archive.storage.blob_ids())) == 2 and len(hierarchy(archive)) == 1
    assert archive.index.integrity()["in_quarantine"] == 1
    assert [r.received for r in status.conflicts(archive.index)] == [2]


def test_the_integrity_migration_keeps_what_an_older_index_holds(tmp_path):
    from archive.sqlite_legacy import connect
    from archive.sqlite_legacy import migrations
    import sqlite_utils

    conn = connect(tmp_path / "index.sqlite3")
    migrations.apply(sqlite_utils.Database(conn), stop_before="0006_integrity")
    conn.execute("INSERT INTO patients (pk, patient_id, patient_name, patient_name_key) VALUES (7, 'P', 'Doe', 'DOE')")
    conn.execute("INSERT INTO studies (pk, study_uid, patient_pk, updated_at) VALUES (3, '1.2.3', 7, 0)")
    conn.close()
    from archive.index import Index

    index = Index(tmp_path / "index.sqlite3")
    assert [tuple(r) for r in index.read(text("SELECT p.pk, p.patient_id, p.patient_name_key FROM studies s "
                                              "JOIN patients p ON p.pk = s.patient_pk"))] == [(7, "P", "DOE")]
    with pytest.raises(Exception, match="UNIQUE"):
        with index.write() as write:
            write.execute(text("INSERT INTO patients (patient_id) VALUES ('P')"))
    with index.write() as write:                       # several patients without an ID are fine
        write.execute(text("INSERT INTO patients (patient_id) VALUES (''), ('')"))
    assert writer_pragma(index, "foreign_keys") == 1
    assert "patients_patient_id" in {r[1] for r in index.read(text("PRAGMA index_list(patients)"))}
    # brought to the last sqlite-utils schema, stamped at the archive's first Alembic revision, then upgraded
    assert [r[0] for r in index.read(text("SELECT version_num FROM alembic_version_archive"))] == ["archive_0006"]
    assert len(index.read(text("SELECT name FROM _sqlite_migrations WHERE migration_set='m3dicom'"))) == 8
    index.close()


# -- one SOP Instance UID, one instance (issue 14, second round) -----------------------------------

def test_a_uid_re_used_for_another_patient_study_or_series_is_a_conflict_under_either_policy(tmp_path):
    for policy in ("keep-first", "replace"):
        archive = Archive(tmp_path / policy, duplicates=policy)
        study, series = generate_uid(), generate_uid()
        first = instance(tmp_path, study=study, series=series, patient_id="A")
        uid = pydicom.dcmread(first).SOPInstanceUID
        assert archive.ingest_file(first).outcome is Outcome.STORED
        before, blobs = hierarchy(archive), set(archive.storage.blob_ids())
        cases = [(dict(study=generate_uid(), patient_id="B"), "PatientID", "A", "B", "patient"),
                 (dict(study=generate_uid(), patient_id="A"), "StudyInstanceUID", study, None, "study"),
                 (dict(study=study, patient_id="A"), "SeriesInstanceUID", series, None, "series")]
        for changes, attribute, held, said, whose in cases:
            other = instance(tmp_path, SOPInstanceUID=uid, **changes)
            said = said or str(pydicom.dcmread(other)[attribute].value)
            result = archive.ingest_file(other, calling_ae="REUSER")
            assert (result.outcome, result.reason) == (Outcome.CONFLICT,
                                                       f"SOP Instance UID is an instance of another {whose}")
            assert [tuple(r) for r in archive.index.read(
                text("SELECT index_value, instance_value, action, reason FROM conflicts WHERE attribute = :a"),
                {"a": attribute})] == [
                    (held, said, "refused", f"its SOP Instance UID is an instance of another {whose}")]
        assert hierarchy(archive) == before and set(archive.storage.blob_ids()) == blobs, policy
        assert archive.index.not_committable(uid) == "received again since with other content, which was refused"
        archive.close()


def test_the_same_instance_with_other_bytes_under_keep_first_is_discarded_recorded_and_not_committable(
        tmp_path, index_url):
    archive = Archive(tmp_path / "data", index_url=index_url)
    versions = two_versions(tmp_path)
    uid = pydicom.dcmread(versions[0]).SOPInstanceUID
    assert archive.ingest_file(versions[0]).outcome is Outcome.STORED
    assert archive.index.not_committable(uid) is None
    assert archive.ingest_file(versions[0]).outcome is Outcome.ALREADY_STORED       # the same bytes: no doubt
    assert archive.index.not_committable(uid) is None
    for _ in range(2):
        assert archive.ingest_file(versions[1], calling_ae="RESENDER").outcome is Outcome.DUPLICATE_KEPT_FIRST
    (row,) = status.conflicts(archive.index)
    assert (row.attribute, row.action, row.received, row.calling_ae, row.reason) == (
        "SOPInstanceUID", "discarded", 2, "RESENDER", "received again with different content")
    assert (row.index_value, row.instance_value) == (f"data set SHA-256 {dataset_sha256(versions[0])}",
                                                           f"data set SHA-256 {dataset_sha256(versions[1])}")
    assert archive.index.integrity()["discarded"] == 1
    assert archive.index.not_committable(uid) == "received again since with other content, which was discarded"
    archive.close()
    replacing = Archive(tmp_path / "data", index_url=index_url, duplicates="replace")   # the new copy: no doubt
    assert replacing.ingest_file(versions[1]).outcome is Outcome.REPLACED
    assert replacing.index.not_committable(uid) is None
    replacing.close()


def test_a_uid_re_used_for_another_patient_is_quarantined_with_on_conflict_quarantine(tmp_path, index_url):
    archive = Archive(tmp_path / "data", index_url=index_url, on_conflict="quarantine")
    first = instance(tmp_path, study=generate_uid(), patient_id="A")
    uid = pydicom.dcmread(first).SOPInstanceUID
    archive.ingest_file(first)
    before = hierarchy(archive)
    other = instance(tmp_path, study=generate_uid(), patient_id="B", SOPInstanceUID=uid)
    result = archive.ingest_file(other)
    assert (result.outcome, result.reason) == (Outcome.QUARANTINED,
                                               "quarantined: SOP Instance UID is an instance of another patient")
    (row,) = archive.index.read(text("SELECT sha256 FROM quarantine WHERE sop_instance_uid = :uid"), {"uid": uid})
    assert row.sha256 == dataset_sha256(other) and hierarchy(archive) == before
    assert archive.index.not_committable(uid) == "received again since with other content, which was quarantined"
    archive.close()


def test_nul_in_values_is_stored_and_found_alike_on_both_engines(archive, tmp_path):
    """PostgreSQL's text cannot hold NUL (a careless modality pads with it, a hostile one puts it inside):
    both engines keep NUL padding off and a NUL inside as U+FFFD, and a C-FIND naming the value with its
    NUL finds it (on PostgreSQL this was a refused C-STORE, 0x0110, and a failed C-FIND, 0xC001)."""
    from pydicom.dataset import Dataset

    from archive.query import STUDY_ROOT, Query

    path = copy_with(tmp_path, PatientID="PHI-4711\x00SECRET", PatientName="Doe^Jane\x00\x00",
                     StudyDescription="Head\x00CT", AccessionNumber="A1\x00", SOPInstanceUID=generate_uid())
    result = archive.ingest_file(path)
    assert result.outcome is Outcome.STORED, result
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.PatientID, identifier.PatientName = "STUDY", "PHI-4711\x00SECRET", ""
    identifier.StudyDescription, identifier.AccessionNumber = "", "A1\x00"
    with archive.index.reader() as conn:
        (found,) = Query(STUDY_ROOT, identifier).run(conn)
    assert (found.PatientID, str(found.PatientName), found.StudyDescription, found.AccessionNumber) == (
        "PHI-4711\ufffdSECRET", "Doe^Jane", "Head\ufffdCT", "A1")


def test_a_commit_whose_answer_is_lost_keeps_the_blob_of_the_row_it_committed(tmp_path, pg_cluster, monkeypatch):
    """PostgreSQL restarted, or the network cut, just as COMMIT went out: the row may be on disk though the
    node heard nothing. The C-STORE is answered a failure (the sender sends again: ALREADY_STORED), and the
    committed row keeps its blob: it is read back whole. (Before: the blob was removed, the row left without
    one.) The failure is simulated at SQLAlchemy's commit, after the server committed."""
    import secrets

    import psycopg

    archive = Archive(tmp_path / "data", index_url=pg_cluster.create_database(f"t_{secrets.token_hex(6)}"))
    try:
        dialect = archive.index.engines.writer.dialect
        committed, lost = dialect.do_commit, [True]

        def commit_then_lose_the_answer(dbapi_connection):
            committed(dbapi_connection)
            if lost[0]:
                lost[0] = False
                raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(dialect, "do_commit", commit_then_lose_the_answer)
        first = archive.ingest_file(data_file("CT_small.dcm"))
        assert first.outcome is Outcome.FAILURE
        assert archive.ingest_file(data_file("CT_small.dcm")).outcome is Outcome.ALREADY_STORED
        (row,) = archive.index.read(text("SELECT blob_id, sha256 FROM instances"))
        with archive.exported(row.blob_id, row.sha256) as path:
            assert dataset_sha256(path) == dataset_sha256(data_file("CT_small.dcm"))
        assert list(archive.storage.blob_ids()) == [row.blob_id]        # the retry's own copy is gone
    finally:
        archive.close()


def test_a_cfind_whose_peer_reads_slowly_holds_no_connection_to_the_index(tmp_path, pg_cluster):
    """Each receiving process has a pool of connections (archive.db.POOL_SIZE, and as many more when busy):
    C-FINDs in the middle of sending their answers to slow peers must not hold them, or every C-STORE of
    that process waits for the pool and fails."""
    import secrets
    import time

    from archive import db
    from archive.query import STUDY_ROOT, Query, find
    from pydicom.dataset import Dataset

    archive = Archive(tmp_path / "data", index_url=pg_cluster.create_database(f"t_{secrets.token_hex(6)}"))
    try:
        for name in ("CT_small.dcm", "MR_small.dcm"):
            archive.ingest_file(data_file(name))
        answering = []
        for _ in range(2 * db.POOL_SIZE + 2):        # more than the pool holds
            identifier = Dataset()
            identifier.QueryRetrieveLevel, identifier.StudyInstanceUID = "STUDY", ""
            matches = find(archive.index, Query(STUDY_ROOT, identifier), limit=100)
            next(matches)                              # the first answer sent, the peer slow to read the next
            answering.append(matches)
        started = time.monotonic()
        assert archive.ingest_file(copy_with(tmp_path, SOPInstanceUID=generate_uid())).outcome.ok
        assert time.monotonic() - started < 5
        for matches in answering:
            assert len(list(matches)) == 1             # and each C-FIND still ends with its other match
    finally:
        archive.close()


@pytest.mark.parametrize("number", ["3000000000", "-2147483649", "99999999999"])
def test_an_instance_number_outside_is_range_is_stored_without_indexing_it(archive, tmp_path, number):
    """IS holds -2^31 .. 2^31 - 1 (PS3.5 6.2); a modality that writes larger numbers (a time stamp) sends
    instances that are stored on either engine (PostgreSQL's INTEGER refused them before), the number
    not indexed."""
    path = copy_with(tmp_path, InstanceNumber=number, SeriesNumber=number)
    assert archive.ingest_file(path).outcome.ok
    (row,) = archive.index.read(text("SELECT i.instance_number, se.series_number FROM instances i "
                                     "JOIN series se ON se.pk = i.series_pk"))
    assert tuple(row) == (None, None)
    assert archive.ingest_file(copy_with(tmp_path, InstanceNumber="2147483647", SeriesNumber="-2147483648",
                                         SOPInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())).outcome.ok


def test_two_nodes_replacing_one_instance_at_once_leave_no_blob_behind(tmp_path, pg_cluster, monkeypatch):
    """storage.duplicates = "replace" on two nodes of one PostgreSQL index: both receive new content for one
    SOP Instance UID at the same moment (both look the row up before either writes). The second replacement
    must replace the first one's blob, not the original's again: every blob either is the instance's or is
    logged removed (before, the first node's new blob was referenced by nothing and never removed)."""
    import secrets
    import threading

    from archive import ingest
    from archive.index import Index

    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    a = Archive(tmp_path / "a", index_url=url, node="a", duplicates="replace")
    b = Archive(tmp_path / "b", index_url=url, node="b", duplicates="replace")
    try:
        assert a.ingest_file(copy_with(tmp_path, ImageComments="v0")).outcome.ok
        both_looked = threading.Barrier(2, timeout=10)
        look_up = Index.filed

        calls = []

        def look_up_then_wait(conn, header):          # both transactions read the row before either writes
            row = look_up(conn, header)
            calls.append(1)
            if len(calls) <= 2:                       # (the retry of the one that lost runs alone)
                both_looked.wait()
            return row

        monkeypatch.setattr(ingest.Index, "filed", staticmethod(look_up_then_wait))
        outcomes = {}
        versions = {"a": copy_with(tmp_path, ImageComments="v1"), "b": copy_with(tmp_path, ImageComments="v2")}
        threads = [threading.Thread(target=lambda n, node: outcomes.__setitem__(n, node.ingest_file(versions[n])),
                                    args=(n, node)) for n, node in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert {r.outcome for r in outcomes.values()} == {Outcome.REPLACED}
        held = {r[0] for r in a.index.read(text("SELECT blob_id FROM instances"))}
        removed = {r[0] for r in a.index.read(text("SELECT blob_id FROM changes WHERE kind = 'blob_removed'"))}
        everywhere = set(a.local.blob_ids()) | set(b.local.blob_ids()) | removed
        assert len(held) == 1 and len(removed) == 2                   # v0's and the first replacement's
        assert everywhere - held <= removed
    finally:
        a.close()
        b.close()


def test_keys_gone_from_a_data_directory_with_blobs_are_refused_not_replaced(tmp_path):
    """A process that opened the archive while `keys/` was missing made a new key, which reads none of the
    blobs stored before (found by the readiness test: the router started after the keys were moved)."""
    archive = Archive(tmp_path / "d")
    assert archive.ingest_file(data_file("CT_small.dcm")).outcome is Outcome.STORED
    archive.close()
    keys = tmp_path / "d" / "keys"
    keys.rename(tmp_path / "keys.away")
    with pytest.raises(IntegrityError, match=r"no key file \(\*\.kek\) in .*keys, but .*blobs holds blobs"):
        Archive(tmp_path / "d")
    assert not keys.exists()                               # and no key was made meanwhile
    (tmp_path / "keys.away").rename(keys)
    again = Archive(tmp_path / "d")
    try:
        assert [r[0] for r in again.index.read(text("SELECT COUNT(*) FROM instances"))] == [1]
        assert len(list(keys.glob("*.kek"))) == 1
    finally:
        again.close()
    fresh = Archive(tmp_path / "new")                      # a new data directory still gets its first key
    fresh.close()
    assert len(list((tmp_path / "new" / "keys").glob("*.kek"))) == 1


def test_readable_inspects_a_blob_once_and_one_that_fails_every_time(archive, tmp_path, monkeypatch):
    """`Archive.readable` checks the stored bytes within the limits before pydicom reads them. A blob is
    never rewritten and its bytes are checked against their SHA-256, so a blob found within the limits is
    not walked again (each frame request of a series walked its instance again: ~1.5 ms); one that is not
    is refused every time it is asked for."""
    import archive.ingest as ingest_module

    first, second = (archive.ingest_file(copy_with(tmp_path, SOPInstanceUID=generate_uid())) for _ in range(2))
    (row_1,), (row_2,) = ([archive.index.read(text("SELECT blob_id, sha256 FROM instances WHERE sop_instance_uid = :u"),
                                              {"u": r.sop_instance_uid})[0]] for r in (first, second))
    walked, real = [], ingest_module.inspect_bytes

    def counted(data, limits, spool):
        walked.append(limits)
        return real(data, limits, spool)

    monkeypatch.setattr(ingest_module, "inspect_bytes", counted)
    for _ in range(3):
        with archive.readable(*row_1, 1 << 20) as plain:
            assert pydicom.dcmread(plain).SOPInstanceUID == first.sop_instance_uid
    assert len(walked) == 1
    archive.limits = ingest_module.Limits(max_sequence_depth=0)     # CT_small holds a sequence
    for _ in range(2):
        with pytest.raises(ingest_module.InvalidInstance), archive.readable(*row_2, 1 << 20):
            pass
    assert len(walked) == 3
