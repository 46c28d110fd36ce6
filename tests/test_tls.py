"""DICOM TLS refusals (BCP 195 profile, mutual TLS) and association policy, with real peers."""
from __future__ import annotations

import socket
import ssl
import subprocess
import time
import warnings

import pytest

from helpers import M3DICOM, ROOT, data_file, wait_for

pytestmark = pytest.mark.interop
CT = data_file("CT_small.dcm")


def _stored(node) -> int:
    return node.rows("SELECT COUNT(*) FROM instances")[0][0]


def _handshake_failures(node) -> int:
    return node.log().count("TLS handshake from")


def _refused(node, result, before: int) -> None:
    assert result.returncode != 0, "the peer was accepted"
    assert _stored(node) == 0
    wait_for(lambda: _handshake_failures(node) > before, what="the failed handshake to be logged")


def test_no_client_certificate_is_refused(node):
    node.storescu(CT)  # the same peer with its certificate is accepted
    before = _handshake_failures(node)
    anonymous = subprocess.run(["storescu", "+tla", "+cf", str(node.pki / "ca.pem"), "-aec", "M3DICOM",
                                "127.0.0.1", str(node.port), str(data_file("MR_small.dcm"))],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    assert node.rows("SELECT COUNT(*) FROM instances") == [(1,)]
    wait_for(lambda: _handshake_failures(node) > before, what="the refusal to be logged")
    assert "127.0.0.1:" in node.log().split("TLS handshake from", 1)[1][:30]


def test_certificate_from_another_ca_is_refused(node, tmp_path):
    other = tmp_path / "other-pki"
    subprocess.run(M3DICOM + ["certs", "init", "--dir", str(other)], check=True, cwd=ROOT, capture_output=True)
    before = _handshake_failures(node)
    result = subprocess.run(["storescu", "+tls", str(other / "client.key"), str(other / "client.pem"),
                             "+cf", str(node.pki / "ca.pem"), "-aec", "M3DICOM", "127.0.0.1", str(node.port),
                             str(CT)], capture_output=True, text=True, timeout=60)
    _refused(node, result, before)


def test_plain_dicom_on_the_tls_port_is_refused(node):
    before = _handshake_failures(node)
    result = subprocess.run(["storescu", "-to", "5", "-ta", "5", "-aec", "M3DICOM", "127.0.0.1", str(node.port),
                             str(CT)], capture_output=True, text=True, timeout=60)
    _refused(node, result, before)


def test_tls_1_1_client_is_refused(node):
    before = _handshake_failures(node)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.load_cert_chain(node.pki / "client.pem", node.pki / "client.key")
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|protocol version"):
            ctx.wrap_socket(raw)
    wait_for(lambda: _handshake_failures(node) > before, what="the refusal to be logged")
    assert "UNSUPPORTED_PROTOCOL" in node.log() or "version" in node.log().lower()


def test_negotiated_tls_is_1_3_with_an_aead_suite(node):
    ctx = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    ctx.load_cert_chain(node.pki / "client.pem", node.pki / "client.key")
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"
            assert "GCM" in tls.cipher()[0] or "CHACHA20" in tls.cipher()[0]


def test_the_dicom_port_sends_no_session_tickets(pki):
    """DICOM peers open a TLS session per association: the two TLS 1.3 tickets OpenSSL sends by default were
    never used and cost a third of the receiver's handshake (1.3 ms of CPU), so the node sends none."""
    from scp.tls import client_context, server_context

    def tickets(server: ssl.SSLContext, version: str = "TLSv1.3") -> bool:
        client = client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key", check_hostname=False)
        client.maximum_version = ssl.TLSVersion[version.replace(".", "_")]
        bios = [ssl.MemoryBIO() for _ in range(4)]
        s = server.wrap_bio(bios[0], bios[1], server_side=True)
        c = client.wrap_bio(bios[2], bios[3])
        for _ in range(5):
            for side, inbox, outbox in ((c, bios[2], bios[3]), (s, bios[0], bios[1])):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                (bios[0] if side is c else bios[2]).write(outbox.read())
        with pytest.raises(ssl.SSLWantReadError):
            c.read(1)                                   # takes what the server sent after the handshake
        assert c.version() == version
        return c.session is not None and c.session.has_ticket

    node_side = server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert not tickets(node_side) and not tickets(node_side, "TLSv1.2")
    node_side.num_tickets = 2                          # OpenSSL's defaults: the check can tell
    node_side.options &= ~ssl.OP_NO_TICKET
    assert tickets(node_side) and tickets(node_side, "TLSv1.2")


def test_tls_1_2_offers_only_forward_secret_aead_suites(node):
    ctx = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    ctx.load_cert_chain(node.pki / "client.pem", node.pki / "client.key")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES256-SHA:AES128-SHA256")  # RSA key exchange, CBC: must be refused
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="localhost")


def test_idle_connection_does_not_delay_storescu(make_node):
    node = make_node(dicom={"tls_handshake_timeout": 30.0}, router={"enabled": False})
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        started = time.monotonic()
        node.storescu(CT, timeout=25)
        elapsed = time.monotonic() - started
    finally:
        for sock in idle:
            sock.close()
    assert elapsed < 5, f"storescu took {elapsed:.1f}s behind idle connections"
    assert node.rows("SELECT COUNT(*) FROM instances") == [(1,)]


def test_idle_handshake_times_out_and_is_logged(make_node):
    node = make_node(dicom={"tls_handshake_timeout": 0.5}, router={"enabled": False})
    with socket.create_connection(("127.0.0.1", node.port)) as idle:
        wait_for(lambda: "timed out" in node.log(), timeout=10, what="the handshake timeout")
        idle.settimeout(2)
        assert idle.recv(1) == b""  # the node closed it


def test_wrong_called_ae_is_rejected(node):
    result = node.storescu(CT, check=False, aec="SOMEONE")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    assert _stored(node) == 0


def test_allowed_calling_aets(make_node):
    node = make_node(dicom={"allowed_calling_aets": ["MODALITY1"]}, router={"enabled": False})
    refused = node.storescu(CT, check=False, aet="INTRUDER")
    assert refused.returncode != 0 and _stored(node) == 0
    node.storescu(CT, aet="MODALITY1")
    assert _stored(node) == 1


def test_max_associations_is_enforced(make_node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from scp.tls import client_context

    # the limit is per process; one address may take all of them here (by default: half)
    node = make_node(dicom={"max_associations": 2, "max_associations_per_source": 2, "receivers": 1},
                     router={"enabled": False})
    tls = (client_context(node.pki / "ca.pem", node.pki / "client.pem", node.pki / "client.key"), "localhost")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="M3DICOM", tls_args=tls) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", node.port, ae_title="M3DICOM", tls_args=tls)
        assert third.is_rejected
    finally:
        for assoc in held:
            assoc.release()
    again = ae.associate("127.0.0.1", node.port, ae_title="M3DICOM", tls_args=tls)
    assert again.is_established
    again.release()
