"""Crash safety (kill -9 mid-transfer), disk full, and bounded memory for large instances."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from helpers import MotoServer, data_file, dataset_sha256, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.interop]


def make_copies(directory: Path, count: int, name: str = "CT_small.dcm") -> list[Path]:
    """`count` copies of a test image, each with fresh SOP Instance UIDs, one study."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(data_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def check_consistent(node) -> dict[str, str]:
    """Every row has an intact blob matching its SHA-256, and no blob lacks a row."""
    rows = dict(node.rows("SELECT sop_instance_uid, sha256 FROM instances"))
    for uid, sha in rows.items():
        assert dataset_sha256(node.stored_bytes(uid)) == sha, f"{uid} damaged"
    assert len(node.blob_files()) == len(rows), "orphan blobs remain"
    changes = node.rows("SELECT COUNT(*) FROM changes WHERE kind='stored'")[0][0]
    assert changes == len(rows), "change log and instances disagree"
    return rows


def test_kill_9_during_transfer_loses_nothing_acknowledged(make_node, tmp_path, index_url, request):
    """On SQLite and on PostgreSQL: what the node acknowledged is in the index and its blob intact."""
    files = make_copies(tmp_path / "study", 1000)
    if index_url:           # a shared index: blobs are kept locally and offloaded to S3 (moto)
        moto = request.getfixturevalue("moto")
        node = make_node(start=False, index={"url": index_url},
                         storage={"backend": "s3", "s3": {"bucket": moto.new_bucket(), "endpoint_url": moto.url}})
        node.env.update(MotoServer.CREDENTIALS)
        node.start()
    else:
        node = make_node()
    sender = subprocess.Popen(["storescu", "-v", *node.tls_args(), "-aec", "M3DICOM", "127.0.0.1",
                               str(node.port), *map(str, files)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(sender.stdout), daemon=True)
    reader.start()
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances")[0][0] >= 150, timeout=120,
             what="some instances to arrive")
    node.kill9()
    sender.wait(timeout=60)
    reader.join(timeout=10)
    # Which files did storescu see acknowledged with Success?
    acknowledged, current = [], None
    for line in output:
        if m := re.search(r"Sending file: (.+)$", line.strip()):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(Path(current))
    assert len(acknowledged) >= 100, "\n".join(output[-20:])
    assert len(acknowledged) < len(files), "the node was killed after the transfer ended"

    node.start()  # recovery runs at start
    rows = check_consistent(node)
    for path in acknowledged:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in rows, f"{path.name} was acknowledged but is missing after the crash"

    node.storescu(*files, timeout=600)
    rows = check_consistent(node)
    assert len(rows) == len(files)


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run the tests as root): {result.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_answers_a700_and_recovers(make_node, tmpfs, tmp_path):
    files = make_copies(tmp_path / "study", 120)  # ~4.7 MB: more than the 3 MB volume
    # no free-space reserve: this is about the disk really filling up (ENOSPC) under the node
    node = make_node(node={"data_dir": str(tmpfs / "var")}, storage={"min_free_bytes": 0})
    result = node.storescu(*files, check=False, timeout=300, extra=["-v"])
    assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
    assert "refused (0xA700)" in node.log()
    assert node.spool_files() == []
    stored = check_consistent(node)
    assert 0 < len(stored) < len(files)
    # free space: remove the sent files' worth by deleting nothing of ours, just grow the volume
    subprocess.run(["mount", "-o", "remount,size=16m", str(tmpfs)], check=True)
    node.storescu(*files, timeout=300)
    assert len(check_consistent(node)) == len(files)
    assert check_consistent(node).keys() >= stored.keys()


def test_large_instance_is_streamed_with_bounded_memory(make_node, tmp_path):
    psutil = pytest.importorskip("psutil")
    import numpy as np

    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    rows, cols, frames = 4096, 4096, 15  # 15 frames of 4096x4096x16 bit = 503 MB
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = np.zeros(rows * cols * frames, dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    assert big.stat().st_size > 500_000_000

    node = make_node(dicom={"receivers": 1})  # the process measured is the one receiving
    proc = psutil.Process(node.proc.pid)
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        node.storescu(big, timeout=600)
    finally:
        done.set()
        sampler.join()
    extra_mb = (peak[0] - baseline) / 1e6
    assert extra_mb < 100, f"receiving 500 MB took {extra_mb:.0f} MB of extra RSS"
    (sha, size, blob_id), = node.rows("SELECT sha256, size, blob_id FROM instances")
    assert size > 500_000_000
    assert node.stored_dataset_sha256(blob_id) == sha
