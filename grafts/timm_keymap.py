"""Map timm ``levit_*`` (and official LeViT) state-dict keys to ours.

Only names differ; tensors are copied unchanged because our modules keep timm's
layouts: per-head interleaved [q|k|v] (and [k|v]) columns in the BN-linears, and the
attention-bias table as (heads, res*res) indexed by |dy|*res + |dx|.

    timm key                                              ours
    stem.conv{i}.linear.*      / stem.conv{i}.bn.*        embed.conv{i}.conv.* / embed.conv{i}.bn.*
    stages.S.blocks.B.attn.attention_biases               stages.S.blocks.B.attn.pos_bias.table
    stages.S.blocks.B.attn.qkv.{linear,bn}.*              (same)
    stages.S.blocks.B.attn.proj.ln.{linear,bn}.*          stages.S.blocks.B.attn.proj.{linear,bn}.*
    stages.S.blocks.B.mlp.ln1 / ln2                       stages.S.blocks.B.mlp.fc1 / fc2
    stages.S.downsample.attn_downsample.attention_biases  stages.S.downsample.attn.pos_bias.table
    stages.S.downsample.attn_downsample.kv.*              stages.S.downsample.attn.kv.*
    stages.S.downsample.attn_downsample.q.ln.*            stages.S.downsample.attn.q.*
    stages.S.downsample.attn_downsample.proj.ln.*         stages.S.downsample.attn.proj.*
    stages.S.downsample.mlp.ln1 / ln2                     stages.S.downsample.mlp.fc1 / fc2
    head.bn / head.linear (and head_dist.*)               head.norm / head.fc (head_dist.*)
    *.attention_bias_idxs (non-persistent index buffers)  dropped (we recompute ours)
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
import torch.nn as nn

__all__ = ["KEYMAP", "map_timm_levit_key", "map_timm_levit_state_dict", "load_timm_levit"]

# (pattern, replacement), applied in order with re.sub; the first matching rule wins.
KEYMAP: list[tuple[str, str]] = [
    (r"^stem\.conv(\d)\.linear\.", r"embed.conv\1.conv."),
    (r"^stem\.conv(\d)\.bn\.", r"embed.conv\1.bn."),
    (r"^(stages\.\d+\.blocks\.\d+\.attn)\.attention_biases$", r"\1.pos_bias.table"),
    (r"^(stages\.\d+\.blocks\.\d+\.attn)\.proj\.ln\.", r"\1.proj."),
    (r"^(stages\.\d+\.blocks\.\d+\.attn)\.qkv\.", r"\1.qkv."),
    (r"^(stages\.\d+\.(?:blocks\.\d+|downsample))\.mlp\.ln(\d)\.", r"\1.mlp.fc\2."),
    (r"^(stages\.\d+\.downsample)\.attn_downsample\.attention_biases$", r"\1.attn.pos_bias.table"),
    (r"^(stages\.\d+\.downsample)\.attn_downsample\.kv\.", r"\1.attn.kv."),
    (r"^(stages\.\d+\.downsample)\.attn_downsample\.(q|proj)\.ln\.", r"\1.attn.\2."),
    (r"^(head(?:_dist)?)\.bn\.", r"\1.norm."),
    (r"^(head(?:_dist)?)\.linear\.", r"\1.fc."),
]
_COMPILED = [(re.compile(p), r) for p, r in KEYMAP]


def map_timm_levit_key(key: str) -> Optional[str]:
    """Our key for a timm LeViT key; None for keys we drop (index buffers)."""
    if key.endswith("attention_bias_idxs"):
        return None
    for pat, rep in _COMPILED:
        if pat.search(key):
            return pat.sub(rep, key)
    raise KeyError(f"no mapping for timm LeViT key {key!r}")


def map_timm_levit_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole timm LeViT state dict (accepts a {'model': sd} checkpoint too)."""
    if "model" in sd and not isinstance(sd["model"], torch.Tensor):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        nk = map_timm_levit_key(k)
        if nk is not None:
            out[nk] = v
    return out


def load_timm_levit(model: nn.Module, timm_state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load timm LeViT weights into a grafts LeViT-shaped model (strict by default)."""
    return model.load_state_dict(map_timm_levit_state_dict(timm_state_dict), strict=strict)
