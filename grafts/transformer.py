"""Transformer blocks and stages shared by DeiT-style and LeViT-style models.

One Block class covers both: ``norm='layernorm'`` gives DeiT pre-norm blocks (timm Mlp,
biased linears); ``norm='batchnorm'`` gives LeViT blocks (no LayerNorm, BN after every
linear). The downsampling between pyramid stages is a separate module.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, trunc_normal_

from .levit import Attention, LinearNorm, NormMlp, SubsampleAttention

__all__ = ["Block", "Downsample", "Stage", "make_mlp", "residual_add"]


def residual_add(x: torch.Tensor, branch: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x + branch``. With ``inplace`` (set on fused inference copies by ``grafts.fuse``) and
    autograd not recording, ``x`` is added into the freshly computed branch output instead,
    saving one allocation per residual; same values (float addition commutes)."""
    if not inplace or branch.dtype != x.dtype or branch.shape != x.shape or (
            torch.is_grad_enabled() and (x.requires_grad or branch.requires_grad)):
        return x + branch
    return branch.add_(x)


def make_mlp(dim: int, ratio: float, norm: str, act: Type[nn.Module], zero_init: bool,
             drop: float) -> nn.Module:
    """MLP for a residual branch: timm Mlp (layernorm) or LeViT BN MLP (batchnorm)."""
    hidden = int(dim * ratio)
    if norm == "batchnorm":
        return NormMlp(dim, hidden, act, zero_init, drop)
    mlp = Mlp(dim, hidden, act_layer=act, drop=drop)
    for m in (mlp.fc1, mlp.fc2):
        trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    if zero_init:
        nn.init.zeros_(mlp.fc2.weight)
    return mlp


def _norm(norm: str, dim: int) -> nn.Module:
    """Pre-norm of a residual branch: LayerNorm for DeiT, nothing for LeViT (BN is inside)."""
    return nn.LayerNorm(dim, eps=1e-6) if norm == "layernorm" else nn.Identity()


class Block(nn.Module):
    """Residual attention + residual MLP."""

    inplace = False  # in-place residual adds (inference copies made by grafts.fuse)

    def __init__(self, dim: int, key_dim: int, heads: int, attn_ratio: float, mlp_ratio: float,
                 resolution: int, norm: str, act: Type[nn.Module],
                 attn_act: Optional[Type[nn.Module]], qkv_bias: bool, position_bias: bool,
                 zero_init: bool, drop_path: float, drop: float, n_extra: int = 0) -> None:
        super().__init__()
        self.norm1 = _norm(norm, dim)
        self.attn = Attention(dim, key_dim, heads, attn_ratio, resolution, norm == "batchnorm",
                              attn_act, qkv_bias, position_bias, zero_init, n_extra)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(norm, dim)
        self.mlp = make_mlp(dim, mlp_ratio, norm, act, zero_init, drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = residual_add(x, self.drop_path1(self.attn(self.norm1(x))), self.inplace)
        return residual_add(x, self.drop_path2(self.mlp(self.norm2(x))), self.inplace)


class PoolProject(nn.Module):
    """2x2 average pooling of the token grid (ceil) then a linear/BN projection to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, resolution: int, use_bn: bool) -> None:
        super().__init__()
        self.resolution = resolution
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.proj = LinearNorm(in_dim, out_dim, use_bn, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        r = self.resolution
        # pool the (B, r, r, C) token grid as a channels-last NCHW view: no copy in, and the
        # channels-last result flattens back to contiguous (B, N', C) tokens for free
        x = self.pool(x.reshape(B, r, r, C).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return self.proj(x)


class Downsample(nn.Module):
    """Between-stage transition: shrink attention or pool+projection, then a residual MLP."""

    inplace = False  # in-place residual add (inference copies made by grafts.fuse)

    def __init__(self, kind: str, in_dim: int, out_dim: int, key_dim: int, heads: int,
                 attn_ratio: float, mlp_ratio: float, resolution: int, norm: str,
                 act: Type[nn.Module], attn_act: Optional[Type[nn.Module]], qkv_bias: bool,
                 position_bias: bool, zero_init: bool, drop_path: float, drop: float) -> None:
        super().__init__()
        use_bn = norm == "batchnorm"
        self.norm1 = _norm(norm, in_dim)
        if kind == "shrink_attention":
            self.attn = SubsampleAttention(in_dim, out_dim, key_dim, heads, attn_ratio, resolution,
                                           use_bn, attn_act, qkv_bias, position_bias)
        else:
            self.attn = PoolProject(in_dim, out_dim, resolution, use_bn)
        self.norm2 = _norm(norm, out_dim)
        self.mlp = make_mlp(out_dim, mlp_ratio, norm, act, zero_init, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return residual_add(x, self.drop_path(self.mlp(self.norm2(x))), self.inplace)


class Stage(nn.Module):
    """Optional downsample (stages >= 1) then ``depth`` blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))
