"""The ``leuko`` command line: verbs over the Python API, nothing more.

Each command parses its options, calls one API function and prints the result
with Rich. User mistakes arrive as :class:`~leuko.errors.LeukoError` and are
printed as one red line with a non-zero exit; anything else is a bug and
keeps its traceback.

One module per verb group (``data``, ``models``, ``train``, ``evaluate``,
``infer``, ``fields``, ``derive``, ``serve``); options several verbs share live in
:mod:`leuko.cli.options`, the consoles and formatting helpers in
:mod:`leuko.cli.output`. Heavy modules are imported inside the commands, so
``leuko --help`` never imports torch.
"""

from __future__ import annotations

import os
import sys

import typer

from leuko.cli import data, derive, evaluate, fields, infer, models, serve, train
from leuko.cli.output import console, err_console
from leuko.errors import LeukoError

app = typer.Typer(
    name="leuko",
    help="White-blood-cell classification by transfer learning: data, training, evaluation, prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Nameless groups merge their verbs into the top level, in this order; named ones become sub-commands.
for group in (train, evaluate, infer, fields, derive, serve):
    app.add_typer(group.app)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one line per user error, never a traceback for one."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app(args=argv, standalone_mode=True)
    except LeukoError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "console", "err_console", "main"]
