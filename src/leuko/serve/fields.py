"""Smear fields in the lab service: find, cut out, classify and compare cells as ``leuko count`` does.

``POST /samples/{id}/fields`` and ``POST /fields/{id}/cells`` (:mod:`leuko.serve.routers.fields`)
do their work here, outside any database transaction, and hand the store
(:meth:`leuko.serve.store.Store.add_fields`, :meth:`~leuko.serve.store.Store.add_field_cell`)
finished rows:

1. every uploaded field is decoded first, whole, as :func:`leuko.fields.read_field` decodes a file
   (:func:`leuko.serve.uploads.decode_upload`: a non-image, a truncated file or one over the pixel
   limit refuses the whole request with one line; nothing is stored);
2. the red cells of every field are measured (:func:`leuko.fields.field_ruler`) and the sample's
   ruler is their median over its fields so far, these included (one microscope), as
   :func:`leuko.fields.count_fields` uses one for a sample's fields;
3. :func:`leuko.fields.find_cells` finds each field's white cells with it, and each cell is cut
   out as :func:`leuko.fields.count.classifier_crop` cuts it for ``leuko count``; the crop, at the
   predictor's size, goes to the loaded model on the service's inference thread (the same
   ``predict_arrays`` call, so the same probabilities), and the review flag gets the detection
   score's reason (:func:`leuko.fields.count.detection_reasons`) besides the model's own;
4. repeats of one cell in overlapping fields (:func:`leuko.fields.find_repeats`) are looked for
   between the new cells and every stored cell of the sample's other fields, with patches cut at
   the sample's ruler.

A cell a reviewer adds comes as a box, or as a point: the box is then grown from the stained
nucleus there (:func:`leuko.fields.find.cell_at`), or, where there is none, is a square of the
field's typical cell size around the point.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from leuko.errors import LeukoError
from leuko.fields.count import classifier_crop, detection_reasons
from leuko.fields.dedupe import cell_patch, find_repeats
from leuko.fields.find import (
    DEFAULT_MIN_SCORE,
    FALLBACK_FIELD_RBC,
    cell_at,
    field_ruler,
    find_cells,
    is_edge,
)
from leuko.fields.read import read_field
from leuko.serve.store import StoreError
from leuko.serve.store.db import (
    FieldContext,
    KnownField,
    NewField,
    NewFieldCell,
    NewRepeat,
)
from leuko.serve.store.images import MEDIA_TYPES
from leuko.serve.store.views import (
    AddedFieldCell,
    AddedFields,
    ModelRef,
    PredictionView,
)
from leuko.serve.uploads import Upload, UploadError, decode_upload

if TYPE_CHECKING:
    from leuko.serve.app import Service
    from leuko.serve.store import Store

DEFAULT_CELL_SIDE = 1.6
"""Side, in red-cell diameters, of the box a click gets where no nucleus is found and the field
and sample have no cell to take a size from (a neutrophil is 1.3-1.6 red cells across)."""

MIN_FIELD_SIDE = 16
"""The smallest field :func:`leuko.fields.find_cells` searches (pixels per side)."""


@dataclass
class _Decoded:
    upload: Upload
    image: np.ndarray
    media_type: str
    rbc_measured: float | None = None


@dataclass
class _Cut:
    """One cell to classify: where it is, and the two crops."""

    box: tuple[float, float, float, float]
    score: float | None
    edge: bool
    png: bytes
    size: tuple[int, int]
    array: np.ndarray


@dataclass
class _Plan:
    fields: list[_Decoded] = field(default_factory=list)
    cells: list[list[_Cut]] = field(default_factory=list)
    rulers: list[float] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repeats: list[NewRepeat] = field(default_factory=list)


# --------------------------------------------------------------------------- pieces
def decode_fields(svc: "Service", uploads: Sequence[Upload]) -> list[_Decoded]:
    """Decode every field at its own size, or refuse the request naming every unusable file (nothing is stored)."""
    out, errors = [], []
    for up in uploads:
        try:
            image = decode_upload(up, svc.limits, size=None)
            if min(image.shape[:2]) < MIN_FIELD_SIDE:
                raise UploadError(422, f"{up.name}: {image.shape[1]} x {image.shape[0]} pixels is too small for a field "
                                       f"(at least {MIN_FIELD_SIDE} x {MIN_FIELD_SIDE})")
            with Image.open(io.BytesIO(up.data)) as im:
                media = MEDIA_TYPES.get(str(im.format), "application/octet-stream")
            out.append(_Decoded(up, image, media))
        except UploadError as exc:
            errors.append(exc)
    if errors:
        status = next((c for c in (413, 415, 422) if any(e.status_code == c for e in errors)), 422)
        if len(errors) == 1:
            raise errors[0]
        raise UploadError(status, f"{len(errors)} of {len(uploads)} fields cannot be used: " + "; ".join(e.message for e in errors))
    return out


def sample_ruler(measured: Sequence[float | None]) -> float | None:
    """The sample's red-cell diameter: the median of its fields' (``None`` when no field had enough red cells)."""
    known = [float(d) for d in measured if d is not None]
    return float(np.median(known)) if known else None


def _ruler_for(image: np.ndarray, ruler: float | None, own: float | None) -> float:
    return float((ruler if ruler is not None else own) or max(image.shape[:2]) / FALLBACK_FIELD_RBC)


def cut(svc: "Service", image: np.ndarray, box: Sequence[float], score: float | None, edge: bool) -> _Cut:
    """The crop ``leuko count`` classifies for ``box`` (kept as the cell's image, PNG) and the same at the model's size."""
    cell_centred = bool(svc.preprocess.cell_centred)
    window = classifier_crop(image, box, cell_centred=cell_centred, size=None)
    array = classifier_crop(image, box, cell_centred=cell_centred, size=svc.predictor.array_size)
    buf = io.BytesIO()
    Image.fromarray(window).save(buf, format="PNG")
    return _Cut(tuple(float(v) for v in box), score, bool(edge), buf.getvalue(),  # type: ignore[arg-type]
                (int(window.shape[1]), int(window.shape[0])), array)


async def classify(svc: "Service", cuts: Sequence[_Cut], names: Sequence[str], *, vouched: bool = False) -> list[PredictionView]:
    """The loaded model's answer for each crop (on the inference thread, batched with everything else), the
    review flag with the model's reasons and, unless a reviewer ``vouched`` for the cell, the detection score's."""
    if not cuts:
        return []
    logits, probs, routing = await svc.batcher.predict([c.array for c in cuts])
    results = svc.results(list(names), logits, probs, routing, len(svc.classes))
    out = []
    for c, r in zip(cuts, results, strict=True):
        why = list(r.review_reasons) + ([] if vouched else detection_reasons(c.score))
        out.append(PredictionView(label=r.label, confidence=r.confidence, probs=r.probs, review=bool(why), review_reasons=why,
                                  answered_by=r.answered_by, routed_because=r.routed_because))
    return out


def _stored_patches(ctx: FieldContext, ruler_of: Any) -> tuple[list[Any], list[str], list[int]]:
    """Repeat-check patches of the sample's stored field cells (their fields decoded from the image store)."""
    patches, keys, ids = [], [], []
    by_field: dict[int, list[Any]] = {}
    for c in ctx.cells:
        by_field.setdefault(c.field_id, []).append(c)
    for f in ctx.fields:
        cells = by_field.get(f.id)
        if not cells:
            continue
        try:
            image = read_field(f.path)
        except LeukoError as exc:
            raise StoreError(500, f"the image of field {f.id} ({f.name}) cannot be read from the image store: {exc}") from None
        d = ruler_of(f)
        for c in cells:
            patches.append(cell_patch(image, c.box, d, c.edge))
            keys.append(f"field:{f.id}")
            ids.append(c.id)
    return patches, keys, ids


def _repeats(ctx: FieldContext, d: float, new: Sequence[tuple[str, np.ndarray, _Cut]]) -> list[NewRepeat]:
    """Repeats among ``new`` cells (field key, field image, cut) and between them and the stored ones."""
    if not new:
        return []
    old_patches, old_keys, old_ids = _stored_patches(ctx, lambda f: d)
    patches = old_patches + [cell_patch(image, c.box, d, c.edge) for _, image, c in new]
    keys = old_keys + [key for key, _, _ in new]
    n_old = len(old_patches)
    out = []
    for r in find_repeats(patches, keys, pairs_with=range(n_old, len(patches))):
        a, b = sorted((r.a, r.b))
        if a < n_old:
            out.append(NewRepeat(cell=b - n_old, correlation=r.correlation, other_id=old_ids[a]))
        else:
            out.append(NewRepeat(cell=b - n_old, correlation=r.correlation, other=a - n_old))
    return out


def _plan(svc: "Service", decoded: list[_Decoded], ctx: FieldContext) -> _Plan:
    """Rulers, cells found, crops and repeats of the new fields (those the sample does not have yet)."""
    from leuko.serve.store.images import sha256_of

    plan = _Plan()
    seen = set(ctx.field_shas)
    for d in decoded:
        digest = sha256_of(d.upload.data)
        if digest in seen:
            plan.duplicates.append(d.upload.name)
            continue
        seen.add(digest)
        d.rbc_measured = field_ruler(d.image)
        plan.fields.append(d)
    ruler = sample_ruler([f.rbc_measured for f in ctx.fields] + [d.rbc_measured for d in plan.fields])
    new: list[tuple[str, np.ndarray, _Cut]] = []
    for i, d in enumerate(plan.fields):
        r = _ruler_for(d.image, ruler, d.rbc_measured)
        found = find_cells(d.image, rbc_diameter=r, min_score=DEFAULT_MIN_SCORE)
        cuts = [cut(svc, d.image, c.box, c.score, c.edge) for c in found]
        plan.rulers.append(r)
        plan.cells.append(cuts)
        new.extend((f"new:{i}", d.image, c) for c in cuts)
        if not found:
            plan.notes.append(f"{d.upload.name} holds no white cell")
    plan.repeats = _repeats(ctx, _ruler_for(plan.fields[0].image, ruler, None), new) if plan.fields else []
    return plan


# --------------------------------------------------------------------------- endpoints' work
async def add_fields(svc: "Service", store: "Store", sample_id: int, uploads: Sequence[Upload], actor: str,
                     ref: ModelRef) -> AddedFields:
    """New fields of a sample: decoded (all, or the request is refused), searched, cut out, classified, compared, stored."""
    ctx = await run_in_threadpool(store.field_context, sample_id, ref.fingerprint)
    decoded = await run_in_threadpool(decode_fields, svc, uploads)
    plan = await run_in_threadpool(_plan, svc, decoded, ctx)
    flat = [c for cells in plan.cells for c in cells]
    names = [f"{d.upload.name} #{i}" for d, cells in zip(plan.fields, plan.cells) for i in range(1, len(cells) + 1)]
    preds = iter(await classify(svc, flat, names))
    fields = [
        NewField(name=d.upload.name, data=d.upload.data, media_type=d.media_type, width=int(d.image.shape[1]),
                 height=int(d.image.shape[0]), rbc_measured=d.rbc_measured, rbc_diameter=r,
                 cells=[NewFieldCell(c.png, c.size[0], c.size[1], c.box, c.score, c.edge, next(preds)) for c in cells])
        for d, r, cells in zip(plan.fields, plan.rulers, plan.cells, strict=True)
    ]
    res = await run_in_threadpool(store.add_fields, sample_id, fields, actor, ref.fingerprint, plan.repeats, plan.notes)
    res.duplicates = plan.duplicates + res.duplicates
    return res


def check_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """A reviewer's box, checked: four finite numbers, inside the field, at least a few pixels a side."""
    from leuko.serve.store.db import MIN_BOX

    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise StoreError(422, "box: give four numbers x0, y0, x1, y1 (field pixels)")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height or x0 >= x1 or y0 >= y1:
        raise StoreError(422, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not inside the {width} x {height} field "
                              "(x0 < x1 <= width, y0 < y1 <= height, all >= 0)")
    if x1 - x0 < MIN_BOX or y1 - y0 < MIN_BOX:
        raise StoreError(422, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is smaller than {MIN_BOX:g} pixels a side")
    return x0, y0, x1, y1


def typical_side(f: KnownField, ctx: FieldContext) -> float:
    """The side of a box a click gets with no nucleus under it: the median of the field's cells' (not deleted), else
    of the sample's field cells, else :data:`DEFAULT_CELL_SIDE` red-cell diameters."""
    def side(cells: list[Any]) -> float | None:
        sides = [max(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in cells if not c.deleted]
        return float(np.median(sides)) if sides else None

    return side([c for c in ctx.cells if c.field_id == f.id]) or side(list(ctx.cells)) or DEFAULT_CELL_SIDE * f.rbc_diameter


async def add_cell(svc: "Service", store: "Store", field_id: int, *, box: Sequence[float] | None, point: Sequence[float] | None,
                   label: str | None, request_id: str | None, actor: str, ref: ModelRef) -> AddedFieldCell:
    """A missed cell a reviewer adds to a field, by its box or by a point on it (see the module's description)."""
    if (box is None) == (point is None):
        raise StoreError(422, "give the new cell's box (x0, y0, x1, y1) or a point (x, y) on it, not both")
    f, ctx = await run_in_threadpool(store.field_context_of, field_id, ref.fingerprint)
    if label is not None and label not in svc.classes:
        raise StoreError(422, f"unknown label {label!r}; the model's classes are {svc.classes}")
    if box is not None:
        chosen = check_box(box, f.width, f.height)
    else:
        if len(point) != 2 or not all(math.isfinite(float(v)) for v in point):  # type: ignore[arg-type]
            raise StoreError(422, "point: give two numbers x, y (field pixels)")
        x, y = (float(v) for v in point)  # type: ignore[union-attr]
        if not (0 <= x < f.width and 0 <= y < f.height):
            raise StoreError(422, f"point ({x:g}, {y:g}) is not inside the {f.width} x {f.height} field")

    def work() -> tuple[_Cut, str, list[NewRepeat]]:
        try:
            image = read_field(f.path)
        except LeukoError as exc:
            raise StoreError(500, f"the image of field {f.id} cannot be read from the image store: {exc}") from None
        d = f.rbc_diameter
        how = "box"
        if box is not None:
            c = cut(svc, image, chosen, None, is_edge(chosen, f.width, f.height, d))
        else:
            hit = cell_at(image, (x, y), rbc_diameter=d)
            if hit is not None:
                how = "nucleus"
                c = cut(svc, image, hit.box, hit.score, hit.edge)
            else:
                how = "default"
                half = typical_side(f, ctx) / 2.0
                sq = (max(0.0, x - half), max(0.0, y - half), min(float(f.width), x + half), min(float(f.height), y + half))
                c = cut(svc, image, sq, None, is_edge(sq, f.width, f.height, d))
        ruler = sample_ruler([k.rbc_measured for k in ctx.fields]) or d
        reps = _repeats(ctx, ruler, [(f"field:{f.id}", image, c)])
        return c, how, reps

    c, how, reps = await run_in_threadpool(work)
    (pred,) = await classify(svc, [c], [f"{f.name} (added)"], vouched=True)
    new = NewFieldCell(c.png, c.size[0], c.size[1], c.box, c.score, c.edge, pred)
    return await run_in_threadpool(lambda: store.add_field_cell(field_id, new, actor, ref.fingerprint, label=label,
                                                                request_id=request_id, box_from=how, repeats=reps))


__all__ = ["DEFAULT_CELL_SIDE", "add_cell", "add_fields", "check_box", "classify", "cut", "decode_fields", "sample_ruler",
           "typical_side"]
