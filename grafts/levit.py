"""LeViT building blocks. Layers are passed in as classes (``norm_layer``, ``act_layer``, ...,
as timm's model files do); ``grafts.build`` picks them from the config in one place.

Token tensors are (B, N, C); attention layers keep a per-head q/k/v interleaved
layout (heads, [q | k | v]) so that timm / official LeViT weights load by renaming only.
Every token mixer takes the current token grid ``hw = (height, width)`` (None: the grid it
was built for), so one model can run on other input sizes (``dynamic_img_size``).

Attention without a position bias runs ``F.scaled_dot_product_attention`` (train and eval);
with the LeViT bias it keeps the explicit matmul (faster than SDPA with a float mask on CPU
for LeViT's small heads, measured), and in eval reuses the cached gathered bias and scales /
adds it in place when autograd is not recording. ``grafts.fuse`` makes the inference copy:
plain folded layers, the attention scale folded into the query weights, in-place activations.
"""

from __future__ import annotations

from typing import Callable, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = [
    "ConvNorm",
    "LinearNorm",
    "PatchConv",
    "RelPosBias",
    "Attention",
    "SubsampleAttention",
    "NormMlp",
    "attend",
    "resize_bias_table",
    "Grid",
]

Grid = tuple[int, int]
LayerType = Optional[Callable[..., nn.Module]]


class ConvNorm(nn.Module):
    """Conv followed by ``norm_layer`` (BatchNorm2d: foldable) or, with ``norm_layer=None``,
    a biased conv."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        norm_layer: LayerType = nn.BatchNorm2d,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=norm_layer is None)
        self.bn = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        if getattr(self.bn, "weight", None) is not None:
            nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearNorm(nn.Module):
    """Linear (no bias) + ``norm_layer`` over all tokens (BatchNorm1d: LeViT's foldable
    "BN-linear"); with ``norm_layer=None`` a plain Linear (DeiT style, optional bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        norm_layer: LayerType = nn.BatchNorm1d,
        bias: bool = True,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        use_bn = norm_layer is not None
        self.linear = nn.Linear(in_features, out_features, bias=bias and not use_bn)
        self.bn = norm_layer(out_features) if norm_layer is not None else nn.Identity()
        if use_bn:
            if getattr(self.bn, "weight", None) is not None:
                nn.init.constant_(self.bn.weight, bn_weight_init)
        else:
            trunc_normal_(self.linear.weight, std=0.02)
            if self.linear.bias is not None:
                nn.init.zeros_(self.linear.bias)
            if bn_weight_init == 0.0:  # zero-init residual without BN: zero the projection
                nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if not isinstance(self.bn, nn.Identity):  # a BatchNorm1d over every token
            x = self.bn(x.flatten(0, -2)).reshape_as(x)
        return x


class PatchConv(nn.Module):
    """LeViT patch descriptor: four 3x3 stride-2 conv+BN, activation between (stride 16)."""

    stride = 16

    def __init__(
        self, in_chans: int, dim: int, act_layer: Type[nn.Module] = nn.Hardswish, norm_layer: LayerType = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        chs = [in_chans, dim // 8, dim // 4, dim // 2, dim]
        for i in range(4):
            self.add_module(f"conv{i + 1}", ConvNorm(chs[i], chs[i + 1], 3, 2, 1, norm_layer=norm_layer))
            if i < 3:
                self.add_module(f"act{i + 1}", act_layer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.children():
            x = m(x)
        return x


def _bias_index(res: Grid, stride: int) -> torch.Tensor:
    """(Nq, Nk) index into a (heads, rh * rw) table: |dy| * rw + |dx| between each query (the
    stride-``stride`` subsampled grid) and each key (the full ``res`` grid); timm's layout."""
    rh, rw = res
    k = torch.stack(torch.meshgrid(torch.arange(rh), torch.arange(rw), indexing="ij")).flatten(1)
    q = torch.stack(torch.meshgrid(torch.arange(0, rh, stride), torch.arange(0, rw, stride), indexing="ij")).flatten(1)
    rel = (q[:, :, None] - k[:, None, :]).abs()
    return rel[0] * rw + rel[1]


def resize_bias_table(table: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """A (heads, oh * ow) attention-bias table (entry |dy| * ow + |dx|) rebuilt for a
    (nh, nw) key grid: the (|dy|, |dx|) offset map is stretched bicubically, corners aligned
    (offset 0 keeps its bias, the largest offset maps to the largest), like a ViT position
    embedding is resampled when the image is resized."""
    if tuple(old) == tuple(new):
        return table
    h = table.shape[0]
    t = table.detach().float().reshape(1, h, old[0], old[1])
    t = F.interpolate(t, size=tuple(new), mode="bicubic", align_corners=True)
    return t.reshape(h, new[0] * new[1]).to(table.dtype)


class RelPosBias(nn.Module):
    """LeViT attention bias: one learned scalar per head per distinct (|dx|, |dy|) offset
    between a query position and a key position (translation invariant, 2-D aware).

    The table has ``rh * rw`` entries per head (all possible |dy| * rw + |dx| for the key grid
    ``resolution = (rh, rw)``), the same layout as timm's ``attention_biases``. Extra
    (cls/dist) tokens get zero bias. ``forward(hw)`` for another grid (dynamic input size)
    gathers from the table resized with :func:`resize_bias_table` (differentiably).

    In eval mode the gathered (heads, Nq, Nk) bias is cached per device and grid, like timm's
    ``attention_bias_cache``. The cache is dropped by ``train()``, by ``to()``/``cuda()``/
    ``half()`` (``_apply``) and by ``load_state_dict``, and is keyed by the table's version
    counter too, so an in-place edit of the table (optimizer step, ``copy_``) is never served
    stale. It is bypassed while autograd records a graph through the table.
    """

    def __init__(self, heads: int, resolution: Grid, stride: int = 1, n_extra: int = 0) -> None:
        super().__init__()
        self.n_extra = n_extra
        self.resolution: Grid = (int(resolution[0]), int(resolution[1]))
        self.stride = stride
        self.table = nn.Parameter(torch.zeros(heads, self.resolution[0] * self.resolution[1]))
        self.register_buffer("idx", _bias_index(self.resolution, stride), persistent=False)
        self.cache: dict[tuple[str, Grid], tuple[tuple[int, int], torch.Tensor]] = {}

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

    def _gather(self, hw: Optional[Grid] = None) -> torch.Tensor:
        if hw is None or tuple(hw) == self.resolution:
            bias = self.table[:, self.idx]  # (heads, Nq, Nk)
        else:
            h = self.table.shape[0]
            t = F.interpolate(
                self.table.reshape(1, h, *self.resolution), size=tuple(hw), mode="bicubic", align_corners=True
            ).reshape(h, -1)
            bias = t[:, _bias_index((int(hw[0]), int(hw[1])), self.stride).to(t.device)]
        if self.n_extra:
            bias = F.pad(bias, (self.n_extra, 0, self.n_extra, 0))
        return bias

    def forward(self, hw: Optional[Grid] = None) -> torch.Tensor:
        """The (heads, Nq, Nk) bias for the key grid ``hw`` (None: the built resolution)."""
        t = self.table
        if (
            self.training
            or (torch.is_grad_enabled() and t.requires_grad)
            or t.device.type == "meta"
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            return self._gather(hw)
        try:
            version = t._version
        except RuntimeError:  # an inference tensor (model built under inference_mode) has none
            version = -1
        grid = self.resolution if hw is None else (int(hw[0]), int(hw[1]))
        key, stamp = (str(t.device), grid), (version, t.data_ptr())
        hit = self.cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = self.cache[key] = (stamp, self._gather(grid))
        return hit[1]


def _recording(*ts: torch.Tensor) -> bool:
    """True when autograd records these ops (then no in-place tricks)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
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


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias): the (B, H, Nq, Nk) attention probabilities."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return (attn if bias is None else attn + bias).softmax(dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention: ``norm_layer`` after each linear (BatchNorm1d: LeViT's
    BN-linears; None: biased linears, DeiT), ``pos_bias_layer`` (RelPosBias or None),
    ``act_layer`` before the output projection (LeViT's Hardswish; None for DeiT).

    ``get_attention(x, hw)`` returns the attention probabilities (B, heads, N, N)."""

    def __init__(
        self,
        dim: int,
        resolution: Grid,
        *,
        key_dim: int,
        heads: int,
        attn_ratio: float,
        norm_layer: LayerType = nn.BatchNorm1d,
        act_layer: LayerType = nn.Hardswish,
        pos_bias_layer: LayerType = RelPosBias,
        qkv_bias: bool = False,
        zero_init: bool = True,
        n_extra: int = 0,
    ) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.resolution = tuple(resolution)
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim), norm_layer, bias=qkv_bias)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.proj = LinearNorm(
            heads * self.val_dim, dim, norm_layer, bias=True, bn_weight_init=0.0 if zero_init else 1.0
        )
        self.pos_bias = pos_bias_layer(heads, self.resolution, 1, n_extra) if pos_bias_layer is not None else None

    def q_rows(self) -> torch.Tensor:
        """Output rows of ``qkv`` that are queries (where ``fuse`` folds the scale)."""
        per = 2 * self.key_dim + self.val_dim
        return torch.cat([torch.arange(h * per, h * per + self.key_dim) for h in range(self.heads)])

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def get_attention(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        """Attention probabilities (B, heads, N, N) for the block input ``x`` (after its norm1)."""
        q, k, _ = self._qkv(x)
        return attention_probs(q, k, self.pos_bias(hw) if self.pos_bias is not None else None, self.scale)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        x = attend(q, k, v, self.pos_bias(hw) if self.pos_bias is not None else None, self.scale)
        return self.proj(self.act(x))


class SubsampleAttention(nn.Module):
    """LeViT shrink attention: queries from the stride-2 subsampled grid, keys/values from
    the full grid, output width ``out_dim``. No residual (shapes differ)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        resolution: Grid,
        *,
        key_dim: int,
        heads: int,
        attn_ratio: float,
        norm_layer: LayerType = nn.BatchNorm1d,
        act_layer: LayerType = nn.Hardswish,
        pos_bias_layer: LayerType = RelPosBias,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.resolution = tuple(resolution)
        self.kv = LinearNorm(in_dim, heads * (key_dim + self.val_dim), norm_layer, bias=qkv_bias)
        self.q = LinearNorm(in_dim, heads * key_dim, norm_layer, bias=qkv_bias)
        self.act = act_layer() if act_layer is not None else nn.Identity()
        self.proj = LinearNorm(heads * self.val_dim, out_dim, norm_layer, bias=True)
        self.pos_bias = pos_bias_layer(heads, self.resolution, 2) if pos_bias_layer is not None else None

    def q_rows(self) -> torch.Tensor:
        """Output rows of ``q`` that are queries (all of them)."""
        return torch.arange(self.heads * self.key_dim)

    def _qkv(self, x: torch.Tensor, hw: Optional[Grid]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        rh, rw = hw if hw is not None else self.resolution
        k, v = self.kv(x).view(B, N, self.heads, -1).split([self.key_dim, self.val_dim], dim=3)
        xq = x.view(B, rh, rw, C)[:, ::2, ::2].reshape(B, -1, C)
        q = self.q(xq).view(B, xq.shape[1], self.heads, self.key_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def get_attention(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        """Attention probabilities (B, heads, Nq, N) (queries: the subsampled grid)."""
        q, k, _ = self._qkv(x, hw)
        return attention_probs(q, k, self.pos_bias(hw) if self.pos_bias is not None else None, self.scale)

    def forward(self, x: torch.Tensor, hw: Optional[Grid] = None) -> torch.Tensor:
        q, k, v = self._qkv(x, hw)
        x = attend(q, k, v, self.pos_bias(hw) if self.pos_bias is not None else None, self.scale)
        return self.proj(self.act(x))


class NormMlp(nn.Module):
    """LeViT MLP: linear + ``norm_layer``, activation, linear + ``norm_layer`` (last BN zero-init
    for residuals)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 2.0,
        *,
        act_layer: Type[nn.Module] = nn.Hardswish,
        norm_layer: LayerType = nn.BatchNorm1d,
        zero_init: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = LinearNorm(dim, hidden, norm_layer)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = LinearNorm(hidden, dim, norm_layer, bn_weight_init=0.0 if zero_init else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))
