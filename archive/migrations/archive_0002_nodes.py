"""Several nodes on one index: the nodes that run on it, and which node holds each blob's local copy.

`nodes`: one row per node name (`[node] name`), written when the node starts and every few seconds
while it runs (`seen_at`): a second node that starts with a name in use by a node seen within the last
minute and another data directory is refused. `instances.node`: the node that received the instance (its
blob is in that node's data directory until the node's offloader has put it in S3). `offload.node`: the
node whose offloader uploads (or removes) the blob: each node offloads what it received. Rows from before
(one node) have NULL there; the offloader that starts first adopts those of them it holds locally.
"""
import sqlalchemy as sa
from alembic import op

revision = "archive_0002"
down_revision = "archive_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("nodes", sa.Column("name", sa.Text, primary_key=True),
                    sa.Column("data_dir", sa.Text, nullable=False), sa.Column("host", sa.Text, nullable=False),
                    sa.Column("started_at", sa.Float, nullable=False), sa.Column("seen_at", sa.Float, nullable=False))
    op.add_column("instances", sa.Column("node", sa.Text))
    op.add_column("offload", sa.Column("node", sa.Text))
    op.create_index("offload_node_due", "offload", ["node", "state", "next_try"])
