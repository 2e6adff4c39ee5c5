"""Image embeddings from a pretrained backbone: the ``embed`` function audits take.

The data layer's near-duplicate audit cannot import models, so the caller
(the CLI, a notebook) builds the embedder here and passes it in.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

EmbedFn = Callable[[list[np.ndarray]], np.ndarray]


def make_embedder(name: str = "efficientnet_lite0", pretrained: str = "bundled", batch_size: int = 64) -> EmbedFn:
    """``embed(list of HxWx3 uint8) -> (n, d) float32`` pooled features, L2-normalised.

    The default (bundled EfficientNet-Lite0 ImageNet weights) works offline.
    """
    from leuko.models import build_model

    model = build_model(name, num_classes=0, pretrained=pretrained).eval()
    model.to(memory_format=torch.channels_last)
    info = model.leuko_info
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(images: list[np.ndarray]) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255.0
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            f = model(x).float()
            out.append(torch.nn.functional.normalize(f, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), dtype=np.float32)

    return embed
