"""Key rotation: a new key-encryption key, and every data key re-wrapped without touching the data.

`rotate()` makes a new local KEK current, then gives every local blob wrapped by another
KEK a new header (its data key wrapped by the new KEK; the ciphertext is copied as it is,
atomically), and re-wraps the objects in S3 that are not wrapped by the current remote key
(the new KEK, or the KMS key when one is set: KMS rotates its own key material). The old
key files stay in the keyring, so anything written before (a backup, a blob the rotation
could not reach) stays readable. The node may keep running: its keyring notices the new key.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .crypto import IntegrityError, KmsError, header_key_id, rewrapped_header
from .ingest import Archive
from .offload import OFFLOADED_BLOBS
from .storage import BlobNotFound

log = logging.getLogger(__name__)


@dataclass
class Rotation:
    key_id: str
    local: int = 0                   # local blobs re-wrapped
    remote: int = 0                  # objects in S3 re-wrapped
    unchanged: int = 0               # already wrapped by the current key
    failed: list[tuple[str, str]] = field(default_factory=list)   # (blob id, why)


def work(archive: Archive) -> tuple[list[str], list[str]]:
    """(local blob ids, offloaded blob ids): what a rotation goes through."""
    local = list(archive.local.blob_ids())
    remote = [r[0] for r in archive.index.read(OFFLOADED_BLOBS)] \
        if archive.remote is not None else []
    return local, remote


def rotate(archive: Archive, progress: Callable[[int], None] = lambda n: None,
           new_key: Callable[[], None] = lambda: None) -> Rotation:
    """`new_key()` runs once the new key is current, before any blob is re-wrapped: what else the node
    wraps for the other nodes of its index (the viewer's shared secret) follows the new key at once."""
    local_ids, remote_ids = work(archive)
    new = archive.keyring.local.add_new()
    new_key()
    report = Rotation(new.key_id)
    for blob_id in local_ids:
        try:
            path = archive.local.path(blob_id)
            with open(path, "rb") as fh:
                if header_key_id(fh)[0] == new.key_id:
                    report.unchanged += 1
                    continue
                header, old = rewrapped_header(fh, archive.keyring, archive.keyring.local)
            archive.local.replace_header(blob_id, header, old)
            report.local += 1
        except FileNotFoundError:
            pass                                     # evicted or replaced meanwhile
        except IntegrityError as exc:
            report.failed.append((blob_id, str(exc)))
        finally:
            progress(1)
    for blob_id in remote_ids:
        try:
            if archive.remote.rewrap(blob_id, archive.keyring.remote):
                report.remote += 1
            else:
                report.unchanged += 1
        except BlobNotFound:
            report.failed.append((blob_id, "not in the bucket"))
        except (IntegrityError, KmsError, OSError) as exc:
            report.failed.append((blob_id, str(exc)))
        except Exception as exc:  # an S3 error: keep going, report it
            report.failed.append((blob_id, f"{type(exc).__name__}: {exc}"))
        finally:
            progress(1)
    for blob_id, why in report.failed:
        log.error("key rotation: blob %s not re-wrapped: %s", blob_id, why)
    return report
