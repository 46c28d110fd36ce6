"""Ingest benchmark: dcmtk storescu over DICOM TLS into m3dicom, Orthanc and dcmtk storescp.

Scenarios (as issue 2 asks): (a) 500 small CT instances on one association, (b) 50
mammography-sized instances (10-27 MB), (c) 60 short associations of one instance each,
(d) 4 storescu processes in parallel. Prints instances/s, MB/s and the receiver's CPU
seconds, median of N runs, as a Markdown table. Not a test: nothing is asserted.

The index's engines side by side (issue 16): `m3dicom-s3` (the SQLite file) and `m3dicom-pg`
(PostgreSQL: a private cluster started here, fsync and synchronous_commit on, as the tests'
one) both keep their blobs locally and offload them to one moto S3 server started here (a
shared index needs storage.backend = "s3"); `two-nodes` is two m3dicom nodes on that one
PostgreSQL and S3, each sent half of every scenario by its own storescu processes (scenario (a)
sends 2 x 250 on two associations; the whole machine has 2 cores: the two nodes share them).

    .venv/bin/python bench/ingest.py [--runs 3] [--large 50] [--only m3dicom,orthanc,storescp]
    .venv/bin/python bench/ingest.py --only m3dicom-s3,m3dicom-pg,two-nodes
    .venv/bin/python bench/ingest.py --only m3dicom-nometrics,m3dicom,m3dicom-audit --scenarios small,parallel

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
from pydicom.uid import generate_uid

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
    receivers = 1  # dicom.receivers
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
                          f'max_associations = 64\nreceivers = {self.receivers}\n[log]\nlevel = "WARNING"\n'
                          + extra
                          + ("[router]\nenabled = false\n[viewer]\nenabled = false\n" if self.bare
                             else f"[viewer]\nport = {free_port()}\n"))     # two nodes on one machine
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / f"m3-{node}.log", "ab"))
        wait_port(self.port)


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


def run_scenario(kind: str, receiver: Receiver, pki: Path, files: list[Path]) -> tuple[float, float]:
    """Returns (wall seconds, receiver CPU seconds). A receiver with several `ports` (two nodes) gets
    each sender's files spread over them: short associations alternate, parallel senders go half to each."""
    ports = getattr(receiver, "ports", [receiver.port])
    cpu0 = receiver.cpu_seconds()
    t0 = time.perf_counter()
    if kind == "short" and len(ports) > 1:
        loops = [subprocess.Popen([sys.executable, __file__, "--short-loop", str(port), str(pki), receiver.aet,
                                   *map(str, files[i::len(ports)])]) for i, port in enumerate(ports)]
        for p in loops:
            if p.wait() != 0:
                raise RuntimeError(f"{receiver.name}: a loop of short associations failed")
    elif kind == "short":
        for f in files:
            p = storescu(receiver, pki, [f])
            if p.wait() != 0:
                raise RuntimeError(p.stderr.read().decode()[-500:])
    else:
        senders = 4 if kind == "parallel" else len(ports)
        parts = [files[i::senders] for i in range(senders)]
        procs = [storescu(receiver, pki, part, ports[i % len(ports)]) for i, part in enumerate(parts)]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"{receiver.name}: {p.stderr.read().decode()[-500:]}")
    return time.perf_counter() - t0, receiver.cpu_seconds() - cpu0


def short_loop(port: int, pki: Path, aet: str, files: list[str]) -> int:
    """One association per file, one after the other (the two-node short scenario runs one loop per node)."""
    class At:
        pass
    at = At()
    at.aet, at.port = aet, port
    for f in files:
        p = storescu(at, pki, [Path(f)])
        if p.wait() != 0:
            print(p.stderr.read().decode()[-500:], file=sys.stderr)
            return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--short-loop"]:
        return short_loop(int(argv[1]), Path(argv[2]), argv[3], argv[4:])
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
        kinds = {"m3dicom": M3dicom, "m3dicom-nometrics": M3dicomNoMetrics, "m3dicom-audit": M3dicomAudit,
                 "m3dicom-s3": M3dicomS3, "m3dicom-pg": M3dicomPG, "two-nodes": TwoNodes,
                 "orthanc": Orthanc, "storescp": Storescp}
        chosen = args.only.split(",")
        if {"m3dicom-s3", "m3dicom-pg", "two-nodes"} & set(chosen):
            M3dicom.services = Services(work, postgresql=bool({"m3dicom-pg", "two-nodes"} & set(chosen)))
        results: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for name in chosen:
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
        if M3dicom.services:
            M3dicom.services.stop()
        if M3dicom.sink:
            M3dicom.sink.close()
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
