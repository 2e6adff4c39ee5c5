"""The report as data: sections of text, tables, code and figures, rendered twice.

:mod:`leuko.reports.build` decides *what* a run report says;
:mod:`leuko.reports.render` decides only *how* it looks in HTML and in
Markdown. Keeping one content model means the two files can never disagree
on a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union


@dataclass(frozen=True)
class Cell:
    """A table cell whose shown text stands for a number (``key``/``value`` go into the HTML as data)."""

    text: str
    key: str | None = None
    value: float | None = None

    def __str__(self) -> str:
        return self.text


@dataclass
class Text:
    """A paragraph; ``kind`` ``"note"`` or ``"warning"`` is set off visually."""

    text: str
    kind: str = "p"


@dataclass
class Table:
    """Rows of cells under column names; the first column names the row.

    ``kind="kv"`` marks a two-column fact sheet (name, value), whose values are
    text as often as numbers and are set left-aligned.
    """

    columns: list[str]
    rows: list[list[Union[str, Cell]]]
    caption: str = ""
    kind: str = ""


@dataclass
class Code:
    """Verbatim text (a config file)."""

    text: str
    language: str = ""


@dataclass
class Figure:
    """A PNG file written beside the report (embedded as a data URI in HTML, linked from Markdown)."""

    path: Path
    caption: str


Block = Union[Text, Table, Code, Figure]


@dataclass
class Section:
    """A titled part of the report; ``anchor`` is its id in the HTML."""

    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    """A whole report: a title, a subtitle line, sections and a footer line."""

    title: str
    subtitle: str
    sections: list[Section]
    footer: str = ""


def fmt(value: object, digits: int = 4) -> str:
    """A number for a table: ``digits`` decimals, ``n/a`` for missing or NaN, integers as they are."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if v != v:  # NaN
        return "n/a"
    return f"{v:.{digits}f}"


def metric_cell(key: str, value: object, digits: int = 4) -> Cell:
    """A cell showing ``value`` rounded, carrying the exact number for tests and scripts."""
    v = None if value is None else float(value)  # type: ignore[arg-type]
    return Cell(fmt(v, digits), key=key, value=v)
