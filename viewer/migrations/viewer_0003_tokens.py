"""API tokens for programs that call DICOMweb (issue 17): `m3dicom token create NAME --scope read|write`.

`api_tokens`: one row per token, by its name; the index keeps only the SHA-256 of the token (a random
32-byte secret), so a copy of the index opens nothing. A revoked token keeps its row (the audit names it).
"""
import sqlalchemy as sa
from alembic import op

revision = "viewer_0003"
down_revision = "viewer_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("api_tokens", sa.Column("name", sa.Text, primary_key=True),
                    sa.Column("token_hash", sa.Text, nullable=False, unique=True),    # SHA-256, hex
                    sa.Column("scope", sa.Text, nullable=False),                       # read | write
                    sa.Column("created_at", sa.Float, nullable=False),
                    sa.Column("expires_at", sa.Float),                                 # NULL: never
                    sa.Column("revoked_at", sa.Float),
                    sa.Column("last_used", sa.Float))
