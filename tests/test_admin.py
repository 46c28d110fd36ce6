"""The admin pages (viewer/admin.py): users, share links, API tokens, the audit trail and its CSV, the settings and
the node at a glance; each change audited (and sent to ATNA as a Security Alert, a search as Audit Log Used).
aiohttp's test client against a real archive; the pages in a real browser, on a desktop and a phone, below."""
from __future__ import annotations

import csv
import io
import re

import pytest
from sqlalchemy import text

from archive import Archive
from helpers import ROOT, free_port, synthetic_instances
from node import owners
from node.config import from_dict
from viewer import accounts, admin
from viewer.app import create_app

PASSWORD = "a long enough password"
ARTIFACTS = ROOT / "test-artifacts"


class Recorded:
    """Stands in for the ATNA recorder (archive/atna.Recorder, tested with a real repository in test_audit):
    the events the viewer hands it."""

    def __init__(self):
        self.events = []

    def record(self, event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


@pytest.fixture
def setup(tmp_path):
    config = from_dict({"node": {"data_dir": str(tmp_path / "var")}, "viewer": {"tls": False},
                        "router": {"dashboard_port": 8799}}, tmp_path)
    archive = Archive(config.data_dir)
    owners.migrate(archive.index)
    accounts.add_user(archive.index, "ada", PASSWORD, "admin")
    accounts.add_user(archive.index, "carl", PASSWORD, "clinician")
    (path,) = synthetic_instances(tmp_path / "a", 1, patient="Patient^A", patient_id="P-a")
    study = archive.ingest_file(path).study_uid
    archive.audit = Recorded()
    yield config, archive, study
    archive.close()


async def _login(aiohttp_client, app_or_server, user: str, password: str = PASSWORD):
    client = await aiohttp_client(app_or_server)
    response = await client.post("/login", data={"user": user, "password": password}, allow_redirects=False)
    assert response.status == 302, user
    page = await (await client.get("/studies")).text()
    client.csrf = re.search(r'name="csrf-token" content="([^"]*)"', page).group(1)
    return client


async def _post(client, path: str, **fields):
    """A form sent as the page sends it, its answer as the browser ends on it (a change redirects: 303)."""
    return await client.post(path, data={"csrf": client.csrf, **fields})


def _audited(archive, action: str) -> list[tuple]:
    return [tuple(r) for r in archive.index.read(text("SELECT user_name, outcome, detail FROM audit WHERE action = :a "
                                                       "ORDER BY seq"), {"a": action})]


async def test_an_admin_adds_resets_changes_disables_and_enables_a_user(setup, aiohttp_client):
    config, archive, study = setup
    ada = await _login(aiohttp_client, create_app(config, archive), "ada")
    page = await _post(ada, "/admin/users", name="rita", password="rita's own password", role="reader",
                       referring="Who^Rita")
    assert page.status == 200 and "rita added as a reader of the studies referred by Who^Rita" in await page.text()
    assert str(page.url).startswith(str(ada.make_url("/admin/users?done=added")))     # a reload repeats nothing
    refused = await _post(ada, "/admin/users", name="rex", password="short", role="clinician")
    assert refused.status == 400 and "at least 10 characters" in await refused.text()
    rita = await _login(aiohttp_client, ada.server, "rita", "rita's own password")
    assert (await rita.get("/api/studies")).status == 200
    # a new password ends her session; the old password no longer opens one
    assert "sessions have ended" in await (await _post(ada, "/admin/users/rita/password",
                                                       password="a brand new password")).text()
    assert (await rita.get("/api/studies")).status == 401
    rita = await _login(aiohttp_client, ada.server, "rita", "a brand new password")
    # a role change ends her sessions too, so that no session keeps the old rights
    assert "now a clinician" in await (await _post(ada, "/admin/users/rita/role", role="clinician")).text()
    assert (await rita.get("/api/studies")).status == 401
    rita = await _login(aiohttp_client, ada.server, "rita", "a brand new password")
    assert "rita&#39;s sessions have ended (1)" in await (await _post(ada, "/admin/users/rita/sessions")).text()
    assert (await rita.get("/api/studies")).status == 401
    await _post(ada, "/admin/users/rita/disable")
    failed = await (await aiohttp_client(ada.server)).post("/login", data={"user": "rita",
                                                                          "password": "a brand new password"})
    assert failed.status == 401
    await _post(ada, "/admin/users/rita/enable")
    await _login(aiohttp_client, ada.server, "rita", "a brand new password")
    # the last admin stays one
    own = await _post(ada, "/admin/users/ada/disable")
    assert own.status == 400 and "your own account" in await own.text()
    demoted = await _post(ada, "/admin/users/ada/role", role="clinician")
    assert demoted.status == 400 and "only enabled admin" in await demoted.text()
    assert (await _post(ada, "/admin/users/nobody/enable")).status == 404
    assert (await _post(ada, "/admin/users/rita/delete")).status == 404
    listed = await (await ada.get("/admin/users")).text()
    assert 'data-user="rita"' in listed and "clinician" in listed
    assert [who for who, *_ in _audited(archive, "user_password")] == ["ada"]
    assert ("ada", "refused", "ada: you cannot disable your own account (another admin can)") in \
        _audited(archive, "user_disable")
    alerts = [e for e in archive.audit.events if e.kind == "security-alert"]
    assert {(e.event_type, e.account) for e in alerts} >= {("security-roles-changed", "rita"),
                                                          ("user-security-attributes-changed", "rita")}
    # a clinician has none of it
    carl = await _login(aiohttp_client, ada.server, "carl")
    assert (await _post(carl, "/admin/users", name="x", password=PASSWORD, role="admin")).status == 403
    refused = await carl.get("/admin")
    assert refused.status == 403 and "Back to your studies" in await refused.text()        # a page, not bare words
    assert accounts.users(archive.index)[-1][0] == "rita"


async def test_an_admin_revokes_anyones_share_link_and_manages_tokens(setup, aiohttp_client):
    config, archive, study = setup
    ada = await _login(aiohttp_client, create_app(config, archive), "ada")
    carl = await _login(aiohttp_client, ada.server, "carl")
    made = await carl.post(f"/api/studies/{study}/share", json={"days": 1}, headers={"X-CSRF-Token": carl.csrf})
    link = (await made.json())["url"].split("/s/")[1]
    guest = await aiohttp_client(ada.server)
    assert (await guest.get(f"/s/{link}", allow_redirects=False)).status == 302
    page = await (await ada.get("/admin/shares")).text()
    link_id = re.search(r'data-share="([^"]+)"', page).group(1)
    assert "carl" in page and "Patient^A" in page                 # which patient's study, at a glance
    answer = await _post(ada, f"/admin/shares/{link_id}/revoke")
    assert "is revoked" in await answer.text()
    assert (await guest.get(f"/api/studies/{study}")).status == 403                   # told it was withdrawn
    assert f'data-share="{link_id}"' not in await (await ada.get("/admin/shares")).text()
    assert f'data-share="{link_id}"' in await (await ada.get("/admin/shares?all=1")).text()
    # a token made on the page opens DICOMweb; revoked, it opens nothing
    page = await (await _post(ada, "/admin/tokens", name="slicer", scope="read", days="30")).text()
    token = re.search(r'id="made-token">(m3t_[^<]+)<', page).group(1)
    program = await aiohttp_client(ada.server)
    assert (await program.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})).status == 200
    assert token not in await (await ada.get("/admin/tokens")).text()                  # shown once
    assert (await _post(ada, "/admin/tokens", name="slicer", scope="read")).status == 400   # the name is taken
    await _post(ada, "/admin/tokens/slicer/revoke")
    assert (await program.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})).status == 401
    assert (await _post(ada, "/admin/tokens", name="x", scope="read", days="soon")).status == 400


async def test_the_audit_search_filters_pages_and_exports_a_csv_no_spreadsheet_runs(setup, aiohttp_client):
    config, archive, study = setup
    app = create_app(config, archive)
    ada = await _login(aiohttp_client, app, "ada")
    stranger = await aiohttp_client(ada.server)
    formula = "=HYPERLINK(\"http://evil.example\",\"x\")"
    for _ in range(3):
        await stranger.post("/login", data={"user": formula, "password": "wrong"})
    for _ in range(105):
        accounts.audit(archive.index, "carl", "view", study_uid=study)
    page = await (await ada.get("/admin/audit", params={"action": "login", "outcome": "refused"})).text()
    assert page.count("<tr class=\"refused\">") == 3 and "HYPERLINK" in page and "<tr class=\"ok\">" not in page
    first = await (await ada.get("/admin/audit", params={"who": "carl"})).text()
    assert first.count("<tr class=") == admin.PAGE
    older = re.search(r'href="(/admin/audit\?[^"]*before=\d+)"', first).group(1).replace("&amp;", "&")
    assert (await (await ada.get(older)).text()).count("<tr class=") == 5
    assert (await ada.get("/admin/audit", params={"from": "yesterday"})).status == 400
    none = await (await ada.get("/admin/audit", params={"from": "2001-01-01", "to": "2001-01-02"})).text()
    assert "No audit record matches" in none
    exported = await ada.get("/admin/audit.csv", params={"action": "login"})
    assert exported.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in exported.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(await exported.text())))
    assert rows[0][:4] == ["seq", "time (UTC)", "user_name", "action"]
    refused = [r for r in rows[1:] if r[5] == "refused"]
    assert len(refused) == 3 and all(r[2] == "'" + formula for r in refused)    # text to a spreadsheet, not a formula
    # found by the attack pass: formulas behind what an importer trims, full-width signs, pipes
    for sneaky in (" =1+1", "\"=1+1", "\n=1+1", "\xa0=1+1", "\uff1d1+1", "|calc", "\t=1", "\x00=1", "\x0b=1", "\x1f=1",
                   "\u200b=1", "\ufeff=1", "\u2028=1"):
        assert admin._cell(sneaky) == "'" + sneaky, repr(sneaky)
    assert admin._cell("alice") == "alice" and admin._cell("1.2.840.10008") == "1.2.840.10008"
    assert admin._cell(None) == admin._cell("") == ""                         # an empty cell stays empty
    assert not [r for r in rows[1:] if "'" in (r[4], r[7])]
    assert (await ada.get("/admin/audit", params={"before": "\u00b2"})).status == 200        # a digit, not ASCII
    everything = list(csv.reader(io.StringIO(await (await ada.get("/admin/audit.csv")).text())))
    assert len(everything) > 110
    # reading the audit trail is itself audited, and an Audit Log Used message for ATNA
    assert _audited(archive, "audit_export")[0][0] == "ada"
    assert any(e.kind == "audit-log-used" for e in archive.audit.events)
    carl = await _login(aiohttp_client, ada.server, "carl")
    assert (await carl.get("/admin/audit.csv")).status == 403


async def test_the_overview_and_the_settings_say_how_the_node_is(setup, aiohttp_client, tmp_path):
    config, archive, study = setup
    ada = await _login(aiohttp_client, create_app(config, archive), "ada")
    seen = archive.index.read(text("SELECT COUNT(*) FROM nodes"))[0][0]
    page = await (await ada.get("/admin")).text()
    assert archive.index.read(text("SELECT COUNT(*) FROM nodes"))[0][0] == seen     # a look writes nothing
    for words in ("index</strong> ready", "disk</strong> ready", "key</strong> ready", "s3</strong> ready",
                  "1 studies, 1 instances", "127.0.0.1:8799", "ssh -L 8799:127.0.0.1:8799"):
        assert words in page, words
    (config.data_dir / "keys").rename(tmp_path / "keys-away")
    assert "key</strong> not ready" in await (await ada.get("/admin")).text()
    (tmp_path / "keys-away").rename(config.data_dir / "keys")
    settings = await (await ada.get("/admin/settings")).text()
    assert 'id="settings-storage.s3"' in settings and "min_free_bytes" in settings and "session_hours" in settings
    assert "= <span class=\"value\">true</span>" in settings and "(not set)" in settings and "None" not in settings
    assert admin._secret_free("postgresql://m3:s3cret@db.example:5432/m3") == "postgresql://***@db.example:5432/m3"
    # found by the attack pass: a key as user information, a token in the query, a port that is no number
    assert admin._secret_free("https://AKIAEXAMPLE@s3.example/") == "https://***@s3.example/"
    assert admin._secret_free("https://kms.example/?X-Amz-Signature=abc&region=eu") == \
        "https://kms.example/?X-Amz-Signature=***&region=eu"
    assert admin._secret_free("http://u:p@host:abc/") == "http://***@host:abc/"
    assert admin._secret_free("/var/lib/m3dicom") == "/var/lib/m3dicom"


async def test_a_stow_into_several_studies_is_audited_for_each(setup, aiohttp_client, tmp_path):
    import aiohttp

    config, archive, study = setup
    carl = await _login(aiohttp_client, create_app(config, archive), "carl")
    paths = [p for n in range(2) for p in synthetic_instances(tmp_path / f"s{n}", 1, patient=f"Stow^{n}")]
    with aiohttp.MultipartWriter("related", boundary="m3dicom-test") as body:
        for path in paths:
            body.append(path.read_bytes(), {"Content-Type": "application/dicom"})
    body.headers["Content-Type"] = 'multipart/related; type="application/dicom"; boundary=m3dicom-test'
    answer = await carl.post("/dicomweb/studies", data=body, headers={"X-CSRF-Token": carl.csrf,
                                                                     "Accept": "application/dicom+json"})
    assert answer.status == 200, await answer.text()
    import pydicom

    wanted = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in paths}
    rows = archive.index.read(text("SELECT study_uid, detail FROM audit WHERE action = 'dicomweb'"))
    assert {r[0] for r in rows} == wanted and all("1 stored into this study; the request: 2 stored, 0 failed, into 2 "
                                                 "studies" in r[1] for r in rows)
    stored = [e for e in archive.audit.events if e.kind == "instances-transferred"]
    assert {e.studies[0].uid for e in stored} == wanted


@pytest.mark.browser
@pytest.mark.slow
def test_the_admin_pages_read_well_on_a_desktop_and_a_phone(make_node, tmp_path):
    """An admin adds a reader on a phone; the reader, on a desktop, sees their study only; screenshots of every
    admin page on both, and no page is wider than the phone."""
    from playwright.sync_api import sync_playwright

    from test_viewer_browser import ARGS, CHROMIUM, DESKTOP

    node = make_node(start=False, viewer={"enabled": True, "port": free_port()})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    import pydicom

    paths = []
    for key, referring in (("mine", "Who^Rita"), ("other", "Else^Body")):
        (path,) = synthetic_instances(tmp_path / key, 1, patient=f"Patient^{key}", patient_id=key)
        ds = pydicom.dcmread(path)
        ds.ReferringPhysicianName = referring
        ds.save_as(path)
        paths.append(path)
    node.storescu(*paths)
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    phone = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "is_mobile": True,
             "has_touch": True, "device_scale_factor": 2}
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for device, options in (("phone", phone), ("desktop", DESKTOP)):
            page = browser.new_context(**options).new_page()
            page.goto(f"{url}/login")
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(r".*/studies"))
            page.click("header nav >> text=Admin")
            page.wait_for_selector("#health-h")
            for name in ("overview", "users", "shares", "tokens", "audit", "settings"):
                if name != "overview":
                    page.click(f".admin-nav >> text={admin_nav(name)}")
                    page.wait_for_selector(f'.admin-nav a[aria-current="page"]:has-text("{admin_nav(name)}")')
                page.screenshot(path=str(ARTIFACTS / f"{device}-admin-{name}.png"), full_page=True)
                wide = page.evaluate("document.scrollingElement.scrollWidth")
                assert wide <= options["viewport"]["width"], f"{name} is {wide} px wide on a {device}"
            if device == "phone":
                page.click(".admin-nav >> text=Users")
                page.fill("#add-user input[name=name]", "rita")
                page.fill("#add-user input[name=password]", "rita's own password")
                page.select_option("#add-user select[name=role]", "reader")
                page.fill("#add-user input[name=referring]", "WHO^RITA")
                page.click("#add-user button[type=submit]")
                page.wait_for_selector(".notice.ok")
                assert "rita added as a reader" in page.inner_text(".notice.ok")
                page.screenshot(path=str(ARTIFACTS / "phone-admin-user-added.png"), full_page=True)
        reader = browser.new_context(**DESKTOP).new_page()
        reader.goto(f"{url}/login")
        reader.fill("input[name=user]", "rita")
        reader.fill("input[name=password]", "rita's own password")
        reader.click("button[type=submit]")
        reader.wait_for_selector("#studies tbody tr[data-study]")
        rows = reader.locator("#studies tbody tr[data-study]")
        assert rows.count() == 1 and "mine" in rows.first.inner_text()
        assert reader.locator("#upload-box").count() == 0 and reader.locator("text=Admin").count() == 0
        reader.screenshot(path=str(ARTIFACTS / "desktop-reader-studies.png"))
        browser.close()


def admin_nav(name: str) -> str:
    return {"users": "Users", "shares": "Share links", "tokens": "API tokens", "audit": "Audit",
            "settings": "Settings", "overview": "Overview"}[name]


# -- found by the attack pass ------------------------------------------------------------------------

async def test_names_that_are_path_segments_and_odd_csrf_tokens_are_refused_plainly(setup, aiohttp_client):
    config, archive, study = setup
    ada = await _login(aiohttp_client, create_app(config, archive), "ada")
    for name in (".", "..", ".hidden", "-x"):
        assert (await _post(ada, "/admin/users", name=name, password=PASSWORD, role="clinician")).status == 400
        assert (await _post(ada, "/admin/tokens", name=name, scope="write")).status == 400
    for sent in ("\u00e9", "\u00c3\u00a9"):
        answer = await ada.post("/admin/users/carl/sessions", data={"csrf": sent}, allow_redirects=False)
        assert answer.status == 403                        # not a 500 and an ERROR line
    answer = await ada.post("/admin/users/carl/sessions", headers={"X-CSRF-Token": "\u00e9"})
    assert answer.status == 403


async def test_a_reader_is_promoted_with_the_form_as_shown_and_the_change_names_their_reach(setup, aiohttp_client):
    config, archive, study = setup
    accounts.add_user(archive.index, "rita", PASSWORD, "reader", referring="Who^Rita")
    ada = await _login(aiohttp_client, create_app(config, archive), "ada")
    answer = await _post(ada, "/admin/users/rita/role", role="reader", referring="Else^Body")
    assert answer.status == 200 and "studies referred by Else^Body" in await answer.text()
    answer = await _post(ada, "/admin/users/rita/role", role="clinician", referring="Else^Body")   # as shown
    assert answer.status == 200 and "now a clinician" in await answer.text()
    assert ("ada", "ok", "rita: role reader (studies referred by Else^Body)") in _audited(archive, "user_role")
    assert accounts.user_rows(archive.index)[-1]["referring"] is None


def test_two_admins_demoting_each_other_at_once_leave_one(tmp_path, index_url):
    """PostgreSQL runs both transactions at once: the last-admin rule takes a lock (SQLite has one writer)."""
    from concurrent.futures import ThreadPoolExecutor

    archive = Archive(tmp_path / "d", index_url=index_url)
    try:
        owners.migrate(archive.index)
        for attempt in range(8):
            for name in ("ann", "bob"):
                accounts.add_user(archive.index, name, PASSWORD, "admin", replace=True)

            def demote(name: str) -> str:
                try:
                    accounts.set_role(archive.index, name, "clinician")
                    return "demoted"
                except accounts.AccountError:
                    return "refused"
            with ThreadPoolExecutor(2) as pool:
                outcomes = sorted(pool.map(demote, ("ann", "bob")))
            admins = [u for u in accounts.user_rows(archive.index) if u["role"] == "admin"]
            assert outcomes == ["demoted", "refused"] and len(admins) == 1, (attempt, outcomes, admins)
    finally:
        archive.close()
