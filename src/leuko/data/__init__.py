"""Datasets of white-blood-cell images: layouts, inspection, splits, audits, transforms.

Typical use from a notebook::

    from leuko.data import load_dataset, make_split
    index = load_dataset("../shared/datasets/pbc")          # layout detected
    split = make_split(index, "holdout-80-10-10", seed=0)    # group-aware, stratified
    split.save("split.json")
"""

from __future__ import annotations

from leuko.data.imageio import check_image, load_rgb
from leuko.data.layouts import detect_layout, list_layouts, load_dataset
from leuko.data.samples import DatasetIndex, Sample, SkippedItem
from leuko.data.splits import Split, make_split, split_presets

__all__ = [
    "DatasetIndex",
    "Sample",
    "SkippedItem",
    "Split",
    "check_image",
    "detect_layout",
    "list_layouts",
    "load_dataset",
    "load_rgb",
    "make_split",
    "split_presets",
]
