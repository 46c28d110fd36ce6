"""IHE ATNA audit messages (DICOM PS3.15 A.5), built from what the node records, queued durably in the index
(`audit_outbox`) and sent by `archive.atna_send` to the hospital's audit repository.

The events: Application Activity (the node starts and stops), User Authentication (viewer logins and
logouts, failed ones too), DICOM Instances Transferred (received by C-STORE or STOW-RS, sent by C-MOVE or
C-GET), Query (C-FIND, QIDO-RS), Begin Transferring DICOM Instances (C-MOVE, C-GET), DICOM Instances
Accessed (the viewer, share links, WADO-RS), Security Alert (a peer whose TLS handshake failed: node
authentication; at most one per address every 10 s, as the log says it). A message names its patient and
study: the repository is where those belong, the node's log is not.

Writing a message never blocks the work it describes: `Recorder.record` puts it on a bounded in-memory
queue that a thread writes to the outbox every half second, in one transaction (on a crash, what was
not yet written is lost: at most half a second of messages).
"""
from __future__ import annotations

import base64
import datetime
import logging
import queue as queues
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from sqlalchemy import bindparam, text

from .index import Index

log = logging.getLogger(__name__)

DCM = "DCM"
EVENTS = {   # EventID: code, meaning
    "application-activity": ("110100", "Application Activity"),
    "audit-log-used": ("110101", "Audit Log Used"),
    "begin-transferring": ("110102", "Begin Transferring DICOM Instances"),
    "instances-accessed": ("110103", "DICOM Instances Accessed"),
    "instances-transferred": ("110104", "DICOM Instances Transferred"),
    "query": ("110112", "Query"),
    "security-alert": ("110113", "Security Alert"),
    "user-authentication": ("110114", "User Authentication"),
}
EVENT_TYPES = {
    "application-start": ("110120", "Application Start"),
    "application-stop": ("110121", "Application Stop"),
    "login": ("110122", "Login"),
    "logout": ("110123", "Logout"),
    "node-authentication": ("110126", "Node Authentication"),
    "security-roles-changed": ("110136", "Security Roles Changed"),
    "user-security-attributes-changed": ("110137", "User Security Attributes Changed"),
    "use-of-restricted-function": ("110132", "Use of a restricted function"),
}
ROLES = {
    "application": ("110150", "Application"),
    "application-launcher": ("110151", "Application Launcher"),
    "destination": ("110152", "Destination Role ID"),
    "source": ("110153", "Source Role ID"),
}
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
QUEUE_LIMIT = 10000          # messages waiting in memory for the outbox at most; more are dropped, and logged
WRITE_EVERY = 0.5            # seconds between two writes of the queue into the outbox
QUERY_MAX = 4 << 10          # bytes of a query's identifier a Query message carries at most: with base64 and the
                             # rest, a message stays under rsyslog's default 8 KiB (longer ones arrive cut in pieces)


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a person or a process (a DICOM peer: its AE title, at its address)."""
    user_id: str
    requestor: bool
    role: str | None = None
    address: str | None = None
    alternative_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Study:
    """A study as a ParticipantObject, with the SOP classes of its instances (UID -> count)."""
    uid: str
    sop_classes: dict = field(default_factory=dict)
    accession: str | None = None


@dataclass(frozen=True)
class Patient:
    id: str
    name: str | None = None


@dataclass(frozen=True)
class Event:
    kind: str                              # a key of EVENTS
    outcome: str = SUCCESS
    action: str | None = None              # C, R, U, D, E
    event_type: str | None = None          # a key of EVENT_TYPES
    participants: tuple[Participant, ...] = ()
    studies: tuple[Study, ...] = ()
    patient: Patient | None = None
    query: tuple[str, bytes] | None = None  # (SOP Class UID or QIDO path, the identifier or query string)
    query_syntax: str | None = None        # the transfer syntax the identifier is encoded in (C-FIND)
    description: str | None = None         # EventOutcomeDescription
    audit_log: str | None = None           # Audit Log Used: the URI of the audit log that was read
    account: str | None = None             # Security Alert about a user account: its name
    time: float = 0.0


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _safe(element: ET.Element) -> None:
    """Characters XML 1.0 cannot carry (a peer's AE title, a malformed name) written as U+FFFD, everywhere."""
    for node in element.iter():
        if node.text:
            node.text = _NOT_XML.sub("\ufffd", node.text)
        for key, value in node.attrib.items():
            node.attrib[key] = _NOT_XML.sub("\ufffd", value)


def _coded(element: ET.Element, code: tuple[str, str], system: str = DCM) -> ET.Element:
    element.set("csd-code", code[0])
    element.set("codeSystemName", system)
    element.set("originalText", code[1])
    return element


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def to_xml(event: Event, source_id: str, site_id: str = "") -> bytes:
    """The AuditMessage (PS3.15 A.5.1) of `event`, reported by the audit source `source_id`."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification")
    if event.action:
        ident.set("EventActionCode", event.action)
    ident.set("EventDateTime", _iso(event.time))
    ident.set("EventOutcomeIndicator", event.outcome)
    _coded(ET.SubElement(ident, "EventID"), EVENTS[event.kind])
    if event.event_type:
        _coded(ET.SubElement(ident, "EventTypeCode"), EVENT_TYPES[event.event_type])
    if event.description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.description
    for p in event.participants:
        active = ET.SubElement(root, "ActiveParticipant", UserID=p.user_id or "-")
        if p.alternative_id:
            active.set("AlternativeUserID", p.alternative_id)
        if p.name:
            active.set("UserName", p.name)
        active.set("UserIsRequestor", "true" if p.requestor else "false")
        if p.address:
            active.set("NetworkAccessPointID", p.address)
            active.set("NetworkAccessPointTypeCode", "2" if _is_ip(p.address) else "1")
        if p.role:
            _coded(ET.SubElement(active, "RoleIDCode"), ROLES[p.role])
    source = ET.SubElement(root, "AuditSourceIdentification")
    if site_id:
        source.set("AuditEnterpriseSiteID", site_id)
    source.set("AuditSourceID", source_id)
    _coded(ET.SubElement(source, "AuditSourceTypeCode"), ("4", "Application Server"))
    for study in event.studies:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=study.uid,
                            ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="3")
        _coded(ET.SubElement(obj, "ParticipantObjectIDTypeCode"), ("110180", "Study Instance UID"))
        ET.SubElement(obj, "ParticipantObjectName").text = study.uid
        described = ET.SubElement(obj, "ParticipantObjectDescription")
        if study.accession:
            ET.SubElement(described, "Accession", Number=study.accession)
        for sop_class, count in sorted(study.sop_classes.items()):
            ET.SubElement(described, "SOPClass", UID=sop_class, NumberOfInstances=str(count))
    if event.patient is not None:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=event.patient.id or "-",
                            ParticipantObjectTypeCode="1", ParticipantObjectTypeCodeRole="1")
        _coded(ET.SubElement(obj, "ParticipantObjectIDTypeCode"), ("2", "Patient Number"), "RFC-3881")
        ET.SubElement(obj, "ParticipantObjectName").text = event.patient.name or event.patient.id or "-"
    if event.query is not None:
        what, asked = event.query
        asked = asked[:QUERY_MAX]             # an identifier may be 4 MiB: the message carries its start
        obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=what,
                            ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="24")
        _coded(ET.SubElement(obj, "ParticipantObjectIDTypeCode"), ("110181", "SOP Class UID") if event.query_syntax
               else ("QIDO-RS", "DICOMweb query"), DCM if event.query_syntax else "m3dicom")
        ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(asked).decode("ascii")
        if event.query_syntax:
            ET.SubElement(obj, "ParticipantObjectDetail", type="TransferSyntax",
                          value=base64.b64encode(event.query_syntax.encode("ascii", "replace")).decode("ascii"))
    if event.audit_log is not None:          # PS3.15 A.5.3.2
        obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=event.audit_log,
                            ParticipantObjectTypeCode="2", ParticipantObjectTypeCodeRole="13")
        _coded(ET.SubElement(obj, "ParticipantObjectIDTypeCode"), ("12", "URI"), "RFC-3881")
        ET.SubElement(obj, "ParticipantObjectName").text = "Security Audit Log"
    if event.account is not None:            # PS3.15 A.5.3.11: the alert's subject, a user account
        obj = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=event.account,
                            ParticipantObjectTypeCode="1", ParticipantObjectTypeCodeRole="11")
        _coded(ET.SubElement(obj, "ParticipantObjectIDTypeCode"), ("11", "User Identifier"), "RFC-3881")
        ET.SubElement(obj, "ParticipantObjectName").text = event.account
    _safe(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _is_ip(address: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


# -- the outbox ----------------------------------------------------------------------------------------------

_PUT = text("INSERT INTO audit_outbox (node, created_at, message) VALUES (:node, :created_at, :message)")
_TAKE = text("SELECT seq, created_at, message FROM audit_outbox WHERE node = :node ORDER BY seq LIMIT :limit")
_DONE = text("DELETE FROM audit_outbox WHERE seq IN :seqs").bindparams(bindparam("seqs", expanding=True))
_COUNT = text("SELECT COUNT(*), MIN(created_at) FROM audit_outbox WHERE node = :node")


def put(index: Index, node: str, messages: list[tuple[float, bytes]]) -> None:
    """Queue messages (time, XML) of `node` (nodes sharing an index each send their own), in one transaction."""
    if messages:
        with index.write() as conn:
            conn.execute(_PUT, [{"node": node, "created_at": t, "message": m} for t, m in messages])


def take(index: Index, node: str, limit: int = 100) -> list[tuple[int, float, bytes]]:
    """The oldest messages of `node` (sequence number, time, XML), in order."""
    with index.reader() as conn:
        return [(row[0], row[1], bytes(row[2])) for row in conn.execute(_TAKE, {"node": node, "limit": limit})]


def sent(index: Index, seqs: list[int]) -> None:
    """These messages reached the repository (only these: another process's message that committed later with a
    smaller number stays)."""
    if seqs:
        with index.write() as conn:
            conn.execute(_DONE, {"seqs": seqs})


def waiting(index: Index, node: str) -> tuple[int, float | None]:
    """(messages of `node` queued, creation time of the oldest)."""
    with index.reader() as conn:
        count, oldest = conn.execute(_COUNT, {"node": node}).one()
    return int(count), oldest


class Recorder:
    """Takes events from the node's threads without waiting, and writes them to the outbox in the background."""

    def __init__(self, index: Index, node: str, source_id: str, site_id: str = "", clock=None):
        import time

        self.index, self.node, self.source_id, self.site_id = index, node, source_id, site_id
        self.clock = clock or time.time
        self._queue: queues.Queue = queues.Queue(QUEUE_LIMIT)
        self._stop = threading.Event()
        self._dropped = 0
        self._unwritten: list[tuple[float, bytes]] = []   # made, not yet in the outbox (the index refused them)
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="audit-recorder", daemon=True)
        self._thread.start()

    def record(self, event: Event) -> None:
        if not event.time:
            event = Event(**{**event.__dict__, "time": self.clock()})
        if event.query is not None and len(event.query[1]) > QUERY_MAX:     # what waits in memory: what is sent
            event = Event(**{**event.__dict__, "query": (event.query[0], event.query[1][:QUERY_MAX])})
        try:
            self._queue.put_nowait(event)
        except queues.Full:
            self._dropped += 1

    def _run(self) -> None:
        while not self._stop.wait(WRITE_EVERY):
            self.flush()
        self.flush()

    def flush(self) -> None:
        events = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queues.Empty:
                break
        if self._dropped:
            log.error("audit: %d messages dropped (more than %d waited for the index)", self._dropped, QUEUE_LIMIT)
            self._dropped = 0
        self._unwritten += [(e.time, to_xml(e, self.source_id, self.site_id)) for e in events]
        if not self._unwritten:
            return
        if len(self._unwritten) > QUEUE_LIMIT:      # the index away for long: the oldest go, and that is said
            log.error("audit: %d messages dropped (the index took none for a while)",
                      len(self._unwritten) - QUEUE_LIMIT)
            del self._unwritten[:-QUEUE_LIMIT]
        try:
            put(self.index, self.node, self._unwritten)
        except Exception as exc:    # the index away or locked: kept, and tried again at the next write
            if not self._failing:
                log.error("audit: %d messages wait in memory: the index does not take them (%s)",
                          len(self._unwritten), type(exc).__name__)
            self._failing = True
            return
        if self._failing:
            log.info("audit: the index takes messages again (%d written)", len(self._unwritten))
        self._unwritten, self._failing = [], False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
