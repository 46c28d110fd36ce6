"""What the router reads of the archive: a study's series as rules and plug-ins see them, the
instances a job takes, where result instances are filed, which series changed.

Typed answers (dataclasses, sets, dicts), never rows of the archive's tables. Results of
analysis jobs (instances with a `job_id`) are never a job's input.
"""
from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass

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
    rows = index.query(
        "SELECT se.series_uid, se.modality, se.body_part, se.series_description, s.study_description, "
        "json_group_array(DISTINCT i.sop_class_uid) AS classes, json_group_array(DISTINCT i.calling_ae) AS aes "
        "FROM studies s JOIN series se ON se.study_pk = s.pk JOIN instances i ON i.series_pk = se.pk "
        "WHERE s.study_uid = ? AND i.job_id IS NULL GROUP BY se.pk ORDER BY se.pk", (study_uid,))
    return [StudySeries(r["series_uid"], r["modality"], r["body_part"], r["series_description"],
                        r["study_description"], frozenset(json.loads(r["classes"])),
                        frozenset(a for a in json.loads(r["aes"]) if a)) for r in rows]


def input_series(index: Index, series_uid: str) -> InputSeries | None:
    """The series' received instances in instance-number order (then as filed); None when it has none."""
    rows = index.query(
        "SELECT se.modality, i.sop_instance_uid, i.sop_class_uid, i.blob_id, i.sha256 FROM series se "
        "JOIN instances i ON i.series_pk = se.pk WHERE se.series_uid=? AND i.job_id IS NULL "
        "ORDER BY i.instance_number, i.pk", (series_uid,))
    if not rows:
        return None
    return InputSeries(series_uid, rows[0]["modality"], tuple(
        InputInstance(r["sop_instance_uid"], r["sop_class_uid"], r["blob_id"], r["sha256"]) for r in rows))


def filed(index: Index, sop_instance_uids: Iterable[str]) -> dict[str, Filed]:
    """SOP Instance UID -> where it is filed, for those of `sop_instance_uids` the archive holds."""
    uids, found = list(dict.fromkeys(sop_instance_uids)), {}
    for start in range(0, len(uids), _CHUNK):
        chunk = uids[start:start + _CHUNK]
        for r in index.query(
                "SELECT i.sop_instance_uid, i.sop_class_uid, se.series_uid, s.study_uid, i.blob_id, i.sha256 "
                "FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies s ON s.pk = se.study_pk "
                f"WHERE i.sop_instance_uid IN ({','.join('?' * len(chunk))})", tuple(chunk)):
            found[r[0]] = Filed(*r)
    return found


def series_changed(index: Index, study_uid: str, after: int, upto: int, kinds: Collection[str]) -> set[str]:
    """The series of the study with changes of `kinds` in the change log after `after` up to `upto`."""
    return {r[0] for r in index.query(
        f"SELECT DISTINCT series_uid FROM changes WHERE study_uid=? AND seq > ? AND seq <= ? "
        f"AND kind IN ({','.join('?' * len(kinds))})", (study_uid, after, upto, *kinds))}
