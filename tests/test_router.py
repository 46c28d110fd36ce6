"""The router end to end: dcmtk sends a study, a rule fires, a real Dask cluster runs a plug-in.

The plug-ins are `plugins_for_tests` (PYTHONPATH=tests for the node and its workers). The
results must be findable by findscu, arrive at a dcmtk storescp, and pass dciodvfy.
"""
from __future__ import annotations

import json
import os
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from helpers import M3DICOM, ROOT, arrived, free_port, wait_for
from test_query import findscu
from test_retrieve import one_study

pytestmark = [pytest.mark.interop, pytest.mark.slow]
TESTS = Path(__file__).resolve().parent
PLUGINS = ["plugins_for_tests:MarkedCopy", "plugins_for_tests:AlwaysFails", "plugins_for_tests:RefusesInput"]
DCIODVFY = Path(sys.executable).parent / "dciodvfy"


@pytest.fixture
def routed(make_node, storescp):
    def factory(rules: list[dict], **router):
        port, _ = storescp
        node = make_node(start=False, remote={"DEST": {"ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
                                                       "server_name": "localhost"}},
                         router={"plugins": PLUGINS, **router, "rules": rules})
        node.env["PYTHONPATH"] = str(TESTS)
        return node.start()
    return factory


def jobs(node) -> list[dict]:
    rows = node.rows("SELECT id, state, attempts, errors, supersedes, rule, created_at FROM jobs ORDER BY created_at")
    return [dict(zip(("id", "state", "attempts", "errors", "supersedes", "rule", "created_at"), r)) for r in rows]


def job_in(node, state: str, count: int = 1, timeout: float = 90) -> list[dict]:
    return wait_for(lambda: [j for j in jobs(node) if j["state"] == state][:count]
                    if len([j for j in jobs(node) if j["state"] == state]) >= count else None,
                    timeout=timeout, what=f"{count} job(s) {state}")


def results_of(node, job_id: str) -> list[tuple]:
    return node.rows("SELECT i.sop_instance_uid, i.sop_class_uid FROM instances i WHERE i.job_id=?", (job_id,))


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def test_a_rule_fires_after_the_quiet_period_and_results_are_found_forwarded_and_valid(routed, storescp, tmp_path):
    node = routed([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "forward_to": ["DEST"],
                    "quiet_seconds": 1}])
    _, received = storescp
    files = one_study(tmp_path, 3)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node.storescu(*files)
    last_stored = max(r[0] for r in node.rows("SELECT received_at FROM instances"))
    (job,) = job_in(node, "succeeded")
    assert job["created_at"] - last_stored >= 1.0 and job["rule"] == "ct"
    assert len(results_of(node, job["id"])) == 2                       # the SC and the SR
    assert node.rows("SELECT name FROM job_results WHERE kind='file'") == [("note.txt",)]

    found, _ = findscu(node, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "Modality",
                       "SeriesDescription")
    assert sorted(str(d.Modality) for d in found) == ["CT", "OT", "SR"]

    wait_for(lambda: node.rows("SELECT state FROM forwards") == [("sent",)], timeout=60, what="the forward")
    results = wait_for(lambda: len(arrived(received)) >= 2 and arrived(received), what="results at storescp")
    for path in results:
        ds = pydicom.dcmread(path)
        assert str(ds.StudyInstanceUID) == study and ds.PatientID == pydicom.dcmread(files[0]).PatientID
        assert dciodvfy_errors(path) == [], path

    # a late instance: a new job whose report names the first one's as its predecessor
    (tmp_path / "late").mkdir()
    late = one_study(tmp_path / "late", 1)[0]
    subprocess.run(["dcmodify", "-nb", "-m", f"(0020,000D)={study}", "-m",
                    f"(0020,000E)={pydicom.dcmread(files[0]).SeriesInstanceUID}", str(late)], check=True)
    node.storescu(late)
    first, second = job_in(node, "succeeded", 2)
    assert second["supersedes"] == first["id"]
    (sr_uid,) = [uid for uid, cls in results_of(node, second["id"]) if cls.startswith("1.2.840.10008.5.1.4.1.1.88.")]
    sr_path = wait_for(lambda: [p for p in arrived(received) if sr_uid in p.name], what="the second report")[0]
    predecessor = pydicom.dcmread(sr_path).PredecessorDocumentsSequence[0]
    (first_sr,) = [uid for uid, cls in results_of(node, first["id"]) if cls.startswith("1.2.840.10008.5.1.4.1.1.88.")]
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr


def test_an_external_cluster_runs_the_jobs(routed, tmp_path):
    port = free_port()
    scheduler = subprocess.Popen([str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
                                  "--port", str(port), "--no-dashboard"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    worker = None
    try:
        node = routed([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 0.5}],
                      scheduler=f"tcp://127.0.0.1:{port}")
        worker = subprocess.Popen(M3DICOM + ["worker", "--scheduler", f"tcp://127.0.0.1:{port}", "--config",
                                             str(node.config_path)], cwd=ROOT, env={**os.environ, **node.env},
                                  stdout=open(tmp_path / "worker.log", "wb"), stderr=subprocess.STDOUT)
        node.storescu(*one_study(tmp_path, 2))
        (job,) = job_in(node, "succeeded")
        assert len(results_of(node, job["id"])) == 2
        assert "m3dicom worker for tcp://127.0.0.1" in (tmp_path / "worker.log").read_text()
        assert "embedded Dask cluster" not in node.log()
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
    # the scheduler is gone and the client tries to reconnect for 15 s: the router no longer waits for it
    started = time.monotonic()
    node.stop()
    assert time.monotonic() - started < 6, f"the node took {time.monotonic() - started:.1f} s to stop"


def test_a_worker_killed_mid_job_the_job_is_retried_and_stored_once(routed, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    node = routed([{"name": "ct", "match": {"Modality": "CT"}, "plugin": "test-sc", "quiet_seconds": 0.5,
                    "params": {"sleep": 6, "marker_dir": str(markers)}}])
    node.storescu(*one_study(tmp_path, 2))
    marker = wait_for(lambda: list(markers.iterdir()), timeout=60, what="the job to start on a worker")[0]
    os.kill(int(marker.read_text()), signal.SIGKILL)
    (job,) = job_in(node, "succeeded", timeout=120)
    assert job["attempts"] == 2 and "KilledWorker" in json.loads(job["errors"])[0]
    assert len(results_of(node, job["id"])) == 2
    assert len(node.rows("SELECT 1 FROM instances WHERE job_id IS NOT NULL")) == 2


def test_failing_plugins_fail_cleanly_and_the_node_keeps_working(routed, tmp_path):
    node = routed([{"name": "fails", "match": {"Modality": "CT"}, "plugin": "test-fail", "quiet_seconds": 0.5},
                   {"name": "refuses", "match": {"Modality": "CT"}, "plugin": "test-refuse", "quiet_seconds": 0.5}],
                  max_attempts=2)
    node.storescu(*one_study(tmp_path, 1))
    failed = {j["rule"]: j for j in job_in(node, "failed", 2)}
    assert failed["fails"]["attempts"] == 2
    assert [e.endswith("RuntimeError: this plug-in always fails") for e in json.loads(failed["fails"]["errors"])] \
        == [True, True]
    assert failed["refuses"]["attempts"] == 1                         # bad input: no retry
    assert "not the image this plug-in expects" in json.loads(failed["refuses"]["errors"])[0]
    assert node.rows("SELECT COUNT(*) FROM instances WHERE job_id IS NOT NULL") == [(0,)]
    (tmp_path / "more").mkdir()
    node.storescu(*one_study(tmp_path / "more", 1))                   # still receiving
    assert node.rows("SELECT COUNT(*) FROM instances") == [(2,)]
    listing = node.cli("jobs", "list").stdout
    assert "failed" in listing and "always fails" in listing


def test_a_plugins_refusal_is_one_log_line_not_a_dask_traceback(routed, tmp_path):
    """A plug-in that refuses its input (PluginError: no pixel spacing, a single slice) is expected:
    node.log gets one line with the reason, not Dask's "Compute Failed" and a traceback at ERROR."""
    node = routed([{"name": "refuses", "match": {"Modality": "CT"}, "plugin": "test-refuse", "quiet_seconds": 0.5}])
    node.storescu(*one_study(tmp_path, 1))
    (failed,) = job_in(node, "failed")
    assert failed["attempts"] == 1                                      # final: no retry
    assert json.loads(failed["errors"])[0].endswith("PluginError: this is not the image this plug-in expects")
    wait_for(lambda: "not the image this plug-in expects" in node.log(), timeout=10, what="the refusal in the log")
    log = node.log()
    assert "Compute Failed" not in log and "Traceback" not in log and " ERROR " not in log, log[-3000:]
    said = [line for line in log.splitlines() if "not the image this plug-in expects" in line]
    assert len(said) == 1 and "WARNING" in said[0] and failed["id"] in said[0], said


def test_jobs_requested_and_cancelled_from_the_command_line(routed, tmp_path):
    node = routed([])
    files = one_study(tmp_path, 1)
    node.storescu(*files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    refused = node.cli("jobs", "run", "test-sc", "--study", study, "--param", "sleep=-1", check=False)
    assert refused.returncode == 1 and "sleep" in refused.stderr
    made = node.cli("jobs", "run", "test-sc", "--study", study, "--param", "sleep=5").stdout
    job_id = made.split()[-1]
    job_in(node, "running")
    assert node.cli("jobs", "cancel", job_id).stdout.strip() == f"{job_id} cancelled"
    assert node.cli("jobs", "cancel", job_id, check=False).returncode == 1   # ended: nothing to cancel
    quick = node.cli("jobs", "run", "test-sc", "--study", study).stdout.split()[-1]
    wait_for(lambda: any(j["id"] == quick and j["state"] == "succeeded" for j in jobs(node)), timeout=90,
             what="a job made from the command line")
    assert results_of(node, job_id) == [] and len(results_of(node, quick)) == 2


def test_results_that_cannot_be_forwarded_are_shown_by_status_and_jobs_list(make_node, tmp_path):
    """New-user pass: with the PACS down, `jobs list` and the viewer said "succeeded" and nothing
    but the log told that the results never left."""
    node = make_node(start=False, remote={"DOWN": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
                                                   "tls": False}},
                     router={"plugins": PLUGINS, "rules": [{"name": "ct", "match": {"Modality": "CT"},
                                                            "plugin": "test-sc", "forward_to": ["DOWN"],
                                                            "quiet_seconds": 1}]})
    node.env["PYTHONPATH"] = str(TESTS)
    node.start()
    node.storescu(*one_study(tmp_path, 1))
    job_in(node, "succeeded")
    wait_for(lambda: node.rows("SELECT attempts FROM forwards") not in ([], [(0,)]), timeout=60,
             what="a failed attempt to forward")
    status = node.cli("status").stdout
    assert re.search(r"forwarding to DOWN: 1 pending after \d+ attempts; last error: .*connection refused", status), status
    assert "check the [remote] node" in status
    listed = node.cli("jobs", "list").stdout
    assert "    forwarding to DOWN: 1 pending" in listed, listed
