"""Ingest benchmark: dcmtk storescu over DICOM TLS into m3dicom, Orthanc and dcmtk storescp.

Scenarios (as issue 2 asks): (a) 500 small CT instances on one association, (b) 50
mammography-sized instances (10-27 MB), (c) 60 short associations of one instance each,
(d) 4 storescu processes in parallel. Prints instances/s, MB/s and the receiver's CPU
seconds, median of N runs, as a Markdown table. Not a test: nothing is asserted.

    .venv/bin/python bench/ingest.py [--runs 3] [--large 50] [--only m3dicom,orthanc,storescp]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


# -- data ------------------------------------------------------------------------------

def small_set(directory: Path, count: int) -> list[Path]:
    src = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    directory.mkdir(parents=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = directory / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def large_set(directory: Path, count: int) -> list[Path]:
    """Mammography-sized images: 16-bit, 10-27 MB, random sizes, one study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(7)
    directory.mkdir(parents=True)
    study = generate_uid()
    paths = []
    for i in range(count):
        rows = int(rng.integers(2294, 4096))
        cols = int(rng.integers(2294, 3328))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^Mammo", "MG"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 16383, rows * cols, dtype=np.uint16).tobytes()
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# -- receivers ---------------------------------------------------------------------------

class Receiver:
    name = ""
    aet = "RECEIVER"

    def __init__(self, work: Path, pki: Path):
        self.work, self.pki = work, pki
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def settle(self, timeout: float = 90.0) -> None:
        """Wait until the receiver has finished starting (its processes, m3dicom's router with
        its Dask cluster and viewer included, use under 5% of a core), so that start-up work
        does not count as reception."""
        deadline, last, quiet = time.monotonic() + timeout, self.cpu_seconds(), 0
        while quiet < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - last < 0.025 else 0
            last = now

    def cpu_seconds(self) -> float:
        try:
            p = psutil.Process(self.proc.pid)
            t = p.cpu_times()
            return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system
                                           for c in p.children(recursive=True))
        except psutil.Error:
            return float("nan")


class M3dicom(Receiver):
    name, aet = "m3dicom", "M3DICOM"
    receivers = 1  # dicom.receivers
    bare = False   # without the router and the viewer (what receiving alone costs)

    def start(self) -> None:
        data = self.work / "m3-data"
        config = self.work / "m3.toml"
        config.write_text(f'[node]\nae_title = "M3DICOM"\ndata_dir = "{data}"\n'
                          f'[dicom]\nport = {self.port}\ncertificate = "{self.pki}/server.pem"\n'
                          f'private_key = "{self.pki}/server.key"\nca_certificates = "{self.pki}/ca.pem"\n'
                          f'max_associations = 64\nreceivers = {self.receivers}\n[log]\nlevel = "WARNING"\n'
                          + ("[router]\nenabled = false\n[viewer]\nenabled = false\n" if self.bare else ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                                     cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.work / "m3.log", "ab"))
        wait_port(self.port)


class Orthanc(Receiver):
    name, aet = "Orthanc (TLS, fsync)", "ORTHANC"

    def start(self) -> None:
        store = self.work / "orthanc-db"
        config = self.work / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(store), "IndexDirectory": str(store),
            "DicomAet": "ORTHANC", "DicomPort": self.port, "HttpPort": free_port(), "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomTlsEnabled": True, "DicomTlsCertificate": f"{self.pki}/server.pem",
            "DicomTlsPrivateKey": f"{self.pki}/server.key", "DicomTlsTrustedCertificates": f"{self.pki}/ca.pem",
            "DicomTlsRemoteCertificateRequired": True, "SyncStorageArea": True, "StorageCompression": False,
            "MaximumStorageCacheSize": 0, "Plugins": [], "LogLevel": "default",
        }))
        self.proc = subprocess.Popen(["Orthanc", str(config)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / "orthanc.log", "ab"))
        wait_port(self.port)


class Storescp(Receiver):
    name, aet = "dcmtk storescp +tls (no fsync, no index)", "STORESCP"

    def start(self) -> None:
        out = self.work / "storescp-out"
        out.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "+tls", f"{self.pki}/server.key", f"{self.pki}/server.pem", "+cf", f"{self.pki}/ca.pem",
             "-aet", "STORESCP", "-od", str(out), "+uf", "+xa", "+B",
             str(self.port)], env=ENV, stdout=subprocess.DEVNULL, stderr=open(self.work / "storescp.log", "ab"))
        wait_port(self.port)


# -- senders -----------------------------------------------------------------------------

def storescu(receiver: Receiver, pki: Path, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "+tls", f"{pki}/client.key", f"{pki}/client.pem", "+cf", f"{pki}/ca.pem",
         "-aet", "BENCH", "-aec", receiver.aet, "127.0.0.1", str(receiver.port), *map(str, files)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_scenario(kind: str, receiver: Receiver, pki: Path, files: list[Path]) -> tuple[float, float]:
    """Returns (wall seconds, receiver CPU seconds)."""
    cpu0 = receiver.cpu_seconds()
    t0 = time.perf_counter()
    if kind == "short":
        for f in files:
            p = storescu(receiver, pki, [f])
            if p.wait() != 0:
                raise RuntimeError(p.stderr.read().decode()[-500:])
    else:
        parts = [files[i::4] for i in range(4)] if kind == "parallel" else [files]
        procs = [storescu(receiver, pki, part) for part in parts]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"{receiver.name}: {p.stderr.read().decode()[-500:]}")
    return time.perf_counter() - t0, receiver.cpu_seconds() - cpu0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=50)
    ap.add_argument("--short", type=int, default=60)
    ap.add_argument("--only", default="m3dicom,orthanc,storescp")
    ap.add_argument("--receivers", type=int, default=1, help="m3dicom's dicom.receivers (0 = one per core)")
    ap.add_argument("--scenarios", default="small,large,short,parallel")
    ap.add_argument("--bare", action="store_true", help="m3dicom without its router and viewer processes")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="m3bench-"))
    try:
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "node.cli", "certs", "init", "--dir", str(pki)], cwd=ROOT,
                       check=True, capture_output=True)
        print("generating data ...", file=sys.stderr)
        data = {"small": small_set(work / "small", args.small),
                "large": large_set(work / "large", args.large),
                "short": None, "parallel": None}
        data["short"] = data["small"][:args.short]
        data["parallel"] = data["small"]
        M3dicom.receivers, M3dicom.bare = args.receivers, args.bare
        data = {k: v for k, v in data.items() if k in args.scenarios.split(",")}
        kinds = {"m3dicom": M3dicom, "orthanc": Orthanc, "storescp": Storescp}
        results: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for name in args.only.split(","):
            cls = kinds[name]
            results[cls.name] = {k: [] for k in data}
            for run in range(args.runs):
                for scenario, files in data.items():
                    rdir = work / f"{name}-{scenario}-{run}"
                    rdir.mkdir()
                    receiver = cls(rdir, pki)
                    receiver.start()
                    receiver.settle()
                    try:
                        wall, cpu = run_scenario(scenario, receiver, pki, files)
                    finally:
                        receiver.stop()
                        shutil.rmtree(rdir, ignore_errors=True)
                    results[cls.name][scenario].append((wall, cpu))
                    print(f"{cls.name:45s} {scenario:9s} run {run + 1}: {len(files) / wall:7.1f} inst/s "
                          f"cpu {cpu:.1f}s", file=sys.stderr)
        sizes = {k: sum(f.stat().st_size for f in v) / 1e6 for k, v in data.items()}
        print(table(results, data, sizes, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(results, data, sizes, args) -> str:
    columns = {"small": f"(a) {args.small} small, 1 assoc: inst/s", "large": f"(b) {args.large} large: MB/s",
               "short": f"(c) {args.short} short assocs: inst/s", "parallel": "(d) 4 parallel senders: inst/s"}
    shown = [k for k in columns if k in data]
    lines = ["| receiver | " + " | ".join(columns[k] for k in shown) + f" | receiver CPU s ({'/'.join(shown)}) |",
             "|" + "---|" * (len(shown) + 2)]
    for name, by in results.items():
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in by.items()}
        cells = []
        for k in shown:
            rate = (sizes[k] if k == "large" else len(data[k])) / med[k][0]
            cells.append(f"{rate:.1f}" if k == "short" else f"{rate:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + "/".join(f"{med[k][1]:.1f}" for k in shown) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
