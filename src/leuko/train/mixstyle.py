"""MixStyle: mix the feature statistics of two training cells in the network's early stages.

Why (issue 29): a network trained on two or three labs learns each lab's stain and optics as
much as the cells, and a lab it has not seen looks like none of them. In a CNN's early
layers a cell's "style" (stain, exposure, camera) lives largely in each channel's mean
and standard deviation over the image, its content in the normalised map (the premise of
instance normalisation and style transfer). MixStyle (Zhou et al., "Domain
Generalization with MixStyle", ICLR 2021; arXiv 2104.02008) replaces, with probability
``p`` per batch, every sample's channel statistics after an early stage by a random
convex mix of its own and another sample's, ``lam ~ Beta(alpha, alpha)``: the same cell
in styles between the labs of the batch, which the ``sources`` sampler fills with cells
of every lab. It is a training-time step only: eval mode is the identity, nothing is
added to the state dict, and the saved network is the plain one (ONNX, evaluate, serve
unchanged). The mixing stops gradients through the statistics, as in the paper.

Stages: the first ``stages`` stages of the backbone (``blocks`` of timm's
EfficientNet/MobileNet, ``stages`` of leuko's compact CNN, ``layer1..4`` of a ResNet).
The paper mixes after the first two or three of a ResNet's four; deeper layers carry
the class, and mixing there blurs it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leuko.errors import LeukoError


class MixStyle(nn.Module):
    """Per-sample channel mean/std mixed with a shuffled partner's (training mode only).

    Args:
        p: probability that a batch is mixed at each stage.
        alpha: Beta(alpha, alpha) of the mixing weight (0.1: mostly close to one of the two).
        eps: added to the variance before the square root.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0 or alpha <= 0.0:
            raise ValueError(f"MixStyle needs 0 <= p <= 1 and alpha > 0, got p={p}, alpha={alpha}")
        self.p, self.alpha, self.eps = p, alpha, eps
        self._beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))

    def extra_repr(self) -> str:
        return f"p={self.p}, alpha={self.alpha}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.size(0) < 2:
            return x
        if x.dim() != 4:
            raise LeukoError(f"train.mixstyle mixes convolutional feature maps (N, C, H, W); this stage gives {x.dim()}-d outputs")
        if torch.rand(()) >= self.p:
            return x
        b = x.size(0)
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        normed = (x - mu) / sig
        lam = self._beta.sample((b, 1, 1, 1)).to(x.device, x.dtype)
        perm = torch.randperm(b, device=x.device)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sig_mix = lam * sig + (1 - lam) * sig[perm]
        return normed * sig_mix + mu_mix

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook: the stage's output, mixed."""
        return self(output)


def style_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone's stages in order, where MixStyle can go; a clear error for a model without them."""
    for name in ("blocks", "stages"):
        seq = getattr(model, name, None)
        if isinstance(seq, nn.Sequential) and len(seq) > 1:
            return list(seq)
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in layers):
        return layers  # type: ignore[return-value]
    raise LeukoError(f"train.mixstyle needs a backbone with stages (timm's blocks, stages, or a ResNet's layer1-4); "
                     f"{type(model).__name__} has none")


def attach_mixstyle(model: nn.Module, p: float, alpha: float, stages: int) -> tuple[MixStyle, list[Any]]:
    """Hook one :class:`MixStyle` after each of the first ``stages`` stages of ``model``.

    Returns the module (register it as a submodule of the training module so that ``train()``
    and ``eval()`` reach it) and the hook handles (``.remove()`` each to detach).
    """
    found = style_stages(model)
    if not 1 <= stages < len(found):
        raise LeukoError(f"train.mixstyle_stages={stages}: {type(model).__name__} has {len(found)} stages; "
                         f"mix after 1 to {len(found) - 1} of them (never the last, which carries the class)")
    mix = MixStyle(p, alpha)
    handles = [stage.register_forward_hook(mix.hook) for stage in found[:stages]]
    return mix, handles
