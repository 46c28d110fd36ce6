"""The viewer against hostile and careless clients (issue 14, items 11-16 and the viewer's part of 7).

Each case found by trying to break the viewer is a regression test here; the classes of input
behind them (query and form parameters, uploads) are fuzzed with hypothesis through aiohttp's
test client: never a 500, always an answer in bounded time, nothing stored changed.
"""
from __future__ import annotations

import asyncio
import io
import os
import re
import struct
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given, settings, strategies as st
from sqlalchemy import text

from archive import Archive
from helpers import dataset_offset, free_port, synthetic_instances, wait_for
from node.config import from_dict
from test_viewer_api import PASSWORD, Clock, csrf_of, files, login
from viewer import accounts
from viewer.app import create_app
from viewer.views import _next

# an answer to any one request, however hostile, comes within this (the slowest is a login's delay)
ANSWER_WITHIN = 15.0


@pytest.fixture
def setup(tmp_path):
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                        "viewer": {"max_upload_mb": 4, "max_file_mb": 2, "tls": False}}, tmp_path)
    archive = Archive(config.data_dir)
    accounts.migrate(archive.index)                 # the viewer's tables, as the node's start makes them
    accounts.add_user(archive.index, "alice", PASSWORD, "clinician")
    accounts.add_user(archive.index, "bob", PASSWORD, "clinician")
    accounts.add_user(archive.index, "root", PASSWORD, "admin")
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
    client = await aiohttp_client(create_app(config, archive, clock=Clock()))
    return client


def stored(archive: Archive) -> dict[str, tuple]:
    """SOP Instance UID -> (series, SHA-256 of the data set) of everything stored."""
    return {r[0]: (r[1], r[2]) for r in archive.index.read(
        text("SELECT i.sop_instance_uid, se.series_uid, i.sha256 FROM instances i "
             "JOIN series se ON se.pk = i.series_pk"))}


def audit(archive: Archive, action: str) -> list[tuple]:
    return [tuple(r) for r in archive.index.read(
        text("SELECT user_name, outcome, detail FROM audit WHERE action=:action ORDER BY seq"), {"action": action})]


def forget_failures(archive: Archive) -> None:
    """Failed logins start afresh (fuzzing the login form must not wait 8 s an example)."""
    with archive.index.write() as conn:
        conn.exec_driver_sql("DELETE FROM login_failures")


async def still_serves(client) -> None:
    """A logged-in clinician still lists studies, at once."""
    started = time.monotonic()
    answer = await client.get("/api/studies")
    assert answer.status == 200 and (await answer.json())["studies"]
    assert time.monotonic() - started < 2


# -- 11. open redirect -------------------------------------------------------------------------------

def browser_host(location: str, base: str = "https://viewer.example/login") -> str:
    """The host a browser goes to for a Location header (WHATWG URL parsing: tabs and line feeds
    are dropped anywhere, leading and trailing controls and spaces stripped, "\\" read as "/")."""
    cleaned = re.sub(r"[\t\n\r]", "", location).strip("".join(map(chr, range(0x21))))
    return urlsplit(urljoin(base, cleaned.replace("\\", "/"))).netloc


ELSEWHERE = ["/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "/\t\n/evil.example", "\t//evil.example",
             " //evil.example", "\x00//evil.example", "//evil.example", "///evil.example", "/\\evil.example",
             "\\/evil.example", "\\\\evil.example", "/\\\tevil.example", "/%2F/evil.example", "/%2f%2fevil.example",
             "%2F%2Fevil.example", "/%5Cevil.example", "/%09/evil.example", "/%0A/evil.example",
             "https://evil.example/", "http:evil.example", "HTTPS://evil.example", "javascript:alert(1)",
             "/\x0b/evil.example", "/\x0c/evil.example", "/\x1f/evil.example", "/\x7f/evil.example",
             "/\u3000/evil.example", "/\u2028/evil.example", "/\uff0f/evil.example", "/\u2215evil.example",
             "/\u00a0/evil.example", "/\ufeff/evil.example", "/./\t/evil.example", "/studies/../\t/evil.example",
             "/..//evil.example", "/%2e%2e//evil.example", "/studies/\t/../\t/evil.example", "/ /evil.example",
             "/studies#//evil.example", "", "studies", "@evil.example", "/@evil.example" + "x" * 3000]


async def test_after_login_the_browser_stays_on_this_site(client):
    """Item 11: `next=/<TAB>/evil.example` answered `Location: //evil.example` (another host)."""
    went = {}
    for target in ELSEWHERE:
        answer = await client.post("/login", data={"user": "alice", "password": PASSWORD, "next": target},
                                   allow_redirects=False)
        assert answer.status == 302, (target, answer.status)
        location = answer.headers["Location"]
        went[target] = location
        page = await (await client.get("/login", params={"next": target})).text()
        hidden = re.search(r'name="next" value="([^"]*)"', page).group(1)
        assert hidden in ("/studies", location), target
    offenders = {t: loc for t, loc in went.items()
                 if browser_host(loc) != "viewer.example" or not loc.isascii() or not loc.startswith("/")
                 or loc.startswith("//")}
    assert not offenders
    # where a path of this site is asked for, it is kept
    for target in ("/studies/1.2.3", "/studies?name=x&page=2", "/studies/1.2/model/0123456789abcdef", "/"):
        answer = await client.post("/login", data={"user": "alice", "password": PASSWORD, "next": target},
                                   allow_redirects=False)
        assert answer.headers["Location"] == target


async def test_a_page_asked_for_before_login_is_where_the_login_goes_back_to(client, setup):
    study, _ = setup[2]["a"]
    page = await client.get(f"/studies/{study}", allow_redirects=False)
    assert page.status == 302 and page.headers["Location"] == f"/login?next=/studies/{study}"
    odd = await client.get("/studies/%09%2F%2Fevil.example/\u00fc", allow_redirects=False)
    assert odd.status == 302 and odd.headers["Location"].isascii()
    form = await (await client.get(odd.headers["Location"])).text()
    target = re.search(r'name="next" value="([^"]*)"', form).group(1)
    assert browser_host(target) == "viewer.example"


@pytest.mark.fuzz
@given(prefix=st.sampled_from(["", "/", "//", "/\\", "\\", "/%2F", "/\t", "http://", "/studies/"]),
       rest=st.text(max_size=60))
def test_fuzz_the_login_target_never_leaves_this_site(prefix, rest):
    target = _next(prefix + rest)
    assert target.isascii() and target.startswith("/") and not target.startswith("//")
    assert browser_host(target) == "viewer.example"


# -- 13. the login slow-down under parallel attempts -----------------------------------------------------

def delay(failures: int) -> float:
    """accounts.failure_delay's schedule, as documented: 0.25 s doubling, at most 8 s."""
    return 0.0 if failures == 0 else min(accounts.MAX_DELAY, 0.25 * 2 ** (failures - 1))


async def timed_logins(client, names: list[str], password: str) -> list[tuple[int, float, str]]:
    """(status, seconds to the answer, page) of logins sent all at once."""
    started = time.monotonic()

    async def one(name: str):
        answer = await client.post("/login", data={"user": name, "password": password, "next": "/studies"},
                                   allow_redirects=False)
        return answer.status, time.monotonic() - started, await answer.text()

    return await asyncio.gather(*(one(n) for n in names))


async def test_fifty_parallel_wrong_passwords_are_checked_one_after_another(client, setup):
    """Item 13: 19 wrong passwords sent at once were all answered within 9 s (no slow-down at all)."""
    archive = setup[1]
    waiting = setup[0].viewer.login_waiting
    answers = await timed_logins(client, ["alice"] * 50, "a wrong password")
    checked = sorted(t for status, t, _ in answers if status == 401)
    turned_away = [(t, page) for status, t, page in answers if status == 429]
    assert len(checked) + len(turned_away) == 50
    assert 1 <= len(checked) <= waiting + 1                   # one checked, `waiting` queued behind it
    assert all(t < 3 for t, _ in turned_away)                 # the rest answered at once, unchecked
    assert all("locked for a moment" in page and "Wait a minute" in page for _, page in turned_away)
    for k, answered in enumerate(checked):                     # each checked after the delay of those before
        assert answered >= sum(delay(i) for i in range(k)) - 0.05, (k, checked)
    refused = audit(archive, "login")
    assert len(refused) == 50 and all(r[0] == "alice" and r[1] == "refused" for r in refused)
    assert sum("too many attempts at once for this account" in r[2] for r in refused) == len(turned_away)
    # the owner logs in after that: it waits the delay the failures earned, then works
    started = time.monotonic()
    answer = await login(client)
    assert answer.status == 302 and answer.headers["Location"] == "/studies"
    assert time.monotonic() - started >= delay(len(checked)) - 0.05
    await still_serves(client)


async def test_fifty_parallel_logins_from_one_address_to_many_accounts_are_checked_one_after_another(client, setup):
    waiting = setup[0].viewer.login_waiting
    answers = await timed_logins(client, [f"guess{i}" for i in range(50)], "a wrong password")
    checked = sorted(t for status, t, _ in answers if status == 401)
    turned_away = [page for status, _, page in answers if status == 429]
    assert 1 <= len(checked) <= waiting + 1 and len(checked) + len(turned_away) == 50
    assert all("from your network address" in page for page in turned_away)
    for k, answered in enumerate(checked):
        assert answered >= sum(delay(i) for i in range(k)) - 0.05, (k, checked)


async def test_after_many_failures_the_login_page_says_why_it_is_slow(client):
    for _ in range(4):
        answer = await login(client, "alice", "a wrong password")
    page = await answer.text()
    assert answer.status == 401 and "Wrong user name or password." in page and "waits a little longer" in page


# -- 14. no 500 to bad input; every refusal audited ----------------------------------------------------

async def test_a_bad_share_link_or_a_failed_login_with_a_session_is_refused_and_audited(client, setup):
    """Item 14: with a session cookie, both raised `audit() got multiple values for argument 'who'`."""
    archive = setup[1]
    await login(client)
    answer = await client.get("/s/garbage", allow_redirects=False)
    assert answer.status == 403 and "not valid" in await answer.text()
    answer = await client.post("/login", data={"user": "bob", "password": "not bob's password"},
                               allow_redirects=False)
    assert answer.status == 401 and "Wrong user name or password." in await answer.text()
    assert audit(archive, "share_open") == [("share:?", "refused", "invalid link")]
    assert audit(archive, "login")[-1] == ("bob", "refused", "wrong user name or password")
    await still_serves(client)                                # alice's session is still hers


async def test_a_login_form_too_big_to_be_one_is_refused_before_it_is_read(client, setup):
    """/login is open to anyone, and its form was read whole in memory up to the upload limit."""
    big = {"user": "alice", "password": "x" * (1 << 20)}
    answer = await client.post("/login", data=big, allow_redirects=False)
    assert answer.status == 413

    async def chunked():
        yield b"user=alice&password="
        for _ in range(25):
            yield b"y" * 8192

    answer = await client.post("/login", data=chunked(), allow_redirects=False,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 413
    answer = await client.post("/login", data=b"user=alice&password=\xff\xfe", allow_redirects=False,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 400 and "could not be read" in await answer.text()
    assert (await login(client)).status == 302


def nested(depth: int, tmp_path: Path) -> bytes:
    """A Part 10 file whose data set ends in sequences nested `depth` deep (undefined lengths)."""
    (path,) = synthetic_instances(tmp_path / f"deep{depth}", 1)
    item, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    sequence, sequence_end = b"\xfa\xff\xfa\xffSQ\x00\x00\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return path.read_bytes() + (sequence + item) * depth + (item_end + sequence_end) * depth


def damaged_zip(damaged: bytes, fine: bytes, kind: str) -> bytes:
    """A zip of two instances, the first damaged: a bad CRC, encrypted, or an unknown compression."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("damaged.dcm", damaged)
        z.writestr("fine.dcm", fine)
    data = bytearray(out.getvalue())
    if kind == "crc":
        start = data.find(b"DICM")
        data[start + 200] ^= 0xFF
    else:
        central = data.find(b"PK\x01\x02")       # the first member's directory entry and local header
        local = 0
        if kind == "encrypted":
            for offset in (central + 8, local + 6):
                struct.pack_into("<H", data, offset, struct.unpack_from("<H", data, offset)[0] | 1)
        else:
            for offset in (central + 10, local + 8):
                struct.pack_into("<H", data, offset, 99)
    return bytes(data)


async def test_every_file_of_an_upload_gets_its_own_outcome(client, setup, tmp_path):
    """Item 14: a second file with a truncated header stopped the whole upload with a 500 (later files
    never read); a zip member with a bad CRC and a data set nested 2,000 deep gave 500 too."""
    archive = setup[1]
    await login(client)
    headers = {"X-CSRF-Token": await csrf_of(client)}
    before = stored(archive)
    good = [p.read_bytes() for p in synthetic_instances(tmp_path / "good", 9)]
    zips = {kind: damaged_zip(good[3 + i], good[6 + i], kind) for i, kind in enumerate(("crc", "encrypted", "method"))}
    upload = [("first.dcm", good[0]), ("truncated.dcm", good[1][:152]), ("third.dcm", good[2]),
              ("deep.dcm", nested(2000, tmp_path)), ("random.dcm", bytes(range(256)) * 8),
              ("crc.zip", zips["crc"]), ("encrypted.zip", zips["encrypted"]), ("method.zip", zips["method"]),
              ("broken.zip", b"PK\x03\x04" + b"\x00" * 40 + b"PK\x05\x06" + b"\xff" * 18)]
    answer = await client.post("/api/upload", headers=headers, data=files(*upload))
    assert answer.status == 200, await answer.text()
    results = {r["name"]: r for r in (await answer.json())["files"]}
    assert results["first.dcm"]["outcome"] == "stored" and results["third.dcm"]["outcome"] == "stored"
    refused = {"truncated.dcm", "deep.dcm", "random.dcm", "crc.zip/damaged.dcm", "encrypted.zip/damaged.dcm",
               "method.zip/damaged.dcm", "broken.zip"}
    for name in refused:
        assert results[name]["outcome"] == "refused" and results[name]["reason"], (name, results.get(name))
    assert "CRC" in results["crc.zip/damaged.dcm"]["reason"]
    assert all(results[f"{kind}.zip/fine.dcm"]["outcome"] == "stored" for kind in ("crc", "encrypted", "method"))
    after = stored(archive)
    assert {k: v for k, v in after.items() if k in before} == before                 # nothing stored changed
    assert len(after) == len(before) + 5
    records = audit(archive, "upload")
    assert {r[2].split(": ", 1)[0] for r in records if r[1] == "refused"} == refused   # each refusal audited
    assert records[-1][1:] == ("ok", "5 stored of 12")
    await still_serves(client)


def odd_reports() -> dict[str, bytes]:
    """pydicom's test SR with an empty sequence where the viewer looks for a first item."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    from helpers import data_file

    def report(change) -> bytes:
        ds = pydicom.dcmread(data_file("test-SR.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        change(ds)
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    def item(**values) -> Dataset:
        made = Dataset()
        for keyword, value in values.items():
            setattr(made, keyword, value)
        return made

    return {
        "no-title.dcm": report(lambda ds: setattr(ds, "ConceptNameCodeSequence", Sequence())),
        "no-item-name.dcm": report(lambda ds: setattr(ds.ContentSequence[0], "ConceptNameCodeSequence", Sequence())),
        "no-measurement.dcm": report(lambda ds: ds.ContentSequence.append(
            item(ValueType="NUM", MeasuredValueSequence=Sequence()))),
        "no-unit.dcm": report(lambda ds: ds.ContentSequence.append(item(ValueType="NUM", MeasuredValueSequence=Sequence(
            [item(NumericValue="1", MeasurementUnitsCodeSequence=Sequence())])))),
        "no-code.dcm": report(lambda ds: ds.ContentSequence.append(item(ValueType="CODE", ConceptCodeSequence=Sequence()))),
    }


async def test_a_structured_report_with_empty_sequences_is_shown_not_a_500(client, setup):
    """A stored SR whose code sequences are empty made /sr raise IndexError (a 500)."""
    await login(client)
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": await csrf_of(client)},
                               data=files(*odd_reports().items()))
    results = (await answer.json())["files"]
    assert [r["outcome"] for r in results] == ["stored"] * 5
    for result in results:
        shown = await client.get(f"/api/instances/{result['sop_instance_uid']}/sr")
        assert shown.status == 200, (result["name"], shown.status)
        assert (await shown.json())["items"]
    await still_serves(client)


def odd_images(tmp_path: Path) -> dict[str, bytes]:
    """Images whose pixel data cannot be decoded: cut short, impossible bit depths, a JPEG of noise."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    def image(name: str, change) -> bytes:
        (path,) = synthetic_instances(tmp_path / name, 1)
        ds = pydicom.dcmread(path)
        change(ds)
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    def jpeg_of_noise(ds):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 4])
        ds["PixelData"].VR = "OB"

    return {"cut-short.dcm": image("cut", lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000])),
            "bits.dcm": image("bits", lambda ds: setattr(ds, "BitsAllocated", 3)),
            "no-rows.dcm": image("rows", lambda ds: setattr(ds, "Rows", 0)),
            "jpeg-noise.dcm": image("jpeg", jpeg_of_noise)}


async def test_an_image_that_cannot_be_decoded_is_a_422_not_a_500(client, setup, tmp_path):
    await login(client)
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": await csrf_of(client)},
                               data=files(*odd_images(tmp_path).items()))
    results = (await answer.json())["files"]
    for result in results:
        if result["outcome"] != "stored":
            continue
        uid = result["sop_instance_uid"]
        for view in ("info", "render?width=64"):
            shown = await client.get(f"/api/instances/{uid}/{view}")
            assert shown.status in (200, 422), (result["name"], view, shown.status)
            if shown.status == 422:
                assert "not shown" in (reason := (await shown.json())["error"]) or "cannot be shown" in reason
    assert any(r["outcome"] == "stored" for r in results)
    await still_serves(client)


async def test_a_search_too_big_for_the_index_is_a_clear_400(client, setup):
    """Item 7 (the viewer's part): ~1,000 wildcard values answered 500 ("Expression tree is too large")."""
    await login(client)
    for params in ({"name": "\\".join(f"a{i}*" for i in range(1000))}, {"id": "\\".join(f"{i}" for i in range(600))},
                   {"name": "x" * 200}, {"accession": "*" * 129}, {"from": "2026-13-45"}, {"modality": "CT\\" * 50}):
        answer = await client.get("/api/studies", params=params)
        assert answer.status == 400, (params, answer.status)
        assert (await answer.json())["error"]
    await still_serves(client)


async def test_a_last_event_id_that_is_not_a_number_is_ignored(client, setup):
    """"²".isdigit() is true and int("²") raises: the stream died just after it had begun."""
    from router import queue
    from test_viewer_api import next_event

    archive, (study, _) = setup[1], setup[2]["a"]
    await login(client)
    stream = await client.get("/api/events", headers={"Last-Event-ID": "\u00b2"})
    assert stream.status == 200
    await asyncio.sleep(0.2)
    job = queue.create(archive.index, study_uid=study, plugin="mammo-cad", params={}, inputs=[])
    assert (await next_event(stream))["job_id"] == job                  # the stream goes on
    stream.close()


# -- 15. revoking share links ---------------------------------------------------------------------------

async def test_only_the_maker_of_a_share_link_or_an_admin_can_revoke_it(setup, aiohttp_client):
    """Item 15: any clinician could revoke another user's share link."""
    config, archive, studies = setup
    study, _ = studies["a"]
    alice = await aiohttp_client(create_app(config, archive, clock=Clock()))
    bob = await aiohttp_client(alice.server)
    root = await aiohttp_client(alice.server)
    await login(alice)
    made = await alice.post(f"/api/studies/{study}/share", json={"days": 1}, headers={"X-CSRF-Token": await csrf_of(alice)})
    token = (await made.json())["url"].split("/s/", 1)[1]
    link_id = token.split(".")[0]
    second = await alice.post(f"/api/studies/{study}/share", json={"days": 1},
                              headers={"X-CSRF-Token": await csrf_of(alice)})
    second_id = (await second.json())["url"].split("/s/", 1)[1].split(".")[0]

    await login(bob, "bob")
    refused = await bob.post(f"/api/shares/{link_id}/revoke", headers={"X-CSRF-Token": await csrf_of(bob)})
    assert refused.status == 403 and "made this link" in (await refused.json())["error"]
    listed = await (await bob.get(f"/api/studies/{study}/shares")).json()
    assert {s["id"]: s["can_revoke"] for s in listed["shares"]} == {link_id: False, second_id: False}
    assert accounts.share_valid(archive.index, link_id)
    assert audit(archive, "share_revoke") == [("bob", "refused", f"{link_id}: made by another user")]
    guest = await aiohttp_client(alice.server)
    assert (await guest.get(f"/s/{token}", allow_redirects=False)).status == 302   # the link still opens

    assert (await alice.post(f"/api/shares/{link_id}/revoke", headers={"X-CSRF-Token": await csrf_of(alice)})).status == 200
    await login(root, "root")
    assert (await (await root.get(f"/api/studies/{study}/shares")).json())["shares"][0]["can_revoke"] is True
    assert (await root.post(f"/api/shares/{second_id}/revoke", headers={"X-CSRF-Token": await csrf_of(root)})).status == 200
    assert not accounts.share_valid(archive.index, link_id) and not accounts.share_valid(archive.index, second_id)
    assert audit(archive, "share_revoke")[1:] == [("alice", "ok", link_id), ("root", "ok", second_id)]


# -- 12. no patient data in the logs -----------------------------------------------------------------------

def _https(node, path: str, opener, data: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.parse

    url = f"https://127.0.0.1:{node.settings['viewer']['port']}{path}"
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with opener.open(url, data=body, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
def test_a_study_search_leaves_no_patient_data_in_the_node_log(make_node, tmp_path):
    """Item 12: the search's name, ID and accession number were written to the access log."""
    import http.cookiejar
    import ssl
    import urllib.parse
    import urllib.request

    import pydicom

    node = make_node(start=False, viewer={"enabled": True, "port": free_port()}, log={"level": "DEBUG"})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    patient = {"name": "Quillfeather^Zenobia", "id": "QZ-5521-77", "accession": "ACX90417"}
    (path,) = synthetic_instances(tmp_path / "patient", 1, patient=patient["name"], patient_id=patient["id"])
    ds = pydicom.dcmread(path)
    ds.AccessionNumber = patient["accession"]
    ds.save_as(path)
    node.storescu(path)
    context = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    context.check_hostname = False
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                         urllib.request.HTTPSHandler(context=context))
    status, _ = _https(node, "/login", opener, {"user": "admin", "password": PASSWORD,
                                                "next": f"/studies?name={patient['name']}"})
    assert status == 200                                     # followed to the study list
    searches = [{"name": "zenobia", "id": patient["id"], "accession": patient["accession"]},
                {"name": "Quillfeather", "from": "1990-01-01", "to": "2030-12-31", "modality": "CT"},
                {"name": "Nobodyhere^Ottoline", "id": "NX-0000-11", "accession": "ACX00001"}]
    for params in searches:
        query = urllib.parse.urlencode({**params, "page": 0})
        assert _https(node, f"/studies?{query}", opener)[0] == 200
        status, body = _https(node, f"/api/studies?{query}", opener)
        assert status == 200
    assert patient["name"] in _https(node, "/api/studies?" + urllib.parse.urlencode(searches[0]), opener)[1]
    wait_for(lambda: node.log().count("/api/studies?") >= 4, what="the access log lines")
    log = node.log()
    assert "/api/studies?name=REDACTED&id=REDACTED&accession=REDACTED&page=0" in log
    used = [v for params in searches for k, v in params.items() if k in ("name", "id", "accession")]
    used += [patient["name"], "Quillfeather", "Zenobia", "QZ-5521", "ACX90417", "Ottoline", "Nobodyhere"]
    found = {value for value in used if value.lower() in log.lower()
             or urllib.parse.quote(value).lower() in log.lower()}
    assert not found, f"patient data in the node's log: {found}"


# -- 16. the router's Dask dashboard ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dashboard", [False, True])
def test_the_dask_dashboard_is_off_by_default_and_only_on_loopback(tmp_path, dashboard):
    """Item 16: the embedded cluster's dashboard listened on 0.0.0.0:8787, without a login."""
    import ipaddress
    import urllib.error
    import urllib.request

    import psutil

    from router.executor import Executor

    port = free_port() if dashboard else 0
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")},
                        **({"router": {"dashboard_port": port}} if dashboard else {})}, tmp_path)   # off: the default
    executor = Executor(config)
    try:
        http_port = executor.client.scheduler_info()["services"]["dashboard"]
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = [c.laddr for p in processes for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(ipaddress.ip_address(a.ip).is_loopback for a in listening), listening
        assert http_port == port if dashboard else http_port not in (0, 8787)

        def status(path: str) -> int:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/health") == 200
        assert status("/status") == (200 if dashboard else 404)
        assert status("/info/main/workers.html") == (200 if dashboard else 404)
    finally:
        executor.close()


# -- fuzzing: query and form parameters, uploads ------------------------------------------------------------

@pytest.fixture
async def clinician(client, setup):
    """The test client logged in as alice, with her CSRF token."""
    await login(client)
    client.csrf = await csrf_of(client)
    return client


def any_text(max_size: int = 80):
    """Text as a hostile client sends it: controls, unicode, now and then one character a few thousand times."""
    return st.one_of(st.text(st.characters(codec="utf-8"), max_size=max_size),
                     st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(100, 3000)))


def numbers():
    return st.one_of(st.integers(-10 ** 30, 10 ** 30).map(str), st.floats().map(str),
                     st.sampled_from(["", "0x10", "1e5", "nan", "-inf", "\u00b2", "\u0663", "1_000", " 7 "]), any_text(20))


def raw_query(keys):
    """A query string of percent-encoded bytes (invalid UTF-8, lone '%', '+', '=' and '&' included)."""
    from urllib.parse import quote_from_bytes

    pair = st.tuples(st.one_of(keys, st.binary(max_size=8).map(quote_from_bytes)),
                     st.one_of(st.binary(max_size=60).map(quote_from_bytes),
                               st.sampled_from(["%", "%zz", "%ff%fe", "+", "==", "%00", "%E2%80%A8"])))
    return st.lists(pair, max_size=6).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


async def answered(request) -> tuple[int, bytes]:
    """(status, body) of a request, which must come within ANSWER_WITHIN and never be a 500."""
    started = time.monotonic()
    answer = await request
    body = await answer.read()
    assert time.monotonic() - started < ANSWER_WITHIN
    assert answer.status < 500, (answer.status, body[:300])
    return answer.status, body


SEARCH_KEYS = st.sampled_from(["name", "id", "accession", "modality", "from", "to", "page"])


@pytest.mark.fuzz
@given(params=st.lists(st.tuples(st.one_of(SEARCH_KEYS, any_text(10)), any_text()), max_size=8),
       raw=raw_query(SEARCH_KEYS))
async def test_fuzz_the_study_search_never_answers_500(clinician, params, raw):
    from yarl import URL

    status, body = await answered(clinician.get("/api/studies", params=params))
    assert status in (200, 400) and (status == 200 or json_error(body))   # a reason, always
    status, _ = await answered(clinician.get("/studies", params=params))
    assert status in (200, 400)
    status, body = await answered(clinician.get(URL("/api/studies?" + raw, encoded=True)))
    assert status in (200, 400)


def json_error(body: bytes) -> str:
    """The reason of a 400: ours in JSON, or aiohttp's own for a request line over 8190 bytes."""
    import json

    return body.decode() if body.startswith(b"Got more than 8190 bytes") else json.loads(body)["error"]


RENDER_KEYS = st.sampled_from(["x", "y", "w", "h", "width", "height", "frame", "wc", "ww", "format"])


@pytest.mark.fuzz
@given(params=st.dictionaries(RENDER_KEYS, numbers(), max_size=10), raw=raw_query(RENDER_KEYS))
async def test_fuzz_rendering_parameters_never_answer_500(clinician, setup, params, raw):
    from yarl import URL

    _, image = setup[2]["a"]
    status, _ = await answered(clinician.get(f"/api/instances/{image}/render", params=params))
    assert status in (200, 400, 422)
    status, _ = await answered(clinician.get(URL(f"/api/instances/{image}/render?{raw}", encoded=True)))
    assert status in (200, 400, 422)


@pytest.mark.fuzz
@settings(max_examples=min(600, settings.default.max_examples))    # two scrypt checks an example: 0.3 s
@given(user=any_text(), password=any_text(), target=any_text(), raw=st.binary(max_size=300),
       cookie=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300))
async def test_fuzz_the_login_form_and_cookies_never_answer_500(client, setup, user, password, target, raw, cookie):
    forget_failures(setup[1])
    status, body = await answered(client.post("/login", data={"user": user, "password": password, "next": target},
                                              allow_redirects=False))
    assert status in (302, 401, 413)               # 413: a form over 64 KiB (3,000 four-byte characters)
    forget_failures(setup[1])
    status, _ = await answered(client.post("/login", data=raw, allow_redirects=False,
                                           headers={"Content-Type": "application/x-www-form-urlencoded"}))
    assert status in (302, 400, 401, 413)
    forget_failures(setup[1])
    status, _ = await answered(client.get("/api/studies", headers={"Cookie": f"m3session={cookie}"},
                                          allow_redirects=False))
    assert status in (200, 400, 401)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | any_text(20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text(10), inner, max_size=4),
                    max_leaves=12)


@pytest.mark.fuzz
@given(share=st.one_of(JSON, st.dictionaries(st.just("days"), JSON)),
       job=st.one_of(JSON, st.fixed_dictionaries({"plugin": JSON, "params": JSON, "series": JSON})),
       raw=st.binary(max_size=200), link=any_text(40))
async def test_fuzz_json_bodies_and_share_ids_never_answer_500(clinician, setup, share, job, raw, link):
    study, _ = setup[2]["b"]
    headers = {"X-CSRF-Token": clinician.csrf}
    status, _ = await answered(clinician.post(f"/api/studies/{study}/share", json=share, headers=headers))
    assert status in (201, 400, 413)                          # 413: a body over 64 KiB
    status, _ = await answered(clinician.post(f"/api/studies/{study}/jobs", json=job, headers=headers))
    assert status in (201, 400, 413)
    for path in (f"/api/studies/{study}/share", f"/api/studies/{study}/jobs"):
        status, _ = await answered(clinician.post(path, data=raw, headers={**headers, "Content-Type": "application/json"}))
        assert status in (201, 400)
    from urllib.parse import quote

    status, _ = await answered(clinician.post(f"/api/shares/{quote(link, safe='')}/revoke", headers=headers))
    assert status in (400, 403, 404)


# uploads: random multipart bodies, random zips, random and damaged DICOM files

def multipart_body(parts: list[tuple[bytes, bytes]], boundary: bytes, cut: int | None) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    body += b"--" + boundary + b"--\r\n"
    return body[:cut] if cut is not None else body


PART_HEADS = st.one_of(
    st.builds(lambda name: b'Content-Disposition: form-data; name="files"; filename="' + name + b'"', st.binary(max_size=40)),
    st.sampled_from([b'Content-Disposition: form-data; name="files"', b"Content-Disposition: attachment",
                     b'Content-Disposition: form-data; name="files"; filename*=UTF-8\'\'%E2%80%A8x.dcm',
                     b"Content-Type: multipart/mixed; boundary=inner", b"", b"X: " + b"y" * 9000]),
    st.binary(max_size=120))


def instance_bytes() -> bytes:
    from helpers import data_file

    return data_file("CT_small.dcm").read_bytes()


def mutated(data: bytes, draw) -> bytes:
    """`data` with a few bytes changed, a piece cut out, or cut short."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start = draw(st.integers(0, len(data)))
        del data[start:start + draw(st.integers(0, 4096))]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def dicom_files(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "preamble", "mutated", "meta"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    if kind == "preamble":
        return b"\0" * 128 + b"DICM" + draw(st.binary(max_size=2000))
    original = instance_bytes()
    if kind == "meta":                                     # the damage within the file meta and first elements
        offset = dataset_offset(original)
        head = mutated(original[:offset + 400], draw)
        return head + original[offset + 400:]
    return mutated(original, draw)


@st.composite
def zips(draw) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for number in range(draw(st.integers(0, 4))):
            name = draw(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30))
            info = zipfile.ZipInfo(f"{number}-{name}")
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                                       zipfile.ZIP_LZMA]))
            z.writestr(info, draw(dicom_files()))
    data = out.getvalue()
    return mutated(data, draw) if data and draw(st.booleans()) else data


@pytest.mark.fuzz
@given(parts=st.lists(st.tuples(PART_HEADS, st.binary(max_size=500)), max_size=5),
       boundary=st.one_of(st.just(b"fuzzboundary"), st.binary(min_size=1, max_size=70)),
       cut=st.one_of(st.none(), st.integers(0, 3000)), content_type=st.sampled_from(
           ["multipart/form-data; boundary={}", "multipart/form-data", "multipart/mixed; boundary={}",
            "multipart/form-data; boundary=\"{}\"; charset=klingon"]))
async def test_fuzz_random_multipart_bodies_never_answer_500(clinician, setup, parts, boundary, cut, content_type):
    before = stored(setup[1])
    header = content_type.format("".join(c for c in boundary.decode("latin-1") if " " <= c <= "~"))
    status, body = await answered(clinician.post("/api/upload", data=multipart_body(parts, boundary, cut),
                                                 headers={"X-CSRF-Token": clinician.csrf, "Content-Type": header}))
    assert status in (200, 400, 413)
    after = stored(setup[1])
    assert {k: v for k, v in after.items() if k in before} == before


@pytest.mark.fuzz
@settings(max_examples=min(1500, settings.default.max_examples))   # up to 4 ingests an example: 0.1 s
@given(uploaded=st.lists(st.tuples(st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")),
                                           max_size=30),                # (controls: the multipart fuzzing above)
                                   st.one_of(dicom_files(), zips())), min_size=1, max_size=4))
async def test_fuzz_random_files_and_zips_each_get_their_own_outcome(clinician, setup, uploaded):
    before = stored(setup[1])
    named = [(f"{i}-{name}" + (".zip" if data[:2] == b"PK" else ".dcm"), data) for i, (name, data) in enumerate(uploaded)]
    status, body = await answered(clinician.post("/api/upload", data=files(*named),
                                                 headers={"X-CSRF-Token": clinician.csrf}))
    assert status in (200, 413), body[:300]
    if status == 200:
        import json

        results = json.loads(body)["files"]
        assert all(r["outcome"] in ("stored", "duplicate", "refused") and r["reason"] for r in results)
        assert len(results) >= sum(1 for _, data in named if data[:2] != b"PK")
        for uid in {r["sop_instance_uid"] for r in results if r["outcome"] == "stored"}:   # and each is shown
            for view in ("info", "render?width=64", "sr"):
                status, _ = await answered(clinician.get(f"/api/instances/{uid}/{view}"))
                assert status in (200, 404, 422), (view, status)
    after = stored(setup[1])
    assert {k: v for k, v in after.items() if k in before} == before


PATHS = ["/studies/{}", "/studies/{}/model/{}", "/api/studies/{}", "/api/studies/{}/findings", "/api/studies/{}/jobs",
         "/api/studies/{}/plugins", "/api/studies/{}/shares", "/api/jobs/{}/files/{}", "/api/instances/{}/info",
         "/api/instances/{}/render", "/api/instances/{}/sr", "/api/instances/{}/download", "/s/{}"]
POSTS = ["/api/jobs/{}/cancel", "/api/studies/{}/jobs", "/api/studies/{}/share", "/api/shares/{}/revoke"]


@pytest.mark.fuzz
@given(first=st.one_of(any_text(70), st.just("1.2.3"), st.just("0123456789abcdef")), second=any_text(40),
       raw=st.booleans())
async def test_fuzz_path_parameters_never_answer_500(clinician, first, second, raw):
    from urllib.parse import quote

    from yarl import URL

    def path(template: str) -> URL:
        parts = [quote(first, safe="" if not raw else "/%"), quote(second, safe="")]
        return URL(template.format(*parts[:template.count("{}")]), encoded=True)

    headers = {"X-CSRF-Token": clinician.csrf}
    for template in PATHS:
        status, _ = await answered(clinician.get(path(template), allow_redirects=False))
        assert status in (200, 302, 400, 403, 404, 422), (template, status)
    for template in POSTS:
        status, _ = await answered(clinician.post(path(template), json={}, headers=headers, allow_redirects=False))
        assert status in (200, 201, 400, 403, 404, 409), (template, status)


async def test_a_users_own_typos_do_not_slow_down_the_next_logins_from_that_address(client, setup):
    """New-user pass: after a few wrong passwords and the right one, every later login from the
    same computer waited 8 s for 15 minutes (the address kept the failures). Four typos here (the
    delays they earn double: six made the test wait 16 s)."""
    for _ in range(4):
        assert (await login(client, "alice", "a wrong password")).status == 401
    assert (await login(client)).status == 302
    index = setup[1].index
    assert accounts.failure_delay(index, "alice", "127.0.0.1") == 0.0
    assert accounts.failure_delay(index, "someone-else", "127.0.0.1") == 0.0
    # failures on another account from this address still count there
    for _ in range(3):
        assert (await login(client, "bob-or-nobody", "a wrong password")).status == 401
    assert (await login(client)).status == 302
    assert accounts.failure_delay(index, "alice", "127.0.0.1") == delay(3)


# -- attack, second round: memory of images, event streams, parts, login CSRF -------------------------------

MIB = 1 << 20


def rle_bomb(directory: Path, side: int, patient_id: str = "BOMB-1") -> tuple[Path, str]:
    """An RLE Lossless 8-bit image declaring side x side pixels, all zero: 2 bytes for every 128
    pixels (16384 x 16384: 4 MiB on the wire, 256 MiB decoded, a quarter of ingest.max_pixel_bytes)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    (path,) = synthetic_instances(directory, 1, patient="Bomb^Pixel", patient_id=patient_id)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 8, 8, 7, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        ds.pop(keyword, None)
    segment = b"\x81\x00" * (side // 128) * side           # runs of 128 zero bytes
    ds.PixelData = encapsulate([struct.pack("<16I", 1, 64, *[0] * 14) + segment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SOPInstanceUID)


def deflated_blob(sop_instance: str, inflated: int) -> bytes:
    """A Deflated Explicit VR Little Endian data set that is no image: its header, then a private OB
    value of `inflated` bytes (one random byte in 128) that deflates about 40 times, within the
    ingest limits (ratio 100). One compressed MiB repeated after full flushes: made in a second."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from test_hostile_data import element, identity, part10, text_value

    before, after = identity(sop_instance)
    head = before + element(0x00090010, b"LO", text_value("M3ATTACK")) + \
        struct.pack("<HH2sHI", 0x0009, 0x1011, b"OB", 0, inflated)
    block = bytearray(MIB)
    block[::128] = os.urandom(MIB // 128)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(head) + deflater.flush(zlib.Z_FULL_FLUSH)
    mib = deflater.compress(bytes(block)) + deflater.flush(zlib.Z_FULL_FLUSH)
    stream = start + mib * (inflated // MIB) + deflater.compress(after) + deflater.flush()
    return part10(stream, sop_instance, DeflatedExplicitVRLittleEndian)


def viewer_node(make_node, tmp_path, **viewer):
    """A node with its viewer (one receiving process, no router: the viewer is its only worker
    process), and an opener logged in as its admin: (node, opener, the viewer's psutil process)."""
    import http.cookiejar
    import ssl
    import urllib.request

    import psutil

    from viewer.serve import ADMIN_PASSWORD_ENV

    node = make_node(start=False, dicom={"receivers": 1}, router={"enabled": False},
                     viewer={"enabled": True, "port": free_port(), **viewer})
    node.env[ADMIN_PASSWORD_ENV] = PASSWORD
    node.start()
    context = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    context.check_hostname = False
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                         urllib.request.HTTPSHandler(context=context))
    assert _https(node, "/login", opener, {"user": "admin", "password": PASSWORD, "next": "/studies"})[0] == 200
    workers = [p for p in psutil.Process(node.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    return node, opener, workers[0]


def fetch(node, path: str, opener) -> tuple[int, bytes]:
    import urllib.error

    try:
        with opener.open(f"https://127.0.0.1:{node.settings['viewer']['port']}{path}", timeout=120) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def peak_from_now(process) -> int:
    """Resets the process's peak resident memory (VmHWM) to what it holds now; returns that, bytes."""
    Path(f"/proc/{process.pid}/clear_refs").write_text("5")
    return process.memory_info().rss


def peak(process) -> int:
    status = Path(f"/proc/{process.pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) << 10


def store(node, path: Path, syntax: str) -> None:
    from pynetdicom.sop_class import CTImageStorage

    assoc = node.associate("ATTACKER", CTImageStorage, transfer_syntaxes=[syntax])
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()


@pytest.mark.slow
def test_a_pixel_bomb_is_shown_within_the_stated_memory_bound(make_node, tmp_path):
    """pixel_bomb.py: 4 MiB of RLE declaring 256 MiB of 8-bit pixels took the viewer to 3.5 GB for
    one thumbnail (float32 copies at full size) and left 1.2 GB held (the cache kept an item over
    its budget). Bound (docs/security.md): a decode and render holds at most twice the decoded size
    plus 64 MiB; the cache at most its budget; all decodes together viewer.decode_memory_mb."""
    import json
    import threading

    from PIL import Image
    from pydicom.uid import RLELossless

    from test_hostile_data import after_the_attack, stored_before

    node, opener, viewer = viewer_node(make_node, tmp_path, decode_memory_mb=1024)
    state = stored_before(node, tmp_path)
    bombs = [rle_bomb(tmp_path / f"bomb{n}", 16384, f"BOMB-{n}") for n in range(3)]
    assert bombs[0][0].stat().st_size < 5 * MIB
    for path, _ in bombs:
        store(node, path, RLELossless)
    decoded, cache_budget = 256 * MIB, int(512 * 0.8) * MIB
    first = bombs[0][1]

    base = peak_from_now(viewer)
    started = time.monotonic()
    status, body = fetch(node, f"/api/instances/{first}/render?width=256&height=256", opener)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (256, 256)
    assert time.monotonic() - started < 30
    assert peak(viewer) - base < 2 * decoded + 64 * MIB, f"peaked {(peak(viewer) - base) >> 20} MiB over its base"
    held = viewer.memory_info().rss - base
    assert held < cache_budget + 32 * MIB, f"holds {held >> 20} MiB after the render"
    status, body = fetch(node, f"/api/instances/{first}/info", opener)
    assert status == 200 and json.loads(body)["image"] and json.loads(body)["rows"] == 16384

    # all three at once: the decodes wait for each other's memory (2 x 552 MiB > 1024 MiB)
    answers = []
    threads = [threading.Thread(target=lambda uid=uid: answers.append(
        fetch(node, f"/api/instances/{uid}/render?width=128", opener)[0])) for _, uid in bombs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert answers == [200] * 3
    assert peak(viewer) - base < 1024 * MIB + cache_budget + 64 * MIB, f"{(peak(viewer) - base) >> 20} MiB"
    assert viewer.memory_info().rss - base < cache_budget + 32 * MIB
    after_the_attack(node, tmp_path, state)


@pytest.mark.slow
def test_the_info_of_a_large_deflated_data_set_reads_its_header_only(make_node, tmp_path, monkeypatch):
    """deflate_view.py: 5 MiB deflated to 256 MiB (within the ingest limits) added 1 GB to the viewer
    on its info page: pydicom inflated it whole in memory, twice (pixels, then the header)."""
    import json

    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
    from pynetdicom import _config as pynetdicom_config

    from test_hostile_data import after_the_attack, stored_before

    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)   # the file's bytes as they are
    node, opener, viewer = viewer_node(make_node, tmp_path)
    state = stored_before(node, tmp_path)
    uid = generate_uid()
    path = tmp_path / "deflated.dcm"
    path.write_bytes(deflated_blob(uid, 256 * MIB))
    assert path.stat().st_size < 16 * MIB
    store(node, path, DeflatedExplicitVRLittleEndian)
    study = node.rows("SELECT st.study_uid FROM instances i JOIN series se ON se.pk = i.series_pk "
                      "JOIN studies st ON st.pk = se.study_pk WHERE i.sop_instance_uid=?", (uid,))[0][0]

    base = peak_from_now(viewer)
    status, body = fetch(node, f"/api/instances/{uid}/info", opener)
    assert status == 200, body
    assert json.loads(body) == {"image": False, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "modality": "CT",
                                "why": "CT Image Storage has no image"}
    status, body = fetch(node, f"/api/instances/{uid}/sr", opener)
    assert status == 422 and json.loads(body)["error"] == "not a structured report"
    assert fetch(node, f"/api/studies/{study}", opener)[0] == 200           # the study page reads its header
    assert peak(viewer) - base < 64 * MIB, f"peaked {(peak(viewer) - base) >> 20} MiB over its base"
    after_the_attack(node, tmp_path, state)


async def test_a_render_holds_twice_the_decoded_size_and_the_cache_keeps_nothing_over_its_budget(setup,
                                                                                                 aiohttp_client,
                                                                                                 tmp_path):
    """pixel_bomb.py in the viewer's own process: an image of 64 MiB decoded peaked at 985 MB (float32
    at full size, then windowed copies of it, for a 256-pixel thumbnail) and stayed in a cache of
    51 MiB. Measured with tracemalloc (numpy reports its arrays to it)."""
    import tracemalloc

    from viewer.app import IMAGES

    config, archive, _ = setup
    config = from_dict({"node": {"data_dir": str(config.data_dir)},
                        "viewer": {"tls": False, "image_cache_mb": 64}}, tmp_path)
    path, uid = rle_bomb(tmp_path / "bomb", 8192)
    assert archive.ingest_file(path).sop_instance_uid == uid
    client = await aiohttp_client(create_app(config, archive, clock=Clock()))
    await login(client)
    images = client.server.app[IMAGES]
    tracemalloc.start()
    try:
        for query in ("width=256&height=256", "x=1000&y=2000&w=4000&h=3000&width=1000", "x=10&y=10&w=900&h=900"):
            tracemalloc.reset_peak()
            answer = await client.get(f"/api/instances/{uid}/render?{query}")
            assert answer.status == 200 and answer.content_type == "image/png"
            _, highest = tracemalloc.get_traced_memory()
            assert highest < 2 * 64 * MIB + 48 * MIB, f"{query}: {highest >> 20} MiB"
    finally:
        tracemalloc.stop()
    assert images.decoded.size <= images.decoded.limit and images.rendered.size <= images.rendered.limit
    assert images.decoded.get(uid) is None                       # 64 MiB is over the 51 MiB budget: not kept
    info = await (await client.get(f"/api/instances/{uid}/info")).json()
    assert info["image"] and info["rows"] == 8192 and info["window_width"] >= 1
    await still_serves(client)


async def test_a_share_link_guest_holds_a_few_event_streams_and_closed_ones_are_freed(setup, aiohttp_client):
    """sse_flood.py: one share-link guest opened 18,000 /api/events streams (the viewer went from 148 MB
    to 5.3 GB and 18,017 file descriptors) and their memory stayed after they closed. Now a session
    holds 6 (viewer.max_event_streams), an address 32 over all its sessions (a link opened again
    makes a new session), one more is answered 429 with the reason, and a closed one is freed."""
    from test_viewer_api import share_link
    from viewer.app import EVENTS

    config, archive, studies = setup
    client = await aiohttp_client(create_app(config, archive, clock=Clock()))
    token = await share_link(client, studies["a"][0])
    broker = client.server.app[EVENTS]

    async def guest():
        visitor = await aiohttp_client(client.server)
        assert (await visitor.get(f"/s/{token}", allow_redirects=False)).status == 302
        return visitor

    first = await guest()
    streams = [await first.get("/api/events") for _ in range(6)]
    assert [s.status for s in streams] == [200] * 6
    refused = await first.get("/api/events")
    assert refused.status == 429 and refused.headers["Retry-After"]
    assert "(viewer.max_event_streams)" in (await refused.json())["error"]
    refusals = []
    for _ in range(5):                                      # the same link, opened again: new sessions
        visitor = await guest()
        for _ in range(6):
            answer = await visitor.get("/api/events")
            (streams if answer.status == 200 else refusals).append(answer)
    assert len(streams) == 32 and len(broker.subscribers) == 32
    assert {r.status for r in refusals} == {429}
    assert all(["(viewer.max_event_streams_per_address)" in (await r.json())["error"] for r in refusals])

    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 5
    while (broker.subscribers or broker.open) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not broker.subscribers and not broker.open, "closed streams are still held"
    again = await first.get("/api/events")
    assert again.status == 200
    again.close()
    await login(client)
    await still_serves(client)


@pytest.mark.slow
def test_an_event_stream_flood_is_refused_in_bounded_memory(make_node, tmp_path):
    """sse_flood.py on a real node, over TLS: 300 streams on one share-link session."""
    import json
    import socket
    import ssl

    from test_hostile_data import after_the_attack, stored_before

    node, opener, viewer = viewer_node(make_node, tmp_path)
    state = stored_before(node, tmp_path)
    study = next(iter(state.values()))[1]
    context = ssl.create_default_context(cafile=str(node.pki / "ca.pem"))
    context.check_hostname = False
    port = node.settings["viewer"]["port"]
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', fetch(node, "/studies", opener)[1].decode()).group(1)
    request = urllib_request(f"https://127.0.0.1:{port}/api/studies/{study}/share", {"days": 1}, csrf)
    link = json.loads(opener.open(request, timeout=30).read())["url"].split("/s/", 1)[1]
    guest = [None]

    def connect() -> ssl.SSLSocket:
        return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="x")

    with connect() as sock:
        sock.sendall(f"GET /s/{link} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = sock.recv(4096).decode()
        guest[0] = re.search(r"m3session=([^;]+)", answer).group(1)
    fds, rss = viewer.num_fds(), viewer.memory_info().rss
    streams, statuses = [], []
    for _ in range(300):
        sock = connect()
        sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: x\r\nCookie: m3session={guest[0]}\r\n"
                     "Last-Event-ID: 0\r\n\r\n".encode())
        answer = sock.recv(4096)
        statuses.append(answer.split(b" ", 2)[1].decode())
        if statuses[-1] == "200":
            streams.append(sock)
            continue
        assert b"(viewer.max_event_streams)" in answer + sock.recv(4096)
        while sock.recv(4096):                # the refusal closes its connection: no TLS connection left open
            pass
        sock.close()
    assert statuses.count("200") == 6 and statuses.count("429") == 294, statuses
    assert viewer.num_fds() <= fds + 6 + 2
    assert viewer.memory_info().rss - rss < 32 * MIB, f"{(viewer.memory_info().rss - rss) >> 20} MiB"
    for sock in streams:
        sock.close()
    wait_for(lambda: viewer.num_fds() <= fds + 2, timeout=10, what="the streams' connections to be closed")
    assert "Traceback" not in node.log()
    after_the_attack(node, tmp_path, state)


def urllib_request(url: str, body: dict, csrf: str):
    import json
    import urllib.request

    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json", "X-CSRF-Token": csrf})


def many_parts(count: int, boundary: str = "b0undary") -> bytes:
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nX\r\n'.encode()
    return part * count + f"--{boundary}--\r\n".encode()


async def test_an_upload_of_too_many_files_is_refused_at_once_and_audited_once(setup, aiohttp_client, tmp_path):
    """parts_bomb.py: a 4 MiB upload of 50,000 one-byte parts took 66 s, wrote 50,001 audit rows and
    answered 5 MB of JSON; the 20,000-file cap held only inside zips. Now parts and zip members
    count together against viewer.max_upload_files (here 200); past it: 413 at once, one audit row."""
    config, archive, _ = setup
    config = from_dict({"node": {"data_dir": str(config.data_dir)},
                        "viewer": {"tls": False, "max_upload_mb": 4, "max_file_mb": 2, "max_upload_files": 200}},
                       tmp_path)
    client = await aiohttp_client(create_app(config, archive, clock=Clock()))
    await login(client)
    headers = {"X-CSRF-Token": await csrf_of(client), "Content-Type": "multipart/form-data; boundary=b0undary"}
    before = stored(archive)
    started = time.monotonic()
    answer = await client.post("/api/upload", data=many_parts(50_000), headers=headers)
    assert time.monotonic() - started < 5
    assert answer.status == 413
    assert (await answer.json())["error"] == ("the upload holds more than 200 files (viewer.max_upload_files): "
                                              "send it in several parts")
    assert audit(archive, "upload") == [("alice", "refused", "the upload holds more than 200 files "
                                         "(viewer.max_upload_files): send it in several parts")]
    # parts and zip members together: 150 parts and a zip of 60
    (instance,) = synthetic_instances(tmp_path / "one", 1)
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as z:
        for n in range(60):
            z.writestr(f"{n}.dcm", instance.read_bytes() if n == 0 else b"junk")
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": headers["X-CSRF-Token"]},
                               data=files(*[(f"{n}.dcm", b"junk") for n in range(150)],
                                          ("study.zip", packed.getvalue())))
    assert answer.status == 413 and "more than 200 files" in (await answer.json())["error"]
    # a zip whose directory alone is too large for them is refused before zipfile reads it (whole, and
    # at about 0.5 KB of memory an entry: a 1 GiB zip of empty members would take gigabytes)
    crowded = io.BytesIO()
    with zipfile.ZipFile(crowded, "w") as z:
        for n in range(5000):
            z.writestr(f"{n}", b"")
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": headers["X-CSRF-Token"]},
                               data=files(("crowded.zip", crowded.getvalue())))
    assert answer.status == 413
    assert (await answer.json())["error"] == ("crowded.zip: its directory is too large for the 200 files an upload "
                                              "may hold (viewer.max_upload_files): send it in several parts")
    assert len(audit(archive, "upload")) == 3
    assert stored(archive) == before
    assert not list((config.data_dir / "spool" / "uploads").glob("*/*"))
    # under the cap: each file its outcome; the first 100 refusals audited one by one, the rest in one record
    answer = await client.post("/api/upload", headers={"X-CSRF-Token": headers["X-CSRF-Token"]},
                               data=files(*[(f"{n}.dcm", b"junk") for n in range(150)]))
    assert answer.status == 200 and [f["outcome"] for f in (await answer.json())["files"]] == ["refused"] * 150
    records = audit(archive, "upload")[3:]
    assert len(records) == 102 and records[100] == ("alice", "refused", "50 more files refused (the upload's "
                                                                        "answer lists each with its reason)")
    assert records[-1] == ("alice", "ok", "0 stored of 150")
    await still_serves(client)


async def test_a_login_or_logout_sent_from_another_site_is_refused(setup, aiohttp_client, tmp_path):
    """viewer_misc.py (login CSRF): a POST to /login with `Origin: https://evil.example` was answered
    302 with a session cookie: another site could log a browser in as the attacker."""
    config, archive, _ = setup
    config = from_dict({"node": {"data_dir": str(config.data_dir)},
                        "viewer": {"tls": False, "public_url": "https://viewer.example:8443"}}, tmp_path)
    client = await aiohttp_client(create_app(config, archive, clock=Clock()))
    form = {"user": "alice", "password": PASSWORD, "next": "/studies"}
    here = str(client.make_url("/")).rstrip("/")
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": ""},
                    {"Referer": "https://evil.example/login"}, {"Origin": f"http://evil.example:{client.port}"},
                    {"Origin": "http://127.0.0.1:1"}, {"Origin": "https://evil.example", "Referer": here + "/login"},
                    {"Origin": "https://viewer.example"}):
        answer = await client.post("/login", data=form, headers=headers, allow_redirects=False)
        assert answer.status == 403, headers
        assert "sent from another site" in await answer.text() and "m3session" not in answer.headers.get(
            "Set-Cookie", ""), headers
    assert audit(archive, "login") == []                                  # not even checked
    for headers in ({"Origin": here}, {"Referer": here + "/login?next=/studies"}, {},
                    {"Origin": "https://viewer.example:8443"}):
        answer = await client.post("/login", data=form, headers=headers, allow_redirects=False)
        assert answer.status == 302 and "m3session" in answer.headers["Set-Cookie"], headers
    csrf = await csrf_of(client)
    answer = await client.post("/logout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"},
                               allow_redirects=False)
    assert answer.status == 403
    assert (await client.get("/api/studies")).status == 200              # still logged in
    answer = await client.post("/api/studies/1.2.3/share", json={}, headers={"X-CSRF-Token": csrf,
                                                                             "Origin": "https://evil.example"})
    assert answer.status == 403 and "another site" in (await answer.json())["error"]
    assert (await client.get("/login")).headers["Referrer-Policy"] == "same-origin"
    await still_serves(client)


async def test_failed_logins_from_one_ipv6_64_count_together(setup, aiohttp_client):
    """Code reading: the viewer counted failed logins per full IPv6 address, where the DICOM side
    counts a /64 (one host usually holds a whole /64: a new address for every guess)."""
    from viewer.logins import source_of

    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7" and source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("fe80::1%eth0") == "fe80::/64" and source_of("?") == "?"
    config, archive, _ = setup
    client = await aiohttp_client(create_app(config, archive, clock=Clock()), server_kwargs={"host": "::1"})
    assert (await login(client, "alice", "a wrong password")).status == 401
    keys = [r[0] for r in archive.index.read(text("SELECT key FROM login_failures ORDER BY key"))]
    assert keys == ["addr:::/64", "user:alice"]
    assert accounts.failure_delay(archive.index, "nobody", source_of("::2")) > 0     # the same /64
