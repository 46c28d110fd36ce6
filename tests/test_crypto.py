"""Envelope encryption: round trips, ranges, and every kind of tampering fails loudly."""
from __future__ import annotations

import io
import os

import pytest

from archive.crypto import EnvelopeReader, EnvelopeWriter, IntegrityError, LocalKeyring


@pytest.fixture
def ring(tmp_path):
    return LocalKeyring.open(tmp_path / "keys")


def seal(ring, data: bytes, segment: int = 4096) -> bytes:
    out = io.BytesIO()
    writer = EnvelopeWriter(out, ring, segment)
    for i in range(0, len(data), 1000):
        writer.write(data[i:i + 1000])
    writer.finish()
    return out.getvalue()


def open_(ring, blob: bytes) -> EnvelopeReader:
    return EnvelopeReader(io.BytesIO(blob), ring, len(blob))


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 50_000])
def test_round_trip(ring, size):
    data = os.urandom(size)
    blob = seal(ring, data)
    assert size < 16 or data[:64] not in blob
    reader = open_(ring, blob)
    assert reader.plaintext_size == size
    assert b"".join(reader.iter_plaintext()) == data


@pytest.mark.parametrize("size", [0, 4096, 4097, 3 * 4096 + 5])
def test_how_the_data_is_cut_into_writes_does_not_change_the_blob(ring, size, monkeypatch):
    """Segments are cut at the same places (a full one sealed only when more follows) and
    read back whole, whether the data comes in one piece, byte by byte or in big pieces."""
    monkeypatch.setattr("archive.crypto.secrets.token_bytes", lambda n: b"\x07" * n)
    monkeypatch.setattr(ring, "new_data_key", lambda: (b"k" * 32, "kid", b"wrapped"))
    data = os.urandom(size)
    blobs = set()
    for piece in (1, 1000, 4096, 10_000, max(size, 1)):
        out = io.BytesIO()
        writer = EnvelopeWriter(out, ring, 4096)
        for i in range(0, size, piece):
            writer.write(memoryview(data)[i:i + piece])
        writer.finish()
        blobs.add(out.getvalue())
    assert len(blobs) == 1
    assert len(blobs.pop()) == len(seal(ring, data)) == 8 + 7 + 4 + 1 + 3 + 2 + 7 + size + 16 * max(1, -(-size // 4096))


@pytest.mark.parametrize("offset,length", [(0, 10), (4090, 20), (8191, 1), (100, 30_000), (49_990, 100)])
def test_ranges(ring, offset, length):
    data = os.urandom(50_000)
    assert b"".join(open_(ring, seal(ring, data)).iter_plaintext(offset, length)) == data[offset:offset + length]


def test_key_file_is_private(tmp_path):
    ring = LocalKeyring.open(tmp_path / "keys")
    (path,) = (tmp_path / "keys").glob("*.kek")
    assert path.stat().st_mode & 0o777 == 0o600
    assert LocalKeyring.open(tmp_path / "keys").current == ring.current


def _flip(blob: bytes, index: int) -> bytes:
    b = bytearray(blob)
    b[index] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("where", ["header-prefix", "wrapped-key", "ciphertext", "tag", "last-byte"])
def test_flipped_byte_is_detected(ring, where):
    data = os.urandom(10_000)
    blob = seal(ring, data)
    header = 8 + 7 + 4 + 1 + len(ring.current.key_id) + 2 + 40
    index = {"header-prefix": 9, "wrapped-key": header - 5, "ciphertext": header + 100,
             "tag": header + 4096 + 3, "last-byte": len(blob) - 1}[where]
    with pytest.raises(IntegrityError):
        b"".join(open_(ring, _flip(blob, index)).iter_plaintext())


@pytest.mark.parametrize("cut", [1, 16, 4096 + 16, 5000])
def test_truncation_is_detected(ring, cut):
    blob = seal(ring, os.urandom(10_000))
    with pytest.raises(IntegrityError):
        b"".join(open_(ring, blob[:-cut]).iter_plaintext())


def test_dropping_whole_trailing_segments_is_detected(ring):
    blob = seal(ring, os.urandom(3 * 4096 + 10))
    with pytest.raises(IntegrityError):
        b"".join(open_(ring, blob[:len(blob) - (10 + 16)]).iter_plaintext())


def test_wrong_key_encryption_key_gives_a_clear_error(tmp_path, ring):
    blob = seal(ring, b"secret")
    other = LocalKeyring.open(tmp_path / "other")
    with pytest.raises(IntegrityError, match="not in the keyring"):
        open_(other, blob)
    # same id, different key material
    (tmp_path / "other" / f"{other.current.key_id}.kek").rename(tmp_path / "other" / f"{ring.current.key_id}.kek")
    with pytest.raises(IntegrityError, match="cannot be unwrapped"):
        open_(LocalKeyring.open(tmp_path / "other"), blob)


def test_old_blobs_stay_readable_after_a_new_key(ring):
    old = seal(ring, b"before")
    ring.add_new()
    new = seal(ring, b"after")
    assert b"".join(open_(ring, old).iter_plaintext()) == b"before"
    assert b"".join(open_(ring, new).iter_plaintext()) == b"after"


def test_not_a_blob(ring):
    with pytest.raises(IntegrityError, match="magic"):
        open_(ring, b"\0" * 128 + b"DICM" + b"\0" * 100)


@pytest.mark.parametrize("segment", [4096, 1 << 20])
def test_blobs_read_from_the_disk_at_once_or_not_read_back_whole_and_in_ranges(tmp_path, ring, segment):
    """LocalStorage.open reads a blob up to READ_BUFFER bytes in one go (header and segments from the buffer),
    a larger one as it goes: the same bytes either way, a range too, and a blob cut short on disk still fails."""
    from archive.storage import READ_BUFFER, BlobNotFound, LocalStorage

    storage = LocalStorage(tmp_path / "blobs", ring, segment)
    for size in (0, 1, READ_BUFFER - 200, READ_BUFFER + 5000, 3 * READ_BUFFER):
        data = os.urandom(size)
        blob = storage.create([data[:size // 3], data[size // 3:]]).blob_id
        assert storage.read_all(blob) == data
        assert storage.read_range(blob, size // 2, 70_000) == data[size // 2:size // 2 + 70_000]
        path = storage.path(blob)
        path.write_bytes(path.read_bytes()[:-1])
        with pytest.raises(IntegrityError):
            storage.read_all(blob)
    with pytest.raises(BlobNotFound):
        storage.read_all("0" * 32)
    for kind, make in (("a FIFO", os.mkfifo), ("a directory", os.mkdir)):   # in a blob's place: refused at once
        blob = storage.create([b"x" * 100]).blob_id                         # (a FIFO held the reading thread)
        storage.path(blob).unlink()
        make(storage.path(blob))
        with pytest.raises(IntegrityError, match="not a regular file"):
            storage.read_all(blob)
    with pytest.raises(ValueError):
        storage.read_all("../" + "0" * 29)
