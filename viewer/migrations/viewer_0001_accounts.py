"""The viewer's tables: users, sessions, login_failures, share_links, audit (SQLite or PostgreSQL).

An index made before Alembic (the viewer's sqlite-utils migration 0001_accounts, or the archive's
0005_viewer before issue 16: the same tables) is stamped at this revision with its rows kept.
"""
import sqlalchemy as sa
from alembic import op

revision = "viewer_0001"
down_revision = None
branch_labels = ("viewer",)
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")     # SQLite: INTEGER PRIMARY KEY is the rowid
Text, Int, Real = sa.Text, sa.Integer, sa.Float


def col(name, kind=Text, *args, **kw):
    return sa.Column(name, kind, *args, **kw)


def upgrade() -> None:
    op.create_table("users", col("name", primary_key=True),
                    col("role", nullable=False),                    # clinician | admin
                    col("password", nullable=False),                # scrypt$n$r$p$salt$hash
                    col("created_at", Real, nullable=False),
                    col("disabled", Int, nullable=False, server_default="0"))
    op.create_table("sessions",
                    col("token_hash", primary_key=True),            # SHA-256 of the cookie's token
                    col("user_name"),                               # NULL for a share-link session
                    col("share_id"),                                # the share link it came from
                    col("study_uid"),                               # a share-link session sees this study only
                    col("csrf", nullable=False), col("created_at", Real, nullable=False),
                    col("last_seen", Real, nullable=False), col("expires_at", Real, nullable=False))
    op.create_index("sessions_user", "sessions", ["user_name"])
    op.create_table("login_failures",
                    col("key", primary_key=True),                   # user:NAME or addr:ADDRESS
                    col("count", Int, nullable=False), col("last", Real, nullable=False))
    op.create_table("share_links", col("id", primary_key=True), col("study_uid", nullable=False),
                    col("created_by", nullable=False), col("created_at", Real, nullable=False),
                    col("expires_at", Real, nullable=False), col("revoked_at", Real))
    op.create_index("share_links_study", "share_links", ["study_uid"])
    op.create_table("audit", col("seq", PK, primary_key=True), col("time", Real, nullable=False),
                    col("user_name"),                               # or "share:ID"
                    col("action", nullable=False),                  # login, logout, view, download, upload, share, ...
                    col("study_uid"),
                    col("outcome", nullable=False),                 # ok | refused | failed
                    col("detail"), col("address"), sqlite_autoincrement=True)
    op.create_index("audit_time", "audit", ["time"])
    op.create_index("audit_study", "audit", ["study_uid", "time"])
