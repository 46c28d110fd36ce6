"""The router's tables: jobs, job_results, forwards, router_studies, router_fired; result files held.

The archive's first revision makes these tables too (as the archive's sqlite-utils 0004_jobs did, so
that an index opened by the archive alone has them for the viewer): each is made here only where it
is missing, with the same definition, so that every index ends up with one schema. The result files
that job_results names are held in the archive (`archive.holds`), as the router's old
0002_result_holds did. An index made by the router's sqlite-utils migrations is stamped here instead
(router/sqlite_legacy.py), its rows kept.
"""
import sqlalchemy as sa
from alembic import op

revision = "router_0001"
down_revision = None
branch_labels = ("router",)
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")     # a `changes.seq`
Text, Int, Real = sa.Text, sa.Integer, sa.Float
HOLDER = "router"


def col(name, kind=Text, *args, **kw):
    return sa.Column(name, kind, *args, **kw)


def _jobs() -> None:
    op.create_table("jobs", col("id", primary_key=True), col("study_uid", nullable=False),
                    col("plugin", nullable=False), col("params", nullable=False), col("inputs", nullable=False),
                    col("rule"), col("created_by"), col("forward_to", nullable=False), col("state", nullable=False),
                    col("attempts", Int, nullable=False), col("max_attempts", Int, nullable=False), col("worker"),
                    col("lease_expires", Real), col("errors", nullable=False), col("progress", Real),
                    col("progress_message"), col("summary"), col("supersedes", Text, sa.ForeignKey("jobs.id")),
                    col("timings"), col("created_at", Real, nullable=False), col("started_at", Real),
                    col("finished_at", Real))
    op.create_index("jobs_state", "jobs", ["state", "created_at"])
    op.create_index("jobs_study", "jobs", ["study_uid", "created_at"])


def _job_results() -> None:
    op.create_table("job_results", col("job_id", Text, sa.ForeignKey("jobs.id"), primary_key=True),
                    col("kind", nullable=False), col("name", primary_key=True), col("media_type", nullable=False),
                    col("sop_instance_uid"), col("blob_id"), col("size", sa.BigInteger, nullable=False),
                    col("sha256", nullable=False))
    op.create_index("job_results_blob", "job_results", ["blob_id"])


def _forwards() -> None:
    op.create_table("forwards", col("job_id", Text, sa.ForeignKey("jobs.id"), primary_key=True),
                    col("destination", primary_key=True), col("state", nullable=False),
                    col("attempts", Int, nullable=False, server_default="0"), col("next_try", Real, nullable=False),
                    col("last_error"))
    op.create_index("forwards_due", "forwards", ["state", "next_try"])


def _router_studies() -> None:
    op.create_table("router_studies", col("study_uid", primary_key=True), col("last_seq", SEQ, nullable=False),
                    col("last_time", Real, nullable=False))


def _router_fired() -> None:
    op.create_table("router_fired", col("study_uid", primary_key=True), col("rule", primary_key=True),
                    col("seq", SEQ, nullable=False), col("job_id"))


TABLES = {"jobs": _jobs, "job_results": _job_results, "forwards": _forwards, "router_studies": _router_studies,
          "router_fired": _router_fired}


def upgrade() -> None:
    made = set(sa.inspect(op.get_bind()).get_table_names())
    for name, make in TABLES.items():
        if name not in made:
            make()
    op.execute(sa.text("INSERT INTO blob_holds (blob_id, holder) SELECT DISTINCT blob_id, :holder FROM job_results "
                       "WHERE blob_id IS NOT NULL ON CONFLICT DO NOTHING").bindparams(holder=HOLDER))
