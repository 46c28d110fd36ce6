"""The router's tables: its migrations, study completion (router_studies, router_fired) and
forwards. With router/queue.py (jobs and their results, through the state machine) the only SQL
on the router's tables; nothing outside router/ reads them.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlite_utils

from archive import holds
from archive.db import raw
from archive.index import Index, connect

migrations = sqlite_utils.Migrations("router")
HOLDER = "router"                   # blobs of result files, held in the archive (archive.holds)

_TABLES = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        plugin TEXT NOT NULL,
        params TEXT NOT NULL,                -- JSON
        inputs TEXT NOT NULL,                -- JSON list of series UIDs
        rule TEXT,                           -- the rule that made it; NULL: made through the API
        created_by TEXT,
        forward_to TEXT NOT NULL,            -- JSON list of [remote.NAME] names
        state TEXT NOT NULL,                 -- queued | running | succeeded | failed | cancelled
        attempts INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        worker TEXT,
        lease_expires REAL,
        errors TEXT NOT NULL,                -- JSON list, one per failed attempt
        progress REAL,
        progress_message TEXT,
        summary TEXT,                        -- JSON from the plug-in
        supersedes TEXT REFERENCES jobs(id), -- an earlier job of the same rule and study
        timings TEXT,                        -- JSON: worker_started, plugin_returned, stored, backend (last attempt)
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid, created_at)",
    """CREATE TABLE IF NOT EXISTS job_results (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        kind TEXT NOT NULL,                  -- dicom | file
        name TEXT NOT NULL,                  -- what the plug-in called it (model.x3d, sr, ...)
        media_type TEXT NOT NULL,
        sop_instance_uid TEXT,               -- kind dicom: the instance in the archive
        blob_id TEXT,                        -- kind file: the blob (held in the archive: archive.holds)
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, name)
    )""",
    "CREATE INDEX IF NOT EXISTS job_results_blob ON job_results(blob_id)",
    """CREATE TABLE IF NOT EXISTS forwards (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        destination TEXT NOT NULL,           -- [remote.NAME]
        state TEXT NOT NULL,                 -- pending | sent | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL,
        last_error TEXT,
        PRIMARY KEY (job_id, destination)
    )""",
    "CREATE INDEX IF NOT EXISTS forwards_due ON forwards(state, next_try)",
    """CREATE TABLE IF NOT EXISTS router_studies (   -- studies with instances the rules have not seen
        study_uid TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        last_time REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS router_fired (     -- the last change each rule has judged, per study
        study_uid TEXT NOT NULL,
        rule TEXT NOT NULL,
        seq INTEGER NOT NULL,
        job_id TEXT,
        PRIMARY KEY (study_uid, rule)
    )""",
)


@migrations(name="0001_tables")
def _tables(db: sqlite_utils.Database) -> None:
    """The router's tables, as the archive's 0004_jobs made them in the databases that exist."""
    for statement in _TABLES:
        db.conn.execute(statement)


@migrations(name="0002_result_holds")
def _result_holds(db: sqlite_utils.Database) -> None:
    """The archive keeps result files because the router holds them (it read job_results before)."""
    # the statement archive.holds.hold runs, here on sqlite-utils' own connection (SQLite only until
    # the router's migrations are Alembic revisions)
    db.conn.executemany("INSERT OR IGNORE INTO blob_holds (blob_id, holder) VALUES (?, ?)",
                        [(r[0], HOLDER) for r in db.conn.execute(
                            "SELECT blob_id FROM job_results WHERE blob_id IS NOT NULL").fetchall()])


def migrate(index: Index) -> None:
    """Make or bring up to date the router's tables (before anything removes unreferenced blobs: an
    index from before `blob_holds` gets its result files held here). On a connection of its own,
    as scp.db and viewer.accounts do: SQLite orders the writers."""
    conn = connect(index.path)
    try:
        migrations.apply(sqlite_utils.Database(conn))
    finally:
        conn.close()


# -- study completion ---------------------------------------------------------------------

@dataclass(frozen=True)
class PendingStudy:
    """A study with instances the rules have not all judged: its last routed change, and when."""
    study_uid: str
    last_seq: int
    last_time: float


def note_stored(conn: sqlite3.Connection, study_uid: str, seq: int, time: float) -> None:
    """The study received an instance (change `seq` at `time`): the rules judge it once it is quiet."""
    raw(conn).execute("INSERT INTO router_studies (study_uid, last_seq, last_time) VALUES (?,?,?) "
                 "ON CONFLICT(study_uid) DO UPDATE SET last_seq=excluded.last_seq, last_time=excluded.last_time",
                 (study_uid, seq, time))


def pending_studies(index: Index) -> list[PendingStudy]:
    return [PendingStudy(*r) for r in index.query("SELECT study_uid, last_seq, last_time FROM router_studies")]


def forget_study(index: Index, study: PendingStudy) -> None:
    """Every rule has judged the study up to `study.last_seq` (unless a newer instance came since)."""
    with index.write() as conn:
        raw(conn).execute("DELETE FROM router_studies WHERE study_uid=? AND last_seq=?", (study.study_uid, study.last_seq))


def fired_seq(index: Index, study_uid: str, rule: str) -> int:
    """The last change of the study that `rule` has judged (0: none)."""
    rows = index.query("SELECT seq FROM router_fired WHERE study_uid=? AND rule=?", (study_uid, rule))
    return rows[0][0] if rows else 0


def mark_fired(conn: sqlite3.Connection, study_uid: str, rule: str, seq: int) -> None:
    raw(conn).execute("INSERT INTO router_fired (study_uid, rule, seq) VALUES (?,?,?) "
                 "ON CONFLICT(study_uid, rule) DO UPDATE SET seq=excluded.seq", (study_uid, rule, seq))


# -- forwards -----------------------------------------------------------------------------

def queue_forwards(index: Index, job_id: str, destinations: Iterable[str], now: float) -> None:
    with index.write() as conn:
        raw(conn).executemany("INSERT OR IGNORE INTO forwards (job_id, destination, state, next_try) "
                         "VALUES (?,?,'pending',?)", [(job_id, d, now) for d in destinations])


def due_forwards(index: Index, now: float, limit: int = 1) -> list[tuple[str, str]]:
    """(job id, destination) of pending forwards whose time has come, the longest due first."""
    return [(r[0], r[1]) for r in index.query(
        "SELECT job_id, destination FROM forwards WHERE state='pending' AND next_try <= ? ORDER BY next_try LIMIT ?",
        (now, limit))]


def forward_sent(index: Index, job_id: str, destination: str) -> None:
    with index.write() as conn:
        raw(conn).execute("UPDATE forwards SET state='sent', attempts=attempts+1, last_error=NULL "
                     "WHERE job_id=? AND destination=?", (job_id, destination))
        Index.add_job_change(conn, "job_forwarded", job_id, _study_of(conn, job_id))


def forward_failed(index: Index, job_id: str, destination: str, error: str, now: float,
                   delay: Callable[[int], float]) -> float:
    """Count the failed attempt and set the next; `delay(attempts so far)` says when. Returns that delay."""
    with index.write() as conn:
        (attempts,), = raw(conn).execute("SELECT attempts FROM forwards WHERE job_id=? AND destination=?",
                                    (job_id, destination)).fetchall()
        seconds = delay(attempts)
        raw(conn).execute("UPDATE forwards SET attempts=attempts+1, next_try=?, last_error=? "
                     "WHERE job_id=? AND destination=?", (now + seconds, error[:2000], job_id, destination))
        Index.add_job_change(conn, "job_forward_failed", job_id, _study_of(conn, job_id))
    return seconds


def _study_of(conn: sqlite3.Connection, job_id: str) -> str:
    return raw(conn).execute("SELECT study_uid FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
