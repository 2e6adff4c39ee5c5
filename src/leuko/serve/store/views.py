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
    """A differential count: the current labels of a sample's cells (frozen at sign-off)."""

    n_cells: int
    n_review: int = Field(..., description="Cells flagged by the model and not yet reviewed.")
    counts: list[CountRowView]
    note: Optional[str] = None
    interval: str


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
    action: Literal["accept", "relabel"]
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
    n_reviews: int
    last_review: Optional[ReviewEventView] = None


class SampleSummary(BaseModel):
    """A line of the sample list."""

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


class SampleDetail(SampleSummary):
    """One sample: its cells now, its count (live while open, frozen once signed off), its state changes."""

    classes: list[str]
    cells: list[CellView]
    count: CountView
    events: list[SampleEventView]


class SampleList(BaseModel):
    samples: list[SampleSummary]
    total: int = Field(..., description="Samples matching the filter (the list may be a page of them).")


class AddedCells(BaseModel):
    """The answer to adding images: the new cells, and the images this sample already had."""

    sample_id: int
    added: list[CellView]
    duplicates: list[str] = Field(default_factory=list, description="Uploaded names of images already in this sample (not added again).")
    n_cells: int


class CellHistory(BaseModel):
    """Everything that happened to one cell: the prediction, then each review in order."""

    cell: CellView
    accession: str
    events: list[ReviewEventView]
