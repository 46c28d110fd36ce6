"""The archive's sqlite-utils migrations from before issue 16, frozen: SQLite only.

An index made by them (it has the table `_sqlite_migrations`) is brought to their last schema here,
then stamped at the first Alembic revision (archive/migrations/), which makes the same schema on a
new index (SQLite or PostgreSQL). Nothing is added here any more: new schema changes are Alembic
revisions.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlite_utils

from .db import SQLITE_PRAGMAS
from .matching import name_key, time_key

migrations = sqlite_utils.Migrations("m3dicom")
NAMES = ("0001_initial", "0002_query", "0003_offload", "0004_jobs", "0005_viewer", "0006_integrity",
         "0007_conflict_reason", "0008_blob_holds")


def connect(path: Path) -> sqlite3.Connection:
    """A sqlite3 connection with the index's pragmas, outside the SQLAlchemy layer: to make (tests) or
    migrate an index of before issue 16 with these frozen migrations."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    return conn


@migrations(name="0001_initial")
def _initial(db: sqlite_utils.Database) -> None:
    db.executescript("""
    CREATE TABLE patients (
        pk INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL UNIQUE,
        patient_name TEXT, birth_date TEXT, sex TEXT
    );
    CREATE TABLE studies (
        pk INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL UNIQUE,
        patient_pk INTEGER NOT NULL REFERENCES patients(pk),
        study_date TEXT, study_time TEXT, accession_number TEXT, study_description TEXT,
        referring_physician TEXT, study_id TEXT, character_set TEXT,
        updated_at REAL NOT NULL
    );
    CREATE TABLE series (
        pk INTEGER PRIMARY KEY,
        series_uid TEXT NOT NULL UNIQUE,
        study_pk INTEGER NOT NULL REFERENCES studies(pk),
        modality TEXT, series_number INTEGER, series_description TEXT, body_part TEXT
    );
    CREATE TABLE instances (
        pk INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        series_pk INTEGER NOT NULL REFERENCES series(pk),
        sop_class_uid TEXT NOT NULL, instance_number INTEGER, transfer_syntax TEXT NOT NULL,
        size INTEGER NOT NULL, sha256 TEXT NOT NULL, blob_id TEXT NOT NULL UNIQUE,
        calling_ae TEXT, received_at REAL NOT NULL
    );
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        instance_pk INTEGER, study_uid TEXT, series_uid TEXT, sop_instance_uid TEXT, blob_id TEXT,
        time REAL NOT NULL
    );
    CREATE INDEX studies_patient ON studies(patient_pk);
    CREATE INDEX series_study ON series(study_pk);
    CREATE INDEX instances_series ON instances(series_pk);
    CREATE INDEX changes_kind ON changes(kind, seq);
    """)


@migrations(name="0002_query")
def _query(db: sqlite_utils.Database) -> None:
    """Columns and indexes for C-FIND (keys normalised for matching)."""
    db.executescript("""
    ALTER TABLE patients ADD COLUMN patient_name_key TEXT;
    ALTER TABLE studies ADD COLUMN referring_physician_key TEXT;
    ALTER TABLE studies ADD COLUMN study_time_key TEXT;
    CREATE INDEX patients_name_key ON patients(patient_name_key);
    CREATE INDEX studies_date ON studies(study_date);
    CREATE INDEX studies_accession ON studies(accession_number);
    CREATE INDEX studies_study_id ON studies(study_id);
    CREATE INDEX series_modality ON series(modality, study_pk);
    """)
    # This migration also made the `commitments` table (storage commitment) until issue 16: scp/ owns
    # it now, and scp.db's first migration makes it with the same statement when it is missing. An
    # index that applied this migration before keeps its table and rows; a new one ends up the same.
    conn = db.conn
    for pk, name in conn.execute("SELECT pk, patient_name FROM patients").fetchall():
        conn.execute("UPDATE patients SET patient_name_key=? WHERE pk=?", (name_key(name), pk))
    for pk, physician, study_time in conn.execute(
            "SELECT pk, referring_physician, study_time FROM studies").fetchall():
        conn.execute("UPDATE studies SET referring_physician_key=?, study_time_key=? WHERE pk=?",
                     (name_key(physician), time_key(study_time), pk))


@migrations(name="0003_offload")
def _offload(db: sqlite_utils.Database) -> None:
    """The S3 outbox (one row per blob to push, pushed, or to delete there) and consumer cursors."""
    db.executescript("""
    CREATE TABLE offload (
        blob_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,             -- pending | offloaded | failed | remove
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL,
        last_error TEXT,
        queued_at REAL NOT NULL,
        offloaded_at REAL,
        stored_size INTEGER,             -- bytes at rest (ciphertext)
        evicted_at REAL                  -- the local copy was removed; reads go to S3
    );
    CREATE INDEX offload_due ON offload(state, next_try);
    CREATE INDEX offload_cache ON offload(evicted_at, state, offloaded_at);
    CREATE TABLE cursors (
        name TEXT PRIMARY KEY,           -- a consumer of the changes log
        seq INTEGER NOT NULL             -- the last change it has taken
    );
    """)


@migrations(name="0004_jobs")
def _jobs(db: sqlite_utils.Database) -> None:
    """Analysis jobs, their results and forwards; study completion for the router; job events.

    The router owns jobs, job_results, forwards, router_studies and router_fired since issue 16
    (router/store.py: its own migrations make them, IF NOT EXISTS). They stay made here as well:
    an existing database would end up the same without them, but a new index opened by the
    archive alone (the viewer's and the tests' `Archive(...)`, which do not call
    `router.store.migrate`) would then have no jobs table for the viewer to read."""
    db.executescript("""
    CREATE TABLE jobs (
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
    );
    CREATE INDEX jobs_state ON jobs(state, created_at);
    CREATE INDEX jobs_study ON jobs(study_uid, created_at);
    CREATE TABLE job_results (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        kind TEXT NOT NULL,                  -- dicom | file
        name TEXT NOT NULL,                  -- what the plug-in called it (model.x3d, sr, ...)
        media_type TEXT NOT NULL,
        sop_instance_uid TEXT,               -- kind dicom: the instance in the archive
        blob_id TEXT,                        -- kind file: the blob
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, name)
    );
    CREATE INDEX job_results_blob ON job_results(blob_id);
    CREATE TABLE forwards (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        destination TEXT NOT NULL,           -- [remote.NAME]
        state TEXT NOT NULL,                 -- pending | sent | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL,
        last_error TEXT,
        PRIMARY KEY (job_id, destination)
    );
    CREATE INDEX forwards_due ON forwards(state, next_try);
    CREATE TABLE router_studies (            -- studies with instances the rules have not seen
        study_uid TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        last_time REAL NOT NULL
    );
    CREATE TABLE router_fired (              -- the last change each rule has judged, per study
        study_uid TEXT NOT NULL,
        rule TEXT NOT NULL,
        seq INTEGER NOT NULL,
        job_id TEXT,
        PRIMARY KEY (study_uid, rule)
    );
    ALTER TABLE changes ADD COLUMN job_id TEXT;
    CREATE INDEX changes_job ON changes(job_id);
    ALTER TABLE instances ADD COLUMN job_id TEXT;   -- set on analysis results: the job that made them
    """)


@migrations(name="0005_viewer")
def _viewer(db: sqlite_utils.Database) -> None:
    """Applied once in every index made before issue 16. The viewer's tables (users, sessions,
    login_failures, share_links, audit) are the viewer's own since: its first migration
    (viewer/accounts.py, `Migrations("viewer")`) makes them, with the statements that stood here,
    IF NOT EXISTS, so an index from before keeps its tables and rows and a new one gets the same
    schema (tests/test_viewer_facts.py checks it)."""


@migrations(name="0006_integrity", transactional=False)
def _integrity(db: sqlite_utils.Database) -> None:
    """A study belongs to one patient and a series to one study (issue 14).

    `conflicts`: every instance that disagreed with the index (its values beside the
    index's). `quarantine`: instances kept outside the hierarchy (`ingest.on_conflict`).
    The patients table is rebuilt (SQLite cannot drop a constraint) so that a Patient ID
    is unique only when there is one: instances without a Patient ID get a patient row
    of their own per study instead of sharing (and renaming) one empty-ID patient.
    Foreign keys are off during the rebuild, hence not in sqlite-utils' transaction:
    one of its own, and every step can run again if a crash cut it off.
    """
    conn = db.conn
    conn.execute("PRAGMA foreign_keys=OFF")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _INTEGRITY_SCHEMA:
                conn.execute(statement)
            (patients_sql,), = conn.execute("SELECT sql FROM sqlite_master WHERE name='patients'").fetchall()
            if "UNIQUE" in patients_sql.upper():
                for statement in _PATIENTS_REBUILD:
                    conn.execute(statement)
            if conn.execute("PRAGMA foreign_key_check").fetchall():
                raise RuntimeError("index: rebuilding the patients table broke a foreign key")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute("PRAGMA foreign_keys=ON")


_INTEGRITY_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conflicts (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,                  -- last received
        sop_instance_uid TEXT NOT NULL,
        study_uid TEXT, series_uid TEXT,
        attribute TEXT NOT NULL,             -- PatientName | PatientBirthDate | PatientSex: the index kept its value;
                                             -- PatientID: the study is another patient's;
                                             -- StudyInstanceUID: the series is another study's
        index_value TEXT,                    -- what the index holds (and C-FIND answers)
        instance_value TEXT,                 -- what the instance says (its stored file keeps it)
        action TEXT NOT NULL,                -- stored | refused | quarantined
        calling_ae TEXT,
        received INTEGER NOT NULL DEFAULT 1  -- times this instance came with this difference
    )""",
    "CREATE INDEX IF NOT EXISTS conflicts_instance ON conflicts(sop_instance_uid, attribute)",
    """CREATE TABLE IF NOT EXISTS quarantine (
        pk INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL,
        study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
        blob_id TEXT NOT NULL UNIQUE,
        calling_ae TEXT, job_id TEXT,
        reason TEXT NOT NULL,
        received_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS quarantine_instance ON quarantine(sop_instance_uid)",
)
_PATIENTS_REBUILD = (   # SQLite's "12 steps" for a change ALTER TABLE cannot make
    """CREATE TABLE patients_new (
        pk INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL,            -- '': none (a patient row of its own per study)
        patient_name TEXT, birth_date TEXT, sex TEXT,
        patient_name_key TEXT
    )""",
    "INSERT INTO patients_new (pk, patient_id, patient_name, birth_date, sex, patient_name_key) "
    "SELECT pk, patient_id, patient_name, birth_date, sex, patient_name_key FROM patients",
    "DROP TABLE patients",
    "ALTER TABLE patients_new RENAME TO patients",
    "CREATE UNIQUE INDEX patients_id ON patients(patient_id) WHERE patient_id <> ''",
    "CREATE INDEX patients_patient_id ON patients(patient_id)",   # lookups (a partial index serves none)
    "CREATE INDEX patients_name_key ON patients(patient_name_key)",
)


@migrations(name="0007_conflict_reason")
def _conflict_reason(db: sqlite_utils.Database) -> None:
    """`conflicts.reason`: what happened, in words, where the attribute alone does not say it
    (an instance UID re-used for another patient's image; content received again and discarded:
    `action` "discarded", the stored copy kept under storage.duplicates = "keep-first")."""
    db.executescript("ALTER TABLE conflicts ADD COLUMN reason TEXT;")


@migrations(name="0008_blob_holds")
def _blob_holds(db: sqlite_utils.Database) -> None:
    """Blobs that rows of another package still need (the router's result files): recovery and
    the offloader keep them without reading that package's tables (`archive.holds`)."""
    db.executescript("""
    CREATE TABLE blob_holds (
        blob_id TEXT NOT NULL,
        holder TEXT NOT NULL,                -- the package whose rows need it ("router")
        PRIMARY KEY (blob_id, holder)
    );
    """)
