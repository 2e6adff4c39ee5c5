"""Heads: shapes, structure, where they are installed, and num_classes=0 feature extractors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leuko.errors import LeukoError
from leuko.models import build_model, get_classifier_params, make_head


def _run(model: nn.Module, size: int, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def test_make_head_structures() -> None:
    linear = make_head("linear", 32, 4)
    assert isinstance(linear, nn.Linear) and linear.out_features == 4
    dense = make_head("dense128", 32, 4)
    assert [type(m) for m in dense] == [nn.Linear, nn.ReLU, nn.Identity, nn.Linear]
    assert dense.fc1.out_features == 128
    assert isinstance(make_head("dense128", 32, 4, dropout=0.3).drop, nn.Dropout)
    bn = make_head("bn-dense256", 32, 4)
    assert [type(m) for m in bn] == [nn.BatchNorm1d, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert bn.fc1.out_features == 256 and bn.drop.p == 0.4
    assert make_head("bn_dense256", 32, 4, dropout=0.1).drop.p == 0.1
    assert isinstance(make_head("dense128", 32, 0), nn.Identity)
    with pytest.raises(LeukoError, match="head='gap'"):
        make_head("gap", 32, 4)


@pytest.mark.parametrize("head", ["linear", "dense128", "bn-dense256"])
def test_heads_on_a_timm_model(head: str) -> None:
    model = build_model("efficientnet_lite0", 6, pretrained="none", head=head)
    assert _run(model, 96).shape == (2, 6)
    build = model.leuko_build
    assert build.head_path == "classifier" and build.num_features == 1280
    assert model.get_classifier() is model.get_submodule("classifier")  # timm API still works
    head_params = get_classifier_params(model)
    expected = {"linear": 1280 * 6 + 6, "dense128": 1280 * 128 + 128 + 128 * 6 + 6,
                "bn-dense256": 2 * 1280 + 1280 * 256 + 256 + 256 * 6 + 6}[head]
    assert sum(p.numel() for p in head_params) == expected


def test_linear_head_on_alexnet_keeps_the_classifier_mlp() -> None:
    model = build_model("alexnet", 3, pretrained="none", head="linear", dropout=0.3)
    stack = model.classifier
    assert [type(m).__name__ for m in stack] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Linear"]
    assert stack[6].out_features == 3 and stack[4].out_features == 4096
    assert stack[0].p == stack[3].p == 0.3
    assert model.leuko_build.head_path == "classifier.6" and model.leuko_build.num_features == 4096
    assert _run(model, 224, batch=1).shape == (1, 3)


def test_dense_head_on_alexnet_sits_on_pooled_conv_features() -> None:
    model = build_model("alexnet", 3, pretrained="none", head="dense128")
    assert model.leuko_build.head_path == "classifier" and model.leuko_build.num_features == 256
    assert model.classifier.fc1.in_features == 256
    # no 9216x4096 MLP any more: a small model
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert _run(model, 128).shape == (2, 3)


def test_heads_on_googlenet() -> None:
    model = build_model("googlenet", 4, pretrained="none", head="bn-dense256")
    assert model.leuko_build.head_path == "fc" and model.fc.norm.num_features == 1024
    assert isinstance(model.dropout, nn.Identity)
    model.train()
    out = model(torch.randn(2, 3, 96, 96))  # no auxiliary outputs in training mode
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)


def test_vgg16_linear_keeps_fc6_fc7_and_dense_heads_drop_them() -> None:
    linear = build_model("vgg16", 3, pretrained="none", head="linear")
    assert linear.leuko_build.head_path == "head.fc" and linear.leuko_build.num_features == 4096
    assert any(True for _ in linear.pre_logits.parameters())
    del linear
    dense = build_model("vgg16", 3, pretrained="none", head="dense128")
    assert dense.leuko_build.num_features == 512 and isinstance(dense.pre_logits, nn.Identity)
    assert _run(dense, 64).shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "head", "width", "size"),
    [
        ("efficientnet_lite0", "linear", 1280, 96),
        ("custom_cnn", "linear", 256, 64),
        ("custom_cnn", "bn-dense256", 256, 64),
        ("alexnet", "linear", 4096, 224),
        ("alexnet", "dense128", 256, 128),
        ("googlenet", "linear", 1024, 96),
        ("resnet50", "dense128", 2048, 64),
    ],
)
def test_num_classes_zero_gives_pooled_features(name: str, head: str, width: int, size: int) -> None:
    model = build_model(name, 0, pretrained="none", head=head)
    assert model.leuko_build.num_features == width and model.leuko_build.num_classes == 0
    assert _run(model, size).shape == (2, width)
    assert get_classifier_params(model) == []
