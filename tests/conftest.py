"""Fixtures: a development PKI, nodes started as real subprocesses, moto's S3 server."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings


from helpers import M3DICOM, ROOT, MotoServer, Node, free_port, wait_for

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
    """A started node without its router: no Dask cluster starting (and growing) beside what a test watches;
    tests of analysis start theirs with `make_node`."""
    return make_node(router={"enabled": False})


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """moto's standalone server: a real HTTP S3 (and KMS) endpoint on a free loopback port."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def storescp(tmp_path, pki):
    """dcmtk storescp over TLS, writing what it receives bit for bit: (port, folder). It names a file
    before it has written it all: `helpers.arrived(folder)` lists those it has finished (each marked
    by its exec-on-reception in the folder beside)."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    (tmp_path / "received.done").mkdir()
    proc = subprocess.Popen(["storescp", "+tls", str(pki / "server.key"), str(pki / "server.pem"),
                             "+cf", str(pki / "ca.pem"), "-aet", "STORESCP", "+xa", "+B", "-od", str(out),
                             "-xcr", f"touch {tmp_path / 'received.done'}/#f", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    listener = psutil.Process(proc.pid)   # listening before the test sends (a loaded machine refused a C-MOVE)
    wait_for(lambda: proc.poll() is not None or any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                                    for c in listener.net_connections(kind="tcp")),
             what="storescp listening")
    yield port, out
    proc.terminate()
    proc.wait(10)


# -- the index on PostgreSQL too (issue 16): a private cluster, a fresh database per test ---------------

@pytest.fixture(scope="session")
def pg_cluster():
    """One private PostgreSQL cluster for the session (tests/pgcluster.py); libpq finds its password
    through PGPASSFILE, as a node would."""
    from pgcluster import Cluster, server_bin

    try:
        server_bin()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    cluster = Cluster().start()
    before = os.environ.get("PGPASSFILE")
    os.environ.update(cluster.env)
    yield cluster
    if before is None:
        os.environ.pop("PGPASSFILE", None)
    else:
        os.environ["PGPASSFILE"] = before
    cluster.stop()


def _index_url(request) -> str:
    if request.param == "sqlite":
        return ""
    import secrets

    return request.getfixturevalue("pg_cluster").create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request) -> str:
    """'' (the SQLite file in the data directory) or the URL of a new PostgreSQL database."""
    return _index_url(request)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_index_url(request) -> str:
    return _index_url(request)
