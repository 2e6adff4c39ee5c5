"""Verbs that look at a trained run: ``evaluate``, ``explain`` and ``report``."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from leuko.cli.options import (
    LayoutOpt,
    MarginOpt,
    TtaOpt,
    class_map_option,
    layout_options,
)
from leuko.cli.output import (
    console,
    fmt_delta,
    fmt_num,
    print_magnification,
    print_skipped,
    print_written,
)

app = typer.Typer()


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'leuko train'."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Dataset to evaluate on (default: the run's own)."),
    layout: str | None = LayoutOpt,
    split: str = typer.Option("test", "--split", help="train, val, test (of the run's split) or all."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/eval/<split>, <split>-tta with --tta)."),
    class_map: Path | None = class_map_option(
        "YAML/JSON with 'merge' and 'exclude' to match another label set, or a shipped map by name "
        "(pbc-to-five: PBC's 8 classes onto the five white-cell types; alias pbc-to-bccd)."
    ),
    label_map: str | None = typer.Option(
        None, "--label-map",
        help="How the data's labels become the run's classes (file or shipped name, as data.sources' class_map): "
             "merged labels are renamed, excluded ones' images dropped, e.g. pbc-to-five-mature to score a "
             "five-type run on PBC's 8 classes.",
    ),
    tta: bool = TtaOpt,
    margin: float | None = MarginOpt,
) -> None:
    """Metrics (with 95% CIs), predictions.csv, confusion matrices, curves and a classification report.

    On another lab's data (--data), the run's own held-out numbers are shown beside the new lab's."""
    from leuko.evaluate.run import evaluate_run

    m = evaluate_run(run_dir, data=data, layout=layout, split=split, out=out, class_map=class_map, tta=tta,
                     echo=console.print, layout_options=layout_options(margin) or None, label_map=label_map)
    console.print(m["report"], highlight=False)
    ci = m.get("ci95") or {}
    acc_ci = ci.get("accuracy") or [None, None]
    f1_ci = ci.get("macro_f1") or [None, None]
    console.print(
        f"accuracy {fmt_num(m['accuracy'])} (95% CI {fmt_num(acc_ci[0])}-{fmt_num(acc_ci[1])}), "
        f"macro-F1 {fmt_num(m['macro_f1'])} (95% CI {fmt_num(f1_ci[0])}-{fmt_num(f1_ci[1])}), "
        f"balanced acc {fmt_num(m['balanced_accuracy'])}, ECE {fmt_num(m.get('ece'))}"
    )
    rv = m.get("review") or {}
    if rv:
        acc_ok = rv.get("accepted_accuracy")
        console.print(
            f"review: {rv['flagged']:.1%} flagged ({rv['unlike_training']:.1%} unlike the training data); "
            + ("none accepted" if acc_ok is None else f"the accepted {1 - rv['flagged']:.1%} are {acc_ok:.2%} correct"),
            highlight=False,
        )
    route = m.get("route")
    if route:
        from leuko.infer.route import describe_route

        console.print("route: " + describe_route(route), highlight=False)
        print_magnification(route.get("magnification"))
    for note in m["class_map"]["notes"]:
        console.print(f"[dim]class map: {note}[/]")
    for note in m.get("notes") or []:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    for path, reason in m["data"]["failed"]:
        console.print(f"[yellow]unreadable:[/] {path}: {reason}")
    _print_cell_crop(m["data"].get("cell_crop"))
    if "in_lab" in m:
        _print_side_by_side(run_dir, m)
    print_written(m["out_dir"])


def _print_cell_crop(info: dict | None) -> None:
    """Name the images in which cell-crop found no cell (classified from the whole frame), and those in which
    rbc-crop found no red-cell ruler (cropped at cell-crop's share)."""
    if not info:
        return
    step = info.get("step", "cell-crop")
    for key, what in (("fell_back", step + " found no cell in {n} image(s)[/] (classified from the whole frame)"),
                      ("no_ruler", "rbc-crop measured no red cells in {n} image(s)[/] (cropped as cell-crop)")):
        names = info.get(key) or []
        if names:
            console.print(f"[yellow]{what.format(n=len(names))}: "
                          + ", ".join(names[:10]) + (f" ... (+{len(names) - 10}, listed in metrics.json)" if len(names) > 10 else ""),
                          highlight=False)


def _print_side_by_side(run_dir: Path, m: dict) -> None:
    """In-lab (the run's held-out test) vs new-lab numbers: the size of the domain shift at a glance."""
    inlab = m.get("in_lab")
    if inlab is None:
        console.print(f"[dim]in-lab numbers: none yet; run 'leuko evaluate {run_dir}' (its held-out test split) "
                      "to see them beside these[/]")
        return
    table = Table(title="in-lab vs new lab", show_edge=False)
    table.add_column("")

    def how(tta: object) -> str:
        return ", TTA" if tta else ""

    table.add_column(f"in-lab (held-out test, n={inlab.get('n', '?')}{how(inlab.get('tta'))})", justify="right")
    table.add_column(f"new lab (n={m.get('n', '?')}{how(m.get('tta'))})", justify="right")
    table.add_column("change", justify="right")
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced acc")):
        a, b = inlab.get(key), m.get(key)
        table.add_row(label, fmt_num(a), fmt_num(b), fmt_delta(a, b))
    ra, rb = inlab.get("review") or {}, m.get("review") or {}
    for key, label in (("flagged", "flagged for review"), ("unlike_training", "unlike the training data"),
                       ("accepted_accuracy", "accuracy of the accepted")):
        a, b = ra.get(key), rb.get(key)
        if a is None and b is None:
            continue
        table.add_row(label, fmt_num(a), fmt_num(b), fmt_delta(a, b))
    ha, hb = (inlab.get("route") or {}).get("home"), (m.get("route") or {}).get("home")
    if ha or hb:
        a, b = (ha or {}).get("share"), (hb or {}).get("share")
        table.add_row("answered by the home network", fmt_num(a), fmt_num(b), fmt_delta(a, b))
    console.print(table)
    console.print(f"[dim]in-lab: {inlab.get('source')}; the new lab is scored on its own label set (class map applied)[/]",
                  highlight=False)


@app.command("explain")
def explain_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (or its model.pt); a routed run explains each image with the network that answers it."),
    paths: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the Grad-CAM PNGs."),
    class_: str | None = typer.Option(None, "--class", "-c", help="Explain this class instead of the predicted one."),
    alpha: float = typer.Option(0.4, "--alpha", help="Heat-map opacity in the overlay (0-1)."),
) -> None:
    """Grad-CAM heat maps: where in each image the evidence for the class lies (one PNG per image)."""
    from leuko.explain import explain_images

    result = explain_images(run_dir, paths, out, target=class_, alpha=alpha)
    print_skipped(result.failed)
    table = Table(show_edge=False)
    routed = any(r.network for r in result.images)
    table.add_column("image")
    table.add_column("prediction")
    if routed:
        table.add_column("network")
    if class_ is not None:
        table.add_column(f"p({class_})", justify="right")
    table.add_column("PNG")
    for r in result.images:
        extra = ([r.network] if routed else []) + ([f"{r.explained_p:.3f}"] if class_ is not None else [])
        table.add_row(r.path.name, f"{r.pred} ({r.confidence:.3f})", *extra, str(r.png))
    console.print(table)
    console.print(f"{len(result.images)} explained (layer {result.layer}), {len(result.failed)} unreadable; [green]written:[/] {out}")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'leuko train', 'adapt', 'route' or 'ensemble'."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Dataset to evaluate on when the run has no evaluation yet (default: the run's own)."),
    layout: str | None = LayoutOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html); a .md and a figures folder go beside it."),
) -> None:
    """One self-contained HTML report (and Markdown) of a run: config, data, training, metrics, calibration, Grad-CAMs."""
    from leuko.reports import write_report

    written = write_report(run_dir, out=out, data=data, layout=layout, echo=console.print)
    print_written(f"{written.html}  (Markdown: {written.markdown}, figures: {written.figures})")
