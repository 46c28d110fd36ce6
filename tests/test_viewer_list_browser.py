"""The study list, uploads, login and a closed share link in a real browser (Debian's chromium,
driven by Playwright), on a desktop (1280x860) and a 390x844 phone.

Phantom mammograms (the generator's command line) and CT_small copies arrive over DICOM TLS; a
clinician reads the list (names and dates as people write them, newest first, sorting), sees a
study arrive while the list is open, uploads, and a guest opens a link that was revoked.
Screenshots go to test-artifacts/ (list-*.png).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pydicom
import pytest

from helpers import ROOT, data_file, free_port, synthetic_instances, wait_for
from test_viewer_browser import ARTIFACTS, DESKTOP, PASSWORD, browser, log_in  # noqa: F401  (browser: a fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.interop]
PHONE = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}
TODAY = time.strftime("%Y%m%d")
# what the phone must not be wider than, and what a finger needs (WCAG 2.5.5: 44 CSS px)
PHONE_WIDTH, TAP = 390, 44


def ct_study(directory, count: int, patient: str, patient_id: str, date: str, time_of_day: str = "") -> list:
    paths = synthetic_instances(directory, count, patient=patient, patient_id=patient_id)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyDate, ds.StudyTime = date, time_of_day
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def list_site(tmp_path_factory, pki):
    """A node with its viewer (no plug-ins): two phantom screening studies, a CT of today and an old CT."""
    from helpers import Node

    work = tmp_path_factory.mktemp("list")
    node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port()})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    subprocess.run([sys.executable, "-m", "gpu_workers.mammo.phantom", "--out", str(work / "mg"), "--n", "2",
                    "--seed", "4240", "--view", "LCC,RCC", "--quiet"], cwd=ROOT, check=True, timeout=300)
    node.storescu(*sorted((work / "mg").rglob("*.dcm")),
                  *ct_study(work / "today", 2, "Cranium^Anna^^Dr", "CT-TODAY", TODAY, "0815"),
                  *ct_study(work / "old", 1, "Zed^Old", "CT-OLD", "19991231"))
    url = f"https://127.0.0.1:{node.settings['viewer']['port']}"
    ARTIFACTS.mkdir(exist_ok=True)
    yield node, url, work
    node.stop()


def rows(page) -> list[dict]:
    """The list as it is shown: each study's cells, by class."""
    return page.evaluate("""[...document.querySelectorAll('#studies tbody tr[data-study]')].map((tr) => ({
        uid: tr.dataset.study, name: tr.querySelector('td.patient').innerText.trim(),
        id: tr.querySelector('td.pid').innerText.trim(), date: tr.querySelector('td.date').innerText.trim(),
        images: tr.querySelector('td.images').innerText.trim()}))""")


def wider_than_the_screen(page) -> list[str]:
    """What sticks out past the right edge of the viewport (the page, or any visible element)."""
    return page.evaluate("""(width) => {
        const out = [];
        if (document.documentElement.scrollWidth > width) out.push(`page ${document.documentElement.scrollWidth}px`);
        for (const e of document.querySelectorAll('body *')) {
            const r = e.getBoundingClientRect();
            if (r.width && r.height && r.right > width + 0.5 && getComputedStyle(e).position !== 'fixed')
                out.push(`${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}.${e.className} right=${Math.round(r.right)}`);
        }
        return out;
    }""", PHONE_WIDTH)


def small_targets(page) -> list[str]:
    """Visible links, buttons, fields and toggles smaller than a finger (44 px high)."""
    return page.evaluate("""(tap) => [...document.querySelectorAll('a, button, input, select, summary')]
        .filter((e) => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0
                         && getComputedStyle(e).visibility !== 'hidden' && e.type !== 'hidden'; })
        .filter((e) => e.getBoundingClientRect().height < tap - 0.5)
        .map((e) => `${e.tagName.toLowerCase()} "${(e.innerText || e.name || '').trim().slice(0, 30)}" `
                    + `${Math.round(e.getBoundingClientRect().height)}px`)""", TAP)


def test_names_and_dates_read_as_people_write_them_newest_first_and_every_column_sorts(list_site, browser):
    node, url, _ = list_site
    context = browser.new_context(**DESKTOP, locale="en-GB")
    page = context.new_page()
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    shown = rows(page)
    assert [r["id"] for r in shown] == ["CT-TODAY", "PH004244", "PH004240", "CT-OLD"]        # newest first
    by_id = {r["id"]: r for r in shown}
    assert by_id["PH004240"]["name"] == "Phantom, 4240" and by_id["CT-TODAY"]["name"] == "Cranium, Dr Anna"
    stored = node.rows("SELECT s.study_date FROM studies s JOIN patients p ON s.patient_pk = p.pk "
                       "WHERE p.patient_id = 'CT-TODAY'")[0][0]

    def when() -> str:     # the suite may cross midnight
        return "today" if stored == time.strftime("%Y%m%d") else "yesterday"

    assert by_id["CT-TODAY"]["date"] == f"{when()} 08:15"                   # en-GB: 24-hour clock
    assert by_id["PH004240"]["date"] == "1 Jan 2026" and by_id["CT-OLD"]["date"] == "31 Dec 1999"
    assert by_id["PH004240"]["images"] == "2" and by_id["CT-TODAY"]["images"] == "2"
    assert page.get_attribute("th[data-sort=date]", "aria-sort") == "descending"
    page.screenshot(path=str(ARTIFACTS / "list-desktop.png"))

    def sort(column: str) -> list[str]:
        with page.expect_response(lambda r: "/api/studies?" in r.url and f"sort={column}" in r.url):
            page.click(f"th[data-sort={column}] button")
        page.wait_for_timeout(100)
        return [r["id"] for r in rows(page)]

    assert sort("name") == ["CT-TODAY", "PH004240", "PH004244", "CT-OLD"]               # Cranium, Phantom, Zed
    assert page.get_attribute("th[data-sort=name]", "aria-sort") == "ascending"
    assert sort("name") == ["CT-OLD", "PH004244", "PH004240", "CT-TODAY"]               # again: Z to A
    assert page.get_attribute("th[data-sort=name]", "aria-sort") == "descending"
    assert sort("id") == ["CT-OLD", "CT-TODAY", "PH004240", "PH004244"]
    assert sort("date") == ["CT-TODAY", "PH004244", "PH004240", "CT-OLD"]
    assert sort("date") == ["CT-OLD", "PH004240", "PH004244", "CT-TODAY"]
    assert sort("images")[-1] == "CT-OLD"                                              # most images first
    page.reload()                                                # the order is in the list's own address
    page.wait_for_selector("#studies tbody tr[data-study]")
    assert page.get_attribute("th[data-sort=images]", "aria-sort") == "descending"

    us = browser.new_context(**DESKTOP, locale="en-US")           # another reader, another locale
    other = us.new_page()
    log_in(other, url)
    other.wait_for_selector("#studies tbody tr[data-study]")
    dates = {r["id"]: r["date"] for r in rows(other)}
    clock = other.evaluate("new Intl.DateTimeFormat(undefined, { timeStyle: 'short' }).format(new Date(2000, 0, 1, 8, 15))")
    assert dates["PH004240"] == "Jan 1, 2026" and dates["CT-TODAY"] == f"{when()} {clock}" and "AM" in clock
    us.close()
    context.close()


def test_a_study_that_arrives_while_the_list_is_open_appears(list_site, browser, tmp_path):
    node, url, _ = list_site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    page.evaluate("window.stayed = true")
    before = len(rows(page))
    node.storescu(*ct_study(tmp_path / "new", 3, "Newcomer^Nina", "CT-NEW", TODAY, "2359"))
    page.wait_for_selector("#studies tbody tr[data-study] td.pid:text-is('CT-NEW')", timeout=15000)
    assert page.evaluate("window.stayed") is True                         # no reload, no new search
    shown = rows(page)
    assert len(shown) == before + 1 and shown[0]["id"] == "CT-NEW" and shown[0]["name"] == "Newcomer, Nina"
    assert page.locator("#studies tbody tr.fresh").count() == 1             # and it is marked as new
    page.screenshot(path=str(ARTIFACTS / "list-desktop-arrived.png"))

    page.fill("#search input[name=name]", "phantom")                       # a search that leaves it out
    with page.expect_response(lambda r: "/api/studies?" in r.url):
        page.click("#search button[type=submit]")
    node.storescu(*ct_study(tmp_path / "late", 1, "Latecomer^Leo", "CT-LATE", TODAY, "2359"))
    page.wait_for_selector("#arrived:not([hidden])", timeout=15000)
    assert "1 new study has arrived that this search or page does not show" in page.inner_text("#arrived")
    page.screenshot(path=str(ARTIFACTS / "list-desktop-arrived-elsewhere.png"))
    page.click("#arrived button:has-text('Show the newest')")
    page.wait_for_selector("#studies tbody tr[data-study] td.pid:text-is('CT-LATE')")
    context.close()


def test_an_upload_links_each_study_once_shows_progress_and_an_empty_one_explains_itself(list_site, browser, tmp_path):
    node, url, work = list_site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    page.click("#upload button[type=submit]")                               # nothing chosen
    page.wait_for_selector("#upload-results p.error")
    assert "No files chosen: first choose DICOM files or a zip" in page.inner_text("#upload-results")

    mammogram = sorted((work / "mg").rglob("*.dcm"))[0]                       # already stored: an older study
    new = ct_study(tmp_path / "up", 2, "Uploaded^Una", "UP-1", "20260102", "1000")
    page.evaluate("""() => { window.said = []; new MutationObserver(() => window.said.push(
        document.getElementById('upload-text').textContent)).observe(document.getElementById('upload-text'),
        { childList: true, characterData: true, subtree: true }); }""")
    page.set_input_files("#upload input[type=file]", [str(mammogram), *map(str, new), str(data_file("CT_small.dcm"))])
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#upload-results .uploaded-study")
    links = page.evaluate("[...document.querySelectorAll('#upload-results .uploaded-study a')]"
                          ".map((a) => [a.getAttribute('href'), a.innerText])")
    assert len(links) == len({href for href, _ in links}) == 3               # one link per study touched
    assert links[0][1] == "Open Uploaded, Una"                               # what it stored into, first
    texts = page.evaluate("[...document.querySelectorAll('#upload-results .uploaded-study')].map((e) => e.innerText)")
    assert "2 stored" in texts[0] and any("1 already here" in t for t in texts[1:])
    assert any(t.startswith("Sending") for t in page.evaluate("window.said"))   # progress was shown
    page.screenshot(path=str(ARTIFACTS / "list-desktop-uploaded.png"))
    page.click("#upload-results .uploaded-study a >> nth=0")
    page.wait_for_url(re.compile(r".*/studies/[0-9.]+$"))
    assert page.url.endswith(links[0][0])
    context.close()


def test_no_page_is_wider_than_a_phone_and_every_tap_target_fits_a_finger(list_site, browser, tmp_path):
    node, url, _ = list_site
    context = browser.new_context(**PHONE)
    page = context.new_page()
    page.goto(f"{url}/login")
    assert wider_than_the_screen(page) == [] and small_targets(page) == []
    page.screenshot(path=str(ARTIFACTS / "list-phone-login.png"))
    log_in(page, url)
    page.wait_for_selector("#studies tbody tr[data-study]")
    page.wait_for_timeout(300)
    assert wider_than_the_screen(page) == [], wider_than_the_screen(page)
    assert small_targets(page) == [], small_targets(page)
    assert page.locator("#studies thead").is_hidden()                       # cards, not a table
    card = page.locator("#studies tbody tr[data-study]").first.bounding_box()
    assert card["width"] <= PHONE_WIDTH and card["height"] >= TAP
    assert page.locator("#search input[name=name]").is_visible()           # the search folds to the name
    assert page.locator("#search input[name=id]").is_hidden() and page.locator("#upload").is_hidden()
    assert page.evaluate("document.querySelector('#studies').getBoundingClientRect().top") < 844 / 2
    page.screenshot(path=str(ARTIFACTS / "list-phone.png"))
    page.click("#more-toggle")
    assert page.locator("#search input[name=id]").is_visible()
    assert wider_than_the_screen(page) == [] and small_targets(page) == []
    page.click("#upload-box summary")
    assert page.locator("#upload").is_visible() and wider_than_the_screen(page) == []
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#upload-results p.error")
    (long_named,) = ct_study(tmp_path / "phone", 1, "Phone^Upload", "PHONE-1", "20260105")   # a UID as its name
    page.set_input_files("#upload input[type=file]", str(long_named))
    page.click("#upload button[type=submit]")
    page.wait_for_selector("#upload-results .uploaded-study")
    assert wider_than_the_screen(page) == [], wider_than_the_screen(page)
    assert small_targets(page) == [], small_targets(page)
    page.screenshot(path=str(ARTIFACTS / "list-phone-unfolded.png"), full_page=True)
    page.click("#more-toggle")
    page.fill("#search input[name=name]", "phantom")
    page.click("#search button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#studies tbody tr[data-study]').length === 2")
    assert page.evaluate("document.querySelector('#studies').getBoundingClientRect().top") < 844 / 2
    assert page.locator("#search input[name=id]").is_hidden()

    # a guest opens a link that was revoked: a page that says so, as wide as the phone
    study = rows(page)[0]["uid"]
    made = page.evaluate("""async (study) => (await fetch(`/api/studies/${study}/share`, { method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-CSRF-Token':
                   document.querySelector('meta[name=csrf-token]').content }, body: '{"days": 1}' })).json()""", study)
    link = made["url"]
    revoked = page.evaluate("""async (id) => (await fetch(`/api/shares/${id}/revoke`, { method: 'POST',
        headers: { 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content } })).status""",
                            link.rsplit("/s/", 1)[1].split(".")[0])
    assert revoked == 200
    guest = browser.new_context(**PHONE).new_page()
    answer = guest.goto(link)
    assert answer.status == 403 and "text/html" in answer.headers["content-type"]
    assert guest.inner_text("h1") == "This link has been withdrawn"
    assert "ask the person who shared it with you for a new link" in guest.inner_text("main")
    assert guest.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 21, 26)"   # styled
    assert wider_than_the_screen(guest) == [] and small_targets(guest) == []
    guest.screenshot(path=str(ARTIFACTS / "list-phone-link-revoked.png"))
    answer = guest.goto(link[:-3] + ("xyz" if not link.endswith("xyz") else "abc"))   # cut short, altered
    assert answer.status == 403 and guest.inner_text("h1") == "This link is not valid"
    assert wider_than_the_screen(guest) == []
    guest.context.close()
    desktop = browser.new_context(**DESKTOP).new_page()
    desktop.goto(link)
    desktop.screenshot(path=str(ARTIFACTS / "list-desktop-link-revoked.png"))
    desktop.context.close()
    context.close()
