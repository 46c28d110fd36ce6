"""The router's own tables and what it asks of the archive (issue 16: one owner per table).

The router's migrations; the result files it holds in the archive (recovery and the offloader
keep them without reading job_results, and let a replaced one go); the archive's typed reads
the router makes (archive/inputs.py); the job task's settings on an external worker.
"""
from __future__ import annotations

import asyncio

from archive import Archive
from archive import holds
from archive.inputs import filed, input_series, series_changed, study_series
from router import queue, store
from router.task import own_settings
from helpers import synthetic_instances


def _file(archive: Archive, data: bytes) -> str:
    return archive.local.create([data]).blob_id


def _job(archive: Archive, study: str = "1.2.3") -> str:
    return queue.create(archive.index, study_uid=study, plugin="test-sc", params={}, inputs=["1.2.3.4"])


def test_the_router_migrations_are_recorded_once(tmp_path):
    archive = Archive(tmp_path / "var")
    store.migrate(archive.index)
    store.migrate(archive.index)
    rows = archive.index.query("SELECT name FROM _sqlite_migrations WHERE migration_set='router' ORDER BY rowid")
    assert [r[0] for r in rows] == ["0001_tables", "0002_result_holds"]
    for table in ("jobs", "job_results", "forwards", "router_studies", "router_fired"):
        assert archive.index.query("SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?", (table,))[0][0]


def test_result_files_are_kept_and_a_replaced_one_is_let_go(tmp_path):
    archive = Archive(tmp_path / "var")
    job = _job(archive)
    first = _file(archive, b"first")
    result = queue.Result("file", "note.txt", "text/plain", None, first, 5, "x")
    with archive.index.write() as conn:
        queue.record_results(conn, job, "1.2.3", [result])
    assert archive.index.blob_referenced(first) and first in archive.index.blob_ids()
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
    kinds = [c[0] for c in archive.index.query("SELECT kind FROM changes WHERE job_id=? ORDER BY seq", (job,))]
    assert kinds == ["job_queued", "file_stored", "file_stored"]
    assert [(r["name"], r["blob_id"]) for r in queue.results(archive.index, job)] == [("note.txt", second)]


def test_an_index_from_before_holds_keeps_its_result_files(tmp_path):
    """job_results rows written by a version without blob_holds: the router's migration holds them."""
    archive = Archive(tmp_path / "var")
    store.migrate(archive.index)
    job, blob = _job(archive), _file(archive, b"an X3D scene")
    with archive.index.write() as conn:
        conn.exec_driver_sql("INSERT INTO job_results (job_id, kind, name, media_type, blob_id, size, sha256) "
                     "VALUES (?, 'file', 'model.x3d', 'model/x3d+xml', ?, 12, 'z')", (job, blob))
        conn.exec_driver_sql("DELETE FROM _sqlite_migrations WHERE migration_set='router'")
    assert not archive.index.blob_referenced(blob)
    store.migrate(archive.index)
    assert archive.index.blob_referenced(blob)
    assert archive.recover() == 0 and archive.local.path(blob).exists()


def test_what_the_router_reads_of_the_archive(tmp_path):
    archive = Archive(tmp_path / "var")
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


def test_results_staged_in_the_node_storage_are_adopted_as_they_are(tmp_path):
    from router.intake import take_results

    archive = Archive(tmp_path / "var")
    job = _job(archive)
    (dicom,) = synthetic_instances(tmp_path / "r", 1)
    outputs = (_stage(archive, dicom.read_bytes(), "dicom", "sc"), _stage(archive, b"<X3D/>", "file", "model.x3d"))
    assert take_results(archive, job, "1.2.3", outputs, tmp_path / "spool") == 2
    (instance,), = archive.index.query("SELECT blob_id FROM instances")
    results = {r["name"]: r for r in queue.results(archive.index, job)}
    assert instance == outputs[0].blob_id and results["model.x3d"]["blob_id"] == outputs[1].blob_id
    assert all(archive.local.exists(o.blob_id) for o in outputs) and archive.recover() == 0
    assert archive.storage.read_all(outputs[1].blob_id) == b"<X3D/>"
    # taken again (a re-run after a crash): the instance is already stored, its new copy goes; the file is replaced
    again = (_stage(archive, dicom.read_bytes(), "dicom", "sc"), _stage(archive, b"<X3D/>", "file", "model.x3d"))
    take_results(archive, job, "1.2.3", again, tmp_path / "spool")
    assert not archive.local.exists(again[0].blob_id) and archive.local.exists(again[1].blob_id)
    assert archive.recover() == 1 and not archive.local.exists(outputs[1].blob_id)    # the replaced file
    assert archive.index.query("SELECT blob_id FROM instances")[0][0] == instance


def test_results_staged_elsewhere_are_copied_in_and_a_damaged_one_is_refused(tmp_path):
    from dataclasses import replace

    import pytest

    from router.intake import IntakeError, take_results

    archive = Archive(tmp_path / "var")
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
