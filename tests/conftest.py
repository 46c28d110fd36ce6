"""Fixtures: a development PKI, nodes started as real subprocesses, moto's S3 server."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import M3DICOM, ROOT, MotoServer, Node


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
