"""Local blob storage: encrypted files under opaque ids, written durably.

The storage area knows nothing of DICOM (the index does). A blob id is 32 random hex
digits; it is the only thing that ever becomes a path, and it is checked every time.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .crypto import EnvelopeReader, EnvelopeWriter, IntegrityError, KeyWrapper, fsync_directory

_BLOB_ID = re.compile(r"^[0-9a-f]{32}$")
_PARTIAL = ".partial"
READ_BUFFER = 256 << 10      # bytes of a blob read from the disk at once when it is opened


class StorageFull(OSError):
    """The storage area has no space left; nothing was kept."""


class BlobNotFound(KeyError):
    """No blob with this id."""


class BlobNotOffloaded(BlobNotFound):
    """The blob is in another node's data directory and not in S3 (yet): it exists, it cannot be read here."""

    def __init__(self, blob_id: str, why: str):
        super().__init__(blob_id)
        self.blob_id, self.why = blob_id, why

    def __str__(self) -> str:
        return self.why


@dataclass(frozen=True)
class BlobInfo:
    blob_id: str
    size: int          # plaintext bytes
    stored_size: int   # bytes at rest (ciphertext and envelope)


def check_blob_id(blob_id: str) -> str:
    if not isinstance(blob_id, str) or not _BLOB_ID.match(blob_id):
        raise ValueError(f"invalid blob id {blob_id!r}")
    return blob_id


class BlobReads:
    """The reads every backend shares, on top of its `open(blob_id)` -> EnvelopeReader."""

    def read(self, blob_id: str) -> Iterator[bytes]:
        """Yield the whole plaintext, authenticated segment by segment."""
        with self.open(blob_id) as reader:
            yield from reader.iter_plaintext()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        with self.open(blob_id) as reader:
            return b"".join(reader.iter_plaintext(offset, length))

    def read_all(self, blob_id: str) -> bytes:
        return b"".join(self.read(blob_id))


class LocalStorage(BlobReads):
    """create / read / read_range / exists / remove over encrypted files."""

    def __init__(self, root: Path, keyring: KeyWrapper, segment_size: int = 1 << 20):
        self.root = Path(root)
        self._root = str(self.root)
        self.keyring = keyring
        self.segment_size = segment_size
        self._make_shards()

    def _make_shards(self) -> None:
        """256 directories named by the blob id's first two hex digits, made once."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        made = False
        for shard in range(256):
            path = self.root / f"{shard:02x}"
            if not path.is_dir():
                path.mkdir(mode=0o700)
                made = True
        if made:
            fsync_directory(self.root)

    def path(self, blob_id: str) -> Path:
        """Where the blob's envelope lies (the id is checked: nothing else becomes a path)."""
        check_blob_id(blob_id)
        return self.root / blob_id[:2] / blob_id

    def create(self, chunks: Iterable[bytes]) -> BlobInfo:
        """Encrypt `chunks` into a new blob; durable (file and directory fsynced) on return.

        The blob is written under its final name: the index is what says an instance
        exists, and a blob that no committed row references (a write cut off by a crash)
        is removed by `Archive.recover()`. That saves a rename per instance.
        """
        blob_id = secrets.token_hex(16)
        path = self.path(blob_id)
        try:
            with open(path, "xb") as fh:
                writer = EnvelopeWriter(fh, self.keyring, self.segment_size)
                for chunk in chunks:
                    writer.write(chunk)
                writer.finish()
                fh.flush()
                os.fsync(fh.fileno())
                stored = fh.tell()
            fsync_directory(path.parent)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(exc.errno, "no space left in the storage area") from exc
            raise
        return BlobInfo(blob_id, writer.plaintext_size, stored)

    @contextmanager
    def open(self, blob_id: str) -> Iterator[EnvelopeReader]:
        """The blob opened for reading. A blob up to READ_BUFFER bytes (most instances) is read from the
        disk at once: its header and segments then come from the buffer (a retrieve of a series opens
        hundreds of them, in the process that serves the viewer)."""
        check_blob_id(blob_id)
        try:      # O_NONBLOCK: a FIFO put in a blob's place would hold the reading thread (a regular file ignores it)
            fd = os.open(f"{self._root}/{blob_id[:2]}/{blob_id}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BlobNotFound(blob_id) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IntegrityError(f"blob {blob_id} is not a regular file")
            size = info.st_size
            fh = open(fd, "rb", buffering=min(max(size, 1), READ_BUFFER))
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield EnvelopeReader(fh, self.keyring, size)

    def exists(self, blob_id: str) -> bool:
        return self.path(blob_id).is_file()

    def replace_header(self, blob_id: str, header: bytes, old_length: int) -> None:
        """Give the blob a new envelope header (a re-wrapped data key); the ciphertext is copied
        as it is. Atomic: a new file next to it, fsynced, renamed over it."""
        path = self.path(blob_id)
        partial = path.with_name(path.name + _PARTIAL)
        try:
            with open(path, "rb") as src, open(partial, "xb") as out:
                out.write(header)
                src.seek(old_length)
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)

    def remove_partials(self) -> int:
        """Remove what an interrupted `replace_header` left (at start, after a crash)."""
        partials = list(self.root.glob(f"??/*{_PARTIAL}"))
        for path in partials:
            path.unlink()
        return len(partials)

    def remove(self, blob_id: str) -> None:
        path = self.path(blob_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_directory(path.parent)

    def blob_ids(self) -> Iterator[str]:
        """Every blob id present, complete or not (for recovery after a crash)."""
        for shard in os.scandir(self.root):
            if shard.is_dir() and len(shard.name) == 2:
                for entry in os.scandir(shard.path):
                    if _BLOB_ID.match(entry.name):
                        yield entry.name


@dataclass(frozen=True)
class Elsewhere:
    """A blob another node holds and has not put in S3: that node, why, and whether it may still come."""
    node: str
    why: str
    may_come: bool


class TieredStorage(BlobReads):
    """The local store as a cache in front of S3 (`archive.s3.S3Storage`).

    Blobs are written locally (durable before Success); the offloader copies them to S3 and
    may evict the local copy. A read takes the local copy when there is one, else the object
    in S3, authenticated segment by segment like a local one. `remove` and `blob_ids` are
    about the local copies: objects in S3 are removed by the offloader, through the index.

    Nodes sharing an index: a blob that another node received lies in that node's data directory
    until its offloader puts it in S3. `elsewhere(blob_id)` says so (`Elsewhere`; None when no node
    holds it); a read of such a blob polls S3 for up to `wait` seconds, then raises
    `BlobNotOffloaded` with the reason (never a partial read: the object appears whole). A node that
    let one read wait that long is late: for the next `wait` seconds, reads of its other blobs look
    in S3 once and fail at once, so a retrieve of many such instances (or a flood of them) waits
    `wait` seconds in all, not once per instance.
    """

    def __init__(self, local: LocalStorage, remote, wait: float = 0.0,
                 elsewhere: Callable[[str], Elsewhere | None] | None = None, poll: float = 0.25):
        self.local, self.remote = local, remote
        self.wait, self.elsewhere, self.poll = wait, elsewhere, poll
        self._late: dict[str, float] = {}       # node -> until when its blobs are not waited for

    def create(self, chunks: Iterable[bytes]) -> BlobInfo:
        return self.local.create(chunks)

    @contextmanager
    def open(self, blob_id: str) -> Iterator[EnvelopeReader]:
        with ExitStack() as stack:
            try:
                reader = stack.enter_context(self.local.open(blob_id))
            except BlobNotFound:
                reader = self._remote(stack, blob_id)
            yield reader

    def _remote(self, stack: ExitStack, blob_id: str) -> EnvelopeReader:
        """The object in S3; for a blob another node holds, polled for until `wait` has passed."""
        deadline = time.monotonic() + self.wait
        where = None
        while True:
            try:
                reader = stack.enter_context(self.remote.open(blob_id))
                if self._late:          # a late node's blob arrived: its offloader moves, wait for it again
                    where = where or (self.elsewhere(blob_id) if self.elsewhere is not None else None)
                    if where is not None:
                        self._late.pop(where.node, None)
                return reader
            except BlobNotFound:
                where = self.elsewhere(blob_id) if self.elsewhere is not None else None
                if where is None:
                    raise
                if not where.may_come:
                    raise BlobNotOffloaded(blob_id, where.why) from None
                now = time.monotonic()
                if now < self._late.get(where.node, 0.0):
                    raise BlobNotOffloaded(blob_id, f"{where.why} (another read waited {self.wait:g} s for that "
                                                    "node within the last storage.remote_wait_seconds)") from None
                if now >= deadline:
                    self._late[where.node] = now + self.wait
                    raise BlobNotOffloaded(blob_id, f"{where.why} (waited {self.wait:g} s: "
                                                    "storage.remote_wait_seconds)") from None
                time.sleep(min(self.poll, max(0.0, deadline - now)))

    def exists(self, blob_id: str) -> bool:
        return self.local.exists(blob_id) or self.remote.exists(blob_id)

    def remove(self, blob_id: str) -> None:
        self.local.remove(blob_id)

    def blob_ids(self) -> Iterator[str]:
        return self.local.blob_ids()
