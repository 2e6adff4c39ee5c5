"""Verbs on whole smear fields: ``evaluate-fields``, ``count`` and ``predict --fields``.

Thin: each parses its options, calls one :mod:`leuko.fields` function and
prints what it returns. A bad field (not an image, truncated, over the
decompression limit) or an empty folder arrives as one
:class:`~leuko.errors.LeukoError` line and a non-zero exit, before anything is
written.
"""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from leuko.cli.options import TtaOpt
from leuko.cli.output import console, print_written
from leuko.errors import LeukoError

app = typer.Typer()

MinScoreOpt = typer.Option(None, "--min-score", help="Lowest detection score counted as a cell (default: the finder's operating point, 0.7).")


def _min_score(value: float | None) -> float:
    from leuko.fields.find import DEFAULT_MIN_SCORE

    if value is None:
        return DEFAULT_MIN_SCORE
    if not 0.0 <= value <= 1.0:
        raise LeukoError(f"--min-score must be in [0, 1]; got {value}")
    return float(value)


@app.command("evaluate-fields")
def evaluate_fields_cmd(
    voc_dir: Path = typer.Argument(..., help="A Pascal VOC folder of fields (JPEGImages/, Annotations/), e.g. BCCD."),
    split: str | None = typer.Option(None, "--split", help="Only the fields of ImageSets/Main/<split>.txt (BCCD: train, val, trainval, test)."),
    label: str = typer.Option("WBC", "--label", help="The VOC class name of white cells."),
    iou: float = typer.Option(0.5, "--iou", help="IoU a found box needs with a true box."),
    min_score: float | None = MinScoreOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write report.json, errors.txt and pictures/ here."),
    pictures: int = typer.Option(24, "--pictures", help="Side-by-side pictures to draw (fields with errors first)."),
) -> None:
    """Detection precision, recall, F1 and AP at an IoU, per-field errors, pictures of true and found boxes."""
    from leuko.fields.evaluate import evaluate_fields
    from leuko.fields.read import voc_fields

    report = evaluate_fields(voc_fields(voc_dir, split=split, label=label), threshold=iou, min_score=_min_score(min_score), label=label)
    console.print(report.format_summary(), highlight=False)
    errors = report.error_lines()
    for line in errors[:20]:
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    if len(errors) > 20:
        console.print(f"  ... {len(errors) - 20} more field(s) with errors (see --out)")
    if out is not None:
        print_written(report.write(out, pictures=pictures))


@app.command("count")
def count_cmd(
    run: Path = typer.Argument(..., help="A run folder, its model.pt or a MODEL.onnx that classifies cell images."),
    field_dir: Path = typer.Argument(..., help="The sample's field images (a folder, not searched below)."),
    sample: str | None = typer.Option(None, "--sample", help="The sample's name (default: the folder's)."),
    edge: str = typer.Option("count", "--edge", help="Cells cut by the frame's edge: count (once) or drop."),
    dedupe: bool = typer.Option(True, "--dedupe/--no-dedupe", help="Merge repeats of one cell in overlapping fields."),
    min_score: float | None = MinScoreOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the count: .json (with every cell) or .csv (the table)."),
    tta: bool = TtaOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Cells per forward pass."),
) -> None:
    """The differential of one sample from its fields: counts, percentages, 95% Wilson intervals."""
    from leuko.fields.count import EDGE_POLICIES, count_fields
    from leuko.infer import load_predictor

    if edge not in EDGE_POLICIES:
        raise LeukoError(f"--edge must be one of {', '.join(EDGE_POLICIES)}; got {edge!r}")
    if out is not None and out.suffix.lower() not in (".json", ".csv"):
        raise LeukoError(f"--out must end in .json or .csv; got {out.name}")
    predictor = load_predictor(run, batch_size=batch_size)
    result = count_fields(predictor, field_dir, sample=sample, edge=edge, dedupe=dedupe,  # type: ignore[arg-type]
                          min_score=_min_score(min_score), tta=tta)
    table = Table(title=f"differential: {result.sample}", show_edge=False)
    for c, j in (("class", "left"), ("cells", "right"), ("percent", "right"), ("95% interval", "right")):
        table.add_column(c, justify=j)  # type: ignore[arg-type]
    for c in result.counts:
        table.add_row(c.label, str(c.count), f"{c.percent:.1f}", f"{c.ci95_low:.1f}-{c.ci95_high:.1f}")
    if result.n_cells:
        console.print(table)
    for line in result.summary_lines():
        console.print(line, highlight=False, soft_wrap=True)
    if out is not None:
        print_written(result.write(out))


def predict_fields_cmd(model: Path, paths: list[Path], out: Path | None, tta: bool, batch_size: int) -> None:
    """``leuko predict --fields``: one row per found cell (field, box, class, probabilities, review)."""
    from leuko.fields.count import predict_fields
    from leuko.infer import load_predictor

    if out is not None and out.suffix.lower() not in (".json", ".csv"):
        raise LeukoError(f"--out must end in .csv or .json; got {out.name}")
    predictor = load_predictor(model, batch_size=batch_size)
    result = predict_fields(predictor, paths, tta=tta)
    table = Table(show_edge=False)
    for c in ("field", "cell", "box", "prediction", "confidence", "edge", "review"):
        table.add_column(c, justify="right" if c in ("cell", "confidence") else "left")
    for r in result.rows[:50]:
        table.add_row(Path(r.field).name, str(r.index), ",".join(str(int(round(v))) for v in r.box), r.label,
                      f"{r.confidence:.3f}", "cut" if r.edge else "", "; ".join(r.review_reasons))
    if result.rows:
        console.print(table)
    if len(result.rows) > 50:
        console.print(f"... {len(result.rows) - 50} more (use --out to save all)")
    n_review = sum(r.review for r in result.rows)
    console.print(f"{len(result.rows)} white cell(s) found in {len(result.fields)} field(s); {n_review} flagged for review",
                  highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if out is not None:
        print_written(result.write(out))
