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

Both read `seq > position`, which is right only if a change never becomes visible after one with a
higher `seq`. SQLite has one writer, so it never does. On PostgreSQL, concurrent transactions draw
`seq` from a sequence when they insert and commit in any order: a change numbered 10 could commit after
11 was read, and a reader past 11 would skip 10 for ever. So every transaction that adds changes takes
one transaction-level advisory lock just before its first change (`Index.order_changes`) and holds it
until it ends: `seq` is drawn under the lock, so `seq` order is commit order, and a reader that sees a
change sees every lower one that will ever exist (gaps are rolled-back transactions, never filled).
Chosen over the alternatives because it is the simplest that is correct and keeps `seq` the one
position every consumer and reader already keeps: reading only below the oldest in-flight writer (an
`xid8` column and `pg_snapshot_xmin`) orders by transaction id, not `seq`, so positions would become
(xid, seq) pairs, `read`/`Batch.upto` and the router's per-study `seq` would change, and one long write
transaction anywhere in the cluster would hold back every consumer; a trigger that draws `seq` after
taking the lock would also cover SQL written elsewhere, but there is none (`changes` is written only
through `Index.add_*change`). Cost: commits that add changes are serialised (SQLite's are anyway),
for as long as the rest of the transaction after its first change: ingest adds its change last.
Measured (bench/changelog.py, 2 busy cores): one writer, no difference; 4-8 writer threads, ingest
inst/s within the noise (-20% to +4%), its index transaction's p50 +2-7 ms, and transactions that only
add a change about half as many per second (their WAL flushes no longer share a group commit).

Several consumers of one cursor (the routers of several nodes) are serialised too: `consume` locks the
cursor's row for its transaction (made first if missing), so the second waits and then takes the next
batch rather than the same one.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import bindparam, column, select, table, text
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
_MAKE_CURSOR = text("INSERT INTO cursors (name, seq) VALUES (:name, 0) ON CONFLICT (name) DO NOTHING")
_CURSORS = table("cursors", column("name"), column("seq"))
# SELECT ... FOR UPDATE on PostgreSQL; SQLAlchemy leaves FOR UPDATE out on SQLite (one writer at a time)
_LOCK_CURSOR = select(_CURSORS.c.seq).where(_CURSORS.c.name == bindparam("name")).with_for_update()
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
    of the log's next rows; the cursor moves past them when the block ends without an error.
    Another consumer of the same cursor waits until this block ends, then takes the next batch."""
    with index.write() as conn:
        conn.execute(_MAKE_CURSOR, {"name": cursor})
        after = conn.execute(_LOCK_CURSOR, {"name": cursor}).scalar_one()
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
