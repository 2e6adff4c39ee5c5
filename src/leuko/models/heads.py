"""Classification heads and how to put them on a backbone.

The studies this project reproduces used three heads on ImageNet backbones:

* ``linear``       - the backbone's own final fully connected layer, re-sized to
  the number of classes. For AlexNet/VGG this keeps their two-layer
  4096-unit classifier MLP ("fc6/fc7") and replaces only the last Linear, as
  those papers did.
* ``dense128``     - GAP -> Linear(128) -> ReLU -> [Dropout] -> Linear(classes).
* ``bn-dense256``  - GAP -> BatchNorm1d -> Linear(256) -> ReLU -> Dropout(0.4)
  -> Linear(classes).

The global average pooling ("GAP") is the backbone's own (timm's
``global_pool``, torchvision's ``avgpool``); a head module only ever sees a
flat ``(N, features)`` tensor. For the dense heads the features are the pooled
*convolutional* features, so AlexNet/VGG drop their MLP for them.

Heads are installed in place, at the backbone's own classifier attribute, so a
built model is still a plain timm/torchvision module (``forward_features``,
``get_classifier``, Grad-CAM target layers and ImageNet state-dict keys all
keep working). :func:`attach_head` returns where the head lives so training
code can give it its own learning rate.

``num_classes=0`` installs no head (``nn.Identity``): the model returns the
features the chosen head would have received (timm's feature-extractor
convention).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from leuko.errors import LeukoError

__all__ = ["HEAD_KINDS", "AttachedHead", "attach_head", "check_head", "make_head"]

HEAD_KINDS: tuple[str, ...] = ("linear", "dense128", "bn-dense256")

_BN_DENSE_DROPOUT = 0.4


@dataclass(frozen=True)
class AttachedHead:
    """Where a head was installed.

    Attributes:
        kind: one of :data:`HEAD_KINDS`.
        path: dotted module path of the head inside the model (``"classifier"``,
            ``"fc"``, ``"classifier.6"``...); its parameters are the "head" of
            :func:`leuko.models.split_params`.
        in_features: width of the pooled features the head receives.
        num_classes: outputs of the head (0: feature extractor).
    """

    kind: str
    path: str
    in_features: int
    num_classes: int


def check_head(head: str) -> str:
    """Validate a head name (case-insensitive, ``_`` accepted for ``-``)."""
    key = str(head).strip().lower().replace("_", "-")
    if key not in HEAD_KINDS:
        raise LeukoError(f"head={head!r} is not valid; choose one of: {', '.join(HEAD_KINDS)}")
    return key


def make_head(kind: str, in_features: int, num_classes: int, dropout: float | None = None) -> nn.Module:
    """Build a head module mapping ``(N, in_features)`` to ``(N, num_classes)``.

    ``dropout`` is the rate of the dense heads' Dropout (``dense128``: none by
    default, ``bn-dense256``: 0.4 by default). For ``linear`` it is ignored
    here: the dropout before a linear classifier belongs to the backbone
    (timm ``drop_rate``, torchvision's classifier Dropouts).
    """
    kind = check_head(kind)
    if num_classes == 0:
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "dense128":
        drop: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()
        return nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(in_features, 128),
                act=nn.ReLU(inplace=True),
                drop=drop,
                fc=nn.Linear(128, num_classes),
            )
        )
    rate = _BN_DENSE_DROPOUT if dropout is None else dropout
    return nn.Sequential(
        OrderedDict(
            norm=nn.BatchNorm1d(in_features),
            fc1=nn.Linear(in_features, 256),
            act=nn.ReLU(inplace=True),
            drop=nn.Dropout(rate),
            fc=nn.Linear(256, num_classes),
        )
    )


def attach_head(model: nn.Module, kind: str, num_classes: int, dropout: float | None = None) -> AttachedHead:
    """Install a head on ``model`` in place and say where it went.

    Dispatches on the model's structure, not its name, so timm pass-through
    models work too: timm-style models (``reset_classifier``), torchvision
    "classifier stack" models (AlexNet/VGG: ``features``/``avgpool``/
    ``classifier`` ending in a Linear) and torchvision ``fc`` models
    (GoogLeNet, ResNet, Inception).

    A ``linear`` head whose size already matches (e.g. 1000 ImageNet classes
    after loading pretrained weights) is kept, so the pretrained classifier
    survives when it is what was asked for.
    """
    kind = check_head(kind)
    if hasattr(model, "reset_classifier") and hasattr(model, "num_features"):
        return _attach_timm(model, kind, num_classes, dropout)
    if isinstance(getattr(model, "classifier", None), nn.Sequential) and hasattr(model, "features"):
        return _attach_classifier_stack(model, kind, num_classes, dropout)
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return _attach_fc(model, kind, num_classes, dropout)
    raise LeukoError(
        f"cannot attach head {kind!r} to {type(model).__name__}: it has no timm classifier, "
        "torchvision 'classifier' stack or 'fc' layer"
    )


# -- timm-style models ---------------------------------------------------------


def _timm_classifier_path(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if not isinstance(path, str):
        raise LeukoError(
            f"{type(model).__name__} has no single classifier layer (classifier={path!r}); use head='linear'"
        )
    return path


def _attach_timm(model: nn.Module, kind: str, num_classes: int, dropout: float | None) -> AttachedHead:
    path = _timm_classifier_path(model)
    if kind == "linear":
        current = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not (isinstance(current, nn.Linear) and current.out_features == num_classes):
            model.reset_classifier(num_classes)
        in_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
        return AttachedHead(kind, path, in_features, num_classes)
    model.reset_classifier(0)
    if _has_conv_mlp_pre_logits(model):
        # VGG: the dense heads sit on GAP of the conv features, not on the fc6/fc7 MLP.
        model.pre_logits = nn.Identity()
        model.head_hidden_size = model.num_features
    in_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    model.set_submodule(path, make_head(kind, in_features, num_classes, dropout))
    model.num_classes = num_classes
    return AttachedHead(kind, path, in_features, num_classes)


def _has_conv_mlp_pre_logits(model: nn.Module) -> bool:
    """True for timm VGGs, whose ``pre_logits`` is the fc6/fc7 MLP (as convolutions) before pooling."""
    from timm.models.vgg import VGG

    return isinstance(model, VGG) and isinstance(getattr(model, "pre_logits", None), nn.Module)


# -- torchvision models --------------------------------------------------------


def _last_conv_channels(features: nn.Module) -> int:
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise LeukoError("cannot attach a dense head: the backbone has no convolution in 'features'")
    return convs[-1].out_channels


def _attach_classifier_stack(
    model: nn.Module, kind: str, num_classes: int, dropout: float | None
) -> AttachedHead:
    """AlexNet/VGG (torchvision): ``linear`` swaps the stack's last Linear, dense heads replace the stack."""
    stack: nn.Sequential = model.classifier  # type: ignore[assignment]
    if kind == "linear":
        idx = max(i for i, m in enumerate(stack) if isinstance(m, nn.Linear))
        last: nn.Linear = stack[idx]  # type: ignore[assignment]
        if dropout is not None:
            for m in stack:
                if isinstance(m, nn.Dropout):
                    m.p = dropout
        if num_classes == 0:
            stack[idx] = nn.Identity()
        elif last.out_features != num_classes:
            stack[idx] = nn.Linear(last.in_features, num_classes)
        return AttachedHead(kind, f"classifier.{idx}", last.in_features, num_classes)
    in_features = _last_conv_channels(model.features)  # type: ignore[arg-type]
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = make_head(kind, in_features, num_classes, dropout)
    return AttachedHead(kind, "classifier", in_features, num_classes)


def _attach_fc(model: nn.Module, kind: str, num_classes: int, dropout: float | None) -> AttachedHead:
    """GoogLeNet-style models: pooled features -> (dropout) -> ``fc``."""
    fc: nn.Linear = model.fc  # type: ignore[assignment]
    in_features = fc.in_features
    model_drop = getattr(model, "dropout", None)
    if kind == "linear":
        if dropout is not None and isinstance(model_drop, nn.Dropout):
            model_drop.p = dropout
        if num_classes == 0:
            model.fc = nn.Identity()
        elif fc.out_features != num_classes:
            model.fc = nn.Linear(in_features, num_classes)
        return AttachedHead(kind, "fc", in_features, num_classes)
    if isinstance(model_drop, nn.Dropout):
        model.dropout = nn.Identity()  # the dense heads carry their own dropout
    model.fc = make_head(kind, in_features, num_classes, dropout)
    return AttachedHead(kind, "fc", in_features, num_classes)
