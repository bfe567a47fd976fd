"""Classifier heads: LeViT's BatchNorm1d + Linear (foldable) or DeiT's plain Linear."""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .levit import LayerType

__all__ = ["Head", "make_head"]


class Head(nn.Module):
    """[norm_layer] -> Dropout -> Linear on pooled features."""

    def __init__(self, dim: int, num_classes: int, norm_layer: LayerType = nn.BatchNorm1d, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = norm_layer(dim) if norm_layer is not None else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def make_head(dim: int, num_classes: int, norm_layer: LayerType, drop: float) -> nn.Module:
    """Identity when num_classes == 0 (feature extractor)."""
    return Head(dim, num_classes, norm_layer, drop) if num_classes > 0 else nn.Identity()
