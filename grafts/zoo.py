"""Named model configs (plain dicts, same schema as the ``model`` spec section): data only.

``config.zoo_config(name)`` returns a copy; ``build.register_timm()`` registers every entry in
timm as ``grafts_<name>`` (through timm's ``build_model_with_cfg``, with a pretrained_cfg each)
so ``timm.create_model('grafts_levit_256')`` builds ours while timm's own ``levit_256`` stays timm's."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["ZOO", "zoo_names"]


def _levit(dims, key_dim, heads, depths, drop_path=0.0) -> dict:
    return dict(
        img_size=224,
        prefix=None,
        patch="levit_conv",
        downsample="shrink_attention",
        stages=[
            dict(dim=d, depth=x, heads=h, key_dim=key_dim, attn_ratio=2.0, mlp_ratio=2.0)
            for d, h, x in zip(dims, heads, depths)
        ],
        position="attention_bias",
        norm="batchnorm",
        act="hardswish",
        attn_act=True,
        qkv_bias=False,
        zero_init_residual=True,
        pool="mean",
        distillation=True,
        drop_path=drop_path,
    )


def _deit(dim, heads, depth=12, **kw) -> dict:
    d = dict(
        img_size=224,
        prefix=None,
        patch="vit",
        patch_size=16,
        downsample="none",
        stages=[dict(dim=dim, depth=depth, heads=heads, key_dim=None, attn_ratio=1.0, mlp_ratio=4.0)],
        position="absolute",
        norm="layernorm",
        act="gelu",
        attn_act=False,
        qkv_bias=True,
        zero_init_residual=False,
        pool="cls",
        distillation=False,
    )
    d.update(kw)
    return d


ZOO: dict[str, dict[str, Any]] = {
    # LeViT family (paper Table 3 / official levit.py specification)
    "levit_128s": _levit((128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "levit_128": _levit((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "levit_192": _levit((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "levit_256": _levit((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "levit_384": _levit((384, 512, 768), 32, (6, 9, 12), (4, 4, 4), drop_path=0.1),
    # DeiT (no distillation token: matches timm deit_tiny / deit_small)
    "deit_tiny": _deit(192, 3),
    "deit_small": _deit(384, 6),
    # Pure ResNet-50 = prefix with all 4 stages and no transformer
    "resnet50": dict(
        img_size=224,
        prefix=dict(arch="resnet50", stages=4),
        stages=[dict(dim=2048, depth=0, heads=1, key_dim=None, attn_ratio=1.0, mlp_ratio=4.0)],
        downsample="none",
        position="none",
        pool="mean",
        distillation=False,
    ),
}
# Grafts (paper Table 1): ResNet-50 stages 1..k + DeiT-S with 12-3k layers, pool bridge to 14x14.
# distillation=True (dist token + head) is what reproduces the paper's 17.1/13.1/15.1M.
for _k in (1, 2, 3):
    ZOO[f"resnet{_k}_deit{12 - 3 * _k}"] = _deit(
        384, 6, depth=12 - 3 * _k, prefix=dict(arch="resnet50", stages=_k), bridge="pool", grid=14, distillation=True
    )
ZOO["resnet0_deit12"] = copy.deepcopy(ZOO["deit_small"])
ZOO["resnet4_deit0"] = copy.deepcopy(ZOO["resnet50"])

# LeViT-128S ablations (paper Table 5). The paper counts params without a distillation
# head, so the base and every row are single-head (distillation=False). A4 ("without
# distillation") has the same architecture as the base: it differs only in training
# (base: hard distillation on the single head, DeiT DistillationLoss style; A4: no teacher).
_base = dict(ZOO["levit_128s"], distillation=False)
ZOO["levit_128s_a0"] = _base
_ablations: dict[str, dict[str, Any]] = {
    "a1": dict(stages=[dict(dim=114, depth=11, heads=3, key_dim=19, attn_ratio=2.0, mlp_ratio=2.0)]),
    "a2": dict(patch="vit", patch_size=16),
    "a3": dict(norm="layernorm", zero_init_residual=False),
    "a4": dict(),
    "a5": dict(position="absolute"),
    "a6": dict(
        stages=[
            dict(dim=d, depth=x, heads=h, key_dim=30, attn_ratio=1.0, mlp_ratio=4.0)
            for d, h, x in zip((120, 180, 240), (4, 6, 8), (2, 3, 4))
        ],
        # paper: "subsample heads 16/24"; with D=30 that gives 5.83M/302M (V ratio 1) or
        # 7.18M/391M (V ratio 4). 8/12 heads with LeViT's V ratio 4 gives 6.09M/318M,
        # closest to the paper's 6.2M/312M (see README).
        downsample_heads=[8, 12],
    ),
    "a7": dict(attn_act=False),
}
for _n, _over in _ablations.items():
    _d = copy.deepcopy(_base)
    _d.update(copy.deepcopy(_over))
    ZOO[f"levit_128s_{_n}"] = _d


def zoo_names() -> list[str]:
    """All zoo entry names."""
    return list(ZOO)
