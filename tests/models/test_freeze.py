"""Freeze modes leave exactly the right parameters (and BatchNorm statistics) trainable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from leuko.errors import LeukoError
from leuko.models import backbone_blocks, build_model, freeze, get_classifier_params, split_params


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _head(model: nn.Module) -> set[str]:
    path = model.leuko_build.head_path
    return {n for n, _ in model.named_parameters() if n.startswith(path + ".")}


@pytest.fixture
def lite() -> nn.Module:
    return build_model("efficientnet_lite0", 3, pretrained="none", head="bn-dense256")


def test_split_params_partitions_backbone_and_head(lite: nn.Module) -> None:
    backbone, head = split_params(lite)
    assert len(backbone) + len(head) == len(list(lite.parameters()))
    assert {id(p) for p in head} == {id(p) for p in get_classifier_params(lite)}
    assert {n for n, p in lite.named_parameters() if any(p is h for h in head)} == _head(lite)


def test_backbone_mode_trains_only_the_head_and_keeps_bn_statistics(lite: nn.Module) -> None:
    summary = freeze(lite, "backbone")
    assert _trainable(lite) == _head(lite)
    backbone, head = split_params(lite)
    assert backbone == [] and len(head) == len(_head(lite))
    assert summary.trainable_blocks == () and summary.frozen_bn > 0
    before = lite.bn1.running_mean.clone()
    head_bn_before = lite.classifier.norm.running_mean.clone()
    lite.train()
    lite(torch.randn(4, 3, 64, 64) * 3 + 1)
    assert torch.equal(lite.bn1.running_mean, before)  # frozen backbone BN: statistics kept
    assert not torch.equal(lite.classifier.norm.running_mean, head_bn_before)  # head BN still learns


def test_bn_mode_freezes_only_batchnorm(lite: nn.Module) -> None:
    freeze(lite, "bn")
    frozen = {n for n, p in lite.named_parameters() if not p.requires_grad}
    bn_params = {
        f"{m}.{p}" for m, mod in lite.named_modules()
        if isinstance(mod, _BatchNorm) and not m.startswith("classifier") for p, _ in mod.named_parameters()
    }
    assert frozen == bn_params
    assert lite.conv_stem.weight.requires_grad and lite.classifier.norm.weight.requires_grad
    before = lite.blocks[3][0].bn2.running_var.clone()
    lite.train()
    lite(torch.randn(2, 3, 64, 64))
    assert torch.equal(lite.blocks[3][0].bn2.running_var, before)


def test_last_n_unfreezes_the_last_blocks_from_the_output_end(lite: nn.Module) -> None:
    blocks = backbone_blocks(lite)
    labels = [label for label, _ in blocks]
    assert labels[0] == "conv_stem+bn1" and labels[-1].startswith("blocks.6") and len(blocks) == 8
    summary = freeze(lite, "last:2")
    expected = _head(lite) | set(blocks[-1][1]) | set(blocks[-2][1])
    assert _trainable(lite) == expected
    assert summary.trainable_blocks == tuple(labels[-2:])
    # BN of a frozen block keeps its statistics, BN of a trained block updates them
    frozen_bn, live_bn = lite.blocks[2][0].bn1, lite.bn2
    fb, lb = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    lite.train()
    lite(torch.randn(2, 3, 64, 64))
    assert torch.equal(frozen_bn.running_mean, fb) and not torch.equal(live_bn.running_mean, lb)


def test_last_zero_is_backbone_and_a_large_n_is_everything(lite: nn.Module) -> None:
    freeze(lite, "last:0")
    assert _trainable(lite) == _head(lite)
    freeze(lite, "last:99")
    assert _trainable(lite) == {n for n, _ in lite.named_parameters()}


def test_modes_replace_each_other_and_none_restores_everything(lite: nn.Module) -> None:
    keys = list(lite.state_dict())
    freeze(lite, "backbone")
    freeze(lite, "none")
    assert _trainable(lite) == {n for n, _ in lite.named_parameters()}
    assert list(lite.state_dict()) == keys  # no module swapped, checkpoints stay compatible
    before = lite.bn1.running_mean.clone()
    lite.train()
    lite(torch.randn(2, 3, 64, 64) + 1)
    assert not torch.equal(lite.bn1.running_mean, before)  # statistics update again


@pytest.mark.parametrize(
    ("name", "head", "first", "last", "count"),
    [
        ("alexnet", "linear", "features.0", "classifier.4", 7),  # conv1..5, fc6, fc7
        ("alexnet", "dense128", "features.0", "features.10", 5),
        ("googlenet", "linear", "conv1", "inception5b", 12),
        ("resnet50", "linear", "conv1+bn1", "layer4", 5),
        ("custom_cnn", "linear", "stem", "stages.2", 4),
    ],
)
def test_block_notion_per_family(name: str, head: str, first: str, last: str, count: int) -> None:
    with torch.device("meta"):
        model = build_model(name, 3, pretrained="none", head=head)
    labels = [label for label, _ in backbone_blocks(model)]
    assert (labels[0], labels[-1], len(labels)) == (first, last, count)
    freeze(model, "last:1")
    assert _trainable(model) == _head(model) | set(backbone_blocks(model)[-1][1])


def test_bn_n_keeps_pretrained_statistics_except_in_the_last_blocks(lite: nn.Module) -> None:
    blocks = backbone_blocks(lite)
    freeze(lite, "bn:2")
    assert _trainable(lite) >= _head(lite) | {"conv_stem.weight", "blocks.0.0.conv_dw.weight"}  # every weight trains
    late = set(blocks[-1][1]) | set(blocks[-2][1])
    bns = [(n, m) for n, m in lite.named_modules() if isinstance(m, _BatchNorm) and not n.startswith("classifier")]
    early_bn = [m for n, m in bns if f"{n}.weight" not in late]
    late_bn = [m for n, m in bns if f"{n}.weight" in late]
    assert early_bn and late_bn and len(early_bn) + len(late_bn) == len(bns)
    assert not any(m.weight.requires_grad for m in early_bn) and all(m.weight.requires_grad for m in late_bn)
    before = [(m.running_mean.clone(), m) for m in early_bn + late_bn]
    lite.train()
    lite(torch.randn(2, 3, 64, 64) * 2 + 1)
    moved = [not torch.equal(b, m.running_mean) for b, m in before]
    assert moved == [False] * len(early_bn) + [True] * len(late_bn)
    freeze(lite, "bn:0")  # = bn
    assert all(not m.weight.requires_grad for _, m in bns)


@pytest.mark.parametrize("mode", ["all", "last", "last:-1", "last:x", "", "bn:x", "bn:"])
def test_bad_modes_are_leuko_errors(lite: nn.Module, mode: str) -> None:
    with pytest.raises(LeukoError, match="none, backbone, bn, bn:N, last:N"):
        freeze(lite, mode)
