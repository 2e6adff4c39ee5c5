"""ONNX export and the onnxruntime predictor: same numbers as PyTorch, metadata, CLI, no torch at inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from cells import call, model_payload
from PIL import Image

from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer import OnnxPredictor, Predictor, export_onnx, read_onnx_card
from leuko.infer.onnx import META_KEY, READABLE_KEYS
from leuko.run.card import ModelCard


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_metadata_round_trip(tiny_run: Path, tiny_onnx: Path) -> None:
    stored = model_payload(tiny_run / "model.pt")
    stored.pop("state_dict")
    assert tiny_onnx == tiny_run / "model.onnx"
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert set(props) == {META_KEY, *READABLE_KEYS}
    assert json.loads(props[META_KEY]) == json.loads(json.dumps(stored))  # the whole meta, review policy included
    assert "review" in stored and read_onnx_card(tiny_onnx).to_meta() == json.loads(props[META_KEY])
    assert json.loads(props["classes"]) == ["eosinophil", "lymphocyte", "neutrophil"]
    assert float(props["temperature"]) == stored["temperature"] != 1.0
    assert int(props["image_size"]) == 32 and props["resize"] == "pad"
    assert json.loads(props["preprocess"]) == ["clahe"]
    assert json.loads(props["mean"]) == stored["input"]["mean"] and json.loads(props["std"]) == stored["input"]["std"]
    # float32 N x 3 x 32 x 32 in (batch axis dynamic), N x 3 raw logits out
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 32] and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 3]
    p = OnnxPredictor(tiny_onnx)
    assert p.temperature == stored["temperature"] and p.meta == stored


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_matches_pytorch(tiny_run: Path, tiny_onnx: Path, new_images: Path, tta: bool) -> None:
    paths = _images(new_images)
    torch_pred = Predictor(tiny_run, batch_size=5).predict_paths(paths, tta=tta)
    onnx_pred = OnnxPredictor(tiny_onnx, batch_size=7).predict_paths(paths, tta=tta)
    assert onnx_pred.keys == torch_pred.keys == [str(p) for p in paths] and not onnx_pred.failed
    assert float(np.abs(onnx_pred.probs - torch_pred.probs).max()) < 1e-4
    assert float(np.abs(onnx_pred.logits - torch_pred.logits).max()) < 1e-4
    assert (onnx_pred.pred == torch_pred.pred).all()
    # TTA really changes the numbers (it is not a no-op on these images)
    if tta:
        plain = OnnxPredictor(tiny_onnx).predict_paths(paths)
        assert float(np.abs(plain.logits - onnx_pred.logits).max()) > 1e-4
    # arrays: the web service's entry point gives the same answer as the files
    pngs = [p for p in paths if p.suffix == ".png"]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    by_array = OnnxPredictor(tiny_onnx).predict_arrays(arrays, keys=[p.name for p in pngs], tta=tta)
    rows = [torch_pred.keys.index(str(p)) for p in pngs]
    assert by_array.keys == [p.name for p in pngs]
    assert float(np.abs(by_array.probs - torch_pred.probs[rows]).max()) < 1e-4


@pytest.mark.parametrize(
    "name, n_classes, pretrained, head, size",
    [
        ("custom_cnn", 2, "none", "bn-dense256", 48),
        # efficientnet_lite0 with 8 classes runs by default in test_pbc_images_agree (real images)
        pytest.param("efficientnet_lite0", 8, "bundled", "linear", 64, marks=pytest.mark.slow),
        pytest.param("mobilenetv2", 8, "none", "dense128", 64, marks=pytest.mark.slow),
        pytest.param("resnet50", 2, "none", "linear", 64, marks=pytest.mark.slow),
        pytest.param("efficientnet_lite0", 2, "bundled", "linear", 224, marks=pytest.mark.slow),
    ],
)
def test_export_architectures(tmp_path: Path, new_images: Path, name: str, n_classes: int, pretrained: str, head: str,
                              size: int) -> None:
    """Each registry family exports and reproduces PyTorch (random head, no training needed for that)."""
    import torch

    from leuko.models import build_model
    from leuko.run.folder import save_model

    torch.manual_seed(0)
    model = build_model(name, n_classes, pretrained=pretrained, head=head)
    info = model.leuko_info
    classes = [f"class{i}" for i in range(n_classes)]
    meta = {
        "model": {"name": name, "head": head, "dropout": None, "pretrained": pretrained},
        "classes": classes,
        "input": {"image_size": size, "resize": "crop", "preprocess": [], "mean": list(info.mean), "std": list(info.std)},
        "temperature": 1.5,
    }
    save_model(tmp_path / "model.pt", model, ModelCard.from_meta(meta))
    result = export_onnx(tmp_path / "model.pt", tmp_path / "exported.onnx")
    # export runs the file in onnxruntime on a random batch and compares with PyTorch
    assert result.path.is_file() and result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    paths = _images(new_images)[:3]
    predictor = OnnxPredictor(result.path)
    with torch.inference_mode():
        x = np.stack([predictor.model_input.from_sample(Sample(p, "?")) for p in paths])
        expected = model.eval()(torch.from_numpy(x)).numpy()
    b = predictor.predict_paths(paths)
    assert b.classes == classes and b.probs.shape == (3, n_classes)
    assert float(np.abs(b.logits - expected).max()) < 1e-4


def test_export_never_overwrites_silently(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.onnx"
    assert call(["export", str(tiny_run), "--out", str(out)]) == 0
    assert "written:" in capsys.readouterr().out
    out.write_bytes(b"precious")
    assert call(["export", str(tiny_run), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"precious"
    assert call(["export", str(tiny_run), "--out", str(out), "--force"]) == 0
    assert read_onnx_card(out).classes == ["eosinophil", "lymphocyte", "neutrophil"]
    assert not list(tmp_path.glob("*.tmp"))  # written via a temporary name, renamed into place


def test_predict_onnx_folder_with_corrupt_file(tiny_run: Path, tiny_onnx: Path, folder_with_corrupt: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preds.csv"
    assert call(["predict", str(tiny_onnx), str(folder_with_corrupt), "--out", str(out), "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "jpg/broken.jpg: truncated image (file ends before the picture does)" in captured.err.replace("\n", "")
    assert "notes.png: not an image" in captured.err.replace("\n", "")
    assert "Traceback" not in captured.out + captured.err and "; 2 unreadable" in captured.out
    frame = pd.read_csv(out)
    good = [p for p in _images(folder_with_corrupt) if p.name not in ("broken.jpg", "notes.png")]
    assert frame["path"].tolist() == [str(p) for p in good]
    assert {"pred", "confidence", "top2", "top2_p", "p_eosinophil", "p_lymphocyte", "p_neutrophil"} <= set(frame.columns)
    expected = Predictor(tiny_run).predict_paths(good)
    probs = frame[["p_eosinophil", "p_lymphocyte", "p_neutrophil"]].to_numpy()
    assert float(np.abs(probs - expected.probs).max()) < 1e-4


def test_onnx_prediction_never_imports_torch(tiny_onnx: Path, new_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.json"
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from leuko.cli import main
        try:
            main(["predict", {str(tiny_onnx)!r}, {str(new_images)!r}, "--tta", "--out", {str(out)!r}])
        except SystemExit as exc:
            assert not exc.code, exc.code
        from leuko.infer import load_predictor
        p = load_predictor({str(tiny_onnx)!r})
        pred = p.predict_arrays([np.full((40, 50, 3), 200, np.uint8)])
        assert pred.probs.shape == (1, 3), pred.probs.shape
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "lightning", "timm")))
        print(json.dumps({{"backend": p.backend, "loaded": loaded}}))
        """
    )
    env = dict(os.environ, COLUMNS="200", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"backend": "onnxruntime", "loaded": []}
    payload = json.loads(out.read_text())
    assert len(payload["predictions"]) == len(_images(new_images)) and payload["failed"] == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, good: (d / "text.onnx").write_text("not a model") and d / "text.onnx", "is not an ONNX model onnxruntime can load"),
        (lambda d, good: _strip_metadata(good, d / "bare.onnx"), "has no leuko metadata"),
        (lambda d, good: d / "missing.onnx", "no such run folder or model file"),
    ],
    ids=["not-onnx", "no-metadata", "missing"],
)
def test_bad_models_one_line(tiny_onnx: Path, new_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             make, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = make(tmp_path, tiny_onnx)
    assert call(["predict", str(bad), str(new_images)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def _strip_metadata(src: Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save(model, str(dst))
    return dst


def test_bad_export_arguments(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["export", str(tiny_run), "--format", "tflite"], "error: unsupported export format 'tflite'; supported: onnx"),
        (["export", str(tiny_run), "--out", str(tmp_path / "m.pt")], "error: the export file must end in .onnx"),
        (["export", str(tmp_path)], "error: model file not found"),
    ]
    for argv, message in cases:
        assert call(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1, err
    with pytest.raises(LeukoError, match="the leuko metadata lacks"):
        from leuko.infer.onnx import card_from_props

        card_from_props({META_KEY: json.dumps({"classes": ["a"]})}, "x.onnx")


@pytest.mark.shared
def test_pbc_images_agree(shared_datasets: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0 (bundled weights, 8-class head) on real PBC JPEGs at 128 px (draft decoding), with TTA."""
    import torch

    from leuko.models import build_model
    from leuko.run.folder import save_model

    root = shared_datasets / "pbc"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths = [sorted(p for p in (root / c).glob("*.jpg") if not p.name.startswith("."))[0] for c in classes]
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", len(classes), pretrained="bundled")
    info = model.leuko_info
    meta = {
        "model": {"name": "efficientnet_lite0", "head": "linear", "dropout": None, "pretrained": "bundled"},
        "classes": classes,
        "input": {"image_size": 128, "resize": "stretch", "preprocess": ["center-crop:0.875"], "mean": list(info.mean), "std": list(info.std)},
        "temperature": 0.8,
    }
    save_model(tmp_path / "model.pt", model, ModelCard.from_meta(meta))
    torch_predictor, onnx_predictor = Predictor(tmp_path), OnnxPredictor(export_onnx(tmp_path).path)
    for tta in (False, True):
        a = torch_predictor.predict_paths(paths, tta=tta)
        b = onnx_predictor.predict_paths(paths, tta=tta)
        assert b.keys == a.keys and len(b.keys) == len(classes)
        assert float(np.abs(a.probs - b.probs).max()) < 1e-4
