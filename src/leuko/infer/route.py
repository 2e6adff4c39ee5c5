"""A routed run: the home-lab network answers images that look like its lab, the robust network the rest.

A network trained for one lab's look (``pbc-best``: 99%+ on held-out PBC, under
50% on BCCD) and one trained to ignore that look (``pbc-robust``: ~97.5% on
PBC, ~82% on BCCD) each win where the other loses. A routed run holds both and
decides per image, from the image alone, which one answers:

* the **smear colour**: the CIELAB mean and spread of the red cells and
  background around the white cell (:func:`~leuko.data.preprocess.smear_stats`
  of the cell-centred view, the statistics ``smear-norm`` undoes) - six
  numbers that say which lab's stain and camera made the image, whatever cell
  is in it. Their Mahalanobis distance to the home lab's training images,
  against its quantile on the validation split, is the :class:`SmearGate`.
* the home network's own **energy check** (:mod:`leuko.infer.review`): an
  image the home network calls unlike its training data (another framing or
  magnification under a similar stain) goes to the robust network too.

Only an image inside both envelopes is answered by the home network; anything
else by the robust one, so a new lab costs nothing against the robust network
alone, and the home lab loses only the images its own checks doubt. The
decision never looks at other images (a single upload is answered as it
would be in a folder of thousands) and never at labels.

Layout: a routed run folder is the robust run's record (config, split, classes;
its held-out split is the routed run's) plus

* ``model.pt``: the robust network, its metadata extended by ``route``
  (the gate and a summary of the home network);
* ``home.pt``: the home network (the home run's ``model.pt``);
* ``route.json``: what was combined, from where, and how the gate was chosen.

``load_predictor(RUN)`` returns a :class:`RoutedPredictor`; ``RUN/model.pt``
and ``RUN/home.pt`` still name each network alone (for ``explain``,
``export`` and ``adapt``, which work on one network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from leuko.data.preprocess import Preprocess, build_preprocess, decode_sample, smear_stats
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer.backends import BasePredictor, Prediction, array_loader, iter_batches, sample_loader
from leuko.infer.review import DEFAULT_OOD_QUANTILE

__all__ = ["HOME_FILE", "ROUTE_FILE", "RoutedPredictor", "SmearGate", "SmearView", "is_routed", "route_reasons"]

from leuko.runs import HOME_FILE, ROUTE_FILE

_VIEW_SIZE = 128
_VIEW_SHARE = 0.7


def is_routed(path: str | Path) -> bool:
    """Whether ``path`` is a routed run folder (it holds ``route.json``)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ROUTE_FILE).is_file()


class SmearView:
    """Image -> the six smear-colour numbers the gate compares (duck-types :class:`ModelInput` for the loaders).

    The cell-centred view (``cell-crop`` at a fixed share, as ``pbc-robust``
    sees it) puts the smear in the same place for every source's framing; its
    CIELAB mean and spread of L, a, b outside the cell and any nucleus
    (:func:`~leuko.data.preprocess.smear_stats`) describe the lab, not the cell.
    """

    shape: tuple[int, ...] = (6,)

    def __init__(self) -> None:
        self.preprocess: Preprocess = build_preprocess(_VIEW_SIZE, [f"cell-crop:{_VIEW_SHARE}"])

    def _write(self, view: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        d = np.asarray(smear_stats(view, _VIEW_SHARE), dtype=np.float32)
        if out is None:
            return d
        out[:] = d
        return out

    def from_sample(self, sample: Sample, out: np.ndarray | None = None) -> np.ndarray:
        return self._write(decode_sample(sample, self.preprocess), out)

    def from_array(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._write(self.preprocess(image), out)

    def describe(self, load: Callable[[int, np.ndarray], "str | None"], n: int, *, workers: int | None = None
                 ) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """``(descriptors, failed)``: an ``n x 6`` array (NaN rows where an item could not be read) and why."""
        out = np.full((n, 6), np.nan, dtype=np.float64)
        failed: list[tuple[int, str]] = []
        for batch in iter_batches(n, load, self.shape, batch_size=64, workers=workers):
            out[batch.rows] = batch.x
            failed.extend(batch.failed)
        return out, failed


@dataclass(frozen=True)
class SmearGate:
    """The home lab's smear colour: a Gaussian over :class:`SmearView` descriptors and a distance threshold.

    Attributes:
        mean, inv_cov: of the home lab's training images' descriptors.
        threshold: the Mahalanobis distance above which an image's smear is not
            the home lab's (its ``quantile`` on the validation split).
        chosen_on: where the threshold came from.
    """

    mean: tuple[float, ...]
    inv_cov: tuple[tuple[float, ...], ...]
    threshold: float
    quantile: float
    chosen_on: str

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, *, quantile: float = DEFAULT_OOD_QUANTILE,
            chosen_on: str = "the validation split") -> "SmearGate":
        """Fit on home-lab descriptors: Gaussian on ``train``, threshold at ``quantile`` of ``val``'s distances."""
        if not 0.5 <= quantile < 1.0:
            raise LeukoError(f"the gate's quantile must be in [0.5, 1); got {quantile}")
        train, val = np.asarray(train, np.float64), np.asarray(val, np.float64)
        train, val = train[np.isfinite(train).all(1)], val[np.isfinite(val).all(1)]
        if len(train) < 20 or len(val) < 10:
            raise LeukoError(f"the smear gate needs at least 20 training and 10 validation images; got {len(train)} and {len(val)}")
        mean = train.mean(0)
        # a small ridge keeps a channel that never varies (a synthetic set) from making the covariance singular
        cov = np.cov(train.T) + 1e-3 * np.eye(train.shape[1])
        inv = np.linalg.inv(cov)
        gate = cls(tuple(map(float, mean)), tuple(tuple(map(float, r)) for r in inv), 0.0, float(quantile), "")
        d = gate.distance(val)
        return cls(gate.mean, gate.inv_cov, float(np.quantile(d, quantile)), float(quantile),
                   f"{chosen_on} ({len(val)} images; distance at its {quantile:.0%} quantile)")

    def distance(self, desc: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each descriptor row to the home lab (``inf`` for a NaN row)."""
        x = np.asarray(desc, np.float64) - np.asarray(self.mean)
        d = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, np.asarray(self.inv_cov), x), 0.0))
        return np.where(np.isfinite(d), d, np.inf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SmearGate":
        try:
            return cls(tuple(raw["mean"]), tuple(tuple(r) for r in raw["inv_cov"]), float(raw["threshold"]),
                       float(raw["quantile"]), str(raw["chosen_on"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LeukoError(f"the routed run's gate is incomplete or invalid ({exc!r})") from None


def route_reasons(far: np.ndarray, unlike: np.ndarray, distance: np.ndarray, gate: SmearGate) -> list[str]:
    """Per image, why the robust network answered (``""``: the home network did)."""
    out = []
    for f, u, d in zip(far, unlike, distance):
        why = []
        if f:
            why.append(f"smear colour unlike the home lab's (distance {d:.1f} > {gate.threshold:.1f})")
        if u:
            why.append("the home network calls it unlike its training data")
        out.append("; ".join(why))
    return out


class RoutedPredictor(BasePredictor):
    """Two networks of one run and the per-image choice between them (see the module docstring).

    Has the interface of the single-network predictors (``classes``, ``meta``,
    ``input``, ``temperature``, ``model_input``, ``predict_*``); ``meta``,
    ``input``, ``temperature`` and ``model_input`` are the robust network's.
    Each :class:`Prediction` row comes from one network, named in
    ``answered_by``, and is reviewed by that network's own policy
    (:meth:`review_checks`).

    Args:
        run: the routed run folder.
        kwargs: ``device``, ``batch_size``, ``temperature`` (applied to both),
            ``num_workers``.
    """

    backend = "pytorch, routed"

    def __init__(self, run: str | Path, **kwargs: Any) -> None:
        from leuko.infer.predictor import Predictor

        path = Path(run).expanduser()
        self.robust = Predictor(path / "model.pt", **kwargs)
        self.home = Predictor(path / HOME_FILE, **kwargs)
        super().__init__(self.robust.meta, batch_size=self.robust.batch_size, temperature=self.robust.temperature,
                         num_workers=self.robust.num_workers)
        raw = self.meta.get("route")
        if not raw:
            raise LeukoError(f"{path / 'model.pt'} has no route: {path} is not a routed run (rebuild it with leuko route)")
        if self.home.classes != self.robust.classes:
            raise LeukoError(f"the routed run's networks disagree on the classes: {self.home.classes} vs {self.robust.classes}")
        self.gate = SmearGate.from_dict(raw["gate"])
        self.use_energy = bool(raw.get("energy", True))
        self.view = SmearView()

    # ------------------------------------------------------------------ routing
    def _route(self, keys: Sequence[str], describe_load: Callable,
               member_predict: Callable[[BasePredictor, list[int]], Prediction]) -> Prediction:
        """Describe every item, ask the home network about those in its colour envelope, the robust one the rest.

        Rows follow ``keys`` (which must be unique); an item either lands in
        one network's answer or in ``failed``, once.
        """
        n = len(keys)
        if len(set(keys)) != n:
            raise LeukoError("a routed run needs a distinct key (file name) for every image")
        desc, failed_desc = self.view.describe(describe_load, n, workers=self.num_workers)
        distance = self.gate.distance(desc)
        unreadable = {i for i, _ in failed_desc}
        near = [i for i in range(n) if i not in unreadable and distance[i] <= self.gate.threshold]
        ph = member_predict(self.home, near)
        home_row = {k: j for j, k in enumerate(ph.keys)}
        unlike = np.zeros(n, bool)
        if self.use_energy and ph.keys:
            u = self.home.review_checks(ph)[1]
            for i in near:
                unlike[i] = keys[i] in home_row and bool(u[home_row[keys[i]]])
        unreadable |= {i for i in near if keys[i] not in home_row}
        answered = {i: ("home", home_row[keys[i]]) for i in near if keys[i] in home_row and not unlike[i]}
        rest = [i for i in range(n) if i not in unreadable and i not in answered]
        pr = member_predict(self.robust, rest)
        robust_row = {k: j for j, k in enumerate(pr.keys)}
        answered.update({i: ("robust", robust_row[keys[i]]) for i in rest if keys[i] in robust_row})
        why = route_reasons(distance > self.gate.threshold, unlike, distance, self.gate)
        rows = sorted(answered)
        source = {"home": ph, "robust": pr}
        c = len(self.classes)
        return Prediction(
            [keys[i] for i in rows],
            np.asarray([source[answered[i][0]].logits[answered[i][1]] for i in rows], np.float32).reshape(len(rows), c),
            np.asarray([source[answered[i][0]].probs[answered[i][1]] for i in rows], np.float64).reshape(len(rows), c),
            self.classes,
            [(keys[i], r) for i, r in failed_desc] + list(ph.failed) + list(pr.failed),
            answered_by=[answered[i][0] for i in rows],
            route_reasons=[why[i] if answered[i][0] == "robust" else "" for i in rows],
        )

    def predict_samples(self, samples: Sequence[Sample], *, tta: bool = False) -> Prediction:
        samples = list(samples)
        keys = [s.key for s in samples]
        return self._route(keys, sample_loader(samples, self.view),  # type: ignore[arg-type]
                           lambda p, idx: p.predict_samples([samples[i] for i in idx], tta=tta))

    def predict_arrays(self, images: Sequence[np.ndarray], keys: Sequence[str] | None = None, *, tta: bool = False
                       ) -> Prediction:
        images = list(images)
        names = [str(i) for i in range(len(images))] if keys is None else [str(k) for k in keys]
        if len(names) != len(images):
            raise LeukoError(f"got {len(images)} images but {len(names)} keys")
        return self._route(names, array_loader(images, self.view),  # type: ignore[arg-type]
                           lambda p, idx: p.predict_arrays([images[i] for i in idx], [names[i] for i in idx], tta=tta))

    # ------------------------------------------------------------------ review
    def review_checks(self, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
        """Each row reviewed by the policy of the network that answered it."""
        low = np.zeros(len(pred.keys), bool)
        unlike = np.zeros(len(pred.keys), bool)
        by = np.asarray(pred.answered_by or ["robust"] * len(pred.keys))
        for name, member in (("home", self.home), ("robust", self.robust)):
            m = by == name
            if m.any():
                sub = Prediction([k for k, t in zip(pred.keys, m) if t], pred.logits[m], pred.probs[m], pred.classes)
                low[m], unlike[m] = member.review_checks(sub)
        return low, unlike

    def review_reasons(self, pred: Prediction) -> list[list[str]]:
        by = pred.answered_by or ["robust"] * len(pred.keys)
        out: list[list[str]] = [[] for _ in pred.keys]
        for name, member in (("home", self.home), ("robust", self.robust)):
            idx = [i for i, b in enumerate(by) if b == name]
            if idx:
                sub = Prediction([pred.keys[i] for i in idx], pred.logits[idx], pred.probs[idx], pred.classes)
                for i, why in zip(idx, member.review_reasons(sub)):
                    out[i] = why
        return out

    def describe_review(self) -> str:
        return f"per network: home: {self.home.describe_review()}; robust: {self.robust.describe_review()}"

    def describe(self) -> str:
        return (f"routed: home [{self.home.describe()}] where the smear colour is within {self.gate.threshold:.1f} of "
                f"the home lab's{' and the home network knows the image' if self.use_energy else ''}, "
                f"else robust [{self.robust.describe()}]")
