"""One export: a study's de-identified copies made and sent to one destination.

1. the profile and its secret are read (a missing secret fails the export at once, with what to do);
2. every instance of the study (analysis results included, trusted as free of burned-in text) is read
   back decrypted and verified, de-identified (`engine.Deidentifier`), and written to a private spool
   folder in the data directory; instances that may show burned-in text are dropped and counted;
3. the originals behind the pseudonym and the copy's study are kept, sealed (`store.remember`);
4. the copies go to the destination: a [remote.NAME] node by C-STORE (TLS as configured), or
   "s3://bucket/prefix/" as Part 10 objects named by the copy's UIDs, with server-side encryption.
The export succeeds only when every copy was accepted; otherwise it fails with the reason and is tried
again (copies keep their UIDs, so a retry stores nothing twice). The copies never enter the archive.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from archive import Archive, IntegrityError
from archive.dicomfile import InvalidInstance, read_dataset
from archive.inputs import study_instances
from archive.storage import BlobNotFound

from ..settings import DeidProfile, Settings, check_s3_place
from ..intake import backoff
from . import store
from .engine import Copy, DeidError, Deidentifier

log = logging.getLogger(__name__)

SECRET_BYTES = 32
RETRY_MAX_DELAY = 600.0
MAX_SECRET_BYTES = 4096


class ExportError(RuntimeError):
    """The export cannot be done (the reason is kept on the export); `final`: trying again cannot help until
    someone changes something (the configuration, the secret), so it is not retried."""

    def __init__(self, message: str, final: bool = False):
        super().__init__(message)
        self.final = final


@dataclass
class Outcome:
    total: int = 0
    sent: int = 0
    dropped: int = 0
    pseudonym: str | None = None
    reasons: dict | None = None          # why instances were dropped -> how many


def secret_path(config: Settings, name: str) -> Path:
    profile = config.deid[name]
    return profile.secret_file or config.data_dir / "deid" / f"{name}.key"


def make_secret(config: Settings, name: str, replace: bool = False) -> Path:
    """A new random secret for the project (0600). Replacing one gives every patient a new pseudonym, new UIDs
    and a new date shift in the copies made from then on: they no longer link to the earlier copies."""
    if name not in config.deid:
        raise ExportError(f"no [deid.{name}] profile in the configuration")
    path = secret_path(config, name)
    if path.exists() and not replace:
        raise ExportError(f"{path} exists (give --rotate to replace it, which changes every pseudonym)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)
    return path


def read_secret(config: Settings, name: str) -> bytes:
    path = secret_path(config, name)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ExportError(f"[deid.{name}] has no secret at {path}: make one with `m3dicom deid secret {name} "
                          "--config FILE` (the node's configuration)", final=True) from None
    except OSError as exc:
        raise ExportError(f"[deid.{name}]: its secret {path} cannot be read: {exc.strerror or exc}",
                          final=True) from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SECRET_BYTES:   # a directory, a FIFO, a stray file
        raise ExportError(f"[deid.{name}]: {path} is not a secret (a regular file of at most {MAX_SECRET_BYTES} "
                          f"bytes; `m3dicom deid secret {name} --rotate` makes one)", final=True)
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ExportError(f"{path} may be read by others (mode {stat.S_IMODE(info.st_mode):o}): chmod 600 it",
                          final=True)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"[deid.{name}]: its secret {path} cannot be read: {exc.strerror or exc}",
                          final=True) from None
    if len(data) < 16:
        raise ExportError(f"{path} holds {len(data)} bytes; a secret has at least 16 (`m3dicom deid secret {name} "
                          "--rotate` makes a new one)", final=True)
    return data


def check_destination(config: Settings, destination: str) -> None:
    if destination.startswith("s3://"):
        try:
            check_s3_place("destination", destination)
        except ValueError as exc:
            raise ExportError(str(exc), final=True) from None
    elif destination not in config.remote and destination not in config.dicomweb:
        known = ", ".join([*config.remote, *config.dicomweb]) or "none"
        raise ExportError(f"no [remote.{destination}] node or [dicomweb.{destination}] server (configured: {known}), "
                          "and not an s3://bucket/prefix/ place", final=True)


def run(archive: Archive, config: Settings, export: store.Export, worker: str,
        progress: Callable[[Outcome], None] = lambda outcome: None, outcome: Outcome | None = None,
        lost: threading.Event | None = None) -> Outcome:
    """Make and send the export's copies into `outcome`; raises ExportError (or what sending raised) when it
    cannot, and stops when `lost` is set (another router holds the export now)."""
    profile: DeidProfile | None = config.deid.get(export.profile)
    if profile is None:
        raise ExportError(f"no [deid.{export.profile}] profile in the configuration", final=True)
    check_destination(config, export.destination)
    deid = Deidentifier(profile, read_secret(config, export.profile))
    instances = study_instances(archive.index, export.study_uid)
    if not instances:
        raise ExportError(f"study {export.study_uid} has no instances in the archive", final=True)
    outcome = outcome or Outcome()
    outcome.total, outcome.reasons = len(instances), {}
    spool = archive.data_dir / "spool" / "deid"
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=spool, prefix=f"{export.id}-"))
    try:
        copies = _make(archive, deid, export, instances, folder, outcome, progress, lost or threading.Event())
        if not copies:                  # nothing sent is not a copy sent: said, not reported as done
            reasons = "; ".join(f"{n} {why}" for why, n in outcome.reasons.items())
            raise ExportError(f"every instance was left out ({reasons})", final=True)
        _send(archive, config, profile, export.destination, copies, outcome, progress, lost or threading.Event())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return outcome


def _make(archive, deid, export, instances, folder, outcome, progress, lost) -> list[tuple[Path, str]]:
    """The copies, written to `folder`: the received instances first, then the node's results, each of which is
    trusted (no burned-in text) only when the images it was made from were sent too (the CAD's Secondary Capture
    shows its source's pixels)."""
    copies, remembered, left_out = [], set(), set()
    instances = sorted(instances, key=lambda i: i.result)
    for number, instance in enumerate(instances):
        if lost.is_set():
            raise ExportError("another router holds this export now (its lease ended): stopped")
        try:
            with archive.exported(instance.blob_id, instance.sha256) as path:
                ds = read_dataset(path, archive.limits, pixels=True)
        except (IntegrityError, BlobNotFound, InvalidInstance, OSError) as exc:
            raise ExportError(f"instance {number + 1} of {len(instances)} cannot be read back: {exc}") from None
        sources = {str(ref.get("ReferencedSOPInstanceUID", "")) for ref in ds.get("SourceImageSequence", [])}
        if instance.result and sources & left_out:
            copy = Copy(deid.patient(ds), dropped="made from an image that was left out")
        else:
            copy = deid.apply(ds, trusted=instance.result)
        if outcome.pseudonym is not None and copy.patient.pseudonym != outcome.pseudonym:
            # the archive files a study under one Patient ID, but the copy's patient is also the issuer, or the
            # name and birth date when there is no ID: a copy must never put two pseudonyms in one study
            raise ExportError(f"instance {number + 1} of {len(instances)} names another patient than the study's "
                              "first (Patient ID, Issuer of Patient ID, or name and birth date without an ID): "
                              "not exported", final=True)
        outcome.pseudonym = copy.patient.pseudonym
        if copy.dataset is None:
            left_out.add(instance.sop_instance_uid)
            outcome.dropped += 1
            outcome.reasons[copy.dropped] = outcome.reasons.get(copy.dropped, 0) + 1
            continue
        out = copy.dataset
        study = str(out.StudyInstanceUID)
        if study not in remembered:
            store.remember(archive.index, archive.keyring, project=export.profile, pseudonym=copy.patient.pseudonym,
                           key_mac=deid.keys.check(copy.patient.key),
                           patient={"patient_id": copy.patient.original_id, "patient_name": copy.patient.original_name,
                                    "issuer": str(ds.get("IssuerOfPatientID", "") or "")},
                           study_uid=study, study={"study_uid": export.study_uid,
                                                   "accession_number": str(ds.get("AccessionNumber", "") or "")})
            remembered.add(study)
        target = folder / f"{number:06d}.dcm"
        try:
            out.save_as(target, enforce_file_format=True)
        except (ValueError, TypeError, OverflowError) as exc:
            raise DeidError(f"the copy of instance {number + 1} cannot be written: {exc}") from None
        if shutil.disk_usage(folder).free < max(archive.min_free_bytes, 64 << 20):
            raise ExportError("the data directory's disk is nearly full (the copies are spooled there before they "
                              "are sent; storage.min_free_bytes): the export waits for space")
        key = f"{out.StudyInstanceUID}/{out.SeriesInstanceUID}/{out.SOPInstanceUID}.dcm"
        copies.append((target, f"{copy.patient.pseudonym}/{key}"))
        if number % 10 == 0:
            progress(outcome)
    return copies


def _send(archive, config, profile, destination, copies, outcome, progress, lost) -> None:
    if destination.startswith("s3://"):
        bucket, prefix = check_s3_place("destination", destination)
        _to_s3(config, profile, bucket, prefix, copies, outcome, progress, lost)
        return
    if destination in config.dicomweb:
        _to_stow(destination, config.dicomweb[destination], copies, outcome, progress, lost)
        return
    from scp.scu import SendError, send_to_remote

    def one_more(_: int) -> None:
        outcome.sent += 1
        progress(outcome)
    try:
        report = send_to_remote(config.remote[destination], config, [path for path, _ in copies], one_more)
    except SendError as exc:
        raise ExportError(f"{destination}: {exc}") from None
    outcome.sent = report.sent
    if report.failed or report.skipped:
        path, why = (report.failed or report.skipped)[0]
        raise ExportError(f"{destination} accepted {report.sent} of {len(copies)} copies (refused: {why})")


def _to_s3(config, profile, bucket, prefix, copies, outcome, progress, lost) -> None:
    from archive.s3 import client, error_code

    s3 = client(config.storage.s3.endpoint_url, config.storage.s3.region, config.storage.s3.timeout)
    extra = {"ServerSideEncryption": profile.s3_sse}
    if profile.s3_sse == "aws:kms" and profile.s3_kms_key_id:
        extra["SSEKMSKeyId"] = profile.s3_kms_key_id
    for number, (path, key) in enumerate(copies):
        if lost.is_set():
            raise ExportError("another router holds this export now (its lease ended): stopped")
        try:
            with path.open("rb") as body:
                s3.put_object(Bucket=bucket, Key=prefix + key, Body=body, ContentType="application/dicom", **extra)
        except Exception as exc:         # botocore's errors: the reason, not a traceback
            code = error_code(exc) or type(exc).__name__
            hint = (" (boto3 finds none: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role, "
                    "in the environment of the node, or of this command when run by hand)"
                    if code == "NoCredentialsError" else "")
            raise ExportError(f"s3://{bucket}/{prefix}: {code}: {exc}"[:500] + hint) from None
        outcome.sent = number + 1
        if number % 10 == 0:
            progress(outcome)


def _to_stow(name, server, copies, outcome, progress, lost) -> None:
    """STOW-RS (dicomweb-client), in requests of at most `batch_bytes`; every part must be stored."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from pydicom import dcmread

    session = requests.Session()
    if server.ca_certificates:
        session.verify = str(server.ca_certificates)
        session.trust_env = False          # REQUESTS_CA_BUNDLE in the environment would win over `verify`
    if server.token_file is not None:
        try:
            if stat.S_IMODE(server.token_file.stat().st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
                raise ExportError(f"[dicomweb.{name}].token_file {server.token_file} may be read by others: chmod "
                                  "600 it", final=True)
            token = server.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ExportError(f"[dicomweb.{name}].token_file: {exc}", final=True) from None
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(server.url, session=session, timeout=server.timeout)
    batch, size = [], 0
    for number, (path, _) in enumerate(copies):
        batch.append(path)
        size += path.stat().st_size
        if size >= server.batch_bytes or number == len(copies) - 1:
            if lost.is_set():
                raise ExportError("another router holds this export now (its lease ended): stopped")
            try:
                answer = client.store_instances(datasets=[dcmread(p) for p in batch])
            except requests.RequestException as exc:
                raise ExportError(f"{name}: {type(exc).__name__}: {exc}"[:500]) from None
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                reason = failed[0].get("FailureReason", "?")
                raise ExportError(f"{name} refused {len(failed)} of {len(batch)} copies (failure reason {reason})")
            outcome.sent += len(batch)
            batch, size = [], 0
            progress(outcome)


def execute(archive: Archive, config: Settings, export_id: str, worker: str, lease: float = 60.0,
            progress: Callable[[Outcome], None] | None = None, clock=time.time, claimed: bool = False) -> store.Export:
    """Claim the export (`claimed`: the caller made it running, `store.create_running`), run it, record how it
    ended; its row afterwards. Used by the router and the CLI. The lease is renewed every quarter of itself,
    sending included; when renewing fails (another router took the export over), the run stops."""
    index = archive.index
    if not claimed and not store.claim(index, export_id, worker, clock(), lease):
        found = store.get(index, export_id)
        raise ExportError(f"export {export_id} is not waiting to run (it is {found.state if found else 'unknown'})")
    last = [0.0]

    def report(outcome: Outcome) -> None:
        now = clock()
        if now - last[0] >= 1.0:
            last[0] = now
            store.progress(index, export_id, worker, total=outcome.total, sent=outcome.sent, dropped=outcome.dropped,
                           pseudonym=outcome.pseudonym)
        if progress is not None:
            progress(outcome)

    def keep_lease(done: threading.Event, lost: threading.Event) -> None:
        while not done.wait(lease / 4):
            try:
                if not store.renew(index, export_id, worker, clock() + lease):
                    lost.set()
                    return
            except Exception as exc:    # the index away for a moment: the next round tries again
                log.warning("export %s: lease not renewed: %s", export_id, exc)

    outcome, done, lost = Outcome(), threading.Event(), threading.Event()
    renewer = threading.Thread(target=keep_lease, args=(done, lost), name=f"deid-lease-{export_id}", daemon=True)
    renewer.start()
    try:
        run(archive, config, store.get(index, export_id), worker, report, outcome, lost)
    except (ExportError, DeidError, store.PseudonymClash) as exc:
        final = getattr(exc, "final", True)         # a data set that cannot be de-identified stays so
        _counts(index, export_id, worker, outcome)
        store.fail(index, export_id, worker, str(exc), clock(), clock() + _retry_in(index, export_id), final=final)
        log.warning("export %s failed: %s", export_id, exc)
    except Exception as exc:             # kept on the export, tried again
        log.exception("export %s", export_id)
        _counts(index, export_id, worker, outcome)
        store.fail(index, export_id, worker, f"{type(exc).__name__}: {exc}", clock(),
                   clock() + _retry_in(index, export_id))
    else:
        _counts(index, export_id, worker, outcome)
        if store.succeed(index, export_id, worker, clock()):
            log.info("export %s: %d copies sent to %s, %d left out", export_id, outcome.sent, store.get(
                index, export_id).destination, outcome.dropped)
        else:
            log.warning("export %s: every copy was sent, but another router holds it now", export_id)
    finally:
        done.set()
        renewer.join()
    return store.get(index, export_id)


def _counts(index, export_id: str, worker: str, outcome: Outcome) -> None:
    store.progress(index, export_id, worker, total=outcome.total, sent=outcome.sent, dropped=outcome.dropped,
                   pseudonym=outcome.pseudonym)


def _retry_in(index, export_id: str) -> float:
    """Seconds before the next attempt: the forwards' backoff (5 s doubling, jitter), at most 10 minutes."""
    found = store.get(index, export_id)
    return backoff(found.attempts if found else 1, RETRY_MAX_DELAY)
