"""``leuko serve``: the lab service."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

from pathlib import Path

import typer

from leuko.cli.output import console

app = typer.Typer()


@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="A run folder (or its model.pt) or an exported .onnx file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default; beyond it needs --auth or --insecure)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
    db: str = typer.Option("leuko-lab.db", "--db", help="Where samples and reviews are kept: a SQLite file (created if missing) "
                           "or postgresql+psycopg://USER@HOST/DB."),
    images: Path | None = typer.Option(None, "--images", help="The image store folder (default: NAME.images beside a SQLite "
                                       "NAME.db; needed with PostgreSQL)."),
    auth: Path | None = typer.Option(None, "--auth", help="Tokens file (one hashed token per reviewer; "
                                     "python -m leuko.serve.auth FILE NAME adds one): every call needs a reviewer's token."),
    insecure: bool = typer.Option(False, "--insecure", help="Listen beyond loopback without --auth anyway."),
) -> None:
    """The lab service: samples, review page and HTTP API (predict, explain, count) at http://HOST:PORT/."""
    from leuko.serve import serve

    serve(model, host=host, port=port, db=db, images=images, auth=auth, insecure=insecure, echo=console.print)
