"""A node's data directory has a random id (`data_dir/node-id`), recorded with its name in `nodes`:
a second node under a running node's name is refused when its id differs, even when its data
directory has the same path (the same configuration on another host)."""
import sqlalchemy as sa
from alembic import op

revision = "archive_0004"
down_revision = "archive_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("node_id", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("node_id")
