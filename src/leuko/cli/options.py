"""Options more than one verb takes, defined once.

Layout names and layout-specific options are read from the layout registry
(:mod:`leuko.data.layouts`), so a newly registered layout shows up in every
``--help`` without touching the command line. The registry imports no torch.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer

from leuko.data.layouts import list_layouts


def layout_names() -> list[str]:
    """Registered layout names, in detection order."""
    return [spec.name for spec in list_layouts()]


def layouts_accepting(option: str) -> list[str]:
    """Names of the registered layouts whose loader takes the keyword ``option`` (e.g. ``margin``)."""
    return [spec.name for spec in list_layouts() if option in inspect.signature(spec.load).parameters]


LAYOUT_HELP = f"Dataset layout ({', '.join(layout_names())}); detected when omitted."
MARGIN_HELP = f"{', '.join(layouts_accepting('margin'))}: crop margin around each WBC box (fraction of its side)."

LayoutOpt = typer.Option(None, "--layout", "-l", help=LAYOUT_HELP)
MarginOpt = typer.Option(None, "--margin", help=MARGIN_HELP)
TtaOpt = typer.Option(False, "--tta", help="Test-time augmentation: average over flips and a 90-degree rotation.")
DataOverrideOpt = typer.Option(None, "--data", "-d", help="Dataset folder (overrides data.path).")


def class_map_option(help: str) -> Any:
    """``--class-map``: a class-map file or a shipped map's name; each verb says what it is used for."""
    return typer.Option(None, "--class-map", help=help)


def layout_options(margin: float | None) -> dict[str, Any]:
    """The layout-specific keyword options given on the command line (empty when none was)."""
    return {"margin": margin} if margin is not None else {}
