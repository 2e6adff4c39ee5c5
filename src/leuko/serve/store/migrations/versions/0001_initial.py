"""The first schema: samples, images, cells, predictions, review and sample events (append-only).

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

APPEND_ONLY = ("review_events", "sample_events")


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(32), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_images")),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("accession", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_fingerprint", sa.String(64), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("signed_off_by", sa.String(100), nullable=True),
        sa.Column("signed_off_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("signed_off_count", sa.JSON(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'signed-off')", name=op.f("ck_samples_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("accession", name=op.f("uq_samples_accession")),
    )
    op.create_table(
        "cells",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(100), nullable=False),
        sa.ForeignKeyConstraint(["image_sha256"], ["images.sha256"], name=op.f("fk_cells_image_sha256_images")),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name=op.f("fk_cells_sample_id_samples")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cells")),
        sa.UniqueConstraint("sample_id", "image_sha256", name="uq_cells_sample_image"),
    )
    op.create_index(op.f("ix_cells_image_sha256"), "cells", ["image_sha256"])
    op.create_index(op.f("ix_cells_sample_id"), "cells", ["sample_id"])
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("probs", sa.JSON(), nullable=False),
        sa.Column("review", sa.Boolean(), nullable=False),
        sa.Column("review_reasons", sa.JSON(), nullable=False),
        sa.Column("answered_by", sa.String(32), nullable=True),
        sa.Column("routed_because", sa.Text(), nullable=True),
        sa.Column("model_fingerprint", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["cell_id"], ["cells.id"], name=op.f("fk_predictions_cell_id_cells")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint("cell_id", name=op.f("uq_predictions_cell_id")),
    )
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("label_before", sa.String(100), nullable=False),
        sa.Column("label_after", sa.String(100), nullable=False),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.CheckConstraint("action IN ('accept', 'relabel')", name=op.f("ck_review_events_action")),
        sa.ForeignKeyConstraint(["cell_id"], ["cells.id"], name=op.f("fk_review_events_cell_id_cells")),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name=op.f("fk_review_events_sample_id_samples")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_events")),
        sa.UniqueConstraint("request_id", name=op.f("uq_review_events_request_id")),
    )
    op.create_index(op.f("ix_review_events_cell_id"), "review_events", ["cell_id"])
    op.create_index(op.f("ix_review_events_sample_id"), "review_events", ["sample_id"])
    op.create_table(
        "sample_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("count", sa.JSON(), nullable=True),
        sa.CheckConstraint("action IN ('create', 'sign-off', 'reopen')", name=op.f("ck_sample_events_action")),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name=op.f("fk_sample_events_sample_id_samples")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample_events")),
    )
    op.create_index(op.f("ix_sample_events_sample_id"), "sample_events", ["sample_id"])
    _append_only_triggers()


def _append_only_triggers() -> None:
    """The database itself refuses to change or remove an event, whoever connects to it."""
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        if dialect == "sqlite":
            for what in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{what.lower()} BEFORE {what} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN RAISE EXCEPTION '{table} is append-only'; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_append_only()")
    for table in ("sample_events", "review_events", "predictions", "cells", "samples", "images"):
        op.drop_table(table)
