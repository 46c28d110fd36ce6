"""The admin page's audit search (issue 19): by who and by action, newest first, without reading the table."""
from alembic import op

revision = "viewer_0005"
down_revision = "viewer_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("audit_user", "audit", ["user_name", "seq"])
    op.create_index("audit_action", "audit", ["action", "seq"])
