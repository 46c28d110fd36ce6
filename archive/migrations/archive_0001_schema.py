"""The archive's tables as the sqlite-utils migrations 0001-0008 left them (archive/sqlite_legacy.py).

An index made by those is stamped at this revision (its rows kept); a new one, SQLite or PostgreSQL,
gets the same tables here. The router's tables (jobs, job_results, forwards, router_studies,
router_fired) were made by the archive's 0004_jobs and still are, until the router's own revisions
make them: an index opened by the archive alone has them for the viewer to read.
"""
import sqlalchemy as sa
from alembic import op

revision = "archive_0001"
down_revision = None
branch_labels = ("archive",)
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")     # SQLite: INTEGER PRIMARY KEY is the rowid
Text, Int, Real = sa.Text, sa.Integer, sa.Float


def col(name, kind=Text, *args, **kw):
    return sa.Column(name, kind, *args, **kw)


def upgrade() -> None:
    op.create_table("patients", col("pk", PK, primary_key=True), col("patient_id", nullable=False),
                    col("patient_name"), col("birth_date"), col("sex"), col("patient_name_key"))
    op.create_index("patients_id", "patients", ["patient_id"], unique=True,
                    sqlite_where=sa.text("patient_id <> ''"), postgresql_where=sa.text("patient_id <> ''"))
    op.create_index("patients_patient_id", "patients", ["patient_id"])
    op.create_index("patients_name_key", "patients", ["patient_name_key"])
    op.create_table("studies", col("pk", PK, primary_key=True), col("study_uid", nullable=False, unique=True),
                    col("patient_pk", PK, sa.ForeignKey("patients.pk"), nullable=False),
                    col("study_date"), col("study_time"), col("accession_number"), col("study_description"),
                    col("referring_physician"), col("study_id"), col("character_set"),
                    col("updated_at", Real, nullable=False), col("referring_physician_key"), col("study_time_key"))
    op.create_index("studies_patient", "studies", ["patient_pk"])
    op.create_index("studies_date", "studies", ["study_date"])
    op.create_index("studies_accession", "studies", ["accession_number"])
    op.create_index("studies_study_id", "studies", ["study_id"])
    op.create_table("series", col("pk", PK, primary_key=True), col("series_uid", nullable=False, unique=True),
                    col("study_pk", PK, sa.ForeignKey("studies.pk"), nullable=False),
                    col("modality"), col("series_number", Int), col("series_description"), col("body_part"))
    op.create_index("series_study", "series", ["study_pk"])
    op.create_index("series_modality", "series", ["modality", "study_pk"])
    op.create_table("instances", col("pk", PK, primary_key=True),
                    col("sop_instance_uid", nullable=False, unique=True),
                    col("series_pk", PK, sa.ForeignKey("series.pk"), nullable=False),
                    col("sop_class_uid", nullable=False), col("instance_number", Int),
                    col("transfer_syntax", nullable=False), col("size", sa.BigInteger, nullable=False),
                    col("sha256", nullable=False), col("blob_id", nullable=False, unique=True), col("calling_ae"),
                    col("received_at", Real, nullable=False), col("job_id"))
    op.create_index("instances_series", "instances", ["series_pk"])
    op.create_table("changes", col("seq", PK, primary_key=True), col("kind", nullable=False),
                    col("instance_pk", PK), col("study_uid"), col("series_uid"), col("sop_instance_uid"),
                    col("blob_id"), col("time", Real, nullable=False), col("job_id"), sqlite_autoincrement=True)
    op.create_index("changes_kind", "changes", ["kind", "seq"])
    op.create_index("changes_job", "changes", ["job_id"])
    op.create_table("offload", col("blob_id", primary_key=True), col("state", nullable=False),
                    col("attempts", Int, nullable=False, server_default="0"), col("next_try", Real, nullable=False),
                    col("last_error"), col("queued_at", Real, nullable=False), col("offloaded_at", Real),
                    col("stored_size", sa.BigInteger), col("evicted_at", Real))
    op.create_index("offload_due", "offload", ["state", "next_try"])
    op.create_index("offload_cache", "offload", ["evicted_at", "state", "offloaded_at"])
    op.create_table("cursors", col("name", primary_key=True), col("seq", PK, nullable=False))
    op.create_table("conflicts", col("seq", PK, primary_key=True), col("time", Real, nullable=False),
                    col("sop_instance_uid", nullable=False), col("study_uid"), col("series_uid"),
                    col("attribute", nullable=False), col("index_value"), col("instance_value"),
                    col("action", nullable=False), col("calling_ae"),
                    col("received", Int, nullable=False, server_default="1"), col("reason"),
                    sqlite_autoincrement=True)
    op.create_index("conflicts_instance", "conflicts", ["sop_instance_uid", "attribute"])
    op.create_table("quarantine", col("pk", PK, primary_key=True), col("sop_instance_uid", nullable=False),
                    col("sop_class_uid", nullable=False), col("study_uid", nullable=False),
                    col("series_uid", nullable=False), col("transfer_syntax", nullable=False),
                    col("size", sa.BigInteger, nullable=False), col("sha256", nullable=False),
                    col("blob_id", nullable=False, unique=True), col("calling_ae"), col("job_id"),
                    col("reason", nullable=False), col("received_at", Real, nullable=False))
    op.create_index("quarantine_instance", "quarantine", ["sop_instance_uid"])
    op.create_table("blob_holds", col("blob_id", primary_key=True), col("holder", primary_key=True))
    _router_tables()


def _router_tables() -> None:
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
    op.create_table("job_results", col("job_id", Text, sa.ForeignKey("jobs.id"), primary_key=True),
                    col("kind", nullable=False), col("name", primary_key=True), col("media_type", nullable=False),
                    col("sop_instance_uid"), col("blob_id"), col("size", sa.BigInteger, nullable=False),
                    col("sha256", nullable=False))
    op.create_index("job_results_blob", "job_results", ["blob_id"])
    op.create_table("forwards", col("job_id", Text, sa.ForeignKey("jobs.id"), primary_key=True),
                    col("destination", primary_key=True), col("state", nullable=False),
                    col("attempts", Int, nullable=False, server_default="0"), col("next_try", Real, nullable=False),
                    col("last_error"))
    op.create_index("forwards_due", "forwards", ["state", "next_try"])
    op.create_table("router_studies", col("study_uid", primary_key=True), col("last_seq", PK, nullable=False),
                    col("last_time", Real, nullable=False))
    op.create_table("router_fired", col("study_uid", primary_key=True), col("rule", primary_key=True),
                    col("seq", PK, nullable=False), col("job_id"))
