"""Token embeddings: the conv-prefix -> transformer bridge, and the patch embeddings.

All return a (B, C, H, W) map at the first stage's width; the model flattens to tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .levit import ConvNorm, PatchConv, act_layer

__all__ = ["PoolBridge", "ProjBridge", "VitPatch", "make_patch"]


class PoolBridge(nn.Module):
    """Paper's grafting bridge: adaptive average-pool the prefix map to grid x grid,
    then a 1x1 projection to the transformer width (BN-foldable when norm=batchnorm)."""

    def __init__(self, in_chs: int, dim: int, grid: int, use_bn: bool) -> None:
        super().__init__()
        self.grid = grid
        self.proj = ConvNorm(in_chs, dim, 1, use_bn=use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            x = F.adaptive_avg_pool2d(x, self.grid)
        return self.proj(x)


class ProjBridge(nn.Module):
    """timm-hybrid bridge: 1x1 projection at the prefix's native resolution (no pooling)."""

    def __init__(self, in_chs: int, dim: int, use_bn: bool) -> None:
        super().__init__()
        self.proj = ConvNorm(in_chs, dim, 1, use_bn=use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VitPatch(nn.Module):
    """ViT patch embedding: one conv with kernel = stride = patch_size."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_patch(kind: str, in_chans: int, dim: int, patch_size: int, act: str) -> nn.Module:
    """Patch embedding used when there is no conv prefix."""
    if kind == "vit":
        return VitPatch(in_chans, dim, patch_size)
    return PatchConv(in_chans, dim, act_layer(act))
