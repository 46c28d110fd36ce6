"""The durable job queue: jobs live in the index and change only through `router.jobs.handle`.

Every write is one transaction: read the job, apply the event with the pure state machine,
store it, and append a `job_<state>` row to the `changes` log (the viewer's notifications
follow it). The router process, the viewer (create, cancel) and the command line all use
these functions, so a job's life has a single set of rules wherever it is touched.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from archive import holds
from archive.db import raw
from archive.index import Index
from archive.inputs import filed

from .jobs import Job, handle
from .store import HOLDER

STATE_CHANGE = "job_{}"


class JobNotFound(KeyError):
    """No job with this id."""


@dataclass(frozen=True)
class JobRecord:
    """A job as the index holds it."""
    id: str
    study_uid: str
    plugin: str
    params: dict
    inputs: list[str]                # series UIDs
    rule: str | None
    created_by: str | None
    forward_to: list[str]
    state: str
    attempts: int
    max_attempts: int
    worker: str | None
    lease_expires: float | None
    errors: list[str]
    progress: float | None
    progress_message: str | None
    summary: dict | None
    supersedes: str | None
    timings: dict | None
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> "JobRecord":
        values = dict(row)
        for key in ("params", "inputs", "forward_to", "errors"):
            values[key] = json.loads(values[key])
        for key in ("summary", "timings"):
            values[key] = json.loads(values[key]) if values[key] else None
        return cls(**values)

    @property
    def machine(self) -> Job:
        return Job(self.id, self.state, self.attempts, self.max_attempts, self.worker, self.lease_expires,
                   tuple(self.errors), self.started_at, self.finished_at)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def create(index: Index, *, study_uid: str, plugin: str, params: dict, inputs: list[str], rule: str | None = None,
           created_by: str | None = None, forward_to: list[str] | tuple = (), max_attempts: int = 3,
           supersedes: str | None = None, now: float | None = None, conn: sqlite3.Connection | None = None) -> str:
    """A new queued job; its id. Inside `conn`'s transaction when given."""
    job_id = secrets.token_hex(8)
    now = time.time() if now is None else now

    def insert(c: sqlite3.Connection) -> None:
        raw(c).execute("INSERT INTO jobs (id, study_uid, plugin, params, inputs, rule, created_by, forward_to, state, attempts, "
                  "max_attempts, errors, supersedes, created_at) VALUES (?,?,?,?,?,?,?,?,'queued',0,?,'[]',?,?)",
                  (job_id, study_uid, plugin, json.dumps(params, sort_keys=True), json.dumps(list(inputs)), rule,
                   created_by, json.dumps(list(forward_to)), max_attempts, supersedes, now))
        Index.add_job_change(c, STATE_CHANGE.format("queued"), job_id, study_uid, now=now)

    if conn is not None:
        insert(conn)
    else:
        with index.write() as c:
            insert(c)
    return job_id


def get(index: Index, job_id: str, conn: sqlite3.Connection | None = None) -> JobRecord:
    rows = (raw(conn).execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchall() if conn is not None
            else index.query("SELECT * FROM jobs WHERE id=?", (job_id,)))
    if not rows:
        raise JobNotFound(job_id)
    return JobRecord.of(rows[0])


def apply(index: Index, job_id: str, event, conn: sqlite3.Connection | None = None, **also) -> JobRecord:
    """Apply a state machine event to a stored job (IllegalTransition leaves it untouched).

    `also`: columns written in the same transaction (summary, progress, ...). Inside `conn`'s
    transaction when given, else in one of its own.
    """
    if conn is None:
        with index.write() as c:
            return apply(index, job_id, event, c, **also)
    record = get(index, job_id, conn)
    after = handle(record.machine, event)
    columns = {"state": after.state, "attempts": after.attempts, "worker": after.worker,
               "lease_expires": after.lease_expires, "errors": json.dumps(list(after.errors)),
               "started_at": after.started_at, "finished_at": after.finished_at}
    columns.update({k: json.dumps(v) if k in ("summary", "timings") else v for k, v in also.items()})
    raw(conn).execute(f"UPDATE jobs SET {', '.join(f'{k}=?' for k in columns)} WHERE id=?", (*columns.values(), job_id))
    if after.state != record.state or after.attempts != record.attempts:
        Index.add_job_change(conn, STATE_CHANGE.format(after.state), job_id, record.study_uid)
    return get(index, job_id, conn)


def set_progress(index: Index, job_id: str, fraction: float, message: str) -> None:
    with index.write() as conn:
        row = raw(conn).execute("SELECT study_uid, state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["state"] != "running":
            return
        raw(conn).execute("UPDATE jobs SET progress=?, progress_message=? WHERE id=?",
                     (max(0.0, min(1.0, fraction)), message[:200], job_id))
        Index.add_job_change(conn, "job_progress", job_id, row["study_uid"])


def jobs(index: Index, *, study_uid: str | None = None, states: tuple[str, ...] = (), limit: int = 100) -> list[JobRecord]:
    where, params = [], []
    if study_uid:
        where.append("study_uid=?")
        params.append(study_uid)
    if states:
        where.append(f"state IN ({','.join('?' * len(states))})")
        params += list(states)
    sql = f"SELECT * FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY created_at DESC LIMIT ?"
    return [JobRecord.of(r) for r in index.query(sql, (*params, limit))]


def succeeded_files(index: Index, study_uid: str, name: str) -> list[tuple[str, str]]:
    """(job id, blob id) of the file called `name` (findings.json, say) that each succeeded job of the
    study wrote, the newest job first."""
    rows = index.query(
        "SELECT j.id, r.blob_id FROM jobs j JOIN job_results r ON r.job_id = j.id WHERE j.study_uid=? "
        "AND j.state='succeeded' AND r.kind='file' AND r.name=? ORDER BY j.finished_at DESC, j.created_at DESC",
        (study_uid, name))
    return [(r["id"], r["blob_id"]) for r in rows]


def results(index: Index, job_id: str) -> list[dict]:
    """What the job produced: DICOM instances (with their series) and files (blobs)."""
    rows = [dict(r) for r in index.query("SELECT kind, name, media_type, sop_instance_uid, blob_id, size, sha256 "
                                         "FROM job_results WHERE job_id=? ORDER BY name", (job_id,))]
    where = filed(index, [r["sop_instance_uid"] for r in rows if r["sop_instance_uid"]])
    for r in rows:
        found = where.get(r["sop_instance_uid"])
        r.update(sop_class_uid=found.sop_class_uid if found else None, series_uid=found.series_uid if found else None,
                 study_uid=found.study_uid if found else None)
    return rows


def dicom_results(index: Index, job_id: str) -> list[str]:
    """The SOP Instance UIDs of the job's DICOM results, by name."""
    return [r[0] for r in index.query("SELECT sop_instance_uid FROM job_results WHERE job_id=? AND kind='dicom' "
                                      "ORDER BY name", (job_id,))]


@dataclass(frozen=True)
class Result:
    """One output of a job, as stored: a DICOM instance in the archive, or a file (an archive blob)."""
    kind: str                        # dicom | file
    name: str
    media_type: str
    sop_instance_uid: str | None
    blob_id: str | None
    size: int
    sha256: str


def record_results(conn: sqlite3.Connection, job_id: str, study_uid: str, found: list[Result]) -> None:
    """Record the job's outputs (again, when its results are taken a second time after a crash),
    inside `conn`'s transaction: files are held in the archive (a file they replace is let go),
    and each one stored is a `file_stored` change."""
    names = [r.name for r in found]
    before = {row[0] for row in raw(conn).execute(
        f"SELECT blob_id FROM job_results WHERE job_id=? AND blob_id IS NOT NULL AND name IN "
        f"({','.join('?' * len(names))})", (job_id, *names))} if names else set()
    raw(conn).executemany("INSERT OR REPLACE INTO job_results (job_id, kind, name, media_type, sop_instance_uid, "
                     "blob_id, size, sha256) VALUES (?,?,?,?,?,?,?,?)",
                     [(job_id, r.kind, r.name, r.media_type, r.sop_instance_uid, r.blob_id, r.size, r.sha256)
                      for r in found])
    files = [r.blob_id for r in found if r.kind == "file" and r.blob_id]
    holds.release(conn, before - set(files), HOLDER)
    holds.hold(conn, files, HOLDER)
    for blob_id in files:
        Index.add_job_change(conn, "file_stored", job_id, study_uid, blob_id=blob_id)


def queued(index: Index, limit: int = 100) -> list[str]:
    """Ids of queued jobs, the oldest first."""
    return [r[0] for r in index.query("SELECT id FROM jobs WHERE state='queued' ORDER BY created_at LIMIT ?",
                                      (limit,))]


def expired(index: Index, now: float) -> list[str]:
    """Ids of running jobs whose lease ended before `now`."""
    return [r[0] for r in index.query("SELECT id FROM jobs WHERE state='running' AND lease_expires < ?", (now,))]


def states(index: Index, job_ids: Iterable[str]) -> dict[str, str]:
    """Job id -> state, for those of `job_ids` that exist."""
    ids = list(job_ids)
    if not ids:
        return {}
    return {r[0]: r[1] for r in index.query(f"SELECT id, state FROM jobs WHERE id IN ({','.join('?' * len(ids))})",
                                            tuple(ids))}


def latest_of_rule(conn: sqlite3.Connection, rule: str, study_uid: str, inputs: list[str] | None) -> JobRecord | None:
    """The newest job that `rule` made for the study (on exactly `inputs`, when given)."""
    for row in raw(conn).execute("SELECT * FROM jobs WHERE rule=? AND study_uid=? ORDER BY created_at DESC",
                            (rule, study_uid)):
        record = JobRecord.of(row)
        if inputs is None or record.inputs == inputs:
            return record
    return None


@dataclass(frozen=True)
class ForwardState:
    destination: str
    state: str          # pending | sent | failed
    count: int
    attempts: int       # most attempts of one of them
    last_error: str | None


def forwards(index: Index, job_id: str | None = None) -> list[ForwardState]:
    """Where results are being sent (rules' `forward_to`), by destination and state: what
    `m3dicom status` and `jobs list` show, so that results that never reach the PACS are seen."""
    where, params = ("WHERE job_id=?", (job_id,)) if job_id else ("", ())
    groups: dict[tuple[str, str], list] = {}
    for destination, state, attempts, error in index.query(
            f"SELECT destination, state, attempts, last_error FROM forwards {where} ORDER BY next_try", params):
        group = groups.setdefault((destination, state), [0, 0, None])
        group[0] += 1
        group[1] = max(group[1], attempts)
        group[2] = error or group[2]
    return [ForwardState(d, s, *g) for (d, s), g in sorted(groups.items())]


# -- for the viewer (study list badges, notifications) ---------------------------------------------

IDS_PER_QUERY = 500      # ids or UIDs in one IN (...) list


def jobs_of_studies(index: Index, study_uids: list[str]) -> dict[str, list[JobRecord]]:
    """Each study's jobs, the newest first; a study without jobs is left out. Read on a connection of
    its own: the study list never waits for the writer."""
    found: dict[str, list[JobRecord]] = {}
    with index.reader() as conn:
        for start in range(0, len(study_uids), IDS_PER_QUERY):
            part = study_uids[start:start + IDS_PER_QUERY]
            for row in raw(conn).execute(f"SELECT * FROM jobs WHERE study_uid IN ({','.join('?' * len(part))}) "
                                    "ORDER BY created_at DESC", part):
                found.setdefault(row["study_uid"], []).append(JobRecord.of(row))
    return found


def jobs_by_id(index: Index, job_ids: list[str]) -> dict[str, JobRecord]:
    """The jobs of these ids that exist, by id."""
    found: dict[str, JobRecord] = {}
    ids = list(dict.fromkeys(job_ids))
    for start in range(0, len(ids), IDS_PER_QUERY):
        part = ids[start:start + IDS_PER_QUERY]
        found.update((row["id"], JobRecord.of(row)) for row in index.query(
            f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(part))})", tuple(part)))
    return found
