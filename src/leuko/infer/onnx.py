"""ONNX export of a run, and the onnxruntime predictor that runs it without torch.

``leuko export RUN_DIR`` writes ``model.onnx``: the network with a dynamic
batch axis, reading the normalised ``float32 N x 3 x S x S`` input the PyTorch
path feeds it and returning raw logits (the temperature is applied after, as
in :class:`~leuko.infer.predictor.Predictor`). Everything else inference
needs travels inside the file as metadata:

* ``leuko``: the whole ``model.pt`` metadata but the weights, as JSON (what
  :class:`OnnxPredictor` reads);
* ``classes``, ``temperature``, ``image_size``, ``mean``, ``std``,
  ``preprocess``, ``resize``: the same facts as readable keys, for tools
  (Netron, other runtimes) that will not parse the JSON.

:class:`OnnxPredictor` imports onnxruntime, numpy, PIL and OpenCV only: a
lab PC or a web service can classify cells without installing torch. Export
itself needs torch (it traces the network) and imports it lazily.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from leuko.data.preprocess import available_cpus
from leuko.errors import LeukoError
from leuko.infer.backends import BasePredictor
from leuko.run.card import ModelCard

META_KEY = "leuko"
"""The metadata key holding the full model metadata as JSON."""

READABLE_KEYS: tuple[str, ...] = ("classes", "temperature", "image_size", "mean", "std", "preprocess", "resize")
"""Metadata keys written beside :data:`META_KEY` for humans and other tools."""

DEFAULT_OPSET = 17
"""ONNX opset: supported by every onnxruntime since 1.11 and by the TorchScript exporter."""

EXPORT_FORMATS: tuple[str, ...] = ("onnx",)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


# --------------------------------------------------------------------------- #
# Metadata
# --------------------------------------------------------------------------- #


def onnx_metadata(card: ModelCard) -> dict[str, str]:
    """The ONNX ``metadata_props`` for a model's card (see the module docstring)."""
    full = card.to_meta()
    inp = card.input
    if inp is None:
        raise LeukoError(f"a {card.kind} model cannot be exported as a classifier")
    readable: dict[str, Any] = {
        "classes": list(card.classes),
        "temperature": float(card.temperature),
        "image_size": int(inp.image_size),
        "mean": list(inp.mean),
        "std": list(inp.std),
        "preprocess": list(inp.preprocess),
        "resize": inp.resize,
    }
    props = {META_KEY: json.dumps(full, default=str, allow_nan=False)}
    for key in READABLE_KEYS:
        v = readable[key]
        props[key] = v if isinstance(v, str) else json.dumps(v)
    return props


def card_from_props(props: Mapping[str, str], source: Path | str) -> ModelCard:
    """The model card stored by :func:`onnx_metadata`, checked; ``source`` names the file in errors."""
    raw = props.get(META_KEY)
    if raw is None:
        raise LeukoError(
            f"{source} has no leuko metadata (classes, preprocessing, temperature); "
            "export it with 'leuko export RUN_DIR --format onnx'"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LeukoError(f"{source}: the leuko metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list) or not isinstance(meta.get("input"), dict):
        raise LeukoError(f"{source}: the leuko metadata lacks 'classes' or 'input'")
    missing = [k for k in ("image_size", "mean", "std") if k not in meta["input"]]
    if missing:
        raise LeukoError(f"{source}: the leuko metadata's input lacks {', '.join(missing)}")
    return ModelCard.from_meta(meta, source=source)


def read_onnx_card(path: str | Path) -> ModelCard:
    """The model card of an exported ``.onnx`` file (without loading the weights into a runtime)."""
    import onnx

    p = Path(path).expanduser()
    if not p.is_file():
        raise LeukoError(f"ONNX model not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, onnx others
        raise LeukoError(f"{p} is not an ONNX model ({_first_line(exc)})") from None
    return card_from_props({m.key: m.value for m in model.metadata_props}, p)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote, and how closely the file reproduces PyTorch."""

    path: Path
    size_bytes: int
    opset: int
    max_abs_diff: float | None
    """Largest |logit difference| between onnxruntime and PyTorch on a random batch (None: not verified)."""
    card: ModelCard


def export_onnx(
    run: str | Path,
    out: str | Path | None = None,
    *,
    fmt: str = "onnx",
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> ExportResult:
    """Export a run's model (``RUN_DIR`` or its ``model.pt``) to ONNX with its metadata.

    The file is checked with ``onnx.checker``, and with ``verify`` run once in
    onnxruntime on a random batch of two and compared with PyTorch. It is
    written to a temporary name and renamed, so a failed export never leaves a
    half-written model behind.

    Args:
        out: the ``.onnx`` file (default ``RUN_DIR/model.onnx``).
        fmt: the export format; only ``"onnx"``.
        force: replace an existing ``out`` (otherwise that is an error).

    Raises:
        LeukoError: unknown format, ``out`` exists, not a ``.onnx`` name, or
            the run has no readable ``model.pt``.
    """
    if fmt not in EXPORT_FORMATS:
        raise LeukoError(f"unsupported export format {fmt!r}; supported: {', '.join(EXPORT_FORMATS)}")
    src = Path(run).expanduser()
    if not src.exists():
        raise LeukoError(f"no such run folder or model file: {src}")
    run_dir = src if src.is_dir() else src.parent
    target = Path(out).expanduser() if out is not None else run_dir / "model.onnx"
    if target.suffix.lower() != ".onnx":
        raise LeukoError(f"the export file must end in .onnx; got {target.name}")
    if target.is_dir():
        raise LeukoError(f"{target} is a folder; give a .onnx file name")
    if target.exists() and not force:
        raise LeukoError(f"{target} already exists; pass --force to overwrite it")

    import onnx
    import torch

    from leuko.run.folder import load_model

    model, card = load_model(src)
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    size = card.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: the dynamo one needs onnxscript (not a leuko
        # dependency) and works offline on every timm/torchvision model leuko builds.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,
            export_params=True,
            opset_version=int(opset),
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        expected = model(example).numpy()
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in onnx_metadata(card).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "leuko"
    proto.doc_string = (
        f"leuko white-cell classifier ({card.model.display_name}, {len(card.classes)} classes): "
        f"input float32 N x 3 x {size} x {size}, normalised with the metadata's mean/std; output raw logits, "
        "divide by 'temperature' before the softmax."
    )
    onnx.checker.check_model(proto)

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        onnx.save(proto, str(tmp))
        diff: float | None = None
        if verify:
            got = OnnxPredictor(tmp)._forward(example.numpy())
            diff = float(np.max(np.abs(got - expected)))
            if not math.isfinite(diff) or diff > 1e-3 * max(1.0, float(np.max(np.abs(expected)))):
                raise LeukoError(f"the exported model does not reproduce PyTorch (max |logit difference| {diff:.3g})")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(target, target.stat().st_size, int(opset), diff, card)


# --------------------------------------------------------------------------- #
# The onnxruntime predictor
# --------------------------------------------------------------------------- #


class OnnxPredictor(BasePredictor):
    """An exported model in onnxruntime, with the :class:`~leuko.infer.predictor.Predictor` interface.

    Args:
        path: a ``.onnx`` file written by :func:`export_onnx`.
        device: ``"cpu"``, ``"cuda"`` (needs onnxruntime-gpu) or ``None`` (GPU when onnxruntime has one).
        batch_size: images per ``session.run``.
        temperature: override the stored temperature.
        num_workers: image-decoding threads (default: the CPUs available).
        threads: onnxruntime intra-op threads (default: the CPUs available).

    Raises:
        LeukoError: not an ONNX file, no leuko metadata, or metadata that does
            not match the network (class count, input size).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | None = None,
        batch_size: int = 64,
        temperature: float | None = None,
        num_workers: int | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        p = Path(path).expanduser()
        if not p.is_file():
            raise LeukoError(f"ONNX model not found: {p}")
        self.path = p
        available = ort.get_available_providers()
        if device in (None, "cuda") and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cuda":
            raise LeukoError("device 'cuda' needs onnxruntime-gpu (this onnxruntime runs on the CPU only)")
        elif device in (None, "cpu"):
            providers = ["CPUExecutionProvider"]
        else:
            raise LeukoError(f"device must be 'cpu' or 'cuda'; got {device!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads) if threads else available_cpus()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: no "removing initializer" chatter
        # Worker threads sleep between runs instead of spinning: on a small machine shared with the decoding
        # threads (and, in `leuko serve`, the HTTP server) spinning steals the cores they need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(p), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own InvalidProtobuf, Fail, ...
            raise LeukoError(f"{p} is not an ONNX model onnxruntime can load ({_first_line(exc)})") from None
        card = card_from_props(self.session.get_modelmeta().custom_metadata_map, p)
        super().__init__(card, batch_size=batch_size, temperature=temperature, num_workers=num_workers)
        self._check_signature()

    def _check_signature(self) -> None:
        """The network must take ``N x 3 x S x S`` and give ``N x len(classes)``, as the metadata says."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise LeukoError(f"{self.path}: expected one image input and a logits output")
        self._input_name = inputs[0].name
        shape = list(inputs[0].shape)
        s = self.image_size
        if len(shape) != 4 or shape[1:] != [3, s, s]:
            raise LeukoError(f"{self.path}: the network reads {shape}, but the metadata says 3 x {s} x {s} images")
        out_shape = list(outputs[0].shape)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != len(self.classes)):
            raise LeukoError(f"{self.path}: the network outputs {out_shape}, but the metadata names {len(self.classes)} classes")

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMATS",
    "META_KEY",
    "READABLE_KEYS",
    "ExportResult",
    "OnnxPredictor",
    "export_onnx",
    "card_from_props",
    "onnx_metadata",
    "read_onnx_card",
]
