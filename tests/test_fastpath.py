"""The C-STORE fast path: its encoders against pydicom / pynetdicom, and its fall-backs on a live node."""
from __future__ import annotations

import time
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from helpers import data_file, dataset_offset, wait_for
from scp import fastpath, wire

ODD_UID = "1.2.826.0.1.3680043.8.498.1234567"       # 33 characters: padded
EVEN_UID = "1.2.826.0.1.3680043.8.498.12345678"     # 34 characters


def _command_bytes(message, primitive) -> bytes:
    message.primitive_to_message(primitive)
    (pdata,) = list(message.encode_msg(1, 16382))[:1]
    (context_id, data), *_ = pdata.presentation_data_value_list
    assert data[0] & 1
    return data[1:]


@pytest.mark.parametrize("status,comment", [(0x0000, ""), (0xA700, "no space left on the node"),
                                            (0xC000, "SOPInstanceUID is not a valid UID (odd)")])
@pytest.mark.parametrize("instance", [ODD_UID, EVEN_UID])
def test_store_rsp_is_what_pynetdicom_encodes(status, comment, instance):
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 513
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = instance
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    expected = _command_bytes(C_STORE_RSP(), rsp)
    assert wire.encode_store_rsp(513, CTImageStorage, instance, status, comment) == expected


@pytest.mark.parametrize("max_pdu", [0, 16382, 64])
@pytest.mark.parametrize("status", [0xFF00, 0xFF01])
def test_pending_find_rsp_is_what_pynetdicom_sends(max_pdu, status):
    identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY " + b"\x10\x00\x10\x00\x0a\x00Smith^John" * 9)
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    rsp.Status = status
    rsp.Identifier = identifier
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    expected = [p.presentation_data_value_list for p in message.encode_msg(5, max_pdu)]
    command = wire.encode_find_rsp(3, "1.2.840.10008.5.1.4.1.2.2.1", status)
    ours = [p.presentation_data_value_list for p in wire.p_data(5, command, identifier.getvalue(), max_pdu)]
    assert [[(c, bytes(d)) for c, d in pdvs] for pdvs in ours] == [[(c, bytes(d)) for c, d in pdvs]
                                                                   for pdvs in expected]


def test_p_data_tf_is_what_pynetdicom_decodes():
    command = wire.encode_store_rsp(1, CTImageStorage, ODD_UID, 0)
    raw = wire.p_data_tf(5, command)
    pdu = P_DATA_TF()
    pdu.decode(raw)
    assert pdu.presentation_data_value_items[0].presentation_context_id == 5
    assert pdu.presentation_data_value_items[0].presentation_data_value == b"\x03" + command
    assert pdu.encode() == raw


@pytest.mark.parametrize("source_ae", ["MODALITY", "CT1", ""])
@pytest.mark.parametrize("instance", [ODD_UID, EVEN_UID])
def test_file_meta_is_what_pydicom_writes(source_ae, instance):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buf = BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    expected = b"\0" * 128 + b"DICM" + buf.getvalue()
    assert wire.file_meta(CTImageStorage, instance, JPEGBaseline8Bit, source_ae) == expected
    assert pydicom.dcmread(BytesIO(expected + b"")).file_meta.MediaStorageSOPInstanceUID == instance


def test_store_rq_parsed_from_pynetdicom_encoding():
    rq = C_STORE()
    rq.MessageID = 77
    rq.AffectedSOPClassUID = MRImageStorage
    rq.AffectedSOPInstanceUID = ODD_UID
    rq.Priority = 2
    rq.MoveOriginatorApplicationEntityTitle = "PACS"
    rq.MoveOriginatorMessageID = 3
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00")
    command = _command_bytes(C_STORE_RQ(), rq)
    assert wire.parse_store_rq(command) == wire.StoreRequest(77, MRImageStorage, ODD_UID)
    # anything else is left to pynetdicom: other commands, truncation, foreign groups
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    assert wire.parse_store_rq(_command_bytes(C_ECHO_RQ(), echo)) is None
    assert wire.parse_store_rq(command[:-3]) is None
    assert wire.parse_store_rq(b"\x08\x00" + command[2:]) is None
    assert wire.parse_store_rq(b"") is None


def test_socket_read_cut_short_by_the_peer_returns_what_came():
    """A peer that closes mid-PDU (or after its release) gives the bytes received, no exception."""
    import socket

    ours, theirs = socket.socketpair()
    theirs.sendall(b"\x07\x00\x00")
    theirs.close()
    reader = fastpath.FastSocket.__new__(fastpath.FastSocket)
    reader.socket = ours
    assert reader.recv(6) == b"\x07\x00\x00"
    assert reader.recv(6) == b""
    ours.close()


def test_fast_path_is_on_for_the_pinned_pynetdicom():
    assert fastpath.ENABLED, "pynetdicom differs from the version the fast path was written for"


def test_on_another_pynetdicom_the_node_refuses_to_start_unless_the_fast_path_is_off(monkeypatch, pki, tmp_path):
    from node.config import from_dict
    from node.service import serve
    from scp.server import FastPathError, check_fast_path

    monkeypatch.setattr(fastpath, "ENABLED", False)
    monkeypatch.setattr(fastpath.pynetdicom, "__version__", "9.9.9")
    with pytest.raises(FastPathError, match=r"pynetdicom 9\.9\.9 .* written for 3\.0\.4: install pynetdicom==3\.0\.4, "
                                            r"or set dicom\.fast_path = false"):
        check_fast_path()
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                        "dicom": {"certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key"),
                                  "ca_certificates": str(pki / "ca.pem")}}, tmp_path)
    with pytest.raises(RuntimeError, match="dicom.fast_path = false"):      # `m3dicom serve` prints it, exits 2
        serve(config)
    assert not (tmp_path / "var" / "index.sqlite3").exists()               # nothing opened before the refusal


# -- on a live node --------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def datasets_sent_from_memory(monkeypatch):
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)


def _associate(node, *contexts):
    return node.associate("FASTPATH", *contexts)


@pytest.mark.interop
def test_stores_and_echoes_interleave_on_one_association(node):
    ct, mr = pydicom.dcmread(data_file("CT_small.dcm")), pydicom.dcmread(data_file("MR_small.dcm"))
    assoc = _associate(node, Verification, CTImageStorage, MRImageStorage)
    try:
        statuses = [assoc.send_c_echo().Status, assoc.send_c_store(ct).Status,
                    assoc.send_c_echo().Status, assoc.send_c_store(mr).Status,
                    assoc.send_c_store(ct).Status]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0, 0]
    stored = node.rows("SELECT sop_instance_uid, calling_ae FROM instances ORDER BY pk")
    assert stored == [(ct.SOPInstanceUID, "FASTPATH"), (mr.SOPInstanceUID, "FASTPATH")]
    header = pydicom.dcmread(BytesIO(node.stored_bytes(ct.SOPInstanceUID)), stop_before_pixels=True)
    assert header.file_meta.SourceApplicationEntityTitle == "FASTPATH"


@pytest.mark.interop
def test_request_off_its_context_takes_the_stock_path_and_is_answered(node):
    """A C-STORE naming MR on the CT context: pynetdicom's path answers 0xA900, no hang."""
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    buf = BytesIO()
    pydicom.dcmwrite(buf, ct, enforce_file_format=True)
    data_set = buf.getvalue()[dataset_offset(buf.getvalue()):]
    assoc = _associate(node, CTImageStorage, MRImageStorage)
    try:
        ct_context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage)
        rq = C_STORE()
        rq.MessageID = 9
        rq.AffectedSOPClassUID = MRImageStorage
        rq.AffectedSOPInstanceUID = ct.SOPInstanceUID
        rq.Priority = 0
        rq.DataSet = BytesIO(data_set)
        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_*() do: its reactor must
        while not assoc._is_paused:         # not take the response off the queue
            time.sleep(0.0001)
        assoc.dimse.send_msg(rq, ct_context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
    finally:
        assoc.release()
    assert rsp is not None and rsp.Status == 0xA900
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]


@pytest.mark.interop
def test_abort_in_the_middle_of_a_data_set_leaves_nothing(node):
    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    assoc = _associate(node, CTImageStorage)
    rq = C_STORE()
    rq.MessageID = 1
    rq.AffectedSOPClassUID = CTImageStorage
    rq.AffectedSOPInstanceUID = ct.SOPInstanceUID
    rq.Priority = 0
    rq.DataSet = BytesIO(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" * 4000)
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    context_id = assoc.accepted_contexts[0].context_id
    pdatas = list(message.encode_msg(context_id, 16382))
    for pdata in pdatas[:3]:  # the command set and the first data set fragments only
        assoc.dul.send_pdu(pdata)
    wait_for(node.spool_files, what="the data set to be spooled")
    time.sleep(0.2)
    assoc.abort()
    wait_for(lambda: not node.spool_files(), what="the spool file to be removed")
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]
    assert node.blob_files() == []
    node.storescu(data_file("CT_small.dcm"))
    assert node.rows("SELECT COUNT(*) FROM instances") == [(1,)]


# -- association requests seen before (fastpath.Requests) --------------------------------------

def _fields(contexts) -> list:
    return [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax), cx.result, cx.as_scu, cx.as_scp)
            for cx in contexts]


def test_a_request_with_the_same_bytes_is_decoded_and_negotiated_once():
    from pynetdicom.presentation import negotiate_as_acceptor

    from scp.server import supported_contexts
    from test_hostile_network import _associate_rq

    raw = _associate_rq([Verification, CTImageStorage, MRImageStorage, "1.2.3.4.5.6"])
    requests = fastpath.Requests(size=2)
    first = requests.decoded(raw)
    assert isinstance(first, fastpath._RememberedRQ)
    assert requests.decoded(raw) is not first       # not kept before it is accepted (a refused peer fills nothing)
    requests.remember(first.negotiated)             # what sending its A-ASSOCIATE-AC does
    again = requests.decoded(raw)
    assert again is first
    fresh = A_ASSOCIATE_RQ()
    fresh.decode(raw)
    expected = fresh.to_primitive()
    shared = first.to_primitive()
    assert (shared.calling_ae_title, shared.called_ae_title) == (expected.calling_ae_title, expected.called_ae_title)
    proposed = shared.presentation_context_definition_list
    assert _fields(proposed) == _fields(expected.presentation_context_definition_list)

    supported = supported_contexts()
    truth, _ = negotiate_as_acceptor(expected.presentation_context_definition_list, supported, {})
    once, _ = fastpath._negotiate(shared.presentation_context_definition_list, supported, {})
    twice, _ = fastpath._negotiate(shared.presentation_context_definition_list, supported, {})
    assert _fields(once) == _fields(twice) == _fields(truth)
    assert [cx.result for cx in truth] == [0, 0, 0, 3]     # the unknown SOP class refused
    assert not {id(cx) for cx in once} & {id(cx) for cx in twice}   # each association its own contexts

    others = [_associate_rq([CTImageStorage], calling=f"OTHER{n}") for n in range(2)]
    for other in others:
        decoded = requests.decoded(other)
        assert decoded is not first
        requests.remember(decoded.negotiated)
    assert requests.decoded(raw) is not first     # the least recently used went out: the bound holds


def test_associations_share_the_supported_contexts_which_negotiation_leaves_unchanged():
    """Each association gets the server's supported contexts without pynetdicom's deep copy (~0.7 ms of CPU per
    association): safe only as long as negotiating, roles included, changes none of them."""
    import copy

    from pynetdicom.presentation import negotiate_as_acceptor

    from scp.server import supported_contexts
    from test_hostile_network import _associate_rq

    shared = fastpath.SharedContexts(supported_contexts())
    given = copy.deepcopy(shared)
    assert type(given) is list and given is not shared and all(a is b for a, b in zip(given, shared, strict=True))

    def fields(contexts):
        return [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role, cx.context_id)
                for cx in contexts]
    before = fields(shared)
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(_associate_rq([Verification, CTImageStorage, MRImageStorage, "1.2.3.4.5.6"]))
    proposed = pdu.to_primitive().presentation_context_definition_list
    accepted, _ = negotiate_as_acceptor(proposed, given, {CTImageStorage: (True, True)})
    assert [cx.result for cx in accepted] == [0, 0, 0, 3] and fields(shared) == before


def test_a_large_request_is_never_remembered():
    """A decoded request holds ~30 times its bytes: one over REMEMBERED_REQUEST_BYTES is decoded every time
    (the attack pass kept 300 MB in one receiver with 32 refused requests of 250 KB each)."""

    from test_hostile_network import _associate_rq

    small = _associate_rq([CTImageStorage] * 128)
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(small)
    primitive = pdu.to_primitive()
    for cx in primitive.presentation_context_definition_list:    # 128 contexts of 40 transfer syntaxes
        cx.transfer_syntax = [f"1.2.840.10008.1.2.4.{n}" for n in range(40)]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    large = pdu.encode()
    assert len(small) <= fastpath.REMEMBERED_REQUEST_BYTES < len(large)
    requests = fastpath.Requests()
    assert isinstance(requests.decoded(small), fastpath._RememberedRQ)
    assert type(requests.decoded(large)) is A_ASSOCIATE_RQ


def test_a_request_with_a_user_identity_is_decoded_every_time():
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    from test_hostile_network import _associate_rq

    pdu = A_ASSOCIATE_RQ()
    pdu.decode(_associate_rq([CTImageStorage]))
    primitive = pdu.to_primitive()
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field = 1, b"radiographer"
    primitive.user_information.append(identity)
    with_identity = A_ASSOCIATE_RQ()
    with_identity.from_primitive(primitive)
    raw = with_identity.encode()
    requests = fastpath.Requests()
    first = requests.decoded(raw)
    assert type(first) is A_ASSOCIATE_RQ and requests.decoded(raw) is not first


@pytest.mark.interop
def test_a_request_sent_again_gets_the_same_accept_and_its_association_works(node):
    """The second association with the same A-ASSOCIATE-RQ bytes is answered from what the first was
    (the AC sent again, byte for byte), and goes on: released, or storing an instance."""

    from test_hostile_network import _associate_rq, _connect, _read_pdu

    raw = _associate_rq([Verification, CTImageStorage, "1.2.3.4.5.6"], calling="AGAIN")
    accepts = []
    for _ in range(3):
        sock = _connect(node, tls=True)
        try:
            sock.sendall(raw)
            accepts.append(_read_pdu(sock))
            sock.sendall(bytes.fromhex("05 00 00000004 00000000"))   # A-RELEASE-RQ
            assert _read_pdu(sock)[:1] == b"\x06"                     # A-RELEASE-RP
        finally:
            sock.close()
    assert accepts[0][:1] == b"\x02" and accepts[1] == accepts[0] == accepts[2]
    ac = A_ASSOCIATE_AC()
    ac.decode(accepts[1])
    results = [(cx.context_id, cx.result) for cx in ac.to_primitive().presentation_context_definition_results_list]
    assert results == [(1, 0), (3, 0), (5, 3)]

    ct = pydicom.dcmread(data_file("CT_small.dcm"))
    uids = []
    for n in range(2):     # pynetdicom sends the same request twice: the second is remembered
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.3811.77.{n}"
        assoc = _associate(node, CTImageStorage)
        try:
            assert assoc.send_c_store(ct).Status == 0
        finally:
            assoc.release()
        uids.append(ct.SOPInstanceUID)
    assert [uid for (uid,) in node.rows("SELECT sop_instance_uid FROM instances ORDER BY pk")] == uids


@pytest.mark.interop
def test_open_associations_that_say_nothing_cost_the_receiver_almost_no_cpu(make_node):
    """Eight established associations, silent for 3 s: the receiving process (the node's only one, by
    default) stays under 10% of a core (~1% measured; pynetdicom's two threads per association each woke
    a thousand times a second: 47% here), and each association still answers at once, and is released."""
    import psutil

    node = make_node(router={"enabled": False}, viewer={"enabled": False})
    receiver = psutil.Process(node.proc.pid)
    associations = [_associate(node, Verification) for _ in range(8)]
    try:
        time.sleep(0.5)
        before, start = sum(receiver.cpu_times()[:2]), time.monotonic()
        time.sleep(3)
        share = (sum(receiver.cpu_times()[:2]) - before) / (time.monotonic() - start)
        started = time.monotonic()
        assert all(assoc.send_c_echo().Status == 0 for assoc in associations)
        answered = time.monotonic() - started
    finally:
        for assoc in associations:
            assoc.release()
    assert share < 0.10, f"{share:.0%} of a core for 8 silent associations"
    assert answered < 1.0, f"8 C-ECHOs took {answered:.2f} s"
    assert all(assoc.is_released for assoc in associations)


def test_whatever_an_association_waits_for_wakes_its_reactor():
    """The association's reactor sleeps until woken: by a DIMSE message or a primitive queued for it, by a
    local send_*() clearing its checkpoint (a commitment report sent on the open association waited up to a
    second before the review pass), or by being killed; the DUL's by a primitive or an event to handle."""
    from pynetdicom import AE
    from pynetdicom.association import Association

    assoc = Association(AE(), "acceptor")
    assoc.__class__ = fastpath.FastAssociation
    assoc.dul.__class__ = fastpath.FastDUL
    assoc.wait_for_events()
    assoc.dul.wait_for_events()
    woken = []
    assoc.dul._wake = lambda: woken.append("dul")
    assoc.dul.event_queue.wake = assoc.dul.to_provider_queue.wake = assoc.dul._wake
    for wake in (lambda: assoc.dimse.msg_queue.put((1, None)), lambda: assoc.dul.to_user_queue.put(None),
                 assoc._reactor_checkpoint.clear):
        assoc._wakeup.clear()
        wake()
        assert assoc._wakeup.is_set()
    assoc.dul.event_queue.put("Evt17")
    assoc.dul.to_provider_queue.put(None)
    assert woken == ["dul", "dul"]
