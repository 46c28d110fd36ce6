"""Storage Commitment Push Model SCP (PS3.4 Annex J): a modality asks before deleting its copy.

N-ACTION (Transaction UID + Referenced SOP Sequence) is answered at once and the request
kept in the index; a worker thread then checks every referenced instance (indexed, of the
same SOP class, its blob readable and its SHA-256 the one recorded at reception, and its
UID not received again since with other content: `Index.not_committable`) and sends
the N-EVENT-REPORT: on the same association while it is open, otherwise on a new one to
the requester's [remote.NAME] node. Reports that cannot be delivered are retried with
backoff, also after a restart. A reused Transaction UID is refused.
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from archive import Archive, IntegrityError
from archive.dicomfile import valid_uid
from archive.storage import BlobNotFound
from node.config import Config

from .tls import no_delay, remote_tls

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
PROCESSING_FAILURE, NO_SUCH_OBJECT, CLASS_INSTANCE_CONFLICT = 0x0110, 0x0112, 0x0119
SUCCESS_EVENT, FAILURE_EVENT = 1, 2
MAX_ITEMS = 10000
SAME_ASSOCIATION_WAIT = 10.0  # seconds to wait for the N-EVENT-REPORT response on the open association


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class Committer:
    """Receives commitment requests (EVT_N_ACTION) and delivers their reports."""

    def __init__(self, archive: Archive, config: Config, retry_base: float = 30.0):
        self.archive, self.config = archive, config
        self.retry_base = retry_base
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._worker.start()

    # -- N-ACTION ------------------------------------------------------------------------

    def handle_action(self, event):
        request = event.request
        calling = event.assoc.requestor.ae_title
        if str(request.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
            return 0x0117, None                                   # invalid object instance
        if request.ActionTypeID != 1:
            return 0x0123, None                                   # no such action
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            items = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                     for i in info.ReferencedSOPSequence]
        except Exception:
            return _status(0x0120, "TransactionUID and ReferencedSOPSequence are required"), None
        if not valid_uid(transaction) or not items or len(items) > MAX_ITEMS or not all(
                valid_uid(c) and valid_uid(i) for c, i in items):
            return _status(0x0115, "invalid Transaction UID or referenced UIDs"), None
        try:
            with self.archive.index.write() as conn:
                conn.execute("INSERT INTO commitments (transaction_uid, calling_ae, items, state, received_at) "
                             "VALUES (?,?,?,?,?)", (transaction, calling, json.dumps(items), "pending", time.time()))
        except sqlite3.IntegrityError:
            log.warning("storage commitment from %s: Transaction UID %s used before", calling, transaction)
            return _status(PROCESSING_FAILURE, "Transaction UID already used"), None
        log.info("storage commitment from %s: %d instances (transaction %s)", calling, len(items), transaction)
        self._queue.put((transaction, event.assoc, 0))
        return 0x0000, None

    # -- the report ----------------------------------------------------------------------

    def resume_pending(self) -> int:
        """Queue the reports not delivered before a restart (new associations)."""
        rows = self.archive.index.query("SELECT transaction_uid FROM commitments WHERE state='pending'")
        for row in rows:
            self._queue.put((row[0], None, 0))
        return len(rows)

    def _run(self) -> None:
        while True:
            transaction, assoc, attempt = self._queue.get()
            try:
                delivered = self.report(transaction, assoc)
            except Exception:
                log.exception("storage commitment %s: report failed", transaction)
                delivered = False
            if not delivered:
                delay = min(600.0, self.retry_base * 2 ** attempt)
                timer = threading.Timer(delay, self._queue.put, args=((transaction, None, attempt + 1),))
                timer.daemon = True
                timer.start()

    def check(self, items: list[tuple[str, str]]) -> tuple[list, list]:
        """(committed items, (class, instance, failure reason) items)."""
        committed, failed = [], []
        for sop_class, sop_instance in items:
            rows = self.archive.index.query(
                "SELECT sop_class_uid, blob_id, sha256 FROM instances WHERE sop_instance_uid=?", (sop_instance,))
            if not rows:
                failed.append((sop_class, sop_instance, NO_SUCH_OBJECT))
                continue
            if rows[0]["sop_class_uid"] != sop_class:
                failed.append((sop_class, sop_instance, CLASS_INSTANCE_CONFLICT))
                continue
            doubt = self.archive.index.not_committable(sop_instance)   # the requester's copy may not be ours
            if doubt:
                log.warning("storage commitment: instance %s not committed: %s (m3dicom status --conflicts)",
                            sop_instance, doubt)
                failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
                continue
            try:
                with self.archive.exported(rows[0]["blob_id"], rows[0]["sha256"]):
                    committed.append((sop_class, sop_instance))
            except (IntegrityError, BlobNotFound, OSError) as exc:
                log.error("storage commitment: instance %s cannot be read back: %s", sop_instance, exc)
                failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
        return committed, failed

    def report(self, transaction: str, assoc=None) -> bool:
        rows = self.archive.index.query("SELECT calling_ae, items, state FROM commitments WHERE transaction_uid=?",
                                        (transaction,))
        if not rows or rows[0]["state"] != "pending":
            return True
        calling = rows[0]["calling_ae"]
        committed, failed = self.check([tuple(i) for i in json.loads(rows[0]["items"])])
        report = Dataset()
        report.TransactionUID = transaction
        report.RetrieveAETitle = self.config.node.ae_title
        report.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
        if failed:
            report.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in failed]
        event_type = FAILURE_EVENT if failed else SUCCESS_EVENT
        if not self._send(report, event_type, calling, assoc):
            return False
        with self.archive.index.write() as conn:
            conn.execute("UPDATE commitments SET state='reported', failures=?, reported_at=? WHERE transaction_uid=?",
                         (len(failed), time.time(), transaction))
        log.info("storage commitment %s reported to %s: %d committed, %d failed", transaction, calling,
                 len(committed), len(failed))
        return True

    def _send(self, report: Dataset, event_type: int, calling: str, assoc) -> bool:
        if assoc is not None and assoc.is_established:
            # the modality may be releasing meanwhile: do not wait a full DIMSE timeout for it
            assoc.dimse_timeout = min(assoc.dimse_timeout or SAME_ASSOCIATION_WAIT, SAME_ASSOCIATION_WAIT)
            try:
                status = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                                   WELL_KNOWN_INSTANCE)[0]
                if status is not None and status.get("Status") == 0:
                    return True
            except Exception as exc:  # the peer went away meanwhile: try a new association
                log.warning("storage commitment report on the open association failed: %s", exc)
        remote = self.config.remote_by_ae(calling)
        if remote is None:
            log.warning("storage commitment report for %s: association closed and no [remote] node has "
                        "that AE title; kept for retry", calling)
            return False
        ae = AE(ae_title=self.config.node.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        options = {"ae_title": remote.ae_title, "evt_handlers": [(evt.EVT_CONN_OPEN, no_delay)],
                   "ext_neg": [build_role(StorageCommitmentPushModel, scp_role=True)]}
        tls = remote_tls(remote, self.config)
        if tls:
            options["tls_args"] = tls
        try:
            peer = ae.associate(remote.host, remote.port, **options)
        except OSError as exc:
            log.warning("storage commitment report to %s: %s", remote.ae_title, exc)
            return False
        if not peer.is_established:
            log.warning("storage commitment report to %s: association refused", remote.ae_title)
            return False
        try:
            status = peer.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                              WELL_KNOWN_INSTANCE)[0]
            return status is not None and status.get("Status") == 0
        finally:
            peer.release()


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item
