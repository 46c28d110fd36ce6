"""DICOMweb benchmark: the node's /dicomweb against Orthanc's DICOMweb plug-in (Debian orthanc-dicomweb) on
the same data, in the same run.

Both receive one CT series of `--series` instances (CT_small copies with their own UIDs, 128 x 128) and
`--studies` one-instance studies (the node by `storescu +tls`, Orthanc by its REST API). Then, one client
each over loopback (the node over HTTPS with an API token, Orthanc over plain HTTP, and again over HTTPS
through nginx when it is installed, as the Orthanc Book deploys it: Debian's Orthanc 1.10 crashes on its own
HTTPS here), Orthanc restarted before each so that neither starts with a warm storage cache:

- QIDO-RS `/studies?PatientName=BENCH*` (p50 / p95 of `--repeat` requests);
- WADO-RS of the whole series as stored (`transfer-syntax=*`), MB/s: first as the series' first request (read
  from the store), then again after its metadata (OHIF's order: what the first requests read may be kept);
- the series' `/metadata`, cold (the first request) and warm (p50 of the next five);
- `/frames/1` of every instance of the series, one request after the other, frames/s;
- STOW-RS of `--stow` (500) new small instances in one request, instances/s;
- OHIF (served by the node, in Debian chromium) opened on the series: seconds to its first slice drawn, the
  first time after a restart of the node (nothing cached) and then again in fresh browser contexts.

Prints a Markdown table. Not a test: nothing is asserted.

    .venv/bin/python bench/dicomweb.py [--series 600] [--studies 200] [--repeat 30] [--stow 500] [--no-orthanc]
                                       [--no-ohif] [--no-nginx]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers import M3DICOM, Node, free_port, synthetic_instances, wait_for  # noqa: E402

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_FRAMES = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


class Target:
    def __init__(self, name: str, base: str, session: requests.Session):
        self.name, self.base, self.session = name, base, session

    def get(self, path: str, **kw) -> requests.Response:
        answer = self.session.get(self.base + path, **kw)
        answer.raise_for_status()
        return answer


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(target: Target, study: str, series: str, sops: list[str], stow: list[bytes], repeat: int) -> dict:
    out = {}
    for label, params in (("one study by PatientID", {"PatientID": "BENCH-SERIES"}),
                          ("all studies, limit 100", {"PatientName": "Bench*", "limit": "100"})):
        matches = len(target.get("/studies", params=params).json())
        qido = [_timed(lambda: target.get("/studies", params=params)) for _ in range(repeat)]
        out[f"QIDO {label}: matches, p50 / p95 (ms)"] = (
            f"{matches}, {statistics.median(qido) * 1000:.1f} / {sorted(qido)[int(len(qido) * 0.95) - 1] * 1000:.1f}")
    size = []

    def wado() -> float:
        seconds = _timed(lambda: size.append(len(target.get(f"/studies/{study}/series/{series}",
                                                            headers={"Accept": ACCEPT_STORED}).content)))
        return size[-1] / 1e6 / seconds

    out["WADO-RS series as stored, its first request (MB/s)"] = f"{wado():.1f}"
    metadata = f"/studies/{study}/series/{series}/metadata"
    out[f"series metadata, {len(sops)} instances, cold (ms)"] = f"{_timed(lambda: target.get(metadata)) * 1000:.0f}"
    warm = [_timed(lambda: target.get(metadata)) for _ in range(5)]
    out["series metadata, warm p50 (ms)"] = f"{statistics.median(warm) * 1000:.0f}"
    out["WADO-RS series as stored, after its metadata: p50 of 5 (MB/s)"] = \
        f"{statistics.median(wado() for _ in range(5)):.1f}"
    seconds = _timed(lambda: [target.get(f"/studies/{study}/series/{series}/instances/{sop}/frames/1",
                                         headers={"Accept": ACCEPT_FRAMES}) for sop in sops])
    out["frames, one request each (frames/s)"] = f"{len(sops) / seconds:.0f}"
    boundary = "benchboundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in stow) + f"--{boundary}--\r\n".encode()
    started = time.perf_counter()
    answer = target.session.post(target.base + "/studies", data=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    seconds = time.perf_counter() - started
    answer.raise_for_status()
    out[f"STOW-RS {len(stow)} instances, one request (instances/s)"] = f"{len(stow) / seconds:.0f}"
    return out


@contextlib.contextmanager
def nginx_tls(work: Path, pki: Path, upstream: int):
    """nginx in front of Orthanc's HTTP port with the node's server certificate: Orthanc over HTTPS, as the
    Orthanc Book deploys it. Yields its port."""
    port, conf = free_port(), work / "nginx.conf"
    temp = " ".join(f"{kind}_temp_path {work}/nginx-{kind};" for kind in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    conf.write_text(f"""daemon off; worker_processes auto; pid {work}/nginx.pid; error_log {work}/nginx.log;
events {{ worker_connections 256; }}
http {{ access_log off; {temp}
  upstream orthanc {{ server 127.0.0.1:{upstream}; keepalive 8; }}
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {pki}/server.pem; ssl_certificate_key {pki}/server.key;
    client_max_body_size 0;
    location / {{ proxy_pass http://orthanc; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering off; }} }} }}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    try:
        def answers() -> bool:
            try:
                return requests.get(f"https://127.0.0.1:{port}/system", verify=str(pki / "ca.pem"), timeout=5).ok
            except requests.ConnectionError:
                return False

        wait_for(answers, timeout=20, what="nginx in front of Orthanc")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def ohif_first_image(url: str, password: str, study: str, count: int = 3) -> list[float]:
    """Seconds from opening OHIF on the study (its viewer page, logged in) to its first image drawn, as OHIF
    itself reports it (its console's `studyToFirstImage` timer fires once the first image is rendered):
    Debian chromium, Playwright, 1280x860, `count` times, each in a fresh browser context (OHIF's own code
    loads from the browser's cache after the first)."""
    from playwright.sync_api import sync_playwright

    from test_viewer_browser import ARGS, CHROMIUM

    times = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for _ in range(count):
                context = chromium.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 860})
                page = context.new_page()
                page.goto(f"{url}/login")
                page.fill("input[name=user]", "admin")
                page.fill("input[name=password]", password)
                page.click("button[type=submit]")
                page.wait_for_url(lambda u: "/login" not in u)
                drawn: list[float] = []
                page.on("console", lambda m: drawn.append(time.perf_counter()) if m.text.startswith(
                    "studyToFirstImage") else None)
                started = time.perf_counter()
                page.goto(f"{url}/ohif/viewer?StudyInstanceUIDs={study}")
                while not drawn and time.perf_counter() - started < 300:
                    page.wait_for_timeout(50)
                times.append((drawn[0] if drawn else math.inf) - started)
                context.close()
        finally:
            chromium.close()
    return times


def stow_set(directory: Path, count: int) -> list[bytes]:
    """`count` small instances with UIDs of their own (each target gets its own set)."""
    return [p.read_bytes() for p in synthetic_instances(directory, count, patient="Stow^Bench")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=600)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--stow", type=int, default=500)
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument("--no-ohif", action="store_true", help="no OHIF time to the first image (chromium)")
    parser.add_argument("--no-nginx", action="store_true", help="no Orthanc over HTTPS through nginx")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    orthanc = node = None
    try:
        pki = work / "pki"
        subprocess.run(M3DICOM + ["certs", "init", "--dir", str(pki)], check=True, cwd=ROOT, capture_output=True)
        study = generate_uid()
        series_files = synthetic_instances(work / "series", args.series, study=study, patient="Bench^Series",
                                           patient_id="BENCH-SERIES")
        others = [p for n in range(args.studies)
                  for p in synthetic_instances(work / f"s{n}", 1, patient=f"Bench^{n:05d}", patient_id=f"BENCH-{n}")]
        node = Node(work / "node", pki, viewer={"enabled": True, "port": free_port()})
        password = node.env["M3DICOM_ADMIN_PASSWORD"] = secrets.token_urlsafe(16)
        node.start()
        node.storescu(*series_files, *others, timeout=3600)
        total = len(series_files) + len(others)
        wait_for(lambda: node.rows("SELECT COUNT(*) FROM instances")[0][0] == total, timeout=600,
                 what="the node's instances")
        token = node.cli("token", "create", "bench", "--scope", "write").stdout.strip()
        ours = requests.Session()
        ours.trust_env, ours.verify = False, str(pki / "ca.pem")
        ours.headers["Authorization"] = f"Bearer {token}"
        first = pydicom.dcmread(series_files[0])
        series, sops = str(first.SeriesInstanceUID), [pydicom.dcmread(p).SOPInstanceUID for p in series_files]
        rows = {"m3dicom (HTTPS)": measure(Target("m3dicom", f"https://127.0.0.1:{node.settings['viewer']['port']}"
                                                  "/dicomweb", ours), study, series, sops,
                                           stow_set(work / "stow-m3", args.stow), args.repeat)}
        if not args.no_ohif:
            from viewer import ohif

            if ohif.installed():
                node.stop()                             # a restart: OHIF's first open finds nothing cached
                node.start()
                base = f"https://127.0.0.1:{node.settings['viewer']['port']}"
                wait_for(lambda: requests.get(base + "/login", verify=str(pki / "ca.pem")).ok, what="the viewer")
                cold, *warm = ohif_first_image(base, password, study)
                rows["m3dicom (HTTPS)"][f"OHIF, first slice of the {len(sops)}-instance series: after a restart, "
                                        "then p50 (s)"] = f"{cold:.1f}, {statistics.median(warm):.1f}"
        if not args.no_orthanc and PLUGIN.exists():
            from test_orthanc import Orthanc

            (work / "orthanc").mkdir()
            extra = {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
            orthanc = Orthanc(work / "orthanc", pki, node, free_port(), extra=extra)
            plain = requests.Session()
            plain.trust_env = False
            for path in (*series_files, *others):
                plain.post(f"http://127.0.0.1:{orthanc.http_port}/instances", data=path.read_bytes()).raise_for_status()
            orthanc.stop()                              # a restart: its storage cache empty, as the node's
            orthanc = Orthanc(work / "orthanc", pki, node, free_port(), extra=extra)
            rows["Orthanc DICOMweb (HTTP)"] = measure(Target("orthanc", f"http://127.0.0.1:{orthanc.http_port}"
                                                             "/dicom-web", plain), study, series, sops,
                                                      stow_set(work / "stow-orthanc", args.stow), args.repeat)
            if not args.no_nginx and shutil.which("nginx"):
                orthanc.stop()
                orthanc = Orthanc(work / "orthanc", pki, node, free_port(), extra=extra)
                with nginx_tls(work, pki, orthanc.http_port) as port:
                    tls = requests.Session()
                    tls.trust_env, tls.verify = False, str(pki / "ca.pem")
                    rows["Orthanc DICOMweb (HTTPS by nginx)"] = measure(
                        Target("orthanc-tls", f"https://127.0.0.1:{port}/dicom-web", tls), study, series, sops,
                        stow_set(work / "stow-orthanc-tls", args.stow), args.repeat)
        names = list(rows)
        print(f"\n{args.series}-instance CT series (CT_small copies), {args.studies} more studies\n")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for measure_name in rows[names[0]]:
            print(f"| {measure_name} | " + " | ".join(rows[n].get(measure_name, "-") for n in names) + " |")
    finally:
        if orthanc is not None:
            orthanc.stop()
        if node is not None:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
