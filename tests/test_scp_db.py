"""scp/'s own table (commitments): its migration on an index made before issue 16 and on a new
one, and the typed functions the storage commitment SCP and `m3dicom status` call."""
from __future__ import annotations

import pytest

from archive.index import Index
from scp import db

# what the archive's migration 0002_query made before scp/ owned the table
OLD_DDL = """
    CREATE TABLE commitments (
        transaction_uid TEXT PRIMARY KEY,
        calling_ae TEXT NOT NULL,
        items TEXT NOT NULL,             -- JSON [[sop_class_uid, sop_instance_uid], ...]
        state TEXT NOT NULL,             -- pending | reported
        failures INTEGER,
        received_at REAL NOT NULL,
        reported_at REAL
    );
    CREATE INDEX commitments_state ON commitments(state);
"""


@pytest.fixture
def index(tmp_path):
    index = Index(tmp_path / "index.sqlite3")
    db.migrate(index)
    yield index
    index.close()


def _schema(index: Index) -> list[tuple]:
    return [tuple(r) for r in index.query("SELECT type, name, sql FROM sqlite_master WHERE tbl_name='commitments' "
                                          "ORDER BY name")]


def test_an_index_that_had_the_table_keeps_its_rows_and_ends_up_as_a_new_one(tmp_path):
    old = Index(tmp_path / "old.sqlite3")
    with old.write() as conn:
        for statement in OLD_DDL.split(";")[:2]:
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO commitments (transaction_uid, calling_ae, items, state, received_at) "
                     "VALUES ('1.2.3', 'MOD', '[[\"1.2\", \"1.2.3.4\"]]', 'pending', 5)")
    db.migrate(old)
    db.migrate(old)                                     # nothing twice
    new = Index(tmp_path / "new.sqlite3")
    db.migrate(new)
    try:
        assert db.get(old, "1.2.3") == db.Commitment("1.2.3", "MOD", [("1.2", "1.2.3.4")], "pending", 5)
        assert _schema(old) == _schema(new) and len(_schema(new)) == 3   # table, its key's index, commitments_state
        assert [tuple(r) for r in new.query("SELECT migration_set, name FROM _sqlite_migrations "
                                            "WHERE migration_set='scp'")] == [("scp", "0001_commitments")]
    finally:
        old.close()
        new.close()


def test_a_request_is_kept_reported_or_given_up(index):
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
    db.reported(index, "1.9.1", failures=1)
    db.give_up(index, "1.9.2")
    db.give_up(index, "1.9.1")                          # only a pending one is given up
    assert db.get(index, "1.9.1").state == "reported" and db.get(index, "1.9.2").state == "undeliverable"
    assert db.report_counts(index) == db.ReportCounts(waiting=1, given_up=1)
