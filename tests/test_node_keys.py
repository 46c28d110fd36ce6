"""The keys nodes on one index share (issue 16): the share links' secret and the key-encryption key.

The secret that signs share links lives in the index, wrapped by the nodes' key (viewer/accounts.py,
`shared_secret`): a link made through one node's viewer opens on another's, the index alone signs none,
and a node whose keys are not the others' is refused at start with what to copy where.
"""
from __future__ import annotations

import shutil

import pytest
from sqlalchemy import text

from archive import Archive
from archive.crypto import LocalKeyring
from archive.keys import rotate
from helpers import MotoServer, synthetic_instances
from node import owners
from node.config import from_dict
from viewer import accounts
from viewer.app import create_app

PASSWORD = "a long enough password"


def viewer_config(data_dir):
    return from_dict({"node": {"data_dir": str(data_dir)}, "viewer": {"tls": False}}, data_dir.parent)


def node_archive(data_dir, url: str = "") -> Archive:
    archive = Archive(data_dir, index_url=url)
    owners.migrate(archive.index)                  # every owner's tables, as a node's start makes them
    return archive


def copy_keys(source, data_dir) -> None:
    (data_dir / "keys").mkdir(parents=True, mode=0o700, exist_ok=True)
    for path in source.glob("*.kek"):
        shutil.copy2(path, data_dir / "keys" / path.name)


async def share(client, study: str) -> str:
    await client.post("/login", data={"user": "alice", "password": PASSWORD, "next": "/studies"},
                      allow_redirects=False)
    page = await (await client.get("/studies")).text()
    csrf = page.split('name="csrf-token" content="')[1].split('"')[0]
    made = await client.post(f"/api/studies/{study}/share", json={"days": 1}, headers={"X-CSRF-Token": csrf})
    assert made.status == 201, await made.text()
    return (await made.json())["url"].split("/s/", 1)[1]


async def opens(aiohttp_client, app_or_server, token: str, study: str) -> bool:
    guest = await aiohttp_client(app_or_server)
    opened = await guest.get(f"/s/{token}", allow_redirects=False)
    return opened.status == 302 and (await guest.get(f"/api/studies/{study}")).status == 200


async def test_a_share_link_made_on_one_node_opens_on_another(tmp_path, pg_cluster, aiohttp_client):
    url = pg_cluster.create_database("share_two_nodes")
    LocalKeyring.open(tmp_path / "keys")                         # the key file both nodes have
    archives = []
    for name in ("a", "b"):
        copy_keys(tmp_path / "keys", tmp_path / name / "var")
        archives.append(node_archive(tmp_path / name / "var", url))
    a, b = archives
    try:
        accounts.add_user(a.index, "alice", PASSWORD, "clinician")
        (path,) = synthetic_instances(tmp_path / "in", 1)
        study = a.ingest_file(path).study_uid
        client_a = await aiohttp_client(create_app(viewer_config(tmp_path / "a" / "var"), a))
        token = await share(client_a, study)
        app_b = create_app(viewer_config(tmp_path / "b" / "var"), b)
        assert await opens(aiohttp_client, app_b, token, study)                   # node B checks A's link
        ((key_id, wrapped),) = a.index.read(text("SELECT key_id, wrapped FROM viewer_secret"))
        secret = accounts.shared_secret(b.index, b.keyring, tmp_path / "b" / "var")
        assert key_id == a.keyring.local.current_key_id() and secret not in bytes(wrapped)   # no plain secret
        assert not (tmp_path / "a" / "var" / "keys" / "viewer.secret").exists()
    finally:
        for archive in archives:
            archive.close()


def test_a_node_with_another_key_is_refused_at_start(tmp_path, make_node, pg_cluster, moto):
    """Node B's operator forgot to copy the key file: B refuses to start and says what to copy where; with
    the key copied it starts. `m3dicom keys rotate` on B re-wraps the secret: A needs B's new key file."""
    url = pg_cluster.create_database("other_key")
    a = node_archive(tmp_path / "a" / "var", url)                 # the first node (in-process: its start's step)
    try:
        secret = accounts.shared_secret(a.index, a.keyring, a.data_dir)
    finally:
        a.close()
    b = make_node(start=False, index={"url": url},
                  storage={"backend": "s3", "s3": {"bucket": moto.new_bucket(), "endpoint_url": moto.url}})
    b.env.update({**pg_cluster.env, **MotoServer.CREDENTIALS})
    with pytest.raises(AssertionError, match="node exited at start") as refused:
        b.start()
    said = " ".join(str(refused.value).split())
    assert "this node's keys cannot unwrap what the other nodes on its index wrap" in said
    assert f"copy the *.kek files of data_dir/keys of a node that runs on this index into {b.data_dir / 'keys'}" \
        in said and "after `m3dicom keys rotate` on one node, copy its new key file to the others" in said
    b.stop()
    for own in (b.data_dir / "keys").glob("*.kek"):            # B's own key, made at its first start, leaves
        own.unlink()
    copy_keys(tmp_path / "a" / "var" / "keys", b.data_dir)
    b.start()
    b.stop()
    rotation = b.cli("keys", "rotate", "--quiet").stdout
    new_key = rotation.split("new key-encryption key ")[1].split(":")[0]
    assert b.rows("SELECT key_id FROM viewer_secret") == [(new_key,)]
    a = node_archive(tmp_path / "a" / "var", url)
    try:
        with pytest.raises(accounts.KeysDiffer, match=f"wrapped by {new_key}"):
            accounts.shared_secret(a.index, a.keyring, a.data_dir)   # A has not got B's new key yet
        copy_keys(b.data_dir / "keys", a.data_dir)
        assert accounts.shared_secret(a.index, a.keyring, a.data_dir) == secret   # links made before still open
    finally:
        a.close()


def test_a_node_that_would_wrap_with_a_key_of_its_own_is_refused(tmp_path, pg_cluster):
    url = pg_cluster.create_database("own_key")
    a = node_archive(tmp_path / "a" / "var", url)
    copy_keys(a.data_dir / "keys", tmp_path / "b" / "var")
    b = node_archive(tmp_path / "b" / "var", url)
    try:
        secret = accounts.shared_secret(a.index, a.keyring, a.data_dir)
        assert accounts.shared_secret(b.index, b.keyring, b.data_dir) == secret
        own = b.keyring.local.add_new()                          # a key only B has, newer: B would wrap with it
        with pytest.raises(accounts.KeysDiffer, match=f"would wrap data keys with {own.key_id}, but the nodes on "
                                                      f"its index use {a.keyring.local.current_key_id()}"):
            accounts.shared_secret(b.index, b.keyring, b.data_dir)
    finally:
        a.close()
        b.close()


def test_with_kms_a_node_without_the_kms_key_is_refused(tmp_path, pg_cluster, moto):
    """With crypto.kms_key_id the secret is wrapped by KMS: the nodes' key files may differ, their KMS key not."""
    from archive.crypto import KmsKeyring

    url = pg_cluster.create_database("kms_key")
    arn = moto.client("kms").create_key()["KeyMetadata"]["Arn"]
    a = Archive(tmp_path / "a" / "var", index_url=url, kms=KmsKeyring(moto.client("kms"), arn))
    owners.migrate(a.index)
    b = Archive(tmp_path / "b" / "var", index_url=url, kms=KmsKeyring(moto.client("kms"), arn))   # its own key file
    c = Archive(tmp_path / "c" / "var", index_url=url)                                            # no KMS
    try:
        secret = accounts.shared_secret(a.index, a.keyring, a.data_dir)
        assert a.index.read(text("SELECT key_id FROM viewer_secret"))[0][0] == f"kms:{arn}"
        assert accounts.shared_secret(b.index, b.keyring, b.data_dir) == secret
        with pytest.raises(accounts.KeysDiffer, match=f"use AWS KMS: set crypto.kms_key_id to {arn}"):
            accounts.shared_secret(c.index, c.keyring, c.data_dir)
    finally:
        for archive in (a, b, c):
            archive.close()


async def test_a_single_nodes_viewer_secret_is_adopted_and_old_links_keep_working(tmp_path, aiohttp_client):
    data_dir = tmp_path / "var"
    archive = node_archive(data_dir)
    try:
        accounts.add_user(archive.index, "alice", PASSWORD, "clinician")
        (path,) = synthetic_instances(tmp_path / "in", 1)
        study = archive.ingest_file(path).study_uid
        old = data_dir / "keys" / "viewer.secret"                # what the viewer made before this version
        old.write_bytes(b"s" * 32)
        old.chmod(0o600)
        token, _ = accounts.create_share(archive.index, old.read_bytes(), study, "alice", 1)
        config = viewer_config(data_dir)
        assert await opens(aiohttp_client, create_app(config, archive), token, study)
        old.unlink()                                             # adopted: the index has it now
        assert await opens(aiohttp_client, create_app(config, archive), token, study)
        rotate(archive, new_key=lambda: accounts.rewrap_secret(archive.index, archive.keyring))
        assert archive.index.read(text("SELECT key_id FROM viewer_secret"))[0][0] == archive.keyring.current_key_id()
        assert await opens(aiohttp_client, create_app(config, archive), token, study)
        assert b"s" * 32 not in bytes(archive.index.read(text("SELECT wrapped FROM viewer_secret"))[0][0])
    finally:
        archive.close()
