"""Ingest: the one path by which an instance enters the archive.

validate -> encrypted blob (fsync file and directory) -> ONE index transaction
(instance row + change row). Only a returned `Outcome.STORED` (or an idempotent
duplicate) means the instance is durable. On any failure no blob and no row remain.
Modalities (C-STORE), uploads and analysis results all come through here.

A study belongs to one patient and a series to one study, and a SOP Instance UID names
one instance: an instance that says otherwise (or re-uses a stored instance's UID for
another patient, study or series) is refused (`Outcome.CONFLICT`) or, with
`on_conflict="quarantine"`, kept durably outside the hierarchy (`Outcome.QUARANTINED`,
the `quarantine` table); either way the `conflicts` table records it. Patient
demographics that differ from what the index holds are stored with the instance (its
file is the truth) and recorded there too, never written over the index. The same
instance received again with other bytes under storage.duplicates = "keep-first" is
discarded and recorded too ("discarded"): storage commitment will not confirm its UID.
"""
from __future__ import annotations

import enum
import errno
import hashlib
import io
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from pydicom.uid import DeflatedExplicitVRLittleEndian
from sqlalchemy import exc as sa_exc, text

from .crypto import IntegrityError, Keyring, KmsKeyring, LocalKeyring
from .dicomfile import (DEFAULT_LIMITS, InstanceHeader, InvalidInstance, Limits,
                        dataset_offset as inspect_offset, dataset_offset_of, inspect, inspect_bytes, syntax_of,
                        undeflated)
from .db import SQLITE_FILE, Prepared, brief
from . import metrics, nodes
from .index import SAME_UID_OTHER_CONTENT, Difference, HierarchyConflict, Index
from .settings import default_node_name
from .storage import BlobInfo, Elsewhere, LocalStorage, StorageFull, TieredStorage

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
ERROR_COMMENT_MAX = 64   # a reason a DIMSE Error Comment (LO) carries whole
INSPECTED_KEPT = 65536    # blobs `Archive.readable` remembers it inspected (a set of ids; then it starts again)
_NEW_INSTANCE = Prepared(
    "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, instance_number, transfer_syntax, size, "
    "sha256, blob_id, calling_ae, received_at, job_id, node, pixel_rows, pixel_columns, bits_allocated, frames) "
    "VALUES (:uid, :series_pk, :sop_class_uid, :instance_number, :transfer_syntax, :size, :sha256, :blob_id, "
    ":calling_ae, :now, :job_id, :node, :pixel_rows, :pixel_columns, :bits_allocated, :frames)")
_REPLACE_INSTANCE = Prepared(
    "UPDATE instances SET series_pk = :series_pk, sop_class_uid = :sop_class_uid, instance_number = :instance_number, "
    "transfer_syntax = :transfer_syntax, size = :size, sha256 = :sha256, blob_id = :blob_id, calling_ae = :calling_ae, "
    "received_at = :now, node = :node, pixel_rows = :pixel_rows, pixel_columns = :pixel_columns, "
    "bits_allocated = :bits_allocated, frames = :frames WHERE pk = :pk AND blob_id = :old_blob")  # not replaced since
_QUARANTINED = text("SELECT 1 FROM quarantine WHERE sop_instance_uid = :uid AND sha256 = :sha256")
_QUARANTINE = text(
    "INSERT INTO quarantine (sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax, size, sha256, "
    "blob_id, calling_ae, job_id, reason, received_at) VALUES (:uid, :sop_class_uid, :study_uid, :series_uid, "
    ":transfer_syntax, :size, :sha256, :blob_id, :calling_ae, :job_id, :reason, :now)")
SHORT_OF_DISK = "short of disk space (storage.min_free_bytes)"   # fits an Error Comment (64)


def _image(header) -> dict:
    """The instance's image size (what QIDO-RS returns at instance level); None where it has none."""
    return {"pixel_rows": header.attrs.get("Rows"), "pixel_columns": header.attrs.get("Columns"),
            "bits_allocated": header.attrs.get("BitsAllocated"), "frames": header.attrs.get("NumberOfFrames")}


class Outcome(enum.Enum):
    STORED = "stored"
    ALREADY_STORED = "already stored"        # same SOP Instance UID, same bytes
    DUPLICATE_KEPT_FIRST = "duplicate kept"  # same UID and instance, different bytes, policy keep-first: the
                                             # stored copy kept, the new one discarded (and recorded)
    REPLACED = "replaced"                    # same UID, different bytes, policy replace
    INVALID = "invalid"                      # cannot be understood
    MISMATCH = "mismatch"                    # data set does not match the request
    CONFLICT = "conflict"                    # contradicts the hierarchy (study of another patient, ...): refused
    QUARANTINED = "quarantined"              # contradicts it, kept durably outside it (on_conflict "quarantine")
    STORAGE_FULL = "storage full"
    FAILURE = "failure"

    @property
    def ok(self) -> bool:
        return self in (Outcome.STORED, Outcome.ALREADY_STORED, Outcome.DUPLICATE_KEPT_FIRST,
                        Outcome.REPLACED)


@dataclass(frozen=True)
class IngestResult:
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    header: InstanceHeader | None = None     # what was filed (its patient, study, SOP class): for the audit trail


_COMMIT_ATTEMPTS = 3


class _Replaced(Exception):
    """The instance was replaced by another writer between our look-up and our replacement (two nodes receiving
    new content for one UID at once): the transaction is rolled back and run again against what it holds now
    (else the other writer's new blob would be left behind, referenced by nothing)."""


def _local_keys(data_dir: Path) -> LocalKeyring:
    """The key-encryption keys of `data_dir/keys`, the first one made on a new data directory; refused when
    the keys are gone but blobs they encrypted are here (a new key would read none of them, and every process
    starting meanwhile would make one of its own)."""
    keys, blobs = data_dir / "keys", data_dir / "blobs"
    if not (keys.is_dir() and any(keys.glob("*.kek"))) and blobs.is_dir() and \
            any(p.is_file() for p in blobs.rglob("*")):
        raise IntegrityError(f"no key file (*.kek) in {keys}, but {blobs} holds blobs they encrypted: restore the "
                             "key files (from the node's backup), or no stored instance can be read")
    return LocalKeyring.open(keys)


def _lost_race(exc: sa_exc.IntegrityError) -> bool:
    """A unique key that another transaction took between our look-up and our insert (PostgreSQL, READ COMMITTED:
    two nodes or processes filing the same new patient, study, series or SOP Instance UID at once). The
    transaction is rolled back; run again, it finds their row and files under it."""
    return getattr(exc.orig, "sqlstate", None) == "23505"


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # SQLite: "database or disk is full"; PostgreSQL: SQLSTATE 53100 (disk_full)
    return isinstance(exc, sa_exc.OperationalError) and ("full" in str(exc.orig)
                                                         or getattr(exc.orig, "sqlstate", None) == "53100")


class Kept(Protocol):
    """Verified Part 10 files a reader keeps in memory, by (blob id, SHA-256): a bounded cache (the viewer's)."""

    def get(self, key: tuple[str, str]) -> bytes | None: ...

    def put(self, key: tuple[str, str], value: bytes, size: int) -> bool: ...


class Archive:
    """The index and the blob store of one node's data directory."""

    def __init__(self, data_dir: Path, *, duplicates: str = "keep-first", segment_size: int = 1 << 20,
                 kms: KmsKeyring | None = None, remote: Callable[[Keyring], object] | None = None,
                 limits: Limits = DEFAULT_LIMITS, on_conflict: str = "refuse", min_free_bytes: int = 0,
                 index_url: str = "", node: str | None = None, remote_wait: float = 0.0):
        """`remote(keyring)` makes the S3 tier (`archive.s3.S3Storage`) when the node offloads;
        `kms` wraps the data keys of what goes there. `limits` bound what a data set may make
        the node allocate (the `[ingest]` settings, also used by every reader of stored
        files); `on_conflict` is "refuse" or "quarantine"; no instance is written that would
        leave less than `min_free_bytes` free on the data directory's disk (storage.min_free_bytes).
        `index_url`: PostgreSQL's URL (`[index] url`); empty: the SQLite file in `data_dir`. `node`: this
        node's name (`[node] name`; the host name when None), recorded with what it receives; `remote_wait`:
        seconds a read waits for a blob another node holds and has not offloaded yet."""
        if on_conflict not in ("refuse", "quarantine"):
            raise ValueError(f"on_conflict: {on_conflict!r} is not refuse or quarantine")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keyring = Keyring(_local_keys(self.data_dir), kms)
        self.local = LocalStorage(self.data_dir / "blobs", self.keyring, segment_size)
        self.node = node or default_node_name()
        self.remote = remote(self.keyring) if remote else None
        self.storage = TieredStorage(self.local, self.remote, remote_wait, self._elsewhere) if self.remote \
            else self.local
        self.index = Index(index_url or self.data_dir / SQLITE_FILE)
        self.exports = self.data_dir / "exports"       # decrypted copies in use: inside the 0700 data directory
        self.exports.mkdir(mode=0o700, exist_ok=True)
        self.duplicates = duplicates
        self.limits = limits
        self._inspected: set[tuple[str, str, str]] = set()   # blobs `readable` found within the limits
        self.on_conflict = on_conflict
        self.min_free_bytes = min_free_bytes
        self.audit = None        # an atna.Recorder when [audit] repository is set (archive.open)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()   # what it holds goes to the outbox first
        self.index.close()

    def _elsewhere(self, blob_id: str) -> Elsewhere | None:
        """Why a blob that is neither here nor in S3 is not missing: another node holds it (and whether
        it may still come to S3); None when no other node does (it is missing)."""
        held = nodes.holder(self.index, blob_id)
        if held is None or held.node == self.node or held.state == "remove":
            return None
        if held.state == "failed":
            return Elsewhere(held.node, f"blob {blob_id} is held by node {held.node}, whose offloader failed to "
                             f"put it in S3 ({held.last_error})", False)
        return Elsewhere(held.node, f"blob {blob_id} is held by node {held.node} and not offloaded to S3 yet", True)

    def held_elsewhere(self, blob_id: str) -> str | None:
        """The running node that holds the only copy of this blob (received there, fsynced before it was
        indexed, not in S3 yet), when it is another node than this one; None when the blob is here, in S3, or
        nowhere, or when that node has not been seen for `nodes.ALIVE_SECONDS` (its disk may be gone: what only
        it holds is not vouched for)."""
        if self.remote is None or self.local.exists(blob_id):
            return None
        held = nodes.holder(self.index, blob_id)
        if held is None or held.node == self.node or held.state not in (None, "pending"):
            return None
        return held.node if nodes.running(self.index, held.node) else None

    def recover(self) -> int:
        """After a crash: remove blobs that no committed row references (writes cut off).

        Must run before anything is ingested (the node calls it at start). Returns how
        many were removed.
        """
        self.local.remove_partials()
        for leftover in self.exports.iterdir():        # decrypted copies a crash left behind
            leftover.unlink(missing_ok=True)
        held = list(self.storage.blob_ids())          # this node's (its data directory's), not the index's all
        referenced = set(self.index.blobs_referenced(held))
        orphans = [b for b in held if b not in referenced]
        for blob_id in orphans:
            self.storage.remove(blob_id)
        if orphans:
            log.warning("recovery: removed %d blobs that no committed instance references", len(orphans))
        return len(orphans)

    def ingest_file(self, path: Path, sop_class_uid: str | None = None,
                    sop_instance_uid: str | None = None, calling_ae: str | None = None,
                    job_id: str | None = None, staged: BlobInfo | None = None,
                    inspected: InstanceHeader | None = None) -> IngestResult:
        """Store the DICOM Part 10 file at `path` exactly as it is.

        `sop_class_uid` / `sop_instance_uid` are what the peer announced (C-STORE's
        Affected SOP Class / Instance); the data set must agree with them. `job_id` marks
        an analysis result: it is logged as "result_stored" (the router does not route it
        again) instead of "stored". `staged`: a blob of the local store that already holds
        exactly these bytes (`path` was read from it: a worker sharing this storage staged a
        result), adopted as it is instead of encrypted again; from then on it is the
        archive's, removed like a blob it wrote when the instance is not kept. `inspected`: what
        `inspect(path, limits=self.limits)` gave the caller (STOW-RS looks at a part before storing it):
        the file is not inspected twice.
        """
        try:
            header = inspected or inspect(Path(path), sop_class_uid, sop_instance_uid, self.limits)
        except InvalidInstance as exc:
            outcome = Outcome.MISMATCH if exc.status == "mismatch" else Outcome.INVALID
            return IngestResult(outcome, str(exc), sop_instance_uid)
        except OSError as exc:
            return IngestResult(Outcome.FAILURE, f"cannot read the received data: {exc}", sop_instance_uid)
        except Exception as exc:  # the inspector has a bug for this input: still bad input, not a node failure
            log.warning("data set inspector failed (%s): refused as not understood", type(exc).__name__)
            return IngestResult(Outcome.INVALID, "data set cannot be parsed", sop_instance_uid)
        if self.min_free_bytes and _free_bytes(self.data_dir) - os.path.getsize(path) < self.min_free_bytes:
            return IngestResult(Outcome.STORAGE_FULL, SHORT_OF_DISK, header.sop_instance_uid)
        digest = hashlib.sha256()
        try:
            if staged is not None:
                blob = staged
                for _ in self._chunks(Path(path), header.dataset_offset, digest):   # the SHA-256 alone
                    pass
            else:
                blob = self.storage.create(self._chunks(Path(path), header.dataset_offset, digest))
        except StorageFull:
            log.error("storage full: refused %s", _short(header))
            return IngestResult(Outcome.STORAGE_FULL, "no space left on the node", header.sop_instance_uid)
        except OSError as exc:
            log.error("blob write failed: %s", exc)
            return IngestResult(Outcome.FAILURE, "the node could not write the instance", header.sop_instance_uid)
        try:
            for attempt in range(1, _COMMIT_ATTEMPTS + 1):
                try:
                    with metrics.get().index_transaction_seconds.time():
                        return self._commit(header, blob, digest.hexdigest(), calling_ae, job_id)
                except (sa_exc.IntegrityError, _Replaced) as exc:
                    if isinstance(exc, sa_exc.IntegrityError) and not _lost_race(exc) or attempt == _COMMIT_ATTEMPTS:
                        raise
                    log.debug("%s: another writer filed its patient, study, series or UID first: again",
                              _short(header))
        except Exception as exc:
            self._drop_unless_indexed(blob.blob_id, header)
            if _is_disk_full(exc):
                log.error("index full: refused %s", _short(header))
                return IngestResult(Outcome.STORAGE_FULL, "no space left on the node", header.sop_instance_uid)
            if isinstance(exc, (sa_exc.DBAPIError, sa_exc.TimeoutError)):  # one line: no traceback, no values
                log.error("index transaction failed for %s: %s", _short(header), brief(exc))
            else:
                log.exception("index transaction failed")
            return IngestResult(Outcome.FAILURE, "the node could not index the instance",
                                header.sop_instance_uid)

    def _drop_unless_indexed(self, blob_id: str, header: InstanceHeader) -> None:
        """After a failed index transaction: remove the new blob, unless the index holds it after all. A
        COMMIT whose answer was lost (PostgreSQL restarted, the network cut at that moment) may have
        committed: the peer is answered a failure and sends again (ALREADY_STORED), and the committed row
        must keep its blob. When the index cannot say, the blob stays: recovery at the next start removes
        it if no row needs it."""
        try:
            needed = self.index.blob_referenced(blob_id)
        except Exception as exc:
            log.warning("%s: blob %s kept until the next start (the index cannot say whether it holds it: %s)",
                        _short(header), blob_id, brief(exc))
            return
        if not needed:
            self.storage.remove(blob_id)

    @contextmanager
    def exported(self, blob_id: str, sha256: str, directory: Path | None = None) -> Iterator[Path]:
        """The stored Part 10 file, decrypted into a private temporary file, verified, then removed.

        The file is made in `directory`, by default `data_dir/exports` (never /tmp: it holds
        patient data in the clear); the node's start removes what a crash left there.

        Every read of an instance goes through here (C-MOVE, C-GET, commitment checks,
        workers): the blob is read through the storage backend (which may fetch it from
        elsewhere), each segment is authenticated, and the data set's SHA-256 must be the
        one indexed at reception. Raises IntegrityError or BlobNotFound.
        """
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory or self.exports)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.storage.read(blob_id):
                    out.write(chunk)
            if dataset_sha256(path) != sha256:
                raise IntegrityError(f"blob {blob_id}: data set does not match its indexed SHA-256")
            yield path
        finally:
            path.unlink(missing_ok=True)

    def verified(self, blob_id: str, sha256: str, limit: int, kept: Kept | None = None) -> bytes | None:
        """The stored Part 10 file in memory, authenticated and checked against its indexed
        SHA-256 as `exported` does, or None when it is larger than `limit` bytes (then use
        `exported`): small instances are read without a temporary file. With `kept`, a file
        verified lately is taken from there, and one read now is put there."""
        key = (blob_id, sha256)
        if kept is not None and (data := kept.get(key)) is not None:
            return data
        with self.storage.open(blob_id) as reader:
            if reader.plaintext_size > limit:
                return None
            data = b"".join(reader.iter_plaintext())
        if dataset_sha256_of(data) != sha256:
            raise IntegrityError(f"blob {blob_id}: data set does not match its indexed SHA-256")
        if kept is not None:
            kept.put(key, data, len(data))
        return data

    @contextmanager
    def readable(self, blob_id: str, sha256: str, limit: int, kept: Kept | None = None) -> Iterator[Path | io.BytesIO]:
        """The stored instance as pydicom may read it, verified and checked as `undeflated` does: in
        memory when it is at most `limit` bytes and not deflated, else a private file (removed after).
        `kept`: as for `verified`."""
        data = self.verified(blob_id, sha256, limit, kept)
        syntax = syntax_of(data) if data is not None else None
        if data is not None and syntax != DeflatedExplicitVRLittleEndian:
            # once per blob: a blob is never rewritten, and these bytes are its data set (checked against its
            # SHA-256) read in the transfer syntax its file meta names (which the SHA-256 does not cover)
            if (blob_id, sha256, syntax) not in self._inspected:
                inspect_bytes(data, self.limits, self.exports)
                if len(self._inspected) >= INSPECTED_KEPT:
                    self._inspected.clear()
                self._inspected.add((blob_id, sha256, syntax))
            yield io.BytesIO(data)
            return
        with self.exported(blob_id, sha256) as path, undeflated(path, self.limits) as plain:
            yield plain

    @staticmethod
    def _chunks(path: Path, dataset_offset: int, digest) -> Iterator[bytes]:
        """The file's bytes; the SHA-256 covers the data set (what the peer sent)."""
        with open(path, "rb", buffering=0) as fh:
            yield fh.read(dataset_offset)
            buffer = bytearray(_CHUNK)   # one buffer, read into: each chunk is consumed before the next
            with memoryview(buffer) as view:
                while count := fh.readinto(buffer):
                    digest.update(view[:count])
                    yield view[:count]

    def _commit(self, header: InstanceHeader, blob: BlobInfo, sha256: str,
                calling_ae: str | None, job_id: str | None = None) -> IngestResult:
        now = time.time()
        differences: list[Difference] = []

        def file(conn) -> tuple[Outcome, str | None, HierarchyConflict | None]:
            """The instance filed in the index: (outcome, a blob no longer needed, the conflict found)."""
            obsolete_blob = conflict = None
            filed = Index.filed(conn, header)     # the instance of this UID, its series, study and patient
            row = filed if filed.instance_pk is not None else None
            other_content = row is not None and row.sha256 != sha256
            filing = row is None or (other_content and self.duplicates == "replace")
            try:
                if other_content:                 # the same UID must be the same instance, whatever the policy
                    Index.check_same_instance(conn, header, row.instance_pk)
                series_pk = Index.upsert_hierarchy(conn, header, now, differences, filed) if filing else None
            except HierarchyConflict as exc:      # nothing of the hierarchy was written
                conflict = exc
                outcome, kept = self._conflict(conn, exc, header, blob, sha256, calling_ae, job_id, now)
                obsolete_blob = None if kept else blob.blob_id
            else:
                if row is None:
                    _NEW_INSTANCE.run(conn, {
                        "uid": header.sop_instance_uid, "series_pk": series_pk, "sop_class_uid": header.sop_class_uid,
                        "instance_number": header.attrs["InstanceNumber"], "transfer_syntax": header.transfer_syntax,
                        "size": blob.size, "sha256": sha256, "blob_id": blob.blob_id, "calling_ae": calling_ae,
                        "now": now, "job_id": job_id, "node": self.node, **_image(header)})
                    Index.add_stored_change(conn, "result_stored" if job_id else "stored", header)
                    outcome = Outcome.STORED
                elif row.sha256 == sha256:
                    obsolete_blob, outcome = blob.blob_id, Outcome.ALREADY_STORED
                elif self.duplicates == "replace":
                    replaced = _REPLACE_INSTANCE.run(conn, {
                        "series_pk": series_pk, "sop_class_uid": header.sop_class_uid,
                        "instance_number": header.attrs["InstanceNumber"], "transfer_syntax": header.transfer_syntax,
                        "size": blob.size, "sha256": sha256, "blob_id": blob.blob_id, "calling_ae": calling_ae,
                        "now": now, "pk": row.instance_pk, "node": self.node, "old_blob": row.blob_id,
                        **_image(header)})
                    if replaced != 1:
                        raise _Replaced(header.sop_instance_uid)
                    Index.add_change(conn, "replaced", row.instance_pk, header, blob.blob_id, now)
                    Index.add_change(conn, "blob_removed", row.instance_pk, header, row.blob_id, now)
                    obsolete_blob, outcome = row.blob_id, Outcome.REPLACED
                else:                             # recorded: storage commitment must not confirm this UID
                    obsolete_blob, outcome = blob.blob_id, Outcome.DUPLICATE_KEPT_FIRST
                    Index.record_conflicts(conn, header, [Difference(
                        "SOPInstanceUID", f"data set SHA-256 {row.sha256}", f"data set SHA-256 {sha256}",
                        SAME_UID_OTHER_CONTENT)], "discarded", calling_ae, now)
                if differences:
                    Index.record_conflicts(conn, header, differences, "stored", calling_ae, now)
            return outcome, obsolete_blob, conflict

        # one transaction with the instances other threads of this receiver file at the same moment
        outcome, obsolete_blob, conflict = self.index.write_together(file)
        if obsolete_blob:
            self.storage.remove(obsolete_blob)
        if conflict is not None:          # UIDs only: no patient value reaches the log
            log.warning("%s from %s %s: %s: %s", _short(header), calling_ae,
                        "quarantined" if outcome is Outcome.QUARANTINED else "refused", conflict, conflict.uid)
            reason = f"{conflict}: {conflict.uid}"
            reason = reason if len(reason) <= ERROR_COMMENT_MAX else str(conflict)   # never a cut-off UID
            if outcome is Outcome.QUARANTINED:
                return IngestResult(outcome, f"quarantined: {reason}", header.sop_instance_uid)
            return IngestResult(outcome, reason, header.sop_instance_uid)
        if differences:
            log.warning("%s from %s stored; its %s differ from what the index holds, which is kept "
                        "(m3dicom status --conflicts lists them)", _short(header), calling_ae,
                        ", ".join(d.attribute for d in differences))
        if outcome is Outcome.DUPLICATE_KEPT_FIRST:
            log.warning("%s from %s received again with different content: the stored copy was kept, the new one "
                        "discarded (storage.duplicates = \"keep-first\"; storage commitment will not confirm it)",
                        _short(header), calling_ae)
        elif outcome is Outcome.REPLACED:
            log.warning("%s from %s received again with different content: replaced", _short(header), calling_ae)
        return IngestResult(outcome, "", header.sop_instance_uid, header.study_uid, header)

    def _conflict(self, conn, conflict: HierarchyConflict, header: InstanceHeader, blob: BlobInfo, sha256: str,
                  calling_ae: str | None, job_id: str | None, now: float) -> tuple[Outcome, bool]:
        """Inside the ingest transaction: record the conflict and, with on_conflict "quarantine", keep
        the instance outside the hierarchy. Returns the outcome and whether the new blob is kept."""
        quarantine = self.on_conflict == "quarantine"
        Index.record_conflicts(conn, header, conflict.differences, "quarantined" if quarantine else "refused",
                               calling_ae, now)
        if not quarantine:
            return Outcome.CONFLICT, False
        if conn.execute(_QUARANTINED, {"uid": header.sop_instance_uid, "sha256": sha256}).first():
            return Outcome.QUARANTINED, False             # the same bytes again: already kept
        conn.execute(_QUARANTINE, {
            "uid": header.sop_instance_uid, "sop_class_uid": header.sop_class_uid, "study_uid": header.study_uid,
            "series_uid": header.series_uid, "transfer_syntax": header.transfer_syntax, "size": blob.size,
            "sha256": sha256, "blob_id": blob.blob_id, "calling_ae": calling_ae, "job_id": job_id,
            "reason": str(conflict), "now": now})
        return Outcome.QUARANTINED, True


def dataset_sha256(path: Path) -> str:
    """SHA-256 of a Part 10 file's data set (what the sender sent), as indexed at reception."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(inspect_offset(fh))
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_sha256_of(data: bytes) -> str:
    """`dataset_sha256` of a Part 10 file held in memory."""
    with memoryview(data) as view:
        return hashlib.sha256(view[dataset_offset_of(data):]).hexdigest()


def _free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _short(header: InstanceHeader) -> str:
    """An instance named without patient data (UIDs only), for the log."""
    return f"SOP Instance {header.sop_instance_uid}"
