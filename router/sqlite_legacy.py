"""The router's sqlite-utils migrations from before its Alembic revisions, frozen: SQLite only.

A SQLite index made before them (it has the table `_sqlite_migrations`, from the archive's or the
router's old migrations) is brought to their last schema here, then stamped at the router's first
revision (router/migrations/), which makes the same tables on a new index, SQLite or PostgreSQL.
Nothing is added here any more.
"""
from __future__ import annotations

import sqlite3

import sqlite_utils

migrations = sqlite_utils.Migrations("router")
HOLDER = "router"                   # as router.store.HOLDER (the migration below holds the result files)


@migrations(name="0001_tables")
def _tables(db: sqlite_utils.Database) -> None:
    """Made the router's tables, IF NOT EXISTS, with the statements of the archive's 0004_jobs: every index
    that runs it has them already (the archive's migrations, old or Alembic, run first and make them), so
    it records itself only."""


@migrations(name="0002_result_holds")
def _result_holds(db: sqlite_utils.Database) -> None:
    """The archive keeps result files because the router holds them (it read job_results before)."""
    db.conn.executemany("INSERT OR IGNORE INTO blob_holds (blob_id, holder) VALUES (?, ?)",
                        [(r[0], HOLDER) for r in db.conn.execute(
                            "SELECT blob_id FROM job_results WHERE blob_id IS NOT NULL").fetchall()])


def bring_up(conn: sqlite3.Connection) -> bool:
    """An index made before the router's Alembic revisions (by the archive's or the router's sqlite-utils
    migrations): brought to the frozen migrations' last schema (`True`: stamp it, rows kept)."""
    old = {r[0] for r in conn.execute("SELECT DISTINCT migration_set FROM _sqlite_migrations")}
    if not old & {"m3dicom", "router"}:
        return False
    migrations.apply(sqlite_utils.Database(conn))
    return True
