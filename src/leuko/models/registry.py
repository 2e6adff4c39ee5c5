"""Model registry: names -> backbone constructors + the data config each model expects.

Modelled on timm's ``_registry``/``_builder``: a model is registered once by
name with what it needs to be built (source library, architecture, extra
constructor arguments) and a :class:`ModelInfo` saying what its inputs must
look like (size, mean/std, interpolation, crop). Data transforms are resolved
from ``model_info(name)`` (or ``model.leuko_info``), never hard-coded, so a
model trained at 128 px with Lite normalisation is served the same way.

Twelve names are registered (see :func:`list_models`). Any other timm model
name (``"convnext_tiny"``, ``"resnet50.a1_in1k"``...) passes through to timm
with its own pretrained config. A timm architecture that a registered name
wraps (``"tf_efficientnet_lite0"``, ``"mobilenetv2_100"``) resolves to that
registered entry, so it gets the same normalisation and bundled weights.

:func:`build_model` is the one way models are made:
validate -> construct (+ ImageNet/bundled weights) -> attach head -> load a
local file (if given) -> tag the module with ``leuko_info``/``leuko_build``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from leuko.errors import LeukoError
from leuko.models.custom import CompactCNN
from leuko.models.info import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, ModelInfo
from leuko.models.heads import attach_head, check_head
from leuko.models.weights import (
    BUNDLED,
    LoadReport,
    PretrainedChoice,
    ensure_imagenet_reachable,
    imagenet_download_errors,
    load_bundled,
    load_weights_file,
    parse_pretrained,
    timm_cached_weights,
    torch_hub_cached,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "BuildRecord",
    "ModelInfo",
    "ModelSpec",
    "build_model",
    "list_models",
    "model_info",
    "register_model",
    "registered_names",
]

@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a model and what to override in its timm-derived info.

    Attributes:
        name: registry key.
        source: ``"timm"``, ``"torchvision"`` or ``"leuko"``.
        arch: architecture name in that source.
        family: architecture family.
        info: ModelInfo fields to set/override (timm models inherit the rest
            from timm's pretrained config; others must give them all).
        create_kwargs: constructor arguments always passed.
        scratch_kwargs: constructor arguments passed only without ImageNet weights.
    """

    name: str
    source: str
    arch: str
    family: str
    info: Mapping[str, Any] = field(default_factory=dict)
    create_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scratch_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildRecord:
    """How a model was built; stored as ``model.leuko_build`` so a run folder can rebuild it.

    ``head_path`` names the head module (its parameters are the "head" of
    :func:`leuko.models.split_params`); ``num_features`` is the width of the
    pooled features the head receives (the embedding size with num_classes=0).
    """

    name: str
    arch: str
    num_classes: int
    head: str
    dropout: float | None
    pretrained: str
    head_path: str
    num_features: int
    load_report: LoadReport
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict; ``load_report`` becomes its one-line summary."""
        data = asdict(self)
        data["load_report"] = self.load_report.summary()
        data["kwargs"] = dict(self.kwargs)
        return data


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (names are unique, lower-case, ``_`` separated)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    if spec.source not in _CREATORS:
        raise ValueError(f"unknown source {spec.source!r}; expected one of {sorted(_CREATORS)}")
    _REGISTRY[spec.name] = spec
    model_info.cache_clear()
    return spec


def registered_names() -> list[str]:
    """Registered model names, in registration order."""
    return list(_REGISTRY)


# -- resolving names to ModelInfo -------------------------------------------------------


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _unknown(name: str) -> LeukoError:
    return LeukoError(
        f"unknown model {name!r}; registered: {', '.join(_REGISTRY)}; any timm model name "
        "(timm.list_models()) is also accepted"
    )


def _timm_cfg(arch: str, name: str) -> Any:
    import timm

    try:
        return timm.get_pretrained_cfg(arch)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag "resnet50.foo"
        raise LeukoError(f"model {name!r}: {exc}") from exc


def _info_from_timm(name: str, arch: str, family: str, registered: bool, overrides: Mapping[str, Any]) -> ModelInfo:
    cfg = _timm_cfg(arch, name)
    base_arch = arch.split(".")[0]
    has_imagenet = bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))
    values: dict[str, Any] = {
        "name": name,
        "arch": arch,
        "source": "timm",
        "family": family,
        "input_size": tuple(cfg.input_size) if cfg else (3, 224, 224),
        "mean": tuple(cfg.mean) if cfg else IMAGENET_MEAN,
        "std": tuple(cfg.std) if cfg else IMAGENET_STD,
        "interpolation": cfg.interpolation if cfg else "bicubic",
        "crop_pct": float(cfg.crop_pct) if cfg else 0.875,
        "bundled": base_arch in BUNDLED,
        "imagenet": has_imagenet,
        "registered": registered,
    }
    values["default_pretrained"] = "bundled" if values["bundled"] else ("imagenet" if has_imagenet else "none")
    values.update(overrides)
    return ModelInfo(**values)


@functools.lru_cache(maxsize=None)
def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered name or a timm model name (LeukoError if neither)."""
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name))
    key = _normalise(name)
    spec = _REGISTRY.get(key) or next((s for s in _REGISTRY.values() if s.arch == name.strip()), None)
    if spec is not None:
        if spec.source == "timm":
            return _info_from_timm(spec.name, spec.arch, spec.family, True, spec.info)
        return ModelInfo(name=spec.name, arch=spec.arch, source=spec.source, family=spec.family, **spec.info)
    import timm

    if not timm.is_model(name.strip()):
        raise _unknown(name)
    arch = name.strip()
    return _info_from_timm(arch, arch, "timm", False, {})


def list_models(include_params: bool = False) -> list[dict[str, Any]]:
    """One dict per registered model (name, family, source, arch, input size, mean/std, pretrained...).

    ``include_params`` adds ``params`` (backbone with a 1000-class linear
    head), counted on the ``meta`` device so it costs no memory or init time.
    """
    rows = []
    for name in _REGISTRY:
        row = model_info(name).to_dict()
        row.pop("registered")
        if include_params:
            row["params"] = _count_params(name)
        rows.append(row)
    return rows


def _count_params(name: str) -> int:
    info = model_info(name)
    with torch.device("meta"):
        model, _ = _CREATORS[info.source](info, PretrainedChoice("none"), "linear", None, {})
    return sum(p.numel() for p in model.parameters())


# -- constructing backbones ----------------------------------------------------------

Creator = Callable[[ModelInfo, PretrainedChoice, str, "float | None", dict[str, Any]], "tuple[nn.Module, LoadReport]"]


def _spec_kwargs(info: ModelInfo, choice: PretrainedChoice, kwargs: dict[str, Any]) -> dict[str, Any]:
    spec = _REGISTRY.get(info.name) if info.registered else None
    merged: dict[str, Any] = {}
    if spec is not None:
        merged.update(spec.create_kwargs)
        if choice.kind != "imagenet":
            merged.update(spec.scratch_kwargs)
    merged.update(kwargs)
    return merged


def _create_timm(
    info: ModelInfo, choice: PretrainedChoice, head: str, dropout: float | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    """timm backbone with its own (ImageNet-sized) classifier; the head is attached afterwards."""
    import timm

    kwargs = _spec_kwargs(info, choice, kwargs)
    if head == "linear" and dropout is not None:
        kwargs.setdefault("drop_rate", dropout)  # timm's dropout before its classifier
    if choice.kind == "imagenet":
        cfg = _timm_cfg(info.arch, info.name)
        cached = timm_cached_weights(cfg)
        url = cfg.url
        if cfg.hf_hub_id:
            from huggingface_hub import constants

            url = f"{constants.ENDPOINT}/{cfg.hf_hub_id}"
        ensure_imagenet_reachable(info.name, url, cached)
        overlay = {"file": str(cached)} if cached else None
        with imagenet_download_errors(info.name):
            model = timm.create_model(info.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return model, LoadReport(f"imagenet:{cfg.hf_hub_id or cfg.url}", len(model.state_dict()))
    model = timm.create_model(info.arch, pretrained=False, **kwargs)
    if choice.kind == "bundled":
        return model, load_bundled(model, info.arch.split(".")[0])
    return model, LoadReport("none", 0)


def _create_torchvision(
    info: ModelInfo, choice: PretrainedChoice, head: str, dropout: float | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    import torchvision

    kwargs = _spec_kwargs(info, choice, kwargs)
    if choice.kind == "imagenet":
        weights = torchvision.models.get_model_weights(info.arch).DEFAULT
        ensure_imagenet_reachable(info.name, weights.url, torch_hub_cached(weights.url))
        with imagenet_download_errors(info.name):
            model = torchvision.models.get_model(info.arch, weights=weights, **kwargs)
        return model, LoadReport(f"imagenet:{weights.url}", len(model.state_dict()))
    return torchvision.models.get_model(info.arch, weights=None, **kwargs), LoadReport("none", 0)


_LEUKO_MODELS: dict[str, Callable[..., nn.Module]] = {"compact_cnn": CompactCNN}


def _create_leuko(
    info: ModelInfo, choice: PretrainedChoice, head: str, dropout: float | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, LoadReport]:
    kwargs = _spec_kwargs(info, choice, kwargs)
    if head == "linear" and dropout is not None:
        kwargs.setdefault("drop_rate", dropout)
    return _LEUKO_MODELS[info.arch](**kwargs), LoadReport("none", 0)


_CREATORS: dict[str, Creator] = {"timm": _create_timm, "torchvision": _create_torchvision, "leuko": _create_leuko}


# -- the public builder ----------------------------------------------------------------


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise LeukoError(f"num_classes={num_classes!r} is not valid; use an integer >= 1 (or 0 for a feature extractor)")
    return num_classes


def _check_dropout(dropout: Any) -> float | None:
    if dropout is None:
        return None
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise LeukoError(f"dropout={dropout!r} is not valid; use a number in [0, 1) or None for the head's default")
    return float(dropout)


def build_model(
    name: str,
    num_classes: int,
    pretrained: str | os.PathLike[str] | None = None,
    head: str = "linear",
    dropout: float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier (or, with ``num_classes=0``, a pooled feature extractor).

    Args:
        name: a registered name (:func:`registered_names`) or any timm model name.
        num_classes: outputs of the head; 0 returns the pooled features the head
            would receive (timm convention; width in ``model.leuko_build.num_features``).
        pretrained: ``"none"``, ``"imagenet"``, ``"bundled"`` (EfficientNet-Lite
            0/1/2, works offline), a path to a ``.pth``/``.safetensors`` file, or
            ``None`` for the model's ``default_pretrained``.
        head: ``"linear"``, ``"dense128"`` or ``"bn-dense256"`` (see :mod:`leuko.models.heads`).
        dropout: dropout rate of the head (None: the head's default).
        **kwargs: passed to the timm/torchvision/leuko constructor (e.g. ``drop_path_rate``).

    Returns:
        The model (a plain timm/torchvision/leuko module, in train mode) with
        ``model.leuko_info`` (:class:`ModelInfo`) and ``model.leuko_build``
        (:class:`BuildRecord`, including the weight :class:`LoadReport`).

    Raises:
        LeukoError: unknown name, bad argument, weights unavailable (offline) or unreadable.
    """
    info = model_info(name)
    num_classes = _check_num_classes(num_classes)
    kind = check_head(head)
    dropout = _check_dropout(dropout)
    choice = parse_pretrained(pretrained, info)
    try:
        model, report = _CREATORS[info.source](info, choice, kind, dropout, dict(kwargs))
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise LeukoError(f"model {info.name!r} does not accept {sorted(kwargs)}: {exc}") from exc
    attached = attach_head(model, kind, num_classes, dropout)
    if choice.kind == "file":
        assert choice.path is not None
        report = load_weights_file(model, choice.path)
    model.leuko_info = info
    model.leuko_build = BuildRecord(
        name=info.name,
        arch=info.arch,
        num_classes=num_classes,
        head=kind,
        dropout=dropout,
        pretrained=str(choice),
        head_path=attached.path,
        num_features=attached.in_features,
        load_report=report,
        kwargs=dict(kwargs),
    )
    return model


# -- the registered models ------------------------------------------------------------

_TORCHVISION_INFO: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "default_pretrained": "imagenet",
}

for _spec in (
    ModelSpec("alexnet", "torchvision", "alexnet", "alexnet", info=_TORCHVISION_INFO),
    ModelSpec(
        "googlenet",
        "torchvision",
        "googlenet",
        "inception",
        info=_TORCHVISION_INFO,
        # transform_input always on, so the architecture is identical with or
        # without ImageNet weights; no auxiliary classifiers (training returns one
        # tensor) - torchvision drops them itself after loading ImageNet weights.
        create_kwargs={"transform_input": True},
        scratch_kwargs={"aux_logits": False, "init_weights": True},
    ),
    # torchvision's ResNet-50 weights (classic recipe, as in the studies) via timm.
    ModelSpec("resnet50", "timm", "resnet50.tv_in1k", "resnet"),
    ModelSpec("vgg16", "timm", "vgg16", "vgg"),
    ModelSpec("mobilenetv2", "timm", "mobilenetv2_100", "mobilenet"),
    ModelSpec("densenet201", "timm", "densenet201", "densenet"),
    ModelSpec("inception_resnet_v2", "timm", "inception_resnet_v2", "inception"),
    ModelSpec("efficientnet_b3", "timm", "efficientnet_b3", "efficientnet"),
    *(
        ModelSpec(
            f"efficientnet_lite{i}",
            "timm",
            f"tf_efficientnet_lite{i}",
            "efficientnet-lite",
            info={"mean": LITE_MEAN, "std": LITE_STD},
        )
        for i in (0, 1, 2)
    ),
    ModelSpec(
        "custom_cnn",
        "leuko",
        "compact_cnn",
        "custom",
        info={
            "input_size": (3, 128, 128),
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "default_pretrained": "none",
            "imagenet": False,
        },
    ),
):
    register_model(_spec)
