"""Several receiving processes on one port: each serves, they die and stop with the node."""
from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

from helpers import data_file, wait_for
from test_durability import check_consistent, make_copies

pytestmark = pytest.mark.interop


def receivers_of(node) -> list[psutil.Process]:
    return [p for p in psutil.Process(node.proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline())]


def test_every_receiver_starts_and_serves(make_node):
    node = make_node(dicom={"receivers": 3}, router={"enabled": False})
    wait_for(lambda: node.log().count("ready") >= 2, what="receivers 1 and 2 to be ready")
    assert len(receivers_of(node)) == 2
    assert "3 receiving processes" in node.log()
    # with the node process stopped, only the spawned receivers can accept
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        node.storescu(data_file("CT_small.dcm"), timeout=60)
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    assert node.rows("SELECT calling_ae FROM instances") == [("STORESCU",)]
    line = wait_for(lambda: next((line for line in node.log().splitlines() if "association from" in line), None),
                    what="the association's line, written at its end")
    assert "receiver-" in line and "1 instances stored" in line, line
    assert "association from STORESCU (127.0.0.1:" in line, line        # the calling AE title, not an empty one


def test_parallel_senders_over_two_receivers_lose_nothing(make_node, tmp_path):
    files = make_copies(tmp_path / "study", 60)
    node = make_node(dicom={"receivers": 2}, router={"enabled": False})
    senders = [subprocess.Popen(["storescu", *node.tls_args(), "-aec", "M3DICOM", "127.0.0.1", str(node.port),
                                 *map(str, files[i::4])], env={**os.environ, "TCP_NODELAY": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(4)]
    for sender in senders:
        assert sender.wait(timeout=120) == 0, sender.stderr.read().decode()
    assert len(check_consistent(node)) == len(files)
    assert node.spool_files() == []


def test_receivers_die_with_the_node_and_restart(make_node):
    node = make_node(dicom={"receivers": 2}, router={"enabled": False})
    wait_for(lambda: len(receivers_of(node)) == 1 and "receiver 1 ready" in node.log(), what="receiver 1")
    (child,) = receivers_of(node)
    child.kill()  # a receiver that crashes is replaced
    wait_for(lambda: "receiver-1 exited" in node.log(), timeout=20, what="the restart")
    wait_for(lambda: [p.pid for p in receivers_of(node)] not in ([], [child.pid]), timeout=20,
             what="a new receiver")
    (replacement,) = receivers_of(node)
    node.kill9()  # the node killed outright takes its receivers with it
    psutil.wait_procs([replacement], timeout=10)
    assert not replacement.is_running()
    node.start()  # and the port is free again
    node.storescu(data_file("CT_small.dcm"))
    assert len(check_consistent(node)) == 1
