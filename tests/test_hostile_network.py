"""Hostile peers on the DICOM ports (issue 14, items 1, 2, 5 and 6), and fuzzing of what reads them.

Each regression test attacks a real node on the port where the problem was found (the plain
port, the TLS port, or both) with raw sockets, ssl-wrapped for TLS. It asserts what the peer
gets (an A-ABORT, a closed connection, and how soon), that the node's memory stays under a
stated bound, that everything stored before is unchanged and that a real storescu with a
valid certificate still stores within 2 s. The fuzz tests feed random PDUs, fragments and
command sets to the receiving code in-process and to a live node.
"""
from __future__ import annotations

import logging
import os
import re
import selectors
import socket
import ssl
import struct
import subprocess
import threading
import time
import tracemalloc
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from pynetdicom import AE, _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ, N_ACTION_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE, N_ACTION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, P_DATA, ImplementationClassUIDNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (CTImageStorage, StorageCommitmentPushModel,
                                  StudyRootQueryRetrieveInformationModelFind, Verification)

from helpers import data_file, wait_for
from scp import fastpath, wire
from scp.tls import client_context, server_context

MiB = 1 << 20
ABORT = 0x07
CONTEXTS = [Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind, StorageCommitmentPushModel]


# -- a raw peer ------------------------------------------------------------------------------

def _connect(node, tls: bool, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A TCP connection to the node (TLS with a valid client certificate when `tls`)."""
    raw = socket.create_connection(("127.0.0.1", node.port if tls else node.plain_port), timeout=timeout,
                                   source_address=(source, 0))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not tls:
        return raw
    context = client_context(node.pki / "ca.pem", node.pki / "client.pem", node.pki / "client.key")
    return context.wrap_socket(raw, server_hostname="localhost")


def _until_closed(sock: socket.socket, timeout: float, answered: threading.Event | None = None) -> bytes:
    """Everything the node sends until it closes the connection; fails if it is still open after `timeout`.
    `answered` is set once a whole PDU header and more have come."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the node kept the connection open for {timeout}s (it sent {bytes(received[:12])!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return bytes(received)
        except TimeoutError:
            continue
        if not chunk:
            return bytes(received)
        received += chunk
        if answered is not None and len(received) >= 10:
            answered.set()


def _is_abort(answer: bytes) -> bool:
    return len(answer) >= 10 and answer[0] == ABORT and struct.unpack(">I", answer[2:6])[0] == 4


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send what the node still takes; False once it has closed or reset the connection."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
        return False


def _associate_rq(contexts=CONTEXTS, calling: str = "HOSTILE", max_pdu: int = 16384) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "M3DICOM"
    items = []
    for n, sop_class in enumerate(contexts):
        cx = build_context(sop_class)
        cx.context_id = 2 * n + 1
        items.append(cx)
    primitive.presentation_context_definition_list = items
    length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    length.maximum_length_received = max_pdu
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.9"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _read_pdu(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data[:12]!r}"
        data += chunk
    return data


def _associate(node, tls: bool, source: str = "127.0.0.1") -> tuple[socket.socket, dict[str, int]]:
    """An established association over a raw socket: (socket, context id by abstract syntax)."""
    sock = _connect(node, tls, source)
    sock.sendall(_associate_rq())
    answer = _read_pdu(sock)
    assert answer[0] == 0x02, f"association not accepted: {answer[:12]!r}"
    ac = A_ASSOCIATE_AC()
    ac.decode(answer)
    accepted = {item.presentation_context_id for item in ac.variable_items[1:]
                if getattr(item, "result_reason", 1) == 0}
    return sock, {sop: 2 * n + 1 for n, sop in enumerate(CONTEXTS) if 2 * n + 1 in accepted}


def _p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """One P-DATA-TF holding one PDV (PS3.8 9.3.5)."""
    return struct.pack(">BBIIBB", 0x04, 0, len(payload) + 6, len(payload) + 2, context_id, control) + payload


def _command(message, primitive) -> bytes:
    message.primitive_to_message(primitive)
    pdata = next(iter(message.encode_msg(1, 0)))
    data = pdata.presentation_data_value_list[0][1]
    assert data[0] == 0x03
    return bytes(data[1:])


def _find_rq() -> bytes:
    rq = C_FIND()
    rq.MessageID, rq.AffectedSOPClassUID, rq.Priority = 7, StudyRootQueryRetrieveInformationModelFind, 0
    rq.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00STUDY ")
    return _command(C_FIND_RQ(), rq)


def _action_rq() -> bytes:
    rq = N_ACTION()
    rq.MessageID, rq.RequestedSOPClassUID = 8, StorageCommitmentPushModel
    rq.RequestedSOPInstanceUID, rq.ActionTypeID = "1.2.840.10008.1.20.1.1", 1
    rq.ActionInformation = BytesIO(b"\x08\x00\x16\x00")
    return _command(N_ACTION_RQ(), rq)


def _store_rq(sop_instance: str = "1.2.826.0.1.3680043.9.3811.1") -> bytes:
    rq = C_STORE()
    rq.MessageID, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID, rq.Priority = 9, CTImageStorage, sop_instance, 0
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00")
    return _command(C_STORE_RQ(), rq)


# -- watching the node -------------------------------------------------------------------------

@contextmanager
def _peak_rss(node, interval: float = 0.02):
    """Resident memory of the node's processes sampled during the block: `.growth` above the start
    (taken once it has settled: the node's helper processes grow after the first instance is stored)."""
    base, deadline = node.rss(), time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = node.rss()
        if abs(now - base) < 2 * MiB:
            break
        base = now
    result = SimpleNamespace(growth=0, peak=base)
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            result.peak = max(result.peak, node.rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.peak = max(result.peak, node.rss())
        result.growth = result.peak - base


@pytest.fixture
def stored(node, tmp_path):
    """The node with one instance stored, and its stored state before the attack."""
    node.storescu(data_file("CT_small.dcm"))
    return node, node.stored_state()


def _unharmed(node, before: dict, tmp_path: Path) -> None:
    assert node.proc.poll() is None, f"the node died:\n{node.log()[-3000:]}"
    after = node.stored_state()
    assert {uid: after.get(uid) for uid in before} == before, "something stored before the attack changed"
    node.still_serves(tmp_path)


def _log_lines(node, phrase: str) -> list[str]:
    return [line for line in node.log().splitlines() if phrase in line]


PORTS = [pytest.param(False, id="plain"), pytest.param(True, id="tls")]


# -- 1. a PDU length is a claim, not an allocation ---------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_association_request_claiming_4_gib_is_aborted_without_allocating(stored, tmp_path, tls):
    node, before = stored
    with _peak_rss(node) as memory:
        sock = _connect(node, tls)
        _send(sock, struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF) + b"\0" * 1024)
        answer = _until_closed(sock, timeout=5)
        sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert memory.growth < 64 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    assert len(_log_lines(node, "A-ASSOCIATE-RQ of 4294967295 bytes")) == 1
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_p_data_claiming_512_mib_inside_an_association_is_aborted(stored, tmp_path, tls):
    node, before = stored
    sock, contexts = _associate(node, tls)
    with _peak_rss(node) as memory:
        _send(sock, struct.pack(">BBI", 0x04, 0, 512 * MiB) + b"\0" * 4096)
        answer = _until_closed(sock, timeout=5)
        sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert memory.growth < 64 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    assert len(_log_lines(node, f"P-DATA-TF of {512 * MiB} bytes")) == 1
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
def test_a_release_request_inside_a_data_set_leaves_no_spool_file_and_no_dead_thread(stored, tmp_path):
    """Attack, session 35: half a C-STORE data set, an A-RELEASE-RQ, then the rest. The P-DATA in Sta8 aborts
    the association, and the association thread's release answer then comes in Sta13: that killed the DUL's
    reactor (a traceback) and left the half-received spool file, in about half the tries. Ten tries here."""
    node, before = stored
    release = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)
    data = bytes(5000)
    for n in range(10):
        sock, contexts = _associate(node, False)
        cx = contexts[CTImageStorage]
        _send(sock, _p_data(cx, 0x03, _store_rq(f"1.2.826.0.1.3680043.9.3811.35.{n}")) + _p_data(cx, 0x00, data[:1000])
              + release + _p_data(cx, 0x02, data[1000:]))
        assert _is_abort(_read_pdu(sock))          # then the node waits for this end to close (Sta13)
        sock.close()
    wait_for(lambda: not node.spool_files(), timeout=5, what=f"the spool files to go: {node.spool_files()}")
    assert "Traceback" not in node.log() and "Exception in thread" not in node.log(), node.log()[-3000:]
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_a_fragment_on_a_context_not_accepted_is_refused_in_one_warning(stored, tmp_path, tls):
    """Attack, session 35: a command on presentation context 2 (even: never proposed) was refused with an ERROR
    naming an internal exception (KeyError: 2)."""
    node, before = stored
    sock, _ = _associate(node, tls)
    _send(sock, _p_data(2, 0x03, _store_rq()))
    answer = _until_closed(sock, timeout=5)
    sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    lines = wait_for(lambda: _log_lines(node, "on presentation context 2, which was not accepted"), timeout=5,
                     what="the refusal's log line")
    assert len(lines) == 1 and " WARNING " in lines[0] and "KeyError" not in node.log()
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_p_data_over_the_advertised_maximum_is_aborted(stored, tmp_path, tls):
    """An 8 MiB PDU (every byte sent) against the 1 MiB the node advertised."""
    node, before = stored
    sock, contexts = _associate(node, tls)
    pdu = _p_data(contexts[CTImageStorage], 0x01, b"\0" * (8 * MiB))
    answered = threading.Event()

    def send_the_rest() -> None:
        # the header is refused at once; the rest goes once the A-ABORT is read: past what the node
        # drains after an abort (wire.DISCARD_LIMIT) it closes on unread data, and the reset could
        # overtake an A-ABORT not yet read by a peer slow to read (seen on a loaded CI machine)
        if answered.wait(20):
            _send(sock, pdu[64 << 10:])

    with _peak_rss(node) as memory:
        # the first part is sent before the reading starts: one TLS connection read in one thread while another
        # writes to it can lose what arrives (OpenSSL's objects are not for two threads at once), and lost the
        # A-ABORT in about one run of three over TLS, on a quiet machine too
        _send(sock, pdu[:64 << 10])
        sender = threading.Thread(target=send_the_rest, daemon=True)
        sender.start()
        answer = _until_closed(sock, timeout=30, answered=answered)
        sender.join(30)
        sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert memory.growth < 64 * MiB
    assert len(_log_lines(node, "over the limit of 1048576")) == 1
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
def test_association_request_over_the_cap_is_aborted(stored, tmp_path):
    node, before = stored
    from node.config import DicomSection

    cap = DicomSection().max_associate_rq_size
    rq = _associate_rq()
    oversized = rq[:2] + struct.pack(">I", cap + 1) + rq[6:] + b"\0" * (cap + 1 - (len(rq) - 6))
    sock = _connect(node, False)
    sender = threading.Thread(target=_send, args=(sock, oversized), daemon=True)
    sender.start()
    answer = _until_closed(sock, timeout=5)
    sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert len(_log_lines(node, f"A-ASSOCIATE-RQ of {cap + 1} bytes")) == 1
    _unharmed(node, before, tmp_path)


# -- 2. a message being assembled is bounded ---------------------------------------------------

def _flood(sock: socket.socket, pdus, total: int) -> int:
    """Send `pdus` (an iterator of P-DATA-TF) until `total` bytes went out or the node stopped taking them."""
    sent = 0
    for pdu in pdus:
        if sent >= total or not _send(sock, pdu):
            break
        sent += len(pdu)
    return sent


def _fragments(context_id: int, control: int, size: int = 16 * 1024):
    pdu = _p_data(context_id, control, b"\x55" * size)
    while True:
        yield pdu


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_command_set_that_never_ends_is_aborted(stored, tmp_path, tls):
    node, before = stored
    sock, contexts = _associate(node, tls)
    with _peak_rss(node) as memory:
        sent = _flood(sock, _fragments(contexts[CTImageStorage], 0x01), 96 * MiB)
        answer = _until_closed(sock, timeout=5)
        sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert sent < 32 * MiB, f"the node took {sent / MiB:.0f} MiB of command set"
    assert memory.growth < 48 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    assert len(_log_lines(node, "command set longer than")) == 1
    _unharmed(node, before, tmp_path)


STOCK_CASES = {
    # what comes first (a complete command set, or nothing), then what never ends
    "data set without a command set": (None, 0x00),
    "C-FIND identifier": (_find_rq, 0x00),
    "N-ACTION data set": (_action_rq, 0x00),
    "command fragments after a C-FIND command set": (_find_rq, 0x01),
}


@pytest.mark.interop
@pytest.mark.parametrize("case", sorted(STOCK_CASES))
def test_message_assembled_by_pynetdicom_is_bounded(stored, tmp_path, case):
    node, before = stored
    first, control = STOCK_CASES[case]
    sock, contexts = _associate(node, False)
    context_id = contexts[StudyRootQueryRetrieveInformationModelFind if first is _find_rq
                          else StorageCommitmentPushModel if first is _action_rq else CTImageStorage]
    with _peak_rss(node) as memory:
        if first is not None:
            sock.sendall(_p_data(context_id, 0x03, first()))
        sent = _flood(sock, _fragments(context_id, control), 96 * MiB)
        answer = _until_closed(sock, timeout=5)
        sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert sent < 32 * MiB, f"the node took {sent / MiB:.0f} MiB"
    assert memory.growth < 48 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    _unharmed(node, before, tmp_path)


# -- 5. no peer holds the association slots ----------------------------------------------------

@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_half_sent_association_requests_do_not_hold_the_slots(make_node, tmp_path, tls):
    """Eight A-ASSOCIATE-RQs 500 bytes short, against 4 association slots: storescu still gets in, and
    each is closed once the ARTIM timer runs out."""
    node = make_node(router={"enabled": False}, dicom={"max_associations": 4, "artim_timeout": 3.0})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    rq = _associate_rq() + b"\0" * 400
    rq = rq[:2] + struct.pack(">I", len(rq) - 6 + 500) + rq[6:]
    held = []
    with _peak_rss(node) as memory:
        for _ in range(8):
            sock = _connect(node, tls)
            sock.sendall(rq)
            held.append((sock, time.monotonic()))
        time.sleep(0.3)
        node.still_serves(tmp_path)
        for sock, since in held:
            answer = _until_closed(sock, timeout=3.0 + 3)
            assert answer == b"", f"expected a closed connection, got {answer[:12]!r}"
            assert time.monotonic() - since < 3.0 + 2.5
            sock.close()
    assert memory.growth < 64 * MiB
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_undecodable_association_requests_do_not_hold_the_slots(make_node, tmp_path, tls):
    """Eight A-ASSOCIATE-RQs whose body is garbage, against 4 association slots: each is aborted at
    once, and its slot is free at once (pynetdicom's association thread waited acse_timeout, 30 s,
    for an indication that never came)."""
    node = make_node(router={"enabled": False}, dicom={"max_associations": 4})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    garbage = struct.pack(">BBI", 0x01, 0, 200) + b"\xff" * 200
    answers = []
    for _ in range(8):
        sock = _connect(node, tls)
        sock.sendall(garbage)
        answers.append(_until_closed(sock, timeout=2))
        sock.close()
    assert all(_is_abort(answer) for answer in answers), [answer[:12] for answer in answers]
    # each slot is free once the receiver's threads have seen their connection close: within ms, now and then
    # ~0.1 s on a busy machine (a storescu sent at once was refused 1 time in 10), not after acse_timeout (30 s)
    wait_for(lambda: subprocess.run(["echoscu", *node.tls_args(), "-aec", "M3DICOM", "127.0.0.1", str(node.port)],
                                    capture_output=True, env={**os.environ, "TCP_NODELAY": "1"}).returncode == 0,
             timeout=2, interval=0.1, what="a free association slot")
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_half_sent_pdu_inside_an_association_is_aborted_after_the_network_timeout(make_node, tmp_path, tls):
    """A P-DATA-TF that stops half-way does not hold the association (and its slot) beyond the
    network timeout: pynetdicom's read waited for the rest as long as the socket stayed open."""
    node = make_node(router={"enabled": False}, dicom={"network_timeout": 2.0})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    sock, contexts = _associate(node, tls)
    started = time.monotonic()
    sock.sendall(_p_data(contexts[CTImageStorage], 0x03, _store_rq())[:40])
    answer = _until_closed(sock, timeout=10)
    took = time.monotonic() - started
    sock.close()
    assert _is_abort(answer), f"expected an A-ABORT, got {answer[:12]!r}"
    assert took < 2.0 * 2 + 1.5, f"the half-sent PDU held the association {took:.1f}s"
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_connections_closed_at_once_free_their_slots_at_once(make_node, tmp_path, tls):
    node = make_node(router={"enabled": False}, dicom={"max_associations": 4})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    opened = [_connect(node, tls) for _ in range(12)]
    for sock in opened:
        sock.close()
    _unharmed(node, before, tmp_path)


# -- 6. TLS handshakes: a source gets its share, no more ---------------------------------------

class _Flood:
    """`count` idle TCP connections to `port` from `sources` in turn, each reopened when the node closes
    it (at most `per_second` reopened a second): connections that never start their TLS handshake."""

    def __init__(self, port: int, sources: list[str], count: int, per_second: float = 10.0):
        self.port, self.sources, self.count, self.per_second = port, sources, count, per_second
        self.closed_by_node = 0
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._opened = 0
        for _ in range(count):
            self._open()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        source = self.sources[self._opened % len(self.sources)]
        self._opened += 1
        sock = socket.create_connection(("127.0.0.1", self.port), source_address=(source, 0))
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        closed = []
        next_open = time.monotonic()
        while not self._stop.is_set():
            for key, _ in self._selector.select(0.05):
                self._selector.unregister(key.fileobj)
                key.fileobj.close()
                self.closed_by_node += 1
                closed.append(True)
            while closed and time.monotonic() >= next_open:
                closed.pop()
                self._open()
                next_open += 1 / self.per_second
            next_open = max(next_open, time.monotonic() - 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()


@pytest.mark.interop
def test_200_idle_connections_from_one_address_leave_room_for_others(stored, tmp_path):
    node, before = stored
    with _peak_rss(node) as memory:
        flood = _Flood(node.port, ["127.0.0.2"], 200)
        try:
            time.sleep(1.0)
            took = [node.still_serves(tmp_path / str(n)) for n in range(3)]
        finally:
            flood.stop()
    assert max(took) < 2.0
    assert flood.closed_by_node >= 100, "the node kept every connection beyond the address's share"
    assert memory.growth < 128 * MiB, f"the node grew by {memory.growth / MiB:.0f} MiB"
    # refusals are reported, not one line per connection
    assert 1 <= len(_log_lines(node, "127.0.0.2")) <= 20
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
def test_idle_connections_from_many_addresses_leave_room_for_others(make_node, tmp_path):
    """When the pending pool is full, a newcomer takes the place of the oldest connection of the
    address holding the most."""
    node = make_node(router={"enabled": False}, dicom={"max_pending_connections": 16, "max_pending_per_source": 4})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    flood = _Flood(node.port, [f"127.0.0.{n}" for n in range(2, 42)], 80)
    try:
        time.sleep(1.0)
        node.still_serves(tmp_path)
    finally:
        flood.stop()
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
def test_idle_tls_connection_is_closed_by_the_default_handshake_timeout(make_node):
    from node.config import DicomSection

    default = DicomSection().tls_handshake_timeout
    assert default <= 5.0, "held TLS connections should be closed within seconds"
    node = make_node(router={"enabled": False})
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port)) as idle:
        assert _until_closed(idle, timeout=default + 3) == b""
    assert time.monotonic() - started < default + 2


# -- log lines: one per record, escaped, short, bounded (second round, ae_inject.py, log_flood.py) --

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ [\w.]+: ")
_READY_LINES = ("m3dicom ", "data directory: ", "send a study: ")   # what `m3dicom serve` prints


def _raw_associate_rq(calling: bytes = b"RAW", abstract: str = Verification, version: bytes = b"") -> bytes:
    """An A-ASSOCIATE-RQ written byte by byte: any calling AE title, abstract syntax or
    implementation version name, valid or not."""
    def item(kind: int, data: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(data)) + data

    context = bytes([1, 0, 0, 0]) + item(0x30, abstract.encode()) + item(0x40, b"1.2.840.10008.1.2")
    user = item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.3811.9")
    if version:
        user += item(0x55, version)
    body = (struct.pack(">HH", 1, 0) + b"M3DICOM".ljust(16) + calling.ljust(16)[:16] + b"\0" * 32
            + item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context) + item(0x50, user))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


FORGED = "\n2026-11-30 00:00:00,000 ERROR MainProcess archive.ingest: FORGED LINE "
LOG_ATTACKS = {
    "line feed in the calling AE title": lambda: _raw_associate_rq(calling=b"X\n2026 ERROR F"),
    "ANSI escapes in the calling AE title": lambda: _raw_associate_rq(calling=b"\x1b[2J\x1b[31mRED"),
    "60 KB abstract syntax of forged lines": lambda: _raw_associate_rq(abstract=(FORGED * 900)[:60000]),
    "60 KB implementation version name": lambda: _raw_associate_rq(version=(FORGED * 900)[:60000].encode()),
}


def _new_log_lines(node, offset: int) -> list[str]:
    return node.log_path.read_bytes()[offset:].decode(errors="replace").splitlines()


def _clean_log(lines: list[str]) -> None:
    """Every line is a whole record (or what `serve` prints), without a control character, short."""
    from node.receivers import MAX_LOG_LINE

    for line in lines:
        assert _LOG_LINE.match(line) or line.startswith(_READY_LINES), f"a forged or broken log line: {line[:200]!r}"
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line), f"a control character in the log: {line[:200]!r}"
        assert len(line) <= MAX_LOG_LINE + 40, f"a log line of {len(line)} characters"


@pytest.mark.interop
@pytest.mark.parametrize("attack", sorted(LOG_ATTACKS))
def test_a_peer_value_cannot_forge_log_lines(make_node, tmp_path, attack):
    """The plain port, no credentials: pynetdicom logged a refused value whole, line feeds and
    terminal escapes included (a forged line per line feed, 84,600 of them for 100 connections).
    Two receiving processes: the children's logs are written the same way."""
    # the DICOM ports alone: the router and viewer processes would write their start-up lines meanwhile
    node = make_node(dicom={"receivers": 2}, router={"enabled": False}, viewer={"enabled": False})
    node.storescu(data_file("CT_small.dcm"))
    before = node.stored_state()
    offset = node.log_path.stat().st_size
    sock = _connect(node, False)
    sock.sendall(LOG_ATTACKS[attack]())
    assert _is_abort(_until_closed(sock, timeout=5))
    sock.close()
    time.sleep(0.5)
    lines = _new_log_lines(node, offset)
    assert 1 <= len(lines) <= 2, lines   # the node's line, and pynetdicom's (naming the peer)
    assert all(len(line) < 1600 for line in lines), [len(line) for line in lines]
    _clean_log(lines)
    offset = node.log_path.stat().st_size
    for _ in range(100):   # the same again, a hundred times: a bounded number of lines
        sock = _connect(node, False)
        sock.sendall(LOG_ATTACKS[attack]())
        assert _is_abort(_until_closed(sock, timeout=5))
        sock.close()
    time.sleep(0.5)
    lines = _new_log_lines(node, offset)
    assert len(lines) <= 8, f"{len(lines)} lines for 100 connections"
    _unharmed(node, before, tmp_path)
    _clean_log(node.log().splitlines())


def test_a_record_is_one_escaped_line():
    from node.receivers import MAX_LOG_MESSAGE, MAX_LOG_VALUE, OneLineFormatter

    formatter = OneLineFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def line(msg, *args, exc_info=None):
        return formatter.format(logging.LogRecord("scp.x", logging.WARNING, __file__, 1, msg, args, exc_info))

    assert line("from %s: %d", "X\n2026 ERROR F", 7) == "WARNING scp.x: from X\\n2026 ERROR F: 7"
    assert line("%s", "\x1b[2J\x1b[31mRED\u2028\x85") == "WARNING scp.x: \\x1b[2J\\x1b[31mRED\\u2028\\x85"
    long = line("value %r", "A" * 60000)
    assert len(long) < MAX_LOG_VALUE + 100 and long.endswith("more characters]'")
    assert len(line("A" * 60000)) < MAX_LOG_MESSAGE + 100
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys

        text = line("failed", exc_info=sys.exc_info())
    assert "\n" not in text and "Traceback (most recent call last):\\n" in text and "bad\\nvalue" in text
    assert line("%d of %s", "not a number", 2).startswith("WARNING scp.x: '%d of %s'")


# -- association slots: a share per address, a reserve for TLS (second round, slots.py) ---------

REJECTED_LOCAL_LIMIT = (0x02, 0x03, 0x02)   # rejected-transient, service-provider (presentation), local limit


def _hold_associations(node, tls: bool, sources: list[str], count: int) -> tuple[list, list]:
    """`count` associations opened from `sources` in turn and kept open: (held sockets, the
    (result, source, reason) of each A-ASSOCIATE-RJ)."""
    held, rejections = [], []
    for n in range(count):
        sock = _connect(node, tls, sources[n % len(sources)])
        sock.sendall(_associate_rq(calling=f"HOG{n}"))
        answer = _read_pdu(sock)
        if answer[0] == 0x02:
            held.append(sock)
            continue
        assert answer[0] == 0x03 and len(answer) == 10, f"expected an A-ASSOCIATE-AC or -RJ, got {answer[:12]!r}"
        rejections.append(tuple(answer[7:10]))
        assert _until_closed(sock, timeout=3) == b""
        sock.close()
    return held, rejections


def _echo(sock: socket.socket) -> int:
    """A C-ECHO on a held raw association (context 1: Verification): its status."""
    rq = C_ECHO()
    rq.MessageID, rq.AffectedSOPClassUID = 3, Verification
    sock.sendall(_p_data(1, 0x03, _command(C_ECHO_RQ(), rq)))
    answer = _read_pdu(sock)
    assert answer[0] == 0x04, answer[:12]
    return struct.unpack_from("<H", answer, answer.index(b"\x00\x00\x00\x09\x02\x00\x00\x00") + 8)[0]


@pytest.mark.interop
@pytest.mark.parametrize("tls", PORTS)
def test_associations_from_one_address_leave_slots_for_others(stored, tmp_path, tls):
    """16 associations from 127.0.0.2 (the plain port without a certificate, or TLS with a valid one),
    kept alive with C-ECHOs, took all 16 slots: every TLS sender was rejected for as long as they
    were held. One address gets half of them; the rest is rejected, logged once."""
    node, before = stored
    held, rejections = _hold_associations(node, tls, ["127.0.0.2"], 16)
    try:
        assert len(held) == 8 and rejections == [REJECTED_LOCAL_LIMIT] * 8
        assert all(_echo(sock) == 0x0000 for sock in held)   # what it holds works
        node.still_serves(tmp_path)                           # from 127.0.0.1, over TLS, within 2 s
        assert all(_echo(sock) == 0x0000 for sock in held)
    finally:
        for sock in held:
            sock.close()
    lines = _log_lines(node, "dicom.max_associations_per_source")
    assert len(lines) == 1 and "127.0.0.2" in lines[0], lines
    _unharmed(node, before, tmp_path)


@pytest.mark.interop
def test_the_plain_port_cannot_take_the_slots_kept_for_tls(stored, tmp_path):
    """Four addresses, four plain associations each (no certificate needed): the plain port holds
    three quarters of the slots at most, and a TLS sender still gets in."""
    node, before = stored
    held, rejections = _hold_associations(node, False, [f"127.0.0.{n}" for n in range(2, 6)], 16)
    try:
        assert len(held) == 12 and rejections == [REJECTED_LOCAL_LIMIT] * 4
        node.still_serves(tmp_path)
    finally:
        for sock in held:
            sock.close()
    assert len(_log_lines(node, "dicom.plain_max_associations")) <= 4   # once per address at most
    _unharmed(node, before, tmp_path)


def test_slots_count_live_associations_by_address_and_port():
    from scp.tls import Slots

    class Assoc:
        def __init__(self, address, tls):
            self.is_acceptor = True
            self.requestor = SimpleNamespace(address=address)
            self._server = SimpleNamespace(ssl_context=object() if tls else None)
            self.dul = SimpleNamespace(socket=SimpleNamespace(socket=object()))

    ae = SimpleNamespace(active_associations=[])
    slots = Slots(ae, total=5, per_source=2, plain=3)
    assert slots.refusal("10.0.0.1", tls=False) == ""
    ae.active_associations = [Assoc("10.0.0.1", False), Assoc("::ffff:10.0.0.1", True)]
    assert "max_associations_per_source" in slots.refusal("10.0.0.1", tls=True)
    assert slots.refusal("10.0.0.2", tls=False) == ""
    ae.active_associations += [Assoc("10.0.0.2", False), Assoc("10.0.0.3", False)]
    assert "plain_max_associations" in slots.refusal("10.0.0.4", tls=False)
    assert slots.refusal("10.0.0.4", tls=True) == ""
    ae.active_associations.append(Assoc("10.0.0.5", True))
    assert "dicom.max_associations" in slots.refusal("10.0.0.4", tls=True)
    ae.active_associations.pop(0)   # an association's thread ended: its slot is free at once
    assert slots.refusal("10.0.0.1", tls=True) == ""
    ae.active_associations.append(Assoc("10.0.0.1", True))
    assert slots.refusal("10.0.0.1", tls=True) != ""
    ae.active_associations[-1].dul.socket.socket = None   # closed, its threads still winding down
    assert slots.refusal("10.0.0.1", tls=True) == ""


class _Peers:
    """Connected socket pairs standing for accepted connections: `.ours` as the server holds it."""

    def __init__(self):
        self.pairs = []

    def __call__(self):
        pair = socket.socketpair()
        self.pairs.append(pair)
        return pair

    def close(self):
        for a, b in self.pairs:
            a.close()
            b.close()


def _closed_under(peer: socket.socket) -> bool:
    peer.settimeout(1)
    return peer.recv(1) == b""


def test_admission_keeps_a_share_for_other_addresses():
    from scp.tls import Admission

    peers, admission = _Peers(), Admission(total=4, per_source=2)
    try:
        a1, a2, a3, b1, b2, c1, c2 = (peers() for _ in range(7))
        first, _ = admission.admit(a1[0], ("10.0.0.1", 1))
        assert admission.admit(a2[0], ("10.0.0.1", 2))[0] is not None
        refused, why = admission.admit(a3[0], ("10.0.0.1", 3))
        assert refused is None and "dicom.max_pending_per_source" in why
        assert admission.admit(b1[0], ("10.0.0.2", 1))[0] and admission.admit(b2[0], ("10.0.0.2", 2))[0]
        # full: an address with nothing pending takes the place of the oldest connection
        assert admission.admit(c1[0], ("10.0.0.3", 1))[0] is not None
        assert first.evicted and _closed_under(a1[1])
        # ... but an address that already has one waits: nobody holds two more than it
        refused, why = admission.admit(c2[0], ("10.0.0.3", 2))
        assert refused is None and "dicom.max_pending_connections" in why
    finally:
        peers.close()


def test_admission_evicts_from_the_address_holding_the_most():
    from scp.tls import Admission

    peers, admission = _Peers(), Admission(total=4, per_source=4)
    try:
        held = [admission.admit(peers()[0], ("10.0.0.1", n))[0] for n in range(4)]
        newcomers = [admission.admit(peers()[0], ("10.0.0.2", n))[0] for n in range(3)]
        assert newcomers[0] is not None and newcomers[1] is not None and newcomers[2] is None
        assert [entry.evicted for entry in held] == [True, True, False, False]
        assert _closed_under(peers.pairs[0][1]) and _closed_under(peers.pairs[1][1])
        admission.release(held[2])   # associated: its place is free again
        assert admission.admit(peers()[0], ("10.0.0.2", 9))[0] is not None
    finally:
        peers.close()


@pytest.mark.parametrize("address,source", [
    (("127.0.0.2", 5), "127.0.0.2"),
    (("::ffff:10.1.2.3", 5, 0, 0), "10.1.2.3"),
    (("2001:db8:1:2::1", 5, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:ffff::9", 5, 0, 0), "2001:db8:1:2::/64"),
    (("fe80::1%eth0", 5, 0, 2), "fe80::/64"),
])
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(address, source):
    from scp.tls import source_of

    assert source_of(address) == source


# -- any failure in the fast path: a status or an abort, one log line --------------------------

@pytest.fixture
def inprocess_node(tmp_path, monkeypatch):
    """The node's association server in this process (plain port), with store / find functions of the test."""
    from node.config import from_dict
    from scp.server import build_ae, serve, supported_contexts

    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    config = from_dict({"dicom": {"dimse_timeout": 10.0}}, tmp_path)
    servers = []

    def start(store, find):
        ae = build_ae(config)
        sock = socket.create_server(("127.0.0.1", 0))
        servers.append((ae, sock))
        handler = fastpath.request_handler(store, find, limits=wire.Limits.of(config.dicom))
        serve(ae, sock, [], supported_contexts(), None, config, handler)
        return sock.getsockname()[1]

    yield start
    for ae, sock in servers:
        ae.shutdown()
        sock.close()


def _scu(port: int, *contexts):
    ae = AE(ae_title="FAULTY")
    ae.dimse_timeout = 10
    for sop_class in contexts:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="M3DICOM")
    assert assoc.is_established
    return assoc


def test_store_function_raising_answers_a_failure_status_and_logs_one_line(inprocess_node, caplog):
    def store(path, sop_class, sop_instance, calling_ae):
        raise RuntimeError("the archive broke")

    port = inprocess_node(store, None)
    import pydicom

    assoc = _scu(port, CTImageStorage, Verification)
    try:
        with caplog.at_level(logging.INFO, logger="scp"):
            started = time.monotonic()
            status = assoc.send_c_store(pydicom.dcmread(data_file("CT_small.dcm")))
            took = time.monotonic() - started
            assert assoc.send_c_echo().Status == 0x0000  # the association lives on
    finally:
        assoc.release()
    assert status.Status == 0x0110 and took < 2
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("scp")]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "RuntimeError" in errors[0].getMessage()


def test_find_function_raising_answers_a_failure_status(inprocess_node, caplog):
    def find(calling_ae, sop_class, identifier, cancelled, explicit):
        yield 0xFF00, "", b"\x08\x00\x52\x00\x06\x00STUDY "
        raise RuntimeError("Expression tree is too large (maximum depth 1000)")

    port = inprocess_node(lambda *args: (0, ""), find)
    identifier = pydicom_dataset(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    assoc = _scu(port, StudyRootQueryRetrieveInformationModelFind, Verification)
    try:
        with caplog.at_level(logging.INFO, logger="scp"):
            started = time.monotonic()
            statuses = [int(status.Status) for status, _ in
                        assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)]
            took = time.monotonic() - started
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert statuses == [0xFF00, 0xC001] and took < 2
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("scp")]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]


def pydicom_dataset(**values):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


# -- fuzzing -----------------------------------------------------------------------------------

READER_LIMITS = {0x01: 4096, 0x04: 16384, 0x05: 64, 0x06: 64, 0x07: 64}


@pytest.mark.fuzz
@given(pdu_type=st.one_of(st.sampled_from(sorted(wire.PDU_NAMES)), st.integers(0, 255)),
       length=st.one_of(st.integers(0, 20000), st.integers(0, 0xFFFFFFFF)),
       body=st.binary(max_size=20000), close=st.booleans())
def test_pdu_reader_never_allocates_a_claim(pdu_type, length, body, close):
    """Whatever a header says, the reader returns the whole PDU, or refuses it (unknown type, over the
    limit), or says the peer closed or stalled; it never allocates much more than the limit."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack(">BBI", pdu_type, 0, length) + body)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            pdu = wire.read_pdu(ours, READER_LIMITS, time.monotonic() + 0.05, exclusive=True)
            outcome = None
        except wire.PDUError as exc:
            pdu, outcome = None, exc
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    finally:
        ours.close()
        theirs.close()
    limit = READER_LIMITS.get(pdu_type)
    assert peak < 2 * max(READER_LIMITS.values()) + 65536
    if limit is None or length > limit:
        assert isinstance(outcome, wire.PDURefused)
    elif len(body) < length:
        assert isinstance(outcome, wire.PeerClosed if close else wire.PDUTimeout)
    else:
        assert pdu == struct.pack(">BBI", pdu_type, 0, length) + body[:length]


class _BytesPeer:
    """The sending end of a connection that writes the wire bytes itself, in pieces it chooses: with
    `tls`, TLS records (through memory BIOs) cut anywhere, as TCP may deliver them."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext | None):
        self.sock, self.tls = sock, None
        if context is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.sock.sendall(self.outgoing.read())
                    self.incoming.write(self.sock.recv(65536))
            self.sock.sendall(self.outgoing.read())

    def wire(self, data: bytes, record: int = 16384) -> bytes:
        """What goes on the wire for `data`, written `record` bytes at a time."""
        if self.tls is None:
            return data
        for start in range(0, len(data), record):
            self.tls.write(data[start:start + record])
        return self.outgoing.read()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_long_pdu_is_read_whole_however_slowly_its_last_bytes_come(pki, tls):
    """A PDU whose tail comes slowly, its TLS records cut in pieces (the reader's TLS layer holds part of
    one), is read whole as soon as it has come, and the PDU after it too. (A reader that sleeps until
    much of the PDU has arrived, SO_RCVLOWAT, without a margin for the record held, fails this: tried,
    session 35; no faster here, so not kept.)"""
    body = os.urandom(MiB)
    pdu = struct.pack(">BBI", 0x04, 0, len(body)) + body
    release = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    if tls:
        node_side = server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
        wrapped = []
        handshake = threading.Thread(target=lambda: wrapped.append(node_side.wrap_socket(ours, server_side=True)))
        handshake.start()
    peer = _BytesPeer(theirs, client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key") if tls else None)
    if tls:
        handshake.join()
        ours = wrapped[0]
    head, tail = peer.wire(pdu[:600_000]), peer.wire(pdu[600_000:])

    def send():
        theirs.sendall(head)
        time.sleep(0.3)
        theirs.sendall(tail[:-60_000])
        for start in range(len(tail) - 60_000, len(tail), 7000):                # records cut in pieces
            theirs.sendall(tail[start:start + 7000])
            time.sleep(0.02)
        time.sleep(0.2)
        theirs.sendall(peer.wire(release))

    sender = threading.Thread(target=send)
    try:
        ours.settimeout(10)
        started = time.monotonic()
        sender.start()
        first = wire.read_pdu(ours, {0x04: 2 * MiB, 0x05: 64}, time.monotonic() + 20)
        took = time.monotonic() - started
        second = wire.read_pdu(ours, {0x04: 2 * MiB, 0x05: 64}, time.monotonic() + 20)
        sender.join()
    finally:
        ours.close()
        theirs.close()
    assert first == pdu and second == release
    assert took < 2.5, f"the PDU took {took:.1f} s: the reader waited for bytes that were not coming"


@pytest.mark.fuzz
@given(st.one_of(st.lists(st.tuples(st.integers(1, 255), st.binary(min_size=1, max_size=300)), min_size=1, max_size=6),
                 st.binary(max_size=64)))
def test_p_data_values_are_what_pynetdicom_decodes_without_copies(items):
    """`wire.PDataValues` (the fast path's P-DATA-TF, memoryviews into the PDU) gives the values pynetdicom's
    P_DATA_TF decodes, byte for byte; items that do not add up to the PDU are refused (ValueError)."""
    from pynetdicom.pdu import P_DATA_TF

    if isinstance(items, list):
        primitive = P_DATA()
        primitive.presentation_data_value_list = [[context_id, value] for context_id, value in items]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        raw = bytearray(pdu.encode())
    else:
        raw = bytearray(struct.pack(">BBI", 0x04, 0, len(items)) + items)   # any body
    try:
        ours = list(wire.PDataValues(raw).to_primitive().presentation_data_value_list)
    except ValueError:
        assert not isinstance(items, list)
        event("refused")
        return
    theirs = P_DATA_TF()
    theirs.decode(bytes(raw))
    expected = [[context_id, bytes(value)] for context_id, value in theirs.to_primitive().presentation_data_value_list]
    assert [[context_id, bytes(value)] for context_id, value in ours] == expected
    assert all(isinstance(value, memoryview) and value.obj is raw for _, value in ours)
    if isinstance(items, list):
        assert expected == [[context_id, value] for context_id, value in items]


def test_p_data_values_of_tiny_items_hold_no_list_of_them():
    """Attack, session 35: a 1 MiB P-DATA-TF of one-byte items held 44 MiB of Python objects as a list of
    values; they are given one at a time now."""
    items = 170_000
    raw = bytearray(struct.pack(">BBI", 0x04, 0, 6 * items) + struct.pack(">IBB", 2, 1, 0x02) * items)
    tracemalloc.start()
    try:
        count = sum(1 for _ in wire.PDataValues(raw).to_primitive().presentation_data_value_list)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == items and peak < MiB, f"{peak / MiB:.1f} MiB for {items} values"


def _uid(draw_int) -> str:
    return "1.2." + ".".join(str(n) for n in draw_int)


@pytest.mark.fuzz
@given(st.binary(max_size=512))
def test_command_set_parser_never_raises_on_bytes(data):
    request = wire.parse_store_rq(data)
    assert request is None or isinstance(request, wire.StoreRequest)


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030,
                                           0x1031, 0x9999]),
                          st.binary(max_size=80)), max_size=12),
       st.integers(0, 0xFFFF))
def test_command_set_parser_never_raises_on_elements(elements, group):
    data = b"".join(struct.pack("<HHI", group if n == 0 else 0, elem, len(value)) + value
                    for n, (elem, value) in enumerate(elements))
    request = wire.parse_store_rq(data)
    assert request is None or (request.sop_class and request.sop_instance)


@pytest.mark.fuzz
@given(message_id=st.integers(0, 0xFFFF),
       instance=st.lists(st.integers(0, 9999), min_size=1, max_size=10).map(_uid),
       priority=st.sampled_from([0, 1, 2]))
def test_command_set_parser_reads_what_pynetdicom_encodes(message_id, instance, priority):
    rq = C_STORE()
    rq.MessageID, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = message_id, CTImageStorage, instance
    rq.Priority = priority
    rq.DataSet = BytesIO(b"\x08\x00\x16\x00")
    command = _command(C_STORE_RQ(), rq)
    assert wire.parse_store_rq(command) == wire.StoreRequest(message_id, CTImageStorage, instance)


_PDV = st.tuples(st.sampled_from([1, 3, 5, 7]), st.integers(0, 255),
                 st.one_of(st.binary(max_size=256), st.integers(0, 100_000).map(lambda n: b"\0" * n),
                           st.sampled_from([b"", b"STORE", b"FIND", b"ACTION"])))


def _message(context_id: int, command: bytes, fragments: list[bytes], complete: bool) -> list[tuple]:
    """A command set and its data set fragments as PDVs, the last one marked last when `complete`."""
    pdvs = [(context_id, 0x03, command)] + [(context_id, 0x00, fragment) for fragment in fragments]
    if complete:
        pdvs[-1] = (context_id, pdvs[-1][1] | 0x02, pdvs[-1][2])
    return pdvs


# well-formed messages (on their context or another) mixed with random fragments
_MESSAGES = st.lists(st.one_of(
    st.builds(_message, st.sampled_from([1, 3, 5]), st.sampled_from([b"STORE", b"FIND", b"ACTION"]),
              st.lists(st.one_of(st.binary(max_size=300), st.integers(0, 40_000).map(lambda n: b"\0" * n)),
                       max_size=4),
              st.booleans()),
    _PDV.map(lambda pdv: [pdv])), min_size=1, max_size=8).map(lambda groups: [p for g in groups for p in g])


@pytest.mark.fuzz
@given(_MESSAGES)
def test_fragments_never_escape_or_grow_past_the_caps(tmp_path_factory, pdvs):
    """Random P-DATA fragments (command sets, data sets, control bytes, context ids) fed to the fast
    path of an association: no exception escapes, no buffer passes its cap, an overflow aborts."""
    spool = tmp_path_factory.mktemp("spool")
    limits = wire.Limits(max_pdu=16384, max_associate_rq=65536, max_identifier=65536)
    ae = AE(ae_title="M3DICOM")
    assoc = Association(ae, "acceptor")
    for context_id, sop_class in ((1, CTImageStorage), (3, StudyRootQueryRetrieveInformationModelFind),
                                  (5, StorageCommitmentPushModel)):
        cx = build_context(sop_class)
        cx.context_id = context_id
        assoc._accepted_cx[context_id] = cx
    assoc.dul.state_machine.current_state = "Sta6"
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    assoc.dul.socket = SimpleNamespace(send=lambda data: None, socket=ours, ready=False)
    stored = []
    dimse = fastpath.FastDIMSE(assoc, lambda path, *args: stored.append(path) or (0, ""), None, limits)
    samples = {b"STORE": _store_rq(), b"FIND": _find_rq(), b"ACTION": _action_rq()}
    import tempfile

    old, tempfile.tempdir = tempfile.tempdir, str(spool)
    try:
        for context_id, control, payload in pdvs:
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[context_id, bytes([control]) + samples.get(payload, payload)]]
            dimse.receive_primitive(primitive)   # never raises
            assert len(dimse._command) <= wire.MAX_COMMAND_SET
            assert dimse._stock_command <= wire.MAX_COMMAND_SET
            assert dimse._stock_data <= limits.max_identifier
            if dimse.aborted:
                assert "Evt19" in assoc.dul.event_queue.queue
                break
        event("aborted" if dimse.aborted else "stored" if stored else "left to pynetdicom"
              if dimse.message is not None or not dimse.msg_queue.empty() else "other")
    finally:
        tempfile.tempdir = old
        dimse.drop()
        ours.close()
        theirs.close()


@pytest.mark.fuzz
@pytest.mark.interop
def test_random_pdus_against_a_live_node(stored, tmp_path):
    """Random PDUs, before and inside an association, on the plain port: each connection is answered or
    closed within seconds, memory stays bounded, and the node still serves."""
    node, before = stored

    @given(associated=st.booleans(), pdu_type=st.integers(0, 255),
           length=st.one_of(st.integers(0, 4096), st.integers(0, 0xFFFFFFFF)), body=st.binary(max_size=2048))
    def attack(associated, pdu_type, length, body):
        sock = _associate(node, False)[0] if associated else _connect(node, False)
        try:
            _send(sock, struct.pack(">BBI", pdu_type, 0, length) + body)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            _until_closed(sock, timeout=5)
        finally:
            sock.close()

    with _peak_rss(node) as memory:
        attack()
    assert memory.growth < 64 * MiB
    _unharmed(node, before, tmp_path)
