"""The viewer in a real browser: Debian's chromium, driven by Playwright, against a node started here.

A mammogram phantom (through the CAD plug-in) and Debian's real CT head (through the bone
model) arrive over DICOM TLS; then a clinician logs in, looks, changes the window, turns the
3D model, uploads, starts a job and is told when it is done, shares a link that a fresh
browser opens, and does it again on a phone-sized screen. Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import cranium
from gpu_workers.mammo import phantom
from helpers import ROOT, data_file, free_port, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.interop]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
PASSWORD = "browser-test-password"
ARTIFACTS = ROOT / "test-artifacts"
DESKTOP = {"ignore_https_errors": True, "viewport": {"width": 1280, "height": 860}}


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki):
    """A node with its viewer, a mammogram processed by the CAD and a CT head made into a model."""
    from helpers import Node

    work = tmp_path_factory.mktemp("browser")
    node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port()}, log={"level": "DEBUG"},
                router={"plugins": ["plugins_for_tests:HostileScene"], "rules": [
                    {"name": "mammo", "match": {"Modality": "MG"}, "plugin": "mammo-cad", "quiet_seconds": 1},
                    {"name": "head", "match": {"Modality": "CT", "BodyPartExamined": "HEAD"}, "plugin": "bone-model",
                     "quiet_seconds": 1, "params": {"triangles": 30000, "phone_triangles": 8000}}]})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.env["PYTHONPATH"] = str(ROOT / "tests")
    node.start()
    mammogram, truth = phantom.write(work / "mg", 31337, phantom.Options(rows=1000, columns=800, spacing=0.1,
                                                                         clusters=2, isolated=0, density=0.25))
    volume, spacing = cranium.load()
    node.storescu(mammogram, *cranium.write_series(work / "head", volume, spacing))
    wait_for(lambda: len(node.rows("SELECT 1 FROM jobs WHERE state='succeeded'")) == 2, timeout=240,
             what="the CAD and the bone model")
    studies = dict(node.rows("SELECT j.plugin, j.study_uid FROM jobs j"))
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    ARTIFACTS.mkdir(exist_ok=True)
    yield node, url, studies
    node.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def log_in(page, url: str) -> None:
    page.goto(f"{url}/")
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/studies.*"))


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def open_study(page, url: str, study: str) -> None:
    page.goto(f"{url}/studies/{study}")
    page.wait_for_selector("#image[src*='/render']", state="attached")
    page.wait_for_function("() => document.getElementById('image').complete && "
                           "document.getElementById('image').naturalWidth > 0")


def test_a_clinician_looks_at_results_changes_the_window_and_turns_the_model(site, browser):
    node, url, studies = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    assert page.locator("#studies tbody tr[data-study]").count() == 2
    page.screenshot(path=str(ARTIFACTS / "desktop-studies.png"))

    open_study(page, url, studies["mammo-cad"])
    page.wait_for_selector("#overlay g.mark")
    findings = page.evaluate(f"fetch('/api/studies/{studies['mammo-cad']}/findings').then(r => r.json())")
    expected = sum(len(f["clusters"]) + len([c for c in f["calcifications"] if not c["cluster_id"]])
                   for f in findings.values())
    assert expected >= 1
    assert page.locator("#overlay g.mark").count() == expected == page.locator("#findings li.finding").count()
    page.screenshot(path=str(ARTIFACTS / "desktop-mammogram-marks.png"))

    before = pixels(page.locator("#viewport").screenshot())
    src = page.evaluate("document.getElementById('image').src")
    page.select_option("#preset", label="High contrast")
    page.wait_for_function("(old) => document.getElementById('image').src !== old && "
                           "document.getElementById('image').complete", arg=src)
    page.wait_for_timeout(300)
    after = pixels(page.locator("#viewport").screenshot())
    assert page.evaluate("document.getElementById('image').src") != src
    assert np.abs(after - before).mean() > 2                     # the window changed what is shown

    page.locator("#findings li.finding").first.click()            # zoom to a finding
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "desktop-finding-zoomed.png"))

    open_study(page, url, studies["bone-model"])
    page.wait_for_selector("a:has-text('Open the 3D model')")
    page.click("a:has-text('Open the 3D model')")
    _wait_for_model(page)
    page.screenshot(path=str(ARTIFACTS / "desktop-bone-model.png"))
    page.click("#reset")
    assert page.get_attribute("#scene", "data-level") == "model.x3d"
    (job,), = node.rows("SELECT id FROM jobs WHERE plugin='bone-model'")
    encoding, size, text = page.evaluate(f"fetch('/api/jobs/{job}/files/model.x3d').then(async r => "
                                         "[r.headers.get('content-encoding'), r.headers.get('x-content-size'), "
                                         "await r.text()])")
    assert encoding == "gzip" and int(size) == len(text.encode()) and "<IndexedTriangleSet" in text
    assert not errors, errors
    context.close()


def _wait_for_model(page) -> None:
    """Wait until X3DOM has loaded the scene, then until the skull covers a real part of the canvas."""
    page.wait_for_selector("#scene[data-loaded]", state="attached", timeout=60000)
    assert page.get_attribute("#scene", "data-loaded") == "yes"
    wait_for(lambda: _drawn(page) > 0.05, timeout=30, what="X3DOM to draw the model")


def _drawn(page) -> float:
    """The share of the canvas that is not the scene's background (skyColor 0.12 0.14 0.17)."""
    canvas = pixels(page.locator("canvas").first.screenshot())
    background = np.array([31, 36, 43])
    return float((np.abs(canvas - background).sum(axis=2) > 60).mean())


def test_upload_start_a_job_and_be_told_when_it_is_done(site, browser):
    node, url, studies = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    page.set_input_files("#upload input[type=file]", str(data_file("CT_small.dcm")))
    page.click("#upload button[type=submit]")
    page.wait_for_selector(".upload-results tr.stored")
    assert node.rows("SELECT COUNT(*) FROM instances WHERE calling_ae='upload:admin'") == [(1,)]

    open_study(page, url, studies["mammo-cad"])
    page.evaluate("window.stayed = true")
    form = page.locator("form[data-plugin='mammo-cad']")
    form.locator("input[name=operating_point]").fill("1")
    form.locator("button[type=submit]").click()
    page.wait_for_selector(".toast:has-text('started')")
    page.wait_for_selector(".toast.success:has-text('results are ready')", timeout=120000)
    assert page.evaluate("window.stayed") is True                  # told without reloading the page
    page.screenshot(path=str(ARTIFACTS / "desktop-job-done.png"))
    context.close()


def test_a_share_link_opens_one_study_in_a_fresh_browser_and_phones_work(site, browser):
    node, url, studies = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    log_in(page, url)
    open_study(page, url, studies["mammo-cad"])
    page.click("summary:has-text('Share')")
    page.click("#share")
    page.wait_for_selector("#share-url:not([hidden])")
    link = page.input_value("#share-url")
    assert link.startswith(url + "/s/")
    page.wait_for_selector("#shares li.share.open button:has-text('Revoke')")

    phone = browser.new_context(ignore_https_errors=True, viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True, device_scale_factor=2)
    guest = phone.new_page()
    guest.goto(link)
    guest.wait_for_url(f"{url}/studies/{studies['mammo-cad']}")
    guest.wait_for_selector("#overlay g.mark")
    assert guest.locator("#share").count() == 0 and guest.locator("form[data-plugin] button").count() == 0
    guest.screenshot(path=str(ARTIFACTS / "phone-shared-mammogram.png"), full_page=True)
    assert guest.goto(f"{url}/studies").status == 403
    assert guest.goto(f"{url}/studies/{studies['bone-model']}").status == 403
    page.click("#shares li.share.open button:has-text('Revoke')")             # the clinician takes it back
    page.wait_for_selector("#shares li.share.closed")
    assert guest.goto(f"{url}/api/studies/{studies['mammo-cad']}").status == 403        # "withdrawn", not "log in"
    assert guest.goto(link).status == 403
    phone.close()
    context.close()
    token = link.rsplit("/s/", 1)[1]
    assert token not in node.log() and "/s/REDACTED" in node.log()      # links are never written to logs

    phone = browser.new_context(ignore_https_errors=True, viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True)
    page = phone.new_page()
    log_in(page, url)
    open_study(page, url, studies["bone-model"])
    page.wait_for_selector("a:has-text('Open the 3D model')")
    page.click("a:has-text('Open the 3D model')")
    _wait_for_model(page)
    assert page.get_attribute("#scene", "data-level") == "model-phone.x3d"
    page.screenshot(path=str(ARTIFACTS / "phone-bone-model.png"))
    phone.close()


def test_a_scene_with_scripts_in_it_runs_none_of_them(site, browser):
    node, url, studies = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    log_in(page, url)
    open_study(page, url, studies["bone-model"])
    page.locator("form[data-plugin='test-hostile-scene'] button[type=submit]").click()
    wait_for(lambda: node.rows("SELECT id FROM jobs WHERE plugin='test-hostile-scene' AND state='succeeded'"),
             timeout=120, what="the hostile plug-in's job")
    (job,), = node.rows("SELECT id FROM jobs WHERE plugin='test-hostile-scene'")
    page.goto(f"{url}/studies/{studies['bone-model']}/model/{job}")
    _wait_for_model(page)                                   # the square is drawn...
    page.locator("canvas").first.click()
    page.wait_for_timeout(500)
    assert page.evaluate("window.pwned") is None            # ...and nothing in the scene ran
    assert page.evaluate("document.querySelectorAll('#x3d script, #x3d img, #x3d imagetexture').length") == 0
    assert page.evaluate("[...document.querySelectorAll('#x3d *')].flatMap(e => [...e.attributes])"
                         ".filter(a => /^on/i.test(a.name)).length") == 0
    assert not [r for r in requests if "attacker.example" in r]
    context.close()


def _search(page, **fields) -> None:
    for name, value in fields.items():
        page.fill(f"#search input[name={name}]", value)
    with page.expect_response(lambda r: "/api/studies?" in r.url):
        page.click("#search button[type=submit]")
    page.wait_for_selector("#studies tbody tr")


def test_a_search_session_leaves_no_patient_data_in_the_logs(site, browser):
    """Issue 14 item 12: the search sends name, ID and accession number in the query string,
    and the access log wrote them."""
    from urllib.parse import quote, quote_plus

    node, url, studies = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    patients = {plugin: node.rows("SELECT p.patient_name, p.patient_id FROM studies s JOIN patients p "
                                  "ON p.pk = s.patient_pk WHERE s.study_uid=?", (study,))[0]
                for plugin, study in studies.items()}
    used = dict(zip(("name", "id"), patients["mammo-cad"]))             # Phantom^31337, PH031337
    _search(page, **used)
    assert page.locator("#studies tbody tr[data-study]").count() == 1
    page.reload()                                          # the list's own URL carries the search too
    page.wait_for_selector("#studies tbody tr[data-study]")
    page.click("#studies tbody tr[data-study] a")
    page.wait_for_url(re.compile(r".*/studies/[0-9.]+$"))
    page.go_back()
    page.wait_for_selector("#studies tbody tr")
    absent = {"name": "Wrexham^Ottoline", "id": "NX-404-7781", "accession": "ACC77310X"}
    _search(page, **absent)
    assert page.locator("#studies tbody tr[data-study]").count() == 0
    head = patients["bone-model"][0].lower()                              # cranium^example
    _search(page, name=head, id="", accession="")
    assert page.locator("#studies tbody tr[data-study]").count() == 1
    context.close()
    log = node.log().lower()
    assert "/api/studies?" in log                                    # the searches were logged (DEBUG)...
    values = [*used.values(), *absent.values(), head]
    found = [v for v in values if any(form.lower() in log for form in (v, quote(v), quote_plus(v)))]
    assert not found, f"patient data in the node's log: {found}"     # ...without their values


def _post_login(url: str, user: str, password: str) -> int:
    """A login sent by a client other than the browser (an attacker): its HTTP status."""
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    context = ssl._create_unverified_context()
    body = urllib.parse.urlencode({"user": user, "password": password}).encode()
    try:
        with urllib.request.urlopen(f"{url}/login", data=body, context=context, timeout=120) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_locked_account_and_the_search_errors_read_well_on_desktop_and_phone(make_node, browser):
    """The login page under a flood of attempts tells the account's owner what to do; screenshots
    of it and of the search's errors, on a desktop and a 390x844 phone."""
    # one login waiting its turn per account: 2 of the 12 guesses wait out their delays (doubling), not 5
    node = make_node(start=False, viewer={"enabled": True, "port": free_port(), "login_waiting": 1})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    phone = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "is_mobile": True,
             "has_touch": True, "device_scale_factor": 2}
    for device, options in (("desktop", DESKTOP), ("phone", phone)):
        context = browser.new_context(**options)
        page = context.new_page()
        logins = node.rows("SELECT COUNT(*) FROM audit WHERE action='login'")[0][0]
        page.goto(f"{url}/login")
        page.fill("input[name=user]", "admin")
        page.fill("input[name=password]", "not the password")
        page.click("button[type=submit]")
        page.wait_for_selector("p.error")
        assert "Wrong user name or password." in page.inner_text("p.error")
        page.screenshot(path=str(ARTIFACTS / f"{device}-login-wrong.png"))
        # someone floods the account with guesses, and meanwhile its owner logs in
        with ThreadPoolExecutor(12) as pool:
            guesses = [pool.submit(_post_login, url, "admin", "a guess") for _ in range(12)]
            wait_for(lambda: node.rows("SELECT COUNT(*) FROM audit WHERE action='login'")[0][0] >= logins + 10,
                     what="the guesses that are turned away")     # the rest are in flight now
            page.fill("input[name=user]", "admin")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("p.error")
            message = page.inner_text("p.error")
            assert "locked for a moment" in message and "Wait a minute, then log in again" in message
            page.screenshot(path=str(ARTIFACTS / f"{device}-login-locked.png"))
            assert sorted(g.result(timeout=120) for g in guesses) == [401] * 2 + [429] * 10
        page.fill("input[name=user]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")                   # waits the delay the guesses earned, then works
        page.wait_for_url(re.compile(r".*/studies$"), timeout=30000)
        page.fill("#search input[name=name]", "x" * 129)
        page.click("#search button[type=submit]")
        page.wait_for_selector(".toast.error")
        assert "at most 128 characters" in page.inner_text(".toast.error")
        page.screenshot(path=str(ARTIFACTS / f"{device}-search-error.png"))
        context.close()
