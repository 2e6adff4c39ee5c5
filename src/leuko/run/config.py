"""The training configuration: one validated schema, loaded from YAML plus ``key=value`` overrides.

Every key a study config may set lives here with its type, range and
default, so a typo or a negative learning rate is caught before any image is
read, with one line naming the key (Ultralytics-style ``--set a.b=value``
overrides go through the same validation).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from leuko.errors import LeukoError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CLASS_SETS: dict[str, list[str]] = {
    "five": ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"],
    "pbc8": ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"],
}
"""Names ``data.classes`` accepts for a common class set: the five white-cell types every lab labels, or PBC's 8."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SourceConfig(_Strict):
    """One dataset (one lab, or part of one) of a run that reads several (``data.sources``)."""

    path: str = Field(..., description="Dataset folder or CSV manifest (relative to the working directory).")
    layout: Optional[str] = Field(None, description="Layout name; detected when omitted.")
    layout_options: dict[str, Any] = Field(default_factory=dict, description="Extra layout options, e.g. {margin: 0.2} for bccd.")
    class_map: Optional[str] = Field(None, description="Class map (file or shipped name, e.g. pbc-to-five) from this source's labels onto data.classes: merged labels are renamed, excluded ones dropped.")
    name: Optional[str] = Field(None, description="Name of the source (default: the folder name).")
    lab: Optional[str] = Field(None, description="The lab it comes from (default: its name); sources sharing a lab are one lab for splitting by lab, balancing and leave-one-lab-out (Mooney's copies of BCCD cells: lab: bccd).")
    source_splits: Optional[list[str]] = Field(None, description="Keep only these of the dataset's own splits (e.g. [TRAIN, TEST_SIMPLE] for Mooney).")
    train_only: bool = Field(False, description="Every image goes to training, none to validation or test; left out with its lab. For copies of another source's cells that file names cannot tie to them (Mooney).")

    @field_validator("name", "lab")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _NAME.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names folders)")
        return v

    @property
    def source_name(self) -> str:
        return self.name or Path(self.path).name

    @property
    def lab_name(self) -> str:
        return self.lab or self.source_name


class DataConfig(_Strict):
    """Where the images come from and how they are prepared."""

    path: Optional[str] = Field(None, description="Dataset folder or CSV manifest (or --data).")
    dataset: str = Field("pbc", description="Name used to find the data when path is not given (pbc, mooney, bccd, cnmc).")
    layout: Optional[str] = Field(None, description="Layout name; detected when omitted.")
    layout_options: dict[str, Any] = Field(default_factory=dict, description="Extra layout options, e.g. {margin: 0.2} for bccd.")
    source_splits: Optional[list[str]] = Field(None, description="Keep only these source splits (e.g. [TRAIN, TEST] for Mooney).")
    classes: Optional[list[str]] = Field(None, description="Keep only these classes (in this order); with sources: the common classes every source's labels map onto. A list, or five / pbc8.")
    sources: Optional[list[SourceConfig]] = Field(None, description="Several datasets (labs) at once, each with path, layout and class_map; replaces path/dataset/layout/layout_options/source_splits.")
    leave_out: Optional[str] = Field(None, description="With sources: test on every image of this lab, train and validate (val_fraction) on the other labs ('leuko cv --leave-one-lab-out' sets it).")
    per_class: Optional[int] = Field(None, gt=0, description="Use at most this many images per class (random, seeded; with sources: per class of each source).")
    split: str = Field("holdout-80-10-10", description="Split preset (holdout-70-30, holdout-80-20, holdout-80-10-10, source, kfold-K, group-kfold-K) or a split JSON file.")
    fold: Optional[int] = Field(None, ge=0, description="Which fold to train for a K-fold split.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Validation fraction carved from training when the split has none.")
    split_seed: Optional[int] = Field(None, description="Seed of the split (defaults to train.seed).")
    image_size: int = Field(224, ge=16, le=1024, description="Square input side in pixels.")
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    preprocess: list[str] = Field(default_factory=list, description="Deterministic steps before augmentation, e.g. [clahe], [cell-crop, reinhard].")
    augment: str = Field("none", description="Augmentation preset: none, study, cells, stain.")
    cache: bool = Field(True, description="Cache decoded, resized images on disk.")
    num_workers: Optional[int] = Field(None, ge=0, description="DataLoader worker processes (default: by CPU count).")

    @field_validator("classes", mode="before")
    @classmethod
    def _class_set(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in CLASS_SETS:
                raise ValueError(f"must be a list of class names or one of {', '.join(CLASS_SETS)}")
            return list(CLASS_SETS[v])
        return v

    @model_validator(mode="after")
    def _sources(self) -> "DataConfig":
        if self.sources is None:
            if self.leave_out is not None:
                raise ValueError("data.leave_out needs data.sources (several labs)")
            return self
        if not self.sources:
            raise ValueError("data.sources must list at least one dataset")
        for key in ("path", "layout", "source_splits"):
            if getattr(self, key) is not None:
                raise ValueError(f"data.{key} cannot be combined with data.sources: set it per source")
        if self.layout_options or self.dataset != "pbc":  # (the default dataset is dumped with every config)
            key = "layout_options" if self.layout_options else "dataset"
            raise ValueError(f"data.{key} cannot be combined with data.sources: set it per source")
        if not self.classes:
            raise ValueError("data.sources needs data.classes: the common classes (a list, or five / pbc8)")
        names = [s.source_name for s in self.sources]
        for name in names:
            if not _NAME.match(name):
                raise ValueError(f"data.sources: cannot name a source after {name!r}; give it a name")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.sources: two sources are named {twice[0]!r}; give them distinct names")
        if self.leave_out is not None:
            labs = self.labs()
            if self.leave_out not in labs:
                raise ValueError(f"data.leave_out: no lab named {self.leave_out!r}; labs: {', '.join(labs)}")
            if all(s.train_only for s in self.sources if s.lab_name == self.leave_out):
                raise ValueError(f"data.leave_out: lab {self.leave_out!r} has only train_only sources, nothing to test on")
            if self.fold is not None or "kfold" in self.split:
                raise ValueError("data.leave_out cannot be combined with a K-fold split: the left-out lab is the test set")
        return self

    def labs(self) -> list[str]:
        """The labs of ``sources``, in order of first appearance (empty for one dataset)."""
        return list(dict.fromkeys(s.lab_name for s in self.sources or []))


class ModelConfig(_Strict):
    """Which network, which weights, and what is trained."""

    name: str = "efficientnet_lite0"
    pretrained: str = Field("auto", description="auto (bundled where available, else imagenet), imagenet, bundled, none, or a weights file.")
    head: Literal["linear", "dense128", "bn-dense256"] = "linear"
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    freeze: str = Field("none", description="none | backbone | bn | bn:N | last:N (train only the last N blocks + head; bn:N: all weights, BatchNorm statistics of the last N blocks only).")
    head_lr_factor: float = Field(1.0, gt=0.0, description="Learning-rate multiplier of the new head.")
    two_stage_epochs: int = Field(0, ge=0, description="Train the head alone for this many epochs, then unfreeze (two-stage).")

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str) -> str:
        kind, _, n = v.partition(":")
        if v in ("none", "backbone", "bn") or (kind in ("last", "bn") and n.isdigit() and int(n) > 0):
            return v
        raise ValueError("must be none, backbone, bn, bn:N or last:N with N > 0")


class TrainConfig(_Strict):
    """Optimisation: what the studies tune."""

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "step", "exponential", "cosine", "onecycle"] = "cosine"
    step_size: int = Field(10, ge=1, description="step: epochs between decays.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step: decay factor.")
    decay_steps: int = Field(900, ge=1, description="exponential: optimizer steps per decay (Keras ExponentialDecay).")
    decay_rate: float = Field(0.95, gt=0.0, le=1.0, description="exponential: factor per decay_steps.")
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] = "none"
    sampler: Literal["none", "balanced", "sources"] = Field("none", description="balanced: every class equally often; sources: classes by class_balance, then labs within a class (data.sources) by source_balance.")
    source_balance: float = Field(1.0, ge=0.0, le=1.0, description="sampler: sources: 1 = each lab an equal share of a class, 0 = labs in proportion to their cells, 0.5 = in proportion to the square root.")
    class_balance: float = Field(1.0, ge=0.0, le=1.0, description="sampler: sources: 1 = every class equally often, 0 = classes in proportion to their cells, 0.5 = to the square root.")
    mixstyle: float = Field(0.0, ge=0.0, le=1.0, description="MixStyle (leuko.train.mixstyle): probability per batch of mixing the cells' channel statistics after each early stage; 0 = off.")
    mixstyle_alpha: float = Field(0.1, gt=0.0, le=10.0, description="MixStyle: Beta(alpha, alpha) of the mixing weight.")
    mixstyle_stages: int = Field(3, ge=1, le=16, description="MixStyle: after how many of the backbone's first stages.")
    grad_clip: Optional[float] = Field(None, gt=0.0)
    early_stopping: Optional[int] = Field(None, ge=1, description="Stop after this many epochs without validation improvement.")
    ema: Optional[float] = Field(None, gt=0.0, lt=1.0, description="EMA decay of weights (e.g. 0.999).")
    seed: int = 0
    shuffle: bool = Field(True, description="Shuffle training batches (off only for exact DDP-vs-single comparisons).")
    fast_features: Literal["auto", "on", "off"] = Field("auto", description="Frozen backbone + no augmentation: cache features, train the head alone.")
    distill_from: Optional[str] = Field(None, description="A finished run whose answers on the training images the model also learns (knowledge distillation; leuko.train.distill).")
    distill_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the loss that is the teacher's (the rest: the labels).")
    distill_temperature: float = Field(2.0, gt=0.0, le=20.0, description="Softmax temperature of teacher and student in the distillation term.")


class TrainerConfig(_Strict):
    """Passed through to Lightning's Trainer."""

    accelerator: str = "auto"
    devices: Union[int, str, list[int]] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Optional[str] = Field(None, description="Default: 16-mixed on GPU, 32 on CPU.")
    deterministic: bool = True
    log_every_n_steps: int = Field(10, ge=1)
    progress: bool = True
    limit_train_batches: Optional[Union[int, float]] = None
    limit_val_batches: Optional[Union[int, float]] = None
    max_time: Optional[str] = Field(None, description="Stop after DD:HH:MM:SS of wall time.")
    num_threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: all cores).")
    channels_last: bool = Field(True, description="Channels-last memory format (faster convolutions on CPU and tensor cores).")


class RunConfig(_Strict):
    """A whole run: ``data``, ``model``, ``train``, ``trainer`` sections."""

    name: Optional[str] = None
    description: Optional[str] = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _consistency(self) -> "RunConfig":
        if self.model.two_stage_epochs >= self.train.epochs and self.model.two_stage_epochs > 0:
            raise ValueError("model.two_stage_epochs must be smaller than train.epochs")
        if self.train.sampler == "sources" and not self.data.sources:
            raise ValueError("train.sampler: sources needs data.sources (several labs)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in err["loc"][:-1])
            parts.append(f"unknown key {loc!r}" + (f" in section {section!r}" if section else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            head = "" if loc == "config" or msg.startswith(loc + ".") else f"{loc}: "  # a section's check names its key
            parts.append(f"{head}{msg}" + (f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""))
    more = f" (+{len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return "invalid config: " + "; ".join(parts) + more


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.name=resnet50"]`` → nested dict (values parsed as YAML)."""
    pairs: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise LeukoError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return nest_dotted(pairs)


def nest_dotted(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``[("train.lr", 1e-4)]`` → ``{"train": {"lr": 1e-4}}``; shared by ``--set`` and grid cells."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not key or any(not p for p in key.split(".")):
            raise LeukoError(f"override {key!r} has an empty key part")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise LeukoError(f"override {key!r} conflicts with another override of {p!r}")
            node = nxt
        node[parts[-1]] = value
    return out


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of config mappings: ``extra`` wins, sections merge key by key."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a config mapping plus overrides; LeukoError with one line on failure."""
    merged = merge_config(raw, parse_overrides(overrides))
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise LeukoError(format_validation_error(exc)) from None


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file that must hold a mapping; one-line LeukoError otherwise (shared by configs and grids)."""
    p = Path(path)
    if not p.is_file():
        raise LeukoError(f"{what} file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise LeukoError(f"{what} {p} is not valid YAML{at}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise LeukoError(f"{what} {p} must be a mapping of sections (data, model, train, trainer)")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (``None`` = all defaults) and apply ``key=value`` overrides."""
    raw = read_yaml_mapping(path) if path is not None else {}
    if {"cells", "scenarios", "grid", "folds"} & set(raw) and not {"data", "model", "train"} & set(raw):
        # a study's comparison file (configs/study-*.yaml): say which verb reads it
        raise LeukoError(f"{path} is a comparison grid (cells/scenarios/grid), not a run config: run it with 'leuko compare {path}'")
    return config_from_dict(raw, overrides)
