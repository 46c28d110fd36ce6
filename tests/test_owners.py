"""Every owner of tables migrates the index the node opens (node/owners.py), on SQLite and PostgreSQL."""
from __future__ import annotations

import re
import secrets

import sqlalchemy as sa

from archive.index import Index
from helpers import MotoServer, data_file, wait_for
from node import owners


def test_every_owner_migrates_the_index(tmp_path, index_url):
    index = Index(index_url or tmp_path / "index.sqlite3")
    try:
        owners.migrate(index)
        owners.migrate(index)                           # nothing twice
        tables = set(sa.inspect(index.engines.writer).get_table_names())
        assert {"commitments", "users", "audit", "jobs"} <= tables
        for owner, revision in (("archive", "archive_0006"), ("scp", "scp_0001"), ("viewer", "viewer_0005")):
            assert [r[0] for r in index.read(sa.text(f"SELECT version_num FROM alembic_version_{owner}"))] == [revision]
    finally:
        index.close()


def test_a_node_on_postgresql_starts_and_stores(make_node, pg_cluster, moto):
    url = pg_cluster.create_database(f"t_{secrets.token_hex(6)}")
    node = make_node(start=False, index={"url": url},      # a shared index: blobs go to S3
                     storage={"backend": "s3", "s3": {"bucket": moto.new_bucket(), "endpoint_url": moto.url}})
    node.env.update({**pg_cluster.env, **MotoServer.CREDENTIALS})   # libpq's pass file: no password in the TOML
    node.start()
    node.storescu(data_file("CT_small.dcm"), timeout=60)
    index = Index(url)
    try:
        wait_for(lambda: index.read(sa.text("SELECT COUNT(*) FROM instances"))[0][0] == 1, what="the instance")
        assert not (node.data_dir / "index.sqlite3").exists()
    finally:
        index.close()
    # `m3dicom status` on PostgreSQL (its sums are Decimals there: the local cache's size failed to print)
    said = node.cli("status").stdout
    name = node.settings["node"]["name"] if "name" in node.settings.get("node", {}) else None
    assert "index: shared, postgresql://" in said and "archive: 1 instances in 1 studies" in said, said
    assert re.search(r"offload to s3://\S+ \(what this node, \S+, received\):", said), said
    assert "local cache: " in said and (name is None or f"node: {name}" in said)


def test_an_index_that_cannot_be_reached_is_one_line_not_a_traceback(tmp_path, capsys, pg_cluster):
    """An operator's mistakes with a shared index (server down, wrong password) end a command with one line
    that names index.url and where the password comes from."""
    from helpers import free_port
    from node import cli

    config = tmp_path / "m3dicom.toml"
    for url in (f"postgresql://m3dicom@127.0.0.1:{free_port()}/m3dicom",            # nothing listens there
                pg_cluster.url().replace("m3dicom@", "nobody@")):                   # no such role / password
        config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[index]\nurl = "{url}"\n'
                          '[storage]\nbackend = "s3"\n[storage.s3]\nbucket = "unused"\n')
        assert cli.main(["status", "--config", str(config)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("m3dicom: cannot use the index: OperationalError: ") and "index.url" in err, err
        assert "Traceback" not in err and err.count("\n") == 1
