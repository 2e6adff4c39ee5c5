"""Callbacks: checkpoints, the per-epoch metrics file, throughput, and saving on interruption.

Lightning does early stopping; these add what a run folder promises:
``best.ckpt`` (the epoch training keeps) and ``last.ckpt`` after every epoch
(:class:`BestAndLastCheckpoint`), ``metrics.csv`` with one row per epoch
(train/val loss and accuracy, learning rate, images/s) and a ``last.ckpt``
written when the user presses Ctrl-C, so ``--resume`` loses nothing.
"""

from __future__ import annotations

import csv
import os
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


def save_checkpoint_atomic(trainer: pl.Trainer, path: Path) -> None:
    """Write a checkpoint beside ``path`` and move it into place, so a kill mid-write leaves the old one whole.

    Lightning writes straight to the file: a run killed while ``last.ckpt``
    was being written (tens of MB, every epoch) kept a truncated file and
    could resume from nothing.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # every rank calls it (it synchronises); rank 0 writes
    if trainer.is_global_zero:
        os.replace(tmp, path)


def read_checkpoint(path: Path, needs: tuple[str, ...] = ("state_dict",)) -> dict[str, Any] | str:
    """A checkpoint's contents, or why it cannot be read (truncated, or without the ``needs`` keys)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle error, ...: all mean "not usable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return state if isinstance(state, dict) and all(k in state for k in needs) else "not a Lightning checkpoint"


def improves(score: float, loss: float | None, best_score: float | None, best_loss: float | None) -> bool:
    """Whether an epoch beats the kept one: higher accuracy, or the same accuracy at a lower loss.

    The one rule for which epoch a run keeps (the Lightning path and the
    cached-feature path alike).
    """
    if best_score is None or score > best_score:
        return True
    if score < best_score or loss is None:
        return False
    return best_loss is None or loss < best_loss


class BestAndLastCheckpoint(pl.Callback):
    """``best.ckpt``: the epoch with the highest accuracy, ties going to the lower loss; ``last.ckpt``: every epoch.

    Why not Lightning's ``ModelCheckpoint``: it keeps the *first* epoch of a
    tie, and a few hundred validation images tie often (accuracy moves in
    steps of one image), so a one-cycle run kept an epoch from the middle of
    its schedule, at high learning rate, over the annealed last epoch with the
    same accuracy and a lower loss. And since Lightning 2.6 its ``save_last``
    only writes when a best checkpoint was written in that step, so a killed
    run resumed from its last *improvement*, not its last epoch.

    Args:
        dirpath: the run's ``checkpoints`` folder.
        monitor: the accuracy to maximise (``val_acc``; ``train_acc`` without a validation split).
        tiebreak: the loss that decides ties (``val_loss`` / ``train_loss``).
    """

    def __init__(self, dirpath: Path, monitor: str = "val_acc", tiebreak: str = "val_loss") -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.tiebreak = monitor, tiebreak
        self.best_score: float | None = None
        self.best_loss: float | None = None
        self.best_epoch: int | None = None
        self._saving_epoch: int | None = None  # set only while _save writes, so mid-epoch saves record None

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        score = metrics.get(self.monitor)
        self._saving_epoch = trainer.current_epoch + 1
        try:
            if score is not None:
                loss = metrics.get(self.tiebreak)
                value, loss_value = float(score), (float(loss) if loss is not None else None)
                if improves(value, loss_value, self.best_score, self.best_loss):
                    self.best_score, self.best_loss, self.best_epoch = value, loss_value, trainer.current_epoch + 1
                    save_checkpoint_atomic(trainer, self.best_path)
            save_checkpoint_atomic(trainer, self.last_path)
        finally:
            self._saving_epoch = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor.startswith("val_"):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.monitor.startswith("val_"):
            self._save(trainer)

    def restore_from_files(self, metrics_csv: Path) -> None:
        """Recover the kept epoch from ``best.ckpt`` and its row of ``metrics.csv``.

        For resuming from a ``last.ckpt`` that carries no state of this
        callback (written before it existed, by Lightning's ``ModelCheckpoint``):
        without it the first epoch after resuming would count as an
        improvement and replace a better ``best.ckpt``. A checkpoint that does
        carry the state needs none of this (Lightning calls
        :meth:`load_state_dict` with it).
        """
        if not self.best_path.is_file() or not Path(metrics_csv).is_file():
            return
        best = read_checkpoint(self.best_path, needs=())  # only its epoch is read
        if not isinstance(best, dict):  # an unreadable best.ckpt has nothing to keep: the next epoch replaces it
            return
        epoch = int(best.get("epoch", -1)) + 1
        with open(metrics_csv, newline="") as fh:
            row = next((r for r in csv.DictReader(fh) if r.get("epoch") == str(epoch)), None)
        if row is None or not row.get(self.monitor):
            return
        self.best_score, self.best_epoch = float(row[self.monitor]), epoch
        self.best_loss = float(row[self.tiebreak]) if row.get(self.tiebreak) else None

    def epochs_done(self, state: dict[str, Any]) -> int:
        """How many epochs a checkpoint (``torch.load``-ed) has finished, i.e. the rows of ``metrics.csv`` to keep.

        Why not Lightning's ``epoch_progress``: this callback writes
        ``last.ckpt`` at the end of an epoch's validation, before Lightning
        counts the epoch as processed, so the progress says E-1 for a
        checkpoint of epoch E, and trusting it dropped epoch E's row on
        resume. The callback records the epoch it saved at (``None`` for a
        save in the middle of an epoch, e.g. on Ctrl-C); checkpoints from
        before it did read the loops' progress: an epoch whose last batch and
        whose validation both finished counts as done.
        """
        own = (state.get("callbacks") or {}).get(self.state_key) or {}
        if own.get("saved_at_epoch_end"):
            return int(own["saved_at_epoch_end"])
        try:
            fit = state["loops"]["fit_loop"]
            processed = int(fit["epoch_progress"]["current"]["processed"])
            started = int(fit["epoch_progress"]["current"]["started"])
            val = fit.get("epoch_loop.val_loop.batch_progress", {}).get("current", {})
            validated = int(val.get("ready", 0)) > 0 and val.get("completed") == val.get("ready")
            last_batch = bool(fit.get("epoch_loop.batch_progress", {}).get("is_last_batch"))
        except (KeyError, TypeError, ValueError):
            return int(state.get("epoch", -1)) + 1
        return processed + 1 if started > processed and last_batch and validated else processed

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "saved_at_epoch_end": self._saving_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_loss = state_dict.get("best_loss")
        self.best_epoch = state_dict.get("best_epoch")


class EpochMetricsCSV(pl.Callback):
    """Write ``metrics.csv`` after each validated epoch, with images/s of training."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.echo = echo
        self._t0 = 0.0
        self._images = 0
        self._started: int | None = None  # the epoch whose training this process saw begin

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._images = 0
        self._started = trainer.current_epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += int(batch[1].shape[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._started != trainer.current_epoch:
            # Resuming from a checkpoint written at an epoch's validation end, Lightning replays that
            # epoch's end with no metrics; its row was written by the process that trained it.
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
            save_checkpoint_atomic(trainer, self.path)
