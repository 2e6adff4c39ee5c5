"""A routed run: the home-lab network answers images that look like its lab, the robust network the rest.

A network trained for one lab's look (``pbc-best``: 99%+ on held-out PBC, under
50% on BCCD) and one trained to ignore that look (``pbc-robust``: ~97.5% on
PBC, ~82% on BCCD) each win where the other loses. A routed run holds both and
decides per image, from the image alone, which one answers:

* the **smear**: the CIELAB mean and spread of the red cells and background
  around the white cell (:func:`~leuko.data.preprocess.smear_stats` of the
  cell-centred view, the statistics ``smear-norm`` undoes), which say which
  lab's stain and camera made the image whatever cell is in it, and the red
  cells' diameter as a share of the frame, which says its magnification and
  framing. Their Mahalanobis distance to the home lab's training images,
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
and ``RUN/home.pt`` still name each network alone (for ``explain`` and
``export``, which work on one network).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from leuko.data.preprocess import Preprocess, build_preprocess, decode_raw, smear_stats
from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer.backends import BasePredictor, Prediction, array_loader, iter_batches, sample_loader
from leuko.infer.review import DEFAULT_OOD_QUANTILE
from leuko.run.card import HOME_FILE, ROUTE_FILE, ModelKind
from leuko.run.folder import is_routed

__all__ = ["HOME_FILE", "ROUTE_FILE", "RoutedPredictor", "SmearGate", "SmearView", "describe_route", "is_routed",
           "lab_magnification", "route_summary"]

_VIEW_SIZE = 128
_VIEW_SHARE = 0.7


class SmearView:
    """Image -> the numbers the gate compares: six of smear colour and one of magnification.

    Duck-types :class:`~leuko.infer.backends.ModelInput` for the loaders. The
    cell-centred view (``cell-crop`` at a fixed share, as ``pbc-robust`` sees
    it) puts the smear in the same place for every source's framing; its CIELAB
    mean and spread of L, a, b outside the cell and any nucleus
    (:func:`~leuko.data.preprocess.smear_stats`) describe the lab's stain and
    camera, not the cell. The seventh number is the log of the red cells'
    diameter (:func:`~leuko.data.preprocess.red_cell_diameter`) as a share of
    the decoded frame: the home lab's magnification and framing, which colour
    alone cannot tell (NaN where no red cells could be measured).
    """

    shape: tuple[int, ...] = (7,)

    def __init__(self) -> None:
        self.preprocess: Preprocess = build_preprocess(_VIEW_SIZE, [f"cell-crop:{_VIEW_SHARE}"])

    def _describe(self, raw: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        res = self.preprocess.run(raw, measure_ruler=True)
        ruler = np.log(res.ruler / self.preprocess.decode_size) if res.ruler else np.nan
        d = np.array([*smear_stats(res.image, _VIEW_SHARE), ruler], dtype=np.float32)
        if out is None:
            return d
        out[:] = d
        return out

    def from_sample(self, sample: Sample, out: np.ndarray | None = None) -> np.ndarray:
        return self._describe(decode_raw(sample, self.preprocess), out)

    def from_array(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._describe(image, out)

    def describe(self, load: Callable[[int, np.ndarray], "str | None"], n: int, *, workers: int | None = None
                 ) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """``(descriptors, failed)``: an ``n x 7`` array (NaN rows where an item could not be read) and why."""
        out = np.full((n, *self.shape), np.nan, dtype=np.float64)
        failed: list[tuple[int, str]] = []
        for batch in iter_batches(n, load, self.shape, batch_size=64, workers=workers):  # type: ignore[arg-type]
            out[batch.rows] = batch.x
            failed.extend(batch.failed)
        return out, failed


_COLOUR = slice(0, 6)
_RULER = 6

LAB_SIZE_TOLERANCE = 0.15
"""A batch whose median red-cell size is off the home lab's by more than this share is another magnification."""
MIN_MEASURED = 20


def lab_magnification(red_cell_ratio: np.ndarray | None) -> dict[str, Any] | None:
    """The magnification check of a batch of one lab's images (a routed run's ``red_cell_ratio``).

    One image's red cells measure its magnification to about +-20% (cells
    differ, the ruler errs), too loosely for the per-image gate to catch a
    modest change of objective or camera; their median over a lab's images is
    exact enough. ``None`` when fewer than :data:`MIN_MEASURED` were measured.
    """
    if red_cell_ratio is None:
        return None
    r = np.asarray(red_cell_ratio, np.float64)
    r = r[np.isfinite(r)]
    if len(r) < MIN_MEASURED:
        return None
    median = float(np.median(r))
    off = abs(np.log(median)) > np.log1p(LAB_SIZE_TOLERANCE)
    return {
        "median_ratio": median,
        "n_measured": int(len(r)),
        "warning": (f"red cells are {median:.2f}x the home lab's size (median of {len(r)}): another magnification or "
                    f"framing, which the per-image gate cannot see; the home network's answers may not hold here, "
                    f"and the run's model.pt (its robust network alone) is the safer choice") if off else None,
    }


def _mahalanobis(x: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray) -> np.ndarray:
    z = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, inv_cov, z), 0.0))


def _inverse_covariance(x: np.ndarray) -> np.ndarray:
    # a small ridge keeps a number that never varies (a synthetic set) from making the covariance singular
    return np.linalg.inv(np.cov(x.T) + 1e-3 * np.eye(x.shape[1]))


@dataclass(frozen=True)
class SmearGate:
    """The home lab's look: where its smear colours and its red-cell sizes end.

    Two tests, each at the ``quantile`` of the home lab's validation split, and
    an image outside either is not from the home lab:

    * colour: the Mahalanobis distance of the six colour numbers to a Gaussian
      of the training images';
    * magnification: how many standard deviations the log red-cell share lies
      from the training images' mean (only where red cells were measured, and
      only when the home lab's images show enough of them: a home lab of tight
      crops gets a colour-only gate, and ``chosen_on`` says so).

    Kept apart rather than pooled into one seven-number distance: the colour
    numbers are heavy-tailed, and a pooled threshold set by them would widen
    the size test too. Even apart, one image's ruler is noisy (about +-20%), so
    this catches gross changes of magnification only; a batch's median does
    better (:func:`lab_magnification`).

    Attributes:
        mean: of the seven numbers over the training images (the last ``NaN``
            for a colour-only gate).
        colour_inv_cov, colour_threshold: the colour test.
        ruler_sd, ruler_threshold: the magnification test (``None``: colour-only).
    """

    mean: tuple[float, ...]
    colour_inv_cov: tuple[tuple[float, ...], ...]
    colour_threshold: float
    ruler_sd: float | None
    ruler_threshold: float | None
    quantile: float
    chosen_on: str

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, *, quantile: float = DEFAULT_OOD_QUANTILE,
            chosen_on: str = "the validation split") -> "SmearGate":
        """Fit on home-lab descriptors: statistics of ``train``, thresholds at ``quantile`` of ``val``'s."""
        if not 0.5 <= quantile < 1.0:
            raise LeukoError(f"the gate's quantile must be in [0.5, 1); got {quantile}")
        train, val = np.asarray(train, np.float64), np.asarray(val, np.float64)
        colour = lambda x: x[np.isfinite(x[:, _COLOUR]).all(1)][:, _COLOUR]  # noqa: E731
        ruler = lambda x: x[np.isfinite(x[:, _RULER]), _RULER]  # noqa: E731
        if len(colour(train)) < 20 or len(colour(val)) < 10:
            raise LeukoError(f"the gate needs at least 20 training and 10 validation images; got {len(colour(train))} "
                             f"and {len(colour(val))} readable ones")
        mean = np.append(colour(train).mean(0), np.nan)
        colour_inv = _inverse_covariance(colour(train))
        colour_threshold = float(np.quantile(_mahalanobis(colour(val), mean[_COLOUR], colour_inv), quantile))
        sd = threshold = None
        what = f"{chosen_on} ({len(val)} images; each test at its {quantile:.0%} quantile)"
        if len(ruler(train)) >= 20 and len(ruler(val)) >= 10:
            mean[_RULER] = ruler(train).mean()
            sd = float(max(ruler(train).std(), 1e-3))
            threshold = float(np.quantile(np.abs(ruler(val) - mean[_RULER]) / sd, quantile))
        else:
            what += "; colour only: too few images with red cells to measure"
        return cls(tuple(map(float, mean)), tuple(tuple(map(float, r)) for r in colour_inv), colour_threshold,
                   sd, threshold, float(quantile), what)

    @property
    def measures_magnification(self) -> bool:
        """Whether the gate has a red-cell-size test (see :meth:`fit`)."""
        return self.ruler_sd is not None

    def describe(self) -> str:
        """One line: what the gate compares and where its limits came from."""
        text = f"smear colour within Mahalanobis distance {self.colour_threshold:.2f} of the home lab's"
        if self.measures_magnification:
            lo, hi = self.ruler_range()
            text += f", red cells {lo:.2f}-{hi:.2f}x its typical size (where measured)"
        return f"{text}; chosen on {self.chosen_on}"

    def ruler_range(self) -> tuple[float, float]:
        """The red-cell sizes the home lab accepts, relative to its mean (e.g. ``(0.75, 1.33)``)."""
        if self.ruler_sd is None or self.ruler_threshold is None:
            return (0.0, float("inf"))
        k = self.ruler_sd * self.ruler_threshold
        return (float(np.exp(-k)), float(np.exp(k)))

    def scores(self, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per descriptor row: ``(colour score, magnification score, red-cell size ratio)``.

        A score is the test's statistic over its threshold (> 1: not the home
        lab; colour ``inf`` for an unreadable row); the magnification score is
        0 and the ratio NaN where no red cells were measured or the gate is colour-only.
        """
        x = np.asarray(desc, np.float64).reshape(-1, len(self.mean))
        mean = np.asarray(self.mean)
        colour = np.full(len(x), np.inf)
        ok = np.isfinite(x[:, _COLOUR]).all(1)
        colour[ok] = _mahalanobis(x[ok][:, _COLOUR], mean[_COLOUR], np.asarray(self.colour_inv_cov)) / self.colour_threshold
        mag = np.zeros(len(x))
        ratio = np.full(len(x), np.nan)
        if self.measures_magnification:
            known = np.isfinite(x[:, _RULER])
            delta = x[known, _RULER] - mean[_RULER]
            mag[known] = np.abs(delta) / float(self.ruler_sd) / float(self.ruler_threshold)  # type: ignore[arg-type]
            ratio[known] = np.exp(delta)
        return colour, mag, ratio

    def score(self, desc: np.ndarray) -> np.ndarray:
        """Per descriptor row, the larger of the two test scores (> 1: not the home lab)."""
        colour, mag, _ = self.scores(desc)
        return np.maximum(colour, mag)

    @staticmethod
    def reasons(scores: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[str]:
        """Per row of :meth:`scores`, why it is not the home lab's (``""``: it may be)."""
        colour, mag, ratio = scores
        out = []
        for c, m, r in zip(colour, mag, ratio):
            why = []
            if c > 1:
                why.append(f"smear colour unlike the home lab's ({c:.1f}x the limit)")
            if m > 1:
                why.append(f"red cells {r:.2f}x the home lab's size (another magnification or framing)")
            out.append("; ".join(why))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a colour-only gate's unknown red-cell mean is ``None``)."""
        raw = asdict(self)
        raw["mean"] = [v if np.isfinite(v) else None for v in self.mean]
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SmearGate":
        try:
            opt = lambda v: None if v is None else float(v)  # noqa: E731
            return cls(tuple(np.nan if v is None else float(v) for v in raw["mean"]),
                       tuple(tuple(float(v) for v in r) for r in raw["colour_inv_cov"]), float(raw["colour_threshold"]),
                       opt(raw["ruler_sd"]), opt(raw["ruler_threshold"]), float(raw["quantile"]), str(raw["chosen_on"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LeukoError(f"the routed run's gate is incomplete or invalid ({exc!r})") from None


class RoutedPredictor(BasePredictor):
    """Two networks of one run and the per-image choice between them (see the module docstring).

    Has the interface of the single-network predictors (``classes``, ``card``,
    ``input``, ``temperature``, ``model_input``, ``predict_*``); ``card`` (of
    kind ``routed``), ``input``, ``temperature`` and ``model_input`` are the
    robust network's.
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
        super().__init__(self.robust.card.with_(kind=ModelKind.ROUTED), batch_size=self.robust.batch_size,
                         temperature=self.robust.temperature, num_workers=self.robust.num_workers)
        raw = self.card.route
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
        scores = self.gate.scores(desc)
        score = np.maximum(scores[0], scores[1])
        unreadable = {i for i, _ in failed_desc}
        near = [i for i in range(n) if i not in unreadable and score[i] <= 1.0]
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
        gate_why = self.gate.reasons(scores)
        why = ["; ".join(w for w in (gate_why[i], "the home network calls it unlike its training data" if unlike[i] else "") if w)
               for i in range(n)]
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
            red_cell_ratio=scores[2][rows],
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

    @property
    def array_size(self) -> None:
        """Images at their own size: the gate's view and each network resize them their own way."""
        return None

    # ------------------------------------------------------------------ review
    def _by_network(self, pred: Prediction) -> list[tuple[BasePredictor, np.ndarray, Prediction]]:
        """``(network, row indices, those rows)`` for each network that answered rows of ``pred``."""
        by = np.asarray(pred.answered_by or ["robust"] * len(pred.keys))
        out = []
        for name, member in (("home", self.home), ("robust", self.robust)):
            idx = np.flatnonzero(by == name)
            if len(idx):
                out.append((member, idx, Prediction([pred.keys[i] for i in idx], pred.logits[idx], pred.probs[idx], pred.classes)))
        return out

    def review_checks(self, pred: Prediction) -> tuple[np.ndarray, np.ndarray]:
        """Each row reviewed by the policy of the network that answered it."""
        low = np.zeros(len(pred.keys), bool)
        unlike = np.zeros(len(pred.keys), bool)
        for member, idx, sub in self._by_network(pred):
            low[idx], unlike[idx] = member.review_checks(sub)
        return low, unlike

    def review_reasons(self, pred: Prediction) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in pred.keys]
        for member, idx, sub in self._by_network(pred):
            for i, why in zip(idx, member.review_reasons(sub)):
                out[i] = why
        return out

    def describe_review(self) -> str:
        return f"per network: home: {self.home.describe_review()}; robust: {self.robust.describe_review()}"

    def describe(self) -> str:
        return (f"routed: home [{self.home.describe()}] where the smear's colour and red-cell size are the home lab's"
                f"{' and the home network knows the image' if self.use_energy else ''}, else robust [{self.robust.describe()}]")


def route_summary(answered_by: Sequence[str], correct: np.ndarray, red_cell_ratio: np.ndarray | None = None) -> dict[str, Any]:
    """A routed run (:mod:`leuko.infer.route`): per network, the share of images it answered and its accuracy
    there; and the batch's magnification check (:func:`~leuko.infer.route.lab_magnification`)."""
    by = np.asarray(answered_by)
    correct = np.asarray(correct, bool)
    out: dict[str, Any] = {}
    for name in ("home", "robust"):
        m = by == name
        out[name] = {"n": int(m.sum()), "share": float(m.mean()) if len(by) else 0.0,
                     "accuracy": float(correct[m].mean()) if m.any() else None}
    out["magnification"] = lab_magnification(red_cell_ratio)
    return out


def describe_route(route: dict[str, Any]) -> str:
    """:func:`route_summary` in one line: ``home network answered 97.5% (99.14% correct); robust network ...``."""
    return "; ".join(
        f"{name} network answered {route[name]['share']:.1%}"
        + ("" if route[name]["accuracy"] is None else f" ({route[name]['accuracy']:.2%} correct)")
        for name in ("home", "robust"))
