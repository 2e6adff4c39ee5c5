"""The store schema: typed SQLAlchemy 2 models of what the lab service keeps.

One sample is one patient's slide (an accession id the lab types). Its cells
are images kept by content (:mod:`leuko.serve.store.images`); each cell has
the model's prediction, made once when the image was added, and an
append-only list of review events. Nothing is ever updated in place except a
sample's *status* (open / signed-off), and every change of status is itself
an event with who and when. The current label of a cell is the
``label_after`` of its latest review event, or the prediction when it has none.

A sample may also hold whole smear *fields* (revision 0002): each field is an
image kept by content like a cell's, its white cells found by
:func:`leuko.fields.find_cells` and stored as cells of the sample that point
at their field and carry their box, detection score and edge flag (the cell's
image is the crop the classifier saw). A reviewer deletes a false detection or
restores it (events ``deleted`` / ``restored``), and adds a missed cell (event
``added``); the repeats of one cell in overlapping fields are kept as pairs
(:class:`CellRepeat`), found once when a cell arrives.

Changing this file needs a migration (``alembic revision --autogenerate``
against a database at head, see :mod:`leuko.serve.store.migrate`); a test
fails while the models and the migrations disagree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names fixed by convention, so migrations can name what they alter (SQLite's batch mode needs it)."""

OPEN = "open"
SIGNED_OFF = "signed-off"
ACCEPT = "accept"
RELABEL = "relabel"
CREATE = "create"
SIGN_OFF = "sign-off"
REOPEN = "reopen"
ADDED = "added"
DELETED = "deleted"
RESTORED = "restored"
CELL_ACTIONS: tuple[str, ...] = (ACCEPT, RELABEL, ADDED, DELETED, RESTORED)
"""Review event kinds: a look at the label (accept, relabel), and, for cells of fields, a cell a reviewer added,
a detection deleted as not a white cell, and a deletion undone (0002)."""
EDGE_POLICIES: tuple[str, ...] = ("count", "drop")
"""What a sample's count does with a cell cut by its field's edge: count it (once), or leave it out
(``leuko count --edge``)."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[dt.datetime], dialect: Any) -> Optional[dt.datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC time")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[dt.datetime], dialect: Any) -> Optional[dt.datetime]:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Image(Base):
    """One image's bytes, by content: the same file uploaded twice is stored once."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    media_type: Mapped[str] = mapped_column(String(32))
    n_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    stored_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Sample(Base):
    """One patient's sample: an accession id, the model that pre-classified it, open or signed off."""

    __tablename__ = "samples"
    __table_args__ = (CheckConstraint(f"status IN ('{OPEN}', '{SIGNED_OFF}')", name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    created_by: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default=OPEN)
    model_name: Mapped[str] = mapped_column(String(200))
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[str]] = mapped_column(JSON)
    signed_off_by: Mapped[Optional[str]] = mapped_column(String(100))
    signed_off_at: Mapped[Optional[dt.datetime]] = mapped_column(UTCDateTime())
    signed_off_count: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    """The differential count frozen at sign-off (``None`` while open)."""
    edge_policy: Mapped[str] = mapped_column(String(8), default="count", server_default="count")
    """Cells of its fields cut by the frame's edge: ``count`` (once) or ``drop`` (:data:`EDGE_POLICIES`), set at creation."""

    cells: Mapped[list["Cell"]] = relationship(back_populates="sample", order_by="Cell.id", lazy="raise")


class Cell(Base):
    """One white cell of a sample: an image (by content) and the name it was uploaded under (a label only)."""

    __tablename__ = "cells"
    __table_args__ = (UniqueConstraint("sample_id", "image_sha256", name="uq_cells_sample_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    added_by: Mapped[str] = mapped_column(String(100))
    field_id: Mapped[Optional[int]] = mapped_column(ForeignKey("fields.id"), index=True)
    """The field the cell was found in or added to (``None``: an uploaded cell image)."""
    box_x0: Mapped[Optional[float]] = mapped_column(Float)
    box_y0: Mapped[Optional[float]] = mapped_column(Float)
    box_x1: Mapped[Optional[float]] = mapped_column(Float)
    box_y1: Mapped[Optional[float]] = mapped_column(Float)
    score: Mapped[Optional[float]] = mapped_column(Float)
    """Detection score of :func:`leuko.fields.find_cells` (``None``: a box a reviewer drew)."""
    edge: Mapped[Optional[bool]] = mapped_column(Boolean)
    """The frame's edge cuts the cell."""

    sample: Mapped[Sample] = relationship(back_populates="cells", lazy="raise")
    image: Mapped[Image] = relationship(lazy="raise")
    prediction: Mapped["Prediction"] = relationship(back_populates="cell", uselist=False, lazy="raise")

    @property
    def box(self) -> Optional[tuple[float, float, float, float]]:
        if self.box_x0 is None or self.box_y0 is None or self.box_x1 is None or self.box_y1 is None:
            return None
        return (self.box_x0, self.box_y0, self.box_x1, self.box_y1)


class Field(Base):
    """One smear field of a sample: an image (by content) whose white cells are cells of the sample."""

    __tablename__ = "fields"
    __table_args__ = (UniqueConstraint("sample_id", "image_sha256", name="uq_fields_sample_image"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    rbc_measured: Mapped[Optional[float]] = mapped_column(Float)
    """Red-cell diameter measured on this field (pixels; ``None``: too few red cells showed)."""
    rbc_diameter: Mapped[float] = mapped_column(Float)
    """The ruler its cells were found, cut and compared with: the median of the sample's fields so far."""
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    added_by: Mapped[str] = mapped_column(String(100))


class CellRepeat(Base):
    """Two cells of different fields of one sample that are one cell (overlapping fields), found when the later arrived."""

    __tablename__ = "cell_repeats"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), index=True)
    """The cell that arrived later."""
    other_id: Mapped[int] = mapped_column(ForeignKey("cells.id"))
    correlation: Mapped[float] = mapped_column(Float)


class Prediction(Base):
    """The model's answer for one cell, made once when the image was added: calibrated probabilities, review flag."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), unique=True)
    label: Mapped[str] = mapped_column(String(100))
    confidence: Mapped[float] = mapped_column(Float)
    probs: Mapped[dict[str, float]] = mapped_column(JSON)
    review: Mapped[bool] = mapped_column(Boolean)
    review_reasons: Mapped[list[str]] = mapped_column(JSON)
    answered_by: Mapped[Optional[str]] = mapped_column(String(32))
    routed_because: Mapped[Optional[str]] = mapped_column(Text)
    model_fingerprint: Mapped[str] = mapped_column(String(64))

    cell: Mapped[Cell] = relationship(back_populates="prediction", lazy="raise")


class ReviewEvent(Base):
    """One person's look at one cell: accepted, or relabelled from ``label_before`` to ``label_after``; for a cell
    of a field also added (a missed cell), deleted (not a white cell) or restored (label unchanged). Append-only."""

    __tablename__ = "review_events"
    __table_args__ = (CheckConstraint("action IN (" + ", ".join(f"'{a}'" for a in CELL_ACTIONS) + ")", name="action"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("cells.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    label_before: Mapped[str] = mapped_column(String(100))
    label_after: Mapped[str] = mapped_column(String(100))
    reviewer: Mapped[str] = mapped_column(String(100))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    request_id: Mapped[Optional[str]] = mapped_column(String(64), unique=True)
    """The client's id for this review: a retried request with the same id is answered, not stored twice."""


class SampleEvent(Base):
    """A change of a sample's state: created, signed off (with the frozen count), re-opened (with why). Append-only."""

    __tablename__ = "sample_events"
    __table_args__ = (CheckConstraint(f"action IN ('{CREATE}', '{SIGN_OFF}', '{REOPEN}')", name="action"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(100))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    reason: Mapped[Optional[str]] = mapped_column(Text)
    count: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)


APPEND_ONLY: tuple[str, ...] = (ReviewEvent.__tablename__, SampleEvent.__tablename__)
"""Tables whose rows the database itself refuses to update or delete (triggers made by the first migration)."""
