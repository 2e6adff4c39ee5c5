"""Smear fields: a fields table, cells that point at their field with a box, repeats, edge policy, new event kinds.

* ``fields``: one row per uploaded field image of a sample (by content, like a cell's image), with the
  red-cell ruler its cells were found with;
* ``cells``: ``field_id`` (nullable: an uploaded cell image has none), the box ``box_x0..box_y1``, the
  detection ``score`` and the ``edge`` flag (all nullable, so every existing cell stays as it was);
* ``cell_repeats``: pairs of cells of overlapping fields that are one cell;
* ``samples.edge_policy``: ``count`` (every existing sample) or ``drop``;
* ``review_events.action`` also takes ``added``, ``deleted`` and ``restored``.

Nothing existing is rewritten. On SQLite the columns are added in place (``ALTER TABLE ADD COLUMN``; a
foreign key column may be added so when it defaults to NULL); only ``review_events`` is rebuilt, to widen
its CHECK constraint, rows copied as they are and its append-only triggers made again (a rebuilt table
loses its triggers). On PostgreSQL the constraint is swapped in place and the triggers stay.

Revision ID: 0002
Revises: 0001
Create Date: 2026-06-02
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OLD_ACTIONS = ("accept", "relabel")
NEW_ACTIONS = ("accept", "relabel", "added", "deleted", "restored")


def _check(actions: Sequence[str]) -> str:
    return "action IN (" + ", ".join(f"'{a}'" for a in actions) + ")"


def _review_events(actions: Sequence[str]) -> sa.Table:
    """``review_events`` as 0001 made it, with the CHECK constraint of ``actions`` (what a SQLite rebuild copies into)."""
    return sa.Table(
        "review_events",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("label_before", sa.String(100), nullable=False),
        sa.Column("label_after", sa.String(100), nullable=False),
        sa.Column("reviewer", sa.String(100), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.CheckConstraint(_check(actions), name="ck_review_events_action"),
        sa.ForeignKeyConstraint(["cell_id"], ["cells.id"], name="fk_review_events_cell_id_cells"),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name="fk_review_events_sample_id_samples"),
        sa.PrimaryKeyConstraint("id", name="pk_review_events"),
        sa.UniqueConstraint("request_id", name="uq_review_events_request_id"),
        sa.Index("ix_review_events_cell_id", "cell_id"),
        sa.Index("ix_review_events_sample_id", "sample_id"),
    )


def _sqlite_append_only(table: str) -> None:
    for what in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{what.lower()} BEFORE {what} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def _set_actions(actions: Sequence[str]) -> None:
    if op.get_bind().dialect.name == "sqlite":
        before = op.get_bind().exec_driver_sql("SELECT count(*) FROM review_events").scalar()
        with op.batch_alter_table("review_events", recreate="always", copy_from=_review_events(actions)):
            pass  # the rebuild itself: new CHECK, every row copied (triggers do not fire on a copy or a DROP)
        _sqlite_append_only("review_events")
        after = op.get_bind().exec_driver_sql("SELECT count(*) FROM review_events").scalar()
        if after != before:  # pragma: no cover - a guard, never expected
            raise RuntimeError(f"review_events rebuild kept {after} of {before} rows")
    else:
        op.drop_constraint(op.f("ck_review_events_action"), "review_events", type_="check")
        op.create_check_constraint(op.f("ck_review_events_action"), "review_events", _check(actions))


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "fields",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("rbc_measured", sa.Float(), nullable=True),
        sa.Column("rbc_diameter", sa.Float(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("added_by", sa.String(100), nullable=False),
        sa.ForeignKeyConstraint(["image_sha256"], ["images.sha256"], name=op.f("fk_fields_image_sha256_images")),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name=op.f("fk_fields_sample_id_samples")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fields")),
        sa.UniqueConstraint("sample_id", "image_sha256", name="uq_fields_sample_image"),
    )
    op.create_index(op.f("ix_fields_image_sha256"), "fields", ["image_sha256"])
    op.create_index(op.f("ix_fields_sample_id"), "fields", ["sample_id"])

    if dialect == "sqlite":  # in place: SQLite adds a REFERENCES column when its default is NULL
        op.execute("ALTER TABLE cells ADD COLUMN field_id INTEGER "
                   "CONSTRAINT fk_cells_field_id_fields REFERENCES fields (id)")
    else:
        op.add_column("cells", sa.Column("field_id", sa.Integer(), nullable=True))
        op.create_foreign_key(op.f("fk_cells_field_id_fields"), "cells", "fields", ["field_id"], ["id"])
    for name in ("box_x0", "box_y0", "box_x1", "box_y1", "score"):
        op.add_column("cells", sa.Column(name, sa.Float(), nullable=True))
    op.add_column("cells", sa.Column("edge", sa.Boolean(), nullable=True))
    op.create_index(op.f("ix_cells_field_id"), "cells", ["field_id"])

    op.add_column("samples", sa.Column("edge_policy", sa.String(8), nullable=False, server_default="count"))

    op.create_table(
        "cell_repeats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("cell_id", sa.Integer(), nullable=False),
        sa.Column("other_id", sa.Integer(), nullable=False),
        sa.Column("correlation", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["cell_id"], ["cells.id"], name=op.f("fk_cell_repeats_cell_id_cells")),
        sa.ForeignKeyConstraint(["other_id"], ["cells.id"], name=op.f("fk_cell_repeats_other_id_cells")),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"], name=op.f("fk_cell_repeats_sample_id_samples")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cell_repeats")),
    )
    op.create_index(op.f("ix_cell_repeats_cell_id"), "cell_repeats", ["cell_id"])
    op.create_index(op.f("ix_cell_repeats_sample_id"), "cell_repeats", ["sample_id"])

    _set_actions(NEW_ACTIONS)


def downgrade() -> None:
    """Back to 0001: only for a store that holds no fields and no event of the new kinds (refused otherwise)."""
    bind = op.get_bind()
    used = bind.exec_driver_sql(
        "SELECT (SELECT count(*) FROM fields) + (SELECT count(*) FROM review_events "
        "WHERE action NOT IN ('accept', 'relabel'))"
    ).scalar()
    if used:
        raise RuntimeError("this store holds smear fields or field review events; 0001 cannot keep them")
    _set_actions(OLD_ACTIONS)
    op.drop_index(op.f("ix_cell_repeats_sample_id"), table_name="cell_repeats")
    op.drop_index(op.f("ix_cell_repeats_cell_id"), table_name="cell_repeats")
    op.drop_table("cell_repeats")
    op.drop_column("samples", "edge_policy")  # SQLite drops a plain column in place (3.35+)
    op.drop_index(op.f("ix_cells_field_id"), table_name="cells")
    if bind.dialect.name == "sqlite":
        # SQLite cannot drop a REFERENCES column in place; the rebuild drops the old `cells`, which
        # the foreign-key check reads as deleting every prediction's and review's parent row
        if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
            raise RuntimeError("on SQLite, downgrade with leuko.serve.store.migrate.downgrade (it turns foreign "
                               "keys off for the table rebuild and checks them before committing)")
        with op.batch_alter_table("cells") as batch:
            for name in ("edge", "score", "box_y1", "box_x1", "box_y0", "box_x0", "field_id"):
                batch.drop_column(name)
    else:
        op.drop_constraint(op.f("fk_cells_field_id_fields"), "cells", type_="foreignkey")
        for name in ("edge", "score", "box_y1", "box_x1", "box_y0", "box_x0", "field_id"):
            op.drop_column("cells", name)
    op.drop_index(op.f("ix_fields_sample_id"), table_name="fields")
    op.drop_index(op.f("ix_fields_image_sha256"), table_name="fields")
    op.drop_table("fields")

