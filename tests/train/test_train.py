"""Training end to end on generated images: run folders, determinism, resume, fast path."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cells import TINY_TRAIN
from leuko.errors import LeukoError
from leuko.run.folder import RunFolder, load_model
from leuko.train import load_config, train

TINY = TINY_TRAIN


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_run_folder(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(None, out, overrides=TINY, data_path=tiny_data, echo=lambda s: None)
    run = RunFolder.open(out)
    assert result.path == "lightning" and result.epochs_run == 2
    for p in (run.config, run.split, run.classes, run.data, run.metrics, run.model, run.summary, run.last_ckpt, run.best_ckpt, run.log):
        assert p.is_file(), p
    assert run.class_names() == ["eosinophil", "lymphocyte", "neutrophil"]
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    counts = run.read_json("data.json")["counts"]
    assert sum(counts["train"].values()) == 48 and sum(counts["test"].values()) == 6
    model, meta = load_model(out)
    assert meta.classes == run.class_names() and meta.image_size == 32 and meta.kind == "network"
    cfg = load_config(run.config)
    assert cfg.data.path == str(tiny_data.resolve())  # resolved config records the data used


@pytest.mark.parametrize(
    ("score", "loss", "best_score", "best_loss", "expected"),
    [
        (0.9, 0.5, None, None, True),  # first epoch
        (0.91, 0.9, 0.9, 0.2, True),  # higher accuracy wins whatever the loss
        (0.89, 0.1, 0.9, 0.2, False),
        (0.9, 0.19, 0.9, 0.2, True),  # a tie goes to the lower loss ...
        (0.9, 0.2, 0.9, 0.2, False),  # ... and an exact tie keeps the earlier epoch
        (0.9, 0.3, 0.9, 0.2, False),
        (0.9, None, 0.9, 0.2, False),
        (0.9, 0.3, 0.9, None, True),
    ],
)
def test_kept_epoch_rule(score: float, loss: float | None, best_score: float | None, best_loss: float | None, expected: bool) -> None:
    from leuko.train.callbacks import improves

    assert improves(score, loss, best_score, best_loss) is expected


def test_checkpoints_keep_best_by_rule_and_last_every_epoch(tiny_data: Path, tmp_path: Path) -> None:
    """best.ckpt is the metrics file's best epoch (accuracy, ties to the lower loss); last.ckpt the final epoch."""
    import torch

    from leuko.train.callbacks import BestAndLastCheckpoint, improves

    out = tmp_path / "run"
    over = [a for a in TINY if not a.startswith("train.epochs")] + ["train.epochs=4", "train.lr=0.003"]
    result = train(None, out, overrides=over, data_path=tiny_data, echo=lambda s: None)
    rows = read_metrics(out)
    expected, best, best_loss = None, None, None
    for r in rows:
        acc, loss = float(r["val_acc"]), float(r["val_loss"])
        if improves(acc, loss, best, best_loss):
            expected, best, best_loss = int(r["epoch"]), acc, loss
    run = RunFolder.open(out)
    assert result.best_epoch == expected
    assert result.best_val_acc == pytest.approx(best)
    assert torch.load(run.best_ckpt, map_location="cpu", weights_only=False)["epoch"] + 1 == expected
    last = torch.load(run.last_ckpt, map_location="cpu", weights_only=False)
    assert last["epoch"] + 1 == 4
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]
    # last.ckpt was written at epoch 4's validation end, before Lightning counts the epoch as processed:
    # resuming must keep 4 rows, from the callback's own record or, for older checkpoints, the loops' state.
    cb = BestAndLastCheckpoint(run.checkpoints)
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 3
    assert cb.epochs_done(last) == 4
    del last["callbacks"][cb.state_key]
    assert cb.epochs_done(last) == 4
    last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] = False  # as if saved mid-epoch
    assert cb.epochs_done(last) == 3


def test_resume_recovers_the_kept_epoch_from_files_when_the_checkpoint_lacks_it(tmp_path: Path) -> None:
    """A last.ckpt without this callback's state (older runs): the kept epoch comes from best.ckpt and
    metrics.csv, so a later epoch must beat it by the rule rather than replace it by default."""
    import torch

    from leuko.train.callbacks import BestAndLastCheckpoint, append_metrics_row, improves

    (tmp_path / "checkpoints").mkdir()
    for epoch, acc, loss in ((1, 0.80, 0.9), (2, 0.90, 0.40), (3, 0.90, 0.30), (4, 0.85, 0.35)):
        append_metrics_row(tmp_path / "metrics.csv", {"epoch": epoch, "val_acc": acc, "val_loss": loss})
    torch.save({"epoch": 2}, tmp_path / "checkpoints" / "best.ckpt")  # Lightning's 0-based epoch: the 3rd
    cb = BestAndLastCheckpoint(tmp_path / "checkpoints")
    cb.restore_from_files(tmp_path / "metrics.csv")
    assert (cb.best_epoch, cb.best_score, cb.best_loss) == (3, pytest.approx(0.90), pytest.approx(0.30))
    assert not improves(0.90, 0.35, cb.best_score, cb.best_loss) and improves(0.91, 0.5, cb.best_score, cb.best_loss)
    cb.load_state_dict({"best_score": 0.95, "best_loss": 0.1, "best_epoch": 4})  # a checkpoint's own state wins
    assert cb.best_epoch == 4
    fresh = BestAndLastCheckpoint(tmp_path / "none")
    fresh.restore_from_files(tmp_path / "metrics.csv")  # no best.ckpt: nothing to recover
    assert fresh.best_epoch is None and fresh.best_score is None
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"truncated")
    broken = BestAndLastCheckpoint(tmp_path / "checkpoints")
    broken.restore_from_files(tmp_path / "metrics.csv")  # unreadable: nothing to keep, no traceback
    assert broken.best_epoch is None


def test_resume_survives_an_unreadable_last_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    """A truncated last.ckpt (killed mid-write by an older leuko, a full disk): resume from best.ckpt and say so;
    a finished run is never re-run; nothing readable at all is one clear error."""
    out = tmp_path / "run"
    over = [a for a in TINY if not a.startswith("train.epochs")] + ["train.epochs=3"]
    train(None, out, overrides=over, data_path=tiny_data, echo=lambda s: None)
    run = RunFolder.open(out)
    with pytest.raises(LeukoError, match="already finished"):  # last.ckpt is there, but so is model.pt
        train(None, out, resume=True, echo=lambda s: None)
    run.model.unlink()
    run.last_ckpt.write_bytes(run.last_ckpt.read_bytes()[:4096])
    lines: list[str] = []
    result = train(None, out, resume=True, echo=lines.append)
    assert any("cannot be read" in line and "resuming from" in line and "best.ckpt" in line for line in lines), lines
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and all(r["val_acc"] and r["train_acc"] for r in rows)
    assert result.epochs_run == 3 and run.model.is_file()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no .tmp left behind
    run.model.unlink()
    run.last_ckpt.write_bytes(b"junk")
    run.best_ckpt.write_bytes(b"junk")
    with pytest.raises(LeukoError, match=r"cannot resume .*last.ckpt cannot be read .*best.ckpt is unreadable too"):
        train(None, out, resume=True, echo=lambda s: None)


def test_same_seed_same_metrics(tiny_data: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    train(None, a, overrides=TINY, data_path=tiny_data, echo=lambda s: None)
    train(None, b, overrides=TINY, data_path=tiny_data, echo=lambda s: None)
    cols = ("train_loss", "train_acc", "val_loss", "val_acc")
    ra, rb = read_metrics(a), read_metrics(b)
    assert [[r[c] for c in cols] for r in ra] == [[r[c] for c in cols] for r in rb]


def test_existing_run_is_never_overwritten(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(LeukoError, match="already exists"):
        train(None, out, overrides=TINY, data_path=tiny_data, echo=lambda s: None)
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_config_fails_before_run_folder(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(LeukoError, match="unknown model"):
        train(None, out, overrides=[*TINY, "model.name=resnet9000"], data_path=tiny_data, echo=lambda s: None)
    with pytest.raises(LeukoError, match="train.lr"):
        train(None, out, overrides=[*TINY, "train.lr=-1"], data_path=tiny_data, echo=lambda s: None)
    assert not out.exists()


def test_head_lr_factor_and_two_stage(tiny_data: Path, tmp_path: Path) -> None:
    from leuko.models import build_model
    from leuko.train.module import LeukoClassifier

    cfg = load_config(None, [*TINY, "model.head_lr_factor=10", "train.schedule=constant", "train.epochs=3", "model.two_stage_epochs=1"])
    module = LeukoClassifier(build_model("custom_cnn", 3, pretrained="none"), cfg, ["a", "b", "c"])
    opt = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": pytest.approx(0.01), "head": pytest.approx(0.1)}
    out = tmp_path / "two"
    train(None, out, overrides=[*TINY, "model.two_stage_epochs=1", "train.epochs=2"], data_path=tiny_data, echo=lambda s: None)
    assert len(read_metrics(out)) == 2


def test_fast_feature_path_and_cache(tiny_data: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    over = [
        "model.name=efficientnet_lite0",
        "model.pretrained=bundled",
        "model.freeze=backbone",
        "data.image_size=64",
        "data.num_workers=0",
        "train.epochs=30",
        "train.lr=0.01",
        "trainer.progress=false",
    ]
    result = train(None, tmp_path / "f1", overrides=over, data_path=tiny_data, echo=lines.append)
    assert result.path == "features"
    assert any(line.startswith("features: 60 images") for line in lines)
    assert result.best_val_acc is not None and result.best_val_acc >= 0.8
    lines.clear()
    train(None, tmp_path / "f2", overrides=over, data_path=tiny_data, echo=lines.append)
    assert any("reusing cache" in line for line in lines)
    # the saved model reproduces the head that was trained
    from leuko.infer import Predictor

    pred = Predictor(tmp_path / "f1").predict_paths(sorted((tiny_data / "lymphocyte").glob("*.png"))[:5])
    assert pred.probs.shape == (5, 3)


def test_resume_after_kill(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    env = dict(os.environ, COLUMNS="200")
    over = [a for a in TINY if not a.startswith("train.epochs")] + ["train.epochs=8"]
    args = [sys.executable, "-m", "leuko", "train", "--data", str(tiny_data), "--out", str(out)]
    for o in over:
        args += ["--set", o]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "checkpoints" / "last.ckpt").is_file() and (out / "metrics.csv").is_file() and len(read_metrics(out)) >= 1:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_metrics(out))
    assert 1 <= done_before < 8, "the run should have been killed mid-way"
    assert not (out / "model.pt").exists()
    from leuko.data.transforms import AUGMENT_VERSIONS
    from leuko.train.callbacks import improves

    summary = json.loads((out / "data.json").read_text())
    preset = summary["augment"]["preset"]
    assert summary["augment"] == {"preset": preset, "version": AUGMENT_VERSIONS[preset]}
    summary["augment"]["version"] = 0  # as if this leuko's preset had changed since the run started
    (out / "data.json").write_text(json.dumps(summary))
    lines: list[str] = []
    result = train(None, out, resume=True, echo=lines.append)
    warned = f"started with the {preset!r} augmentation v0; the resumed epochs use {preset!r} v{AUGMENT_VERSIONS[preset]}"
    assert any(warned in line for line in lines), lines
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    for r in rows:  # the epoch last.ckpt was written in keeps its row; no replayed, empty one
        assert r["train_acc"] and r["val_acc"] and float(r["images_per_s"]) > 0, r
        assert 0 < float(r["epoch_time_s"]) < 600, r
    assert result.epochs_run == 8 and (out / "model.pt").is_file()
    kept, best, best_loss = None, None, None
    for r in rows:
        if improves(float(r["val_acc"]), float(r["val_loss"]), best, best_loss):
            kept, best, best_loss = int(r["epoch"]), float(r["val_acc"]), float(r["val_loss"])
    assert result.best_epoch == kept
    with pytest.raises(LeukoError, match="already finished"):
        (out / "checkpoints" / "last.ckpt").unlink()
        train(None, out, resume=True, echo=lambda s: None)


def test_ddp_two_processes_match_single(tiny_data: Path, tmp_path: Path) -> None:
    """2-process DDP on CPU (gloo) gives the same training curve as one process with the same global batch."""
    common = [
        "model.name=custom_cnn", "model.pretrained=none", "model.freeze=bn", "data.image_size=32",
        "data.num_workers=0", "data.cache=false", "train.epochs=2", "train.lr=0.001", "train.shuffle=false", "train.optimizer=sgd",
        "train.schedule=constant", "trainer.progress=false", "trainer.accelerator=cpu", "data.split=holdout-80-20",
        "data.val_fraction=0.0",
    ]
    env = dict(os.environ, COLUMNS="200")
    env.pop("LOCAL_RANK", None)

    def run(out: Path, extra: list[str]) -> None:
        args = [sys.executable, "-m", "leuko", "train", "--data", str(tiny_data), "--out", str(out)]
        for o in common + extra:
            args += ["--set", o]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    run(tmp_path / "single", ["train.batch_size=16", "trainer.devices=1"])
    run(tmp_path / "ddp", ["train.batch_size=8", "trainer.devices=2", "trainer.strategy=ddp"])
    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-3, abs=1e-4)
    import torch

    wa = torch.load(tmp_path / "single" / "model.pt", weights_only=False)["state_dict"]
    wb = torch.load(tmp_path / "ddp" / "model.pt", weights_only=False)["state_dict"]
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    # both keep epoch 2 (accuracy ties, epoch 2 has the lower loss): two epochs of float drift apart
    assert [json.loads((tmp_path / r / "summary.json").read_text())["best_epoch"] for r in ("single", "ddp")] == [2, 2]
    assert diff < 2e-3
