"""What every predictor shares, whatever runs the network: inputs, batching, failures, TTA, calibration.

Two backends run a trained model: :class:`~leuko.infer.predictor.Predictor`
(PyTorch, from a run folder or its ``model.pt``) and
:class:`~leuko.infer.onnx.OnnxPredictor` (onnxruntime, from an exported
``.onnx``). They differ only in one function, the forward pass of a
normalised ``float32 N x 3 x S x S`` batch to raw logits. Everything around
it lives here, once, in numpy:

* decoding and preprocessing (:class:`ModelInput`: the model's
  :class:`~leuko.data.preprocess.Preprocess` and
  :class:`~leuko.data.preprocess.Normalize`, read from its metadata);
* batching with a small thread pool that decodes the next batch while the
  network runs the current one (PIL decoding and resizing, OpenCV and both
  runtimes release the GIL, so threads overlap without copying pixels
  between processes);
* unreadable images found *during* that one decode, and reported per file
  with the reason :func:`~leuko.data.imageio.check_image` gives, while the
  rest of the batch is still predicted;
* test-time augmentation (flips and a 90-degree rotation, logits averaged);
* temperature-scaled probabilities.

So the two backends agree to float rounding, and the ONNX path never imports
torch: this module must not either.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from leuko.data.imageio import check_image
from leuko.data.preprocess import Normalize, Preprocess, available_cpus, build_preprocess, decode_sample
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.run.calibration import softmax
from leuko.run.card import ModelCard, ModelKind
from leuko.infer.review import ReviewPolicy

ForwardFn = Callable[[np.ndarray], np.ndarray]
"""A backend's forward pass: ``float32 N x 3 x S x S`` (C-contiguous) -> ``N x C`` raw logits."""

LoadFn = Callable[[int, np.ndarray], "str | None"]
"""``load(i, out)`` writes item ``i``'s model input into ``out``; returns ``None``, or why it cannot."""

TTA_VIEWS: tuple[str, ...] = ("identity", "flip left-right", "flip up-down", "rotate 90")
"""The test-time augmentation views, in the order their logits are summed."""

_READ_ERRORS = (LeukoError, OSError, ValueError)
"""What a bad image (file or array) raises while being decoded or preprocessed."""


@dataclass
class Prediction:
    """Probabilities for a batch of images (rows follow ``keys``)."""

    keys: list[str]
    logits: np.ndarray
    probs: np.ndarray
    classes: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)
    answered_by: list[str] | None = None
    """Routed runs (:mod:`leuko.infer.route`): per row, ``"home"`` or ``"robust"``; ``None`` for one network."""
    route_reasons: list[str] | None = None
    """Routed runs: per row, why the robust network answered (``""`` where the home network did)."""
    red_cell_ratio: np.ndarray | None = None
    """Routed runs: per row, the red cells' size over the home lab's (NaN where not measured)."""

    def __post_init__(self) -> None:
        if self.answered_by is not None and self.route_reasons is None:  # routed rows always say why (or "")
            self.route_reasons = [""] * len(self.answered_by)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(1) if len(self.probs) else np.empty(0, dtype=int)


@dataclass(frozen=True)
class ModelInput:
    """How images become a model's input: the eval-time preprocessing both backends run.

    Built from the ``input`` block of the model metadata (``model.pt`` or the
    ONNX ``leuko`` metadata), so a model always gets the resize mode, size,
    preprocessing steps and normalisation it was trained with.
    """

    preprocess: Preprocess
    normalize: Normalize

    @classmethod
    def from_meta(cls, input_meta: Mapping[str, Any]) -> "ModelInput":
        """From ``meta["input"]`` (``image_size``, ``resize``, ``preprocess``, ``mean``, ``std``)."""
        try:
            pre = build_preprocess(
                int(input_meta["image_size"]),
                input_meta.get("preprocess") or (),
                resize=input_meta.get("resize", "stretch"),
            )
            return cls(pre, Normalize(input_meta["mean"], input_meta["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LeukoError(f"the model's input description is incomplete or invalid ({exc!r}): {dict(input_meta)}") from None

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def shape(self) -> tuple[int, int, int]:
        """One model input: ``(3, S, S)``."""
        return (3, self.image_size, self.image_size)

    def from_sample(self, sample: Sample, out: np.ndarray | None = None) -> np.ndarray:
        """Decode (JPEG draft mode when it is much larger), preprocess and normalise one file."""
        return self.normalize(decode_sample(sample, self.preprocess), out)

    def from_array(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Preprocess and normalise a decoded RGB ``uint8 H x W x 3`` (or ``H x W`` grey) image."""
        return self.normalize(self.preprocess(image), out)


def tta_views(x: np.ndarray) -> list[np.ndarray]:
    """The :data:`TTA_VIEWS` of an ``N x 3 x H x W`` batch (C-contiguous copies but the first).

    Cells have no up, down, left or right, so these views are as valid as the
    original; averaging their logits smooths out orientation-specific errors.
    """
    return [
        x,
        np.ascontiguousarray(x[..., ::-1]),
        np.ascontiguousarray(x[..., ::-1, :]),
        np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3))),
    ]


def forward_logits(forward: ForwardFn, x: np.ndarray, *, tta: bool = False) -> np.ndarray:
    """Raw logits of a batch; with ``tta`` the mean over :func:`tta_views` (float32)."""
    if not tta:
        return np.asarray(forward(x), dtype=np.float32)
    views = tta_views(x)
    total = sum(np.asarray(forward(v), dtype=np.float64) for v in views)
    return (total / len(views)).astype(np.float32)


@dataclass
class Batch:
    """One batch of model inputs: ``x[k]`` is item ``rows[k]``; ``failed`` are ``(item, reason)``."""

    rows: list[int]
    x: np.ndarray
    failed: list[tuple[int, str]]


def iter_batches(
    n: int,
    load: LoadFn,
    shape: tuple[int, int, int],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    prefetch: int = 1,
) -> Iterator[Batch]:
    """Load items ``0..n-1`` into ``float32`` batches, in order, decoding ahead on a thread pool.

    Each item is decoded exactly once, straight into its slot of the batch
    buffer. An item whose ``load`` returns a reason is left out of ``x`` and
    listed in ``failed``; the others still make up the batch.

    Args:
        load: see :data:`LoadFn`.
        shape: one item's ``(3, S, S)``.
        workers: decoding threads (default: the CPUs available; 0 or 1 decodes
            in the calling thread, between forward passes).
        prefetch: batches decoded ahead of the one being consumed.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LeukoError(f"batch_size must be a positive integer; got {batch_size!r}")
    workers = available_cpus() if workers is None else int(workers)
    chunks = [range(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]

    def pack(chunk: range, buf: np.ndarray, reasons: list[str | None]) -> Batch:
        ok = [j for j, r in enumerate(reasons) if r is None]
        failed = [(chunk[j], r) for j, r in enumerate(reasons) if r is not None]
        x = buf if len(ok) == len(chunk) else buf[ok]
        return Batch([chunk[j] for j in ok], x, failed)

    if workers <= 1:
        for chunk in chunks:
            buf = np.empty((len(chunk), *shape), dtype=np.float32)
            yield pack(chunk, buf, [load(i, buf[j]) for j, i in enumerate(chunk)])
        return

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="leuko-decode") as ex:

        def submit(chunk: range) -> tuple[range, np.ndarray, list[Future]]:
            buf = np.empty((len(chunk), *shape), dtype=np.float32)
            return chunk, buf, [ex.submit(load, i, buf[j]) for j, i in enumerate(chunk)]

        pending = deque(submit(c) for c in chunks[: 1 + prefetch])
        queued = len(pending)
        try:
            while pending:
                chunk, buf, futures = pending.popleft()
                reasons = [f.result() for f in futures]
                if queued < len(chunks):  # keep the pool busy while the caller runs the network
                    pending.append(submit(chunks[queued]))
                    queued += 1
                yield pack(chunk, buf, reasons)
        finally:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()


def sample_loader(samples: Sequence[Sample], model_input: ModelInput) -> LoadFn:
    """A :data:`LoadFn` over image files: one decode, and the reason when it fails."""

    def load(i: int, out: np.ndarray) -> str | None:
        s = samples[i]
        try:
            model_input.from_sample(s, out)
        except _READ_ERRORS as exc:
            # Only failures pay for a diagnosis; check_image words the reasons
            # the same way as `leuko data inspect` (truncated, not an image...).
            return check_image(Path(s.path), full_decode=True)[1] or _strip_path(str(exc), s.path)
        return None

    return load


def array_loader(images: Sequence[np.ndarray], model_input: ModelInput) -> LoadFn:
    """A :data:`LoadFn` over decoded RGB arrays (e.g. uploads to the web service)."""

    def load(i: int, out: np.ndarray) -> str | None:
        try:
            model_input.from_array(np.asarray(images[i]), out)
        except _READ_ERRORS as exc:
            return str(exc)
        return None

    return load


def _strip_path(message: str, path: Path | str) -> str:
    """``"cannot read image /a/b.jpg: reason"`` -> ``"reason"`` (the path is reported beside it)."""
    prefix = f"cannot read image {path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def run_batches(
    forward: ForwardFn,
    n: int,
    load: LoadFn,
    model_input: ModelInput,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    tta: bool = False,
) -> tuple[list[int], np.ndarray, list[tuple[int, str]]]:
    """``(rows, logits, failed)``: raw logits of the readable items (rows in item order) and the rest."""
    rows: list[int] = []
    out: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    for batch in iter_batches(n, load, model_input.shape, batch_size=batch_size, workers=workers):
        failed.extend(batch.failed)
        if batch.rows:
            rows.extend(batch.rows)
            out.append(forward_logits(forward, batch.x, tta=tta))
    logits = np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
    return rows, logits, failed


class BasePredictor:
    """The backend-independent half of a predictor (see the module docstring).

    Subclasses set up their runtime and implement :meth:`_forward`.

    Attributes:
        card: the model card (:class:`~leuko.run.card.ModelCard`, everything in ``model.pt`` but the weights).
        classes: class names in output order.
        input: the card's input (size, resize mode, preprocessing, mean, std) as a mapping.
        temperature: applied to the logits before the softmax (1.0 = uncalibrated).
        model_input: the preprocessing built from :attr:`input`.
    """

    backend = "?"

    def __init__(
        self,
        card: ModelCard,
        *,
        batch_size: int = 64,
        temperature: float | None = None,
        num_workers: int | None = None,
    ) -> None:
        if card.input is None:
            raise LeukoError(f"a {card.kind} model does not classify cell images")
        self.card = card
        self.classes: list[str] = list(card.classes)
        self.input: dict[str, Any] = card.input.model_dump(mode="json")
        self.temperature = float(card.temperature if temperature is None else temperature)
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise LeukoError(f"temperature must be a positive number; got {self.temperature}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LeukoError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.model_input = ModelInput.from_meta(self.input)

    @property
    def kind(self) -> ModelKind:
        """What this predictor runs (picks the explainer: :data:`leuko.explain.EXPLAINERS`)."""
        return self.card.kind

    @property
    def meta(self) -> dict[str, Any]:
        """The card as the plain mapping stored in ``model.pt`` (for JSON answers and reports)."""
        return self.card.to_meta()

    @property
    def image_size(self) -> int:
        return int(self.input["image_size"])

    def _forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, keys: Sequence[str], load: LoadFn, *, tta: bool) -> Prediction:
        rows, logits, failed = run_batches(
            self._forward, len(keys), load, self.model_input,
            batch_size=self.batch_size, workers=self.num_workers, tta=tta,
        )
        if not rows:
            logits = np.zeros((0, len(self.classes)), dtype=np.float32)
        probs = softmax(logits, self.temperature) if len(logits) else np.zeros((0, len(self.classes)))
        return Prediction([keys[i] for i in rows], logits, probs, self.classes, [(keys[i], r) for i, r in failed])

    def predict_samples(self, samples: Sequence[Sample], *, tta: bool = False) -> Prediction:
        """Probabilities for samples (keys: :attr:`Sample.key`); unreadable ones go to ``failed``."""
        samples = list(samples)
        return self._predict([s.key for s in samples], sample_loader(samples, self.model_input), tta=tta)

    def predict_paths(self, paths: Iterable[str | Path], *, tta: bool = False) -> Prediction:
        """Probabilities for image files (label-free)."""
        return self.predict_samples([Sample(path=Path(p), label="?") for p in paths], tta=tta)

    def predict_arrays(
        self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None, *, tta: bool = False
    ) -> Prediction:
        """Probabilities for decoded RGB ``uint8 H x W x 3`` arrays (keys default to ``"0"``, ``"1"``...).

        Each array is resized and preprocessed exactly like a file of the same
        pixels; a malformed one (wrong dtype or shape) goes to ``failed``.
        """
        images = list(images)
        names = [str(i) for i in range(len(images))] if keys is None else [str(k) for k in keys]
        if len(names) != len(images):
            raise LeukoError(f"got {len(images)} images but {len(names)} keys")
        return self._predict(names, array_loader(images, self.model_input), tta=tta)

    @property
    def array_size(self) -> int | None:
        """The side decoded images are best handed to :meth:`predict_arrays` at (``None``: as decoded).

        A decoder that resizes straight to it (JPEG draft mode) saves the work
        the preprocessing would do anyway, with the same pixels as a file.
        """
        return self.model_input.preprocess.decode_size

    @property
    def review_policy(self) -> ReviewPolicy:
        """The review policy stored with the model (:mod:`leuko.infer.review`)."""
        return ReviewPolicy.from_card(self.card)

    def review_checks(self, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
        """Per row of ``pred``, ``(low confidence, unlike the training data)`` by this model's review policy.

        The predictor, not its callers, decides, so a routed run can review
        each row by the policy of the network that answered it.
        """
        return self.review_policy.checks(pred.logits, pred.probs, self.temperature)

    def review_reasons(self, pred: Prediction) -> list[list[str]]:
        """Per row of ``pred``, why it needs review (an empty list: accept as predicted)."""
        return self.review_policy.reasons(pred.logits, pred.probs, self.temperature)

    def describe_review(self) -> str:
        """The review policy in one line."""
        return self.review_policy.describe()

    def describe(self) -> str:
        """One line: backend, architecture, classes, input."""
        return (
            f"{self.backend}: {self.card.model.display_name}, {len(self.classes)} classes, "
            f"{self.image_size}px {self.input.get('resize', 'stretch')}, T={self.temperature:.3f}"
        )


__all__ = [
    "TTA_VIEWS",
    "BasePredictor",
    "Batch",
    "ForwardFn",
    "ModelInput",
    "Prediction",
    "array_loader",
    "forward_logits",
    "iter_batches",
    "run_batches",
    "sample_loader",
    "tta_views",
]
