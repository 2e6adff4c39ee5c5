"""Pretrained weights: bundled EfficientNet-Lite mapping, offline ImageNet errors, local files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leuko.errors import LeukoError
from leuko.models import build_model, convert_efficientnet_pytorch, load_weights_file, read_state_dict
from leuko.models import weights as weights_mod
from leuko.models.weights import bundled_weights_file

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


def _bundled_pth(name: str) -> dict[str, torch.Tensor]:
    return torch.load(bundled_weights_file("tf_" + name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", LITES)
def test_bundled_weights_map_completely_onto_timm(name: str) -> None:
    model = build_model(name, 1000, pretrained="bundled")
    report = model.leuko_build.load_report
    assert report.source.startswith("bundled:") and report.complete
    assert report.missing == () and report.unexpected == () and report.loaded == len(model.state_dict())
    src = _bundled_pth(name)
    assert torch.equal(model.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(model.blocks[0][0].conv_dw.weight, src["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(model.blocks[1][0].conv_pwl.weight, src["_blocks.1._project_conv.weight"])
    assert torch.equal(model.bn2.running_var, src["_bn1.running_var"])
    assert torch.equal(model.classifier.weight, src["_fc.weight"])  # kept: 1000 classes + linear head


def test_bundled_is_the_default_for_lite_and_the_imagenet_classifier_is_dropped() -> None:
    model = build_model("efficientnet_lite0", 5)
    assert model.leuko_build.pretrained == "bundled"
    assert model.classifier.out_features == 5
    assert torch.equal(model.conv_head.weight, _bundled_pth("efficientnet_lite0")["_conv_head.weight"])


@pytest.mark.parametrize("name", LITES)
def test_bundled_weights_recognise_an_imagenet_photo(name: str) -> None:
    """Data-free proof the weights and the mapping are real: Grace Hopper is in 'military uniform'.

    The portrait ships with matplotlib; a wrong block mapping, padding mode or
    normalisation would not put the right class first among 1000.
    """
    import matplotlib.cbook as cbook

    model = build_model(name, 1000, pretrained="bundled").eval()
    info = model.leuko_info
    size = info.input_size[1]
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    x = torch.from_numpy(np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255)
    x = (x.permute(2, 0, 1)[None] - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.15


def test_mapping_rejects_a_model_of_another_width() -> None:
    src = _bundled_pth("efficientnet_lite0")
    other = build_model("efficientnet_lite2", 1000, pretrained="none")
    with pytest.raises(LeukoError, match="blocks|shape"):
        convert_efficientnet_pytorch(src, other)


def test_bundled_is_refused_for_models_without_bundled_weights() -> None:
    with pytest.raises(LeukoError, match="bundled.*efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"):
        build_model("resnet50", 3, pretrained="bundled")


# -- ImageNet offline ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenetv2", "alexnet", "resnet18"])
def test_imagenet_offline_fails_fast_with_the_offline_choices(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights_mod, "timm_cached_weights", lambda cfg: None)
    monkeypatch.setattr(weights_mod, "torch_hub_cached", lambda url: None)
    import leuko.models.registry as registry

    monkeypatch.setattr(registry, "timm_cached_weights", lambda cfg: None)
    monkeypatch.setattr(registry, "torch_hub_cached", lambda url: None)
    start = time.perf_counter()
    with pytest.raises(LeukoError) as err:
        build_model(name, 3, pretrained="imagenet")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "'bundled'" in msg and "efficientnet_lite0" in msg and "path" in msg and "'none'" in msg


def test_imagenet_without_network_fails_fast_even_without_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline flag and no network: the 3 s probe answers before a hub client starts retrying."""
    import leuko.models.registry as registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("LEUKO_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "timm_cached_weights", lambda cfg: None)
    monkeypatch.setattr(weights_mod, "_can_reach", lambda url, timeout=3.0: False)
    with pytest.raises(LeukoError, match="huggingface.co cannot be reached.*offline choices"):
        build_model("mobilenetv2", 3, pretrained="imagenet")


def test_a_failing_download_becomes_the_offline_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    import leuko.models.registry as registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "timm_cached_weights", lambda cfg: None)
    monkeypatch.setattr(weights_mod, "_can_reach", lambda url, timeout=3.0: True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(LeukoError, match="download failed: ConnectionResetError.*offline choices"):
        build_model("mobilenetv2", 3, pretrained="imagenet")


def test_imagenet_is_refused_for_custom_cnn() -> None:
    with pytest.raises(LeukoError, match="custom_cnn"):
        build_model("custom_cnn", 3, pretrained="imagenet")


# -- local files --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["imagnet", "bundle", "pretrained"])
def test_unknown_pretrained_values_are_rejected(value: str) -> None:
    with pytest.raises(LeukoError, match=f"pretrained='{value}' is not valid.*none, imagenet, bundled"):
        build_model("custom_cnn", 3, pretrained=value)


def test_missing_file_is_a_leuko_error(tmp_path: Path) -> None:
    with pytest.raises(LeukoError, match="file not found"):
        build_model("custom_cnn", 3, pretrained=str(tmp_path / "nope.pth"))


def test_round_trip_through_a_pth_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = build_model("custom_cnn", 4, head="dense128")
    path = tmp_path / "w.pth"
    torch.save(trained.state_dict(), path)
    loaded = build_model("custom_cnn", 4, pretrained=path, head="dense128")
    report = loaded.leuko_build.load_report
    assert report.complete and report.loaded == len(trained.state_dict())
    assert loaded.leuko_build.pretrained == str(path)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_wrapped_prefixed_safetensors_with_another_head(tmp_path: Path) -> None:
    """A Lightning-style {"state_dict": {"model.<key>": ...}} of a 7-class model into a 3-class one."""
    from safetensors.torch import save_file

    source = build_model("custom_cnn", 7)
    path = tmp_path / "w.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)
    model = build_model("custom_cnn", 3, pretrained=str(path))
    report = model.leuko_build.load_report
    assert report.missing == ("fc.weight", "fc.bias")
    assert len(report.mismatched) == 2 and "fc.weight: file (7, 256) vs model (3, 256)" in report.mismatched
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)
    assert "missing 2" in report.summary()

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    assert load_weights_file(model, st).loaded == len(source.state_dict()) - 2


def test_a_file_that_matches_nothing_is_a_leuko_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(LeukoError, match="no tensor matches"):
        build_model("custom_cnn", 3, pretrained=path)


def test_unreadable_and_non_weight_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(LeukoError, match="cannot read weights"):
        read_state_dict(junk)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(LeukoError, match="unsupported file type"):
        build_model("custom_cnn", 3, pretrained=text)


def test_the_bundled_pth_itself_can_be_given_as_a_file() -> None:
    path = bundled_weights_file("tf_efficientnet_lite0")
    model = build_model("efficientnet_lite0", 5, pretrained=path, head="dense128")
    report = model.leuko_build.load_report
    head = model.leuko_build.head_path
    assert report.unexpected == () and all(k.startswith(head + ".") for k in report.missing)
    assert torch.equal(model.conv_stem.weight, _bundled_pth("efficientnet_lite0")["_conv_stem.weight"])


# -- ImageNet weights from the local cache (no network needed) -------------------------


def test_imagenet_weights_in_the_torch_hub_cache_load_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timm model whose weights file sits in the torch-hub cache builds with HF_HUB_OFFLINE=1."""
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = timm.get_pretrained_cfg("mobilenetv2_100")
    fake = timm.create_model("mobilenetv2_100").state_dict()  # stands in for the real download
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(fake, cache / Path(cfg.url).name)
    import leuko.models.registry as registry

    monkeypatch.setattr(registry, "timm_cached_weights", lambda c: weights_mod.timm_cached_weights({"url": c.url}))
    model = build_model("mobilenetv2", 3, pretrained="imagenet")
    assert model.leuko_build.pretrained == "imagenet" and model.leuko_build.load_report.source.startswith("imagenet:")
    assert torch.equal(model.conv_stem.weight, fake["conv_stem.weight"])
    assert model.classifier.out_features == 3


def test_torchvision_googlenet_imagenet_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's weight loading with leuko's GoogLeNet options (no aux heads, transform_input)."""
    import torchvision

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.GoogLeNet_Weights.DEFAULT.url
    fake = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(fake, cache / Path(url).name)
    model = build_model("googlenet", 3, pretrained="imagenet")
    assert model.aux1 is None and model.transform_input
    assert torch.equal(model.conv1.conv.weight, fake["conv1.conv.weight"])
    assert model.fc.out_features == 3
