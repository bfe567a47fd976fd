"""Token embeddings: the conv-prefix -> transformer bridge, and the patch embeddings.

All return a (B, C, H, W) map at the first stage's width; the model flattens to tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .levit import ConvNorm, Grid, LayerType, PatchConv

__all__ = ["PoolBridge", "ProjBridge", "VitPatch", "PatchConv"]


class PoolBridge(nn.Module):
    """Paper's grafting bridge: average-pool the prefix map to the token grid, then a 1x1
    projection + ``norm_layer`` to the transformer width (BN-foldable).

    Built for a prefix map ``map_size`` pooled to ``grid``. Another map size (dynamic input
    size) is pooled by the same factor per axis, so the aspect ratio is kept: a 224x320 input
    to a 224 model with grid 14 gives 14x20 tokens (never a square grid from a non-square image).
    """

    def __init__(
        self, in_chs: int, dim: int, grid: Grid, map_size: Grid, norm_layer: LayerType = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.grid: Grid = (int(grid[0]), int(grid[1]))
        self.map_size: Grid = (int(map_size[0]), int(map_size[1]))
        self.proj = ConvNorm(in_chs, dim, 1, norm_layer=norm_layer)

    def out_grid(self, h: int, w: int) -> Grid:
        """Token grid for a (h, w) prefix map."""
        if (h, w) == self.map_size:
            return self.grid
        return (max(round(h * self.grid[0] / self.map_size[0]), 1), max(round(w * self.grid[1] / self.map_size[1]), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.out_grid(x.shape[-2], x.shape[-1])
        if (x.shape[-2], x.shape[-1]) != g:
            x = F.adaptive_avg_pool2d(x, g)
        return self.proj(x)


class ProjBridge(nn.Module):
    """timm-hybrid bridge: 1x1 projection at the prefix's native resolution (no pooling)."""

    def __init__(self, in_chs: int, dim: int, norm_layer: LayerType = nn.BatchNorm2d) -> None:
        super().__init__()
        self.proj = ConvNorm(in_chs, dim, 1, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VitPatch(nn.Module):
    """ViT patch embedding: one conv with kernel = stride = patch_size."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
