"""Compose a model from a ModelConfig: [ResNet prefix + bridge | patch embedding]
-> tokens [+ cls/dist tokens] [+ absolute position] -> stages -> pool -> head(s).

``GraftModel`` follows timm's model contract (forward_features / forward_head /
get_classifier / reset_classifier / feature_info / forward_intermediates /
set_grad_checkpointing / pretrained_cfg); the zoo registers it in timm through
``build_model_with_cfg`` (see zoo.py). All string switches of the config become layer
classes in one place, ``layer_choices``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Union, cast

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, register_model
from timm.models._features import feature_take_indices

from .bridge import PoolBridge, ProjBridge, VitPatch
from .checkpoint import load_state_dict_pre_hook
from .config import PREFIX_STRIDES, ModelConfig, StageConfig, config_from_dict, config_to_dict
from .heads import make_head
from .levit import Attention, Grid, LayerType, NormMlp, PatchConv, RelPosBias, SubsampleAttention
from .resnet import ResNetPrefix
from .transformer import Block, DeitMlp, Downsample, PoolProject, Stage
from .zoo import ZOO

__all__ = ["GraftModel", "LayerChoices", "build", "layer_choices", "default_pretrained_cfg", "register_timm"]

ACT_LAYERS: dict[str, type[nn.Module]] = {"hardswish": nn.Hardswish, "gelu": nn.GELU}
GLOBAL_POOLS = ("avg", "token", "")


@dataclass(frozen=True)
class LayerChoices:
    """The layer classes a config selects (``layer_choices``); blocks receive these."""

    act_layer: type[nn.Module]
    attn_act_layer: LayerType  # before the attention output projection (LeViT) or None
    pre_norm_layer: LayerType  # residual-branch pre-norm: LayerNorm (DeiT) or None (LeViT)
    linear_norm_layer: LayerType  # after every linear: BatchNorm1d (LeViT) or None (DeiT)
    conv_norm_layer: LayerType  # after bridge convs: BatchNorm2d or None (biased conv)
    head_norm_layer: LayerType  # before the classifier: BatchNorm1d (LeViT) or None
    final_norm_layer: LayerType  # after the last stage: LayerNorm (DeiT) or None
    mlp_layer: Callable[..., nn.Module]
    pos_bias_layer: LayerType  # RelPosBias (attention_bias) or None


def layer_choices(cfg: ModelConfig) -> LayerChoices:
    """The one place where the config's strings (``norm``, ``act``, ``attn_act``, ``position``)
    become layer classes."""
    act = ACT_LAYERS[cfg.act]
    bn = cfg.norm == "batchnorm"
    ln = partial(nn.LayerNorm, eps=1e-6)
    return LayerChoices(
        act_layer=act,
        attn_act_layer=nn.Hardswish if cfg.attn_act else None,
        pre_norm_layer=None if bn else ln,
        linear_norm_layer=nn.BatchNorm1d if bn else None,
        conv_norm_layer=nn.BatchNorm2d if bn else None,
        head_norm_layer=nn.BatchNorm1d if bn and cfg.has_transformer else None,  # ResNet-50: plain fc
        final_norm_layer=None if bn else ln,
        mlp_layer=(partial(NormMlp, norm_layer=nn.BatchNorm1d) if bn else DeitMlp),
        pos_bias_layer=RelPosBias if cfg.position == "attention_bias" else None,
    )


def default_pretrained_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """timm ``pretrained_cfg`` for a config: input size, mean/std, crop, classes, first conv and
    classifier names (no weights: ``url`` empty)."""
    h, w = cfg.img_hw
    if cfg.prefix_stages:
        first = "prefix.conv1"
    else:
        first = "embed.proj" if cfg.patch == "vit" else "embed.conv1.conv"
    return dict(
        url="",
        num_classes=cfg.num_classes,
        input_size=(cfg.in_chans, h, w),
        pool_size=None,
        crop_pct=0.9,
        interpolation="bicubic",
        fixed_input_size=not cfg.dynamic_img_size,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv=first,
        classifier=("head.fc", "head_dist.fc") if cfg.distillation else "head.fc",
        license="apache-2.0",
    )


_TIMM_KWARGS = {"drop_path_rate": "drop_path"}


def _resolve_config(
    cfg: Union[ModelConfig, dict[str, Any], None], overrides: dict[str, Any]
) -> tuple[ModelConfig, Optional[str]]:
    """Config + timm-style keyword overrides -> (validated config, global_pool or None)."""
    base = config_to_dict(cfg) if isinstance(cfg, ModelConfig) else dict(cfg or {})
    over = dict(overrides)
    for k in list(over):
        if k in _TIMM_KWARGS:
            over[_TIMM_KWARGS[k]] = over.pop(k)
    global_pool = over.pop("global_pool", None)
    if global_pool is not None:
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool: {global_pool!r}; allowed: 'avg', 'token', ''")
        if global_pool in ("avg", "token"):
            over["pool"] = "mean" if global_pool == "avg" else "cls"
    return config_from_dict({**base, **over}), global_pool


def _make_prefix(cfg: ModelConfig) -> Optional[ResNetPrefix]:
    """The ResNet-50 prefix (None without one); drop path only in a pure ResNet-50."""
    if cfg.prefix_stages == 0:
        return None
    return ResNetPrefix(cfg.prefix_stages, cfg.in_chans, cfg.drop_path if not cfg.has_transformer else 0.0)


def _n_extra_tokens(cfg: ModelConfig) -> int:
    """Tokens before the patch tokens: a cls token (``pool: cls``), then a distillation token."""
    use_cls = cfg.pool == "cls"
    return int(use_cls) + int(use_cls and cfg.distillation)


def _make_tokens(
    cfg: ModelConfig, grid: Grid, n_extra: int
) -> tuple[Optional[nn.Parameter], Optional[nn.Parameter], Optional[nn.Parameter]]:
    """(cls token, distillation token, absolute position embedding), None where unused;
    truncated-normal init in that order."""
    dim0 = cfg.stages[0].dim
    cls_token = nn.Parameter(torch.zeros(1, 1, dim0)) if n_extra >= 1 else None
    dist_token = nn.Parameter(torch.zeros(1, 1, dim0)) if n_extra == 2 else None
    n_pos = grid[0] * grid[1] + n_extra
    pos_embed = nn.Parameter(torch.zeros(1, n_pos, dim0)) if cfg.position == "absolute" else None
    for p in (cls_token, dist_token, pos_embed):
        if p is not None:
            trunc_normal_(p, std=0.02)
    return cls_token, dist_token, pos_embed


class GraftModel(nn.Module):
    """Hybrid conv/transformer classifier assembled from a ModelConfig (see grafts/README.md).

    ``GraftModel(cfg, **overrides)``: ``cfg`` a ModelConfig or ``model`` dict; ``overrides``
    are config keys or timm's ``drop_path_rate`` / ``global_pool``."""

    def __init__(self, cfg: Union[ModelConfig, dict[str, Any], None] = None, **overrides: Any) -> None:
        super().__init__()
        cfg, global_pool = _resolve_config(cfg, overrides)
        L = layer_choices(cfg)
        self.config = cfg
        self.layers = L
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.img_size = cfg.img_size
        self.dynamic_img_size = cfg.dynamic_img_size
        self.has_transformer = cfg.has_transformer
        self.drop_rate = cfg.drop_rate
        self.global_pool = global_pool if global_pool is not None else ("token" if cfg.pool == "cls" else "avg")
        self.grad_checkpointing = False
        self.feature_info: list[dict[str, Any]] = []
        self.pretrained_cfg = self.default_cfg = default_pretrained_cfg(cfg)

        # --- conv part / token embedding
        self.prefix: Optional[ResNetPrefix] = _make_prefix(cfg)
        if self.prefix is not None:
            self.feature_info += self.prefix.feature_info()
        self.embed = self._make_embed(cfg, L)
        self.grid: Grid = cfg.token_grid()

        # --- extra tokens and absolute position
        self.n_extra = _n_extra_tokens(cfg)
        self.cls_token, self.dist_token, self.pos_embed = _make_tokens(cfg, self.grid, self.n_extra)
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        # --- transformer stages (a pure ResNet-50 has one empty stage)
        stages, stage_info = self._make_stages(cfg, L, self.n_extra)
        self.feature_info += stage_info
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cfg.stages[-1].dim
        self.norm = L.final_norm_layer(self.num_features) if L.final_norm_layer is not None else nn.Identity()
        self.head = make_head(self.num_features, cfg.num_classes, L.head_norm_layer, cfg.drop_rate)
        self.head_dist = (
            make_head(self.num_features, cfg.num_classes, L.head_norm_layer, cfg.drop_rate)
            if cfg.distillation
            else None
        )
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    @staticmethod
    def _make_embed(cfg: ModelConfig, L: LayerChoices) -> nn.Module:
        dim0 = cfg.stages[0].dim
        if not cfg.has_transformer:  # pure ResNet-50: the prefix map itself is the token grid
            return nn.Identity()
        if cfg.prefix_stages == 0:
            if cfg.patch == "vit":
                return VitPatch(cfg.in_chans, dim0, cfg.patch_size)
            return PatchConv(cfg.in_chans, dim0, act_layer=L.act_layer)  # conv+BN in every mode
        chs = ResNetPrefix.channels(cfg.prefix_stages)
        if cfg.bridge == "proj":
            return ProjBridge(chs, dim0, norm_layer=L.conv_norm_layer)
        s = PREFIX_STRIDES[cfg.prefix_stages]
        h, w = cfg.img_hw
        return PoolBridge(chs, dim0, cfg.token_grid(), (h // s, w // s), norm_layer=L.conv_norm_layer)

    @classmethod
    def _make_stages(cls, cfg: ModelConfig, L: LayerChoices, n_extra: int) -> tuple[list[Stage], list[dict[str, Any]]]:
        """The stages (downsample from the previous stage, then blocks) and the feature_info of
        each non-empty one; drop path ramps linearly over all downsamples and blocks."""
        res = cfg.stage_resolutions()
        n_blocks = sum(s.depth for s in cfg.stages) + (len(cfg.stages) - 1)
        dpr = [cfg.drop_path * i / max(n_blocks - 1, 1) for i in range(max(n_blocks, 1))]  # linear ramp
        reduction = cfg.token_stride[0]
        stages: list[Stage] = []
        info: list[dict[str, Any]] = []
        j = 0
        for i, s in enumerate(cfg.stages):
            down = None
            if i > 0 and cfg.downsample != "none":
                down = cls._make_downsample(cfg, L, i, res[i - 1], dpr[j])
                reduction *= 2
                j += 1
            blocks = cls._make_blocks(cfg, L, s, res[i], dpr[j : j + s.depth], n_extra)
            j += s.depth
            stages.append(Stage(down, blocks))
            if down is not None or blocks:
                info.append(dict(num_chs=s.dim, reduction=reduction, module=f"stages.{i}"))
        return stages, info

    @staticmethod
    def _make_blocks(
        cfg: ModelConfig, L: LayerChoices, s: StageConfig, res: Grid, drop_paths: list[float], n_extra: int
    ) -> list[nn.Module]:
        """The transformer blocks of stage ``s`` (one per drop path rate)."""
        attn = partial(
            Attention,
            key_dim=s.kd,
            heads=s.heads,
            attn_ratio=s.attn_ratio,
            norm_layer=L.linear_norm_layer,
            act_layer=L.attn_act_layer,
            pos_bias_layer=L.pos_bias_layer,
            qkv_bias=cfg.qkv_bias,
            zero_init=cfg.zero_init_residual,
            n_extra=n_extra,
        )
        mlp = partial(L.mlp_layer, mlp_ratio=s.mlp_ratio, act_layer=L.act_layer, zero_init=cfg.zero_init_residual)
        return [
            Block(s.dim, res, attn_layer=attn, mlp_layer=mlp, norm_layer=L.pre_norm_layer, drop_path=dp)
            for dp in drop_paths
        ]

    @staticmethod
    def _make_downsample(cfg: ModelConfig, L: LayerChoices, i: int, res: Grid, drop_path: float) -> nn.Module:
        prev, s = cfg.stages[i - 1], cfg.stages[i]
        if cfg.downsample == "shrink_attention":
            attn: Callable[..., nn.Module] = partial(
                SubsampleAttention,
                key_dim=prev.kd,
                heads=cfg.downsample_heads_for(i),
                attn_ratio=cfg.downsample_attn_ratio,
                norm_layer=L.linear_norm_layer,
                act_layer=L.attn_act_layer,
                pos_bias_layer=L.pos_bias_layer,
                qkv_bias=cfg.qkv_bias,
            )
        else:
            attn = partial(PoolProject, norm_layer=L.linear_norm_layer)
        mlp = partial(
            L.mlp_layer, mlp_ratio=cfg.downsample_mlp_ratio, act_layer=L.act_layer, zero_init=cfg.zero_init_residual
        )
        return Downsample(
            prev.dim, s.dim, res, attn_layer=attn, mlp_layer=mlp, norm_layer=L.pre_norm_layer, drop_path=drop_path
        )

    # ------------------------------------------------------------------ input size
    def _check_input(self, x: torch.Tensor) -> None:
        if self.dynamic_img_size or torch.jit.is_scripting():
            return
        want = self.config.img_hw
        got = (x.shape[-2], x.shape[-1])
        if got != want:
            raise ValueError(
                f"input size {got[0]}x{got[1]} does not match the model's img_size {want[0]}x{want[1]}; "
                f"build it with img_size=[{got[0]}, {got[1]}] (weights load and resize) or dynamic_img_size=true"
            )

    # ------------------------------------------------------------------ forward
    def _embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid, list[torch.Tensor]]:
        """Input -> (tokens with extra tokens and position, token grid, prefix feature maps)."""
        self._check_input(x)
        feats: list[torch.Tensor] = []
        if self.prefix is not None:
            x, feats = self.prefix(x, intermediates=True)
        x = self.embed(x)
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        extra = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if extra:
            x = torch.cat(extra + [x], dim=1)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if hw != self.grid:
                pos = resample_abs_pos_embed(pos, list(hw), list(self.grid), num_prefix_tokens=self.n_extra)
            x = x + pos
        return self.pos_drop(x), hw, feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) after the last stage and final norm (extra tokens first; for the pure
        ResNet-50 the 7x7 map as 49 tokens)."""
        x, hw, _ = self._embed_tokens(x)
        for stage in self.stages:
            x, hw = stage(x, hw)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features for the class head, features for the distillation head) by ``global_pool``."""
        if self.global_pool == "token":
            return x[:, 0], (x[:, 1] if self.dist_token is not None else x[:, 0])
        if self.global_pool == "avg":
            x = x[:, self.n_extra :].mean(dim=1)
        return x, x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (``pre_logits``) or logits (the mean of both heads when distilled)."""
        f_cls, f_dist = self.pool(x)
        if pre_logits:
            return f_cls
        cls = self.head(f_cls)
        return cls if self.head_dist is None else (cls + self.head_dist(f_dist)) / 2

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(class logits, distillation logits or None) - for hard distillation training."""
        f_cls, f_dist = self.pool(self.forward_features(x))
        return self.head(f_cls), (self.head_dist(f_dist) if self.head_dist is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm contract
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """timm's intermediate-feature API over ``feature_info`` (prefix layers, then stages):
        NCHW maps (extra tokens dropped); ``norm`` applies the final norm to stage outputs."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: {output_fmt!r}; allowed: 'NCHW'")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        stop = stop_early or intermediates_only
        out: list[torch.Tensor] = []
        x, hw, feats = self._embed_tokens(x)
        for i, f in enumerate(feats):
            if i in take:
                out.append(f)
        idx = len(feats)
        for stage in cast(list[Stage], list(self.stages)):
            if stop and idx > max_index:
                break
            x, hw = stage(x, hw)
            if not (isinstance(stage.downsample, nn.Identity) and len(stage.blocks) == 0):
                if idx in take:
                    t = self.norm(x) if norm else x
                    t = t[:, self.n_extra :]
                    out.append(t.reshape(t.shape[0], hw[0], hw[1], -1).permute(0, 3, 1, 2))
                idx += 1
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(
        self, indices: Union[int, list[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last wanted feature (and the head); returns the indices."""
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        n_prefix = len(self.prefix.feature_info()) if self.prefix is not None else 0
        keep = max(max_index - n_prefix + 1, 0)  # stages up to the last wanted one
        if keep < len(self.stages):
            self.stages = nn.Sequential(*list(self.stages)[:keep])
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True  # the head was sized for the last stage
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in cast(list[Stage], list(self.stages)):
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^(prefix|embed|cls_token|dist_token|pos_embed)",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def get_classifier(self) -> Union[nn.Module, tuple[nn.Module, nn.Module]]:
        return self.head if self.head_dist is None else (self.head, self.head_dist)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New head(s) for ``num_classes`` (0: identity, a feature extractor); ``global_pool``
        'avg' | 'token' (needs a cls token) | '' (no pooling)."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS or (global_pool == "token" and self.cls_token is None):
                allowed = "'avg', 'token', ''" if self.cls_token is not None else "'avg', '' (no cls token)"
                raise ValueError(f"global_pool: {global_pool!r}; allowed: {allowed}")
            self.global_pool = global_pool
        ref = next(self.parameters())
        with torch.device(ref.device):
            self.head = make_head(self.num_features, num_classes, self.layers.head_norm_layer, self.drop_rate)
            if self.head_dist is not None:
                self.head_dist = make_head(self.num_features, num_classes, self.layers.head_norm_layer, self.drop_rate)
        self.head.to(ref.dtype).train(self.training)
        if self.head_dist is not None:
            self.head_dist.to(ref.dtype).train(self.training)
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.pretrained_cfg = dict(self.pretrained_cfg, num_classes=num_classes)
        self.default_cfg = self.pretrained_cfg

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens, position embeddings and attention-bias tables are not decayed (timm convention)."""
        return {
            n
            for n, _ in self.named_parameters()
            if n in ("cls_token", "dist_token", "pos_embed") or n.endswith("pos_bias.table")
        }


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


def _create(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Zoo entry ``name`` through timm's ``build_model_with_cfg`` (the one builder of the family:
    pretrained_cfg, ``features_only`` via ``forward_intermediates``; ``checkpoint_path`` goes
    through the model's load filter)."""
    if pretrained:
        raise ValueError(
            f"grafts_{name}: no hub weights; pass checkpoint_path= (a grafts, timm LeViT, "
            "DeiT or ResNet-50 state dict) or use grafts.load_weights"
        )
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    if not kwargs.get("features_only"):
        kwargs.pop("out_indices", None)
    with torch.device("meta"):
        n_feats = len(
            GraftModel(
                zoo=name,
                **{k: v for k, v in kwargs.items() if k not in ("features_only", "out_indices", "feature_cls")},
            ).feature_info
        )
    model = build_model_with_cfg(
        GraftModel,
        f"grafts_{name}",
        pretrained=False,
        zoo=name,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(n_feats))),
        **kwargs,
    )
    inner = getattr(model, "model", model)  # features_only: a FeatureGetterNet around the model
    own = default_pretrained_cfg(inner.config)
    model.pretrained_cfg = model.default_cfg = dict(
        model.pretrained_cfg, **{k: own[k] for k in ("input_size", "num_classes", "fixed_input_size")}
    )
    return model


def _make_entrypoint(name: str) -> Callable[..., nn.Module]:
    def fn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    fn.__name__ = f"grafts_{name}"
    fn.__qualname__ = fn.__name__
    fn.__module__ = __name__
    fn.__doc__ = f"grafts zoo entry {name!r} (see grafts/README.md)."
    return fn


def register_timm() -> None:
    """Register every zoo entry as ``grafts_<name>`` in timm with its pretrained_cfg (idempotent)."""
    mod = sys.modules[__name__]
    if not hasattr(mod, "default_cfgs"):  # read by timm's register_model
        mod.default_cfgs = generate_default_cfgs(  # type: ignore[attr-defined]
            {f"grafts_{n}": default_pretrained_cfg(config_from_dict({"zoo": n})) for n in ZOO}
        )
    for name in ZOO:
        fn = _make_entrypoint(name)
        setattr(mod, fn.__name__, fn)
        if not is_model(fn.__name__):
            register_model(fn)
