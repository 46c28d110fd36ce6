"""The S3 storage backend (issue 4, first part): local blobs' envelope, in a bucket, through boto3.

The same interface as `LocalStorage` (create, open, read, read_range, exists, remove,
blob_ids). Objects are the authenticated envelope (`archive.crypto`): S3 only ever holds
ciphertext, under opaque keys (`prefix` + two hex digits + the random blob id). Writes
stream: an object larger than one part goes up as a multipart upload, one part in memory
at a time, each part with a SHA-256 checksum that S3 verifies; a failed write aborts its
multipart upload. Uploads are conditional (If-None-Match): an existing object is never
overwritten silently. Reads fetch what they need with ranged GETs, segment by segment.
"""
from __future__ import annotations

import io
import secrets
from contextlib import contextmanager
from typing import Iterable, Iterator

from botocore.exceptions import ClientError

from .crypto import EnvelopeReader, EnvelopeWriter, LocalKeyring
from .storage import BlobInfo, BlobNotFound, BlobReads, check_blob_id

MIN_PART = 5 << 20  # S3's smallest part (except the last)


class ObjectExists(FileExistsError):
    """The key is already taken in the bucket: nothing was written."""


class _Upload:
    """A write-only stream into one object: put_object if small, else a multipart upload."""

    def __init__(self, client, bucket: str, key: str, part_size: int):
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        self.buffer = bytearray()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, data) -> None:
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= self.part_size:
            self._part(bytes(self.buffer[:self.part_size]))
            del self.buffer[:self.part_size]

    def _part(self, body: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=self.key, ChecksumAlgorithm="SHA256")["UploadId"]
        number = len(self.parts) + 1
        answer = self.client.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                         PartNumber=number, Body=body, ChecksumAlgorithm="SHA256")
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"],
                           "ChecksumSHA256": answer.get("ChecksumSHA256")})

    def finish(self) -> None:
        try:
            if self.upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer),
                                       ChecksumAlgorithm="SHA256", IfNoneMatch="*")
                return
            if self.buffer:
                self._part(bytes(self.buffer))
            parts = [{k: v for k, v in p.items() if v is not None} for p in self.parts]
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                                  MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise ObjectExists(f"object {self.key} exists already") from None
            raise

    def abort(self) -> None:
        if self.upload_id is not None:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)


class _Ranges(io.RawIOBase):
    """A seekable read-only view of an object, each read one ranged GET."""

    def __init__(self, client, bucket: str, key: str, size: int):
        self.client, self.bucket, self.key, self.size = client, bucket, key, size
        self.position = 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size if size < 0 else min(self.size, self.position + size)
        if end <= self.position:
            return b""
        body = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                      Range=f"bytes={self.position}-{end - 1}")["Body"].read()
        self.position += len(body)
        return body


class S3Storage(BlobReads):
    """create / open / read / read_range / exists / remove over encrypted objects."""

    def __init__(self, client, bucket: str, keyring: LocalKeyring, *, prefix: str = "m3dicom/",
                 segment_size: int = 1 << 20, part_size: int = 8 << 20):
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum)")
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.keyring, self.segment_size, self.part_size = keyring, segment_size, part_size

    def key(self, blob_id: str) -> str:
        check_blob_id(blob_id)
        return f"{self.prefix}{blob_id[:2]}/{blob_id}"

    def create(self, chunks: Iterable[bytes], blob_id: str | None = None) -> BlobInfo:
        """Encrypt `chunks` into a new object; stored (and checksum-verified by S3) on return."""
        blob_id = blob_id or secrets.token_hex(16)
        upload = _Upload(self.client, self.bucket, self.key(blob_id), self.part_size)
        try:
            writer = EnvelopeWriter(upload, self.keyring, self.segment_size)
            for chunk in chunks:
                writer.write(chunk)
            writer.finish()
            upload.finish()
        except BaseException:
            upload.abort()
            raise
        return BlobInfo(blob_id, writer.plaintext_size, upload.size)

    def _size(self, blob_id: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key(blob_id))["ContentLength"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @contextmanager
    def open(self, blob_id: str) -> Iterator[EnvelopeReader]:
        size = self._size(blob_id)
        if size is None:
            raise BlobNotFound(blob_id)
        yield EnvelopeReader(_Ranges(self.client, self.bucket, self.key(blob_id), size), self.keyring, size)

    def exists(self, blob_id: str) -> bool:
        return self._size(blob_id) is not None

    def remove(self, blob_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(blob_id))

    def blob_ids(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"].rsplit("/", 1)[-1]
