"""What the archive holds, for `m3dicom status`: counts, and the conflicts recorded at reception.

(`Index.integrity` counts the conflicts by what was done; `offload.status` reports the S3 outbox.)
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from .index import Index


@dataclass(frozen=True)
class Counts:
    instances: int
    studies: int


def counts(index: Index) -> Counts:
    """Instances and studies in the index (quarantined instances are not counted)."""
    with index.reader() as conn:
        instances = conn.execute(text("SELECT COUNT(*) FROM instances")).scalar_one()
        studies = conn.execute(text("SELECT COUNT(*) FROM studies")).scalar_one()
    return Counts(instances, studies)


@dataclass(frozen=True)
class Conflict:
    """One difference between an instance and the index, recorded at its reception (`conflicts`)."""
    time: float                      # last received
    sop_instance_uid: str
    study_uid: str | None
    series_uid: str | None
    attribute: str
    index_value: str | None          # what the index holds (and C-FIND answers)
    instance_value: str | None       # what the instance said
    action: str                      # stored | refused | quarantined | discarded
    calling_ae: str | None
    received: int                    # times this instance came with this difference
    reason: str | None               # in words, where the attribute alone does not say it


_CONFLICT_COLUMNS = ("time", "sop_instance_uid", "study_uid", "series_uid", "attribute", "index_value",
                     "instance_value", "action", "calling_ae", "received", "reason")


def conflicts(index: Index, limit: int = 1000) -> list[Conflict]:
    """The latest recorded conflicts, newest first (they hold patient values: for the operator, not logs)."""
    with index.reader() as conn:
        return [Conflict(*row) for row in conn.execute(text(
            f"SELECT {', '.join(_CONFLICT_COLUMNS)} FROM conflicts ORDER BY time DESC, seq DESC LIMIT :limit"),
            {"limit": limit})]
