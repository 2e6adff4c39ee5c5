"""Callbacks: the per-epoch metrics file, throughput, and saving on interruption.

Lightning does checkpoints and early stopping; these add what a run folder
promises: ``metrics.csv`` with one row per epoch (train/val loss and
accuracy, learning rate, images/s) and a ``last.ckpt`` written when the user
presses Ctrl-C, so ``--resume`` loses nothing.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "epoch_time_s"]


def append_metrics_row(path: Path, row: dict[str, Any]) -> None:
    """Append one epoch to ``metrics.csv`` (header written on first use)."""
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after ``last_epoch`` (a resumed run repeats the epochs it had not checkpointed)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


class EpochMetricsCSV(pl.Callback):
    """Write ``metrics.csv`` after each validated epoch, with images/s of training."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.echo = echo
        self._t0 = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += int(batch[1].shape[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        elapsed = max(1e-9, time.perf_counter() - self._t0)
        m = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": m.get("train_loss_epoch", m.get("train_loss")),
            "train_acc": m.get("train_acc"),
            "val_loss": m.get("val_loss"),
            "val_acc": m.get("val_acc"),
            "lr": lr,
            "images_per_s": self._images * trainer.world_size / elapsed,
            "epoch_time_s": elapsed,
        }
        append_metrics_row(self.path, row)
        if self.echo is not None:
            parts = [f"epoch {row['epoch']}/{trainer.max_epochs}"]
            for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
                if row[key] is not None:
                    parts.append(f"{key} {float(row[key]):.4f}")
            parts.append(f"{row['images_per_s']:.1f} images/s")
            self.echo(", ".join(parts))


class SaveOnInterrupt(pl.Callback):
    """On Ctrl-C (or any exception) write ``last.ckpt`` so the run can resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero and trainer.current_epoch > 0:
            trainer.save_checkpoint(self.path)
