"""Two nodes' routers on one PostgreSQL index and one S3 endpoint (issue 16, "More than one node"): each
study's job runs once across both nodes, and a job whose node is killed mid-job finishes on the other.

Both nodes are `m3dicom serve` processes (as in test_two_nodes.py: their own data directory and ports, one
key file, storage.backend = "s3" on one moto server, the index in one PostgreSQL database), each with its
router on: an embedded Dask cluster of one worker thread, router.lease_seconds = LEASE, and the test
plug-in `test-sc` (tests/plugins_for_tests.py), which notes each run it starts as a file `<job id>-<pid of
the worker>` in a folder both nodes share. The rules match on the sender's AE title: QUICK runs at once,
SLOW sleeps long enough to kill a node while it runs. The tests run in this order on one pair.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from archive.crypto import LocalKeyring
from archive.index import Index
from helpers import MotoServer, Node, synthetic_instances, wait_for
from router import queue
from test_retrieve import ENV

pytestmark = [pytest.mark.slow, pytest.mark.interop]
TESTS = Path(__file__).resolve().parent
LEASE = 3.0                         # router.lease_seconds of both nodes
SLOW = 6.0                          # seconds the SLOW rule's plug-in runs
QUIET = 1.0                         # the rules' quiet_seconds
RESULTS = 2                         # DICOM results of one `test-sc` run (an SC and an SR)


class Pair:
    def __init__(self, a: Node, b: Node, index: Index, markers: Path):
        self.a, self.b, self.index, self.markers = a, b, index, markers

    def node(self, holder: str) -> Node:
        """The node whose router is `holder` (`<node name>/<pid>`)."""
        name = holder.rpartition("/")[0]
        return next(n for n in (self.a, self.b) if n.settings["node"]["name"] == name)

    def jobs(self, studies) -> list[queue.JobRecord]:
        return [j for j in queue.jobs(self.index, limit=1000) if j.study_uid in set(studies)]

    def runs(self) -> Counter:
        """Job id -> how many times the plug-in started on it (on either node)."""
        return Counter(p.name.rsplit("-", 1)[0] for p in self.markers.iterdir())

    def result_instances(self, job_id: str) -> list[str]:
        """SOP Instance UIDs of the archive's instances that the job produced (each row, duplicates kept)."""
        return [r[0] for r in self.index.read(sa.text("SELECT sop_instance_uid FROM instances WHERE job_id = :job"),
                                              {"job": job_id})]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pki, pg_cluster, moto):
    root = tmp_path_factory.mktemp("two-routers")
    url = pg_cluster.create_database("two_routers")
    bucket = moto.new_bucket()
    markers = root / "markers"
    markers.mkdir()
    LocalKeyring.open(root / "keys")                # one key-encryption key for both nodes
    rules = [{"name": name, "match": {"CallingAETitle": name.upper()}, "plugin": "test-sc", "quiet_seconds": QUIET,
              "params": {"sleep": sleep, "marker_dir": str(markers)}} for name, sleep in (("quick", 0), ("slow", SLOW))]
    nodes = []
    for name in ("node-a", "node-b"):
        data_dir = root / name / "var"
        data_dir.mkdir(parents=True, mode=0o700)
        shutil.copytree(root / "keys", data_dir / "keys")
        node = Node(root / name, pki, node={"ae_title": "M3DICOM", "data_dir": str(data_dir), "name": name},
                    index={"url": url}, router={"plugins": ["plugins_for_tests:MarkedCopy"], "workers": 1,
                                                "lease_seconds": LEASE, "rules": rules},
                    storage={"backend": "s3", "s3": {"bucket": bucket, "endpoint_url": moto.url,
                                                     "retry_max_delay": 1.0, "timeout": 5.0}})
        node.env.update({**pg_cluster.env, **MotoServer.CREDENTIALS, "PYTHONPATH": str(TESTS)})
        nodes.append(node)
    for node in nodes:
        node.start()
    for node in nodes:          # both routers at work (a router starts its cluster at once) before any study comes
        wait_for(lambda: "embedded Dask cluster" in node.log(), timeout=120, interval=0.2, what="the Dask cluster")
    index = Index(url)
    yield Pair(*nodes, index, markers)
    index.close()
    for node in nodes:
        node.stop()


def send(node: Node, calling: str, files: list) -> subprocess.Popen:
    """storescu over TLS in the background, as `calling` (the AE title the rules match)."""
    cmd = ["storescu", *node.tls_args(), "-aet", calling, "-aec", "M3DICOM", "127.0.0.1", str(node.port),
           *map(str, files)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def study_of(files: list) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def all_ended(pair: Pair, studies, count: int):
    jobs = pair.jobs(studies)
    return jobs if len(jobs) >= count and all(j.state in ("succeeded", "failed", "cancelled") for j in jobs) else None


def test_each_studys_job_runs_once_with_both_routers_running(pair, tmp_path):
    studies: dict[str, list] = {}
    for n in range(10):
        files = synthetic_instances(tmp_path / f"study-{n}", 2)
        studies[study_of(files)] = files
    halves = {pair.a: list(studies)[:5], pair.b: list(studies)[5:]}
    senders = [send(node, "QUICK", [f for s in uids for f in studies[s]]) for node, uids in halves.items()]
    for sender in senders:                                              # both at once
        out, _ = sender.communicate(timeout=300)
        assert sender.returncode == 0, out
    jobs = wait_for(lambda: all_ended(pair, studies, 10), timeout=120, interval=0.2, what="a job of each study")
    time.sleep(QUIET + 1)               # a second job of a study would have been made by now
    jobs = pair.jobs(studies)
    assert sorted(j.study_uid for j in jobs) == sorted(studies)                      # one job per study
    assert {(j.state, j.rule, j.attempts) for j in jobs} == {("succeeded", "quick", 1)}, \
        [(j.state, j.attempts, j.errors) for j in jobs]
    runs = pair.runs()
    assert {j.id: runs[j.id] for j in jobs} == {j.id: 1 for j in jobs}              # each run once, anywhere
    for job in jobs:                                                                 # results stored once
        results = queue.dicom_results(pair.index, job.id)
        assert len(results) == RESULTS and sorted(pair.result_instances(job.id)) == sorted(results)
    by_node = Counter(j.worker.rpartition("/")[0] for j in jobs)
    assert set(by_node) == {"node-a", "node-b"}, by_node                             # both routers ran jobs
    for node in (pair.a, pair.b):
        assert " ERROR " not in node.log(), node.log()[-3000:]


def test_a_node_killed_mid_job_the_other_finishes_it_once(pair, tmp_path):
    files = synthetic_instances(tmp_path / "slow", 2)
    study = study_of(files)
    pair.a.storescu(*files, aet="SLOW")

    def running():
        jobs = pair.jobs([study])
        if len(jobs) == 1 and jobs[0].state == "running" and pair.runs()[jobs[0].id] == 1:
            return jobs[0]
        return None
    job = wait_for(running, timeout=60, interval=0.1, what="the job to start on a worker")
    # node A in the words: whichever node's router leased the job (either may) is killed
    killed = pair.node(job.worker)
    survivor = pair.b if killed is pair.a else pair.a
    worker_pid = int(next(pair.markers.glob(f"{job.id}-*")).read_text())
    before = queue.get(pair.index, job.id)
    assert (before.state, before.attempts, before.worker) == ("running", 1, job.worker)
    killed.kill9()
    wait_for(lambda: not _alive(worker_pid), timeout=30, what="the killed node's Dask worker to die with it")

    done = wait_for(lambda: all_ended(pair, [study], 1), timeout=LEASE + SLOW + 60, interval=0.2,
                    what="the other node to take the job over and finish it")
    (after,) = done
    assert after.id == job.id and after.state == "succeeded" and after.attempts == 2, after
    assert after.worker.rpartition("/")[0] == survivor.settings["node"]["name"]
    assert after.errors == [f"attempt 1: lease expired: worker {job.worker} lost"]
    # taken over once the killed router's lease (renewed until it died) had expired, not before
    assert after.started_at >= before.lease_expires
    assert pair.runs()[job.id] == 2                                   # started on each node once
    results = queue.dicom_results(pair.index, job.id)
    assert len(results) == RESULTS and sorted(pair.result_instances(job.id)) == sorted(results)  # stored once

    # the killed node restarts (same name, same data directory): it does not run the job again. The other
    # stops, so that the restarted router is the only one, and proves it runs by doing a new study's job.
    killed.start()
    survivor.stop()
    later = synthetic_instances(tmp_path / "later", 1)
    killed.storescu(*later, aet="QUICK")
    (new,) = wait_for(lambda: all_ended(pair, [study_of(later)], 1), timeout=120, interval=0.2,
                      what="the restarted node's router to run a new study's job")
    assert new.state == "succeeded" and new.worker.rpartition("/")[0] == killed.settings["node"]["name"]
    assert pair.jobs([study]) == [after]                              # the job as it was, no other
    assert pair.runs()[job.id] == 2
    assert sorted(pair.result_instances(job.id)) == sorted(results)
    assert " ERROR " not in killed.log(), killed.log()[-3000:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
