"""What the viewer owns (its tables and their migrations) and what it asks the owners of the
others for: the archive's study facts (archive/facts.py), the router's jobs (router/queue.py)."""
from __future__ import annotations

import hashlib
import time

import pytest
import sqlalchemy as sa

from archive import Archive, facts
from archive.query import STUDY_ROOT, Query
from helpers import index_schema, synthetic_instances
from router import queue
from viewer import accounts

VIEWER_TABLES = ("users", "sessions", "login_failures", "share_links", "audit")
# sha256 of the viewer's tables and indexes in sqlite_master as archive/index.py's migration
# 0005_viewer, then the viewer's sqlite-utils migration 0001_accounts, made them (see _old_schema):
# an old index stamped at viewer_0001 keeps them as they were
SCHEMA_0005 = "c4a283cc64c6fba96a189ffd8c65f6f03fba1f281b92723db0fc313c5153ecfd"
# the statements those migrations ran
OLD_DDL = (
    """CREATE TABLE IF NOT EXISTS users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,                  -- clinician | admin
        password TEXT NOT NULL,              -- scrypt$n$r$p$salt$hash
        created_at REAL NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS sessions (
        token_hash TEXT PRIMARY KEY,         -- SHA-256 of the cookie's token: a copy of the index opens no session
        user_name TEXT,                      -- NULL for a share-link session
        share_id TEXT,                       -- the share link it came from
        study_uid TEXT,                      -- a share-link session sees this study only
        csrf TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user_name)",
    """CREATE TABLE IF NOT EXISTS login_failures (
        key TEXT PRIMARY KEY,                -- user:NAME or addr:ADDRESS
        count INTEGER NOT NULL,
        last REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS share_links (
        id TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS share_links_study ON share_links(study_uid)",
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        user_name TEXT,                      -- or "share:ID"
        action TEXT NOT NULL,                -- login, logout, view, download, upload, share, share_open, job, ...
        study_uid TEXT,
        outcome TEXT NOT NULL,               -- ok | refused | failed
        detail TEXT,
        address TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS audit_time ON audit(time)",
    "CREATE INDEX IF NOT EXISTS audit_study ON audit(study_uid, time)",
)


def _old_schema(index) -> str:
    rows = index.read(sa.text("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name IN :tables "
                              "ORDER BY type, name").bindparams(sa.bindparam("tables", expanding=True)),
                      {"tables": VIEWER_TABLES})
    # what viewer_0004 adds to the old table (ALTER TABLE ADD COLUMN writes it into the table's SQL) is taken out
    rows = [(*r[:3], r[3].replace(", referring TEXT", "") if r[3] else r[3]) for r in rows
            if r[1] not in ("audit_user", "audit_action")]                       # and viewer_0005's indexes
    return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()


def _version(index) -> list[str]:
    return [r[0] for r in index.read(sa.text("SELECT version_num FROM alembic_version_viewer"))]


def test_the_viewers_revision_makes_its_tables(tmp_path, index_url):
    archive = Archive(tmp_path / "d", index_url=index_url)
    try:
        assert not set(VIEWER_TABLES) & set(sa.inspect(archive.index.engines.writer).get_table_names())
        accounts.migrate(archive.index)
        accounts.migrate(archive.index)                                                       # applies nothing twice
        assert _version(archive.index) == ["viewer_0005"]
        assert set(VIEWER_TABLES) <= set(sa.inspect(archive.index.engines.writer).get_table_names())
        accounts.add_user(archive.index, "alice", "a long enough password", "admin")
        assert accounts.users(archive.index) == [("alice", "admin", False)] and accounts.count_users(archive.index) == 1
    finally:
        archive.close()


def test_an_old_sqlite_index_is_stamped_with_its_tables_and_rows_kept(tmp_path):
    """An index made by the sqlite-utils migrations: the archive's 0001-0008, then the viewer's
    0001_accounts (the same statements as the archive's 0005_viewer before issue 16)."""
    import sqlite_utils

    from archive.sqlite_legacy import connect
    from archive.sqlite_legacy import migrations as archive_migrations

    (tmp_path / "d").mkdir()
    conn = connect(tmp_path / "d" / "index.sqlite3")
    archive_migrations.apply(sqlite_utils.Database(conn))
    viewer_legacy = sqlite_utils.Migrations("viewer")
    viewer_legacy(name="0001_accounts")(lambda d: [d.execute(statement) for statement in OLD_DDL])
    viewer_legacy.apply(sqlite_utils.Database(conn))
    conn.execute("INSERT INTO users (name, role, password, created_at) VALUES ('old', 'admin', 'x', 0)")
    conn.execute("INSERT INTO audit (time, action, outcome) VALUES (1, 'login', 'ok')")
    conn.close()
    archive, new = Archive(tmp_path / "d"), Archive(tmp_path / "new")
    try:
        accounts.migrate(archive.index)
        accounts.migrate(new.index)
        assert _version(archive.index) == _version(new.index) == ["viewer_0005"]
        assert _old_schema(archive.index) == SCHEMA_0005                  # stamped, not made again
        assert index_schema(archive.index, VIEWER_TABLES) == index_schema(new.index, VIEWER_TABLES)
        assert accounts.users(archive.index) == [("old", "admin", False)]
        accounts.audit(archive.index, "old", "view")
        assert [r[0] for r in archive.index.read(sa.text("SELECT seq FROM audit ORDER BY seq"))] == [1, 2]
    finally:
        archive.close()
        new.close()


def test_accounts_sessions_and_share_links(tmp_path, index_url):
    """The viewer's statements on both engines (the API tests run them on SQLite through HTTP)."""
    archive = Archive(tmp_path / "d", index_url=index_url)
    index, password = archive.index, "a long enough password"
    try:
        accounts.migrate(index)
        accounts.add_user(index, "alice", password)
        token, _ = accounts.open_session(index, user=accounts.User("alice", "clinician"), hours=1)
        with pytest.raises(accounts.AccountError, match="exists"):
            accounts.add_user(index, "alice", password)
        accounts.add_user(index, "alice", password + "!", "admin", replace=True)        # ends her sessions
        assert accounts.session(index, token, idle_minutes=10) is None
        assert accounts.users(index) == [("alice", "admin", False)]

        for _ in range(3):
            assert accounts.authenticate(index, "alice", "wrong", "10.0.0.1") is None
        assert accounts.authenticate(index, "bob", "wrong", "10.0.0.1") is None
        assert accounts.failure_delay(index, "alice", "10.0.0.9") == 1.0             # 3 failures of hers
        assert accounts.failure_delay(index, "carol", "10.0.0.1") == 2.0             # 4 from the address
        assert accounts.authenticate(index, "alice", password + "!", "10.0.0.1") == accounts.User("alice", "admin")
        assert accounts.failure_delay(index, "alice", "10.0.0.9") == 0.0             # her own typos forgiven
        assert accounts.failure_delay(index, "carol", "10.0.0.1") == 0.25            # bob's still counts

        token, opened = accounts.open_session(index, user=accounts.User("alice", "admin"), hours=1)
        found = accounts.session(index, token, idle_minutes=10, now=time.time() + 60)  # refreshes last_seen
        assert found == opened and accounts.session(index, "x" * 10, idle_minutes=10) is None
        secret = b"k" * 32
        link, _ = accounts.create_share(index, secret, "1.2.3", "alice", days=1)
        link_id, study = accounts.open_share(index, secret, link)
        assert study == "1.2.3" and accounts.share(index, link_id)["created_by"] == "alice"
        guest, _ = accounts.open_session(index, share_id=link_id, study_uid=study, hours=1)
        assert accounts.session(index, guest, idle_minutes=10).is_share
        assert accounts.revoke_share(index, link_id) and not accounts.revoke_share(index, link_id)
        assert accounts.session(index, guest, idle_minutes=10) is None
        assert accounts.closed_share(index, guest) == "revoked" and accounts.closed_share(index, token) is None
        assert accounts.share_refusal(index, secret, link) == "revoked"
        assert [s["id"] for s in accounts.shares(index, "1.2.3")] == [link_id]
        accounts.audit_many(index, "alice", "view", [("ok", "1.2.3", None), ("refused", None, "x" * 600)])
        accounts.audit_many(index, "alice", "view", [])
        assert accounts.disable_user(index, "alice", keep_an_admin=False) and not accounts.disable_user(index, "nobody")
        assert accounts.session(index, token, idle_minutes=10) is None and accounts.count_users(index) == 0
        rows = index.read(sa.text("SELECT seq, outcome, length(detail) FROM audit ORDER BY seq"))
        assert [tuple(r) for r in rows] == [(1, "ok", None), (2, "refused", 500)]
    finally:
        archive.close()


def test_study_facts(tmp_path, index_url):
    archive = Archive(tmp_path / "d", index_url=index_url)
    try:
        paths = synthetic_instances(tmp_path / "in", 2, patient="Facts^Pat", patient_id="F-1")
        stored = [archive.ingest_file(p) for p in paths]
        study_uid = stored[0].study_uid
        found = facts.study(archive.index, study_uid)
        assert (found.study_uid, found.patient_name, found.patient_id) == (study_uid, "Facts^Pat", "F-1")
        (series,) = found.series
        assert {i.sop_instance_uid for i in series.instances} == {r.sop_instance_uid for r in stored}
        assert all(i.job_id is None for i in series.instances)
        assert facts.study(archive.index, "1.2.3.4") is None
        assert facts.study_of_instance(archive.index, stored[1].sop_instance_uid) == study_uid
        assert facts.study_of_instance(archive.index, "1.2.3.4") is None
        blob = facts.stored_instance(archive.index, stored[0].sop_instance_uid)
        with archive.exported(blob.blob_id, blob.sha256) as path:
            assert path.read_bytes() == paths[0].read_bytes()
        assert facts.stored_instance(archive.index, "1.2.3.4") is None

        listed = facts.listed_studies(archive.index, [study_uid, "1.2.3.4", study_uid])
        assert list(listed) == [study_uid] and listed[study_uid]["PatientID"] == "F-1"
        assert listed[study_uid]["images"] == 2
        from pydicom.dataset import Dataset
        identifier = Dataset()
        identifier.QueryRetrieveLevel, identifier.PatientID, identifier.StudyInstanceUID = "STUDY", "F-1", ""
        (row,) = facts.study_page(archive.index, Query(STUDY_ROOT, identifier))
        assert row["StudyInstanceUID"] == study_uid
    finally:
        archive.close()


def test_jobs_of_studies_and_by_id(tmp_path):
    """SQLite only until router/queue.py is on the SQLAlchemy layer (issue 16)."""
    archive = Archive(tmp_path / "d")
    try:
        index = archive.index
        first = queue.create(index, study_uid="1.1", plugin="p", params={}, inputs=["9.1"], now=1.0)
        second = queue.create(index, study_uid="1.1", plugin="q", params={}, inputs=["9.2"], now=2.0)
        other = queue.create(index, study_uid="1.2", plugin="p", params={}, inputs=[], now=3.0)
        found = queue.jobs_of_studies(index, ["1.1", "1.2", "1.3"])
        assert [j.id for j in found["1.1"]] == [second, first]           # the newest first
        assert [j.id for j in found["1.2"]] == [other] and "1.3" not in found
        assert found["1.1"][1].inputs == ["9.1"] and found["1.1"][1].state == "queued"
        by_id = queue.jobs_by_id(index, [first, other, first, "0" * 16])
        assert set(by_id) == {first, other} and by_id[other].study_uid == "1.2"
        assert queue.jobs_of_studies(index, []) == {} and queue.jobs_by_id(index, []) == {}
    finally:
        archive.close()
