"""What the router reads of the archive: a study's series as rules and plug-ins see them, the
instances a job takes, where result instances are filed, which series changed.

Typed answers (dataclasses, sets, dicts), never rows of the archive's tables. Results of
analysis jobs (instances with a `job_id`) are never a job's input.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, text

from .index import Index

_CHUNK = 500                       # UIDs per IN (...) list


@dataclass(frozen=True)
class StudySeries:
    """A series of a study as rules and plug-ins judge it (its received instances, not results)."""
    series_uid: str
    modality: str | None
    body_part: str | None
    series_description: str | None
    study_description: str | None
    sop_classes: frozenset[str]
    calling_aes: frozenset[str]


@dataclass(frozen=True)
class InputInstance:
    sop_instance_uid: str
    sop_class_uid: str
    blob_id: str
    sha256: str


@dataclass(frozen=True)
class InputSeries:
    series_uid: str
    modality: str | None
    instances: tuple[InputInstance, ...]


@dataclass(frozen=True)
class Filed:
    """Where an instance is filed, and its blob."""
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    blob_id: str
    sha256: str


def study_series(index: Index, study_uid: str) -> list[StudySeries]:
    """The series of the study that have received instances, in the order they were first filed."""
    with index.reader() as conn:
        rows = conn.execute(_STUDY_SERIES, {"study_uid": study_uid}).fetchall()
    series: dict[int, tuple] = {}             # the SOP classes and calling AEs gathered here, not by SQL
    for r in rows:
        facts, classes, aes = series.setdefault(r.pk, (r, set(), set()))
        classes.add(r.sop_class_uid)
        if r.calling_ae:
            aes.add(r.calling_ae)
    return [StudySeries(r.series_uid, r.modality, r.body_part, r.series_description, r.study_description,
                        frozenset(classes), frozenset(aes)) for r, classes, aes in series.values()]


def input_series(index: Index, series_uid: str) -> InputSeries | None:
    """The series' received instances in instance-number order (then as filed); None when it has none."""
    with index.reader() as conn:
        rows = conn.execute(_INPUT_SERIES, {"series_uid": series_uid}).fetchall()
    if not rows:
        return None
    return InputSeries(series_uid, rows[0].modality, tuple(
        InputInstance(r.sop_instance_uid, r.sop_class_uid, r.blob_id, r.sha256) for r in rows))


@dataclass(frozen=True)
class StudyInstance:
    """An instance of a study, received or an analysis result (`result`: the node made it)."""
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    blob_id: str
    sha256: str
    result: bool


def study_instances(index: Index, study_uid: str) -> list[StudyInstance]:
    """Every instance of the study, results included, series by series (what a de-identified copy sends)."""
    with index.reader() as conn:
        return [StudyInstance(r[0], r[1], r[2], r[3], r[4], r[5] is not None)
                for r in conn.execute(_STUDY_INSTANCES, {"study_uid": study_uid})]


def uid_kind(index: Index, uid: str) -> str | None:
    """Whether the archive holds `uid` as a study, a series or an instance ("study", "series", "sop_instance")."""
    found = index.read(_UID_KIND, {"uid": uid})
    return found[0][0] if found else None


def filed(index: Index, sop_instance_uids: Iterable[str]) -> dict[str, Filed]:
    """SOP Instance UID -> where it is filed, for those of `sop_instance_uids` the archive holds."""
    uids, found = list(dict.fromkeys(sop_instance_uids)), {}
    with index.reader() as conn:
        for start in range(0, len(uids), _CHUNK):
            for r in conn.execute(_FILED, {"uids": uids[start:start + _CHUNK]}):
                found[r[0]] = Filed(*r)
    return found


def series_changed(index: Index, study_uid: str, after: int, upto: int, kinds: Collection[str]) -> set[str]:
    """The series of the study with changes of `kinds` in the change log after `after` up to `upto`."""
    with index.reader() as conn:
        return {r[0] for r in conn.execute(_SERIES_CHANGED, {"study_uid": study_uid, "after": after, "upto": upto,
                                                             "kinds": list(kinds)})}


_STUDY_INSTANCES = text(
    "SELECT i.sop_instance_uid, i.sop_class_uid, se.series_uid, i.blob_id, i.sha256, i.job_id FROM studies s "
    "JOIN series se ON se.study_pk = s.pk JOIN instances i ON i.series_pk = se.pk WHERE s.study_uid = :study_uid "
    "ORDER BY se.pk, i.instance_number, i.pk")
_UID_KIND = text(
    "SELECT 'study' FROM studies WHERE study_uid = :uid UNION ALL SELECT 'series' FROM series WHERE series_uid = :uid "
    "UNION ALL SELECT 'sop_instance' FROM instances WHERE sop_instance_uid = :uid LIMIT 1")
_STUDY_SERIES = text(
    "SELECT DISTINCT se.pk, se.series_uid, se.modality, se.body_part, se.series_description, s.study_description, "
    "i.sop_class_uid, i.calling_ae FROM studies s JOIN series se ON se.study_pk = s.pk "
    "JOIN instances i ON i.series_pk = se.pk WHERE s.study_uid = :study_uid AND i.job_id IS NULL ORDER BY se.pk")
_INPUT_SERIES = text(
    "SELECT se.modality, i.sop_instance_uid, i.sop_class_uid, i.blob_id, i.sha256 FROM series se "
    "JOIN instances i ON i.series_pk = se.pk WHERE se.series_uid = :series_uid AND i.job_id IS NULL "
    "ORDER BY i.instance_number, i.pk")
_FILED = text(
    "SELECT i.sop_instance_uid, i.sop_class_uid, se.series_uid, s.study_uid, i.blob_id, i.sha256 "
    "FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies s ON s.pk = se.study_pk "
    "WHERE i.sop_instance_uid IN :uids").bindparams(bindparam("uids", expanding=True))
_SERIES_CHANGED = text(
    "SELECT DISTINCT series_uid FROM changes WHERE study_uid = :study_uid AND seq > :after AND seq <= :upto "
    "AND kind IN :kinds").bindparams(bindparam("kinds", expanding=True))
