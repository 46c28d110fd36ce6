"""Storage commitment (push model) over real associations: same association, new association,
a missing instance, a reused transaction, and a restart in between."""
from __future__ import annotations

import threading
import time

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StorageCommitmentPushModel
from sqlalchemy import text

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
        # our answer to the report goes out after `arrived` is set: released before it has, the report would
        # count as undelivered (a loaded CI machine did that once)
        wait_for(lambda: node.rows("SELECT state FROM commitments") == [("reported",)], timeout=30,
                 what="the report acknowledged")
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


# -- hostile requests (second round, commit_amplify.py) ------------------------------------------

def _node_writes(node) -> int:
    """Bytes the node's processes have written (files, pipes, sockets) so far."""
    import psutil

    total = 0
    for proc in node.processes():
        try:
            total += proc.io_counters().write_chars
        except psutil.NoSuchProcess:
            pass
    return total


def _report_within(modality, seconds: float):
    assert modality.arrived.wait(seconds), f"no report within {seconds}s"
    return modality.reports[-1]


def test_an_instance_named_10000_times_is_checked_once_and_never_written_out(make_node, tmp_path):
    """One N-ACTION naming the same 3 MiB instance 10,000 times wrote ~10 GB of decrypted copies in
    60 s, and a modality's commitment right after got no report. Each instance is now named once in
    the report and checked once, by streaming it through the decryption and a hash."""
    from helpers import synthetic_instances

    node = make_node()
    big, small = synthetic_instances(tmp_path / "big", 1, pixel_bytes=3 << 20)[0], _stored_uids(node, 1)
    node.storescu(big)
    big_uid = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    before = node.stored_state()
    hostile, modality = Modality(node), Modality(node)
    hostile.ae.ae_title, modality.ae.ae_title = "HOSTILE", "GOODMOD"
    written = _node_writes(node)
    started = time.monotonic()
    flood = hostile.associate()
    good = modality.associate()
    try:
        assert hostile.commit(flood, generate_uid(), [big_uid] * 10000) == 0x0000
        assert modality.commit(good, generate_uid(), small + [big_uid]) == 0x0000
        _, report, _ = _report_within(modality, 10)
        assert sorted(_referenced(report)) == sorted(small + [big_uid])
        _, report, _ = _report_within(hostile, 10)
        assert _referenced(report) == [big_uid]      # named once, checked once
    finally:
        flood.release()
        good.release()
    assert time.monotonic() - started < 15
    grew = _node_writes(node) - written
    assert grew < 16 << 20, f"the node wrote {grew >> 20} MiB while checking (decrypted copies?)"
    assert not list((node.data_dir / "exports").glob("*")), "a decrypted copy was left behind"
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_requests_pending_from_one_requester_are_bounded(make_node, tmp_path):
    """Reports that cannot be delivered yet (the requester's listener is down) pile up: past
    commitment.max_pending_per_peer, its next request is refused with 0x0213 at once; other
    requesters are not affected."""
    node = make_node(commitment={"max_pending_per_peer": 2},
                     remote={"MOD": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": free_port(),
                                     "server_name": "localhost"}})
    uids = _stored_uids(node, 1)
    before = node.stored_state()
    modality = Modality(node)

    def request():
        assoc = modality.associate(listen=False)
        try:
            return assoc.send_n_action(_request(generate_uid(), uids), 1, StorageCommitmentPushModel,
                                       WELL_KNOWN_INSTANCE)[0]
        finally:
            assoc.abort()   # gone before its report: it goes to the [remote] node, which does not listen

    statuses = [request().Status for _ in range(2)]
    status = request()
    assert statuses == [0x0000, 0x0000]
    assert status.Status == 0x0213 and "2 requests pending" in status.ErrorComment
    assert node.rows("SELECT COUNT(*) FROM commitments WHERE state='pending'") == [(2,)]
    other = Modality(node)
    other.ae.ae_title = "OTHERMOD"
    assoc = other.associate()
    try:
        assert other.commit(assoc, generate_uid(), uids) == 0x0000
        assert other.arrived.wait(10)
    finally:
        assoc.release()
    assert len([l for l in node.log().splitlines() if "commitment.max_pending_per_peer" in l]) == 1
    node.still_serves(tmp_path)
    assert {k: v for k, v in node.stored_state().items() if k in before} == before


def test_a_report_with_nowhere_to_go_is_given_up_at_once(node, tmp_path):
    """No [remote] node for the requester and its association closed: the report was retried
    every 10 minutes forever, each time checking every instance again."""
    uids = _stored_uids(node, 2)
    modality = Modality(node)
    assoc = modality.associate(listen=False)
    transaction = generate_uid()
    assert modality.commit(assoc, transaction, uids) == 0x0000
    assoc.abort()
    wait_for(lambda: node.rows("SELECT state FROM commitments") == [("undeliverable",)], timeout=30,
             what="the report to be given up")
    lines = [l for l in node.log().splitlines() if transaction in l and "given up" in l]
    assert len(lines) == 1 and "no [remote] node" in lines[0], lines
    assert "storage commitment: 0 reports waiting to be delivered, 1 given up" in node.cli("status").stdout
    node.still_serves(tmp_path)


def test_a_report_is_tried_for_report_retry_hours_then_given_up(make_node, tmp_path):
    node = make_node(commitment={"report_retry_hours": 0.001},   # 3.6 s
                     remote={"MOD": {"ae_title": "MODALITY", "host": "127.0.0.1", "port": free_port(),
                                     "server_name": "localhost"}})
    uids = _stored_uids(node, 1)
    modality = Modality(node)
    assoc = modality.associate(listen=False)
    transaction = generate_uid()
    assert modality.commit(assoc, transaction, uids) == 0x0000
    assoc.abort()
    wait_for(lambda: "report to MODALITY" in node.log(), timeout=30, what="a first delivery attempt")
    assert node.rows("SELECT state FROM commitments") == [("pending",)]
    wait_for(lambda: node.rows("SELECT state FROM commitments") == [("undeliverable",)], timeout=15,
             what="the report to be given up")
    lines = [l for l in node.log().splitlines() if transaction in l and "given up" in l]
    assert len(lines) == 1 and "commitment.report_retry_hours" in lines[0], lines
    node.still_serves(tmp_path)


def test_verify_streams_the_same_hash_as_an_export(tmp_path):
    """The check without a decrypted copy hashes what `Archive.exported` hashes, and refuses a
    damaged blob."""
    from archive import Archive, IntegrityError
    from helpers import dataset_sha256, synthetic_instances
    from scp.commitment import verify

    archive = Archive(tmp_path / "var", segment_size=4096)
    try:
        paths = synthetic_instances(tmp_path / "in", 1) + synthetic_instances(tmp_path / "big", 1,
                                                                              pixel_bytes=64 << 10)
        for path in paths:
            archive.ingest_file(path)
        rows = archive.index.read(text("SELECT blob_id, sha256 FROM instances"))
        for row in rows:
            verify(archive, row.blob_id, row.sha256)
            with archive.exported(row.blob_id, row.sha256) as exported:
                assert dataset_sha256(exported) == row.sha256
        with pytest.raises(IntegrityError):
            verify(archive, rows[0].blob_id, "0" * 64)
        blob = archive.storage.path(rows[1].blob_id)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 1
        blob.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            verify(archive, rows[1].blob_id, rows[1].sha256)
    finally:
        archive.close()
