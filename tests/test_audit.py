"""IHE ATNA audit messages (issue 19): valid DICOM audit messages (PS3.15 A.5.1; the schema is in
tests/data), sent by syslog over TLS to a real repository, Debian's rsyslog with its TLS input (gtls,
mutual TLS) started here; what a storescu / findscu / getscu / viewer session did arrives with its peer,
patient and study; while the repository is down messages wait in the index, and none is lost.
"""
from __future__ import annotations

import base64
import http.cookiejar
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from lxml import etree

from archive import atna
from archive.syslog import frame
from helpers import ROOT, Node, free_port, synthetic_instances, wait_for
from test_viewer_browser import PASSWORD

SCHEMA = etree.RelaxNG(etree.parse(str(ROOT / "tests" / "data" / "dicom-audit-message.rng")))
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def valid(xml: bytes) -> etree._Element:
    doc = etree.fromstring(xml)
    assert SCHEMA.validate(doc), SCHEMA.error_log
    return doc


def test_every_kind_of_message_is_valid_and_hostile_values_stay_inside_it():
    user = atna.Participant("SCAN\x01NER<\"&'>", True, "source", "127.0.0.1")
    node = atna.Participant("M3DICOM", False, "destination", "::1", alternative_id="4242")
    patient = atna.Patient("ID-\x07<1>", "Doe^J\u0000ane")
    events = [
        atna.Event("application-activity", action="E", event_type="application-start",
                   participants=(node, atna.Participant("root", True, "application-launcher"))),
        atna.Event("instances-transferred", action="C", participants=(user, node), patient=patient,
                   studies=(atna.Study("1.2.3", {"1.2.840.10008.5.1.4.1.1.2": 3}, "ACC<1>"),)),
        atna.Event("query", action="E", participants=(user, node), query=("1.2.840.10008.5.1.4.1.2.2.1", b"\x00\xff<")),
        atna.Event("begin-transferring", action="E", participants=(node, user), patient=patient,
                   studies=(atna.Study("1.2.3", {}),)),
        atna.Event("user-authentication", action="E", outcome="4", event_type="login",
                   participants=(atna.Participant("mallory", True, None, "203.0.113.9"), node)),
        atna.Event("instances-accessed", action="R", participants=(user, node), studies=(atna.Study("1.2.3"),)),
        atna.Event("security-alert", action="E", outcome="4", event_type="node-authentication",
                   participants=(atna.Participant("198.51.100.7", False, None, "198.51.100.7"), node),
                   description="TLS handshake failed: <bad certificate>"),
        atna.Event("audit-log-used", action="R", participants=(atna.Participant("admin", True, None, "::1"), node),
                   audit_log="https://node.example/admin/audit?who=<x>"),
        atna.Event("security-alert", action="E", event_type="security-roles-changed",
                   participants=(atna.Participant("admin", True, None, "::1"), node), account="bob\x01",
                   description="role: reader -> clinician"),
    ]
    for event in events:
        doc = valid(atna.to_xml(event, "M3DICOM", "Site <A>"))
        assert doc.find("EventIdentification/EventID").get("csd-code") == atna.EVENTS[event.kind][0]
    said = atna.to_xml(events[2], "M3DICOM")
    assert base64.b64decode(etree.fromstring(said).find(".//ParticipantObjectQuery").text) == b"\x00\xff<"
    # the schema is no rubber stamp: a message without its source, or with an unknown outcome, fails it
    broken = etree.fromstring(atna.to_xml(events[1], "M3DICOM"))
    broken.remove(broken.find("AuditSourceIdentification"))
    assert not SCHEMA.validate(broken)
    odd = etree.fromstring(atna.to_xml(events[1], "M3DICOM"))
    odd.find("EventIdentification").set("EventOutcomeIndicator", "2")
    assert not SCHEMA.validate(odd)


def test_a_syslog_frame_is_rfc5424_in_rfc5425_octet_counting():
    data = frame(b"<AuditMessage/>", "host name\x00", "m3dicom", "123", 1_700_000_000.25)
    length, _, message = data.partition(b" ")
    assert int(length) == len(message)
    assert message.startswith(b"<85>1 2023-11-14T22:13:20.250Z hostname m3dicom 123 IHE+RFC-3881 - \xef\xbb\xbf<")


def test_a_query_message_carries_its_syntax_and_fits_a_default_rsyslog():
    event = atna.Event("query", action="E", participants=(atna.Participant("F", True, "source"),),
                       query=("1.2.840.10008.5.1.4.1.2.2.1", b"\x08\x00" * (1 << 20)), query_syntax="1.2.840.10008.1.2")
    doc = valid(atna.to_xml(event, "M3DICOM"))
    assert len(base64.b64decode(doc.find(".//ParticipantObjectQuery").text)) == atna.QUERY_MAX
    assert len(frame(atna.to_xml(event, "M3DICOM"), "host", "m3dicom", "1", 0)) < 8 << 10      # $MaxMessageSize
    detail = doc.find(".//ParticipantObjectDetail")
    assert detail.get("type") == "TransferSyntax" and base64.b64decode(detail.get("value")) == b"1.2.840.10008.1.2"


class PythonRepository:
    """A repository on Python's ssl (OpenSSL): TLS 1.3 with session tickets, which a sender must not take for
    the connection's end. It keeps what it receives."""

    def __init__(self, pki: Path, idle: float | None = None):
        import socket
        import threading

        self.idle = idle                   # seconds without data after which it closes a connection (as rsyslog may)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki / "server.pem", pki / "server.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.data, self.connections = self.sock.getsockname()[1], bytearray(), 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(self.idle)
                while chunk := tls.recv(65536):
                    self.data += chunk
        except OSError:
            pass

    def frames(self) -> list[bytes]:
        found, rest = [], bytes(self.data)
        while rest:
            length, _, rest = rest.partition(b" ")
            found.append(rest[:int(length)])
            rest = rest[int(length):]
        return found


def test_the_sender_sends_each_message_once_to_an_openssl_repository_and_only_its_nodes(tmp_path, pki):
    """TLS 1.3 session tickets arrive after the handshake: they once read as a closed connection, and every
    batch was sent again, forever. Nodes sharing an index send only their own messages, and a message that
    commits late with a smaller number is not removed unsent."""
    from archive import Archive
    from archive.syslog import Sender
    from scp.tls import client_context

    archive = Archive(tmp_path / "data")
    repository = PythonRepository(pki)
    try:
        mine = [(time.time(), f"<AuditMessage n='{i}'/>".encode()) for i in range(150)]
        atna.put(archive.index, "n1", mine)
        atna.put(archive.index, "n2", [(time.time(), b"<AuditMessage node='n2'/>")])
        sender = Sender(archive.index, "n1", "127.0.0.1", repository.port,
                        client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key"))
        assert sender.step() == 100
        atna.put(archive.index, "n1", [(time.time(), b"<AuditMessage late='1'/>")])
        assert sender.step() == 51 and sender.step() == 0
        wait_for(lambda: len(repository.frames()) == 151, what="every message received")
        got = [frame.rpartition(b"\xef\xbb\xbf")[2] for frame in repository.frames()]
        assert got == [m for _, m in mine] + [b"<AuditMessage late='1'/>"]        # once each, in order
        assert repository.connections == 1
        assert atna.waiting(archive.index, "n1")[0] == 0 and atna.waiting(archive.index, "n2")[0] == 1
        sender.close()
    finally:
        repository.sock.close()
        archive.close()


class Rsyslog:
    """rsyslogd in the foreground, TLS input (gtls, x509/certvalid: the node must show a certificate of the
    CA), every message's MSGID and text written one per line to `out`."""

    def __init__(self, work: Path, pki: Path, port: int):
        self.work, self.port, self.out = work, port, work / "received.log"
        work.mkdir(parents=True, exist_ok=True)
        (work / "spool").mkdir(exist_ok=True)
        self.conf = work / "rsyslog.conf"
        self.conf.write_text(f'''
global(workDirectory="{work / 'spool'}"
       DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{pki / 'ca.pem'}"
       DefaultNetstreamDriverCertFile="{pki / 'server.pem'}" DefaultNetstreamDriverKeyFile="{pki / 'server.key'}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="audit" type="string" string="%msgid% %msg%\\n")
action(type="omfile" file="{self.out}" template="audit")
''')
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Rsyslog":
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.work / "pid")],
                                     stdout=open(self.work / "rsyslogd.out", "ab"), stderr=subprocess.STDOUT)
        import socket

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                assert self.proc.poll() is None, (self.work / "rsyslogd.out").read_text()
                return False
        wait_for(listening, timeout=20, what="rsyslogd listening")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def messages(self) -> list[etree._Element]:
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_bytes().splitlines():
            msgid, _, text = line.partition(b" ")
            assert msgid == b"IHE+RFC-3881", line[:200]
            found.append(valid(text.lstrip(b"\xef\xbb\xbf").strip()))
        return found


def kind(doc) -> str:
    code = doc.find("EventIdentification/EventID").get("csd-code")
    return next(k for k, (c, _) in atna.EVENTS.items() if c == code)


def objects(doc, role: str) -> list[str]:
    return [o.get("ParticipantObjectID") for o in doc.findall("ParticipantObjectIdentification")
            if o.get("ParticipantObjectTypeCodeRole") == role]


def users(doc) -> list[str]:
    return [p.get("UserID") for p in doc.findall("ActiveParticipant")]


@pytest.fixture
def repository(tmp_path, pki):
    if not os.path.exists(RSYSLOGD):
        pytest.fail("rsyslogd is not installed: `make install` installs Debian's rsyslog and rsyslog-gnutls")
    server = Rsyslog(tmp_path / "rsyslog", pki, free_port()).start()
    yield server
    server.stop()


def _login(node: Node, password: str) -> int:
    context = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    context.check_hostname = False
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                         urllib.request.HTTPSHandler(context=context))
    base = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    request = urllib.request.Request(base + "/login", urllib.parse.urlencode({"user": "admin", "password": password})
                                     .encode(), headers={"Origin": base})
    try:
        with opener.open(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_a_session_reaches_the_repository_and_nothing_is_lost_while_it_is_down(tmp_path, pki, repository):
    node = Node(tmp_path / "node", pki, viewer={"enabled": True, "port": free_port()}, metrics={"port": free_port()},
                audit={"repository": f"127.0.0.1:{repository.port}", "site_id": "TEST-HOSPITAL"})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    try:
        files = synthetic_instances(tmp_path / "study", 2, patient="Audit^Anna", patient_id="AUD-001")
        study = pydicom.dcmread(files[0]).StudyInstanceUID
        node.storescu(*files, aet="MODALITY1")
        env = {**os.environ, "TCP_NODELAY": "1"}
        subprocess.run(["findscu", *node.tls_args(), "-aet", "PACSQUERY", "-aec", "M3DICOM", "-S", "-k",
                        "QueryRetrieveLevel=STUDY", "-k", "PatientID=AUD-001", "-k", "StudyInstanceUID", "127.0.0.1",
                        str(node.port)], check=True, capture_output=True, env=env)
        (tmp_path / "got").mkdir()
        subprocess.run(["getscu", "-aet", "WORKSTATION", "-aec", "M3DICOM", "-S", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study}", "-od", str(tmp_path / "got"), "127.0.0.1",
                        str(node.plain_port)], check=True, capture_output=True, env=env)
        assert _login(node, "not the password") == 401 and _login(node, PASSWORD) == 200
        import socket
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as garbage:   # a port scanner
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                garbage.recv(100)
            except OSError:
                pass

        def arrived(wanted: dict[str, int]):
            got = repository.messages()
            kinds = [kind(d) for d in got]
            return got if all(kinds.count(k) >= n for k, n in wanted.items()) else None
        got = wait_for(lambda: arrived({"application-activity": 1, "instances-transferred": 1, "query": 1,
                                        "begin-transferring": 1, "user-authentication": 2, "security-alert": 1}),
                       timeout=30, what="the session's messages")
        by = {}
        for doc in got:
            by.setdefault(kind(doc), []).append(doc)
        stored = by["instances-transferred"][0]
        assert objects(stored, "3") == [study] and objects(stored, "1") == ["AUD-001"]
        assert "MODALITY1" in users(stored) and "M3DICOM" in users(stored)
        assert stored.find(".//SOPClass").get("NumberOfInstances") == "2"
        assert stored.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "TEST-HOSPITAL"
        query = by["query"][0]
        assert "PACSQUERY" in users(query)
        assert b"AUD-001" in base64.b64decode(query.find(".//ParticipantObjectQuery").text)
        sent = by["begin-transferring"][0]
        assert "WORKSTATION" in users(sent) and objects(sent, "3") == [study] and objects(sent, "1") == ["AUD-001"]
        outcomes = sorted(d.find("EventIdentification").get("EventOutcomeIndicator") for d in by["user-authentication"])
        assert outcomes == ["0", "4"] and all("admin" in users(d) for d in by["user-authentication"])
        alert = by["security-alert"][0]
        assert "127.0.0.1" in users(alert) and alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
        assert "TLS handshake failed" in alert.find("EventIdentification/EventOutcomeDescription").text
        start = by["application-activity"][0]
        assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"

        # the repository goes away: what happens meanwhile waits in the index, and arrives once it is back
        before = len(got)
        repository.stop()
        later = []
        for n in range(3):
            (path,) = synthetic_instances(tmp_path / f"later{n}", 1, patient="Audit^Anna", patient_id="AUD-001")
            node.storescu(path, aet="MODALITY2")
            later.append(pydicom.dcmread(path).StudyInstanceUID)
        wait_for(lambda: node.rows("SELECT COUNT(*) FROM audit_outbox")[0][0] >= 3, timeout=15,
                 what="the messages waiting in the index")
        said = node.cli("status").stdout
        assert f"messages waiting for 127.0.0.1:{repository.port}" in said, said
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{node.settings['metrics']['port']}/metrics", timeout=30)
        waiting = [line for line in scrape.read().decode().splitlines() if line.startswith("m3dicom_audit_waiting ")]
        assert waiting and float(waiting[0].split()[1]) >= 3, waiting
        time.sleep(2)                                       # the sender tries, and tries again
        repository.start()
        got = wait_for(lambda: (lambda m: m if {s for d in m for s in objects(d, "3")} >= set(later) else None)(
            repository.messages()), timeout=90, what="the waiting messages delivered")
        assert len(got) >= before + 3
        wait_for(lambda: node.rows("SELECT COUNT(*) FROM audit_outbox")[0][0] == 0, what="the outbox emptied")
    finally:
        node.stop()
    assert "audit: repository" in node.log()             # the outage was said once, and its end
    # the node's stop reaches the repository as it stops, not at its next start
    stops = [d for d in repository.messages() if kind(d) == "application-activity"
             and d.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"]
    assert len(stops) == 1 and node.rows("SELECT COUNT(*) FROM audit_outbox")[0][0] == 0


def test_a_repository_that_closes_idle_connections_and_big_batches_and_odd_addresses(tmp_path, pki):
    """Found by the attack pass: a connection the repository closed while idle was used again (the next message
    waited 10 s and was reported as an outage); a batch of large messages had to pass whole within 10 s; the
    repository setting took spaces, non-ASCII digits and a bare IPv6 address."""
    from archive import Archive
    from archive.settings import AuditSection, SettingsError
    from archive.syslog import Sender
    from scp.tls import client_context

    archive = Archive(tmp_path / "data")
    repository = PythonRepository(pki, idle=0.3)
    try:
        sender = Sender(archive.index, "n1", "127.0.0.1", repository.port,
                        client_context(pki / "ca.pem", pki / "client.pem", pki / "client.key"))
        atna.put(archive.index, "n1", [(time.time(), b"<AuditMessage n='1'/>")])
        assert sender.step() == 1
        time.sleep(1.0)                                              # the repository closes the connection
        atna.put(archive.index, "n1", [(time.time(), b"<AuditMessage n='2'/>")])
        started = time.monotonic()
        assert sender.step() == 1 and time.monotonic() - started < 3 and not sender.failing
        big = b"<AuditMessage d='" + b"x" * 20000 + b"'/>"
        atna.put(archive.index, "n1", [(time.time(), big)] * 10)
        assert sender.step() == 3                          # three 20 KB messages fit in BATCH_BYTES (64 KiB), not ten
        wait_for(lambda: len(repository.frames()) == 5, what="the messages")
        sender.close()
    finally:
        repository.sock.close()
        archive.close()
    for wrong in ("a b:6514", "host:\u0661\u0662", "::1:6514", "h\u00e9:6514", "[]:6514", "h/x:6514", "h\x00:6514"):
        with pytest.raises(SettingsError, match="is not host:port"):
            AuditSection(repository=wrong).validate()
    AuditSection(repository="[::1]:6514").validate()


def test_the_recorder_keeps_what_the_index_refused_and_writes_it_later(tmp_path):
    """Found by the attack pass: messages whose write failed (the index locked past its busy timeout, away)
    were dropped. They now wait in memory and are written once the index takes them."""
    from sqlalchemy import text

    from archive import Archive

    archive = Archive(tmp_path / "data")
    recorder = atna.Recorder(archive.index, "n1", "M3DICOM")
    try:
        with archive.index.write() as conn:                                   # the outbox away for a while
            conn.execute(text("ALTER TABLE audit_outbox RENAME TO audit_outbox_away"))
        recorder.record(atna.Event("user-authentication", action="E", event_type="login",
                                   participants=(atna.Participant("alice", True),)))
        time.sleep(3 * atna.WRITE_EVERY)                                      # a write or two fail meanwhile
        with archive.index.write() as conn:
            conn.execute(text("ALTER TABLE audit_outbox_away RENAME TO audit_outbox"))
        wait_for(lambda: atna.waiting(archive.index, "n1")[0] == 1, timeout=10, what="the message written")
    finally:
        recorder.close()
        archive.close()
