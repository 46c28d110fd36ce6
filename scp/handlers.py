"""Event handlers: thin translations between DIMSE and the archive.

Each handler gets its dependencies as extra arguments (bound in `scp.server`); the
statuses are chosen on purpose: 0xA700 out of resources, 0xA900 data set does not match
the SOP class, 0xC000 cannot understand, 0x0110 processing failure.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import UID

from archive import Archive, Outcome, metrics
from archive.ingest import SHORT_OF_DISK
from archive import db as archive_db
from archive import query as archive_query
from archive.query import Query, QueryError, model_of

from . import audit
from .settings import Settings

log = logging.getLogger(__name__)

_STATUS = {
    Outcome.STORED: 0x0000,
    Outcome.ALREADY_STORED: 0x0000,
    Outcome.DUPLICATE_KEPT_FIRST: 0x0000,
    Outcome.REPLACED: 0x0000,
    Outcome.INVALID: 0xC000,
    Outcome.MISMATCH: 0xA900,
    Outcome.CONFLICT: 0xC000,       # study of another patient / series of another study: cannot be filed
    Outcome.QUARANTINED: 0x0000,    # kept durably outside the hierarchy (ingest.on_conflict = "quarantine")
    Outcome.STORAGE_FULL: 0xA700,
    Outcome.FAILURE: 0x0110,
}


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


class Visit:
    """What one association did: its closing log line, and the audit trail's messages (`scp.audit`)."""

    def __init__(self, calling_ae: str, address: str, port: int):
        self.calling_ae, self.address, self.port = calling_ae, address, port
        self.started = time.monotonic()
        self.stored = self.bytes = self.refused = self.queries = self.retrieves = 0
        self.studies: dict[str, dict] = {}   # study UID -> {"patient": (id, name), "accession", "classes": {}}
        self.audit = None                     # the archive's atna.Recorder, when the node keeps an audit trail
        self.established = False              # accepted (a rejected one gets no line of this kind)

    def filed(self, header, size: int) -> None:
        self.stored += 1
        self.bytes += size
        if header is None:
            return
        study = self.studies.setdefault(header.study_uid, {
            "patient": (header.attrs.get("PatientID") or "", header.attrs.get("PatientName") or ""),
            "accession": header.attrs.get("AccessionNumber") or "", "classes": {}})
        study["classes"][header.sop_class_uid] = study["classes"].get(header.sop_class_uid, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.stored} instances stored ({self.bytes / 1e6:.1f} MB)"] if self.stored or not (
            self.queries or self.retrieves) else []
        parts += [f"{self.refused} refused"] if self.refused else []
        parts += [f"{self.queries} queries"] if self.queries else []
        parts += [f"{self.retrieves} retrieves"] if self.retrieves else []
        return f"{', '.join(parts)} in {time.monotonic() - self.started:.1f} s"


def visit_of(assoc) -> Visit | None:
    return getattr(assoc, "m3dicom_visit", None)


def store(archive: Archive, path, sop_class: str, sop_instance: str, assoc) -> tuple[int, str]:
    """Ingest one received file (on association `assoc`): the C-STORE status and its error comment.

    Success only once the instance is durable (blob fsynced, index committed). Shared by
    the fast path (`scp.fastpath`) and pynetdicom's own C-STORE path below.
    """
    calling_ae, visit = assoc.requestor.ae_title, visit_of(assoc)
    started, measure = time.perf_counter(), metrics.get()
    try:
        result = archive.ingest_file(path, sop_class, sop_instance, calling_ae)
    except Exception:
        log.exception("C-STORE from %s failed", calling_ae)
        measure.stores_refused.labels("0x0110").inc()
        if visit is not None:
            visit.refused += 1
        return 0x0110, "processing failure"
    code = _STATUS[result.outcome]
    if code:
        log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae, code, result.reason)
        measure.stores_refused.labels(f"0x{code:04X}").inc()
        if visit is not None:
            visit.refused += 1
    else:
        title, size = metrics.ae_label(calling_ae), _size_of(path)
        measure.instances_received.labels(title).inc()
        measure.bytes_received.labels(title).inc(size)
        measure.store_seconds.observe(time.perf_counter() - started)
        if visit is not None:
            visit.filed(result.header, size)
    return code, result.reason if code else ""


def _size_of(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:   # moved or removed by the ingest: counted as nothing rather than failing the answer
        return 0


# -- what one C-STORE may take while its data set arrives -----------------------------------------

RATE_WINDOW = 60.0          # seconds over which dicom.min_store_rate is measured
FREE_SPACE_EVERY = 16 << 20  # bytes received between two looks at the disk's free space


@dataclass(frozen=True)
class Refusal:
    """A C-STORE the node will not keep: `status` and `comment` for the peer; with `abort` the
    data set cannot even be waited for (it does not arrive) and the association is aborted."""
    status: int
    comment: str
    abort: bool = False


@dataclass(frozen=True)
class Reception:
    """The limits on one C-STORE while its data set is received and spooled (`scp.fastpath`):

    - the free space of the data directory's disk stays above `min_free_bytes`
      (storage.min_free_bytes): below it a C-STORE is refused before anything is spooled,
      and one being spooled is dropped (0xA700), so the disk never fills up;
    - a data set is at most `max_bytes` (ingest.max_instance_bytes): past it the spool file
      is dropped at once, the rest read and dropped, and 0xA700 answered;
    - it arrives within `max_seconds` (dicom.max_store_seconds) and at `min_rate` bytes per
      second or more over each RATE_WINDOW (dicom.min_store_rate): else the association is
      aborted (a trickling peer would hold its spool file and slot forever).
    """
    max_bytes: int
    min_free_bytes: int
    max_seconds: float
    min_rate: int
    free_bytes: Callable[[], int]

    @classmethod
    def of(cls, config: Settings) -> "Reception":
        return cls(config.ingest.max_instance_bytes, config.storage.min_free_bytes, config.dicom.max_store_seconds,
                   config.dicom.min_store_rate, free_space_of(config.data_dir))

    def start(self, now: float | None = None) -> "Tally":
        """A new C-STORE's count; refused at once (`Tally.refusal`) when the disk is short."""
        return Tally(self, time.monotonic() if now is None else now)


def free_space_of(directory: Path) -> Callable[[], int]:
    def free() -> int:
        stat = os.statvfs(directory)
        return stat.f_bavail * stat.f_frsize
    return free


class Tally:
    """One C-STORE's data set as it arrives: `add()` each fragment; `refusal` once refused."""

    def __init__(self, limits: Reception, now: float):
        self.limits, self.started = limits, now
        self.received = self._window_bytes = 0
        self._window_start, self._next_look = now, FREE_SPACE_EVERY
        self.refusal: Refusal | None = None
        if limits.min_free_bytes and limits.free_bytes() < limits.min_free_bytes:
            self.refusal = Refusal(0xA700, SHORT_OF_DISK)

    def add(self, count: int, now: float | None = None) -> Refusal | None:
        """Count `count` more bytes; the refusal (the first one stays) or None."""
        if self.refusal is not None:
            return self.refusal
        limits, now = self.limits, time.monotonic() if now is None else now
        self.received += count
        self._window_bytes += count
        if self.received > limits.max_bytes:
            self.refusal = Refusal(0xA700, f"data set over {_size(limits.max_bytes)} (ingest.max_instance_bytes)")
        elif limits.max_seconds and now - self.started > limits.max_seconds:
            self.refusal = Refusal(0xA700, f"data set still arriving after {limits.max_seconds:g} s "
                                           "(dicom.max_store_seconds)", abort=True)
        elif now - self._window_start >= RATE_WINDOW:
            if limits.min_rate and self._window_bytes < limits.min_rate * (now - self._window_start):
                self.refusal = Refusal(0xA700, f"data set arriving at under {limits.min_rate} bytes/s "
                                               "(dicom.min_store_rate)", abort=True)
            self._window_start, self._window_bytes = now, 0
        if self.refusal is None and limits.min_free_bytes and self.received >= self._next_look:
            self._next_look = self.received + FREE_SPACE_EVERY
            if limits.free_bytes() < limits.min_free_bytes:
                self.refusal = Refusal(0xA700, SHORT_OF_DISK)
        return self.refusal


def _size(count: int) -> str:
    return f"{count / (1 << 30):g} GiB" if count >= 1 << 30 else f"{count / (1 << 20):g} MiB"


def handle_store(event, archive: Archive) -> Dataset | int:
    """EVT_C_STORE, for the requests the fast path leaves to pynetdicom."""
    request = event.request
    announced, context = str(request.AffectedSOPClassUID), str(event.context.abstract_syntax)
    if announced != context:   # PS3.7 9.1.1: the SOP class is the presentation context's
        comment = f"{UID(announced).name} sent on a {UID(context).name} context"
        log.warning("C-STORE from %s refused (0xA900): %s", event.assoc.requestor.ae_title, comment)
        metrics.get().stores_refused.labels("0xA900").inc()
        return _status(0xA900, comment)
    code, comment = store(archive, event.dataset_path, context, str(request.AffectedSOPInstanceUID), event.assoc)
    return code if code == 0 else _status(code, comment)


def handle_closed(event) -> None:
    """EVT_CONN_CLOSE: a data set cut off by an abort leaves no spool file behind."""
    drop = getattr(event.assoc.dimse, "drop", None)
    if drop is not None:
        drop()
    visit = visit_of(event.assoc)
    if visit is not None and visit.established:
        event.assoc.m3dicom_visit = None
        log.info("association from %s (%s:%s): %s", visit.calling_ae, visit.address, visit.port, visit.summary())
        if visit.audit is not None and visit.studies:
            audit.stored(visit.audit, event.assoc, visit)


def outcome(status: int | None) -> str:
    """A final DIMSE status as a metric label: success, warning, cancel, failure (pending: not final)."""
    if status is None:
        return "abandoned"          # the association ended before the final answer
    if status == 0x0000:
        return "success"
    if status == 0xFE00:
        return "cancel"
    if status in (0xFF00, 0xFF01):
        return "abandoned"
    if 0xB000 <= status <= 0xBFFF or status in (0x0001, 0x0107, 0x0116):
        return "warning"
    return "failure"


def measured(service: str, answers: Iterator, status_of: Callable[[object, int | None], int | None],
             ended_as: str = "success") -> Iterator:
    """`answers` (a C-FIND, C-MOVE or C-GET handler's generator) passed on, counted and timed by service and
    outcome (`metrics.dimse_requests`, `dimse_seconds`); `status_of(item, last)` reads the status of each
    item. A generator run to its end without a final status ended as `ended_as`: a C-FIND's in success; a
    retrieve's "completed", every sub-operation tried (pynetdicom, not the handler, then weighs their
    outcomes into the final status)."""
    started, status, ended = time.perf_counter(), None, False
    try:
        for item in answers:
            status = status_of(item, status)
            yield item
        ended = True
    finally:
        close = getattr(answers, "close", None)
        if close is not None:
            close()
        said = ended_as if ended and status in (None, 0xFF00, 0xFF01) else outcome(status)
        measure = metrics.get()
        measure.dimse_requests.labels(service, said).inc()
        measure.dimse_seconds.labels(service).observe(time.perf_counter() - started)


def find(archive: Archive, config: Settings, calling_ae: str, sop_class: str, identifier: Callable[[], Dataset],
         cancelled: Callable[[], bool], explicit_vr: bool | None = None) -> Iterator[tuple[int, str, object]]:
    """C-FIND: Patient Root and Study Root, every level; at most `query.max_results` matches.

    Yields (status, error comment, identifier): a pending status with a match, then one
    final status without. A match is a Dataset for pynetdicom's path, or bytes already
    encoded in the context's Little Endian transfer syntax (`explicit_vr`) for the fast
    path (`scp.fastpath`).
    """
    return measured("find", _find(archive, config, calling_ae, sop_class, identifier, cancelled, explicit_vr),
                    lambda item, last: item[0])


def _find(archive: Archive, config: Settings, calling_ae: str, sop_class: str, identifier: Callable[[], Dataset],
          cancelled: Callable[[], bool], explicit_vr: bool | None) -> Iterator[tuple[int, str, object]]:
    try:
        query = Query(model_of(sop_class), identifier(), case_insensitive_names=config.query.case_insensitive_names,
                      retrieve_ae=config.node.ae_title)
    except QueryError as exc:   # the peer's value goes back to it (Error Comment), not into the log
        log.warning("C-FIND from %s refused (0x%04X): %s", calling_ae, exc.status, exc.reason)
        yield exc.status, str(exc), None
        return
    except Exception as exc:  # an identifier pydicom cannot decode (its message may quote a value)
        log.warning("C-FIND from %s refused: identifier cannot be decoded (%s)", calling_ae, type(exc).__name__)
        yield 0xC000, "identifier cannot be decoded", None
        return
    limit = config.query.max_results
    pending = 0xFF01 if query.unsupported else 0xFF00  # some optional keys are not supported
    with closing(archive_query.find(archive.index, query, limit + 1, config.query.timeout, explicit_vr)) as matches:
        for count in itertools.count():
            try:
                match = next(matches, None)
            except QueryError as exc:
                log.warning("C-FIND from %s stopped (0x%04X): %s", calling_ae, exc.status, exc.reason)
                yield exc.status, str(exc), None
                return
            except Exception as exc:  # whatever it is, the requestor gets an answer, the log one line
                log.error("C-FIND from %s failed: %s", calling_ae, archive_db.brief(exc))
                yield 0xC001, "the node could not process the query", None
                return
            if match is None:
                break
            if cancelled():
                yield 0xFE00, "", None
                return
            if count == limit:
                log.warning("C-FIND from %s stopped at %d matches", calling_ae, limit)
                yield 0xA700, f"more than {limit} matches: narrow the query", None
                return
            yield pending, "", match
    yield 0x0000, "", None


def counted_query(assoc, request, transfer_syntax: str) -> None:
    """A C-FIND request: counted for the association's line, and audited (the identifier as it came)."""
    visit = visit_of(assoc)
    if visit is None:
        return
    visit.queries += 1
    if visit.audit is not None:
        identifier = request.Identifier
        audit.queried(visit.audit, assoc, str(request.AffectedSOPClassUID),
                      identifier.getvalue() if hasattr(identifier, "getvalue") else b"", transfer_syntax)


def handle_find(event, archive: Archive, config: Settings):
    """EVT_C_FIND, for the queries the fast path leaves to pynetdicom."""
    counted_query(event.assoc, event.request, str(event.context.transfer_syntax))
    for code, comment, match in find(archive, config, event.assoc.requestor.ae_title,
                                     str(event.request.AffectedSOPClassUID), lambda: event.identifier,
                                     lambda: event.is_cancelled):
        if match is not None:
            yield code, match
        elif code:
            yield _status(code, comment) if comment else code, None


def handle_requested(event, archive: Archive | None = None) -> None:
    """EVT_REQUESTED, before the A-ASSOCIATE-AC goes out (so before any C-STORE can arrive): what the association
    will do is kept from here, for its line at the end (handle_closed) and the audit trail."""
    assoc = event.assoc
    visit = assoc.m3dicom_visit = Visit(assoc.requestor.ae_title, assoc.requestor.address, assoc.requestor.port)
    visit.audit = archive.audit if archive is not None else None


def handle_established(event) -> None:
    assoc = event.assoc
    metrics.get().associations.labels(metrics.ae_label(assoc.requestor.ae_title)).inc()
    visit = visit_of(assoc)
    if visit is not None:
        visit.established = True
        visit.calling_ae = assoc.requestor.ae_title     # at EVT_REQUESTED pynetdicom has not read it yet


def handle_rejected(event) -> None:
    assoc = event.assoc
    reason, why = _why_rejected(assoc)
    log.warning("association from %s (%s) rejected: %s", assoc.requestor.ae_title, assoc.requestor.address, why)
    metrics.get().associations_rejected.labels(reason).inc()


def _why_rejected(assoc) -> tuple[str, str]:
    """What pynetdicom checked when it rejected the request (it does not say which): a metric label and words."""
    ae, calling = assoc.ae, assoc.requestor.ae_title
    called = getattr(assoc.requestor.primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    if ae.require_called_aet and called.strip() != assoc.acceptor.ae_title.strip():
        return "called-ae", f"called AE title {called.strip()!r} is not {assoc.acceptor.ae_title.strip()!r}"
    if ae.require_calling_aet and calling.strip() not in [a.strip() for a in ae.require_calling_aet]:
        return "calling-ae", f"calling AE title {calling.strip()!r} is not in dicom.allowed_calling_aets"
    if len(ae.active_associations) > ae.maximum_associations:
        return "limit", f"already {ae.maximum_associations} associations (dicom.max_associations)"
    return "presentation", "no acceptable presentation context or protocol version"
