"""The change log's one consumer API (archive.changes): never a change twice, never one lost."""
from __future__ import annotations

import secrets
import threading
import time

import pytest

from archive import changes
from sqlalchemy import text

from archive.index import Index


@pytest.fixture
def index(tmp_path, index_url):
    index = Index(index_url or tmp_path / "index.sqlite3")
    yield index
    index.close()


def _log(index: Index, *kinds: str) -> None:
    with index.write() as conn:
        for kind in kinds:
            conn.execute(text("INSERT INTO changes (kind, study_uid, blob_id, time) VALUES (:kind, '1.2.3', 'b', 0)"),
                         {"kind": kind})


def test_a_consumer_takes_each_change_of_its_kinds_once_in_order(index):
    _log(index, "stored", "job_queued", "stored", "blob_removed")
    with changes.consume(index, "test", kinds=("stored", "blob_removed")) as batch:
        assert [(c.seq, c.kind) for c in batch] == [(1, "stored"), (3, "stored"), (4, "blob_removed")]
    assert changes.position(index, "test") == 4
    with changes.consume(index, "test") as batch:
        assert len(batch) == 0
    _log(index, "job_running", "job_running")
    with changes.consume(index, "test", kinds=("stored",)) as batch:   # none of its kinds: the cursor still moves
        assert list(batch) == [] and batch.upto == 6
    assert changes.position(index, "test") == 6 and changes.position(index, "other") == 0


def test_a_failure_while_handling_leaves_the_cursor_and_the_consumers_writes_undone(index):
    _log(index, "stored", "stored")
    with pytest.raises(RuntimeError):
        with changes.consume(index, "test") as batch:
            batch.conn.execute(text("INSERT INTO cursors (name, seq) VALUES ('side effect', 1)"))
            raise RuntimeError("the consumer failed")
    assert changes.position(index, "test") == 0 and changes.position(index, "side effect") == 0
    with changes.consume(index, "test", limit=1) as batch:             # taken again, a batch at a time
        assert [c.seq for c in batch] == [1]
    with changes.consume(index, "test", limit=1) as batch:
        assert [c.seq for c in batch] == [2]


def test_a_reader_reads_between_two_positions(index):
    assert changes.latest(index) == 0
    _log(index, "stored", "job_queued", "stored")
    assert changes.latest(index) == 3
    assert [c.seq for c in changes.read(index, 0, kinds=("stored",))] == [1, 3]
    assert [c.kind for c in changes.read(index, 1, 2)] == ["job_queued"]


def test_two_consumers_of_one_cursor_take_each_change_once(pg_cluster):
    """Two nodes' routers on one cursor (PostgreSQL, READ COMMITTED): the second waits for the first's
    batch to end, then takes the next one, not the same one."""
    index = Index(pg_cluster.create_database(f"t_{secrets.token_hex(6)}"))
    try:
        _log(index, *["stored"] * 10)
        holding, release = threading.Event(), threading.Event()
        taken: dict[str, list[int]] = {}

        def first() -> None:
            with changes.consume(index, "shared", limit=4) as batch:
                taken["first"] = [c.seq for c in batch]
                holding.set()
                release.wait(30)

        def second() -> None:
            with changes.consume(index, "shared", limit=4) as batch:
                taken["second"] = [c.seq for c in batch]

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        threads[0].start()
        assert holding.wait(30)
        threads[1].start()
        waiting = text("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        deadline = time.monotonic() + 30
        while index.read(waiting)[0][0] == 0 and "second" not in taken:
            assert time.monotonic() < deadline, "the second consumer neither waited nor took a batch"
            time.sleep(0.01)
        release.set()
        for t in threads:
            t.join(30)
        assert taken == {"first": [1, 2, 3, 4], "second": [5, 6, 7, 8]}

        both: list[int] = []

        def drain() -> None:
            while True:
                with changes.consume(index, "shared", limit=1) as batch:
                    both.extend(c.seq for c in batch)
                if not len(batch):
                    return
        _log(index, *["stored"] * 40)
        threads = [threading.Thread(target=drain) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(both) == list(range(9, 51)) and len(both) == len(set(both))
    finally:
        index.close()
