"""Ingest benchmark: dcmtk storescu over DICOM TLS into m3dicom, Orthanc and dcmtk storescp.

Workloads (issues 2 and 18), each a fresh receiver timed once it has settled: (a) 500 small CT
instances on one association, (b) 50 mammography-sized instances (10-27 MB), (c) 60 one-instance
associations in a row, and the receiver's CPU per association (what a sender's own cost cannot cap),
(c') 4 and 16 loops of one-instance associations at once, (d) 4 and 16 storescu processes at once
on the small set, (e) Orthanc's published workload: a 373-slice CT (187 MB, Explicit VR Little
Endian) dealt out to 1, 8 and 16 storescu at once. Prints one row per workload: instances/s (or
MB/s) and the receiver's CPU seconds (all its processes), median of N runs, the first receiver
against Orthanc, and the peak resident memory of all the receiver's processes with 16
associations. Not a test: nothing is asserted.

The index's engines side by side (issue 16): `m3dicom-s3` (the SQLite file) and `m3dicom-pg`
(PostgreSQL: a private cluster started here, fsync and synchronous_commit on, as the tests'
one) both keep their blobs locally and offload them to one moto S3 server started here (a
shared index needs storage.backend = "s3"); `two-nodes` is two m3dicom nodes on that one
PostgreSQL and S3, each sent half of every scenario by its own storescu processes (scenario (a)
sends 2 x 250 on two associations; the whole machine has 2 cores: the two nodes share them).

    .venv/bin/python bench/ingest.py [--runs 3] [--large 50] [--only m3dicom,orthanc,storescp]
    .venv/bin/python bench/ingest.py --only m3dicom-s3,m3dicom-pg,two-nodes
    .venv/bin/python bench/ingest.py --only m3dicom-nometrics,m3dicom,m3dicom-audit --scenarios small,parallel
    .venv/bin/python bench/ingest.py --only m3dicom,m3dicom-1,orthanc,storescp    # m3dicom-1: dicom.receivers = 1
    .venv/bin/python bench/ingest.py --only m3dicom,orthanc --scenarios short,loops4,loops16,parallel16

The cost of operating the node (issue 19): `m3dicom-nometrics` ([metrics] port = 0), `m3dicom` (/metrics on,
the default) and `m3dicom-audit` (and an IHE ATNA audit trail, sent over TLS to a sink here that drops it).
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
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


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


def ct_volume(directory: Path, count: int) -> list[Path]:
    """Orthanc's published ingest workload: a CT of `count` 512 x 512 16-bit slices in Explicit VR
    Little Endian (373 slices: 187 MB), one series, from CT_small's attributes."""
    src = pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm")
    del src.PixelData
    src.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    src.StudyInstanceUID, src.SeriesInstanceUID = generate_uid(), generate_uid()
    src.Rows = src.Columns = 512
    src.BitsAllocated, src.BitsStored, src.HighBit, src.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(373)
    slab = rng.integers(0, 4095, 512 * 512 * 8, dtype=np.uint16)     # slices differ; generating 187 MB is slow
    directory.mkdir(parents=True)
    paths = []
    for i in range(count):
        src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        src.PixelData = np.roll(slab, i * 4099)[:512 * 512].tobytes()
        src["PixelData"].VR = "OW"
        path = directory / f"{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
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
        its Dask cluster and viewer included, use under 20% of a core for 1.5 s: an idle m3dicom
        node with S3 offload uses ~12%, its Dask scheduler and worker polling), so that start-up
        work does not count as reception."""
        deadline, last, quiet = time.monotonic() + timeout, self.cpu_seconds(), 0
        while quiet < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - last < 0.1 else 0
            last = now

    def cpu_seconds(self) -> float:
        try:
            p = psutil.Process(self.proc.pid)
            t = p.cpu_times()
            return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system
                                           for c in p.children(recursive=True))
        except psutil.Error:
            return float("nan")

    def rss_mb(self) -> float:
        """Resident memory of the receiver and its child processes (m3dicom's router, Dask, viewer)."""
        try:
            p = psutil.Process(self.proc.pid)
            return sum(q.memory_info().rss for q in (p, *p.children(recursive=True))) / 1e6
        except psutil.Error:
            return 0.0


class AuditSink:
    """An audit repository that takes syslog over TLS and drops it (what the node's sender costs, not rsyslog's)."""

    def __init__(self, pki: Path):
        import ssl
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki / "server.pem", pki / "server.key")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.received = self.sock.getsockname()[1], 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                while chunk := tls.recv(65536):
                    self.received += len(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class M3dicom(Receiver):
    name, aet = "m3dicom", "M3DICOM"
    receivers = 0  # dicom.receivers (0, the default: one per core)
    bare = False   # without the router and the viewer (what receiving alone costs)
    metrics = True  # /metrics on (the default): every process counts into its files
    audit = False   # an IHE ATNA audit trail to a repository (an `AuditSink`)
    services: "Services | None" = None     # the PostgreSQL cluster and the S3 server, for the variants below
    sink: "AuditSink | None" = None

    def start(self, node: str = "a", index_url: str = "", s3: bool = False) -> None:
        data = self.work / f"m3-data-{node}"
        config = self.work / f"m3-{node}.toml"
        env = dict(ENV)
        extra = ""
        if index_url:
            extra += f'[index]\nurl = "{index_url}"\n'
            env.update(self.services.pg.env)
        if s3:
            extra += (f'[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "{self.services.bucket}"\n'
                      f'endpoint_url = "{self.services.s3_url}"\n')
            env.update(S3_ENV)
        extra += f"[metrics]\nport = {free_port() if self.metrics else 0}\n"
        if self.audit:
            M3dicom.sink = M3dicom.sink or AuditSink(self.pki)
            extra += f'[audit]\nrepository = "127.0.0.1:{M3dicom.sink.port}"\n'
        config.write_text(f'[node]\nae_title = "M3DICOM"\ndata_dir = "{data}"\nname = "bench-{node}"\n'
                          f'[dicom]\nport = {self.port}\ncertificate = "{self.pki}/server.pem"\n'
                          f'private_key = "{self.pki}/server.key"\nca_certificates = "{self.pki}/ca.pem"\n'
                          # 64: 16 senders from one address fit in its share (half)
                          f'max_associations = 64\nreceivers = {self.receivers}\n[log]\nlevel = "WARNING"\n'
                          + extra
                          + ("[router]\nenabled = false\n[viewer]\nenabled = false\n" if self.bare
                             else f"[viewer]\nport = {free_port()}\n"))     # two nodes on one machine
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / f"m3-{node}.log", "ab"))
        wait_port(self.port)


class M3dicomOneReceiver(M3dicom):
    name = "m3dicom, dicom.receivers = 1"
    receivers = 1


class M3dicomTwoReceivers(M3dicom):
    name = "m3dicom, dicom.receivers = 2"
    receivers = 2


class M3dicomNoMetrics(M3dicom):
    name = "m3dicom, metrics off"
    metrics = False


class M3dicomAudit(M3dicom):
    name = "m3dicom, metrics and ATNA audit"
    audit = True


class M3dicomS3(M3dicom):
    name = "m3dicom (SQLite index, S3)"

    def start(self) -> None:
        super().start(s3=True)


class M3dicomPG(M3dicom):
    name = "m3dicom (PostgreSQL index, S3)"

    def start(self) -> None:
        super().start(index_url=self.services.database(), s3=True)


class TwoNodes(Receiver):
    """Two m3dicom nodes on one PostgreSQL database and one bucket; `ports` are both nodes' ports."""
    name = "two m3dicom nodes (one PostgreSQL, one S3)"
    aet = "M3DICOM"

    def start(self) -> None:
        url = M3dicom.services.database()
        self.nodes = [M3dicom(self.work, self.pki), M3dicom(self.work, self.pki)]
        for node, label in zip(self.nodes, "ab"):
            if label == "b":        # the nodes share one key-encryption key: B gets A's before its first start
                shutil.copytree(self.work / "m3-data-a" / "keys", self.work / "m3-data-b" / "keys")
                (self.work / "m3-data-b").chmod(0o700)
            node.start(node=label, index_url=url, s3=True)   # one after the other: the first migrates
        self.ports = [n.port for n in self.nodes]
        self.port, self.proc = self.ports[0], self.nodes[0].proc

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cpu_seconds(self) -> float:
        return sum(node.cpu_seconds() for node in self.nodes)

    def rss_mb(self) -> float:
        return sum(node.rss_mb() for node in self.nodes)


class Services:
    """What the S3 and PostgreSQL variants share: moto's S3 server and a private PostgreSQL cluster
    (tests/pgcluster.py), started once for the whole run; a fresh database per receiver."""

    def __init__(self, work: Path, postgresql: bool):
        sys.path.insert(0, str(ROOT / "tests"))
        import boto3

        port = free_port()
        self.s3_url = f"http://127.0.0.1:{port}"
        self.moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        self.bucket = "m3bench"
        boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket=self.bucket)
        self.pg = None
        if postgresql:
            from pgcluster import Cluster
            self.pg = Cluster().start()
        self._databases = 0

    def database(self) -> str:
        self._databases += 1
        return self.pg.create_database(f"bench{self._databases}")

    def stop(self) -> None:
        self.moto.terminate()
        self.moto.wait(10)
        if self.pg:
            self.pg.stop()


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

def storescu(receiver: Receiver, pki: Path, files: list[Path], port: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        ["storescu", "+tls", f"{pki}/client.key", f"{pki}/client.pem", "+cf", f"{pki}/ca.pem",
         "-aet", "BENCH", "-aec", receiver.aet, "127.0.0.1", str(port or receiver.port), *map(str, files)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# workload -> (data set, how it is sent, senders): "senders" = that many storescu processes at once, the
# files dealt out between them; "loops" = that many loops at once, each one storescu (one association) per file
SCENARIOS = {
    "small": ("small", "senders", 1), "large": ("large", "senders", 1), "short": ("short", "loops", 1),
    "loops4": ("loops", "loops", 4), "loops16": ("loops", "loops", 16),
    "parallel": ("small", "senders", 4), "parallel16": ("small", "senders", 16),
    "ct1": ("ct", "senders", 1), "ct8": ("ct", "senders", 8), "ct16": ("ct", "senders", 16),
}


KINDS = {"m3dicom": M3dicom, "m3dicom-1": M3dicomOneReceiver, "m3dicom-2": M3dicomTwoReceivers,
         "m3dicom-nometrics": M3dicomNoMetrics, "m3dicom-audit": M3dicomAudit,
         "m3dicom-s3": M3dicomS3, "m3dicom-pg": M3dicomPG, "two-nodes": TwoNodes,
         "orthanc": Orthanc, "storescp": Storescp}


def run_scenario(kind: str, receiver: Receiver, pki: Path, files: list[Path]) -> tuple[float, float, float]:
    """Returns (wall seconds, receiver CPU seconds, receiver peak RSS in MB: all its processes). A receiver
    with several `ports` (two nodes) gets the senders and loops dealt out over them."""
    import threading

    _, how, count = SCENARIOS[kind]
    ports = getattr(receiver, "ports", [receiver.port])
    count = max(count, len(ports))
    parts = [files[i::count] for i in range(count)]
    peak, done = [receiver.rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], receiver.rss_mb())
    sampler = threading.Thread(target=sample, daemon=True)
    failures: list[str] = []

    def loop(part: list[Path], port: int) -> None:
        for f in part:
            p = storescu(receiver, pki, [f], port)
            if p.wait() != 0:
                failures.append(p.stderr.read().decode()[-500:])
                return
    cpu0 = receiver.cpu_seconds()
    sampler.start()
    t0 = time.perf_counter()
    if how == "loops":
        threads = [threading.Thread(target=loop, args=(part, ports[i % len(ports)])) for i, part in enumerate(parts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        procs = [storescu(receiver, pki, part, ports[i % len(ports)]) for i, part in enumerate(parts)]
        failures += [f"storescu exit {p.returncode}: {p.stderr.read().decode()[-500:]}" for p in procs if p.wait() != 0]
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if failures:
        raise RuntimeError(f"{receiver.name} {kind}: {failures[0]}")
    return wall, receiver.cpu_seconds() - cpu0, peak[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="runs of each workload (the table shows the median)")
    ap.add_argument("--small", type=int, default=500, help="small instances for (a) and (d)")
    ap.add_argument("--large", type=int, default=50, help="large mammograms for (b)")
    ap.add_argument("--short", type=int, default=60, help="one-instance associations for (c)")
    ap.add_argument("--loop-files", type=int, default=96, help="one-instance associations for loops4 and loops16")
    ap.add_argument("--ct", type=int, default=373, help="slices of the CT for ct1, ct8 and ct16")
    ap.add_argument("--only", default="m3dicom,orthanc,storescp",
                    help="a comma-separated list of receivers: "
                    + "; ".join(f"{k} ({v.name})" for k, v in KINDS.items()))
    ap.add_argument("--receivers", type=int, default=0, help="m3dicom's dicom.receivers (0, the node's default: "
                    "one per core)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="a comma-separated list of: " + ", ".join(SCENARIOS))
    ap.add_argument("--bare", action="store_true", help="m3dicom without its router and viewer processes")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="m3bench-"))
    try:
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "node.cli", "certs", "init", "--dir", str(pki)], cwd=ROOT,
                       check=True, capture_output=True)
        print("generating data ...", file=sys.stderr)
        wanted = args.scenarios.split(",")
        if unknown := set(wanted) - set(SCENARIOS):
            ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        sets = {SCENARIOS[k][0] for k in wanted}
        small = small_set(work / "small", max(args.small, args.short, args.loop_files))
        data_sets = {"small": small[:args.small], "short": small[:args.short], "loops": small[:args.loop_files]}
        if "large" in sets:
            data_sets["large"] = large_set(work / "large", args.large)
        if "ct" in sets:
            data_sets["ct"] = ct_volume(work / "ct", args.ct)
        data = {k: data_sets[SCENARIOS[k][0]] for k in wanted}
        M3dicom.receivers, M3dicom.bare = args.receivers, args.bare
        chosen = args.only.split(",")
        if {"m3dicom-s3", "m3dicom-pg", "two-nodes"} & set(chosen):
            M3dicom.services = Services(work, postgresql=bool({"m3dicom-pg", "two-nodes"} & set(chosen)))
        results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        for name in chosen:
            cls = KINDS[name]
            results[cls.name] = {k: [] for k in data}
            for run in range(args.runs):
                for scenario, files in data.items():
                    rdir = work / f"{name}-{scenario}-{run}"
                    rdir.mkdir()
                    receiver = cls(rdir, pki)
                    receiver.start()
                    receiver.settle()
                    os.sync()   # the last workload's writes (a GB of mammograms) on disk now, not during this one's fsyncs
                    try:
                        wall, cpu, rss = run_scenario(scenario, receiver, pki, files)
                    except RuntimeError as exc:    # a sender failed: this run is left out, the others go on
                        print(f"{cls.name} {scenario} run {run + 1} left out: {exc}", file=sys.stderr)
                        continue
                    finally:
                        receiver.stop()
                        shutil.rmtree(rdir, ignore_errors=True)
                    results[cls.name][scenario].append((wall, cpu, rss))
                    if args.json:                   # what is measured so far, should a later run fail
                        args.json.write_text(json.dumps(results, indent=1))
                    print(f"{cls.name:45s} {scenario:10s} run {run + 1}: {len(files) / wall:7.1f} inst/s "
                          f"cpu {cpu:.1f}s peak RSS {rss:.0f} MB", file=sys.stderr)
        print(table(results, data, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        if M3dicom.services:
            M3dicom.services.stop()
        if M3dicom.sink:
            M3dicom.sink.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(results, data, args) -> str:
    """One row per workload, one column per receiver: the rate (receiver CPU seconds), median of the runs;
    then the first receiver against Orthanc (>= 1 is ahead: for CPU per association, Orthanc's / ours)."""
    labels = {"small": f"(a) {args.small} small, 1 association (inst/s)", "large": f"(b) {args.large} large (MB/s)",
              "short": f"(c) {args.short} one-instance associations in a row (inst/s)",
              "loops4": f"(c') 4 loops of one-instance associations, {args.loop_files} in all (inst/s)",
              "loops16": f"(c') 16 loops of one-instance associations, {args.loop_files} in all (inst/s)",
              "parallel": f"(d) 4 storescu at once, {args.small} small (inst/s)",
              "parallel16": f"(d) 16 storescu at once, {args.small} small (inst/s)",
              **{f"ct{n}": f"(e) {args.ct}-slice CT, {n} storescu (inst/s)" for n in (1, 8, 16)}}
    names = list(results)
    orthanc = next((n for n in names if n.startswith("Orthanc")), None)
    versus = f"{names[0]} / Orthanc" if orthanc and names[0] != orthanc else None
    lines = ["| workload | " + " | ".join(names) + (f" | {versus} |" if versus else " |"),
             "|---|" + "---|" * (len(names) + bool(versus))]
    med = {n: {k: [statistics.median(r[i] for r in v) if v else float("nan") for i in range(3)] for k, v in by.items()}
           for n, by in results.items()}

    def row(label: str, cells: dict[str, float], fmt, ratio: float | None) -> str:
        return (f"| {label} | " + " | ".join(fmt(cells[n]) for n in names)
                + (f" | {ratio:.2f}x |" if versus and ratio is not None else " | |" if versus else " |"))
    for k in data:
        size = sum(f.stat().st_size for f in data[k]) / 1e6 if k == "large" else len(data[k])
        rate = {n: (size / med[n][k][0], med[n][k][1]) for n in names}
        lines.append(row(labels[k], rate, lambda c: f"{c[0]:.{1 if c[0] < 100 else 0}f} ({c[1]:.1f} s)",
                         rate[names[0]][0] / rate[orthanc][0] if versus else None))
        if k == "short":
            per = {n: 1000 * med[n][k][1] / len(data[k]) for n in names}
            lines.append(row("(c) receiver CPU per one-instance association (ms)", per, lambda c: f"{c:.1f}",
                             per[orthanc] / per[names[0]] if versus else None))
    busy = [k for k in ("loops16", "parallel16", "ct16") if k in data]
    if busy:
        rss = {n: max(med[n][k][2] for k in busy) for n in names}
        lines.append(row("peak RSS with 16 associations, all processes (MB)", rss, lambda c: f"{c:.0f}", None))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
