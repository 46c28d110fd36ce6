"""Result intake benchmark: the node taking in one bone-model job's results (router.intake.take_results).

The bone-model plug-in runs once on the real CT head (Debian's invesalius-examples); its
outputs (the STL as an encapsulated DICOM object, the key image, X3D scenes) are then staged
again and again as a worker that shares the node's storage stages them (encrypted blobs in the
local store), each time into a fresh archive, and taken in: seconds per job, median and best of
the runs. Not a test.

    .venv/bin/python bench/intake.py [runs]
"""
from __future__ import annotations

import hashlib
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import cranium  # noqa: E402
from archive import Archive  # noqa: E402
from archive.inputs import input_series  # noqa: E402
from node.config import from_dict  # noqa: E402
from router import queue  # noqa: E402
from router.intake import take_results  # noqa: E402
from router.task import JobSpec, run_job  # noqa: E402


def main(runs: int = 5) -> None:
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        work = Path(work)
        volume, spacing = cranium.load()
        files = cranium.write_series(work / "head", volume, spacing)
        config = from_dict({"node": {"data_dir": str(work / "node")}}, work)
        archive = Archive(config.data_dir)
        for path in files:
            assert archive.ingest_file(path).outcome.ok
        series = input_series(archive.index, archive.index.read(text("SELECT series_uid FROM series"))[0][0])
        started = time.perf_counter()
        output = run_job(JobSpec("benchjob", "bone-model", {}, (series,), config))
        print(f"bone model: {time.perf_counter() - started:.1f} s ({output.backend})")
        plain = [(o, archive.local.read_all(o.blob_id)) for o in output.outputs]
        for o, data in plain:
            assert hashlib.sha256(data).hexdigest() == o.sha256
            print(f"  {o.kind:5} {o.name[:40]:40} {len(data) / 1e6:8.2f} MB")
        times = []
        for run in range(runs):
            target = Archive(work / f"run{run}")
            job = queue.create(target.index, study_uid="1.2.3", plugin="bone-model", params={}, inputs=[])
            staged = tuple(replace(o, blob_id=target.local.create([data]).blob_id) for o, data in plain)
            started = time.perf_counter()
            count = take_results(target, job, "1.2.3", staged, target.data_dir / "spool" / "router")
            times.append(time.perf_counter() - started)
            assert count == len(staged)
            target.close()
        total = sum(len(d) for _, d in plain) / 1e6
        print(f"take_results, {len(plain)} outputs, {total:.1f} MB: median {statistics.median(times):.3f} s, "
              f"best {min(times):.3f} s ({runs} runs)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
