"""Offload benchmark: the node's outbox against a plain boto3 upload of the same files.

Both go to the same S3 endpoint (moto's standalone server on loopback, started here) with
the same transfer settings (8 MiB parts, 4 parts at a time, 4 objects at a time):

- plain boto3: `upload_file` of each DICOM file as it is, unencrypted, no bookkeeping;
- m3dicom: the files are ingested first (not timed), then the offloader drains its outbox:
  changes log -> outbox rows, the encrypted envelopes uploaded with a SHA-256 checksum,
  each object's size and checksum checked (HEAD), the rows marked offloaded;
- m3dicom with KMS: the same, each data key re-wrapped by (moto's) KMS on the way.

Data: (a) 500 small CT instances (CT_small copies), (b) 20 mammography-sized instances
(10-27 MB). Prints MB/s (plaintext), objects/s, median of N runs, and the overhead
against the plain upload. Not a test: nothing is asserted.

    .venv/bin/python bench/offload.py [--runs 3] [--small 500] [--large 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from archive import Archive  # noqa: E402
from archive.crypto import KmsKeyring  # noqa: E402
from archive.offload import Offloader, Policy, status  # noqa: E402
from archive.s3 import S3Storage  # noqa: E402
from ingest import free_port, large_set, small_set, wait_port  # noqa: E402

PART, PARTS_AT_ONCE, OBJECTS_AT_ONCE = 8 << 20, 4, 4
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")


def client(url: str, service: str = "s3"):
    return boto3.client(service, endpoint_url=url, region_name="us-east-1")


def plain(url: str, files: list[Path]) -> float:
    s3 = client(url)
    bucket = f"plain-{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PARTS_AT_ONCE)
    start = time.perf_counter()
    with ThreadPoolExecutor(OBJECTS_AT_ONCE) as pool:
        list(pool.map(lambda p: s3.upload_file(str(p), bucket, p.name, Config=config), files))
    return time.perf_counter() - start


def m3dicom(url: str, files: list[Path], work: Path, kms: bool) -> float:
    bucket = f"m3-{time.monotonic_ns()}"
    client(url).create_bucket(Bucket=bucket)
    keyring = None
    if kms:
        k = client(url, "kms")
        keyring = KmsKeyring(k, k.create_key()["KeyMetadata"]["Arn"])
    archive = Archive(Path(tempfile.mkdtemp(dir=work)), kms=keyring,
                      remote=lambda ring: S3Storage(client(url), bucket, ring, part_size=PART,
                                                    concurrency=PARTS_AT_ONCE))
    for path in files:
        archive.ingest_file(path)
    offloader = Offloader(archive, Policy(concurrency=OBJECTS_AT_ONCE))
    offloader._leftovers = False          # nothing to clean in a new bucket; time only the uploads
    start = time.perf_counter()
    while offloader.step() or status(archive.index).pending:
        pass
    elapsed = time.perf_counter() - start
    s = status(archive.index)
    assert s.offloaded == len(files) and s.failed == 0, s
    offloader.close()
    archive.close()
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--large", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m3bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            url = f"http://127.0.0.1:{port}"
            sets = {"(a) small": small_set(work / "small", args.small), "(b) large": large_set(work / "large", args.large)}
            rows = []
            for name, files in sets.items():
                megabytes = sum(p.stat().st_size for p in files) / 1e6
                times = {"plain boto3 (no encryption)": [], "m3dicom": [], "m3dicom + KMS": []}
                for run in range(args.runs):
                    times["plain boto3 (no encryption)"].append(plain(url, files))
                    times["m3dicom"].append(m3dicom(url, files, work, kms=False))
                    times["m3dicom + KMS"].append(m3dicom(url, files, work, kms=True))
                    print(f"{name} run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                          file=sys.stderr)
                base = statistics.median(times["plain boto3 (no encryption)"])
                for who, values in times.items():
                    t = statistics.median(values)
                    rows.append((name, who, megabytes / t, len(files) / t, (t / base - 1) * 100))
        finally:
            server.terminate()
            server.wait(10)
    print(f"\nOffload to moto_server on loopback, median of {args.runs} runs, {OBJECTS_AT_ONCE} objects and "
          f"{PARTS_AT_ONCE} parts at a time, {PART >> 20} MiB parts\n")
    print("| data | uploader | MB/s | objects/s | time vs plain |")
    print("|---|---|---|---|---|")
    for name, who, mbps, ops, overhead in rows:
        print(f"| {name} | {who} | {mbps:.1f} | {ops:.1f} | {overhead:+.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
