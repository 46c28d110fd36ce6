"""De-identified exports (issue 20): deid_exports, and the encrypted way back (deid_patients, deid_studies).

`deid_exports`: one row per copy of a study sent (or being sent) to one destination under one profile, with
its state (queued, running, succeeded, failed), counts and last error, leased like a job while it runs.
`deid_patients` / `deid_studies`: pseudonym -> the original patient, copy's Study UID -> the original study,
per project (profile). The originals are sealed (AES-256-GCM under a data key wrapped by the node's key
encryption key, as blobs are): a dump of these tables alone names no one (the rest of the index is the clinical
archive, in the clear: docs/deid.md).
"""
import sqlalchemy as sa
from alembic import op

revision = "router_0002"
down_revision = "router_0001"
branch_labels = None
depends_on = None

Text, Int, Real, Blob = sa.Text, sa.Integer, sa.Float, sa.LargeBinary


def upgrade() -> None:
    op.create_table("deid_exports", sa.Column("id", Text, primary_key=True),
                    sa.Column("study_uid", Text, nullable=False), sa.Column("profile", Text, nullable=False),
                    sa.Column("destination", Text, nullable=False), sa.Column("state", Text, nullable=False),
                    sa.Column("rule", Text), sa.Column("created_by", Text),
                    sa.Column("attempts", Int, nullable=False, server_default="0"),
                    sa.Column("max_attempts", Int, nullable=False), sa.Column("next_try", Real, nullable=False),
                    sa.Column("worker", Text), sa.Column("lease_expires", Real),
                    sa.Column("total", Int), sa.Column("sent", Int), sa.Column("dropped", Int),
                    sa.Column("pseudonym", Text), sa.Column("error", Text),
                    sa.Column("created_at", Real, nullable=False), sa.Column("started_at", Real),
                    sa.Column("finished_at", Real))
    op.create_index("deid_exports_due", "deid_exports", ["state", "next_try"])
    op.create_index("deid_exports_study", "deid_exports", ["study_uid", "created_at"])
    op.create_table("deid_patients", sa.Column("project", Text, primary_key=True),
                    sa.Column("pseudonym", Text, primary_key=True),
                    sa.Column("key_mac", Text, nullable=False),        # which original patient, keyed: collisions
                    sa.Column("key_id", Text, nullable=False), sa.Column("wrapped", Blob, nullable=False),
                    sa.Column("sealed", Blob, nullable=False), sa.Column("created_at", Real, nullable=False))
    op.create_table("deid_studies", sa.Column("project", Text, primary_key=True),
                    sa.Column("study_uid", Text, primary_key=True),    # the copy's
                    sa.Column("pseudonym", Text, nullable=False),
                    sa.Column("key_id", Text, nullable=False), sa.Column("wrapped", Blob, nullable=False),
                    sa.Column("sealed", Blob, nullable=False), sa.Column("created_at", Real, nullable=False))
    op.create_index("deid_studies_pseudonym", "deid_studies", ["project", "pseudonym"])
