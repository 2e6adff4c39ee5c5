"""The frozen-backbone fast path: features once, cached on disk; the head trains in seconds.

With a frozen backbone (BatchNorm in inference mode, as Keras does for a
``trainable=False`` base) and no augmentation, every epoch feeds the head the
same features. Computing them once, and caching them keyed by everything that
determines them, turns a 60-epoch "frozen DenseNet + Dense 128" study into
one forward pass over the data plus seconds of head training. The head is
trained with exactly the optimiser, learning rate, schedule, batch size and
epochs of the config, so results match the general path's recipe.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from leuko.data.pipeline import SampleDataset, make_loader
from leuko.data.preprocess import step_versions
from leuko.data.samples import Sample
from leuko.paths import cache_dir
from leuko.run.config import RunConfig
from leuko.run.data import PreparedData, run_transform, sampler_weights
from leuko.run.folder import RunFolder
from leuko.train.callbacks import append_metrics_row, improves
from leuko.train.lightning_fit import class_weights_for
from leuko.train.module import build_optimizer, lr_factor
from leuko.train.result import TrainResult

log = logging.getLogger("leuko.train")
FEATURE_FORMAT = 1


def head_module(model: nn.Module) -> nn.Module:
    """The head installed by :func:`leuko.models.build_model` (its input is the feature vector)."""
    return model.get_submodule(model.leuko_build.head_path)  # type: ignore[attr-defined]


def feature_key(model: nn.Module, cfg: RunConfig, samples: Sequence[Sample]) -> str:
    """Hash of everything that determines the features: weights, preprocessing, files."""
    build = model.leuko_build  # type: ignore[attr-defined]
    h = hashlib.sha256()
    weights = str(build.pretrained)
    p = Path(weights)
    if p.is_file():
        st = p.stat()
        weights += f"|{st.st_size}|{st.st_mtime_ns}"
    info = model.leuko_info  # type: ignore[attr-defined]
    ident = {
        "v": FEATURE_FORMAT,
        "arch": build.arch,
        "head": build.head,  # dense heads see conv features, linear ones (AlexNet/VGG) the MLP's
        "weights": weights,
        "size": cfg.data.image_size,
        "resize": cfg.data.resize,
        "pre": list(cfg.data.preprocess),
        "mean": list(info.mean),
        "std": list(info.std),
    }
    versions = step_versions(cfg.data.preprocess)
    if versions:  # only then, so keys of runs without such steps stay valid
        ident["step_versions"] = versions
    h.update(json.dumps(ident, sort_keys=True).encode())
    for s in sorted(samples, key=lambda s: s.key):
        try:
            st = s.path.stat()
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{s.key}|{sig}\n".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_features(model: nn.Module, samples: Sequence[Sample], cfg: RunConfig, batch_size: int = 64) -> torch.Tensor:
    """Inputs of the head for each sample, in order (model in eval mode, no augmentation)."""
    info = model.leuko_info  # type: ignore[attr-defined]
    transform = run_transform(cfg.data, info, train=False)
    labels = sorted({s.label for s in samples})
    ds = SampleDataset(samples, {c: i for i, c in enumerate(labels)}, cfg.data.image_size, transform=transform, cache=cfg.data.cache)
    loader = make_loader(ds, batch_size, shuffle=False, num_workers=cfg.data.num_workers, persistent_workers=False)
    head = head_module(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    # channels-last runs the depthwise/pointwise convolutions of mobile nets ~2x faster on CPU
    model.to(memory_format=torch.channels_last)
    try:
        for x, _ in loader:
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        hook.remove()
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return torch.cat(captured) if captured else torch.empty(0)


def cached_features(model: nn.Module, samples: Sequence[Sample], cfg: RunConfig, echo: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """Features by sample key, from ``cache_dir()/features`` when already computed."""
    key = feature_key(model, cfg, samples)
    path = cache_dir() / "features" / f"{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            echo(f"features: reusing cache {path.name} ({len(blob['keys'])} images)")
            return dict(zip(blob["keys"], blob["features"]))
        except Exception:  # a corrupt cache is rebuilt, not trusted
            log.warning("feature cache %s unreadable; recomputing", path)
    t0 = time.perf_counter()
    ordered = sorted(samples, key=lambda s: s.key)
    feats = compute_features(model, ordered, cfg)
    dt = time.perf_counter() - t0
    echo(f"features: {len(ordered)} images in {dt:.1f}s ({len(ordered) / max(dt, 1e-9):.0f} images/s), cached as {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"keys": [s.key for s in ordered], "features": feats}, tmp)
    tmp.replace(path)
    return {s.key: f for s, f in zip(ordered, feats)}


def _stack(samples: Sequence[Sample], feats: dict[str, torch.Tensor], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    c2i = {c: i for i, c in enumerate(classes)}
    if not samples:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    x = torch.stack([feats[s.key] for s in samples])
    y = torch.tensor([c2i[s.label] for s in samples], dtype=torch.long)
    return x, y


def train_head_on_features(model: nn.Module, cfg: RunConfig, data: PreparedData, run: RunFolder, *, echo: Callable[[str], None] = print):
    """Train only the head on cached features; the best head (by val accuracy) is left in ``model``."""
    torch.manual_seed(cfg.train.seed)
    feats = cached_features(model, data.train + data.val + data.test, cfg, echo)
    x_tr, y_tr = _stack(data.train, feats, data.classes)
    x_va, y_va = _stack(data.val, feats, data.classes)
    head = head_module(model)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad] or list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    tc = cfg.train
    opt = build_optimizer([{"params": params, "lr": tc.lr * cfg.model.head_lr_factor}], tc.optimizer, tc.lr, tc.momentum, tc.weight_decay)
    n = len(x_tr)
    bs = min(tc.batch_size, n)
    steps_per_epoch = max(1, n // bs) if n > bs else 1
    total = steps_per_epoch * tc.epochs
    base_lrs = [g["lr"] for g in opt.param_groups]
    weights = class_weights_for(y_tr.tolist(), len(data.classes)) if tc.class_weights == "balanced" else None
    w_draw = sampler_weights(tc, data.train, y_tr.tolist(), len(data.classes))
    draw = None if w_draw is None else torch.as_tensor(w_draw, dtype=torch.float32)
    gen = torch.Generator().manual_seed(tc.seed)
    best_acc, best_state, best_epoch, bad_epochs = -1.0, copy.deepcopy(head.state_dict()), 0, 0
    best_loss = float("inf")  # for early stopping
    best_acc_loss: float | None = None  # the kept epoch's loss, which breaks accuracy ties
    step = 0
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        head.train()
        if draw is not None:  # balanced, or sources: classes, then labs within a class
            order = torch.multinomial(draw, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        tot_loss, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(step, cfg, steps_per_epoch, total)
            logits = head(x_tr[idx])
            loss = F.cross_entropy(logits, y_tr[idx], weight=weights, label_smoothing=tc.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            step += 1
            tot_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_tr[idx]).sum())
            seen += len(idx)
        head.eval()
        row = {"epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": correct / seen, "lr": opt.param_groups[0]["lr"]}
        score = row["train_acc"]
        if len(x_va):
            with torch.no_grad():
                lv = head(x_va)
                row["val_loss"] = float(F.cross_entropy(lv, y_va))
                row["val_acc"] = float((lv.argmax(1) == y_va).float().mean())
            score = row["val_acc"]
        dt = time.perf_counter() - t0
        row["images_per_s"] = seen / max(dt, 1e-9)
        row["epoch_time_s"] = dt
        append_metrics_row(run.metrics, row)
        monitor_loss = row.get("val_loss", row["train_loss"])
        if improves(score, monitor_loss, best_acc, best_acc_loss):
            best_acc, best_acc_loss, best_state, best_epoch = score, monitor_loss, copy.deepcopy(head.state_dict()), epoch + 1
        if monitor_loss < best_loss - 1e-6:
            best_loss, bad_epochs = monitor_loss, 0
        else:
            bad_epochs += 1
        if tc.early_stopping and bad_epochs >= tc.early_stopping:
            echo(f"early stopping after epoch {epoch + 1}")
            break
        if (epoch + 1) % max(1, tc.epochs // 10) == 0 or epoch + 1 == tc.epochs:
            va = f", val acc {row['val_acc']:.4f}" if "val_acc" in row else ""
            echo(f"epoch {epoch + 1}/{tc.epochs}: train loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}{va}")
    head.load_state_dict(best_state)
    head.eval()
    return TrainResult(run.path, best_epoch, best_acc if len(x_va) else None, epoch + 1, 0.0, "features", None)
