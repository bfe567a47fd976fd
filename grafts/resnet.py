"""ResNet-50 stage prefix, taken from timm's own ``resnet50`` definition (not retyped).

We instantiate timm's resnet50 (random init, pretrained=False) and keep the stem plus
layer1..layer_k, so a k-stage prefix is bit-for-bit timm's architecture and init.
"""

from __future__ import annotations

from typing import Union

import timm
import torch
import torch.nn as nn

from .config import PREFIX_CHANNELS, PREFIX_STRIDES

__all__ = ["ResNetPrefix"]


class ResNetPrefix(nn.Module):
    """Stem (conv1/bn1/act1/maxpool) + ``layer1..layer{k}`` of timm's resnet50."""

    def __init__(self, stages: int, in_chans: int = 3, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 1 <= stages <= 4:
            raise ValueError(f"prefix stages must be 1..4, got {stages}")
        full = timm.create_model(
            "resnet50", pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path
        )
        self.stages = stages
        self.out_chs = PREFIX_CHANNELS[stages]
        self.stride = PREFIX_STRIDES[stages]
        for name in ("conv1", "bn1", "act1", "maxpool"):
            self.add_module(name, getattr(full, name))
        for i in range(1, stages + 1):
            self.add_module(f"layer{i}", getattr(full, f"layer{i}"))

    @staticmethod
    def channels(stages: int) -> int:
        """Output channels after ``stages`` stages."""
        return PREFIX_CHANNELS[stages]

    def feature_info(self) -> list[dict]:
        """timm feature_info of the kept stages (``prefix.layerI``: channels, reduction)."""
        return [
            dict(num_chs=PREFIX_CHANNELS[i], reduction=PREFIX_STRIDES[i], module=f"prefix.layer{i}")
            for i in range(1, self.stages + 1)
        ]

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> Union[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Output map; with ``intermediates`` (output, [output of layer1..layer_k])."""
        feats = []
        for name, m in self.named_children():
            x = m(x)
            if intermediates and name.startswith("layer"):
                feats.append(x)
        return (x, feats) if intermediates else x
