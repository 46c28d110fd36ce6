"""The change log: what happened in the archive, in order, for the packages that follow it.

Every transaction that stores, replaces or removes something (and every job transition the
router records) adds rows to `changes`, numbered by `seq`. Consumers follow the log in one of
two ways, and nothing else reads the table:

- `consume(index, cursor, kinds)`: a durable consumer (the offloader, the router) takes the
  changes after its named cursor, handles them in the same transaction as it advances the
  cursor, and so never takes one twice or loses one across a crash::

      with consume(index, "offload", kinds=UPLOAD_KINDS) as batch:
          for change in batch:
              batch.conn.execute(...)          # its own tables, in the same transaction

  An exception inside the block rolls back the handling and the cursor together.
- `read(index, after, upto, kinds)` and `latest(index)`: a reader that keeps its position in
  memory (the viewer's notifications).
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection

from .index import Index

COLUMNS = ("seq", "kind", "instance_pk", "study_uid", "series_uid", "sop_instance_uid", "blob_id", "job_id", "time")


@dataclass(frozen=True)
class Change:
    seq: int
    kind: str                       # stored, replaced, result_stored, file_stored, blob_removed, job_* ...
    instance_pk: int | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    blob_id: str | None
    job_id: str | None
    time: float


@dataclass
class Batch:
    """The changes a consumer takes in one transaction, and that transaction's connection."""
    conn: Connection
    changes: list[Change]
    upto: int                       # the cursor after this batch (past changes of other kinds too)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    def __len__(self) -> int:
        return len(self.changes)


_SELECT = f"SELECT {', '.join(COLUMNS)} FROM changes WHERE seq > :after AND seq <= :upto"
_ALL = text(f"{_SELECT} ORDER BY seq LIMIT :limit")
_OF_KINDS = text(f"{_SELECT} AND kind IN :kinds ORDER BY seq LIMIT :limit").bindparams(
    bindparam("kinds", expanding=True))
_CURSOR = text("SELECT seq FROM cursors WHERE name = :name")
_UPTO = text("SELECT COALESCE(MAX(seq), :after) FROM (SELECT seq FROM changes WHERE seq > :after "
             "ORDER BY seq LIMIT :limit) next")
_MOVE = text("INSERT INTO cursors (name, seq) VALUES (:name, :seq) ON CONFLICT (name) DO UPDATE SET seq = excluded.seq")
_LATEST = text("SELECT COALESCE(MAX(seq), 0) FROM changes")


def _rows(conn: Connection, after: int, upto: int, kinds: Collection[str] | None, limit: int) -> list[Change]:
    params = {"after": after, "upto": upto, "limit": limit}
    if kinds is None:
        return [Change(*row) for row in conn.execute(_ALL, params)]
    return [Change(*row) for row in conn.execute(_OF_KINDS, {**params, "kinds": list(kinds)})]


@contextmanager
def consume(index: Index, cursor: str, kinds: Collection[str] | None = None, limit: int = 5000) -> Iterator[Batch]:
    """The changes of `kinds` (all when None) after the cursor named `cursor`, at most `limit`
    of the log's next rows; the cursor moves past them when the block ends without an error."""
    with index.write() as conn:
        after = conn.execute(_CURSOR, {"name": cursor}).scalar() or 0
        upto = conn.execute(_UPTO, {"after": after, "limit": limit}).scalar_one()
        batch = Batch(conn, _rows(conn, after, upto, kinds, limit) if upto > after else [], upto)
        yield batch
        if upto > after:
            conn.execute(_MOVE, {"name": cursor, "seq": upto})


def position(index: Index, cursor: str) -> int:
    """Where the consumer named `cursor` is (0 before its first batch)."""
    with index.reader() as conn:
        return conn.execute(_CURSOR, {"name": cursor}).scalar() or 0


def latest(index: Index) -> int:
    """The sequence number of the last change (0 when there is none)."""
    with index.reader() as conn:
        return conn.execute(_LATEST).scalar_one()


def read(index: Index, after: int, upto: int | None = None, kinds: Collection[str] | None = None,
         limit: int = 500) -> list[Change]:
    """The changes of `kinds` after `after` up to `upto` (the latest when None), at most `limit`."""
    with index.reader() as conn:
        if upto is None:
            upto = conn.execute(_LATEST).scalar_one()
        return _rows(conn, after, upto, kinds, limit)
