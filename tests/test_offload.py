"""The offloader over the archive API, against moto's S3 and KMS (a real HTTP endpoint)."""
from __future__ import annotations

import io
import shutil

import pytest
from sqlalchemy import text

from archive import Archive, Outcome
from archive.crypto import KmsKeyring, LocalKeyring, header_key_id
from archive.keys import rotate
from archive.offload import Offloader, Policy, status
from archive.s3 import MIN_PART, S3Storage
from archive.storage import BlobNotFound, LocalStorage
from helpers import Outage, dataset_sha256, shows_part10_header, synthetic_instances, wait_for

FAST = Policy(concurrency=3, retry_base=0.05, retry_max=0.2)


@pytest.fixture
def make_archive(moto, tmp_path):
    archives = []

    def factory(endpoint: str | None = None, kms: bool = False, **options) -> tuple[Archive, str]:
        bucket = moto.new_bucket()

        def remote(keyring):
            return S3Storage(moto.client(url=endpoint), bucket, keyring, part_size=MIN_PART)

        keyring = None
        if kms:
            client = moto.client("kms")
            keyring = KmsKeyring(client, client.create_key()["KeyMetadata"]["KeyId"])
        archive = Archive(tmp_path / f"data{len(archives)}", remote=remote, kms=keyring, **options)
        archives.append(archive)
        return archive, bucket

    yield factory
    for archive in archives:
        archive.close()


def drain(offloader: Offloader, timeout: float = 60) -> None:
    def done() -> bool:
        offloader.step()
        s = status(offloader.archive.index)
        return s.pending == 0 and s.removing == 0
    wait_for(done, timeout=timeout, interval=0.05, what="the outbox to drain")


def blobs(archive: Archive) -> dict[str, str]:
    return {r.blob_id: r.sha256 for r in archive.index.read(text("SELECT blob_id, sha256 FROM instances"))}


def test_every_blob_goes_up_once_as_the_local_ciphertext(make_archive, moto, tmp_path):
    archive, bucket = make_archive()
    files = synthetic_instances(tmp_path / "in", 5) + synthetic_instances(tmp_path / "big", 1, 12 << 20)
    assert all(archive.ingest_file(f).outcome is Outcome.STORED for f in files)
    offloader = Offloader(archive, FAST)
    drain(offloader)
    stored = moto.objects(bucket)
    assert sorted(k.rsplit("/", 1)[1] for k in stored) == sorted(blobs(archive))
    plaintexts = [f.read_bytes() for f in files]
    for key, body in stored.items():       # no KMS: S3 holds exactly the local envelope
        assert body == archive.local.path(key.rsplit("/", 1)[1]).read_bytes()
        assert not any(shows_part10_header(body, p) for p in plaintexts) and b"Offload^Test" not in body
    assert moto.incomplete_uploads(bucket) == []
    s = status(archive.index)
    assert (s.offloaded, s.pending, s.failed, s.last_error) == (6, 0, 0, None)
    assert not offloader.step() and len(moto.objects(bucket)) == 6   # nothing twice
    offloader.close()


def test_evicted_blobs_are_read_back_from_s3_and_verified(make_archive, tmp_path):
    archive, _ = make_archive()
    files = synthetic_instances(tmp_path / "in", 3) + synthetic_instances(tmp_path / "big", 1, 11 << 20)
    for f in files:
        archive.ingest_file(f)
    offloader = Offloader(archive, Policy(cache_max_bytes=1))
    drain(offloader)
    offloader.evict()
    assert status(archive.index).evicted == 4 and list(archive.local.blob_ids()) == []
    wanted = sorted(dataset_sha256(f) for f in files)
    got = []
    for blob_id, sha in blobs(archive).items():
        with archive.exported(blob_id, sha) as path:
            got.append(dataset_sha256(path))
    assert sorted(got) == wanted
    offloader.close()


def test_a_replaced_instance_leaves_the_bucket_too(make_archive, moto, tmp_path):
    archive, bucket = make_archive(duplicates="replace")
    (first,) = synthetic_instances(tmp_path / "a", 1)
    second = tmp_path / "b.dcm"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF                        # same SOP Instance UID, other pixel bytes
    second.write_bytes(bytes(data))
    offloader = Offloader(archive, FAST)
    archive.ingest_file(first)
    drain(offloader)
    assert archive.ingest_file(second).outcome is Outcome.REPLACED
    drain(offloader)
    assert [k.rsplit("/", 1)[1] for k in moto.objects(bucket)] == list(blobs(archive))
    offloader.close()


def test_a_missing_local_blob_fails_for_good_with_its_error(make_archive, tmp_path):
    archive, _ = make_archive()
    for f in synthetic_instances(tmp_path / "in", 2):
        archive.ingest_file(f)
    lost = next(iter(blobs(archive)))
    archive.local.path(lost).unlink()
    offloader = Offloader(archive, FAST)
    drain(offloader)
    s = status(archive.index)
    assert (s.offloaded, s.failed) == (1, 1) and "missing" in s.last_error
    offloader.close()


def test_backoff_grows_is_capped_and_jittered(make_archive):
    archive, _ = make_archive()
    offloader = Offloader(archive, Policy(retry_base=2, retry_max=300))
    for attempts in range(12):
        expected = min(300, 2 * 2 ** attempts)
        delays = {offloader.backoff(attempts) for _ in range(20)}
        assert all(expected / 2 <= d <= expected for d in delays) and len(delays) > 1
    offloader.close()


def test_an_outage_holds_uploads_back_and_they_resume(make_archive, moto, tmp_path):
    outage = Outage(moto.port)
    archive, bucket = make_archive(endpoint=outage.url)
    offloader = Offloader(archive, FAST)
    outage.cut()
    files = synthetic_instances(tmp_path / "in", 3) + synthetic_instances(tmp_path / "big", 1, 12 << 20)
    for f in files:
        assert archive.ingest_file(f).outcome is Outcome.STORED   # storing never waits for S3
    offloader.step()
    offloader.step()
    s = status(archive.index)
    assert s.pending == 4 and s.retrying == 4 and s.last_error
    outage.restore()
    drain(offloader)
    assert sorted(k.rsplit("/", 1)[1] for k in moto.objects(bucket)) == sorted(blobs(archive))
    assert moto.incomplete_uploads(bucket) == []
    offloader.close()


def test_kms_wraps_what_goes_to_s3_and_reads_it_back(make_archive, moto, tmp_path):
    archive, bucket = make_archive(kms=True)
    files = synthetic_instances(tmp_path / "in", 2)
    for f in files:
        archive.ingest_file(f)
    offloader = Offloader(archive, Policy(cache_max_bytes=1))
    drain(offloader)
    offloader.evict()
    for body in moto.objects(bucket).values():
        assert header_key_id(io.BytesIO(body))[0].startswith("kms:arn:aws:kms:")
    got = []
    for blob_id, sha in blobs(archive).items():
        with archive.exported(blob_id, sha) as path:
            got.append(dataset_sha256(path))
    assert sorted(got) == sorted(dataset_sha256(f) for f in files)
    offloader.close()


def test_rotation_rewraps_local_blobs_and_objects_and_old_copies_stay_readable(make_archive, moto, tmp_path):
    archive, bucket = make_archive()
    files = synthetic_instances(tmp_path / "in", 3)
    for f in files:
        archive.ingest_file(f)
    offloader = Offloader(archive, FAST)
    drain(offloader)
    before = archive.keyring.local.current_key_id()
    backup = tmp_path / "backup"
    shutil.copytree(archive.local.root, backup)     # a copy made before the rotation

    report = rotate(archive)
    assert (report.local, report.remote, report.failed) == (3, 3, [])
    assert report.key_id != before and archive.keyring.local.current_key_id() == report.key_id
    for blob_id in blobs(archive):
        with open(archive.local.path(blob_id), "rb") as fh:
            assert header_key_id(fh)[0] == report.key_id
    assert {header_key_id(io.BytesIO(b))[0] for b in moto.objects(bucket).values()} == {report.key_id}
    for blob_id, sha in blobs(archive).items():       # local copies and S3 objects both read
        with archive.exported(blob_id, sha):
            pass
        with archive.remote.open(blob_id):
            pass
    keyring = LocalKeyring.open(archive.data_dir / "keys", create=False)
    old = next(backup.glob("??/*"))
    assert LocalStorage(backup, keyring).read_all(old.name)          # the old key is still there
    assert rotate(archive).failed == []                               # and again
    offloader.close()


def test_a_blob_in_neither_tier_is_not_found(make_archive):
    archive, _ = make_archive()
    with pytest.raises(BlobNotFound):
        archive.storage.read_all("0" * 32)


def test_a_renamed_node_uploads_what_it_queued_under_its_former_name(moto, tmp_path):
    """`node.name` defaults to the host name: a container made again or a renamed machine starts the same
    data directory under a new name. What waited for upload under the former name goes up (and is evicted
    in time) all the same: the rows and the cursor of that data directory's former names are adopted."""
    from archive import nodes

    bucket = moto.new_bucket()

    def remote(keyring):
        return S3Storage(moto.client(), bucket, keyring, part_size=MIN_PART)

    files = synthetic_instances(tmp_path / "in", 3)
    before = Archive(tmp_path / "data", remote=remote, node="host-old")
    nodes.register(before.index, "host-old", before.data_dir, "host-old")
    for path in files:
        assert before.ingest_file(path).outcome.ok
    offloader = Offloader(before, FAST)
    offloader.take_changes()                   # queued; then the node stops before S3 answered
    offloader.close()
    before.close()

    after = Archive(tmp_path / "data", remote=remote, node="host-new")
    try:
        nodes.register(after.index, "host-new", after.data_dir, "host-new")
        offloader = Offloader(after, FAST)
        drain(offloader)
        offloader.close()
        rows = after.index.read(text("SELECT state, node FROM offload"))
        assert sorted(tuple(r) for r in rows) == [("offloaded", "host-new")] * 3
        assert len(moto.objects(bucket)) == 3
    finally:
        after.close()
