"""C-MOVE and C-GET SCP: stored instances go out byte for byte, as they were received.

pynetdicom runs the retrieve protocol (pending responses with the remaining / completed /
failed / warning counts, the Failed SOP Instance UID List, C-CANCEL); our handlers say
which instances, and where. Its sub-operation loop only accepts pydicom Datasets and would
re-encode them, so each instance is handed over as a `StoredInstance` (a Dataset naming
the instance, plus the path of its decrypted Part 10 file) and the associations that send
them stream that file unchanged (`FileSendingAssociation`, pynetdicom's chunked send).
"""
from __future__ import annotations

import logging
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from archive import Archive, IntegrityError
from archive import query as archive_query
from archive.query import LEVELS, UNIQUE, Match, Query, QueryError, model_of
from archive.storage import BlobNotFound

from . import audit
from .handlers import measured, visit_of
from .settings import Settings
from .tls import no_delay, remote_tls

log = logging.getLogger(__name__)
MAX_CONTEXTS = 128
PAGE = 500   # matches read from the index at a time: a retrieve never holds them all


class StoredInstance(Dataset):
    """An instance to send: its UIDs as elements (for pynetdicom's failed list) and its file."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, path: Path | None):
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.__dict__["file_path"] = path  # not a DICOM element


class FileSendingAssociation(Association):
    """Sends a StoredInstance as the bytes of its file (STORE_SEND_CHUNKED_DATASET is on)."""

    def send_c_store(self, dataset, *args, **kwargs):
        if isinstance(dataset, StoredInstance):
            if dataset.file_path is None:
                raise ValueError(f"instance {dataset.SOPInstanceUID} cannot be read back")
            dataset = dataset.file_path
        return super().send_c_store(dataset, *args, **kwargs)


class NodeAE(AE):
    """The node's AE; a C-MOVE whose destination cannot be reached fails its sub-operations.

    pynetdicom answers 0xA801 "Move Destination unknown" whenever the association to a
    destination fails, even a configured one that merely refused the connection. With
    `unreachable` (a list), a failed association is reported there and a stand-in is
    returned, so that the C-MOVE handler answers 0xA702 with every instance in the failed
    list and the reason in the Error Comment (PS3.4 C.4.2.1.4).
    """

    def associate(self, addr: str, port: int, *args, unreachable: list | None = None, refused: bool = False,
                  **kwargs):
        if refused:   # the C-MOVE was refused before any sub-operation: nothing to connect to
            return _NoAssociation()
        assoc = super().associate(addr, port, *args, **kwargs)
        if unreachable is None or assoc.is_established:
            return assoc
        unreachable.append(_why_not(assoc, addr, port))
        return _NoAssociation()


class _NoAssociation:
    """What pynetdicom's C-MOVE loop holds when the destination could not be reached: the
    handler yields the failure before any sub-operation is sent."""

    is_established = True

    def release(self) -> None:
        pass

    def send_c_store(self, *args, **kwargs):
        raise RuntimeError("the move destination could not be reached")


def _why_not(assoc, addr: str, port: int) -> str:
    if assoc.is_rejected:
        return "rejected the association"
    try:   # pynetdicom reports a failed connection as an abort: say what the connection does
        socket.create_connection((addr, port), timeout=3).close()
    except ConnectionRefusedError:
        return "refused the connection"
    except TimeoutError:
        return "did not answer"
    except OSError as exc:
        return f"cannot be reached ({exc.strerror or type(exc).__name__})"
    return "aborted the association (TLS?)"


def sends_stored_files(event) -> None:
    """EVT_ESTABLISHED on the C-MOVE destination association (and on a C-GET's, which the node's
    request handler makes a FileSendingAssociation from the start: scp.fastpath.FastAssociation)."""
    if not isinstance(event.assoc, FileSendingAssociation):
        event.assoc.__class__ = FileSendingAssociation


class Retrieve:
    """The instances a C-MOVE / C-GET identifier names, read from the index a page at a time.

    Retrieve keys are unique keys (PS3.4 C.4.2.2.1: single value or list of UID matching):
    the unique key of the retrieve level must be given, and no unique key may hold a wildcard
    ("*" or "?": PatientID "?*" named every patient). More than `limit` instances
    (`query.max_retrieve_instances`) are refused before any is sent. Raises QueryError with
    the status and the comment the requestor gets."""

    def __init__(self, archive: Archive, sop_class_uid: str, identifier: Dataset, limit: int):
        self.archive = archive
        asked = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
        for level in LEVELS[:LEVELS.index(asked) + 1] if asked in LEVELS else ():    # said first: clearer than
            key = UNIQUE[level]                                                     # the matcher's UID check
            if any("*" in v or "?" in v for v in _values(identifier, key)):
                raise QueryError(f"{key}: no wildcards in a retrieve's unique keys")
        query = Query(model_of(sop_class_uid), identifier)
        for level in LEVELS[:LEVELS.index(query.level) + 1]:
            key = UNIQUE[level]
            values = _values(identifier, key)
            if any("*" in v or "?" in v for v in values):
                raise QueryError(f"{key}: no wildcards in a retrieve's unique keys")
            if level == query.level and not values:
                raise QueryError(f"a {query.level} retrieve needs {key}")
        self.query = query
        self.count = archive_query.instance_count(archive.index, query)
        self.kinds = archive_query.instance_kinds(archive.index, query, MAX_CONTEXTS + 1)
        if self.count > limit:
            raise QueryError(f"{self.count} instances, at most {limit}: retrieve less at once", 0xA702)

    def __iter__(self) -> Iterator[Match]:
        """At most `count` matches (those indexed since the count are left out), PAGE at a time."""
        last, left = 0, self.count
        while left > 0:
            page = archive_query.instances(self.archive.index, self.query, last, min(PAGE, left))
            if not page:
                return
            yield from page
            last, left = page[-1].pk, left - len(page)


def _values(identifier: Dataset, keyword: str) -> list[str]:
    """The values of an identifier's key, a multi-value or a backslash-separated string ([] when
    absent or empty)."""
    value = identifier.get(keyword)
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else str(value or "").split("\\")
    return [text for text in (str(v).strip() for v in items) if text]


def matches(archive: Archive, sop_class_uid: str, identifier: Dataset, limit: int = 65535) -> Retrieve:
    """The instances a C-MOVE / C-GET identifier names (see `Retrieve`)."""
    return Retrieve(archive, sop_class_uid, identifier, limit)


def _refusal(event, kind: str, exc: Exception) -> tuple[Dataset, Dataset]:
    """The final response of a retrieve refused before any sub-operation, logged once."""
    code, comment = (exc.status, str(exc)) if isinstance(exc, QueryError) else (
        0xC000, "the identifier cannot be decoded")
    if not isinstance(exc, QueryError):
        log.debug("%s identifier from %s cannot be decoded", kind, event.assoc.requestor.ae_title, exc_info=True)
    why = exc.reason if isinstance(exc, QueryError) else comment      # the peer's values stay out of the log
    log.warning("%s from %s refused (0x%04X): %s", kind, event.assoc.requestor.ae_title, code, why)
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    failed = Dataset()
    failed.FailedSOPInstanceUIDList = ""
    return status, failed


def _instances(event, archive: Archive, found):
    """(status, StoredInstance) for pynetdicom's sub-operation loop; each decrypted file lives
    in the receiver's spool directory until pynetdicom asks for the next one."""
    for match in found:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        with ExitStack() as stack:
            try:
                path = stack.enter_context(archive.exported(match.blob_id, match.sha256))
            except (IntegrityError, BlobNotFound, OSError) as exc:
                log.error("instance %s cannot be read back: %s", match.sop_instance_uid, exc)
                path = None
            yield 0xFF00, StoredInstance(match.sop_class_uid, match.sop_instance_uid, path)


def _audited(assoc, archive: Archive, found: Retrieve, destination: tuple[str, str] | None) -> None:
    """Begin Transferring, a message per study (at most 100); an index that fails here fails the audit message,
    never the retrieve."""
    visit = visit_of(assoc)
    if visit is None or visit.audit is None:
        return
    try:
        studies = archive_query.studies_named(archive.index, found.query)
    except Exception as exc:
        log.error("audit: the studies of a retrieve could not be read (%s): no message for it", type(exc).__name__)
        return
    audit.retrieving(visit.audit, assoc, studies, destination)


def _counted(assoc) -> None:
    visit = visit_of(assoc)
    if visit is not None:
        visit.retrieves += 1


def _status_of(item, last: int | None) -> int | None:
    """The status in one item of a retrieve handler's answers (see `handlers.measured`)."""
    if isinstance(item, tuple) and len(item) == 2:
        first = item[0]
        if first is None:
            return 0xA801                         # unknown destination: pynetdicom answers it
        if isinstance(first, int):
            return first
        if isinstance(first, Dataset):
            return int(first.Status)
    return last


def handle_move(event, archive: Archive, config: Settings):
    """EVT_C_MOVE: to a [remote.NAME] node known by its AE title; unknown: 0xA801. A refused
    identifier gets its failure status without a connection to the destination."""
    _counted(event.assoc)
    return measured("move", _move(event, archive, config), _status_of, "completed")


def _move(event, archive: Archive, config: Settings):
    request = event.request
    calling = event.assoc.requestor.ae_title
    try:
        found = matches(archive, str(request.AffectedSOPClassUID), event.identifier,
                        config.query.max_retrieve_instances)
    except Exception as exc:
        refusal = _refusal(event, "C-MOVE", exc)
        if not isinstance(event.assoc.ae, NodeAE):
            raise
        yield "refused", 0, {"refused": True}   # NodeAE connects nowhere
        yield 1                                   # pynetdicom sends a failure only after a count
        yield refusal
        return
    destination = config.remote_by_ae(str(request.MoveDestination).strip())
    if destination is None:
        log.warning("C-MOVE from %s to unknown destination %r", calling, str(request.MoveDestination))
        yield None, None
        return
    pairs = sorted(found.kinds)
    if len(pairs) > MAX_CONTEXTS:
        log.warning("C-MOVE to %s: more than %d kinds of instances, only %d presentation contexts: the rest fail",
                    destination.ae_title, MAX_CONTEXTS, MAX_CONTEXTS)
    log.info("C-MOVE from %s: %d instances to %s", calling, found.count, destination.ae_title)
    _audited(event.assoc, archive, found, (destination.ae_title, destination.host))
    options = {"ae_title": destination.ae_title, "max_pdu": config.dicom.max_pdu_size,
               "contexts": [build_context(sop_class, [syntax]) for sop_class, syntax in pairs[:MAX_CONTEXTS]],
               "evt_handlers": [(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_ESTABLISHED, sends_stored_files)]}
    tls = remote_tls(destination, config)
    if tls:
        options["tls_args"] = tls
    if isinstance(event.assoc.ae, NodeAE):
        options["unreachable"] = unreachable = []
    else:
        unreachable = []
    yield destination.host, destination.port, options
    yield found.count
    if unreachable:   # the sub-operations cannot be performed: all of them fail, with the reason
        where = f"{destination.ae_title} ({destination.host}:{destination.port})"
        log.warning("C-MOVE from %s to %s failed: %s", calling, where, unreachable[0])
        status = Dataset()
        status.Status = 0xA702
        status.ErrorComment = f"{where} {unreachable[0]}"[:64]
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = [m.sop_instance_uid for m in found]
        yield status, failed
        return
    yield from _instances(event, archive, found)


def handle_get(event, archive: Archive, config: Settings | None = None):
    """EVT_C_GET: the instances come back on the requestor's association (it is the storage SCP)."""
    _counted(event.assoc)
    return measured("get", _get(event, archive, config), _status_of, "completed")


def _get(event, archive: Archive, config: Settings | None):
    limit = config.query.max_retrieve_instances if config is not None else 65535
    try:
        found = matches(archive, str(event.request.AffectedSOPClassUID), event.identifier, limit)
    except Exception as exc:
        refusal = _refusal(event, "C-GET", exc)
        yield 1                                   # pynetdicom sends a failure only after a count
        yield refusal
        return
    log.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title, found.count)
    _audited(event.assoc, archive, found, None)
    yield found.count
    yield from _instances(event, archive, found)
