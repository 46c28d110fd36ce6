"""The S3 tier and KMS against moto's standalone server, a real HTTP endpoint on loopback."""
from __future__ import annotations

import io
import os

import pytest

from archive.crypto import (EnvelopeReader, EnvelopeWriter, IntegrityError, Keyring, KmsKeyring, LocalKeyring,
                            header_key_id, rewrapped_header)
from archive.s3 import MIN_PART, Fingerprint, ObjectExists, S3Storage, Spliced
from archive.storage import BlobNotFound
from helpers import data_file, shows_part10_header


@pytest.fixture
def s3(moto, tmp_path):
    bucket = moto.new_bucket()
    storage = S3Storage(moto.client(), bucket, LocalKeyring.open(tmp_path / "keys"), part_size=MIN_PART,
                        segment_size=1 << 16)
    return moto, bucket, storage


def test_round_trip_small_and_multipart_ciphertext_only(s3):
    moto, bucket, storage = s3
    small = data_file("CT_small.dcm").read_bytes()
    large = os.urandom(3 * MIN_PART + 12345)  # three full parts and a last one
    a = storage.create([small])
    b = storage.create(large[i:i + 1_000_000] for i in range(0, len(large), 1_000_000))
    assert storage.read_all(a.blob_id) == small and storage.read_all(b.blob_id) == large
    assert storage.read_range(b.blob_id, MIN_PART - 10, 70000) == large[MIN_PART - 10:MIN_PART + 69990]
    assert sorted(storage.blob_ids()) == sorted([a.blob_id, b.blob_id])
    stored = moto.objects(bucket)
    assert not any(shows_part10_header(body, small) or b"CompressedSamples" in body or large[:64] in body
                   for body in stored.values())
    assert all(a.blob_id in key or b.blob_id in key for key in stored) and not any("1.2." in k for k in stored)
    assert moto.incomplete_uploads(bucket) == []


def test_existing_object_is_never_overwritten(s3):
    _, _, storage = s3
    first = storage.create([b"first"])
    with pytest.raises(ObjectExists):
        storage.create([b"second"], blob_id=first.blob_id)
    assert storage.read_all(first.blob_id) == b"first"


@pytest.mark.parametrize("size", [1000, 2 * MIN_PART + 7])
def test_uploading_the_same_bytes_again_is_success_not_a_copy(s3, size):
    moto, bucket, storage = s3
    body = os.urandom(size)
    storage.put("ab" * 16, io.BytesIO(body), size)
    storage.put("ab" * 16, io.BytesIO(body), size)   # an earlier attempt's answer was lost
    with pytest.raises(ObjectExists):
        storage.put("ab" * 16, io.BytesIO(body[::-1]), size)
    assert list(moto.objects(bucket).values()) == [body]


def test_what_s3_reports_is_compared_with_what_was_sent(s3):
    _, _, storage = s3
    single = storage.fingerprint(io.BytesIO(b"abc"), 3)
    assert single.etag == "900150983cd24fb0d6963f7d28e17f72"          # MD5 of "abc"
    assert single.matches({"ETag": '"900150983cd24fb0d6963f7d28e17f72"'}) is True
    assert single.matches({"ETag": '"' + "0" * 32 + '"'}) is False
    assert single.matches({"ChecksumSHA256": single.sha256, "ETag": '"kms-encrypted-etag"'}) is True
    assert single.matches({"ETag": '"kms-encrypted-etag"'}) is None     # nothing comparable: HEAD decides
    body = os.urandom(2 * MIN_PART + 1)
    multi = storage.fingerprint(io.BytesIO(body), len(body))
    assert multi.etag.endswith("-3") and multi.matches({"ChecksumSHA256": multi.sha256 + "-3"}) is True
    assert multi.matches({"ETag": f'"{multi.etag}"', "ChecksumSHA256": "x"}) is False
    assert isinstance(multi, Fingerprint)


def test_failed_write_leaves_nothing(s3):
    moto, bucket, storage = s3

    def broken():
        yield os.urandom(2 * MIN_PART)
        raise OSError("the spool went away")

    with pytest.raises(OSError):
        storage.create(broken())
    assert moto.incomplete_uploads(bucket) == [] and list(storage.blob_ids()) == []


def test_incomplete_uploads_under_the_prefix_are_aborted(s3):
    moto, bucket, storage = s3
    client = moto.client()
    client.create_multipart_upload(Bucket=bucket, Key=storage.key("cd" * 16))
    client.create_multipart_upload(Bucket=bucket, Key="someone-else/x")
    assert storage.abort_incomplete() == 1
    assert [u["Key"] for u in moto.incomplete_uploads(bucket)] == ["someone-else/x"]


@pytest.mark.parametrize("where", ["data", "tag", "wrapped key"])
def test_tampered_object_fails_with_an_integrity_error(s3, where):
    moto, bucket, storage = s3
    blob = storage.create([os.urandom(200_000)])
    key = storage.key(blob.blob_id)
    attacker = moto.client()
    body = bytearray(attacker.get_object(Bucket=bucket, Key=key)["Body"].read())
    position = {"data": len(body) // 2, "tag": len(body) - 3, "wrapped key": 40}[where]
    body[position] ^= 0x01
    attacker.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(IntegrityError):
        storage.read_all(blob.blob_id)


def test_remove_and_missing(s3):
    _, _, storage = s3
    blob = storage.create([b"x" * 10])
    assert storage.exists(blob.blob_id)
    storage.remove(blob.blob_id)
    assert not storage.exists(blob.blob_id)
    with pytest.raises(BlobNotFound):
        storage.read_all(blob.blob_id)


# -- KMS ------------------------------------------------------------------------------------

@pytest.fixture
def kms(moto):
    client = moto.client("kms")
    return KmsKeyring(client, client.create_key()["KeyMetadata"]["Arn"])


def _envelope(keyring, data: bytes) -> io.BytesIO:
    out = io.BytesIO()
    writer = EnvelopeWriter(out, keyring, 4096)
    writer.write(data)
    writer.finish()
    out.seek(0)
    return out


def test_kms_generates_and_unwraps_data_keys(kms, tmp_path):
    ring = Keyring(LocalKeyring.open(tmp_path / "keys"), kms)
    data = os.urandom(10_000)
    blob = _envelope(kms, data)
    key_id, _ = header_key_id(blob)
    assert key_id == "kms:" + kms.key_id
    blob.seek(0)
    assert b"".join(EnvelopeReader(blob, ring, len(blob.getvalue())).iter_plaintext()) == data
    blob.seek(0)
    with pytest.raises(IntegrityError, match="crypto.kms_key_id is not set"):
        EnvelopeReader(blob, Keyring(ring.local), len(blob.getvalue()))


def test_rewrapping_for_kms_keeps_the_ciphertext(kms, tmp_path):
    """What the offloader sends with KMS set: the local envelope with a KMS-wrapped data key."""
    ring = Keyring(LocalKeyring.open(tmp_path / "keys"), kms)
    data = os.urandom(20_000)
    local = _envelope(ring, data)
    header, old = rewrapped_header(local, ring, kms)
    size = len(local.getvalue())
    remote = Spliced(header, local, old, size).read()
    assert remote[len(header):] == local.getvalue()[old:]           # not re-encrypted
    assert header_key_id(io.BytesIO(remote))[0].startswith("kms:")
    assert b"".join(EnvelopeReader(io.BytesIO(remote), ring, len(remote)).iter_plaintext()) == data
    damaged = bytearray(remote)
    damaged[len(header) - 20] ^= 1                                    # inside KMS's ciphertext blob
    with pytest.raises(IntegrityError):
        EnvelopeReader(io.BytesIO(bytes(damaged)), ring, len(damaged))
