"""Knowledge distillation: the loss, the teacher's answers, and the teachers a run refuses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cells import TINY_TRAIN
from leuko.errors import LeukoError
from leuko.infer import Predictor
from leuko.run.folder import RunFolder
from leuko.train import load_config, train
from leuko.run.data import prepare_data
from leuko.train.distill import check_teacher, distill_loss, heldout_seen_by, teacher_targets

TINY = TINY_TRAIN


@pytest.fixture
def teacher(tiny_data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "teacher"
    train(None, out, overrides=TINY, data_path=tiny_data, echo=lambda s: None)
    return out


def test_distill_loss_is_zero_on_the_teachers_answer_and_matches_kl_by_hand() -> None:
    soft = torch.tensor([[0.7, 0.2, 0.1]])
    t = 2.0
    same = t * torch.log(soft)  # softmax(same / t) == soft
    assert float(distill_loss(same, soft, t)) == pytest.approx(0.0, abs=1e-6)
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    q = torch.softmax(logits / t, dim=1)[0].tolist()
    kl = sum(p * math.log(p / qi) for p, qi in zip([0.7, 0.2, 0.1], q))
    assert float(distill_loss(logits, soft, t)) == pytest.approx(t * t * kl, rel=1e-5)


def test_teacher_targets_are_its_tta_answers_at_the_temperature(teacher: Path, tiny_data: Path) -> None:
    cfg = load_config(teacher / "config.yaml")
    data = prepare_data(cfg.data, seed=cfg.train.seed, split_file=teacher / "split.json")
    order = list(reversed(data.classes))  # the student's class order may differ from the teacher's
    soft1 = teacher_targets(RunFolder.open(teacher), data.train, order, 1.0, echo=lambda s: None)
    soft4 = teacher_targets(RunFolder.open(teacher), data.train, order, 4.0, echo=lambda s: None)
    assert soft1.shape == (len(data.train), 3) and soft1.dtype == np.float32
    np.testing.assert_allclose(soft1.sum(1), 1.0, atol=1e-5)
    pred = Predictor(teacher, device="cpu", temperature=1.0).predict_samples(data.train, tta=True)
    expect = pred.probs[:, [pred.classes.index(c) for c in order]]
    np.testing.assert_allclose(soft1, expect, atol=1e-5)

    def entropy(p: np.ndarray) -> float:
        return float(-(p * np.log(p + 1e-12)).sum(1).mean())

    assert entropy(soft4) > entropy(soft1) + 0.05  # a warmer teacher says more about the other classes


def test_a_student_learns_from_the_teacher(teacher: Path, tiny_data: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "student"
    result = train(None, out, overrides=[*TINY, f"train.distill_from={teacher}", "train.distill_weight=1.0"], data_path=tiny_data, echo=lines.append)
    assert result.epochs_run == 2 and (out / "model.pt").is_file()
    said = [line for line in lines if line.startswith("distillation:")]
    assert len(said) == 1 and "48 training images" in said[0] and "TTA" in said[0]
    assert load_config(out / "config.yaml").train.distill_from == str(teacher)


def test_a_teacher_that_saw_the_students_test_images_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-split"
    train(None, other, overrides=[*TINY, "data.split_seed=7"], data_path=tiny_data, echo=lambda s: None)
    cfg = load_config(None, TINY)
    data = prepare_data(cfg.data, seed=cfg.train.seed, data_path=tiny_data)
    leaked = heldout_seen_by(RunFolder.open(other), data)
    assert 0 < len(leaked) <= len(data.test)
    out = tmp_path / "student"
    with pytest.raises(LeukoError, match=r"trained or validated on \d+ of this run's held-out images"):
        train(None, out, overrides=[*TINY, f"train.distill_from={other}"], data_path=tiny_data, echo=lambda s: None)
    assert not out.exists()  # refused before the run folder was made


def test_teachers_with_other_classes_or_no_model_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    two = tmp_path / "two-classes"
    train(None, two, overrides=[*TINY, "data.classes=[eosinophil, lymphocyte]"], data_path=tiny_data, echo=lambda s: None)
    cfg = load_config(None, TINY)
    data = prepare_data(cfg.data, seed=cfg.train.seed, data_path=tiny_data)
    with pytest.raises(LeukoError, match="teacher's classes"):
        check_teacher(two, data)
    (two / "model.pt").unlink()
    with pytest.raises(LeukoError, match="has no model.pt"):
        check_teacher(two, data)
    with pytest.raises(LeukoError, match="train.distill_from: run folder not found"):
        check_teacher(tmp_path / "nowhere", data)
