"""Ensemble runs: several runs of one recipe and split as one network (leuko.derive.ensemble, leuko.models.ensemble)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cells import TINY_CLASSES, TINY_RUN, train_tiny
from leuko.errors import LeukoError
from leuko.infer import Predictor, load_predictor


def test_the_ensemble_is_the_mean_of_its_members_calibrated_logits(ensemble: Path, tiny_run: Path, seed_one: Path,
                                                                   new_images: Path) -> None:
    paths = sorted(new_images.rglob("*.png")) + sorted(new_images.rglob("*.jpg"))
    members = [Predictor(tiny_run), Predictor(seed_one)]
    assert members[0].temperature != members[1].temperature  # each member's own scale is undone
    got = load_predictor(ensemble).predict_paths(paths)
    alone = [m.predict_paths(paths) for m in members]
    expected = np.mean([a.logits / m.temperature for a, m in zip(alone, members)], axis=0)
    np.testing.assert_allclose(got.logits, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(alone[0].probs, alone[1].probs, atol=1e-3)  # the members disagree: the mean is not a copy
    meta = json.loads((ensemble / "ensemble.json").read_text())
    assert meta["members"] == [str(tiny_run.resolve()), str(seed_one.resolve())]
    assert set(meta["validation"]["accuracy"]) == {str(tiny_run.resolve()), str(seed_one.resolve()), "ensemble"}
    ens = Predictor(ensemble)
    assert ens.temperature == pytest.approx(meta["validation"]["temperature"]) and ens.card.review
    summary = json.loads((ensemble / "summary.json").read_text())
    assert summary["calibration"]["temperature"] == pytest.approx(ens.temperature)  # the ensemble's, not a member's
    for name in ("config.yaml", "split.json", "classes.json"):
        assert (ensemble / name).read_bytes() == (tiny_run / name).read_bytes()


def test_build_ensemble_refuses_what_would_mislead(ensemble: Path, tiny_run: Path, seed_one: Path, infer_base: Path,
                                                   tmp_path: Path) -> None:
    from leuko.derive.ensemble import build_ensemble_run

    def refused(runs: list[Path], match: str) -> None:
        out = tmp_path / f"e{len(list(tmp_path.iterdir()))}"
        with pytest.raises(LeukoError, match=match):
            build_ensemble_run(runs, out, echo=lambda s: None)
        assert not out.exists()

    refused([tiny_run], "at least two runs")
    refused([tiny_run, tiny_run], "given twice")
    refused([tiny_run, ensemble], "already an ensemble")
    with pytest.raises(LeukoError, match="already exists"):
        build_ensemble_run([tiny_run, seed_one], ensemble, echo=lambda s: None)
    other_split = train_tiny(infer_base, "home-seed5", [*TINY_RUN, "data.split_seed=5"])
    refused([tiny_run, other_split], "trained or validated on, or does not list, .* held-out or validation images")
    bigger = train_tiny(infer_base, "size40", [*[o for o in TINY_RUN if not o.startswith("data.image_size")],
                                               "data.image_size=40"])
    refused([tiny_run, bigger], "reads images differently .*image_size: 40 vs 32")
    unlisted = tmp_path / "no-split"
    shutil.copytree(seed_one, unlisted)
    (unlisted / "split.json").unlink()
    refused([tiny_run, unlisted], "has no split.json")


def _as_adapted(run: Path, out: Path, adapted: dict) -> Path:
    """A copy of ``run`` whose model.pt says it was adapted (what ``leuko adapt`` records)."""
    from leuko.run.folder import load_model, save_model

    shutil.copytree(run, out)
    model, meta = load_model(out / "model.pt")
    save_model(out / "model.pt", model, meta.with_(adapted=adapted))
    return out


def test_members_must_be_adapted_alike_and_the_ensemble_says_how(tiny_run: Path, seed_one: Path, tmp_path: Path) -> None:
    from leuko.derive.ensemble import build_ensemble_run

    lab = {"method": "self-train", "data": "/labs/b", "layout": "folder", "date": "2026-11-25"}
    a = _as_adapted(tiny_run, tmp_path / "a", lab)
    b = _as_adapted(seed_one, tmp_path / "b", {**lab, "date": "2026-11-26"})
    with pytest.raises(LeukoError, match="adapted differently .*a: self-train, /labs/b, folder; .*: not adapted"):
        build_ensemble_run([a, seed_one], tmp_path / "mixed", echo=lambda s: None)
    with pytest.raises(LeukoError, match="adapted differently"):
        build_ensemble_run([a, _as_adapted(seed_one, tmp_path / "c", {**lab, "data": "/labs/c"})], tmp_path / "two-labs",
                           echo=lambda s: None)
    out = build_ensemble_run([a, b], tmp_path / "ens", echo=lambda s: None).out
    adapted = Predictor(out).card.adapted
    assert (adapted["method"], adapted["data"]) == ("self-train", "/labs/b") and "each member" in adapted["members"]


def test_every_consumer_of_a_model_takes_an_ensemble(ensemble: Path, tiny_run: Path, seed_one: Path, new_images: Path,
                                                     tmp_path: Path) -> None:
    from leuko.data.imageio import load_rgb
    from leuko.explain import GradCAM
    from leuko.explain.gradcam import cam_to_image, input_box
    from leuko.infer import export_onnx

    paths = sorted(new_images.glob("*.png"))
    onnx = export_onnx(ensemble, tmp_path / "ens.onnx").path  # one graph; export checks it against PyTorch
    np.testing.assert_allclose(load_predictor(onnx).predict_paths(paths).probs,
                               load_predictor(ensemble).predict_paths(paths).probs, atol=1e-4)
    # Grad-CAM: the members' maps summed before the ReLU, each from its own layer
    explainer = GradCAM(Predictor(ensemble))
    assert explainer.layers[0].startswith("members.0.") and explainer.layers[1].startswith("members.1.")
    rgb = np.asarray(load_rgb(paths[0]))
    exp = explainer.explain_array(rgb, 1)
    x, box = explainer._model_input(rgb)
    maps, _ = explainer._forward_backward(x, 1)
    alone = [GradCAM(Predictor(r)) for r in (tiny_run, seed_one)]
    # each member's share of the ensemble's gradient is its own gradient / (2 T_i): the same map up to that scale
    total = 0
    for g, (a_ens, gr_ens) in zip(alone, maps):
        (a, gr), = g._forward_backward(g._model_input(rgb)[0], 1)[0]
        np.testing.assert_allclose(a_ens.numpy(), a.numpy(), atol=1e-5)
        total = total + (gr.mean(dim=(1, 2))[:, None, None] * a).sum(0) / (2 * g.predictor.temperature)
    grid = np.maximum(total.numpy(), 0.0)
    np.testing.assert_allclose(exp.cam, cam_to_image(grid, rgb.shape[0], rgb.shape[1], box), atol=1e-4)
    # the report names the members
    from leuko.reports import write_report

    shutil.copytree(ensemble, tmp_path / "ens")
    text = write_report(tmp_path / "ens", echo=lambda s: None).html.read_text()
    assert "ensemble of 2: 2 x custom_cnn" in text and str(seed_one.resolve()) in text
    assert Predictor(ensemble).classes == list(TINY_CLASSES)
    assert Predictor(ensemble).describe().startswith("pytorch: ensemble of 2 (custom_cnn), 3 classes")


def test_cli_ensemble(tiny_run: Path, seed_one: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cells import call

    out = tmp_path / "cli-ens"
    assert call(["ensemble", str(tiny_run), str(seed_one), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "validation accuracy:" in text and "ensemble temperature" in text and (out / "model.pt").is_file()
    assert call(["ensemble", str(tiny_run), "--out", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: an ensemble needs at least two runs; got 1"


def test_a_derived_run_is_all_or_nothing(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """route, ensemble and adapt build into .NAME.partial: an error or a full disk leaves no folder behind."""
    from leuko.run.folder import RunFolder, check_new_run, derived_run

    target = check_new_run(tmp_path / "new", "a test run")
    with pytest.raises(KeyboardInterrupt):
        with derived_run(target, RunFolder(tiny_run)) as new:
            assert (new.path / "config.yaml").is_file()  # the record is there while building
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "rename", full_disk)
    with pytest.raises(LeukoError, match=r"^building .*new failed: .*No space left on device"):
        with derived_run(target, RunFolder(tiny_run)) as new:
            new.write_json("x.json", {})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with derived_run(target, RunFolder(tiny_run)) as new:
        new.write_json("x.json", {"ok": 1})
    assert json.loads((target / "x.json").read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["new"]
    with pytest.raises(LeukoError, match="already exists; choose a new --out \\(a test run never overwrites"):
        check_new_run(target, "a test run")


def test_adapting_an_ensemble_adapts_every_member(ensemble: Path, infer_base: Path, tmp_path: Path) -> None:
    """Self-training: the ensemble's pseudo-labels, every member trained on them; the result is an ensemble again."""
    import torch

    from leuko.run.folder import load_model
    from leuko.derive.adapt import adapt_run

    res = adapt_run(ensemble, infer_base / "cells", tmp_path / "adapted", method="self-train", epochs=1, echo=lambda s: None)
    before, _ = load_model(ensemble)
    after, meta = load_model(res.out)
    assert meta.model.name == "ensemble" and meta.kind == "ensemble" and "each member self-trained" in meta.adapted["teacher"]
    for old, new in zip(before.members, after.members):  # every member moved, not only one
        changed = [not torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values())]
        assert any(changed)
    assert torch.equal(before.inverse_temperatures, after.inverse_temperatures)  # the members' scales stay
    assert (res.out / "ensemble.json").read_bytes() == (ensemble / "ensemble.json").read_bytes()  # the record carries on
    np.testing.assert_allclose(meta.temperature, Predictor(ensemble).temperature)
    ada = adapt_run(ensemble, infer_base / "cells", tmp_path / "adabn", method="adabn", layers="all", echo=lambda s: None)
    after, meta = load_model(ada.out)
    assert len(meta.adapted["members"]) == 2 and meta.adapted["bn_layers"] == ada.n_layers > 0
    for old, new in zip(before.members, after.members):  # each member's own statistics re-estimated
        stats = [k for k in old.state_dict() if k.endswith("running_mean")]
        assert stats and any(not torch.equal(old.state_dict()[k], new.state_dict()[k]) for k in stats)
