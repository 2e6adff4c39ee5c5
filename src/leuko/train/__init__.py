"""Training: validated configs, the Lightning module, the frozen-feature fast path, run folders.

    from leuko.train import train
    result = train("configs/pbc-best.yaml", "runs/pbc-best", data_path="../shared/datasets/pbc")
"""

from __future__ import annotations

from leuko.run.config import RunConfig, load_config
from leuko.train.runner import TrainResult, train

__all__ = ["RunConfig", "TrainResult", "load_config", "train"]
