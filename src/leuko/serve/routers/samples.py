"""Samples, cells and reviews over HTTP: the store (:mod:`leuko.serve.store`) behind the API.

* ``POST /samples``, ``GET /samples``, ``GET /samples/{id}``: create, list (newest first, with counts), open;
* ``POST /samples/{id}/cells``: images → cells, each predicted by the loaded model at once;
* ``POST /cells/{id}/review``: accept or relabel one cell, or delete a false detection / restore it (an append-only event);
* ``GET /cells/{id}/history``, ``GET /cells/{id}/image``: who changed what, the stored image;
* ``POST /samples/{id}/sign-off``, ``POST /samples/{id}/reopen``: freeze the count, or open again (an event);
* ``GET /samples/{id}/export``, ``GET /export``: one sample or the whole store, CSV or JSON;
* ``GET /whoami``: whether a login is needed and whom the token names;
* smear fields (``POST /samples/{id}/fields``, ``GET /fields/{id}``, ``POST /fields/{id}/cells``):
  :mod:`leuko.serve.routers.fields`.

Who did it is the token's reviewer when the service runs with ``--auth``
(a body naming someone else is refused 403); without it, the ``reviewer``
given in the request. Every refusal is a 4xx with one line; nothing is changed.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING, Any, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from leuko.serve.store import ModelRef, NewCell, Store, StoreError
from leuko.serve.store.images import MEDIA_TYPES
from leuko.serve.store.views import (
    AddedCells,
    CellHistory,
    CellView,
    CountView,
    PredictionView,
    ReviewEventView,
    SampleDetail,
    SampleList,
)
from leuko.serve.uploads import Upload, read_uploads

if TYPE_CHECKING:
    from leuko.serve.app import Service


# --------------------------------------------------------------------------- bodies
class CreateSampleRequest(BaseModel):
    accession: str = Field(..., max_length=200, description="The lab's accession id (unique): letters, digits, '.', '_', '-'.",
                           examples=["S24-001234"])
    reviewer: Optional[str] = Field(None, max_length=200, description="Who creates it (ignored with --auth: the token names them).")
    edge: Literal["count", "drop"] = Field("count", description="Cells of its fields cut by the frame's edge: count them (once), "
                                                               "or leave them out (as `leuko count --edge`).")


class ReviewRequest(BaseModel):
    action: Literal["accept", "relabel", "delete", "restore"] = Field(
        ..., description="accept: the current label is right; relabel: set `label`; delete: not a white cell (it leaves the "
                         "count); restore: undo a delete.")
    label: Optional[str] = Field(None, max_length=200, description="relabel: the new class; accept: the label the reviewer saw "
                                                                    "(refused 409 if another review changed it since).")
    reviewer: Optional[str] = Field(None, max_length=200, description="Who reviews (with --auth: must be the token's reviewer, or absent).")
    request_id: Optional[str] = Field(None, max_length=64, description="The client's id for this review: a retry with the same id "
                                                                       "is answered with the stored review, not stored twice.")


class ReviewResponse(BaseModel):
    cell: CellView
    event: ReviewEventView
    count: CountView = Field(..., description="The sample's count after this review.")


class SignOffRequest(BaseModel):
    reviewer: Optional[str] = Field(None, max_length=200)


class ReopenRequest(BaseModel):
    reason: str = Field(..., max_length=1000, description="Why the signed-off sample is opened again (kept in its history).")
    reviewer: Optional[str] = Field(None, max_length=200)


class WhoAmI(BaseModel):
    store: bool = Field(..., description="Whether this service keeps samples (started with a store).")
    auth: bool = Field(..., description="Whether every call needs a reviewer's bearer token.")
    reviewer: Optional[str] = Field(None, description="The reviewer the token names (with --auth).")
    model: Optional[ModelRef] = Field(None, description="The model that pre-classifies new samples' cells.")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    from leuko.serve.app import error_responses

    why = {
        401: "No token, or a token of nobody (with --auth)",
        403: "The body names a reviewer other than the token's",
        404: "No such sample or cell",
        409: "The sample is signed off (or open, for a re-open), the accession id exists, or the cell changed since",
        413: "Too many files, or a file or request too large",
        415: "Not multipart, or a file that is not an image",
        422: "An invalid body, a label the model does not have, a malformed accession id or reviewer name",
    }
    return error_responses(why, *codes)


# --------------------------------------------------------------------------- helpers
def model_ref(svc: "Service") -> ModelRef:
    """The served model as the store records it: run name, sha256 of its weights, classes."""
    path = svc.model_file
    main = path / "model.pt" if path.is_dir() else path
    parts = [main] + [main.parent / extra for extra in ("home.pt", "ensemble.json") if main.name == "model.pt"]
    digest = hashlib.sha256()
    for part in parts:
        if part.is_file():
            digest.update(part.name.encode() + b"\0")
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    name = svc.run.path.name if svc.run is not None else (main.parent.name if main.name == "model.pt" else main.stem)
    return ModelRef(name=name, fingerprint=digest.hexdigest(), classes=svc.classes)


def store_of(request: Request) -> Store:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise StoreError(404, "this service keeps no samples: start it with --db")
    return store


def who(request: Request, claimed: str | None) -> str:
    """The acting reviewer: the token's (with --auth; a body naming another is refused), else the one given."""
    if getattr(request.app.state, "auth", None) is not None:
        name = str(request.state.reviewer)
        if claimed is not None and claimed.strip() and claimed.strip() != name:
            raise StoreError(403, f"this token is {name}'s; a request cannot act as {claimed.strip()!r}")
        return name
    return (claimed or "").strip()


def _sniff(up: Upload) -> tuple[str, int, int]:
    with Image.open(io.BytesIO(up.data)) as im:
        return MEDIA_TYPES.get(str(im.format), "application/octet-stream"), int(im.width), int(im.height)


def _prediction(r: Any) -> PredictionView:
    return PredictionView(label=r.label, confidence=r.confidence, probs=r.probs, review=r.review,
                          review_reasons=list(r.review_reasons), answered_by=r.answered_by, routed_because=r.routed_because)


def _download(body: str | bytes, media: str, filename: str) -> Response:
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


_EXPORT = {
    200: {"content": {"text/csv": {}, "application/json": {}},
          "description": "CSV (a row per cell, or per review event with what=events) or JSON (everything, with every event)."},
}


# --------------------------------------------------------------------------- router
def build_router(*, with_samples: bool = True) -> APIRouter:
    """``/whoami`` always (the page asks it what to show); the sample routes only for a service with a store."""
    router = APIRouter()

    @router.get("/whoami", response_model=WhoAmI, tags=["service"], responses=_errors(401))
    async def whoami(request: Request) -> WhoAmI:
        """Whether this service keeps samples, needs a token, and whom the token names."""
        st = request.app.state
        auth = getattr(st, "auth", None) is not None
        return WhoAmI(store=getattr(st, "store", None) is not None, auth=auth,
                      reviewer=str(request.state.reviewer) if auth else None, model=getattr(st, "model_ref", None))

    if not with_samples:
        return router

    @router.post("/samples", response_model=SampleDetail, status_code=201, tags=["samples"], responses=_errors(401, 403, 409, 422))
    def create_sample(body: CreateSampleRequest, request: Request) -> SampleDetail:
        """A new open sample with the lab's accession id, to be pre-classified by the loaded model."""
        return store_of(request).create_sample(body.accession, who(request, body.reviewer), request.app.state.model_ref,
                                               edge=body.edge)

    @router.get("/samples", response_model=SampleList, tags=["samples"], responses=_errors(401, 422))
    def list_samples(
        request: Request,
        status: Optional[Literal["open", "signed-off"]] = Query(None, description="Only open or only signed-off samples."),
        accession: Optional[str] = Query(None, max_length=200, description="The sample with this accession id (0 or 1 in the list)."),
        limit: int = Query(200, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> SampleList:
        """Samples, newest first, with their cell counts and status."""
        store = store_of(request)
        if accession is not None:
            try:
                found = store.find_sample(accession)
            except StoreError as exc:
                if exc.status_code == 404:
                    return SampleList(samples=[], total=0)
                raise
            return SampleList(samples=[found], total=1)
        return store.list_samples(status=status, limit=limit, offset=offset)

    @router.get("/samples/{sample_id}", response_model=SampleDetail, tags=["samples"], responses=_errors(401, 404))
    def get_sample(sample_id: int, request: Request) -> SampleDetail:
        """One sample: every cell now (prediction, label, reviewed), its count (frozen once signed off), its state changes."""
        return store_of(request).get_sample(sample_id)

    @router.post(
        "/samples/{sample_id}/cells",
        response_model=AddedCells,
        status_code=201,
        tags=["samples"],
        responses=_errors(401, 403, 404, 409, 413, 415, 422),
        openapi_extra=_multipart(),
    )
    async def add_cells(
        sample_id: int,
        request: Request,
        reviewer: Optional[str] = Query(None, max_length=200, description="Who adds them (ignored with --auth)."),
    ) -> AddedCells:
        """Add cell images to an open sample; the loaded model predicts each at once (images already in it are skipped)."""
        store = store_of(request)
        svc: Service = request.app.state.service
        ref: ModelRef = request.app.state.model_ref
        actor = who(request, reviewer)
        await run_in_threadpool(store.check_can_add, sample_id, ref.fingerprint)  # refuse before reading the images
        uploads = await read_uploads(request.headers, request.stream(), svc.limits)
        images = await run_in_threadpool(svc.decode_all, uploads)  # any unusable file refuses the whole request
        sniffed = [await run_in_threadpool(_sniff, up) for up in uploads]
        logits, probs, routing = await svc.batcher.predict(images)
        results = svc.results([u.name for u in uploads], logits, probs, routing, len(svc.classes))
        cells = [NewCell(u.name, u.data, m, w, h, _prediction(r)) for u, (m, w, h), r in zip(uploads, sniffed, results)]
        return await run_in_threadpool(store.add_cells, sample_id, cells, actor, ref.fingerprint)

    @router.post("/cells/{cell_id}/review", response_model=ReviewResponse, tags=["samples"],
                 responses=_errors(401, 403, 404, 409, 422))
    def review_cell(cell_id: int, body: ReviewRequest, request: Request) -> ReviewResponse:
        """Accept a cell's label or relabel it, or delete a false detection (restore undoes it): one append-only event
        with who and when; answers with the new count."""
        cell, ev, count = store_of(request).review(cell_id, body.action, who(request, body.reviewer), label=body.label,
                                                   request_id=body.request_id)
        return ReviewResponse(cell=cell, event=ev, count=count)

    @router.get("/cells/{cell_id}/history", response_model=CellHistory, tags=["samples"], responses=_errors(401, 404))
    def cell_history(cell_id: int, request: Request) -> CellHistory:
        """The cell's prediction and every review of it, oldest first."""
        return store_of(request).cell_history(cell_id)

    @router.get("/cells/{cell_id}/image", tags=["samples"], response_class=FileResponse,
                responses={200: {"content": {"image/*": {}}, "description": "The stored image, as uploaded."}, **_errors(401, 404)})
    def cell_image(cell_id: int, request: Request) -> FileResponse:
        """The cell's image as it was uploaded (content-addressed: it never changes)."""
        path, media = store_of(request).cell_image(cell_id)
        if not path.is_file():
            raise StoreError(404, f"the image of cell {cell_id} is missing from the image store")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=31536000, immutable",
                                                                   "X-Content-Type-Options": "nosniff"})

    @router.post("/samples/{sample_id}/sign-off", response_model=SampleDetail, tags=["samples"],
                 responses=_errors(401, 403, 404, 409, 422))
    def sign_off(sample_id: int, request: Request, body: Optional[SignOffRequest] = None) -> SampleDetail:
        """Sign the sample off: its count is frozen with it, and reviews are refused until it is re-opened."""
        return store_of(request).sign_off(sample_id, who(request, body.reviewer if body else None))

    @router.post("/samples/{sample_id}/reopen", response_model=SampleDetail, tags=["samples"],
                 responses=_errors(401, 403, 404, 409, 422))
    def reopen(sample_id: int, body: ReopenRequest, request: Request) -> SampleDetail:
        """Open a signed-off sample again: an event with who, when and why (the sign-off stays in its history)."""
        return store_of(request).reopen(sample_id, who(request, body.reviewer), body.reason)

    @router.get("/samples/{sample_id}/export", tags=["export"], response_class=Response, responses={**_EXPORT, **_errors(401, 404, 422)})
    def export_sample(
        sample_id: int,
        request: Request,
        format: Literal["csv", "json"] = Query("csv"),
        what: Literal["cells", "events"] = Query("cells", description="CSV: a row per cell, or per review event."),
    ) -> Response:
        """One sample as CSV or JSON (JSON has everything: cells, count, every review and state change)."""
        store = store_of(request)
        detail = store.get_sample(sample_id)
        name = f"leuko-{detail.accession}" + ("-events" if what == "events" and format == "csv" else "")
        if format == "json":
            return _download(JSONResponse(store.export_json(sample_id)).body, "application/json", name + ".json")
        return _download(store.export_csv(sample_id, what=what), "text/csv; charset=utf-8", name + ".csv")

    @router.get("/export", tags=["export"], response_class=Response, responses={**_EXPORT, **_errors(401, 422)})
    def export_store(
        request: Request,
        format: Literal["csv", "json"] = Query("csv"),
        what: Literal["cells", "events"] = Query("cells", description="CSV: a row per cell, or per review event."),
    ) -> Response:
        """Every sample of the store as CSV or JSON."""
        store = store_of(request)
        if format == "json":
            return _download(JSONResponse(store.export_json()).body, "application/json", "leuko-store.json")
        return _download(store.export_csv(what=what), "text/csv; charset=utf-8",
                         "leuko-store" + ("-events" if what == "events" else "") + ".csv")

    return router


def _multipart() -> dict[str, Any]:
    from leuko.serve.app import _multipart_body

    return _multipart_body("files", many=True)


__all__ = ["build_router", "model_ref"]
