"""Compose a model from a ModelConfig: [ResNet prefix + bridge | patch embedding]
-> tokens [+ cls/dist tokens] [+ absolute position] -> stages -> pool -> head(s)."""
from __future__ import annotations

import sys
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from .bridge import PoolBridge, ProjBridge, make_patch
from .config import ModelConfig, config_from_dict
from .heads import make_head
from .levit import act_layer
from .resnet import ResNetPrefix
from .transformer import Block, Downsample, Stage
from .zoo import ZOO

__all__ = ["GraftModel", "build", "register_timm"]


class GraftModel(nn.Module):
    """Hybrid conv/transformer classifier assembled from switches (see grafts/README.md)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.img_size = cfg.img_size
        k = cfg.prefix_stages
        use_bn = cfg.norm == "batchnorm"
        act = act_layer(cfg.act)
        attn_act = act_layer("hardswish") if cfg.attn_act else None
        self.has_transformer = cfg.has_transformer
        dim0 = cfg.stages[0].dim

        # --- conv part / token embedding
        self.prefix: Optional[ResNetPrefix] = None
        if k > 0:
            self.prefix = ResNetPrefix(k, cfg.in_chans, cfg.drop_path if not self.has_transformer else 0.0)
        if not self.has_transformer:  # pure ResNet-50 (k == 4): global average pool + fc
            self.embed = nn.Identity()
            self.num_features = self.prefix.out_chs
            self.n_extra = 0
            self.cls_token = self.dist_token = self.pos_embed = None
            self.stages = nn.Sequential()
            self.norm = nn.Identity()
            self.head = make_head(self.num_features, cfg.num_classes, False, cfg.drop_rate)
            self.head_dist = (make_head(self.num_features, cfg.num_classes, False, cfg.drop_rate)
                              if cfg.distillation else None)
            return
        if k == 0:
            self.embed = make_patch(cfg.patch, cfg.in_chans, dim0, cfg.patch_size, cfg.act)
        elif cfg.bridge == "pool":
            self.embed = PoolBridge(self.prefix.out_chs, dim0, cfg.token_grid(), use_bn)
        else:
            self.embed = ProjBridge(self.prefix.out_chs, dim0, use_bn)

        # --- extra tokens and absolute position
        grid = cfg.token_grid()
        use_cls = cfg.pool == "cls"
        use_dist_token = use_cls and cfg.distillation
        self.n_extra = int(use_cls) + int(use_dist_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim0)) if use_cls else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim0)) if use_dist_token else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, grid * grid + self.n_extra, dim0))
                          if cfg.position == "absolute" else None)
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=0.02)
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        # --- transformer stages
        res = cfg.stage_resolutions()
        n_blocks = sum(s.depth for s in cfg.stages) + (len(cfg.stages) - 1)
        dpr = [cfg.drop_path * i / max(n_blocks - 1, 1) for i in range(max(n_blocks, 1))]  # linear ramp
        common = dict(norm=cfg.norm, act=act, attn_act=attn_act, qkv_bias=cfg.qkv_bias,
                      position_bias=cfg.position == "attention_bias")
        stages, j = [], 0
        for i, s in enumerate(cfg.stages):
            down = None
            if i > 0 and cfg.downsample != "none":
                prev = cfg.stages[i - 1]
                down = Downsample(cfg.downsample, prev.dim, s.dim, prev.kd, cfg.downsample_heads_for(i),
                                  cfg.downsample_attn_ratio, cfg.downsample_mlp_ratio, res[i - 1],
                                  zero_init=cfg.zero_init_residual, drop_path=dpr[j], drop=0.0, **common)
                j += 1
            blocks = []
            for _ in range(s.depth):
                blocks.append(Block(s.dim, s.kd, s.heads, s.attn_ratio, s.mlp_ratio, res[i],
                                    zero_init=cfg.zero_init_residual, drop_path=dpr[j], drop=0.0,
                                    n_extra=self.n_extra, **common))
                j += 1
            stages.append(Stage(down, blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = cfg.stages[-1].dim
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6) if cfg.norm == "layernorm" else nn.Identity()
        self.head = make_head(self.num_features, cfg.num_classes, use_bn, cfg.drop_rate)
        self.head_dist = (make_head(self.num_features, cfg.num_classes, use_bn, cfg.drop_rate)
                          if cfg.distillation else None)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) after the last stage (+ final norm); a (B, C, H, W) map for pure ResNet."""
        if self.prefix is not None:
            x = self.prefix(x)
        if not self.has_transformer:
            return x
        x = self.embed(x).flatten(2).transpose(1, 2)
        extra = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if extra:
            x = torch.cat(extra + [x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        return self.norm(self.stages(x))

    def pool_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features for the class head, features for the distillation head)."""
        if not self.has_transformer:
            x = x.mean(dim=(2, 3))
            return x, x
        if self.cls_token is not None:
            return x[:, 0], (x[:, 1] if self.dist_token is not None else x[:, 0])
        x = x.mean(dim=1)
        return x, x

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(class logits, distillation logits or None) - for hard distillation training."""
        f_cls, f_dist = self.pool_features(self.forward_features(x))
        return self.head(f_cls), (self.head_dist(f_dist) if self.head_dist is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls, dist = self.forward_heads(x)
        return cls if dist is None else (cls + dist) / 2

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens, position embeddings and attention-bias tables are not decayed (timm convention)."""
        return {n for n, _ in self.named_parameters()
                if n in ("cls_token", "dist_token", "pos_embed") or n.endswith("pos_bias.table")}


def build(cfg: Union[ModelConfig, dict[str, Any]], device: Union[str, torch.device, None] = None) -> GraftModel:
    """Build a model from a ModelConfig or a plain ``model`` dict (validated).

    ``device="meta"`` builds without allocating memory (parameter counts of large models);
    any other device constructs the parameters there directly.
    """
    cfg = config_from_dict(cfg)
    if device is None:
        return GraftModel(cfg)
    with torch.device(device):
        return GraftModel(cfg)


# --------------------------------------------------------------------------- timm registry

_TIMM_IGNORED = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "checkpoint_path")


def _make_entrypoint(name: str):
    def fn(pretrained: bool = False, **kwargs: Any):
        if pretrained:
            raise ValueError(f"grafts_{name}: no pretrained weights (use load_timm_levit for LeViT)")
        over = {k: v for k, v in kwargs.items() if k not in _TIMM_IGNORED}
        if "drop_path_rate" in over:
            over["drop_path"] = over.pop("drop_path_rate")
        return build({"zoo": name, **over})
    fn.__name__ = f"grafts_{name}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    fn.__doc__ = f"grafts zoo entry {name!r} (see grafts/README.md)."
    return fn


def register_timm() -> None:
    """Register every zoo entry as ``grafts_<name>`` in timm (idempotent)."""
    from timm.models import is_model, register_model
    mod = sys.modules[__name__]
    for name in ZOO:
        fn = _make_entrypoint(name)
        setattr(mod, fn.__name__, fn)
        if not is_model(fn.__name__):
            register_model(fn)
