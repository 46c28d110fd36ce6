"""The node's log (issue 19): no patient name, ID, accession number or share token at any level, and
`log.format = "json"` writes one JSON object per line.

One node at DEBUG, JSON lines, the viewer and /metrics on, goes through a session as a hospital's would:
a scanner's study over DICOM TLS, an instance of another patient that claims that study (refused), C-FIND
by name and ID, C-GET, the viewer's study search, a share link made and opened, DICOMweb searches by
name and ID. Then every line is read: each must be JSON, and none may hold a patient value.
"""
from __future__ import annotations

import http.cookiejar
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pydicom
import pytest

from helpers import Node, free_port, synthetic_instances, wait_for
from test_viewer_browser import PASSWORD

PATIENT = {"name": "Vandermolen^Ysolde", "id": "YV-6620-31", "accession": "ACQ73155"}
OTHER = {"name": "Brackenridge^Osgood", "id": "BO-4471-02"}


def _opener(node: Node):
    context = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    context.check_hostname = False
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                       urllib.request.HTTPSHandler(context=context))


def _call(node: Node, opener, path: str, data: bytes | None = None, headers: dict | None = None,
          method: str | None = None) -> tuple[int, str]:
    base = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    request = urllib.request.Request(base + path, data=data, headers={"Origin": base, **(headers or {})},
                                     method=method)
    try:
        with opener.open(request, timeout=60) as answer:
            return answer.status, answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


@pytest.mark.slow
def test_a_whole_session_at_debug_logs_json_lines_without_patient_data(tmp_path, pki):
    node = Node(tmp_path / "node", pki, viewer={"enabled": True, "port": free_port()},
                metrics={"port": free_port()}, log={"level": "DEBUG", "format": "json"})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    try:
        files = synthetic_instances(tmp_path / "study", 3, patient=PATIENT["name"], patient_id=PATIENT["id"])
        for path in files:
            ds = pydicom.dcmread(path)
            ds.AccessionNumber = PATIENT["accession"]
            ds.save_as(path)
        study = pydicom.dcmread(files[0]).StudyInstanceUID
        node.storescu(*files)
        # another patient's instance claiming that study: refused, and the refusal logged without either patient
        (intruder,) = synthetic_instances(tmp_path / "other", 1, study=study, patient=OTHER["name"],
                                          patient_id=OTHER["id"])
        node.storescu(intruder, check=False)
        assert node.rows("SELECT COUNT(*) FROM patients WHERE patient_id = ?", (OTHER["id"],)) == [(0,)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        for key in (f"PatientName={PATIENT['name'].split('^')[0]}*", f"PatientID={PATIENT['id']}"):
            found = subprocess.run(["findscu", *node.tls_args(), "-aet", "FINDSCU", "-aec", "M3DICOM", "-S",
                                    "-k", "QueryRetrieveLevel=STUDY", "-k", key, "-k", "AccessionNumber",
                                    "-X", "-od", str(tmp_path), "127.0.0.1", str(node.port)],
                                   capture_output=True, text=True, env=env)
            assert found.returncode == 0, found.stderr
        (tmp_path / "got").mkdir()
        got = subprocess.run(["getscu", "-aet", "GETSCU", "-aec", "M3DICOM", "-S",      # dcmtk's getscu has no TLS
                              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                              "-od", str(tmp_path / "got"), "127.0.0.1", str(node.plain_port)],
                             capture_output=True, text=True, env=env)
        assert got.returncode == 0 and len(list((tmp_path / "got").iterdir())) == 3, got.stderr

        opener = _opener(node)
        status, _ = _call(node, opener, "/login", urllib.parse.urlencode(
            {"user": "admin", "password": PASSWORD, "next": f"/studies?name={PATIENT['name']}"}).encode())
        assert status == 200
        for query in ({"name": "vandermolen"}, {"id": PATIENT["id"], "accession": PATIENT["accession"]}):
            status, body = _call(node, opener, "/api/studies?" + urllib.parse.urlencode(query))
            assert status == 200 and PATIENT["id"] in body
        status, page = _call(node, opener, "/studies")
        csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
        status, made = _call(node, opener, f"/api/studies/{study}/share", json.dumps({"days": 1}).encode(),
                             {"Content-Type": "application/json", "X-CSRF-Token": csrf})
        assert status in (200, 201), made
        token = json.loads(made)["url"].split("/s/", 1)[1]
        assert _call(node, _opener(node), f"/s/{token}")[0] == 200
        for query in (f"PatientName={PATIENT['name']}", f"PatientID={PATIENT['id']}",
                      f"AccessionNumber={PATIENT['accession']}", "PatientName=Vander*&fuzzymatching=true"):
            status, body = _call(node, opener, f"/dicomweb/studies?{query}",
                                 headers={"Accept": "application/dicom+json"})
            assert status == 200 and PATIENT["id"] in body, (query, status)
        status, _ = _call(node, opener, f"/dicomweb/studies/{study}/metadata")
        assert status == 200
        wait_for(lambda: "/dicomweb/studies/" in node.log(), what="the access log's lines (DEBUG)")
    finally:
        node.stop()

    lines = [line for line in node.log().splitlines() if line.strip()]
    records = []
    for line in lines:                   # the start lines on standard output too
        assert line.startswith("{"), f"not a JSON record: {line[:200]}"
        record = json.loads(line)
        assert {"time", "level", "process", "logger", "message"} <= set(record), record
        records.append(record)
    assert any(r["level"] == "DEBUG" for r in records) and any("association from" in r["message"] for r in records)
    text = "\n".join(lines).lower()
    values = [*PATIENT.values(), *OTHER.values(), "Vandermolen", "Ysolde", "Brackenridge", "Osgood", token]
    found = {v for v in values for form in (v, urllib.parse.quote(v), urllib.parse.quote_plus(v), v.replace("^", " "))
             if form.lower() in text}
    assert not found, f"patient data or a share token in the node's log: {found}"
