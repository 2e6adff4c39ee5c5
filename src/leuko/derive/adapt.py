"""``leuko adapt``: fit a trained model's normalisation to a new lab's images (AdaBN), no labels.

A network trained on one lab's slides keeps, in every BatchNorm layer, the
mean and variance of that lab's activations. Another lab's stain, camera
and focus shift those activations, so every layer normalises them with the
wrong statistics and the error compounds down the network. AdaBN (Li et
al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation")
re-estimates those statistics on the new lab's images and changes nothing
else: the convolution and head weights, and what they learnt about cell
types, stay as trained. It needs unlabelled images only, a few hundred
are enough, and it takes one forward pass.

:func:`adapt_run` writes a new run folder beside the source run (its config,
classes, split and data summary copied, a new ``model.pt`` whose metadata
says ``adapted: {method: adabn, data, n_images, date, ...}``), which
``evaluate``, ``predict``, ``export`` and ``serve`` read like any run. Images
are decoded and preprocessed exactly as the model's inference does
(:class:`~leuko.infer.backends.ModelInput` from the model's own metadata).

AdaBN's premise is that the two labs differ in how their cells look, not
in which cells they see. Labs differ in that too: BCCD's crops are 60%
neutrophils, PBC's training split 20%; statistics averaged over a
neutrophil-heavy sample are a neutrophil's, and every other class is then
normalised as if it were one. So by default (``balance=True``) the source
model first labels the new images (one forward pass, no labels needed),
and the statistics are estimated on a resample in which each predicted
class has its share of the source training split (see
:func:`balanced_draw`). Measured on BCCD with a last:3 PBC model
(docs/robustness.md): plain AdaBN 78.1% -> 68.8% accuracy, balanced
78.1% -> 77.8% with macro-F1 0.567 -> 0.620.

A model whose BatchNorm statistics were never trained (``freeze: bn``, the
``pbc-robust`` recipe) gives AdaBN nothing to re-estimate. For it, and for
any model, ``method="self-train"`` fine-tunes on the new lab's images with
the model's own confident predictions as labels (pseudo-label self-training,
Lee 2013; the "teacher" is the unadapted model with test-time augmentation):
per predicted class the most confident share (``keep``) is kept, so the
majority class does not fill the selection, batches draw each kept class in
proportion to the square root of its size (:func:`draw_weights`), the run's
own augmentation and freeze mode apply, and the
learning rate is a tenth of training's. A class map (``exclude``) names the
classes the new lab's images cannot be (BCCD's crops hold no platelets):
they are never pseudo-labels. Measured on BCCD with ``pbc-robust``
(docs/robustness.md, mean of 3 seeds, with TTA): accuracy 82.6% -> 83.8%,
macro-F1 0.707 -> 0.696; a lab keeps the adapted run only if its own
labelled sample says so.

The model's temperature and review thresholds were fitted on the source
lab's validation images; they are kept (there are no labels to refit them
on) and the review policy says so.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leuko.data import load_dataset
from leuko.data.classmap import ClassMap
from leuko.data.pipeline import decode_sample
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer.backends import ModelInput, iter_batches, run_batches, sample_loader
from leuko.infer.predict import collect_images
from leuko.infer.predictor import _torch_logits
from leuko.models import freeze
from leuko.models.ensemble import Ensemble
from leuko.models.freeze import bn_frozen, freeze
from leuko.run.calibration import softmax
from leuko.run.card import HOME_FILE, ROUTE_FILE, ModelCard, ModelKind
from leuko.run.config import load_config
from leuko.run.data import run_transform
from leuko.run.folder import (
    RunFolder,
    check_new_run,
    derived_run,
    kind_of,
    load_model,
    save_model,
)

ADAPT_METHODS: tuple[str, ...] = ("adabn", "self-train")
"""Adaptation methods :func:`adapt_run` knows."""

SELF_TRAIN_DEFAULTS: dict[str, float] = {"epochs": 5, "keep": 0.5, "lr_factor": 0.1}
"""Self-training: passes over the kept images, share kept per predicted class, learning rate
as a share of the run's (measured on BCCD: 3-6 passes, keep 0.5-0.8 and lr 1e-4-3e-4 all gave
+2.8 to +3.9 points; docs/robustness.md)."""

MIN_IMAGES = 16
"""Fewer images than this give BatchNorm statistics noisier than the shift they correct."""



ADAPT_LAYERS: tuple[str, ...] = ("trained", "all")
"""Which BatchNorm layers :func:`adapt_run` re-estimates (see :func:`trained_batchnorm`)."""


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer (1-D, 2-D, 3-D, synchronised) that tracks running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def trained_batchnorm(model: nn.Module, freeze_mode: str) -> list[str]:
    """Names of the BatchNorm layers whose statistics training estimated on the source lab's images.

    AdaBN's premise is that a layer's stored statistics are the source
    data's; then swapping in the new lab's makes the layer's output look to
    the layers after it as the source's did. A layer that ``model.freeze``
    froze (early blocks under ``last:N``, every backbone layer under
    ``backbone`` or ``bn``) kept the pretrained weights' (ImageNet)
    statistics instead, and the trained layers after it learnt from what it
    outputs *with those*: re-estimating it would hand them inputs they never
    saw. So by default only the trained layers are adapted; the frozen ones
    keep normalising both labs the same way and the first trained layer
    absorbs the shift. The same :func:`leuko.models.freeze` call that training
    made decides which is which.
    """
    freeze(model, freeze_mode)
    try:
        return [n for n, m in batchnorm_layers(model) if not bn_frozen(m)]
    finally:
        freeze(model, "none")  # hooks off again: the adapted model is saved and reloaded plain


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    batches: Callable[[], Any],
    *,
    layers: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """AdaBN in place: re-estimate BatchNorm layers' running mean and variance from ``batches``.

    The statistics are reset and then averaged over all batches with equal
    weight (``momentum=None``, PyTorch's cumulative average), not blended into
    the old ones: what is left of the source lab after adaptation is nothing.
    Only BatchNorm layers run in training mode (so they use and record batch
    statistics); dropout and everything else stay in eval mode, and no
    gradient is computed, so no weight can change.

    Args:
        batches: a callable returning an iterable of ``float32 N x 3 x S x S``
            arrays or tensors, already normalised like the model's inputs.
        layers: names of the layers to adapt (default: every BatchNorm layer);
            the others keep normalising with their stored statistics.

    Returns:
        The number of images seen.

    Raises:
        LeukoError: the model has no BatchNorm layer (nothing to adapt).
    """
    found = batchnorm_layers(model)
    if not found:
        raise LeukoError(f"{type(model).__name__} has no BatchNorm layer: AdaBN has nothing to adapt")
    if layers is not None:
        wanted = set(layers)
        unknown = sorted(wanted - {n for n, _ in found})
        if unknown:
            raise LeukoError(f"no BatchNorm layer named {unknown[0]!r} in {type(model).__name__}")
        found = [(n, m) for n, m in found if n in wanted]
    saved = [(m, m.momentum) for _, m in found]
    model.eval()
    for _, m in found:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for x in batches():
            x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
            if len(x) < 2:  # a batch of one has no variance to estimate
                continue
            model(x.to(device).contiguous(memory_format=torch.channels_last))
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return seen


def balanced_draw(
    pseudo: np.ndarray, source_counts: Sequence[float], n: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices (with replacement) into the new lab's images whose predicted classes have the source's shares.

    Each image ``i`` is drawn with probability proportional to
    ``share[c] / count[c]`` for its predicted class ``c``: the expected class
    mix of the draw is the source training split's, restricted to the
    classes the model finds in the new lab at all (a class it never predicts
    there has no image to stand for it; the other shares are renormalised).

    Args:
        pseudo: predicted class index of each image.
        source_counts: training images per class, in the model's class order.
        n: how many indices to draw.
    """
    pseudo = np.asarray(pseudo, dtype=int)
    share = np.asarray(source_counts, dtype=float)
    if share.ndim != 1 or len(share) == 0 or (share < 0).any() or share.sum() <= 0:
        raise LeukoError(f"source class counts must be non-negative with a positive total; got {list(source_counts)}")
    if len(pseudo) == 0 or pseudo.min() < 0 or pseudo.max() >= len(share):
        raise LeukoError(f"predicted classes must index the {len(share)} model classes")
    found = np.bincount(pseudo, minlength=len(share)).astype(float)
    weight = share[pseudo] / found[pseudo]
    if weight.sum() <= 0:  # every predicted class is absent from the source split: fall back to uniform
        weight = np.ones(len(pseudo))
    return rng.choice(len(pseudo), size=n, replace=True, p=weight / weight.sum())


def source_class_counts(run: RunFolder, classes: Sequence[str]) -> list[float]:
    """Training images per model class from the run's ``data.json`` (equal counts when it has none)."""
    counts = (run.read_json("data.json").get("counts") or {}).get("train") if run.data.is_file() else None
    if not isinstance(counts, dict) or not counts:
        return [1.0] * len(classes)
    return [float(counts.get(c, 0)) for c in classes]


@dataclass
class AdaptResult:
    """What :func:`adapt_run` did."""
    out: Path
    n_images: int
    n_layers: int
    failed: list[tuple[str, str]]
    adapted: dict[str, Any]


@torch.no_grad()
def teacher_logits(
    model: nn.Module, samples: Sequence[Sample], model_input: Any, batch_size: int, failed: dict[str, str],
    device: torch.device | str = "cpu", *, tta: bool = False,
) -> tuple[np.ndarray, list[int]]:
    """``(logits per readable image, their indices into samples)`` from the unadapted model.

    The one pass over the new lab's images both methods start from (AdaBN's
    class balance, self-training's pseudo-labels). Unreadable images are
    recorded in ``failed`` and left out.
    """
    from functools import partial


    model.eval()
    rows, logits, bad = run_batches(
        partial(_torch_logits, model, device), len(samples), sample_loader(samples, model_input), model_input,
        batch_size=batch_size, tta=tta,
    )
    failed.update((samples[i].key, why) for i, why in bad)
    return logits, rows


def pseudo_labels(
    model: nn.Module, samples: Sequence[Sample], model_input: Any, batch_size: int, failed: dict[str, str],
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, list[int]]:
    """``(predicted class per readable image, their indices into samples)`` from the unadapted model."""
    logits, rows = teacher_logits(model, samples, model_input, batch_size, failed, device)
    return (logits.argmax(1) if len(rows) else np.zeros(0, dtype=int)), rows


def collect_samples(data: str | Path, layout: str | None = None, layout_options: dict[str, Any] | None = None) -> list[Sample]:
    """The new lab's images: a dataset in a known layout (BCCD boxes become crops), else every image file under ``data``.

    Labels, where a layout has them, are never read.
    """
    root = Path(data).expanduser()
    if not root.exists():
        raise LeukoError(f"no such file or folder: {root}")
    if layout is not None or root.is_file():
        if root.is_file() and layout is None:
            return [Sample(path=root, label="?")]
        return list(load_dataset(root, layout, **(layout_options or {})).samples)
    try:
        return list(load_dataset(root, None, **(layout_options or {})).samples)
    except LeukoError:
        # no labelled layout: a plain folder of images is what an unlabelled lab has
        return [Sample(path=p, label="?") for p in collect_images([root])]


def confident_selection(probs: np.ndarray, keep: float, allowed: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, labels)``: per predicted class, the ``keep`` share of its images the model is surest of.

    ``probs`` are the teacher's class probabilities; classes outside ``allowed``
    (the ones the new lab's images cannot be) drop out before the argmax and
    the rest is renormalised. Every predicted class keeps at least one image,
    so a class the new lab has little of is not dropped by a global threshold.
    """
    if not 0.0 < keep <= 1.0:
        raise LeukoError(f"keep must be in (0, 1]; got {keep}")
    cols = np.arange(probs.shape[1]) if allowed is None else np.asarray(sorted(allowed), dtype=int)
    p = probs[:, cols]
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12)
    labels, conf = cols[p.argmax(axis=1)], p.max(axis=1)
    chosen: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(keep * len(members))))
        chosen += members[np.argsort(-conf[members], kind="stable")][:k].tolist()
    idx = np.asarray(sorted(chosen), dtype=int)
    return idx, labels[idx]


def draw_weights(labels: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-image draw probabilities under which class ``c`` gets a share proportional to ``n_c ** power``.

    ``power`` 0 draws every class equally often, 1 as the images come. The
    square root (the default) is the middle: a neutrophil-heavy lab's
    majority does not swamp the other classes, and a class the teacher
    called only a handful of times is not repeated until the student learns
    those few images by heart. Equal drawing did that on BCCD: 2 "basophil"
    pseudo-labels, drawn as often as 114 neutrophils, each seen about 80
    times in 5 passes, and the adapted model called more cells basophil,
    wrongly (docs/robustness.md).
    """
    labels = np.asarray(labels, dtype=int)
    if labels.size == 0:
        return np.zeros(0)
    counts = np.bincount(labels).astype(float)
    weights = counts[labels] ** (power - 1.0)
    return weights / weights.sum()


def self_train(
    model: nn.Module,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    transform: Any,
    *,
    freeze_mode: str,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    label_smoothing: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> int:
    """Fine-tune ``model`` in place on preprocessed ``images`` with pseudo-``labels``; returns the steps taken.

    Batches draw with replacement by :func:`draw_weights`, so the new lab's
    majority class does not pull the others toward it; ``transform``
    is the run's training transform (augmentation included) and
    ``freeze_mode`` its freeze mode, so what trained in the source run is
    what adapts here. ``model`` must already be on ``device``.
    """
    import torch.nn.functional as F


    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=int)
    weights = draw_weights(labels)
    steps = max(1, epochs * int(np.ceil(len(labels) / batch_size)))
    model.train()
    freeze(model, freeze_mode)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        batch = rng.choice(len(labels), size=min(batch_size, max(2, len(labels))), p=weights)
        x = torch.stack([transform.from_preprocessed(images[i]) for i in batch]).to(device)
        y = torch.from_numpy(labels[batch]).long().to(device)
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return steps


def adapt_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    layout: str | None = None,
    layout_options: dict[str, Any] | None = None,
    method: str = "adabn",
    layers: str = "trained",
    balance: bool = True,
    class_map: str | Path | None = None,
    epochs: int | None = None,
    keep: float | None = None,
    max_images: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> AdaptResult:
    """Adapt the model of ``run_dir`` to the images in ``data``; write the adapted run to ``out``.

    A routed run (``leuko route``) adapts its robust network, the one that
    answers another lab's images, and keeps its home network and gate: the
    adapted run is routed too. An ensemble (``leuko ensemble``) adapts each
    member: AdaBN re-estimates each member's statistics; self-training
    labels the images with the ensemble's answer and trains every member on
    those labels.

    Args:
        data: the new lab's images (a dataset folder, or any folder of images).
        layout: how to read ``data`` (e.g. ``bccd`` crops one cell per box);
            detected, else every image file under it.
        method: ``adabn`` (re-estimate BatchNorm statistics) or
            ``self-train`` (fine-tune on confident pseudo-labels; module doc).
        layers: AdaBN: ``trained`` (the BatchNorm layers training estimated
            on the source lab, see :func:`trained_batchnorm`) or ``all``.
        balance: AdaBN: estimate the statistics on a resample whose
            predicted-class mix is the source training split's (module doc);
            ``False``: on the images as they come, each once.
        class_map: self-train: a class map (file or shipped name) whose
            ``exclude`` lists the classes the new lab's images cannot be.
        epochs, keep: self-train: passes over the kept images and the share
            kept per predicted class (:data:`SELF_TRAIN_DEFAULTS`).
        max_images: use a random (seeded) subset of at most this many images.
        batch_size: images per batch (AdaBN: larger gives steadier statistics).
        device: ``cpu``, ``cuda`` or ``None`` (the GPU when there is one) for
            the teacher's predictions, AdaBN's pass and self-training.

    Raises:
        LeukoError: bad arguments, ``out`` exists, too few readable images, a
            model without BatchNorm (AdaBN).
    """
    if method not in ADAPT_METHODS:
        raise LeukoError(f"unknown adaptation method {method!r}; known: {', '.join(ADAPT_METHODS)}")
    if layers not in ADAPT_LAYERS:
        raise LeukoError(f"--layers must be {' or '.join(ADAPT_LAYERS)}; got {layers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise LeukoError(f"batch size must be an integer >= 2 (BatchNorm needs a variance); got {batch_size!r}")
    if max_images is not None and max_images < MIN_IMAGES:
        raise LeukoError(f"--max-images must be at least {MIN_IMAGES}; got {max_images}")
    if method == "adabn" and (class_map is not None or epochs is not None or keep is not None):
        raise LeukoError("--class-map, --epochs and --keep are options of --method self-train")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise LeukoError(f"--epochs must be a positive integer; got {epochs!r}")
    if keep is not None and not 0.0 < keep <= 1.0:
        raise LeukoError(f"--keep must be a share in (0, 1]; got {keep}")
    dev = _device(device)
    run = RunFolder.open(run_dir)
    target = check_new_run(out, "an adapted run")
    if target.resolve() == run.path.resolve():
        raise LeukoError("--out must be a new folder, not the run being adapted")
    routed = kind_of(run.path) is ModelKind.ROUTED  # adapt its robust network; the home network and the gate stay
    model, card = load_model(run.model if routed else run.path)
    samples = collect_samples(data, layout, layout_options)
    if max_images is not None and len(samples) > max_images:
        rng = np.random.default_rng(seed)
        samples = [samples[i] for i in sorted(rng.choice(len(samples), max_images, replace=False))]
    if len(samples) < MIN_IMAGES:
        raise LeukoError(f"adaptation needs at least {MIN_IMAGES} images of the new lab; {data} has {len(samples)}")
    model.to(dev)

    cfg = load_config(run.config)
    model_input = ModelInput.from_meta(card.input.model_dump())
    failed: dict[str, str] = {}
    common = {
        "method": method,
        "data": str(Path(data).expanduser().resolve()),
        "layout": layout,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run.path.resolve()),
    }
    if method == "adabn" and card.kind is ModelKind.ENSEMBLE:  # each member's statistics, as each was trained
        seen, n_layers, per_member = 0, 0, []
        for member in model.members:
            seen, n, d = _adabn(member, card, run, cfg.model.freeze, samples, model_input, data, layers=layers,
                                balance=balance, batch_size=batch_size, seed=seed, failed=failed, echo=echo, device=dev)
            n_layers += n
            per_member.append(d)
        details = {"layers": layers, "bn_layers": n_layers, "members": per_member}
    elif method == "adabn":
        seen, n_layers, details = _adabn(model, card, run, cfg.model.freeze, samples, model_input, data, layers=layers,
                                         balance=balance, batch_size=batch_size, seed=seed, failed=failed, echo=echo, device=dev)
    else:
        seen, n_layers, details = _self_train(model, card, cfg, samples, model_input, data, class_map=class_map,
                                              epochs=epochs, keep=keep, seed=seed, failed=failed, echo=echo, device=dev)
    adapted = {**common, "n_images": int(seen), **details}
    review = card.review
    if review:
        review = {**review, "chosen_on": f"{review.get('chosen_on', 'the validation split')} of the source lab, before adaptation"}
    card = card.with_(review=review, adapted=adapted)
    failed_list = sorted(failed.items())
    with derived_run(target, run) as new:
        save_model(new.model, model.cpu(), card)
        if routed:
            shutil.copy2(run.path / HOME_FILE, new.path / HOME_FILE)
            route = run.read_json(ROUTE_FILE)
            route["adapted"] = f"the robust network, by {method} on {common['data']} ({common['date']})"
            new.write_json(ROUTE_FILE, route)
        new.write_json("adapt.json", {**adapted, "failed": failed_list})
    return AdaptResult(target, int(seen), n_layers, failed_list, adapted)


def _device(device: str | None) -> torch.device:
    """``cpu``/``cuda``/``None`` (the GPU when there is one) -> a torch device; a clear error for an unusable one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise LeukoError(f"--device must be cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LeukoError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return torch.device(device)


def _adabn(
    model: nn.Module, card: ModelCard, run: RunFolder, freeze_mode: str, samples: list[Sample], model_input: Any,
    data: str | Path, *, layers: str, balance: bool, batch_size: int, seed: int, failed: dict[str, str],
    echo: Callable[[str], None], device: torch.device,
) -> tuple[int, int, dict[str, Any]]:
    """AdaBN on ``model`` in place: ``(images seen, layers re-estimated, details for the metadata)``."""
    if not batchnorm_layers(model):
        raise LeukoError(f"the model of {run.path} ({card.model.name}) has no BatchNorm layer: AdaBN has nothing to adapt")
    if layers == "trained":
        chosen_layers = trained_batchnorm(model, freeze_mode)
        if not chosen_layers:
            raise LeukoError(
                f"no BatchNorm layer of {run.path.name} was trained (model.freeze={freeze_mode} kept the pretrained "
                "statistics everywhere); use --method self-train, or pass --layers all to re-estimate them on the new lab anyway"
            )
    else:
        chosen_layers = [n for n, _ in batchnorm_layers(model)]
        if freeze_mode.partition(":")[0] == "bn":
            echo(
                f"warning: this model was trained with model.freeze={freeze_mode}, its layers learnt with ImageNet's "
                "BatchNorm statistics; re-estimating them on the new lab undid that robustness on BCCD (docs/robustness.md). "
                "Check the adapted run on a labelled sample before using it."
            )
    n_layers = len(chosen_layers)
    load = sample_loader(samples, model_input)
    rng = np.random.default_rng(seed)
    # equal batches: the cumulative average weights batches, not images, equally
    n_used = len(samples) // batch_size * batch_size if len(samples) >= batch_size else len(samples)
    balance_info: dict[str, Any] | None = None
    if balance:
        pseudo, readable = pseudo_labels(model, samples, model_input, batch_size, failed, device=device)
        if len(readable) < MIN_IMAGES:
            raise LeukoError(f"only {len(readable)} images of {data} could be read; AdaBN needs at least {MIN_IMAGES}")
        classes = list(card.classes)
        source = source_class_counts(run, classes)
        chosen = [readable[int(i)] for i in balanced_draw(pseudo, source, n_used, rng)]
        found = np.bincount(pseudo, minlength=len(classes))
        balance_info = {
            "predicted": {c: int(k) for c, k in zip(classes, found)},
            "source_train": {c: int(k) for c, k in zip(classes, source)},
            "draws": len(chosen),
        }
        echo("new lab's predicted classes (before adaptation): " + ", ".join(f"{c} {k}" for c, k in zip(classes, found) if k))
    else:
        chosen = [int(i) for i in rng.permutation(len(samples))[:n_used]]

    def batches() -> Iterator[np.ndarray]:
        for b in iter_batches(len(chosen), lambda i, buf: load(chosen[i], buf), model_input.shape, batch_size=batch_size):
            failed.update((samples[chosen[i]].key, why) for i, why in b.failed)
            yield b.x

    what = f"a class-balanced resample ({len(chosen)} draws) of" if balance else f"{len(chosen)} images of"
    echo(f"adapting {run.path.name}: {n_layers} BatchNorm layers on {what} {data} (adabn)")
    seen = adapt_batchnorm(model, batches, layers=chosen_layers, device=device)
    if seen < MIN_IMAGES:
        raise LeukoError(f"only {seen} images of {data} could be read; AdaBN needs at least {MIN_IMAGES}")
    return seen, n_layers, {"layers": layers, "bn_layers": n_layers, "balance": balance_info}


def _self_train(
    model: nn.Module, card: ModelCard, cfg: Any, samples: list[Sample], model_input: Any, data: str | Path, *,
    class_map: str | Path | None, epochs: int | None, keep: float | None, seed: int, failed: dict[str, str],
    echo: Callable[[str], None], device: torch.device,
) -> tuple[int, int, dict[str, Any]]:
    """Pseudo-label self-training of ``model`` in place: ``(images read, 0, details for the metadata)``."""
    classes = list(card.classes)
    allowed = list(range(len(classes)))
    excluded: list[str] = []
    if class_map is not None:

        cmap = ClassMap.load(class_map)
        unknown = sorted(set(cmap.exclude) - set(classes))
        if unknown:
            raise LeukoError(f"class map excludes {unknown}, which the model does not have ({classes})")
        excluded = [c for c in classes if c in cmap.exclude]
        allowed = [i for i, c in enumerate(classes) if c not in cmap.exclude]
        if len(allowed) < 2:
            raise LeukoError("the class map leaves fewer than two classes to self-train on")
    epochs = int(epochs if epochs is not None else SELF_TRAIN_DEFAULTS["epochs"])
    keep = float(keep if keep is not None else SELF_TRAIN_DEFAULTS["keep"])
    lr = float(cfg.train.lr) * SELF_TRAIN_DEFAULTS["lr_factor"]
    logits, rows = teacher_logits(model, samples, model_input, 64, failed, device, tta=True)
    if len(rows) < MIN_IMAGES:
        raise LeukoError(f"only {len(rows)} images of {data} could be read; self-training needs at least {MIN_IMAGES}")
    probs = softmax(logits, float(card.temperature))
    idx, labels = confident_selection(probs, keep, allowed)
    kept = [rows[i] for i in idx]
    images = [decode_sample(samples[i], model_input.preprocess) for i in kept]
    found = np.bincount(labels, minlength=len(classes))
    echo("pseudo-labels kept per class: " + ", ".join(f"{classes[c]} {k}" for c, k in enumerate(found) if k)
         + (f" (excluded: {', '.join(excluded)})" if excluded else ""))
    transform = run_transform(cfg.data, model.leuko_info, train=True, seed=seed)  # type: ignore[attr-defined]
    # An ensemble teaches with its averaged answer and each member learns from it: the pseudo-labels are the
    # ensemble's (better than any member's), the students are the networks it averages.
    students = list(model.members) if isinstance(model, Ensemble) else [model]
    echo(f"self-training {len(kept)} of {len(rows)} images of {data}: {epochs} passes, lr {lr:g}, freeze {cfg.model.freeze}"
         + (f", each of the ensemble's {len(students)} members" if len(students) > 1 else ""))
    steps = sum(
        self_train(student, images, labels, transform, freeze_mode=cfg.model.freeze, epochs=epochs, lr=lr,
                   batch_size=min(32, int(cfg.train.batch_size)), weight_decay=float(cfg.train.weight_decay),
                   label_smoothing=float(cfg.train.label_smoothing), seed=seed + i, device=device)
        for i, student in enumerate(students))
    model.eval()
    details = {
        "teacher": ("the ensemble with test-time augmentation; each member self-trained on its pseudo-labels"
                    if len(students) > 1 else "the source model with test-time augmentation"),
        "kept": {classes[c]: int(k) for c, k in enumerate(found) if k},
        "excluded_classes": excluded,
        "class_map": str(class_map) if class_map is not None else None,
        "keep": keep,
        "epochs": epochs,
        "steps": steps,
        "lr": lr,
    }
    return len(rows), 0, details


__all__ = [
    "ADAPT_LAYERS",
    "ADAPT_METHODS",
    "AdaptResult",
    "adapt_batchnorm",
    "adapt_run",
    "balanced_draw",
    "batchnorm_layers",
    "collect_samples",
    "confident_selection",
    "draw_weights",
    "pseudo_labels",
    "self_train",
    "source_class_counts",
    "teacher_logits",
    "trained_batchnorm",
]
