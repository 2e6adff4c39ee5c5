"""The ``leuko`` command line: verbs over the Python API, nothing more.

Each command parses its options, calls one API function and prints the result
with Rich. User mistakes arrive as :class:`~leuko.errors.LeukoError` and are
printed as one red line with a non-zero exit; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from leuko.errors import LeukoError

console = Console(soft_wrap=True)
err_console = Console(stderr=True)

app = typer.Typer(
    name="leuko",
    help="White-blood-cell classification by transfer learning: data, training, evaluation, prediction.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Read, inspect, split, audit and fetch datasets.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry: architectures, input sizes, weights.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

LayoutOpt = typer.Option(None, "--layout", "-l", help="Dataset layout (folder, pbc, bccd, mooney, cnmc, csv); detected when omitted.")


def _counts_table(title: str, counts: dict[str, int], total_label: str = "total") -> Table:
    table = Table(title=title, show_edge=False)
    table.add_column("name")
    table.add_column("images", justify="right")
    for k, v in counts.items():
        table.add_row(str(k), f"{v:,}")
    table.add_row(f"[bold]{total_label}", f"[bold]{sum(counts.values()):,}")
    return table


# --------------------------------------------------------------------- data
@data_app.command("layouts")
def data_layouts() -> None:
    """List the dataset layouts leuko reads."""
    from leuko.data import list_layouts

    table = Table(show_edge=False)
    table.add_column("layout")
    table.add_column("what it reads")
    for spec in list_layouts():
        table.add_row(spec.name, spec.description)
    console.print(table)


@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    layout: Optional[str] = LayoutOpt,
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any file is unusable or a class is empty."),
    margin: Optional[float] = typer.Option(None, help="bccd: crop margin around each WBC box (fraction of its side)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Classes, sub-types, image sizes/modes/formats, and every unusable file with its reason."""
    from leuko.data.inspect import inspect_dataset

    options = {"margin": margin} if margin is not None else {}
    report, _ = inspect_dataset(path, layout, **options)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        console.print(f"[bold]{report.root}[/]  layout [cyan]{report.layout}[/]: "
                      f"{report.n_samples:,} usable samples from {report.n_files:,} image files, "
                      f"{len(report.class_counts)} classes")
        console.print(_counts_table("classes", report.class_counts))
        for label, sub in report.subtype_counts.items():
            console.print(f"  sub-types of [bold]{label}[/]: " + ", ".join(f"{k} {v:,}" for k, v in sub.items()))
        if report.source_split_counts:
            console.print("  source splits: " + ", ".join(f"{k} {v:,}" for k, v in report.source_split_counts.items()))
        console.print("  image sizes: " + ", ".join(f"{k} ({v:,})" for k, v in report.sizes.items()))
        console.print("  modes: " + ", ".join(f"{k} ({v:,})" for k, v in report.modes.items())
                      + "; formats: " + ", ".join(f"{k} ({v:,})" for k, v in report.formats.items()))
        if report.crop_sizes:
            console.print("  crop sides: " + ", ".join(f"{k} ({v:,})" for k, v in report.crop_sizes.items()))
        for note in report.notes:
            console.print(f"  [dim]note: {note}[/]")
        if report.skipped:
            console.print(f"[yellow]{len(report.skipped)} skipped:[/]")
            for rel, reason in report.skipped:
                console.print(f"  [yellow]{rel}[/]: {reason}", highlight=False)
        for name in report.empty_classes:
            console.print(f"[yellow]empty class folder:[/] {name} (no usable image)")
    if strict and (report.skipped or report.empty_classes):
        raise LeukoError(
            f"--strict: {len(report.skipped)} unusable file(s) and {len(report.empty_classes)} empty class(es) in {report.root}"
        )


@data_app.command("split")
def data_split(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    preset: str = typer.Option("holdout-80-10-10", "--preset", "-p", help="holdout-70-30, holdout-80-20, holdout-80-10-10, source, kfold-K, group-kfold-K."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the split (JSON)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same split."),
    val_fraction: float = typer.Option(0.0, help="Carve this fraction of the training part out as validation."),
    layout: Optional[str] = LayoutOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing split file."),
) -> None:
    """Make a deterministic, group-aware split and save it, so runs can be repeated exactly."""
    from leuko.data import load_dataset
    from leuko.data.splits import make_split

    if out.exists() and not overwrite:
        raise LeukoError(f"{out} exists; pass --overwrite to replace it")
    index = load_dataset(path, layout)
    split = make_split(index, preset, seed=seed, val_fraction=val_fraction)
    split.save(out)
    if split.folds is not None:
        console.print(f"{split.n_folds} folds ({'grouped' if split.grouped else 'stratified'}), saved to {out}")
        return
    table = Table(title=f"split {preset} (seed {seed}){' grouped' if split.grouped else ''}", show_edge=False)
    table.add_column("class")
    counts = split.counts(index)
    for role in counts:
        table.add_column(role, justify="right")
    for c in index.classes:
        table.add_row(c, *[str(counts[r][c]) for r in counts])
    table.add_row("[bold]total", *[f"[bold]{sum(counts[r].values())}" for r in counts])
    console.print(table)
    for note in split.notes:
        console.print(f"[dim]note: {note}[/]")
    console.print(f"saved to {out}")


@data_app.command("audit")
def data_audit(
    paths: List[Path] = typer.Argument(..., help="One or more datasets; pairs are found within and across them."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the pairs as JSON ({'pairs': [[a, b, distance], ...], ...})."),
    layout: Optional[str] = LayoutOpt,
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Also compare CNN embeddings (catches rotated/sheared copies)."),
    hash_threshold: Optional[float] = typer.Option(None, help="Largest 1-correlation of a perceptual-hash pair."),
    embed_threshold: Optional[float] = typer.Option(None, help="Largest cosine distance of an embedding pair."),
    split_check: bool = typer.Option(True, "--split-check/--no-split-check", help="Count pairs across a random 80/20 split and across the dataset's own split."),
) -> None:
    """Exact and near-duplicate images (flips, rotations, shifts, re-compression, brightness) within and across sets."""
    from leuko.data import load_dataset, make_split
    from leuko.data.audit import DEFAULT_EMBED_THRESHOLD, DEFAULT_HASH_THRESHOLD, audit, cross_pairs

    indexes = [load_dataset(p, layout) for p in paths]
    embed = None
    if embeddings:
        from leuko.models.embed import make_embedder

        embed = make_embedder()
    report = audit(
        indexes,
        names=[str(p) for p in paths],
        hash_threshold=DEFAULT_HASH_THRESHOLD if hash_threshold is None else hash_threshold,
        embed=embed,
        embed_threshold=DEFAULT_EMBED_THRESHOLD if embed_threshold is None else embed_threshold,
        progress=True,
    )
    console.print(report.format_summary(), highlight=False)
    if split_check and len(indexes) == 1:
        index = indexes[0]
        own = index.subset(s for s in index.samples if s.source_split)
        if own.samples and len({s.source_split for s in own.samples}) > 1:
            roles: dict[str, list] = {}
            for s in own.samples:
                roles.setdefault(s.source_split, []).append(s)
            names = sorted(roles)
            train_name = next((n for n in names if "train" in n.lower()), names[0])
            for other in names:
                if other != train_name:
                    n = len(cross_pairs(report, roles[train_name], roles[other]))
                    console.print(f"pairs across the dataset's own split {train_name} x {other}: {n}")
            sub = index.subset(roles[train_name])
        else:
            sub = index
        rnd = make_split(sub, "holdout-80-20", seed=0)
        n_rand = len(cross_pairs(report, rnd.samples(sub, "train"), rnd.samples(sub, "test")))
        console.print(f"pairs across a random 80/20 split of {'TRAIN' if sub is not index else 'the dataset'}: {n_rand}")
    if out is not None:
        report.to_json(out)
        console.print(f"[green]written:[/] {out}")


@data_app.command("crops")
def data_crops(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write crops, contact sheets, crops.csv and fallbacks.txt into (new or empty)."),
    layout: Optional[str] = LayoutOpt,
    preprocess: str = typer.Option("cell-crop", "--preprocess", help="Preprocessing steps, comma-separated (e.g. cell-crop:0.7,reinhard)."),
    image_size: int = typer.Option(128, "--image-size", help="Output side in pixels."),
    resize: str = typer.Option("stretch", "--resize", help="stretch, pad or crop (how a non-square source becomes square)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Use this run's preprocessing, size and resize mode instead."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="A random (seeded) sample of at most this many images."),
    margin: Optional[float] = typer.Option(None, help="bccd: crop margin around each WBC box (fraction of its side)."),
    files: bool = typer.Option(True, "--files/--no-files", help="Also save every crop as a PNG (not only contact sheets)."),
) -> None:
    """Save what a model sees after preprocessing (crops, contact sheets) and list images where no cell was found."""
    import random

    from leuko.data import load_dataset
    from leuko.data.crops import write_crops
    from leuko.data.preprocess import build_preprocess

    if run is not None:
        from leuko.runs import RunFolder
        from leuko.train.config import load_config

        cfg = load_config(RunFolder.open(run).config).data
        pre = build_preprocess(cfg.image_size, cfg.preprocess, resize=cfg.resize)
    else:
        if resize not in ("stretch", "pad", "crop"):
            raise LeukoError(f"--resize must be stretch, pad or crop; got {resize!r}")
        pre = build_preprocess(image_size, preprocess, resize=resize)  # type: ignore[arg-type]
    options = {"margin": margin} if margin is not None else {}
    samples = load_dataset(path, layout, **options).samples
    if limit is not None:
        if limit < 1:
            raise LeukoError(f"--limit must be a positive number; got {limit}")
        if len(samples) > limit:
            samples = random.Random(0).sample(samples, limit)
    res = write_crops(samples, pre, out, files=files)
    console.print(f"{', '.join(pre.steps) or 'no steps'} at {pre.image_size}px: {res.report.summary()}")
    for key in res.report.fallbacks[:20]:
        console.print(f"  [yellow]no cell:[/] {key}", highlight=False)
    if len(res.report.fallbacks) > 20:
        console.print(f"  ... {len(res.report.fallbacks) - 20} more in {out / 'fallbacks.txt'}")
    for key, reason in res.report.failed:
        console.print(f"  [yellow]unreadable:[/] {key}: {reason}", highlight=False)
    console.print(f"[green]written:[/] {res.out} ({res.n_files} crops, {len(res.sheets)} contact sheet(s), crops.csv, fallbacks.txt)")


@data_app.command("fetch")
def data_fetch(
    name: Optional[str] = typer.Argument(None, help="Dataset name (see --list)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Folder to fetch into (default: leuko's cache)."),
    url: Optional[str] = typer.Option(None, "--url", help="Download from this mirror instead of the official source."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if already present."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    list_: bool = typer.Option(False, "--list", help="List the datasets leuko knows how to get."),
) -> None:
    """Download a public dataset (checksum, resume); datasets behind a login get exact manual steps."""
    from leuko.data.fetch import fetch_dataset, list_remote_datasets

    if list_ or name is None:
        table = Table(show_edge=False)
        for col in ("name", "how", "layout", "licence", "title"):
            table.add_column(col)
        for ds in list_remote_datasets():
            table.add_row(ds.name, "manual" if ds.manual_only else "download", ds.layout or "-", ds.licence, ds.title)
        console.print(table)
        if name is None and not list_:
            raise LeukoError("name a dataset to fetch (see the list above)")
        return
    folder = fetch_dataset(name, dest, url=url, force=force, progress=progress)
    console.print(f"[green]ready:[/] {folder}")


# ------------------------------------------------------------------- models
@models_app.command("list")
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


# -------------------------------------------------------------------- train
@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML config (sections data, model, train, trainer)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder (overrides data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder to create (default runs/<name>)."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a config key: --set train.lr=1e-4 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run folder from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
) -> None:
    """Train a classifier; writes a run folder (config, split, checkpoints, metrics, model)."""
    from leuko.train import train

    if resume is not None:
        if config is not None:
            raise LeukoError("--resume uses the run's own config.yaml; do not pass a config file too")
        result = train(None, resume, overrides=set_, data_path=data, resume=True, echo=console.print)
    else:
        target = out or Path("runs") / (config.stem if config else "run")
        result = train(config, target, overrides=set_, data_path=data, overwrite=overwrite, echo=console.print)
    best = f"{result.best_val_acc:.4f}" if result.best_val_acc is not None else "n/a"
    console.print(
        f"[green]done:[/] {result.run_dir}  best val acc {best} (epoch {result.best_epoch}), "
        f"{result.epochs_run} epochs, {result.wall_time_s / 60:.1f} min ({result.path} path)"
    )


def _rows_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    """A Rich table of result rows (floats to 4 places, missing as blank)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "cell" else "right", overflow="fold")
    for r in rows:
        table.add_row(*["" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r[c]) for c in columns])
    return table


@app.command("cv")
def cv_cmd(
    config: Path = typer.Argument(..., help="YAML run config to cross-validate."),
    folds: int = typer.Option(5, "--folds", "-k", help="Number of folds (K)."),
    grouped: bool = typer.Option(False, "--grouped", help="Group K-fold: a patient/cell group never straddles folds."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder (overrides data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<config>-cv<K>); re-run to resume."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a config key (repeatable)."),
) -> None:
    """Stratified (or group) K-fold cross-validation: a run per fold, a table per fold, mean ± std."""
    from leuko.evaluate.grid import cross_validate
    from leuko.evaluate.metrics import format_mean_std
    from leuko.train.config import load_config

    cfg = load_config(config, set_)
    target = out or Path("runs") / f"{config.stem}-cv{folds}"
    res = cross_validate(cfg, target, folds, grouped=grouped, data_path=data, echo=console.print)
    console.print(_rows_table(f"{folds}-fold cross-validation", res["folds"], ["cell", "accuracy", "precision", "recall", "f1", "n_test", "train_time_min"]))
    for key, v in res["summary"].items():
        console.print(f"{key:>18}: {format_mean_std(v['mean'], v['std'])}")
    console.print(f"[green]written:[/] {res['out']}/cv.csv, cv.md, cv.json, cv.png")


@app.command("compare")
def compare_cmd(
    grid: Path = typer.Argument(..., help="Grid YAML: a base config plus named cells and/or a grid of values."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset folder (overrides data.path)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<grid name>); re-run to resume."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a config key in every cell (repeatable)."),
    only: List[str] = typer.Option([], "--only", help="Run only this cell (repeatable); the table lists the cells run."),
) -> None:
    """Train and evaluate every cell of a grid (resumable); writes a comparison table (CSV, Markdown) and a bar chart."""
    from leuko.evaluate.grid import compare

    res = compare(grid, out, overrides=set_, data_path=data, only=only, echo=console.print)
    cols = [c for c in res["table"].columns if not c.endswith("_std") and c not in ("balanced_accuracy", "weighted_f1", "ece")]
    console.print(_rows_table(f"comparison ({len(res['rows'])} cells)", res["rows"], cols))
    console.print(f"[green]written:[/] {res['csv']}, {res['md']}, {res['out']}/compare.png")


@app.command("demo")
def demo_cmd(
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="PBC folder (default: $LEUKO_DATA_DIR, leuko's cache, or ../shared/datasets)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder to write."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a key of the demo config."),
    overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace an earlier demo run."),
) -> None:
    """Train on PBC with the offline backbone, evaluate on a held-out split, print a summary."""
    import time

    from leuko.data.locate import resolve_data
    from leuko.evaluate.run import evaluate_run
    from leuko.recipes import recipe_path
    from leuko.train import train

    t0 = time.perf_counter()
    data_path = resolve_data("pbc", data)
    result = train(recipe_path("demo"), out, overrides=set_, data_path=data_path, overwrite=overwrite, echo=console.print)
    m = evaluate_run(out, echo=console.print)
    console.print(m["report"], highlight=False)
    ci = m["ci95"]["accuracy"]
    table = Table(title="leuko demo", show_edge=False)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("held-out test images", f"{m['n']}")
    table.add_row("accuracy (95% CI)", f"{m['accuracy']:.4f} ({ci[0]:.4f}-{ci[1]:.4f})")
    table.add_row("macro-F1", f"{m['macro_f1']:.4f}")
    table.add_row("expected calibration error", f"{m['ece']:.4f}")
    table.add_row("training time", f"{result.wall_time_s / 60:.1f} min")
    table.add_row("total time", f"{(time.perf_counter() - t0) / 60:.1f} min")
    table.add_row("run folder", str(out))
    table.add_row("figures and metrics", m["out_dir"])
    console.print(table)


# ----------------------------------------------------------------- evaluate
@app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'leuko train'."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset to evaluate on (default: the run's own)."),
    layout: Optional[str] = LayoutOpt,
    split: str = typer.Option("test", "--split", help="train, val, test (of the run's split) or all."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/eval/<split>, <split>-tta with --tta)."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="YAML/JSON with 'merge' and 'exclude' to match another label set, or a shipped map by name (pbc-to-five: PBC's 8 classes onto the five white-cell types; alias pbc-to-bccd)."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (flips, 90-degree rotation)."),
    margin: Optional[float] = typer.Option(None, help="bccd: crop margin around each WBC box (fraction of its side)."),
) -> None:
    """Metrics (with 95% CIs), predictions.csv, confusion matrices, curves and a classification report.

    On another lab's data (--data), the run's own held-out numbers are shown beside the new lab's."""
    from leuko.evaluate.run import evaluate_run

    options = {"margin": margin} if margin is not None else None
    m = evaluate_run(run_dir, data=data, layout=layout, split=split, out=out, class_map=class_map, tta=tta,
                     echo=console.print, layout_options=options)
    console.print(m["report"], highlight=False)
    ci = m.get("ci95") or {}
    acc_ci = ci.get("accuracy") or [None, None]
    f1_ci = ci.get("macro_f1") or [None, None]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    console.print(
        f"accuracy {fmt(m['accuracy'])} (95% CI {fmt(acc_ci[0])}-{fmt(acc_ci[1])}), macro-F1 {fmt(m['macro_f1'])} "
        f"(95% CI {fmt(f1_ci[0])}-{fmt(f1_ci[1])}), balanced acc {fmt(m['balanced_accuracy'])}, ECE {fmt(m.get('ece'))}"
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
        from leuko.evaluate.run import describe_route

        console.print("route: " + describe_route(route), highlight=False)
        _print_magnification(route.get("magnification"))
    for note in m["class_map"]["notes"]:
        console.print(f"[dim]class map: {note}[/]")
    for note in m.get("notes") or []:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    for path, reason in m["data"]["failed"]:
        console.print(f"[yellow]unreadable:[/] {path}: {reason}")
    _print_cell_crop(m["data"].get("cell_crop"))
    if "in_lab" in m:
        _print_side_by_side(run_dir, m)
    console.print(f"[green]written:[/] {m['out_dir']}")


def _print_magnification(check: Optional[dict]) -> None:
    """A routed run's batch-level magnification check (leuko.infer.route.lab_magnification)."""
    if check and check.get("warning"):
        console.print(f"[yellow]magnification:[/] {check['warning']}", highlight=False)
    elif check:
        console.print(f"[dim]magnification: red cells {check['median_ratio']:.2f}x the home lab's size "
                      f"(median of {check['n_measured']})[/]", highlight=False)


def _print_cell_crop(info: Optional[dict]) -> None:
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
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    table = Table(title="in-lab vs new lab", show_edge=False)
    table.add_column("")
    how = lambda tta: ", TTA" if tta else ""  # noqa: E731
    table.add_column(f"in-lab (held-out test, n={inlab.get('n', '?')}{how(inlab.get('tta'))})", justify="right")
    table.add_column(f"new lab (n={m.get('n', '?')}{how(m.get('tta'))})", justify="right")
    table.add_column("change", justify="right")
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced acc")):
        a, b = inlab.get(key), m.get(key)
        delta = "" if a is None or b is None else f"{b - a:+.4f}"
        table.add_row(label, fmt(a), fmt(b), delta)
    ra, rb = inlab.get("review") or {}, m.get("review") or {}
    for key, label in (("flagged", "flagged for review"), ("unlike_training", "unlike the training data"),
                       ("accepted_accuracy", "accuracy of the accepted")):
        a, b = ra.get(key), rb.get(key)
        if a is None and b is None:
            continue
        delta = "" if a is None or b is None else f"{b - a:+.4f}"
        table.add_row(label, fmt(a), fmt(b), delta)
    ha, hb = (inlab.get("route") or {}).get("home"), (m.get("route") or {}).get("home")
    if ha or hb:
        a, b = (ha or {}).get("share"), (hb or {}).get("share")
        table.add_row("answered by the home network", fmt(a), fmt(b), "" if a is None or b is None else f"{b - a:+.4f}")
    console.print(table)
    console.print(f"[dim]in-lab: {inlab.get('source')}; the new lab is scored on its own label set (class map applied)[/]",
                  highlight=False)


@app.command("explain")
def explain_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (or its model.pt); a routed run explains each image with the network that answers it."),
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the Grad-CAM PNGs."),
    class_: Optional[str] = typer.Option(None, "--class", "-c", help="Explain this class instead of the predicted one."),
    alpha: float = typer.Option(0.4, "--alpha", help="Heat-map opacity in the overlay (0-1)."),
) -> None:
    """Grad-CAM heat maps: where in each image the evidence for the class lies (one PNG per image)."""
    from leuko.explain import explain_images

    result = explain_images(run_dir, paths, out, target=class_, alpha=alpha)
    for path, reason in result.failed:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
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
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset to evaluate on when the run has no evaluation yet (default: the run's own)."),
    layout: Optional[str] = LayoutOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html); a .md and a figures folder go beside it."),
) -> None:
    """One self-contained HTML report (and Markdown) of a run: config, data, training, metrics, calibration, Grad-CAMs."""
    from leuko.reports import write_report

    written = write_report(run_dir, out=out, data=data, layout=layout, echo=console.print)
    console.print(f"[green]written:[/] {written.html}  (Markdown: {written.markdown}, figures: {written.figures})")


# ------------------------------------------------------------------ predict
@app.command("predict")
def predict_cmd(
    model: Path = typer.Argument(..., help="A run folder, its model.pt, or a MODEL.onnx from 'leuko export' (runs without torch)."),
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write predictions to .csv or .json."),
    tta: bool = typer.Option(False, "--tta", help="Average over flips and a 90-degree rotation."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="Also list the next K-1 classes."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
) -> None:
    """Classify new images; unreadable files are named and skipped, the rest are predicted."""
    from leuko.infer.predict import predict_images, write_predictions

    result = predict_images(model, paths, tta=tta, top_k=top_k, batch_size=batch_size)
    for path, reason in result.failed:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
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
    _print_magnification(result.magnification)
    if out is not None:
        console.print(f"[green]written:[/] {write_predictions(result, out)}")


# ------------------------------------------------------------------- export
@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (or its model.pt)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default RUN_DIR/model.onnx)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Export the model to ONNX with its classes, preprocessing and temperature; 'leuko predict MODEL.onnx' runs it."""
    from leuko.infer.onnx import export_onnx

    result = export_onnx(run_dir, out, fmt=fmt, force=force)
    meta = result.meta
    console.print(
        f"{meta['model'].get('name', '?')}, {len(meta['classes'])} classes, input {meta['input']['image_size']} px, "
        f"temperature {float(meta.get('temperature', 1.0)):.3f}, opset {result.opset}; "
        f"max |logit difference| vs PyTorch {result.max_abs_diff:.1e}"
    )
    console.print(f"[green]written:[/] {result.path} ({result.size_bytes / 2**20:.1f} MiB)")


# ------------------------------------------------------------------ adapt
@app.command("adapt")
def adapt_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'leuko train'."),
    data: Path = typer.Option(..., "--data", "-d", help="The new lab's images (unlabelled is fine): a dataset or any folder of images."),
    out: Path = typer.Option(..., "--out", "-o", help="The adapted run folder to create (must not exist)."),
    layout: Optional[str] = LayoutOpt,
    margin: Optional[float] = typer.Option(None, help="bccd: crop margin around each WBC box (fraction of its side)."),
    layers: str = typer.Option("trained", "--layers", help="trained: the BatchNorm layers training estimated on the source lab (frozen ones keep ImageNet's); all: every one."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use a random subset of at most this many images."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per BatchNorm batch."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="AdaBN: estimate on a resample whose predicted-class mix is the training split's (labs differ in which cells they see, not only in how they look)."),
    method: str = typer.Option("adabn", "--method", help="adabn: re-estimate BatchNorm statistics; self-train: fine-tune on the model's own confident predictions (works on freeze: bn models too)."),
    class_map: Optional[str] = typer.Option(None, "--class-map", help="self-train: a class map (file or shipped name, e.g. pbc-to-five) whose 'exclude' lists classes the new lab's images cannot be."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="self-train: passes over the kept images (default 5)."),
    keep: Optional[float] = typer.Option(None, "--keep", help="self-train: share of each predicted class kept, most confident first (default 0.5)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the GPU when there is one)."),
) -> None:
    """Adapt a model to a new lab's images, no labels: AdaBN or self-training; writes a new run folder."""
    from leuko.train.adapt import adapt_run

    options = {"margin": margin} if margin is not None else None
    res = adapt_run(run_dir, data, out, layout=layout, layout_options=options, method=method, layers=layers,
                    max_images=max_images, batch_size=batch_size, balance=balance, class_map=class_map, epochs=epochs,
                    keep=keep, device=device, echo=console.print)
    for key, reason in res.failed:
        err_console.print(f"[yellow]skipped[/] {key}: {reason}", highlight=False, soft_wrap=True)
    if res.adapted["method"] == "adabn":
        console.print(f"{res.n_layers} BatchNorm layers re-estimated on {res.n_images} images; weights unchanged")
    else:
        console.print(f"self-trained on {sum(res.adapted['kept'].values())} of {res.n_images} images ({res.adapted['steps']} steps)")
    console.print(f"[green]written:[/] {res.out}  (try: leuko evaluate {res.out} --data {data})", highlight=False)


@app.command("route")
def route_cmd(
    home: Path = typer.Argument(..., help="The run that is best on its own lab (e.g. runs/pbc-best)."),
    robust: Path = typer.Argument(..., help="The run meant for other labs (e.g. runs/pbc-robust), same lab and split."),
    out: Path = typer.Option(..., "--out", "-o", help="The routed run folder to create (must not exist)."),
    quantile: float = typer.Option(0.99, "--quantile", help="Gate thresholds: this quantile of the validation split's smear distances (colour, red-cell size)."),
    energy: bool = typer.Option(True, "--energy/--no-energy", help="Also route to the robust network what the home network calls unlike its training data."),
) -> None:
    """One run of two networks: the home network answers images whose smear looks like its lab, the robust one the rest."""
    from leuko.train.route import build_route

    res = build_route(home, robust, out, quantile=quantile, energy=energy, echo=console.print)
    acc = res.val_accuracy
    fmt = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
    console.print(f"gate: {res.gate.describe()}" + ("; and the home network's energy check" if energy else ""),
                  highlight=False)
    console.print(f"validation split: the home network answers {res.val_home_share:.1%} ({fmt(acc['home'])} correct), "
                  f"the robust one the rest ({fmt(acc['robust'])}); routed {fmt(acc['routed'])}", highlight=False)
    console.print(f"[green]written:[/] {res.out}  (try: leuko evaluate {res.out})", highlight=False)


@app.command("ensemble")
def ensemble_cmd(
    runs: List[Path] = typer.Argument(..., help="Two or more runs of one recipe, lab and split (e.g. seeds 0, 1, 2); the first one's split and record are kept."),
    out: Path = typer.Option(..., "--out", "-o", help="The ensemble run folder to create (must not exist)."),
) -> None:
    """One network from several runs: their calibrated logits averaged, recalibrated on the validation split."""
    from leuko.train.ensemble import build_ensemble_run

    res = build_ensemble_run(runs, out, echo=console.print)
    console.print("validation accuracy: " + ", ".join(f"{Path(k).name} {v:.2%}" for k, v in res.val_accuracy.items())
                  + f"; ensemble temperature {res.temperature:.3f}", highlight=False)
    console.print(f"[green]written:[/] {res.out}  (try: leuko evaluate {res.out})", highlight=False)


# ------------------------------------------------------------------ serve
@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="A run folder (or its model.pt) or an exported .onnx file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default; the service has no login)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port."),
) -> None:
    """The lab service: HTTP API (predict, explain, count) and a review page at http://HOST:PORT/."""
    from leuko.serve import serve

    serve(model, host=host, port=port, echo=console.print)


# ------------------------------------------------------------------ entry
def main(argv: Optional[List[str]] = None) -> None:
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


if __name__ == "__main__":  # pragma: no cover
    main()
