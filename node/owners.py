"""Every owner of tables in the index gets its migrations applied before the node uses it.

Each package that owns tables keeps its own numbered migrations and a `migrate(index)` that applies
them (DESIGN.md, "Who owns what"); the archive's own run when an `Index` is opened. Whatever in
`node/` opens the index for writing opens it here, so that no process works on an index that one
owner has not brought up to date.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import archive
from router import store as router_store
from scp import db as scp_db
from viewer import accounts as viewer_accounts

if TYPE_CHECKING:
    from archive import Archive
    from archive.index import Index

    from .config import Config


def migrations() -> list[Callable[[Index], None]]:
    """The owners' `migrate` functions, in the order they are applied (after the archive's own)."""
    return [
        scp_db.migrate,                 # commitments
        router_store.migrate,           # jobs, job_results, forwards, router_studies, router_fired; result holds;
                                        # deid_exports, deid_patients, deid_studies
        viewer_accounts.migrate,        # users, sessions, login failures, share links, audit
    ]


def migrate(index: Index) -> None:
    """Apply every owner's pending migrations to `index` (nothing when it is up to date)."""
    for owner in migrations():
        owner(index)


def open_archive(config: Config) -> Archive:
    """The node's archive, its index migrated by every owner."""
    opened = archive.open(config)
    try:
        migrate(opened.index)
    except BaseException:
        opened.close()
        raise
    return opened


def open_index(config: Config) -> Index:
    """The node's index alone (it must exist: `archive.open_index`), migrated by every owner."""
    index = archive.open_index(config)
    try:
        migrate(index)
    except BaseException:
        index.close()
        raise
    return index
