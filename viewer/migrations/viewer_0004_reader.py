"""Readers who see their own studies only (issue 19): `users.referring`, the Referring Physician's Name a
reader's studies carry (viewer/roles.py); NULL for the other roles.
"""
import sqlalchemy as sa
from alembic import op

revision = "viewer_0004"
down_revision = "viewer_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("referring", sa.Text))
