"""Router benchmark: what the router adds around a plug-in, embedded cluster and external cluster.

For each of N studies (one CT instance each, sent over DICOM TLS one after the other, the
next when the previous job has succeeded), with a no-op plug-in that returns one small SR:

- start overhead: the worker starting the job, minus (the last instance stored + the quiet period);
- result overhead: the result indexed in the archive, minus the plug-in's return.

Both from the index (`instances.received_at`, `jobs.timings`), p50 / p95, for the embedded
LocalCluster and for an external `dask scheduler` with one `m3dicom worker`. Not a test.

    .venv/bin/python bench/router.py [--studies 100] [--quiet 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from sqlalchemy import text  # noqa: E402

from archive.index import Index  # noqa: E402
from ingest import free_port, small_set, wait_port  # noqa: E402
from router import queue  # noqa: E402

# when each succeeded job's study last received an instance (not a result), and when its results were indexed
_TIMES = text("""
    SELECT (SELECT MAX(i.received_at) FROM instances i JOIN series se ON i.series_pk = se.pk
              JOIN studies s ON se.study_pk = s.pk WHERE s.study_uid = :study_uid AND i.job_id IS NULL),
           (SELECT MAX(i.received_at) FROM instances i WHERE i.job_id = :job_id)""")

NOOP = '''
import numpy as np
from pydicom.sr.coding import Code
from gpu_workers.plugin import Accepts, Result
from gpu_workers.results import Finding, measurement_report


class NoOp:
    name, version, title, wants_gpu = "bench-noop", "1", "Benchmark: one small report, no work", False
    accepts = Accepts(modalities=("CT",), per="study")
    params = ()

    def run(self, inputs, params, ctx):
        source = inputs[0].instances[0].dataset(pixels=False)
        finding = Finding("B1", Code("112179", "DCM", "Image Region"), source, "POINT", np.array([[1, 1]]))
        return Result([measurement_report([finding], [source], ctx, name="sr", title="bench",
                                          procedure=Code("77477000", "SCT", "CT"))])
'''


def node_config(work: Path, pki: Path, port: int, quiet: float, scheduler: str) -> Path:
    path = work / "node.toml"
    path.write_text(f'''
[node]
data_dir = "{work / 'var'}"
[dicom]
port = {port}
certificate = "{pki / 'server.pem'}"
private_key = "{pki / 'server.key'}"
ca_certificates = "{pki / 'ca.pem'}"
[client]
certificate = "{pki / 'client.pem'}"
private_key = "{pki / 'client.key'}"
[log]
level = "WARNING"
[router]
scheduler = "{scheduler}"
plugins = ["bench_noop:NoOp"]
[[router.rules]]
name = "bench"
match = {{ Modality = "CT" }}
plugin = "bench-noop"
quiet_seconds = {quiet}
''')
    return path


def measure(mode: str, work: Path, pki: Path, files: list[Path], quiet: float) -> tuple[list[float], list[float]]:
    work.mkdir(parents=True)
    (work / "bench_noop.py").write_text(NOOP)
    env = {**os.environ, "PYTHONPATH": str(work)}
    procs = []
    scheduler = ""
    if mode == "external":
        sport = free_port()
        scheduler = f"tcp://127.0.0.1:{sport}"
        procs.append(subprocess.Popen([str(Path(sys.executable).parent / "dask"), "scheduler", "--host", "127.0.0.1",
                                       "--port", str(sport), "--no-dashboard"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(sport)
    port = free_port()
    config = node_config(work, pki, port, quiet, scheduler)
    m3 = [sys.executable, "-m", "node.cli"]
    procs.append(subprocess.Popen(m3 + ["serve", "--config", str(config)], cwd=ROOT, env=env,
                                  stdout=open(work / "node.log", "wb"), stderr=subprocess.STDOUT))
    if mode == "external":
        procs.append(subprocess.Popen(m3 + ["worker", "--scheduler", scheduler, "--config", str(config)], cwd=ROOT,
                                      env=env, stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT))
    index = None
    try:
        wait_port(port)
        index = Index(work / "var" / "index.sqlite3")       # the node made and migrated it
        for i, path in enumerate(files):
            subprocess.run(m3 + ["send", "--config", str(config), "--quiet", str(path)], cwd=ROOT, env=env,
                           check=True, capture_output=True)
            deadline = time.monotonic() + 120
            while True:
                done = len(queue.jobs(index, states=("succeeded",), limit=len(files)))
                if done >= i + 1:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"job {i + 1} did not finish; see {work / 'node.log'}")
                time.sleep(0.01)
            print(f"{mode}: {i + 1}/{len(files)}", end="\r", file=sys.stderr)
        succeeded = sorted(queue.jobs(index, states=("succeeded",), limit=len(files)), key=lambda j: j.created_at)
        rows = [(job.timings, *index.read(_TIMES, {"study_uid": job.study_uid, "job_id": job.id})[0])
                for job in succeeded]
    finally:
        if index is not None:
            index.close()
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
    start, result = [], []
    for timings, last_instance, result_indexed in rows[1:]:   # the first job also started the cluster
        t = timings
        start.append((t["worker_started"] - (last_instance + quiet)) * 1000)
        result.append((result_indexed - t["plugin_returned"]) * 1000)
    return start, result


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"{statistics.median(ordered):.0f} / {p95:.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--quiet", type=float, default=1.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m3bench-router-") as tmp:
        work = Path(tmp)
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "node.cli", "certs", "init", "--dir", str(pki)], cwd=ROOT, check=True,
                       capture_output=True)
        rows = []
        for mode in ("embedded", "external"):
            files = []
            for i in range(args.studies + 1):            # one study each; one more to start the cluster
                files += small_set(work / mode / "data" / f"s{i}", 1)
            start, result = measure(mode, work / mode / "run", pki, files, args.quiet)
            rows.append((mode, start, result))
    print(f"\nRouter overhead, {args.studies} studies one after the other, no-op plug-in, quiet period "
          f"{args.quiet:g} s (p50 / p95, ms)\n")
    print("| cluster | last instance + quiet -> job starts on a worker | plug-in returns -> result indexed |")
    print("|---|---|---|")
    for mode, start, result in rows:
        print(f"| {mode} | {percentiles(start)} | {percentiles(result)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
