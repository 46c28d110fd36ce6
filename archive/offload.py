"""The S3 outbox: every blob the archive keeps is pushed to S3, encrypted, exactly once.

The offloader tails the `changes` log (its position is the `offload` cursor) and keeps one
row per blob in the `offload` table: pending -> offloaded, or failed when it can never
succeed (the local blob is damaged or gone). An upload sends the blob's envelope as it is
(with KMS set, its data key re-wrapped by KMS first: the data is not re-encrypted), S3
checks the SHA-256 of every part, and the object's size and checksum are checked again
before the row says offloaded. An attempt that fails for a reason that may pass (S3
unreachable, throttled, KMS down) is retried with exponential backoff and jitter; once an
upload succeeds again, the waiting ones are retried at once. Object keys are the blob ids,
so a retry after a crash or a lost answer can never make a second copy, and the multipart
uploads a crash left behind are aborted when the offloader starts.

Local copies of offloaded blobs are evicted beyond `cache_max_bytes` or `cache_max_age`
(oldest first); reads then go to S3 (`storage.TieredStorage`). It runs in a process of its
own (`m3dicom serve` starts it), so it never slows C-STORE answers.

Nodes sharing an index: each node offloads what it received. Its cursor is `offload:<node name>`,
it queues only the blobs in its own data directory (or indexed as received by it), its rows carry
its name (`offload.node`), and it uploads, evicts and aborts leftover multipart uploads only for
those: two nodes never upload the same blob, and none takes another's blob for lost.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import text

from . import db, metrics, nodes
from .changes import consume, position
from .crypto import IntegrityError, KmsError, rewrapped_header
from .ingest import Archive
from .s3 import ObjectExists, S3Storage, Spliced, UploadMismatch

log = logging.getLogger(__name__)

CURSOR = "offload"                       # the cursor of a node from before node names (adopted, see below)
UPLOAD_KINDS = ("stored", "replaced", "result_stored", "file_stored")   # a change that brings a new blob
REMOVE_KINDS = ("blob_removed",)         # a blob nobody needs any more
RECORD_EVERY = 0.5                       # seconds between two commits of finished uploads


@dataclass(frozen=True)
class Policy:
    concurrency: int = 4              # objects uploaded at the same time
    retry_base: float = 2.0           # seconds before the first retry
    retry_max: float = 300.0          # longest wait between two attempts
    cache_max_bytes: int = 0          # local copies kept at most (0 = no limit)
    cache_max_age: float = 0.0        # seconds a local copy is kept after its upload (0 = no limit)
    batch: int = 64                   # rows taken per step


@dataclass(frozen=True)
class _Outcome:
    blob_id: str
    state: str                        # offloaded | retry | failed | gone | removed
    error: str = ""
    stored_size: int | None = None


class Offloader:
    """Moves the archive's blobs to its S3 tier; `step()` does one round, `run()` loops."""

    def __init__(self, archive: Archive, policy: Policy = Policy(), clock=time.time):
        if archive.remote is None:
            raise ValueError("the archive has no S3 tier (storage.backend is not \"s3\")")
        self.archive, self.policy, self.clock = archive, policy, clock
        self.remote: S3Storage = archive.remote
        self.node = archive.node
        self.cursor = f"{CURSOR}:{self.node}"
        self._failed = db.RoundFailures(log, "offload round")
        self.shared = not archive.index.sqlite     # PostgreSQL: other nodes may share the index and the bucket
        self._pool = ThreadPoolExecutor(policy.concurrency, thread_name_prefix="offload")
        self._leftovers = True     # incomplete multipart uploads may be waiting to be aborted
        self._reachable = True
        self._adopt()

    def _adopt(self) -> None:
        """Rows and the cursor of an index from before node names (one node) become this node's: its rows
        whose blob lies here (all of them on SQLite, where this node is the only one), and the cursor. So do
        the rows and the cursor of the names this data directory ran under before (a renamed host, a container
        made again: `node.name` defaults to the host name), or what waited for upload would never go."""
        former = nodes.former_names(self.archive.index, self.node, self.archive.data_dir)
        with self.archive.index.write() as conn:
            for old in (CURSOR, *(f"{CURSOR}:{name}" for name in former)):
                conn.execute(_ADOPT_CURSOR, {"old": old, "new": self.cursor})
            orphans = [r.blob_id for r in conn.execute(_UNOWNED)]
            mine = [b for b in orphans if not self.shared or self.archive.local.exists(b)]
            if mine:
                _ADOPT_ROW.run_many(conn, [{"node": self.node, "blob_id": b} for b in mine])
                log.info("offload: %d rows from before node names are node %s's", len(mine), self.node)
            for name in former:
                adopted = _ADOPT_NAMED.run(conn, {"node": self.node, "old": name})
                if adopted:
                    log.warning("offload: %d rows queued by this data directory as node %s are node %s's now",
                                adopted, name, self.node)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run(self, stop: threading.Event, idle: float = 0.5) -> None:
        """Take changes, upload, evict, until `stop` is set."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception as exc:
                self._failed(exc)
                busy = False
            if not busy:
                stop.wait(idle)

    def step(self) -> bool:
        """One round; True when there was work (call again soon)."""
        taken = self.take_changes()
        if self._leftovers:   # at start, and after failed uploads: between rounds nothing is in flight
            self._leftovers = not self._abort_leftovers()
        outcomes = self.push_due()
        evicted = self.evict()
        return bool(taken or outcomes or evicted)

    def _abort_leftovers(self) -> bool:
        """Abort the multipart uploads that a crash or a failed attempt left in the bucket."""
        try:
            if self.shared:        # only this node's: another node's may be under way
                pending = {r.blob_id for r in self.archive.index.read(_PENDING, {"node": self.node})}
                aborted = self.remote.abort_incomplete(only=pending.__contains__)
            else:
                aborted = self.remote.abort_incomplete()
        except (BotoCoreError, ClientError) as exc:
            metrics.get().s3_errors.labels("list").inc()
            if self._reachable:
                log.warning("S3 cannot be reached (%s): uploads wait and retry", _describe(exc))
            self._reachable = False
            return False
        if not self._reachable:
            log.info("S3 answers again")
        self._reachable = True
        if aborted:
            log.warning("aborted %d incomplete multipart uploads left by a crash or a failed attempt", aborted)
        return True

    # -- the changes log -> the outbox -------------------------------------------------------

    def take_changes(self, limit: int = 5000) -> int:
        """Queue the blobs that changes since the cursor bring or drop, in the transaction that moves
        the cursor (`changes.consume`). Returns how far the cursor moved (0: nothing new), past the
        changes of other kinds too, so that a round after a run of job events comes at once."""
        now = self.clock()
        before = position(self.archive.index, self.cursor)
        with consume(self.archive.index, self.cursor, UPLOAD_KINDS + REMOVE_KINDS, limit) as batch:
            runs: list[tuple[db.Prepared, list[dict]]] = []     # in the log's order, each run in one executemany
            for change in batch:
                blob_id = change.blob_id
                if blob_id is None:
                    continue
                size = self._local_size(blob_id)
                if change.kind in UPLOAD_KINDS:
                    if not self._mine(batch.conn, blob_id, size, _RECEIVED_HERE):
                        continue
                    statement, params = _QUEUE_UPLOAD, {"blob_id": blob_id, "now": now, "size": size,
                                                        "node": self.node}
                else:
                    if not self._mine(batch.conn, blob_id, size, _QUEUED_HERE):
                        continue
                    statement, params = _QUEUE_REMOVAL, {"blob_id": blob_id, "now": now, "node": self.node}
                if runs and runs[-1][0] is statement:
                    runs[-1][1].append(params)
                else:
                    runs.append((statement, [params]))
            for statement, many in runs:
                statement.run_many(batch.conn, many)
        return batch.upto - before

    def _mine(self, conn, blob_id: str, local_size: int | None, indexed_here) -> bool:
        """Whether this node's offloader deals with the blob: always on SQLite (one node); on a shared index
        when the blob lies in this node's data directory, or the index says it is this node's (received or
        queued here: a blob missing here is then lost, and recorded as failed)."""
        if not self.shared or local_size is not None:
            return True
        return conn.execute(indexed_here, {"blob_id": blob_id, "node": self.node}).first() is not None

    def _local_size(self, blob_id: str) -> int | None:
        try:
            return self.archive.local.path(blob_id).stat().st_size
        except FileNotFoundError:
            return None

    # -- uploads and removals -------------------------------------------------------------

    def push_due(self) -> int:
        """Upload (or remove in S3) the rows whose time has come; record the outcomes together."""
        due = self.archive.index.read(_DUE, {"now": self.clock(), "limit": self.policy.batch, "node": self.node})
        if not due:
            return 0
        attempts = {row.blob_id: row.attempts for row in due}
        work = [self._pool.submit(self._remove, row.blob_id) if row.state == "remove"
                else self._pool.submit(self._upload, row.blob_id, row.needed) for row in due]
        done: list[_Outcome] = []
        flushed = time.monotonic()
        for future in as_completed(work):   # recorded as they finish (a crash loses little), in few commits
            done.append(future.result())
            if time.monotonic() - flushed > RECORD_EVERY:
                self._record(done, attempts)
                done, flushed = [], time.monotonic()
        self._record(done, attempts)
        return len(work)

    def _upload(self, blob_id: str, needed: bool) -> _Outcome:
        if not needed:
            return _Outcome(blob_id, "gone")          # replaced meanwhile: nothing to keep
        path = self.archive.local.path(blob_id)
        try:
            with open(path, "rb") as fh:
                size = _size(fh)
                source, length = fh, size
                if self.archive.keyring.kms is not None:   # S3 gets the data key wrapped by KMS
                    header, old = rewrapped_header(fh, self.archive.keyring, self.archive.keyring.kms)
                    source = Spliced(header, fh, old, size)
                    length = source.size
                self.remote.put(blob_id, source, length)
            return _Outcome(blob_id, "offloaded", stored_size=size)
        except FileNotFoundError:
            if not self.archive.index.blob_referenced(blob_id):
                return _Outcome(blob_id, "gone")      # replaced (and removed here) since the batch was read
            return _Outcome(blob_id, "failed", "the local blob is missing")
        except IntegrityError as exc:
            return _Outcome(blob_id, "failed", f"the local blob is damaged: {exc}")
        except (ObjectExists, UploadMismatch) as exc:
            metrics.get().s3_errors.labels("upload").inc()
            return _Outcome(blob_id, "failed", str(exc))
        except (BotoCoreError, ClientError, KmsError, OSError) as exc:
            metrics.get().s3_errors.labels("upload").inc()
            return _Outcome(blob_id, "retry", _describe(exc))

    def _remove(self, blob_id: str) -> _Outcome:
        try:
            self.remote.remove(blob_id)
            self.archive.local.remove(blob_id)      # replaced on another node: that node's ingest cannot
            return _Outcome(blob_id, "removed")
        except (BotoCoreError, ClientError, OSError) as exc:
            metrics.get().s3_errors.labels("remove").inc()
            return _Outcome(blob_id, "retry", _describe(exc))

    def _record(self, outcomes: list[_Outcome], attempts: dict[str, int]) -> None:
        if not outcomes:
            return
        now = self.clock()
        rows: dict[db.Prepared, list[dict]] = {_OFFLOADED: [], _FORGET: [], _FAILED: [], _RETRY: []}
        for o in outcomes:                  # one row per blob: each statement once, for all its blobs
            if o.state == "offloaded":
                rows[_OFFLOADED].append({"now": now, "size": o.stored_size, "blob_id": o.blob_id})
            elif o.state in ("gone", "removed"):
                rows[_FORGET].append({"blob_id": o.blob_id})
            elif o.state == "failed":
                log.error("offload of blob %s failed for good: %s", o.blob_id, o.error)
                rows[_FAILED].append({"error": o.error, "blob_id": o.blob_id})
            else:
                delay = self.backoff(attempts[o.blob_id])
                rows[_RETRY].append({"next_try": now + delay, "error": o.error, "blob_id": o.blob_id})
        with self.archive.index.write() as conn:
            for statement, many in rows.items():
                if many:
                    statement.run_many(conn, many)
            if any(o.state in ("offloaded", "removed") for o in outcomes):
                # S3 answers again: what waits for a retry need not wait any longer
                _RETRY_NOW.run(conn, {"now": now, "node": self.node})
        retries = [o for o in outcomes if o.state == "retry"]
        if retries:
            self._leftovers = True
            log.warning("offload: %d uploads will be retried (%s)", len(retries), retries[0].error)

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt: exponential, capped, with jitter (half to full)."""
        delay = min(self.policy.retry_max, self.policy.retry_base * 2 ** min(attempts, 30))
        return delay * random.uniform(0.5, 1.0)

    # -- the local cache ------------------------------------------------------------------

    def evict(self) -> int:
        """Remove local copies of offloaded blobs beyond the age and size limits, oldest first."""
        p = self.policy
        if not p.cache_max_bytes and not p.cache_max_age:
            return 0
        now = self.clock()
        victims: list[str] = []
        if p.cache_max_age:
            victims += [r[0] for r in self.archive.index.read(_OLD_COPIES, {"before": now - p.cache_max_age,
                                                                            "node": self.node})]
        if p.cache_max_bytes:
            (held,), = self.archive.index.read(_CACHED_BYTES, {"node": self.node})
            held -= sum(self._local_size(b) or 0 for b in victims)
            if held > p.cache_max_bytes:
                for row in self.archive.index.read(_OLDEST_COPIES, {"node": self.node}):
                    if held <= p.cache_max_bytes:
                        break
                    if row.blob_id not in victims:
                        victims.append(row.blob_id)
                        held -= row.stored_size or 0
        for blob_id in victims:
            self.archive.local.remove(blob_id)
        if victims:
            with self.archive.index.write() as conn:
                _EVICTED.run_many(conn, [{"now": now, "blob_id": b} for b in victims])
            log.info("evicted %d local copies of offloaded blobs", len(victims))
        return len(victims)


_QUEUE_UPLOAD = db.Prepared("INSERT INTO offload (blob_id, state, next_try, queued_at, stored_size, node) "
                            "VALUES (:blob_id, 'pending', :now, :now, :size, :node) ON CONFLICT (blob_id) DO NOTHING")
_QUEUE_REMOVAL = db.Prepared("INSERT INTO offload (blob_id, state, next_try, queued_at, node) "
                             "VALUES (:blob_id, 'remove', :now, :now, :node) "
                             "ON CONFLICT (blob_id) DO UPDATE SET state = 'remove', next_try = excluded.next_try")
_RECEIVED_HERE = text("SELECT 1 FROM instances WHERE blob_id = :blob_id AND node = :node "
                      "UNION ALL SELECT 1 FROM offload WHERE blob_id = :blob_id AND node = :node")
_QUEUED_HERE = text("SELECT 1 FROM offload WHERE blob_id = :blob_id AND node = :node")
_ADOPT_CURSOR = text("UPDATE cursors SET name = :new WHERE name = :old "
                     "AND NOT EXISTS (SELECT 1 FROM cursors WHERE name = :new)")
_UNOWNED = text("SELECT blob_id FROM offload WHERE node IS NULL")
_ADOPT_ROW = db.Prepared("UPDATE offload SET node = :node WHERE blob_id = :blob_id AND node IS NULL")
_ADOPT_NAMED = db.Prepared("UPDATE offload SET node = :node WHERE node = :old")
_PENDING = text("SELECT blob_id FROM offload WHERE node = :node AND state = 'pending'")
# `needed`: whether a committed row still needs the blob (as `Index.blob_referenced`, for the whole batch in
# one statement): a blob replaced before its upload is not uploaded
_DUE = text("SELECT o.blob_id, o.state, o.attempts, "
            "(EXISTS (SELECT 1 FROM instances i WHERE i.blob_id = o.blob_id) "
            "OR EXISTS (SELECT 1 FROM quarantine q WHERE q.blob_id = o.blob_id) "
            "OR EXISTS (SELECT 1 FROM blob_holds h WHERE h.blob_id = o.blob_id)) AS needed "
            "FROM offload o WHERE o.node = :node AND o.state IN ('pending', 'remove') "
            "AND o.next_try <= :now ORDER BY o.next_try LIMIT :limit")
_OFFLOADED = db.Prepared("UPDATE offload SET state = 'offloaded', offloaded_at = :now, stored_size = :size, "
                         "last_error = NULL, attempts = attempts + 1 WHERE blob_id = :blob_id AND state = 'pending'")
_FORGET = db.Prepared("DELETE FROM offload WHERE blob_id = :blob_id")
_FAILED = db.Prepared("UPDATE offload SET state = 'failed', last_error = :error, attempts = attempts + 1 "
                      "WHERE blob_id = :blob_id AND state = 'pending'")
# (an upload's outcome is not recorded over a removal queued meanwhile: the removal goes on)
_RETRY = db.Prepared("UPDATE offload SET attempts = attempts + 1, next_try = :next_try, last_error = :error "
                     "WHERE blob_id = :blob_id")
_RETRY_NOW = db.Prepared("UPDATE offload SET next_try = :now WHERE node = :node AND state IN ('pending', 'remove') "
                         "AND attempts > 0 AND next_try > :now")
_OLD_COPIES = text("SELECT blob_id FROM offload WHERE node = :node AND evicted_at IS NULL AND state = 'offloaded' "
                   "AND offloaded_at < :before LIMIT 1000")
_CACHED_BYTES = text("SELECT COALESCE(SUM(stored_size), 0) FROM offload WHERE node = :node AND evicted_at IS NULL "
                     "AND state != 'remove'")
_OLDEST_COPIES = text("SELECT blob_id, stored_size FROM offload WHERE node = :node AND evicted_at IS NULL "
                      "AND state = 'offloaded' ORDER BY offloaded_at LIMIT 1000")
_EVICTED = db.Prepared("UPDATE offload SET evicted_at = :now WHERE blob_id = :blob_id")
OFFLOADED_BLOBS = text("SELECT blob_id FROM offload WHERE state = 'offloaded'")


def _size(fh) -> int:
    fh.seek(0, 2)
    size = fh.tell()
    fh.seek(0)
    return size


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"S3 refused: {error.get('Code', '?')} {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Status:
    pending: int
    retrying: int
    offloaded: int
    failed: int
    removing: int
    evicted: int
    local_bytes: int
    oldest_pending: float | None      # when the oldest pending blob was queued
    last_error: str | None


def status(index, node: str | None = None) -> Status:
    """Counts by state, the oldest pending item and the last error (for `m3dicom status`): of one node's
    offloader when `node` is given (nodes sharing an index), else of all."""
    mine = "" if node is None else " AND node = :node"
    params = {"node": node}
    with index.reader() as conn:
        counts = {row[0]: row[1] for row in conn.execute(
            text(f"SELECT state, COUNT(*) FROM offload WHERE 1 = 1{mine} GROUP BY state"), params)}
        retrying = conn.execute(text(f"SELECT COUNT(*) FROM offload WHERE state = 'pending' AND attempts > 0{mine}"),
                                params).scalar()
        evicted = conn.execute(text(f"SELECT COUNT(*) FROM offload WHERE evicted_at IS NOT NULL{mine}"),
                               params).scalar()
        local = conn.execute(text(f"SELECT COALESCE(SUM(stored_size), 0) FROM offload WHERE evicted_at IS NULL{mine}"),
                             params).scalar()
        oldest = conn.execute(text(f"SELECT MIN(queued_at) FROM offload WHERE state = 'pending'{mine}"),
                              params).scalar()
        error = conn.execute(text(f"SELECT last_error FROM offload WHERE last_error IS NOT NULL{mine} "
                                  "ORDER BY (state = 'failed') DESC, next_try DESC LIMIT 1"), params).fetchall()
    return Status(counts.get("pending", 0), retrying, counts.get("offloaded", 0), counts.get("failed", 0),
                  counts.get("remove", 0), evicted, int(local), oldest, error[0][0] if error else None)

