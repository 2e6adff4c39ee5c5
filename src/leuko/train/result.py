"""What a finished training run reports: one record shared by the Lightning loop and the frozen-feature path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished run reports (also written to ``summary.json``)."""
    run_dir: Path
    best_epoch: int
    best_val_acc: float | None
    epochs_run: int
    wall_time_s: float
    path: str  # "lightning" or "features"
    images_per_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
