"""Results come home: staged outputs become archive instances and kept files, then go to PACS.

DICOM results are ingested through the same path as a modality's C-STORE (durable, indexed,
offloaded), marked with their job; other files (X3D, JSON) are kept as blobs linked to the
job. Result UIDs come from the job, so taking the results of a job run again after a crash
stores nothing twice. Outputs that a worker sharing the node's storage staged in the local
store are adopted as they are (read once to check them, not encrypted and written again);
those staged in S3 by a worker of another machine are copied in. Forwarding is C-STORE (TLS
where configured) to the rule's [remote.NAME] nodes, retried with backoff; each failure is
kept on the job's forward row.
"""
from __future__ import annotations

import hashlib
import logging
import random
import tempfile
from contextlib import ExitStack
from pathlib import Path

from archive import Archive, IntegrityError
from archive.inputs import filed
from archive.storage import BlobInfo, BlobNotFound

from . import queue
from .settings import Settings
from .task import StagedOutput

log = logging.getLogger(__name__)


class IntakeError(RuntimeError):
    """A result could not be stored (the attempt fails; nothing of it is kept)."""


def _fetch(archive: Archive, output: StagedOutput, directory: Path) -> Path:
    """The staged blob's plaintext in a private file, checked against the worker's SHA-256."""
    digest = hashlib.sha256()
    handle = tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".out")
    with handle:
        for chunk in archive.storage.read(output.blob_id):
            digest.update(chunk)
            handle.write(chunk)
    if digest.hexdigest() != output.sha256:
        raise IntegrityError(f"staged result {output.name} does not match the worker's SHA-256")
    return Path(handle.name)


def _check(archive: Archive, output: StagedOutput) -> None:
    """The staged blob reads back (authenticated) as the plaintext the worker hashed."""
    digest = hashlib.sha256()
    for chunk in archive.local.read(output.blob_id):
        digest.update(chunk)
    if digest.hexdigest() != output.sha256:
        raise IntegrityError(f"staged result {output.name} does not match the worker's SHA-256")


def _adoptable(archive: Archive, output: StagedOutput) -> BlobInfo | None:
    """The staged blob as the archive's own, when it is in the node's local store."""
    if output.in_s3:
        return None
    try:
        return BlobInfo(output.blob_id, output.size, archive.local.path(output.blob_id).stat().st_size)
    except FileNotFoundError:
        return None


def discard(archive: Archive, outputs) -> None:
    """Remove staged blobs (local, or in S3 when a remote worker staged them there), but never
    one the archive adopted (an instance's blob, or a result file the router holds)."""
    for output in outputs:
        if archive.index.blob_referenced(output.blob_id):
            continue
        archive.local.remove(output.blob_id)
        if archive.remote is not None:
            try:
                archive.remote.remove(output.blob_id)
            except Exception as exc:  # a leftover staging object is garbage, not a loss
                log.warning("staged result %s not removed from S3: %s", output.blob_id, exc)


def take_results(archive: Archive, job_id: str, study_uid: str, outputs, spool: Path) -> int:
    """Store every output of a job; one transaction records them. Returns how many."""
    rows, files = [], []
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=spool)))
        for output in outputs:
            adopted = _adoptable(archive, output)
            try:
                if output.kind == "dicom":       # its plaintext is inspected, as a modality's is
                    path = _fetch(archive, output, directory)
                elif adopted is not None:
                    _check(archive, output)
                else:
                    path = _fetch(archive, output, directory)
            except (IntegrityError, BlobNotFound) as exc:
                raise IntakeError(f"result {output.name}: {exc}") from None
            if output.kind == "dicom":
                result = archive.ingest_file(path, job_id=job_id, staged=adopted)
                if not result.outcome.ok:
                    raise IntakeError(f"result {output.name} refused by the archive: {result.reason}")
                rows.append(queue.Result("dicom", output.name, output.media_type, result.sop_instance_uid, None,
                                         output.size, output.sha256))
                continue
            if adopted is not None:
                blob_id = adopted.blob_id
            else:
                with open(path, "rb") as fh:
                    blob_id = archive.local.create(iter(lambda: fh.read(1 << 20), b"")).blob_id
                files.append(blob_id)
            rows.append(queue.Result("file", output.name, output.media_type, None, blob_id, output.size,
                                     output.sha256))
    try:
        with archive.index.write() as conn:
            queue.record_results(conn, job_id, study_uid, rows)
    except Exception:
        for blob_id in files:
            archive.local.remove(blob_id)
        raise
    discard(archive, outputs)
    return len(rows)


def forward(archive: Archive, config: Settings, job_id: str, destination: str) -> str:
    """C-STORE a job's DICOM results to [remote.`destination`]; '' on success, else why not."""
    try:
        return _forward(archive, config, job_id, destination)
    except Exception as exc:  # whatever goes wrong is kept on the forward row, and retried
        log.exception("forwarding job %s to %s", job_id, destination)
        return f"{type(exc).__name__}: {exc}"


def _forward(archive: Archive, config: Settings, job_id: str, destination: str) -> str:
    from scp.scu import SendError, send_to_remote

    remote = config.remote.get(destination)
    if remote is None:
        return f"no [remote.{destination}] node in the configuration"
    found = filed(archive.index, queue.dicom_results(archive.index, job_id)).values()
    with ExitStack() as stack:
        try:
            paths = [stack.enter_context(archive.exported(f.blob_id, f.sha256)) for f in found]
        except (IntegrityError, BlobNotFound, OSError) as exc:
            return f"a result cannot be read back: {exc}"
        try:
            report = send_to_remote(remote, config, paths)
        except SendError as exc:
            return str(exc)
    if report.failed:
        path, why = report.failed[0]
        return f"{len(report.failed)} of {len(paths)} refused ({why})"
    return ""


def backoff(attempts: int, cap: float) -> float:
    """Seconds before the next forward attempt: 5 s doubling, capped, with jitter."""
    return min(cap, 5.0 * 2 ** min(attempts, 20)) * random.uniform(0.5, 1.0)
