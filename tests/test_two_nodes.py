"""Two nodes, one PostgreSQL index, one S3 endpoint (issue 16, "More than one node").

Both nodes are `m3dicom serve` processes with their own data directory and ports, the same key file,
storage.backend = "s3" on one moto server and the index in one private PostgreSQL database. Node A
reaches S3 through a relay (`Outage`) the tests cut, so that what A received stays on A's disk until
the test lets A offload it: node B waits for it (storage.remote_wait_seconds), then gets it, or fails
that sub-operation with the reason when A never offloads. The tests run in this order on one pair.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from urllib.parse import urlencode

import pydicom
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from archive.crypto import LocalKeyring
from archive.index import Index
from helpers import M3DICOM, ROOT, MotoServer, Node, Outage, dataset_sha256, free_port, synthetic_instances, wait_for
from test_retrieve import ENV

pytestmark = [pytest.mark.slow, pytest.mark.interop]
PASSWORD = "two nodes, one index"
REMOTE_WAIT = 4.0                   # node B's storage.remote_wait_seconds


class Pair:
    def __init__(self, a: Node, b: Node, index: Index, outage: Outage, moto: MotoServer, bucket: str):
        self.a, self.b, self.index, self.outage, self.moto, self.bucket = a, b, index, outage, moto, bucket

    def count(self, sql: str, **params) -> int:
        return self.index.read(sa.text(sql), params)[0][0]

    def not_offloaded(self) -> list:
        return self.index.read(sa.text("SELECT i.node, o.node, o.state, o.last_error, COUNT(*) FROM instances i "
                                       "LEFT JOIN offload o ON o.blob_id = i.blob_id WHERE o.state IS DISTINCT FROM "
                                       "'offloaded' GROUP BY i.node, o.node, o.state, o.last_error"))

    def offload_done(self) -> bool:
        return not self.not_offloaded()

    def wait_offloaded(self, timeout: float, what: str) -> None:
        try:
            wait_for(self.offload_done, timeout=timeout, interval=0.3, what=what)
        except AssertionError as exc:
            missing = self.index.read(sa.text(
                "SELECT c.seq, c.kind FROM changes c JOIN instances i ON i.blob_id = c.blob_id LEFT JOIN offload o "
                "ON o.blob_id = i.blob_id WHERE o.blob_id IS NULL LIMIT 5"))
            cursors = self.index.read(sa.text("SELECT name, seq FROM cursors"))
            raise AssertionError(f"{exc}; not offloaded: {self.not_offloaded()}; their changes {missing}, "
                                 f"cursors {cursors}") from None

    def object_ids(self) -> set[str]:
        client = self.moto.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pki, pg_cluster, moto):
    root = tmp_path_factory.mktemp("two-nodes")
    url = pg_cluster.create_database("two_nodes")
    bucket = moto.new_bucket()
    outage = Outage(moto.port)                      # node A's way to S3
    LocalKeyring.open(root / "keys")                # one key-encryption key for both nodes
    nodes = []
    for name, endpoint, extra in (("node-a", outage.url, {}), ("node-b", moto.url,
                                                               {"remote_wait_seconds": REMOTE_WAIT})):
        data_dir = root / name / "var"
        data_dir.mkdir(parents=True, mode=0o700)
        shutil.copytree(root / "keys", data_dir / "keys")
        node = Node(root / name, pki, node={"ae_title": "M3DICOM", "data_dir": str(data_dir), "name": name},
                    index={"url": url}, router={"enabled": False}, viewer={"enabled": True, "port": free_port()},
                    storage={"backend": "s3", **extra,
                             "s3": {"bucket": bucket, "endpoint_url": endpoint, "retry_max_delay": 1.0,
                                    "timeout": 5.0}})
        node.env.update({**pg_cluster.env, **MotoServer.CREDENTIALS})
        nodes.append(node)
    for node in nodes:
        node.start()
    index = Index(url)
    yield Pair(*nodes, index, outage, moto, bucket)
    index.close()
    for node in nodes:
        node.stop()
    if outage._listener is not None:
        outage.cut()


def findscu(node: Node, out, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True)
    cmd = ["findscu", "-S", "-aet", "FINDSCU", "-aec", "M3DICOM", "-X", "-od", str(out)]
    for key in keys:
        cmd += ["-k", key]
    result = subprocess.run(cmd + ["127.0.0.1", str(node.plain_port)], capture_output=True, text=True, timeout=120,
                            env=ENV)
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())]


def getscu(node: Node, study: str, out, background: bool = False):
    out.mkdir(parents=True)
    cmd = ["getscu", "-S", "-aet", "GETSCU", "-aec", "M3DICOM", "+B", "-od", str(out), "-k",
           "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(node.plain_port)]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def same_instances(sent: list, received_dir) -> None:
    """What came back is what was sent: each data set's bytes, and every element (pixel data included)."""
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in received_dir.iterdir()}
    assert len(received) == len(sent)
    for path in sent:
        original = pydicom.dcmread(path)
        got = received[original.SOPInstanceUID]
        assert dataset_sha256(got) == dataset_sha256(path)
        assert pydicom.dcmread(got) == original


def send(node: Node, files: list, verbose: bool = False) -> subprocess.Popen:
    """storescu over TLS in the background (`-v`: it logs each file and each response)."""
    cmd = ["storescu", *node.tls_args(), "-aet", "STORESCU", "-aec", "M3DICOM", *(["-v"] if verbose else []),
           "127.0.0.1", str(node.port), *map(str, files)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def test_500_instances_to_each_node_at_once_and_both_see_all_1000(pair, tmp_path):
    studies = {}
    for node in (pair.a, pair.b):
        study = generate_uid()
        studies[node] = (study, synthetic_instances(tmp_path / node.workdir.name, 500, study=study))
    senders = [send(node, files) for node, (_, files) in studies.items()]
    for sender in senders:                                              # both at once
        out, _ = sender.communicate(timeout=600)
        assert sender.returncode == 0, out
    for node in (pair.a, pair.b):
        total = 0
        for study, files in studies.values():
            series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            total += len(findscu(node, tmp_path / f"find-{node.workdir.name}-{study}", "QueryRetrieveLevel=IMAGE",
                                 f"StudyInstanceUID={study}", f"SeriesInstanceUID={series}", "SOPInstanceUID"))
        assert total == 1000, node.workdir.name
    answers = []
    for node in (pair.a, pair.b):
        found = findscu(node, tmp_path / f"studies-{node.workdir.name}", "QueryRetrieveLevel=STUDY",
                        "StudyInstanceUID", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
        answers.append(sorted((str(d.StudyInstanceUID), int(d.NumberOfStudyRelatedSeries),
                               int(d.NumberOfStudyRelatedInstances)) for d in found))
    assert answers[0] == answers[1] == sorted((s, 1, 500) for s, _ in studies.values())
    # each node offloads what it received, once: A's 500 and B's 500, each blob by its own node
    pair.wait_offloaded(180, "both nodes to offload what they received")
    by_node = dict(pair.index.read(sa.text("SELECT o.node, COUNT(*) FROM offload o JOIN instances i "
                                           "ON i.blob_id = o.blob_id AND i.node = o.node GROUP BY o.node")))
    assert by_node == {"node-a": 500, "node-b": 500}
    blobs = {r[0] for r in pair.index.read(sa.text("SELECT blob_id FROM instances"))}
    assert pair.object_ids() == blobs
    for node in (pair.a, pair.b):
        assert "failed for good" not in node.log()


def test_node_b_gets_what_node_a_has_not_offloaded_yet(pair, tmp_path):
    pair.outage.cut()                                   # A's offloader cannot reach S3 until the test says
    waiting = synthetic_instances(tmp_path / "waiting", 3)
    never = synthetic_instances(tmp_path / "never", 1)
    pair.a.storescu(*waiting, *never)
    for files in (waiting, never):
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
        assert pair.count("SELECT COUNT(*) FROM instances i JOIN offload o ON o.blob_id = i.blob_id "
                          "WHERE i.sop_instance_uid = :uid AND o.state = 'offloaded'", uid=uid) == 0

    # A never offloads it (within B's wait): that sub-operation fails, with the reason in B's log
    never_uid = str(pydicom.dcmread(never[0]).SOPInstanceUID)
    started = time.monotonic()
    failed = getscu(pair.b, str(pydicom.dcmread(never[0]).StudyInstanceUID), tmp_path / "got-never")
    assert time.monotonic() - started >= REMOTE_WAIT
    assert list((tmp_path / "got-never").iterdir()) == []                  # nothing, not a partial file
    said = failed.stdout + failed.stderr                # 0xA702: every sub-operation failed
    assert "OutOfResourcesSubOperations" in said or re.search(r"Failed Sub-operations\s*:\s*1", said), said
    line = next(line for line in pair.b.log().splitlines() if never_uid in line and "cannot be read back" in line)
    assert "node node-a" in line and "not offloaded to S3 yet" in line and "remote_wait_seconds" in line

    # A is late now: for the next REMOTE_WAIT seconds B does not wait for A's other blobs one by one (a
    # retrieve of many, or a flood of retrieves, would hold B's association slots for each): they fail at once
    late = time.monotonic()
    study = str(pydicom.dcmread(waiting[0]).StudyInstanceUID)
    at_once = getscu(pair.b, study, tmp_path / "got-at-once")
    assert time.monotonic() - late < REMOTE_WAIT / 2 and list((tmp_path / "got-at-once").iterdir()) == []
    assert "OutOfResourcesSubOperations" in at_once.stdout + at_once.stderr, at_once.stderr    # 0xA702: all 3
    time.sleep(max(0.0, REMOTE_WAIT - (time.monotonic() - late)))

    # A offloads while B waits: B gets every instance, byte for byte
    getting = getscu(pair.b, study, tmp_path / "got", background=True)
    time.sleep(1.0)
    pair.outage.restore()
    out, _ = getting.communicate(timeout=120)
    assert getting.returncode == 0, out
    same_instances(waiting, tmp_path / "got")
    pair.wait_offloaded(60, "A to offload the rest")


def test_viewer_of_node_b_lists_and_opens_a_study_node_a_received(pair, tmp_path):
    added = subprocess.run([*M3DICOM, "user", "add", "alice", "--config", str(pair.a.config_path)], cwd=ROOT,
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=120,
                           env={**os.environ, **pair.a.env})             # once, through node A
    assert added.returncode == 0, added.stderr
    files = synthetic_instances(tmp_path / "viewed", 2)
    pair.a.storescu(*files)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    port = pair.b.settings["viewer"]["port"]

    def request(method: str, path: str, body=None, headers=None):
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=60,
                                                 context=ssl._create_unverified_context())
        connection.request(method, path, body, headers or {})
        answer = connection.getresponse()
        data = answer.read()
        connection.close()
        return answer, data

    answer, _ = request("POST", "/login", urlencode({"user": "alice", "password": PASSWORD}),
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 302, "the user made through node A logs in on node B"
    cookie = {"Cookie": answer.getheader("Set-Cookie").split(";", 1)[0]}
    answer, data = request("GET", "/api/studies", headers=cookie)
    assert answer.status == 200 and study in data.decode()
    answer, data = request("GET", f"/api/studies/{study}", headers=cookie)
    assert answer.status == 200, data
    uid = str(pydicom.dcmread(files[0]).SOPInstanceUID)
    answer, data = request("GET", f"/api/instances/{uid}/info", headers=cookie)
    assert answer.status == 200 and json.loads(data)["image"] is True, data
    answer, data = request("GET", f"/api/instances/{uid}/download", headers=cookie)
    assert answer.status == 200 and dataset_sha256(data) == dataset_sha256(files[0])

    # one A has not offloaded (S3 cut off from A): B answers 503 with the reason once its wait is over
    pair.outage.cut()
    later = synthetic_instances(tmp_path / "later", 1)
    pair.a.storescu(*later)
    later_uid = str(pydicom.dcmread(later[0]).SOPInstanceUID)
    answer, data = request("GET", f"/api/instances/{later_uid}/info", headers=cookie)
    assert answer.status == 503 and "node node-a" in json.loads(data)["error"], data
    pair.outage.restore()
    pair.wait_offloaded(60, "A to offload")


def test_kill_9_of_node_a_while_it_receives(pair, tmp_path):
    files = synthetic_instances(tmp_path / "killed", 300)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    sender = send(pair.a, files, verbose=True)

    def received() -> int:
        return pair.count("SELECT COUNT(*) FROM instances i JOIN series se ON se.pk = i.series_pk "
                          "JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = :study", study=study)
    wait_for(lambda: received() >= 40, timeout=120, interval=0.02, what="node A to store some of them")
    pair.a.kill9()
    out, _ = sender.communicate(timeout=120)
    acknowledged, current = [], None
    for line in out.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(pydicom.dcmread(current, stop_before_pixels=True).SOPInstanceUID)
    assert 40 <= len(acknowledged) < 300, out[-2000:]

    pair.a.start()                                       # the same name, the same data directory
    pair.wait_offloaded(120, "A to offload after its restart")
    for uid in acknowledged:
        assert pair.count("SELECT COUNT(*) FROM instances WHERE sop_instance_uid = :uid", uid=str(uid)) == 1
    indexed = {r[0] for r in pair.index.read(sa.text("SELECT blob_id FROM instances"))}
    acked_blobs = {r[0] for r in pair.index.read(
        sa.text("SELECT blob_id FROM instances WHERE sop_instance_uid IN :uids").bindparams(
            sa.bindparam("uids", expanding=True)), {"uids": [str(u) for u in acknowledged]})}
    objects = pair.object_ids()
    assert acked_blobs <= objects                        # every acknowledged instance is in S3
    assert objects == indexed                            # no orphan object, none missing
    local = {p.name for p in (pair.a.data_dir / "blobs").rglob("*") if p.is_file()}
    assert local <= indexed                              # no orphan blob on A's disk


def test_a_second_node_with_a_running_nodes_name_is_refused(pair, tmp_path, pki):
    twin = Node(tmp_path / "twin", pki, node={"ae_title": "M3DICOM", "data_dir": str(tmp_path / "twin" / "var"),
                                              "name": "node-b"},
                index={"url": pair.a.settings["index"]["url"]}, router={"enabled": False},
                storage={"backend": "s3", "s3": {"bucket": pair.bucket, "endpoint_url": pair.moto.url}})
    twin.env.update(pair.a.env)
    with pytest.raises(AssertionError, match="node exited at start") as refused:
        twin.start()
    assert "node name 'node-b' is in use by a running node" in str(refused.value)
    twin.stop()
    local = Node(tmp_path / "local", pki, index={"url": pair.a.settings["index"]["url"]})
    result = local.cli("status", check=False)
    assert result.returncode == 2 and "index.url" in result.stderr and "storage.backend" in result.stderr
