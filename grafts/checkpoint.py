"""Loading weights into grafts models: timm's checkpoint-filter convention, resolution
changes, partial loads with a report.

- ``checkpoint_filter_fn(state_dict, model)`` (timm's name and signature): unwraps
  ``{'model' | 'state_dict': sd}``, renames timm ``levit_*`` and ``resnet50`` keys to ours,
  and resizes what depends on the input size: the absolute position embedding is resampled
  (timm's ``resample_abs_pos_embed``, bicubic) and every LeViT attention-bias table is rebuilt
  for the model's key grid (``resize_bias_table``: the trained (|dy|, |dx|) table stretched).
- ``GraftModel.load_state_dict`` runs the same filter (a load pre-hook), so timm's
  ``create_model('grafts_levit_256', checkpoint_path=F)`` accepts a timm ``levit_256`` file and
  224 weights load into a 288 or 224x320 model.
- ``load_weights(model, sd, include=...)`` loads what fits and returns a ``LoadReport`` of
  loaded / resized / left-random / skipped keys (fine-tuning from a checkpoint).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from .levit import RelPosBias, resize_bias_table
from .timm_keymap import map_timm_levit_key

__all__ = [
    "LoadReport",
    "checkpoint_filter_fn",
    "load_weights",
    "unwrap_state_dict",
    "map_timm_resnet_key",
    "is_timm_levit",
    "is_timm_resnet",
]

_RESNET_TOP = re.compile(r"^(conv1|bn1|layer[1-4])\.")


@dataclass
class LoadReport:
    """What ``load_weights`` did, by our key names."""

    loaded: list[str] = field(default_factory=list)  # copied from the checkpoint
    resized: list[str] = field(default_factory=list)  # loaded after resizing (subset of loaded)
    random: list[str] = field(default_factory=list)  # model keys left at their init
    skipped: list[str] = field(default_factory=list)  # checkpoint keys not used (with reason)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors ({len(self.resized)} resized), "
            f"{len(self.random)} left at init, {len(self.skipped)} checkpoint keys skipped"
        )

    def as_dict(self) -> dict[str, list[str]]:
        return {"loaded": self.loaded, "resized": self.resized, "random": self.random, "skipped": self.skipped}


def unwrap_state_dict(sd: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``{'model': sd}``, ``{'state_dict': sd}`` (Lightning,
    whose ``model.`` prefix is stripped) or a plain state dict."""
    if isinstance(sd, Mapping):
        for key in ("state_dict", "model", "state_dict_ema"):
            inner = sd.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                sd = inner
                break
    if not isinstance(sd, Mapping):
        raise ValueError(f"not a state dict: {type(sd).__name__}")
    out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if out and all(k.startswith("model.") for k in out):
        out = {k[len("model.") :]: v for k, v in out.items()}
    return out


def is_timm_levit(keys: Sequence[str]) -> bool:
    return any(k.endswith("attention_biases") or k.startswith("stem.conv1.linear") for k in keys)


def is_timm_resnet(keys: Sequence[str]) -> bool:
    return any(k.startswith("layer1.") for k in keys) and not any(k.startswith("prefix.") for k in keys)


def map_timm_resnet_key(key: str) -> Optional[str]:
    """timm ``resnet50`` key -> ours (prefix stem/layers; ``fc`` -> ``head.fc``)."""
    if _RESNET_TOP.match(key):
        return "prefix." + key
    if key.startswith("fc."):
        return "head." + key
    return None


def is_timm_vit(keys: Sequence[str]) -> bool:
    return any(k.startswith("patch_embed.proj.") for k in keys) and any(k.startswith("blocks.") for k in keys)


_VIT_KEYS = [
    (re.compile(r"^patch_embed\.proj\."), "embed.proj."),
    (re.compile(r"^blocks\.(\d+)\.attn\.(qkv|proj)\."), r"stages.0.blocks.\1.attn.\2.linear."),
    (re.compile(r"^blocks\.(\d+)\."), r"stages.0.blocks.\1."),
    (re.compile(r"^(head|head_dist)\.(weight|bias)$"), r"\1.fc.\2"),
    (re.compile(r"^(cls_token|dist_token|pos_embed|norm\.weight|norm\.bias)$"), r"\1"),
]


def map_timm_vit_state_dict(sd: Mapping[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """timm ``deit_*`` / ``vit_*`` (single stage, patch embedding) -> ours. timm's fused qkv rows
    are [q of all heads | k | v]; ours interleave per head ([q|k|v] of head 0, head 1, ...), so
    those rows are permuted (``heads`` from the model)."""
    out = {}
    for k, v in sd.items():
        for pat, rep in _VIT_KEYS:
            if pat.match(k):
                nk = pat.sub(rep, k)
                if nk.endswith("attn.qkv.linear.weight") or nk.endswith("attn.qkv.linear.bias"):
                    rest = v.shape[1:]
                    v = v.reshape(3, heads, v.shape[0] // (3 * heads), *rest).transpose(0, 1).reshape(v.shape)
                out[nk] = v
                break
    return out


def _grid_of(n: int, like: tuple[int, int]) -> tuple[int, int]:
    """(h, w) with h * w == n: square when possible, else the factorisation closest to ``like``'s
    aspect ratio (a checkpoint trained non-square)."""
    r = math.isqrt(n)
    if r * r == n:
        return r, r
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(like[0] / like[1])))


def _rename(sd: dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    keys = list(sd)
    if is_timm_vit(keys) and model is not None:
        heads = next((m.heads for m in model.modules() if hasattr(m, "heads") and hasattr(m, "qkv")), None)
        if isinstance(heads, int):
            return map_timm_vit_state_dict(sd, heads)
    if is_timm_levit(keys):
        return {nk: v for k, v in sd.items() if (nk := map_timm_levit_key(k)) is not None}
    if is_timm_resnet(keys):
        return {nk: v for k, v in sd.items() if (nk := map_timm_resnet_key(k)) is not None}
    return {k: v for k, v in sd.items() if not k.endswith("attention_bias_idxs")}


def _resize(sd: dict[str, torch.Tensor], model: nn.Module, resized: Optional[list[str]] = None) -> None:
    """Resize in place the position tensors of ``sd`` whose shape differs from ``model``'s."""
    own = model.state_dict(keep_vars=True)
    for key, v in list(sd.items()):
        target = own.get(key)
        if target is None or tuple(v.shape) == tuple(target.shape):
            continue
        if key.endswith("pos_bias.table") and v.dim() == 2 and v.shape[0] == target.shape[0]:
            mod = model.get_submodule(key[: -len(".table")])
            assert isinstance(mod, RelPosBias)
            sd[key] = resize_bias_table(v, _grid_of(v.shape[1], mod.resolution), mod.resolution)
        elif key == "pos_embed" and v.dim() == 3 and v.shape[2] == target.shape[2]:
            n_extra = int(getattr(model, "n_extra", 0))
            gh, gw = model.grid
            new = (int(gh), int(gw))
            old = _grid_of(v.shape[1] - n_extra, new)
            sd[key] = resample_abs_pos_embed(v.detach(), list(new), list(old), num_prefix_tokens=n_extra)
        else:
            continue
        if resized is not None:
            resized.append(key)


def checkpoint_filter_fn(
    state_dict: Any, model: nn.Module, resized: Optional[list[str]] = None
) -> dict[str, torch.Tensor]:
    """timm-style filter: our key names, position tensors resized to ``model`` (keys resized are
    appended to ``resized``). Keys that still do not fit are left for the loader to report."""
    sd = _rename(unwrap_state_dict(state_dict), model)
    _resize(sd, model, resized)
    return sd


def load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``GraftModel`` load pre-hook: apply ``checkpoint_filter_fn`` to the keys under ``prefix``
    (in place), so plain ``load_state_dict`` accepts timm files and other resolutions."""
    mine = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix)}
    if not mine:
        return
    sub = {k: state_dict[full] for k, full in mine.items()}
    keys = list(sub)
    if not (
        is_timm_levit(keys)
        or is_timm_resnet(keys)
        or is_timm_vit(keys)
        or any(k.endswith("attention_bias_idxs") for k in keys)
    ):
        own = module.state_dict(keep_vars=True)
        if all(k not in own or tuple(own[k].shape) == tuple(v.shape) for k, v in sub.items()):
            return  # nothing to rename or resize (the common case: no copy)
    new = _rename(sub, module)
    _resize(new, module)
    for full in mine.values():
        del state_dict[full]
    for k, v in new.items():
        state_dict[prefix + k] = v


def load_weights(
    model: nn.Module, state_dict: Any, include: Optional[Sequence[str]] = None, exclude: Sequence[str] = ()
) -> LoadReport:
    """Load every tensor of ``state_dict`` that fits ``model`` (after renaming / resizing);
    ``include``: only keys starting with one of these prefixes (e.g. ``["prefix."]`` for the
    ResNet stages), ``exclude``: never these. Tensors whose shape still differs (e.g. a head
    for another class count) are skipped and stay at their init. Returns the report."""
    resized: list[str] = []
    sd = checkpoint_filter_fn(state_dict, model, resized)
    own = model.state_dict()
    rep = LoadReport()
    take: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if include is not None and not any(k.startswith(p) for p in include):
            rep.skipped.append(f"{k} (not included)")
        elif any(k.startswith(p) for p in exclude):
            rep.skipped.append(f"{k} (excluded)")
        elif k not in own:
            rep.skipped.append(f"{k} (not in model)")
        elif tuple(v.shape) != tuple(own[k].shape):
            rep.skipped.append(f"{k} (shape {tuple(v.shape)} != {tuple(own[k].shape)})")
        else:
            take[k] = v
    model.load_state_dict(take, strict=False)
    rep.loaded = sorted(take)
    rep.resized = sorted(k for k in resized if k in take)
    rep.random = sorted(k for k in own if k not in take and not k.endswith("num_batches_tracked"))
    return rep
