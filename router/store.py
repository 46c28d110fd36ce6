"""The router's tables: its migrations, study completion (router_studies, router_fired) and
forwards. With router/queue.py (jobs and their results, through the state machine) the only SQL
on the router's tables; nothing outside router/ reads them. Statements are `text()` with `:named`
parameters, one copy for SQLite and PostgreSQL.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Connection

from archive import db
from archive.index import Index

from . import sqlite_legacy

HOLDER = "router"                   # blobs of result files, held in the archive (archive.holds)
MIGRATIONS = Path(__file__).with_name("migrations")

_NOTE_STORED = text("INSERT INTO router_studies (study_uid, last_seq, last_time) "
                    "VALUES (:study_uid, :seq, :time) ON CONFLICT (study_uid) "
                    "DO UPDATE SET last_seq = excluded.last_seq, last_time = excluded.last_time "
                    "WHERE router_studies.last_seq < excluded.last_seq")
_PENDING = text("SELECT study_uid, last_seq, last_time FROM router_studies")
_FORGET = text("DELETE FROM router_studies WHERE study_uid = :study_uid AND last_seq = :last_seq")
_WAITING = text("SELECT 1 FROM router_studies WHERE study_uid = :study_uid")
_FIRED_SEQ = text("SELECT seq FROM router_fired WHERE study_uid = :study_uid AND rule = :rule")
_MARK_FIRED = text("INSERT INTO router_fired (study_uid, rule, seq) VALUES (:study_uid, :rule, :seq) "
                   "ON CONFLICT (study_uid, rule) DO UPDATE SET seq = excluded.seq WHERE router_fired.seq = :after")
_QUEUE_FORWARD = text("INSERT INTO forwards (job_id, destination, state, next_try) "
                      "VALUES (:job_id, :destination, 'pending', :now) ON CONFLICT DO NOTHING")
_DUE_FORWARDS = text("SELECT job_id, destination FROM forwards WHERE state = 'pending' AND next_try <= :now "
                     "ORDER BY next_try LIMIT :limit")
_CLAIM_FORWARD = text("UPDATE forwards SET next_try = :until WHERE job_id = :job_id AND destination = :destination "
                      "AND state = 'pending' AND next_try <= :now")
_FORWARD_SENT = text("UPDATE forwards SET state = 'sent', attempts = attempts + 1, last_error = NULL "
                     "WHERE job_id = :job_id AND destination = :destination")
_FORWARD_ATTEMPTS = text("SELECT attempts FROM forwards WHERE job_id = :job_id AND destination = :destination")
_FORWARD_FAILED = text("UPDATE forwards SET attempts = attempts + 1, next_try = :next_try, last_error = :error "
                       "WHERE job_id = :job_id AND destination = :destination")
_STUDY_OF = text("SELECT study_uid FROM jobs WHERE id = :job_id")


def migrate(index: Index) -> None:
    """Make or bring up to date the router's tables (Alembic, branch "router", version table
    alembic_version_router), before anything removes unreferenced blobs: an index from before
    `blob_holds` gets its result files held here."""
    db.migrate(index.engines, "router", MIGRATIONS, sqlite_legacy.bring_up)


# -- study completion ---------------------------------------------------------------------

@dataclass(frozen=True)
class PendingStudy:
    """A study with instances the rules have not all judged: its last routed change, and when."""
    study_uid: str
    last_seq: int
    last_time: float


def note_stored(conn: Connection, study_uid: str, seq: int, time: float) -> None:
    """The study received an instance (change `seq` at `time`): the rules judge it once it is quiet."""
    conn.execute(_NOTE_STORED, {"study_uid": study_uid, "seq": seq, "time": time})


def pending_studies(index: Index) -> list[PendingStudy]:
    return [PendingStudy(*r) for r in index.read(_PENDING)]


def forget_study(index: Index, study: PendingStudy) -> None:
    """Every rule has judged the study up to `study.last_seq` (unless a newer instance came since)."""
    with index.write() as conn:
        conn.execute(_FORGET, {"study_uid": study.study_uid, "last_seq": study.last_seq})


def waiting(index: Index, study_uid: str) -> bool:
    """Whether some rule has still to judge the study (its quiet period has not ended)."""
    return bool(index.read(_WAITING, {"study_uid": study_uid}))


def fired_seq(index: Index, study_uid: str, rule: str) -> int:
    """The last change of the study that `rule` has judged (0: none)."""
    rows = index.read(_FIRED_SEQ, {"study_uid": study_uid, "rule": rule})
    return rows[0].seq if rows else 0


def mark_fired(conn: Connection, study_uid: str, rule: str, after: int, seq: int) -> bool:
    """Note that `rule` judged the study up to change `seq`, if it had judged it up to `after` (its
    `fired_seq`) until now: False when another router judged it meanwhile (several share the index;
    on PostgreSQL the second waits on the row until the first commits)."""
    return conn.execute(_MARK_FIRED, {"study_uid": study_uid, "rule": rule, "after": after, "seq": seq}).rowcount == 1


# -- forwards -----------------------------------------------------------------------------

def queue_forwards(index: Index, job_id: str, destinations: Iterable[str], now: float) -> None:
    params = [{"job_id": job_id, "destination": d, "now": now} for d in destinations]
    if params:
        with index.write() as conn:
            conn.execute(_QUEUE_FORWARD, params)


def due_forwards(index: Index, now: float, limit: int = 1) -> list[tuple[str, str]]:
    """(job id, destination) of pending forwards whose time has come, the longest due first."""
    return [(r.job_id, r.destination) for r in index.read(_DUE_FORWARDS, {"now": now, "limit": limit})]


def claim_forward(index: Index, job_id: str, destination: str, now: float, until: float) -> bool:
    """Take a due forward to send it, for one router until `until` (another router's, or this one's
    after a restart, is tried again then). False: another router took it."""
    with index.write() as conn:
        return conn.execute(_CLAIM_FORWARD, {"job_id": job_id, "destination": destination, "now": now,
                                             "until": until}).rowcount == 1


def forward_sent(index: Index, job_id: str, destination: str) -> None:
    with index.write() as conn:
        Index.order_changes(conn)           # before the forward's row lock (router/queue.py, _ORDER)
        conn.execute(_FORWARD_SENT, {"job_id": job_id, "destination": destination})
        Index.add_job_change(conn, "job_forwarded", job_id, _study_of(conn, job_id))


def forward_failed(index: Index, job_id: str, destination: str, error: str, now: float,
                   delay: Callable[[int], float]) -> float:
    """Count the failed attempt and set the next; `delay(attempts so far)` says when. Returns that delay."""
    key = {"job_id": job_id, "destination": destination}
    with index.write() as conn:
        Index.order_changes(conn)
        seconds = delay(conn.execute(_FORWARD_ATTEMPTS, key).scalar_one())
        conn.execute(_FORWARD_FAILED, {**key, "next_try": now + seconds, "error": error[:2000]})
        Index.add_job_change(conn, "job_forward_failed", job_id, _study_of(conn, job_id))
    return seconds


def _study_of(conn: Connection, job_id: str) -> str:
    return conn.execute(_STUDY_OF, {"job_id": job_id}).scalar_one()
