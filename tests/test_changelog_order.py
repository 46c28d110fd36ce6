"""The change log on PostgreSQL with concurrent writers: no consumer skips a change (issue 16).

A change numbered lower than one already read must not commit after it: `archive.index` orders the
commits of the transactions that add changes (archive/changes.py says how and why). The negative
control turns that off and shows the skip it prevents.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from archive import changes
from archive import index as index_module
from archive.index import Index
from archive.ingest import _NEW_INSTANCE, _image

_WAITING = text("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")
_WORK = text("SELECT pg_sleep(0.002)")


@pytest.fixture
def index(pg_cluster):
    index = Index(pg_cluster.create_database(f"t_{secrets.token_hex(6)}"))
    yield index
    index.close()


def _until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _job_change(conn, writer: int) -> None:
    Index.add_job_change(conn, "job_queued", f"w{writer}", "1.2.3")


def _stored_change(conn, writer: int) -> None:
    """An ingest's change (`add_stored_change`: on PostgreSQL the statement takes the lock itself); each
    writer its own patient, study and series (writer 2 must not wait for writer 1's new rows)."""
    header = SimpleNamespace(sop_instance_uid=f"1.2.3.{writer}.1.1", series_uid=f"1.2.3.{writer}.1",
                             study_uid=f"1.2.3.{writer}", attrs=defaultdict(lambda: None, PatientID=f"P{writer}"))
    series_pk = Index.upsert_hierarchy(conn, header, time.time())
    _NEW_INSTANCE.run(conn, {"uid": header.sop_instance_uid, "series_pk": series_pk, "sop_class_uid": "1.2.3.4",
                             "instance_number": 1, "transfer_syntax": "1.2.840.10008.1.2.1", "size": 1,
                             "sha256": "0" * 64, "blob_id": f"blob-{writer}", "calling_ae": "TEST", "now": time.time(),
                             "job_id": None, "node": None, **_image(header)})
    Index.add_stored_change(conn, "stored", header)


ADD_CHANGE = [pytest.param(_job_change, id="job-change"), pytest.param(_stored_change, id="ingest-change")]


def _out_of_order_commits(index: Index, add_change) -> tuple[list[int], list[int]]:
    """Writer 1 adds a change and keeps its transaction open; writer 2 adds one and commits (or waits
    for writer 1, when the commits are ordered); a consumer and a reader run; writer 1 commits; they
    run again. What each took, in the order taken."""
    taken: list[int] = []
    read: list[int] = []
    position = 0

    def consume_and_read() -> None:
        nonlocal position
        with changes.consume(index, "test") as batch:
            taken.extend(c.seq for c in batch)
        found = changes.read(index, position)
        read.extend(c.seq for c in found)
        position = found[-1].seq if found else position

    committed = threading.Event()
    failed: list[BaseException] = []

    def writer_2() -> None:
        try:
            with index.write() as conn:
                add_change(conn, 2)
            committed.set()
        except BaseException as exc:    # reported by the main thread
            failed.append(exc)
            committed.set()

    with index.write() as conn:
        add_change(conn, 1)
        thread = threading.Thread(target=writer_2)
        thread.start()
        _until(lambda: committed.is_set() or index.read(_WAITING)[0][0] > 0, "writer 2 to commit or wait")
        consume_and_read()
    thread.join(30)
    assert not thread.is_alive() and not failed, failed
    consume_and_read()
    return taken, read


@pytest.mark.parametrize("add_change", ADD_CHANGE)
def test_a_change_that_commits_late_is_taken_once_in_seq_order(index, add_change):
    taken, read = _out_of_order_commits(index, add_change)
    every = [c.seq for c in changes.read(index, 0)]
    assert len(every) == 2
    assert taken == every and read == every             # each once, in seq order, none skipped


@pytest.mark.parametrize("add_change", ADD_CHANGE)
def test_without_ordered_commits_the_late_change_is_skipped(index, monkeypatch, add_change):
    """Negative control: what the ordering prevents. Writer 2's change (seq 2) is read before writer 1's
    (seq 1) commits; past 2, the consumer and the reader never see 1."""
    monkeypatch.setattr(index_module, "CHANGES_IN_COMMIT_ORDER", False)
    taken, read = _out_of_order_commits(index, add_change)
    assert [c.seq for c in changes.read(index, 0)] == [1, 2]
    assert taken == [2] and read == [2]


def test_many_writers_and_a_consumer_following_them_miss_nothing(index):
    writers, each = 4, 40
    taken: list[int] = []
    done = threading.Event()

    def write(n: int) -> None:
        for i in range(each):
            with index.write() as conn:
                Index.add_job_change(conn, "job_queued", f"{n}-{i}", "1.2.3")
                conn.execute(_WORK)          # the rest of a transaction after its first change
                Index.add_job_change(conn, "job_running", f"{n}-{i}", "1.2.3")

    def follow() -> None:
        while True:
            finished = done.is_set()
            with changes.consume(index, "test", limit=7) as batch:
                taken.extend(c.seq for c in batch)
            if finished and not len(batch):
                return

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    follower = threading.Thread(target=follow)
    follower.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    follower.join(120)
    every = [c.seq for c in changes.read(index, 0, limit=10_000)]
    assert len(every) == writers * each * 2
    assert taken == every
