"""The store: the index, encrypted blob storage, ingest. No DICOM networking here.

`archive.open(settings)` opens the node's archive; `archive.open_index(settings)` its index alone.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .crypto import IntegrityError
    from .dicomfile import InvalidInstance, Limits, PixelsTooLarge
    from .index import Index
    from .ingest import Archive, IngestResult, Outcome
    from .settings import Settings

# imported when first asked for: `archive.settings` (every CLI command, the node's start) needs neither
# pydicom nor SQLAlchemy, which take half a second to import
_LAZY = {"IntegrityError": "crypto", "InvalidInstance": "dicomfile", "Limits": "dicomfile",
         "PixelsTooLarge": "dicomfile", "Archive": "ingest", "IngestResult": "ingest", "Outcome": "ingest"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["Archive", "IngestResult", "IntegrityError", "InvalidInstance", "Limits", "Outcome", "PixelsTooLarge",
           "check_storage", "open", "open_index"]


def open(settings: Settings) -> Archive:                      # noqa: A001 (archive.open, as io.open)
    """The node's archive; with storage.backend = "s3", with its S3 tier (and KMS when set)."""
    from . import s3
    from .crypto import KmsKeyring
    from .dicomfile import Limits
    from .ingest import Archive

    st, cr, ig = settings.storage, settings.crypto, settings.ingest

    def s3_tier(keyring):
        return s3.S3Storage(s3.client(st.s3.endpoint_url, st.s3.region, st.s3.timeout), st.s3.bucket, keyring,
                            prefix=st.s3.prefix, segment_size=st.segment_size, part_size=st.s3.part_size)

    kms = None
    if cr.kms_key_id:
        kms = KmsKeyring(s3.client(cr.kms_endpoint_url, cr.kms_region or st.s3.region, st.s3.timeout, "kms"),
                         cr.kms_key_id)
    limits = Limits(max_inflated_bytes=ig.max_inflated_bytes, max_inflate_ratio=ig.max_inflate_ratio,
                    max_sequence_depth=ig.max_sequence_depth, max_pixel_bytes=ig.max_pixel_bytes)
    opened = Archive(settings.data_dir, duplicates=st.duplicates, segment_size=st.segment_size, kms=kms,
                     remote=s3_tier if st.backend == "s3" else None, limits=limits, on_conflict=ig.on_conflict,
                     min_free_bytes=st.min_free_bytes, index_url=settings.index.url, node=settings.node.name,
                     remote_wait=st.remote_wait_seconds)
    audit = getattr(settings, "audit", None)
    if audit is not None and audit.repository:   # the audit trail: what the node does, queued for the repository
        from .atna import Recorder

        opened.audit = Recorder(opened.index, opened.node, audit.source_id or settings.node.ae_title, audit.site_id)
    return opened


def check_storage(settings: Settings) -> str | None:
    """With storage.backend = "s3", before the node starts: raise `s3.S3SettingsError` when the bucket cannot be
    used (no credentials, no such bucket, access denied, another region); a warning when S3 is away now."""
    from . import s3

    st = settings.storage
    if st.backend != "s3":
        return None
    return s3.check_bucket(s3.client(st.s3.endpoint_url, st.s3.region, min(st.s3.timeout, 10.0), attempts=1),
                           st.s3.bucket)


def open_index(settings: Settings) -> Index:
    """The node's index alone (no keys, no storage): for reports such as `m3dicom status`."""
    from .db import SQLITE_FILE
    from .index import Index

    if settings.index.url:
        return Index(settings.index.url)
    path = settings.data_dir / SQLITE_FILE
    if not path.exists():
        raise RuntimeError(f"no index at {path}: is node.data_dir right? (the node creates it at its first start)")
    return Index(path)
