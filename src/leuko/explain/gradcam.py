"""Grad-CAM (Selvaraju et al., 2017): where in the image the evidence for a class lies.

The class score ``y_c`` (the logit, before softmax and temperature) is
differentiated with respect to the last convolutional feature map ``A``
(``K x h x w``); each channel is weighted by its mean gradient
``alpha_k = mean_ij dy_c/dA_kij`` and the map is ``ReLU(sum_k alpha_k A_k)``:
the places whose activation raises the score. It is mapped back onto the
image the caller gave (undoing the Predictor's resize, padding or crop) and
scaled to ``[0, 1]``.

Design choices, and why:

* **Which layer.** Found by a dry forward pass, not by name: the last module
  whose output is a 4-D tensor, skipping global/adaptive pooling (and
  containers that end in one), preferring maps larger than 1 x 1. That is the
  feature map right before the head for every registry model (timm
  ``bn2``/``layer4``/``features``, torchvision AlexNet ``features`` and
  GoogLeNet ``inception5b``, leuko's ``stages``) and for timm pass-through
  CNNs, without a table to keep up to date.
* **Gradients without touching the model.** The input tensor is made to
  require grad, so the graph reaches the hooked activation even when every
  weight is frozen (``requires_grad=False``); ``torch.autograd.grad`` asks for
  that one gradient only, so no ``.grad`` is written on any parameter and the
  model's mode is restored: a service can explain with the same model it
  predicts with.
* **Exactly the Predictor's preprocessing.** The input is made by
  ``predictor.transform()`` (resize, centre crop, CLAHE, normalisation), so the
  probabilities shown next to a heat map are the ones ``leuko predict`` gives.
* **An ensemble's map is its members' maps summed** (before the ReLU): its
  output is the mean of their scaled logits, so each member's evidence adds
  to the class score, and a map from one member would show a part of it.
* **A routed run explains with the network that answers.** Its two networks
  (:mod:`leuko.infer.route`) see different inputs and use different evidence;
  a map from the other one would explain a prediction nobody made.
  :class:`RoutedGradCAM` asks the run's gate which network answers an image
  (or is told, when an evaluation already recorded it) and returns that
  network's map, naming the network. :func:`explainer_for` picks the class.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from torch import nn

from leuko.errors import LeukoError
from leuko.run.calibration import softmax
from leuko.run.card import ModelKind

if TYPE_CHECKING:
    from leuko.data.transforms import Preprocess
    from leuko.infer.backends import BasePredictor
    from leuko.infer.predictor import Predictor
    from leuko.infer.route import RoutedPredictor

__all__ = [
    "Explanation",
    "GradCAM",
    "RoutedGradCAM",
    "cam_to_image",
    "explainer_for",
    "explanation_png",
    "find_target_layer",
    "input_box",
    "overlay",
]

# Modules that pool a feature map to a fixed size: their output is no longer "where".
_GLOBAL_POOL_NAMES = frozenset(
    {
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool2d",
        "SelectAdaptivePool2d",
        "AdaptiveAvgMaxPool2d",
        "AdaptiveCatAvgMaxPool2d",
        "FastAdaptiveAvgPool",
        "FastAdaptiveMaxPool",
        "FastAdaptiveAvgMaxPool",
        "FastAdaptiveCatAvgMaxPool",
    }
)


# --------------------------------------------------------------------------- the layer


# Modules that hand their input on unchanged at inference (e.g. VGG's ``pre_logits`` once a
# dense head replaced it): never the answer, the module that made the map is.
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or type(module).__name__ in _GLOBAL_POOL_NAMES


def find_target_layer(model: nn.Module, image_size: int, *, device: torch.device | str | None = None) -> str:
    """Dotted name of the module whose output is the model's last convolutional feature map.

    One forward pass of a blank ``image_size`` image records every module's
    output in the order modules *finish*; the answer is the last one with a
    4-D tensor output that is not a global pooling (nor a container returning
    a pooling's output) nor a pass-through (Identity, Dropout), preferring maps larger than 1 x 1 (VGG's fc6/fc7
    "ConvMlp" gives 1 x 1 maps after the real last conv map). Because a
    container finishes after its children, the answer is the outermost module
    ending in that map (``features``, ``layer4``), which is called once even
    when an activation module inside is reused.

    Works on any device, including ``meta`` (shapes only, no memory).

    Raises:
        LeukoError: the model has no 4-D feature map (e.g. a vision transformer).
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    records: list[tuple[str, torch.Tensor]] = []
    pooled: set[int] = set()
    handles = []

    def make_hook(name: str, module: nn.Module) -> Any:
        def hook(_m: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and not isinstance(module, _PASS_THROUGH):
                if _is_global_pool(module):
                    pooled.add(id(output))
                records.append((name, output))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name, module)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, int(image_size), int(image_size), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    candidates = [(n, t) for n, t in records if t.dim() == 4 and id(t) not in pooled]
    if not candidates:
        raise LeukoError(
            f"Grad-CAM needs a convolutional feature map, but {type(model).__name__} has no module with a 4-D output"
        )
    spatial = [(n, t) for n, t in candidates if t.shape[-1] * t.shape[-2] > 1]
    return (spatial or candidates)[-1][0]


# --------------------------------------------------------------------------- geometry


def input_box(
    height: int, width: int, preprocess: Preprocess, *, window: tuple[int, int, int] | None = None,
    fell_back: bool = False,
) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)``: the part of an ``height x width`` image the model input covers.

    The inverse of the deterministic preprocessing geometry
    (:func:`leuko.data.imageio._resize`, then the centre or cell crop of
    :class:`~leuko.data.transforms.Preprocess`), in source pixel units:
    ``stretch`` covers the image; ``pad`` covers a larger square around it
    (the box extends past the image); ``crop``, ``center-crop`` and
    ``cell-crop``/``rbc-crop`` cover a part of it (the rest was never seen). A cell-centred crop
    depends on the image: pass the ``window`` that ``Preprocess.run`` cut (``Preprocessed.window``),
    or ``fell_back=True`` when it found no cell and kept the whole frame.
    """
    d = preprocess.decode_size
    w, h = float(width), float(height)
    if (height, width) == (d, d) or preprocess.resize == "stretch":
        x0, y0, x1, y1 = 0.0, 0.0, w, h
    elif preprocess.resize == "pad":
        side = max(width, height)
        ox, oy = (side - width) // 2, (side - height) // 2
        x0, y0, x1, y1 = -ox, -oy, side - ox, side - oy
    else:  # crop: scale the short side to d, centre-crop d x d
        f = max(d / w, d / h)
        nw, nh = max(d, int(round(w * f))), max(d, int(round(h * f)))
        sx, sy = nw / w, nh / h
        left, top = (nw - d) // 2, (nh - d) // 2
        x0, y0, x1, y1 = left / sx, top / sy, (left + d) / sx, (top + d) / sy
    # the window of the d x d decoded frame that becomes the model input
    if window is not None:
        wl, wt, ws = window
    elif fell_back or getattr(preprocess, "cell_centred", False):
        wl, wt, ws = 0, 0, d
    else:
        s = preprocess.image_size
        wl = wt = (d - s) // 2
        ws = s
    kx, ky = (x1 - x0) / d, (y1 - y0) / d
    return (x0 + wl * kx, y0 + wt * ky, x0 + (wl + ws) * kx, y0 + (wt + ws) * ky)


def cam_to_image(cam: np.ndarray, height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Resample a feature-grid map onto ``height x width`` pixels, the grid spanning ``box``.

    Bilinear; pixels outside ``box`` (cropped away before the model saw them)
    are 0. The result is scaled to ``[0, 1]`` by its maximum (all zeros when
    there is no positive evidence).
    """
    import cv2

    grid = np.ascontiguousarray(cam, dtype=np.float32)
    gh, gw = grid.shape
    x0, y0, x1, y1 = box
    kx, ky = (x1 - x0) / gw, (y1 - y0) / gh
    # grid cell centre (i + 0.5) lands at x0 + (i + 0.5) * kx in continuous pixel units;
    # pixel index j has its centre at j + 0.5.
    m = np.array([[kx, 0.0, x0 + 0.5 * kx - 0.5], [0.0, ky, y0 + 0.5 * ky - 0.5]], dtype=np.float64)
    out = cv2.warpAffine(grid, m, (int(width), int(height)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    out = np.where(inside, np.maximum(out, 0.0), 0.0).astype(np.float32)
    top = float(out.max(initial=0.0))
    return out / top if top > 0 else out


# --------------------------------------------------------------------------- the explainer


@dataclass
class Explanation:
    """A Grad-CAM heat map and the prediction it explains.

    Attributes:
        cam: ``float32 H x W`` in ``[0, 1]`` at the explained image's size.
        class_index: the class whose evidence ``cam`` shows.
        probs: calibrated class probabilities (the Predictor's temperature).
        classes: class names, in output order.
        image: the RGB ``uint8`` image that was explained (for overlays).
        layer: the module the map was taken from.
        network: a routed run's network that answered and was explained
            (``"home"`` or ``"robust"``); empty for a single network.
    """

    cam: np.ndarray
    class_index: int
    probs: np.ndarray
    classes: list[str] = field(default_factory=list)
    image: np.ndarray | None = None
    layer: str = ""
    network: str = ""

    @property
    def predicted(self) -> int:
        """Index of the predicted (most probable) class."""
        return int(np.argmax(self.probs))

    @property
    def class_name(self) -> str:
        return self.classes[self.class_index] if self.classes else str(self.class_index)

    @property
    def predicted_name(self) -> str:
        return self.classes[self.predicted] if self.classes else str(self.predicted)

    @property
    def probability(self) -> float:
        """Calibrated probability of :attr:`class_index`."""
        return float(self.probs[self.class_index])

    def title(self) -> str:
        """``"predicted neutrophil (p = 0.93)"``, plus a line for the explained class when it is another."""
        head = f"predicted {self.predicted_name} (p = {float(self.probs[self.predicted]):.2f})"
        if self.network:
            head += f" by the {self.network} network"
        if self.class_index != self.predicted:
            head += f"\nGrad-CAM for {self.class_name} (p = {self.probability:.2f})"
        return head


class GradCAM:
    """Grad-CAM for a :class:`~leuko.infer.predictor.Predictor`'s model.

    Thread-safe (one explanation at a time per instance, as hooks are
    per-module state), and leaves the model as it found it: same weights,
    same mode, no ``.grad`` on parameters.

    Args:
        predictor: the trained model, its preprocessing, classes and temperature.
        layer: dotted module name to take the map from (default: :func:`find_target_layer`).
    """

    def __init__(self, predictor: Predictor, *, layer: str | None = None) -> None:
        if not isinstance(getattr(predictor, "model", None), nn.Module):
            raise LeukoError(
                "Grad-CAM needs the PyTorch model (a run folder or its model.pt); "
                f"a {getattr(predictor, 'backend', type(predictor).__name__)} predictor has no gradients"
            )
        self.predictor = predictor
        self.model: nn.Module = predictor.model
        self.classes: list[str] = list(predictor.classes)
        self.transform = predictor.transform()
        self.device = torch.device(predictor.device)
        self.layers = _target_layers(self.model, predictor.image_size, layer, self.device)
        self.layer = _describe_layers(self.layers)
        try:
            self._modules = [self.model.get_submodule(name) for name in self.layers]
        except AttributeError:
            raise LeukoError(f"the model has no module {layer!r}") from None
        self._lock = threading.Lock()

    def class_index(self, target: int | str | None) -> int | None:
        """A class given by index or name as an index (``None`` stays ``None``: the predicted class)."""
        if target is None:
            return None
        if isinstance(target, str):
            if target not in self.classes:
                raise LeukoError(f"unknown class {target!r}; the model's classes are {', '.join(self.classes)}")
            return self.classes.index(target)
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
            raise LeukoError(f"target must be a class index or name; got {target!r}")
        idx = int(target)
        if not 0 <= idx < len(self.classes):
            raise LeukoError(f"class index {idx} is out of range; the model has {len(self.classes)} classes")
        return idx

    def explain_array(self, rgb: np.ndarray, target: int | str | None = None) -> Explanation:
        """Explain an RGB ``uint8 H x W x 3`` image; the map has the image's size.

        ``target`` is a class index or name (default: the predicted class).
        """
        image = _check_rgb(rgb)
        return self._explain(image, target)

    def explain_path(self, path: str | Path, target: int | str | None = None) -> Explanation:
        """Explain an image file (decoded at full size; unreadable files raise LeukoError)."""
        from leuko.data.imageio import load_rgb

        return self.explain_array(load_rgb(Path(path)), target)

    # -- the core ------------------------------------------------------------------
    def _model_input(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """The Predictor's input tensor for ``image`` and the image region it covers."""
        pre = self.transform.preprocess
        run = getattr(pre, "run", None)  # preprocessing that also says where it cropped (cell-/rbc-crop)
        if run is None:
            return self.transform(image), input_box(image.shape[0], image.shape[1], pre)
        done = run(image)
        box = input_box(image.shape[0], image.shape[1], pre, window=getattr(done, "window", None),
                        fell_back=bool(getattr(done, "fell_back", False)))
        return self.transform.from_preprocessed(done.image), box

    def _explain(self, image: np.ndarray, target: int | str | None) -> Explanation:
        wanted = self.class_index(target)
        x, box = self._model_input(image)
        maps, logits = self._forward_backward(x, wanted)
        size = max((a.shape[-2:] for a, _ in maps), key=lambda hw: hw[0] * hw[1])
        total = torch.zeros(size, dtype=torch.float32, device=maps[0][0].device)
        for activation, grad in maps:  # one per network: an ensemble's members add their evidence
            weights = grad.mean(dim=(1, 2))  # alpha_k: global-average-pooled gradients
            term = (weights[:, None, None] * activation).sum(0)
            if term.shape != total.shape:
                term = torch.nn.functional.interpolate(term[None, None], size=tuple(size), mode="bilinear",
                                                       align_corners=False)[0, 0]
            total = total + term
        grid = torch.relu(total).cpu().numpy()
        probs = softmax(logits, self.predictor.temperature)
        cls = int(np.argmax(probs)) if wanted is None else wanted
        cam = cam_to_image(grid, image.shape[0], image.shape[1], box)
        return Explanation(cam=cam, class_index=cls, probs=probs, classes=self.classes, image=image, layer=self.layer)

    def _forward_backward(self, x: torch.Tensor, target: int | None
                          ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
        """``([(A, dy_c/dA) per hooked layer], logits)`` for one preprocessed image, without touching the model's state."""
        captured: dict[int, torch.Tensor] = {}

        def make_hook(i: int) -> Any:
            def hook(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                captured[i] = output
                # Later in-place ops (ReLU(inplace=True), x += shortcut) must not rewrite
                # the tensor we differentiate against: hand the rest of the net a copy.
                return output.clone()
            return hook

        with self._lock:
            handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self._modules)]
            was_training = self.model.training
            try:
                self.model.eval()
                with torch.inference_mode(False), torch.enable_grad():
                    inp = x.unsqueeze(0).to(self.device).contiguous(memory_format=torch.channels_last)
                    inp.requires_grad_(True)  # reaches A even when every weight is frozen
                    logits = self.model(inp)
                    missing = [self.layers[i] for i in range(len(self._modules)) if i not in captured]
                    if missing:
                        raise LeukoError(f"layer {missing[0]!r} was not used by the model's forward pass")
                    index = int(logits[0].argmax()) if target is None else target
                    acts = [captured[i] for i in range(len(self._modules))]
                    grads = torch.autograd.grad(logits[0, index], acts)
            finally:
                for handle in handles:
                    handle.remove()
                self.model.train(was_training)
        maps = [(a[0].detach().float(), g[0].float()) for a, g in zip(acts, grads)]
        return maps, logits[0].detach().float().cpu().numpy()


def _target_layers(model: nn.Module, image_size: int, layer: str | None, device: torch.device) -> list[str]:
    """The module(s) to take the map from: ``layer``, or :func:`find_target_layer`'s choice; for an
    :class:`~leuko.models.ensemble.Ensemble`, that layer in every member."""
    from leuko.models.ensemble import Ensemble

    if isinstance(model, Ensemble):
        return [f"members.{i}.{layer or find_target_layer(m, image_size, device=device)}"
                for i, m in enumerate(model.members)]
    return [layer or find_target_layer(model, image_size, device=device)]


def _describe_layers(layers: list[str]) -> str:
    """``bn2``; ``members.*.bn2`` for an ensemble whose members share the layer name."""
    if len(layers) == 1:
        return layers[0]
    tails = {name.split(".", 2)[2] for name in layers}
    return f"members.*.{tails.pop()}" if len(tails) == 1 else "; ".join(layers)


class RoutedGradCAM:
    """Grad-CAM for a routed run: each image explained by the network that answers it.

    Same interface as :class:`GradCAM` (``classes``, ``layer``,
    ``class_index``, ``explain_array``, ``explain_path``); every
    :class:`Explanation` names its network. The choice costs one routed
    prediction of the image (the gate's smear view and, for images in the
    home lab's envelope, the home network's energy check); pass ``network``
    when it is already known, e.g. from an evaluation's ``answered_by``.

    Args:
        predictor: the routed run (:class:`~leuko.infer.route.RoutedPredictor`).
        layer: a module name to use in both networks (default: each network's
            own :func:`find_target_layer`).
    """

    def __init__(self, predictor: "RoutedPredictor", *, layer: str | None = None) -> None:
        self.predictor = predictor
        self.networks: dict[str, GradCAM] = {
            "home": GradCAM(predictor.home, layer=layer),
            "robust": GradCAM(predictor.robust, layer=layer),
        }
        self.classes: list[str] = list(predictor.classes)
        layers = {name: g.layer for name, g in self.networks.items()}
        self.layer = layers["home"] if len(set(layers.values())) == 1 else "; ".join(f"{k} {v}" for k, v in layers.items())

    def class_index(self, target: int | str | None) -> int | None:
        return self.networks["robust"].class_index(target)

    def answering(self, rgb: np.ndarray) -> str:
        """The network that answers ``rgb`` (``"home"`` or ``"robust"``), as the routed predictor decides it for
        these pixels (``leuko predict`` decodes JPEG files at a reduced draft size first, so an image on the
        gate's edge may go the other way there)."""
        pred = self.predictor.predict_arrays([_check_rgb(rgb)], ["image"])
        if not pred.answered_by:
            why = pred.failed[0][1] if pred.failed else "no prediction"
            raise LeukoError(f"the routed run cannot read this image: {why}")
        return pred.answered_by[0]

    def explain_array(self, rgb: np.ndarray, target: int | str | None = None, *, network: str | None = None
                      ) -> Explanation:
        """Explain ``rgb`` with the network that answers it (or ``network``, ``"home"``/``"robust"``)."""
        image = _check_rgb(rgb)
        name = self.answering(image) if network is None else network
        if name not in self.networks:
            raise LeukoError(f"a routed run's networks are home and robust; got {name!r}")
        exp = self.networks[name]._explain(image, target)
        exp.network = name
        return exp

    def explain_path(self, path: str | Path, target: int | str | None = None) -> Explanation:
        """Explain an image file (decoded at full size; unreadable files raise LeukoError)."""
        from leuko.data.imageio import load_rgb

        return self.explain_array(load_rgb(Path(path)), target)


EXPLAINERS: dict[ModelKind, type] = {
    ModelKind.NETWORK: GradCAM,
    ModelKind.ENSEMBLE: GradCAM,  # the members' maps summed before the ReLU
    ModelKind.ROUTED: RoutedGradCAM,  # the answering network's map
}
"""The explainer of each model kind (the card's ``kind``; :data:`leuko.infer.load.PREDICTORS` is its twin)."""


def explainer_for(predictor: "BasePredictor", *, layer: str | None = None) -> "GradCAM | RoutedGradCAM":
    """The Grad-CAM of a predictor, chosen by its card's kind (:data:`EXPLAINERS`); a predictor without a
    PyTorch model (ONNX) is refused in one line by :class:`GradCAM`."""
    try:
        cls = EXPLAINERS[predictor.kind]
    except KeyError:
        raise LeukoError(f"leuko cannot explain a {predictor.kind} model") from None
    return cls(predictor, layer=layer)


def _check_rgb(rgb: Any) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise LeukoError(f"expected an RGB uint8 H x W x 3 image; got dtype {a.dtype}, shape {tuple(a.shape)}")
    return a


# --------------------------------------------------------------------------- pictures


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The image with the heat map (jet colour map) blended in: ``(1 - alpha) * rgb + alpha * heat``."""
    from matplotlib import colormaps

    image = _check_rgb(rgb)
    c = np.asarray(cam, dtype=np.float32)
    if c.shape != image.shape[:2]:
        raise LeukoError(f"cam has shape {c.shape} but the image is {image.shape[0]} x {image.shape[1]}")
    if not 0.0 <= alpha <= 1.0:
        raise LeukoError(f"alpha must be in [0, 1]; got {alpha}")
    heat = colormaps["jet"](np.clip(c, 0.0, 1.0))[..., :3] * 255.0
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def explanation_png(
    explanation: Explanation,
    *,
    image: np.ndarray | None = None,
    alpha: float = 0.4,
    title: str | None = None,
    out: str | Path | BinaryIO | None = None,
) -> bytes:
    """A PNG with the image, the heat-map overlay and the prediction as title.

    ``image`` defaults to the explained image; ``title`` to
    :meth:`Explanation.title`. The bytes are returned (what a web service
    sends), and also written to ``out`` when given.
    """
    from leuko.evaluate.figures import plot_gradcam_grid

    rgb = explanation.image if image is None else image
    if rgb is None:
        raise LeukoError("explanation_png needs the image: the explanation carries none, pass image=")
    buf = io.BytesIO()
    plot_gradcam_grid(
        [[rgb, overlay(rgb, explanation.cam, alpha)]],
        [explanation.title() if title is None else title],
        buf,
        ncols=1,
        panel_titles=["image", f"Grad-CAM: {explanation.class_name}"],
    )
    data = buf.getvalue()
    if isinstance(out, (str, Path)):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)
    elif out is not None:
        out.write(data)
    return data

