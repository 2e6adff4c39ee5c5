"""``leuko finetune`` and ``leuko curve``: a run taught a new lab from its labelled cells, honestly scored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cells import call, make_cell
from leuko.data.samples import Sample
from leuko.derive.finetune import draw_shots, finetune_run, label_targets
from leuko.errors import LeukoError
from leuko.evaluate.run import evaluate_run
from leuko.infer import load_predictor
from leuko.run.folder import read_card
from leuko.train import train

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]
TINY = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "data.image_size=32",
    "data.num_workers=0",
    "data.split=holdout-60-20-20",
    "model.freeze=none",
    "train.epochs=3",
    "train.batch_size=8",
    "train.lr=0.01",
    "trainer.progress=false",
]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """``(run, new lab)``: a tiny run and a bluer "other lab" of the same classes, 14 labelled cells each, in
    groups of two (two cells per field), so the validation hold-out keeps fields whole."""
    base = tmp_path_factory.mktemp("finetune")
    src, new = base / "src", base / "newlab"
    rows = ["path,label,group"]
    for ci, cls in enumerate(CLASSES):
        for i in range(16):
            make_cell(src / cls / f"{i}.png", size=(40, 40), seed=100 * ci + i, hue=60 * ci)
        for i in range(14):
            p = make_cell(new / "img" / f"{cls}_{i}.png", size=(40, 40), seed=7000 + 100 * ci + i, hue=60 * ci)
            im = np.asarray(Image.open(p)).astype(np.float32) * [0.6, 0.7, 0.9] + [0, 10, 40]
            Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(p)
            rows.append(f"img/{cls}_{i}.png,{cls},field{ci}_{i // 2}")
    (new / "labels.csv").write_text("\n".join(rows) + "\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
    train(None, base / "run", overrides=TINY, data_path=src, echo=lambda s: None)
    yield base / "run", new / "labels.csv"
    mp.undo()


def test_finetune_writes_a_run_that_says_what_it_learned_and_is_scored_on_the_rest(lab: tuple[Path, Path], tmp_path: Path) -> None:
    run, new = lab
    out = tmp_path / "ft"
    lines: list[str] = []
    res = finetune_run(run, new, out, layout="csv", steps=20, echo=lines.append)
    card = read_card(out)
    rec = card.finetuned
    assert rec is not None and rec["cells"] == res.cells and rec["steps"] == 20 and rec["freeze"] == "none"
    assert sum(res.cells["train"].values()) + sum(res.cells["val"].values()) == 42
    assert sum(res.cells["val"].values()) >= 3 * 2  # every class held out, whole fields (pairs)
    used = json.loads((out / "finetune.json").read_text())["used"]
    fields = {}
    for key, role in used.items():
        cls, i = Path(key).stem.split("_")
        fields.setdefault((cls, int(i) // 2), set()).add(role)
    assert all(len(roles) == 1 for roles in fields.values())  # no field straddles train and validation
    assert card.review and "held-out cells" in card.review["chosen_on"]  # review policy refitted on the new lab
    assert 0.0 <= res.source_before <= 1.0 and 0.0 <= res.source_after <= 1.0
    assert any("before" in line and "after fine-tuning" in line for line in lines)
    # everything downstream takes it; on the same lab its own cells are left out, so nothing is left here
    assert load_predictor(out).predict_paths([next(iter(Path(new).parent.glob("img/*.png")))]).probs.shape == (1, 3)
    with pytest.raises(LeukoError, match="no images to evaluate"):
        evaluate_run(out, data=new, layout="csv", figures=False, echo=lambda s: None)


def test_shots_draw_at_most_k_per_class_seeded_and_refuse_too_many() -> None:
    samples = [Sample(path=Path(f"/x/{c}{i}.png"), label=c) for c in "ab" for i in range(10)] + \
              [Sample(path=Path(f"/x/c{i}.png"), label="c") for i in range(3)]
    drawn, rest = draw_shots(samples, 3, seed=1)
    assert sorted(s.label for s in drawn) == list("aaabbbccc") and len(rest) == 23 - 9
    assert [s.key for s in draw_shots(samples, 3, seed=1)[0]] == [s.key for s in drawn]
    with pytest.raises(LeukoError, match="class 'c' has 3 labelled cells, fewer than --shots 5"):
        draw_shots(samples, 5, seed=0)
    curve, _ = draw_shots(samples, 5, seed=0, at_most_half=True)  # a curve: small classes give at most half
    assert sorted(s.label for s in curve).count("c") == 1 and sorted(s.label for s in curve).count("a") == 5


def test_labels_meet_the_run_classes_directly_or_by_a_class_map(tmp_path: Path) -> None:
    model = ["basophil", "ig", "neutrophil", "platelet"]
    assert label_targets(model, ["basophil", "neutrophil"]).targets == {"basophil": "basophil", "neutrophil": "neutrophil"}
    with pytest.raises(LeukoError, match="classes the run does not know: band.*--class-map"):
        label_targets(model, ["band", "neutrophil"])
    cmap = tmp_path / "map.yaml"
    cmap.write_text("merge: {ig: neutrophil}\nexclude: [platelet]\n")
    got = label_targets(model, ["basophil", "neutrophil"], cmap)
    assert got.targets == {"basophil": "basophil", "neutrophil": "neutrophil"} and "platelet" in got.notes[0]


def test_bad_input_is_one_line_and_exit_2(lab: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, new = lab
    one = tmp_path / "one.csv"
    one.write_text("path,label\n" + "".join(f"{new.parent}/img/eosinophil_{i}.png,eosinophil\n" for i in range(6)))
    odd = tmp_path / "odd.csv"
    odd.write_text("path,label\n" + "".join(f"{new.parent}/img/eosinophil_{i}.png,{'band' if i % 2 else 'eosinophil'}\n"
                                           for i in range(6)))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        (["finetune", str(run), "--data", str(odd), "--layout", "csv", "--out", str(tmp_path / "a")], "classes the run does not know"),
        (["finetune", str(run), "--data", str(new), "--layout", "csv", "--shots", "15", "--out", str(tmp_path / "b")], "fewer than --shots 15"),
        (["finetune", str(run), "--data", str(one), "--layout", "csv", "--out", str(tmp_path / "c")], "needs at least two"),
        (["finetune", str(run), "--data", str(new), "--layout", "csv", "--out", str(tmp_path / "taken")], "already exists"),
        (["curve", str(run), "--data", str(new), "--layout", "csv", "--shots", "0,x", "--out", str(tmp_path / "d")], "--shots must be"),
    ]
    for argv, message in cases:
        assert call(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (tmp_path / "taken" / "x").read_text() == "x"  # nothing the user had is lost


def test_curve_table_plot_and_points(lab: tuple[Path, Path], tmp_path: Path) -> None:
    from leuko.studies.curve import learning_curve

    run, new = lab
    points = learning_curve(run, new, tmp_path / "curve", layout="csv", shots=[0, 3], draws=2, fresh=True, steps=10,
                            echo=lambda s: None)
    methods = sorted((p.method, p.shots) for p in points)
    assert methods == [("finetune", 3), ("finetune", 3), ("fresh", 3), ("fresh", 3), ("zero-shot", 0)]
    for p in points:
        assert 0.0 <= p.accuracy <= 1.0 and p.n_test == 42 - p.n_train and p.seconds >= 0
    table = (tmp_path / "curve" / "curve.md").read_text()
    assert "| finetune | 3 | 2 | 9 | 33 |" in table and "zero-shot" in table
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000
    rows = (tmp_path / "curve" / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("method,shots,draws") and len(rows) == 4
    # which errors are left: each point's confusion counts its test cells, accuracy is its diagonal
    for p in points:
        c = np.asarray(p.confusion)
        assert c.sum() == p.n_test and abs(np.trace(c) / c.sum() - p.accuracy) < 1e-9
    conf = pd.read_csv(tmp_path / "curve" / "confusion.csv")
    fine = conf[(conf.method == "finetune") & (conf.shots == 3)]
    assert fine.cells.sum() == 2 * 33 and len(fine) == 3 * 3  # two draws' test cells, 3 x 3 (true, predicted)
    assert "## Where the errors are" in table and "| finetune | 3 |" in table.split("## Where the errors are")[1]
