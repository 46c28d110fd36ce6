"""Test helpers: test data, `m3dicom serve` as a real subprocess, polling with a deadline."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parent.parent
M3DICOM = [sys.executable, "-m", "node.cli"]
STOCK_PATH_ENV = "M3DICOM_TEST_STOCK_PATH"   # set: the nodes tests start take pynetdicom's generic path
_PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def data_file(name: str) -> Path:
    """A file shipped with pydicom or pydicom-data (never downloaded)."""
    for base in (_PYDICOM_FILES, _pydicom_data_dir()):
        if base and (base / name).is_file():
            return base / name
    raise FileNotFoundError(name)


def _pydicom_data_dir() -> Path | None:
    try:
        import data_store
    except ImportError:
        return None
    return Path(data_store.__file__).parent / "data"


def dataset_offset(data: bytes) -> int:
    """Where a Part 10 file's data set starts (after preamble and file meta group)."""
    from io import BytesIO

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = BytesIO(data)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return fh.tell()


def shows_part10_header(body: bytes, plaintext: bytes) -> bool:
    """Whether `body` holds the 32 bytes after the preamble of the Part 10 file `plaintext`
    ("DICM" and the start of its file meta): long enough that ciphertext never does by chance,
    where "DICM" alone turns up in about 1 of 300 ciphertexts of 12 MB."""
    return plaintext[128:160] in body


def dataset_sha256(path: Path | bytes) -> str:
    """SHA-256 of a Part 10 file's data set (everything after the file meta group)."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return hashlib.sha256(data[dataset_offset(data):]).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """Ports free now and different from each other (bound together: two calls of free_port may give one port
    twice, which a node refuses for two of its listeners)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def arrived(folder: Path) -> list[Path]:
    """The files the `storescp` fixture has finished writing in `folder` (it names a file before it
    has written it all; its exec-on-reception marks each whole one in the folder beside)."""
    done = folder.with_name(folder.name + ".done")
    return sorted(p for p in folder.iterdir() if (done / p.name).exists())


@contextmanager
def paused(*processes):
    """The processes (psutil handles) stopped, every thread of them, for the block: a process that
    has only been sent SIGSTOP may still accept a connection in a thread not yet stopped. Never
    stopped while one of them holds the receivers' association table (scp.slots): the others would
    refuse every association as long as it is held (as they should, for a receiver that stalls)."""
    for _ in range(200):
        for process in processes:
            process.suspend()
        try:
            for process in processes:
                wait_for(lambda: all(_state(process.pid, task) in ("T", "t", None)
                                     for task in os.listdir(f"/proc/{process.pid}/task")),
                         timeout=10, interval=0.005, what=f"every thread of process {process.pid} to stop")
            if _association_table_free(processes):
                break
        except BaseException:
            for process in processes:
                process.resume()
            raise
        for process in processes:
            process.resume()
        time.sleep(0.01)
    else:
        raise AssertionError("the association table was held at every one of 200 pauses")
    try:
        yield
    finally:
        for process in processes:
            process.resume()


def _association_table_free(processes) -> bool:
    """Whether no process holds the association table's lock (True where there is no table)."""
    for process in processes:
        for fd in os.listdir(f"/proc/{process.pid}/fd"):
            try:
                if not os.readlink(f"/proc/{process.pid}/fd/{fd}").startswith("/memfd:m3dicom-associations"):
                    continue
                table = os.open(f"/proc/{process.pid}/fd/{fd}", os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(table, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            finally:
                os.close(table)   # closing the only descriptor of this open file lets go of the lock
            return True
    return True


def _state(pid: int, task: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/task/{task}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


class Node:
    """`m3dicom serve` in a subprocess with its own data directory and ports."""

    def __init__(self, workdir: Path, pki: Path, **sections):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port, self.plain_port, viewer_port = free_ports(3)
        self.data_dir = workdir / "var"
        self.config_path = workdir / "node.toml"
        self.log_path = workdir / "node.log"
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}   # extra environment of the node process
        settings = {
            "node": {"ae_title": "M3DICOM", "data_dir": str(self.data_dir)},
            # one receiving process unless a test asks for more: each more takes ~0.7 s to start on 2 cores,
            # paid by every node of the suite (the node's default, one per core, is tested where it matters)
            "dicom": {"host": "127.0.0.1", "port": self.port, "plain_port": self.plain_port, "receivers": 1,
                      "certificate": str(pki / "server.pem"), "private_key": str(pki / "server.key"),
                      "ca_certificates": str(pki / "ca.pem")},
            "client": {"certificate": str(pki / "client.pem"), "private_key": str(pki / "client.key")},
            "viewer": {"enabled": False, "port": viewer_port},   # tests that use it turn it on
            "metrics": {"port": 0},                              # and so do those of /metrics
        }
        if os.environ.get(STOCK_PATH_ENV):      # `make test-stock-path`: pynetdicom's own path
            settings["dicom"]["fast_path"] = False
        for name, values in sections.items():
            settings.setdefault(name, {}).update(values)
        self.data_dir = Path(settings["node"]["data_dir"])
        self.settings = settings
        self.config_path.write_text(_toml(settings))

    def start(self) -> "Node":
        self._log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size  # a restart appends: look only at the new lines
        self.proc = subprocess.Popen(M3DICOM + ["serve", "--config", str(self.config_path)], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_for(lambda: b"listening on" in self.log_path.read_bytes()[offset:] or self.proc.poll() is not None,
                 timeout=30, what="the node to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"node exited at start:\n{self.log()}")
        receivers = self.settings["dicom"]["receivers"] or min(4, len(os.sched_getaffinity(0)))   # 0: one per core
        wait_for(lambda: all(f"receiver {i} ready".encode() in self.log_path.read_bytes()[offset:]
                             for i in range(1, receivers)) or self.proc.poll() is not None,
                 timeout=30, what="every receiving process to be ready")
        return self

    def receiving_processes(self) -> list:
        """The node process and the receivers it spawned (psutil handles): those listening on the DICOM port."""
        import psutil

        node = psutil.Process(self.proc.pid)
        return [p for p in [node, *node.children()]
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in p.net_connections("tcp"))]

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        self.proc = None

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- looking inside (read-only) ----------------------------------------------------

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows of one read of the node's index (`?` parameters): its SQLite file, or the PostgreSQL
        database of its `[index] url`, read through the index's engines."""
        url = self.settings.get("index", {}).get("url")
        if url:
            return self._postgresql_rows(url, sql, params)
        import sqlite3

        conn = sqlite3.connect(self.data_dir / "index.sqlite3", timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def _postgresql_rows(self, url: str, sql: str, params: tuple) -> list[tuple]:
        import sqlalchemy as sa
        from archive.db import open_engines

        pieces = sql.split("?")
        named = "".join(piece + (f":p{n}" if n < len(params) else "") for n, piece in enumerate(pieces))
        engines = open_engines(url)
        try:
            with engines.readers.connect() as conn:
                return [tuple(row) for row in conn.execute(sa.text(named), {f"p{n}": v for n, v in enumerate(params)})]
        finally:
            engines.dispose()

    def spool_files(self) -> list[Path]:
        """Received data sets not yet stored (plaintext), in every receiver's spool."""
        return [p for p in (self.data_dir / "spool").rglob("*") if p.is_file()]

    def stored_bytes(self, sop_instance_uid: str) -> bytes:
        (blob_id,), = self.rows("SELECT blob_id FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return self.stored_bytes_of_blob(blob_id)

    def stored_bytes_of_blob(self, blob_id: str) -> bytes:
        """The plaintext of a local blob (an instance, or a job's file)."""
        return self.local_storage().read_all(blob_id)

    def local_storage(self):
        """The node's local blob store, read with its keys as they are now."""
        from archive.crypto import LocalKeyring
        from archive.storage import LocalStorage

        return LocalStorage(self.data_dir / "blobs", LocalKeyring.open(self.data_dir / "keys", create=False))

    def stored_dataset_sha256(self, blob_id: str) -> str:
        """SHA-256 of a stored instance's data set, streamed (never whole in memory)."""
        from archive.crypto import LocalKeyring
        from archive.storage import LocalStorage

        storage = LocalStorage(self.data_dir / "blobs", LocalKeyring.open(self.data_dir / "keys", create=False))
        digest = hashlib.sha256()
        with storage.open(blob_id) as reader:
            skip = dataset_offset(b"".join(reader.iter_plaintext(0, 65536)))
            for chunk in reader.iter_plaintext(skip):
                digest.update(chunk)
        return digest.hexdigest()

    def blob_files(self) -> list[Path]:
        return [p for p in (self.data_dir / "blobs").rglob("*") if p.is_file()]

    # -- peers -----------------------------------------------------------------------

    def associate(self, calling_ae: str, *contexts: str, tls: bool = True, transfer_syntaxes=None, **options):
        """A pynetdicom association to this node (mutual TLS unless `tls=False`), established."""
        from pynetdicom import AE, evt

        from scp.tls import client_context, no_delay

        ae = AE(ae_title=calling_ae)
        for sop_class in contexts:
            if transfer_syntaxes:
                ae.add_requested_context(sop_class, transfer_syntaxes)
            else:
                ae.add_requested_context(sop_class)
        if tls:
            context = client_context(self.pki / "ca.pem", self.pki / "client.pem", self.pki / "client.key")
            options["tls_args"] = (context, "localhost")
        options.setdefault("evt_handlers", []).append((evt.EVT_CONN_OPEN, no_delay))
        assoc = ae.associate("127.0.0.1", self.port if tls else self.plain_port, ae_title="M3DICOM", **options)
        assert assoc.is_established, f"association refused:\n{self.log()[-2000:]}"
        return assoc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`m3dicom ARGS --config` this node's configuration, with its environment."""
        result = subprocess.run(M3DICOM + [*args, "--config", str(self.config_path)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, **self.env})
        if check and result.returncode != 0:
            raise AssertionError(f"m3dicom {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    # -- after an attack ----------------------------------------------------------------

    def processes(self) -> list:
        """psutil handles of the node and every process it started (receivers, viewer, ...)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the node's receiving processes together, bytes (children gone
        between the listing and the reading count as zero)."""
        import psutil

        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stored_state(self) -> dict[str, tuple]:
        """SOP Instance UID -> (patient id, study, series, data set SHA-256) of every stored
        instance: take it before an attack, compare after (nothing stored may change)."""
        rows = self.rows("SELECT i.sop_instance_uid, p.patient_id, st.study_uid, se.series_uid, i.blob_id "
                         "FROM instances i JOIN series se ON se.pk = i.series_pk "
                         "JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk")
        return {uid: (pid, study, series, self.stored_dataset_sha256(blob)) for uid, pid, study, series, blob in rows}

    def still_serves(self, tmp: Path, within: float = 2.0) -> float:
        """A real storescu with a valid certificate stores a new instance over TLS within
        `within` seconds; returns the seconds it took."""
        path, = synthetic_instances(tmp / f"probe-{time.monotonic_ns()}", 1, patient="Probe^Health")
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        started = time.monotonic()
        result = self.storescu(path, check=False, timeout=within + 30)
        took = time.monotonic() - started
        assert result.returncode == 0, f"storescu failed after the attack:\n{result.stderr}\n{self.log()[-3000:]}"
        assert self.rows("SELECT COUNT(*) FROM instances WHERE sop_instance_uid=?", (uid,)) == [(1,)]
        assert took <= within, f"storescu took {took:.2f}s after the attack (limit {within}s)"
        return took

    def tls_args(self) -> list[str]:
        return ["+tls", str(self.pki / "client.key"), str(self.pki / "client.pem"), "+cf", str(self.pki / "ca.pem")]

    def storescu(self, *files, tls: bool = True, extra=(), check: bool = True, timeout: float = 300,
                 aet: str = "STORESCU", aec: str = "M3DICOM") -> subprocess.CompletedProcess:
        port = self.port if tls else self.plain_port
        cmd = ["storescu", *(self.tls_args() if tls else []), "-aet", aet, "-aec", aec, *extra,
               "127.0.0.1", str(port), *map(str, files)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "TCP_NODELAY": "1"})
        if check and result.returncode != 0:
            raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stderr}\n--- node log\n{self.log()[-3000:]}")
        return result


def _toml(settings: dict) -> str:
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):   # an inline table (inside a list: [[router.rules]] written inline)
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(name: str, values: dict) -> str:
        plain = "".join(f"{k} = {value(v)}\n" for k, v in values.items() if not isinstance(v, dict))
        nested = "".join(table(f"{name}.{k}", v) for k, v in values.items() if isinstance(v, dict))
        return f"[{name}]\n{plain}\n{nested}"

    return "".join(table(name, values) for name, values in settings.items())




class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` as a subprocess; clients use fake credentials."""

    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MotoServer":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                      "-p", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=30, what="moto_server")
        return self

    def _up(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(self.url, timeout=1)
            return True
        except OSError as exc:
            return getattr(exc, "code", None) is not None

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self._log.close()
            self.proc = None

    def client(self, service: str = "s3", url: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=url or self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        import uuid

        name = f"m3-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        client = self.client()
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}

    def incomplete_uploads(self, bucket: str) -> list:
        return self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


class Outage:
    """A TCP relay to `target_port` that can be cut: an S3 outage without losing S3's state.

    `cut()` closes the listener and resets every open connection (clients see refused and
    reset connections, as when a link or the endpoint goes down); `restore()` listens again
    on the same port.
    """

    def __init__(self, target_port: int):
        self.target = target_port
        self.rate: float | None = None   # bytes per second each way, when the link is slow
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        try:
            listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() under way: close alone leaves it accepting
        except OSError:
            pass
        listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # RST
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def synthetic_instances(directory: Path, count: int, pixel_bytes: int = 0, study: str | None = None,
                        patient: str = "Offload^Test", patient_id: str | None = None) -> list[Path]:
    """CT_small copies with fresh UIDs in one study; with `pixel_bytes`, that much random
    pixel data instead (large instances without large test files). Without CT_small's
    DataSetTrailingPadding, which dcmtk's storescu drops when it sends."""
    import numpy as np
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName = patient
    if patient_id:
        ds.PatientID = patient_id
    del ds[0xFFFCFFFC]
    if pixel_bytes:
        side = int((pixel_bytes // 2) ** 0.5)
        ds.Rows = ds.Columns = side
        ds.PixelData = np.random.default_rng(count).integers(0, 4096, side * side, dtype=np.uint16).tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = directory / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def index_schema(index, tables: tuple[str, ...]) -> dict:
    """Columns (name, nullable, primary key) and indexes of `tables` as SQLAlchemy reflects them: an
    old SQLite index stamped at an owner's first revision compares equal to one that revision made."""
    import sqlalchemy as sa

    inspector = sa.inspect(index.engines.writer)
    found = {}
    for table in tables:
        key = set(inspector.get_pk_constraint(table)["constrained_columns"])
        found[table] = ([(c["name"], c["nullable"] or c["name"] in key, c["name"] in key)
                         for c in inspector.get_columns(table)],
                        sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                               for i in inspector.get_indexes(table)))
    return found
