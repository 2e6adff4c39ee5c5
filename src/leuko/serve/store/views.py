"""What the store answers: pydantic models shared by the store's Python API and the HTTP API's responses.

Each is built from the database rows by :class:`leuko.serve.store.Store`; the
routers return them as they are, so ``/openapi.json`` describes exactly what
the store says.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

Status = Literal["open", "signed-off"]
CellAction = Literal["accept", "relabel", "added", "deleted", "restored"]
EdgePolicy = Literal["count", "drop"]


class ModelRef(BaseModel):
    """The model that pre-classifies a sample's cells: its run name, a fingerprint of its weights, its classes."""

    name: str
    fingerprint: str = Field(..., description="sha256 of the model's weights file(s).")
    classes: list[str]


class CountRowView(BaseModel):
    label: str
    count: int
    percent: float
    ci95_low: float
    ci95_high: float


class CountView(BaseModel):
    """A differential count: the current labels of a sample's cells (frozen at sign-off).

    Cells of fields count as ``leuko count`` counts them: a deleted detection not at all, the
    repeats of one cell in overlapping fields once, a cell cut by the frame's edge once or not
    at all (the sample's edge policy)."""

    n_cells: int = Field(..., description="Cells counted.")
    n_review: int = Field(..., description="Cells flagged by the model and not yet reviewed.")
    counts: list[CountRowView]
    note: Optional[str] = None
    interval: str
    edge: Optional[EdgePolicy] = Field(None, description="The sample's edge policy: cells cut by the frame counted once, or left out.")
    repeats_merged: int = Field(0, description="Cells of fields not counted again: repeats of a cell in an overlapping field.")
    deleted: int = Field(0, description="Cells deleted by a reviewer (not white cells): not counted.")
    edge_cells_counted: int = Field(0, description="Counted cells cut by their field's edge.")
    edge_cells_dropped: int = Field(0, description="Cells cut by the edge left out (edge policy drop, no whole copy elsewhere).")


class PredictionView(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]
    review: bool = Field(..., description="The model asked for a technologist's look.")
    review_reasons: list[str]
    answered_by: Optional[str] = None
    routed_because: Optional[str] = None


class ReviewEventView(BaseModel):
    """One review of one cell: append-only; the latest one gives the cell's label."""

    id: int
    cell_id: int
    action: CellAction = Field(..., description="accept, relabel; for cells of fields also added (a missed cell a reviewer "
                                                "added), deleted (not a white cell) and restored (a deletion undone).")
    label_before: str
    label_after: str
    reviewer: str
    at: dt.datetime
    request_id: Optional[str] = None


class SampleEventView(BaseModel):
    """A change of a sample's state: created, signed off (with its count), re-opened (with why)."""

    id: int
    action: Literal["create", "sign-off", "reopen"]
    actor: str
    at: dt.datetime
    reason: Optional[str] = None
    count: Optional[dict[str, Any]] = None


class CellView(BaseModel):
    """One cell now: its prediction, its current label and whether a person has looked at it."""

    id: int
    sample_id: int
    name: str = Field(..., description="The uploaded file's name (a label only).")
    sha256: str
    added_at: dt.datetime
    added_by: str
    prediction: PredictionView
    label: str = Field(..., description="The current label: the latest review's, or the prediction's.")
    reviewed: bool
    corrected: bool = Field(..., description="The current label differs from the prediction.")
    needs_review: bool = Field(..., description="Flagged by the model and not yet reviewed.")
    n_reviews: int = Field(..., description="Review events of the cell (every kind).")
    last_review: Optional[ReviewEventView] = None
    field_id: Optional[int] = Field(None, description="The field the cell is in (None: an uploaded cell image).")
    box: Optional[list[float]] = Field(None, description="x0, y0, x1, y1 in the field's pixels.")
    score: Optional[float] = Field(None, description="Detection score (None: a box a reviewer drew).")
    edge: Optional[bool] = Field(None, description="The frame's edge cuts the cell.")
    origin: Literal["upload", "found", "added"] = Field(
        "upload", description="upload: a cell image; found: found in a field; added: added to a field by a reviewer.")
    deleted: bool = Field(False, description="Deleted by a reviewer as not a white cell (restore undoes it).")
    counted: bool = Field(True, description="In the count now (not deleted, not a repeat, not left out for the edge).")
    repeat_of: Optional[int] = Field(None, description="The cell of an overlapping field this one repeats (it is counted there).")


class SampleSummary(BaseModel):
    """A line of the sample list (cell tallies are per cell, deleted ones left out; the count merges repeats)."""

    id: int
    accession: str
    status: Status
    created_at: dt.datetime
    created_by: str
    model_name: str
    model_fingerprint: str
    signed_off_by: Optional[str] = None
    signed_off_at: Optional[dt.datetime] = None
    n_cells: int
    n_reviewed: int
    n_corrected: int
    n_needs_review: int
    n_fields: int = 0
    n_deleted: int = Field(0, description="Cells deleted as not white cells (not in n_cells).")
    edge_policy: EdgePolicy = "count"


class FieldSummary(BaseModel):
    """One smear field of a sample."""

    id: int
    sample_id: int
    name: str = Field(..., description="The uploaded file's name (a label only).")
    sha256: str
    width: int
    height: int
    media_type: str
    rbc_diameter: float = Field(..., description="Red-cell diameter (pixels) its cells were found and cut with.")
    rbc_measured: Optional[float] = Field(None, description="Red-cell diameter measured on this field (None: too few red cells).")
    added_at: dt.datetime
    added_by: str
    n_found: int = Field(..., description="Cells the finder found in it.")
    n_cells: int = Field(..., description="Its cells now: found or added, not deleted.")


class FieldDetail(FieldSummary):
    """One field with its boxes and their current labels."""

    accession: str
    status: Status
    classes: list[str]
    cells: list[CellView]


class SampleDetail(SampleSummary):
    """One sample: its cells now, its count (live while open, frozen once signed off), its state changes."""

    classes: list[str]
    cells: list[CellView]
    count: CountView
    events: list[SampleEventView]
    fields: list[FieldSummary] = Field(default_factory=list)


class SampleList(BaseModel):
    samples: list[SampleSummary]
    total: int = Field(..., description="Samples matching the filter (the list may be a page of them).")


class AddedCells(BaseModel):
    """The answer to adding images: the new cells, and the images this sample already had."""

    sample_id: int
    added: list[CellView]
    duplicates: list[str] = Field(default_factory=list, description="Uploaded names of images already in this sample (not added again).")
    n_cells: int


class AddedFields(BaseModel):
    """The answer to adding fields: each new field with its cells, the fields this sample already had, the count."""

    sample_id: int
    added: list[FieldDetail]
    duplicates: list[str] = Field(default_factory=list, description="Uploaded names of fields already in this sample (not added again).")
    notes: list[str] = Field(default_factory=list, description="E.g. fields that hold no white cell.")
    n_fields: int
    n_cells: int
    count: CountView


class AddedFieldCell(BaseModel):
    """A cell a reviewer added to a field: the cell, its ``added`` event (and accept/relabel when a label was given), the count."""

    cell: CellView
    events: list[ReviewEventView]
    count: CountView
    box_from: Literal["box", "nucleus", "default"] = Field(
        ..., description="box: as given; nucleus: grown from the stained nucleus at the point; default: the field's typical "
                         "cell size around the point (no nucleus found there).")


class CellHistory(BaseModel):
    """Everything that happened to one cell: the prediction, then each review in order."""

    cell: CellView
    accession: str
    events: list[ReviewEventView]
