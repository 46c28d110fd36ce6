"""The study page as a radiologist reads it, in a real browser (Debian's chromium, Playwright), on a
1280x860 desktop and a 390x844 phone.

A node receives phantom screening mammograms over DICOM TLS (`python -m gpu_workers.mammo.phantom`:
four views, one with its right CC stored mirrored), and runs the CAD on those a rule names:
one examination with calcification clusters, a normal one, an image the CAD cannot read (no pixel
spacing); a normal full-field image and a CT stack (Debian's real CT head) arrive without a rule.
Then: the four-view hanging with the CAD's marks, one view full size on a click, what the CAD says
about each image (not run, running, found nothing, failed: never "no findings" for the first and
the last), the report as a findings table that scrolls, the links in the image area, the corner
annotations, the window preset that says "custom", slices on the wheel and a swipe, the
shortcuts, the forms, the share panel, and no page wider than a phone. Screenshots go to
test-artifacts/study-*.png.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import cranium
from gpu_workers.mammo import phantom
from helpers import free_port, wait_for
from test_viewer_browser import ARTIFACTS, DESKTOP, PASSWORD, browser, log_in, pixels  # noqa: F401 (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.interop]
PHONE = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}
CAD_AE = "SCREENING"                 # the rule runs the CAD on what this AE sends


def _exam(out: Path, seed: int, *extra: str) -> list[Path]:
    assert phantom.main(["--out", str(out), "--seed", str(seed), "--quiet", *extra]) == 0
    return sorted(out.glob("*.dcm"))


def _mirror(path: Path) -> None:
    """Store a right view as some modalities do: chest wall on the left (Patient Orientation A\\L)."""
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.PatientOrientation = ["A", ds.PatientOrientation[1]]
    ds.save_as(path, enforce_file_format=True)


def _without_spacing(path: Path) -> None:
    ds = pydicom.dcmread(path)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelSpacingCalibrationType",
                    "PixelSpacingCalibrationDescription"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = "Nospacing^Ann", "NOSPACING", pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(path, enforce_file_format=True)


def build_site(work: Path, pki: Path):
    """(node, url, studies by name): screening (clusters, RCC mirrored), normal, nospacing (the CAD
    fails), notrun (full-field, normal, no rule), ct (27 slices of the CT head and its bone model)."""
    from helpers import Node

    node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port()},
                router={"rules": [{"name": "screening-cad", "match": {"Modality": "MG", "CallingAETitle": CAD_AE},
                                   "plugin": "mammo-cad", "quiet_seconds": 1},
                                  {"name": "head", "match": {"Modality": "CT", "BodyPartExamined": "HEAD"},
                                   "plugin": "bone-model", "quiet_seconds": 1,
                                   "params": {"triangles": 20000, "phone_triangles": 5000}}]})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    screening = _exam(work / "screening", 100, "--clusters", "2", "--isolated", "1", "--density", "scattered")
    _mirror(next(p for p in screening if p.name.endswith("_RCC.dcm")))
    normal = _exam(work / "normal", 200, "--no-calcifications", "--density", "scattered")   # no false cluster either
    (odd,) = _exam(work / "odd", 400, "--view", "LCC", "--no-calcifications")
    _without_spacing(odd)
    (full,) = _exam(work / "full", 300, "--view", "LCC", "--no-calcifications", "--full-field")
    volume, spacing = cranium.load()
    ct = cranium.write_series(work / "ct", volume[::4], (spacing[0], spacing[1], spacing[2] * 4))
    node.storescu(*screening, *normal, odd, aet=CAD_AE)
    node.storescu(full, *ct)
    wait_for(lambda: node.rows("SELECT COUNT(*) FROM jobs WHERE state IN ('succeeded', 'failed')")[0][0] == 10,
             timeout=400, what="the CAD on nine mammograms and the CT's bone model")
    uids = {}
    for name, path in (("screening", screening[0]), ("normal", normal[0]), ("nospacing", odd), ("notrun", full),
                       ("ct", ct[0])):
        uids[name] = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return node, f"https://127.0.0.1:{node.settings['viewer']['port']}", uids


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki):
    node, url, studies = build_site(tmp_path_factory.mktemp("study-browser"), pki)
    ARTIFACTS.mkdir(exist_ok=True)
    yield node, url, studies
    node.stop()


VIEWS = ("RCC", "LCC", "RMLO", "LMLO")


def open_page(browser, url: str, device: str = "desktop", **options):
    """A logged-in page; its `errors` collects script errors and CSP refusals."""
    context = browser.new_context(**(DESKTOP if device == "desktop" else PHONE), **options)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if "Content Security Policy" in m.text else None)
    log_in(page, url)
    return context, page


def loaded(page, selector: str, count: int = 1) -> None:
    """Wait until `count` images match `selector`, each rendered by the server and decoded; when they do not
    come, say what the page had (the four-view hanging once timed out in CI, with nothing to tell why)."""
    try:
        page.wait_for_function("([selector, count]) => { const found = [...document.querySelectorAll(selector)]; "
                               "return found.length === count && found.every((i) => i.src.includes('/render') && "
                               "i.complete && i.naturalWidth > 0); }", arg=[selector, count], timeout=90000)
    except PlaywrightTimeout:
        state = page.evaluate("(selector) => [...document.querySelectorAll(selector)].map((i) => "
                              "[i.src.slice(-80), i.complete, i.naturalWidth])", selector)
        raise AssertionError(f"{selector}: {count} images expected, the page has {state}; "
                             f"script errors {page.errors}") from None


def open_study(page, url: str, study: str, hanging: bool = False) -> None:
    page.goto(f"{url}/studies/{study}")
    if hanging:
        loaded(page, ".view-panel .view-box img", 4)
    else:
        loaded(page, "#viewport:not([hidden]) #image")
    page.wait_for_timeout(200)


def api(page, path: str):
    return page.evaluate("(path) => fetch(path).then((r) => r.json())", path)


def marks_by_view(page, study: str) -> dict[str, int]:
    """The CAD's marks on each view (clusters and isolated calcifications), as findings.json says."""
    detail, findings = api(page, f"/api/studies/{study}"), api(page, f"/api/studies/{study}/findings")
    out = {}
    for series in detail["series"]:
        key = f"{series.get('laterality', '')}{series.get('view', '')}"
        if not series["result"] and key in VIEWS:
            found = findings.get(series["instances"][0]["sop_instance_uid"], {"clusters": [], "calcifications": []})
            out[key] = len(found["clusters"]) + len([c for c in found["calcifications"] if not c["cluster_id"]])
    return out


def inside_window(page, selector: str) -> bool:
    return page.evaluate("(s) => { const r = document.querySelector(s).getBoundingClientRect(); "
                         "return r.height > 0 && r.top >= -1 && r.bottom <= innerHeight + 1 && r.left >= -1 && "
                         "r.right <= innerWidth + 1; }", selector)


def test_the_four_views_hang_side_by_side_with_the_cads_marks_and_open_full_size(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url)
    open_study(page, url, studies["screening"], hanging=True)
    panels = {view: page.locator(f".view-panel[data-view={view}]") for view in VIEWS}
    boxes = {view: panel.bounding_box() for view, panel in panels.items()}
    assert boxes["RCC"]["x"] < boxes["LCC"]["x"] and abs(boxes["RCC"]["y"] - boxes["LCC"]["y"]) < 2
    assert boxes["RMLO"]["x"] < boxes["LMLO"]["x"] and boxes["RMLO"]["y"] > boxes["RCC"]["y"] + 50
    expected = marks_by_view(page, studies["screening"])
    assert sum(expected.values()) >= 4
    for view, panel in panels.items():
        assert panel.locator("svg g.mark").count() == expected[view], view
    # mirrored so that the chest walls meet: the right CC, stored the other way round, is turned back
    assert [panels[v].get_attribute("data-flip") for v in VIEWS] == ["yes", "no", "no", "no"]
    for view in VIEWS:
        grey = pixels(panels[view].locator(".view-box").screenshot()).mean(axis=2)
        band = grey[int(grey.shape[0] * 0.2):int(grey.shape[0] * 0.8)]           # clear of the corner texts
        edge = max(3, band.shape[1] // 25)
        inner, outer = (band[:, -edge:], band[:, :edge]) if view[0] == "R" else (band[:, :edge], band[:, -edge:])
        assert inner.mean() > outer.mean() + 25, (view, inner.mean(), outer.mean())
    assert "No findings on this image" not in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-hanging.png"))

    panels["RCC"].click()                                              # one view full size
    loaded(page, "#viewport:not([hidden]) #image")
    assert page.locator("#hanging").is_hidden() and page.locator("#to-hanging").is_visible()
    assert page.locator("#overlay g.mark").count() == expected["RCC"]
    assert page.locator("#findings li.finding").count() == expected["RCC"]
    assert page.get_attribute("#viewport", "data-flip") == "yes"
    assert "MG R CC" in page.inner_text("#viewport .corner.tr")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-view-full.png"))
    page.keyboard.press("Escape")                                      # back to the four
    page.wait_for_selector("#hanging:not([hidden])")
    page.focus(".view-panel[data-view=LMLO]")
    page.keyboard.press("Enter")
    loaded(page, "#viewport:not([hidden]) #image")
    assert "MG L MLO" in page.inner_text("#viewport .corner.tr")
    fitted = int(page.get_attribute("#viewport", "data-zoom"))
    page.focus("#findings li.finding button")                           # Enter on a focused finding selects it
    page.keyboard.press("Enter")
    page.wait_for_selector("#overlay g.mark.selected")
    assert int(page.get_attribute("#viewport", "data-zoom")) > fitted
    assert page.locator("#findings li.finding.selected").count() == 1
    labels = page.locator(".series-item .series-label").all_inner_texts()
    assert {"MG R CC", "MG L CC", "MG R MLO", "MG L MLO", "4 views"} <= set(labels)
    results = page.locator(".series-item.result small").all_inner_texts()
    assert len(results) == 8 and all(re.match(r"from MG [RL] (CC|MLO)", text) for text in results)
    assert not page.errors, page.errors
    context.close()


def test_the_cad_says_not_run_running_found_nothing_or_failed_never_just_no_findings(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url)
    open_study(page, url, studies["normal"], hanging=True)
    page.wait_for_selector(".view-panel .view-state.nothing-found")
    assert page.locator(".view-panel .view-state.nothing-found").count() == 4
    assert page.locator("#cad-state .cad[data-state=nothing-found]").count() == 4
    assert "Found nothing" in page.inner_text("#cad-state")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-normal.png"))

    open_study(page, url, studies["nospacing"])
    failed = page.locator("#cad-state .cad[data-state=failed]")
    failed.wait_for()
    text = failed.inner_text()
    assert "Failed" in text and "the image has no Imager Pixel Spacing or Pixel Spacing" in text
    assert "PluginError" not in text and "attempt 1" not in text and "No findings" not in page.inner_text("main")
    failed.locator("summary").click()                                 # the technical text, apart
    assert "PluginError" in failed.locator(".technical small").inner_text()
    assert page.locator("#findings li.finding").count() == 0
    page.screenshot(path=str(ARTIFACTS / "study-desktop-failed.png"))

    open_study(page, url, studies["notrun"])
    page.wait_for_selector("#cad-state .cad[data-state=not-run]")
    assert "Not run yet" in page.inner_text("#cad-state") and "No findings" not in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-not-run.png"))
    page.click("form[data-plugin=mammo-cad] button[type=submit]")
    page.wait_for_selector("#cad-state .cad[data-state=running]", timeout=120000)
    assert "Running" in page.inner_text("#cad-state")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-running.png"))
    page.wait_for_selector("#cad-state .cad[data-state=nothing-found]", timeout=300000)
    assert "Found nothing" in page.inner_text("#cad-state")
    assert not page.errors, page.errors
    context.close()

    context, phone = open_page(browser, url, "phone")
    open_study(phone, url, studies["nospacing"])
    phone.wait_for_selector("#cad-state .cad[data-state=failed]")
    phone.locator("#cad-state").scroll_into_view_if_needed()
    phone.screenshot(path=str(ARTIFACTS / "study-phone-failed.png"))
    open_study(phone, url, studies["normal"], hanging=True)
    phone.wait_for_selector(".view-panel .view-state.nothing-found")
    phone.screenshot(path=str(ARTIFACTS / "study-phone-normal.png"))
    context.close()


def _report(page, url: str, study: str, source: str) -> None:
    open_study(page, url, study, hanging=True)
    page.locator(f".series-item.result[data-label$=report]:has-text('from {source}')").click()
    page.wait_for_selector("#document:not([hidden]) .report-findings tbody tr")
    page.click(".report-tree summary")                                 # the whole content tree too


def _scroll_top(page) -> float:
    return page.evaluate("document.getElementById('document').scrollTop")


def test_the_report_is_a_findings_table_that_scrolls_and_opens_its_image(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url, accept_downloads=True)
    _report(page, url, studies["screening"], "MG R CC")
    expected = marks_by_view(page, studies["screening"])["RCC"]
    rows = page.locator(".report-findings tbody tr")
    assert rows.count() == expected
    assert page.locator(".report-findings thead th").all_inner_texts() == ["Id", "Finding", "Calcifications", "Score",
                                                                           "Where"]
    first = rows.first.inner_text()
    assert re.search(r"C\d", first) and "Calcification cluster" in first and "%" in first and "MG R CC" in first
    height, client = page.evaluate("[document.getElementById('document').scrollHeight, "
                                   "document.getElementById('document').clientHeight]")
    assert height > client + 200                                       # more than one screen: it must scroll
    box = page.locator("#document").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, 500)                                           # the wheel
    wait_for(lambda: _scroll_top(page) > 100, timeout=5, what="the report to scroll on the wheel")
    page.focus("#document")
    page.keyboard.press("End")                                         # the keys
    wait_for(lambda: _scroll_top(page) >= height - client - 5, timeout=10, what="End to reach the report's end")
    page.wait_for_timeout(300)                                         # the end of the scroll's animation
    page.keyboard.press("Home")
    wait_for(lambda: _scroll_top(page) < 5, timeout=10, what="Home to go back up")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-report.png"))
    with page.expect_download() as download:                           # a mouse click on a link in the image area
        page.click("#document a:has-text('Download the DICOM object')")
    assert download.value.suggested_filename.endswith(".dcm")
    page.locator(".report-findings button.link").first.click()         # a row opens its image at the finding
    loaded(page, "#viewport:not([hidden]) #image")
    page.wait_for_selector("#overlay g.mark.selected")
    assert "MG R CC" in page.inner_text("#viewport .corner.tr")
    assert int(page.get_attribute("#viewport", "data-zoom")) > 100
    assert not page.errors, page.errors
    context.close()

    context, phone = open_page(browser, url, "phone")
    _report(phone, url, studies["screening"], "MG L CC")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    box = phone.locator("#document").bounding_box()
    cdp = context.new_cdp_session(phone)                                # a swipe up on the report
    cdp.send("Input.synthesizeScrollGesture", {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] * 0.7,
                                               "yDistance": -300, "gestureSourceType": "touch", "speed": 800})
    wait_for(lambda: _scroll_top(phone) > 50, timeout=5, what="the report to scroll on a swipe")
    phone.evaluate("document.getElementById('document').scrollTop = 0")
    assert _small_targets(phone) == []
    phone.screenshot(path=str(ARTIFACTS / "study-phone-report.png"))
    context.close()


def test_links_in_the_image_area_answer_a_click_and_the_model_zooms_with_the_wheel(site, browser):
    from test_viewer_browser import _drawn, _wait_for_model

    node, url, studies = site
    context, page = open_page(browser, url)
    open_study(page, url, studies["ct"])
    page.locator(".series-item.result[data-label$='3D model']").click()
    link = page.locator("#document a:has-text('Open the 3D model')")
    box = link.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)     # a plain mouse click
    page.wait_for_url(re.compile(r".*/model/[0-9a-f]{16}$"))
    _wait_for_model(page)
    before = _drawn(page)
    canvas = page.locator("canvas").first.bounding_box()
    page.mouse.move(canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, -100)                                    # up: closer
        page.wait_for_timeout(100)
    wait_for(lambda: _drawn(page) > before * 1.5, timeout=10, what="the model to come closer on the wheel")
    assert page.evaluate("window.scrollY") == 0                      # and the page did not scroll instead
    page.screenshot(path=str(ARTIFACTS / "study-desktop-model-zoomed.png"))
    assert not page.errors, page.errors
    context.close()


def test_a_ct_steps_with_the_wheel_zooms_with_ctrl_and_says_where_it_is(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url)
    open_study(page, url, studies["ct"])
    corner = lambda c: page.inner_text(f"#viewport .corner.{c}")     # noqa: E731
    assert "Cranium, Example" in corner("tl") and "CRANIUM" in corner("tl") and "2012" in corner("tl")
    assert "CT 1" in corner("tr") and "Image 1 / 27" in corner("tr")
    assert "WC 400" in corner("bl") and "WW 2000" in corner("bl") and "Zoom" in corner("br")
    zoom = page.get_attribute("#viewport", "data-zoom")
    box = page.locator("#viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(3):
        page.mouse.wheel(0, 100)                                     # the wheel: the next slices
        page.wait_for_timeout(150)
    page.wait_for_function("() => document.getElementById('slice-info').textContent === '4 / 27'")
    wait_for(lambda: "Image 4 / 27" in corner("tr"), timeout=10, what="the corner to follow the slice")
    assert page.get_attribute("#viewport", "data-zoom") == zoom
    page.keyboard.down("Control")                                    # Ctrl+wheel (a trackpad's pinch): zoom
    page.mouse.wheel(0, -200)
    page.keyboard.up("Control")
    wait_for(lambda: int(page.get_attribute("#viewport", "data-zoom")) > int(zoom), timeout=5, what="a zoom")
    assert page.inner_text("#slice-info") == "4 / 27" and f"Zoom {page.get_attribute('#viewport', 'data-zoom')}%" \
        in corner("br")
    page.click("[data-tool=window]")                                  # a drag makes the window "custom"
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 260, box["y"] + 230, steps=5)
    page.mouse.up()
    assert page.input_value("#preset") == "custom"
    assert page.locator("#preset option:checked").inner_text() == "Custom" and "(custom)" in corner("bl")
    page.focus("#viewport")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("() => document.getElementById('slice-info').textContent === '5 / 27'")
    page.keyboard.press("?")                                          # the shortcuts
    page.wait_for_selector("#shortcuts[open]")
    assert "Ctrl + wheel" in page.inner_text("#shortcuts") and "Esc" in page.inner_text("#shortcuts")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-shortcuts.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#shortcuts:not([open])", state="attached")
    page.screenshot(path=str(ARTIFACTS / "study-desktop-ct.png"))
    assert not page.errors, page.errors
    context.close()


def _swipe(cdp, x: float, y: float, dy: float, steps: int = 12) -> None:
    """One finger on the screen, moved dy pixels (negative: up), as a phone sends it."""
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for k in range(1, steps + 1):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y + dy * k / steps}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _pinch(cdp, x: float, y: float, start: float, end: float, steps: int = 12) -> None:
    """Two fingers on the screen, their distance going from `start` to `end` pixels."""
    def fingers(distance: float) -> list[dict]:
        return [{"x": x - distance / 2, "y": y, "id": 0}, {"x": x + distance / 2, "y": y, "id": 1}]

    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": fingers(start)})
    for k in range(1, steps + 1):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": fingers(start + (end - start) * k / steps)})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _small_targets(page) -> list[str]:
    """What a finger must hit in the page's main part and is smaller than 44 x 44 px."""
    return page.evaluate("""() => [...document.querySelectorAll(
        "main a, main button, main select, main input:not([type=hidden]), main summary, main [role=button], main [tabindex='0']")]
      .map((e) => [e, e.matches("input[type=checkbox]") ? e.closest("label") || e : e])
      .filter(([, t]) => { const r = t.getBoundingClientRect(); return r.width > 0 && r.height > 0; })
      .filter(([, t]) => { const r = t.getBoundingClientRect(); return r.width < 43.5 || r.height < 43.5; })
      .map(([e, t]) => `${e.tagName} ${e.id || e.className || e.textContent.trim().slice(0, 20)} ` +
           `${Math.round(t.getBoundingClientRect().width)}x${Math.round(t.getBoundingClientRect().height)}`)""")


def test_on_a_phone_nothing_is_wider_than_the_screen_and_the_image_stays_in_sight(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url, "phone")
    for name in ("screening", "normal", "nospacing", "notrun", "ct"):
        open_study(page, url, studies[name], hanging=name in ("screening", "normal"))
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, name
        assert _small_targets(page) == [], name
    open_study(page, url, studies["ct"])                              # the image and the slice control, unscrolled
    assert inside_window(page, "#viewport") and inside_window(page, "#slice")
    page.screenshot(path=str(ARTIFACTS / "study-phone-ct.png"))
    box = page.locator("#viewport").bounding_box()
    cdp = context.new_cdp_session(page)
    _swipe(cdp, box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.7, -150)     # a swipe up: on
    page.wait_for_function("() => Number(document.getElementById('slice').value) >= 3")
    assert page.evaluate("window.scrollY") == 0
    zoom = int(page.get_attribute("#viewport", "data-zoom"))
    _pinch(cdp, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 80, 240)     # two fingers apart: zoom
    wait_for(lambda: int(page.get_attribute("#viewport", "data-zoom")) > zoom * 2, timeout=5, what="a pinch to zoom")

    open_study(page, url, studies["screening"], hanging=True)
    assert inside_window(page, "#hanging")
    page.screenshot(path=str(ARTIFACTS / "study-phone-hanging.png"))
    finding = page.locator("#findings li.finding").nth(2)
    finding.scroll_into_view_if_needed()
    assert not inside_window(page, "#hanging")                       # the reader scrolled down to the list...
    finding.locator("button").tap()
    loaded(page, "#viewport:not([hidden]) #image")
    page.wait_for_selector("#overlay g.mark.selected")
    page.wait_for_timeout(300)
    assert inside_window(page, "#viewport")                           # ...and the image is back in sight
    page.screenshot(path=str(ARTIFACTS / "study-phone-finding.png"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert not page.errors, page.errors
    context.close()


def test_the_share_panel_opens_in_sight_and_copies_its_link(site, browser):
    node, url, studies = site
    for device in ("desktop", "phone"):
        context, page = open_page(browser, url, device, permissions=["clipboard-read", "clipboard-write"])
        open_study(page, url, studies["screening"], hanging=True)
        page.click("summary:has-text('Share')")
        assert inside_window(page, ".share-body") and page.locator("#share").is_visible()
        page.click("#share")
        page.wait_for_selector("#share-url:not([hidden])")
        link = page.input_value("#share-url")
        assert link.startswith(f"{url}/s/") and inside_window(page, "#share-copy")
        page.click("#share-copy")
        page.wait_for_selector(".toast:has-text('copied')")
        assert page.evaluate("navigator.clipboard.readText()") == link
        page.screenshot(path=str(ARTIFACTS / f"study-{device}-share.png"))
        assert page.evaluate("document.documentElement.scrollWidth") <= (1280 if device == "desktop" else 390)
        context.close()


def test_plugin_forms_speak_in_labels_an_empty_field_is_the_default_and_a_guest_has_none(site, browser):
    node, url, studies = site
    context, page = open_page(browser, url)
    open_study(page, url, studies["nospacing"])
    form = page.locator("form[data-plugin=mammo-cad]")
    text = form.inner_text()
    assert "False positives per image" in text and "False-positive clusters expected per image" in text
    assert "operating_point" not in text and "min_cluster_size" not in text
    before = node.rows("SELECT COUNT(*) FROM jobs WHERE plugin='mammo-cad' AND created_by='admin'")[0][0]
    form.locator("input[name=operating_point]").fill("")
    form.locator("button[type=submit]").click()
    page.wait_for_selector(".toast:has-text('started')")
    assert page.locator(".toast.error").count() == 0
    params = node.rows("SELECT params FROM jobs WHERE plugin='mammo-cad' AND created_by='admin' "
                       "ORDER BY created_at DESC LIMIT 1")[0][0]
    assert node.rows("SELECT COUNT(*) FROM jobs WHERE plugin='mammo-cad' AND created_by='admin'")[0][0] == before + 1
    assert '"operating_point": 0.5' in params                          # the default, not "0.0 is outside 0.1..4.0"
    page.screenshot(path=str(ARTIFACTS / "study-desktop-form.png"))
    link = page.evaluate("(study) => fetch(`/api/studies/${study}/share`, {method: 'POST', headers: {'Content-Type': "
                         "'application/json', 'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content},"
                         " body: '{}'}).then((r) => r.json()).then((a) => a.url)", studies["nospacing"])
    context.close()
    guest = browser.new_context(**PHONE)
    shared = guest.new_page()
    shared.goto(link)
    loaded(shared, "#viewport:not([hidden]) #image")
    shared.wait_for_selector("#cad-state .cad")
    assert shared.locator("form.plugin").count() == 0 and shared.locator("#plugins").inner_text().strip() == ""
    assert shared.locator("summary:has-text('Share')").count() == 0
    shared.screenshot(path=str(ARTIFACTS / "study-phone-guest.png"))
    guest.close()
