"""What the viewer owns (its tables and their migrations) and what it asks the owners of the
others for: the archive's study facts (archive/facts.py), the router's jobs (router/queue.py)."""
from __future__ import annotations

import hashlib

from archive import Archive, facts
from archive.query import STUDY_ROOT, Query
from helpers import synthetic_instances
from router import queue
from viewer import accounts

VIEWER_TABLES = ("users", "sessions", "login_failures", "share_links", "audit")
# sha256 of the viewer's tables and indexes in sqlite_master as archive/index.py's migration
# 0005_viewer made them until issue 16 (see _schema): an index made since must hold the same
SCHEMA_0005 = "c4a283cc64c6fba96a189ffd8c65f6f03fba1f281b92723db0fc313c5153ecfd"


def _schema(index) -> str:
    rows = index.query(f"SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name IN "
                       f"({','.join('?' * len(VIEWER_TABLES))}) ORDER BY type, name", VIEWER_TABLES)
    return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()


def test_the_viewers_migration_makes_the_tables_archive_made_before(tmp_path):
    archive = Archive(tmp_path / "d")
    try:
        assert not archive.index.query("SELECT name FROM sqlite_master WHERE name='users'")   # not archive's any more
        accounts.migrate(archive.index)
        accounts.migrate(archive.index)                                                       # applies nothing twice
        assert _schema(archive.index) == SCHEMA_0005
        assert [tuple(r) for r in archive.index.query(
            "SELECT name FROM _sqlite_migrations WHERE migration_set='viewer'")] == [("0001_accounts",)]
    finally:
        archive.close()


def test_an_index_whose_viewer_tables_came_from_archive_keeps_them_and_their_rows(tmp_path):
    """An index from before issue 16: archive's 0005_viewer made the tables (here: the same
    statements, and no record of the viewer's migration). The viewer's first migration finds
    them and changes nothing."""
    archive = Archive(tmp_path / "d")
    try:
        with archive.index.write() as conn:
            for statement in accounts._TABLES:
                conn.exec_driver_sql(statement.replace(" IF NOT EXISTS", ""))
            conn.exec_driver_sql("INSERT INTO users (name, role, password, created_at) VALUES ('old', 'admin', 'x', 0)")
        accounts.migrate(archive.index)
        assert _schema(archive.index) == SCHEMA_0005
        assert accounts.users(archive.index) == [("old", "admin", False)]
    finally:
        archive.close()


def test_study_facts(tmp_path):
    archive = Archive(tmp_path / "d")
    try:
        paths = synthetic_instances(tmp_path / "in", 2, patient="Facts^Pat", patient_id="F-1")
        stored = [archive.ingest_file(p) for p in paths]
        study_uid = stored[0].study_uid
        found = facts.study(archive.index, study_uid)
        assert (found.study_uid, found.patient_name, found.patient_id) == (study_uid, "Facts^Pat", "F-1")
        (series,) = found.series
        assert {i.sop_instance_uid for i in series.instances} == {r.sop_instance_uid for r in stored}
        assert all(i.job_id is None for i in series.instances)
        assert facts.study(archive.index, "1.2.3.4") is None
        assert facts.study_of_instance(archive.index, stored[1].sop_instance_uid) == study_uid
        assert facts.study_of_instance(archive.index, "1.2.3.4") is None
        blob = facts.stored_instance(archive.index, stored[0].sop_instance_uid)
        with archive.exported(blob.blob_id, blob.sha256) as path:
            assert path.read_bytes() == paths[0].read_bytes()
        assert facts.stored_instance(archive.index, "1.2.3.4") is None

        listed = facts.listed_studies(archive.index, [study_uid, "1.2.3.4", study_uid])
        assert list(listed) == [study_uid] and listed[study_uid]["PatientID"] == "F-1"
        assert listed[study_uid]["images"] == 2
        from pydicom.dataset import Dataset
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID, identifier.StudyInstanceUID = "STUDY", "F-1", ""
        (row,) = facts.study_page(archive.index, Query(STUDY_ROOT, identifier))
        assert row["StudyInstanceUID"] == study_uid
    finally:
        archive.close()


def test_jobs_of_studies_and_by_id(tmp_path):
    archive = Archive(tmp_path / "d")
    try:
        index = archive.index
        first = queue.create(index, study_uid="1.1", plugin="p", params={}, inputs=["9.1"], now=1.0)
        second = queue.create(index, study_uid="1.1", plugin="q", params={}, inputs=["9.2"], now=2.0)
        other = queue.create(index, study_uid="1.2", plugin="p", params={}, inputs=[], now=3.0)
        found = queue.jobs_of_studies(index, ["1.1", "1.2", "1.3"])
        assert [j.id for j in found["1.1"]] == [second, first]           # the newest first
        assert [j.id for j in found["1.2"]] == [other] and "1.3" not in found
        assert found["1.1"][1].inputs == ["9.1"] and found["1.1"][1].state == "queued"
        by_id = queue.jobs_by_id(index, [first, other, first, "0" * 16])
        assert set(by_id) == {first, other} and by_id[other].study_uid == "1.2"
        assert queue.jobs_of_studies(index, []) == {} and queue.jobs_by_id(index, []) == {}
    finally:
        archive.close()
