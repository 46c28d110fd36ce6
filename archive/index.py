"""The SQLite index: the one source of truth for what the node holds.

WAL journal, `synchronous=FULL`, one writer (a lock), numbered migrations through
sqlite-utils. The `changes` table is a sequenced log that every consumer tails by `seq`.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import sqlite_utils

migrations = sqlite_utils.Migrations("m3dicom")

DEMOGRAPHICS = (("PatientName", "patient_name"), ("PatientBirthDate", "birth_date"), ("PatientSex", "sex"))


@dataclass(frozen=True)
class Difference:
    """An attribute where an instance disagrees with what the index holds; `reason` in words
    where the attribute alone does not say it (`conflicts.reason`)."""
    attribute: str
    index_value: str | None
    instance_value: str | None
    reason: str | None = None


class HierarchyConflict(Exception):
    """The instance's study belongs to another patient, or its series to another study, or its
    SOP Instance UID to an instance of another patient, study or series."""

    def __init__(self, reason: str, uid: str, differences: list[Difference]):
        super().__init__(reason)
        self.uid = uid                   # the study or series that is another's
        self.differences = differences


def _same(keyword: str, held: str | None, said: str | None) -> bool:
    """Equal as values: person names without regard to case or trailing empty components."""
    if keyword == "PatientName":
        return (held or "").rstrip("^= ").upper() == (said or "").rstrip("^= ").upper()
    return (held or "").strip() == (said or "").strip()


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


# conflicts.action of a reception that did not become the stored instance of its UID
NOT_KEPT = ("refused", "quarantined", "discarded")
SAME_UID_OTHER_CONTENT = "received again with different content"


def name_key(name: str | None) -> str | None:
    """A person name as matched case-insensitively."""
    return name.upper() if name else None


def time_key(value: str | None, upper: bool = False) -> str | None:
    """A DICOM TM as 'HHMMSS.ffffff' so that strings compare as times.

    Missing digits are zeros, or nines for the upper bound of a range (`1200` as an upper
    bound means up to 12:00:59.999999).
    """
    if not value:
        return None
    whole, _, fraction = value.strip().replace(":", "").partition(".")
    fill = "9" if upper else "0"
    return whole[:6].ljust(6, fill) + "." + fraction[:6].ljust(6, fill)


PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON",
           "PRAGMA busy_timeout=10000")


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    conn.row_factory = sqlite3.Row
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


class Index:
    """All writes go through one connection under one lock; reads may use their own."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._conn = connect(self.path)
        migrations.apply(sqlite_utils.Database(self._conn))
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; committed (and durable) when the block ends."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection of its own: with WAL, reads never wait for the writer."""
        conn = sqlite3.connect(f"file:{quote(str(self.path))}?mode=ro", uri=True, timeout=10,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def blob_ids(self) -> set[str]:
        """Every blob a committed row needs: instances, quarantine, and blobs held by another owner."""
        return {row[0] for row in self.query("SELECT blob_id FROM instances UNION SELECT blob_id FROM quarantine "
                                             "UNION SELECT blob_id FROM blob_holds")}

    def blob_referenced(self, blob_id: str) -> bool:
        """Whether a committed row still needs this blob."""
        return bool(self.query("SELECT 1 FROM instances WHERE blob_id=? UNION ALL "
                               "SELECT 1 FROM quarantine WHERE blob_id=? UNION ALL "
                               "SELECT 1 FROM blob_holds WHERE blob_id=? LIMIT 1", (blob_id, blob_id, blob_id)))

    def integrity(self) -> dict[str, int]:
        """Counts for `m3dicom status`: instances that disagreed with the index, by what was done."""
        counts = {"stored": 0, "refused": 0, "quarantined": 0, "discarded": 0}
        counts.update({action: n for action, n in self.query(
            "SELECT action, COUNT(DISTINCT sop_instance_uid) FROM conflicts GROUP BY action")})
        (counts["in_quarantine"],), = self.query("SELECT COUNT(*) FROM quarantine")
        return counts

    def not_committable(self, sop_instance_uid: str) -> str | None:
        """Why storage commitment must not confirm the stored instance of this UID, or None.

        A commitment request names a UID, not bytes: once this UID has been received with
        other content after the stored copy (discarded under keep-first, or refused or
        quarantined as another patient's, study's or series' instance), the node cannot
        tell whether the requester's copy is the one it holds. Nothing the node may be
        asked to confirm is then confirmed (until the stored copy is replaced).
        """
        rows = self.query(
            "SELECT c.action FROM conflicts c JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid "
            f"WHERE c.sop_instance_uid=? AND c.action IN ({','.join('?' * len(NOT_KEPT))}) AND c.time >= i.received_at "
            "ORDER BY c.time DESC LIMIT 1", (sop_instance_uid, *NOT_KEPT))
        if not rows:
            return None
        return f"received again since with other content, which was {rows[0]['action']}"

    def changes_since(self, seq: int, limit: int = 1000) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))

    def studies_stored(self, after: int, upto: int, limit: int = 1000) -> list[tuple[int, str]]:
        """(seq, study UID) of the studies that received instances (from a modality or an upload,
        not a job's results) in the changes after `after` up to `upto`: one per study, at its
        last such change, in that order."""
        return [(seq, uid) for seq, uid in self.query(
            "SELECT MAX(seq), study_uid FROM changes WHERE kind IN ('stored', 'replaced') AND seq > ? AND seq <= ? "
            "GROUP BY study_uid ORDER BY MAX(seq) LIMIT ?", (after, upto, limit))]

    # -- writes used by ingest (inside `write()`) ---------------------------------------

    @staticmethod
    def upsert_hierarchy(conn: sqlite3.Connection, header, now: float,
                         differences: list[Difference] | None = None) -> int:
        """File the instance under its patient, study and series (made when new); return the series pk.

        A series belongs to one study and a study to one patient: an instance that says
        otherwise raises `HierarchyConflict` before anything is written. Patient
        demographics are never written over: the first value received stays (what C-FIND
        answers; an empty one is filled in), and where the instance says otherwise a
        `Difference` is appended to `differences` for the caller to record. An instance
        without a Patient ID belongs to its study's patient, or to a new patient row of its
        own for a new study (never to one shared empty-ID patient).
        """
        a = header.attrs
        patient_id = a["PatientID"] or ""
        series = conn.execute("SELECT se.pk, st.study_uid FROM series se JOIN studies st ON st.pk = se.study_pk "
                              "WHERE se.series_uid=?", (header.series_uid,)).fetchone()
        if series is not None and series[1] != header.study_uid:
            raise HierarchyConflict("series belongs to another study", header.series_uid,
                                    [Difference("StudyInstanceUID", series[1], header.study_uid)])
        study = conn.execute("SELECT st.pk, st.patient_pk, p.patient_id FROM studies st "
                             "JOIN patients p ON p.pk = st.patient_pk WHERE st.study_uid=?",
                             (header.study_uid,)).fetchone()
        if study is not None and study[2] != patient_id:
            raise HierarchyConflict("study belongs to another patient", header.study_uid,
                                    [Difference("PatientID", study[2], patient_id)])
        if study is not None:
            patient_pk = study[1]
        elif patient_id:
            found = conn.execute("SELECT pk FROM patients WHERE patient_id=?", (patient_id,)).fetchone()
            patient_pk = found[0] if found else None
        else:
            patient_pk = None
        if patient_pk is None:
            patient_pk = conn.execute(
                "INSERT INTO patients (patient_id, patient_name, patient_name_key, birth_date, sex) VALUES (?,?,?,?,?)",
                (patient_id, a["PatientName"], name_key(a["PatientName"]), a["PatientBirthDate"],
                 a["PatientSex"])).lastrowid
        else:
            Index._keep_demographics(conn, patient_pk, a, differences)
        if study is None:
            study_pk = conn.execute(
                "INSERT INTO studies (study_uid, patient_pk, study_date, study_time, study_time_key, "
                "accession_number, study_description, referring_physician, referring_physician_key, study_id, "
                "character_set, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (header.study_uid, patient_pk, a["StudyDate"], a["StudyTime"], time_key(a["StudyTime"]),
                 a["AccessionNumber"], a["StudyDescription"], a["ReferringPhysicianName"],
                 name_key(a["ReferringPhysicianName"]), a["StudyID"], a["SpecificCharacterSet"], now)).lastrowid
        else:
            study_pk = study[0]
            conn.execute("UPDATE studies SET updated_at=? WHERE pk=?", (now, study_pk))
        if series is not None:
            return series[0]
        return conn.execute(
            "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description, "
            "body_part) VALUES (?,?,?,?,?,?)",
            (header.series_uid, study_pk, a["Modality"], a["SeriesNumber"], a["SeriesDescription"],
             a["BodyPartExamined"])).lastrowid

    @staticmethod
    def check_same_instance(conn: sqlite3.Connection, header, instance_pk: int) -> None:
        """The instance received under a UID the index holds (with other bytes) must be the same
        instance: of the same patient, study and series. Raises `HierarchyConflict` if not (a
        modality re-using UIDs: keeping either silently would lose or mix a patient's image)."""
        held = conn.execute(
            "SELECT p.patient_id, st.study_uid, se.series_uid FROM instances i JOIN series se ON se.pk = i.series_pk "
            "JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk WHERE i.pk=?",
            (instance_pk,)).fetchone()
        said = (header.attrs["PatientID"] or "", header.study_uid, header.series_uid)
        for keyword, whose, index_value, instance_value in zip(
                ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"), ("patient", "study", "series"), held, said):
            if index_value != instance_value:
                reason = f"SOP Instance UID is an instance of another {whose}"
                raise HierarchyConflict(reason, header.sop_instance_uid,
                                        [Difference(keyword, index_value, instance_value, f"its {reason}")])

    @staticmethod
    def _keep_demographics(conn: sqlite3.Connection, patient_pk: int, attrs: dict,
                           differences: list[Difference] | None) -> None:
        """Fill what the patient row lacks; note (never write over) what the instance says otherwise.

        An instance that contradicts what is held (another name for the same Patient ID) may
        be another person's: then none of its values fill a blank either, and each of them
        is noted as a difference."""
        row = conn.execute("SELECT patient_name, birth_date, sex FROM patients WHERE pk=?", (patient_pk,)).fetchone()
        fill, found = {}, []
        for (keyword, column), held in zip(DEMOGRAPHICS, row):
            said = attrs.get(keyword)
            if not said or _same(keyword, held, said):
                continue
            if not held:
                fill[column] = said
            found.append(Difference(keyword, held, said))
        contradicts = any(d.index_value for d in found)
        if contradicts and differences is not None:
            differences.extend(found)
        if fill and not contradicts:
            if "patient_name" in fill:
                fill["patient_name_key"] = name_key(fill["patient_name"])
            conn.execute(f"UPDATE patients SET {', '.join(f'{c}=?' for c in fill)} WHERE pk=?",
                         (*fill.values(), patient_pk))

    @staticmethod
    def record_conflicts(conn: sqlite3.Connection, header, differences: list[Difference], action: str,
                         calling_ae: str | None, now: float) -> None:
        """One `conflicts` row per difference; the same instance with the same difference again counts up."""
        for d in differences:
            updated = conn.execute(
                "UPDATE conflicts SET received = received + 1, time=?, calling_ae=? WHERE sop_instance_uid=? "
                "AND attribute=? AND index_value IS ? AND instance_value IS ? AND action=?",
                (now, calling_ae, header.sop_instance_uid, d.attribute, d.index_value, d.instance_value, action))
            if updated.rowcount == 0:
                conn.execute(
                    "INSERT INTO conflicts (time, sop_instance_uid, study_uid, series_uid, attribute, index_value, "
                    "instance_value, action, calling_ae, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (now, header.sop_instance_uid, header.study_uid, header.series_uid, d.attribute, d.index_value,
                     d.instance_value, action, calling_ae, d.reason))

    @staticmethod
    def add_change(conn: sqlite3.Connection, kind: str, instance_pk: int | None, header,
                   blob_id: str | None, now: float | None = None) -> None:
        conn.execute(
            "INSERT INTO changes (kind, instance_pk, study_uid, series_uid, sop_instance_uid, blob_id, "
            "time) VALUES (?,?,?,?,?,?,?)",
            (kind, instance_pk, header.study_uid, header.series_uid, header.sop_instance_uid, blob_id,
             now if now is not None else time.time()))

    @staticmethod
    def add_job_change(conn: sqlite3.Connection, kind: str, job_id: str, study_uid: str,
                       blob_id: str | None = None, now: float | None = None) -> None:
        """A job event (job_queued, job_running, job_progress, job_succeeded, ...; file_stored)."""
        conn.execute("INSERT INTO changes (kind, study_uid, blob_id, job_id, time) VALUES (?,?,?,?,?)",
                     (kind, study_uid, blob_id, job_id, now if now is not None else time.time()))
