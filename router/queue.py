"""The durable job queue: jobs live in the index and change only through `router.jobs.handle`.

Every write is one transaction: read the job, apply the event with the pure state machine,
store it, and append a `job_<state>` row to the `changes` log (the viewer's notifications
follow it). The router process, the viewer (create, cancel) and the command line all use
these functions, so a job's life has a single set of rules wherever it is touched.

Several routers may share one index (PostgreSQL): a job's row is written only where it still holds
what the state machine was given (`state`, `attempts`, `lease_expires`), else read again and the
event applied anew. Of two routers leasing one queued job one wins; the other finds it running and
leaves it (`lease`). A lease names its holder, and only the holder renews, finishes or fails the job
(router/jobs.py). Statements are `text()` with `:named` parameters, one copy for both engines.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import String, bindparam, text
from sqlalchemy.engine import Connection, Row

from archive import holds
from archive.index import Index
from archive.inputs import filed

from .jobs import IllegalTransition, Job, Lease, handle
from .store import HOLDER

STATE_CHANGE = "job_{}"
# _ORDER: a transaction that writes the router's rows and adds changes takes the change log's lock
# (`Index.order_changes`) before its first row lock. Otherwise, on PostgreSQL, one transaction holding
# the log's lock and waiting for a job's row would deadlock with one holding that row and waiting for
# the log (a rule superseding a queued job that another router is leasing).
RETRIES = 20                        # reads of a job that another writer changed meanwhile, before giving up


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
    def of(cls, row: Row) -> "JobRecord":
        values = dict(row._mapping)
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


_JOB = ", ".join(f.name for f in fields(JobRecord))
_IDS = bindparam("ids", expanding=True)
_CREATE = text(
    "INSERT INTO jobs (id, study_uid, plugin, params, inputs, rule, created_by, forward_to, state, attempts, "
    "max_attempts, errors, supersedes, created_at) VALUES (:id, :study_uid, :plugin, :params, :inputs, :rule, "
    ":created_by, :forward_to, 'queued', 0, :max_attempts, '[]', :supersedes, :now)")
_GET = text(f"SELECT {_JOB} FROM jobs WHERE id = :id")
_MACHINE = ("state", "attempts", "worker", "lease_expires", "errors", "started_at", "finished_at")
_ALSO = ("summary", "timings", "progress", "progress_message")       # columns an event may write besides
_PROGRESS_OF = text("SELECT study_uid, state FROM jobs WHERE id = :id")
_SET_PROGRESS = text("UPDATE jobs SET progress = :progress, progress_message = :message "
                     "WHERE id = :id AND state = 'running'")
_SUCCEEDED_FILES = text(
    "SELECT j.id, r.blob_id FROM jobs j JOIN job_results r ON r.job_id = j.id WHERE j.study_uid = :study_uid "
    "AND j.state = 'succeeded' AND r.kind = 'file' AND r.name = :name ORDER BY j.finished_at DESC, j.created_at DESC")
_RESULTS = text("SELECT kind, name, media_type, sop_instance_uid, blob_id, size, sha256 FROM job_results "
                "WHERE job_id = :job_id ORDER BY name")
_DICOM_RESULTS = text("SELECT sop_instance_uid FROM job_results WHERE job_id = :job_id AND kind = 'dicom' "
                      "ORDER BY name")
_RESULT_BLOBS = text("SELECT blob_id FROM job_results WHERE job_id = :job_id AND blob_id IS NOT NULL "
                     "AND name IN :names").bindparams(bindparam("names", expanding=True))
_RECORD_RESULT = text(
    "INSERT INTO job_results (job_id, kind, name, media_type, sop_instance_uid, blob_id, size, sha256) "
    "VALUES (:job_id, :kind, :name, :media_type, :sop_instance_uid, :blob_id, :size, :sha256) "
    "ON CONFLICT (job_id, name) DO UPDATE SET kind = excluded.kind, media_type = excluded.media_type, "
    "sop_instance_uid = excluded.sop_instance_uid, blob_id = excluded.blob_id, size = excluded.size, "
    "sha256 = excluded.sha256")
_QUEUED = text("SELECT id FROM jobs WHERE state = 'queued' AND id NOT IN :skip ORDER BY created_at LIMIT :limit"
               ).bindparams(bindparam("skip", expanding=True, type_=String))
_EXPIRED = text("SELECT id FROM jobs WHERE state = 'running' AND lease_expires < :now")
_HOLDERS = text("SELECT id, worker FROM jobs WHERE state = 'running'")
_LATEST_OF_RULE = text(f"SELECT {_JOB} FROM jobs WHERE rule = :rule AND study_uid = :study_uid "
                       "ORDER BY created_at DESC")
_FORWARDS = {by_job: text("SELECT destination, state, attempts, last_error FROM forwards "
                          f"{'WHERE job_id = :job_id ' if by_job else ''}ORDER BY next_try")
             for by_job in (False, True)}
_OF_STUDIES = text(f"SELECT {_JOB} FROM jobs WHERE study_uid IN :uids ORDER BY created_at DESC").bindparams(
    bindparam("uids", expanding=True))
_BY_ID = text(f"SELECT {_JOB} FROM jobs WHERE id IN :ids").bindparams(_IDS)


def _jobs_statement(by_study: bool, by_state: bool):
    where = [w for w, on in (("study_uid = :study_uid", by_study), ("state IN :states", by_state)) if on]
    statement = text(f"SELECT {_JOB} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} "
                     "ORDER BY created_at DESC LIMIT :limit")
    return statement.bindparams(bindparam("states", expanding=True)) if by_state else statement


_JOBS = {(by_study, by_state): _jobs_statement(by_study, by_state) for by_study in (False, True)
         for by_state in (False, True)}


@lru_cache(maxsize=None)
def _update(also: tuple[str, ...]):
    """The write of an event: only where the row still holds what the state machine was given."""
    unknown = set(also) - set(_ALSO)
    if unknown:
        raise ValueError(f"jobs: no column {', '.join(sorted(unknown))} to write with an event")
    return text(f"UPDATE jobs SET {', '.join(f'{c} = :{c}' for c in (*_MACHINE, *also))} WHERE id = :id "
                "AND state = :was_state AND attempts = :was_attempts "
                "AND lease_expires IS NOT DISTINCT FROM :was_lease")


def create(index: Index, *, study_uid: str, plugin: str, params: dict, inputs: list[str], rule: str | None = None,
           created_by: str | None = None, forward_to: list[str] | tuple = (), max_attempts: int = 3,
           supersedes: str | None = None, now: float | None = None, conn: Connection | None = None) -> str:
    """A new queued job; its id. Inside `conn`'s transaction when given."""
    job_id = secrets.token_hex(8)
    now = time.time() if now is None else now
    values = {"id": job_id, "study_uid": study_uid, "plugin": plugin, "params": json.dumps(params, sort_keys=True),
              "inputs": json.dumps(list(inputs)), "rule": rule, "created_by": created_by,
              "forward_to": json.dumps(list(forward_to)), "max_attempts": max_attempts, "supersedes": supersedes,
              "now": now}

    def insert(c: Connection) -> None:
        c.execute(_CREATE, values)
        Index.add_job_change(c, STATE_CHANGE.format("queued"), job_id, study_uid, now=now)

    if conn is not None:
        insert(conn)
    else:
        with index.write() as c:
            insert(c)
    return job_id


def get(index: Index, job_id: str, conn: Connection | None = None) -> JobRecord:
    row = (conn.execute(_GET, {"id": job_id}).first() if conn is not None
           else next(iter(index.read(_GET, {"id": job_id})), None))
    if row is None:
        raise JobNotFound(job_id)
    return JobRecord.of(row)


def apply(index: Index, job_id: str, event, conn: Connection | None = None, **also) -> JobRecord:
    """Apply a state machine event to a stored job (IllegalTransition leaves it untouched).

    `also`: columns written in the same transaction (summary, progress, ...). Inside `conn`'s
    transaction when given, else in one of its own. A job that another writer (another router on a
    shared index) changed after it was read is read again and the event applied to what it holds now.
    """
    if conn is None:
        with index.write() as c:
            return apply(index, job_id, event, c, **also)
    statement = _update(tuple(also))
    extra = {k: json.dumps(v) if k in ("summary", "timings") else v for k, v in also.items()}
    for _ in range(RETRIES):
        record = get(index, job_id, conn)
        after = handle(record.machine, event)
        if after.state != record.state or after.attempts != record.attempts:
            Index.order_changes(conn)       # before the job's row lock: one lock order, no deadlock (`_ORDER`)
        columns = {"state": after.state, "attempts": after.attempts, "worker": after.worker,
                   "lease_expires": after.lease_expires, "errors": json.dumps(list(after.errors)),
                   "started_at": after.started_at, "finished_at": after.finished_at, **extra}
        written = conn.execute(statement, {**columns, "id": job_id, "was_state": record.state,
                                           "was_attempts": record.attempts, "was_lease": record.lease_expires})
        if written.rowcount == 1:
            break
    else:
        raise RuntimeError(f"job {job_id}: changed by other writers {RETRIES} times while being written")
    if after.state != record.state or after.attempts != record.attempts:
        Index.add_job_change(conn, STATE_CHANGE.format(after.state), job_id, record.study_uid)
    return get(index, job_id, conn)


def lease(index: Index, worker: str, now: float, seconds: float, limit: int,
          admit: Callable[[JobRecord], bool] | None = None, skip: Collection[str] = (),
          looks: int = 50) -> list[JobRecord]:
    """Lease up to `limit` queued jobs to `worker`, the oldest first, each in a transaction of its own.

    However many routers share the index, each job is leased to one of them: a job another router
    leased (or someone cancelled) since it was listed is left alone. `admit(job)` False: the job is
    not leased now (it stays queued, its attempts untouched); at most `looks` jobs are judged so per
    call. `skip`: ids not looked at."""
    leased: list[JobRecord] = []
    passed = set(skip)
    while len(leased) < limit and looks > 0:
        wanted = limit - len(leased)
        candidates = queued(index, limit=wanted, skip=passed)
        for job_id in candidates:
            passed.add(job_id)          # leased, left to others, or not admitted: not listed again
            try:
                if admit is not None:
                    looks -= 1
                    if not admit(get(index, job_id)):
                        continue
                leased.append(apply(index, job_id, Lease(worker, now, seconds)))
            except (IllegalTransition, JobNotFound):
                continue
        if len(candidates) < wanted:
            break
    return leased


def set_progress(index: Index, job_id: str, fraction: float, message: str) -> None:
    with index.write() as conn:
        Index.order_changes(conn)
        row = conn.execute(_PROGRESS_OF, {"id": job_id}).first()
        if row is None or row.state != "running":
            return
        conn.execute(_SET_PROGRESS, {"progress": max(0.0, min(1.0, fraction)), "message": message[:200],
                                     "id": job_id})
        Index.add_job_change(conn, "job_progress", job_id, row.study_uid)


def jobs(index: Index, *, study_uid: str | None = None, states: tuple[str, ...] = (),
         limit: int = 100) -> list[JobRecord]:
    statement = _JOBS[bool(study_uid), bool(states)]
    params = {"limit": limit, **({"study_uid": study_uid} if study_uid else {}),
              **({"states": list(states)} if states else {})}
    return [JobRecord.of(r) for r in index.read(statement, params)]


def succeeded_files(index: Index, study_uid: str, name: str) -> list[tuple[str, str]]:
    """(job id, blob id) of the file called `name` (findings.json, say) that each succeeded job of the
    study wrote, the newest job first."""
    return [(r.id, r.blob_id) for r in index.read(_SUCCEEDED_FILES, {"study_uid": study_uid, "name": name})]


def results(index: Index, job_id: str) -> list[dict]:
    """What the job produced: DICOM instances (with their series) and files (blobs)."""
    rows = [dict(r._mapping) for r in index.read(_RESULTS, {"job_id": job_id})]
    where = filed(index, [r["sop_instance_uid"] for r in rows if r["sop_instance_uid"]])
    for r in rows:
        found = where.get(r["sop_instance_uid"])
        r.update(sop_class_uid=found.sop_class_uid if found else None, series_uid=found.series_uid if found else None,
                 study_uid=found.study_uid if found else None)
    return rows


def dicom_results(index: Index, job_id: str) -> list[str]:
    """The SOP Instance UIDs of the job's DICOM results, by name."""
    return [r.sop_instance_uid for r in index.read(_DICOM_RESULTS, {"job_id": job_id})]


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


def record_results(conn: Connection, job_id: str, study_uid: str, found: list[Result]) -> None:
    """Record the job's outputs (again, when its results are taken a second time after a crash),
    inside `conn`'s transaction: files are held in the archive (a file they replace is let go),
    and each one stored is a `file_stored` change."""
    files = [r.blob_id for r in found if r.kind == "file" and r.blob_id]
    if files:
        Index.order_changes(conn)           # before the rows' locks (_ORDER): file_stored changes follow
    names = [r.name for r in found]
    before = {row.blob_id for row in conn.execute(_RESULT_BLOBS, {"job_id": job_id, "names": names})} \
        if names else set()
    if found:
        conn.execute(_RECORD_RESULT, [{"job_id": job_id, **r.__dict__} for r in found])
    holds.release(conn, before - set(files), HOLDER)
    holds.hold(conn, files, HOLDER)
    for blob_id in files:
        Index.add_job_change(conn, "file_stored", job_id, study_uid, blob_id=blob_id)


def counts_by_state(index: Index) -> dict[str, int]:
    """Jobs in each state (for the metrics)."""
    with index.reader() as conn:
        return {state: count for state, count in conn.execute(text("SELECT state, COUNT(*) FROM jobs GROUP BY state"))}


def queued(index: Index, limit: int = 100, skip: Collection[str] = ()) -> list[str]:
    """Ids of queued jobs, the oldest first (but those in `skip`)."""
    return [r.id for r in index.read(_QUEUED, {"limit": limit, "skip": list(skip)})]


def expired(index: Index, now: float) -> list[str]:
    """Ids of running jobs whose lease ended before `now`."""
    return [r.id for r in index.read(_EXPIRED, {"now": now})]


def holders(index: Index) -> dict[str, str | None]:
    """Running job id -> the holder of its lease (a router, `<node name>/<pid>`)."""
    return {r.id: r.worker for r in index.read(_HOLDERS)}


def latest_of_rule(conn: Connection, rule: str, study_uid: str, inputs: list[str] | None) -> JobRecord | None:
    """The newest job that `rule` made for the study (on exactly `inputs`, when given)."""
    for row in conn.execute(_LATEST_OF_RULE, {"rule": rule, "study_uid": study_uid}):
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
    groups: dict[tuple[str, str], list] = {}
    for destination, state, attempts, error in index.read(_FORWARDS[job_id is not None], {"job_id": job_id}):
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
            for row in conn.execute(_OF_STUDIES, {"uids": study_uids[start:start + IDS_PER_QUERY]}):
                found.setdefault(row.study_uid, []).append(JobRecord.of(row))
    return found


def jobs_by_id(index: Index, job_ids: list[str]) -> dict[str, JobRecord]:
    """The jobs of these ids that exist, by id."""
    found: dict[str, JobRecord] = {}
    ids = list(dict.fromkeys(job_ids))
    for start in range(0, len(ids), IDS_PER_QUERY):
        part = ids[start:start + IDS_PER_QUERY]
        found.update((row.id, JobRecord.of(row)) for row in index.read(_BY_ID, {"ids": part}))
    return found
