"""What every verb prints with: the two consoles and the small formatting helpers.

``console`` is stdout (results), ``err_console`` stderr (skipped files, errors).
Tests patch attributes of ``leuko.cli.console``, which is this object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def fmt_num(value: float | None, spec: str = ".4f") -> str:
    """A number to ``spec``, or ``n/a`` when it is missing."""
    return "n/a" if value is None else format(value, spec)


def fmt_delta(a: float | None, b: float | None) -> str:
    """``b - a`` signed to four places, blank when either is missing."""
    return "" if a is None or b is None else f"{b - a:+.4f}"


def fmt_counts(counts: Mapping[Any, int], paren: bool = False) -> str:
    """``k 1,234, ...`` (or ``k (1,234), ...`` with ``paren``)."""
    return ", ".join(f"{k} ({v:,})" if paren else f"{k} {v:,}" for k, v in counts.items())


def counts_table(title: str, counts: dict[str, int], total_label: str = "total") -> Table:
    """Name / image-count table with a bold total row."""
    table = Table(title=title, show_edge=False)
    table.add_column("name")
    table.add_column("images", justify="right")
    for k, v in counts.items():
        table.add_row(str(k), f"{v:,}")
    table.add_row(f"[bold]{total_label}", f"[bold]{sum(counts.values()):,}")
    return table


def rows_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    """A Rich table of result rows (floats to 4 places, missing as blank)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "cell" else "right", overflow="fold")
    for r in rows:
        table.add_row(*["" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]) for c in columns])
    return table


def print_skipped(failed: Any) -> None:
    """One yellow stderr line per ``(path, reason)`` that was skipped."""
    for path, reason in failed:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)


def print_written(what: Any, **kwargs: Any) -> None:
    """The closing ``written: ...`` line."""
    console.print(f"[green]written:[/] {what}", **kwargs)


def print_magnification(check: dict | None) -> None:
    """A routed run's batch-level magnification check (leuko.infer.route.lab_magnification)."""
    if check and check.get("warning"):
        console.print(f"[yellow]magnification:[/] {check['warning']}", highlight=False)
    elif check:
        console.print(f"[dim]magnification: red cells {check['median_ratio']:.2f}x the home lab's size "
                      f"(median of {check['n_measured']})[/]", highlight=False)
