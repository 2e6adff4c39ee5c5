"""Rendering a :class:`~leuko.reports.content.Report`: one self-contained HTML file, one Markdown file.

HTML: the template and style sheet ship with the package and are inlined,
figures become ``data:image/png;base64`` URIs, links are in-page anchors
only, so the file opens offline, attached to an e-mail, from any folder.
Markdown: figures are linked as relative paths to the PNG files next to it
(for Git hosting and wikis, which render Markdown but strip data URIs).
"""

from __future__ import annotations

import base64
import html
import os
from importlib import resources
from pathlib import Path
from string import Template

from leuko.reports.content import Block, Cell, Code, Figure, Report, Table, Text


def _resource(name: str) -> str:
    return resources.files("leuko.reports").joinpath(name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- HTML


def _cell_html(cell: str | Cell, tag: str) -> str:
    if isinstance(cell, Cell) and cell.key is not None:
        value = "" if cell.value is None else repr(cell.value)
        return f'<{tag} data-metric="{html.escape(cell.key)}" data-value="{value}">{html.escape(cell.text)}</{tag}>'
    return f"<{tag}>{html.escape(str(cell))}</{tag}>"


def _block_html(block: Block) -> str:
    if isinstance(block, Text):
        cls = "" if block.kind == "p" else f' class="{html.escape(block.kind)}"'
        return f"<p{cls}>{html.escape(block.text)}</p>"
    if isinstance(block, Code):
        return f'<pre><code class="language-{html.escape(block.language)}">{html.escape(block.text)}</code></pre>'
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
        body = "".join(
            "<tr>" + "".join(_cell_html(c, "th" if j == 0 else "td") for j, c in enumerate(row)) + "</tr>"
            for row in block.rows
        )
        caption = f"<caption>{html.escape(block.caption)}</caption>" if block.caption else ""
        cls = f' class="{html.escape(block.kind)}"' if block.kind else ""
        return f'<div class="table"><table{cls}>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if isinstance(block, Figure):
        data = base64.b64encode(block.path.read_bytes()).decode("ascii")
        alt = html.escape(block.caption, quote=True)
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
        )
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(report: Report) -> str:
    """The report as one HTML document with everything inlined."""
    toc = "".join(f'<li><a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a></li>' for s in report.sections)
    body = "\n".join(
        f'<section id="{html.escape(s.anchor)}"><h2>{html.escape(s.title)}</h2>\n'
        + "\n".join(_block_html(b) for b in s.blocks)
        + "</section>"
        for s in report.sections
    )
    return Template(_resource("template.html")).substitute(
        title=html.escape(report.title),
        subtitle=html.escape(report.subtitle),
        css=_resource("report.css"),
        toc=f"<ol>{toc}</ol>",
        body=body,
        footer=html.escape(report.footer),
    )


# --------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def _block_md(block: Block, base: Path) -> str:
    if isinstance(block, Text):
        prefix = {"note": "> ", "warning": "> **Warning:** "}.get(block.kind, "")
        return prefix + block.text
    if isinstance(block, Code):
        return f"```{block.language}\n{block.text.rstrip()}\n```"
    if isinstance(block, Table):
        lines = [f"*{block.caption}*", ""] if block.caption else []
        lines.append("| " + " | ".join(_md_escape(c) for c in block.columns) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(block.columns) - 1)) + "|")
        lines += ["| " + " | ".join(_md_escape(str(c)) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Figure):
        rel = Path(os.path.relpath(block.path, base)).as_posix()
        return f"![{_md_escape(block.caption)}]({rel})\n\n*{block.caption}*"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(report: Report, base: Path) -> str:
    """The report as Markdown; figure links are relative to ``base`` (the Markdown file's folder)."""
    parts = [f"# {report.title}", "", report.subtitle, ""]
    parts += [f"- [{s.title}](#{s.anchor})" for s in report.sections]
    for s in report.sections:
        parts += ["", f'<a id="{s.anchor}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            parts += [_block_md(b, base), ""]
    if report.footer:
        parts += ["---", "", f"*{report.footer}*", ""]
    return "\n".join(parts)
