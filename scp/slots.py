"""The association counts of every receiving process, so that the limits hold for the node.

`dicom.max_associations`, its per-source share and the plain port's share count the node's
associations, whichever receiving process holds them. Each receiver publishes what it holds
in its own row of a small table in shared memory (`Table`, made by the node at start): how
many associations, how many on the plain port, and how many from each
source (by a 64-bit hash of `scp.tls.source_of`). A receiver deciding on a new association
holds an exclusive `flock` on the table from reading the other rows until its own row counts
the new association, so two processes never both take the last slot.

A row is rewritten when an association of its process starts or closes, and every second; a
process that died leaves its row counted until it has been reaped (at most a second, by the
node's supervision), and a restarted receiver starts with an empty row.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections import Counter
from typing import Callable

ADMISSION_TIMEOUT = 2.0   # seconds a new association waits for the table at most (then it is refused)
_HEAD = struct.Struct("<qIII")   # pid, associations, of them on the plain port, entries that follow
_ENTRY = struct.Struct("<QI")    # source hash, associations from it


def source_key(source: str) -> int:
    return int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "little")


class Held:
    """What one process holds: associations, how many on the plain port, by source."""
    __slots__ = ("total", "plain", "by_source")

    def __init__(self, total: int = 0, plain: int = 0, by_source: Counter | None = None):
        self.total, self.plain, self.by_source = total, plain, by_source if by_source is not None else Counter()


class Table:
    """The memory the receivers' rows live in: a memfd (no file on disk, which may be full), made by the
    node and handed to each spawned receiver (it pickles as a duplicated descriptor, as sockets do)."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def create(cls, rows: int, capacity: int) -> "Table":
        """A table for `rows` receivers, each holding at most `capacity` sources."""
        fd = os.memfd_create("m3dicom-associations", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8 + rows * (_HEAD.size + _ENTRY.size * capacity))
        os.pwrite(fd, struct.pack("<II", rows, capacity), 0)
        return cls(fd)

    def __reduce__(self):
        from multiprocessing import reduction

        return _rebuild, (reduction.DupFd(self.fd),)


def _rebuild(duplicate) -> Table:
    return Table(duplicate.detach())


class SharedCounts:
    """One receiving process's view of the `Table`; see the module's docstring."""

    def __init__(self, table: Table, index: int):
        self.index = index
        # an open file of its own (a duplicated descriptor would share the lock): flock then excludes
        # the other processes, and the other SharedCounts of this process (tests)
        fd = os.open(f"/proc/self/fd/{table.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            self.rows, self.capacity = struct.unpack("<II", os.pread(fd, 8, 0)) if size >= 8 else (0, 0)
            self._row = _HEAD.size + _ENTRY.size * self.capacity
            if not 0 <= index < self.rows or size != 8 + self.rows * self._row:
                raise ValueError(f"not an association table for receiver {index}")
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._local = threading.Lock()   # flock is per open file: threads of one process take this first

    def __enter__(self) -> "SharedCounts":
        """Exclusive: no other process (or thread) reads or writes the table meanwhile."""
        self.hold(None)
        return self

    def hold(self, deadline: float | None) -> None:
        """Take the table (release with `__exit__`); by `deadline` (time.monotonic) or raise `Busy`: a
        receiver that stalls while it holds the table (stopped, swapping) makes the others refuse
        associations, not wait for it."""
        if not self._local.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise Busy("the association table is held by another thread of this process")
        try:
            if self._fd < 0:
                raise Busy("the association table is closed (the receiver is stopping)")
            pause = 0.0005
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise Busy("another receiving process holds the association table (stalled?)") from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.02)
        except BaseException:
            self._local.release()
            raise

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:   # closing the file (`close`) let go of the lock already
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._local.release()

    def publish(self, held: Held) -> None:
        """This process's row (call inside `with table:`). Sources beyond the row's capacity
        (there are never more than the associations a process holds) keep their largest counts."""
        entries = held.by_source.most_common(self.capacity)
        offset = 8 + self.index * self._row
        _HEAD.pack_into(self._map, offset, os.getpid(), held.total, held.plain, len(entries))
        offset += _HEAD.size
        for source, count in entries:
            _ENTRY.pack_into(self._map, offset, source_key(source), count)
            offset += _ENTRY.size

    def others(self, source: str) -> tuple[int, int, int]:
        """(associations, plain ones, ones from `source`) of the other live processes (inside `with table:`)."""
        key, total, plain, mine = source_key(source), 0, 0, 0
        for row in range(self.rows):
            if row == self.index:
                continue
            offset = 8 + row * self._row
            pid, count, on_plain, entries = _HEAD.unpack_from(self._map, offset)
            if count == 0 or not _alive(pid):
                continue
            total, plain = total + count, plain + on_plain
            for at in range(offset + _HEAD.size, offset + _HEAD.size + _ENTRY.size * min(entries, self.capacity),
                            _ENTRY.size):
                hashed, n = _ENTRY.unpack_from(self._map, at)
                if hashed == key:
                    mine += n
                    break
        return total, plain, mine

    def publish_within(self, held: Callable[[], Held], seconds: float) -> bool:
        """`publish` what `held()` counts (inside the lock: no admission in between) if the table can
        be had within `seconds`; whether it was. A stalled receiver holding the table delays nothing
        for longer: not a start, not a stop, not the once-a-second tick."""
        try:
            self.hold(time.monotonic() + seconds)
        except Busy:
            return False
        try:
            self.publish(held())
            return True
        finally:
            self.__exit__()

    def close(self) -> None:
        """Publish an empty row (if the table can be had within a second) and let go of the table:
        admissions still asked of it are `Busy`. A row not emptied stops counting with this process."""
        self.publish_within(Held, 1.0)
        if not self._local.acquire(timeout=1.0):
            return   # a thread of ours still in the table at exit: the process's end closes the file
        try:
            self._fd, fd = -1, self._fd
            self._map.close()
            os.close(fd)
        finally:
            self._local.release()


class Busy(OSError):
    """The table could not be taken in time (or is closed): the association is refused, not kept waiting."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
