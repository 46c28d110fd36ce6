"""The viewer against hostile and careless clients (issue 14, items 11-16 and the viewer's part of 7).

Each case found by trying to break the viewer is a regression test here; the classes of input
behind them (query and form parameters, uploads) are fuzzed with hypothesis through aiohttp's
test client: never a 500, always an answer in bounded time, nothing stored changed.
"""
from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given, strategies as st

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
    return {r[0]: (r[1], r[2]) for r in archive.index.query(
        "SELECT i.sop_instance_uid, se.series_uid, i.sha256 FROM instances i JOIN series se ON se.pk = i.series_pk")}


def audit(archive: Archive, action: str) -> list[tuple]:
    return [tuple(r) for r in archive.index.query(
        "SELECT user_name, outcome, detail FROM audit WHERE action=? ORDER BY seq", (action,))]


def forget_failures(archive: Archive) -> None:
    """Failed logins start afresh (fuzzing the login form must not wait 8 s an example)."""
    with archive.index.write() as conn:
        conn.execute("DELETE FROM login_failures")


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
    assert answer.status == 401 and "Wrong user name or password." in page and "waits longer" in page


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
    assert audit(archive, "share_open") == [("share:?", "refused", "invalid, expired or revoked link")]
    assert audit(archive, "login")[-1] == ("bob", "refused", "wrong user name or password")
    await still_serves(client)                                # alice's session is still hers


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
