"""Study facts for the viewer: what its pages show of the patients, studies, series and
instances tables, read here so that the viewer holds no SQL on them (DESIGN.md, "Who owns what").

Each function answers one question and returns plain values (dataclasses, or the study list's
dicts by DICOM keyword), never rows of the index's connection.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from sqlalchemy import text

from .index import Index
from .query import STUDY_ROOT, Query, study_list

STUDIES_PER_QUERY = 500   # studies looked up by UID this many at a time (a query takes 1000 values)


@dataclass(frozen=True)
class InstanceFacts:
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    job_id: str | None           # set on an analysis result: the job that made it


@dataclass(frozen=True)
class SeriesFacts:
    series_uid: str
    modality: str | None
    number: int | None
    description: str | None
    instances: tuple[InstanceFacts, ...]   # by instance number, then as received


@dataclass(frozen=True)
class StudyFacts:
    study_uid: str
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    patient_name: str | None
    patient_id: str
    birth_date: str | None
    sex: str | None
    series: tuple[SeriesFacts, ...]        # by series number, then as received


@dataclass(frozen=True)
class StoredInstance:
    """Where an instance's file is, and what it must hash to."""
    blob_id: str
    sha256: str
    sop_class_uid: str


def study(index: Index, study_uid: str) -> StudyFacts | None:
    """The study, its patient, and its series and instances (None: no such study)."""
    with index.reader() as conn:
        row = conn.execute(_STUDY, {"study_uid": study_uid}).first()
        if row is None:
            return None
        found = dict(row._mapping)
        series = []
        for se in conn.execute(_SERIES, {"study_pk": found.pop("pk")}).fetchall():
            instances = tuple(InstanceFacts(*row) for row in conn.execute(_INSTANCES, {"series_pk": se.pk}))
            series.append(SeriesFacts(se.series_uid, se.modality, se.series_number, se.series_description,
                                      instances))
    return StudyFacts(**found, series=tuple(series))


_STUDY = text("SELECT s.pk, s.study_uid, s.study_date, s.study_description, s.accession_number, p.patient_name, "
              "p.patient_id, p.birth_date, p.sex FROM studies s JOIN patients p ON s.patient_pk = p.pk "
              "WHERE s.study_uid = :study_uid")
_SERIES = text("SELECT pk, series_uid, modality, series_number, series_description FROM series "
               "WHERE study_pk = :study_pk ORDER BY series_number, pk")
_INSTANCES = text("SELECT sop_instance_uid, sop_class_uid, instance_number, job_id FROM instances "
                  "WHERE series_pk = :series_pk ORDER BY instance_number, pk")
_STUDY_OF_INSTANCE = text("SELECT s.study_uid FROM instances i JOIN series se ON i.series_pk = se.pk "
                          "JOIN studies s ON se.study_pk = s.pk WHERE i.sop_instance_uid = :uid")
_STORED_INSTANCE = text("SELECT blob_id, sha256, sop_class_uid FROM instances WHERE sop_instance_uid = :uid")


def study_of_instance(index: Index, sop_instance_uid: str) -> str | None:
    """The Study Instance UID of a stored instance (None: no such instance)."""
    with index.reader() as conn:
        return conn.execute(_STUDY_OF_INSTANCE, {"uid": sop_instance_uid}).scalar()


_PATIENT_OF_STUDY = text("SELECT p.patient_id, p.patient_name, s.accession_number FROM studies s "
                         "JOIN patients p ON s.patient_pk = p.pk WHERE s.study_uid = :uid")


def patient_of_study(index: Index, study_uid: str) -> tuple[str, str, str] | None:
    """(Patient ID, patient's name, accession number) of a study (None: no such study)."""
    with index.reader() as conn:
        row = conn.execute(_PATIENT_OF_STUDY, {"uid": study_uid}).first()
    return (row[0] or "", row[1] or "", row[2] or "") if row else None


def stored_instance(index: Index, sop_instance_uid: str) -> StoredInstance | None:
    """The blob of a stored instance (None: no such instance)."""
    with index.reader() as conn:
        row = conn.execute(_STORED_INSTANCE, {"uid": sop_instance_uid}).first()
    return StoredInstance(*row) if row else None


def study_page(index: Index, query: Query, *, order: str = "date", descending: bool = True, limit: int = 50,
               offset: int = 0) -> list[dict]:
    """One page of the study list (`archive.query.study_list`), read on a connection of its own so
    that a long search never waits for the writer."""
    with index.reader() as conn:
        return study_list(conn, query, order=order, descending=descending, limit=limit, offset=offset)


def listed_studies(index: Index, study_uids: Sequence[str]) -> dict[str, dict]:
    """The study list's facts (patient, date, time, description, modalities, image count) of these
    studies, by UID; a UID that is not stored is left out."""
    found: dict[str, dict] = {}
    uids = list(dict.fromkeys(study_uids))
    with index.reader() as conn:
        for start in range(0, len(uids), STUDIES_PER_QUERY):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = uids[start:start + STUDIES_PER_QUERY]
            for keyword in ("PatientName", "PatientID", "StudyDate", "StudyTime", "StudyDescription",
                            "ModalitiesInStudy"):
                setattr(identifier, keyword, "")
            found.update((row["StudyInstanceUID"], row) for row in study_list(conn, Query(STUDY_ROOT, identifier),
                                                                              limit=STUDIES_PER_QUERY))
    return found
