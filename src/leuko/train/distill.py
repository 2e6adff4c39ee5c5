"""Knowledge distillation: a student that learns a teacher run's answers as well as the labels.

Why: a run tuned for one lab (``pbc-best``: the frame centre at 144 px, light
augmentation, 99.3% on held-out PBC) reads that lab's cells better than a run
built to survive other labs (``pbc-robust``: a cell-centred crop at 128 px,
strong stain augmentation, ImageNet's BatchNorm statistics, 97%). The robust
run's input is what lets it transfer, so it cannot simply take the expert's.
Distillation (Hinton et al. 2015, "Distilling the knowledge in a neural
network") lets it learn the expert's answers instead: the teacher predicts
every *training* image once, through its **own** input pipeline
(preprocessing, size, test-time augmentation), and the student is trained,
on its own harder input, towards

    (1 - w) * cross_entropy(labels) + w * T^2 * KL(teacher_T || student_T)

where ``_T`` are softmaxes at temperature ``T``: the teacher's soft answers
say which wrong class an image resembles (an immature granulocyte that looks
half like a neutrophil), which a one-hot label does not.

Leakage: the teacher's answers on the student's training images carry what
the teacher learnt from *its* training images. If those include the
student's held-out images, the student's test score is no longer honest, so
:func:`check_teacher` refuses a teacher that trained or validated on any of
them (the same check ``leuko route`` makes of its home run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from leuko.data.samples import Sample
from leuko.errors import LeukoError
from leuko.infer import Predictor
from leuko.run.calibration import softmax
from leuko.run.data import PreparedData
from leuko.run.folder import RunFolder

__all__ = ["check_teacher", "distill_loss", "heldout_seen_by", "teacher_targets"]


def heldout_seen_by(teacher: RunFolder, data: PreparedData) -> list[str]:
    """Keys of ``data``'s held-out (test) images that ``teacher`` trained or validated on.

    Runs record their split by keys relative to the dataset root
    (``split.json``), so two runs on copies of one dataset in different
    folders still compare.
    """
    seen = teacher.read_json("split.json").get("assignments", {}) if teacher.split.is_file() else {}
    return [s.key for s in data.test if seen.get(s.relkey(data.index.root)) in ("train", "val")]


def check_teacher(teacher_dir: str | Path, data: PreparedData) -> RunFolder:
    """The teacher's run folder, after checking it can teach this student honestly.

    Raises:
        LeukoError: no finished run there, its classes are not the student's,
            or it trained or validated on the student's held-out images.
    """
    try:
        teacher = RunFolder.open(teacher_dir)
    except LeukoError as exc:
        raise LeukoError(f"train.distill_from: {exc}") from None
    if not teacher.model.is_file():
        raise LeukoError(f"train.distill_from: {teacher.path} has no model.pt (the teacher run has not finished)")
    classes = teacher.read_json("classes.json")
    if sorted(classes) != sorted(data.classes):
        raise LeukoError(
            f"train.distill_from: the teacher's classes ({', '.join(classes)}) are not this run's ({', '.join(data.classes)})"
        )
    leaked = heldout_seen_by(teacher, data)
    if leaked:
        raise LeukoError(
            f"train.distill_from: the teacher trained or validated on {len(leaked)} of this run's held-out images "
            f"(e.g. {leaked[0]}); use a teacher trained on the same split (data.split, train.seed)"
        )
    return teacher


def teacher_targets(
    teacher: RunFolder,
    samples: Sequence[Sample],
    classes: Sequence[str],
    temperature: float,
    *,
    tta: bool = True,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> np.ndarray:
    """The teacher's soft answers, ``softmax(logits / temperature)``, one row per sample in ``classes`` order.

    The teacher reads each image through its own preprocessing and size (its
    ``model.pt`` says which), averaged over the flips and rotations of
    test-time augmentation by default: the answers are computed once, so the
    eight views cost one pass over the training set. ``device``: where the
    teacher runs (``None``: the GPU when there is one).
    """
    predictor = Predictor(teacher.path, device=device)
    if sorted(predictor.classes) != sorted(classes):
        raise LeukoError(f"train.distill_from: the teacher's classes ({', '.join(predictor.classes)}) are not this run's")
    echo(f"distillation: {teacher.path} answers {len(samples)} training images ({predictor.describe()}{', TTA' if tta else ''})")
    pred = predictor.predict_samples(samples, tta=tta)
    if pred.failed:
        raise LeukoError(f"train.distill_from: the teacher could not read {len(pred.failed)} training images (e.g. {pred.failed[0][0]})")
    row = {k: i for i, k in enumerate(pred.keys)}
    logits = pred.logits[[row[s.key] for s in samples]][:, [predictor.classes.index(c) for c in classes]]
    return softmax(logits, temperature).astype(np.float32)


def distill_loss(logits: torch.Tensor, soft: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(soft || softmax(logits / T))``, batch mean (the ``T^2`` keeps gradients comparable across ``T``)."""
    log_student = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(log_student, soft, reduction="batchmean") * temperature**2
