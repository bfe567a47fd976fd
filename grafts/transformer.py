"""Transformer blocks and stages shared by DeiT-style and LeViT-style models.

Blocks take their layers as classes (or ``functools.partial`` of them), the timm way:
``attn_layer`` (Attention / SubsampleAttention / PoolProject), ``mlp_layer`` (NormMlp for
LeViT, DeitMlp for DeiT), ``norm_layer`` (the pre-norm of each residual branch: LayerNorm for
DeiT, None for LeViT, whose BatchNorms sit inside the BN-linears). ``grafts.build`` picks
them from the config. Every module's forward takes the token grid ``hw`` (None: as built).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_

from .levit import Grid, LayerType, LinearNorm

__all__ = ["Block", "Downsample", "Stage", "PoolProject", "DeitMlp", "residual_add"]


def residual_add(x: torch.Tensor, branch: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + branch``. With ``inplace`` (set on fused inference copies by ``grafts.fuse``) and
    autograd not recording, ``x`` is added into the freshly computed branch output instead,
    saving one allocation per residual; same values (float addition commutes)."""
    if (
        not inplace
        or branch.dtype != x.dtype
        or branch.shape != x.shape
        or (torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad))
    ):
        return x + branch
    return branch.add_(x)


class DeitMlp(Mlp):
    """timm's Mlp (biased linears; keys ``fc1``/``fc2``) with DeiT's init; ``zero_init`` zeroes
    the output projection (a residual branch that starts as identity)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        *,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        zero_init: bool = False,
        drop: float = 0.0,
    ) -> None:
        super().__init__(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        for m in (self.fc1, self.fc2):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        if zero_init:
            nn.init.zeros_(self.fc2.weight)


def _norm(norm_layer: LayerType, dim: int) -> nn.Module:
    return norm_layer(dim) if norm_layer is not None else nn.Identity()


class Block(nn.Module):
    """Residual attention + residual MLP: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    ``attn_layer(dim, resolution)`` and ``mlp_layer(dim)`` build the branches (partials carry
    their other arguments); ``norm_layer`` is the pre-norm (None: none, LeViT)."""

    inplace = False  # in-place residual adds (inference copies made by grafts.fuse)

    def __init__(
        self,
        dim: int,
        resolution: Grid,
        *,
        attn_layer: Callable[..., nn.Module],
        mlp_layer: Callable[..., nn.Module],
        norm_layer: LayerType = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(norm_layer, dim)
        self.attn = attn_layer(dim, resolution)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(norm_layer, dim)
        self.mlp = mlp_layer(dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        x = residual_add(x, self.drop_path1(self.attn(self.norm1(x), hw)), self.inplace)
        return residual_add(x, self.drop_path2(self.mlp(self.norm2(x))), self.inplace)


class PoolProject(nn.Module):
    """2x2 average pooling of the token grid (ceil) then a linear + ``norm_layer`` to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, resolution: Grid, *, norm_layer: LayerType = nn.BatchNorm1d) -> None:
        super().__init__()
        self.resolution = tuple(resolution)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.proj = LinearNorm(in_dim, out_dim, norm_layer, bias=True)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        B, N, C = x.shape
        rh, rw = hw if hw is not None else self.resolution
        # pool the (B, rh, rw, C) token grid as a channels-last NCHW view: no copy in, and the
        # channels-last result flattens back to contiguous (B, N', C) tokens for free
        x = self.pool(x.reshape(B, rh, rw, C).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return self.proj(x)


class Downsample(nn.Module):
    """Between-stage transition: ``attn_layer(in_dim, out_dim, resolution)`` (shrink attention
    or pool + projection), then a residual MLP at ``out_dim``."""

    inplace = False  # in-place residual add (inference copies made by grafts.fuse)

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        resolution: Grid,
        *,
        attn_layer: Callable[..., nn.Module],
        mlp_layer: Callable[..., nn.Module],
        norm_layer: LayerType = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(norm_layer, in_dim)
        self.attn = attn_layer(in_dim, out_dim, resolution)
        self.norm2 = _norm(norm_layer, out_dim)
        self.mlp = mlp_layer(out_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        x = self.attn(self.norm1(x), hw)
        return residual_add(x, self.drop_path(self.mlp(self.norm2(x))), self.inplace)


def _half(hw: Grid) -> Grid:
    return (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1


class Stage(nn.Module):
    """Optional downsample (stages >= 1) then ``depth`` blocks. ``forward(x, hw)`` takes the
    input token grid and returns (tokens, output grid)."""

    grad_checkpointing = False

    def __init__(self, downsample: Optional[nn.Module], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, hw: Grid) -> tuple[torch.Tensor, Grid]:
        if not isinstance(self.downsample, nn.Identity):
            x, hw = self.downsample(x, hw), _half(hw)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return x, hw
