"""Fold every BatchNorm into its neighbouring conv/linear for inference (LeViT speed protocol)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .heads import Head
from .levit import ConvNorm, LinearNorm

__all__ = ["fuse", "fold_bn_after", "fold_bn_before"]

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
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, bias=True)
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


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """Eval-mode copy of ``model`` with every BatchNorm folded away (same outputs).

    Handles our ConvNorm / LinearNorm / Head and timm ResNet blocks (``convN``/``bnN``
    pairs and the ``downsample`` conv+BN). Raises if any BatchNorm would remain.
    """
    model = copy.deepcopy(model).eval()
    for mod in list(model.modules()):
        if isinstance(mod, ConvNorm) and isinstance(mod.bn, _BN):
            mod.conv, mod.bn = fold_bn_after(mod.conv, mod.bn), nn.Identity()
        elif isinstance(mod, LinearNorm) and isinstance(mod.bn, _BN):
            mod.linear, mod.bn = fold_bn_after(mod.linear, mod.bn), nn.Identity()
        elif isinstance(mod, Head) and isinstance(mod.norm, _BN):
            mod.fc, mod.norm = fold_bn_before(mod.norm, mod.fc), nn.Identity()
        else:
            # timm ResNet: (conv1, bn1), (conv2, bn2), (conv3, bn3); downsample = Sequential(conv, bn)
            for i in range(1, 4):
                conv, bn = getattr(mod, f"conv{i}", None), getattr(mod, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(mod, f"conv{i}", fold_bn_after(conv, bn))
                    setattr(mod, f"bn{i}", nn.Identity())
            if isinstance(mod, nn.Sequential) and len(mod) == 2 and isinstance(mod[0], nn.Conv2d) \
                    and isinstance(mod[1], nn.BatchNorm2d):
                mod[0], mod[1] = fold_bn_after(mod[0], mod[1]), nn.Identity()
    left = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RuntimeError(f"fuse: BatchNorm left unfolded at {left[:5]}")
    return model
