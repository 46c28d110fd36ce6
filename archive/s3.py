"""The S3 tier: blobs' authenticated envelopes in a bucket, through boto3.

The same reading interface as `LocalStorage` (open, read, read_range, exists, remove,
blob_ids). Objects are the envelope of `archive.crypto`, so S3 only ever holds ciphertext,
under opaque keys (`prefix` + two hex digits + the random blob id). Uploads go through
boto3's transfer manager (`TransferConfig`: multipart above `part_size`, parts in parallel,
never the whole object in memory) with a SHA-256 checksum per request that S3 verifies,
and are conditional (If-None-Match): an existing object is never overwritten silently. After
an upload the object's size and checksum are checked against what was sent. Reads fetch
what they need with ranged GETs (a few MiB at a time).
"""
from __future__ import annotations

import base64
import hashlib
import io
import re
import secrets
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from s3transfer.utils import ChunksizeAdjuster

from .crypto import EnvelopeReader, EnvelopeWriter, KeyWrapper, header_key_id, rewrapped_header
from .storage import BlobInfo, BlobNotFound, BlobReads, check_blob_id

MIN_PART = 5 << 20         # S3's smallest part (except the last)
SINGLE_PUT_LIMIT = 5 << 30  # S3's largest single PUT
READ_AHEAD = 8 << 20
_MISSING = ("404", "NoSuchKey", "NotFound")
_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict")


class ObjectExists(FileExistsError):
    """The key is taken in the bucket by other content: nothing was written."""


class UploadMismatch(IOError):
    """The object in the bucket is not what was sent (size or checksum)."""


def client(endpoint_url: str = "", region: str = "us-east-1", timeout: float = 30.0, service: str = "s3",
           attempts: int = 3):
    """A boto3 client; credentials come from boto3's usual chain (environment, profile, role)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": attempts, "mode": "standard"},
                    max_pool_connections=32)
    return boto3.client(service, endpoint_url=endpoint_url or None, region_name=region or None, config=config)


class S3SettingsError(RuntimeError):
    """The S3 settings can never work (no credentials, no such bucket, a bucket these credentials may not use)."""


def check_bucket(s3, bucket: str) -> str | None:
    """At start: raise `S3SettingsError` for settings that cannot work whatever happens, with what to change;
    return a warning (None when all is well) when S3 cannot be reached now: the node starts anyway (what it
    receives is durable here; uploads retry until S3 answers)."""
    where = f"s3://{bucket}"
    try:
        s3.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise S3SettingsError(f"no AWS credentials for {where} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                              "AWS_PROFILE, or give the machine a role)") from None
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error_code(exc)
        if status == 404 or code in ("404", "NoSuchBucket"):
            raise S3SettingsError(f"bucket {bucket!r} does not exist (storage.s3.bucket; the node does not create "
                                  "it)") from None
        if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise S3SettingsError(f"these AWS credentials may not use {where} ({code or status}: check the key, "
                                  "its secret and the bucket's policy)") from None
        if status == 301 or code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
            raise S3SettingsError(f"{where} is in another region than storage.s3.region ({code or status})") from None
        return f"S3 answered {code or status} for {where}: uploads will retry"
    except BotoCoreError as exc:
        return f"S3 cannot be reached now ({type(exc).__name__}): the node starts, uploads retry until it answers"
    return None


def error_code(exc: BaseException) -> str:
    return exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""


def _no_overwrite(params, **_) -> None:
    """Every PUT and multipart completion by this client is conditional, unless it names the ETag it replaces."""
    if "IfMatch" not in params:
        params.setdefault("IfNoneMatch", "*")


class Spliced(io.RawIOBase):
    """`head` followed by `source` from `offset`: an envelope with a new header, seekable, nothing copied."""

    def __init__(self, head: bytes, source: BinaryIO, offset: int, size: int):
        self.head, self.source, self.offset = head, source, offset
        self.size = len(head) + size - offset
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def readinto(self, buffer) -> int:
        """Fill `buffer` as far as the end (a short read would make a short multipart part)."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self.position < self.size:
            if self.position < len(self.head):
                data = self.head[self.position:self.position + len(view) - filled]
            else:
                self.source.seek(self.offset + self.position - len(self.head))
                data = self.source.read(min(len(view) - filled, self.size - self.position))
                if not data:
                    raise EOFError("the blob file is shorter than expected")
            view[filled:filled + len(data)] = data
            filled += len(data)
            self.position += len(data)
        return filled


class _Ranges(io.RawIOBase):
    """A seekable read-only view of an object: ranged GETs, `READ_AHEAD` bytes at a time."""

    def __init__(self, client, bucket: str, key: str, size: int):
        self.client, self.bucket, self.key, self.size = client, bucket, key, size
        self.position = 0
        self._start, self._buffer = 0, b""

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
        if not (self._start <= self.position and end <= self._start + len(self._buffer)):
            stop = max(end, min(self.size, self.position + READ_AHEAD))
            self._buffer = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                                  Range=f"bytes={self.position}-{stop - 1}")["Body"].read()
            self._start = self.position
        data = self._buffer[self.position - self._start:end - self._start]
        self.position += len(data)
        return data


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class Fingerprint:
    sha256: str               # S3's ChecksumSHA256 (multipart: of the parts' digests)
    etag: str                 # S3's ETag when it is an MD5 (multipart: "md5-of-md5s-N")
    content_md5: str = ""     # Content-MD5 header of a single PUT

    def matches(self, answer: dict) -> bool | None:
        """Whether an S3 answer (PUT or HEAD) shows these bytes; None when it shows nothing
        comparable (no checksum, and an ETag that is not an MD5, as with SSE-KMS buckets)."""
        verdicts = []
        reported = answer.get("ChecksumSHA256")
        if reported:
            verdicts.append(reported.split("-")[0] == self.sha256)
        etag = answer.get("ETag", "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}(-\d+)?", etag) and ("-" in etag) == ("-" in self.etag):
            verdicts.append(etag == self.etag)
        return all(verdicts) if verdicts else None


class S3Storage(BlobReads):
    """Encrypted objects in one bucket under `prefix`. It owns `client`: every PUT it makes is
    conditional (If-None-Match) unless it says which version it replaces (If-Match)."""

    def __init__(self, client, bucket: str, keyring: KeyWrapper, *, prefix: str = "m3dicom/",
                 segment_size: int = 1 << 20, part_size: int = 8 << 20, concurrency: int = 4):
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least {MIN_PART} bytes (S3's minimum)")
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.keyring, self.segment_size, self.part_size = keyring, segment_size, part_size
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency)
        for operation in ("PutObject", "CompleteMultipartUpload"):
            client.meta.events.register(f"before-parameter-build.s3.{operation}", _no_overwrite)

    def key(self, blob_id: str) -> str:
        check_blob_id(blob_id)
        return f"{self.prefix}{blob_id[:2]}/{blob_id}"

    # -- writing ---------------------------------------------------------------------------

    def put(self, blob_id: str, source: BinaryIO, size: int) -> None:
        """Upload `size` bytes of an envelope from `source` (seekable) as the blob's object.

        Every request carries a SHA-256 checksum that S3 verifies on receipt (a single PUT
        also its MD5). On return the object is in the bucket and what S3 reports of it is
        what was sent. If the key exists already with this very content (an earlier
        attempt whose answer was lost), that is success; with other content, ObjectExists.
        """
        try:
            if size < self.transfer.multipart_threshold:
                self._put_single(blob_id, source, size)
            else:
                self._put_multipart(blob_id, source, size)
        except ClientError as exc:
            if error_code(exc) not in _PRECONDITION:
                raise
            if not self.holds(blob_id, size, self.fingerprint(source, size)):
                raise ObjectExists(f"object {self.key(blob_id)} exists with other content") from None

    def _put_single(self, blob_id: str, source: BinaryIO, size: int) -> None:
        """One PUT, checked against its answer (checksum or MD5 ETag) or, when that shows
        nothing comparable (an SSE-KMS bucket's ETag), a HEAD."""
        expected = self.fingerprint(source, size)
        source.seek(0)
        answer = self.client.put_object(Bucket=self.bucket, Key=self.key(blob_id), Body=source.read(size),
                                        ChecksumSHA256=expected.sha256, ContentMD5=expected.content_md5)
        verdict = expected.matches(answer)
        if verdict is None:
            verdict = self.holds(blob_id, size, expected)
        if not verdict:
            raise UploadMismatch(f"object {self.key(blob_id)}: S3 stored other bytes than were sent")

    def _put_multipart(self, blob_id: str, source: BinaryIO, size: int) -> None:
        """boto3's transfer manager, parts in parallel, each with a SHA-256 that S3 verifies
        (computed by botocore from the bytes it sends); then the object's size and part count."""
        source.seek(0)
        self.client.upload_fileobj(source, self.bucket, self.key(blob_id),
                                   ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=self.transfer)
        head = self.head(blob_id, checksum=True)
        parts = -(-size // ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size))
        reported = (head or {}).get("ChecksumSHA256", "")
        if head is None or head["ContentLength"] != size or ("-" in reported and not reported.endswith(f"-{parts}")):
            raise UploadMismatch(f"object {self.key(blob_id)} does not match what was uploaded")

    def create(self, chunks: Iterable[bytes], blob_id: str | None = None) -> BlobInfo:
        """Encrypt `chunks` straight into a new object (the ciphertext is spooled on local disk)."""
        blob_id = blob_id or secrets.token_hex(16)
        with tempfile.TemporaryFile() as spool:
            writer = EnvelopeWriter(spool, self.keyring, self.segment_size)
            for chunk in chunks:
                writer.write(chunk)
            writer.finish()
            size = spool.tell()
            self.put(blob_id, spool, size)
        return BlobInfo(blob_id, writer.plaintext_size, size)

    def replace(self, blob_id: str, source: BinaryIO, size: int, etag: str) -> None:
        """Overwrite the object, only if it is still version `etag` (key rotation)."""
        if size > SINGLE_PUT_LIMIT:
            raise ValueError(f"object {self.key(blob_id)} is larger than one PUT ({size} bytes)")
        self.client.put_object(Bucket=self.bucket, Key=self.key(blob_id), Body=source, ContentLength=size,
                               ChecksumAlgorithm="SHA256", IfMatch=etag)

    def rewrap(self, blob_id: str, target: KeyWrapper) -> bool:
        """Re-wrap the object's data key for `target` if it is wrapped by another key: the object is
        rewritten with a new header and the same ciphertext (only if nobody changed it meanwhile).
        Returns whether it was rewritten."""
        head = self.head(blob_id)
        if head is None:
            raise BlobNotFound(blob_id)
        size = head["ContentLength"]
        view = _Ranges(self.client, self.bucket, self.key(blob_id), size)
        if header_key_id(view)[0] == target.current_key_id():
            return False
        with tempfile.TemporaryFile() as copy:
            self.client.download_fileobj(self.bucket, self.key(blob_id), copy)
            header, old = rewrapped_header(copy, self.keyring, target)
            self.replace(blob_id, Spliced(header, copy, old, size), len(header) + size - old, head["ETag"])
        return True

    def fingerprint(self, source: BinaryIO, size: int) -> "Fingerprint":
        """What S3 reports for these bytes uploaded with our transfer settings: the SHA-256
        checksum and the ETag, of the whole object or (multipart) of its parts' digests."""
        source.seek(0)
        if size < self.transfer.multipart_threshold:
            body = source.read(size)
            return Fingerprint(_b64(hashlib.sha256(body).digest()), hashlib.md5(body).hexdigest(),
                               _b64(hashlib.md5(body).digest()))
        part = ChunksizeAdjuster().adjust_chunksize(self.transfer.multipart_chunksize, size)
        shas, md5s, parts = b"", b"", 0
        while chunk := source.read(part):
            shas += hashlib.sha256(chunk).digest()
            md5s += hashlib.md5(chunk).digest()
            parts += 1
        return Fingerprint(_b64(hashlib.sha256(shas).digest()), f"{hashlib.md5(md5s).hexdigest()}-{parts}")

    def holds(self, blob_id: str, size: int, expected: "Fingerprint") -> bool:
        """Whether the bucket has this blob's object with this size and content."""
        head = self.head(blob_id, checksum=True)
        return head is not None and head["ContentLength"] == size and expected.matches(head) is not False

    def abort_incomplete(self, only: Callable[[str], bool] | None = None) -> int:
        """Abort the multipart uploads left under our prefix (a crash or an outage mid-upload); with `only`,
        those of the blob ids it accepts (nodes sharing the bucket: another's may be under way)."""
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self.prefix):
            for upload in page.get("Uploads", []):
                if only is not None and not only(upload["Key"].rsplit("/", 1)[-1]):
                    continue
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                   UploadId=upload["UploadId"])
                aborted += 1
        return aborted

    # -- reading ---------------------------------------------------------------------------

    def head(self, blob_id: str, checksum: bool = False) -> dict | None:
        try:
            extra = {"ChecksumMode": "ENABLED"} if checksum else {}
            return self.client.head_object(Bucket=self.bucket, Key=self.key(blob_id), **extra)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                return None
            raise

    @contextmanager
    def open(self, blob_id: str) -> Iterator[EnvelopeReader]:
        head = self.head(blob_id)
        if head is None:
            raise BlobNotFound(blob_id)
        size = head["ContentLength"]
        yield EnvelopeReader(_Ranges(self.client, self.bucket, self.key(blob_id), size), self.keyring, size)

    def exists(self, blob_id: str) -> bool:
        return self.head(blob_id) is not None

    def remove(self, blob_id: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(blob_id))

    def blob_ids(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"].rsplit("/", 1)[-1]
