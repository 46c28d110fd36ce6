"""Storage Commitment Push Model SCP (PS3.4 Annex J): a modality asks before deleting its copy.

N-ACTION (Transaction UID + Referenced SOP Sequence) is answered at once and the request
kept in the index; a worker thread then checks every referenced instance (indexed, of the
same SOP class, its blob readable and its SHA-256 the one recorded at reception, and its
UID not received again since with other content: `Index.not_committable`) and sends
the N-EVENT-REPORT: on the same association while it is open, otherwise on a new one to
the requester's [remote.NAME] node. Reports that cannot be delivered are retried with
backoff, also after a restart. A reused Transaction UID is refused. Nodes sharing an index: an
instance that another node received and has not offloaded to S3 yet is committed without being
read back here: that node wrote and fsynced its blob before it indexed it, so it is durable there
(it is read back once it is in S3, or on this node when it holds it).

What one requester can make the node do is bounded: an instance named several times in a
request is checked once; a check streams the stored blob through its authenticated
decryption into a hash (`verify`), never writing a decrypted copy; requests are checked a
slice at a time in turn, so a long one does not hold back the others; at most
`commitment.max_pending_per_peer` requests of one calling AE title wait for their report
(one more: 0x0213); a report is tried for `commitment.report_retry_hours`, or given up at
once when nothing could deliver it (association closed, no [remote] node), one log line.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import queue
import struct
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from archive import Archive, IntegrityError
from archive import query as archive_query
from archive.dicomfile import valid_uid
from archive.storage import BlobNotFound

from . import db
from .settings import Settings
from .tls import Reports, no_delay, remote_tls

log = logging.getLogger(__name__)

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
PROCESSING_FAILURE, NO_SUCH_OBJECT, CLASS_INSTANCE_CONFLICT = 0x0110, 0x0112, 0x0119
SUCCESS_EVENT, FAILURE_EVENT = 1, 2
RESOURCE_LIMITATION = 0x0213
MAX_ITEMS = 10000
SAME_ASSOCIATION_WAIT = 10.0  # seconds to wait for the N-EVENT-REPORT response on the open association
RETRY_MAX_DELAY = 600.0       # seconds between two attempts to deliver a report, at most
CHECK_SLICE = 64              # instances checked before the worker turns to the next request (round robin)
MAX_FILE_META = 1 << 20       # a stored file's meta group longer than this is damaged


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class Committer:
    """Receives commitment requests (EVT_N_ACTION) and delivers their reports."""

    def __init__(self, archive: Archive, config: Settings, retry_base: float = 30.0):
        self.archive, self.config = archive, config
        self.retry_base = retry_base
        self.max_pending = config.commitment.max_pending_per_peer
        self.retry_for = config.commitment.report_retry_hours * 3600
        self._reports = Reports(logger=log)
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
            # each instance once: naming one 10,000 times made the worker check it 10,000 times
            items = list(dict.fromkeys((str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                                       for i in info.ReferencedSOPSequence))
        except Exception:
            return _status(0x0120, "TransactionUID and ReferencedSOPSequence are required"), None
        if not valid_uid(transaction) or not items or len(items) > MAX_ITEMS or not all(
                valid_uid(c) and valid_uid(i) for c, i in items):
            return _status(0x0115, "invalid Transaction UID or referenced UIDs"), None
        try:
            pending = db.add(self.archive.index, transaction, calling, items, self.max_pending)
        except db.TransactionReused:
            log.warning("storage commitment from %s: Transaction UID %s used before", calling, transaction)
            return _status(PROCESSING_FAILURE, "Transaction UID already used"), None
        if pending >= self.max_pending:
            self._reports.warning("pending", calling, "storage commitment from %s refused (0x0213): %d requests "
                                  "not yet reported (commitment.max_pending_per_peer)", calling, pending)
            return _status(RESOURCE_LIMITATION, f"{pending} requests pending: wait for their reports"), None
        log.info("storage commitment from %s: %d instances (transaction %s)", calling, len(items), transaction)
        self._queue.put((transaction, event.assoc, 0, None))
        return 0x0000, None

    # -- the report ----------------------------------------------------------------------

    def resume_pending(self) -> int:
        """Queue the reports not delivered before a restart (new associations); those older than
        commitment.report_retry_hours are given up."""
        transactions = db.pending(self.archive.index)
        for transaction in transactions:
            self._queue.put((transaction, None, 0, None))
        return len(transactions)

    def _run(self) -> None:
        """The worker: the requests in hand are checked CHECK_SLICE instances at a time, in turn,
        so that a long request does not hold back the reports of the others."""
        jobs: collections.deque = collections.deque()
        while True:
            try:
                jobs.append(self._job(*self._queue.get(block=not jobs)))
            except queue.Empty:
                pass
            job = jobs.popleft()
            try:
                next(job)
            except StopIteration:
                continue
            jobs.append(job)

    def _job(self, transaction: str, assoc, attempt: int, checked: tuple | None):
        """One attempt at a report, as a generator that yields between slices of its check. A
        report not delivered is tried again later (30 s, doubling up to RETRY_MAX_DELAY) with the
        same check, until commitment.report_retry_hours after the request."""
        request = None
        try:
            request = db.get(self.archive.index, transaction)
            if request is None or request.state != db.PENDING:
                return
            calling = request.calling_ae
            if time.time() - request.received_at > self.retry_for:
                self._give_up(transaction, calling, f"not delivered within {self.retry_for / 3600:g} h "
                                                    "(commitment.report_retry_hours)")
                return
            if checked is None:
                items = request.items
                committed, failed = [], []
                for start in range(0, len(items), CHECK_SLICE):
                    done, refused = self.check(items[start:start + CHECK_SLICE])
                    committed += done
                    failed += refused
                    yield
                checked = (committed, failed)
            if self.report(transaction, calling, checked, assoc):
                return
        except Exception:
            log.exception("storage commitment %s: report failed", transaction)
            request = None
        delay = min(RETRY_MAX_DELAY, self.retry_base * 2 ** attempt)
        if request is not None:   # the last attempt comes when the time is up, and gives up
            delay = min(delay, max(0.0, request.received_at + self.retry_for - time.time()) + 0.1)
        timer = threading.Timer(delay, self._queue.put, args=((transaction, None, attempt + 1, checked),))
        timer.daemon = True
        timer.start()

    def _give_up(self, transaction: str, calling: str, why: str) -> None:
        db.give_up(self.archive.index, transaction)
        log.warning("storage commitment %s: report for %s given up: %s; the requester has to ask again",
                    transaction, calling, why)

    def check(self, items: list[tuple[str, str]]) -> tuple[list, list]:
        """(committed items, (class, instance, failure reason) items)."""
        committed, failed = [], []
        held = archive_query.stored(self.archive.index, [sop_instance for _, sop_instance in items])
        for sop_class, sop_instance in items:
            found = held.get(sop_instance)
            if found is None:
                failed.append((sop_class, sop_instance, NO_SUCH_OBJECT))
                continue
            if found.sop_class_uid != sop_class:
                failed.append((sop_class, sop_instance, CLASS_INSTANCE_CONFLICT))
                continue
            doubt = self.archive.index.not_committable(sop_instance)   # the requester's copy may not be ours
            if doubt:
                log.warning("storage commitment: instance %s not committed: %s (m3dicom status --conflicts)",
                            sop_instance, doubt)
                failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
                continue
            holder = self.archive.held_elsewhere(found.blob_id)
            if holder is not None:      # another node received it: it fsynced the blob before it indexed it
                log.debug("storage commitment: instance %s committed as held by node %s (durable there, not in S3 "
                         "yet: not read back)", sop_instance, holder)
                committed.append((sop_class, sop_instance))
                continue
            try:
                verify(self.archive, found.blob_id, found.sha256)   # no decrypted copy written
                committed.append((sop_class, sop_instance))
            except (IntegrityError, BlobNotFound, OSError) as exc:
                log.error("storage commitment: instance %s cannot be read back: %s", sop_instance, exc)
                failed.append((sop_class, sop_instance, PROCESSING_FAILURE))
        return committed, failed

    def report(self, transaction: str, calling: str, checked: tuple[list, list], assoc=None) -> bool:
        """Send the report of a check: True once it is delivered or given up, False to try again."""
        committed, failed = checked
        report = Dataset()
        report.TransactionUID = transaction
        report.RetrieveAETitle = self.config.node.ae_title
        report.ReferencedSOPSequence = [_item(c, i) for c, i in committed]
        if failed:
            report.FailedSOPSequence = [_item(c, i, reason) for c, i, reason in failed]
        event_type = FAILURE_EVENT if failed else SUCCESS_EVENT
        sent = self._send(report, event_type, calling, assoc)
        if sent is None:   # retrying cannot help: the configuration stays as it is until a restart
            self._give_up(transaction, calling, "its association is closed and no [remote] node has that AE title")
            return True
        if not sent:
            return False
        db.reported(self.archive.index, transaction, len(failed))
        log.info("storage commitment %s reported to %s: %d committed, %d failed", transaction, calling,
                 len(committed), len(failed))
        return True

    def _send(self, report: Dataset, event_type: int, calling: str, assoc) -> bool | None:
        """Delivered (True), not now (False), or nowhere to deliver it (None)."""
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
            return None
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


def verify(archive: Archive, blob_id: str, sha256: str) -> None:
    """Read a stored instance through its authenticated decryption and check the SHA-256 of its
    data set against the one indexed at reception, without writing a decrypted copy (as
    `Archive.exported` does for a retrieve): memory stays at one segment. Raises IntegrityError
    (or BlobNotFound)."""
    digest, head, offset = hashlib.sha256(), bytearray(), None
    for chunk in archive.storage.read(blob_id):
        if offset is not None:
            digest.update(chunk)
            continue
        head += chunk
        offset = _dataset_offset(head, complete=False)
        if offset is not None:
            digest.update(memoryview(head)[offset:])
            head = bytearray()
        elif len(head) > MAX_FILE_META:
            raise IntegrityError(f"blob {blob_id}: no data set within its first {MAX_FILE_META} bytes")
    if offset is None:
        offset = _dataset_offset(head, complete=True)
        digest.update(memoryview(head)[offset:])
    if digest.hexdigest() != sha256:
        raise IntegrityError(f"blob {blob_id}: data set does not match its indexed SHA-256")


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _dataset_offset(head: bytearray, complete: bool) -> int | None:
    """Where the data set starts in the Part 10 bytes `head` (after the preamble, "DICM" and the
    group 0002 elements, explicit VR little endian), or None while `head` may be too short to
    tell (when `complete`, `head` is the whole file)."""
    if len(head) < 132:
        if complete:
            raise IntegrityError("stored file shorter than a Part 10 preamble")
        return None
    if head[128:132] != b"DICM":
        raise IntegrityError("stored file is not DICOM Part 10")
    pos, end = 132, len(head)
    while end - pos >= 8 and head[pos:pos + 2] == b"\x02\x00":
        vr, length = bytes(head[pos + 4:pos + 6]), struct.unpack_from("<H", head, pos + 6)[0]
        pos += 8
        if vr in _LONG_VRS:
            if end - pos < 4:
                break
            length = struct.unpack_from("<I", head, pos)[0]
            pos += 4
        if length > end - pos:
            break
        pos += length
    else:
        if end - pos >= 8 or complete:
            return pos
        return None
    if complete:
        raise IntegrityError("stored file's meta information is truncated")
    return None
