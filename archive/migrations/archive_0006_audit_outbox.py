"""The IHE ATNA audit messages waiting for the audit repository ([audit] repository), oldest first: written by
every process of the node (`archive.atna.Recorder`), sent and removed by the node's audit sender
(`archive.syslog`); while the repository is down they wait here."""
import sqlalchemy as sa
from alembic import op

revision = "archive_0006"
down_revision = "archive_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("audit_outbox", sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("node", sa.Text, nullable=False),          # nodes sharing an index send their own
                    sa.Column("created_at", sa.Float, nullable=False),
                    sa.Column("message", sa.LargeBinary, nullable=False))
    op.create_index("audit_outbox_node", "audit_outbox", ["node", "seq"])


def downgrade() -> None:
    op.drop_table("audit_outbox")
