"""Index micro-benchmark: what the index layer costs on the two hot paths, in-process.

(1) Ingest: `--ingests` small instances (CT_small copies, 50 per series) through
`Archive.ingest_file` (blob write, fsync, encryption and the one index transaction), per
instance: the whole ingest and its index transaction alone. (2) C-FIND: the index filled with
`--size` synthetic instances (bench/query.py's data), `--queries` queries of each kind encoded as a
C-FIND SCP sends them (`archive.query.find(..., explicit_vr=True)`), no network: p50 / p95 in ms.
`--url postgresql://...` runs them on PostgreSQL (the password from libpq's environment).
Not a test: nothing is asserted.

    .venv/bin/python bench/index.py [--ingests 2000] [--size 10000] [--queries 100] [--url URL]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from archive import Archive  # noqa: E402
from archive.index import Index  # noqa: E402
from archive.query import STUDY_ROOT, Query, find  # noqa: E402
from bench.query import fill, queries  # noqa: E402


def ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values) * 1000:.2f} / {values[int(len(values) * 0.95)] * 1000:.2f}"


def time_commits(archive: Archive) -> list[float]:
    """The seconds of each index transaction of the archive's ingests from now on (appended as they end)."""
    commits, original = [], archive._commit

    def timed(*args, **kw):
        start = time.perf_counter()
        try:
            return original(*args, **kw)
        finally:
            commits.append(time.perf_counter() - start)

    archive._commit = timed
    return commits


def bench_ingest(count: int, base: Path, url: str) -> None:
    from helpers import synthetic_instances

    files = []
    for n in range(0, count, 50):
        files += synthetic_instances(base / "in" / str(n), min(50, count - n))
    archive = Archive(base / "archive", **({"index_url": url} if url else {}))
    commits = time_commits(archive)
    totals = []
    for path in files:
        start = time.perf_counter()
        archive.ingest_file(path)
        totals.append(time.perf_counter() - start)
    archive.close()
    print(f"| ingest, {count} small instances | {ms(totals)} | index transaction {ms(commits)} | "
          f"{count / sum(totals):.0f} inst/s |")


def bench_find(size: int, count: int, base: Path, url: str) -> None:
    index = Index(url or base / "q.sqlite3")
    data = fill(index, size)
    if not index.sqlite:
        with index.write() as conn:         # as autovacuum would soon: statistics for the planner
            conn.exec_driver_sql("ANALYZE")
    for kind, identifiers in queries(data, count).items():
        times, matches = [], 0
        for identifier in identifiers:
            start = time.perf_counter()
            with closing(find(index, Query(STUDY_ROOT, identifier), 1000, 20.0, explicit_vr=True)) as found:
                matches += sum(1 for _ in found)
            times.append(time.perf_counter() - start)
        print(f"| C-FIND {kind}, {size} instances | {ms(times)} | ({matches / len(identifiers):.1f} matches) | |")
    index.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ingests", type=int, default=2000)
    ap.add_argument("--size", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    print("| what | p50 / p95 ms | | |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="m3dicom-bench-") as tmp:
        if args.ingests:
            bench_ingest(args.ingests, Path(tmp), args.url)
        if args.queries:
            bench_find(args.size, args.queries, Path(tmp), args.url)


if __name__ == "__main__":
    main()
