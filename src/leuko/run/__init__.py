"""The run contract: what training and derivation write and everything downstream reads.

* :mod:`leuko.run.folder`: the run folder (its files, atomic JSON, derived runs built beside their target);
* :mod:`leuko.run.card`: the model card, what ``model.pt`` and the ONNX metadata carry, and its ``kind``
  (one network, ensemble, routed, detector), the one place that says which predictor and explainer serve a run;
* :mod:`leuko.run.config`: the validated config schema (``data``, ``model``, ``train``, ``trainer``);
* :mod:`leuko.run.data`: a config's data section turned into samples, a split and transforms;
* :mod:`leuko.run.calibration`: temperature scaling, NLL and ECE on plain arrays.

Nothing here imports ``train``, ``derive``, ``infer``, ``evaluate``, ``explain``, ``serve`` or ``cli`` (a test
pins it), so inference, evaluation and the service read runs without the trainer.
"""

from __future__ import annotations

from leuko.run.config import RunConfig, config_from_dict, load_config
from leuko.run.card import ModelCard, ModelKind
from leuko.run.folder import (
    RunFolder,
    check_new_run,
    derived_run,
    finished_run,
    kind_of,
    load_model,
    read_card,
    read_model_file,
    save_model,
)

__all__ = [
    "RunConfig",
    "RunFolder",
    "check_new_run",
    "config_from_dict",
    "derived_run",
    "finished_run",
    "load_config",
    "load_model",
    "read_card",
    "read_model_file",
    "kind_of",
    "ModelCard",
    "ModelKind",
    "save_model",
]
