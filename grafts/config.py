"""Model config: dataclasses, parsing from plain dicts (YAML), validation.

Every error is a GraftConfigError carrying the dotted path of the offending
field inside the ``model`` section, so a spec author knows what to fix.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Sequence, Union

from .zoo import ZOO

__all__ = [
    "GraftConfigError",
    "PrefixConfig",
    "StageConfig",
    "ModelConfig",
    "config_from_dict",
    "config_to_dict",
    "zoo_config",
    "ENUMS",
    "PREFIX_STRIDES",
    "PREFIX_CHANNELS",
    "to_hw",
]

Size = Union[int, tuple[int, int]]


def to_hw(size: Size) -> tuple[int, int]:
    """(height, width) of an int (square) or a (height, width) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class GraftConfigError(ValueError):
    """Invalid model config; ``.path`` is the dotted field path (e.g. ``stages.1.heads``)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}")


# Allowed values of every enum-like field (single source of truth for validation + docs).
ENUMS: dict[str, tuple[str, ...]] = {
    "bridge": ("pool", "proj"),
    "patch": ("vit", "levit_conv"),
    "downsample": ("shrink_attention", "pool", "none"),
    "position": ("absolute", "attention_bias", "none"),
    "norm": ("batchnorm", "layernorm"),
    "act": ("hardswish", "gelu"),
    "pool": ("cls", "mean"),
}
PREFIX_ARCHS = ("resnet50",)
# Output stride of ResNet-50 after stem + layer1..layer_k.
PREFIX_STRIDES = {1: 4, 2: 8, 3: 16, 4: 32}
PREFIX_CHANNELS = {1: 256, 2: 512, 3: 1024, 4: 2048}


@dataclass(frozen=True)
class PrefixConfig:
    """Convolutional prefix: the first ``stages`` stages of ``arch`` (stem included)."""

    arch: str = "resnet50"
    stages: int = 0


@dataclass(frozen=True)
class StageConfig:
    """One transformer stage (several stages = pyramid)."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    key_dim: Optional[int] = None  # None -> dim // heads
    attn_ratio: float = 2.0  # value dim per head / key_dim
    mlp_ratio: float = 2.0

    @property
    def kd(self) -> int:
        """Effective key dim per head."""
        return self.key_dim if self.key_dim is not None else self.dim // self.heads


_LEVIT_128S_STAGES = (
    StageConfig(128, 2, 4, 16, 2.0, 2.0),
    StageConfig(256, 3, 6, 16, 2.0, 2.0),
    StageConfig(384, 4, 8, 16, 2.0, 2.0),
)


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section of an experiment spec (defaults = a LeViT-128S-like model)."""

    zoo: Optional[str] = None
    img_size: Size = 224  # int (square) or (height, width)
    dynamic_img_size: bool = False  # accept other input sizes at run time (see README)
    in_chans: int = 3
    num_classes: int = 1000
    drop_path: float = 0.0
    drop_rate: float = 0.0
    prefix: Optional[PrefixConfig] = None
    bridge: str = "pool"
    grid: Optional[Size] = None  # pool-bridge token grid at img_size; int or (height, width)
    patch: str = "levit_conv"
    patch_size: int = 16
    stages: tuple[StageConfig, ...] = _LEVIT_128S_STAGES
    downsample: str = "shrink_attention"
    downsample_heads: Optional[Any] = None  # None | int | list[int] (one per transition)
    downsample_attn_ratio: float = 4.0
    downsample_mlp_ratio: float = 2.0
    position: str = "attention_bias"
    norm: str = "batchnorm"
    act: str = "hardswish"
    attn_act: bool = True
    qkv_bias: bool = False
    zero_init_residual: bool = True
    pool: str = "mean"
    distillation: bool = False

    # ---- derived geometry (used by build + validation) ----
    @property
    def prefix_stages(self) -> int:
        return self.prefix.stages if self.prefix is not None else 0

    @property
    def has_transformer(self) -> bool:
        return not (len(self.stages) == 1 and self.stages[0].depth == 0)

    @property
    def img_hw(self) -> tuple[int, int]:
        """(height, width) of the configured input."""
        return to_hw(self.img_size)

    @property
    def token_stride(self) -> tuple[int, int]:
        """Input pixels per first-stage token along (height, width) at ``img_size``."""
        k = self.prefix_stages
        if k == 0:
            s = self.patch_size if self.patch == "vit" else 16
            return s, s
        if self.bridge == "proj" or not self.has_transformer:
            return PREFIX_STRIDES[k], PREFIX_STRIDES[k]
        (h, w), (gh, gw) = self.img_hw, self.token_grid()
        return max(h // gh, 1), max(w // gw, 1)

    def token_grid(self, img_hw: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """(height, width) of the token grid entering the first transformer stage, for the
        configured input (or ``img_hw``: the grid a dynamic-size model uses for that input)."""
        k = self.prefix_stages
        h, w = img_hw if img_hw is not None else self.img_hw
        if k == 0:
            s = self.patch_size if self.patch == "vit" else 16
            return h // s, w // s
        if self.bridge == "proj" or not self.has_transformer:
            return h // PREFIX_STRIDES[k], w // PREFIX_STRIDES[k]
        ch, cw = self.img_hw
        gh, gw = to_hw(self.grid) if self.grid is not None else (ch // 16, cw // 16)
        if img_hw is None:
            return gh, gw
        # the pool bridge keeps its configured pooling factor per axis (aspect ratio kept)
        s = PREFIX_STRIDES[k]
        return (max(round((h // s) * gh / (ch // s)), 1), max(round((w // s) * gw / (cw // s)), 1))

    def stage_resolutions(self, img_hw: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
        """Token grid (height, width) of each stage (stride-2 downsampling between stages, ceil)."""
        r = self.token_grid(img_hw)
        out = []
        for i in range(len(self.stages)):
            if i > 0 and self.downsample != "none":
                r = ((r[0] - 1) // 2 + 1, (r[1] - 1) // 2 + 1)
            out.append(r)
        return out

    def downsample_heads_for(self, i: int) -> int:
        """Heads of the shrink attention entering stage ``i`` (i >= 1)."""
        dh = self.downsample_heads
        prev = self.stages[i - 1]
        if dh is None:
            return prev.dim // prev.kd
        if isinstance(dh, int):
            return dh
        return dh[i - 1]


# ----------------------------------------------------------------------------- parsing

_FIELD_TYPES: dict[str, Any] = {
    "zoo": (str, type(None)),
    "in_chans": int,
    "num_classes": int,
    "dynamic_img_size": bool,
    "drop_path": float,
    "drop_rate": float,
    "bridge": str,
    "patch": str,
    "patch_size": int,
    "downsample": str,
    "downsample_attn_ratio": float,
    "downsample_mlp_ratio": float,
    "position": str,
    "norm": str,
    "act": str,
    "attn_act": bool,
    "qkv_bias": bool,
    "zero_init_residual": bool,
    "pool": str,
    "distillation": bool,
}
_STAGE_TYPES: dict[str, Any] = {
    "dim": int,
    "depth": int,
    "heads": int,
    "key_dim": (int, type(None)),
    "attn_ratio": float,
    "mlp_ratio": float,
}
_TYPE_NAMES = {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}


def _close(key: str, allowed: Sequence[str]) -> str:
    m = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(x) for x in m)}?" if m else ""
    return f"unknown key {key!r}{hint} (allowed: {', '.join(sorted(allowed))})"


def _check_keys(d: dict, allowed: Sequence[str], path: str) -> None:
    for k in d:
        if k not in allowed:
            p = f"{path}.{k}" if path else str(k)
            raise GraftConfigError(p, _close(str(k), allowed))


def _coerce(value: Any, typ: Any, path: str) -> Any:
    """Type-check one scalar; ints are accepted where a float is expected, bools never count as ints."""
    types = typ if isinstance(typ, tuple) else (typ,)
    if value is None and type(None) in types:
        return None
    for t in types:
        if t is type(None):
            continue
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else _TYPE_NAMES[t] for t in types)
    raise GraftConfigError(path, f"must be {names}, got {type(value).__name__} {value!r}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)  # lists (e.g. stages) are replaced whole
    return out


def _parse_stage(d: Any, path: str) -> StageConfig:
    if isinstance(d, StageConfig):
        d = asdict(d)
    if not isinstance(d, dict):
        raise GraftConfigError(path, f"must be a mapping with keys {', '.join(_STAGE_TYPES)}")
    _check_keys(d, list(_STAGE_TYPES), path)
    kw = {k: _coerce(v, _STAGE_TYPES[k], f"{path}.{k}") for k, v in d.items()}
    return StageConfig(**kw)


def _parse_size(v: Any, path: str) -> Optional[Size]:
    """An int, or a [height, width] pair of ints (a square pair becomes an int); grid may be null."""
    if v is None and path == "grid":
        return None
    if isinstance(v, (list, tuple)):
        if len(v) != 2:
            raise GraftConfigError(path, f"must be an int or a list [height, width] of 2 ints, got {len(v)} values")
        h, w = (_coerce(x, int, f"{path}.{i}") for i, x in enumerate(v))
        return h if h == w else (h, w)
    try:
        return _coerce(v, (int, type(None)) if path == "grid" else int, path)
    except GraftConfigError:
        nul = "null, " if path == "grid" else ""
        raise GraftConfigError(
            path, f"must be {nul}an int or a list [height, width] of ints, got {type(v).__name__} {v!r}"
        ) from None


def _parse_prefix(d: Any) -> Optional[PrefixConfig]:
    if d is None:
        return None
    if isinstance(d, PrefixConfig):
        d = asdict(d)
    if not isinstance(d, dict):
        raise GraftConfigError("prefix", "must be null or a mapping {arch: resnet50, stages: 0..4}")
    _check_keys(d, ["arch", "stages"], "prefix")
    arch = _coerce(d.get("arch", "resnet50"), str, "prefix.arch")
    if arch not in PREFIX_ARCHS:
        raise GraftConfigError("prefix.arch", f"unknown value {arch!r}; allowed: {', '.join(PREFIX_ARCHS)}")
    k = _coerce(d.get("stages", 0), int, "prefix.stages")
    if not 0 <= k <= 4:
        raise GraftConfigError("prefix.stages", f"must be in 0..4 (number of ResNet-50 stages kept), got {k}")
    return PrefixConfig(arch, k)


def config_from_dict(d: Any) -> ModelConfig:
    """Parse + validate a ``model`` section (a dict, or a ModelConfig which is re-validated)."""
    if isinstance(d, ModelConfig):
        d = config_to_dict(d)
    if not isinstance(d, dict):
        raise GraftConfigError("model", f"must be a mapping, got {type(d).__name__}")
    d = dict(d)
    zoo = d.get("zoo")
    if zoo is not None:
        if not isinstance(zoo, str) or zoo not in ZOO:
            m = difflib.get_close_matches(str(zoo), list(ZOO), n=3, cutoff=0.5)
            hint = f" did you mean {', '.join(repr(x) for x in m)}?" if m else ""
            raise GraftConfigError("zoo", f"unknown zoo entry {zoo!r};{hint} allowed: {', '.join(ZOO)}")
        d = _deep_merge(ZOO[zoo], {k: v for k, v in d.items() if k != "zoo"})
        d["zoo"] = zoo
    allowed = [f.name for f in fields(ModelConfig)]
    _check_keys(d, allowed, "")
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k == "prefix":
            kw[k] = _parse_prefix(v)
        elif k == "stages":
            if isinstance(v, tuple):
                v = list(v)
            if not isinstance(v, list) or not v:
                raise GraftConfigError(
                    "stages", "must be a non-empty list of {dim, depth, heads, key_dim, attn_ratio, mlp_ratio}"
                )
            kw[k] = tuple(_parse_stage(s, f"stages.{i}") for i, s in enumerate(v))
        elif k in ("img_size", "grid"):
            kw[k] = _parse_size(v, k)
        elif k == "downsample_heads":
            if isinstance(v, (list, tuple)):
                kw[k] = tuple(_coerce(x, int, f"downsample_heads.{i}") for i, x in enumerate(v))
            else:
                kw[k] = _coerce(v, (int, type(None)), k)
        else:
            kw[k] = _coerce(v, _FIELD_TYPES[k], k)
    for k, allowed_vals in ENUMS.items():
        if k in kw and kw[k] not in allowed_vals:
            raise GraftConfigError(k, f"unknown value {kw[k]!r}; allowed: {', '.join(allowed_vals)}")
    cfg = ModelConfig(**kw)
    validate(cfg)
    return cfg


def config_to_dict(cfg: ModelConfig) -> dict:
    """Plain YAML-able dict (lists, not tuples) that round-trips through config_from_dict."""
    out: dict[str, Any] = {}
    for f in fields(ModelConfig):
        v = getattr(cfg, f.name)
        if f.name == "prefix":
            v = None if v is None else asdict(v)
        elif f.name == "stages":
            v = [asdict(s) for s in v]
        elif f.name in ("downsample_heads", "img_size", "grid") and isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out  # every key explicit; ``zoo`` kept as provenance (overrides then re-apply to it)


# ----------------------------------------------------------------------------- validation


def _positive(value: Optional[float], path: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise GraftConfigError(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_scalars(cfg: ModelConfig) -> None:
    """Sizes, counts, ratios and rates of the top-level fields."""
    for name in ("in_chans", "patch_size", "downsample_attn_ratio", "downsample_mlp_ratio"):
        _positive(getattr(cfg, name), name)
    for v in cfg.img_hw:
        _positive(v, "img_size")
    _positive(cfg.num_classes, "num_classes", allow_zero=True)
    for name in ("drop_path", "drop_rate"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise GraftConfigError(name, f"must be in [0, 1), got {v}")
    for i, v in enumerate(to_hw(cfg.grid) if cfg.grid is not None else ()):
        _positive(v, "grid" if isinstance(cfg.grid, int) else f"grid.{i}")


def _check_stage(cfg: ModelConfig, i: int) -> None:
    """Stage ``i``: positive sizes, whole head dims, depth 0 only for the pure ResNet-50."""
    s = cfg.stages[i]
    p = f"stages.{i}"
    _positive(s.dim, f"{p}.dim")
    _positive(s.depth, f"{p}.depth", allow_zero=True)
    _positive(s.heads, f"{p}.heads")
    _positive(s.key_dim, f"{p}.key_dim")
    _positive(s.attn_ratio, f"{p}.attn_ratio")
    _positive(s.mlp_ratio, f"{p}.mlp_ratio")
    if s.key_dim is None and s.dim % s.heads:
        raise GraftConfigError(
            f"{p}.heads",
            f"dim {s.dim} is not divisible by heads {s.heads} "
            f"(key_dim is null -> dim // heads); pick a divisor of {s.dim} or set key_dim",
        )
    if float(s.attn_ratio * s.kd) != int(s.attn_ratio * s.kd):
        raise GraftConfigError(
            f"{p}.attn_ratio", f"attn_ratio * key_dim must be an integer value dim, got {s.attn_ratio * s.kd}"
        )
    if s.depth == 0 and not (len(cfg.stages) == 1 and cfg.prefix_stages == 4):
        raise GraftConfigError(
            f"{p}.depth", "depth 0 is allowed only for a single stage after a 4-stage prefix (pure ResNet-50)"
        )


def _check_token_geometry(cfg: ModelConfig) -> None:
    """The input divides into tokens along every axis (patch stride or prefix stride, pool-bridge default grid)."""
    k = cfg.prefix_stages
    size = "x".join(map(str, cfg.img_hw))
    if k == 0:
        stride = cfg.patch_size if cfg.patch == "vit" else 16
        if any(v % stride for v in cfg.img_hw):
            raise GraftConfigError("img_size", f"{size} is not divisible by the patch stride {stride}")
    else:
        stride = PREFIX_STRIDES[k]
        if any(v % stride for v in cfg.img_hw):
            raise GraftConfigError(
                "img_size", f"{size} is not divisible by the ResNet-50 prefix stride {stride} (k={k})"
            )
        if cfg.bridge == "pool" and cfg.grid is None and any(v % 16 for v in cfg.img_hw):
            raise GraftConfigError("img_size", f"{size} is not divisible by 16 (grid null -> img_size // 16); set grid")


def _check_pyramid(cfg: ModelConfig) -> None:
    """Several stages: mean pooling, one downsample_heads entry per transition, every transition."""
    n = len(cfg.stages)
    if cfg.pool == "cls":
        raise GraftConfigError("pool", "cls pooling needs a single isotropic stage; allowed for pyramids: mean")
    dh = cfg.downsample_heads
    if isinstance(dh, tuple) and len(dh) != n - 1:
        raise GraftConfigError(
            "downsample_heads", f"list must have one entry per stage transition ({n - 1}), got {len(dh)}"
        )
    for i in range(1, n):
        _check_downsample(cfg, i)


def _check_downsample(cfg: ModelConfig, i: int) -> None:
    """The transition into stage ``i``: 'none' keeps the dim; shrink attention has heads and a whole value dim."""
    if cfg.downsample == "none" and cfg.stages[i].dim != cfg.stages[i - 1].dim:
        raise GraftConfigError(
            "downsample",
            f"'none' needs equal consecutive dims, stages.{i - 1}.dim="
            f"{cfg.stages[i - 1].dim} != stages.{i}.dim={cfg.stages[i].dim}; "
            "allowed: shrink_attention, pool",
        )
    if cfg.downsample == "shrink_attention":
        h = cfg.downsample_heads_for(i)
        if h < 1:
            raise GraftConfigError("downsample_heads", f"shrink attention into stage {i} has {h} heads")
        kd = cfg.stages[i - 1].kd
        if float(cfg.downsample_attn_ratio * kd) != int(cfg.downsample_attn_ratio * kd):
            raise GraftConfigError("downsample_attn_ratio", "downsample_attn_ratio * key_dim must be an integer")


def validate(cfg: ModelConfig) -> None:
    """Cross-field checks; raises GraftConfigError naming the field."""
    _check_scalars(cfg)
    for i in range(len(cfg.stages)):
        _check_stage(cfg, i)
    _check_token_geometry(cfg)
    if not cfg.has_transformer:
        return
    if min(cfg.token_grid()) < 1:
        raise GraftConfigError("img_size", "token grid is empty")
    if len(cfg.stages) > 1:
        _check_pyramid(cfg)


def zoo_config(name: str) -> dict[str, Any]:
    """A copy of the zoo entry's plain dict (raises GraftConfigError for unknown names)."""
    if name not in ZOO:
        config_from_dict({"zoo": name})  # raises with close matches
    return copy.deepcopy(ZOO[name])
