"""What ordering the change log's commits costs on PostgreSQL (archive/changes.py): concurrent writers,
with `archive.index.CHANGES_IN_COMMIT_ORDER` off and on, rounds interleaved (off, on, off, on, ...).

(1) Ingest: `--writers` threads, each ingesting `--each` small instances (CT_small copies) through one
`Archive` (blob write, fsync, encryption, the index transaction): instances per second and the index
transaction's p50 / p95. (2) The index alone: the same threads, each transaction only one job change
and its commit (the worst case: nothing but the serialised part). A private cluster is started
(tests/pgcluster.py) unless `--url` names a database. Not a test: nothing is asserted.

    .venv/bin/python bench/changelog.py [--writers 1 4 8] [--each 100] [--rounds 2] [--url URL]
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from archive import Archive  # noqa: E402
from archive import index as index_module  # noqa: E402
from archive.index import Index  # noqa: E402
from bench.index import ms, time_commits  # noqa: E402


def _threads(count: int, work) -> float:
    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def ingest(url: str, base: Path, files: list[list[Path]]) -> tuple[float, list[float]]:
    archive = Archive(base / secrets.token_hex(4), index_url=url)
    commits = time_commits(archive)
    seconds = _threads(len(files), lambda n: [archive.ingest_file(p) for p in files[n]])
    archive.close()
    return sum(len(f) for f in files) / seconds, commits


def changes_only(index: Index, writers: int, each: int) -> float:
    def work(n: int) -> None:
        for i in range(each):
            with index.write() as conn:
                Index.add_job_change(conn, "job_queued", f"{n}-{i}", "1.2.3")
    return writers * each / _threads(writers, work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--each", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--url", default="")
    args = ap.parse_args()
    cluster = None
    if not args.url:
        from pgcluster import Cluster
        import os

        cluster = Cluster().start()
        os.environ.update(cluster.env)
    try:
        url = args.url or cluster.create_database("bench")
        run(url, args)
    finally:
        if cluster is not None:
            cluster.stop()


def run(url: str, args) -> None:
    from helpers import synthetic_instances

    print("| writers | ordered | ingest inst/s | index transaction p50 / p95 ms | change-only transactions/s |\n"
          "|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="m3dicom-bench-") as tmp:
        base = Path(tmp)
        index = Index(url)
        for writers in args.writers:
            results: dict[bool, list] = {False: [], True: []}
            for r in range(args.rounds):
                for ordered in (False, True):
                    files = [synthetic_instances(base / "in" / f"{writers}-{r}-{ordered}-{n}", args.each)
                             for n in range(writers)]
                    index_module.CHANGES_IN_COMMIT_ORDER = ordered
                    rate, commits = ingest(url, base, files)
                    results[ordered].append((rate, commits, changes_only(index, writers, args.each)))
            for ordered, rounds in results.items():
                rates = [r[0] for r in rounds]
                commits = [c for r in rounds for c in r[1]]
                print(f"| {writers} | {'yes' if ordered else 'no'} | {statistics.mean(rates):.0f} | {ms(commits)} | "
                      f"{statistics.mean(r[2] for r in rounds):.0f} |")
        index_module.CHANGES_IN_COMMIT_ORDER = True
        index.close()


if __name__ == "__main__":
    main()
