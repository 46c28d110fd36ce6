"""archive.nodes: one running node per name, told apart by the random id in its data directory."""
from __future__ import annotations

import pytest

from archive import nodes
from archive.index import Index


@pytest.fixture
def index(tmp_path, index_url):
    i = Index(index_url or tmp_path / "index.sqlite3")
    yield i
    i.close()


def test_a_second_node_under_a_running_nodes_name_is_refused_even_at_the_same_path(index, tmp_path):
    data = tmp_path / "var"
    data.mkdir()
    clock = [1000.0]
    nodes.register(index, "node-a", data, "host-1", clock=lambda: clock[0])
    nodes.register(index, "node-a", data, "host-1", clock=lambda: clock[0] + 5)      # its own restart: fine
    # the same configuration on a second host: the same path, another directory (another id)
    (data / nodes.ID_FILE).write_text("0" * 32 + "\n")
    with pytest.raises(nodes.NodeNameTaken, match="node name 'node-a' is in use by a running node on host-1"):
        nodes.register(index, "node-a", data, "host-2", clock=lambda: clock[0] + 10)
    # once the first has not been seen for ALIVE_SECONDS the name is free again
    nodes.register(index, "node-a", data, "host-2", clock=lambda: clock[0] + 5 + nodes.ALIVE_SECONDS + 1)


def test_the_id_is_made_once_and_kept(tmp_path):
    first = nodes.node_id(tmp_path)
    assert len(first) == 32 and nodes.node_id(tmp_path) == first


def test_times_are_the_index_clock_and_a_node_whose_name_was_taken_over_is_told(index, tmp_path):
    """`seen_at` is the index's clock (PostgreSQL's on a shared index: a node whose own clock is off is
    neither taken for dead nor for alive wrongly). A node that stalled past ALIVE_SECONDS while another data
    directory took its name over learns it at its next beat (`seen` is False: the node logs an error)."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir(), second.mkdir()
    nodes.register(index, "node-a", first, "host-1")
    (row,) = index.read(nodes._GET, {"name": "node-a"})
    assert abs(row.seen_at - index.now()) < 5
    assert nodes.seen(index, "node-a", first)
    nodes.register(index, "node-a", second, "host-2", clock=lambda: index.now() + nodes.ALIVE_SECONDS + 1)
    assert not nodes.seen(index, "node-a", first)
    assert nodes.seen(index, "node-a", second)
