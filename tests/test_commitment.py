"""Storage commitment (push model) over real associations: same association, new association,
a missing instance, a reused transaction, and a restart in between."""
from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel

from helpers import data_file, free_port, wait_for
from scp.commitment import WELL_KNOWN_INSTANCE
from scp.tls import client_context, server_context

pytestmark = pytest.mark.interop


def _request(transaction: str, uids: list[str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Modality:
    """The requesting modality: an SCU towards the node, and an SCP for reports on new associations."""

    def __init__(self, node, port: int | None = None):
        self.node, self.reports, self.arrived = node, [], threading.Event()
        self.ae = AE(ae_title="MODALITY")
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.server = None
        if port:
            self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
            tls = server_context(node.pki / "server.pem", node.pki / "server.key", node.pki / "ca.pem", True)
            self.server = self.ae.start_server(("127.0.0.1", port), block=False, ssl_context=tls,
                                               evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)])

    def _on_report(self, event):
        self.reports.append((event.request.EventTypeID, event.event_information, event.assoc.is_requestor))
        self.arrived.set()
        return 0x0000, None

    def associate(self, listen: bool = True):
        tls = client_context(self.node.pki / "ca.pem", self.node.pki / "client.pem", self.node.pki / "client.key")
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_report)] if listen else []
        assoc = self.ae.associate("127.0.0.1", self.node.port, ae_title="M3DICOM", tls_args=(tls, "localhost"),
                                  evt_handlers=handlers)
        assert assoc.is_established
        return assoc

    def commit(self, assoc, transaction: str, uids: list[str]) -> int:
        status, _ = assoc.send_n_action(_request(transaction, uids), 1, StorageCommitmentPushModel,
                                        WELL_KNOWN_INSTANCE)
        return status.Status

    def stop(self):
        if self.server:
            self.server.shutdown()


def _stored_uids(node, count: int) -> list[str]:
    uids = []
    for _ in range(count):
        ds = pydicom.dcmread(data_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = node.workdir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        node.storescu(path)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _referenced(report: Dataset) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]


def test_all_present_reported_on_the_same_association(node):
    uids = _stored_uids(node, 3)
    modality = Modality(node)
    assoc = modality.associate()
    transaction = generate_uid()
    try:
        assert modality.commit(assoc, transaction, uids) == 0x0000
        assert modality.arrived.wait(30), node.log()[-2000:]
    finally:
        assoc.release()
    again = modality.associate()
    try:  # the same transaction again is refused
        assert modality.commit(again, transaction, uids) == 0x0110
    finally:
        again.release()
    ((event_type, report, on_requestor_side),) = modality.reports
    assert event_type == 1 and on_requestor_side
    assert str(report.TransactionUID) == transaction and sorted(_referenced(report)) == sorted(uids)
    assert "FailedSOPSequence" not in report
    assert node.rows("SELECT state, failures FROM commitments") == [("reported", 0)]


def test_missing_instance_reported_on_a_new_association_after_a_restart(make_node):
    port = free_port()
    node = make_node(remote={"MOD": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": port,
                                     "server_name": "localhost"}})
    present = _stored_uids(node, 1)
    missing = generate_uid()
    transaction = generate_uid()
    modality = Modality(node)  # not listening yet: the report cannot be delivered
    assoc = modality.associate(listen=False)
    assert modality.commit(assoc, transaction, present + [missing]) == 0x0000
    assoc.abort()
    wait_for(lambda: "report to MODALITY" in node.log(), timeout=30, what="a first delivery attempt")
    assert node.rows("SELECT state FROM commitments") == [("pending",)]
    node.stop()
    listening = Modality(node, port)
    try:
        node.start()  # pending reports are delivered after a restart
        assert listening.arrived.wait(30), node.log()[-2000:]
    finally:
        listening.stop()
    ((event_type, report, on_requestor_side),) = listening.reports
    assert event_type == 2 and not on_requestor_side  # a new association, initiated by the node
    assert _referenced(report) == present
    (failed,) = report.FailedSOPSequence
    assert str(failed.ReferencedSOPInstanceUID) == missing and failed.FailureReason == 0x0112
    assert node.rows("SELECT state, failures FROM commitments") == [("reported", 1)]


def test_malformed_requests_are_refused(node):
    modality = Modality(node)
    assoc = modality.associate()
    try:
        no_transaction = _request(generate_uid(), [generate_uid()])
        del no_transaction.TransactionUID
        status, _ = assoc.send_n_action(no_transaction, 1, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assert status.Status == 0x0120
        assert modality.commit(assoc, "not-a-uid", [generate_uid()]) == 0x0115
    finally:
        assoc.release()
    assert node.rows("SELECT COUNT(*) FROM commitments") == [(0,)]


def test_a_uid_received_again_with_other_content_is_not_committed(make_node, tmp_path):
    """Patient B's instance re-using patient A's SOP Instance UID was answered 0x0000, discarded
    (keep-first), nothing recorded, and commitment then confirmed it: the modality would delete
    its only copy. Now: another patient's instance under a stored UID is refused (0xC000), the
    same instance with other bytes is kept-first but recorded, and neither UID is committed."""
    from test_hostile_data import after_the_attack, instance, send_raw, stored_before, uid_of

    node = make_node(router={"enabled": False})
    state = stored_before(node, tmp_path)
    study = generate_uid()
    first = instance(tmp_path / "a", study=study, patient_id="DUP-A", patient_name="First^Patient")
    resent = instance(tmp_path / "b", study=study, patient_id="DUP-A", patient_name="First^Patient")
    clean = instance(tmp_path / "c", study=study, patient_id="DUP-A", patient_name="First^Patient")
    node.storescu(first, resent, clean)
    state.update(node.stored_state())
    reused, again = uid_of(first), uid_of(resent)
    other_patient = instance(tmp_path / "d", study=generate_uid(), patient_id="DUP-B", patient_name="Second^Patient",
                             SOPInstanceUID=reused)
    assert send_raw(node, other_patient) == (0xC000, "SOP Instance UID is an instance of another patient")
    other_bytes = instance(tmp_path / "e", study=study, series=str(pydicom.dcmread(resent).SeriesInstanceUID),
                           patient_id="DUP-A", patient_name="First^Patient", SOPInstanceUID=again,
                           StudyDescription="sent again, edited")
    assert send_raw(node, other_bytes) == (0x0000, "")                       # keep-first: documented Success
    log = node.log()
    assert f"SOP Instance {again} from HOSTILE received again with different content: the stored copy was kept, " \
           "the new one discarded" in log
    assert node.rows("SELECT sop_instance_uid, attribute, action, reason FROM conflicts ORDER BY seq") == [
        (reused, "PatientID", "refused", "its SOP Instance UID is an instance of another patient"),
        (again, "SOPInstanceUID", "discarded", "received again with different content")]
    modality = Modality(node)
    assoc = modality.associate()
    try:
        assert modality.commit(assoc, generate_uid(), [reused, again, uid_of(clean)]) == 0x0000
        assert modality.arrived.wait(30), node.log()[-2000:]
    finally:
        assoc.release()
    ((event_type, report, _),) = modality.reports
    assert event_type == 2 and _referenced(report) == [uid_of(clean)]
    assert {(str(i.ReferencedSOPInstanceUID), i.FailureReason) for i in report.FailedSOPSequence} == {
        (reused, 0x0110), (again, 0x0110)}
    assert node.log().count("not committed: received again since with other content") == 2
    status = node.cli("status").stdout
    assert "1 instances refused" in status and "1 received again with other bytes and discarded" in status
    listed = node.cli("status", "--conflicts").stdout
    assert "its SOP Instance UID is an instance of another patient: the index has 'DUP-A', the instance 'DUP-B'" \
        in listed
    assert "received again with different content: the index has 'data set SHA-256" in listed
    assert "storage commitment does not confirm this UID" in listed
    for value in ("First", "Second", "DUP-A", "DUP-B"):
        assert value not in node.log()
    after_the_attack(node, tmp_path, state)
