"""PostgreSQL: indexes for C-FIND's wildcard matching (LIKE 'X%') on the columns it matches.

A PostgreSQL database whose collation is not "C" (C.UTF-8, en_US.UTF-8: the usual ones) cannot
answer `column LIKE 'SMI%'` from a plain btree index, so a name-prefix C-FIND read every patient.
A `text_pattern_ops` index can (and answers `=` too); the plain indexes stay for ranges and ORDER BY.
SQLite: nothing to do (its LIKE uses the plain index with `case_sensitive_like=ON`).
"""
from alembic import op

revision = "archive_0003"
down_revision = "archive_0002"
branch_labels = None
depends_on = None

# (index, table, column): the columns a C-FIND matches with wildcards that have a plain index
PATTERN_INDEXES = (
    ("patients_name_key_pattern", "patients", "patient_name_key"),
    ("patients_patient_id_pattern", "patients", "patient_id"),
    ("studies_accession_pattern", "studies", "accession_number"),
    ("studies_study_id_pattern", "studies", "study_id"),
    ("studies_referring_physician_key_pattern", "studies", "referring_physician_key"),
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for name, table, column in PATTERN_INDEXES:
        op.create_index(name, table, [column], postgresql_ops={column: "text_pattern_ops"})


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for name, table, _ in PATTERN_INDEXES:
        op.drop_index(name, table_name=table)
