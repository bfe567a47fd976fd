"""Classifier heads: LeViT's BatchNorm1d + Linear (foldable) or DeiT's plain Linear."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ["Head", "make_head"]


class Head(nn.Module):
    """[BatchNorm1d] -> Dropout -> Linear on pooled features."""

    def __init__(self, dim: int, num_classes: int, use_bn: bool, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim) if use_bn else nn.Identity()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def make_head(dim: int, num_classes: int, use_bn: bool, drop: float) -> nn.Module:
    """Identity when num_classes == 0 (feature extractor)."""
    return Head(dim, num_classes, use_bn, drop) if num_classes > 0 else nn.Identity()
