"""Alembic's environment for every owner's migrations (`archive.db.migrate` runs it).

The connection (in its write transaction) and the owner's version table come from the caller:
each owner keeps its own version folder and table, so owners migrate independently.
"""
from alembic import context

attributes = context.config.attributes
context.configure(connection=attributes["connection"], version_table=attributes["version_table"],
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
