"""LeViT building blocks, each with switches so ablations are one flag away.

Token tensors are (B, N, C); attention layers keep a per-head q/k/v interleaved
layout (heads, [q | k | v]) so that timm / official LeViT weights load by renaming only.

Attention without a position bias runs ``F.scaled_dot_product_attention`` (train and eval);
with the LeViT bias it keeps the explicit matmul (faster than SDPA with a float mask on CPU
for LeViT's small heads, measured), and in eval reuses the cached gathered bias and scales /
adds it in place when autograd is not recording. ``grafts.fuse`` makes the inference copy:
plain folded layers, the attention scale folded into the query weights, in-place activations.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ["ConvNorm", "LinearNorm", "PatchConv", "RelPosBias", "Attention",
           "SubsampleAttention", "NormMlp", "act_layer", "attend"]


def act_layer(name: str) -> Type[nn.Module]:
    """Activation class for the config's ``act`` value."""
    return {"hardswish": nn.Hardswish, "gelu": nn.GELU}[name]


class ConvNorm(nn.Module):
    """Conv followed by BatchNorm (foldable) or, with ``use_bn=False``, a biased conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, use_bn: bool = True, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=not use_bn)
        self.bn = nn.BatchNorm2d(out_chs) if use_bn else nn.Identity()
        if use_bn:
            nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearNorm(nn.Module):
    """Linear (no bias) + BatchNorm1d over all tokens, LeViT's foldable "BN-linear";
    with ``use_bn=False`` a plain Linear (DeiT style, optional bias)."""

    def __init__(self, in_features: int, out_features: int, use_bn: bool = True,
                 bias: bool = True, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias and not use_bn)
        self.bn = nn.BatchNorm1d(out_features) if use_bn else nn.Identity()
        if use_bn:
            nn.init.constant_(self.bn.weight, bn_weight_init)
        else:
            trunc_normal_(self.linear.weight, std=0.02)
            if self.linear.bias is not None:
                nn.init.zeros_(self.linear.bias)
            if bn_weight_init == 0.0:  # zero-init residual without BN: zero the projection
                nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if isinstance(self.bn, nn.BatchNorm1d):
            x = self.bn(x.flatten(0, -2)).reshape_as(x)
        return x


class PatchConv(nn.Module):
    """LeViT patch descriptor: four 3x3 stride-2 conv+BN, activation between (stride 16)."""

    stride = 16

    def __init__(self, in_chans: int, dim: int, act: Type[nn.Module]) -> None:
        super().__init__()
        chs = [in_chans, dim // 8, dim // 4, dim // 2, dim]
        for i in range(4):
            self.add_module(f"conv{i + 1}", ConvNorm(chs[i], chs[i + 1], 3, 2, 1))
            if i < 3:
                self.add_module(f"act{i + 1}", act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.children():
            x = m(x)
        return x


class RelPosBias(nn.Module):
    """LeViT attention bias: one learned scalar per head per distinct (|dx|, |dy|) offset
    between a query position and a key position (translation invariant, 2-D aware).

    The table has ``res_k * res_k`` entries per head (all possible |dy| * res_k + |dx|),
    the same layout as timm's ``attention_biases``. Extra (cls/dist) tokens get zero bias.

    In eval mode the gathered (heads, Nq, Nk) bias is cached per device, like timm's
    ``attention_bias_cache``. The cache is dropped by ``train()``, by ``to()``/``cuda()``/
    ``half()`` (``_apply``) and by ``load_state_dict``, and is keyed by the table's version
    counter too, so an in-place edit of the table (optimizer step, ``copy_``) is never served
    stale. It is bypassed while autograd records a graph through the table.
    """

    def __init__(self, heads: int, res_k: int, stride: int = 1, n_extra: int = 0) -> None:
        super().__init__()
        self.n_extra = n_extra
        self.table = nn.Parameter(torch.zeros(heads, res_k * res_k))
        k = torch.stack(torch.meshgrid(torch.arange(res_k), torch.arange(res_k), indexing="ij")).flatten(1)
        qa = torch.arange(0, res_k, stride)
        q = torch.stack(torch.meshgrid(qa, qa, indexing="ij")).flatten(1)
        rel = (q[:, :, None] - k[:, None, :]).abs()
        self.register_buffer("idx", rel[0] * res_k + rel[1], persistent=False)
        self.cache: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}

    def train(self, mode: bool = True) -> "RelPosBias":
        self.cache = {}
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:  # deepcopy / pickle: the cache is derived state
        state = self.__dict__.copy()
        state["cache"] = {}
        return state

    def _gather(self) -> torch.Tensor:
        bias = self.table[:, self.idx]  # (heads, Nq, Nk)
        if self.n_extra:
            bias = F.pad(bias, (self.n_extra, 0, self.n_extra, 0))
        return bias

    def forward(self) -> torch.Tensor:
        t = self.table
        if self.training or (torch.is_grad_enabled() and t.requires_grad) or t.device.type == "meta" \
                or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._gather()
        try:
            version = t._version
        except RuntimeError:  # an inference tensor (model built under inference_mode) has none
            version = -1
        key, stamp = str(t.device), (version, t.data_ptr())
        hit = self.cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = self.cache[key] = (stamp, self._gather())
        return hit[1]


def _recording(*ts: torch.Tensor) -> bool:
    """True when autograd records these ops (then no in-place tricks)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, H, N, d) views; returns (B, Nq, H * dv).

    Without bias: ``F.scaled_dot_product_attention`` (fused kernels; on CPU its output is
    already (B, N, H, d) in memory, so the final reshape is free). With the LeViT bias: the
    explicit product (timm's op order; faster than SDPA with a float mask on CPU for LeViT's
    small heads, measured), scaled and biased in place when autograd is not recording.
    """
    B, _, Nq, _ = q.shape
    if bias is None:
        x = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        attn = q @ k.transpose(-2, -1)
        if _recording(q, k, v, bias) or attn.dtype != bias.dtype:  # (autocast: keep the promotion)
            x = (attn * scale + bias).softmax(dim=-1) @ v
        else:
            if scale != 1.0:
                attn.mul_(scale)
            x = attn.add_(bias).softmax(dim=-1) @ v
    return x.transpose(1, 2).reshape(B, Nq, -1)


class Attention(nn.Module):
    """Multi-head self-attention with switches: BN-linear vs biased linear, per-head
    relative bias, Hardswish before the output projection (LeViT) or none (DeiT)."""

    def __init__(self, dim: int, key_dim: int, heads: int, attn_ratio: float, resolution: int,
                 use_bn: bool, attn_act: Optional[Type[nn.Module]], qkv_bias: bool,
                 position_bias: bool, zero_init: bool, n_extra: int = 0) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim), use_bn, bias=qkv_bias)
        self.act = attn_act() if attn_act is not None else nn.Identity()
        self.proj = LinearNorm(heads * self.val_dim, dim, use_bn, bias=True,
                               bn_weight_init=0.0 if zero_init else 1.0)
        self.pos_bias = RelPosBias(heads, resolution, 1, n_extra) if position_bias else None

    def q_rows(self) -> torch.Tensor:
        """Output rows of ``qkv`` that are queries (where ``fuse`` folds the scale)."""
        per = 2 * self.key_dim + self.val_dim
        return torch.cat([torch.arange(h * per, h * per + self.key_dim) for h in range(self.heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   self.pos_bias() if self.pos_bias is not None else None, self.scale)
        return self.proj(self.act(x))


class SubsampleAttention(nn.Module):
    """LeViT shrink attention: queries from the stride-2 subsampled grid, keys/values from
    the full grid, output width ``out_dim``. No residual (shapes differ)."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, heads: int, attn_ratio: float,
                 resolution: int, use_bn: bool, attn_act: Optional[Type[nn.Module]],
                 qkv_bias: bool, position_bias: bool) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.resolution = resolution
        self.kv = LinearNorm(in_dim, heads * (key_dim + self.val_dim), use_bn, bias=qkv_bias)
        self.q = LinearNorm(in_dim, heads * key_dim, use_bn, bias=qkv_bias)
        self.act = attn_act() if attn_act is not None else nn.Identity()
        self.proj = LinearNorm(heads * self.val_dim, out_dim, use_bn, bias=True)
        self.pos_bias = RelPosBias(heads, resolution, 2) if position_bias else None

    def q_rows(self) -> torch.Tensor:
        """Output rows of ``q`` that are queries (all of them)."""
        return torch.arange(self.heads * self.key_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        r = self.resolution
        k, v = self.kv(x).view(B, N, self.heads, -1).split([self.key_dim, self.val_dim], dim=3)
        xq = x.view(B, r, r, C)[:, ::2, ::2].reshape(B, -1, C)
        q = self.q(xq).view(B, xq.shape[1], self.heads, self.key_dim)
        x = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   self.pos_bias() if self.pos_bias is not None else None, self.scale)
        return self.proj(self.act(x))


class NormMlp(nn.Module):
    """LeViT MLP: BN-linear, activation, BN-linear (last BN zero-init for residuals)."""

    def __init__(self, dim: int, hidden: int, act: Type[nn.Module], zero_init: bool,
                 drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = LinearNorm(dim, hidden, use_bn=True)
        self.act = act()
        self.drop = nn.Dropout(drop)
        self.fc2 = LinearNorm(hidden, dim, use_bn=True, bn_weight_init=0.0 if zero_init else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
