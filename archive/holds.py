"""Blobs held for another owner: the archive keeps a blob while some package's rows need it.

The router keeps the files its jobs wrote (X3D scenes, findings.json) as archive blobs, listed
in its own `job_results` table. The archive does not read that table: the router holds each
blob here in the transaction that records it, and lets it go when its row no longer names it.
Recovery (`Archive.recover`) and the offloader keep every held blob, as they keep the blobs of
instances (`Index.blob_ids`, `Index.blob_referenced`).
"""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.engine import Connection

_HOLD = text("INSERT INTO blob_holds (blob_id, holder) VALUES (:blob_id, :holder) ON CONFLICT DO NOTHING")
_RELEASE = text("DELETE FROM blob_holds WHERE blob_id = :blob_id AND holder = :holder")
_HELD = text("SELECT blob_id FROM blob_holds WHERE holder = :holder")


def hold(conn: Connection, blob_ids: Iterable[str], holder: str) -> None:
    """Keep these blobs for `holder`, inside the caller's write transaction (`Index.write`)."""
    params = [{"blob_id": blob_id, "holder": holder} for blob_id in blob_ids]
    if params:
        conn.execute(_HOLD, params)


def release(conn: Connection, blob_ids: Iterable[str], holder: str) -> None:
    """`holder` needs these blobs no more; a blob nothing else needs is removed at the next recovery."""
    params = [{"blob_id": blob_id, "holder": holder} for blob_id in blob_ids]
    if params:
        conn.execute(_RELEASE, params)


def held(conn: Connection, holder: str) -> set[str]:
    """The blobs `holder` holds."""
    return {row[0] for row in conn.execute(_HELD, {"holder": holder})}
