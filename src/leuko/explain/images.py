"""``leuko explain``: Grad-CAM PNGs for image files and folders; unreadable files are named and skipped.

Inputs are gathered exactly as ``leuko predict`` gathers them
(:func:`leuko.infer.predict.collect_images`), so the same arguments work
for both commands. A routed run's images are each explained by the network
that answers them (:class:`~leuko.explain.gradcam.RoutedGradCAM`), named in
``ExplainedImage.network``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from leuko.data.imageio import check_image, load_rgb
from leuko.errors import LeukoError
from leuko.explain.gradcam import explainer_for, explanation_png
from leuko.infer.load import load_predictor
from leuko.infer.predict import collect_images


@dataclass(frozen=True)
class ExplainedImage:
    """One image: its prediction, the explained class and the PNG written."""

    path: Path
    pred: str
    confidence: float
    explained: str
    explained_p: float
    png: Path
    network: str = ""


@dataclass
class ExplainResult:
    """Every PNG written, the files that could not be read (with why), and the layer used."""

    images: list[ExplainedImage]
    failed: list[tuple[str, str]] = field(default_factory=list)
    layer: str = ""
    classes: list[str] = field(default_factory=list)


def _png_name(path: Path, taken: set[str], suffix: str) -> str:
    """``<stem>_gradcam[_<class>].png``, numbered when two inputs share a stem (folders of ``1.png``)."""
    base = f"{path.stem}_gradcam{suffix}"
    name, k = f"{base}.png", 2
    while name in taken:
        name, k = f"{base}-{k}.png", k + 1
    taken.add(name)
    return name


def explain_images(
    model: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    target: str | None = None,
    alpha: float = 0.4,
    device: str | None = None,
) -> ExplainResult:
    """Write a Grad-CAM PNG per image into ``out`` (for the predicted class, or ``target``).

    Args:
        model: a run folder (single-network or routed) or a ``model.pt``.
        inputs: image files and/or folders (searched recursively).
        out: folder for the PNGs (created).
        target: a class name to explain instead of each image's predicted class.
        alpha: heat-map opacity in the overlay.

    Raises:
        LeukoError: no images, unknown class, or an unusable run; unreadable
            images are not errors, they are listed in ``failed``.
    """
    paths = collect_images(inputs)
    explainer = explainer_for(load_predictor(model, device=device))
    wanted = explainer.class_index(target)
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise LeukoError(f"--out {out_dir} is a file; give a folder for the PNGs")
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{target}" if target is not None else ""
    taken: set[str] = set()
    result = ExplainResult([], [], explainer.layer, explainer.classes)
    for p in paths:
        reason = check_image(p, full_decode=True)[1]
        if reason is None:
            try:
                rgb = load_rgb(p)
            except LeukoError as exc:
                reason = str(exc)
        if reason is not None:
            result.failed.append((str(p), reason))
            continue
        exp = explainer.explain_array(rgb, wanted)
        png = out_dir / _png_name(p, taken, suffix)
        explanation_png(exp, alpha=alpha, out=png)
        result.images.append(
            ExplainedImage(p, exp.predicted_name, float(exp.probs[exp.predicted]), exp.class_name, exp.probability, png,
                           exp.network)
        )
    return result
