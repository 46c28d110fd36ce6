"""The index: the one source of truth for what the node holds (SQLite, or PostgreSQL shared by nodes).

The engines, their transactions and the migrations are `archive.db`'s: `write()` is one write
transaction, `reader()` a read-only connection of its own; both yield SQLAlchemy Connections, and
queries are `text()` with `:named` parameters, one copy for both engines. The archive's schema is its
Alembic revisions (archive/migrations/). The `changes` table is a sequenced log that every consumer
tails by `seq`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection, Row

from . import db
from .matching import name_key, time_key

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


# conflicts.action of a reception that did not become the stored instance of its UID
NOT_KEPT = ("refused", "quarantined", "discarded")
SAME_UID_OTHER_CONTENT = "received again with different content"


_NOT_KEPT = bindparam("not_kept", NOT_KEPT, expanding=True)
_BLOB_IDS = text("SELECT blob_id FROM instances UNION SELECT blob_id FROM quarantine UNION SELECT blob_id FROM blob_holds")
_BLOB_REFERENCED = text("SELECT 1 FROM instances WHERE blob_id = :blob UNION ALL SELECT 1 FROM quarantine "
                        "WHERE blob_id = :blob UNION ALL SELECT 1 FROM blob_holds WHERE blob_id = :blob LIMIT 1")
_INTEGRITY = text("SELECT action, COUNT(DISTINCT sop_instance_uid) FROM conflicts GROUP BY action")
_QUARANTINED = text("SELECT COUNT(*) FROM quarantine")
_NOT_COMMITTABLE = text(
    "SELECT c.action FROM conflicts c JOIN instances i ON i.sop_instance_uid = c.sop_instance_uid "
    "WHERE c.sop_instance_uid = :uid AND c.action IN :not_kept AND c.time >= i.received_at "
    "ORDER BY c.time DESC LIMIT 1").bindparams(_NOT_KEPT)
_CHANGES_SINCE = text("SELECT * FROM changes WHERE seq > :seq ORDER BY seq LIMIT :limit")
_STUDIES_STORED = text(
    "SELECT MAX(seq), study_uid FROM changes WHERE kind IN ('stored', 'replaced') AND seq > :after AND seq <= :upto "
    "GROUP BY study_uid ORDER BY MAX(seq) LIMIT :limit")
# ingest's statements (inside `write()`)
_SERIES = text("SELECT se.pk, st.study_uid FROM series se JOIN studies st ON st.pk = se.study_pk "
               "WHERE se.series_uid = :series_uid")
_STUDY = text("SELECT st.pk, st.patient_pk, p.patient_id FROM studies st JOIN patients p ON p.pk = st.patient_pk "
              "WHERE st.study_uid = :study_uid")
_PATIENT = text("SELECT pk FROM patients WHERE patient_id = :patient_id")
_NEW_PATIENT = text("INSERT INTO patients (patient_id, patient_name, patient_name_key, birth_date, sex) "
                    "VALUES (:patient_id, :patient_name, :patient_name_key, :birth_date, :sex) RETURNING pk")
_NEW_STUDY = text(
    "INSERT INTO studies (study_uid, patient_pk, study_date, study_time, study_time_key, accession_number, "
    "study_description, referring_physician, referring_physician_key, study_id, character_set, updated_at) "
    "VALUES (:study_uid, :patient_pk, :study_date, :study_time, :study_time_key, :accession_number, "
    ":study_description, :referring_physician, :referring_physician_key, :study_id, :character_set, :now) "
    "RETURNING pk")
_STUDY_UPDATED = text("UPDATE studies SET updated_at = :now WHERE pk = :pk")
_NEW_SERIES = text(
    "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description, body_part) "
    "VALUES (:series_uid, :study_pk, :modality, :series_number, :series_description, :body_part) RETURNING pk")
_HELD = text("SELECT p.patient_id, st.study_uid, se.series_uid FROM instances i JOIN series se ON se.pk = i.series_pk "
             "JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk WHERE i.pk = :pk")
_DEMOGRAPHICS = text("SELECT patient_name, birth_date, sex FROM patients WHERE pk = :pk")
_FILL = {columns: text(f"UPDATE patients SET {', '.join(f'{c} = :{c}' for c in columns)} WHERE pk = :pk")
         for columns in (("patient_name", "patient_name_key"), ("birth_date",), ("sex",),
                         ("patient_name", "birth_date", "patient_name_key"), ("patient_name", "sex", "patient_name_key"),
                         ("birth_date", "sex"), ("patient_name", "birth_date", "sex", "patient_name_key"))}
_CONFLICT_AGAIN = text(
    "UPDATE conflicts SET received = received + 1, time = :now, calling_ae = :calling_ae "
    "WHERE sop_instance_uid = :uid AND attribute = :attribute AND index_value IS NOT DISTINCT FROM :index_value "
    "AND instance_value IS NOT DISTINCT FROM :instance_value AND action = :action")
_NEW_CONFLICT = text(
    "INSERT INTO conflicts (time, sop_instance_uid, study_uid, series_uid, attribute, index_value, instance_value, "
    "action, calling_ae, reason) VALUES (:now, :uid, :study_uid, :series_uid, :attribute, :index_value, "
    ":instance_value, :action, :calling_ae, :reason)")
_ADD_CHANGE = text(
    "INSERT INTO changes (kind, instance_pk, study_uid, series_uid, sop_instance_uid, blob_id, time) "
    "VALUES (:kind, :instance_pk, :study_uid, :series_uid, :sop_instance_uid, :blob_id, :time)")
_ADD_JOB_CHANGE = text("INSERT INTO changes (kind, study_uid, blob_id, job_id, time) "
                       "VALUES (:kind, :study_uid, :blob_id, :job_id, :time)")

MIGRATIONS = Path(__file__).with_name("migrations")


def connect(path: Path):
    """A sqlite3 connection with the index's pragmas: only for the sqlite-utils migrations of the owners
    not on Alembic yet (scp, router, viewer; issue 16, step by step)."""
    import sqlite3

    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    conn.row_factory = sqlite3.Row
    for pragma in db.SQLITE_PRAGMAS:
        conn.execute(pragma)
    return conn


def _legacy(conn) -> bool:
    """An index made by the archive's sqlite-utils migrations: brought to their last schema (`True`)."""
    from . import sqlite_legacy
    import sqlite_utils

    if not conn.execute("SELECT 1 FROM _sqlite_migrations WHERE migration_set = 'm3dicom' LIMIT 1").fetchall():
        return False
    sqlite_legacy.migrations.apply(sqlite_utils.Database(conn))
    return True


class Index:
    """The index on SQLite (a file: `path`) or PostgreSQL (a postgresql:// URL), its archive tables migrated.

    SQLite: all writes go through one connection under one lock; reads use read-only ones of their own.
    """

    def __init__(self, where: Path | str):
        self.engines = db.open_engines(where)
        self.path = Path(where) if self.engines.sqlite else None
        try:
            db.migrate(self.engines, "archive", MIGRATIONS, _legacy)
        except BaseException:
            self.engines.dispose()
            raise

    @property
    def sqlite(self) -> bool:
        return self.engines.sqlite

    def close(self) -> None:
        self.engines.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: IMMEDIATE, under the writer lock); committed (and durable)
        when the block ends, rolled back when it raises."""
        with self.engines.lock, self.engines.writer.begin() as conn:
            yield conn

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A read-only connection of its own (SQLite: never waits for the writer, WAL)."""
        with self.engines.readers.connect() as conn:
            yield conn

    def read(self, statement: sa.Executable, params: dict | None = None) -> list[Row]:
        """The rows of one statement (`text()` or Core) on a read-only connection."""
        with self.reader() as conn:
            return conn.execute(statement, params or {}).fetchall()

    def query(self, sql: str, params: dict | tuple = ()) -> list:
        """Rows of one statement in a transaction of its own (tools and tests): `:named` parameters
        in a dict (SQLAlchemy rows), or positional `?` ones in a tuple (SQLite only: sqlite3.Row, for
        the owners not converted yet)."""
        with self.write() as conn:
            if isinstance(params, dict):
                return conn.execute(text(sql), params).fetchall()
            return db.raw(conn).execute(sql, tuple(params)).fetchall()

    def blob_ids(self) -> set[str]:
        """Every blob a committed row needs: instances, quarantine, and blobs held by another owner."""
        with self.reader() as conn:
            return {row[0] for row in conn.execute(_BLOB_IDS)}

    def blob_referenced(self, blob_id: str) -> bool:
        """Whether a committed row still needs this blob."""
        with self.reader() as conn:
            return conn.execute(_BLOB_REFERENCED, {"blob": blob_id}).first() is not None

    def integrity(self) -> dict[str, int]:
        """Counts for `m3dicom status`: instances that disagreed with the index, by what was done."""
        counts = {"stored": 0, "refused": 0, "quarantined": 0, "discarded": 0}
        with self.reader() as conn:
            counts.update({action: n for action, n in conn.execute(_INTEGRITY)})
            counts["in_quarantine"] = conn.execute(_QUARANTINED).scalar_one()
        return counts

    def not_committable(self, sop_instance_uid: str) -> str | None:
        """Why storage commitment must not confirm the stored instance of this UID, or None.

        A commitment request names a UID, not bytes: once this UID has been received with
        other content after the stored copy (discarded under keep-first, or refused or
        quarantined as another patient's, study's or series' instance), the node cannot
        tell whether the requester's copy is the one it holds. Nothing the node may be
        asked to confirm is then confirmed (until the stored copy is replaced).
        """
        with self.reader() as conn:
            action = conn.execute(_NOT_COMMITTABLE, {"uid": sop_instance_uid}).scalar()
        if action is None:
            return None
        return f"received again since with other content, which was {action}"

    def changes_since(self, seq: int, limit: int = 1000) -> list[Row]:
        with self.reader() as conn:
            return conn.execute(_CHANGES_SINCE, {"seq": seq, "limit": limit}).fetchall()

    def studies_stored(self, after: int, upto: int, limit: int = 1000) -> list[tuple[int, str]]:
        """(seq, study UID) of the studies that received instances (from a modality or an upload,
        not a job's results) in the changes after `after` up to `upto`: one per study, at its
        last such change, in that order."""
        with self.reader() as conn:
            return [(seq, uid) for seq, uid in conn.execute(_STUDIES_STORED,
                                                            {"after": after, "upto": upto, "limit": limit})]

    # -- writes used by ingest (inside `write()`) ---------------------------------------

    @staticmethod
    def upsert_hierarchy(conn: Connection, header, now: float, differences: list[Difference] | None = None) -> int:
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
        series = conn.execute(_SERIES, {"series_uid": header.series_uid}).first()
        if series is not None and series[1] != header.study_uid:
            raise HierarchyConflict("series belongs to another study", header.series_uid,
                                    [Difference("StudyInstanceUID", series[1], header.study_uid)])
        study = conn.execute(_STUDY, {"study_uid": header.study_uid}).first()
        if study is not None and study[2] != patient_id:
            raise HierarchyConflict("study belongs to another patient", header.study_uid,
                                    [Difference("PatientID", study[2], patient_id)])
        if study is not None:
            patient_pk = study[1]
        elif patient_id:
            patient_pk = conn.execute(_PATIENT, {"patient_id": patient_id}).scalar()
        else:
            patient_pk = None
        if patient_pk is None:
            patient_pk = conn.execute(_NEW_PATIENT, {
                "patient_id": patient_id, "patient_name": a["PatientName"], "patient_name_key": name_key(a["PatientName"]),
                "birth_date": a["PatientBirthDate"], "sex": a["PatientSex"]}).scalar_one()
        else:
            Index._keep_demographics(conn, patient_pk, a, differences)
        if study is None:
            study_pk = conn.execute(_NEW_STUDY, {
                "study_uid": header.study_uid, "patient_pk": patient_pk, "study_date": a["StudyDate"],
                "study_time": a["StudyTime"], "study_time_key": time_key(a["StudyTime"]),
                "accession_number": a["AccessionNumber"], "study_description": a["StudyDescription"],
                "referring_physician": a["ReferringPhysicianName"],
                "referring_physician_key": name_key(a["ReferringPhysicianName"]), "study_id": a["StudyID"],
                "character_set": a["SpecificCharacterSet"], "now": now}).scalar_one()
        else:
            study_pk = study[0]
            conn.execute(_STUDY_UPDATED, {"now": now, "pk": study_pk})
        if series is not None:
            return series[0]
        return conn.execute(_NEW_SERIES, {
            "series_uid": header.series_uid, "study_pk": study_pk, "modality": a["Modality"],
            "series_number": a["SeriesNumber"], "series_description": a["SeriesDescription"],
            "body_part": a["BodyPartExamined"]}).scalar_one()

    @staticmethod
    def check_same_instance(conn: Connection, header, instance_pk: int) -> None:
        """The instance received under a UID the index holds (with other bytes) must be the same
        instance: of the same patient, study and series. Raises `HierarchyConflict` if not (a
        modality re-using UIDs: keeping either silently would lose or mix a patient's image)."""
        held = conn.execute(_HELD, {"pk": instance_pk}).first()
        said = (header.attrs["PatientID"] or "", header.study_uid, header.series_uid)
        for keyword, whose, index_value, instance_value in zip(
                ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"), ("patient", "study", "series"), held, said):
            if index_value != instance_value:
                reason = f"SOP Instance UID is an instance of another {whose}"
                raise HierarchyConflict(reason, header.sop_instance_uid,
                                        [Difference(keyword, index_value, instance_value, f"its {reason}")])

    @staticmethod
    def _keep_demographics(conn: Connection, patient_pk: int, attrs: dict,
                           differences: list[Difference] | None) -> None:
        """Fill what the patient row lacks; note (never write over) what the instance says otherwise.

        An instance that contradicts what is held (another name for the same Patient ID) may
        be another person's: then none of its values fill a blank either, and each of them
        is noted as a difference."""
        row = conn.execute(_DEMOGRAPHICS, {"pk": patient_pk}).first()
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
            conn.execute(_FILL[tuple(fill)], {**fill, "pk": patient_pk})

    @staticmethod
    def record_conflicts(conn: Connection, header, differences: list[Difference], action: str,
                         calling_ae: str | None, now: float) -> None:
        """One `conflicts` row per difference; the same instance with the same difference again counts up."""
        for d in differences:
            params = {"now": now, "calling_ae": calling_ae, "uid": header.sop_instance_uid, "attribute": d.attribute,
                      "index_value": d.index_value, "instance_value": d.instance_value, "action": action}
            if conn.execute(_CONFLICT_AGAIN, params).rowcount == 0:
                conn.execute(_NEW_CONFLICT, {**params, "study_uid": header.study_uid, "series_uid": header.series_uid,
                                             "reason": d.reason})

    @staticmethod
    def add_change(conn: Connection, kind: str, instance_pk: int | None, header,
                   blob_id: str | None, now: float | None = None) -> None:
        conn.execute(_ADD_CHANGE, {
            "kind": kind, "instance_pk": instance_pk, "study_uid": header.study_uid, "series_uid": header.series_uid,
            "sop_instance_uid": header.sop_instance_uid, "blob_id": blob_id,
            "time": now if now is not None else time.time()})

    @staticmethod
    def add_job_change(conn: Connection, kind: str, job_id: str, study_uid: str,
                       blob_id: str | None = None, now: float | None = None) -> None:
        """A job event (job_queued, job_running, job_progress, job_succeeded, ...; file_stored)."""
        conn.execute(_ADD_JOB_CHANGE, {"kind": kind, "study_uid": study_uid, "blob_id": blob_id, "job_id": job_id,
                                       "time": now if now is not None else time.time()})
