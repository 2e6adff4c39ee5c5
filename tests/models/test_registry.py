"""Registry: names, model info, argument validation, and every registered model builds and runs."""

from __future__ import annotations

import pytest
import torch

from leuko.errors import LeukoError
from leuko.models import (
    IMAGENET_MEAN,
    LITE_MEAN,
    LITE_STD,
    ModelInfo,
    build_model,
    list_models,
    model_info,
    registered_names,
)

NAMES = [
    "alexnet",
    "googlenet",
    "resnet50",
    "vgg16",
    "mobilenetv2",
    "densenet201",
    "inception_resnet_v2",
    "efficientnet_b3",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "custom_cnn",
]


def test_the_twelve_names_are_registered() -> None:
    assert registered_names() == NAMES


def test_list_models_rows_say_what_transforms_and_weights_need() -> None:
    rows = list_models()
    assert [r["name"] for r in rows] == NAMES
    keys = {"name", "family", "source", "arch", "input_size", "mean", "std", "interpolation", "crop_pct",
            "default_pretrained", "bundled", "imagenet"}
    for row in rows:
        assert keys <= row.keys()
        assert len(row["input_size"]) == 3 and row["input_size"][0] == 3
    bundled = {r["name"] for r in rows if r["bundled"]}
    assert bundled == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


def test_list_models_counts_parameters_without_building_real_tensors() -> None:
    params = {r["name"]: r["params"] for r in list_models(include_params=True)}
    assert 60e6 < params["alexnet"] < 62e6
    assert 0.8e6 < params["custom_cnn"] < 2e6
    assert 4.5e6 < params["efficientnet_lite0"] < 4.8e6  # 3.4 M backbone + 1.28 M ImageNet classifier


def test_model_info_of_the_lite_models_uses_tf_lite_scaling() -> None:
    info = model_info("efficientnet_lite1")
    assert isinstance(info, ModelInfo)
    assert info.arch == "tf_efficientnet_lite1" and info.source == "timm"
    assert info.input_size == (3, 240, 240)
    assert info.mean == LITE_MEAN and info.std == LITE_STD
    # (x - mean) / std on 0..1 pixels equals (pixel - 127) / 128 on 0..255 pixels
    pixel = torch.tensor([0.0, 127.0, 255.0])
    assert torch.allclose((pixel / 255 - info.mean[0]) / info.std[0], (pixel - 127) / 128)
    assert info.default_pretrained == "bundled" and info.bundled


@pytest.mark.parametrize(
    ("name", "size", "default"),
    [("alexnet", 224, "imagenet"), ("inception_resnet_v2", 299, "imagenet"), ("efficientnet_b3", 288, "imagenet"),
     ("custom_cnn", 128, "none")],
)
def test_model_info_sizes_and_defaults(name: str, size: int, default: str) -> None:
    info = model_info(name)
    assert info.input_size == (3, size, size)
    assert info.default_pretrained == default


def test_names_are_forgiving_about_case_dashes_and_timm_aliases() -> None:
    assert model_info("EfficientNet-Lite0").name == "efficientnet_lite0"
    assert model_info("tf_efficientnet_lite0").name == "efficientnet_lite0"  # the timm arch of a registered name
    assert model_info("mobilenetv2_100").name == "mobilenetv2"


def test_other_timm_names_pass_through_with_timms_config() -> None:
    info = model_info("resnet18")
    assert not info.registered and info.source == "timm" and info.arch == "resnet18"
    assert info.mean == IMAGENET_MEAN and info.default_pretrained == "imagenet" and not info.bundled
    model = build_model("resnet18", 3, pretrained="none").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_unknown_name_lists_registered_names_and_mentions_timm() -> None:
    with pytest.raises(LeukoError) as err:
        build_model("resnet5O", 3)
    msg = str(err.value)
    assert "resnet5O" in msg and "efficientnet_lite0" in msg and "custom_cnn" in msg and "timm" in msg
    assert "\n" not in msg


def test_a_bad_timm_pretrained_tag_is_a_leuko_error() -> None:
    with pytest.raises(LeukoError, match="resnet18.nosuchtag"):
        model_info("resnet18.nosuchtag")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": -1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 3, "head": "mlp"}, "head='mlp'.*linear, dense128, bn-dense256"),
        ({"num_classes": 3, "dropout": 1.5}, "dropout"),
        ({"num_classes": 3, "no_such_option": 1}, "does not accept"),
    ],
)
def test_bad_arguments_are_one_line_leuko_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(LeukoError, match=match) as err:
        build_model("custom_cnn", pretrained="none", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_model_builds_and_runs_at_its_input_size(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 5, pretrained="none").eval()
    assert model.leuko_info == model_info(name)
    assert model.leuko_build.name == name and model.leuko_build.pretrained == "none"
    with torch.no_grad():
        out = model(torch.randn(1, *model.leuko_info.input_size))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


def test_build_record_is_json_friendly() -> None:
    import json

    model = build_model("custom_cnn", 4, head="dense128", dropout=0.2)
    record = model.leuko_build.to_dict()
    assert json.loads(json.dumps(record))["head_path"] == "fc"
    assert record["pretrained"] == "none" and record["num_features"] == 256 and record["dropout"] == 0.2
    assert json.loads(json.dumps(model.leuko_info.to_dict()))["input_size"] == [3, 128, 128]
