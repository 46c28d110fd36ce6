"""One running node per data directory.

Two `m3dicom serve` on one data directory would each clear the other's spool and recover
(delete) the other's blobs that are written but not yet indexed. `serve` holds an exclusive
lock on `data_dir/node.lock` for its whole life, taken before it touches anything else;
the kernel releases it when the process ends, however it ends.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class DataDirectoryInUse(RuntimeError):
    pass


@contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's lock, or raise DataDirectoryInUse naming the process that has it."""
    path = data_dir / "node.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)   # not inherited by the processes we start
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise DataDirectoryInUse(f"data directory {data_dir} is in use by another m3dicom serve (pid {holder}): "
                                 "stop that node first, or give this one its own node.data_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
