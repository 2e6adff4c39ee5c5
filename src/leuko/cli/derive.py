"""Verbs that make a run from runs: ``adapt``, ``route`` and ``ensemble``."""

# Typer declares options as argument defaults (typer.Option(...)): that is the API, not a bug.
# ruff: noqa: B008

from __future__ import annotations

from pathlib import Path

import typer

from leuko.cli.options import LayoutOpt, MarginOpt, class_map_option, layout_options
from leuko.cli.output import console, fmt_num, print_skipped, print_written

app = typer.Typer()


@app.command("adapt")
def adapt_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by 'leuko train'."),
    data: Path = typer.Option(..., "--data", "-d", help="The new lab's images (unlabelled is fine): a dataset or any folder of images."),
    out: Path = typer.Option(..., "--out", "-o", help="The adapted run folder to create (must not exist)."),
    layout: str | None = LayoutOpt,
    margin: float | None = MarginOpt,
    layers: str = typer.Option("trained", "--layers", help="trained: the BatchNorm layers training estimated on the source lab (frozen ones keep ImageNet's); all: every one."),
    max_images: int | None = typer.Option(None, "--max-images", help="Use a random subset of at most this many images."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per BatchNorm batch."),
    balance: bool = typer.Option(True, "--balance/--no-balance", help="AdaBN: estimate on a resample whose predicted-class mix is the training split's (labs differ in which cells they see, not only in how they look)."),
    method: str = typer.Option("adabn", "--method", help="adabn: re-estimate BatchNorm statistics; self-train: fine-tune on the model's own confident predictions (works on freeze: bn models too)."),
    class_map: str | None = class_map_option(
        "self-train: a class map (file or shipped name, e.g. pbc-to-five) whose 'exclude' lists classes the new lab's images cannot be."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="self-train: passes over the kept images (default 5)."),
    keep: float | None = typer.Option(None, "--keep", help="self-train: share of each predicted class kept, most confident first (default 0.5)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: the GPU when there is one)."),
) -> None:
    """Adapt a model to a new lab's images, no labels: AdaBN or self-training; writes a new run folder."""
    from leuko.derive.adapt import adapt_run

    res = adapt_run(run_dir, data, out, layout=layout, layout_options=layout_options(margin) or None, method=method,
                    layers=layers, max_images=max_images, batch_size=batch_size, balance=balance, class_map=class_map,
                    epochs=epochs, keep=keep, device=device, echo=console.print)
    print_skipped(res.failed)
    if res.adapted["method"] == "adabn":
        console.print(f"{res.n_layers} BatchNorm layers re-estimated on {res.n_images} images; weights unchanged")
    else:
        console.print(f"self-trained on {sum(res.adapted['kept'].values())} of {res.n_images} images ({res.adapted['steps']} steps)")
    print_written(f"{res.out}  (try: leuko evaluate {res.out} --data {data})", highlight=False)


@app.command("route")
def route_cmd(
    home: Path = typer.Argument(..., help="The run that is best on its own lab (e.g. runs/pbc-best)."),
    robust: Path = typer.Argument(..., help="The run meant for other labs (e.g. runs/pbc-robust), same lab and split."),
    out: Path = typer.Option(..., "--out", "-o", help="The routed run folder to create (must not exist)."),
    quantile: float = typer.Option(0.99, "--quantile", help="Gate thresholds: this quantile of the validation split's smear distances (colour, red-cell size)."),
    energy: bool = typer.Option(True, "--energy/--no-energy", help="Also route to the robust network what the home network calls unlike its training data."),
) -> None:
    """One run of two networks: the home network answers images whose smear looks like its lab, the robust one the rest."""
    from leuko.derive.route import build_route

    res = build_route(home, robust, out, quantile=quantile, energy=energy, echo=console.print)
    acc = res.val_accuracy
    console.print(f"gate: {res.gate.describe()}" + ("; and the home network's energy check" if energy else ""),
                  highlight=False)
    console.print(f"validation split: the home network answers {res.val_home_share:.1%} ({fmt_num(acc['home'], '.2%')} correct), "
                  f"the robust one the rest ({fmt_num(acc['robust'], '.2%')}); routed {fmt_num(acc['routed'], '.2%')}",
                  highlight=False)
    print_written(f"{res.out}  (try: leuko evaluate {res.out})", highlight=False)


@app.command("ensemble")
def ensemble_cmd(
    runs: list[Path] = typer.Argument(..., help="Two or more runs of one recipe, lab and split (e.g. seeds 0, 1, 2); the first one's split and record are kept."),
    out: Path = typer.Option(..., "--out", "-o", help="The ensemble run folder to create (must not exist)."),
) -> None:
    """One network from several runs: their calibrated logits averaged, recalibrated on the validation split."""
    from leuko.derive.ensemble import build_ensemble_run

    res = build_ensemble_run(runs, out, echo=console.print)
    console.print("validation accuracy: " + ", ".join(f"{Path(k).name} {v:.2%}" for k, v in res.val_accuracy.items())
                  + f"; ensemble temperature {res.temperature:.3f}", highlight=False)
    print_written(f"{res.out}  (try: leuko evaluate {res.out})", highlight=False)


@app.command("finetune")
def finetune_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run: one network, an ensemble, or a routed run (its robust network learns)."),
    data: Path = typer.Option(..., "--data", "-d", help="The new lab's labelled cells, any layout (e.g. the csv of 'leuko data export-reviews')."),
    out: Path = typer.Option(..., "--out", "-o", help="The fine-tuned run folder to create (must not exist)."),
    layout: str | None = LayoutOpt,
    margin: float | None = MarginOpt,
    class_map: str | None = class_map_option(
        "A class map (file or shipped name, e.g. pbc-to-five) when the lab's labels are not the run's classes."
    ),
    shots: int | None = typer.Option(None, "--shots", help="Use at most this many labelled cells per class (a seeded draw)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw, the validation hold-out and training."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps (default: one per labelled cell, at least 60)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: 0.2 x the run's)."),
    replay: bool = typer.Option(True, "--replay/--no-replay", help="Mix the source lab's training images into every batch, so the network does not forget its lab."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: the GPU when there is one)."),
) -> None:
    """Teach a run a new lab from that lab's labelled cells; measures the source lab's held-out score before and after."""
    from leuko.derive.finetune import finetune_run

    res = finetune_run(run_dir, data, out, layout=layout, layout_options=layout_options(margin) or None,
                       class_map=class_map, shots=shots, seed=seed, steps=steps, lr=lr, replay=replay, device=device,
                       echo=console.print)
    cells = ", ".join(f"{k} {v}" for k, v in res.cells["train"].items())
    console.print(f"learned from {sum(res.cells['train'].values())} cells ({cells}); "
                  f"calibrated on {sum(res.cells['val'].values())}", highlight=False)
    console.print(f"source lab held-out accuracy: {res.source_before:.4f} before, {res.source_after:.4f} after "
                  f"({res.source_after - res.source_before:+.4f})", highlight=False)
    print_written(f"{res.out}  (try: leuko evaluate {res.out} --data {data}: the cells it learned from are left out)",
                  highlight=False)
