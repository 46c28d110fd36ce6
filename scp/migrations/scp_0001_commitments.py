"""scp/'s table `commitments` (storage commitment requests and their reports), on SQLite or PostgreSQL.

An index made before Alembic (scp's sqlite-utils migration 0001_commitments, or the archive's
0002_query before issue 16: the same table) is stamped at this revision with its rows kept.
"""
import sqlalchemy as sa
from alembic import op

revision = "scp_0001"
down_revision = None
branch_labels = ("scp",)
depends_on = None


def upgrade() -> None:
    op.create_table("commitments",
                    sa.Column("transaction_uid", sa.Text, primary_key=True),
                    sa.Column("calling_ae", sa.Text, nullable=False),
                    sa.Column("items", sa.Text, nullable=False),        # JSON [[sop_class_uid, sop_instance_uid], ...]
                    sa.Column("state", sa.Text, nullable=False),        # pending | reported | undeliverable
                    sa.Column("failures", sa.Integer),
                    sa.Column("received_at", sa.Float, nullable=False),
                    sa.Column("reported_at", sa.Float))
    op.create_index("commitments_state", "commitments", ["state"])
