"""The operator's endpoints (issue 19): /metrics in Prometheus' text format, /healthz and /readyz, on their
own port, against a real node with several receiving processes, driven by dcmtk and by raw sockets.

Counts are added up across the node's processes by prometheus-client's multiprocess mode: a value is right
only if every receiving process's counts reach the scrape.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import M3DICOM, ROOT, Node, data_file, free_port, wait_for

FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "SC_rgb.dcm"]


def get(url: str, token: str | None = None, timeout: float = 30) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(body: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a scrape."""
    found = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def metrics_node(tmp_path, pki, **sections) -> Node:
    sections.setdefault("metrics", {})["port"] = free_port()
    sections.setdefault("router", {"enabled": False})
    node = Node(tmp_path / "node", pki, **sections)
    node.url = f"http://127.0.0.1:{node.settings['metrics']['port']}"
    return node


def scrape(node: Node) -> dict:
    status, body = get(f"{node.url}/metrics")
    assert status == 200, body
    return samples(body)


def handshake_garbage(port: int) -> None:
    """A TLS port sent something that is no ClientHello."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            sock.recv(100)
        except OSError:
            pass


@pytest.fixture(scope="module")
def busy(tmp_path_factory, pki):
    """A node with two receiving processes after a morning's work: four instances from a scanner, each on
    an association of its own, a C-FIND, an association to the wrong AE title, a port scanner's garbage."""
    node = metrics_node(tmp_path_factory.mktemp("metrics"), pki, dicom={"receivers": 2})
    node.start()
    for name in FILES:
        node.storescu(data_file(name), aet="SCANNER1")
    out = tmp_path_factory.mktemp("find")
    subprocess.run(["findscu", *node.tls_args(), "-aet", "FINDSCU", "-aec", "M3DICOM", "-S", "-k",
                    "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-X", "-od", str(out), "127.0.0.1",
                    str(node.port)], check=True, capture_output=True, env={**os.environ, "TCP_NODELAY": "1"})
    wrong = node.storescu(data_file("CT_small.dcm"), aet="SCANNER1", aec="NOT-ME", check=False)
    assert wrong.returncode != 0
    handshake_garbage(node.port)
    yield node
    node.stop()


def test_what_peers_did_is_counted_across_the_receiving_processes(busy):
    node = busy
    wait_for(lambda: value(scrape(node), "m3dicom_tls_handshake_failures_total", reason="error") >= 1,
             what="the handshake failure counted")
    s = scrape(node)
    assert value(s, "m3dicom_receivers_listening") == 2
    assert value(s, "m3dicom_instances_received_total", calling_ae="SCANNER1") == len(FILES)
    sizes = [data_file(n).stat().st_size for n in FILES]
    received = value(s, "m3dicom_received_bytes_total", calling_ae="SCANNER1")
    assert sum(sizes) - 132 * len(FILES) - 1024 * len(FILES) <= received <= sum(sizes) + 1024 * len(FILES)
    assert value(s, "m3dicom_store_seconds_count") == len(FILES)
    assert value(s, "m3dicom_store_seconds_bucket", le="+Inf") == len(FILES)
    assert value(s, "m3dicom_index_transaction_seconds_count") == len(FILES)
    assert value(s, "m3dicom_associations_total", calling_ae="SCANNER1") == len(FILES)
    assert value(s, "m3dicom_associations_total", calling_ae="FINDSCU") == 1
    assert value(s, "m3dicom_associations_rejected_total", reason="called-ae") == 1
    assert value(s, "m3dicom_dimse_requests_total", service="find", outcome="success") == 1
    assert value(s, "m3dicom_dimse_seconds_count", service="find") == 1
    wait_for(lambda: value(scrape(node), "m3dicom_associations_open") == 0, what="every association closed")
    assert value(s, "m3dicom_data_dir_free_bytes") > 0
    assert [value(s, "m3dicom_ready", check=c) for c in ("index", "disk", "key", "s3", "receivers")] == [1] * 5
    # both receiving processes count into files in the data directory, added up at the scrape
    listening = {p.name for p in (node.data_dir / "metrics").glob("gauge_livesum_*.db")}
    assert len(listening) >= 2, listening


def test_no_patient_data_in_a_scrape(busy):
    status, body = get(f"{busy.url}/metrics")
    assert status == 200
    for name in FILES:
        ds = pydicom.dcmread(data_file(name), stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber"):
            said = str(ds.get(keyword, "") or "")
            if len(said) > 3:
                assert said not in body, keyword


def test_health_and_readiness_with_the_reason_when_not_ready(busy):
    node = busy
    assert get(f"{node.url}/healthz") == (200, "ok\n")
    status, body = get(f"{node.url}/readyz")
    assert status == 200, body
    assert '"ready": true' in body and '"receivers": {\n   "ok": true' in body
    # a receiving process dies: not ready (one of two listening) until the node has started it again
    receiver = next(p for p in node.processes() if p.pid != node.proc.pid and "spawn" in " ".join(p.cmdline())
                    and _listens_on(p, node.port))
    os.kill(receiver.pid, signal.SIGKILL)
    wait_for(lambda: get(f"{node.url}/readyz")[0] == 503, timeout=10, what="not ready")
    status, body = get(f"{node.url}/readyz")
    assert "1 of 2 receiving processes listening" in body, body
    wait_for(lambda: get(f"{node.url}/readyz")[0] == 200, timeout=30, what="ready again once restarted")
    # the key file gone: not ready, and why
    key = next((node.data_dir / "keys").glob("*.kek"))
    moved = key.with_suffix(".away")
    key.rename(moved)
    try:
        status, body = get(f"{node.url}/readyz")
        assert status == 503 and "no key file" in body and '"key"' in body, body
    finally:
        moved.rename(key)
    assert get(f"{node.url}/readyz")[0] == 200


def _listens_on(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in proc.net_connections())
    except psutil.Error:
        return False


def test_a_disk_short_of_space_is_not_ready(tmp_path, pki):
    node = metrics_node(tmp_path, pki, storage={"min_free_bytes": 1 << 49})
    node.start()
    try:
        status, body = get(f"{node.url}/readyz")
        assert status == 503 and "storage.min_free_bytes" in body and '"disk"' in body, body
        assert value(scrape(node), "m3dicom_ready", check="disk") == 0
    finally:
        node.stop()


def test_viewer_requests_are_counted_by_route_never_by_path(tmp_path, pki):
    node = metrics_node(tmp_path, pki, viewer={"enabled": True, "port": free_port()})
    node.start()
    try:
        viewer = f"https://127.0.0.1:{node.settings['viewer']['port']}"
        insecure = ssl.create_default_context()
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        for path in ("/login", "/login", "/s/not-a-real-share-token-1234", "/no/such/page"):
            try:
                urllib.request.urlopen(viewer + path, context=insecure, timeout=30).read()
            except urllib.error.HTTPError:
                pass
        s = scrape(node)
        # the unknown page sends the browser to the login page, as pages do without a session
        assert value(s, "m3dicom_http_requests_total", route="/login", method="GET", status="200") == 3
        assert value(s, "m3dicom_http_requests_total", route="(no route)", method="GET", status="302") == 1
        assert value(s, "m3dicom_http_requests_total", route="/s/{token}", method="GET", status="403") == 1
        assert value(s, "m3dicom_http_request_seconds_count", route="/login") == 3
        _, body = get(f"{node.url}/metrics")
        assert "not-a-real-share-token" not in body and "/no/such/page" not in body
    finally:
        node.stop()


def run_serve(config) -> subprocess.CompletedProcess:
    return subprocess.run(M3DICOM + ["serve", "--config", str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_settings_that_would_expose_or_clash_are_refused(tmp_path, pki):
    from helpers import _toml

    node = Node(tmp_path / "a", pki)
    viewer_port = node.settings["viewer"]["port"]
    cases = [
        ({"metrics": {"port": viewer_port}, "viewer": {"enabled": True}}, "is viewer.port too"),
        ({"metrics": {"port": free_port(), "host": "0.0.0.0"}}, "set metrics.token_file"),
        ({"metrics": {"port": free_port(), "token_file": str(tmp_path / "absent.token")}}, "cannot be read"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
    ]
    for changes, said in cases:
        settings = {name: dict(values) for name, values in node.settings.items()}
        for name, values in changes.items():
            settings[name].update(values)
        config = tmp_path / "c.toml"
        config.write_text(_toml(settings))
        result = run_serve(config)
        assert result.returncode == 2 and said in result.stderr, (changes, result.stderr)


def test_counts_start_at_zero_with_the_node(tmp_path, pki):
    node = metrics_node(tmp_path, pki)
    node.start()
    try:
        node.storescu(data_file("CT_small.dcm"))
        assert value(scrape(node), "m3dicom_instances_received_total", calling_ae="STORESCU") == 1
    finally:
        node.stop()
    node.start()
    try:
        assert value(scrape(node), "m3dicom_instances_received_total", calling_ae="STORESCU") == 0
    finally:
        node.stop()


def test_the_sample_dashboard_asks_for_metrics_the_node_serves(busy):
    """docs/grafana-dashboard.json: every metric its panels query is one the node serves."""
    import json
    import re

    from helpers import ROOT as root

    dashboard = json.loads((root / "docs" / "grafana-dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"\bm3dicom_[a-z_]+", target["expr"])}
    from prometheus_client import REGISTRY

    from archive import metrics

    metrics.get()   # the catalogue, in this process: a labelled metric shows in a scrape once it has counted
    kinds = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    catalogue = {f.name + suffix for f in REGISTRY.collect() if f.name.startswith("m3dicom_")
                 for suffix in kinds[f.type]}
    _, body = get(f"{busy.url}/metrics")
    read_at_scrape = {f.name for f in text_string_to_metric_families(body)}
    # the offload gauges exist only with storage.backend = "s3"
    offload = {"m3dicom_offload_queue", "m3dicom_offload_oldest_pending_seconds"}
    assert {"m3dicom_jobs", "m3dicom_ready", "m3dicom_data_dir_free_bytes"} <= read_at_scrape
    assert len(asked) >= 15 and not asked - catalogue - read_at_scrape - offload, asked - catalogue - read_at_scrape


# -- found by an attack on the endpoints -------------------------------------------------------------------

def test_counts_that_cannot_be_written_never_change_a_dicom_answer(tmp_path, pki):
    """data_dir/metrics removed under a running node: a process that had not counted yet could not make its
    count file, and a stored instance was answered 0x0110. It is answered stored; the scrape comes back."""
    node = metrics_node(tmp_path, pki, dicom={"receivers": 2})
    node.start()
    try:
        shutil.rmtree(node.data_dir / "metrics")
        for name in FILES:
            result = node.storescu(data_file(name), aet="AFTER")
            assert result.returncode == 0
        assert len(node.rows("SELECT 1 FROM instances")) == len(FILES)
        assert get(f"{node.url}/metrics")[0] == 200 and (node.data_dir / "metrics").is_dir()
        assert "metrics: " in node.log() and "0x0110" not in node.log()
    finally:
        node.stop()


def test_a_token_guards_the_scrape_not_the_probes_and_hostile_headers_get_401(tmp_path, pki):
    token = tmp_path / "metrics.token"
    token.write_text("s3cret-prometheus-token-0123456789\n")
    token.chmod(0o600)
    node = metrics_node(tmp_path, pki, metrics={"token_file": str(token)})
    node.start()
    try:
        assert get(f"{node.url}/metrics")[0] == 401
        assert get(f"{node.url}/metrics", "wrong-token-wrong-token")[0] == 401
        status, body = get(f"{node.url}/metrics", "s3cret-prometheus-token-0123456789")
        assert status == 200 and "m3dicom_receivers_listening" in body
        assert get(f"{node.url}/healthz")[0] == 200
        port = node.settings["metrics"]["port"]
        for header in (b"Bearer \xff\xfe", b"Bearer " + b"A" * 4000, b"Basic dXNlcjpwYXNz"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n\r\n")
                assert sock.recv(100).startswith(b"HTTP/1.1 401"), header[:20]
        # /readyz without the token: whether ready, not why (paths, names)
        status, body = get(f"{node.url}/readyz")
        assert status == 200 and "reason" not in body
        assert "Traceback" not in node.log()
        # the token file gone, the endpoints' process killed: /metrics says why (503), the probes still answer
        token.unlink()
        ops = next(p for p in node.processes() if p.pid != node.proc.pid and _listens_on(p, port))
        os.kill(ops.pid, signal.SIGKILL)
        wait_for(lambda: _answers(node), timeout=40, what="the endpoints back")
        status, body = get(f"{node.url}/metrics", "s3cret-prometheus-token-0123456789")
        assert status == 503 and "metrics.token_file" in body
    finally:
        node.stop()


def _answers(node) -> bool:
    try:
        return get(f"{node.url}/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def test_a_two_line_token_file_is_refused_at_start(tmp_path, pki):
    token = tmp_path / "metrics.token"
    token.write_text("s3cret-prometheus-token\nsecond line of it\n")
    token.chmod(0o600)
    node = metrics_node(tmp_path, pki, metrics={"token_file": str(token)})
    result = run_serve(node.config_path)
    assert result.returncode == 2 and "one line" in result.stderr


def test_readiness_has_no_side_effect_and_a_locked_index_does_not_hold_a_scrape(tmp_path, pki):
    import sqlite3

    node = metrics_node(tmp_path, pki)
    node.start()
    try:   # every process started (a process starting without keys makes the first one)
        wait_for(lambda: get(f"{node.url}/readyz")[0] == 200, timeout=30, what="ready")
        keys = node.data_dir / "keys"
        keys.rename(tmp_path / "keys.away")
        try:
            status, body = get(f"{node.url}/readyz")
            assert status == 503 and '"key"' in body and not keys.exists()     # the probe made no empty directory
        finally:
            (tmp_path / "keys.away").rename(keys)
        locker = sqlite3.connect(node.data_dir / "index.sqlite3", timeout=1, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            assert get(f"{node.url}/metrics")[0] == 200 and get(f"{node.url}/readyz")[0] in (200, 503)
            assert time.monotonic() - started < 5
        finally:
            locker.execute("ROLLBACK")
            locker.close()
    finally:
        node.stop()
