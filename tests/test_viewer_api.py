"""The viewer's API and security, through aiohttp's test client against a real archive."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import text

from archive import Archive
from helpers import data_file, synthetic_instances
from node.config import from_dict
from viewer import accounts
from viewer.app import COOKIE, create_app

PASSWORD = "a long enough password"


class Clock:
    def __init__(self):
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path):
    # plain HTTP here (aiohttp's test server): the cookie's Secure flag is checked with TLS on below
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                        "viewer": {"max_upload_mb": 2, "max_file_mb": 1, "session_idle_minutes": 10, "tls": False}},
                       tmp_path)
    archive = Archive(config.data_dir)
    accounts.migrate(archive.index)                 # the viewer's tables, as the node's start makes them
    accounts.add_user(archive.index, "alice", PASSWORD, "clinician")
    studies = {}
    for name in ("a", "b"):
        (path,) = synthetic_instances(tmp_path / name, 1, patient=f"Patient^{name.upper()}", patient_id=f"P-{name}")
        result = archive.ingest_file(path)
        studies[name] = (result.study_uid, result.sop_instance_uid)
    yield config, archive, studies
    archive.close()


@pytest.fixture
async def client(setup, aiohttp_client):
    config, archive, _ = setup
    clock = Clock()
    client = await aiohttp_client(create_app(config, archive, clock=clock))
    client.clock = clock
    return client


async def login(client, user: str = "alice", password: str = PASSWORD):
    return await client.post("/login", data={"user": user, "password": password, "next": "/studies"},
                             allow_redirects=False)


def files(*named: tuple[str, bytes]):
    import aiohttp

    form = aiohttp.FormData()
    for name, data in named:
        form.add_field("files", data, filename=name, content_type="application/octet-stream")
    return form


async def csrf_of(client) -> str:
    page = await client.get("/studies")
    text = await page.text()
    return text.split('name="csrf-token" content="')[1].split('"')[0]


# -- logging in ------------------------------------------------------------------------------

async def test_the_session_cookie_is_httponly_secure_and_same_site(setup, aiohttp_client):
    import dataclasses

    config, archive, _ = setup
    with_tls = dataclasses.replace(config, viewer=dataclasses.replace(config.viewer, tls=True))
    client = await aiohttp_client(create_app(with_tls, archive))
    response = await login(client)
    cookie = response.headers["Set-Cookie"]
    assert response.status == 302 and COOKIE in cookie
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
    assert response.headers.get("Strict-Transport-Security")


async def test_login_and_logout(client, setup):
    response = await login(client)
    assert response.status == 302 and response.headers["Location"] == "/studies"
    assert (await client.get("/api/studies")).status == 200
    token = await csrf_of(client)
    assert (await client.post("/logout", data={"csrf": token}, allow_redirects=False)).status == 302
    assert (await client.get("/api/studies")).status == 401
    rows = setup[1].index.read(text("SELECT action, outcome FROM audit ORDER BY seq"))
    assert [tuple(r) for r in rows] == [("login", "ok"), ("logout", "ok")]


async def test_wrong_passwords_get_one_answer_slower_each_time(client, setup):
    import time

    answers = []
    for user, password in (("alice", "wrong password!"), ("nobody", PASSWORD), ("alice", "wrong again!!")):
        started = time.perf_counter()
        response = await login(client, user, password)
        answers.append((response.status, "Wrong user name or password." in await response.text(),
                        time.perf_counter() - started))
    assert [a[:2] for a in answers] == [(401, True)] * 3
    assert answers[2][2] >= 0.45                      # the third failure waited (0.5 s for the second failure of alice)
    assert accounts.failure_delay(setup[1].index, "alice", "127.0.0.1") >= 1.0
    assert (await client.get("/api/studies")).status == 401
    refused = setup[1].index.read(text("SELECT COUNT(*) FROM audit WHERE action='login' AND outcome='refused'"))[0][0]
    assert refused == 3


async def test_an_idle_session_ends(client):
    await login(client)
    assert (await client.get("/api/studies")).status == 200
    client.clock.now += 11 * 60
    assert (await client.get("/api/studies")).status == 401
    page = await client.get("/studies", allow_redirects=False)
    assert page.status == 302 and page.headers["Location"].startswith("/login")


async def test_state_changes_need_the_csrf_token(client, setup):
    study, _ = setup[2]["a"]
    await login(client)
    refused = await client.post(f"/api/studies/{study}/jobs", json={"plugin": "mammo-cad", "params": {}})
    assert refused.status == 403 and "CSRF" in (await refused.json())["error"]
    wrong = await client.post(f"/api/studies/{study}/share", json={}, headers={"X-CSRF-Token": "forged"})
    assert wrong.status == 403
    made = await client.post(f"/api/studies/{study}/share", json={"days": 1}, headers={"X-CSRF-Token": await csrf_of(client)})
    assert made.status == 201


async def test_security_headers_on_every_answer(client):
    for path in ("/login", "/api/studies", "/static/style.css"):
        headers = (await client.get(path)).headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "same-origin"


# -- share links -----------------------------------------------------------------------------

async def share_link(client, study: str, days: float = 1) -> str:
    await login(client)
    made = await client.post(f"/api/studies/{study}/share", json={"days": days},
                             headers={"X-CSRF-Token": await csrf_of(client)})
    return (await made.json())["url"].split("/s/", 1)[1]


async def test_a_share_link_opens_its_study_and_nothing_else(client, setup, aiohttp_client):
    config, archive, studies = setup
    (a, a_image), (b, b_image) = studies["a"], studies["b"]
    token = await share_link(client, a)
    guest = await aiohttp_client(client.server)
    opened = await guest.get(f"/s/{token}", allow_redirects=False)
    assert opened.status == 302 and opened.headers["Location"] == f"/studies/{a}"
    assert (await guest.get(f"/studies/{a}")).status == 200
    assert (await guest.get(f"/api/instances/{a_image}/render?width=64")).status == 200
    for path in (f"/studies/{b}", f"/api/studies/{b}", f"/api/instances/{b_image}/render", f"/api/instances/{b_image}/download",
                 "/api/studies", "/studies"):
        assert (await guest.get(path)).status == 403, path
    token_csrf = (await (await guest.get(f"/studies/{a}")).text()).split('name="csrf-token" content="')[1].split('"')[0]
    headers = {"X-CSRF-Token": token_csrf}
    assert (await guest.post(f"/api/studies/{a}/jobs", json={"plugin": "mammo-cad"}, headers=headers)).status == 403
    assert (await guest.post(f"/api/studies/{a}/share", json={}, headers=headers)).status == 403
    upload = files(("ct.dcm", data_file("CT_small.dcm").read_bytes()))
    assert (await guest.post("/api/upload", data=upload, headers=headers)).status == 403
    actions = {r[0] for r in archive.index.read(text("SELECT action FROM audit WHERE user_name LIKE 'share:%'"))}
    assert "share_open" in actions and "view" in actions


async def test_tampered_expired_and_revoked_links_open_nothing(client, setup, aiohttp_client):
    study, _ = setup[2]["a"]
    token = await share_link(client, study, days=1)
    guest = await aiohttp_client(client.server)
    link_id, expires, signature = token.split(".")

    def other(text: str) -> str:                 # the same text with its last character changed
        return text[:-1] + ("B" if text[-1] == "A" else "A")

    for forged in (f"{link_id}.{expires}.{other(signature)}", f"{link_id}.{int(expires) + 86400}.{signature}",
                   f"{other(link_id)}.{expires}.{signature}", "..%2F..%2Fetc%2Fpasswd"):
        assert (await guest.get(f"/s/{forged}", allow_redirects=False)).status in (403, 404), forged
    client.clock.now += 2 * 86400
    assert (await guest.get(f"/s/{token}", allow_redirects=False)).status == 403
    client.clock.now -= 2 * 86400
    opened = await guest.get(f"/s/{token}", allow_redirects=False)
    assert opened.status == 302
    assert (await guest.get(f"/api/studies/{study}")).status == 200
    assert accounts.revoke_share(setup[1].index, link_id)
    assert (await guest.get(f"/api/studies/{study}")).status == 403             # revoking ends its sessions too
    assert (await guest.get(f"/s/{token}", allow_redirects=False)).status == 403


async def test_a_link_that_opens_nothing_says_why_on_a_page(client, setup, aiohttp_client):
    """Revoked, expired and forged links answer 403 with a page saying which, and what to do."""
    study, _ = setup[2]["a"]
    revoked, expired = await share_link(client, study), await share_link(client, study, days=0.5)
    assert accounts.revoke_share(setup[1].index, revoked.split(".")[0])
    guest = await aiohttp_client(client.server)

    async def page(token: str) -> str:
        answer = await guest.get(f"/s/{token}", allow_redirects=False)
        assert answer.status == 403 and answer.content_type == "text/html"
        return await answer.text()

    assert "This link has been withdrawn" in await page(revoked)
    client.clock.now += 86400
    assert "This link has expired" in await page(expired)
    signature = expired.rsplit(".", 1)[1]
    forged = expired[:-len(signature)] + ("A" if signature[0] != "A" else "B") + signature[1:]
    for token in (forged, "not-a-link", revoked.split(".")[0] + ".1.x"):
        body = await page(token)
        assert "This link is not valid" in body and "withdrawn" not in body and "expired" not in body
    for body in [await page(revoked)]:
        assert "ask the person who shared it" in body and 'href="/login"' in body and '<link rel="stylesheet"' in body
    details = [r[0] for r in setup[1].index.read(text("SELECT detail FROM audit WHERE action='share_open' "
                                                      "AND outcome='refused' ORDER BY seq"))]
    assert details == ["revoked link", "expired link", "invalid link", "invalid link", "invalid link", "revoked link"]


# -- paths and uploads -------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/api/studies/..%2F..%2Fetc%2Fpasswd", "/api/studies/1.2.3%2F..%2F..", "/studies/..%2Fkeys",
    "/api/instances/..%2F..%2Fkeys%2Fviewer.secret/download", "/api/instances/1.2.3.4/render",
    "/api/jobs/..%2F..%2F/files/model.x3d", "/api/jobs/0123456789abcdef/files/..%2F..%2Fkeys",
    "/studies/1.2/model/..%2F..%2Findex.sqlite3", "/static/..%2F..%2Fnode%2Fconfig.py", "/static/../accounts.py",
    "/vendor/x3dom/..%2F..%2F..%2Fpackage.json", "/api/studies/1' OR '1'='1",
])
async def test_path_traversal_in_every_path_parameter_finds_nothing(client, path):
    await login(client)
    response = await client.get(path, allow_redirects=False)
    assert response.status in (400, 403, 404), (path, response.status)
    body = await response.read()
    assert b"scrypt$" not in body and b"PRIVATE KEY" not in body and b"def " not in body


async def test_uploads_are_stored_or_refused_and_an_oversized_one_stores_nothing(client, setup, tmp_path):
    archive = setup[1]
    await login(client)
    headers = {"X-CSRF-Token": await csrf_of(client)}
    before = archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0]
    (good,) = synthetic_instances(tmp_path / "up", 1)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(synthetic_instances(tmp_path / "zip", 1)[0], "study/one.dcm")
    answer = await client.post("/api/upload", headers=headers, data=files(
        ("good.dcm", good.read_bytes()), ("notes.txt", b"not dicom at all"), ("study.zip", zipped.getvalue())))
    assert answer.status == 200, await answer.text()
    results = {r["name"]: r for r in (await answer.json())["files"]}
    assert results["good.dcm"]["outcome"] == "stored" and results["study.zip/study/one.dcm"]["outcome"] == "stored"
    assert results["notes.txt"]["outcome"] == "refused" and results["notes.txt"]["reason"]
    assert archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0] == before + 2
    count = before + 2
    refused = await client.post("/api/upload", headers=headers, data=files(("big.dcm", b"\0" * (3 << 20))))
    assert refused.status == 413 and "larger than" in (await refused.json())["error"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.dcm", b"\0" * (900 << 10))
    refused = await client.post("/api/upload", headers=headers,
                                data=files(("first.dcm", synthetic_instances(tmp_path / "first", 1)[0].read_bytes()),
                                           ("bomb.zip", bomb.getvalue())))
    assert refused.status == 413 and "inflates" in (await refused.json())["error"]
    assert archive.index.read(text("SELECT COUNT(*) FROM instances"))[0][0] == count
    assert not list((Path(setup[0].data_dir) / "spool" / "uploads").glob("*/*"))


async def test_images_render_at_the_size_and_region_asked_and_come_from_the_cache(client, setup):
    from PIL import Image

    _, image = setup[2]["a"]
    await login(client)
    full = await client.get(f"/api/instances/{image}/render?width=64")
    assert full.status == 200 and full.content_type == "image/png"
    assert Image.open(io.BytesIO(await full.read())).size == (64, 64)
    part = await client.get(f"/api/instances/{image}/render?x=10&y=20&w=30&h=40&width=60&height=80&wc=100&ww=50")
    assert Image.open(io.BytesIO(await part.read())).size == (60, 80)
    assert (await client.get(f"/api/instances/{image}/render?width=99999")).status == 400
    info = await (await client.get(f"/api/instances/{image}/info")).json()
    assert info["image"] and info["rows"] > 0 and info["modality"] == "CT"
    listing = await (await client.get("/api/studies?name=patient^a")).json()
    assert [s["patient_name"] for s in listing["studies"]] == ["Patient^A"]
    assert (await client.get("/api/studies?from=2026-13-45")).status == 400



async def test_an_image_asked_for_at_once_by_many_views_is_decoded_once(client, setup):
    import asyncio

    from viewer.app import IMAGES

    _, image = setup[2]["b"]
    images = client.server.app[IMAGES]
    decodes = []
    original = images._decode
    images._decode = lambda uid: decodes.append(uid) or original(uid)
    await login(client)
    answers = await asyncio.gather(*(client.get(f"/api/instances/{image}/render?width={w}") for w in range(40, 52)))
    assert [a.status for a in answers] == [200] * 12
    assert decodes == [image]


async def test_a_download_is_the_file_as_received(client, setup):
    import asyncio
    import hashlib

    _, archive, studies = setup
    _, image = studies["a"]
    await login(client)
    response = await client.get(f"/api/instances/{image}/download")
    assert response.status == 200 and response.content_type == "application/dicom"
    assert image in response.headers["Content-Disposition"]
    body = await response.read()
    (row,) = archive.index.read(text("SELECT blob_id, size FROM instances WHERE sop_instance_uid=:uid"), {"uid": image})
    assert hashlib.sha256(body).digest() == hashlib.sha256(archive.storage.read_all(row.blob_id)).digest()
    for _ in range(100):                                           # the handler ends just after the last byte
        if not list(archive.exports.iterdir()):
            break
        await asyncio.sleep(0.02)
    assert list(archive.exports.iterdir()) == []                  # the decrypted copy is gone
    audited = archive.index.read(text("SELECT detail FROM audit WHERE action='download'"))
    assert [r[0] for r in audited] == [image]


# -- the study list ------------------------------------------------------------------------------

def dated_study(directory: Path, count: int, date: str, patient: str, patient_id: str, description: str = "",
                time: str = "") -> list[Path]:
    """CT_small copies in a new study of this date (YYYYMMDD), time and patient."""
    import pydicom

    paths = synthetic_instances(directory, count, patient=patient, patient_id=patient_id)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = date, time, description
        ds.save_as(path, enforce_file_format=True)
    return paths


async def test_the_list_is_newest_first_sorts_by_any_column_and_counts_images_apart_from_results(client, setup,
                                                                                                  tmp_path):
    from router import queue

    _, archive, _ = setup            # two studies of 2004-01-19 (CT_small's date): Patient^A, Patient^B
    made = {}
    for key, date, time, name, pid, count in (("old", "19991231", "", "Zeta^Old", "P-old", 1),
                                              ("new", "20260301", "0830", "Alpha^New", "P-new", 3),
                                              ("later", "20260301", "1745", "Mid^Later", "P-later", 2)):
        paths = dated_study(tmp_path / key, count, date, name, pid, time=time)
        made[key] = [archive.ingest_file(p).study_uid for p in paths][0]
    job = queue.create(archive.index, study_uid=made["new"], plugin="mammo-cad", params={}, inputs=[])
    (result,) = dated_study(tmp_path / "result", 1, "20260301", "Alpha^New", "P-new", time="0830")
    import pydicom

    ds = pydicom.dcmread(result)         # a result of the node's own: the same study, another series
    ds.StudyInstanceUID = made["new"]
    ds.save_as(result, enforce_file_format=True)
    assert archive.ingest_file(result, job_id=job).study_uid == made["new"]
    await login(client)

    async def listed(query: str = "") -> list[dict]:
        answer = await client.get("/api/studies" + query)
        assert answer.status == 200, await answer.text()
        return (await answer.json())["studies"]

    studies = await listed()
    assert [s["patient_id"] for s in studies] == ["P-later", "P-new", "P-b", "P-a", "P-old"]      # newest first
    new = next(s for s in studies if s["patient_id"] == "P-new")
    assert (new["images"], new["results"]) == (3, 1)                  # the result is not one of its images
    assert [s["patient_id"] for s in await listed("?sort=date&order=asc")] == ["P-old", "P-a", "P-b", "P-new",
                                                                              "P-later"]
    assert [s["patient_name"] for s in await listed("?sort=name&order=asc")] == [
        "Alpha^New", "Mid^Later", "Patient^A", "Patient^B", "Zeta^Old"]
    assert [s["patient_id"] for s in await listed("?sort=images&order=desc")][:2] == ["P-new", "P-later"]
    assert [s["patient_id"] for s in await listed("?sort=name&order=desc&name=*l*")] == ["P-old", "P-later",
                                                                                        "P-new"]
    for bad in ("?sort=patient_name_key", "?sort=date&order=sideways", "?sort=1;DROP TABLE studies"):
        answer = await client.get("/api/studies" + bad)
        assert answer.status == 400 and "sort by one of" in (await answer.json())["error"], bad


async def test_an_upload_names_each_study_it_touched_once(client, setup, tmp_path):
    archive = setup[1]
    await login(client)
    headers = {"X-CSRF-Token": await csrf_of(client)}
    old = dated_study(tmp_path / "old", 1, "20200101", "Earlier^Study", "P-old")
    assert (await client.post("/api/upload", headers=headers, data=files(("old.dcm", old[0].read_bytes())))).status == 200
    new = dated_study(tmp_path / "new", 3, "20260102", "Phantom^4243", "PH-4243", "Screening")
    answer = await client.post("/api/upload", headers=headers, data=files(
        ("old-again.dcm", old[0].read_bytes()), *((p.name, p.read_bytes()) for p in new)))
    assert answer.status == 200, await answer.text()
    studies = (await answer.json())["studies"]
    assert [(s["patient_name"], s["date"], s["stored"], s["duplicate"]) for s in studies] == [
        ("Phantom^4243", "20260102", 3, 0), ("Earlier^Study", "20200101", 0, 1)]   # what was stored first, once
    assert studies[0]["description"] == "Screening" and studies[0]["images"] == 3
    assert archive.index.read(text("SELECT COUNT(*) FROM instances WHERE calling_ae='upload:alice'"))[0][0] == 4


async def test_an_upload_of_an_empty_file_field_says_to_choose_files(client, setup):
    import aiohttp

    await login(client)
    form = aiohttp.FormData()
    form.add_field("files", b"", filename="", content_type="application/octet-stream")   # what a browser sends
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": await csrf_of(client)}, data=form)
    assert answer.status == 400 and "choose DICOM files or a zip" in (await answer.json())["error"]


# -- notifications -------------------------------------------------------------------------------

async def next_event(stream, timeout: float = 5.0) -> dict:
    """The next `change` event of a server-sent-events stream."""
    import asyncio
    import json

    async def read() -> dict:
        fields = {}
        while True:
            line = (await stream.content.readline()).decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    return {"id": int(fields["id"]), **json.loads(fields["data"])}
                continue
            if not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value

    return await asyncio.wait_for(read(), timeout)


async def test_notifications_are_live_scoped_to_a_share_link_and_resumed_after_a_reconnect(client, setup,
                                                                                         aiohttp_client):
    import asyncio

    from router import queue

    _, archive, studies = setup
    (a, _), (b, _) = studies["a"], studies["b"]
    old = queue.create(archive.index, study_uid=a, plugin="mammo-cad", params={}, inputs=[])
    await login(client)
    guest = await aiohttp_client(client.server)
    assert (await guest.get(f"/s/{await share_link(client, a)}", allow_redirects=False)).status == 302

    stream, shared = await client.get("/api/events"), await guest.get("/api/events")
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    await asyncio.sleep(0.2)
    jobs = [queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[]) for study in (b, a)]
    first, second = await next_event(stream), await next_event(stream)
    assert [(e["job_id"], e["kind"], e["study_uid"]) for e in (first, second)] == [
        (jobs[0], "job_queued", b), (jobs[1], "job_queued", a)]                    # live, and not the old job
    assert (await next_event(shared))["job_id"] == jobs[1]                      # the link sees its study only
    stream.close()
    shared.close()

    later = queue.create(archive.index, study_uid=a, plugin="mammo-cad", params={}, inputs=[])
    await asyncio.sleep(0.2)
    resumed = await client.get("/api/events", headers={"Last-Event-ID": str(first["id"])})
    assert [(await next_event(resumed))["job_id"] for _ in range(2)] == [jobs[1], later]
    resumed.close()
    assert old not in (first["job_id"], second["job_id"])


async def test_a_study_that_arrives_is_announced_once_and_results_are_not(client, setup, tmp_path):
    """The study list hears of new studies (kind study_stored): one event per study however many
    instances came in one read of the log, none for the node's own results. (Read as a browser
    that reconnects: what it missed comes in one read, so the count is certain.)"""
    from router import queue

    _, archive, studies = setup
    await login(client)
    before = archive.index.read(text("SELECT MAX(seq) FROM changes"))[0][0]
    arrived = [archive.ingest_file(p).study_uid for p in dated_study(tmp_path / "new", 3, "20260101", "New^One", "N1")]
    job = queue.create(archive.index, study_uid=arrived[0], plugin="mammo-cad", params={}, inputs=[])
    (result,) = synthetic_instances(tmp_path / "result", 1, study=arrived[0], patient="New^One", patient_id="N1")
    archive.ingest_file(result, job_id=job)
    (other,) = synthetic_instances(tmp_path / "other", 1, study=studies["a"][0], patient="Patient^A",
                                   patient_id="P-a")                                # more images for a study
    archive.ingest_file(other)
    stream = await client.get("/api/events", headers={"Last-Event-ID": str(before)})
    seen = [await next_event(stream) for _ in range(3)]
    stream.close()
    assert [(e["kind"], e["study_uid"]) for e in seen] == [("study_stored", arrived[0]), ("job_queued", arrived[0]),
                                                           ("study_stored", studies["a"][0])]
    latest = archive.index.read(text("SELECT MAX(seq) FROM changes"))[0][0]
    assert [uid for _, uid in archive.index.studies_stored(before, latest)] == [arrived[0], studies["a"][0]]


# -- the command line ------------------------------------------------------------------------------

def test_a_user_added_before_the_first_start_makes_the_index_and_logs_in(make_node):
    """`user add` before the node ever started made nothing ("no index"); now it makes the data
    directory (0700) and the index, and the node's first start uses them; it also runs beside a
    running node (no serve lock)."""
    import http.client
    import ssl
    import stat
    import subprocess
    from urllib.parse import urlencode

    from helpers import M3DICOM, ROOT, free_port

    node = make_node(start=False, viewer={"enabled": True, "port": free_port()})
    assert not node.data_dir.exists()

    def m3dicom(*args, password):
        return subprocess.run(M3DICOM + [*args, "--config", str(node.config_path)], cwd=ROOT, input=password,
                              capture_output=True, text=True, timeout=120)

    refused = m3dicom("user", "add", "carol", password="too short\n")
    assert refused.returncode == 1 and "at least 10 characters" in refused.stderr
    assert not node.data_dir.exists()                                  # a refused account makes nothing
    added = m3dicom("user", "add", "carol", "--role", "admin", password=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "carol (admin) added" in added.stdout and "made the node's index" in added.stdout
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700 and (node.data_dir / "index.sqlite3").is_file()
    node.start()
    assert "created user admin" not in node.log()                      # the first start found carol
    again = m3dicom("user", "add", "dave", password=PASSWORD + "\n")     # beside the running node
    assert again.returncode == 0 and "made the node's index" not in again.stdout, again.stderr
    exists = m3dicom("user", "add", "dave", password=PASSWORD + "\n")
    assert exists.returncode == 1 and "`m3dicom user add dave --replace`" in exists.stderr
    for name in ("carol", "dave"):
        connection = http.client.HTTPSConnection("127.0.0.1", node.settings["viewer"]["port"], timeout=60,
                                                 context=ssl._create_unverified_context())
        connection.request("POST", "/login", urlencode({"user": name, "password": PASSWORD}),
                           {"Content-Type": "application/x-www-form-urlencoded"})
        answer = connection.getresponse()
        assert (answer.status, answer.getheader("Location")) == (302, "/studies"), name
        connection.close()


def test_users_are_added_listed_and_disabled_from_the_command_line(tmp_path):
    import subprocess

    from helpers import M3DICOM, ROOT

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    Archive(tmp_path / "var").close()                   # a node's data directory, as its first start leaves it

    def m3dicom(*args, password=None):
        return subprocess.run(M3DICOM + [*args, "--config", str(config)], cwd=ROOT, input=password,
                              capture_output=True, text=True, timeout=60)

    assert m3dicom("user", "add", "bob", password="too short\n").returncode == 1
    added = m3dicom("user", "add", "bob", "--role", "admin", password=PASSWORD + "\n")
    assert added.returncode == 0 and "bob (admin) added" in added.stdout
    assert m3dicom("user", "add", "bob", password=PASSWORD + "\n").returncode == 1        # exists: needs --replace
    archive = Archive(tmp_path / "var")
    try:
        assert accounts.authenticate(archive.index, "bob", PASSWORD, "127.0.0.1") is not None
        token, _ = accounts.open_session(archive.index, user=accounts.User("bob", "admin"), hours=1)
        assert m3dicom("user", "list").stdout == "bob admin\n"
        assert m3dicom("user", "add", "amy", "--role", "admin", password=PASSWORD + "\n").returncode == 0
        assert m3dicom("user", "disable", "bob").returncode == 0
        assert m3dicom("user", "list").stdout == "amy admin\nbob admin (disabled)\n"
        assert accounts.authenticate(archive.index, "bob", PASSWORD, "127.0.0.1") is None
        assert accounts.session(archive.index, token, idle_minutes=10) is None      # logged out at once
        assert m3dicom("user", "disable", "nobody").returncode == 1
        refused = m3dicom("user", "add", "rita", "--role", "reader", password=PASSWORD + "\n")
        assert refused.returncode == 1 and "--referring 'FAMILY^GIVEN'" in refused.stderr
        added = m3dicom("user", "add", "rita", "--role", "reader", "--referring", "Who^Rita", password=PASSWORD + "\n")
        assert added.returncode == 0 and "rita (reader, sees the studies referred by Who^Rita) added" in added.stdout
        assert m3dicom("user", "list").stdout == ("amy admin\nbob admin (disabled)\n"
                                                  "rita reader (studies referred by Who^Rita)\n")
        # found by the new-user pass: a new password keeps the role and the reach; the last admin stays one
        assert m3dicom("user", "add", "rita", "--replace", password="rita's new password\n").returncode == 0
        assert "rita reader (studies referred by Who^Rita)" in m3dicom("user", "list").stdout
        again = m3dicom("user", "add", "rita", "--replace", "--referring", "Who^Rita\\Who^Rita^*",
                        password="rita's new password\n")
        assert again.returncode == 0, again.stderr
        assert "rita reader (studies referred by Who^Rita\\Who^Rita^*)" in m3dicom("user", "list").stdout
        assert m3dicom("user", "enable", "bob").returncode == 0
        assert m3dicom("user", "disable", "rita").returncode == 0
        again = m3dicom("user", "add", "rita", "--replace", password="rita's third password\n")
        assert again.returncode == 0 and "enabled again" in again.stdout
        assert m3dicom("user", "disable", "amy").returncode == 0
        last = m3dicom("user", "disable", "bob")
        assert last.returncode == 1 and "only enabled admin" in last.stderr
        rows = archive.index.read(text("SELECT user_name, action, detail FROM audit WHERE user_name LIKE 'cli:%' "
                                       "ORDER BY seq"))
        assert [r[1] for r in rows] == ["user_add", "user_add", "user_disable", "user_add", "user_password",
                                        "user_role", "user_enable", "user_disable", "user_password", "user_disable"]
        assert "enabled again" in rows[-2][2]
    finally:
        archive.close()


# -- the study page: what the analyses say, report tables, series labels, forms (issue 15) ----------

def _mammograms(directory: Path, views=("RCC", "LCC", "RMLO", "LMLO"), **options) -> list[Path]:
    """A small screening examination: one study, one series per view."""
    from dataclasses import replace

    from pydicom.uid import generate_uid

    from gpu_workers.mammo import phantom

    study, paths = generate_uid(), []
    base = phantom.Options(rows=480, columns=400, spacing=0.1, density=0.3, clusters=0, isolated=0)
    for number, view in enumerate(views, start=1):
        opts = replace(base, laterality=view[0], view=view[1:], **options)
        path, _ = phantom.write(directory / view, 5000 + number, opts, patient_id="PH-15", patient_name="Phantom^Fifteen",
                                study_uid=study, series_number=number)
        paths.append(path)
    return paths


def _stage_findings(archive, job_id: str, study_uid: str, findings: dict, spool: Path) -> None:
    """findings.json stored as a job's result, the way the router takes a worker's files."""
    import hashlib
    import json

    from router.task import StagedOutput
    from router.intake import take_results

    data = json.dumps(findings).encode()
    blob = archive.local.create(iter([data]))
    output = StagedOutput("file", "findings.json", "application/json", blob.blob_id, len(data),
                          hashlib.sha256(data).hexdigest())
    take_results(archive, job_id, study_uid, [output], spool)


async def test_each_image_says_whether_the_cad_has_not_run_is_running_found_nothing_or_failed(client, setup, tmp_path):
    """Issue 15: "No findings on this image." was shown before the CAD ran and after it failed. Each
    source image now has a state per analysis that takes it; a failure's reason is in plain words."""
    from router import queue
    from router.jobs import Fail, Lease, Succeed

    _, archive, _ = setup
    (path,) = _mammograms(tmp_path / "mg", views=("LCC",))
    stored = archive.ingest_file(path)
    study, image = stored.study_uid, stored.sop_instance_uid
    (series,) = [r.series_uid for r in archive.index.read(
        text("SELECT se.series_uid FROM series se JOIN instances i ON i.series_pk = se.pk "
             "WHERE i.sop_instance_uid=:uid"),
        {"uid": image})]
    await login(client)

    async def state() -> dict:
        answer = await client.get(f"/api/studies/{study}/analysis")
        assert answer.status == 200
        (cad,) = [s for s in (await answer.json())["images"][image] if s["plugin"] == "mammo-cad"]
        return cad

    assert (await state())["state"] == "not-run"
    job = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[series], max_attempts=1)
    assert (await state())["state"] == "queued"
    queue.apply(archive.index, job, Lease("test", client.clock(), 60))
    queue.set_progress(archive.index, job, 0.4, "image 1 of 1: classifying 120 candidates")
    running = await state()
    assert (running["state"], running["progress"], running["message"]) == (
        "running", 0.4, "image 1 of 1: classifying 120 candidates")
    why = "the image has no Imager Pixel Spacing or Pixel Spacing: distances in mm are needed"
    queue.apply(archive.index, job, Fail(client.clock(), f"PluginError: {why}", final=True))
    failed = await state()
    assert failed["state"] == "failed" and failed["reason"] == why
    assert "PluginError" not in failed["text"] and "attempt" not in failed["text"] and why in failed["text"]
    assert failed["technical"] == f"PluginError: {why}"
    (listed,) = (await (await client.get(f"/api/studies/{study}/jobs")).json())["jobs"]
    assert listed["reason"] == why

    crashed = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[series], max_attempts=1)
    queue.apply(archive.index, crashed, Lease("test", client.clock(), 60))
    queue.apply(archive.index, crashed, Fail(client.clock(), "TypeError: Argument 'imaging_measurements' is required"))
    crash = await state()
    assert crash["state"] == "failed" and "TypeError" not in crash["reason"] and "administrator" in crash["reason"]
    assert "TypeError" in crash["technical"]

    normal = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[series])
    queue.apply(archive.index, normal, Lease("test", client.clock(), 60))
    _stage_findings(archive, normal, study, {"clusters": [], "calcifications": [], "images": [
        {"sop_instance_uid": image, "clusters": 0, "calcifications": 0, "outcome": "no cluster found"}]},
        tmp_path / "spool")
    queue.apply(archive.index, normal, Succeed(client.clock() + 1), summary={"outcome": "no cluster found"})
    nothing = await state()
    assert (nothing["state"], nothing["outcome"], nothing["job_id"]) == ("nothing-found", "no cluster found", normal)
    marks = await (await client.get(f"/api/studies/{study}/findings")).json()
    assert marks[image] == {"clusters": [], "calcifications": [], "job_id": normal, "outcome": "no cluster found"}

    found = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[series])
    queue.apply(archive.index, found, Lease("test", client.clock(), 60))
    cluster = {"id": "C1", "x": 100.0, "y": 120.0, "radius_mm": 2.0, "n": 4, "score": 0.9, "sop_instance_uid": image}
    _stage_findings(archive, found, study, {"clusters": [cluster], "calcifications": [], "images": [
        {"sop_instance_uid": image, "clusters": 1, "calcifications": 4, "outcome": "clusters found"}]},
        tmp_path / "spool")
    queue.apply(archive.index, found, Succeed(client.clock() + 2), summary={"outcome": "clusters found"})
    assert (await state())["state"] == "found"
    assert (await (await client.get(f"/api/studies/{study}/findings")).json())[image]["clusters"] == [cluster]

    later = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[series])
    queue.apply(archive.index, later, Lease("test", client.clock(), 60))
    _stage_findings(archive, later, study, {"clusters": [], "calcifications": [], "images": [
        {"sop_instance_uid": image, "clusters": 0, "calcifications": 0, "outcome": "no cluster found"}]},
        tmp_path / "spool")
    queue.apply(archive.index, later, Succeed(client.clock() + 3), summary={"outcome": "no cluster found"})
    assert (await (await client.get(f"/api/studies/{study}/findings")).json())[image]["clusters"] == []   # no old mark


async def test_a_cad_report_reads_as_a_findings_table_and_a_normal_one_says_nothing_was_found(client, setup, tmp_path):
    """Issue 15: the report is a table (id, finding, calcifications, score, where), the content tree
    stays beside it; a normal image's report has its "no cluster found" row, the cluster absent."""
    from gpu_workers.local import run_local
    from gpu_workers.mammo.plugin import MammoCad

    _, archive, _ = setup
    await login(client)
    tables = {}
    for name, options in (("clusters", {"clusters": 2}), ("normal", {})):
        (path,) = _mammograms(tmp_path / name, views=("RMLO",), **options)
        source = archive.ingest_file(path)
        out = tmp_path / f"{name}-cad"
        summary = run_local(MammoCad(), [path], {}, out)
        (sr_name,) = [n for n in summary["written"] if n.startswith("sr-")]
        report = archive.ingest_file(out / sr_name)
        answer = await client.get(f"/api/instances/{report.sop_instance_uid}/sr")
        assert answer.status == 200
        tables[name] = (await answer.json(), source.sop_instance_uid, summary)
    report, image, summary = tables["clusters"]
    rows = [r for r in report["findings"] if r["finding"] == "Calcification cluster" and not r["absent"]]
    assert len(rows) == summary["clusters"] >= 1
    for row in rows:
        assert row["id"].startswith("C") and row["id"][1:].isdigit() and row["calcifications"] >= 3 and 0 < row["score"] <= 100
        assert row["image"] == image and row["region"]["type"] == "CIRCLE" and row["region"]["radius"] > 0
        assert 0 <= row["region"]["x"] < 400 and 0 <= row["region"]["y"] < 480
    assert report["algorithm"]["name"] == "mammo-cad" and "operating_point=0.5" in report["algorithm"]["parameters"]
    assert report["items"] and report["title"]
    normal, image, summary = tables["normal"]
    assert summary["outcome"] == "no cluster found"
    (statement,) = [r for r in normal["findings"] if r["absent"]]
    assert statement["id"] == "no cluster found" and statement["absent"] == ["Calcification cluster"]
    assert statement["image"] == image and statement["calcifications"] is None


async def test_series_labels_tell_the_views_apart_and_results_name_their_source(client, setup, tmp_path):
    """Issue 15: two "MG 1" in the series list; now "MG R CC", "MG L CC", ..., with laterality, view
    and orientation for the hanging, and each result series says which series it came from."""
    from router import queue

    _, archive, _ = setup
    paths = _mammograms(tmp_path / "exam")
    stored = [archive.ingest_file(p) for p in paths]
    study = stored[0].study_uid
    await login(client)
    detail = await (await client.get(f"/api/studies/{study}")).json()
    by_label = {s["label"]: s for s in detail["series"]}
    assert set(by_label) == {"MG R CC", "MG L CC", "MG R MLO", "MG L MLO"}
    assert (by_label["MG R CC"]["laterality"], by_label["MG R CC"]["view"], by_label["MG R CC"]["orientation"]) == (
        "R", "CC", ["P", "L"])
    rcc = by_label["MG R CC"]["series_uid"]
    job = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[rcc])
    (result,) = synthetic_instances(tmp_path / "result", 1, study=study, patient="Phantom^Fifteen", patient_id="PH-15")
    archive.ingest_file(result, job_id=job)
    detail = await (await client.get(f"/api/studies/{study}")).json()
    (made,) = [s for s in detail["series"] if s["result"]]
    assert (made["source"], made["plugin"]) == ("MG R CC", "mammo-cad") and made["label"].startswith("mammo-cad ")


async def test_plugin_forms_get_labels_and_help_and_a_guest_gets_no_form(client, setup, aiohttp_client):
    """Issue 15: the form showed `operating_point`; the schema now carries a label for people."""
    _, _, studies = setup
    await login(client)
    study = studies["a"][0]
    answer = await (await client.get(f"/api/studies/{study}/plugins")).json()
    assert answer["can_start"] is True
    params = {p["name"]: p for plugin in answer["plugins"] for p in plugin["params"]}
    assert params["smoothing_mm"]["label"] == "Smoothing" and params["smoothing_mm"]["help"]
    from gpu_workers.mammo.plugin import MammoCad
    from gpu_workers.plugin import describe

    labels = {p["name"]: p["label"] for p in describe(MammoCad)["params"]}
    assert labels["operating_point"] == "False positives per image" and "_" not in "".join(labels.values())
    token = await share_link(client, study)
    guest = await aiohttp_client(client.server)
    assert (await guest.get(f"/s/{token}", allow_redirects=False)).status == 302
    assert (await (await guest.get(f"/api/studies/{study}/plugins")).json())["can_start"] is False


async def test_a_series_holding_all_four_views_names_each_image(client, setup, tmp_path):
    """Some modalities send the four views in one series: each image gets its own label (the
    hanging reads it), the series names them all."""
    import pydicom
    from pydicom.uid import generate_uid

    _, archive, _ = setup
    series = generate_uid()
    for path in _mammograms(tmp_path / "one-series"):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series, 1, int(ds.SeriesNumber)
        ds.save_as(path, enforce_file_format=True)
        study = archive.ingest_file(path).study_uid
    await login(client)
    (only,) = (await (await client.get(f"/api/studies/{study}")).json())["series"]
    assert only["label"] == "MG R CC, L CC, R MLO, L MLO"
    assert [i["label"] for i in only["instances"]] == ["MG R CC", "MG L CC", "MG R MLO", "MG L MLO"]
    assert [(i["laterality"], i["view"], i["orientation"][0]) for i in only["instances"]] == [
        ("R", "CC", "P"), ("L", "CC", "A"), ("R", "MLO", "P"), ("L", "MLO", "A")]


# -- a new user's second pass: what a guest, the list and a report say (after issue 15) -------------

async def test_a_guest_whose_link_is_revoked_while_the_page_is_open_is_told_why(client, setup, aiohttp_client):
    """The guest's open page got black images (401 on every request) and a reload gave a bare login
    page; now every request of that session answers 403 saying the link was withdrawn, as JSON for
    the page's scripts and as the styled page on a reload. Other stale cookies still mean "log in"."""
    config, archive, studies = setup
    study, image = studies["a"]
    token = await share_link(client, study)
    guest = await aiohttp_client(client.server)
    assert (await guest.get(f"/s/{token}", allow_redirects=False)).status == 302
    assert (await guest.get(f"/api/instances/{image}/render?width=64")).status == 200
    assert accounts.revoke_share(archive.index, token.split(".")[0])
    for path in (f"/api/instances/{image}/render?width=64&wc=40&ww=400", f"/api/studies/{study}",
                 f"/api/studies/{study}/analysis"):
        answer = await guest.get(path)
        assert answer.status == 403 and answer.content_type == "application/json", path
        said = await answer.json()
        assert said["link"] == "revoked" and said["heading"] == "This link has been withdrawn", said
        assert "withdrawn" in said["error"] and "ask the person who shared it" in said["error"]
    for path in (f"/studies/{study}", "/"):                                       # a reload: the page that says so
        page = await guest.get(path, allow_redirects=False)
        assert page.status == 403 and page.content_type == "text/html", path
        text = await page.text()
        assert "This link has been withdrawn" in text and '<link rel="stylesheet"' in text and 'href="/login"' in text
    assert (await guest.get("/login")).status == 200                             # and may still log in
    stranger = await aiohttp_client(client.server, cookies={COOKIE: "not-a-session"})
    assert (await stranger.get(f"/api/studies/{study}")).status == 401
    assert (await stranger.get(f"/studies/{study}", allow_redirects=False)).status == 302


async def test_the_report_tree_says_3_not_3_0_1_and_names_the_source_image(client, setup, tmp_path):
    """The SR tree showed "Number of calcifications 3.0 1" (UCUM's "1": no unit) and an empty "Source"."""
    from gpu_workers.local import run_local
    from gpu_workers.mammo.plugin import MammoCad

    _, archive, _ = setup
    await login(client)
    (path,) = _mammograms(tmp_path / "exam", views=("RMLO",), clusters=2)
    source = archive.ingest_file(path)
    out = tmp_path / "cad"
    summary = run_local(MammoCad(), [path], {}, out)
    (sr_name,) = [n for n in summary["written"] if n.startswith("sr-")]
    report = archive.ingest_file(out / sr_name)
    tree = (await (await client.get(f"/api/instances/{report.sop_instance_uid}/sr")).json())["items"]

    def walk(items):
        for item in items:
            yield item
            yield from walk(item["children"])

    items = list(walk(tree))
    counts = [i["value"] for i in items if i["name"] == "Number of calcifications"]
    assert counts and all(value.isdigit() and int(value) >= 3 for value in counts), counts
    scores = [i["value"] for i in items if i["name"] == "Certainty of Finding"]
    assert scores and all(value.endswith("%") and " " not in value for value in scores), scores
    sources = [i for i in items if i["type"] == "IMAGE"]
    assert sources and all(i["image"] == source.sop_instance_uid for i in sources), sources


async def test_the_list_tells_findings_from_nothing_found_from_failed(client, setup, tmp_path):
    """The Analysis badge said "results" for a normal examination and for one with clusters alike.
    Each study now says, of the newest job of each plug-in on each series, how many found something,
    found nothing, were done (no outcome: a 3D model), failed, ran or waited."""
    from router import queue
    from router.jobs import Fail, Lease, Succeed

    _, archive, studies = setup
    (a, _), (b, _) = studies["a"], studies["b"]
    (c,) = {archive.ingest_file(p).study_uid for p in dated_study(tmp_path / "c", 1, "20260105", "Third^C", "P-c")}
    await login(client)

    def job(study: str, inputs: list[str], plugin: str = "mammo-cad", **summary) -> str:
        made = queue.create(archive.index, study_uid=study, plugin=plugin, params={}, inputs=inputs, max_attempts=1)
        queue.apply(archive.index, made, Lease("test", client.clock(), 60))
        if summary.get("failed"):
            queue.apply(archive.index, made, Fail(client.clock(), "PluginError: no pixel spacing", final=True))
        else:
            queue.apply(archive.index, made, Succeed(client.clock()), summary=summary)
        client.clock.now += 1
        return made

    job(a, ["1.1"], outcome="no cluster found")
    job(a, ["1.2"], outcome="no cluster found")
    job(a, ["1.3"], failed=True)                                  # failed, then run again and nothing found:
    job(a, ["1.3"], outcome="no cluster found")                   # the newest job on a series counts
    job(b, ["2.1"], outcome="clusters found", clusters=2)
    job(b, ["2.2"], outcome="no cluster found")
    job(b, ["2.3"], plugin="bone-model", triangles=1000)           # a result without an outcome
    job(c, ["3.1"], failed=True)
    queue.create(archive.index, study_uid=c, plugin="mammo-cad", params={}, inputs=["3.2"])
    listed = {s["study_uid"]: s for s in (await (await client.get("/api/studies")).json())["studies"]}
    assert listed[a]["analysis"] == {"nothing-found": 3}
    assert listed[b]["analysis"] == {"findings": 1, "nothing-found": 1, "done": 1}
    assert listed[c]["analysis"] == {"failed": 1, "queued": 1}
    assert listed[a]["jobs"] == {"succeeded": 3, "failed": 1}      # the raw counts stay


async def test_a_rendered_view_is_named_as_such_and_a_ct_says_how_it_lies(client, setup, tmp_path):
    """The bone model's key image was called "bone-model marked image"; a CT's series now carries its
    Image Orientation (Patient), from which the page writes A/P/R/L/H/F at the image's edges."""
    from router import queue

    _, archive, studies = setup
    study, image = studies["a"]
    (series,) = [r[0] for r in archive.index.read(
        text("SELECT se.series_uid FROM series se JOIN instances i ON i.series_pk = se.pk "
             "WHERE i.sop_instance_uid=:uid"),
        {"uid": image})]
    job = queue.create(archive.index, study_uid=study, plugin="bone-model", params={}, inputs=[series])
    (result,) = synthetic_instances(tmp_path / "result", 1, study=study, patient="Patient^A", patient_id="P-a")
    import pydicom

    ds = pydicom.dcmread(result)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SeriesDescription, ds.Modality = "Bone model: front view", "OT"
    ds.save_as(result, enforce_file_format=True)
    archive.ingest_file(result, job_id=job)
    await login(client)
    detail = await (await client.get(f"/api/studies/{study}")).json()
    (made,) = [s for s in detail["series"] if s["result"]]
    assert made["label"] == "bone-model front view" and made["source"] == "CT 1"
    (ct,) = [s for s in detail["series"] if not s["result"]]
    assert ct["image_orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
