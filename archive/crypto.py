"""Envelope encryption of blobs at rest: AES-256-GCM in authenticated segments.

Each blob gets a fresh 256-bit data key, wrapped (RFC 3394 AES key wrap) by a
key-encryption key (KEK). The plaintext is cut into segments that are sealed one by
one (the STREAM construction: nonce = random prefix | segment number | last flag), so a
blob of any size is written and read with one segment in memory, a range can be read
without decrypting the rest, and truncating, reordering or flipping a byte is detected.

Layout::

    magic "M3BLOB" 0x00 0x01 | nonce prefix (7) | segment size (4, BE)     <- authenticated (AAD)
    KEK id length (1) | KEK id | wrapped key length (2, BE) | wrapped key  <- checked by the key wrap
    segment 0 ciphertext + tag (16) | segment 1 ... | last segment (may be empty)

The wrapped key is outside the AAD so that rotating the KEK only rewrites the header
(`rewrapped_header`), never the data.

Key ids name where a data key is wrapped: a local KEK file (`0001-3f2a9c1b`) or AWS KMS
(`kms:` + the key's ARN). `Keyring` resolves both; local blobs are always wrapped by the
local KEK (C-STORE never waits on a network call), objects in S3 by KMS when it is set.
"""
from __future__ import annotations

import os
import secrets
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

MAGIC = b"M3BLOB\x00\x01"
TAG = 16
_FIXED = struct.Struct(">8s7sI")


class IntegrityError(Exception):
    """A blob failed authentication: it was altered, truncated or its key is wrong."""


@dataclass(frozen=True)
class KeyEncryptionKey:
    key_id: str
    key: bytes


class KeyWrapper(Protocol):
    """What envelopes need of a key-encryption key: a fresh wrapped data key, and unwrapping."""

    def current_key_id(self) -> str: ...                      # what new wraps are written with

    def new_data_key(self) -> tuple[bytes, str, bytes]: ...   # (plaintext key, key id, wrapped key)

    def wrap(self, data_key: bytes) -> tuple[str, bytes]: ...

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes: ...


class LocalKeyring:
    """Key-encryption keys kept as 0600 files in `directory`; the newest is current.

    `m3dicom keys rotate` may add a key while the node runs: a key id that is not loaded,
    or a change of the directory, makes the keyring read the directory again.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._keys: dict[str, KeyEncryptionKey] = {}
        self.current: KeyEncryptionKey | None = None
        self._seen = 0
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, create: bool = True) -> "LocalKeyring":
        """The keys in `directory`; with `create`, the directory and a first key made when there are none
        (without: nothing is made, and a missing directory raises FileNotFoundError)."""
        ring = cls(directory)
        if create:
            ring.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ring._load()
        if ring.current is None and create:
            ring.current = ring.add_new()
        return ring

    def _load(self) -> None:
        with self._lock:
            self._seen = os.stat(self.directory).st_mtime_ns
            files = sorted(self.directory.glob("*.kek"))
            for path in files:
                if path.stem in self._keys:
                    continue
                data = path.read_bytes()
                if len(data) != 32:
                    raise IntegrityError(f"key file {path} is damaged (expected 32 bytes)")
                self._keys[path.stem] = KeyEncryptionKey(path.stem, data)
            if files:
                self.current = self._keys[files[-1].stem]

    def _refresh(self) -> None:
        try:
            if os.stat(self.directory).st_mtime_ns != self._seen:
                self._load()
        except FileNotFoundError:
            pass

    def add_new(self) -> KeyEncryptionKey:
        """Create a new KEK and make it current. Ids sort by creation order."""
        self._refresh()
        index = len(self._keys) + 1
        key_id = f"{index:04d}-{secrets.token_hex(4)}"
        path = self.directory / f"{key_id}.kek"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        fsync_directory(self.directory)
        kek = KeyEncryptionKey(key_id, path.read_bytes())
        self._keys[key_id] = kek
        self.current = kek
        return kek

    def current_key_id(self) -> str:
        self._refresh()
        if self.current is None:
            raise IntegrityError(f"no key-encryption key in {self.directory}")
        return self.current.key_id

    def new_data_key(self) -> tuple[bytes, str, bytes]:
        data_key = AESGCM.generate_key(256)
        return (data_key, *self.wrap(data_key))

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        self._refresh()
        if self.current is None:
            raise IntegrityError(f"no key-encryption key in {self.directory}")
        return self.current.key_id, aes_key_wrap(self.current.key, data_key)

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        kek = self._keys.get(key_id)
        if kek is None:
            self._load()
            kek = self._keys.get(key_id)
        if kek is None:
            raise IntegrityError(f"the blob's key-encryption key {key_id!r} is not in the keyring "
                                 f"{self.directory}")
        try:
            return aes_key_unwrap(kek.key, wrapped)
        except InvalidUnwrap:
            raise IntegrityError("the blob's data key cannot be unwrapped: wrong key-encryption "
                                 "key or altered header") from None


KMS_PREFIX = "kms:"


class KmsKeyring:
    """Data keys generated and unwrapped by AWS KMS (any boto3 KMS client: AWS, or moto in tests)."""

    def __init__(self, client, key_id: str):
        self.client, self.key_id = client, key_id
        self._arn: str | None = None

    def current_key_id(self) -> str:
        """`kms:` + the key's ARN (the configured id may be an alias)."""
        if self._arn is None:
            self._arn = self._call(self.client.describe_key, KeyId=self.key_id)["KeyMetadata"]["Arn"]
        return KMS_PREFIX + self._arn

    def new_data_key(self) -> tuple[bytes, str, bytes]:
        answer = self._call(self.client.generate_data_key, KeyId=self.key_id, KeySpec="AES_256")
        return answer["Plaintext"], KMS_PREFIX + answer["KeyId"], answer["CiphertextBlob"]

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        answer = self._call(self.client.encrypt, KeyId=self.key_id, Plaintext=data_key)
        return KMS_PREFIX + answer["KeyId"], answer["CiphertextBlob"]

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        try:
            return self._call(self.client.decrypt, CiphertextBlob=wrapped,
                              KeyId=key_id.removeprefix(KMS_PREFIX))["Plaintext"]
        except KmsError as exc:
            if exc.code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise IntegrityError("the blob's data key cannot be unwrapped by KMS: altered header "
                                     "or wrong key") from None
            raise

    @staticmethod
    def _call(method, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise KmsError(code, f"AWS KMS refused {method.__name__}: {code}: "
                           f"{exc.response.get('Error', {}).get('Message', '')}") from None
        except BotoCoreError as exc:
            raise KmsError("", f"AWS KMS cannot be reached: {exc}") from None


class KmsError(RuntimeError):
    """AWS KMS refused a request or cannot be reached (the blob itself may be fine)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Keyring:
    """The node's keys: the local KEK wraps local blobs; `remote` (KMS, or the local KEK) wraps
    objects in S3; any of them unwraps by the key id written in the blob."""

    def __init__(self, local: LocalKeyring, kms: KmsKeyring | None = None):
        self.local, self.kms = local, kms
        self.remote: KeyWrapper = kms or local

    def current_key_id(self) -> str:
        return self.local.current_key_id()

    def new_data_key(self) -> tuple[bytes, str, bytes]:
        return self.local.new_data_key()

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        return self.local.wrap(data_key)

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        if key_id.startswith(KMS_PREFIX):
            if self.kms is None:
                raise IntegrityError(f"the blob's data key is wrapped by AWS KMS ({key_id}) but "
                                     "crypto.kms_key_id is not set")
            return self.kms.unwrap(key_id, wrapped)
        return self.local.unwrap(key_id, wrapped)


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _header_bytes(aad: bytes, key_id: str, wrapped: bytes) -> bytes:
    kid = key_id.encode("ascii")
    if len(kid) > 255:
        raise ValueError(f"key id too long for a blob header: {key_id!r}")
    return aad + struct.pack(">B", len(kid)) + kid + struct.pack(">H", len(wrapped)) + wrapped


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


class EnvelopeWriter:
    """Encrypt a stream of bytes to `out`, one segment in memory at a time."""

    def __init__(self, out: BinaryIO, keyring: KeyWrapper, segment_size: int = 1 << 20):
        self._out = out
        self._segment_size = segment_size
        data_key, key_id, wrapped = keyring.new_data_key()
        self._aead = AESGCM(data_key)
        prefix = secrets.token_bytes(7)
        self._prefix = prefix
        self._aad = _FIXED.pack(MAGIC, prefix, segment_size)
        out.write(_header_bytes(self._aad, key_id, wrapped))
        # one segment of plaintext and one of ciphertext, reused: no copy beyond the one
        # into the segment (received pieces are smaller than a segment) and the encryption.
        # They grow as data comes: a small instance never touches a whole segment's pages.
        self._segment = bytearray()
        self._filled = 0
        self._sealed = bytearray()
        self._index = 0
        self.plaintext_size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.plaintext_size += len(view)
        size = self._segment_size
        while view:
            # a full segment is sealed only when more data follows: the last one carries the "last" flag
            if self._filled == size:
                self._seal(last=False)
            take = min(size - self._filled, len(view))
            self._segment[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]

    def _seal(self, last: bool) -> None:
        if len(self._sealed) < self._filled + TAG:
            self._sealed = bytearray(self._filled + TAG)
        with memoryview(self._segment) as plain, memoryview(self._sealed) as sealed:
            length = self._aead.encrypt_into(_nonce(self._prefix, self._index, last), plain[:self._filled],
                                             self._aad, sealed[:self._filled + TAG])
            self._out.write(sealed[:length])
        self._filled = 0
        self._index += 1

    def finish(self) -> None:
        self._seal(last=True)


@dataclass(frozen=True)
class _Header:
    prefix: bytes
    segment_size: int
    aad: bytes
    key_id: str
    wrapped: bytes
    length: int


def _read_header(fh: BinaryIO) -> _Header:
    fixed = fh.read(_FIXED.size)
    if len(fixed) != _FIXED.size:
        raise IntegrityError("blob is truncated (incomplete header)")
    magic, prefix, segment_size = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise IntegrityError("not an m3dicom encrypted blob (bad magic)")
    if not 1 <= segment_size <= 1 << 30:
        raise IntegrityError("blob header is damaged (segment size)")
    (kid_len,) = struct.unpack(">B", fh.read(1) or b"\x00")
    kid = fh.read(kid_len)
    raw = fh.read(2)
    if len(kid) != kid_len or len(raw) != 2:
        raise IntegrityError("blob is truncated (incomplete header)")
    (wrapped_len,) = struct.unpack(">H", raw)
    wrapped = fh.read(wrapped_len)
    if len(wrapped) != wrapped_len:
        raise IntegrityError("blob is truncated (incomplete header)")
    try:
        key_id = kid.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("blob header is damaged (key id)") from None
    return _Header(prefix, segment_size, fixed, key_id, wrapped,
                   _FIXED.size + 1 + kid_len + 2 + wrapped_len)


class EnvelopeReader:
    """Decrypt a blob opened for reading; every byte returned has been authenticated."""

    def __init__(self, fh: BinaryIO, keyring: KeyWrapper, total_size: int):
        self._fh = fh
        self._header = _read_header(fh)
        self._aead = AESGCM(keyring.unwrap(self._header.key_id, self._header.wrapped))
        body = total_size - self._header.length
        seg = self._header.segment_size + TAG
        self._segments = max(1, -(-body // seg))
        last_ct = body - (self._segments - 1) * seg
        if body < TAG or last_ct < TAG:
            raise IntegrityError("blob is truncated")
        self.plaintext_size = body - self._segments * TAG

    def _segment(self, index: int) -> bytes:
        h = self._header
        seg = h.segment_size + TAG
        self._fh.seek(h.length + index * seg)
        ct = self._fh.read(seg)
        last = index == self._segments - 1
        try:
            return self._aead.decrypt(_nonce(h.prefix, index, last), ct, h.aad)
        except InvalidTag:
            raise IntegrityError(f"blob segment {index} failed authentication (altered or "
                                 "truncated data)") from None

    def iter_plaintext(self, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the plaintext from `offset`, `length` bytes (default: to the end)."""
        end = self.plaintext_size if length is None else min(self.plaintext_size, offset + length)
        size = self._header.segment_size
        if offset >= end:
            # still authenticate the last segment so an empty range of a bad blob fails
            if self.plaintext_size == 0:
                self._segment(0)
            return
        for index in range(offset // size, (end - 1) // size + 1):
            data = self._segment(index)
            start = offset - index * size if index == offset // size else 0
            stop = end - index * size
            yield data[start:stop]


def header_key_id(fh: BinaryIO) -> tuple[str, int]:
    """(key id, header length) of the envelope at the start of `fh` (position moved)."""
    fh.seek(0)
    header = _read_header(fh)
    return header.key_id, header.length


def rewrapped_header(fh: BinaryIO, keyring: KeyWrapper, target: KeyWrapper) -> tuple[bytes, int]:
    """A new header for the envelope in `fh`, its data key wrapped by `target` instead.

    Returns (new header, length of the old one): the ciphertext after the old header is
    kept as it is. The data key is unwrapped with `keyring` (so the old key must be known).
    """
    fh.seek(0)
    header = _read_header(fh)
    data_key = keyring.unwrap(header.key_id, header.wrapped)
    key_id, wrapped = target.wrap(data_key)
    return _header_bytes(header.aad, key_id, wrapped), header.length
