"""scp/'s own table, `commitments` (storage commitment requests and their reports): its migrations
and the only SQL on it.

The table was made by the archive's migration 0002_query until issue 16; the first migration here
makes it with the same statement when it is missing, so an index made before keeps its rows and a
new one gets the same schema. `node` applies `migrate` wherever it opens the index for writing.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass

import sqlite_utils

from archive.db import raw
from archive.index import Index, connect

migrations = sqlite_utils.Migrations("scp")

PENDING, REPORTED, UNDELIVERABLE = "pending", "reported", "undeliverable"


@migrations(name="0001_commitments")
def _commitments(db: sqlite_utils.Database) -> None:
    """The archive's 0002_query made this table before (same text: old indexes keep theirs)."""
    db.executescript("""
    CREATE TABLE IF NOT EXISTS commitments (
        transaction_uid TEXT PRIMARY KEY,
        calling_ae TEXT NOT NULL,
        items TEXT NOT NULL,             -- JSON [[sop_class_uid, sop_instance_uid], ...]
        state TEXT NOT NULL,             -- pending | reported
        failures INTEGER,
        received_at REAL NOT NULL,
        reported_at REAL
    );
    CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state);
    """)


def migrate(index: Index) -> None:
    """Apply scp/'s migrations to the index (on a connection of their own; SQLite orders the writers)."""
    conn = connect(index.path)
    try:
        migrations.apply(sqlite_utils.Database(conn))
    finally:
        conn.close()


class TransactionReused(Exception):
    """A commitment request with a Transaction UID the index already holds."""


@dataclass(frozen=True)
class Commitment:
    transaction_uid: str
    calling_ae: str
    items: list[tuple[str, str]]     # (SOP class UID, SOP instance UID)
    state: str                       # pending | reported | undeliverable
    received_at: float


@dataclass(frozen=True)
class ReportCounts:
    """For `m3dicom status`: reports still to deliver, and those given up."""
    waiting: int
    given_up: int


def add(index: Index, transaction: str, calling_ae: str, items: list[tuple[str, str]], max_pending: int,
        now: float | None = None) -> int:
    """Keep a request unless `calling_ae` has `max_pending` requests waiting for their report already;
    return how many were waiting before it (kept when below `max_pending`). Raises TransactionReused."""
    try:
        with index.write() as conn:
            (pending,), = raw(conn).execute("SELECT COUNT(*) FROM commitments WHERE state=? AND calling_ae=?",
                                       (PENDING, calling_ae)).fetchall()
            if pending < max_pending:
                raw(conn).execute("INSERT INTO commitments (transaction_uid, calling_ae, items, state, received_at) "
                             "VALUES (?,?,?,?,?)", (transaction, calling_ae, json.dumps(items), PENDING,
                                                    time.time() if now is None else now))
    except sqlite3.IntegrityError:
        raise TransactionReused(transaction) from None
    return pending


def pending(index: Index) -> list[str]:
    """The Transaction UIDs whose report is still to be delivered."""
    with index.reader() as conn:
        return [uid for uid, in raw(conn).execute("SELECT transaction_uid FROM commitments WHERE state=?", (PENDING,))]


def get(index: Index, transaction: str) -> Commitment | None:
    with index.reader() as conn:
        row = raw(conn).execute("SELECT calling_ae, items, state, received_at FROM commitments WHERE transaction_uid=?",
                           (transaction,)).fetchone()
    if row is None:
        return None
    calling, items, state, received_at = row
    return Commitment(transaction, calling, [tuple(i) for i in json.loads(items)], state, received_at)


def give_up(index: Index, transaction: str, now: float | None = None) -> None:
    """A pending report that will not be delivered (the requester has to ask again)."""
    with index.write() as conn:
        raw(conn).execute("UPDATE commitments SET state=?, reported_at=? WHERE transaction_uid=? AND state=?",
                     (UNDELIVERABLE, time.time() if now is None else now, transaction, PENDING))


def reported(index: Index, transaction: str, failures: int, now: float | None = None) -> None:
    with index.write() as conn:
        raw(conn).execute("UPDATE commitments SET state=?, failures=?, reported_at=? WHERE transaction_uid=?",
                     (REPORTED, failures, time.time() if now is None else now, transaction))


def report_counts(index: Index) -> ReportCounts:
    with index.reader() as conn:
        (waiting, given_up), = raw(conn).execute(
            "SELECT COALESCE(SUM(state=?), 0), COALESCE(SUM(state=?), 0) FROM commitments",
            (PENDING, UNDELIVERABLE)).fetchall()
    return ReportCounts(waiting, given_up)
