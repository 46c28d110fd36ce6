"""OHIF, the radiology viewer, served by the node at /ohif/ and pointed at its own /dicomweb.

`make install` fetches the prebuilt viewer from the npm registry (`@ohif/app`, pinned version
and SHA-512 in the Makefile) and `python -m viewer.ohif install TARBALL` unpacks its `dist/`
into viewer/vendor/ohif/. That build expects to sit at the site's root ("/"); this one lives
under /ohif/, so the few absolute paths are rewritten once, each where it is expected (a new
OHIF release that moved them fails the install naming the file, not the browser at run time).
The inline scripts of its index.html are dropped: what they set is in the app-config.js the
node serves, so the page's policy needs no 'unsafe-inline' for scripts.

The node serves the files, the configuration (app-config.js: its data source is this site's
/dicomweb, no CDN) and index.html for OHIF's client-side routes (/ohif/viewer?StudyInstanceUIDs=
...), to a logged-in session or a share link's only (the session middleware sends others to
the login), with the Content-Security-Policy OHIF needs: WebAssembly codecs, workers from
blob: URLs, styles its components inject. The node's own pages keep their strict policy.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path

from aiohttp import web

from .base import SESSION

HERE = Path(__file__).resolve().parent
OHIF = HERE / "vendor" / "ohif"
PREFIX = "/ohif/"
REWRITTEN = "REWRITTEN"                  # the files the install changed, one name a line
# what OHIF needs beyond the node's policy: compiling its WebAssembly codecs ('wasm-unsafe-eval'),
# the workers it makes from blob: URLs, the <style> elements its components inject; images and
# fetches stay on this site (and the blob:/data: URLs it makes itself)
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
       "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self' data: blob:; "
       "font-src 'self' data:; media-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; "
       "frame-ancestors 'none'")
# a script's own policy counts only when it runs as a worker: the image decoders' workers (Emscripten's
# embind, in the JPEG 2000, JPEG-LS, JPEG and HTJ2K codecs) build functions from strings ('unsafe-eval');
# the page itself may not
WORKER_CSP = CSP.replace("'wasm-unsafe-eval'", "'wasm-unsafe-eval' 'unsafe-eval'")
# not needed here: source maps (38 MB), the ONNX runtime (136 MB) of the SAM segmentation tool, whose
# model comes from huggingface.co (not offline), the service worker (the node's pages are not cached
# offline), the sample configuration (the node writes its own) and the static hosts' rewrite rules
SKIP = re.compile(r"(\.map$|^ort/|^sw\.js$|^init-service-worker\.js$|^app-config\.js$|^_headers$|^_redirects$|"
                  r"^serve\.json$)")
HASHED = re.compile(r"(^|/)[^/]*[0-9a-f]{16}\.[a-z0-9]+$")        # content-hashed names never change


# -- install: unpack the npm package's dist/ and move it under /ohif/ ---------------------------

def _rewrite(dist: Path) -> set[str]:
    """The absolute paths of a build made for "/": each must be where this release has it. Returns the
    names of the files changed (their content-hashed names no longer name their content)."""
    changed: dict[str, int] = {}

    def sub(path: Path, old: str, new: str, at_least: int = 1) -> None:
        text = path.read_text(encoding="utf-8")
        count = text.count(old)
        if count < at_least:
            raise SystemExit(f"OHIF install: {path.relative_to(dist)} no longer holds {old!r}: this OHIF release "
                             "is laid out differently; check viewer/ohif.py against it (or pin the previous one)")
        path.write_text(text.replace(old, new), encoding="utf-8")
        changed[path.name] = changed.get(path.name, 0) + count

    chunks = "__webpack_require__.p = \"/\";"           # webpack's public path, in the app and each worker
    for path in sorted(dist.glob("*.js")):
        if chunks in path.read_text(encoding="utf-8"):
            sub(path, chunks, f"__webpack_require__.p = \"{PREFIX}\";")
    app, = dist.glob("app.bundle.*.js")
    if app.name not in changed:
        raise SystemExit(f"OHIF install: {app.name} sets no webpack public path")
    microscopy = "browserImportFunction('/dicom-microscopy-viewer/"          # the slide microscopy mode's library
    sub(app, microscopy, microscopy.replace("'/", f"'{PREFIX}"))
    # cornerstone3D issue 2844 (open in this release): its image loader takes the first character of VOI LUT
    # Function, a string in OHIF's metadata ("L" of LINEAR), so an image that carries (0028,1056), as most
    # mammograms do, throws "Invalid VOI LUT function" and OHIF shows nothing; the function as it is given
    voi = "voiLUTFunction: (voiLutModule.voiLUTFunction?.length &&\n                    voiLutModule.voiLUTFunction[0])"
    sub(app, voi, "voiLUTFunction: ([].concat(voiLutModule.voiLUTFunction ?? [])[0])")
    # its SR loader reads the region of every measurement group, and a group without one (a TID 1501 group
    # that says nothing was found, as the CAD writes for a normal image) threw and took the viewer down
    # ("Something went wrong"); such a group is now only not drawn
    group = "const referencedSOPSequence = measurement.coords[0].ReferencedSOPSequence;"
    holders = [path for path in sorted(dist.glob("*.bundle.*.js")) if group in path.read_text(encoding="utf-8")]
    if len(holders) != 1:
        raise SystemExit(f"OHIF install: {len(holders)} bundles hold {group!r}, not one: this OHIF release is "
                         "laid out differently; check viewer/ohif.py against it (or pin the previous one)")
    sub(holders[0], group, group.replace("coords[0].", "coords[0]?."))
    for path in sorted(dist.glob("*.css")):
        if "url(/" in path.read_text(encoding="utf-8"):
            sub(path, "url(/", f"url({PREFIX}")
    sub(dist / "manifest.json", '"/assets/', f'"{PREFIX}assets/')
    index = dist / "index.html"
    html = index.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>[^<]*</script>", html)
    if not any("PUBLIC_URL" in s for s in scripts):
        raise SystemExit("OHIF install: index.html sets no PUBLIC_URL: this OHIF release is laid out differently")
    for script in scripts:                               # their content is in the node's app-config.js
        html = html.replace(script, "")
    html = re.sub(r'<script[^>]*src="/init-service-worker\.js"[^>]*></script>', "", html)
    html, count = re.subn(r'((?:href|src|content)=")/(?!/)', rf"\1{PREFIX}", html)
    if count < 3 or "<script" not in html:
        raise SystemExit("OHIF install: index.html does not load its scripts from / any more")
    index.write_text(html, encoding="utf-8")
    return set(changed) | {"index.html"}


def _compress(dist: Path) -> None:
    """A gzip copy beside each text or WebAssembly file that it makes smaller by a tenth: aiohttp sends
    it to a browser that accepts gzip (the app's 17 MB bundle travels as about 3 MB, to a phone too)."""
    for path in sorted(dist.rglob("*")):
        if path.suffix in (".js", ".css", ".json", ".html", ".wasm", ".svg") and path.stat().st_size > 1024:
            data = path.read_bytes()
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            if len(packed) < 0.9 * len(data):
                path.with_name(path.name + ".gz").write_bytes(packed)


def install(tarball: Path, sha512: str, target: Path = OHIF) -> Path:
    """Check the npm tarball against the pinned SHA-512 (npm's "integrity"), unpack its dist/ into
    `target` (replacing what was there only once all went well) and rewrite it for /ohif/."""
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != sha512:
        raise SystemExit(f"OHIF install: {tarball.name} is not the pinned package ({digest} != {sha512})")
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix("package/dist/")
            if name == member.name or not (member.isfile() or member.isdir()) or SKIP.search(name):
                continue
            member.name = name
            members.append(member)
        tar.extractall(staging, members=members, filter="data")
    (staging / REWRITTEN).write_text("".join(f"{name}\n" for name in sorted(_rewrite(staging))))
    _compress(staging)
    (staging / "VERSION").write_text(json.loads(tar_file(tarball, "package/package.json"))["version"] + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def tar_file(tarball: Path, name: str) -> str:
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(name)
        return member.read().decode() if member else ""


# -- serving ----------------------------------------------------------------------------------

def app_config(share_study: str | None) -> str:
    """OHIF's window.config: one DICOMweb data source, this site's /dicomweb (same origin, so the
    session cookie goes with every request). A share link's session opens its study, no list."""
    config = {
        "routerBasename": PREFIX.rstrip("/"),
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": share_study is None,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "production",
        "defaultDataSourceName": "m3dicom",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "m3dicom",
            "configuration": {
                "friendlyName": "m3dicom",
                "name": "m3dicom",
                "qidoSupportsIncludeField": True,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": True,
                "supportsWildcard": True,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }
    return (f"window.PUBLIC_URL = {json.dumps(PREFIX)};\n"
            "function browserImportFunction(n) { return import(n); }\n"
            f"window.config = {json.dumps(config, indent=1)};\n"
            "(function () {\n"
            "  const root = window.location.origin + '/dicomweb';\n"
            "  for (const source of window.config.dataSources) {\n"
            "    Object.assign(source.configuration, {qidoRoot: root, wadoRoot: root, wadoUriRoot: root});\n"
            "  }\n"
            "})();\n")


def _file(name: str) -> Path | None:
    """The file of OHIF's build that `name` (a path below /ohif/) names, or None: no dot-segment,
    nothing hidden, nothing outside the folder, no symbolic link."""
    parts = name.split("/")
    if not name or any(not p or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        return None
    path = OHIF.joinpath(*parts)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved != path or not resolved.is_relative_to(OHIF) or not resolved.is_file():
        return None
    return resolved


async def serve(request: web.Request) -> web.StreamResponse:
    name = request.match_info["tail"]
    headers = {"Content-Security-Policy": CSP, "Cross-Origin-Embedder-Policy": "require-corp",
               "Cross-Origin-Resource-Policy": "same-origin"}
    if name == "app-config.js":
        session = request[SESSION]
        return web.Response(text=app_config(session.study_uid if session.is_share else None),
                            content_type="text/javascript", headers=headers)
    if name == "" and request[SESSION].is_share:          # a share link's guest has one study, no list
        raise web.HTTPFound(f"{PREFIX}viewer?StudyInstanceUIDs={request[SESSION].study_uid}")
    path = _file(name)
    if path is None:
        if "." in name.rpartition("/")[2]:                 # a file that is not there: 404, not the page
            raise web.HTTPNotFound(text="no such file in OHIF", headers=headers)
        path = OHIF / "index.html"                         # one of OHIF's own routes: its page
    elif path.name != "index.html":
        if path.suffix == ".js":
            headers["Content-Security-Policy"] = WORKER_CSP
        headers["Cache-Control"] = ("private, max-age=31536000, immutable" if HASHED.search(name)
                                    and path.name not in _rewritten() else "private, no-cache")
    return web.FileResponse(path, headers=headers)


def _rewritten() -> frozenset[str]:
    """Files the install changed: their hashed names may have named other content in an earlier
    install, so a browser revalidates them instead of keeping them a year (all, before this list)."""
    global _REWRITTEN
    listing = OHIF / REWRITTEN
    try:
        stamp = listing.stat().st_mtime_ns
        if _REWRITTEN[0] != stamp:
            _REWRITTEN = (stamp, frozenset(listing.read_text().split()))
    except OSError:                   # not there (an older install), or being replaced: revalidate everything
        _REWRITTEN = (-1, None)
    return _REWRITTEN[1] if _REWRITTEN[1] is not None else _EVERYTHING


class _Everything(frozenset):
    def __contains__(self, item) -> bool:
        return True


_EVERYTHING = _Everything()
_REWRITTEN: tuple[int | None, frozenset[str] | None] = (-1, None)


def installed() -> bool:
    return (OHIF / "index.html").is_file() and (OHIF / "VERSION").is_file()


def routes(app: web.Application) -> None:
    async def to_root(request: web.Request) -> web.Response:
        raise web.HTTPFound(PREFIX)

    app.router.add_get(PREFIX.rstrip("/"), to_root)
    app.router.add_get(PREFIX + "{tail:.*}", serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m viewer.ohif", description="Install OHIF's build for the node.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("install", help="unpack an @ohif/app npm tarball into viewer/vendor/ohif")
    add.add_argument("tarball", type=Path)
    add.add_argument("--sha512", required=True, help="npm's integrity of the pinned version (sha512-...)")
    args = parser.parse_args(argv)
    target = install(args.tarball, args.sha512)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"OHIF {(target / 'VERSION').read_text().strip()} in {target} ({size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
