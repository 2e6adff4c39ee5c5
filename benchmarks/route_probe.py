"""Could a home-lab model and a robust model share the work? A probe, not a feature.

`pbc-robust` gives up in-lab accuracy for other labs (PBC 97-98% against
`pbc-best`'s 99.7%, but 82% on BCCD against `pbc-best`'s 48%). Each run
carries a review policy whose energy check says when an image is unlike its
training data. This script scores, on the robust run's held-out PBC split and
on a new lab's labelled images, three ways of combining the two runs:

* per image: the home-lab (expert) run answers unless its energy check calls
  the image unlike its training data; then the robust run answers;
* per lab: if the expert calls more than half of a lab's images unlike its
  training data, the robust run answers for the whole lab, else the expert;
* each run alone (with test-time augmentation, as both are used).

Usage::

    .venv/bin/python benchmarks/route_probe.py runs/pbc-best runs/pbc-robust \\
        --data ../shared/datasets/bccd --layout bccd --class-map pbc-to-bccd
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from leuko.data import load_dataset
from leuko.errors import LeukoError
from leuko.evaluate.run import ClassMap, map_probs
from leuko.infer import Predictor
from leuko.infer.review import ReviewPolicy
from leuko.runs import RunFolder
from leuko.train.config import load_config
from leuko.train.data import prepare_data
from leuko.train.distill import heldout_seen_by


def scores(expert: Predictor, robust: Predictor, samples: list, class_map: ClassMap | None) -> dict[str, float]:
    """Accuracies of the expert, the robust run, and the two routes on ``samples``."""
    policy = ReviewPolicy.from_meta(expert.meta)
    e = expert.predict_samples(samples, tta=True)
    r = robust.predict_samples(samples, tta=True)
    if e.keys != r.keys:
        raise LeukoError("the two runs could not read the same images")
    _, unlike = policy.checks(e.logits, e.probs, expert.temperature)
    label = {s.key: s.label for s in samples}
    targets = sorted(set(label.values()))
    pe, pr = e.probs, r.probs
    if class_map is not None:
        m_e, _ = class_map.matrix(expert.classes, targets)
        m_r, _ = class_map.matrix(robust.classes, targets)
        pe, pr = map_probs(pe, m_e), map_probs(pr, m_r)
    else:
        pe = pe[:, [expert.classes.index(c) for c in targets]]
        pr = pr[:, [robust.classes.index(c) for c in targets]]
    y = np.array([targets.index(label[k]) for k in e.keys])
    right_e, right_r = pe.argmax(1) == y, pr.argmax(1) == y
    per_image = np.where(unlike, right_r, right_e)
    per_lab = right_r if unlike.mean() > 0.5 else right_e
    return {
        "n": len(y), "expert": right_e.mean(), "robust": right_r.mean(), "per image": per_image.mean(),
        "per lab": per_lab.mean(), "unlike (expert)": unlike.mean(),
        "expert on its accepted": right_e[~unlike].mean() if (~unlike).any() else float("nan"),
        "robust on those": right_r[~unlike].mean() if (~unlike).any() else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("expert", help="the home-lab run (e.g. runs/pbc-best)")
    ap.add_argument("robust", help="the robust run (e.g. runs/pbc-robust); its held-out split is the home-lab test")
    ap.add_argument("--data", required=True, help="a new lab's labelled images")
    ap.add_argument("--layout", default=None)
    ap.add_argument("--class-map", default=None)
    args = ap.parse_args(argv)
    try:
        expert, robust = Predictor(args.expert), Predictor(args.robust)
        run = RunFolder.open(args.robust)
        cfg = load_config(run.config)
        prepared = prepare_data(cfg.data, seed=cfg.train.seed, split_file=run.split)
        home = prepared.test
        leaked = heldout_seen_by(RunFolder.open(args.expert), prepared)
        if leaked:
            raise LeukoError(f"{len(leaked)} of the robust run's held-out images were in the expert's training or "
                             f"validation split (e.g. {leaked[0]}): the two runs need the same split")
        new = load_dataset(args.data, args.layout).samples
        cmap = ClassMap.load(args.class_map) if args.class_map else None
        rows = {"home lab (held-out)": scores(expert, robust, home, None), "new lab": scores(expert, robust, new, cmap)}
    except LeukoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cols = list(next(iter(rows.values())))
    print("| images | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.4f}" if c != "n" else str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
