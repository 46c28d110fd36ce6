"""The share links' signing secret, shared by every node on the index (issue 16).

`viewer_secret`: one row, the secret wrapped like the data key of an object in S3 (by the KMS key when
`crypto.kms_key_id` is set, else by the local key-encryption key), so that whoever reads the index alone
cannot sign a link. The first node to start writes it (an existing `data_dir/keys/viewer.secret` is
adopted); every node unwraps it at start.
"""
import sqlalchemy as sa
from alembic import op

revision = "viewer_0002"
down_revision = "viewer_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("viewer_secret", sa.Column("name", sa.Text, primary_key=True),     # "share-links"
                    sa.Column("key_id", sa.Text, nullable=False),                      # 0001-3f2a9c1b, kms:ARN
                    sa.Column("wrapped", sa.LargeBinary, nullable=False),
                    sa.Column("created_at", sa.Float, nullable=False),
                    sa.Column("wrapped_at", sa.Float, nullable=False))
