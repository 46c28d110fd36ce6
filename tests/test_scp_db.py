"""scp/'s own table (commitments): its Alembic revision on a new index (SQLite or PostgreSQL) and on an
old SQLite index made by the sqlite-utils migrations, and the typed functions the storage commitment
SCP and `m3dicom status` call."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from archive.index import Index
from helpers import index_schema
from scp import db

# what scp's sqlite-utils migration 0001_commitments (and the archive's 0002_query before it) made
OLD_DDL = """
    CREATE TABLE IF NOT EXISTS commitments (
        transaction_uid TEXT PRIMARY KEY,
        calling_ae TEXT NOT NULL,
        items TEXT NOT NULL,             -- JSON [[sop_class_uid, sop_instance_uid], ...]
        state TEXT NOT NULL,             -- pending | reported
        failures INTEGER,
        received_at REAL NOT NULL,
        reported_at REAL
    );
    CREATE INDEX IF NOT EXISTS commitments_state ON commitments(state);
"""


@pytest.fixture
def index(tmp_path, index_url):
    index = Index(index_url or tmp_path / "index.sqlite3")
    db.migrate(index)
    db.migrate(index)                                   # nothing twice
    yield index
    index.close()


def version(index: Index, owner: str) -> list[str]:
    return [r[0] for r in index.read(sa.text(f"SELECT version_num FROM alembic_version_{owner}"))]


@pytest.mark.parametrize("recorded", [True, False], ids=["scp-0001", "archive-0002"])
def test_an_old_sqlite_index_is_stamped_with_its_rows_kept(tmp_path, recorded):
    """An index made by the sqlite-utils migrations: the table came from scp's 0001_commitments
    (recorded in _sqlite_migrations) or, before issue 16, from the archive's 0002_query."""
    import sqlite_utils

    from archive.sqlite_legacy import connect
    from archive.sqlite_legacy import migrations as archive_migrations

    conn = connect(tmp_path / "old.sqlite3")
    archive_migrations.apply(sqlite_utils.Database(conn))
    if recorded:
        scp_legacy = sqlite_utils.Migrations("scp")
        scp_legacy(name="0001_commitments")(lambda d: d.executescript(OLD_DDL))
        scp_legacy.apply(sqlite_utils.Database(conn))
    else:
        conn.executescript(OLD_DDL)
    conn.execute("INSERT INTO commitments (transaction_uid, calling_ae, items, state, received_at) "
                 "VALUES ('1.2.3', 'MOD', '[[\"1.2\", \"1.2.3.4\"]]', 'pending', 5)")
    conn.close()
    old, new = Index(tmp_path / "old.sqlite3"), Index(tmp_path / "new.sqlite3")
    try:
        db.migrate(old)
        db.migrate(old)                                 # nothing twice
        db.migrate(new)
        assert version(old, "scp") == version(new, "scp") == ["scp_0001"]
        assert db.get(old, "1.2.3") == db.Commitment("1.2.3", "MOD", [("1.2", "1.2.3.4")], "pending", 5)
        assert index_schema(old, ("commitments",)) == index_schema(new, ("commitments",))
        assert db.pending(old) == ["1.2.3"]
    finally:
        old.close()
        new.close()


def test_a_request_is_kept_reported_or_given_up(index):
    assert version(index, "scp") == ["scp_0001"]
    items = [("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")]
    assert db.add(index, "1.9.1", "MOD", items, max_pending=2, now=10) == 0
    assert db.add(index, "1.9.2", "MOD", items, max_pending=2, now=11) == 1
    assert db.add(index, "1.9.3", "MOD", items, max_pending=2, now=12) == 2      # refused: not kept
    assert db.add(index, "1.9.3", "OTHER", items, max_pending=2, now=12) == 0    # counted per calling AE
    with pytest.raises(db.TransactionReused):
        db.add(index, "1.9.1", "MOD", items, max_pending=9)
    assert sorted(db.pending(index)) == ["1.9.1", "1.9.2", "1.9.3"]
    assert db.get(index, "1.9.2") == db.Commitment("1.9.2", "MOD", items, "pending", 11)
    assert db.get(index, "1.9.9") is None
    assert db.report_counts(index) == db.ReportCounts(waiting=3, given_up=0)
    db.reported(index, "1.9.1", failures=1)
    db.give_up(index, "1.9.2")
    db.give_up(index, "1.9.1")                          # only a pending one is given up
    assert db.get(index, "1.9.1").state == "reported" and db.get(index, "1.9.2").state == "undeliverable"
    assert db.report_counts(index) == db.ReportCounts(waiting=1, given_up=1)
