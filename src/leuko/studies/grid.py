"""``leuko cv`` and ``leuko compare``: many runs from one file, each trained, evaluated and tabulated, resumably.

The studies' results are tables of runs: four networks side by side, epochs ×
batch size, K folds with mean ± std. Both are a list of *cells*, each a full
run config, trained into its own run folder under one output folder:

    OUT/plan.json            what each cell is (its resolved config): a re-run
                             with a different plan is refused, not mixed in
    OUT/<cell>/              an ordinary run folder (train, evaluate, report work on it)
    OUT/<cell>/eval/test/    its held-out evaluation (metrics.json, predictions.csv, figures)
    OUT/compare.{csv,md,png} or OUT/cv.{csv,md,json,png} or OUT/lolo.{csv,md,json,png}

Re-running the same command resumes: a cell with a model and an evaluation
is skipped, a cell interrupted mid-training continues from its last
checkpoint, a cell with a model but no evaluation is only evaluated.

Grid file (YAML)::

    name: efficientnet-b3-grid
    config: study-efficientnet-b3-all.yaml   # base run config (relative to this file), or
    base: {model: {name: efficientnet_b3}}   # an inline one
    set: [data.image_size=224]               # overrides for every cell
    cells:                                   # named cells (optional)
      alexnet: {model.name: alexnet}
      vgg16: {model.name: vgg16}
    scenarios:                               # named override sets crossed with the cells (optional)
      s1: {train.batch_size: 64, train.lr: 1.0e-4}
      s2: {train.batch_size: 32, train.lr: 1.0e-5}
    grid:                                    # cartesian product (optional; crossed with cells)
      train.epochs: [10, 20]
      train.batch_size: [16, 32]
    folds: 5                                 # optional: cross-validate every cell (mean ± std)
    grouped: false                           # group K-fold (patients/subjects never straddle folds)
    leave_one_lab_out: true                  # or: judge every cell lab by lab (a config with data.sources)

Leave-one-lab-out (``leuko cv CONFIG --leave-one-lab-out``, :func:`leave_one_lab_out`)
is one cell per lab of ``data.sources``: ``without-<lab>`` trains and validates
on the other labs and is tested on every image of that lab (``data.leave_out``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import leuko.train  # called as leuko.train.train, so a test can spy on it
from leuko.errors import LeukoError
from leuko.evaluate.figures import plot_compare_bars
from leuko.evaluate.metrics import SMALL_CLASS, format_mean_std
from leuko.evaluate.run import default_eval_dir, evaluate_run
from leuko.evaluate.tables import ROW_COLUMNS, markdown_table, metrics_row, write_table
from leuko.run.config import (
    RunConfig,
    config_from_dict,
    format_validation_error,
    merge_config,
    nest_dotted,
    read_yaml_mapping,
)
from leuko.run.folder import RunFolder
from leuko.studies.labscores import LAB_HEADERS, LAB_METRICS, lab_scores, paired_labs

Echo = Callable[[str], None]

#: Metrics drawn in the comparison bar chart (the four-network study's table).
CHART_METRICS = ["accuracy", "precision", "recall", "f1"]


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One run of a table: its folder name, its full config and the overrides that make it differ."""
    name: str
    config: RunConfig
    changes: dict[str, Any] = field(default_factory=dict)


def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / cell.name


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without what may change between runs of one plan without changing the run."""
    cfg["data"].pop("path", None)  # the folder may be given differently on resume (--data)
    cfg.pop("description", None)  # words about the recipe, not the recipe: editing them changes no run
    return cfg


def _plan_entry(cell: Cell) -> dict[str, Any]:
    return _comparable(cell.config.model_dump(mode="json"))


def check_plan(out: Path, cells: list[Cell], kind: str) -> None:
    """Refuse to mix a different plan into an existing output folder; record the plan otherwise."""
    plan_file = out / "plan.json"
    plan = {"kind": kind, "cells": {c.name: _plan_entry(c) for c in cells}}
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("kind") != kind:
            raise LeukoError(f"{out} holds a '{old.get('kind')}' result, not '{kind}': choose another --out")
        for name, entry in plan["cells"].items():
            before = _as_now(old["cells"][name]) if name in old.get("cells", {}) else entry
            if before != entry:
                diff = _first_difference(before, entry)
                raise LeukoError(f"{out}/{name} was run with a different config ({diff}): choose another --out or remove that folder")
        old.get("cells", {}).update(plan["cells"])
        plan = {"kind": kind, "cells": old["cells"]}
    elif out.exists() and any(out.iterdir()):
        raise LeukoError(f"{out} exists and is not a leuko {kind} folder (no plan.json): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = plan_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(plan_file)


def _as_now(entry: dict[str, Any]) -> dict[str, Any]:
    """A plan entry written by an earlier leuko, read through today's schema: a setting added since
    then takes its default (which is what that run did), so it does not count as a different config."""
    try:
        return _comparable(config_from_dict(entry).model_dump(mode="json"))
    except LeukoError:
        return entry  # a setting since removed or changed: compare as written, and say what differs


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where}: {a!r} then, {b!r} now"


def run_cell(
    cell: Cell,
    out: Path,
    *,
    data_path: str | Path | None = None,
    eval_split: str = "test",
    echo: Echo = print,
) -> dict[str, Any]:
    """Train (or resume, or skip) one cell and evaluate it; returns its table row."""

    run_dir = _cell_dir(out, cell)
    metrics_file = default_eval_dir(run_dir, None, eval_split) / "metrics.json"
    run = RunFolder(run_dir)
    if run.model.is_file() and metrics_file.is_file():
        echo(f"cell {cell.name}: done earlier: skipped")
    else:
        if run.model.is_file():
            echo(f"cell {cell.name}: trained earlier: evaluating")
        elif run.last_ckpt.is_file():
            echo(f"cell {cell.name}: interrupted earlier: resuming from its last checkpoint")
            leuko.train.train(None, run_dir, data_path=data_path, resume=True, echo=echo)
        else:
            if run_dir.exists():
                # Started but stopped before its first checkpoint: nothing to keep but the log.
                echo(f"cell {cell.name}: stopped before its first epoch ended earlier: starting it again")
                shutil.rmtree(run_dir)
            echo(f"cell {cell.name}: training")
            leuko.train.train(cell.config, run_dir, data_path=data_path, echo=echo)
        evaluate_run(run_dir, split=eval_split, echo=echo)
    metrics = json.loads(metrics_file.read_text())
    summary = run.read_json("summary.json") if run.summary.is_file() else {}
    row: dict[str, Any] = {"cell": cell.name, **{k: v for k, v in cell.changes.items()}}
    row.update(metrics_row(metrics))
    row["n_test"] = int(metrics["n"])
    row["epochs"] = summary.get("epochs_run")
    row["train_time_min"] = round(float(summary.get("wall_time_s", math.nan)) / 60.0, 2)
    return row


# --------------------------------------------------------------------------- cross-validation


def fold_cells(config: RunConfig, folds: int, *, grouped: bool = False, prefix: str = "") -> list[Cell]:
    """One cell per fold of a (group) K-fold split of the config's data; the split seed is shared."""
    if folds < 2:
        raise LeukoError(f"--folds must be at least 2; got {folds}")
    preset = f"{'group-' if grouped else ''}kfold-{folds}"
    base = config.model_dump(mode="json")
    cells = []
    for k in range(folds):
        cfg = config_from_dict(merge_config(base, {"data": {"split": preset, "fold": k}}))
        cells.append(Cell(f"{prefix}fold-{k}", cfg, {"fold": k}))
    return cells


def summarise_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean and sample std (ddof=1) of every headline column across folds."""
    out: dict[str, dict[str, float | None]] = {}
    for key in [*ROW_COLUMNS, "train_time_min"]:
        vals = pd.to_numeric(pd.Series([r.get(key) for r in rows]), errors="coerce").dropna()
        if len(vals):
            out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else None}
    return out


def cross_validate(
    config: RunConfig,
    out: str | Path,
    folds: int,
    *,
    grouped: bool = False,
    data_path: str | Path | None = None,
    echo: Echo = print,
) -> dict[str, Any]:
    """K-fold cross-validation: a run per fold, a table per fold and mean ± std (``OUT/cv.*``)."""
    out = Path(out)
    cells = fold_cells(config, folds, grouped=grouped)
    check_plan(out, cells, "cv")
    rows = [run_cell(c, out, data_path=data_path, echo=echo) for c in cells]
    summary = summarise_rows(rows)
    frame = pd.DataFrame(rows)
    mean_row = {"cell": "mean", **{k: v["mean"] for k, v in summary.items()}}
    std_row = {"cell": "std", **{k: v["std"] for k, v in summary.items()}}
    table = pd.concat([frame, pd.DataFrame([mean_row, std_row])], ignore_index=True)
    notes = [f"{folds}-fold {'group ' if grouped else ''}cross-validation of {config.model.name}; "
             "std is the sample standard deviation (ddof=1) across folds"]
    notes += [f"{ROW_COLUMNS.get(k, k)}: {format_mean_std(v['mean'], v['std'])}" for k, v in summary.items()]
    write_table(table, out / "cv", title=f"Cross-validation: {config.name or config.model.name}", headers=ROW_COLUMNS, notes=notes)
    (out / "cv.json").write_text(json.dumps({"folds": rows, "summary": summary, "grouped": grouped}, indent=1))
    chart = pd.DataFrame([{"cell": config.model.name, **{m: summary[m]["mean"] for m in CHART_METRICS},
                           **{f"{m}_std": summary[m]["std"] for m in CHART_METRICS}}])
    plot_compare_bars(chart, CHART_METRICS, out / "cv.png", label_column="cell", title=f"{folds}-fold mean ± std")
    return {"folds": rows, "summary": summary, "table": table, "out": str(out)}


# --------------------------------------------------------------------------- leave one lab out

def lab_cells(config: RunConfig, *, prefix: str = "", seeds: int = 1) -> list[Cell]:
    """One cell per lab of ``config.data.sources``: ``without-<lab>`` (``data.leave_out: <lab>``).

    ``seeds`` > 1 adds ``without-<lab>-seed<k>`` for k = 1 .. seeds-1, trained with ``train.seed + k``
    (the first keeps its name, so a folder of one seed grows into one of several).
    """
    if seeds < 1:
        raise LeukoError(f"--seeds must be at least 1; got {seeds}")
    data = config.data
    if not data.sources:
        raise LeukoError("leave-one-lab-out needs a config with data.sources (several labs)")
    if data.leave_out is not None:
        raise LeukoError(f"the config already leaves out lab {data.leave_out!r} (data.leave_out): remove it to leave out each lab in turn")
    labs = data.labs()
    testable = [lab for lab in labs if any(not s.train_only for s in data.sources if s.lab_name == lab)]
    if len(labs) < 2 or not testable:
        raise LeukoError(f"leave-one-lab-out needs at least two labs in data.sources; the config has {labs}")
    base = config.model_dump(mode="json")
    cells = []
    for lab in testable:
        for k in range(seeds):
            name = f"{prefix}without-{lab}" + (f"-seed{k}" if k else "")
            change: dict[str, Any] = {"data": {"leave_out": lab}}
            if k:
                change["train"] = {"seed": config.train.seed + k}
            try:
                cfg = config_from_dict(merge_config(base, change))
            except LeukoError as exc:
                raise LeukoError(f"cell {name}: {exc}") from None
            cells.append(Cell(name, cfg, {"left_out": lab} if not k else {"left_out": lab, "seed": cfg.train.seed}))
    return cells


def _with_ci(row: dict[str, Any], key: str, *, signed: bool = False) -> str:
    """``v (lo-hi)``, or ``+v (+lo to +hi)`` for a difference; blank without a value, no interval without bounds."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    fmt = "+.4f" if signed else ".4f"
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return f"{v:{fmt}}"
    return f"{v:{fmt}} ({lo:{fmt}} to {hi:{fmt}})" if signed else f"{v:.4f} ({lo:.4f}-{hi:.4f})"


def lab_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``mean`` (unweighted, over labs) and ``worst`` (the lowest lab) of each score."""
    return {
        "mean": {m: float(np.mean([r[m] for r in rows])) for m in [*LAB_METRICS, "train_time_min"]},
        "worst": {m: float(np.min([r[m] for r in rows])) for m in LAB_METRICS},
    }


def run_lab_cells(cells: list[Cell], out: Path, *, echo: Echo = print) -> list[dict[str, Any]]:
    """Train and evaluate each ``without-<lab>`` cell (resumably); one row per lab with 95% CIs.

    A lab with several seeds' cells gets one row: their mean, an interval over cells and seeds, the
    seeds' spread of accuracy, and the mean training time of one run.
    """
    by_lab: dict[str, list[tuple[Cell, dict[str, Any]]]] = {}
    for c in cells:
        by_lab.setdefault(c.changes["left_out"], []).append((c, run_cell(c, out, echo=echo)))
    rows = []
    for lab, done in by_lab.items():
        preds = [default_eval_dir(_cell_dir(out, c), None, "test") / "predictions.csv" for c, _ in done]
        bases = [b for _, b in done]
        row = {"lab": lab, "cell": done[0][0].name, "cells": [c.name for c, _ in done],
               **lab_scores(preds, list(done[0][0].config.data.classes or [])),
               "macro_f1": float(np.mean([b["f1"] for b in bases])), "epochs": bases[0]["epochs"],
               "train_time_min": float(np.mean([b["train_time_min"] for b in bases]))}
        spread = f", {row['n_seeds']} seeds (accuracy sd {row['accuracy_seed_sd']:.4f})" if "n_seeds" in row else ""
        echo(f"left out {lab}: {row['n_test']} cells, accuracy {_with_ci(row, 'accuracy')}, "
             f"macro-F1 (classes >= {SMALL_CLASS}) {_with_ci(row, 'macro_f1_common')}{spread}")
        rows.append(row)
    return rows


def leave_one_lab_out(config: RunConfig, out: str | Path, *, only: list[str] | tuple[str, ...] = (),
                      seeds: int = 1, echo: Echo = print) -> dict[str, Any]:
    """Train once per lab left out, test on all of it: ``OUT/without-<lab>/`` and ``OUT/lolo.{csv,md,json,png}``.

    ``only`` runs just those labs' cells (a second seed of the one lab that decides, say); the table then
    lists, and its mean and worst cover, only those labs, and says so. A later run without ``only`` into
    the same folder resumes them and adds the rest. ``seeds`` > 1 trains each lab's run that many
    times (``train.seed``, +1, ...): each row is then their mean, its interval resamples seeds as well as
    cells, and a column gives the seeds' spread (on a lab unlike the training labs it is points).
    """
    out = Path(out)
    cells = lab_cells(config, seeds=seeds)
    every = list(dict.fromkeys(c.changes["left_out"] for c in cells))
    if only:
        unknown = sorted(set(only) - set(every))
        if unknown:
            raise LeukoError(f"--only {', '.join(unknown)}: no such lab to leave out; the config's labs: {', '.join(every)}")
        cells = [c for c in cells if c.changes["left_out"] in set(only)]
    check_plan(out, cells, "lolo")
    echo(f"leave-one-lab-out over {', '.join(c.changes['left_out'] for c in cells)} into {out}")
    rows = run_lab_cells(cells, out, echo=echo)
    summary = lab_summary(rows)
    frame = pd.DataFrame(rows)
    extra = pd.DataFrame([{"lab": k, **v} for k, v in summary.items()])
    pd.concat([frame, extra], ignore_index=True).to_csv(out / "lolo.csv", index=False)
    def minutes(v: float | None) -> str:
        return "" if v is None or math.isnan(v) else f"{v:.1f}"

    shown = [{**r, **{m: _with_ci(r, m) for m in LAB_METRICS}, "n_test": str(r["n_test"]),
              "train_time_min": minutes(r["train_time_min"])} for r in rows]
    shown += [{"lab": k, "n_test": "", **{m: f"{v[m]:.4f}" for m in LAB_METRICS}, "common_classes": "",
               "train_time_min": minutes(v.get("train_time_min"))} for k, v in summary.items()]
    cols = ["lab", "n_test", *LAB_METRICS, "common_classes", "train_time_min"]
    if seeds > 1:
        for r, row in zip(shown, rows):
            r["accuracy_seed_sd"] = f"{row['accuracy_seed_sd']:.4f}"
        cols.insert(3, "accuracy_seed_sd")
    title = f"Leave-one-lab-out: {config.name or config.model.name}"
    notes = [
        ("each row: trained and validated on the other labs (train/val split within each source), "
         "tested on every cell of the lab left out"),
        f"macro-F1 over the lab's classes with >= {SMALL_CLASS} cells; balanced accuracy: mean recall over the classes it has",
        "95% CIs: percentile bootstrap over the test cells (1000 resamples); mean: unweighted over labs; worst: the lowest lab",
    ]
    if seeds > 1:
        notes.append(f"each row: the mean of {seeds} runs (train.seed {config.train.seed} to {config.train.seed + seeds - 1}); "
                     "its CI resamples the seeds as well as the cells; seed sd: the spread of accuracy between them; "
                     "training: minutes per run")
    run = [r["lab"] for r in rows]
    if run != every:
        notes.append(f"only {', '.join(run)} of the config's labs ({', '.join(every)}) were left out: "
                     "the mean and worst are over those alone, not the leave-one-lab-out score")
    text = f"# {title}\n\n" + markdown_table(pd.DataFrame(shown)[cols], headers=LAB_HEADERS) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "lolo.md").write_text(text)
    (out / "lolo.json").write_text(json.dumps({"labs": rows, "summary": summary, "config": config.name,
                                               "all_labs": every}, indent=1))
    plot_compare_bars(frame, LAB_METRICS, out / "lolo.png", label_column="lab", title="Left-out lab")
    return {"labs": rows, "summary": summary, "out": str(out), "table": frame}


def lab_predictions(out: Path) -> dict[str, list[Path]]:
    """Lab -> the left-out runs' ``predictions.csv`` (one per seed) of a finished leave-one-lab-out folder (``lolo.json``)."""
    table = out / "lolo.json"
    if not table.is_file():
        raise LeukoError(f"{out} is not a finished leave-one-lab-out folder (no lolo.json): run `leuko cv CONFIG --leave-one-lab-out --out {out}`")
    try:
        labs = json.loads(table.read_text())["labs"]
        return {r["lab"]: [default_eval_dir(out / c, None, "test") / "predictions.csv" for c in r.get("cells", [r["cell"]])]
                for r in labs}
    except (ValueError, KeyError, TypeError) as exc:
        raise LeukoError(f"{table} cannot be read as a leave-one-lab-out table: {exc}") from None


def lab_table_against(out: str | Path, baseline: str | Path, classes: list[str], *, n_bootstrap: int = 1000,
                      echo: Echo = print) -> dict[str, Any]:
    """This leave-one-lab-out folder minus another, lab by lab on the same cells, with paired 95% intervals.

    Writes ``OUT/vs-<baseline folder name>.{csv,md,json}``: per lab the differences of accuracy, macro-F1
    over classes >= ``SMALL_CLASS`` and balanced accuracy with a paired bootstrap interval, the cells only
    one of the two gets right, and the mean over labs (its interval from averaging the labs' draws).
    Only labs both folders left out are compared; none in common is an error.
    """
    out, baseline = Path(out), Path(baseline)
    if out.resolve() == baseline.resolve():
        raise LeukoError(f"--against {baseline} is this folder: compare with another recipe's leave-one-lab-out folder")
    ours, theirs = lab_predictions(out), lab_predictions(baseline)
    try:
        rows, mean = paired_labs(ours, theirs, classes, n_bootstrap=n_bootstrap)
    except LeukoError as exc:
        raise LeukoError(f"{out} against {baseline}: {exc}") from None
    for row in rows:
        echo(f"{row['lab']}: accuracy {_with_ci(row, 'd_accuracy', signed=True)} against {baseline.name} "
             f"({row['only_this_right']} cells right only here, {row['only_baseline_right']} only there)")
    keys = [f"d_{m}" for m in LAB_METRICS]
    shown = [{"lab": r["lab"], "n_test": str(r["n_test"]), **{k: _with_ci(r, k, signed=True) for k in keys},
              "only_this_right": str(r["only_this_right"]), "only_baseline_right": str(r["only_baseline_right"])}
             for r in [*rows, mean]]
    headers = {"lab": "Lab left out", "n_test": "Test cells", "d_accuracy": "Δ accuracy (paired 95% CI)",
               "d_macro_f1_common": f"Δ macro-F1, classes >= {SMALL_CLASS} (paired 95% CI)",
               "d_balanced_accuracy": "Δ balanced acc. (paired 95% CI)",
               "only_this_right": f"Right only in {out.name}", "only_baseline_right": f"Right only in {baseline.name}"}
    notes = [f"Δ = {out} minus {baseline}, on the same cells of each lab (matched by path)",
             f"paired percentile bootstrap ({n_bootstrap} resamples of each lab's cells, both models scored on each); "
             "an interval that excludes 0 is a difference the cells can carry",
             "mean: unweighted over labs; its interval averages the labs' resamples draw by draw"]
    seeded = [r for r in rows if "n_seeds" in r]
    if seeded:
        notes.append("with several seeds (" + ", ".join(f"{r['lab']}: {r['n_seeds']} vs {r['n_seeds_baseline']}" for r in seeded)
                     + "): each side is its seeds' mean, each resample also resamples each side's seeds, "
                     "and 'right only' counts a cell as right when most of a side's seeds get it")
    stem = out / f"vs-{baseline.name}"
    text = (f"# {out.name} against {baseline.name}, leave-one-lab-out\n\n"
            + markdown_table(pd.DataFrame(shown), headers=headers) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    stem.with_suffix(".md").write_text(text)
    pd.DataFrame([*rows, mean]).to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".json").write_text(json.dumps({"labs": rows, "mean": mean, "this": str(out), "baseline": str(baseline)}, indent=1))
    return {"labs": rows, "mean": mean, "md": str(stem.with_suffix(".md"))}


def _paired_against_first(preds: dict[str, list[Path]], first: dict[str, list[Path]], classes: list[str]) -> dict[str, float]:
    """``d_accuracy`` and its paired 95% bounds of one grid cell against the first, over the labs both left out."""
    try:
        _, mean = paired_labs(preds, first, classes)
    except LeukoError:  # no lab in common (a cell with other sources): no paired column for it
        return {}
    return {k: mean[k] for k in ("d_accuracy", "d_accuracy_lo", "d_accuracy_hi")}


# --------------------------------------------------------------------------- comparison grids


class GridFile(BaseModel):
    """The schema of a ``leuko compare`` file (see the module docstring)."""
    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    description: Optional[str] = None
    config: Optional[str] = Field(None, description="Base run config, relative to the grid file.")
    base: Optional[dict[str, Any]] = Field(None, description="Inline base run config.")
    set: list[str] = Field(default_factory=list, description="key=value overrides for every cell.")
    cells: Optional[dict[str, dict[str, Any]]] = None
    scenarios: Optional[dict[str, dict[str, Any]]] = Field(None, description="Named override sets crossed with the cells (e.g. two hyper-parameter scenarios).")
    grid: Optional[dict[str, list[Any]]] = None
    folds: Optional[int] = Field(None, ge=2)
    grouped: bool = False
    leave_one_lab_out: bool = Field(False, description="Judge every cell lab by lab (configs with data.sources): mean and worst lab.")
    eval_split: str = "test"
    notes: list[str] = Field(default_factory=list, description="Printed under the table (e.g. what a protocol cut).")

    @field_validator("cells", "scenarios", "grid")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v is not None and not v:
            raise ValueError("must not be empty")
        return v


_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def _label(key: str, value: Any) -> str:
    return _SAFE.sub("_", f"{key.rsplit('.', 1)[-1]}-{value}")


def load_grid(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[GridFile, list[Cell]]:
    """Read a grid file and expand it into cells (named cells × grid product)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "grid")
    if not {"cells", "scenarios", "grid"} & set(raw):
        raise LeukoError(f"{path} has no 'cells', 'scenarios' or 'grid': it looks like a run config; use 'leuko train {path}'")
    try:
        spec = GridFile.model_validate(raw)
    except ValidationError as exc:
        raise LeukoError(format_validation_error(exc).replace("invalid config", f"invalid grid {path}")) from None
    if spec.config and spec.base:
        raise LeukoError(f"grid {path}: give either 'config' (a file) or 'base' (inline), not both")
    base = read_yaml_mapping(path.parent / spec.config) if spec.config else dict(spec.base or {})
    named = list((spec.cells or {"": {}}).items())
    scenarios = list((spec.scenarios or {"": {}}).items())
    keys = list((spec.grid or {}).keys())
    for k, vals in (spec.grid or {}).items():
        if not isinstance(vals, list) or not vals:
            raise LeukoError(f"grid {path}: '{k}' must list at least one value")
    combos = list(itertools.product(*[(spec.grid or {})[k] for k in keys])) or [()]
    cells: list[Cell] = []
    for (cell_name, cell_set), (sc_name, sc_set), combo in itertools.product(named, scenarios, combos):
        changes = {**sc_set, **cell_set, **dict(zip(keys, combo))}
        parts = [p for p in (cell_name, sc_name) if p] + [_label(k, v) for k, v in zip(keys, combo)]
        name = "_".join(parts)
        try:
            cfg = config_from_dict(merge_config(base, nest_dotted(list(changes.items()))), [*spec.set, *overrides])
        except LeukoError as exc:
            raise LeukoError(f"grid {path}, cell {name}: {exc}") from None
        cells.append(Cell(name, cfg, changes))
    if len({c.name for c in cells}) != len(cells):
        raise LeukoError(f"grid {path}: two cells get the same name; give the cells distinct names")
    return spec, cells


def compare(
    grid: str | Path,
    out: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    data_path: str | Path | None = None,
    only: list[str] | tuple[str, ...] = (),
    echo: Echo = print,
) -> dict[str, Any]:
    """Run every cell of a grid file (or the ``only`` ones), resumably; writes ``compare.{csv,md,png}`` into ``out``."""
    spec, cells = load_grid(grid, overrides)
    if only:
        unknown = sorted(set(only) - {c.name for c in cells})
        if unknown:
            raise LeukoError(f"no cell named {', '.join(unknown)} in {grid}; cells: {', '.join(c.name for c in cells)}")
        cells = [c for c in cells if c.name in set(only)]
    out = Path(out) if out is not None else Path("runs") / (spec.name or Path(grid).stem)
    if spec.folds and spec.leave_one_lab_out:
        raise LeukoError(f"grid {grid}: choose folds or leave_one_lab_out, not both")
    kind = "compare-cv" if spec.folds else "compare-lolo" if spec.leave_one_lab_out else "compare"
    if spec.folds:
        planned = [fc for c in cells for fc in fold_cells(c.config, spec.folds, grouped=spec.grouped, prefix=f"{c.name}/")]
    elif spec.leave_one_lab_out:
        planned = [lc for c in cells for lc in lab_cells(c.config, prefix=f"{c.name}/")]
    else:
        planned = cells
    check_plan(out, planned, kind)
    echo(f"{len(cells)} cell(s){f' x {spec.folds} folds' if spec.folds else ''} into {out}")
    rows = []
    lab_preds: list[dict[str, list[Path]]] = []
    for c in cells:
        if spec.folds:
            fold_rows = [run_cell(fc, out, data_path=data_path, eval_split=spec.eval_split, echo=echo)
                         for fc in fold_cells(c.config, spec.folds, grouped=spec.grouped, prefix=f"{c.name}/")]
            summary = summarise_rows(fold_rows)
            row: dict[str, Any] = {"cell": c.name, **c.changes}
            for k, v in summary.items():
                row[k], row[f"{k}_std"] = v["mean"], v["std"]
            row["n_test"] = sum(r["n_test"] for r in fold_rows)
            rows.append(row)
        elif spec.leave_one_lab_out:
            planned_labs = lab_cells(c.config, prefix=f"{c.name}/")
            lab_rows = run_lab_cells(planned_labs, out, echo=echo)
            s = lab_summary(lab_rows)
            row = {"cell": c.name, **c.changes, **s["mean"], **{f"worst_{m}": v for m, v in s["worst"].items()}}
            row.update({f"accuracy_{r['lab']}": r["accuracy"] for r in lab_rows})
            row["n_test"] = sum(r["n_test"] for r in lab_rows)
            preds = {r["lab"]: [default_eval_dir(out / name, None, "test") / "predictions.csv" for name in r["cells"]]
                     for r in lab_rows}
            if lab_preds:  # the first cell is the baseline: the others' paired difference on the same cells
                row.update(_paired_against_first(preds, lab_preds[0], list(c.config.data.classes or [])))
            lab_preds.append(preds)
            rows.append(row)
        else:
            rows.append(run_cell(c, out, data_path=data_path, eval_split=spec.eval_split, echo=echo))
    table = pd.DataFrame(rows)
    notes = list(spec.notes)
    if spec.leave_one_lab_out and len(lab_preds) > 1:
        notes.append(f"d_accuracy (d_accuracy_lo/hi): each cell minus the first ({cells[0].name}) on the same cells, mean over "
                     "the labs both left out, paired bootstrap 95% interval")
    if spec.leave_one_lab_out:
        notes.append("leave-one-lab-out: scores are unweighted means over the labs left out (worst_*: the lowest lab), "
                     f"macro-F1 over each lab's classes with >= {SMALL_CLASS} cells; per-lab tables: OUT/<cell>/without-<lab>/eval/test")
    else:
        notes.append("precision, recall and F-measure are macro averages over classes; training time is wall-clock minutes"
                     + (f"; values are {spec.folds}-fold means, *_std the sample std" if spec.folds else ""))
    csv_path, md_path = write_table(table, out / "compare", title=f"Comparison: {spec.name or Path(grid).stem}", headers=ROW_COLUMNS, notes=notes)
    chart = LAB_METRICS if spec.leave_one_lab_out else CHART_METRICS
    plot_compare_bars(table, chart, out / "compare.png", label_column="cell", title=spec.name or "Comparison")
    return {"rows": rows, "table": table, "out": str(out), "csv": str(csv_path), "md": str(md_path)}
