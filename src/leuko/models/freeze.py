"""Which parameters train: head/backbone split, freezing modes and the notion of a "block".

Transfer-learning recipes differ mostly in what they leave trainable, so the
choice is one declarative call, :func:`freeze`, made after :func:`build_model`
and *before* the optimizer is created (frozen parameters have
``requires_grad=False`` and are left out by :func:`split_params`).

Blocks
------
A *block* is one of the backbone's ordered parameter groups, from input to
output, that ``freeze("last:N")`` counts from the output end:

* timm models (and ``custom_cnn``): the groups of the model's own
  ``group_matcher(coarse=True)`` - the unit timm uses for layer-wise
  learning-rate decay. The stem is the first block; typically one block per
  stage (EfficientNet/MobileNet ``blocks.i``, ResNet ``layerN``, DenseNet dense
  block + transition), per repeated cell (Inception-ResNet) or per conv layer
  (VGG, whose fc6/fc7 MLP is the last block when kept), with final
  ``conv_head``/norm layers folded into the last block.
* other modules (torchvision AlexNet/GoogLeNet): each parameterised child of
  the model, with ``nn.Sequential`` children (``features``, ``classifier``)
  split into their items - AlexNet: conv1..conv5, then fc6, fc7 when the
  linear head keeps them; GoogLeNet: conv1..conv3, inception3a..5b.

The head (``model.leuko_build.head_path``) is never a block and is trainable
in every mode.

Frozen means frozen
-------------------
A frozen BatchNorm layer keeps its running statistics (it always normalises
with them, even in ``model.train()``) and its affine parameters. Freezing only
``requires_grad`` would let the statistics of a "frozen" backbone drift to the
small fine-tuning set, which is the classic silent failure of frozen-backbone
transfer learning in PyTorch (Keras freezes both). The BN modules stay in
place (a forward pre-hook keeps them in eval mode), so state-dict keys and
module types never change and the mode can be switched back.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leuko.errors import LeukoError

__all__ = [
    "FREEZE_MODES",
    "FreezeSummary",
    "backbone_blocks",
    "bn_frozen",
    "freeze",
    "get_classifier_params",
    "head_path",
    "split_params",
]

FREEZE_MODES: tuple[str, ...] = ("none", "backbone", "bn", "bn:N", "last:N")
_LAST_N = re.compile(r"^(last|bn):(\d+)$")


def head_path(model: nn.Module) -> str:
    """Dotted path of the classification head inside ``model``.

    Read from ``model.leuko_build`` (set by :func:`build_model`), else from a
    timm model's pretrained config.
    """
    build = getattr(model, "leuko_build", None)
    if build is not None:
        return build.head_path
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if isinstance(path, str):
        return path
    raise ValueError(f"cannot tell the head of {type(model).__name__}; build it with leuko.models.build_model")


def _in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def get_classifier_params(model: nn.Module, trainable_only: bool = False) -> list[nn.Parameter]:
    """Parameters of the head (e.g. to give them their own learning rate)."""
    head = head_path(model)
    return [
        p for n, p in model.named_parameters() if _in_head(n, head) and (p.requires_grad or not trainable_only)
    ]


def split_params(model: nn.Module, trainable_only: bool = True) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(backbone_params, head_params)`` for two optimizer parameter groups.

    With ``trainable_only`` (default) frozen parameters are left out, so the
    result can go straight into an optimizer after :func:`freeze`.
    """
    head = head_path(model)
    backbone: list[nn.Parameter] = []
    head_params: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        (head_params if _in_head(name, head) else backbone).append(param)
    return backbone, head_params


def _module_prefixes(name: str) -> list[str]:
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _label(names: list[str], per_module: Counter[str]) -> str:
    """A readable name for a block: the smallest modules that hold only its parameters.

    E.g. ``layer3``, ``blocks.6+conv_head+bn2``, ``features.denseblock3+features.transition3``.
    ``per_module`` counts the model's parameters under each module path.
    """
    in_group = Counter(p for n in names for p in _module_prefixes(n))
    tops: list[str] = []
    for name in names:
        covered = next((p for p in _module_prefixes(name) if in_group[p] == per_module[p]), name)
        if covered not in tops:
            tops.append(covered)
    return "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")


def _generic_groups(model: nn.Module) -> list[list[str]]:
    groups: list[list[str]] = []
    own = [n for n, _ in model.named_parameters(recurse=False)]
    if own:
        groups.append(own)
    for child_name, child in model.named_children():
        units = list(child.named_children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else [("", child)]
        for sub_name, unit in units:
            prefix = f"{child_name}.{sub_name}" if sub_name else child_name
            names = [f"{prefix}.{n}" for n, _ in unit.named_parameters()]
            if names:
                groups.append(names)
    return groups


def backbone_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The backbone's blocks, input to output, as ``(label, parameter names)`` (head excluded)."""
    head = head_path(model)
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        raw = list(group_parameters(model, matcher(coarse=True)).values())
    else:
        raw = _generic_groups(model)
    per_module = Counter(p for n, _ in model.named_parameters() for p in _module_prefixes(n))
    blocks = []
    for names in raw:
        kept = [n for n in names if not _in_head(n, head)]
        if kept:
            blocks.append((_label(kept, per_module), kept))
    return blocks


@dataclass(frozen=True)
class FreezeSummary:
    """What :func:`freeze` left trainable."""

    mode: str
    trainable_params: int
    total_params: int
    frozen_bn: int
    blocks: int
    trainable_blocks: tuple[str, ...]

    def __str__(self) -> str:
        shown = ", ".join(self.trainable_blocks[-4:])
        more = "..., " if len(self.trainable_blocks) > 4 else ""
        return (
            f"freeze={self.mode}: {self.trainable_params:,}/{self.total_params:,} parameters trainable; "
            f"{len(self.trainable_blocks)}/{self.blocks} blocks trainable ({more}{shown}) + head; "
            f"{self.frozen_bn} BatchNorm layers frozen"
        )


def _parse_mode(mode: str) -> tuple[str, int]:
    text = str(mode).strip().lower()
    if text in ("none", "backbone", "bn"):
        return text, 0
    match = _LAST_N.match(text)
    if match:
        return match.group(1), int(match.group(2))
    raise LeukoError(
        f"freeze={mode!r} is not valid; choose one of: none, backbone, bn, bn:N, last:N "
        "(N >= 0 backbone blocks trained - or, for bn:N, with their own BatchNorm statistics - counted from the output end)"
    )


def _keep_bn_in_eval(module: nn.Module, args: object) -> None:
    """Forward pre-hook of a frozen BatchNorm: normalise with (and keep) the running statistics."""
    module.training = False


def bn_frozen(bn: nn.Module) -> bool:
    """True when :func:`freeze` froze this BatchNorm layer: its running statistics are the
    pretrained weights' (e.g. ImageNet's), never the training data's."""
    return any(hook is _keep_bn_in_eval for hook in bn._forward_pre_hooks.values())


def _set_bn_frozen(bn: _BatchNorm, frozen: bool, training: bool) -> None:
    hooks = bn._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if hook is _keep_bn_in_eval]:
        del hooks[key]
    if frozen:
        bn.register_forward_pre_hook(_keep_bn_in_eval)
    bn.training = False if frozen else training
    for param in bn.parameters(recurse=False):
        param.requires_grad_(not frozen)


def freeze(model: nn.Module, mode: str) -> FreezeSummary:
    """Set exactly what trains in ``model`` (each call replaces the previous mode).

    Modes:
        ``"none"``: everything trains (BatchNorm statistics update as usual).
        ``"backbone"``: only the head trains; the backbone, including its
            BatchNorm statistics, is frozen.
        ``"bn"``: everything trains except the backbone's BatchNorm layers
            (statistics and affine parameters) - for fine-tuning with small batches,
            and for statistics that belong to no lab (another lab's images are
            normalised as the pretrained weights' were, not as the training lab's).
        ``"bn:N"``: like ``"bn"``, but the BatchNorm layers of the last N
            blocks train (statistics too): the early layers, where stain and
            contrast live, keep the pretrained statistics; the late ones, whose
            features are the cell types', fit the training data. ``bn:0``
            equals ``"bn"``.
        ``"last:N"``: the head and the last N backbone blocks (see module doc)
            train; earlier blocks are frozen like ``"backbone"``. ``last:0`` equals
            ``"backbone"``; N larger than the number of blocks trains everything.

    Call it before creating the optimizer.
    """
    kind, n_last = _parse_mode(mode)
    head = head_path(model)
    for param in model.parameters():
        param.requires_grad_(True)
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and not _in_head(name, head)]
    for _, bn in bns:
        _set_bn_frozen(bn, False, model.training)

    blocks = backbone_blocks(model)
    if kind in ("none", "bn"):
        frozen_blocks: list[tuple[str, list[str]]] = []
    elif kind == "backbone":
        frozen_blocks = blocks
    else:
        frozen_blocks = blocks[: max(len(blocks) - n_last, 0)]
    frozen_names = {n for _, names in frozen_blocks for n in names}
    for name, param in model.named_parameters():
        if name in frozen_names:
            param.requires_grad_(False)

    # bn:N - the BatchNorm layers outside the last N blocks keep their pretrained state
    early = {n for _, names in blocks[: max(len(blocks) - n_last, 0)] for n in names} if kind == "bn" and n_last else None
    frozen_bn = 0
    for name, bn in bns:
        if kind == "bn":
            frozen = early is None or f"{name}.weight" in early or not bn.affine
        elif bn.affine:
            frozen = f"{name}.weight" in frozen_names
        else:
            frozen = kind == "backbone"
        if frozen:
            _set_bn_frozen(bn, True, model.training)
            frozen_bn += 1

    params = list(model.parameters())
    return FreezeSummary(
        mode=str(mode).strip().lower(),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        frozen_bn=frozen_bn,
        blocks=len(blocks),
        trainable_blocks=tuple(label for label, _ in blocks[len(frozen_blocks) :]),
    )
