"""Fixtures: a development PKI, nodes started as real subprocesses, moto's S3 server."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


from helpers import M3DICOM, ROOT, MotoServer, Node, free_port

# Fuzzing: a short run in `make test`, a long one in `make fuzz` (HYPOTHESIS_PROFILE=fuzz).
# Examples found failing are kept in .hypothesis/ and replayed first next time.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=3000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(M3DICOM + ["certs", "init", "--dir", str(directory)], check=True, cwd=ROOT,
                   capture_output=True)
    return directory


@pytest.fixture
def make_node(tmp_path, pki):
    nodes: list[Node] = []

    def factory(start: bool = True, workdir: Path | None = None, **sections) -> Node:
        node = Node(workdir or tmp_path / f"node{len(nodes)}", pki, **sections)
        nodes.append(node)
        return node.start() if start else node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def node(make_node) -> Node:
    return make_node()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """moto's standalone server: a real HTTP S3 (and KMS) endpoint on a free loopback port."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def storescp(tmp_path, pki):
    """dcmtk storescp over TLS, writing what it receives bit for bit: (port, folder)."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "+tls", str(pki / "server.key"), str(pki / "server.pem"),
                             "+cf", str(pki / "ca.pem"), "-aet", "STORESCP", "+xa", "+B", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    yield port, out
    proc.terminate()
    proc.wait(10)
