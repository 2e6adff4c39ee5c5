"""``leuko data``: read, inspect, split, audit, crop and fetch datasets."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

import json
import random
from pathlib import Path

import typer
from rich.table import Table

from leuko.cli.options import LayoutOpt, MarginOpt, layout_options
from leuko.cli.output import console, counts_table, fmt_counts, print_written
from leuko.data import list_layouts, load_dataset, make_split
from leuko.errors import LeukoError

app = typer.Typer(help="Read, inspect, split, audit and fetch datasets.", no_args_is_help=True)


@app.command("layouts")
def data_layouts() -> None:
    """List the dataset layouts leuko reads."""
    table = Table(show_edge=False)
    table.add_column("layout")
    table.add_column("what it reads")
    for spec in list_layouts():
        table.add_row(spec.name, spec.description)
    console.print(table)


@app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    layout: str | None = LayoutOpt,
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any file is unusable or a class is empty."),
    margin: float | None = MarginOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Classes, sub-types, image sizes/modes/formats, and every unusable file with its reason."""
    from leuko.data.inspect import inspect_dataset

    report, _ = inspect_dataset(path, layout, **layout_options(margin))
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        console.print(f"[bold]{report.root}[/]  layout [cyan]{report.layout}[/]: "
                      f"{report.n_samples:,} usable samples from {report.n_files:,} image files, "
                      f"{len(report.class_counts)} classes")
        console.print(counts_table("classes", report.class_counts))
        for label, sub in report.subtype_counts.items():
            console.print(f"  sub-types of [bold]{label}[/]: " + fmt_counts(sub))
        if report.source_split_counts:
            console.print("  source splits: " + fmt_counts(report.source_split_counts))
        console.print("  image sizes: " + fmt_counts(report.sizes, paren=True))
        console.print("  modes: " + fmt_counts(report.modes, paren=True)
                      + "; formats: " + fmt_counts(report.formats, paren=True))
        if report.crop_sizes:
            console.print("  crop sides: " + fmt_counts(report.crop_sizes, paren=True))
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


@app.command("split")
def data_split(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    preset: str = typer.Option("holdout-80-10-10", "--preset", "-p", help="holdout-70-30, holdout-80-20, holdout-80-10-10, source, kfold-K, group-kfold-K."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the split (JSON)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same split."),
    val_fraction: float = typer.Option(0.0, help="Carve this fraction of the training part out as validation."),
    layout: str | None = LayoutOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing split file."),
) -> None:
    """Make a deterministic, group-aware split and save it, so runs can be repeated exactly."""
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


@app.command("audit")
def data_audit(
    paths: list[Path] = typer.Argument(..., help="One or more datasets; pairs are found within and across them."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the pairs as JSON ({'pairs': [[a, b, distance], ...], ...})."),
    layout: str | None = LayoutOpt,
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Also compare CNN embeddings (catches rotated/sheared copies)."),
    hash_threshold: float | None = typer.Option(None, help="Largest 1-correlation of a perceptual-hash pair."),
    embed_threshold: float | None = typer.Option(None, help="Largest cosine distance of an embedding pair."),
    split_check: bool = typer.Option(True, "--split-check/--no-split-check", help="Count pairs across a random 80/20 split and across the dataset's own split."),
) -> None:
    """Exact and near-duplicate images (flips, rotations, shifts, re-compression, brightness) within and across sets."""
    from leuko.data.audit import (
        DEFAULT_EMBED_THRESHOLD,
        DEFAULT_HASH_THRESHOLD,
        audit,
        cross_pairs,
    )

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
        print_written(out)


@app.command("crops")
def data_crops(
    path: Path = typer.Argument(..., help="Dataset folder (or CSV manifest)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write crops, contact sheets, crops.csv and fallbacks.txt into (new or empty)."),
    layout: str | None = LayoutOpt,
    preprocess: str = typer.Option("cell-crop", "--preprocess", help="Preprocessing steps, comma-separated (e.g. cell-crop:0.7,reinhard)."),
    image_size: int = typer.Option(128, "--image-size", help="Output side in pixels."),
    resize: str = typer.Option("stretch", "--resize", help="stretch, pad or crop (how a non-square source becomes square)."),
    run: Path | None = typer.Option(None, "--run", help="Use this run's preprocessing, size and resize mode instead."),
    limit: int | None = typer.Option(None, "--limit", "-n", help="A random (seeded) sample of at most this many images."),
    margin: float | None = MarginOpt,
    files: bool = typer.Option(True, "--files/--no-files", help="Also save every crop as a PNG (not only contact sheets)."),
) -> None:
    """Save what a model sees after preprocessing (crops, contact sheets) and list images where no cell was found."""
    from leuko.data.crops import write_crops
    from leuko.data.preprocess import build_preprocess

    if run is not None:
        from leuko.run.config import load_config
        from leuko.run.folder import RunFolder

        cfg = load_config(RunFolder.open(run).config).data
        pre = build_preprocess(cfg.image_size, cfg.preprocess, resize=cfg.resize)
    else:
        if resize not in ("stretch", "pad", "crop"):
            raise LeukoError(f"--resize must be stretch, pad or crop; got {resize!r}")
        pre = build_preprocess(image_size, preprocess, resize=resize)  # type: ignore[arg-type]
    samples = load_dataset(path, layout, **layout_options(margin)).samples
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
    print_written(f"{res.out} ({res.n_files} crops, {len(res.sheets)} contact sheet(s), crops.csv, fallbacks.txt)")


@app.command("export-reviews")
def data_export_reviews(
    db: str = typer.Argument(..., help="The lab store: a SQLite file (leuko serve --db) or postgresql+psycopg://..."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write reviews.csv and the images into."),
    images: Path | None = typer.Option(None, "--images", help="The image store folder (default: beside a SQLite file)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export in --out."),
) -> None:
    """Reviewed cells of signed-off samples as a csv layout (path,label,group=sample) that train and evaluate read."""
    from leuko.serve.store import Store

    path = Path(db).expanduser()
    if "://" not in db and not path.is_file():
        raise LeukoError(f"no store at {path} (give the --db file leuko serve wrote)")
    with Store.open(db, images=images) as store:
        res = store.export_reviews(out, overwrite=overwrite)
    if not res["n_cells"]:
        console.print("[yellow]no reviewed cells of signed-off samples yet[/]: the manifest has a header only")
    else:
        console.print(f"{res['n_cells']} reviewed cell(s) of {res['n_samples']} signed-off sample(s); classes: "
                      f"{', '.join(res['classes'])}", highlight=False)
    print_written(f"{res['manifest']}  (try: leuko data inspect {res['manifest']})")


@app.command("fetch")
def data_fetch(
    name: str | None = typer.Argument(None, help="Dataset name (see --list)."),
    dest: Path | None = typer.Option(None, "--dest", help="Folder to fetch into (default: leuko's cache)."),
    url: str | None = typer.Option(None, "--url", help="Download from this mirror instead of the official source."),
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
