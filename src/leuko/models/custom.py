"""A compact CNN for training from scratch on a CPU.

Why it exists: the studies this project reproduces compare transfer learning
with a small network trained from random weights. Blood-cell crops are small
(a cell fills most of a 128 px image), so a few conv-BN-ReLU stages with
global average pooling are enough to be a fair baseline, and at ~1.2 M
parameters / ~0.17 GMACs per 128 px image an epoch on a laptop CPU takes
minutes, not hours.

The class deliberately speaks timm's model interface (``num_features``,
``forward_features``, ``forward_head``, ``reset_classifier``,
``get_classifier``, ``group_matcher``, ``pretrained_cfg``) so that heads,
freezing and embeddings treat it exactly like the timm backbones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CompactCNN", "ConvBnAct"]


class ConvBnAct(nn.Sequential):
    """3x3 convolution (no bias: BN follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)


class CompactCNN(nn.Module):
    """Stem + stages of conv-BN-ReLU, then global average pooling and a linear classifier.

    Layout for the default ``widths=(32, 64, 128, 256)``, ``depths=(1, 2, 2, 2)``
    at 128 px: stem 3->32 /2 (64 px), then three stages, each one stride-2
    conv followed by ``depth - 1`` stride-1 convs: 32->64 (32 px),
    64->128 (16 px), 128->256 (8 px). Output stride 16 keeps an 8x8 map at
    128 px, enough spatial detail for Grad-CAM to be readable.

    Args:
        num_classes: classifier outputs; 0 gives pooled ``num_features`` features.
        in_chans: input channels.
        widths: channels of the stem and of each stage.
        depths: number of convs in the stem (must be 1) and in each stage.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (1, 2, 2, 2),
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or len(widths) < 2 or depths[0] != 1 or min(depths) < 1:
            raise ValueError("widths/depths must have equal length >= 2, depths[0] == 1, all depths >= 1")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = ConvBnAct(in_chans, widths[0], stride=2)
        stages: list[nn.Module] = []
        prev = widths[0]
        for width, depth in zip(widths[1:], depths[1:]):
            layers = [ConvBnAct(prev, width, stride=2)]
            layers += [ConvBnAct(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*layers))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        # timm-style config: read by leuko's head/freeze helpers (classifier path).
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": "compact_cnn",
            "input_size": (in_chans, 128, 128),
            "first_conv": "stem.conv",
            "classifier": "fc",
        }
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- timm interface -------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for layer-wise schedules and ``freeze('last:N')``: stem, then one per stage."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
