"""The Lightning module: what one training step is, and how the optimiser is set up.

The transfer-learning recipes of the studies are all expressed here as
optimiser parameter groups (backbone vs new head, the head's learning-rate
factor), learning-rate schedules stepped per optimiser step, and freezing
decisions taken from :mod:`leuko.models`. Data loading, checkpoints and
logging live elsewhere (datamodule, callbacks).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from leuko.run.config import RunConfig
from leuko.train.distill import distill_loss


class LeukoClassifier(pl.LightningModule):
    """A classifier network plus its training recipe.

    Args:
        model: the network (from :func:`leuko.models.build_model`).
        config: the validated run config (optimiser, schedule, freezing).
        class_names: class order of the outputs.
        class_weights: per-class loss weights (``train.class_weights: balanced``).
        steps_per_epoch: optimiser steps per epoch, for per-step schedules.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        class_names: list[str],
        class_weights: torch.Tensor | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.class_names = list(class_names)
        self.steps_per_epoch = max(1, steps_per_epoch)
        if class_weights is not None:
            self.register_buffer("class_weights", class_weights.float())
        else:
            self.class_weights = None
        self._frozen_for_stage_one = False
        if config.train.mixstyle > 0:  # training-time only: hooks on the stages, nothing in the state dict
            from leuko.train.mixstyle import attach_mixstyle

            self.mixstyle, self._mixstyle_hooks = attach_mixstyle(
                model, config.train.mixstyle, config.train.mixstyle_alpha, config.train.mixstyle_stages)
        self._last_step_time: float | None = None
        self.save_hyperparameters({"config": config.model_dump(mode="json"), "class_names": self.class_names})

    # ------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.trainer.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def on_fit_start(self) -> None:
        if self.config.trainer.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits, y, weight=self.class_weights, label_smoothing=self.config.train.label_smoothing
        )

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *soft = batch  # a third item: the teacher's answers (train.distill_from)
        logits = self(x)
        loss = self._loss(logits, y)
        if soft:
            w = self.config.train.distill_weight
            loss = (1.0 - w) * loss + w * distill_loss(logits, soft[0], self.config.train.distill_temperature)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("img/s", len(y) / max(1e-9, now - self._last_step_time), on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y))
        self._last_step_time = now
        return loss

    def on_train_epoch_end(self) -> None:
        self._last_step_time = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", acc, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    # ------------------------------------------------------ two-stage
    def on_train_epoch_start(self) -> None:
        from leuko.models import freeze

        stage_one = self.current_epoch < self.config.model.two_stage_epochs
        if stage_one and not self._frozen_for_stage_one:
            freeze(self.model, "backbone")
            self._frozen_for_stage_one = True
        elif not stage_one and self._frozen_for_stage_one:
            freeze(self.model, self.config.model.freeze)
            self._frozen_for_stage_one = False

    # ------------------------------------------------------ optimiser
    def configure_optimizers(self) -> Any:
        from leuko.models import split_params

        cfg = self.config.train
        backbone, head = split_params(self.model)
        # Two-stage runs unfreeze later: keep every parameter in the optimiser
        # from the start (a frozen one simply gets no gradient).
        keep_all = self.config.model.two_stage_epochs > 0
        backbone = [p for p in backbone if keep_all or p.requires_grad]
        head = [p for p in head if keep_all or p.requires_grad]
        head_lr = cfg.lr * self.config.model.head_lr_factor
        groups = []
        if backbone:
            groups.append({"params": backbone, "lr": cfg.lr, "name": "backbone"})
        if head:
            groups.append({"params": head, "lr": head_lr, "name": "head"})
        opt = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        total = self.steps_per_epoch * cfg.epochs
        sched = build_scheduler(opt, self.config, self.steps_per_epoch, total)
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam, AdamW or RMSprop over parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, eps 1e-7) as in the EfficientNet-B3 study.
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-7, momentum=0.0, weight_decay=weight_decay)
    raise ValueError(name)


def lr_factor(step: int, config: RunConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rates at optimiser ``step`` (warm-up included)."""
    cfg = config.train
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    if cfg.schedule == "exponential":
        # Keras ExponentialDecay(decay_steps, decay_rate), staircase=False
        return cfg.decay_rate ** (step / cfg.decay_steps)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warm)
        t = min(1.0, (step - warm) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        # linear warm-up over the first 30%, cosine anneal to ~0 after
        up = max(1, int(0.3 * total_steps))
        if step < up:
            return 0.04 + 0.96 * step / up
        t = min(1.0, (step - up) / max(1, total_steps - up))
        return 0.5 * (1.0 + math.cos(math.pi * t)) + 1e-4
    raise ValueError(cfg.schedule)


def build_scheduler(
    opt: torch.optim.Optimizer, config: RunConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step LambdaLR implementing :func:`lr_factor` (None for constant without warm-up)."""
    if config.train.schedule == "constant" and config.train.warmup_epochs == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, config, steps_per_epoch, total_steps)
    )
