"""Training verbs: ``train``, ``cv``, ``compare``, ``curve`` and ``demo``."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from leuko.cli.options import DataOverrideOpt, LayoutOpt, MarginOpt, class_map_option, layout_options
from leuko.cli.output import console, print_written, rows_table
from leuko.errors import LeukoError

app = typer.Typer()


@app.command("train")
def train_cmd(
    config: Path | None = typer.Argument(None, help="YAML config (sections data, model, train, trainer)."),
    data: Path | None = DataOverrideOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder to create (default runs/<name>)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key: --set train.lr=1e-4 (repeatable)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run folder from its last checkpoint."),
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


@app.command("cv")
def cv_cmd(
    config: Path = typer.Argument(..., help="YAML run config to cross-validate."),
    folds: int | None = typer.Option(None, "--folds", "-k", help="Number of folds (K, default 5)."),
    grouped: bool = typer.Option(False, "--grouped", help="Group K-fold: a patient/cell group never straddles folds."),
    leave_one_lab_out: bool = typer.Option(False, "--leave-one-lab-out", help="Instead of folds: one run per lab of data.sources, trained on the others, tested on all of it."),
    data: Path | None = DataOverrideOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default runs/<config>-cv<K> or runs/<config>-lolo); re-run to resume."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key (repeatable)."),
    against: Path | None = typer.Option(None, "--against", help="With --leave-one-lab-out: another recipe's finished leave-one-lab-out folder; adds the paired difference lab by lab (OUT/vs-<its name>.md)."),
    only: list[str] = typer.Option([], "--only", help="With --leave-one-lab-out: leave out only this lab (repeatable); the table covers the labs run and says so."),
    seeds: int = typer.Option(1, "--seeds", help="With --leave-one-lab-out: train each lab's run this many times (train.seed, +1, ...); rows are their mean, CIs span seeds and cells."),
) -> None:
    """Stratified (or group) K-fold cross-validation: a run per fold, a table per fold, mean ± std.

    With --leave-one-lab-out (a config with data.sources): a run per lab left out, a table per lab
    (accuracy, macro-F1 over classes with >= 10 cells, balanced accuracy, 95% CIs), mean and worst lab.
    With --against OTHER (another leave-one-lab-out folder): this table minus that one on the same
    cells, with paired bootstrap intervals (the two recipes' separate intervals overlap long before
    a difference is noise). --only LAB leaves out just that lab; --seeds N trains each lab's run N
    times (on a lab unlike the training labs, two seeds can differ by more than two recipes).
    """
    from leuko.evaluate.metrics import format_mean_std
    from leuko.run.config import load_config
    from leuko.studies.grid import cross_validate

    cfg = load_config(config, set_)
    if leave_one_lab_out:
        from leuko.studies.grid import leave_one_lab_out as lolo

        if folds is not None or grouped:
            raise LeukoError("--leave-one-lab-out splits by lab: drop --folds/--grouped")
        if data is not None:
            raise LeukoError("--leave-one-lab-out reads the paths of data.sources: drop --data")
        target = out or Path("runs") / f"{config.stem}-lolo"
        if against is not None:  # read before hours of training, not after
            from leuko.studies.grid import lab_predictions

            missing = sorted(set(only) - set(lab_predictions(against)))
            if missing:
                raise LeukoError(f"--against {against} did not leave out {', '.join(missing)}: nothing to compare with --only")
        res = lolo(cfg, target, only=only, seeds=seeds, echo=console.print)
        cols = ["lab", "n_test", "accuracy", *(["accuracy_seed_sd"] if seeds > 1 else []), "macro_f1_common",
                "balanced_accuracy", "train_time_min"]
        summary = [{"lab": k, **v} for k, v in res["summary"].items()]
        console.print(rows_table("leave-one-lab-out", res["labs"] + summary, cols))
        print_written(f"{res['out']}/lolo.csv, lolo.md, lolo.json, lolo.png")
        if against is not None:
            from leuko.studies.grid import lab_table_against

            vs = lab_table_against(target, against, list(cfg.data.classes or []), echo=console.print)
            console.print(f"mean over labs: accuracy {vs['mean']['d_accuracy']:+.4f} "
                          f"({vs['mean']['d_accuracy_lo']:+.4f} to {vs['mean']['d_accuracy_hi']:+.4f}) against {against}")
            print_written(vs["md"])
        return
    if against is not None or only or seeds != 1:
        flag = "--against" if against is not None else "--only" if only else "--seeds"
        raise LeukoError(f"{flag} is for leave-one-lab-out tables: add --leave-one-lab-out")
    folds = 5 if folds is None else folds
    target = out or Path("runs") / f"{config.stem}-cv{folds}"
    res = cross_validate(cfg, target, folds, grouped=grouped, data_path=data, echo=console.print)
    console.print(rows_table(f"{folds}-fold cross-validation", res["folds"], ["cell", "accuracy", "precision", "recall", "f1", "n_test", "train_time_min"]))
    for key, v in res["summary"].items():
        console.print(f"{key:>18}: {format_mean_std(v['mean'], v['std'])}")
    print_written(f"{res['out']}/cv.csv, cv.md, cv.json, cv.png")


@app.command("compare")
def compare_cmd(
    grid: Path = typer.Argument(..., help="Grid YAML: a base config plus named cells and/or a grid of values."),
    data: Path | None = DataOverrideOpt,
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default runs/<grid name>); re-run to resume."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config key in every cell (repeatable)."),
    only: list[str] = typer.Option([], "--only", help="Run only this cell (repeatable); the table lists the cells run."),
) -> None:
    """Train and evaluate every cell of a grid (resumable); writes a comparison table (CSV, Markdown) and a bar chart."""
    from leuko.studies.grid import compare

    res = compare(grid, out, overrides=set_, data_path=data, only=only, echo=console.print)
    cols = [c for c in res["table"].columns if not c.endswith("_std") and c not in ("balanced_accuracy", "weighted_f1", "ece")]
    console.print(rows_table(f"comparison ({len(res['rows'])} cells)", res["rows"], cols))
    print_written(f"{res['csv']}, {res['md']}, {res['out']}/compare.png")


@app.command("demo")
def demo_cmd(
    data: Path | None = typer.Option(None, "--data", "-d", help="PBC folder (default: $LEUKO_DATA_DIR, leuko's cache, or ../shared/datasets)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder to write."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key of the demo config."),
    overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace an earlier demo run."),
) -> None:
    """Train on PBC with the offline backbone, evaluate on a held-out split, print a summary."""
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


@app.command("curve")
def curve_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run to fine-tune (one network, an ensemble or a routed run)."),
    data: Path = typer.Option(..., "--data", "-d", help="A labelled new lab (any layout)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for curve.csv, curve.md, curve.png and points.json (must not exist)."),
    layout: str | None = LayoutOpt,
    margin: float | None = MarginOpt,
    class_map: str | None = class_map_option("A class map when the lab's labels are not the run's classes (e.g. pbc-to-five)."),
    shots: str = typer.Option("0,5,10,25,50", "--shots", help="Labelled cells per class at each point (0: the run as it is)."),
    draws: int = typer.Option(5, "--draws", help="Seeded draws of the cells at each K."),
    fresh: bool = typer.Option(True, "--fresh/--no-fresh", help="Also train a fresh network (ImageNet weights) on the same cells only."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps per point (default: as leuko finetune)."),
) -> None:
    """Learning curve on a new lab: fine-tune on K labelled cells per class, score on all the remaining cells."""
    from leuko.studies.curve import learning_curve, parse_shots

    learning_curve(run_dir, data, out, layout=layout, layout_options=layout_options(margin) or None,
                   class_map=class_map, shots=parse_shots(shots), draws=draws, fresh=fresh, steps=steps,
                   echo=console.print)
    print_written(f"{out / 'curve.md'}, {out / 'curve.csv'}, {out / 'curve.png'}")
