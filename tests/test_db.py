"""archive.db: Prepared gives the same rows and effects as `conn.execute(text(...))` on SQLite and PostgreSQL; the
writer lock and group commit; PostgreSQL's durability and lock timeouts."""
from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc, text

from archive.db import Prepared
from archive.index import Index
from helpers import wait_for

_INSERT = "INSERT INTO cursors (name, seq) VALUES (:name, :seq) RETURNING name, seq"
_SELECT = ("SELECT name, seq, :seq + 1 AS next, name LIKE 'a%' AS percent FROM cursors "
           "WHERE seq >= :seq AND (name = :name OR :name IS NULL) ORDER BY name")   # :seq and :name twice
_UPDATE = "UPDATE cursors SET seq = seq + :by WHERE name = :name"


@pytest.fixture
def index(tmp_path, index_url):
    i = Index(index_url or tmp_path / "index.sqlite3")
    yield i
    i.close()


def test_prepared_gives_what_execute_gives(index):
    with index.write() as conn:
        assert [tuple(r) for r in Prepared(_INSERT).rows(conn, {"name": "a%b", "seq": 3})] == [("a%b", 3)]
        assert [tuple(r) for r in conn.execute(text(_INSERT), {"name": "b", "seq": 5})] == [("b", 5)]
        Prepared(_UPDATE).run_many(conn, [{"name": "a%b", "by": 1}, {"name": "b", "by": 2}, {"name": "c", "by": 1}])
        assert Prepared(_UPDATE).run(conn, {"name": "nobody", "by": 1}) == 0
    with index.write() as conn:
        for params in ({"seq": 0, "name": None}, {"seq": 5, "name": None}, {"seq": 0, "name": "b"},
                       {"seq": 9, "name": None}):
            expected = [tuple(r) for r in conn.execute(text(_SELECT), params)]
            assert [tuple(r) for r in Prepared(_SELECT).rows(conn, {**params, "unused": 1})] == expected
        assert [tuple(r) for r in Prepared(_SELECT).rows(conn, {"seq": 0, "name": None})] == [
            ("a%b", 4, 1, 1), ("b", 7, 1, 0)]
    with index.reader() as conn:
        assert len(Prepared("SELECT name FROM cursors WHERE seq > :seq").rows(conn, {"seq": 0})) == 2


def test_prepared_raises_sqlalchemys_errors_and_refuses_in_lists(index):
    with pytest.raises(sa_exc.IntegrityError):
        with index.write() as conn:
            Prepared(_INSERT).rows(conn, {"name": "a", "seq": 1})
            Prepared(_INSERT).rows(conn, {"name": "a", "seq": 2})
    assert index.read(text("SELECT COUNT(*) AS n FROM cursors"))[0].n == 0      # rolled back
    with index.write() as conn, pytest.raises(ValueError, match="expanding"):
        from sqlalchemy import bindparam
        statement = Prepared("SELECT name FROM cursors WHERE name IN :names")
        statement.statement = statement.statement.bindparams(bindparam("names", expanding=True))
        statement.rows(conn, {"names": ["a"]})


def test_a_write_mixing_execute_and_prepared_commits_or_rolls_back_as_one(index):
    with index.write() as conn:
        Prepared(_INSERT).rows(conn, {"name": "a", "seq": 1})
        conn.execute(text(_INSERT), {"name": "b", "seq": 2})
        Prepared(_INSERT).rows(conn, {"name": "c", "seq": 3})
    with pytest.raises(RuntimeError):
        with index.write() as conn:
            conn.execute(text(_INSERT), {"name": "d", "seq": 4})
            Prepared(_INSERT).rows(conn, {"name": "e", "seq": 5})
            raise RuntimeError("rolled back")
    with pytest.raises(RuntimeError):
        with index.write() as conn:
            Prepared(_INSERT).rows(conn, {"name": "f", "seq": 6})
            raise RuntimeError("rolled back")
    with index.write() as conn:
        conn.execute(text(_INSERT), {"name": "g", "seq": 7})
    assert [r.name for r in index.read(text("SELECT name FROM cursors ORDER BY name"))] == ["a", "b", "c", "g"]


def test_the_held_sqlite_writer_survives_a_transaction_that_could_not_begin(tmp_path):
    """SQLite's writer connection stays checked out between transactions: a BEGIN that fails (another
    process holds the write lock past the busy timeout) raises SQLAlchemy's error and leaves it usable."""
    import sqlite3

    index = Index(tmp_path / "index.sqlite3")
    try:
        with index.engines.connection() as conn:
            conn.connection.driver_connection.execute("PRAGMA busy_timeout=50")
        other = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sa_exc.OperationalError, match="locked"):
            with index.write():
                pass
        other.execute("ROLLBACK")
        other.close()
        with index.write() as conn:
            Prepared(_INSERT).rows(conn, {"name": "a", "seq": 1})
        assert index.read(text("SELECT seq FROM cursors"))[0].seq == 1
    finally:
        index.close()


def _hold_writer_lock(path, held, release) -> None:
    """In another process: take the index's writer lock, say so, keep it until told."""
    from archive.db import WriterLock

    with WriterLock(path):
        held.set()
        release.wait(30)


def _holder(path):
    """Another process that holds the index's writer lock (once it returns) until `release` is set."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    held, release = spawn.Event(), spawn.Event()
    other = spawn.Process(target=_hold_writer_lock, args=(path, held, release))
    other.start()
    assert held.wait(30), "the other process never took the lock"
    return other, release


def _wait_across_a_stop(path, waiting, release, result) -> None:
    """In another process: one thread holds the writer lock until told, another waits for it (2 s at most);
    the test stops this process meanwhile."""
    import threading

    from archive.db import WriterLock

    lock, inside = WriterLock(path, timeout=2.0), threading.Event()

    def hold() -> None:
        with lock:
            inside.set()
            release.wait(30)
    threading.Thread(target=hold).start()
    inside.wait(10)
    threading.Timer(0.2, waiting.set).start()
    try:
        with lock:
            result.put("taken")
    except Exception as exc:
        result.put(str(exc))


def test_time_a_process_was_stopped_does_not_count_against_its_writers(tmp_path):
    """The attack pass stopped (SIGSTOP) a receiver 15 s while it held the lock: on resume, its own writers that
    had waited behind it failed ("held it for over 10 s") though the lock was theirs a moment later. A wait
    that comes back late counts as long as it was asked to be."""
    import multiprocessing
    import os
    import signal
    import time

    spawn = multiprocessing.get_context("spawn")
    waiting, release, result = spawn.Event(), spawn.Event(), spawn.Queue()
    other = spawn.Process(target=_wait_across_a_stop,
                          args=(tmp_path / "index.sqlite3-writer", waiting, release, result))
    other.start()
    try:
        assert waiting.wait(30)
        os.kill(other.pid, signal.SIGSTOP)
        time.sleep(3.5)                             # past the writer's 2 s
        os.kill(other.pid, signal.SIGCONT)
        time.sleep(0.3)                             # the holder goes on a moment after it resumed
        release.set()
        assert result.get(timeout=20) == "taken"
    finally:
        other.join(20)
        if other.is_alive():
            other.kill()


def test_a_write_waiting_while_the_process_stops_fails_saying_so(tmp_path):
    """A writer waiting behind another of its process once the process is stopping: it gives up within a
    second or so and says why (it said "another writer held it for over 10 s")."""
    import threading
    import time

    from archive import db

    lock, inside, release = db.WriterLock(tmp_path / "index.sqlite3-writer"), threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            inside.set()
            release.wait(30)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        lock.stop_waiting(0.2)
        started = time.monotonic()
        with pytest.raises(sa_exc.OperationalError, match="this one is stopping"):
            with lock:
                pass
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
        holder.join(10)
        lock.close()


def test_sqlite_writers_of_several_processes_wait_for_each_other_woken_at_once_within_a_deadline(tmp_path):
    """One SQLite writer on the whole node: a write waits for another process's (its `flock`), is woken
    when that one ends (not after SQLite's busy handler's next sleep), and gives up at its deadline,
    leaving the lock to whoever comes next; a killed holder's lock is the kernel's to release."""
    import threading
    import time

    from archive import db

    index = Index(tmp_path / "index.sqlite3")
    lock = index.engines.lock
    try:
        other, release = _holder(lock.path)
        done: list[float] = []

        def write() -> None:
            with index.write() as conn:
                done.append(time.monotonic())
                Prepared(_INSERT).rows(conn, {"name": "a", "seq": 1})

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.5)
        assert not done                             # waiting for the other process
        released = time.monotonic()
        release.set()
        writer.join(10)
        other.join(10)
        assert done and done[0] - released < 0.3    # woken, not polling
        assert index.read(text("SELECT seq FROM cursors"))[0].seq == 1

        # a holder that stalls: the write fails at its deadline; the lock is not kept by the one that gave up
        other, release = _holder(lock.path)
        lock.timeout = 0.5
        started = time.monotonic()
        with pytest.raises(sa_exc.OperationalError, match="locked"):
            with index.write():
                pass
        assert 0.4 < time.monotonic() - started < 3
        release.set()
        other.join(10)
        time.sleep(0.2)                             # the taker got it after the writer gave up, and let it go
        other, release = _holder(lock.path)
        release.set()
        other.join(10)

        # killed while holding it
        other, release = _holder(lock.path)
        other.kill()
        other.join(10)
        lock.timeout = db.LOCK_TIMEOUT
        with index.write() as conn:
            Prepared(_INSERT).rows(conn, {"name": "b", "seq": 2})
    finally:
        index.close()


def test_writes_asked_together_commit_together_each_failing_alone(tmp_path, monkeypatch):
    """Group commit: the writes threads ask for while a transaction is under way go into the next one,
    with one COMMIT; a work that raises is rolled back alone and raises in its own thread; a COMMIT that
    fails fails every work of its transaction, and none of them is stored."""
    import threading

    from archive import db

    index = Index(tmp_path / "index.sqlite3")
    commits: list[str] = []
    real = db._on_driver
    failing: list[str] = []

    def counted(conn, sql):
        if sql == "COMMIT":
            commits.append(sql)
            if failing:
                raise db.sa.exc.OperationalError(sql, (), failing.pop())
        return real(conn, sql)

    monkeypatch.setattr(db, "_on_driver", counted)
    group = index.engines._group

    def together(names: list[str], bad: str = "") -> dict[str, object]:
        """Each name inserted by its own thread while another process holds the writer lock."""
        other, release = _holder(index.engines.lock.path)
        answers: dict[str, object] = {}

        def write(name: str) -> None:
            def work(conn):
                Prepared(_INSERT).rows(conn, {"name": name, "seq": len(name)})
                if name == bad:
                    raise ValueError(name)
                return name.upper()
            try:
                answers[name] = index.write_together(work)
            except Exception as exc:
                answers[name] = exc

        threads = [threading.Thread(target=write, args=(name,)) for name in names]
        threads[0].start()       # leads a transaction of its own, waiting for the lock; the others queue
        wait_for(lambda: group.leading, timeout=10, what="the first write waiting for the lock")
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: len(group.queue) == len(names) - 1, timeout=10, what="the writes queued")
        release.set()
        for thread in threads:
            thread.join(10)
        other.join(10)
        return answers

    try:
        names = [f"n{i}" for i in range(8)]
        answers = together(names, bad="n5")
        assert len(commits) == 2                                    # the leader's own, then the 7 queued
        assert isinstance(answers.pop("n5"), ValueError)
        assert answers == {name: name.upper() for name in names if name != "n5"}
        stored = {row.name for row in index.read(text("SELECT name FROM cursors"))}
        assert stored == set(answers)

        commits.clear()
        failing.append(db.sqlite3.OperationalError("disk I/O error"))
        failing.append(db.sqlite3.OperationalError("disk I/O error"))
        answers = together([f"m{i}" for i in range(5)])
        assert len(commits) == 2 and all(isinstance(a, sa_exc.OperationalError) for a in answers.values())
        # each thread its own exception: one shared would collect every thread's traceback (attack, session 33)
        assert len({id(a) for a in answers.values()}) == len(answers)
        assert {row.name for row in index.read(text("SELECT name FROM cursors"))} == stored
        with index.write() as conn:                                  # the writer is usable after it
            Prepared(_INSERT).rows(conn, {"name": "after", "seq": 1})
    finally:
        index.close()


def test_postgresql_writes_wait_for_the_disk_even_where_the_server_says_not_to(pg_cluster):
    """Success is answered only once the row is durable: a database set to synchronous_commit = off
    (a tuning some guides suggest) would lose acknowledged instances in a crash; the node's sessions
    turn it back on."""
    import secrets

    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    setup = Index(url)
    try:
        with setup.write() as conn:
            conn.execute(text(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = off"))
    finally:
        setup.close()
    index = Index(url)
    try:
        with index.write() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
        with index.reader() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"
    finally:
        index.close()


@pytest.mark.parametrize("url", ["postgresql://m3:secret@db/m3", "postgresql://m3@db/m3?password=secret",
                                 "postgresql://m3@db/m3?sslmode=require&password=secret", "mysql://m3@db/m3",
                                 "not a url"])
def test_an_index_url_with_a_password_or_another_engine_is_refused(url):
    from archive.db import IndexUrlError, check_url

    with pytest.raises(IndexUrlError):
        check_url(url)
    check_url("postgresql://m3@db:5432/m3?sslmode=verify-full")      # the right shape passes


def test_a_lock_held_elsewhere_fails_a_write_in_bounded_time(pg_cluster, monkeypatch):
    """An operator's open transaction (or a REINDEX, or a stalled node) holding a table: a C-STORE's
    index transaction fails after archive.db.LOCK_TIMEOUT (the peer gets a failure status) instead of
    hanging for as long as the lock is held."""
    import secrets
    import time

    import psycopg

    from archive import db

    monkeypatch.setattr(db, "LOCK_TIMEOUT", 0.5)
    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    index = Index(url)
    try:
        with psycopg.connect(url.replace("postgresql://", "postgresql://", 1)) as other:
            other.execute("LOCK TABLE cursors IN ACCESS EXCLUSIVE MODE")      # held until `other` ends
            started = time.monotonic()
            with pytest.raises(sa_exc.OperationalError, match="lock timeout"):
                with index.write() as conn:
                    conn.execute(text("INSERT INTO cursors (name, seq) VALUES ('x', 1)"))
            assert time.monotonic() - started < 5
        with index.write() as conn:                                          # and once it is gone, it works
            conn.execute(text("INSERT INTO cursors (name, seq) VALUES ('x', 1)"))
    finally:
        index.close()


def test_a_pooled_connection_the_server_closed_while_idle_is_replaced(pg_cluster, monkeypatch):
    """Pooled connections are pinged only after `db.PING_AFTER` seconds idle (not on every checkout: a
    round trip per ingest). One the server ended meanwhile (a restart, an operator's
    pg_terminate_backend, a proxy's idle timeout) is replaced before use: the write succeeds."""
    import secrets
    import time

    import psycopg

    from archive import db

    monkeypatch.setattr(db, "PING_AFTER", 0.2)
    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    index = Index(url)
    try:
        with index.write() as conn:
            pids = {conn.execute(text("SELECT pg_backend_pid()")).scalar()}
        with psycopg.connect(url) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        time.sleep(0.3)
        with index.write() as conn:
            conn.execute(text("INSERT INTO cursors (name, seq) VALUES ('after', 1)"))
            pids.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())
        assert len(pids) == 2                       # a new connection, not the dead one
        assert index.read(text("SELECT seq FROM cursors WHERE name = 'after'"))[0][0] == 1
    finally:
        index.close()


def test_a_round_that_fails_on_the_index_is_said_in_one_line_once_a_minute(tmp_path, caplog):
    """The offloader, the router and the viewer's notifications (archive.db.RoundFailures): an index that is
    down fails every round; the log gets the driver's one line, not a traceback per round, again only when
    it changes or a minute has passed. Anything else keeps its traceback."""
    import logging

    from archive.db import RoundFailures

    index = Index(tmp_path / "index.sqlite3")
    with index.write() as conn:
        conn.execute(text("DROP TABLE cursors"))
    log = logging.getLogger("test.rounds")
    failed = RoundFailures(log, "reading the change log for notifications")
    with caplog.at_level(logging.ERROR, logger="test.rounds"):
        for _ in range(50):
            try:
                index.read(text("SELECT seq FROM cursors"))
            except Exception as exc:
                failed(exc)
        failed(ValueError("not the index"))
    index.close()
    lines = [r for r in caplog.records if r.name == "test.rounds"]
    assert [r.getMessage() for r in lines[:-1]] == [
        "reading the change log for notifications failed: the index: OperationalError: no such table: cursors"]
    assert lines[0].exc_info is None and lines[-1].exc_info is not None      # a bug keeps its traceback
