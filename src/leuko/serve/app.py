"""The lab service: one model, loaded once, behind a small HTTP API and a review page.

Endpoints (the OpenAPI description at ``/openapi.json`` lists their bodies
and answers; there is no ``/docs``, whose viewer would come from a CDN):

* ``GET /health``: alive, which backend, how many batches so far;
* ``GET /model``: classes, input size, preprocessing, temperature, the review
  policy and where its threshold was chosen, the training data summary and
  held-out metrics of the run when they are known, the upload limits;
* ``POST /predict``: images → calibrated probabilities, top-k and a review
  flag with its reasons, per image;
* ``POST /explain``: one image → Grad-CAM overlay PNG (PyTorch runs only);
* ``POST /count``: the cell images of one sample → differential count with
  95% Wilson intervals and the number flagged for review;
* ``POST /count/labels``: the same count for labels a person has reviewed
  (what the page calls whenever a label changes);
* ``GET /``: the review page (static files shipped in the package).

With a store (``create_app(model, store="lab.db")``, ``leuko serve --db``)
the service also keeps samples, cells, predictions and every review
(:mod:`leuko.serve.routers.samples`, :mod:`leuko.serve.store`), takes whole
smear fields whose cells it finds, classifies and counts as ``leuko count``
does (:mod:`leuko.serve.routers.fields`, :mod:`leuko.serve.fields`), and with
``auth`` every call but the page's files needs a reviewer's bearer token
(:mod:`leuko.serve.auth`).

Uploads are parsed and decoded in memory with limits (:mod:`leuko.serve.uploads`);
the model runs on one inference thread that batches concurrent requests
(:mod:`leuko.serve.batching`), so the event loop never waits for it.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from leuko.data.preprocess import Preprocess
from leuko.errors import LeukoError, Refusal
from leuko.infer.backends import Prediction
from leuko.infer.review import ReviewPolicy
from leuko.run.folder import RunFolder
from leuko.serve.batching import MicroBatcher
from leuko.serve.count import differential_count
from leuko.serve.uploads import (
    Upload,
    UploadError,
    UploadLimits,
    decode_upload,
    read_uploads,
)

log = logging.getLogger("leuko.serve")

STATIC_DIR = Path(str(files("leuko.serve") / "static"))
"""The page's HTML, JS and CSS: shipped with the package, no CDN."""

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
"""The page may load nothing from anywhere else (and a test would notice if it tried)."""


# --------------------------------------------------------------------------- schemas
class ErrorMessage(BaseModel):
    """Every refusal: one line that names the file or the limit."""

    detail: str = Field(..., examples=["cell_07.jpg: not an image, or not one of JPEG, PNG, BMP, TIFF, WEBP"])


class ClassProb(BaseModel):
    label: str
    prob: float


class ImageResult(BaseModel):
    """One image's prediction."""

    name: str = Field(..., description="The uploaded file's name (a label only; never used as a path).")
    label: str = Field(..., description="Predicted class.")
    confidence: float = Field(..., description="Calibrated probability of the predicted class.")
    probs: dict[str, float] = Field(..., description="Calibrated probability per class (temperature-scaled).")
    top_k: list[ClassProb]
    review: bool = Field(..., description="True when a technologist should look at this cell.")
    review_reasons: list[str] = Field(default_factory=list)
    answered_by: str | None = Field(None, description="A routed run: the network that answered, home or robust.")
    routed_because: str | None = Field(None, description="A routed run: why the robust network answered.")


class PredictResponse(BaseModel):
    classes: list[str]
    results: list[ImageResult]


class CountRow(BaseModel):
    label: str
    count: int
    percent: float
    ci95_low: float = Field(..., description="Lower end of the 95% Wilson interval, percent.")
    ci95_high: float = Field(..., description="Upper end of the 95% Wilson interval, percent.")


class CountResponse(BaseModel):
    """A differential count of one sample."""

    n_cells: int
    n_review: int = Field(..., description="Cells flagged for review (not yet reviewed, for /count/labels).")
    counts: list[CountRow]
    note: str | None = Field(None, description="Set when fewer than 100 cells were counted.")
    interval: str
    cells: list[ImageResult] | None = Field(None, description="Per-cell predictions (POST /count only).")


class CountLabelsRequest(BaseModel):
    labels: list[str] = Field(..., max_length=100_000, description="One class name per cell, after review.")
    review: list[bool] | None = Field(None, max_length=100_000, description="Per cell: still needs review.")


class HealthResponse(BaseModel):
    status: str
    backend: str
    uptime_s: float
    batches: int
    images: int
    largest_batch: int


class ReviewInfo(BaseModel):
    description: str
    policy: dict[str, Any]


class ModelInfo(BaseModel):
    backend: str = Field(..., description="pytorch or onnx")
    model_file: str
    architecture: dict[str, Any]
    classes: list[str]
    input: dict[str, Any] = Field(..., description="image_size, resize, preprocess, mean, std")
    temperature: float
    review: ReviewInfo
    training_data: dict[str, Any] | None = Field(None, description="The run's data.json (dataset, counts per split), when known.")
    held_out: dict[str, dict[str, Any]] | None = Field(
        None, description="Metrics of each evaluation the run has (RUN/eval/<name>/metrics.json), when any."
    )
    explain: bool = Field(..., description="Whether POST /explain is available (PyTorch runs only).")
    limits: dict[str, int]


_WHY = {
    400: "Malformed upload, or Grad-CAM asked of an ONNX model",
    413: "Too many files, a file or request too large, or an image with too many pixels (the limit is in the message)",
    415: "Not multipart, or a file that is not an image (the file is named)",
    422: "A corrupt or truncated image (the file is named), or an invalid body",
}


def error_responses(why: Mapping[int, str], *codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for ``codes``: each an :class:`ErrorMessage` with the router's own reason."""
    return {c: {"model": ErrorMessage, "description": why[c]} for c in codes}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(_WHY, *codes)


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for endpoints that parse their multipart stream themselves."""
    binary = {"type": "string", "format": "binary"}
    prop = {"type": "array", "items": binary} if many else binary
    what = "Cell images (JPEG, PNG, BMP, TIFF or WebP), one part per file." if many else "One cell image."
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [field], "properties": {field: {**prop, "description": what}}}
                }
            },
        }
    }


# --------------------------------------------------------------------------- state
@dataclass
class Service:
    """Everything the endpoints share, built once at start-up."""

    predictor: Any
    backend: str
    model_file: Path
    run: RunFolder | None
    policy: ReviewPolicy
    limits: UploadLimits
    batcher: MicroBatcher
    preprocess: Preprocess
    started: float
    explainer: Any = None

    @property
    def can_explain(self) -> bool:
        """Grad-CAM needs PyTorch gradients: a run folder or model.pt (a routed run too), not an ONNX file."""
        return self.backend.startswith("pytorch")

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    def results(self, names: Sequence[str], logits: np.ndarray, probs: np.ndarray, routing: np.ndarray, top_k: int) -> list[ImageResult]:
        """Per-image answers: probabilities, top-k and the review flag with reasons (from the network that answered).

        ``routing``: per row, ``None``, or for a routed run ``(answered_by, routed_because)``.
        """
        classes = self.classes
        routed = len(routing) > 0 and routing[0] is not None
        pred = Prediction(list(names), logits, probs, classes,
                          answered_by=[r[0] for r in routing] if routed else None,
                          route_reasons=[r[1] for r in routing] if routed else None)
        reasons = self.predictor.review_reasons(pred)
        k = max(1, min(top_k, len(classes)))
        out = []
        for i, (name, p, why) in enumerate(zip(names, probs, reasons)):
            order = np.argsort(-p, kind="stable")[:k]
            out.append(ImageResult(
                name=name,
                label=classes[int(order[0])],
                confidence=float(p[order[0]]),
                probs={c: float(v) for c, v in zip(classes, p)},
                top_k=[ClassProb(label=classes[int(j)], prob=float(p[j])) for j in order],
                review=bool(why),
                review_reasons=why,
                answered_by=pred.answered_by[i] if routed else None,
                routed_because=(pred.route_reasons[i] or None) if routed else None,
            ))
        return out

    def decode_all(self, uploads: Sequence[Upload]) -> list[np.ndarray]:
        """Decode every upload, or refuse the request naming every unusable file."""
        images, errors = [], []
        pre = self.preprocess  # decoded like a file: at the size the model's preprocessing starts from, with its resize
        for up in uploads:
            try:
                images.append(decode_upload(up, self.limits, size=self.predictor.array_size, resize=pre.resize))
            except UploadError as exc:
                errors.append(exc)
        if errors:
            status = next((c for c in (413, 415, 422) if any(e.status_code == c for e in errors)), 422)
            if len(errors) == 1:
                raise errors[0] if errors[0].status_code == status else UploadError(status, errors[0].message)
            raise UploadError(status, f"{len(errors)} of {len(uploads)} files cannot be used: " + "; ".join(e.message for e in errors))
        return images


def _run_folder_of(path: Path) -> RunFolder | None:
    """The run folder a model belongs to (a run folder, its model.pt, or an ONNX file exported into it)."""
    folder = path if path.is_dir() else path.parent
    run = RunFolder(folder)
    return run if run.config.is_file() and run.classes.is_file() else None


def _held_out(run: RunFolder | None) -> dict[str, dict[str, Any]] | None:
    """Headline numbers of each evaluation ``leuko evaluate`` wrote to its default folders (RUN/eval/*/metrics.json)."""
    if run is None:
        return None
    from leuko.evaluate.run import default_eval_dir

    evals = default_eval_dir(run.path, None, "test").parent  # RUN/eval: every default evaluation lives beside "test"
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(evals.glob("*/metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", path)
            continue
        found[path.parent.name] = {
            key: m.get(key)
            for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "ece", "ci95", "data", "tta", "temperature")
            if key in m
        }
    return found or None


def load_service(model: str | Path, *, limits: UploadLimits | None = None, max_batch: int = 32, max_wait_ms: float = 2.0) -> Service:
    """Load the model once and prepare everything the endpoints share.

    Raises:
        LeukoError: the path is not a run folder, model.pt or .onnx file leuko can load.
    """
    from leuko.infer import load_predictor

    path = Path(model).expanduser()
    if not path.exists():
        raise LeukoError(f"model not found: {path} (give a run folder, its model.pt, or an exported .onnx file)")
    # Uploads arrive decoded at the model's decode size, so what is left per image (crop,
    # normalise) is cheap: done on the inference thread, no decoding pool needed.
    predictor = load_predictor(path, num_workers=0, batch_size=max(64, max_batch))

    def predict_fn(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pred = predictor.predict_arrays(images)
        if pred.failed:  # decode_upload hands over H x W x 3 uint8 only; anything else is a bug
            raise RuntimeError(f"preprocessing failed for decoded uploads: {pred.failed[:3]}")
        routing = np.empty(len(pred.keys), dtype=object)  # per row: None, or (network, why) for a routed run
        if pred.answered_by is not None:
            for i, row in enumerate(zip(pred.answered_by, pred.route_reasons or [])):
                routing[i] = row
        return pred.logits, pred.probs, routing

    backend = str(predictor.backend)
    return Service(
        predictor=predictor,
        backend=backend,
        model_file=path,
        run=_run_folder_of(path),
        policy=predictor.review_policy,
        limits=limits or UploadLimits(),
        batcher=MicroBatcher(predict_fn, max_batch=max_batch, max_wait_ms=max_wait_ms),
        preprocess=predictor.model_input.preprocess,
        started=time.time(),
    )


# --------------------------------------------------------------------------- app
def create_app(
    model: str | Path | Service,
    *,
    limits: UploadLimits | None = None,
    max_batch: int = 32,
    max_wait_ms: float = 2.0,
    store: Any = None,
    images: str | Path | None = None,
    auth: Any = None,
) -> FastAPI:
    """The FastAPI app for one model (a run folder, its model.pt, an .onnx file, or a loaded :class:`Service`).

    Args:
        store: where samples and reviews are kept: a SQLite file, a PostgreSQL URL, or an open
            :class:`leuko.serve.store.Store` (``None``: a stateless service, as for scripts).
        images: the image store folder (default: beside a SQLite file; needed for PostgreSQL).
        auth: a tokens file or :class:`leuko.serve.auth.TokenAuth`: every call then needs a bearer token.
    """
    from leuko.serve.auth import BearerAuth, TokenAuth
    from leuko.serve.routers.samples import build_router, model_ref
    from leuko.serve.store import Store

    tokens = auth if isinstance(auth, TokenAuth) or auth is None else TokenAuth.load(auth)
    # the model first: a wrong model path must not leave a new, empty database behind
    svc = model if isinstance(model, Service) else load_service(model, limits=limits, max_batch=max_batch, max_wait_ms=max_wait_ms)
    kept = store if isinstance(store, Store) or store is None else Store.open(store, images=images)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.batcher.start()
        try:
            yield
        finally:
            svc.batcher.stop()
            if kept is not None and kept is not store:
                kept.close()

    app = FastAPI(
        title="leuko",
        summary="White-blood-cell classification for a lab: predictions, review flags, Grad-CAM, differential counts.",
        version=_version(),
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pull Swagger/ReDoc from a CDN; a lab service must not make
        # browsers reach the internet, so only the description itself is served.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = svc
    app.state.store = kept
    app.state.auth = tokens
    app.state.model_ref = model_ref(svc) if kept is not None else None
    if tokens is not None:
        app.add_middleware(BearerAuth, auth=tokens)

    @app.exception_handler(Refusal)  # the store's and the upload checks' refusals
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _one_line_validation(exc)}, status_code=422)

    @app.exception_handler(LeukoError)
    async def _leuko_error(request: Request, exc: LeukoError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    async def predict_uploads(request: Request, top_k: int, max_files: int | None = None) -> tuple[list[Upload], list[ImageResult]]:
        uploads = await read_uploads(request.headers, request.stream(), svc.limits, max_files=max_files)
        images = await run_in_threadpool(svc.decode_all, uploads)
        logits, probs, routing = await svc.batcher.predict(images)
        return uploads, svc.results([u.name for u in uploads], logits, probs, routing, top_k)

    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness: the model is loaded and the inference thread is running."""
        st = svc.batcher.stats
        return HealthResponse(
            status="ok" if svc.batcher.running else "starting",
            backend=svc.backend,
            uptime_s=round(time.time() - svc.started, 3),
            batches=st.batches,
            images=st.images,
            largest_batch=st.largest_batch,
        )

    @app.get("/model", response_model=ModelInfo, tags=["service"])
    async def model_info() -> ModelInfo:
        """What the model is, how it reads images, when it asks for review, and what it was trained and tested on."""
        p = svc.predictor
        run = svc.run
        return ModelInfo(
            backend=svc.backend,
            model_file=svc.model_file.name,
            architecture=p.card.model.model_dump(mode="json", exclude_none=True),
            classes=svc.classes,
            input=dict(p.input),
            temperature=float(p.temperature),
            review=ReviewInfo(description=p.describe_review(), policy=svc.policy.to_dict()),
            training_data=run.read_json("data.json") if run is not None and run.data.is_file() else None,
            held_out=_held_out(run),
            explain=svc.can_explain,
            limits=svc.limits.to_dict(),
        )

    @app.post(
        "/predict",
        response_model=PredictResponse,
        tags=["cells"],
        responses=_errors(400, 413, 415, 422),
        openapi_extra=_multipart_body("files", many=True),
    )
    async def predict(request: Request, top_k: int = Query(3, ge=1, description="Classes listed per image (at most all).")) -> PredictResponse:
        """Calibrated class probabilities, top-k and a review flag (with reasons) for each uploaded image."""
        _, results = await predict_uploads(request, top_k)
        return PredictResponse(classes=svc.classes, results=results)

    @app.post(
        "/count",
        response_model=CountResponse,
        tags=["cells"],
        responses=_errors(400, 413, 415, 422),
        openapi_extra=_multipart_body("files", many=True),
    )
    async def count(request: Request, top_k: int = Query(1, ge=1, description="Classes listed per cell.")) -> CountResponse:
        """Differential count of one sample's cell images: counts, percentages, 95% Wilson intervals, review flags."""
        _, results = await predict_uploads(request, top_k)
        summary = differential_count([r.label for r in results], svc.classes, [r.review for r in results])
        return CountResponse(**summary, cells=results)

    @app.post("/count/labels", response_model=CountResponse, tags=["cells"], responses=_errors(422))
    async def count_labels(body: CountLabelsRequest) -> CountResponse:
        """Differential count of labels after review (the page calls this whenever a label changes)."""
        return CountResponse(**differential_count(body.labels, svc.classes, body.review))

    @app.post(
        "/explain",
        tags=["cells"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay (PNG); headers X-Leuko-Label and X-Leuko-Confidence."},
            **_errors(400, 413, 415, 422),
        },
        openapi_extra=_multipart_body("file", many=False),
    )
    async def explain(request: Request, target: str | None = Query(None, description="Class to explain (default: the predicted one).")) -> Response:
        """Grad-CAM heat map over one image: where the network looked for the predicted (or given) class."""
        if not svc.can_explain:
            raise UploadError(400, "Grad-CAM is not available for ONNX models; serve the run folder or its model.pt "
                                   "(PyTorch) to explain predictions")
        if target is not None and target not in svc.classes:
            raise UploadError(422, f"unknown target class {target!r}; the model's classes are {svc.classes}")
        uploads = await read_uploads(request.headers, request.stream(), svc.limits, max_files=1)
        (image,) = await run_in_threadpool(svc.decode_all, uploads)
        png, label, conf, network = await svc.batcher.call(lambda: _explain(svc, image, target))
        headers = {"X-Leuko-Label": label, "X-Leuko-Confidence": f"{conf:.4f}"}
        if network:
            headers["X-Leuko-Network"] = network
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.include_router(build_router(with_samples=kept is not None))
    if kept is not None:
        from leuko.serve.routers.fields import build_router as build_fields_router

        app.include_router(build_fields_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if tokens is not None:
        _document_bearer(app)
    return app


def _one_line_validation(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one line: ``action: Input should be 'accept' or 'relabel'``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _document_bearer(app: FastAPI) -> None:
    """With --auth, /openapi.json says every operation needs a bearer token."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "A reviewer's token (leuko serve --auth TOKENS_FILE)."}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _explain(svc: Service, image: np.ndarray, target: str | None) -> tuple[bytes, str, float, str]:
    """Grad-CAM on the inference thread: its hooks must see only this forward pass, never a batch's.
    A routed run's map is the answering network's, named in the last item ("" for one network)."""
    from leuko.explain.gradcam import explainer_for, explanation_png

    if svc.explainer is None:
        svc.explainer = explainer_for(svc.predictor)
    exp = svc.explainer.explain_array(image, target=target)
    return explanation_png(exp), exp.class_name, exp.probability, exp.network


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("leuko")
    except PackageNotFoundError:
        return "0"
