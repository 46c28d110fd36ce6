"""Several nodes' routers on one index (PostgreSQL, issue 16): a job runs once across them, a lease names
its holder, a dead node's jobs are taken over once their leases expire, a restarted router takes its
own back at once.

Real routers (router.service.Router) on a real PostgreSQL, each with its own Archive on the shared index;
the jobs run inline (the executor of test_router_unit.py), or never finish (a router killed mid-job).
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import threading
import time

import pytest

from archive import Archive
from node import cli
from node.config import from_dict
from router import queue, store
from router.jobs import Expire, Fail, IllegalTransition, Job, Lease, Renew, Succeed, handle
from router.service import Router
from helpers import synthetic_instances
from test_router_unit import InlineExecutor

PLUGINS = ["plugins_for_tests:MarkedCopy"]
RULE = {"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 0}
LEASE = 5.0


class Executor(InlineExecutor):
    """Runs each job at once, as many at a time as asked."""

    def __init__(self, capacity: int = 1):
        super().__init__()
        self._capacity = capacity

    def capacity(self) -> int:
        return self._capacity


class Hanging:
    """A Dask future of a job still running (on a node about to die, or stalled: it ends when told)."""

    def __init__(self):
        self.status = "pending"

    def done(self) -> bool:
        return self.status != "pending"

    def exception(self):
        return RuntimeError("finished late")

    def cancel(self) -> None:
        pass

    def add_done_callback(self, callback) -> None:
        pass


class HangingExecutor(Executor):
    def __init__(self, capacity: int = 1):
        super().__init__(capacity)
        self.futures: list[Hanging] = []

    def submit(self, spec, attempt, wants_gpu):
        self.submitted.append(spec.job_id)
        self.futures.append(Hanging())
        return self.futures[-1]


@pytest.fixture
def nodes(tmp_path, pg_cluster):
    """node(name, executor, clock) -> a Router named `name` (its lease holder), with an Archive of its own
    on the one shared index; and an ingest into that index."""
    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    archives = []

    def node(name: str, executor, clock=time.time) -> Router:
        config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                            "router": {"plugins": PLUGINS, "rules": [RULE], "lease_seconds": LEASE}}, tmp_path)
        archive = Archive(config.data_dir, index_url=url)
        archives.append(archive)
        store.migrate(archive.index)
        return Router(config, archive, executor, clock=clock, name=name)

    def ingest(studies: int) -> None:
        archive = Archive(tmp_path / "var", index_url=url)
        archives.append(archive)
        for n in range(studies):
            for path in synthetic_instances(tmp_path / "in" / str(n), 1):
                assert archive.ingest_file(path).outcome.ok

    yield node, ingest
    for archive in archives:
        archive.close()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_two_routers_run_each_job_once(nodes, caplog):
    node, ingest = nodes
    ingest(20)
    a, b = node(f"node-a/{os.getpid()}", Executor()), node(f"node-b/{os.getpid()}", Executor())
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop, 0.01)) for r in (a, b)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            jobs = queue.jobs(a.index)
            if len(jobs) >= 20 and not {"queued", "running"} & {j.state for j in jobs}:
                break
            assert time.monotonic() < deadline, f"jobs not all done: {[j.state for j in jobs]}"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    jobs = queue.jobs(a.index)
    assert [j.state for j in jobs] == ["succeeded"] * 20 and len({j.study_uid for j in jobs}) == 20  # made once
    assert sorted(a.executor.submitted + b.executor.submitted) == sorted(j.id for j in jobs)   # each run once
    assert {j.attempts for j in jobs} == {1}
    assert {j.worker for j in jobs} <= {a.name, b.name}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []   # no round failed


def test_a_dead_nodes_jobs_are_taken_over_once_their_leases_expire(nodes):
    node, ingest = nodes
    ingest(3)
    clock = [time.time()]
    a = node(f"node-a/{os.getpid()}", HangingExecutor(capacity=10), clock=lambda: clock[0])
    a.step()
    jobs = queue.jobs(a.index)
    assert len(jobs) == 3 and {(j.state, j.worker) for j in jobs} == {("running", a.name)}
    del a                                      # node A killed mid-job: nothing released, its leases stay

    b = node(f"node-b/{os.getpid()}", Executor(capacity=10), clock=lambda: clock[0])
    clock[0] += LEASE - 1
    b.step()
    b.step()
    assert b.executor.submitted == []          # A's leases still hold: B neither takes back nor runs them
    assert {(j.state, j.worker) for j in queue.jobs(b.index)} == {("running", f"node-a/{os.getpid()}")}
    clock[0] += 2                              # A's leases have expired
    for _ in range(3):
        b.step()
    jobs = queue.jobs(b.index)
    assert sorted(b.executor.submitted) == sorted(j.id for j in jobs)       # each finished on B, once
    assert {(j.state, j.worker, j.attempts) for j in jobs} == {("succeeded", b.name, 2)}
    assert all("lease expired: worker node-a/" in j.errors[0] for j in jobs)


def test_a_lease_counts_from_when_the_cluster_is_up_not_from_the_start_of_the_round(nodes):
    """A router's first round starts its Dask cluster (seconds, more on a busy machine): a lease taken
    then must not be over before the job is submitted, or another router takes a live job over."""
    node, ingest = nodes
    ingest(1)
    clock = [time.time() + 600]                # later than the ingest: the study is quiet at once

    class SlowStart(HangingExecutor):
        def capacity(self) -> int:
            if not self.futures:               # the cluster starts: longer than a lease
                clock[0] += 2 * LEASE
            return super().capacity()

    a = node(f"node-a/{os.getpid()}", SlowStart(), clock=lambda: clock[0])
    a.step()
    (job,) = queue.jobs(a.index)
    assert (job.state, job.worker, job.lease_expires) == ("running", a.name, clock[0] + LEASE)
    b = node(f"node-b/{os.getpid()}", Executor(), clock=lambda: clock[0])
    b.step()
    assert b.executor.submitted == [] and queue.get(b.index, job.id).worker == a.name


def test_a_stalled_router_whose_job_was_taken_over_lets_it_go(nodes, tmp_path, capsys):
    node, ingest = nodes
    ingest(1)
    clock = [time.time()]
    a = node(f"node-a/{os.getpid()}", HangingExecutor(), clock=lambda: clock[0])
    b = node(f"node-b/{os.getpid()}", HangingExecutor(), clock=lambda: clock[0])
    a.step()
    (job,) = queue.jobs(a.index)
    clock[0] += LEASE + 1                      # A stalled past its lease: B takes the job over
    b.step()
    assert b.executor.submitted == [job.id]
    a.executor.futures[0].status = "error"     # then A's attempt ends, late, with an error: not A's to record
    clock[0] += 1
    a.step()
    after = queue.get(a.index, job.id)
    assert (after.state, after.worker, after.attempts, len(after.errors)) == ("running", b.name, 2, 1)
    assert a.running == {} and after.lease_expires == clock[0] - 1 + LEASE   # B's lease, not renewed by A
    config = tmp_path / "m3dicom.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[index]\nurl = "{a.archive.index.engines.where}"\n'
                      '[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "unused"\n')     # a shared index needs S3
    capsys.readouterr()
    assert cli.main(["jobs", "list", "--config", str(config)]) == 0
    assert f"held by {b.name}, lease until" in capsys.readouterr().out      # `m3dicom jobs`: who runs it


def test_a_restarted_router_takes_back_its_dead_selfs_jobs_at_once_not_a_live_ones(nodes):
    node, ingest = nodes
    clock = [time.time() + 600]                # later than every ingest below: each study is quiet at once
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        ingest(1)
        live = node(f"node-a/{sleeper.pid}", HangingExecutor(capacity=10), clock=lambda: clock[0])
        live.step()                            # a live router of the same node name (a second process)
        (kept,) = {j.id for j in queue.jobs(live.index)}
        ingest(2)
        dead = node(f"node-a/{_dead_pid()}", HangingExecutor(capacity=10), clock=lambda: clock[0])
        dead.step()                            # leases the two new jobs, then dies
        held = {j.id for j in queue.jobs(dead.index)} - {kept}
        assert len(held) == 2 and queue.get(dead.index, kept).worker == live.name

        other = node(f"node-b/{os.getpid()}", Executor(capacity=10), clock=lambda: clock[0])
        other.step()
        assert other.executor.submitted == []  # another node's leases are not taken back, however dead
        restarted = node(f"node-a/{os.getpid()}", Executor(capacity=10), clock=lambda: clock[0])
        restarted.step()                       # the same node name: its dead earlier self's jobs, now
        restarted.step()
        assert sorted(restarted.executor.submitted) == sorted(held)
        jobs = {j.id: j for j in queue.jobs(restarted.index)}
        assert {jobs[i].state for i in held} == {"succeeded"}
        assert all("gone (its router restarted)" in jobs[i].errors[0] for i in held)
        assert (jobs[kept].state, jobs[kept].worker) == ("running", live.name)   # a live one's job stays
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_due_forward_is_sent_by_one_router(nodes):
    node, ingest = nodes
    ingest(1)
    a = node(f"node-a/{os.getpid()}", Executor())
    a.step()
    (job,) = queue.jobs(a.index)
    store.queue_forwards(a.index, job.id, ["pacs"], 100.0)
    assert store.due_forwards(a.index, 200.0) == [(job.id, "pacs")]
    assert store.claim_forward(a.index, job.id, "pacs", 200.0, 260.0)
    assert not store.claim_forward(a.index, job.id, "pacs", 200.0, 260.0)    # the other router: taken
    assert store.due_forwards(a.index, 230.0) == []
    assert store.claim_forward(a.index, job.id, "pacs", 261.0, 321.0)        # its sender died: tried again


def test_only_a_leases_holder_renews_finishes_or_fails_it():
    job = handle(Job("j"), Lease("node-a/1", 100.0, 60.0))
    for event in (Renew(110.0, 60.0, "node-b/1"), Succeed(110.0, "node-b/1"), Fail(110.0, "x", worker="node-b/1")):
        with pytest.raises(IllegalTransition, match="leased to node-a/1, not to node-b/1"):
            handle(job, event)
    assert handle(job, Renew(110.0, 60.0, "node-a/1")).lease_expires == 170.0
    assert handle(job, Succeed(120.0, "node-a/1")).state == "succeeded"
    with pytest.raises(IllegalTransition, match="still valid"):
        handle(job, Expire(120.0, gone="node-a/2"))
    assert handle(job, Expire(120.0, gone="node-a/1")).state == "queued"


def test_a_job_whose_inputs_another_node_has_not_offloaded_waits_without_using_an_attempt(
        tmp_path, pg_cluster, moto, caplog):
    """Node A received the study and has not put it in S3 yet (its offloader behind, or S3 away from A): node
    B's router leaves the job queued, its attempts untouched (B cannot read those instances), rather than
    failing an attempt on them; A's router runs it. Once A has offloaded the instances B would run such a
    job; and a node not seen for `nodes.ALIVE_SECONDS` is not waited for."""
    from archive import nodes as archive_nodes
    from archive.s3 import MIN_PART, S3Storage
    from sqlalchemy import text

    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    bucket = moto.new_bucket()
    archives = []

    def router(name: str, executor) -> Router:
        config = from_dict({"node": {"data_dir": str(tmp_path / name), "name": name},
                            "router": {"plugins": PLUGINS, "rules": [RULE], "lease_seconds": LEASE}}, tmp_path)
        archive = Archive(config.data_dir, index_url=url, node=name,
                          remote=lambda keyring: S3Storage(moto.client(), bucket, keyring, part_size=MIN_PART))
        archives.append(archive)
        store.migrate(archive.index)
        archive_nodes.register(archive.index, name, config.data_dir, "host")
        return Router(config, archive, executor, name=f"{name}/{os.getpid()}")

    try:
        b = router("node-b", Executor())
        a = router("node-a", Executor())
        for path in synthetic_instances(tmp_path / "in", 2):
            assert a.archive.ingest_file(path).outcome.ok          # received by A: A's, not in S3
        with caplog.at_level(logging.INFO, logger="router.service"):
            b.step()
            b.step()
        (job,) = queue.jobs(b.index)
        assert b.executor.submitted == [] and (job.state, job.attempts, job.errors) == ("queued", 0, [])
        assert "waits: 2 instances on node node-a not in S3 yet" in caplog.text
        a.step()                                                    # A can read them: A runs it
        a.step()
        assert a.executor.submitted == [job.id]
        assert queue.get(a.index, job.id).state == "succeeded"

        with a.index.write() as conn:                               # A has offloaded them: nothing to wait for
            conn.execute(text("INSERT INTO offload (blob_id, state, next_try, queued_at, node) "
                              "SELECT blob_id, 'offloaded', 0, 0, node FROM instances"))
        assert archive_nodes.not_offloaded_elsewhere(b.index, job.inputs, "node-b") == {}
        with a.index.write() as conn:                               # not yet, but A is gone
            conn.execute(text("UPDATE offload SET state = 'pending'"))
        assert archive_nodes.not_offloaded_elsewhere(b.index, job.inputs, "node-b") == {"node-a": 2}
        later = time.time() + archive_nodes.ALIVE_SECONDS + 1
        assert archive_nodes.not_offloaded_elsewhere(b.index, job.inputs, "node-b", clock=lambda: later) == {}
    finally:
        for archive in archives:
            archive.close()


def test_leases_are_timed_by_the_index_clock_not_by_a_nodes_own(nodes, monkeypatch):
    """A node whose clock is an hour ahead (no NTP) must not see every other node's lease as expired and take
    their live jobs over: routers on PostgreSQL time leases by the index's clock (router.service.IndexClock).
    (Fails with the node's own clock: `clock=AnHourAhead.time`.)"""
    import router.service as service

    node, ingest = nodes
    ingest(1)
    real = time.time

    class AnHourAhead:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def time() -> float:
            return real() + 3600

    monkeypatch.setattr(service, "time", AnHourAhead)
    a = node(f"node-a/{os.getpid()}", HangingExecutor(), clock=None)      # its default clock: the index's
    assert abs(service.IndexClock(a.index)() - a.index.now()) < 1.0      # the machine's clock is off, not this
    a.step()
    (job,) = queue.jobs(a.index)
    assert job.state == "running" and abs(job.lease_expires - (a.index.now() + LEASE)) < 2.0
