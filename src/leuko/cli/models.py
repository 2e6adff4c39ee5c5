"""``leuko models``: the model registry."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from leuko.cli.output import console

app = typer.Typer(help="The model registry: architectures, input sizes, weights.", no_args_is_help=True)


@app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Registered architectures with input size, normalisation and available weights."""
    from leuko.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return
    table = Table(show_edge=False)
    for col in ("name", "source", "input", "default weights", "bundled"):
        table.add_column(col)
    for r in rows:
        size = r.get("input_size")
        table.add_row(
            r["name"], str(r.get("source", "")), "x".join(str(v) for v in size[1:]) if size else "",
            str(r.get("default_pretrained", "")), "yes" if r.get("bundled") else "",
        )
    console.print(table)
