"""The shared predictor machinery: one decode per file, failures per file, arrays, batching, TTA, the factory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import leuko.infer.backends as backends
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer import BasePredictor, Predictor, load_predictor
from leuko.infer.backends import TTA_VIEWS, forward_logits, iter_batches, tta_views


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_each_file_decoded_once_and_failures_named(
    tiny_run: Path, folder_with_corrupt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    checked: list[str] = []
    real_decode, real_check = backends.decode_sample, backends.check_image
    lock = threading.Lock()

    def counting_decode(sample, preprocess, **kw):  # type: ignore[no-untyped-def]
        with lock:
            decoded.append(Path(sample.path).name)
        return real_decode(sample, preprocess, **kw)

    def counting_check(path, **kw):  # type: ignore[no-untyped-def]
        with lock:
            checked.append(Path(path).name)
        return real_check(path, **kw)

    monkeypatch.setattr(backends, "decode_sample", counting_decode)
    monkeypatch.setattr(backends, "check_image", counting_check)
    paths = _images(folder_with_corrupt)
    pred = Predictor(tiny_run, batch_size=5, num_workers=2).predict_paths(paths)

    assert sorted(decoded) == sorted(p.name for p in paths)  # one decode per file, good or bad
    assert sorted(checked) == ["broken.jpg", "notes.png"]  # only failures are diagnosed
    assert dict(pred.failed) == {
        str(folder_with_corrupt / "jpg" / "broken.jpg"): "truncated image (file ends before the picture does)",
        str(folder_with_corrupt / "notes.png"): "not an image (unrecognised file content)",
    }
    good = [str(p) for p in paths if p.name not in ("broken.jpg", "notes.png")]
    assert pred.keys == good and pred.probs.shape == (24, 3) and pred.logits.shape == (24, 3)
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, atol=1e-6)
    # the survivors get exactly what they get without the bad files around them
    alone = Predictor(tiny_run, batch_size=64, num_workers=0).predict_paths([Path(k) for k in good])
    np.testing.assert_allclose(pred.logits, alone.logits, atol=1e-5)


def test_temperature_is_the_fitted_one_and_applied(tiny_run: Path, new_images: Path) -> None:
    from leuko.run.calibration import softmax

    p = Predictor(tiny_run)
    summary_t = p.meta["temperature"]
    assert summary_t != 1.0 and p.temperature == summary_t
    pred = p.predict_paths(_images(new_images))
    np.testing.assert_allclose(pred.probs, softmax(pred.logits, summary_t), atol=1e-6)
    raw = Predictor(tiny_run, temperature=1.0).predict_paths(_images(new_images))
    np.testing.assert_allclose(raw.probs, softmax(pred.logits, 1.0), atol=1e-6)


def test_predict_arrays_matches_files(tiny_run: Path, new_images: Path) -> None:
    p = Predictor(tiny_run)
    pngs = sorted(new_images.glob("*.png"))  # lossless: the array is exactly the file
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in pngs]
    by_file = p.predict_paths(pngs)
    by_array = p.predict_arrays(arrays)
    assert by_array.keys == [str(i) for i in range(len(pngs))] and not by_array.failed
    np.testing.assert_allclose(by_array.logits, by_file.logits, atol=1e-6)
    grey = arrays[0].mean(2).astype(np.uint8)
    named = p.predict_arrays([grey, np.zeros((4, 4, 4), np.uint8), arrays[1]], keys=["grey", "rgba", "ok"])
    assert named.keys == ["grey", "ok"]
    assert named.failed == [("rgba", "expected an H x W x 3 RGB image; got shape (4, 4, 4)")]
    with pytest.raises(LeukoError, match="2 images but 1 keys"):
        p.predict_arrays(arrays[:2], keys=["a"])
    empty = p.predict_arrays([])
    assert empty.probs.shape == (0, 3) and empty.pred.shape == (0,)


def test_load_predictor_picks_the_backend(tiny_run: Path, tiny_onnx: Path) -> None:
    from leuko.infer import OnnxPredictor

    by_dir, by_pt, by_onnx = load_predictor(tiny_run), load_predictor(tiny_run / "model.pt"), load_predictor(tiny_onnx)
    assert type(by_dir) is Predictor and type(by_pt) is Predictor and type(by_onnx) is OnnxPredictor
    for p in (by_dir, by_pt, by_onnx):
        assert isinstance(p, BasePredictor)
        assert p.classes == ["eosinophil", "lymphocyte", "neutrophil"]
        assert p.image_size == 32 and p.input["resize"] == "pad" and p.input["preprocess"] == ["clahe"]
        assert p.temperature == by_dir.temperature and p.meta == by_dir.meta
    assert (by_dir.backend, by_onnx.backend) == ("pytorch", "onnxruntime")
    with pytest.raises(LeukoError, match="no such run folder or model file"):
        load_predictor(tiny_run / "nope.onnx")


def test_batched_logits_one_row_per_sample(tiny_run: Path, new_images: Path, folder_with_corrupt: Path,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The calibration path needs aligned rows: an unreadable file raises, the cache gives the same logits."""
    from leuko.infer import batched_logits

    monkeypatch.setenv("LEUKO_CACHE_DIR", str(tmp_path / "cache"))
    p = Predictor(tiny_run)
    samples = [Sample(path=f, label="?") for f in _images(new_images)]
    plain = batched_logits(p.model, samples, p.transform(), 32, batch_size=7, num_workers=0)
    cached = batched_logits(p.model, samples, p.transform(), 32, batch_size=7, cache=True)
    assert plain.shape == (24, 3)
    np.testing.assert_allclose(cached, plain, atol=1e-6)
    np.testing.assert_allclose(p.predict_samples(samples).logits, plain, atol=1e-6)
    assert (tmp_path / "cache" / "decoded").is_dir()
    bad = [Sample(path=folder_with_corrupt / "notes.png", label="?"), *samples[:2]]
    with pytest.raises(LeukoError, match=r"notes\.png: not an image"):
        batched_logits(p.model, bad, p.transform(), 32)


def test_iter_batches_threads_keep_order_and_failures() -> None:
    def load(i: int, out: np.ndarray) -> str | None:
        if i % 7 == 3:
            return f"bad {i}"
        out[...] = i
        return None

    for workers in (0, 3):
        batches = list(iter_batches(20, load, (1, 2, 2), batch_size=6, workers=workers))
        assert [len(b.rows) + len(b.failed) for b in batches] == [6, 6, 6, 2]
        rows = [r for b in batches for r in b.rows]
        assert rows == [i for i in range(20) if i % 7 != 3]
        assert [f for b in batches for f in b.failed] == [(3, "bad 3"), (10, "bad 10"), (17, "bad 17")]
        values = np.concatenate([b.x[:, 0, 0, 0] for b in batches])
        assert values.tolist() == rows
    with pytest.raises(LeukoError, match="batch_size"):
        list(iter_batches(3, load, (1, 2, 2), batch_size=0))


def test_tta_views_and_average() -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    views = tta_views(x)
    assert len(views) == len(TTA_VIEWS) == 4 and all(v.flags.c_contiguous for v in views)
    np.testing.assert_array_equal(views[1][0, 0, 0], x[0, 0, 0, ::-1])
    np.testing.assert_array_equal(views[2][0, 0, :, 0], x[0, 0, ::-1, 0])
    np.testing.assert_array_equal(views[3][0, 0], np.rot90(x[0, 0]))  # counter-clockwise, like torch.rot90
    corner = lambda v: v[:, :, 0, :2].reshape(len(v), -1)  # noqa: E731 - orientation-sensitive "network"
    expected = np.mean([corner(v) for v in views], axis=0)
    np.testing.assert_allclose(forward_logits(corner, x, tta=True), expected, rtol=1e-6)
    assert not np.allclose(forward_logits(corner, x), expected)
    mean_net = lambda v: v.mean(axis=(2, 3))  # noqa: E731 - orientation-invariant: TTA changes nothing
    np.testing.assert_allclose(forward_logits(mean_net, x, tta=True), mean_net(x), rtol=1e-6)
