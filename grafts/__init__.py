"""grafts: compose hybrid conv/transformer vision models (LeViT, DeiT, ResNet-50 grafts)
from switchable parts; count params/MACs; fold BatchNorm; load timm LeViT weights.

Importing registers every zoo entry in timm as ``grafts_<name>``.
"""

from .build import GraftModel, LayerChoices, build, layer_choices, register_timm
from .checkpoint import LoadReport, checkpoint_filter_fn, load_weights
from .config import (
    GraftConfigError,
    ModelConfig,
    PrefixConfig,
    StageConfig,
    config_from_dict,
    config_to_dict,
    zoo_config,
)
from .fuse import fuse
from .measure import count_macs, count_macs_split, count_params
from .timm_keymap import load_timm_levit, map_timm_levit_key, map_timm_levit_state_dict
from .zoo import zoo_names

register_timm()

__all__ = [
    "LayerChoices",
    "LoadReport",
    "checkpoint_filter_fn",
    "layer_choices",
    "load_weights",
    "GraftConfigError",
    "GraftModel",
    "ModelConfig",
    "PrefixConfig",
    "StageConfig",
    "build",
    "config_from_dict",
    "config_to_dict",
    "count_macs",
    "count_macs_split",
    "count_params",
    "fuse",
    "load_timm_levit",
    "map_timm_levit_key",
    "map_timm_levit_state_dict",
    "zoo_config",
    "zoo_names",
]
