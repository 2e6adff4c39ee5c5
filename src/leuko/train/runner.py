"""``leuko train``: from a config to a finished run folder.

:func:`train` is the one entry point (the CLI calls it; so can a notebook).
It resolves the data and the split, builds the model, then either trains
through Lightning (augmentation, fine-tuning, any recipe) or, when the
backbone is frozen and nothing is augmented, through the frozen-feature fast
path (:mod:`leuko.train.features`). Both write the same run folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from leuko.data.audit import leakage_warning, split_leakage
from leuko.data.transforms import AUGMENT_VERSIONS
from leuko.errors import LeukoError
from leuko.infer.calibrate import calibrate
from leuko.infer.review import ReviewPolicy
from leuko.models import build_model, freeze, model_info
from leuko.run.card import InputSpec, ModelCard, ModelKind, NetworkSpec
from leuko.run.config import RunConfig, config_from_dict, load_config
from leuko.run.data import PreparedData, prepare_data
from leuko.run.folder import RunFolder, save_model
from leuko.train.distill import check_teacher
from leuko.train.result import TrainResult

log = logging.getLogger("leuko.train")


def resolve_pretrained(config: RunConfig) -> str:
    """``auto`` → the model's own default: ``bundled`` for models with offline weights,
    ``none`` for ``custom_cnn``, else ``imagenet`` (which needs the internet)."""
    if config.model.pretrained != "auto":
        return config.model.pretrained
    return model_info(config.model.name).default_pretrained


def uses_feature_path(config: RunConfig) -> bool:
    """Frozen backbone, no augmentation, no two-stage: the head can train on cached features."""
    mode = config.train.fast_features
    if mode == "off":
        return False
    eligible = (
        config.model.freeze == "backbone"
        and config.data.augment == "none"
        and config.model.two_stage_epochs == 0
        and config.train.ema is None
        and config.train.distill_from is None
        and config.train.mixstyle == 0
    )
    if mode == "on" and not eligible:
        raise LeukoError(
            "train.fast_features=on needs model.freeze=backbone, data.augment=none, no two-stage, no EMA, no distillation and no MixStyle"
        )
    return eligible


def global_rank() -> int:
    """This process's rank under DDP launchers (Lightning's, torchrun, SLURM); 0 when alone.

    Under DDP every rank runs this same function: only rank 0 creates and
    writes the run folder; the others wait for it and train.
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    local = os.environ.get("LOCAL_RANK", "")
    node = os.environ.get("NODE_RANK", "0")
    if local.isdigit():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
        return int(node or 0) * per_node + int(local) if node.isdigit() else int(local)
    return 0


def _augment_record(augment: str) -> dict[str, Any]:
    """What ``data.json`` keeps of the augmentation: the preset and the version of its ops."""
    return {"preset": augment, "version": AUGMENT_VERSIONS.get(augment)}


def _check_augment_version(run: RunFolder, augment: str, echo: Callable[[str], None]) -> None:
    """Warn when a resumed run's remaining epochs will use other augmentation ops than its first ones."""
    before = run.read_json("data.json").get("augment") if run.data.is_file() else None
    now = _augment_record(augment)
    if before != now:
        was = f"the {before['preset']!r} augmentation v{before['version']}" if before else f"an unrecorded version of {augment!r}"
        echo(f"warning: this run started with {was}; the resumed epochs use {augment!r} v{now['version']} (this leuko's)")


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise LeukoError(f"rank {global_rank()}: {path} did not appear; is rank 0 running?")
        time.sleep(0.2)


def _setup_logging(run: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(run.log, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("leuko", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    # Lightning's start-up chatter (GPU/TPU availability, product tips) is not for our users' consoles.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    for name in ("leuko", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def warn_leakage(data: PreparedData, warn: Callable[[str], None]) -> int:
    """Loudly warn when training images have exact or near copies in val/test; returns the pair count.

    Uses the fast audit stages (file bytes, perceptual hash + pixel check);
    ``leuko data audit`` adds embeddings for rotated/sheared copies.
    """
    held_out = data.val + data.test
    if not held_out:
        return 0
    pairs = split_leakage(data.train, held_out)
    message = leakage_warning(pairs, sides=("train", "val/test"), n_b=len(held_out))
    if message:
        log.warning(message)
        warn(message)
    return len(pairs)


def train(
    config: RunConfig | str | Path | None,
    out: str | Path,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    data_path: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    check_leakage: bool = True,
) -> TrainResult:
    """Train a classifier and write a run folder at ``out``.

    Args:
        config: a :class:`RunConfig`, a YAML path, or ``None`` for defaults.
        overrides: ``key=value`` strings applied on top (``train.lr=1e-4``).
        data_path: dataset location (beats ``data.path``).
        overwrite: replace an existing run folder.
        resume: continue the run in ``out`` from its last checkpoint (its own
            config and split are used; ``overrides`` may extend ``train.epochs``).
        echo: where progress lines go (the CLI passes Rich's print).
    """
    t0 = time.perf_counter()
    rank = global_rank()
    if rank > 0:
        echo = lambda _msg: None  # noqa: E731 - only rank 0 talks
        check_leakage = False
    if resume:
        run = RunFolder.open(out)
        cfg = load_config(run.config, overrides)
        split_file: Path | None = run.split
        if run.model.is_file():  # resuming would only rewrite the finished model
            raise LeukoError(f"run {run.path} already finished (model.pt exists); nothing to resume")
        if not run.last_ckpt.is_file():
            raise LeukoError(f"run {run.path} has no checkpoint to resume from (it stopped before the first epoch ended)")
    else:
        cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
        if isinstance(config, RunConfig) and overrides:

            cfg = config_from_dict(config.model_dump(mode="json"), overrides)
        # Validate everything that can fail before creating the run folder.

        model_info(cfg.model.name)
        split_file = None
        run = None  # type: ignore[assignment]

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    data = prepare_data(cfg.data, seed=cfg.train.seed, data_path=data_path, split_file=split_file)
    teacher = None
    if cfg.train.distill_from:

        teacher = check_teacher(cfg.train.distill_from, data)  # before the run folder exists
    pretrained = resolve_pretrained(cfg)
    from lightning.fabric.utilities.seed import seed_everything


    seed_everything(cfg.train.seed, workers=True, verbose=False)  # the new head's init is part of the run
    model = build_model(
        cfg.model.name,
        num_classes=len(data.classes),
        pretrained=pretrained,
        head=cfg.model.head,
        dropout=cfg.model.dropout,
    )
    freeze(model, cfg.model.freeze)

    if not resume and rank > 0:
        run = RunFolder(Path(out).expanduser())
        _wait_for(run.data)  # rank 0 writes data.json last, atomically
    elif not resume:
        run = RunFolder.create(out, overwrite=overwrite)
        resolved = cfg.model_copy(deep=True)
        if data_path is not None:
            resolved.data.path = str(Path(data_path).resolve())
        elif resolved.data.sources:  # each source's own path, made absolute so the run evaluates from anywhere
            resolved.data.sources = [s.model_copy(update={"path": str(Path(s.path).expanduser().resolve())}) for s in resolved.data.sources]
        elif resolved.data.path is None:
            resolved.data.path = str(data.index.root.resolve())
        run.config.write_text(resolved.to_yaml())
        data.split.save(run.split)
        run.write_json("classes.json", data.classes)
        run.write_json("data.json", {**data.summary(), "augment": _augment_record(cfg.data.augment)})
    if resume and rank == 0:
        _check_augment_version(run, cfg.data.augment, echo)
    handler = _setup_logging(run) if rank == 0 else logging.NullHandler()
    try:
        counts = data.summary()["counts"]
        echo(
            f"data: {data.index.layout} at {data.index.root} — train {len(data.train)}, val {len(data.val)}, "
            f"test {len(data.test)} images, {len(data.classes)} classes ({data.split.preset}"
            f"{', grouped' if data.split.grouped else ''})"
        )
        log.info("data counts: %s", counts)
        if check_leakage and not resume:
            n = warn_leakage(data, echo)
            run.write_json("leakage.json", {"train_vs_heldout_pairs": n})
        info = model.leuko_info  # type: ignore[attr-defined]
        echo(f"model: {cfg.model.name} ({pretrained} weights, head {cfg.model.head}, freeze {cfg.model.freeze}) at {cfg.data.image_size}px")
        if uses_feature_path(cfg):

            from leuko.train.features import (
                train_head_on_features,  # Lightning: imported only when a loop runs
            )

            result = train_head_on_features(model, cfg, data, run, echo=echo)
        else:

            from leuko.train.lightning_fit import (
                fit_lightning,  # Lightning: imported only when a loop runs
            )

            result = fit_lightning(model, cfg, data, run, resume=resume, teacher=teacher, echo=echo)
        if rank == 0:
            card = new_card(cfg, data.classes, info, pretrained)
            calibration = calibrate(model, cfg, data, info)
            if calibration:
                card = card.with_(temperature=calibration["temperature"], review=calibration["review"])
                echo(
                    f"calibration on {calibration['n']} validation images: temperature {calibration['temperature']:.3f}, "
                    f"ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}"
                )
                echo(ReviewPolicy.from_card(card).describe())
            save_model(run.model, model, card)
            result.wall_time_s = time.perf_counter() - t0
            run.write_json("summary.json", {**result.to_dict(), "calibration": calibration})
        return result
    finally:
        if rank == 0:
            _teardown_logging(handler)


def new_card(cfg: RunConfig, classes: list[str], info: Any, pretrained: str) -> ModelCard:
    """The card of a freshly trained network (temperature 1 until :func:`~leuko.infer.calibrate.calibrate`)."""
    return ModelCard(
        kind=ModelKind.NETWORK,
        model=NetworkSpec(name=cfg.model.name, head=cfg.model.head, dropout=cfg.model.dropout, pretrained=pretrained),
        classes=list(classes),
        input=InputSpec(image_size=cfg.data.image_size, resize=cfg.data.resize, preprocess=list(cfg.data.preprocess),
                        mean=tuple(info.mean), std=tuple(info.std)),
        temperature=1.0,
    )
