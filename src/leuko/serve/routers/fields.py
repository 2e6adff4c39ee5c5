"""Smear fields of a sample over HTTP (a service with a store):

* ``POST /samples/{id}/fields``: field images → each field stored (by content), its white cells found,
  cut out and classified by the loaded model as ``leuko count`` does, stored as cells of the sample
  with their field and box (:mod:`leuko.serve.fields`); any unusable file refuses the request;
* ``GET /fields/{id}``: the field's boxes with their current labels; ``GET /fields/{id}/image``: the image;
* ``POST /fields/{id}/cells``: a cell the finder missed, by a box or a point on it (event ``added``).

Re-labelling a box is ``POST /cells/{id}/review`` (the cell's id), as for any cell; deleting a false
detection is the same call with ``action: delete`` (``restore`` undoes it). A signed-off sample refuses
all of them (409), as it refuses new cells and reviews.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from leuko.serve.routers.samples import store_of, who
from leuko.serve.store import StoreError
from leuko.serve.store.views import AddedFieldCell, AddedFields, FieldDetail
from leuko.serve.uploads import read_uploads

if TYPE_CHECKING:
    from leuko.serve.app import Service


class AddCellRequest(BaseModel):
    box: Optional[list[float]] = Field(None, min_length=4, max_length=4,
                                       description="x0, y0, x1, y1 of the missed cell in the field's pixels.")
    point: Optional[list[float]] = Field(None, min_length=2, max_length=2,
                                         description="x, y of a point on the missed cell (a click): its box is grown from the "
                                                     "nucleus there, or is the field's typical cell size around the point.")
    label: Optional[str] = Field(None, max_length=200, description="The reviewer's class for it (default: the model's).")
    reviewer: Optional[str] = Field(None, max_length=200, description="Who adds it (with --auth: the token's reviewer, or absent).")
    request_id: Optional[str] = Field(None, max_length=64, description="The client's id: a retry with it is answered, not stored twice.")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    from leuko.serve.app import error_responses

    why = {
        400: "Malformed upload",
        401: "No token, or a token of nobody (with --auth)",
        403: "The body names a reviewer other than the token's",
        404: "No such sample or field",
        409: "The sample is signed off or was pre-classified by another model, or the new box covers a cell already there",
        413: "Too many files, a file or request too large, or an image with too many pixels",
        415: "Not multipart, or a file that is not an image",
        422: "A corrupt or truncated image, a box or point outside the field, an unknown label, an invalid body",
    }
    return error_responses(why, *codes)


def build_router() -> APIRouter:
    from leuko.serve import fields as work
    from leuko.serve.app import _multipart_body

    router = APIRouter()
    body = _multipart_body("files", many=True)
    body["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]["description"] = (
        "Smear field images (JPEG, PNG, BMP, TIFF or WebP), one part per file.")

    @router.post("/samples/{sample_id}/fields", response_model=AddedFields, status_code=201, tags=["fields"],
                 responses=_errors(400, 401, 403, 404, 409, 413, 415, 422), openapi_extra=body)
    async def add_fields(
        sample_id: int,
        request: Request,
        reviewer: Optional[str] = Query(None, max_length=200, description="Who adds them (ignored with --auth)."),
    ) -> AddedFields:
        """Add smear fields to an open sample: every white cell found, cut out, classified and stored with its box
        (fields already in the sample are skipped; a field with no white cell is kept, with a note)."""
        store = store_of(request)
        svc: Service = request.app.state.service
        actor = who(request, reviewer)
        if not actor:
            raise StoreError(422, "say who you are: the reviewer name is missing (with --auth, the token names the reviewer)")
        await _refuse_early(request, store, sample_id)
        uploads = await read_uploads(request.headers, request.stream(), svc.limits)
        return await work.add_fields(svc, store, sample_id, uploads, actor, request.app.state.model_ref)

    @router.get("/fields/{field_id}", response_model=FieldDetail, tags=["fields"], responses=_errors(401, 404))
    def get_field(field_id: int, request: Request) -> FieldDetail:
        """One field: its size and ruler, and every box with its cell's current label (deleted ones too, marked)."""
        return store_of(request).get_field(field_id)

    @router.get("/fields/{field_id}/image", tags=["fields"], response_class=FileResponse,
                responses={200: {"content": {"image/*": {}}, "description": "The field image, as uploaded."}, **_errors(401, 404)})
    def field_image(field_id: int, request: Request) -> FileResponse:
        """The field image as it was uploaded (content-addressed: it never changes)."""
        path, media = store_of(request).field_image(field_id)
        if not path.is_file():
            raise StoreError(404, f"the image of field {field_id} is missing from the image store")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=31536000, immutable",
                                                                   "X-Content-Type-Options": "nosniff"})

    @router.post("/fields/{field_id}/cells", response_model=AddedFieldCell, status_code=201, tags=["fields"],
                 responses=_errors(401, 403, 404, 409, 422))
    async def add_cell(field_id: int, body: AddCellRequest, request: Request) -> AddedFieldCell:
        """Add a white cell the finder missed, by its box or a point on it: cut out, classified and stored with an
        ``added`` event (and the reviewer's label, when given); answers with the cell and the new count."""
        store = store_of(request)
        actor = who(request, body.reviewer)
        if not actor:
            raise StoreError(422, "say who you are: the reviewer name is missing (with --auth, the token names the reviewer)")
        return await work.add_cell(request.app.state.service, store, field_id, box=body.box, point=body.point,
                                   label=body.label, request_id=body.request_id, actor=actor, ref=request.app.state.model_ref)

    return router


async def _refuse_early(request: Request, store: Any, sample_id: int) -> None:
    """A signed-off sample, another model's, or no such sample: refused before the upload is read."""
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(store.check_can_add, sample_id, request.app.state.model_ref.fingerprint)


__all__ = ["AddCellRequest", "build_router"]
