"""Each instance's Rows, Columns, Bits Allocated and Number of Frames, which QIDO-RS returns at instance
level (PS3.18 Table 10.6.3-5) and C-FIND matches. Instances stored before this migration have none:
answered empty, and a key on them (Rows=512) does not match them."""
import sqlalchemy as sa
from alembic import op

revision = "archive_0005"
down_revision = "archive_0004"
branch_labels = None
depends_on = None

COLUMNS = ("pixel_rows", "pixel_columns", "bits_allocated", "frames")


def upgrade() -> None:
    for name in COLUMNS:          # ADD COLUMN on both engines: no copy of the table
        op.add_column("instances", sa.Column(name, sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
