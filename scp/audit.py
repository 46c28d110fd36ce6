"""What DICOM peers did, as IHE ATNA audit messages (`archive.atna`): the studies an association stored, each
query, each retrieve. Nothing is recorded unless [audit] repository is set (`Archive.audit`)."""
from __future__ import annotations

import os

from archive.atna import Event, Participant, Patient, Study
from archive.query import StudyShare


def _peer(assoc, role: str, requestor: bool = True) -> Participant:
    return Participant(assoc.requestor.ae_title.strip(), requestor, role, assoc.requestor.address)


def _node(assoc, role: str, requestor: bool = False) -> Participant:
    return Participant(assoc.acceptor.ae_title.strip(), requestor, role, assoc.acceptor.address or None,
                       alternative_id=str(os.getpid()))


def stored(recorder, assoc, visit, refused: bool = False) -> None:
    """DICOM Instances Transferred, one message per study the association stored instances of."""
    for uid, study in visit.studies.items():
        patient_id, patient_name = study["patient"]
        recorder.record(Event("instances-transferred", action="C",
                              participants=(_peer(assoc, "source"), _node(assoc, "destination")),
                              studies=(Study(uid, dict(study["classes"]), study["accession"] or None),),
                              patient=Patient(patient_id, patient_name or None)))


def queried(recorder, assoc, sop_class: str, identifier: bytes, transfer_syntax: str) -> None:
    """Query: the requestor, the node, and what was asked (the identifier as the peer encoded it, in
    `transfer_syntax`; the first 64 KiB of it)."""
    recorder.record(Event("query", action="E", participants=(_peer(assoc, "source"), _node(assoc, "destination")),
                          query=(sop_class, identifier), query_syntax=transfer_syntax))


def retrieving(recorder, assoc, studies: list[StudyShare], destination: tuple[str, str | None] | None) -> None:
    """Begin Transferring DICOM Instances, one message per study a C-MOVE or C-GET sends: from the node to the
    requestor (C-GET) or to the move destination (C-MOVE, the requestor named as well)."""
    if destination is None:
        parties = (_node(assoc, "source"), _peer(assoc, "destination"))
    else:
        title, address = destination
        parties = (_node(assoc, "source"), Participant(title, False, "destination", address),
                   _peer(assoc, None))
    for share in studies:
        recorder.record(Event("begin-transferring", action="E", participants=parties,
                              studies=(Study(share.study_uid, dict(share.sop_classes), share.accession or None),),
                              patient=Patient(share.patient_id, share.patient_name or None)))


def alert(recorder, address: str, node_ae: str, description: str) -> None:
    """Security Alert: a peer that failed node authentication (its TLS handshake)."""
    recorder.record(Event("security-alert", action="E", outcome="4", event_type="node-authentication",
                          participants=(Participant(address, False, None, address),
                                        Participant(node_ae, True, "application", alternative_id=str(os.getpid()))),
                          description=description[:200]))
