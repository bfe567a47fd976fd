"""Inference copies: fold every BatchNorm into its neighbouring conv/linear (LeViT speed protocol),
replace the conv/linear+BN wrappers by plain layers, and switch on the in-place fast paths."""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import Head
from .levit import Attention, ConvNorm, LinearNorm, SubsampleAttention
from .transformer import Block, Downsample

__all__ = ["fuse", "fold_bn_after", "fold_bn_before", "InplaceGELU", "InplaceHardswish"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) so that bn(y) == y * scale + shift in eval mode."""
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
    return scale, shift


@torch.no_grad()
def fold_bn_after(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Return a conv/linear equal to bn(layer(x)) (BN after the layer)."""
    scale, shift = _bn_affine(bn)
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias=True,
        )
        new.weight.copy_(layer.weight * scale[:, None, None, None])
    else:
        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
        new.weight.copy_(layer.weight * scale[:, None])
    b = layer.bias if layer.bias is not None else torch.zeros_like(shift)
    new.bias.copy_(b * scale + shift)
    return new.to(layer.weight.device)


@torch.no_grad()
def fold_bn_before(bn: nn.modules.batchnorm._BatchNorm, linear: nn.Linear) -> nn.Linear:
    """Return a linear equal to linear(bn(x)) (BN before the layer, LeViT heads)."""
    scale, shift = _bn_affine(bn)
    new = nn.Linear(linear.in_features, linear.out_features, bias=True)
    new.weight.copy_(linear.weight * scale[None, :])
    b = linear.bias if linear.bias is not None else torch.zeros(linear.out_features, device=scale.device)
    new.bias.copy_(b + linear.weight @ shift)
    return new.to(linear.weight.device)


class InplaceGELU(nn.GELU):
    """GELU computed in place when autograd is not recording (fused inference copies only:
    every GELU in a grafts model is applied to a freshly computed fc1 output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class InplaceHardswish(nn.Hardswish):
    """Hardswish computed in place when autograd is not recording (fused copies only: every
    Hardswish in a grafts model gets a fresh conv / linear / attention output). Not in place
    under autograd, where its input may be saved for backward (SDPA saves its output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def _plain(mod: nn.Module) -> Optional[nn.Module]:
    """The single conv/linear that replaces one of our norm wrappers (BN folded), else None."""
    if isinstance(mod, ConvNorm):
        return fold_bn_after(mod.conv, mod.bn) if isinstance(mod.bn, _BN) else mod.conv
    if isinstance(mod, LinearNorm):
        return fold_bn_after(mod.linear, mod.bn) if isinstance(mod.bn, _BN) else mod.linear
    if isinstance(mod, Head):  # BN -> Dropout (a no-op in eval) -> Linear
        return fold_bn_before(mod.norm, mod.fc) if isinstance(mod.norm, _BN) else mod.fc
    return None


def _replace_wrappers(parent: nn.Module) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        new = _plain(child)
        if new is not None:
            parent._modules[name] = new
        else:
            _replace_wrappers(child)


def _fold_resnet_bn(mod: nn.Module) -> None:
    """timm ResNet: (conv1, bn1), (conv2, bn2), (conv3, bn3); downsample = Sequential(conv, bn)."""
    for i in range(1, 4):
        conv, bn = getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(mod, f"conv{i}", fold_bn_after(conv, bn))
            setattr(mod, f"bn{i}", nn.Identity())
    if (
        isinstance(mod, nn.Sequential)
        and len(mod) == 2
        and isinstance(mod[0], nn.Conv2d)
        and isinstance(mod[1], nn.BatchNorm2d)
    ):
        mod[0], mod[1] = fold_bn_after(mod[0], mod[1]), nn.Identity()


@torch.no_grad()
def _fold_attention_scale(attn: nn.Module, q_layer: nn.Module) -> None:
    """Scale the query rows of the (plain) q / qkv projection so attention needs no multiply."""
    if not isinstance(q_layer, nn.Linear) or attn.scale == 1.0:
        return
    rows = attn.q_rows().to(q_layer.weight.device)
    q_layer.weight[rows] *= attn.scale
    if q_layer.bias is not None:
        q_layer.bias[rows] *= attn.scale
    attn.scale = 1.0


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """Eval-mode inference copy of ``model`` with every BatchNorm folded away (same outputs).

    - ConvNorm / LinearNorm become one plain ``nn.Conv2d`` / ``nn.Linear`` (BN folded into
      weight and bias); a BN+Linear ``Head`` becomes one ``nn.Linear`` (BN folded in front).
    - timm ResNet blocks: ``convN``/``bnN`` pairs and the ``downsample`` conv+BN are folded.
    - The attention scale is folded into the query rows of the q/qkv projection.
    - Hardswish / GELU run in place and residual adds write into the branch output, whenever
      autograd is not recording (the copy is for inference; with grad it still works).

    Raises if any BatchNorm would remain.
    """
    model = copy.deepcopy(model).eval()
    _replace_wrappers(model)
    for mod in list(model.modules()):
        _fold_resnet_bn(mod)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Attention):
            _fold_attention_scale(mod, mod.qkv)
        elif isinstance(mod, SubsampleAttention):
            _fold_attention_scale(mod, mod.q)
        elif isinstance(mod, (Block, Downsample)):
            mod.inplace = True
        elif type(mod) in (nn.Hardswish, nn.GELU):
            parent_name, _, attr = name.rpartition(".")
            model.get_submodule(parent_name)._modules[attr] = (
                InplaceHardswish() if type(mod) is nn.Hardswish else InplaceGELU(approximate=mod.approximate)
            )
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RuntimeError(f"fuse: BatchNorm left unfolded at {left[:5]}")
    return model
