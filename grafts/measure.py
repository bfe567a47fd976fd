"""Parameter and MAC counting (MACs = multiply-adds = FlopCounterMode flops / 2)."""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "count_macs_split"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats are not counted, like timm)."""
    return sum(p.numel() for p in model.parameters())


Size = Union[int, tuple[int, int]]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _meta_model(model_or_cfg: Any, img_size: Optional[Size]) -> tuple[nn.Module, tuple[int, int], int]:
    """Build on the meta device from a config (fast even for big models)."""
    from .build import GraftModel
    from .config import config_from_dict, config_to_dict

    d = config_to_dict(config_from_dict(model_or_cfg.config if isinstance(model_or_cfg, GraftModel) else model_or_cfg))
    if img_size is not None:
        d["img_size"] = img_size
    cfg = config_from_dict(d)
    with torch.device("meta"):
        m = GraftModel(cfg)
    return m.eval(), cfg.img_hw, cfg.in_chans


def _flops(model: nn.Module, x: torch.Tensor) -> FlopCounterMode:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter


def count_macs(model_or_cfg: Union[nn.Module, dict, Any], img_size: Optional[Size] = None) -> int:
    """Multiply-adds per image (batch 1, fp32, eval). GraftModels and configs are rebuilt on
    the meta device (no memory, no compute); any other module runs on CPU."""
    from .build import GraftModel

    if isinstance(model_or_cfg, nn.Module) and not isinstance(model_or_cfg, GraftModel):
        h, w = _hw(img_size or 224)
        m = copy.deepcopy(model_or_cfg).eval()
        in_chans = getattr(m, "in_chans", 3)
        dev = next(m.parameters()).device if any(True for _ in m.parameters()) else "cpu"
        x = torch.zeros(1, in_chans, h, w, device=dev)
    else:
        m, (h, w), in_chans = _meta_model(model_or_cfg, img_size)
        x = torch.zeros(1, in_chans, h, w, device="meta")
    return _flops(m, x).get_total_flops() // 2


def count_macs_split(model_or_cfg: Any, img_size: Optional[Size] = None) -> dict[str, int]:
    """MACs split into the conv part (prefix / patch embedding / bridge) and the rest
    (transformer + head), as in the paper's grafting table."""
    m, (h, w), in_chans = _meta_model(model_or_cfg, img_size)
    x = torch.zeros(1, in_chans, h, w, device="meta")
    counter = _flops(m, x)
    per_mod = counter.get_flop_counts()
    total = counter.get_total_flops()
    conv = 0
    for name in ("prefix", "embed"):
        key = f"GraftModel.{name}"
        if key in per_mod:
            conv += sum(per_mod[key].values())
    return {"conv": conv // 2, "transformer": (total - conv) // 2, "total": total // 2}
