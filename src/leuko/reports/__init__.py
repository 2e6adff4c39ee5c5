"""Run reports: one self-contained HTML file (and Markdown with PNGs) per trained run.

:mod:`~leuko.reports.build` gathers the content, :mod:`~leuko.reports.content`
is its data model, :mod:`~leuko.reports.render` turns it into HTML and
Markdown.
"""

from __future__ import annotations

from leuko.reports.build import ReportFiles, build_report, write_report
from leuko.reports.content import Report
from leuko.reports.render import render_html, render_markdown

__all__ = ["Report", "ReportFiles", "build_report", "render_html", "render_markdown", "write_report"]
