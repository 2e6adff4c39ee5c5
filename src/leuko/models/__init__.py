"""Models: a registry of backbones, classification heads, pretrained weights and freezing.

Typical use::

    from leuko.models import build_model, freeze, split_params

    model = build_model("efficientnet_lite0", num_classes=8)    # bundled ImageNet weights
    info = model.leuko_info                  # input_size, mean, std... for the transforms
    freeze(model, "last:2")                   # head + last two blocks train
    backbone, head = split_params(model)      # e.g. head at 10x the backbone learning rate

``build_model(name, 0)`` is a pooled-feature extractor (embeddings). Every
user-caused problem raises :class:`leuko.errors.LeukoError` with one line.
"""

from __future__ import annotations

from leuko.models.custom import CompactCNN
from leuko.models.freeze import (
    FREEZE_MODES,
    FreezeSummary,
    backbone_blocks,
    freeze,
    get_classifier_params,
    head_path,
    split_params,
)
from leuko.models.heads import HEAD_KINDS, AttachedHead, attach_head, make_head
from leuko.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    BuildRecord,
    ModelInfo,
    ModelSpec,
    build_model,
    list_models,
    model_info,
    register_model,
    registered_names,
)
from leuko.models.weights import (
    PRETRAINED_KEYWORDS,
    LoadReport,
    convert_efficientnet_pytorch,
    load_weights_file,
    read_state_dict,
)

__all__ = [
    "FREEZE_MODES",
    "HEAD_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "PRETRAINED_KEYWORDS",
    "AttachedHead",
    "BuildRecord",
    "CompactCNN",
    "FreezeSummary",
    "LoadReport",
    "ModelInfo",
    "ModelSpec",
    "attach_head",
    "backbone_blocks",
    "build_model",
    "convert_efficientnet_pytorch",
    "freeze",
    "get_classifier_params",
    "head_path",
    "list_models",
    "load_weights_file",
    "make_head",
    "model_info",
    "read_state_dict",
    "register_model",
    "registered_names",
    "split_params",
]
