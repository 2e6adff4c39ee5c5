"""Verbs that use a trained model on new images: ``predict`` and ``export``."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from leuko.cli.options import TtaOpt
from leuko.cli.output import console, print_magnification, print_skipped, print_written

app = typer.Typer()


@app.command("predict")
def predict_cmd(
    model: Path = typer.Argument(..., help="A run folder, its model.pt, or a MODEL.onnx from 'leuko export' (runs without torch)."),
    paths: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write predictions to .csv or .json."),
    tta: bool = TtaOpt,
    top_k: int = typer.Option(1, "--top-k", "-k", help="Also list the next K-1 classes."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    fields: bool = typer.Option(False, "--fields", help="The images are smear fields (a folder: its own images, not sub-folders): find every white cell, one row per cell."),
) -> None:
    """Classify new images; unreadable files are named and skipped, the rest are predicted."""
    if fields:
        from leuko.cli.fields import predict_fields_cmd

        return predict_fields_cmd(model, paths, out, tta, batch_size)
    from leuko.infer.predict import predict_images, write_predictions

    result = predict_images(model, paths, tta=tta, top_k=top_k, batch_size=batch_size)
    print_skipped(result.failed)
    table = Table(show_edge=False)
    table.add_column("image")
    table.add_column("prediction")
    table.add_column("confidence", justify="right")
    extra = [c for c in result.frame.columns if c.startswith("top") and not c.endswith("_p")]
    for c in extra:
        table.add_column(c)
    routed = "answered_by" in result.frame.columns
    table.add_column("review")
    if routed:
        table.add_column("network")
    for _, row in result.frame.head(50).iterrows():
        table.add_row(Path(str(row["path"])).name, str(row["pred"]), f"{row['confidence']:.3f}",
                      *[f"{row[c]} ({row[c + '_p']:.2f})" for c in extra], str(row["review_reasons"]),
                      *([str(row["answered_by"])] if routed else []))
    console.print(table)
    if len(result.frame) > 50:
        console.print(f"... {len(result.frame) - 50} more (use --out to save all)")
    frame = result.frame
    counts = frame["pred"].value_counts() if len(frame) else {}
    console.print("predicted: " + ", ".join(f"{k} {v}" for k, v in dict(counts).items()) + f"; {len(result.failed)} unreadable")
    if len(frame):
        unlike = frame["review_reasons"].str.contains("unlike the training data").sum()
        console.print(f"review: {int(frame['review'].sum())} of {len(frame)} flagged ({unlike} unlike the training data)"
                      + (f"; home network answered {int((frame['answered_by'] == 'home').sum())}" if routed else ""),
                      highlight=False)
    print_magnification(result.magnification)
    if out is not None:
        print_written(write_predictions(result, out))


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (or its model.pt)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default RUN_DIR/model.onnx)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Export the model to ONNX with its classes, preprocessing and temperature; 'leuko predict MODEL.onnx' runs it."""
    from leuko.infer.onnx import export_onnx

    result = export_onnx(run_dir, out, fmt=fmt, force=force)
    card = result.card
    console.print(
        f"{card.model.display_name}, {len(card.classes)} classes, input {card.image_size} px, "
        f"temperature {card.temperature:.3f}, opset {result.opset}; "
        f"max |logit difference| vs PyTorch {result.max_abs_diff:.1e}"
    )
    print_written(f"{result.path} ({result.size_bytes / 2**20:.1f} MiB)")
