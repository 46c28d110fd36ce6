"""OHIF served by the node at /ohif/ (issue 17), in Debian's chromium driven by Playwright.

One node (its viewer on HTTPS) holds 20 slices of Debian's real CT head, sent over DICOM TLS.
A session (a login or a share link's) is needed to load OHIF; once in, its app renders with
no policy violation and no configuration error, its configuration points at this site's
/dicomweb and it asks /dicomweb/studies for its list; OHIF's pages have their own
Content-Security-Policy and the node's pages keep the strict one. The study page links to
OHIF on a desktop; on a 390x844 phone the study page does not offer it (screenshots in test-artifacts/).

`test_ohif_lists_the_study_and_draws_the_ct_series` needs the DICOMweb API (QIDO, WADO-RS):
it is skipped, saying so, while /dicomweb/studies answers 404 (a branch without the API).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import re
import tarfile

import numpy as np
import pydicom
import pytest
from PIL import Image

import cranium
from helpers import free_port, wait_for
from test_viewer_browser import ARTIFACTS, DESKTOP, PASSWORD, browser  # noqa: F401  (browser: a fixture)
from viewer import ohif
from viewer.app import CSP as NODE_CSP

PHONE = {"ignore_https_errors": True, "viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
         "is_mobile": True, "has_touch": True}
# every policy violation and every message about OHIF's configuration, as the page sees them
WATCH = """document.addEventListener('securitypolicyviolation', e => console.error(
  'CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI + ' at ' + e.sourceFile + ':' + e.lineNumber));"""


def in_browser(test):
    return pytest.mark.browser(pytest.mark.slow(pytest.mark.interop(test)))


@pytest.fixture(scope="module")
def site(tmp_path_factory, pki):
    """A node with its viewer and a CT series (20 slices of the real head) received over DICOM TLS."""
    from helpers import Node

    assert ohif.installed(), "OHIF is not installed in viewer/vendor/ohif: run `make install`"
    work = tmp_path_factory.mktemp("ohif")
    node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port()})
    node.env["M3DICOM_ADMIN_PASSWORD"] = PASSWORD
    node.start()
    volume, spacing = cranium.load()
    files = cranium.write_series(work / "head", volume[40:60], spacing, patient="OHIFHEAD")
    node.storescu(*files)
    wait_for(lambda: len(node.rows("SELECT 1 FROM instances")) == len(files), what="the CT series")
    study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    ARTIFACTS.mkdir(exist_ok=True)
    yield node, f"https://127.0.0.1:{node.settings['viewer']['port']}", study
    node.stop()


class Watched:
    """A page whose policy violations, page errors and configuration complaints are kept, and the
    DICOMweb requests it makes."""

    def __init__(self, chromium, options: dict):
        self.context = context = chromium.new_context(**options)
        context.add_init_script(WATCH)
        self.page = context.new_page()
        self.problems: list[str] = []
        self.dicomweb: list[str] = []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", self._console)
        self.page.on("request", lambda r: self.dicomweb.append(r.url) if "/dicomweb/" in r.url else None)

    def _console(self, message) -> None:
        text = message.text
        if "CSP violation" in text or "Content Security Policy" in text or re.search(r"\bconfig", text, re.I):
            self.problems.append(f"console {message.type}: {text}")


def log_in(page, url: str, landing: str) -> None:
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(landing))


def until(page, predicate, what: str, timeout: float = 30.0):
    """wait_for that lets Playwright deliver the page's events meanwhile (time.sleep would not)."""
    return wait_for(lambda: predicate() or page.wait_for_timeout(200), timeout=timeout, interval=0, what=what)


def wait_for_ohif(page) -> None:
    """OHIF's React root has rendered (not only its empty <div id="root">)."""
    page.wait_for_function("() => document.querySelectorAll('#root *').length > 20", timeout=60000)


@in_browser
def test_ohif_needs_a_session_then_loads_with_its_policy_and_asks_dicomweb(site, browser):
    node, url, study = site
    watched = Watched(browser, DESKTOP)
    page, context = watched.page, watched.context

    for path in ("/ohif/", "/ohif/app-config.js", "/ohif/app.bundle.css", f"/ohif/viewer?StudyInstanceUIDs={study}"):
        answer = context.request.get(url + path, max_redirects=0)     # nothing of OHIF without a session
        assert answer.status == 302 and answer.headers["location"].startswith("/login?next=/ohif/"), (path, answer)
    page.goto(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
    assert "/login?next=" in page.url
    log_in(page, url, rf".*/ohif/viewer\?StudyInstanceUIDs={re.escape(study)}$")   # back where it was going

    page.goto(f"{url}/ohif/")
    wait_for_ohif(page)
    until(page, lambda: any(u.startswith(f"{url}/dicomweb/studies") for u in watched.dicomweb), "OHIF's QIDO request")
    roots = page.evaluate("window.config.dataSources.map(s => [s.configuration.qidoRoot, s.configuration.wadoRoot, "
                          "s.configuration.wadoUriRoot])")
    assert roots == [[f"{url}/dicomweb"] * 3]
    assert page.evaluate("[window.config.routerBasename, window.config.showStudyList, window.PUBLIC_URL]") == \
        ["/ohif", True, "/ohif/"]
    assert page.evaluate("window.crossOriginIsolated")                   # COOP + COEP: SharedArrayBuffer for volumes
    page.screenshot(path=str(ARTIFACTS / "ohif-desktop-study-list.png"))

    document = context.request.get(f"{url}/ohif/viewer")                  # a client-side route: OHIF's page
    script = context.request.get(f"{url}/ohif/" + page.evaluate(
        "[...document.scripts].map(s => s.getAttribute('src')).find(s => /app\\.bundle/.test(s || ''))")[6:])
    assert document.status == script.status == 200 and "<div id=\"root\">" in document.text()
    assert document.headers["content-security-policy"] == ohif.CSP and "'unsafe-eval'" not in ohif.CSP
    assert "'unsafe-inline'" not in ohif.CSP.split("script-src")[1].split(";")[0]
    assert script.headers["content-security-policy"] == ohif.WORKER_CSP           # the decoders' workers
    assert document.headers["cross-origin-embedder-policy"] == "require-corp"
    assert document.headers["cache-control"] == "no-store"
    # the app bundle was changed by the install (paths, mends): its hashed name may have named other content
    # in an earlier install, so it is revalidated; a chunk the install left as it was is kept for a year
    assert script.headers["cache-control"] == "private, no-cache" and script.headers.get("etag")
    rewritten = (ohif.OHIF / ohif.REWRITTEN).read_text().split()
    kept = next(p.name for p in sorted(ohif.OHIF.glob("*.js"))
                if ohif.HASHED.search(p.name) and p.name not in rewritten)
    assert "immutable" in context.request.get(f"{url}/ohif/{kept}").headers["cache-control"]
    assert script.headers["content-encoding"] == "gzip"                  # its gzip copy: 17 MB travel as 3 MB
    for path in ("/studies", f"/studies/{study}", "/login"):                        # the node's own pages: as strict
        assert context.request.get(url + path).headers["content-security-policy"] == NODE_CSP, path
    assert "unsafe" not in NODE_CSP and "blob:" not in NODE_CSP.split("script-src")[1].split(";")[0]

    for path in ("/ohif/..%2f..%2fviewer%2fohif.py", "/ohif/%2e%2e/%2e%2e/viewer/ohif.py", "/ohif/VERSION/..%2f.."
                 "%2fapp.py", "/ohif/.installed-3.13.2", "/ohif/nothing.js", "/ohif/assets/..%2f..%2f..%2fsetup.cfg"):
        answer = context.request.get(url + path, max_redirects=0)
        assert answer.status in (400, 404) and "import" not in answer.text(), (path, answer.status)
    assert not watched.problems, watched.problems
    context.close()


@in_browser
def test_the_study_page_opens_ohif_on_a_desktop_and_a_phone(site, browser):
    node, url, study = site
    for name, options in (("desktop", DESKTOP), ("phone", PHONE)):
        watched = Watched(browser, options)
        page, context = watched.page, watched.context
        page.goto(f"{url}/studies/{study}")
        log_in(page, url, rf".*/studies/{re.escape(study)}$")
        link = page.locator("#open-ohif")
        if name == "phone":        # OHIF is unusable at 390 px (its viewport a sliver): not offered there
            page.locator("#viewer-name, .study h1, h1").first.wait_for()
            assert link.count() == 1 and not link.is_visible()
            page.screenshot(path=str(ARTIFACTS / f"ohif-{name}-study-page.png"))
            context.close()
            continue
        link.wait_for()
        assert link.get_attribute("href") == f"/ohif/viewer?StudyInstanceUIDs={study}"
        box = link.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= options["viewport"]["width"]       # on screen
        assert box["height"] >= 36
        page.screenshot(path=str(ARTIFACTS / f"ohif-{name}-study-page.png"))
        link.click()
        page.wait_for_url(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
        wait_for_ohif(page)
        asked = (f"StudyInstanceUID={study}", f"/studies/{study}/")
        until(page, lambda: any(a in u for u in watched.dicomweb for a in asked), "OHIF asking /dicomweb for the study")
        page.screenshot(path=str(ARTIFACTS / f"ohif-{name}-viewer.png"))
        assert not watched.problems, watched.problems
        context.close()


@in_browser
def test_a_share_link_opens_ohif_on_its_study_without_the_list(site, browser):
    node, url, study = site
    context = browser.new_context(**DESKTOP)
    page = context.new_page()
    page.goto(f"{url}/studies/{study}")
    log_in(page, url, rf".*/studies/{re.escape(study)}$")
    page.click("#share-panel summary")
    page.click("#share")
    page.wait_for_selector("#share-url:not([hidden])")
    link = page.input_value("#share-url")
    context.close()

    watched = Watched(browser, DESKTOP)
    guest = watched.context
    watched.page.goto(link)
    assert guest.request.get(f"{url}/ohif/", max_redirects=0).headers["location"] == \
        f"/ohif/viewer?StudyInstanceUIDs={study}"                             # its study, not a list
    watched.page.click("#open-ohif")
    wait_for_ohif(watched.page)
    assert watched.page.evaluate("window.config.showStudyList") is False
    assert not watched.problems, watched.problems
    guest.close()


def _drawn(png: bytes) -> float:
    """The share of a viewport's screenshot that is image, not black background."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return float((grey > 40).mean())


def _dismiss_first_run(page) -> bool:
    """OHIF's first-run tour dims the whole page (and its investigational-use banner covers the viewport's
    foot): a new user's first clicks, made here before the viewport is judged. Always True."""
    for label in ("Skip all", "Confirm and hide"):
        button = page.get_by_text(label, exact=True)
        if button.count() and button.first.is_visible():
            button.first.click()
    return True


@in_browser
def test_ohif_lists_the_study_and_draws_the_ct_series(site, browser):
    """Needs the DICOMweb API: skipped while /dicomweb/studies answers 404 (a branch without it)."""
    node, url, study = site
    watched = Watched(browser, DESKTOP)
    page, context = watched.page, watched.context
    page.goto(f"{url}/login")
    log_in(page, url, r".*/studies.*")
    if context.request.get(f"{url}/dicomweb/studies").status == 404:
        context.close()
        pytest.skip("needs the DICOMweb API (QIDO-RS, WADO-RS): /dicomweb/studies answers 404 here")
    page.goto(f"{url}/ohif/")
    wait_for_ohif(page)
    page.get_by_text(re.compile("Cranium")).first.wait_for(timeout=30000)   # the study list, from QIDO
    page.screenshot(path=str(ARTIFACTS / "ohif-desktop-qido-list.png"))

    page.goto(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
    page.wait_for_selector("canvas.cornerstone-canvas", timeout=60000)
    pane = page.locator("[data-cy=viewport-pane]").first
    until(page, lambda: _dismiss_first_run(page) and _drawn(pane.screenshot()) > 0.1, "the CT slice drawn",
          timeout=60)
    page.screenshot(path=str(ARTIFACTS / "ohif-desktop-ct.png"))
    assert any(f"/dicomweb/studies/{study}/series" in u for u in watched.dicomweb)
    assert not watched.problems, watched.problems
    context.close()


# -- the install (no browser) ----------------------------------------------------------------

# the lines of OHIF 3.13.2's bundles that the install mends (viewer/ohif.py says why)
VOI = "voiLUTFunction: (voiLutModule.voiLUTFunction?.length &&\n                    voiLutModule.voiLUTFunction[0]) ||"
SR_GROUP = "const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;"


def _npm_tarball(path, index: str, bundle: str = 'x;\n__webpack_require__.p = "/";\n'
                 "await window.browserImportFunction('/dicom-microscopy-viewer/v.min.js');\n" + VOI):
    """An @ohif/app tarball laid out as the real one, small: package/dist/ and package.json."""
    files = {"package/package.json": '{"name": "@ohif/app", "version": "9.9.9"}',
             "package/dist/index.html": index,
             "package/dist/app.bundle.0123456789abcdef.js": bundle,
             "package/dist/8097.bundle.fedcba9876543210.js": '__webpack_require__.p = "/";\n' + SR_GROUP,
             "package/dist/app.bundle.css": "@font-face{src:url(/a34f9d1faa5f3315.woff2)}",
             "package/dist/manifest.json": '{"icons": [{"src": "/assets/a.png"}]}',
             "package/dist/app.bundle.0123456789abcdef.js.map": "{}",
             "package/dist/ort/ort-wasm.wasm": "wasm", "package/dist/sw.js": "", "package/dist/app-config.js": "cdn",
             "package/README.md": "outside dist/"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path, "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


INDEX = ('<html><head><script>console.time("scriptToView"),window.PUBLIC_URL="/"</script><link rel="manifest" '
         'href="/manifest.json"><script src="/app-config.js"></script><script type="module" '
         'src="/init-service-worker.js"></script><script>function browserImportFunction(n){return import(n)}'
         'window.PUBLIC_URL="/"</script><script defer src="/app.bundle.0123456789abcdef.js"></script>'
         '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body></html>')


def test_the_install_moves_the_build_under_ohif_and_keeps_what_is_needed(tmp_path):
    bundle = ('x;\n__webpack_require__.p = "/";\n'
              "await window.browserImportFunction('/dicom-microscopy-viewer/v.js');\n" + VOI
              + "\nconst text = 'a long and repetitive text';" * 200)
    tarball, sha512 = _npm_tarball(tmp_path / "ohif-app.tgz", INDEX, bundle)
    target = ohif.install(tarball, sha512, tmp_path / "ohif")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "8097.bundle.fedcba9876543210.js", "REWRITTEN", "VERSION", "app.bundle.0123456789abcdef.js",
        "app.bundle.0123456789abcdef.js.gz", "app.bundle.css", "index.html", "manifest.json"]
    assert (target / "REWRITTEN").read_text().split() == [     # every file the install changed: revalidated
        "8097.bundle.fedcba9876543210.js", "app.bundle.0123456789abcdef.js", "app.bundle.css", "index.html",
        "manifest.json"]
    # no source map, ONNX runtime, service worker or sample configuration; a gzip copy of what is large
    html = (target / "index.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == [
        "/ohif/manifest.json", "/ohif/app-config.js", "/ohif/app.bundle.0123456789abcdef.js", "/ohif/app.bundle.css"]
    assert "<script>" not in html and "PUBLIC_URL" not in html   # no inline script: they are in app-config.js
    bundle = (target / "app.bundle.0123456789abcdef.js").read_text()
    assert gzip.decompress((target / "app.bundle.0123456789abcdef.js.gz").read_bytes()).decode() == bundle
    assert '__webpack_require__.p = "/ohif/";' in bundle and "('/ohif/dicom-microscopy-viewer/" in bundle
    assert "voiLUTFunction: ([].concat(voiLutModule.voiLUTFunction ?? [])[0]) ||" in bundle and VOI not in bundle
    assert (target / "8097.bundle.fedcba9876543210.js").read_text() == \
        '__webpack_require__.p = "/ohif/";\n' + SR_GROUP.replace("coords[0].", "coords[0]?.")
    assert "url(/ohif/a34f" in (target / "app.bundle.css").read_text()
    assert '"/ohif/assets/a.png"' in (target / "manifest.json").read_text()
    assert (target / "VERSION").read_text() == "9.9.9\n"


def test_the_install_refuses_another_tarball_or_a_release_laid_out_differently(tmp_path):
    target = tmp_path / "ohif"
    target.mkdir()
    (target / "index.html").write_text("the installed one")
    tarball, sha512 = _npm_tarball(tmp_path / "ohif-app.tgz", INDEX)
    with pytest.raises(SystemExit, match="is not the pinned package"):
        ohif.install(tarball, sha512.replace("sha512-", "sha512-A"), target)
    moved, sha512 = _npm_tarball(tmp_path / "moved.tgz", INDEX.replace('window.PUBLIC_URL="/"', ""))
    with pytest.raises(SystemExit, match="sets no PUBLIC_URL"):
        ohif.install(moved, sha512, target)
    moved, sha512 = _npm_tarball(tmp_path / "moved2.tgz", INDEX, bundle='__webpack_require__.p = "/";')
    with pytest.raises(SystemExit, match="no longer holds \"browserImportFunction"):
        ohif.install(moved, sha512, target)
    assert (target / "index.html").read_text() == "the installed one"        # what was installed stays
