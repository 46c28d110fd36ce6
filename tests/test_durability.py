"""Crash safety (kill -9 mid-transfer), disk full, and bounded memory for large instances."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.uid import generate_uid

from helpers import MotoServer, data_file, dataset_sha256, paused, wait_for

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
    listed = node.rows("SELECT sop_instance_uid, sha256, blob_id FROM instances")   # one read: PostgreSQL too
    storage = node.local_storage()
    for uid, sha, blob_id in listed:
        assert dataset_sha256(storage.read_all(blob_id)) == sha, f"{uid} damaged"
    rows = {uid: sha for uid, sha, _ in listed}
    assert len(node.blob_files()) == len(rows), "orphan blobs remain"
    changes = node.rows("SELECT COUNT(*) FROM changes WHERE kind='stored'")[0][0]
    assert changes == len(rows), "change log and instances disagree"
    return rows


def one_sender_per_receiver(node, parts: list[list[Path]], extra=()) -> list[subprocess.Popen]:
    """A storescu for each part, each received by its own receiving process of the node (the others
    paused while it connects: the kernel gives a connection to whichever process accepts first)."""
    processes = node.receiving_processes()
    assert len(processes) >= len(parts), f"{len(processes)} receiving processes for {len(parts)} senders"
    senders = []
    for part, process in zip(parts, processes):
        with paused(*(p for p in processes if p.pid != process.pid)):
            sender = subprocess.Popen(["storescu", *extra, *node.tls_args(), "-aec", "M3DICOM", "127.0.0.1",
                                       str(node.port), *map(str, part)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"})
            senders.append(sender)
            wait_for(lambda: node.port in {c.raddr.port for c in psutil.Process(sender.pid).net_connections("tcp")
                                           if c.raddr} and any(c.status == psutil.CONN_ESTABLISHED
                                                               and c.laddr.port == node.port
                                                               for c in process.net_connections("tcp")),
                     timeout=20, what=f"storescu to be received by process {process.pid}")
    return senders


def test_kill_9_during_transfer_loses_nothing_acknowledged(make_node, tmp_path, index_url, request):
    """On SQLite and on PostgreSQL, with two receiving processes each receiving: what the node
    acknowledged is in the index and its blob intact."""
    files = make_copies(tmp_path / "study", 1000)
    receiving = {"dicom": {"receivers": 2}}
    if index_url:           # a shared index: blobs are kept locally and offloaded to S3 (moto)
        moto = request.getfixturevalue("moto")
        node = make_node(start=False, index={"url": index_url}, **receiving,
                         storage={"backend": "s3", "s3": {"bucket": moto.new_bucket(), "endpoint_url": moto.url}})
        node.env.update(MotoServer.CREDENTIALS)
        node.start()
    else:
        node = make_node(**receiving)
    outputs: list[list[str]] = [[], []]
    senders = one_sender_per_receiver(node, [files[0::2], files[1::2]], ["-v"])
    readers = [threading.Thread(target=lambda out=output, p=sender: out.extend(p.stdout), daemon=True)
               for output, sender in zip(outputs, senders)]
    for reader in readers:
        reader.start()
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances")[0][0] >= 150, timeout=120,
             what="some instances to arrive")
    node.kill9()
    for sender, reader in zip(senders, readers):
        sender.wait(timeout=60)
        reader.join(timeout=10)
    # Which files did each storescu see acknowledged with Success?
    acknowledged = []
    for output in outputs:
        current, mine = None, []
        for line in output:
            if m := re.search(r"Sending file: (.+)$", line.strip()):
                current = m.group(1).strip()
            elif "Received Store Response (Success)" in line and current:
                mine.append(Path(current))
        assert len(mine) >= 30, "\n".join(output[-20:])
        acknowledged += mine
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
    node = make_node(node={"data_dir": str(tmpfs / "var")}, storage={"min_free_bytes": 0}, dicom={"receivers": 2})
    senders = one_sender_per_receiver(node, [files[0::2], files[1::2]], ["-v"])   # both processes fill it
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    assert all("Received Store Response (Refused: OutOfResources)" in output for output in outputs), \
        [output[-2000:] for output in outputs]
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
