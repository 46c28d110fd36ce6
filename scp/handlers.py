"""Event handlers: thin translations between DIMSE and the archive.

Each handler gets its dependencies as extra arguments (bound in `scp.server`); the
statuses are chosen on purpose: 0xA700 out of resources, 0xA900 data set does not match
the SOP class, 0xC000 cannot understand, 0x0110 processing failure.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.uid import UID

from archive import Archive, Outcome
from archive.query import Query, QueryError, model_of
from node.config import Config

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


def store(archive: Archive, path, sop_class: str, sop_instance: str, calling_ae: str) -> tuple[int, str]:
    """Ingest one received file: the C-STORE status and its error comment.

    Success only once the instance is durable (blob fsynced, index committed). Shared by
    the fast path (`scp.fastpath`) and pynetdicom's own C-STORE path below.
    """
    try:
        result = archive.ingest_file(path, sop_class, sop_instance, calling_ae)
    except Exception:
        log.exception("C-STORE from %s failed", calling_ae)
        return 0x0110, "processing failure"
    code = _STATUS[result.outcome]
    if code:
        log.warning("C-STORE from %s refused (0x%04X): %s", calling_ae, code, result.reason)
    return code, result.reason if code else ""


def handle_store(event, archive: Archive) -> Dataset | int:
    """EVT_C_STORE, for the requests the fast path leaves to pynetdicom."""
    request = event.request
    announced, context = str(request.AffectedSOPClassUID), str(event.context.abstract_syntax)
    if announced != context:   # PS3.7 9.1.1: the SOP class is the presentation context's
        comment = f"{UID(announced).name} sent on a {UID(context).name} context"
        log.warning("C-STORE from %s refused (0xA900): %s", event.assoc.requestor.ae_title, comment)
        return _status(0xA900, comment)
    code, comment = store(archive, event.dataset_path, context, str(request.AffectedSOPInstanceUID),
                          event.assoc.requestor.ae_title)
    return code if code == 0 else _status(code, comment)


def handle_closed(event) -> None:
    """EVT_CONN_CLOSE: a data set cut off by an abort leaves no spool file behind."""
    drop = getattr(event.assoc.dimse, "drop", None)
    if drop is not None:
        drop()


def find(archive: Archive, config: Config, calling_ae: str, sop_class: str, identifier: Callable[[], Dataset],
         cancelled: Callable[[], bool], explicit_vr: bool | None = None) -> Iterator[tuple[int, str, object]]:
    """C-FIND: Patient Root and Study Root, every level; at most `query.max_results` matches.

    Yields (status, error comment, identifier): a pending status with a match, then one
    final status without. A match is a Dataset for pynetdicom's path, or bytes already
    encoded in the context's Little Endian transfer syntax (`explicit_vr`) for the fast
    path (`scp.fastpath`).
    """
    try:
        query = Query(model_of(sop_class), identifier(), case_insensitive_names=config.query.case_insensitive_names,
                      retrieve_ae=config.node.ae_title)
    except QueryError as exc:
        log.warning("C-FIND from %s refused (0x%04X): %s", calling_ae, exc.status, exc)
        yield exc.status, str(exc), None
        return
    except Exception as exc:  # an identifier pydicom cannot decode
        log.warning("C-FIND from %s refused: %s", calling_ae, exc)
        yield 0xC000, "identifier cannot be decoded", None
        return
    limit = config.query.max_results
    pending = 0xFF01 if query.unsupported else 0xFF00  # some optional keys are not supported
    with archive.index.reader() as conn:
        matches = iter(query.run(conn, limit + 1, config.query.timeout) if explicit_vr is None
                       else query.encoded(conn, explicit_vr, limit + 1, config.query.timeout))
        for count in itertools.count():
            try:
                match = next(matches, None)
            except QueryError as exc:
                log.warning("C-FIND from %s stopped (0x%04X): %s", calling_ae, exc.status, exc)
                yield exc.status, str(exc), None
                return
            except Exception as exc:  # whatever it is, the requestor gets an answer, the log one line
                log.error("C-FIND from %s failed: %s: %s", calling_ae, type(exc).__name__, exc)
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


def handle_find(event, archive: Archive, config: Config):
    """EVT_C_FIND, for the queries the fast path leaves to pynetdicom."""
    for code, comment, match in find(archive, config, event.assoc.requestor.ae_title,
                                     str(event.request.AffectedSOPClassUID), lambda: event.identifier,
                                     lambda: event.is_cancelled):
        if match is not None:
            yield code, match
        elif code:
            yield _status(code, comment) if comment else code, None


def handle_established(event) -> None:
    assoc = event.assoc
    log.info("association from %s (%s:%s)", assoc.requestor.ae_title,
             assoc.requestor.address, assoc.requestor.port)


def handle_rejected(event) -> None:
    assoc = event.assoc
    log.warning("association from %s (%s) rejected: %s", assoc.requestor.ae_title, assoc.requestor.address,
                _why_rejected(assoc))


def _why_rejected(assoc) -> str:
    """What pynetdicom checked when it rejected the request (it does not say which)."""
    ae, calling = assoc.ae, assoc.requestor.ae_title
    called = getattr(assoc.requestor.primitive, "called_ae_title", None) or assoc.acceptor.ae_title
    if ae.require_called_aet and called.strip() != assoc.acceptor.ae_title.strip():
        return f"called AE title {called.strip()!r} is not {assoc.acceptor.ae_title.strip()!r}"
    if ae.require_calling_aet and calling.strip() not in [a.strip() for a in ae.require_calling_aet]:
        return f"calling AE title {calling.strip()!r} is not in dicom.allowed_calling_aets"
    if len(ae.active_associations) > ae.maximum_associations:
        return f"already {ae.maximum_associations} associations (dicom.max_associations)"
    return "no acceptable presentation context or protocol version"
