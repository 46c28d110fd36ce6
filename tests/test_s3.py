"""The S3 backend against moto's standalone server, a real HTTP S3 endpoint on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from archive.crypto import IntegrityError, LocalKeyring
from archive.s3 import MIN_PART, ObjectExists, S3Storage
from archive.storage import BlobNotFound
from helpers import data_file, free_port, wait_for

BUCKET = "m3-test"


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import urllib.request
        try:
            urllib.request.urlopen(url, timeout=1)
            return True
        except OSError as exc:
            return getattr(exc, "code", None) is not None

    wait_for(up, timeout=30, what="moto_server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(endpoint, tmp_path):
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = f"{BUCKET}-{os.getpid()}-{len(list(tmp_path.parts))}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    client.create_bucket(Bucket=bucket)
    storage = S3Storage(client, bucket, LocalKeyring.open(tmp_path / "keys"), part_size=MIN_PART,
                        segment_size=1 << 16)
    return client, bucket, storage


def _objects(client, bucket) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


def test_round_trip_small_and_multipart_ciphertext_only(s3):
    client, bucket, storage = s3
    small = data_file("CT_small.dcm").read_bytes()
    large = os.urandom(3 * MIN_PART + 12345)  # three full parts and a last one
    a = storage.create([small])
    b = storage.create(large[i:i + 1_000_000] for i in range(0, len(large), 1_000_000))
    assert storage.read_all(a.blob_id) == small and storage.read_all(b.blob_id) == large
    assert storage.read_range(b.blob_id, MIN_PART - 10, 70000) == large[MIN_PART - 10:MIN_PART + 69990]
    assert sorted(storage.blob_ids()) == sorted([a.blob_id, b.blob_id])
    stored = _objects(client, bucket)
    assert all(b"DICM" not in body and b"CompressedSamples" not in body for body in stored.values())
    assert all(a.blob_id in key or b.blob_id in key for key in stored) and not any("1.2." in k for k in stored)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_existing_object_is_never_overwritten(s3):
    _, _, storage = s3
    first = storage.create([b"first"])
    with pytest.raises(ObjectExists):
        storage.create([b"second"], blob_id=first.blob_id)
    assert storage.read_all(first.blob_id) == b"first"


def test_failed_write_leaves_no_multipart_upload(s3):
    client, bucket, storage = s3

    def broken():
        yield os.urandom(2 * MIN_PART)
        raise OSError("the spool went away")

    with pytest.raises(OSError):
        storage.create(broken())
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list(storage.blob_ids()) == []


@pytest.mark.parametrize("where", ["data", "tag", "wrapped key"])
def test_tampered_object_fails_with_an_integrity_error(s3, where):
    client, bucket, storage = s3
    blob = storage.create([os.urandom(200_000)])
    key = storage.key(blob.blob_id)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    position = {"data": len(body) // 2, "tag": len(body) - 3, "wrapped key": 40}[where]
    body[position] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
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
