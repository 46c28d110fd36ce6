"""Local blob storage: encrypted files under opaque ids, written durably.

The storage area knows nothing of DICOM (the index does). A blob id is 32 random hex
digits; it is the only thing that ever becomes a path, and it is checked every time.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .crypto import EnvelopeReader, EnvelopeWriter, LocalKeyring

_BLOB_ID = re.compile(r"^[0-9a-f]{32}$")


class StorageFull(OSError):
    """The storage area has no space left; nothing was kept."""


class BlobNotFound(KeyError):
    """No blob with this id."""


@dataclass(frozen=True)
class BlobInfo:
    blob_id: str
    size: int          # plaintext bytes
    stored_size: int   # bytes at rest (ciphertext and envelope)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}")
    return blob_id


class LocalStorage:
    """create / read / read_range / exists / remove over encrypted files."""

    def __init__(self, root: Path, keyring: LocalKeyring, segment_size: int = 1 << 20):
        self.root = Path(root)
        self.keyring = keyring
        self.segment_size = segment_size
        self._tmp = self.root / "tmp"
        for path in (self.root, self._tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, blob_id: str) -> Path:
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    def create(self, chunks: Iterable[bytes]) -> BlobInfo:
        """Encrypt `chunks` into a new blob; durable (fsynced, renamed, dir fsynced) on return."""
        blob_id = secrets.token_hex(16)
        final = self._path(blob_id)
        tmp = self._tmp / f"{blob_id}.part"
        try:
            with open(tmp, "xb") as fh:
                writer = EnvelopeWriter(fh, self.keyring, self.segment_size)
                for chunk in chunks:
                    writer.write(chunk)
                writer.finish()
                fh.flush()
                os.fsync(fh.fileno())
                stored = fh.tell()
            self._make_parents(final.parent)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                final.unlink(missing_ok=True)
                raise StorageFull(exc.errno, "no space left in the storage area") from exc
            raise
        return BlobInfo(blob_id, writer.plaintext_size, stored)

    def _make_parents(self, shard: Path) -> None:
        if shard.is_dir():
            return
        for directory in (shard.parent, shard):
            if not directory.is_dir():
                directory.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(directory.parent)

    @contextmanager
    def open(self, blob_id: str) -> Iterator[EnvelopeReader]:
        path = self._path(blob_id)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        with fh:
            yield EnvelopeReader(fh, self.keyring, os.fstat(fh.fileno()).st_size)

    def read(self, blob_id: str) -> Iterator[bytes]:
        """Yield the whole plaintext, authenticated segment by segment."""
        with self.open(blob_id) as reader:
            yield from reader.iter_plaintext()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        with self.open(blob_id) as reader:
            return b"".join(reader.iter_plaintext(offset, length))

    def read_all(self, blob_id: str) -> bytes:
        return b"".join(self.read(blob_id))

    def exists(self, blob_id: str) -> bool:
        return self._path(blob_id).is_file()

    def remove(self, blob_id: str) -> None:
        path = self._path(blob_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def blob_ids(self) -> Iterator[str]:
        """Every blob id present (for recovery after a crash)."""
        for first in os.scandir(self.root):
            if not first.is_dir() or len(first.name) != 2 or first.name == "tmp":
                continue
            for second in os.scandir(first.path):
                if second.is_dir():
                    for entry in os.scandir(second.path):
                        if _BLOB_ID.match(entry.name):
                            yield entry.name

    def remove_partial(self) -> int:
        """Delete temporary files left by an interrupted write."""
        count = 0
        for entry in os.scandir(self._tmp):
            os.unlink(entry.path)
            count += 1
        return count
