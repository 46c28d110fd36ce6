"""Viewer benchmark: what a clinician waits for, against Orthanc's REST API on the same data.

A node (`m3dicom serve`, viewer on HTTPS, the bone-model rule) and Orthanc (HTTP on loopback,
DICOM TLS) receive the same data by dcmtk `storescu +tls`: 10,000 studies (a small CT each),
three full-field mammograms of 27 MB (4096 x 3328, 16 bits, the phantom) and Debian's CT head
at 512 x 512 per slice (Cranium.inv3, in-plane doubled), which the node makes into a bone
model. Then, over loopback with one logged-in session:

- first image of a mammogram, cold (the viewer's caches empty) and cached (the same view
  again), and a new window on it (dragging brightness / contrast: the decoded image cached,
  the view rendered anew); Orthanc: `/instances/ID/preview` (a PNG of the whole image);
- the same for CT slices;
- the study list: the first page of 10k studies, page 100, a patient-name search;
  Orthanc: `/tools/find` at study level, 50 results, expanded;
- image tiles (256 x 256 regions at full resolution of a mammogram) with 20 concurrent
  clients: requests per second and p50 latency, each tile new (rendered from the decoded
  image) and again (from the cache);
- time to the first 3D frame: chromium (Playwright, software WebGL) opens the model page,
  X3DOM loads the scene and draws it; desktop and the phone level at 390 x 844.

Prints a Markdown table of p50 / p95 in ms. Not a test: nothing is asserted.

    .venv/bin/python bench/viewer.py [--studies 10000] [--repeat 20] [--no-orthanc]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from archive.index import Index  # noqa: E402
from bench.ingest import ENV, free_port, wait_port  # noqa: E402
from gpu_workers.mammo import phantom  # noqa: E402
from router import queue  # noqa: E402

PASSWORD = "bench viewer password"
FULL_FIELD = phantom.Options(rows=4096, columns=3328, spacing=0.07, clusters=2, isolated=3)
VIEW = (1400, 1100)                       # what a desktop viewport asks for (device pixels)
TILE = 256
CLIENTS = 20
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------------

def studies_set(directory: Path, count: int) -> Path:
    """`count` studies of one small CT each (different patients, dates, accession numbers)."""
    template = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    rng = random.Random(5)
    surnames = ["SMITH", "JONES", "TAYLOR", "BROWN", "MULLER", "ROSSI", "GARCIA", "NOVAK", "DUBOIS", "KOWALSKI"]
    directory.mkdir(parents=True)
    for i in range(count):
        ds = template.copy()
        ds.PatientID, ds.PatientName = f"PAT{i:07d}", f"{rng.choice(surnames)}{rng.randint(1, 999)}^ANNA"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = f"20{rng.randint(15, 25):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        ds.AccessionNumber = f"ACC{i:08d}"
        ds.save_as(directory / f"{i:06d}.dcm", enforce_file_format=True)
    return directory


def ct_head(directory: Path) -> list[Path]:
    import cranium

    volume, (dx, dy, dz) = cranium.load()
    doubled = np.repeat(np.repeat(volume, 2, axis=1), 2, axis=2)      # 512 x 512 slices, as most CT is
    return cranium.write_series(directory, doubled, (dx / 2, dy / 2, dz))


def storescu(port: int, pki: Path, aec: str, *paths: Path) -> None:
    subprocess.run(["storescu", "+tls", f"{pki}/client.key", f"{pki}/client.pem", "+cf", f"{pki}/ca.pem",
                    "-aec", aec, "+sd", "+r", "127.0.0.1", str(port), *map(str, paths)], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the two servers --------------------------------------------------------------------------------

def start_node(work: Path, pki: Path) -> tuple[subprocess.Popen, int, int]:
    port, viewer = free_port(), free_port()
    config = work / "node.toml"
    config.write_text(f'''
[node]
data_dir = "{work / 'var'}"
[dicom]
port = {port}
certificate = "{pki}/server.pem"
private_key = "{pki}/server.key"
ca_certificates = "{pki}/ca.pem"
[log]
level = "WARNING"
[viewer]
port = {viewer}
[[router.rules]]
name = "head"
match = {{ Modality = "CT", BodyPartExamined = "HEAD" }}
plugin = "bone-model"
quiet_seconds = 2
''')
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)], cwd=ROOT,
                            env={**ENV, "M3DICOM_ADMIN_PASSWORD": PASSWORD},
                            stdout=open(work / "node.log", "wb"), stderr=subprocess.STDOUT)
    wait_port(port, 60)
    wait_port(viewer, 60)
    return proc, port, viewer


def start_orthanc(work: Path, pki: Path) -> tuple[subprocess.Popen, int, int]:
    port, http = free_port(), free_port()
    store = work / "orthanc-db"
    config = work / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "vbench", "StorageDirectory": str(store), "IndexDirectory": str(store), "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "DicomTlsEnabled": True,
        "DicomTlsCertificate": f"{pki}/server.pem", "DicomTlsPrivateKey": f"{pki}/server.key",
        "DicomTlsTrustedCertificates": f"{pki}/ca.pem", "DicomTlsRemoteCertificateRequired": True,
        "Plugins": [], "LimitFindResults": 0}))
    proc = subprocess.Popen(["Orthanc", str(config)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=open(work / "orthanc.log", "ab"))
    wait_port(port, 60)
    wait_port(http, 60)
    return proc, port, http


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_for_model(index: Path, timeout: float = 600) -> tuple[str, str]:
    """(job id, study UID) of the bone model once it has succeeded."""
    deadline = time.monotonic() + timeout
    opened = Index(index)           # the node made and migrated it
    try:
        while time.monotonic() < deadline:
            models = [job for job in queue.jobs(opened) if job.plugin == "bone-model"]
            if models and models[-1].state == "succeeded":
                return models[-1].id, models[-1].study_uid
            if models and models[-1].state == "failed":
                raise RuntimeError("the bone model failed; see node.log")
            time.sleep(1)
    finally:
        opened.close()
    raise RuntimeError("no bone model in time")


# -- timing -----------------------------------------------------------------------------------------

async def timed(session, url: str, **kwargs) -> float:
    started = time.perf_counter()
    async with session.get(url, **kwargs) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


def stats(samples: list[float]) -> tuple[float, float, int]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], len(ordered)


async def tile_load(session, urls: list[str], seconds: float = 8.0) -> tuple[float, float]:
    """(requests per second, p50 ms) with CLIENTS clients each asking for the next url in turn."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(10 ** 9))

    async def client():
        while time.perf_counter() < deadline:
            latencies.append(await timed(session, urls[next(counter) % len(urls)]))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return len(latencies) / (time.perf_counter() - started), statistics.median(latencies)


async def measure_node(viewer: int, pki: Path, mammograms: list[str], slices: list[str], repeat: int) -> dict:
    import aiohttp

    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    base = f"https://127.0.0.1:{viewer}"
    connector = aiohttp.TCPConnector(ssl=context, limit=CLIENTS)
    results: dict[str, tuple] = {}
    jar = aiohttp.CookieJar(unsafe=True)                      # cookies of an IP address (127.0.0.1)
    async with aiohttp.ClientSession(base, connector=connector, cookie_jar=jar) as session:
        async with session.post("/login", data={"user": "admin", "password": PASSWORD, "next": "/studies"},
                                allow_redirects=False) as answer:
            if answer.status != 302:
                raise RuntimeError(f"login: HTTP {answer.status}")

        def view(uid: str, rows: int, columns: int, wc: float | None = None) -> str:
            window = f"&wc={wc}&ww=2000" if wc is not None else ""
            return (f"/api/instances/{uid}/render?frame=0&x=0&y=0&w={columns}&h={rows}"
                    f"&width={VIEW[0]}&height={VIEW[1]}{window}")

        for name, uids, (rows, columns) in (("mammogram", mammograms, (FULL_FIELD.rows, FULL_FIELD.columns)),
                                            ("CT slice", slices, (512, 512))):
            results[f"{name}: first image, cold"] = stats([await timed(session, view(u, rows, columns)) for u in uids])
            results[f"{name}: first image, cached"] = stats(
                [await timed(session, view(uids[0], rows, columns)) for _ in range(repeat)])
            results[f"{name}: new window"] = stats(
                [await timed(session, view(uids[0], rows, columns, 1000 + 7 * i)) for i in range(repeat)])
            say(f"  {name}: {results[f'{name}: first image, cold']}")

        for query in ("", "?page=100"):                        # the pages are full: the timings mean something
            async with session.get(f"/api/studies{query}") as answer:
                found = len((await answer.json())["studies"])
            if found != 50:
                raise RuntimeError(f"/api/studies{query}: {found} studies, not 50")
        for label, query in (("study list: first page", ""), ("study list: page 100", "?page=100"),
                             ("study list: name search", "?name=SMITH1")):
            results[label] = stats([await timed(session, f"/api/studies{query}") for _ in range(repeat)])
        say(f"  list: {results['study list: first page']}")

        grid = [(x, y) for y in range(0, FULL_FIELD.rows - TILE, TILE) for x in range(0, FULL_FIELD.columns - TILE, TILE)]
        random.Random(3).shuffle(grid)
        uid = mammograms[1]

        def tile(x: int, y: int, wc: int) -> str:
            return (f"/api/instances/{uid}/render?frame=0&x={x}&y={y}&w={TILE}&h={TILE}&width={TILE}&height={TILE}"
                    f"&wc={wc}&ww=1500")

        fresh = [tile(x, y, 1000 + i) for i, (x, y) in enumerate(grid * 20)]
        await timed(session, fresh[-1])                                       # the decoded image in its cache
        results["tiles, 20 clients: each new"] = await tile_load(session, fresh)
        again = [tile(x, y, 900) for x, y in grid[:60]]
        for url in again:
            await timed(session, url)
        results["tiles, 20 clients: cached"] = await tile_load(session, again)
        say(f"  tiles: {results['tiles, 20 clients: each new']} {results['tiles, 20 clients: cached']}")
    return results


async def measure_orthanc(http: int, mammograms: list[str], slices: list[str], repeat: int) -> dict:
    import aiohttp

    base = f"http://127.0.0.1:{http}"
    results: dict[str, tuple] = {}
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        async def orthanc_id(uid: str) -> str:
            async with session.post("/tools/lookup", data=uid) as answer:
                return (await answer.json())[0]["ID"]

        for name, uids in (("mammogram", mammograms), ("CT slice", slices)):
            ids = [await orthanc_id(u) for u in uids]
            results[f"{name}: first image, cold"] = stats([await timed(session, f"/instances/{i}/preview") for i in ids])
            results[f"{name}: first image, cached"] = stats(
                [await timed(session, f"/instances/{ids[0]}/preview") for _ in range(repeat)])
            say(f"  orthanc {name}: {results[f'{name}: first image, cold']}")
        find = {"Level": "Study", "Query": {}, "Limit": 50, "Expand": True}
        search = {"Level": "Study", "Query": {"PatientName": "*SMITH1*"}, "Limit": 50, "Expand": True}
        for label, body in (("study list: first page", find), ("study list: page 100", {**find, "Since": 5000}),
                            ("study list: name search", search)):
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                async with session.post("/tools/find", json=body) as answer:
                    await answer.read()
                samples.append((time.perf_counter() - started) * 1000)
            results[label] = stats(samples)
    return results


def first_3d_frame(viewer: int, job: str, study: str, repeat: int = 3) -> dict:
    """ms from opening the model page to X3DOM's first frame with the model (5% of the canvas drawn)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    url = f"https://127.0.0.1:{viewer}"
    results = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for label, viewport in (("3D model: first frame, desktop", {"width": 1280, "height": 860}),
                                ("3D model: first frame, phone", {"width": 390, "height": 844})):
            samples = []
            for _ in range(repeat):
                context = browser.new_context(ignore_https_errors=True, viewport=viewport)
                page = context.new_page()
                page.goto(f"{url}/login")
                page.fill("input[name=user]", "admin")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.wait_for_url("**/studies**")
                started = time.perf_counter()
                page.goto(f"{url}/studies/{study}/model/{job}")
                page.wait_for_selector("#scene[data-loaded='yes']", state="attached", timeout=120000)
                while True:
                    shot = np.asarray(Image.open(io.BytesIO(page.locator("canvas").first.screenshot())).convert("RGB"))
                    if (np.abs(shot.astype(int) - [31, 36, 43]).sum(axis=2) > 60).mean() > 0.05:
                        break
                    if time.perf_counter() - started > 120:
                        raise RuntimeError("X3DOM drew nothing")
                samples.append((time.perf_counter() - started) * 1000)
                context.close()
            results[label] = stats(samples)
            say(f"  {label}: {results[label]}")
        browser.close()
    return results


# -- main -------------------------------------------------------------------------------------------

def table(node: dict, orthanc: dict) -> str:
    lines = ["| measure | m3dicom p50 | m3dicom p95 | Orthanc p50 | Orthanc p95 |", "|---|---:|---:|---:|---:|"]
    for label, value in node.items():
        if label.startswith("tiles"):
            lines.append(f"| {label} | {value[0]:.0f} req/s | p50 {value[1]:.0f} ms | — | — |")
            continue
        other = orthanc.get(label)
        lines.append(f"| {label} (n={value[2]}) | {value[0]:.0f} ms | {value[1]:.0f} ms | "
                     + (f"{other[0]:.0f} ms | {other[1]:.0f} ms |" if other else "— | — |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="m3-vbench-"))
    procs = []
    try:
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "node.cli", "certs", "init", "--dir", str(pki)], cwd=ROOT, check=True,
                       capture_output=True)
        say("data: studies, mammograms, CT head")
        many = studies_set(work / "studies", args.studies)
        mammo_paths = [phantom.write(work / "mg", seed, FULL_FIELD)[0] for seed in (11, 12, 13)]
        head = ct_head(work / "head")
        mammograms = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mammo_paths]
        slices = [pydicom.dcmread(head[k], stop_before_pixels=True).SOPInstanceUID for k in (30, 50, 70)]

        node, port, viewer = start_node(work, pki)
        procs.append(node)
        say("sending to the node")
        storescu(port, pki, "M3DICOM", *mammo_paths, work / "head")
        job, study = wait_for_model(work / "var" / "index.sqlite3")
        storescu(port, pki, "M3DICOM", many)
        say("measuring the node")
        node_results = asyncio.run(measure_node(viewer, pki, mammograms, slices, args.repeat))
        node_results.update(first_3d_frame(viewer, job, study))
        stop(node)

        orthanc_results = {}
        if not args.no_orthanc and shutil.which("Orthanc"):
            orthanc, oport, http = start_orthanc(work, pki)
            procs.append(orthanc)
            say("sending to Orthanc")
            storescu(oport, pki, "ORTHANC", *mammo_paths, work / "head", many)
            say("measuring Orthanc")
            orthanc_results = asyncio.run(measure_orthanc(http, mammograms, slices, args.repeat))
            stop(orthanc)
        print(table(node_results, orthanc_results))
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
