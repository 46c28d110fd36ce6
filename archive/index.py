"""The index: the one source of truth for what the node holds (SQLite, or PostgreSQL shared by nodes).

The engines, their transactions and the migrations are `archive.db`'s: `write()` is one write
transaction, `reader()` a read-only connection of its own; both yield SQLAlchemy Connections, and
queries are `text()` with `:named` parameters, one copy for both engines. The archive's schema is its
Alembic revisions (archive/migrations/). The `changes` table is a sequenced log that every consumer
tails by `seq`.
"""
from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, NamedTuple, TypeVar

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


class Filed(NamedTuple):
    """What the index holds of an instance being received (`Index.filed`): None where it holds nothing."""
    instance_pk: int | None         # the instance of this SOP Instance UID
    sha256: str | None
    blob_id: str | None
    series_pk: int | None           # the series of this Series Instance UID, and the UID of its study
    series_study_uid: str | None
    study_pk: int | None            # the study of this Study Instance UID
    updated_at: float | None
    patient_pk: int | None          # the study's patient, or else the patient of this Patient ID
    patient_id: str | None
    patient_name: str | None
    birth_date: str | None
    sex: str | None


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


T = TypeVar("T")

_NOT_KEPT = bindparam("not_kept", NOT_KEPT, expanding=True)
_BLOBS_REFERENCED = text(
    "SELECT blob_id FROM instances WHERE blob_id IN :blobs UNION SELECT blob_id FROM quarantine WHERE blob_id IN :blobs "
    "UNION SELECT blob_id FROM blob_holds WHERE blob_id IN :blobs").bindparams(bindparam("blobs", expanding=True))
_BLOB_REFERENCED = text("SELECT 1 FROM instances WHERE blob_id = :blob UNION ALL SELECT 1 FROM quarantine "
                        "WHERE blob_id = :blob UNION ALL SELECT 1 FROM blob_holds WHERE blob_id = :blob LIMIT 1")
_NOW = text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
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
# ingest's statements (inside `write()`), run as `db.Prepared` (compiled once per dialect)
# What the index holds of an instance's UID and of its series, study and patient, in one statement: the
# instance of this UID; the series of this UID and the UID of its study; the study of this UID and its
# patient, or else the patient of this Patient ID (never one of the empty-ID patients).
FILED = db.Prepared(
    "SELECT i.pk AS instance_pk, i.sha256, i.blob_id, se.pk AS series_pk, sst.study_uid AS series_study_uid, "
    "st.pk AS study_pk, st.updated_at, p.pk AS patient_pk, p.patient_id, p.patient_name, p.birth_date, p.sex "
    "FROM (SELECT 1 AS one) one LEFT JOIN instances i ON i.sop_instance_uid = :uid "
    "LEFT JOIN series se ON se.series_uid = :series_uid LEFT JOIN studies sst ON sst.pk = se.study_pk "
    "LEFT JOIN studies st ON st.study_uid = :study_uid "
    "LEFT JOIN patients p ON p.pk = COALESCE(st.patient_pk, "
    "(SELECT x.pk FROM patients x WHERE x.patient_id = :patient_id AND x.patient_id <> '' LIMIT 1))")
_NEW_PATIENT = db.Prepared("INSERT INTO patients (patient_id, patient_name, patient_name_key, birth_date, sex) "
                           "VALUES (:patient_id, :patient_name, :patient_name_key, :birth_date, :sex) RETURNING pk")
_NEW_STUDY = db.Prepared(
    "INSERT INTO studies (study_uid, patient_pk, study_date, study_time, study_time_key, accession_number, "
    "study_description, referring_physician, referring_physician_key, study_id, character_set, updated_at) "
    "VALUES (:study_uid, :patient_pk, :study_date, :study_time, :study_time_key, :accession_number, "
    ":study_description, :referring_physician, :referring_physician_key, :study_id, :character_set, :now) "
    "RETURNING pk")
_STUDY_UPDATED = db.Prepared("UPDATE studies SET updated_at = :now WHERE pk = :pk")
_NEW_SERIES = db.Prepared(
    "INSERT INTO series (series_uid, study_pk, modality, series_number, series_description, body_part) "
    "VALUES (:series_uid, :study_pk, :modality, :series_number, :series_description, :body_part) RETURNING pk")
_HELD = text("SELECT p.patient_id, st.study_uid, se.series_uid FROM instances i JOIN series se ON se.pk = i.series_pk "
             "JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk WHERE i.pk = :pk")
_FILL = {columns: text(f"UPDATE patients SET {', '.join(f'{c} = :{c}' for c in columns)} WHERE pk = :pk")
         for columns in (("patient_name", "patient_name_key"), ("birth_date",), ("sex",),
                         ("patient_name", "birth_date", "patient_name_key"),
                         ("patient_name", "sex", "patient_name_key"),
                         ("birth_date", "sex"), ("patient_name", "birth_date", "sex", "patient_name_key"))}
_CONFLICT_AGAIN = db.Prepared(
    "UPDATE conflicts SET received = received + 1, time = :now, calling_ae = :calling_ae "
    "WHERE sop_instance_uid = :uid AND attribute = :attribute AND index_value IS NOT DISTINCT FROM :index_value "
    "AND instance_value IS NOT DISTINCT FROM :instance_value AND action = :action")
_NEW_CONFLICT = db.Prepared(
    "INSERT INTO conflicts (time, sop_instance_uid, study_uid, series_uid, attribute, index_value, instance_value, "
    "action, calling_ae, reason) VALUES (:now, :uid, :study_uid, :series_uid, :attribute, :index_value, "
    ":instance_value, :action, :calling_ae, :reason)")
_ADD_CHANGE = db.Prepared(
    "INSERT INTO changes (kind, instance_pk, study_uid, series_uid, sop_instance_uid, blob_id, time) "
    "VALUES (:kind, :instance_pk, :study_uid, :series_uid, :sop_instance_uid, :blob_id, :time)")
_STORED_CHANGE = ("INSERT INTO changes (kind, instance_pk, study_uid, series_uid, sop_instance_uid, blob_id, time) "
                  "SELECT :kind, pk, :study_uid, :series_uid, sop_instance_uid, blob_id, received_at FROM instances"
                  "{in_order} WHERE sop_instance_uid = :sop_instance_uid")
_ADD_JOB_CHANGE = text("INSERT INTO changes (kind, study_uid, blob_id, job_id, time) "
                       "VALUES (:kind, :study_uid, :blob_id, :job_id, :time)")
# PostgreSQL: every transaction that adds changes takes this lock just before its first one and holds it
# to its end, so that `seq` order is commit order (archive/changes.py says why). The switch is for the
# test that shows what happens without it (tests/test_changelog_order.py).
CHANGES_IN_COMMIT_ORDER = True
_LOCK_CHANGES = f"pg_advisory_xact_lock({0x6D33_6469_6368_6773})"      # "m3dichgs"
_CHANGES_LOCK = db.Prepared(f"SELECT {_LOCK_CHANGES}")
# an ingest's one change, the lock taken by the same statement (one round trip less): the lock's row is joined
# in, so it is held before the row (and its `seq`) is made
_ADD_STORED_CHANGE = db.Prepared(_STORED_CHANGE.format(in_order=""))
_ADD_STORED_CHANGE_IN_ORDER = db.Prepared(_STORED_CHANGE.format(in_order=f" CROSS JOIN (SELECT {_LOCK_CHANGES}) o"))

MIGRATIONS = Path(__file__).with_name("migrations")


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

    def stopping(self) -> None:
        """The process is stopping: a write waits at most a second more for another process's (SQLite)."""
        self.engines.stopping()

    def write(self) -> ContextManager[Connection]:
        """One write transaction (SQLite: IMMEDIATE, under the writer lock); committed (and durable)
        when the block ends, rolled back when it raises."""
        return self.engines.write()

    def write_together(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` committed with what other threads write at the same moment (`Engines.write_together`:
        group commit on SQLite)."""
        return self.engines.write_together(work)

    @contextmanager
    def reader(self) -> Iterator[Connection]:
        """A read-only connection of its own (SQLite: never waits for the writer, WAL)."""
        with self.engines.readers.connect() as conn:
            yield conn

    def now(self) -> float:
        """The index's clock (seconds since the epoch): PostgreSQL's, the same for every node that shares it;
        this machine's for SQLite (one node)."""
        if self.sqlite:
            return time.time()
        return self.read(_NOW)[0][0]

    def read(self, statement: sa.Executable, params: dict | None = None) -> list[Row]:
        """The rows of one statement (`text()` or Core) on a read-only connection."""
        with self.reader() as conn:
            return conn.execute(statement, params or {}).fetchall()

    def blobs_referenced(self, blob_ids: Iterable[str], batch: int = 1000) -> Iterator[str]:
        """Those of `blob_ids` a committed row needs (instances, quarantine, blobs held by another owner), a
        batch at a time: what a node holds is looked up, never the whole index (10M rows on a shared one)."""
        ids = iter(blob_ids)
        while chunk := list(itertools.islice(ids, batch)):
            with self.reader() as conn:
                yield from (row[0] for row in conn.execute(_BLOBS_REFERENCED, {"blobs": chunk}))

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
    def filed(conn: Connection, header) -> Filed:
        """What the index holds of the instance's UID, series, study and patient: one statement, for
        the ingest transaction."""
        row, = FILED.rows(conn, {"uid": header.sop_instance_uid, "series_uid": header.series_uid,
                                 "study_uid": header.study_uid, "patient_id": header.attrs["PatientID"] or ""})
        return Filed(*row)

    @staticmethod
    def upsert_hierarchy(conn: Connection, header, now: float, differences: list[Difference] | None = None,
                         filed: Filed | None = None) -> int:
        """File the instance under its patient, study and series (made when new); return the series pk.

        A series belongs to one study and a study to one patient: an instance that says
        otherwise raises `HierarchyConflict` before anything is written. Patient
        demographics are never written over: the first value received stays (what C-FIND
        answers; an empty one is filled in), and where the instance says otherwise a
        `Difference` is appended to `differences` for the caller to record. An instance
        without a Patient ID belongs to its study's patient, or to a new patient row of its
        own for a new study (never to one shared empty-ID patient). `filed`: `Index.filed`'s
        row, when the caller has it (taken in this transaction, nothing written since).
        A study's `updated_at` is kept to the second (not rewritten within the same second).
        """
        a = header.attrs
        patient_id = a["PatientID"] or ""
        if filed is None:
            filed = Index.filed(conn, header)
        if filed.series_pk is not None and filed.series_study_uid != header.study_uid:
            raise HierarchyConflict("series belongs to another study", header.series_uid,
                                    [Difference("StudyInstanceUID", filed.series_study_uid, header.study_uid)])
        if filed.study_pk is not None and filed.patient_id != patient_id:
            raise HierarchyConflict("study belongs to another patient", header.study_uid,
                                    [Difference("PatientID", filed.patient_id, patient_id)])
        patient_pk = filed.patient_pk
        if patient_pk is None:
            (patient_pk,), = _NEW_PATIENT.rows(conn, {
                "patient_id": patient_id, "patient_name": a["PatientName"],
                "patient_name_key": name_key(a["PatientName"]), "birth_date": a["PatientBirthDate"],
                "sex": a["PatientSex"]})
        else:
            Index._keep_demographics(conn, patient_pk, (filed.patient_name, filed.birth_date, filed.sex), a,
                                     differences)
        if filed.study_pk is None:
            (study_pk,), = _NEW_STUDY.rows(conn, {
                "study_uid": header.study_uid, "patient_pk": patient_pk, "study_date": a["StudyDate"],
                "study_time": a["StudyTime"], "study_time_key": time_key(a["StudyTime"]),
                "accession_number": a["AccessionNumber"], "study_description": a["StudyDescription"],
                "referring_physician": a["ReferringPhysicianName"],
                "referring_physician_key": name_key(a["ReferringPhysicianName"]), "study_id": a["StudyID"],
                "character_set": a["SpecificCharacterSet"], "now": now})
        else:
            study_pk = filed.study_pk
            if int(filed.updated_at) != int(now):
                _STUDY_UPDATED.run(conn, {"now": now, "pk": study_pk})
        if filed.series_pk is not None:
            return filed.series_pk
        (series_pk,), = _NEW_SERIES.rows(conn, {
            "series_uid": header.series_uid, "study_pk": study_pk, "modality": a["Modality"],
            "series_number": a["SeriesNumber"], "series_description": a["SeriesDescription"],
            "body_part": a["BodyPartExamined"]})
        return series_pk

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
    def _keep_demographics(conn: Connection, patient_pk: int, held_values: tuple, attrs: dict,
                           differences: list[Difference] | None) -> None:
        """Fill what the patient row lacks; note (never write over) what the instance says otherwise.
        `held_values`: the row's values of `DEMOGRAPHICS`' columns.

        An instance that contradicts what is held (another name for the same Patient ID) may
        be another person's: then none of its values fill a blank either, and each of them
        is noted as a difference."""
        fill, found = {}, []
        for (keyword, column), held in zip(DEMOGRAPHICS, held_values):
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
            if _CONFLICT_AGAIN.run(conn, params) == 0:
                _NEW_CONFLICT.run(conn, {**params, "study_uid": header.study_uid, "series_uid": header.series_uid,
                                             "reason": d.reason})

    @staticmethod
    def order_changes(conn: Connection) -> None:
        """Before a change is added: on PostgreSQL, wait for every other transaction that added changes
        to end (the lock is the transaction's until it ends; taking it again costs a round trip)."""
        if CHANGES_IN_COMMIT_ORDER and conn.dialect.name == "postgresql":
            _CHANGES_LOCK.rows(conn)

    @staticmethod
    def add_change(conn: Connection, kind: str, instance_pk: int | None, header,
                   blob_id: str | None, now: float | None = None) -> None:
        Index.order_changes(conn)
        _ADD_CHANGE.run(conn, {
            "kind": kind, "instance_pk": instance_pk, "study_uid": header.study_uid, "series_uid": header.series_uid,
            "sop_instance_uid": header.sop_instance_uid, "blob_id": blob_id,
            "time": now if now is not None else time.time()})

    @staticmethod
    def add_stored_change(conn: Connection, kind: str, header) -> None:
        """The change of the instance just written under the header's UID: its row, blob and time as
        the index holds them (no RETURNING needed for its pk)."""
        in_order = CHANGES_IN_COMMIT_ORDER and conn.dialect.name == "postgresql"     # as `order_changes` does
        statement = _ADD_STORED_CHANGE_IN_ORDER if in_order else _ADD_STORED_CHANGE
        statement.run(conn, {"kind": kind, "study_uid": header.study_uid, "series_uid": header.series_uid,
                             "sop_instance_uid": header.sop_instance_uid})

    @staticmethod
    def add_job_change(conn: Connection, kind: str, job_id: str, study_uid: str,
                       blob_id: str | None = None, now: float | None = None) -> None:
        """A job event (job_queued, job_running, job_progress, job_succeeded, ...; file_stored)."""
        Index.order_changes(conn)
        conn.execute(_ADD_JOB_CHANGE, {"kind": kind, "study_uid": study_uid, "blob_id": blob_id, "job_id": job_id,
                                       "time": now if now is not None else time.time()})
