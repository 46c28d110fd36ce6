"""Reading a blob another node holds and has not offloaded: a bounded wait, and a late node's other blobs
not waited for one by one (a retrieve of many, or a flood of them, waits `storage.remote_wait_seconds` in
all). The "S3" here is a second local store, read through the same TieredStorage path as S3 is."""
from __future__ import annotations

import threading
import time

import pytest

from archive.crypto import LocalKeyring
from archive.storage import BlobNotOffloaded, Elsewhere, LocalStorage, TieredStorage

WAIT = 0.6


@pytest.fixture
def stores(tmp_path):
    keyring = LocalKeyring.open(tmp_path / "keys", create=True)
    node_a = LocalStorage(tmp_path / "node-a", keyring)          # what node A holds and has not offloaded
    s3 = LocalStorage(tmp_path / "s3", keyring)
    here = TieredStorage(LocalStorage(tmp_path / "node-b", keyring), s3, wait=WAIT, poll=0.05,
                         elsewhere=lambda blob: Elsewhere("node-a", f"blob {blob} is held by node node-a", True))
    return node_a, s3, here


def _read_fails(here: TieredStorage, blob: str) -> tuple[float, str]:
    started = time.monotonic()
    with pytest.raises(BlobNotOffloaded) as failed:
        here.read_all(blob)
    return time.monotonic() - started, str(failed.value)


def test_a_late_nodes_other_blobs_fail_at_once_and_wait_again_once_it_offloads(stores):
    node_a, s3, here = stores
    blobs = [node_a.create([f"instance {n}".encode()]).blob_id for n in range(4)]
    took, why = _read_fails(here, blobs[0])
    assert WAIT <= took < WAIT + 1 and "held by node node-a" in why and "waited 0.6 s" in why
    took, why = _read_fails(here, blobs[1])                       # node-a is late: no second wait
    assert took < WAIT / 2 and "another read waited" in why
    # node-a's offloader moves again: blob 2 is in S3 now, read at once, and node-a is waited for again
    _copy(node_a, s3, blobs[2])
    assert here.read_all(blobs[2]) == b"instance 2"
    took, _ = _read_fails(here, blobs[3])
    assert took >= WAIT


def test_the_wait_ends_when_the_object_arrives(stores):
    node_a, s3, here = stores
    blob = node_a.create([b"late but coming"]).blob_id
    threading.Timer(0.2, _copy, (node_a, s3, blob)).start()
    started = time.monotonic()
    assert here.read_all(blob) == b"late but coming"
    assert time.monotonic() - started < WAIT


def _copy(source: LocalStorage, target: LocalStorage, blob: str) -> None:
    """What an offloader does, for these two local stores: the same envelope under the same id."""
    path = target.path(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".copying")
    partial.write_bytes(source.path(blob).read_bytes())
    partial.rename(path)


def test_what_only_a_node_gone_silent_holds_is_no_longer_vouched_for(tmp_path, pg_cluster, moto):
    """Storage commitment confirms an instance another node received and has not offloaded (it fsynced the
    blob before indexing it: durable there) only while that node runs: once it has not been seen for
    `nodes.ALIVE_SECONDS` its disk may be gone, and `held_elsewhere` no longer names it (the instance is then
    read back, and fails, before it is confirmed)."""
    import secrets

    from sqlalchemy import text

    from archive import Archive, nodes
    from archive.s3 import MIN_PART, S3Storage
    from helpers import synthetic_instances

    url, bucket = pg_cluster.create_database(f"t_{secrets.token_hex(6)}"), moto.new_bucket()

    def remote(keyring):
        return S3Storage(moto.client(), bucket, keyring, part_size=MIN_PART)

    a = Archive(tmp_path / "a", index_url=url, node="node-a", remote=remote)
    b = Archive(tmp_path / "b", index_url=url, node="node-b", remote=remote)
    try:
        nodes.register(a.index, "node-a", a.data_dir, "host-a")
        (path,) = synthetic_instances(tmp_path / "in", 1)
        assert a.ingest_file(path).outcome.ok                  # on A's disk only: A's offloader has not run
        (blob,), = a.index.read(text("SELECT blob_id FROM instances"))
        assert b.held_elsewhere(blob) == "node-a"
        with a.index.write() as conn:                          # A has not been seen since
            conn.execute(text("UPDATE nodes SET seen_at = seen_at - :gone"), {"gone": nodes.ALIVE_SECONDS + 1})
        assert b.held_elsewhere(blob) is None
    finally:
        a.close()
        b.close()
