"""Several receiving processes on one port: each serves, they die and stop with the node."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest

from helpers import data_file, paused, wait_for
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
    with paused(psutil.Process(node.proc.pid)):
        node.storescu(data_file("CT_small.dcm"), timeout=60)
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


# -- the association limits hold for the node, whichever process holds the associations (scp.slots) --

class _Assoc:
    def __init__(self, address, tls=True):
        self.is_acceptor = True
        self.requestor = SimpleNamespace(address=address)
        self._server = SimpleNamespace(ssl_context=object() if tls else None)
        self.dul = SimpleNamespace(socket=SimpleNamespace(socket=object()), state_machine=SimpleNamespace(
            current_state="Sta6"))


def test_slots_count_what_every_receiving_process_holds(monkeypatch):
    from scp import tls
    from scp.slots import SharedCounts, Table
    from scp.tls import Slots

    table = Table.create(rows=3, capacity=6)
    aes = [SimpleNamespace(active_associations=[]) for _ in range(3)]
    slots = [Slots(ae, total=8, per_source=3, plain=3, shared=SharedCounts(table, i)) for i, ae in enumerate(aes)]

    def start(i, address, tls=True):
        with slots[i].admitting(address[0], tls) as refusal:
            if not refusal:
                aes[i].active_associations.append(_Assoc(address, tls))
        return refusal

    assert start(0, ("10.0.0.1", 1)) == "" and start(1, ("10.0.0.1", 2)) == "" and start(2, ("10.0.0.1", 3)) == ""
    assert "3 associations from 10.0.0.1 (dicom.max_associations_per_source)" in start(1, ("10.0.0.1", 4))
    assert start(1, ("10.0.0.2", 1), tls=False) == "" and start(2, ("10.0.0.3", 1), tls=False) == ""
    assert start(0, ("10.0.0.4", 1), tls=False) == ""
    assert "3 associations on the plain port (dicom.plain_max_associations)" in start(0, ("10.0.0.5", 1), tls=False)
    assert start(1, ("10.0.0.5", 1)) == "" and start(2, ("10.0.0.6", 1)) == ""
    assert "8 associations (dicom.max_associations)" in start(0, ("10.0.0.7", 1))
    assert [len(ae.active_associations) for ae in aes] == [2, 3, 3]
    # one closes in process 0: once it has published (EVT_CONN_CLOSE), its slot is free in the others
    aes[0].active_associations[0].dul.socket.socket = None
    assert start(2, ("10.0.0.7", 1)) != ""
    slots[0].publish()
    assert start(2, ("10.0.0.7", 1)) == "" and start(1, ("10.0.0.8", 1)) != ""
    # a peer that closed its connection (FIN): its socket object lives on until its threads end, but
    # EVT_CONN_CLOSE does not count it
    slots[1].publish(SimpleNamespace(assoc=aes[1].active_associations[-1]))
    assert start(2, ("10.0.0.8", 1)) == ""
    aes[1].active_associations.pop()
    # one released or aborted (Sta13): its connection waits for the peer's close (or ARTIM), its slot is free;
    # counted until that close was processed, it refused a peer that sent again at once (CI, under load)
    # (in its own process at once; in the others from its next publish)
    aes[2].active_associations[0].dul.state_machine.current_state = "Sta13"
    assert start(2, ("10.0.0.8", 1)) == ""
    aes[2].active_associations.pop(0)
    # a receiver that stalls while it holds the table (stopped, swapping): the others refuse, they do not wait
    monkeypatch.setattr(tls, "ADMISSION_TIMEOUT", 0.3)
    with slots[2].shared:
        began = time.monotonic()
        assert "holds the association table" in start(0, ("10.0.0.9", 1))
        assert time.monotonic() - began < 2
        slots[0].publish()   # the once-a-second publish gives up too
    assert "8 associations (dicom.max_associations)" in start(0, ("10.0.0.9", 1))   # counted again, full
    # a receiver that died: its row does not count once its pid is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    struct.pack_into("<q", slots[2].shared._map, 8 + 2 * slots[2].shared._row, dead.pid)
    assert start(1, ("10.0.0.8", 1)) == ""
    with pytest.raises(ValueError, match="not an association table"):
        SharedCounts(table, 3)
    # a receiver stopping while another holds the table: it lets go within a second or two all the same
    with slots[2].shared:
        began = time.monotonic()
        slots[1].shared.close()
        assert time.monotonic() - began < 3
    # a receiver stopped: what it is still asked is refused, not an error in a thread
    assert "closed" in start(1, ("10.0.0.10", 1))
    slots[1].publish()


def test_the_node_limits_associations_across_its_receiving_processes(make_node, tmp_path):
    from test_hostile_network import REJECTED_LOCAL_LIMIT, _hold_associations

    node = make_node(dicom={"receivers": 2, "max_associations": 4, "max_associations_per_source": 4},
                     router={"enabled": False})
    (child,) = receivers_of(node)
    held = []
    try:
        with paused(psutil.Process(node.proc.pid)):   # two associations held by receiver 1 ...
            held, rejections = _hold_associations(node, True, ["127.0.0.1"], 2)
        assert len(held) == 2
        with paused(child):                           # ... and the others asked of receiver 0
            more, rejections = _hold_associations(node, True, ["127.0.0.1"], 8)
        held += more
        assert len(more) == 2 and rejections == [REJECTED_LOCAL_LIMIT] * 6, (len(more), rejections)
        held.pop(0).close()   # a slot freed in receiver 1 (its peer just closed) is free in receiver 0 at once
        time.sleep(0.1)
        with paused(child):
            more, rejections = _hold_associations(node, True, ["127.0.0.1"], 3)
        held += more
        assert len(more) == 1 and len(rejections) == 2, (len(more), rejections)
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: node.storescu(data_file("CT_small.dcm"), check=False).returncode == 0, timeout=10,
             what="the slots to be free again")


def test_a_receiver_stalled_in_the_association_table_delays_nothing_for_long(make_node):
    """The table held by a process that does not let go (a receiver stopped inside it: here, the test
    itself holds it): senders are refused after ADMISSION_TIMEOUT instead of waiting, and the node stops."""
    import fcntl

    node = make_node(dicom={"receivers": 2}, router={"enabled": False})
    wait_for(lambda: len(receivers_of(node)) == 1, what="receiver 1")
    fd = next(int(n) for n in os.listdir(f"/proc/{node.proc.pid}/fd")
              if os.readlink(f"/proc/{node.proc.pid}/fd/{n}").startswith("/memfd:m3dicom-associations"))
    table = os.open(f"/proc/{node.proc.pid}/fd/{fd}", os.O_RDWR)
    try:
        fcntl.flock(table, fcntl.LOCK_EX)
        began = time.monotonic()
        result = node.storescu(data_file("CT_small.dcm"), check=False, timeout=30)
        assert result.returncode != 0 and time.monotonic() - began < 10, result.stderr
        assert "Local Limit Exceeded" in result.stderr or "Rejected" in result.stderr, result.stderr
        wait_for(lambda: "holds the association table" in node.log(), what="the refusal's reason in the log")
        began = time.monotonic()
        node.stop()   # SIGTERM: every receiver lets go of the table within a second or two and exits
        assert time.monotonic() - began < 10
    finally:
        os.close(table)


def test_the_node_stops_promptly_while_another_process_keeps_the_index_locked(make_node, tmp_path):
    """SIGTERM while every write waits for an index lock another process keeps (a stalled receiver; here
    the test): the waiting C-STOREs fail (the senders are told), nothing unanswered is stored, and the node
    stops within seconds. Each association waited out the 10 s lock timeout before, one after the other:
    over 80 s (attack, session 33)."""
    import fcntl

    node = make_node(router={"enabled": False}, dicom={"receivers": 2})
    files = make_copies(tmp_path / "in", 40)
    fd = os.open(node.data_dir / "index.sqlite3-writer", os.O_RDWR)
    senders = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        env = {**os.environ, "TCP_NODELAY": "1"}
        senders = [subprocess.Popen(["storescu", *node.tls_args(), "-aet", "STORESCU", "-aec", "M3DICOM",
                                     "127.0.0.1", str(node.port), *map(str, files[i::4])],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                   for i in range(4)]
        wait_for(lambda: _receiving(node) >= 4, timeout=30, what="four associations")
        time.sleep(1.0)                                                 # each with a C-STORE waiting
        proc, started = node.proc, time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        os.close(fd)
        for sender in senders:
            sender.wait(30)
    assert took < 10, f"the node took {took:.1f} s to stop"
    node.proc = None
    node.start()
    assert node.rows("SELECT count(*) FROM instances")[0][0] == 0      # nothing was answered Success
    check_consistent(node)


def test_the_node_stops_promptly_with_its_processes_stopped(make_node):
    """SIGTERM while every process of the node but the first is stopped (SIGSTOP: a debugger, an operator):
    each is continued to act on it, and the node is gone within seconds, its processes too (it waited 15 s,
    then killed them: attack, session 34)."""
    node = make_node(dicom={"receivers": 2})
    node.storescu(data_file("CT_small.dcm"))
    children = [c for c in psutil.Process(node.proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(children) >= 2                         # the second receiver, and what else the node runs
    for child in children:
        child.send_signal(signal.SIGSTOP)
    proc, started = node.proc, time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=40)
    took = time.monotonic() - started
    node.proc = None
    assert took < 10, f"the node took {took:.1f} s to stop"
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _receiving(node) -> int:
    """The connections the node's processes hold on its DICOM TLS port now."""
    node_process = psutil.Process(node.proc.pid)
    return sum(1 for p in [node_process, *node_process.children()] for c in p.net_connections("tcp")
               if c.status == "ESTABLISHED" and c.laddr.port == node.port)
