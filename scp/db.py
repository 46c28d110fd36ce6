"""scp/'s own table, `commitments` (storage commitment requests and their reports): its migrations
(Alembic, scp/migrations/, branch "scp") and the only SQL on it, one copy for SQLite and PostgreSQL.

`node` applies `migrate` wherever it opens the index for writing.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import text

from archive import db
from archive.index import Index

PENDING, REPORTED, UNDELIVERABLE = "pending", "reported", "undeliverable"
MIGRATIONS = Path(__file__).with_name("migrations")

_PENDING_OF = text("SELECT COUNT(*) FROM commitments WHERE state = :pending AND calling_ae = :calling_ae")
_ADD = text("INSERT INTO commitments (transaction_uid, calling_ae, items, state, received_at) "
            "VALUES (:transaction_uid, :calling_ae, :items, :pending, :now)")
_PENDING = text("SELECT transaction_uid FROM commitments WHERE state = :pending")
_GET = text("SELECT calling_ae, items, state, received_at FROM commitments WHERE transaction_uid = :transaction_uid")
_GIVE_UP = text("UPDATE commitments SET state = :undeliverable, reported_at = :now "
                "WHERE transaction_uid = :transaction_uid AND state = :pending")
_REPORTED = text("UPDATE commitments SET state = :reported, failures = :failures, reported_at = :now "
                 "WHERE transaction_uid = :transaction_uid")
_COUNTS = text("SELECT COALESCE(SUM(CASE WHEN state = :pending THEN 1 ELSE 0 END), 0), "
               "COALESCE(SUM(CASE WHEN state = :undeliverable THEN 1 ELSE 0 END), 0) FROM commitments")


def _legacy(conn) -> bool:
    """An index from before Alembic holds the table already (scp's sqlite-utils migration 0001_commitments,
    or the archive's 0002_query before issue 16, made it with the schema of scp_0001): stamp it, rows kept."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'commitments'").fetchall():
        return False
    conn.execute("CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state)")
    return True


def migrate(index: Index) -> None:
    """Bring scp/'s table in `index` up to date (SQLite or PostgreSQL)."""
    db.migrate(index.engines, "scp", MIGRATIONS, _legacy)


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
            pending = conn.execute(_PENDING_OF, {"pending": PENDING, "calling_ae": calling_ae}).scalar_one()
            if pending < max_pending:
                conn.execute(_ADD, {"transaction_uid": transaction, "calling_ae": calling_ae,
                                    "items": json.dumps(items), "pending": PENDING,
                                    "now": time.time() if now is None else now})
    except sa.exc.IntegrityError:
        raise TransactionReused(transaction) from None
    return pending


def pending(index: Index) -> list[str]:
    """The Transaction UIDs whose report is still to be delivered."""
    with index.reader() as conn:
        return list(conn.execute(_PENDING, {"pending": PENDING}).scalars())


def get(index: Index, transaction: str) -> Commitment | None:
    with index.reader() as conn:
        row = conn.execute(_GET, {"transaction_uid": transaction}).mappings().first()
    if row is None:
        return None
    return Commitment(transaction, row["calling_ae"], [tuple(i) for i in json.loads(row["items"])], row["state"],
                      row["received_at"])


def give_up(index: Index, transaction: str, now: float | None = None) -> None:
    """A pending report that will not be delivered (the requester has to ask again)."""
    with index.write() as conn:
        conn.execute(_GIVE_UP, {"undeliverable": UNDELIVERABLE, "now": time.time() if now is None else now,
                                "transaction_uid": transaction, "pending": PENDING})


def reported(index: Index, transaction: str, failures: int, now: float | None = None) -> None:
    with index.write() as conn:
        conn.execute(_REPORTED, {"reported": REPORTED, "failures": failures, "now": time.time() if now is None else now,
                                 "transaction_uid": transaction})


def report_counts(index: Index) -> ReportCounts:
    with index.reader() as conn:
        waiting, given_up = conn.execute(_COUNTS, {"pending": PENDING, "undeliverable": UNDELIVERABLE}).one()
    return ReportCounts(waiting, given_up)
