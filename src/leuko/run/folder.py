"""The run folder: what training writes and everything downstream reads.

Layout (one contract, documented in the README)::

    RUN_DIR/
      config.yaml        the resolved config (every default filled in)
      split.json         the exact split used (keys relative to the dataset root)
      classes.json       class names in output order
      data.json          dataset summary: root, layout, counts per role
      metrics.csv        one row per epoch: train/val loss and accuracy, lr, images/s
      checkpoints/       Lightning checkpoints: best.ckpt, last.ckpt (for --resume)
      model.pt           the best weights + everything inference needs
      summary.json       final numbers (best epoch, val/test accuracy, wall time)
      train.log          the log

``model.pt`` is self-describing: its weights and its model card
(:class:`~leuko.run.card.ModelCard`: kind, architecture, classes, input,
temperature, review policy, what it learned from), so ``evaluate``, ``predict``
and ``export`` need nothing else. This module imports neither Lightning nor the
training code, so inference stays light.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from leuko.errors import LeukoError
from leuko.run.card import CARD_FORMAT, HOME_FILE, ROUTE_FILE, ModelCard, ModelKind

if TYPE_CHECKING:  # torch is imported where weights are read or written, so the ONNX path stays torch-free
    import torch

FINETUNE_FILE = "finetune.json"
"""Marks a fine-tuned run (:mod:`leuko.derive.finetune`): the new lab's data, every cell it learned from or was
calibrated on (keys relative to that lab's root), the source lab's held-out score before and after."""
ENSEMBLE_FILE = "ensemble.json"
"""Marks an ensemble run (:mod:`leuko.derive.ensemble`): its members, how each and the ensemble score on validation."""
RECORD_FILES: tuple[str, ...] = ("config.yaml", "classes.json", "split.json", "data.json", "metrics.csv", "summary.json",
                                 "leakage.json", ENSEMBLE_FILE)
"""The run's record (training history and data description) that a run derived from it (adapted, routed) keeps;
``ensemble.json`` too, as it describes the ``model.pt`` an adapted or routed ensemble carries on."""


@dataclass(frozen=True)
class RunFolder:
    """Paths inside a run folder (nothing is read until asked)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split(self) -> Path:
        return self.path / "split.json"

    @property
    def classes(self) -> Path:
        return self.path / "classes.json"

    @property
    def data(self) -> Path:
        return self.path / "data.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def model(self) -> Path:
        return self.path / "model.pt"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    # ------------------------------------------------------------- create
    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> "RunFolder":
        """A new, empty run folder; an existing non-empty one only with ``overwrite``."""
        p = Path(path).expanduser()
        if p.exists() and not p.is_dir():
            raise LeukoError(f"run folder path {p} is a file")
        if p.exists() and any(p.iterdir()):
            if not overwrite:
                raise LeukoError(
                    f"run folder {p} already exists; use --resume to continue it, --overwrite to replace it, or another --out"
                )
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
        (p / "checkpoints").mkdir(exist_ok=True)
        return cls(p)

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """An existing run folder (must hold at least ``config.yaml`` and ``classes.json``)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise LeukoError(f"run folder not found: {p}")
        run = cls(p)
        if not run.config.is_file() or not run.classes.is_file():
            raise LeukoError(f"{p} is not a leuko run folder (no config.yaml/classes.json)")
        return run

    # ------------------------------------------------------------- json
    def copy_record(self, target: str | Path) -> None:
        """Copy :data:`RECORD_FILES` (those present) into ``target``, a new run folder derived from this one."""
        for name in RECORD_FILES:
            src = self.path / name
            if src.is_file():
                shutil.copy2(src, Path(target) / name)

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str))
        tmp.replace(target)
        return target

    def read_json(self, name: str) -> Any:
        target = self.path / name
        try:
            return json.loads(target.read_text())
        except FileNotFoundError:
            raise LeukoError(f"{target} is missing") from None
        except json.JSONDecodeError as exc:
            raise LeukoError(f"{target} is not valid JSON: {exc}") from None

    def class_names(self) -> list[str]:
        return list(self.read_json("classes.json"))

    def finetuned_cells(self, data_root: str | Path) -> set[str]:
        """Keys (relative to ``data_root``) of the cells this run was fine-tuned or calibrated on, when
        ``data_root`` is the lab it was fine-tuned on; empty otherwise. Evaluation on that lab leaves them out."""
        if not (self.path / FINETUNE_FILE).is_file():
            return set()
        rec = self.read_json(FINETUNE_FILE)
        if Path(str(rec.get("data", ""))).resolve() != Path(data_root).expanduser().resolve():
            return set()
        return set(rec.get("used") or {})


def is_routed(path: str | Path) -> bool:
    """Whether ``path`` is a routed run folder (it holds :data:`~leuko.run.card.ROUTE_FILE`)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ROUTE_FILE).is_file()


def kind_of(path: str | Path) -> ModelKind:
    """The :class:`~leuko.run.card.ModelKind` of a run folder or ``model.pt`` (reads the card, not the weights
    into a network): the one question downstream code asks instead of "is this routed / an ensemble?"."""
    p = Path(path).expanduser()
    if is_routed(p):
        return ModelKind.ROUTED
    return read_card(p).kind


def finished_run(path: str | Path, role: str) -> RunFolder:
    """The single-network run folder at ``path`` whose training finished (``role`` names it in errors:
    "home", "robust", "member"): what ``leuko route`` and ``leuko ensemble`` combine."""
    run = RunFolder.open(path)
    if is_routed(run.path):
        raise LeukoError(f"{run.path} is already a routed run; give the {role} run itself")
    if not run.model.is_file():
        raise LeukoError(f"the {role} run {run.path} has no model.pt (has its training finished?)")
    return run


def check_new_run(target: str | Path, what: str) -> Path:
    """``target`` as a path, after checking it is new (absent, or an empty folder): a run derived from another
    (``what``: "an adapted run", "a routed run", "an ensemble") never overwrites a folder."""
    path = Path(target).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LeukoError(f"{path} already exists; choose a new --out ({what} never overwrites a folder)")
    return path


@contextmanager
def derived_run(target: Path, source: RunFolder) -> Iterator[RunFolder]:
    """A new run folder with ``source``'s record (:data:`RECORD_FILES`), for the block to complete.

    Built as ``.NAME.partial`` beside ``target`` and renamed into place when
    the block ends, so an interrupted build leaves no folder that would pass
    for a finished run (or block the next attempt); an error removes it.
    ``target`` must have passed :func:`check_new_run`.
    """
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        source.copy_record(partial)
        yield RunFolder(partial)
        if target.exists():
            target.rmdir()  # empty (check_new_run)
        partial.rename(target)
    except OSError as exc:  # a full disk, a read-only folder: one line, nothing half-written left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise LeukoError(f"building {target} failed: {exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def save_model(path: Path, model: "torch.nn.Module", card: ModelCard) -> Path:
    """Write ``model.pt``: the model card + the state dict (atomic)."""
    if not isinstance(card, ModelCard):
        raise TypeError(f"save_model takes a ModelCard, not {type(card).__name__}")
    payload = {**card.to_meta(), "format": CARD_FORMAT,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    import torch

    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_model_file(path: Path) -> tuple[ModelCard, dict[str, Any]]:
    """The card and state dict (CPU tensors) of a ``model.pt``."""
    if not path.is_file():
        raise LeukoError(f"model file not found: {path} (did training finish?)")
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt or foreign file
        raise LeukoError(f"cannot read model file {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CARD_FORMAT:
        raise LeukoError(f"{path} is not a leuko model file (format {CARD_FORMAT})")
    state = payload.pop("state_dict", None)
    if not isinstance(state, dict):
        raise LeukoError(f"{path} holds no weights (state_dict)")
    return ModelCard.from_meta(payload, source=path), state


def _model_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return RunFolder(p).model if p.is_dir() else p


def read_card(path: str | Path) -> ModelCard:
    """The model card of a run folder or ``model.pt``; a routed run folder's card is its robust network's,
    of kind ``routed``."""
    p = Path(path).expanduser()
    card, _ = read_model_file(_model_file(p))
    return card.with_(kind=ModelKind.ROUTED) if is_routed(p) else card


def load_model(path: str | Path) -> tuple["torch.nn.Module", ModelCard]:
    """Rebuild the network of a run (``RUN_DIR`` or its ``model.pt``) in eval mode, with its card."""
    from leuko.models import build_model
    from leuko.models.ensemble import build_ensemble

    p = Path(path).expanduser()
    if is_routed(p):
        raise LeukoError(
            f"{p} is a routed run of two networks and this needs one: give {p / 'model.pt'} (its robust network) or "
            f"{p / HOME_FILE} (its home network) where a model file is accepted, else a run named in {p / ROUTE_FILE}"
        )
    card, state = read_model_file(_model_file(p))
    spec = card.model
    n = len(card.classes)
    model = build_ensemble(spec.model_dump(exclude_none=True), n) if spec.is_ensemble else build_model(
        spec.name, num_classes=n, pretrained="none", head=spec.head, dropout=spec.dropout)
    model.load_state_dict(state)
    model.eval()
    return model, card
