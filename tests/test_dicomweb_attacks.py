"""DICOMweb and the viewer's HTTPS server against what the attack pass of issue 17 tried: nested multipart,
what a share link may learn and do, queries that matched everything, a flood of bad tokens, a re-sent
instance with other content, clients that trickle their request, a job nobody would run. One node (no router)."""
from __future__ import annotations

import io
import json
import socket
import ssl
import time

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from helpers import Node, free_port, synthetic_instances, wait_for
from test_query import findscu

pytestmark = [pytest.mark.slow, pytest.mark.interop]
PASSWORD = "attacks-test-password"
BOUNDARY = "b0undary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
HEADER_TIMEOUT, BODY_TIMEOUT = 3, 2


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki):
    """A node without a router, short request timeouts; one patient with two studies, another patient."""
    work = tmp_path_factory.mktemp("attacks")
    node = Node(work / "node", pki, router={"enabled": False},
                viewer={"enabled": True, "port": free_port(), "header_timeout": HEADER_TIMEOUT,
                        "body_timeout": BODY_TIMEOUT})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    first = synthetic_instances(work / "first", 2, patient="Smith^John", patient_id="P-SMITH")
    second = synthetic_instances(work / "second", 3, patient="Smith^John", patient_id="P-SMITH")
    other = synthetic_instances(work / "other", 1, patient="Jones^Ann", patient_id="P-JONES")
    node.storescu(*first, *second, *other)
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances")[0][0] == 6, what="the instances")
    writer = node.cli("token", "create", "writer", "--scope", "write").stdout.strip()
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    studies = {name: str(pydicom.dcmread(files[0]).StudyInstanceUID)
               for name, files in (("first", first), ("second", second), ("other", other))}
    yield node, url, writer, studies
    node.stop()


def session(pki, token: str | None = None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = str(pki / "ca.pem")
    if token:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def logged_in(site, pki) -> tuple[requests.Session, str]:
    """The admin's session and its CSRF token."""
    _, url, _, _ = site
    person = session(pki)
    assert person.post(f"{url}/login", data={"user": "admin", "password": PASSWORD, "next": "/studies"}).ok
    return person, person.get(f"{url}/studies").text.split('name="csrf-token" content="')[1].split('"')[0]


def guest_of(site, pki, study: str) -> requests.Session:
    _, url, _, _ = site
    person, csrf = logged_in(site, pki)
    link = person.post(f"{url}/api/studies/{study}/share", json={"days": 1}, headers={"X-CSRF-Token": csrf}).json()
    guest = session(pki)
    assert guest.get(link["url"]).ok
    return guest


def part(data: bytes, content_type: str = "application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def ct_bytes() -> bytes:
    with open(get_testdata_file("CT_small.dcm"), "rb") as fh:
        return fh.read()


# -- STOW-RS ----------------------------------------------------------------------------------------

def test_a_nested_multipart_part_fails_alone(site, pki):
    """Its part was read as a multipart reader, which has no read_chunk: a 500 (AttributeError)."""
    node, url, writer, _ = site
    inner = "1nner"
    nested = (f"--{inner}\r\nContent-Type: application/dicom\r\n\r\n".encode() + ct_bytes() + f"\r\n--{inner}--"
              .encode())
    s = session(pki, writer)
    answer = s.post(f"{url}/dicomweb/studies", headers={"Content-Type": STOW_TYPE}, data=body(
        part(nested, f"multipart/related; boundary={inner}"), part(ct_bytes())))
    assert answer.status_code == 202, answer.text
    found = pydicom.Dataset.from_json(answer.json())
    assert [i.FailureReason for i in found.FailedSOPSequence] == [0xC000]
    assert [i.ReferencedSOPInstanceUID for i in found.ReferencedSOPSequence] == \
        [pydicom.dcmread(get_testdata_file("CT_small.dcm")).SOPInstanceUID]
    alone = s.post(f"{url}/dicomweb/studies", headers={"Content-Type": STOW_TYPE},
                   data=body(part(nested, f"multipart/mixed; boundary={inner}")))
    assert alone.status_code == 409 and not pydicom.Dataset.from_json(alone.json()).ReferencedSOPSequence
    assert "part 1 refused: its type is 'multipart/" in node.log()


def test_a_resent_instance_with_other_content_is_a_warning_an_identical_one_plain_success(site, pki, tmp_path):
    node, url, writer, _ = site
    s = session(pki, writer)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".7"
    ds.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    ds.InstanceNumber = 99                                   # the same instance, other content
    ds.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    first, changed = ((tmp_path / name).read_bytes() for name in ("first.dcm", "changed.dcm"))
    post = lambda data: s.post(f"{url}/dicomweb/studies", headers={"Content-Type": STOW_TYPE},  # noqa: E731
                               data=body(part(data)))
    assert post(first).status_code == 200
    again = post(first)
    assert again.status_code == 200 and "Warning" not in again.headers
    assert "WarningReason" not in pydicom.Dataset.from_json(again.json()).ReferencedSOPSequence[0]
    other = post(changed)
    assert other.status_code == 202, other.text
    item, = pydicom.Dataset.from_json(other.json()).ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID and item.WarningReason == 0xB006
    assert "stored copy was kept" in other.headers["Warning"]
    assert node.stored_bytes(ds.SOPInstanceUID)[-len(first) // 2:] == first[-len(first) // 2:]    # the first kept


def test_parts_stored_a_few_at_once_keep_their_order_and_an_instance_sent_twice_keeps_its_first(site, pki, tmp_path):
    """STOW-RS stores several parts at once (dicomweb.STOW_PARALLEL); two parts of one instance with other
    content are still taken in the body's order: the first is kept, the second is answered as discarded."""
    node, url, writer, _ = site
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    parts = []
    for n in range(12):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = n + 1
        ds.save_as(tmp_path / f"{n}.dcm", enforce_file_format=True)
        parts.append((tmp_path / f"{n}.dcm").read_bytes())
    ds.InstanceNumber = 99                                   # the last instance again, other content
    ds.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    parts.insert(6, (tmp_path / "changed.dcm").read_bytes())   # before the original in the body: it is first
    answer = session(pki, writer).post(f"{url}/dicomweb/studies", headers={"Content-Type": STOW_TYPE},
                                       data=body(*map(part, parts)))
    assert answer.status_code == 202, answer.text
    items = pydicom.Dataset.from_json(answer.json()).ReferencedSOPSequence
    assert [i.ReferencedSOPInstanceUID for i in items] == [pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID
                                                           for p in parts]
    assert [n for n, i in enumerate(items) if "WarningReason" in i] == [12]
    assert pydicom.dcmread(io.BytesIO(node.stored_bytes(ds.SOPInstanceUID))).InstanceNumber == 99


def test_a_base_url_ending_in_a_slash_is_told_so(site, pki):
    """The new-user pass: dicomweb-client given "https://host:port/dicomweb/" asks /dicomweb//studies and got
    aiohttp's bare "404: Not Found"."""
    _, url, writer, _ = site
    answer = session(pki, writer).get(f"{url}/dicomweb//studies")
    assert answer.status_code == 404 and "without a '/' at its end" in answer.json()["error"]


# -- queries ------------------------------------------------------------------------------------------

def test_an_empty_value_in_a_list_and_a_uid_with_a_leading_zero_are_refused_over_qido_and_c_find(site, pki):
    """`PatientName=\\` matched every study; `1.01.2` was taken as a UID (and matched nothing)."""
    node, url, writer, studies = site
    s = session(pki, writer)
    assert len(s.get(f"{url}/dicomweb/studies").json()) >= 3
    for params, said in (({"PatientName": "\\"}, "an empty value in a list"),
                         ({"PatientID": "P-SMITH\\"}, "an empty value in a list"),
                         ({"StudyInstanceUID": f"{studies['first']},"}, "an empty value in a list"),
                         ({"StudyInstanceUID": "1.01.2"}, "not a UID"), ({"StudyInstanceUID": "01.2"}, "not a UID"),
                         ({"StudyInstanceUID": "1.2.*"}, "not a UID")):
        answer = s.get(f"{url}/dicomweb/studies", params=params)
        assert answer.status_code == 400 and said in answer.json()["error"], (params, answer.text)
    assert s.get(f"{url}/dicomweb/studies/1.01.2/series").status_code == 400
    for key, said in (("PatientName=\\", "PatientName: an empty value in a list"),
                      ("StudyInstanceUID=1.01.2", "StudyInstanceUID: not a UID")):
        results, log = findscu(node, "-S", "QueryRetrieveLevel=STUDY", key, "PatientID", check=False)
        assert results == [] and "Failed: UnableToProcess" in log, log
        assert f"C-FIND from FINDSCU refused (0xC000): {said}" in node.log()


def test_a_share_link_learns_nothing_of_the_patients_other_studies(site, pki):
    _, url, writer, studies = site
    counts = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
    person = pydicom.Dataset.from_json(session(pki, writer).get(f"{url}/dicomweb/studies", params={
        "StudyInstanceUID": studies["first"], "includefield": "all"}).json()[0])
    assert [person[k].value for k in counts] == [2, 2, 5]           # the patient's two studies
    guest = guest_of(site, pki, studies["first"])
    for params in ({"includefield": "all"}, {"includefield": ",".join(counts)},
                   {"NumberOfPatientRelatedStudies": "2"}):
        seen, = guest.get(f"{url}/dicomweb/studies", params=params).json()
        found = pydicom.Dataset.from_json(seen)
        assert found.StudyInstanceUID == studies["first"] and found.NumberOfStudyRelatedInstances == 2
        assert not any(k in found for k in counts), params
    assert guest.get(f"{url}/dicomweb/studies", params={"StudyInstanceUID": studies["second"]}).status_code == 204


def test_a_share_link_is_told_it_is_read_only_when_it_stores(site, pki):
    _, url, _, studies = site
    guest = guest_of(site, pki, studies["first"])
    for headers in ({}, {"X-CSRF-Token": "x"}):
        answer = guest.post(f"{url}/dicomweb/studies", data=body(part(ct_bytes())),
                            headers={"Content-Type": STOW_TYPE, **headers})
        assert answer.status_code == 403 and "share link is read-only" in answer.json()["error"], answer.text


# -- tokens ---------------------------------------------------------------------------------------------

def test_a_flood_of_bad_tokens_writes_one_audit_row_per_address_and_minute(site, pki):
    node, url, _, _ = site
    before = node.rows("SELECT COUNT(*) FROM audit WHERE user_name = 'token:?'")[0][0]
    s = session(pki, "m3t_" + "x" * 43)
    assert {s.get(f"{url}/dicomweb/studies").status_code for _ in range(40)} == {401}
    assert node.rows("SELECT COUNT(*) FROM audit WHERE user_name = 'token:?'")[0][0] - before <= 1


def test_refusals_are_counted_and_written_with_the_next_row():
    from viewer.logins import Refusals

    refusals = Refusals(window=60, sources=2)
    assert refusals.note("a", 0) == 0                    # the first: written
    assert [refusals.note("a", t) for t in (1, 2, 59)] == [None] * 3
    assert refusals.note("a", 61) == 3                   # the next minute's row says how many were not
    assert refusals.note("b", 61) == 0 and refusals.note("c", 62) is None      # two remembered, none expired
    assert refusals.forgotten == 1
    assert refusals.note("c", 122) == 0 and refusals.forgotten == 1           # "a" (nothing unwritten) forgotten


# -- slow clients ----------------------------------------------------------------------------------------

def tls_socket(site, pki) -> ssl.SSLSocket:
    _, url, _, _ = site
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_within(sock: ssl.SSLSocket, seconds: float) -> bytes:
    """What the server sent until it closed the connection (AssertionError if it did not within `seconds`)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"the connection is still open after {seconds} s; got {got[:200]!r}") from None
    except (ConnectionResetError, ssl.SSLError):
        pass
    return got


def test_a_client_trickling_its_headers_is_cut_off(site, pki):
    sock = tls_socket(site, pki)
    started, sent = time.monotonic(), 0
    try:
        for byte in b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n":
            sock.send(bytes([byte]))
            sent += 1
            time.sleep(0.25)
    except OSError:                      # closed under us: what is wanted
        pass
    closed_within(sock, HEADER_TIMEOUT + 5)
    assert time.monotonic() - started < HEADER_TIMEOUT + 5 and sent < 40
    sock.close()


def test_a_client_trickling_a_stow_body_gets_408_and_leaves_nothing_in_the_spool(site, pki):
    node, _, writer, _ = site
    spool = node.data_dir / "spool" / "uploads"
    sock = tls_socket(site, pki)
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {writer}\r\n"
            f"Content-Type: {STOW_TYPE}\r\nContent-Length: 1000000\r\n\r\n").encode()
    sock.sendall(head + part(ct_bytes()[:1000]))
    wait_for(lambda: spool.is_dir() and any(spool.iterdir()), timeout=10, what="the STOW's spool directory")
    started = time.monotonic()
    time.sleep(BODY_TIMEOUT + 1)         # then a byte: more than body_timeout after the last
    sock.send(b"x")
    answer = closed_within(sock, 20)     # the answer, then the close (aiohttp reads on for 10 s at most)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:300]
    assert time.monotonic() - started < 20
    sock.close()
    assert list(spool.iterdir()) == []
    assert node.rows("SELECT COUNT(*) FROM audit WHERE detail LIKE '%viewer.body_timeout%'")[0][0] == 1


def test_a_body_slower_than_the_rate_is_cut_off_at_the_end_of_a_window():
    import asyncio

    from viewer.base import Pace, SlowBody

    async def trickle():
        async with asyncio.timeout(5) as deadline:
            pace = Pace(5, 1000, deadline)
            pace.WINDOW = 0.2                # a minute in the settings
            pace.got(100)
            await asyncio.sleep(0.25)
            with pytest.raises(SlowBody, match="min_body_rate"):
                pace.got(10)                 # 110 bytes in 0.25 s: under 1000 a second
            fast = Pace(5, 1000, deadline)
            fast.WINDOW = 0.2
            await asyncio.sleep(0.25)
            fast.got(1000)                   # 1000 bytes in 0.25 s: on
            assert deadline.when() > asyncio.get_running_loop().time() + 4     # and the idle deadline moved on

    asyncio.run(trickle())


# -- jobs without a router ------------------------------------------------------------------------------

def test_without_a_router_no_job_is_offered_and_one_asked_for_is_refused(site, pki):
    node, url, _, studies = site
    person, csrf = logged_in(site, pki)
    plugins = person.get(f"{url}/api/studies/{studies['first']}/plugins").json()
    assert plugins["can_start"] is False and "router is off" in plugins["why_not"]
    answer = person.post(f"{url}/api/studies/{studies['first']}/jobs", json={"plugin": "mammo", "params": {}},
                         headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 409 and "router.enabled = false" in answer.json()["error"]
    assert node.rows("SELECT COUNT(*) FROM jobs")[0][0] == 0


def test_plain_http_to_the_https_port_is_told_to_use_https(site):
    """The TLS handshake failed without a word: a browser or curl saw an empty reply."""
    _, url, _, _ = site
    port = url.rsplit(":", 1)[1]
    answer = requests.get(f"http://127.0.0.1:{port}/dicomweb/studies", timeout=10)
    assert answer.status_code == 400 and answer.text.strip() == f"This port speaks HTTPS: use https://127.0.0.1:{port}/"
    silent = socket.create_connection(("127.0.0.1", int(port)), timeout=30)      # says nothing: closed in time
    try:
        assert silent.recv(100) == b""
    finally:
        silent.close()


def viewer_process(node):
    """The node's process that listens on the viewer's port."""
    import psutil

    port = node.settings["viewer"]["port"]
    for process in psutil.Process(node.proc.pid).children(recursive=True):
        if any(c.status == "LISTEN" and c.laddr.port == port for c in process.net_connections("tcp")):
            return process
    raise AssertionError("no process listens on the viewer's port")


def test_running_out_of_file_descriptors_does_not_close_the_viewer_for_good(site, pki):
    """The attack pass: 1,100 silent connections against a service's 1,024 open files made accept() fail once,
    which ended the accepting task: the port stayed open, and nobody was ever answered again. Here the
    viewer's process is given 128 files, 200 silent connections come and go, and it answers again."""
    import resource
    import subprocess

    node, url, writer, _ = site
    viewer = viewer_process(node)
    before = viewer.rlimit(resource.RLIMIT_NOFILE)
    subprocess.run(["prlimit", f"--pid={viewer.pid}", "--nofile=128:%d" % before[1]], check=True)
    port, held = int(url.rsplit(":", 1)[1]), []
    try:
        for _ in range(200):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1)
    finally:
        for conn in held:
            conn.close()
        subprocess.run(["prlimit", f"--pid={viewer.pid}", "--nofile=%d:%d" % before], check=True)
    wait_for(lambda: session(pki, writer).get(f"{url}/dicomweb/studies", timeout=5).status_code == 200,
             timeout=30, what="the viewer answering again")
    assert "cannot accept connections" in node.log()


def test_a_head_gets_the_headers_alone_and_the_next_answer_on_the_connection_is_whole(site, pki):
    """The attack pass: HEAD on a WADO-RS retrieve was sent the whole multipart body, which a kept-alive
    connection (a reverse proxy's) then read as the next answer's status line: an answer forged from stored
    DICOM text could reach another request. Now HEAD gets the headers alone (and reads nothing); the other
    streamed routes (a download, the event stream, the audit CSV) refuse HEAD with 405."""
    import http.client

    _, url, writer, studies = site
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    try:
        for accept in ('multipart/related; type="application/dicom"; transfer-syntax=*', "*/*"):
            connection.request("HEAD", f"/dicomweb/studies/{studies['second']}",
                               headers={"Authorization": f"Bearer {writer}", "Accept": accept})
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read() == b""
            connection.request("GET", "/dicomweb/studies?PatientID=P-SMITH",
                               headers={"Authorization": f"Bearer {writer}"})
            answer = connection.getresponse()
            assert answer.status == 200 and len(json.loads(answer.read())) == 2, accept
    finally:
        connection.close()
    got = session(pki, writer).get(f"{url}/dicomweb/studies/{studies['second']}", headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert got.status_code == 200 and int(got.headers["Content-Length"]) == len(got.content) > 0
    person, _ = logged_in(site, pki)
    for path in ("/api/events", "/admin/audit.csv", "/api/instances/1.2.3/download"):
        assert person.head(url + path).status_code == 405, path


# -- WADO-RS retrieves that stall or fail ------------------------------------------------------------

@pytest.fixture(scope="module")
def big_study(site, tmp_path_factory):
    return _big_study(site[0], tmp_path_factory.mktemp("big"))


def _big_study(node, directory):
    """12 instances of 2 MB: a batch each in memory (over wado.BATCH), more than sockets buffer."""
    study = pydicom.uid.generate_uid()
    files = synthetic_instances(directory, 12, pixel_bytes=2 << 20, study=study, patient="Big^Study",
                                patient_id="P-BIG")
    node.storescu(*files)
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances i JOIN series s ON s.pk = i.series_pk JOIN studies "
                               "t ON t.pk = s.study_pk WHERE t.study_uid = ?", (study,))[0][0] == 12,
             what="the 12 instances")
    return study, files


def stalled_retrieve(url: str, pki, token: str, study: str) -> socket.socket:
    """A retrieve asked for over TLS and never read."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))),
                              server_hostname="127.0.0.1")
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tls.sendall(f"GET /dicomweb/studies/{study} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                "Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*\r\n\r\n".encode())
    return tls


def test_stalled_readers_hold_only_their_callers_share_and_are_cut_off(site, pki, big_study):
    """The attack pass: 8 connections that asked for a study and read nothing held all 16 batches of the
    viewer for as long as they stayed (245 s tried): every other retrieve waited. Now one caller holds at most
    wado.RETRIEVE_PER_CALLER batches, and a piece not taken within viewer.body_timeout cuts the answer off."""
    node, url, writer, _ = site
    study, files = big_study
    stalled = [stalled_retrieve(url, pki, writer, study) for _ in range(6)]
    try:
        reader = node.cli("token", "create", f"other-{time.time_ns()}", "--scope", "read").stdout.strip()
        started = time.monotonic()
        answer = session(pki, reader).get(f"{url}/dicomweb/studies/{study}/series/"
                                          f"{pydicom.dcmread(files[0]).SeriesInstanceUID}/instances/"
                                          f"{pydicom.dcmread(files[0]).SOPInstanceUID}", timeout=60)
        assert answer.status_code == 200 and time.monotonic() - started < BODY_TIMEOUT + 10
        wait_for(lambda: len(node.rows("SELECT 1 FROM audit WHERE study_uid = ? AND detail LIKE '%broken off%'",
                                       (study,))) >= 2, timeout=BODY_TIMEOUT + 30, what="the stalled ones cut off")
    finally:
        for tls in stalled:
            tls.close()
    assert "read nothing for" in node.log()


def test_an_instance_found_damaged_mid_answer_ends_it_without_a_second_status_line(site, pki, tmp_path):
    """The attack pass: a blob that failed its check after the answer had begun made the errors middleware
    write 'HTTP/1.1 500' inside the multipart body, audited 'ok'. Now the connection is closed, the audit row
    says failed, and the log names the instance and its blob. (A study no one has read: an instance read
    lately is sent from viewer.instance_cache_mb as it was verified then.)"""
    node, url, writer, _ = site
    study, files = _big_study(node, tmp_path / "big")
    uid = pydicom.dcmread(files[6]).SOPInstanceUID
    (blob_id,), = node.rows("SELECT blob_id FROM instances WHERE sop_instance_uid = ?", (uid,))
    blob = node.data_dir / "blobs" / blob_id[:2] / blob_id
    original = blob.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    try:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with context.wrap_socket(socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))),
                                 server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET /dicomweb/studies/{study} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {writer}"
                        "\r\nAccept: multipart/related; type=\"application/dicom\"; transfer-syntax=*\r\n\r\n".encode())
            tls.settimeout(30)
            got = bytearray()
            while chunk := tls.recv(1 << 16):
                got += chunk
    finally:
        blob.write_bytes(original)
    assert got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1 ") == 1 and len(got) > 6 << 20
    row = wait_for(lambda: node.rows("SELECT outcome FROM audit WHERE study_uid = ? AND outcome = 'failed'",
                                     (study,)), what="the failed retrieve's audit row")
    assert row and f"SOP Instance {uid} (blob {blob_id}) cannot be read" in node.log()
