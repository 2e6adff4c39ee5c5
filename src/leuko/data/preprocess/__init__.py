"""Torch-free image preparation: deterministic preprocessing, normalisation, decoding.

Everything a trained model needs between an image file (or a decoded array)
and its input tensor, in numpy, OpenCV and PIL only. It lives apart from
:mod:`leuko.data.transforms` because that module needs albumentations, which
imports torch: the ONNX predictor (:mod:`leuko.infer.onnx`) must prepare
images exactly like the PyTorch path without paying for (or shipping) torch.

The package is split by what each part is about; each module imports only the
ones above it in this list, and every public name is re-exported here:

* :mod:`~leuko.data.preprocess.steps`: the step grammar (names, canonical specs,
  the algorithm versions that key caches, the named stain references);
* :mod:`~leuko.data.preprocess.cells`: finding the white cell and the crop window
  around it (``cell-crop``), and the red-cell ruler (``rbc-crop``);
* :mod:`~leuko.data.preprocess.stain`: the colour steps (CLAHE, Reinhard,
  smear-referenced stain normalisation) and the CIELAB statistics they match;
* :mod:`~leuko.data.preprocess.pipeline`: :class:`Preprocess` (runs the steps,
  deterministic, so the input pipeline caches its output), :class:`Normalize`
  (``uint8 H x W x 3`` -> normalised ``float32 3 x H x W``) and
  :func:`decode_sample`, the single place that turns a :class:`~leuko.data.samples.Sample`
  into preprocessed pixels.

``mean``/``std`` are arguments and never defaults: they belong to the model.
"""

from __future__ import annotations

from leuko.data.preprocess.cells import (
    CellBox,
    cell_crop_window,
    crop_window,
    find_cell,
    rbc_crop_window,
    red_cell_diameter,
)
from leuko.data.preprocess.pipeline import (
    CELL_CONTEXT,
    Normalize,
    Preprocess,
    Preprocessed,
    available_cpus,
    build_preprocess,
    decode_raw,
    decode_sample,
    grow_box,
)
from leuko.data.preprocess.stain import (
    clahe,
    lab_stats,
    reinhard,
    smear_mask,
    smear_norm,
    smear_stats,
)
from leuko.data.preprocess.steps import (
    CELL_CROP_VERSION,
    DEFAULT_CELL_SHARE,
    DEFAULT_RBC_SPAN,
    PREPROCESS_STEPS,
    RBC_CROP_VERSION,
    REINHARD_TARGETS,
    SMEAR_TARGETS,
    parse_preprocess,
    step_versions,
)

__all__ = [
    "CELL_CONTEXT",
    "CELL_CROP_VERSION",
    "DEFAULT_CELL_SHARE",
    "DEFAULT_RBC_SPAN",
    "RBC_CROP_VERSION",
    "PREPROCESS_STEPS",
    "REINHARD_TARGETS",
    "SMEAR_TARGETS",
    "CellBox",
    "Normalize",
    "Preprocess",
    "Preprocessed",
    "available_cpus",
    "build_preprocess",
    "cell_crop_window",
    "clahe",
    "crop_window",
    "decode_raw",
    "decode_sample",
    "find_cell",
    "grow_box",
    "lab_stats",
    "parse_preprocess",
    "rbc_crop_window",
    "red_cell_diameter",
    "reinhard",
    "smear_mask",
    "smear_norm",
    "smear_stats",
    "step_versions",
]
