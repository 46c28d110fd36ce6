"""The nodes that share an index: who runs, and which node holds a blob that is not in S3 yet.

Each node has a name (`[node] name`) and its own data directory; what it receives stays there until
its offloader has put it in S3. A node records itself when it starts (`register`) and every few
seconds while it runs (`seen`). `holder` tells a reader on another node where a blob it cannot find
lies, so that it waits for the upload instead of calling the instance missing.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Collection

from sqlalchemy import bindparam, text

from .index import Index

ALIVE_SECONDS = 60.0                # a node seen this recently is running: its name is not free
SEEN_EVERY = 10.0                   # seconds between two `seen` of a running node

_GET = text("SELECT data_dir, host, node_id, seen_at FROM nodes WHERE name = :name")
_START = text("INSERT INTO nodes (name, data_dir, host, node_id, started_at, seen_at) VALUES (:name, :data_dir, :host, "
              ":node_id, :now, :now) ON CONFLICT (name) DO UPDATE SET data_dir = excluded.data_dir, "
              "host = excluded.host, node_id = excluded.node_id, started_at = excluded.started_at, "
              "seen_at = excluded.seen_at")
_FORMER = text("SELECT name FROM nodes WHERE node_id = :node_id AND name <> :name ORDER BY name")
_SEEN = text("UPDATE nodes SET seen_at = :now WHERE name = :name AND node_id = :node_id")
ID_FILE = "node-id"                 # in the data directory: this data directory's random id
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_REGISTER_LOCK = 0x6D33_6E6F        # nodes starting together on PostgreSQL: one registers at a time ("m3no")
# where the blob's only copy may be: the node that received its instance (or whose offloader has it), and
# what that node's offloader says of it
_HOLDER = text(
    "SELECT COALESCE(o.node, i.node) AS node, o.state, o.last_error FROM instances i "
    "LEFT JOIN offload o ON o.blob_id = i.blob_id WHERE i.blob_id = :blob "
    "UNION ALL SELECT node, state, last_error FROM offload WHERE blob_id = :blob LIMIT 1")

# the received instances (not results) of these series that a running node other than :node holds and has not
# put in S3 yet (no offload row yet, or one still pending), by node
_WAITING = text(
    "SELECT n.name, COUNT(*) FROM series se JOIN instances i ON i.series_pk = se.pk "
    "LEFT JOIN offload o ON o.blob_id = i.blob_id JOIN nodes n ON n.name = COALESCE(o.node, i.node) "
    "WHERE se.series_uid IN :uids AND i.job_id IS NULL AND n.name <> :node AND n.seen_at >= :alive_since "
    "AND (o.state IS NULL OR o.state = 'pending') GROUP BY n.name ORDER BY n.name"
).bindparams(bindparam("uids", expanding=True))


class NodeNameTaken(RuntimeError):
    """Another running node uses this name with another data directory."""


@dataclass(frozen=True)
class Holder:
    """The node whose data directory holds a blob, and its offloader's state for it (None: not queued yet)."""
    node: str | None
    state: str | None
    last_error: str | None


def node_id(data_dir: Path) -> str:
    """The random id of this data directory (made on first use): two data directories at the same path on
    two hosts are two nodes."""
    path = Path(data_dir) / ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        made = secrets.token_hex(16)
        with open(path, "x") as out:            # a node starting at the same moment: one of them makes it
            out.write(made + "\n")
            out.flush()
            os.fsync(out.fileno())
        return made
    except FileExistsError:
        return path.read_text().strip()


def register(index: Index, name: str, data_dir: Path, host: str, clock=None) -> None:
    """Record this node as running; refuse when a node with this name and another data directory (another
    id: `node_id`) was seen within `ALIVE_SECONDS` (two nodes under one name would each take the other's
    blobs for its own). Times are the index's clock (`Index.now`: PostgreSQL's), not each node's."""
    now, ident, data_dir = (clock or index.now)(), node_id(data_dir), str(Path(data_dir).resolve())
    with index.write() as conn:
        if not index.sqlite:
            conn.execute(_LOCK, {"key": _REGISTER_LOCK})
        row = conn.execute(_GET, {"name": name}).first()
        if row is not None and row.node_id != ident and now - row.seen_at < ALIVE_SECONDS:
            raise NodeNameTaken(
                f"node name {name!r} is in use by a running node on {row.host} with data directory {row.data_dir} "
                f"(seen {max(0.0, now - row.seen_at):.0f} s ago): give this node another [node] name, or stop that "
                f"one and wait {ALIVE_SECONDS:.0f} s")
        conn.execute(_START, {"name": name, "data_dir": data_dir, "host": host, "node_id": ident, "now": now})


def seen(index: Index, name: str, data_dir: Path, clock=None) -> bool:
    """This node still runs (its `seen_at`, by the index's clock); False when its name is another data
    directory's now (a node started under it after this one had not been seen for `ALIVE_SECONDS`)."""
    now = (clock or index.now)()
    with index.write() as conn:
        return conn.execute(_SEEN, {"name": name, "node_id": node_id(data_dir), "now": now}).rowcount == 1


def holder(index: Index, blob_id: str) -> Holder | None:
    """Which node holds the blob's local copy (None: no row names a node for it)."""
    row = index.read(_HOLDER, {"blob": blob_id})
    return Holder(*row[0]) if row and row[0].node is not None else None


def not_offloaded_elsewhere(index: Index, series_uids: Collection[str], node: str,
                            clock=None) -> dict[str, int]:
    """Running nodes other than `node` that hold instances of these series not in S3 yet: name -> how many.
    A job on those series waits (or that node's router runs it) rather than failing its attempt on them; a node
    not seen for `ALIVE_SECONDS` is not waited for."""
    if not series_uids:
        return {}
    alive_since = (clock or index.now)() - ALIVE_SECONDS
    rows = index.read(_WAITING, {"uids": list(series_uids), "node": node, "alive_since": alive_since})
    return {name: count for name, count in rows}


def former_names(index: Index, name: str, data_dir: Path) -> list[str]:
    """The names this data directory's node ran under before `name` (`node.name` changed, or it was the host
    name and the host was renamed or its container made again): what was queued under them is this node's."""
    return [row.name for row in index.read(_FORMER, {"node_id": node_id(data_dir), "name": name})]


def running(index: Index, name: str) -> bool:
    """Whether the node of this name was seen within `ALIVE_SECONDS` (by the index's clock)."""
    row = index.read(_GET, {"name": name})
    return bool(row) and index.now() - row[0].seen_at < ALIVE_SECONDS
