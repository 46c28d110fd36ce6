"""The index's engines: the embedded SQLite file, or PostgreSQL shared by several nodes.

`[index] url = ""` is the SQLite file `data_dir/index.sqlite3`: WAL, `synchronous=FULL`, foreign
keys, a busy timeout; one writer at a time on the whole node (`WriterLock`, then `BEGIN IMMEDIATE`), and
readers on read-only connections of their own that never wait for it. `url = "postgresql://..."`
is PostgreSQL through psycopg 3 and SQLAlchemy's pool: writes in READ COMMITTED transactions,
reads in read-only ones; the password comes from libpq (PGPASSWORD, PGPASSFILE, a service file),
never from the URL. Queries are SQLAlchemy Core (`text()` with `:named` parameters in SQL both
engines accept, or Core expressions where they differ): one copy of each, for both. `Prepared` runs
the ingest's statements (one copy too, compiled once per dialect) without `execute`'s overhead.
"""
from __future__ import annotations

import copy
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

SQLITE_FILE = "index.sqlite3"
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON",
                  "PRAGMA busy_timeout=10000", "PRAGMA case_sensitive_like=ON")
log = logging.getLogger(__name__)
LOCK_TIMEOUT = 10.0                 # seconds a write waits for another writer's lock (SQLite and PostgreSQL)
IDLE_IN_TRANSACTION = 60.0          # PostgreSQL: seconds a session may sit idle inside a transaction
POOL_SIZE = 5                       # PostgreSQL connections kept per process (and as many more when busy)
PING_AFTER = 2.0                    # PostgreSQL: a pooled connection idle this many seconds is pinged before use


class IndexUrlError(ValueError):
    """`[index] url` names something the node cannot use."""


def check_url(url: str) -> None:
    """Refuse what the node cannot use: another engine, or a password written into the URL."""
    if not url:
        return
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise IndexUrlError(f"index.url: {url!r} is not a database URL (postgresql://USER@HOST:PORT/DATABASE)") \
            from None
    if parsed.get_backend_name() != "postgresql":
        raise IndexUrlError("index.url: only postgresql://... (or empty: the SQLite file in node.data_dir)")
    if parsed.password is not None or "password" in parsed.query:
        raise IndexUrlError("index.url: no password in the URL: give it to libpq (PGPASSWORD, a pass file "
                            "named by PGPASSFILE, or a service file)")


class WriterLock:
    """SQLite's one writer, across the node's processes: a thread lock, then `flock` on a file beside the
    index, waited for at most LOCK_TIMEOUT seconds.

    SQLite's own wait for its write lock (the busy timeout) sleeps 1, 2, 5, 10 ... 100 ms between tries, and
    a process that waits holds its writers behind the thread lock meanwhile: with two receiving processes
    and 16 senders, one process spent half of a run waiting (up to 0.6 s at once) for transactions that take
    0.1 ms. A blocked `flock` is woken by the kernel when the lock is released. `flock` has no timeout, so
    the blocking call is made by one thread of the process (`_taker`) and the writer waits for it with one:
    a writer that gives up leaves the taker to release the lock as soon as it gets it. The kernel releases a
    dead process's `flock`. Without the file (a read-only data directory): SQLite's busy timeout alone."""

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT):
        self.path, self.timeout = path, timeout
        self.local = threading.Lock()           # one writer of this process at a time
        self._fd: int | None = None
        self._state = threading.Condition()     # what the taker and the waiting writer tell each other
        self._wanted = self._taken = self._taking = False
        self._taker: threading.Thread | None = None
        self._until = float("inf")              # no wait past this (monotonic): `stop_waiting`

    def stop_waiting(self, within: float = 1.0) -> None:
        """The process is stopping: from now on a write waits at most `within` seconds for another process's
        lock, those waiting already too. A free lock is still taken (a stop does not fail what can be
        stored); one that another process keeps (stalled, stopped) fails the write instead of holding the
        stop for LOCK_TIMEOUT per association."""
        with self._state:
            self._until = min(self._until, time.monotonic() + within)
            self._state.notify_all()

    def __enter__(self) -> "WriterLock":
        if not _wait_running(lambda seconds: self.local.acquire(timeout=seconds), self.timeout, lambda: self._until):
            raise self._locked()
        try:
            self._take()
        except BaseException:
            self.local.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.local.release()

    def _take(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return
        with self._state:
            if not self._taking:        # (while the taker waits, a lock taken here would be the taker's too)
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            self._wanted = True
            if self._taker is None:
                self._taker = threading.Thread(target=self._take_for_writers, name="index-writer-lock", daemon=True)
                self._taker.start()
            self._state.notify_all()

            def taken(seconds: float) -> bool:     # (woken by `stop_waiting` too: the slice ends there)
                if not self._taken:
                    self._state.wait(seconds)
                return self._taken
            if not _wait_running(taken, self.timeout, lambda: self._until):
                self._wanted = False            # the taker releases it when it comes
                raise self._locked()
            self._taken = self._wanted = False
            self._state.notify_all()

    def _locked(self) -> sa.exc.OperationalError:
        return _locked(0 if time.monotonic() >= self._until else self.timeout)

    def _take_for_writers(self) -> None:
        """The taker: waits, blocked in the kernel, for the file lock whenever a writer wants it."""
        while True:
            with self._state:
                self._state.wait_for(lambda: self._wanted or self._fd is None)
                if self._fd is None:
                    return
                self._taking, fd = True, self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._state:
                if self._wanted:
                    self._taken = True
                    self._state.notify_all()
                    self._state.wait_for(lambda: not self._taken)   # the writer has it (released in __exit__)
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)          # its writer gave up meanwhile
                self._taking = False

    def close(self) -> None:
        """Close the file (its taker ends); a later write opens it again."""
        with self.local, self._state:
            if self._fd is not None and not self._taking:
                os.close(self._fd)
                self._fd, self._taker = None, None
                self._state.notify_all()


class NoWriterLock:
    """PostgreSQL's writers: the server orders them, nothing to take."""
    local = nullcontext()

    def __enter__(self) -> "NoWriterLock":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def stop_waiting(self, within: float = 1.0) -> None:
        pass

    def close(self) -> None:
        pass


STALL = 1.0     # seconds a wait may come back late before the lateness counts as time the process was not running


def _wait_running(wait: Callable[[float], bool], seconds: float, until: Callable[[], float]) -> bool:
    """`wait(s)` (True once what it waits for has come) in slices, until `seconds` of waiting have passed or the
    monotonic time `until()`. A slice that came back over STALL seconds late counts only as long as it was
    asked to be: the process was not running (SIGSTOP, a paused virtual machine), and the writer of its own that
    held it up resumed with it (the attack pass: a receiver stopped 15 s while it held the lock failed its own
    queued writes on resume)."""
    left = seconds
    while True:
        asked = max(0.0, min(left, STALL, until() - time.monotonic()))
        started = time.monotonic()
        if wait(asked):
            return True
        took = time.monotonic() - started
        left -= asked if took > asked + STALL else took
        if left <= 0 or time.monotonic() >= until():
            return False


def _locked(waited: float) -> sa.exc.OperationalError:
    """`waited` 0: the process is stopping."""
    cause = sqlite3.OperationalError(f"database is locked (another writer held it for over {waited:g} s)" if waited
                                     else "database is locked by another process, and this one is stopping")
    return sa.exc.OperationalError("BEGIN IMMEDIATE", (), cause)


T = TypeVar("T")


class _Work:
    """One `Engines.write_together` call: its work, then what it gave."""
    __slots__ = ("work", "result", "error", "done")

    def __init__(self, work: Callable[[Connection], Any]):
        self.work, self.result, self.error, self.done = work, None, None, False

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result

    def failed(self, exc: BaseException, shared: bool) -> None:
        """The transaction failed with `exc`: a copy of its own for each thread but the leader (`shared`),
        whose traceback would otherwise collect every thread's frames (and keep their locals alive)."""
        if shared:
            try:
                exc = copy.copy(exc)
            except Exception:           # an exception that cannot be rebuilt from its arguments: this one
                pass
        self.error = exc


class _Group:
    """The works waiting for the next SQLite transaction of this process, and whether one is under way."""

    def __init__(self):
        self.state = threading.Condition()
        self.queue: list[_Work] = []
        self.leading = False


@dataclass
class Engines:
    """The index's two engines (the same one twice on PostgreSQL, reads marked read-only) and the
    lock writers take in this process (SQLite has one writer; PostgreSQL orders its own)."""
    writer: Engine
    readers: Engine
    lock: WriterLock | NoWriterLock
    where: str                      # the SQLite file, or the URL without a password
    _held: Connection | None = None  # SQLite: the writer's one connection, kept out of its pool (below)
    _group: "_Group" = field(default_factory=lambda: _Group())   # SQLite: `write_together`'s queue

    @property
    def sqlite(self) -> bool:
        return self.writer.dialect.name == "sqlite"

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """The writer's connection, outside any transaction, under the writers' lock.

        SQLite has one writer connection: it stays checked out of its pool between transactions
        (a checkout and return cost more than an ingest's statements) and is only used under the
        lock. PostgreSQL: a connection of the pool for the block."""
        with self.lock:
            if not self.sqlite:
                with self.writer.connect() as conn:
                    yield conn
                return
            yield self._sqlite_connection()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: committed when the block ends, rolled back when it raises.

        SQLite: the transaction is the driver's (BEGIN IMMEDIATE ... COMMIT), the held connection in
        SQLAlchemy's AUTOCOMMIT mode: SQLAlchemy's own begin and commit cost as much as an ingest's
        statements (bench/index.py). A statement run through `execute` inside the block begins
        SQLAlchemy's transaction too (no BEGIN then: `_writer_begin`), committed or rolled back here,
        which commits or rolls back the driver's."""
        with self.lock:
            if not self.sqlite:
                with self.writer.begin() as conn:
                    yield conn
                return
            conn = self._sqlite_connection()
            driver = conn.connection.driver_connection
            _on_driver(conn, "BEGIN IMMEDIATE")
            try:
                yield conn
                if conn.in_transaction():       # SQLAlchemy's own (autobegun by an execute): ends with ours
                    conn.commit()
                if driver.in_transaction:
                    _on_driver(conn, "COMMIT")
            finally:
                if conn.in_transaction():
                    conn.rollback()
                if driver.in_transaction:
                    driver.execute("ROLLBACK")

    def write_together(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in a write transaction, committed (durable) before this returns, shared with the
        `write_together` calls other threads of this process make meanwhile (group commit).

        SQLite: the thread that finds no transaction under way leads one: it takes every work queued (its own
        with them), runs each inside a SAVEPOINT and commits them together, one fsync for all; the others
        wait for it and are answered from it. A work that raises is rolled back alone (to its savepoint) and
        its exception raised in its own thread; a transaction that fails (its BEGIN or COMMIT) fails every
        work in it. With 16 associations on two receiving processes, a COMMIT each held the writer lock
        for most of its time (its fsync; 0.6 ms at p50, 3.6 at p90) while every other writer waited.
        PostgreSQL: a transaction of its own (the server orders concurrent commits itself)."""
        if not self.sqlite:
            with self.write() as conn:
                return work(conn)
        group, mine = self._group, _Work(work)
        with group.state:
            group.queue.append(mine)
            group.state.wait_for(lambda: mine.done or not group.leading)
            if mine.done:
                return mine.outcome()
            group.leading, batch, group.queue = True, group.queue, []
        try:
            self._write_batch(batch, mine)
        finally:
            with group.state:
                for queued in batch:
                    queued.done = True
                group.leading = False
                group.state.notify_all()
        return mine.outcome()

    def _write_batch(self, batch: list["_Work"], leader: "_Work") -> None:
        try:
            with self.write() as conn:
                if len(batch) == 1:
                    batch[0].result = batch[0].work(conn)       # no savepoint: it is the transaction
                    return
                for queued in batch:
                    _on_driver(conn, "SAVEPOINT work")
                    try:
                        queued.result = queued.work(conn)
                    except Exception as exc:
                        _on_driver(conn, "ROLLBACK TO work")
                        queued.error = exc
                    _on_driver(conn, "RELEASE work")
        except BaseException as exc:
            for queued in batch:
                if not (len(batch) > 1 and queued.error):    # a work that failed alone keeps its own error
                    queued.failed(exc, shared=queued is not leader)
            if not isinstance(exc, Exception):
                raise

    def _sqlite_connection(self) -> Connection:
        """The one SQLite writer connection (under the lock)."""
        if self._held is None or self._held.closed:
            self._held = self.writer.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._held

    def stopping(self) -> None:
        """The process is stopping: a write waits at most a second more for another process's lock (SQLite)."""
        self.lock.stop_waiting()

    def dispose(self) -> None:
        with self.lock.local:           # this process's writers only: nothing waits on others
            if self._held is not None:
                self._held.close()
                self._held = None
        self.lock.close()
        self.readers.dispose()
        self.writer.dispose()


def open_engines(where: str | Path) -> Engines:
    """Engines on a SQLite file (a path) or on PostgreSQL (a postgresql:// URL)."""
    text = str(where)
    if text.startswith("postgresql"):
        check_url(text)
        return _postgresql(text)
    return _sqlite(Path(where))


def _sqlite(path: Path) -> Engines:
    connect_args = {"check_same_thread": False, "timeout": 10}
    # writes use one connection, held by Engines (`write`); the other is for whoever opens the engine itself
    # (sa.inspect): it must not wait for the held one
    writer = sa.create_engine(f"sqlite:///{path}", connect_args=connect_args, pool_size=2, max_overflow=0,
                              hide_parameters=True)
    readers = sa.create_engine(f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true", connect_args=connect_args,
                               pool_size=8, max_overflow=16, hide_parameters=True)

    @sa.event.listens_for(writer, "connect")
    def _writer_connect(dbapi, record) -> None:
        dbapi.isolation_level = None        # transactions begin where SQLAlchemy says (below), nowhere else
        for pragma in SQLITE_PRAGMAS:
            dbapi.execute(pragma)

    @sa.event.listens_for(writer, "begin")
    def _writer_begin(conn: Connection) -> None:
        if not conn.connection.driver_connection.in_transaction:     # Engines.write begins its own
            _on_driver(conn, "BEGIN IMMEDIATE")

    @sa.event.listens_for(readers, "connect")
    def _reader_connect(dbapi, record) -> None:
        dbapi.isolation_level = None
        dbapi.execute("PRAGMA case_sensitive_like=ON")

    @sa.event.listens_for(readers, "begin")
    def _reader_begin(conn: Connection) -> None:
        _on_driver(conn, "BEGIN")       # deferred: a snapshot, never a lock the writer waits for

    return Engines(writer, readers, WriterLock(path.with_name(path.name + "-writer")), str(path))


def _on_driver(conn: Connection, sql: str) -> None:
    """`sql` on the DBAPI connection (exec_driver_sql costs as much as an ingest's statements), its
    errors raised as SQLAlchemy's."""
    try:
        conn.connection.driver_connection.execute(sql)
    except sqlite3.Error as exc:
        raise sa.exc.DBAPIError.instance(sql, (), exc, sqlite3.Error, dialect=conn.dialect) from exc


def _postgresql(url: str) -> Engines:
    parsed = sa.engine.make_url(url).set(drivername="postgresql+psycopg")
    writer = sa.create_engine(parsed, isolation_level="READ COMMITTED", pool_size=POOL_SIZE,
                              max_overflow=POOL_SIZE, hide_parameters=True)
    readers = writer.execution_options(postgresql_readonly=True)

    # A connection is pinged before use only when it sat in the pool for PING_AFTER seconds: a ping on every
    # checkout (pool_pre_ping) is one more round trip per ingest. A server restarted within those seconds
    # fails that one transaction (the sender's retry gets a new connection: SQLAlchemy drops the pool).
    @sa.event.listens_for(writer, "checkin")
    def _idle_since(dbapi, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(writer, "checkout")
    def _ping_if_idle(dbapi, record, proxy) -> None:
        if time.monotonic() - record.info.get("idle_since", time.monotonic()) < PING_AFTER:
            return
        try:
            alive = writer.dialect.do_ping(dbapi)
        except writer.dialect.loaded_dbapi.Error:
            alive = False
        if not alive:       # the pool discards it and connects again (SQLAlchemy's own retry)
            raise sa.exc.DisconnectionError("the index's connection was closed while idle")

    @sa.event.listens_for(writer, "connect")
    def _durable(dbapi, record) -> None:
        # a C-STORE is answered Success only once its row is on disk: a server (or role, or database) set to
        # synchronous_commit = off would lose acknowledged instances in a crash; "local", "remote_write",
        # "on" and "remote_apply" all wait at least for the local WAL flush
        with dbapi.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            if cursor.fetchone()[0] == "off":
                cursor.execute("SET synchronous_commit = on")
            # a lock someone else holds (an operator's open transaction, a REINDEX, a stalled node) fails a
            # statement after LOCK_TIMEOUT instead of holding a C-STORE, a C-FIND or a page for as long; a
            # session that sits in an open transaction is ended (its locks with it)
            cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT * 1000:.0f}ms'")
            cursor.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION * 1000:.0f}ms'")
        dbapi.commit()

    return Engines(writer, readers, NoWriterLock(), parsed.render_as_string(hide_password=True))


def brief(exc: BaseException) -> str:
    """One line for a log: the driver's own error for a database failure ("OperationalError: no such
    table: studies"), without the statement SQLAlchemy appends (parameters are hidden in any case:
    they carry patients' names and IDs)."""
    if isinstance(exc, sa.exc.TimeoutError):        # the pool's: every connection of this process is in use
        return "TimeoutError: every connection of this process's pool to the index is in use"
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


@contextmanager
def deadline(conn: Connection, timeout: float | None) -> Iterator[None]:
    """Statements on `conn` inside the block end with `QueryCancelled` past `timeout` seconds of work."""
    if not timeout:
        yield
        return
    if conn.dialect.name == "sqlite":
        raw = conn.connection.driver_connection
        end = time.monotonic() + timeout
        raw.set_progress_handler(lambda: time.monotonic() > end, 20000)
        try:
            yield
        except Exception as exc:        # SQLAlchemy's OperationalError, or sqlite3's raised while fetching
            if "interrupt" in str(exc):
                raise QueryCancelled(timeout) from None
            raise
        finally:
            raw.set_progress_handler(None, 0)
        return
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
    try:
        yield
    except sa.exc.OperationalError as exc:
        if "statement timeout" in str(exc.orig):
            raise QueryCancelled(timeout) from None
        raise


class QueryCancelled(Exception):
    def __init__(self, timeout: float):
        super().__init__(f"the query took more than {timeout:g} s")
        self.timeout = timeout


_NONE: Mapping[str, Any] = MappingProxyType({})


class Prepared:
    """A `text()` statement compiled once per dialect by SQLAlchemy's compiler (its SQL and the order of
    its parameters) and run on the DBAPI cursor of the connection's transaction: for the statements an
    ingest runs each time, where `Connection.execute` (and even `exec_driver_sql`) costs several times
    what SQLite spends on the statement (bench/index.py). Rows are the driver's (sequences: index or
    unpack them); errors are SQLAlchemy's, as from `execute`. For `Engines.write`'s transaction (on a
    connection outside one, each statement is its own). The same rows as `conn.execute(text(sql),
    params)` (tests/test_db.py); `:named` parameters only, untyped and not expanding (no IN lists).

    `prepare` (PostgreSQL): psycopg's. None: the statement is prepared on the server after five runs on a
    connection, and PostgreSQL may then give it one generic plan for any values; False: never prepared, each
    run planned for its values (for statements whose best plan depends on them)."""

    def __init__(self, sql: str, prepare: bool | None = None):
        self.statement = sa.text(sql)
        self.prepare = prepare
        self._compiled: dict[str, tuple[str, tuple[str, ...]]] = {}     # by dialect name

    def rows(self, conn: Connection, params: Mapping[str, Any] = _NONE) -> list:
        """The rows (the driver's: index or unpack them) of a SELECT, or of a change with RETURNING."""
        return self._run(conn, params, None, True)

    def run(self, conn: Connection, params: Mapping[str, Any] = _NONE) -> int:
        """Run a statement without rows; the driver's rowcount."""
        return self._run(conn, params, None, False)

    def run_many(self, conn: Connection, many: Sequence[Mapping[str, Any]]) -> int:
        """Run a statement without rows once per item of `many` (the driver's executemany)."""
        return self._run(conn, None, many, False)

    def _run(self, conn: Connection, params, many, rows: bool):
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = self._compile(dialect)
        sql, names = compiled
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            if many is None:
                arguments = [params[n] for n in names] if dialect.positional else {n: params[n] for n in names}
                if self.prepare is not None and dialect.name == "postgresql":
                    cursor.execute(sql, arguments, prepare=self.prepare)
                else:
                    cursor.execute(sql, arguments)
            else:
                arguments = [[p[n] for n in names] if dialect.positional else {n: p[n] for n in names} for p in many]
                cursor.executemany(sql, arguments)
            return cursor.fetchall() if rows else cursor.rowcount
        except dialect.loaded_dbapi.Error as exc:
            # no arguments in the error (the engines' hide_parameters does not reach here): names and IDs
            raise sa.exc.DBAPIError.instance(sql, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
                                             dialect=dialect) from exc
        finally:
            cursor.close()

    def _compile(self, dialect) -> tuple[str, tuple[str, ...]]:
        compiled = self.statement.compile(dialect=dialect)
        for name, bind in compiled.binds.items():
            if bind.expanding or bind.literal_execute or not isinstance(bind.type, sa.types.NullType):
                raise ValueError(f"Prepared: parameter {name!r} must be a plain :{name} (not expanding, untyped)")
        names = tuple(compiled.positiontup) if compiled.positional else tuple(compiled.binds)
        return compiled.string, names


class RoundFailures:
    """How a service loop (the offloader, the router) logs a failed round: a database error as the
    driver's one line, said again at most once a minute while it stays the same (an index that is down
    fails every round); anything else with its traceback."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 60.0):
        self.log, self.what, self.every = logger, what, every
        self._said, self._said_at = "", 0.0

    def __call__(self, exc: BaseException) -> None:
        if not isinstance(exc, (sa.exc.DBAPIError, sa.exc.TimeoutError)):
            self.log.error("%s failed", self.what, exc_info=exc)
            return
        said, now = brief(exc), time.monotonic()
        if said != self._said or now - self._said_at > self.every:
            self.log.error("%s failed: the index: %s", self.what, said)
            self._said, self._said_at = said, now


# -- migrations: Alembic, one version folder and version table per owner ------------------------------

_ENV = Path(__file__).with_name("alembic")
_MIGRATING = threading.Lock()       # Alembic's `context` is one per process: one migration at a time
_MIGRATION_LOCK = 0x6D33_6469       # the PostgreSQL advisory lock every node's migrations take ("m3di")
logging.getLogger("alembic").setLevel(logging.WARNING)     # its INFO is a line per plug-in; ours is below


def migrate(engines: Engines, owner: str, folder: Path, legacy: Callable[[Any], bool] | None = None) -> None:
    """Bring `owner`'s tables up to its newest revision (Alembic, version folder `folder`, version table
    `alembic_version_<owner>`), in one write transaction.

    `legacy(sqlite3_connection)`: for a SQLite index made before Alembic by sqlite-utils migrations
    (table `_sqlite_migrations`); it brings such an index to the schema of the owner's first revision
    (outside any transaction: some of those migrations hold their own) and returns True, or returns
    False when the index has none of the owner's old migrations. True: the first revision is stamped,
    not run, and the rows are kept.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_ENV))
    config.set_main_option("version_locations", str(folder))
    config.attributes["version_table"] = table = f"alembic_version_{owner}"
    with _MIGRATING, engines.connection() as conn:
        stamp = False
        if legacy is not None and engines.sqlite:
            raw = conn.connection.driver_connection
            made = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table' AND name IN "
                                              "(?, '_sqlite_migrations')", (table,))}
            stamp = made == {"_sqlite_migrations"} and legacy(raw)
        with conn.begin():
            if not engines.sqlite:      # nodes starting together on one PostgreSQL: one migrates, the others wait
                conn.execute(sa.text("SET LOCAL lock_timeout = 0"))      # for as long as a migration takes
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            before = _heads(conn, table)
            config.attributes["connection"] = conn
            if stamp:
                first = [s.revision for s in ScriptDirectory.from_config(config).walk_revisions()
                         if s.down_revision is None]
                command.stamp(config, first[0])
            command.upgrade(config, "heads")
            after = _heads(conn, table)
    if after != before:
        log.info("index: %s's tables migrated from %s to %s", owner, ",".join(before) or "nothing",
                 ",".join(after))


def _heads(conn: Connection, table: str) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext
    return tuple(sorted(MigrationContext.configure(conn, opts={"version_table": table}).get_current_heads()))
