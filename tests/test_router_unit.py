"""The router's loop over the archive API, with a fake clock and an executor that runs inline.

The real Dask path is in test_router.py; here the rules, the quiet period, superseding and
a re-run after a crash are checked step by step.
"""
from __future__ import annotations

import queue as stdqueue

import pytest
from sqlalchemy import text

from archive import Archive
from router.task import run_job
from node.config import from_dict
from router import queue, store
from router.api import JobRequestError, plugins_for_study, request_job
from router.service import Router, RouterError
from helpers import synthetic_instances

PLUGINS = ["plugins_for_tests:MarkedCopy", "plugins_for_tests:AlwaysFails"]


class InlineFuture:
    """What the router needs of a Dask future, for a call made at once."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        try:
            self._value, self.status = fn(*args), "finished"
        except Exception as exc:
            self._error, self.status = exc, "error"

    def done(self) -> bool:
        return True

    def result(self):
        return self._value

    def exception(self):
        return self._error

    def cancel(self) -> None:
        self.status = "cancelled"

    def add_done_callback(self, callback) -> None:
        callback(self)


class InlineExecutor:
    def __init__(self):
        self.progress = stdqueue.SimpleQueue()
        self.submitted = []

    def capacity(self) -> int:
        return 1

    def submit(self, spec, attempt, wants_gpu):
        self.submitted.append(spec.job_id)
        return InlineFuture(run_job, spec)

    def close(self) -> None:
        pass


@pytest.fixture
def setup(tmp_path, index_url):
    """make(rules) -> (router, archive), the index on SQLite or PostgreSQL; called again: the node restarted."""
    clock = [1000.0]

    def make(rules, **router):
        config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                            "router": {"plugins": PLUGINS, "rules": rules, **router}}, tmp_path)
        archive = Archive(config.data_dir, index_url=index_url)
        store.migrate(archive.index)
        return Router(config, archive, InlineExecutor(), clock=lambda: clock[0]), archive
    return make, clock


def ingest(archive, paths, clock, at):
    clock[0] = at
    for path in paths:
        # the change log's time is the time of ingest: pin it to the fake clock
        assert archive.ingest_file(path).outcome.ok
    with archive.index.write() as conn:
        conn.execute(text("UPDATE changes SET time = :at WHERE time > :since"), {"at": at, "since": at - 1e6})


def test_the_quiet_period_then_one_job_per_series_then_results(setup, tmp_path):
    make, clock = setup
    router, archive = make([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 5}])
    study = "1.2.826.0.1.3680043.8.498.77"
    ingest(archive, synthetic_instances(tmp_path / "a", 2, study=study) +
           synthetic_instances(tmp_path / "b", 1, study=study), clock, 1000.0)
    clock[0] = 1004.0
    router.step()
    assert queue.jobs(archive.index) == []                      # still inside the quiet period
    clock[0] = 1005.5
    router.step()
    made = queue.jobs(archive.index)
    assert sorted(len(j.inputs) for j in made) == [1, 1]         # per series: two series, two jobs
    for _ in range(3):
        router.step()
    assert {j.state for j in queue.jobs(archive.index)} == {"succeeded"}
    assert archive.index.read(text("SELECT COUNT(*) FROM instances WHERE job_id IS NOT NULL"))[0][0] == 4
    assert archive.index.read(text("SELECT COUNT(*) FROM router_studies"))[0][0] == 0
    router.step()
    assert len(queue.jobs(archive.index)) == 2                   # results are not routed again


def test_a_study_no_rule_matches_is_only_stored(setup, tmp_path):
    make, clock = setup
    router, archive = make([{"name": "mg", "match": {"Modality": "MG"}, "plugin": "test-sc", "quiet_seconds": 1}])
    ingest(archive, synthetic_instances(tmp_path / "a", 1), clock, 1000.0)
    clock[0] = 1010.0
    router.step()
    assert queue.jobs(archive.index) == [] and router.executor.submitted == []
    assert archive.index.read(text("SELECT COUNT(*) FROM router_studies"))[0][0] == 0


def test_a_job_run_again_after_a_crash_stores_nothing_twice(setup, tmp_path):
    make, clock = setup
    router, archive = make([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 0}])
    ingest(archive, synthetic_instances(tmp_path / "a", 1), clock, 1000.0)
    for _ in range(3):
        router.step()
    (job,) = queue.jobs(archive.index)
    stored = archive.index.read(text("SELECT sop_instance_uid FROM instances WHERE job_id = :job ORDER BY 1"),
                                 {"job": job.id})
    # the node died after taking the results in, before the job was marked succeeded: its restarted router
    # (the same node name) takes the job back at once
    with archive.index.write() as conn:
        conn.execute(text("UPDATE jobs SET state = 'running', lease_expires = :lease, attempts = 1 WHERE id = :job"),
                     {"lease": clock[0] + 1000, "job": job.id})
    restarted, _ = make([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 0}])
    for _ in range(3):
        restarted.step()
    again = queue.get(archive.index, job.id)
    assert again.state == "succeeded" and again.attempts == 2 and "its router restarted" in again.errors[0]
    assert archive.index.read(text("SELECT sop_instance_uid FROM instances WHERE job_id = :job ORDER BY 1"),
                               {"job": job.id}) == stored
    assert archive.index.read(text("SELECT COUNT(*) FROM job_results WHERE job_id = :job"), {"job": job.id})[0][0] == 3
    assert archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0] == 3


def test_an_unknown_plugin_or_bad_parameters_stop_the_router_with_the_rule_named(setup):
    make, _ = setup
    with pytest.raises(RouterError, match=r"router.rules\[0\] \(x\): no plug-in named 'nope'"):
        make([{"name": "x", "plugin": "nope"}])
    with pytest.raises(RouterError, match=r"router.rules\[0\] \(x\).params: size"):
        make([{"name": "x", "plugin": "test-sc", "params": {"size": 1000}}])


def test_jobs_requested_through_the_api(setup, tmp_path):
    make, clock = setup
    router, archive = make([])
    ingest(archive, synthetic_instances(tmp_path / "a", 1, study="1.2.3.4"), clock, 1000.0)
    assert set(plugins_for_study(archive.index, router.plugins, "1.2.3.4")) == {"test-sc", "test-fail", "bone-model"}
    with pytest.raises(JobRequestError, match="no plug-in"):
        request_job(archive.index, router.plugins, study_uid="1.2.3.4", plugin="nope", params={}, created_by="t")
    with pytest.raises(JobRequestError, match="takes no series"):
        request_job(archive.index, router.plugins, study_uid="9.9", plugin="test-sc", params={}, created_by="t")
    (job_id,) = request_job(archive.index, router.plugins, study_uid="1.2.3.4", plugin="test-sc",
                            params={"size": 4}, created_by="alice")
    router.step()
    router.step()
    job = queue.get(archive.index, job_id)
    assert (job.state, job.created_by, job.params["size"]) == ("succeeded", "alice", 4)
    kinds = [r[0] for r in archive.index.read(text("SELECT kind FROM changes WHERE job_id = :job ORDER BY seq"),
                                               {"job": job_id})]
    assert kinds[0] == "job_queued" and kinds[-1] == "job_succeeded" and "job_running" in kinds


def test_a_router_with_nothing_running_rests_between_rounds(setup):
    """Each round reads the index ~9 times: while nothing of its own runs, the router steps every RESTING second
    (or half its shortest quiet period, never under `idle`), not every `idle`; something running brings `idle` back."""
    import threading
    import time

    make, _ = setup
    for quiet, resting in [(1, 0.5), (0.2, 0.25), (5, 1.0)]:
        router, _ = make([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": quiet}])
        assert router.resting(0.25) == resting
    rounds: list[float] = []
    router.step = lambda: rounds.append(time.monotonic())

    def rounds_in(seconds: float) -> int:
        rounds.clear()
        stop = threading.Event()
        runner = threading.Thread(target=router.run, args=(stop,), kwargs={"idle": 0.25})
        runner.start()
        time.sleep(seconds)
        stop.set()
        router._wake.set()
        runner.join(5)
        return len(rounds)

    assert rounds_in(1.6) <= 2                        # at 0 s and 1 s
    router.running["job"] = object()                  # a job of this router's runs: every `idle`
    assert rounds_in(1.6) >= 5


def test_a_lost_scheduler_holds_nothing_and_is_connected_again_when_back(monkeypatch):
    """While an external scheduler is away the router gets no capacity at once (asking the reconnecting client
    blocked the router, and a stop of the node, for 15 s); once the client gives up, each round connects again,
    briefly, and jobs flow when the scheduler is back (the closed client raised TypeError every round before)."""
    import subprocess
    import sys
    import time
    from pathlib import Path
    from types import SimpleNamespace

    from helpers import free_port, wait_for
    from router.executor import Executor

    monkeypatch.setattr(Executor, "CONNECT", "2s")
    monkeypatch.setattr(Executor, "RECONNECT", "1s")
    port = free_port()

    def scheduler():
        return subprocess.Popen([str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
                                 "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    running = scheduler()
    executor = Executor(SimpleNamespace(router=SimpleNamespace(scheduler=f"tcp://127.0.0.1:{port}")))
    try:
        wait_for(lambda: _capacity(executor) == 1, timeout=20, what="the scheduler")
        running.terminate()
        running.wait(10)
        started = time.monotonic()
        assert executor.capacity() == 0 and time.monotonic() - started < 0.5     # reconnecting: not waited for
        wait_for(lambda: executor.capacity() == 0 and executor._lost, timeout=10, interval=0.2,
                 what="the client to give up")
        started = time.monotonic()
        assert _capacity(executor) is None and time.monotonic() - started < 2.5    # one short attempt
        running = scheduler()
        wait_for(lambda: _capacity(executor) == 1, timeout=20, interval=0.2, what="a connection to it again")
    finally:
        executor.close()
        running.terminate()
        running.wait(10)


def _capacity(executor) -> int | None:
    """The capacity, or None when connecting failed (as a router round does: it logs, and tries next round)."""
    try:
        return executor.capacity()
    except OSError:
        return None
