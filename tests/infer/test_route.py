"""Routed runs: the home network answers its own lab's images, the robust network the rest (leuko.infer.route)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cells import TINY_CLASSES, TINY_RUN, make_cell, train_tiny
from leuko.errors import LeukoError
from leuko.infer import Predictor, load_predictor
from leuko.infer.route import RoutedPredictor, SmearGate, lab_magnification

OTHER_LAB = (200, 212, 238)  # a bluish smear: another lab's stain and camera


@pytest.fixture(scope="module")
def two_labs(infer_base: Path) -> Path:
    """Unseen cells of every class: ``home/`` on the training lab's smear, ``other/`` on a bluish one."""
    root = infer_base / "two-labs"
    for ci in range(len(TINY_CLASSES)):
        for i in range(4):
            make_cell(root / "home" / f"h{ci}_{i}.png", size=(48, 40), seed=7000 + 10 * ci + i, hue=70 * ci)
            make_cell(root / "other" / f"o{ci}_{i}.png", size=(48, 40), seed=7000 + 10 * ci + i, hue=70 * ci,
                      background=OTHER_LAB)
    return root


def test_gate_thresholds_are_the_validation_quantiles_and_shifts_are_outside() -> None:
    rng = np.random.default_rng(0)
    cov = np.diag([4.0, 1.0, 2.0, 1.0, 0.5, 0.5, 0.01])
    train = rng.multivariate_normal(np.zeros(7), cov, 3000)
    val = rng.multivariate_normal(np.zeros(7), cov, 2000)
    val[:500, 6] = np.nan  # a quarter without red cells to measure: judged on colour alone
    gate = SmearGate.fit(train, val, quantile=0.95)
    assert gate.measures_magnification
    colour, mag, _ = gate.scores(val)
    assert np.mean(colour > 1) == pytest.approx(0.05, abs=0.01) and np.mean(mag[500:] > 1) == pytest.approx(0.05, abs=0.01)
    assert (mag[:500] == 0).all()
    # chi with 6 degrees of freedom has its 95% point at 3.55; |normal| at 1.96
    assert gate.colour_threshold == pytest.approx(3.55, abs=0.2) and gate.ruler_threshold == pytest.approx(1.96, abs=0.1)
    zoomed = np.array([[0, 0, 0, 0, 0, 0, np.log(1.4)]])  # the home lab's colour, red cells 1.4x larger
    assert gate.score(zoomed)[0] == pytest.approx(np.log(1.4) / 0.1 / gate.ruler_threshold, rel=0.05)
    assert gate.reasons(gate.scores(zoomed)) == ["red cells 1.40x the home lab's size (another magnification or framing)"]
    lo, hi = gate.ruler_range()
    assert lo == pytest.approx(np.exp(-0.196), rel=0.05) and hi == pytest.approx(np.exp(0.196), rel=0.05)
    recoloured = np.array([[10, 0, 0, 0, 0, 0, 0]])  # 5 sd off in lightness
    assert gate.score(recoloured)[0] == pytest.approx(5.0 / gate.colour_threshold, rel=0.05)
    assert gate.reasons(gate.scores(recoloured))[0].startswith("smear colour unlike the home lab's")
    assert gate.score(np.array([[0, 0, 0, 0, 0, 0, np.nan]]))[0] < 0.1  # no ruler: colour alone, and it is home's
    assert gate.score(np.full((1, 7), np.nan))[0] == np.inf
    assert SmearGate.from_dict(json.loads(json.dumps(gate.to_dict()))) == gate
    # a home lab of tight crops (no red cells anywhere): a colour-only gate that says so
    tight = SmearGate.fit(np.c_[train[:, :6], np.full(len(train), np.nan)], val, quantile=0.95)
    assert not tight.measures_magnification and "colour only" in tight.chosen_on
    assert tight.score(zoomed)[0] < 0.1
    restored = SmearGate.from_dict(json.loads(json.dumps(tight.to_dict())))
    assert np.isnan(restored.mean[6]) and restored.colour_inv_cov == tight.colour_inv_cov
    with pytest.raises(LeukoError, match="quantile"):
        SmearGate.fit(train, val, quantile=1.0)


def test_a_batch_of_another_magnification_is_named() -> None:
    rng = np.random.default_rng(0)
    home = np.exp(rng.normal(0, 0.2, 300))  # one image's ruler is +-20%: the gate cannot tell 0.7x per image
    assert lab_magnification(home)["warning"] is None
    assert lab_magnification(home)["median_ratio"] == pytest.approx(1.0, abs=0.03)
    check = lab_magnification(np.r_[0.7 * home, np.full(50, np.nan)])
    assert check["n_measured"] == 300 and check["median_ratio"] == pytest.approx(0.7, abs=0.03)
    assert check["warning"].startswith(f"red cells are {check['median_ratio']:.2f}x the home lab's size (median of 300)")
    assert lab_magnification(1.4 * home[:25])["warning"] is not None
    assert lab_magnification(1.4 * home[:19]) is None and lab_magnification(None) is None


def test_routed_rows_are_the_answering_networks_own(routed: Path, home_run: Path, tiny_run: Path, two_labs: Path) -> None:
    predictor = load_predictor(routed)
    assert isinstance(predictor, RoutedPredictor)
    paths = sorted((two_labs / "home").glob("*.png")) + sorted((two_labs / "other").glob("*.png"))
    pred = predictor.predict_paths(paths)
    assert pred.keys == [str(p) for p in paths] and not pred.failed
    by = np.array(pred.answered_by)
    other = np.array(["/other/" in k for k in pred.keys])
    assert (by[other] == "robust").all()  # another lab's smear never reaches the home network
    assert (by[~other] == "home").mean() >= 0.75  # the home lab's mostly does (its energy check may send a few on)
    assert all("smear colour unlike the home lab's" in r for r, o in zip(pred.route_reasons, other) if o)
    assert all(r == "" for r, b in zip(pred.route_reasons, by) if b == "home")
    alone = {"home": Predictor(home_run).predict_paths(paths), "robust": Predictor(tiny_run).predict_paths(paths)}
    for i, b in enumerate(by):
        np.testing.assert_allclose(pred.probs[i], alone[b].probs[i], rtol=1e-6)
    # review: each row by its own network's policy
    low, unlike = predictor.review_checks(pred)
    for name in ("home", "robust"):
        m = by == name
        sub = alone[name]
        exp_low, exp_unlike = (Predictor(home_run) if name == "home" else Predictor(tiny_run)).review_checks(sub)
        assert (low[m] == exp_low[m]).all() and (unlike[m] == exp_unlike[m]).all()


def test_arrays_route_like_files(routed: Path, two_labs: Path) -> None:
    from leuko.data.imageio import load_rgb

    predictor = load_predictor(routed)
    paths = sorted(two_labs.rglob("*.png"))
    by_file = predictor.predict_paths(paths)
    by_array = predictor.predict_arrays([np.asarray(load_rgb(p)) for p in paths], [str(p) for p in paths])
    assert by_array.answered_by == by_file.answered_by
    np.testing.assert_allclose(by_array.probs, by_file.probs, atol=1e-5)


def test_routed_run_keeps_the_robust_record_and_says_so(routed: Path, tiny_run: Path) -> None:
    for name in ("config.yaml", "classes.json", "split.json"):
        assert (routed / name).read_bytes() == (tiny_run / name).read_bytes()
    info = json.loads((routed / "route.json").read_text())
    assert info["robust_run"] == str(tiny_run.resolve()) and info["energy"] is True
    assert 0.0 < info["validation"]["home_share"] <= 1.0
    assert "validation split" in info["gate"]["chosen_on"]


def test_evaluate_and_predict_a_routed_run(routed: Path, two_labs: Path, tmp_path: Path) -> None:
    from leuko.evaluate.run import evaluate_run
    from leuko.infer.predict import predict_images, write_predictions

    m = evaluate_run(routed, out=tmp_path / "ev", figures=False, echo=lambda s: None)
    route = m["route"]
    assert route["home"]["n"] + route["robust"]["n"] == m["n"]
    assert route["magnification"] is None  # synthetic cells have no red cells to measure
    assert route["home"]["share"] == pytest.approx(route["home"]["n"] / m["n"])
    res = predict_images(routed, [two_labs])
    frame = res.frame
    assert set(frame["answered_by"]) <= {"home", "robust"}
    assert (frame.loc[frame["path"].str.contains("/other/"), "answered_by"] == "robust").all()
    assert (frame.loc[frame["answered_by"] == "robust", "routed_because"] != "").all()
    assert frame["review"].dtype == bool and (frame["review"] == (frame["review_reasons"] != "")).all()
    assert frame["red_cell_ratio"].isna().all() and res.magnification is None
    written = json.loads(write_predictions(res, tmp_path / "p.json").read_text())  # strict JSON: NaN is null
    assert written["predictions"][0]["red_cell_ratio"] is None


def test_one_network_commands_name_the_routed_runs_members(routed: Path, tmp_path: Path) -> None:
    from leuko.infer import export_onnx
    from leuko.run.folder import load_model

    with pytest.raises(LeukoError, match="routed run of two networks.*model.pt.*home.pt"):
        load_model(routed)
    with pytest.raises(LeukoError, match="routed run"):
        export_onnx(routed, tmp_path / "m.onnx")
    assert export_onnx(routed / "home.pt", tmp_path / "home.onnx").path.is_file()  # one network at a time
    model, meta = load_model(routed / "home.pt")  # each network is still reachable alone
    assert meta.classes == list(TINY_CLASSES)
    assert Predictor(routed / "model.pt").classes == list(TINY_CLASSES)


def test_build_route_refuses_what_would_mislead(routed: Path, home_run: Path, tiny_run: Path, infer_base: Path,
                                               tmp_path: Path) -> None:
    from leuko.derive.route import build_route

    with pytest.raises(LeukoError, match="already exists"):
        build_route(home_run, tiny_run, routed, echo=lambda s: None)
    with pytest.raises(LeukoError, match="already a routed run"):
        build_route(routed, tiny_run, tmp_path / "r1", echo=lambda s: None)
    with pytest.raises(LeukoError, match="same folder"):
        build_route(tiny_run, tiny_run, tmp_path / "r0", echo=lambda s: None)
    with pytest.raises(LeukoError, match="run folder not found"):
        build_route(tmp_path / "nowhere", tiny_run, tmp_path / "r2", echo=lambda s: None)
    other_split = train_tiny(infer_base, "home-seed5", [*TINY_RUN, "data.split_seed=5"])
    with pytest.raises(LeukoError, match="held-out images"):
        build_route(other_split, tiny_run, tmp_path / "r3", echo=lambda s: None)
    assert not (tmp_path / "r3").exists()


def test_an_interrupted_build_leaves_nothing_that_passes_for_a_routed_run(home_run: Path, tiny_run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from leuko.derive.route import build_route

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(RoutedPredictor, "predict_samples", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_route(home_run, tiny_run, tmp_path / "r", echo=lambda s: None)
    assert not (tmp_path / "r").exists()
    res = build_route(home_run, tiny_run, tmp_path / "r", echo=lambda s: None)  # the next attempt just works
    assert res.out == tmp_path / "r" and (tmp_path / "r" / "route.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no partial folder left beside it


def test_cli_route_evaluate_and_predict(routed: Path, home_run: Path, tiny_run: Path, two_labs: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cells import call

    out = tmp_path / "cli-routed"
    assert call(["route", str(home_run), str(tiny_run), "--out", str(out), "--quantile", "0.95"]) == 0
    text = capsys.readouterr().out
    assert "validation split: the home network answers" in text and (out / "route.json").is_file()
    assert call(["route", str(home_run), str(tiny_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already exists" in err and len(err.splitlines()) == 1
    assert call(["evaluate", str(out), "--out", str(tmp_path / "ev")]) == 0
    assert "route: home network answered" in capsys.readouterr().out
    assert call(["predict", str(out), str(two_labs / "other")]) == 0
    text = capsys.readouterr().out
    assert "home network answered 0" in text and "flagged" in text


def test_the_service_answers_with_a_routed_run(routed: Path, home_run: Path, tiny_run: Path, two_labs: Path) -> None:
    from fastapi.testclient import TestClient

    from leuko.serve import create_app

    paths = sorted((two_labs / "home").glob("*.png"))[:3] + sorted((two_labs / "other").glob("*.png"))[:3]
    with TestClient(create_app(routed)) as client:
        info = client.get("/model").json()
        assert info["backend"] == "pytorch, routed" and info["explain"] is True
        assert info["review"]["description"].startswith("per network: home:")
        r = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["name"] for x in results] == [p.name for p in paths]
        assert all(x["answered_by"] == "robust" and "smear colour" in x["routed_because"] for x in results[3:])
        # each answer is the one the routed predictor gives the same pixels (decoded as uploads are)
        from leuko.data.imageio import load_rgb

        predictor = load_predictor(routed)
        alone = predictor.predict_arrays([np.asarray(load_rgb(p)) for p in paths], [p.name for p in paths])
        assert [x["answered_by"] for x in results] == alone.answered_by
        for i in (0, 3):  # Grad-CAM from the network that answered the upload, named in a header
            r = client.post("/explain", files={"file": (paths[i].name, paths[i].read_bytes(), "image/png")})
            assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
            assert r.headers["X-Leuko-Network"] == alone.answered_by[i]
            assert r.headers["X-Leuko-Label"] == TINY_CLASSES[int(alone.probs[i].argmax())]


def test_grad_cam_of_a_routed_run_is_the_answering_networks(routed: Path, home_run: Path, tiny_run: Path,
                                                            two_labs: Path, tmp_path: Path) -> None:
    from leuko.data.imageio import load_rgb
    from leuko.explain import GradCAM, RoutedGradCAM, explain_images, explainer_for

    predictor = load_predictor(routed)
    explainer = explainer_for(predictor)
    assert isinstance(explainer, RoutedGradCAM) and isinstance(explainer_for(Predictor(tiny_run)), GradCAM)
    paths = sorted((two_labs / "home").glob("*.png")) + sorted((two_labs / "other").glob("*.png"))
    routed_pred = predictor.predict_paths(paths)
    alone = {"home": GradCAM(Predictor(home_run)), "robust": GradCAM(Predictor(tiny_run))}
    for i in (0, len(paths) - 1):  # a home-lab cell and another lab's
        rgb = np.asarray(load_rgb(paths[i]))
        exp = explainer.explain_array(rgb)
        assert exp.network == routed_pred.answered_by[i] and f"by the {exp.network} network" in exp.title()
        ref = alone[exp.network].explain_array(rgb)
        np.testing.assert_allclose(exp.cam, ref.cam, atol=1e-5)
        np.testing.assert_allclose(exp.probs, routed_pred.probs[i], atol=1e-5)  # the prediction it explains
        other = "home" if exp.network == "robust" else "robust"  # told the network: no routing, that network's map
        np.testing.assert_allclose(explainer.explain_array(rgb, 1, network=other).cam, alone[other].explain_array(rgb, 1).cam,
                                   atol=1e-5)
    with pytest.raises(LeukoError, match="home and robust"):
        explainer.explain_array(rgb, network="third")
    res = explain_images(routed, [two_labs], tmp_path / "cams")
    got = {str(r.path): r.network for r in res.images}
    assert got == dict(zip(routed_pred.keys, routed_pred.answered_by)) and len(got) == len(paths)
    assert all(r.png.is_file() for r in res.images)


def test_report_of_a_routed_run(routed: Path, home_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    from leuko.explain import RoutedGradCAM
    from leuko.reports import write_report

    shutil.copytree(routed, tmp_path / "routed")  # the report evaluates into the run folder
    run = tmp_path / "routed"

    def no_routing(*args: object) -> str:
        raise AssertionError("the report must explain with the network the evaluation recorded, not route again")

    monkeypatch.setattr(RoutedGradCAM, "answering", no_routing)
    files = write_report(run, echo=lambda s: None)
    text = files.html.read_text()
    preds = pd.read_csv(run / "eval" / "test" / "predictions.csv")
    assert set(preds["answered_by"]) <= {"home", "robust"} and len(preds) > 0  # the evaluation names the network
    m = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    for name in ("home", "robust"):
        t = re.search(rf'data-metric="temperature:{name}" data-value="([^"]+)"', text)
        assert t is not None and float(t.group(1)) == pytest.approx(
            Predictor(run / ("home.pt" if name == "home" else "model.pt")).temperature)
        assert f"<th>{name}</th><td>{m['route'][name]['n']}</td>" in text
    assert "The home network (home.pt)" in text and "The robust network (model.pt)" in text
    assert str(home_run.resolve()) in text and "Mahalanobis distance" in text
    assert 'data-metric="ece_before"' not in text  # two temperatures: no single one to undo
    assert (files.figures / "gradcam_correct.png").is_file()


def test_adapting_a_routed_run_adapts_its_robust_network(routed: Path, two_labs: Path, tmp_path: Path) -> None:
    import torch

    from leuko.derive.adapt import adapt_run

    lab = tmp_path / "lab"
    for ci in range(len(TINY_CLASSES)):
        for i in range(6):
            make_cell(lab / f"o{ci}_{i}.png", size=(48, 40), seed=8000 + 10 * ci + i, hue=70 * ci, background=OTHER_LAB)
    res = adapt_run(routed, lab, tmp_path / "adapted", method="self-train", epochs=1, echo=lambda s: None)
    out = res.out
    assert (out / "home.pt").read_bytes() == (routed / "home.pt").read_bytes()  # the home network is untouched
    info = json.loads((out / "route.json").read_text())
    assert info["adapted"].startswith("the robust network, by self-train on ")
    before = torch.load(routed / "model.pt", weights_only=False)
    after = torch.load(out / "model.pt", weights_only=False)
    assert after["route"] == before["route"] and after["adapted"]["method"] == "self-train"
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    pred = load_predictor(out).predict_paths(sorted(lab.glob("*.png")))
    assert set(pred.answered_by) == {"robust"}
