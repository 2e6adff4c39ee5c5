"""Config validation: every bad key or value is one line, before any image is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from leuko.errors import LeukoError
from leuko.run.config import load_config, parse_overrides
from leuko.train.module import lr_factor


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  name: resnet50\ntrain:\n  lr: 0.01\n")
    cfg = load_config(cfg_file, ["train.lr=1e-4", "data.preprocess=[clahe]", "trainer.devices=2"])
    assert cfg.model.name == "resnet50"
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.preprocess == ["clahe"]
    assert cfg.trainer.devices == 2
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  lrr: 0.1\n", [], "unknown key 'train.lrr'"),
        ("", ["train.lr=-0.1"], "train.lr: Input should be greater than 0"),
        ("", ["model.freeze=half"], "model.freeze: must be none, backbone, bn, bn:N or last:N"),
        ("", ["train.optimizer=lion"], "train.optimizer: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop'"),
        ("data: [1, 2]\n", [], "data: Input should be a valid dictionary"),
        ("train: {epochs: 3}\nmodel: {two_stage_epochs: 3}\n", [], "two_stage_epochs must be smaller"),
        ("x: : :\n", [], "not valid YAML"),
        ("", ["train.lr"], "must look like key=value"),
    ],
)
def test_bad_configs(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(LeukoError) as exc:
        load_config(cfg_file, overrides)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(LeukoError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_exponential_decay_matches_keras() -> None:
    cfg = load_config(None, ["train.schedule=exponential", "train.decay_steps=900", "train.decay_rate=0.95"])
    assert lr_factor(0, cfg, 100, 10_000) == 1.0
    assert lr_factor(900, cfg, 100, 10_000) == pytest.approx(0.95)
    assert lr_factor(1800, cfg, 100, 10_000) == pytest.approx(0.95**2)


def test_schedules_shape() -> None:
    cos = load_config(None, ["train.schedule=cosine"])
    assert lr_factor(0, cos, 10, 100) == pytest.approx(1.0)
    assert lr_factor(50, cos, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, cos, 10, 100) == pytest.approx(0.0, abs=1e-9)
    step = load_config(None, ["train.schedule=step", "train.step_size=2", "train.gamma=0.5"])
    assert [lr_factor(s, step, 10, 100) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    warm = load_config(None, ["train.schedule=constant", "train.warmup_epochs=1"])
    assert lr_factor(0, warm, 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, warm, 10, 100) == 1.0
    one = load_config(None, ["train.schedule=onecycle"])
    peak = max(lr_factor(s, one, 10, 100) for s in range(100))
    assert peak == pytest.approx(1.0, abs=0.05) and lr_factor(0, one, 10, 100) < 0.1
