"""The router's own tables and what it asks of the archive (issue 16: one owner per table).

The router's migrations; the result files it holds in the archive (recovery and the offloader
keep them without reading job_results, and let a replaced one go); the archive's typed reads
the router makes (archive/inputs.py); the job task's settings on an external worker.
"""
from __future__ import annotations

import asyncio
import threading

import sqlalchemy as sa

from archive import Archive
from archive import holds
from archive.index import Index
from archive.inputs import filed, input_series, series_changed, study_series
from router import queue, store
from router.task import own_settings
from helpers import synthetic_instances


def _file(archive: Archive, data: bytes) -> str:
    return archive.local.create([data]).blob_id


def _job(archive: Archive, study: str = "1.2.3") -> str:
    return queue.create(archive.index, study_uid=study, plugin="test-sc", params={}, inputs=["1.2.3.4"])


def test_the_router_migrations_are_recorded_once(tmp_path, index_url):
    archive = Archive(tmp_path / "var", index_url=index_url)
    store.migrate(archive.index)
    store.migrate(archive.index)
    assert [tuple(r) for r in archive.index.read(sa.text("SELECT version_num FROM alembic_version_router"))] == [
        ("router_0002",)]
    assert set(ROUTER_TABLES) <= set(sa.inspect(archive.index.engines.writer).get_table_names())


def test_result_files_are_kept_and_a_replaced_one_is_let_go(tmp_path, index_url):
    archive = Archive(tmp_path / "var", index_url=index_url)
    job = _job(archive)
    first = _file(archive, b"first")
    result = queue.Result("file", "note.txt", "text/plain", None, first, 5, "x")
    with archive.index.write() as conn:
        queue.record_results(conn, job, "1.2.3", [result])
    assert archive.index.blob_referenced(first) and list(archive.index.blobs_referenced([first, "0" * 32])) == [first]
    assert archive.recover() == 0 and archive.local.path(first).exists()
    # the job's results taken again (a re-run after a crash): the new file replaces the first
    second = _file(archive, b"second")
    with archive.index.write() as conn:
        queue.record_results(conn, job, "1.2.3", [queue.Result("file", "note.txt", "text/plain", None, second, 6,
                                                               "y")])
        assert holds.held(conn, store.HOLDER) == {second}
    assert not archive.index.blob_referenced(first)
    assert archive.recover() == 1
    assert not archive.local.path(first).exists() and archive.local.path(second).exists()
    kinds = [c[0] for c in archive.index.read(sa.text("SELECT kind FROM changes WHERE job_id = :job ORDER BY seq"),
                                               {"job": job})]
    assert kinds == ["job_queued", "file_stored", "file_stored"]
    assert [(r["name"], r["blob_id"]) for r in queue.results(archive.index, job)] == [("note.txt", second)]


# -- one schema for the router's tables, however the index was made ---------------------------------

ROUTER_TABLES = ("jobs", "job_results", "forwards", "router_studies", "router_fired", "deid_exports", "deid_patients",
                 "deid_studies")


def _schema(engine) -> dict:
    """The router's tables as SQLAlchemy reflects them, types by the Python values they hold (SQLite's
    INTEGER and BIGINT, PostgreSQL's INTEGER and BIGINT: int; REAL, DOUBLE PRECISION: float). A primary
    key column is NOT NULL (the old SQLite tables' `id TEXT PRIMARY KEY` does not say it: SQLite would
    take a NULL there, PostgreSQL never; the router never writes one)."""
    inspector = sa.inspect(engine)
    found = {}
    for table in ROUTER_TABLES:
        key = inspector.get_pk_constraint(table)["constrained_columns"]
        columns = [(c["name"], c["type"].python_type.__name__, c["nullable"] and c["name"] not in key,
                    str(c["default"]).strip("'") if c["default"] is not None else None)
                   for c in inspector.get_columns(table)]
        found[table] = {
            "columns": columns,
            "primary key": key,
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in inspector.get_indexes(table)),
            "foreign keys": sorted((tuple(f["constrained_columns"]), f["referred_table"],
                                    tuple(f["referred_columns"])) for f in inspector.get_foreign_keys(table)),
        }
    return found


def _made_by_the_router(where) -> Index:
    """An index whose router tables the router's revision made (the archive's are dropped first)."""
    index = Index(where)
    with index.write() as conn:
        for table in ("job_results", "forwards", "router_fired", "router_studies", "jobs"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
    store.migrate(index)
    return index


def _from_before_alembic(path, before: str | None = None):
    """A SQLite index made by the sqlite-utils migrations (the archive's, then the router's, up to
    `before`), as a node before issue 16 left it."""
    import sqlite_utils

    from archive.sqlite_legacy import connect
    from archive.sqlite_legacy import migrations as archive_migrations
    from router.sqlite_legacy import migrations as router_migrations

    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    archive_migrations.apply(sqlite_utils.Database(conn))
    router_migrations.apply(sqlite_utils.Database(conn), stop_before=before)
    conn.close()


def test_new_old_and_postgresql_indexes_have_one_router_schema(tmp_path, pg_cluster):
    new = Archive(tmp_path / "new").index
    store.migrate(new)
    expected = _schema(new.engines.writer)
    _from_before_alembic(tmp_path / "old" / "index.sqlite3")
    old = Index(tmp_path / "old" / "index.sqlite3")
    store.migrate(old)
    assert [r[0] for r in old.read(sa.text("SELECT version_num FROM alembic_version_router"))] == ["router_0002"]
    postgresql = Index(pg_cluster.create_database("t_schema_new"))
    store.migrate(postgresql)
    indexes = {"an old SQLite index": old, "a new PostgreSQL index": postgresql,
               "SQLite, made by the router": _made_by_the_router(tmp_path / "r.sqlite3"),
               "PostgreSQL, made by the router": _made_by_the_router(pg_cluster.create_database("t_schema_router"))}
    assert set(expected) == set(ROUTER_TABLES) and expected["jobs"]["primary key"] == ["id"]
    for what, index in indexes.items():
        assert _schema(index.engines.writer) == expected, what
        index.close()
    new.close()


def test_an_index_from_before_alembic_is_stamped_and_keeps_its_rows_and_result_files(tmp_path):
    """Made by the sqlite-utils migrations before the router held its result files (0002): stamped at
    router_0001 after the frozen migrations ran (then brought to the newest revision), its rows kept, its result files
    held."""
    _from_before_alembic(tmp_path / "var" / "index.sqlite3", before="0002_result_holds")
    archive = Archive(tmp_path / "var")
    job, blob = _job(archive), _file(archive, b"an X3D scene")
    with archive.index.write() as conn:
        conn.execute(sa.text("INSERT INTO job_results (job_id, kind, name, media_type, blob_id, size, sha256) "
                             "VALUES (:job, 'file', 'model.x3d', 'model/x3d+xml', :blob, 12, 'z')"),
                     {"job": job, "blob": blob})
        store.mark_fired(conn, "1.2.3", "ct", 0, 7)
    assert not archive.index.blob_referenced(blob)
    store.migrate(archive.index)
    assert archive.index.blob_referenced(blob)
    assert archive.recover() == 0 and archive.local.path(blob).exists()
    assert [r[0] for r in archive.index.read(sa.text("SELECT version_num FROM alembic_version_router"))] == [
        "router_0002"]
    assert [r[0] for r in archive.index.read(sa.text(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = 'router' ORDER BY name"))] == [
        "0001_tables", "0002_result_holds"]
    assert queue.get(archive.index, job).state == "queued" and store.fired_seq(archive.index, "1.2.3", "ct") == 7
    assert [r["name"] for r in queue.results(archive.index, job)] == ["model.x3d"]


# -- several routers on one index ------------------------------------------------------------------

def test_two_routers_lease_each_job_once(tmp_path, index_url):
    """Two routers (threads, each with an Index of its own) lease 50 jobs of one index at once."""
    archive = Archive(tmp_path / "var", index_url=index_url)
    made = {queue.create(archive.index, study_uid="1.2.3", plugin="test-sc", params={}, inputs=[], now=i)
            for i in range(50)}
    # opened one after the other: Alembic's context (archive.db.migrate) is one per process, not per thread
    indexes = {name: Index(index_url or tmp_path / "var" / "index.sqlite3") for name in ("a", "b")}
    start, leased, failures = threading.Barrier(2, timeout=60), {}, []

    def router(name: str) -> None:
        try:
            start.wait()
            got = []
            while batch := queue.lease(indexes[name], name, 1000.0, 60.0, limit=1):
                got += [job.id for job in batch]
            leased[name] = got
        except Exception as exc:           # reported below
            failures.append(exc)

    threads = [threading.Thread(target=router, args=(name,)) for name in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index in indexes.values():
        index.close()
    assert not failures and len(leased) == 2
    assert sorted(leased["a"] + leased["b"]) == sorted(made)           # each job leased once, by one of them
    jobs = queue.jobs_by_id(archive.index, list(made))
    assert {(job.state, job.attempts) for job in jobs.values()} == {("running", 1)}
    assert all(jobs[job_id].worker == name for name, ids in leased.items() for job_id in ids)
    running = archive.index.read(sa.text("SELECT job_id, COUNT(*) FROM changes WHERE kind = 'job_running' "
                                      "GROUP BY job_id"))
    assert {job_id for job_id, _ in running} == made and {n for _, n in running} == {1}
    archive.close()


def test_what_the_router_reads_of_the_archive(tmp_path, index_url):
    archive = Archive(tmp_path / "var", index_url=index_url)
    study = "1.2.826.0.1.3680043.8.498.91"
    ct = synthetic_instances(tmp_path / "a", 2, study=study)
    other = synthetic_instances(tmp_path / "b", 1, study=study)
    uids = [archive.ingest_file(p, calling_ae="CT1").sop_instance_uid for p in ct]
    archive.ingest_file(other[0])
    (first, second) = study_series(archive.index, study)
    assert first.modality == "CT" and first.calling_aes == frozenset({"CT1"}) and second.calling_aes == frozenset()
    assert first.sop_classes == frozenset({"1.2.840.10008.5.1.4.1.1.2"})
    series = input_series(archive.index, first.series_uid)
    assert series.modality == "CT" and sorted(i.sop_instance_uid for i in series.instances) == sorted(uids)
    assert input_series(archive.index, "1.2.999") is None
    where = filed(archive.index, [*uids, "1.2.999"])
    assert set(where) == set(uids) and {f.study_uid for f in where.values()} == {study}
    assert where[uids[0]].series_uid == first.series_uid
    assert series_changed(archive.index, study, 0, 10**9, ("stored",)) == {first.series_uid, second.series_uid}
    assert series_changed(archive.index, study, 2, 10**9, ("stored",)) == {second.series_uid}
    assert series_changed(archive.index, study, 0, 10**9, ("replaced",)) == set()


def test_an_external_worker_has_its_own_settings():
    """`m3dicom worker --config` installs its settings (router.worker) where the job task finds them."""
    from distributed import Client, Scheduler, Worker

    from router.worker import install

    async def main():
        async with Scheduler(dashboard_address=":0", host="127.0.0.1") as scheduler:
            async with Worker(scheduler.address, nthreads=1, host="127.0.0.1") as worker, \
                    Client(scheduler.address, asynchronous=True) as client:
                before = await client.submit(own_settings, pure=False)
                await install(worker, {"data_dir": "this machine's"})
                return before, await client.submit(own_settings, pure=False)

    assert asyncio.run(main()) == (None, {"data_dir": "this machine's"})
    assert own_settings() is None                        # not in a worker: the node's settings, from the job


def _stage(archive: Archive, data: bytes, kind: str, name: str, in_s3: bool = False):
    import hashlib

    from router.task import StagedOutput

    blob = archive.local.create([data])
    return StagedOutput(kind, name, "application/dicom" if kind == "dicom" else "text/plain", blob.blob_id,
                        len(data), hashlib.sha256(data).hexdigest(), None, in_s3)


def test_results_staged_in_the_node_storage_are_adopted_as_they_are(tmp_path, index_url):
    from router.intake import take_results

    archive = Archive(tmp_path / "var", index_url=index_url)
    job = _job(archive)
    (dicom,) = synthetic_instances(tmp_path / "r", 1)
    outputs = (_stage(archive, dicom.read_bytes(), "dicom", "sc"), _stage(archive, b"<X3D/>", "file", "model.x3d"))
    assert take_results(archive, job, "1.2.3", outputs, tmp_path / "spool") == 2
    (instance,), = archive.index.read(sa.text("SELECT blob_id FROM instances"))
    results = {r["name"]: r for r in queue.results(archive.index, job)}
    assert instance == outputs[0].blob_id and results["model.x3d"]["blob_id"] == outputs[1].blob_id
    assert all(archive.local.exists(o.blob_id) for o in outputs) and archive.recover() == 0
    assert archive.storage.read_all(outputs[1].blob_id) == b"<X3D/>"
    # taken again (a re-run after a crash): the instance is already stored, its new copy goes; the file is replaced
    again = (_stage(archive, dicom.read_bytes(), "dicom", "sc"), _stage(archive, b"<X3D/>", "file", "model.x3d"))
    take_results(archive, job, "1.2.3", again, tmp_path / "spool")
    assert not archive.local.exists(again[0].blob_id) and archive.local.exists(again[1].blob_id)
    assert archive.recover() == 1 and not archive.local.exists(outputs[1].blob_id)    # the replaced file
    assert archive.index.read(sa.text("SELECT blob_id FROM instances"))[0][0] == instance


def test_results_staged_elsewhere_are_copied_in_and_a_damaged_one_is_refused(tmp_path, index_url):
    from dataclasses import replace

    import pytest

    from router.intake import IntakeError, take_results

    archive = Archive(tmp_path / "var", index_url=index_url)
    job = _job(archive)
    outputs = (_stage(archive, b"findings", "file", "findings.json", in_s3=True),)
    take_results(archive, job, "1.2.3", outputs, tmp_path / "spool")
    (result,) = queue.results(archive.index, job)
    assert result["blob_id"] != outputs[0].blob_id and not archive.local.exists(outputs[0].blob_id)
    assert archive.storage.read_all(result["blob_id"]) == b"findings"
    bad = replace(_stage(archive, b"scene", "file", "model.x3d"), sha256="0" * 64)
    with pytest.raises(IntakeError, match="SHA-256"):
        take_results(archive, job, "1.2.3", (bad,), tmp_path / "spool")
    assert not archive.index.blob_referenced(bad.blob_id)
