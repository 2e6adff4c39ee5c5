"""The general training path: Lightning Trainer, checkpoints, resume, scale-out.

Everything here is Lightning's own machinery configured from the run config:
``BestAndLastCheckpoint`` (best by validation accuracy, ties to the lower loss; last every epoch), ``EarlyStopping``,
EMA weight averaging, gradient clipping, mixed precision on GPU, and
``fit(ckpt_path=last.ckpt)`` to resume. ``trainer.devices/num_nodes/strategy``
pass straight through, so DDP under torchrun or SLURM needs no extra code.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, RichProgressBar

from leuko.data.pipeline import DecodedCache, SampleDataset, make_loader
from leuko.errors import LeukoError
from leuko.run.config import RunConfig
from leuko.run.data import (
    PreparedData,
    balanced_class_weights,
    run_transform,
    sampler_weights,
)
from leuko.run.folder import RunFolder
from leuko.train.callbacks import (
    BestAndLastCheckpoint,
    EpochMetricsCSV,
    SaveOnInterrupt,
    read_checkpoint,
    truncate_metrics,
)
from leuko.train.distill import teacher_targets
from leuko.train.module import LeukoClassifier
from leuko.train.result import TrainResult

log = logging.getLogger("leuko.train")


def class_weights_for(targets: list[int], n_classes: int) -> torch.Tensor:
    """:func:`leuko.run.data.balanced_class_weights` as the float32 tensor a loss takes."""
    return torch.tensor(balanced_class_weights(targets, n_classes), dtype=torch.float32)


def resume_checkpoint(run: RunFolder, echo: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """``(path, contents)`` of the checkpoint to resume from: ``last.ckpt``, or ``best.ckpt`` if that one is unreadable.

    Checkpoints are written atomically now, but a run killed mid-write by an
    older leuko (or a disk that filled up) has a broken ``last.ckpt``; its
    ``best.ckpt`` still carries everything a resume needs, from an earlier
    epoch, so the run loses those epochs rather than everything.
    """
    last = read_checkpoint(run.last_ckpt)
    if isinstance(last, dict):
        return run.last_ckpt, last
    best = read_checkpoint(run.best_ckpt) if run.best_ckpt.is_file() else "missing"
    if isinstance(best, dict):
        echo(f"warning: {run.last_ckpt} cannot be read ({last}); resuming from {run.best_ckpt} instead (the epochs after it run again)")
        return run.best_ckpt, best
    raise LeukoError(f"cannot resume {run.path}: {run.last_ckpt.name} cannot be read ({last}) and best.ckpt is {best if best == 'missing' else 'unreadable too'}")


def build_loaders(
    model: torch.nn.Module, cfg: RunConfig, data: PreparedData, soft_targets: np.ndarray | None = None
) -> tuple[Any, Any | None]:
    """Train and validation DataLoaders (decoded-image cache, augmentation, balanced sampling).

    ``soft_targets``: a teacher's answers on ``data.train`` (:mod:`leuko.train.distill`), served with each item.
    """
    info = model.leuko_info  # type: ignore[attr-defined]
    c2i = {c: i for i, c in enumerate(data.classes)}
    t_train = run_transform(cfg.data, info, train=True, seed=cfg.train.seed)
    t_eval = run_transform(cfg.data, info, train=False)
    cache: Any = cfg.data.cache
    if cfg.data.cache:

        cache = DecodedCache(data.train + data.val, t_train.preprocess)
    train_ds = SampleDataset(data.train, c2i, cfg.data.image_size, transform=t_train, cache=cache, soft_targets=soft_targets)
    loader_kw: dict[str, Any] = {"num_workers": cfg.data.num_workers, "seed": cfg.train.seed}
    w = sampler_weights(cfg.train, data.train, train_ds.targets, len(data.classes))
    if w is not None:  # balanced, or sources: classes, then labs within a class
        gen = torch.Generator().manual_seed(cfg.train.seed)
        sampler = torch.utils.data.WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples=len(train_ds),
                                                         replacement=True, generator=gen)
        train_loader = make_loader(train_ds, cfg.train.batch_size, sampler=sampler, **loader_kw)
    else:
        train_loader = make_loader(
            train_ds, cfg.train.batch_size, shuffle=cfg.train.shuffle, drop_last=len(train_ds) > cfg.train.batch_size, **loader_kw
        )
    val_loader = None
    if data.val:
        val_ds = SampleDataset(data.val, c2i, cfg.data.image_size, transform=t_eval, cache=cache)
        val_loader = make_loader(val_ds, max(cfg.train.batch_size, 64), shuffle=False, num_workers=cfg.data.num_workers)
    return train_loader, val_loader


def _precision(cfg: RunConfig) -> str:
    if cfg.trainer.precision:
        return cfg.trainer.precision
    gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return "16-mixed" if gpu else "32-true"


def fit_lightning(
    model: torch.nn.Module,
    cfg: RunConfig,
    data: PreparedData,
    run: RunFolder,
    *,
    resume: bool = False,
    teacher: RunFolder | None = None,
    echo: Callable[[str], None] = print,
):
    """Train ``model`` in place (best weights loaded at the end); returns a :class:`TrainResult`.

    ``teacher``: the run ``train.distill_from`` names, already checked
    (:func:`leuko.train.distill.check_teacher`); it answers the training images once, here.
    """
    soft = None
    if teacher is not None:

        device = "cpu" if cfg.trainer.accelerator == "cpu" else None
        soft = teacher_targets(teacher, data.train, data.classes, cfg.train.distill_temperature, device=device, echo=echo)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    train_loader, val_loader = build_loaders(model, cfg, data, soft)
    weights = class_weights_for(train_loader.dataset.targets, len(data.classes)) if cfg.train.class_weights == "balanced" else None
    module = LeukoClassifier(model, cfg, data.classes, class_weights=weights, steps_per_epoch=len(train_loader))
    has_val = val_loader is not None
    ckpt = BestAndLastCheckpoint(run.checkpoints, "val_acc" if has_val else "train_acc", "val_loss" if has_val else "train_loss")
    interactive = cfg.trainer.progress and os.isatty(1) and not os.environ.get("CI")
    callbacks: list[pl.Callback] = [ckpt, EpochMetricsCSV(run.metrics, None if interactive else echo), SaveOnInterrupt(run.last_ckpt)]
    if cfg.train.early_stopping:
        callbacks.append(EarlyStopping(monitor="val_loss" if val_loader is not None else "train_loss", patience=cfg.train.early_stopping, mode="min"))
    if cfg.train.ema:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(decay=cfg.train.ema))
    if interactive:
        callbacks.append(RichProgressBar())
    trainer = pl.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=_precision(cfg),  # type: ignore[arg-type]
        deterministic=cfg.trainer.deterministic,
        gradient_clip_val=cfg.train.grad_clip,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,  # BestAndLastCheckpoint writes them; Lightning's default would add epoch=N files
        default_root_dir=str(run.path),
        enable_progress_bar=interactive,
        enable_model_summary=False,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
        max_time=cfg.trainer.max_time,
        num_sanity_val_steps=0,
    )
    ckpt_path = None
    if resume:
        path, state = resume_checkpoint(run, echo)
        ckpt_path = str(path)
        done = ckpt.epochs_done(state)
        truncate_metrics(run.metrics, done)
        if ckpt.state_key not in (state.get("callbacks") or {}):  # written before this callback existed
            ckpt.restore_from_files(run.metrics)
        echo(f"resuming from {path} ({done} of {cfg.train.epochs} epochs done)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*treat_batch_as_tensor.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen BatchNorm, on purpose
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    if trainer.interrupted:

        raise LeukoError(f"training interrupted; continue with: leuko train --resume {run.path}", exit_code=130)
    best_epoch = trainer.current_epoch
    best_val = None
    if ckpt.best_epoch is not None and ckpt.best_path.exists():
        state = torch.load(ckpt.best_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        best_epoch = ckpt.best_epoch
        best_val = ckpt.best_score
    ips = None
    try:
        import pandas as pd

        df = pd.read_csv(run.metrics)
        ips = float(df["images_per_s"].median())
    except Exception:  # metrics file optional for the result
        pass
    return TrainResult(run.path, best_epoch, best_val, trainer.current_epoch, 0.0, "lightning", ips)

