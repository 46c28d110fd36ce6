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

The wrapped key is outside the AAD so that rotating the KEK only rewrites the header.
"""
from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

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


class LocalKeyring:
    """Key-encryption keys kept as 0600 files in `directory`; the newest is current."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._keys: dict[str, KeyEncryptionKey] = {}
        self.current: KeyEncryptionKey | None = None

    @classmethod
    def open(cls, directory: Path, create: bool = True) -> "LocalKeyring":
        ring = cls(directory)
        ring.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = sorted(ring.directory.glob("*.kek"))
        for path in files:
            data = path.read_bytes()
            if len(data) != 32:
                raise IntegrityError(f"key file {path} is damaged (expected 32 bytes)")
            ring._keys[path.stem] = KeyEncryptionKey(path.stem, data)
        if files:
            ring.current = ring._keys[files[-1].stem]
        elif create:
            ring.current = ring.add_new()
        return ring

    def add_new(self) -> KeyEncryptionKey:
        """Create a new KEK and make it current. Ids sort by creation order."""
        index = len(self._keys) + 1
        key_id = f"{index:04d}-{secrets.token_hex(4)}"
        path = self.directory / f"{key_id}.kek"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        kek = KeyEncryptionKey(key_id, path.read_bytes())
        self._keys[key_id] = kek
        self.current = kek
        return kek

    def wrap(self, data_key: bytes) -> tuple[str, bytes]:
        assert self.current is not None
        return self.current.key_id, aes_key_wrap(self.current.key, data_key)

    def unwrap(self, key_id: str, wrapped: bytes) -> bytes:
        kek = self._keys.get(key_id)
        if kek is None:
            raise IntegrityError(f"the blob's key-encryption key {key_id!r} is not in the keyring "
                                 f"{self.directory}")
        try:
            return aes_key_unwrap(kek.key, wrapped)
        except InvalidUnwrap:
            raise IntegrityError("the blob's data key cannot be unwrapped: wrong key-encryption "
                                 "key or altered header") from None


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


class EnvelopeWriter:
    """Encrypt a stream of bytes to `out`, one segment in memory at a time."""

    def __init__(self, out: BinaryIO, keyring: LocalKeyring, segment_size: int = 1 << 20):
        self._out = out
        self._segment_size = segment_size
        data_key = AESGCM.generate_key(256)
        self._aead = AESGCM(data_key)
        key_id, wrapped = keyring.wrap(data_key)
        prefix = secrets.token_bytes(7)
        self._prefix = prefix
        self._aad = _FIXED.pack(MAGIC, prefix, segment_size)
        kid = key_id.encode()
        out.write(self._aad + struct.pack(">B", len(kid)) + kid + struct.pack(">H", len(wrapped)) + wrapped)
        self._buffer = bytearray()
        self._index = 0
        self.plaintext_size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._buffer += data
        self.plaintext_size += len(data)
        size = self._segment_size
        # keep at least one byte back: the last segment must carry the "last" flag
        while len(self._buffer) > size:
            self._seal(bytes(self._buffer[:size]), last=False)
            del self._buffer[:size]

    def _seal(self, chunk: bytes, last: bool) -> None:
        self._out.write(self._aead.encrypt(_nonce(self._prefix, self._index, last), chunk, self._aad))
        self._index += 1

    def finish(self) -> None:
        self._seal(bytes(self._buffer), last=True)
        self._buffer = bytearray()


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

    def __init__(self, fh: BinaryIO, keyring: LocalKeyring, total_size: int):
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
