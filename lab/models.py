"""Models by name or config for benchmarking and matching: build a grafts config, its complexity,
its input size, the zoo config of a name, and the timm model with the same architecture."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from lab.errors import LabError, close_matches

# grafts zoo name -> timm model name, for `bench --compare timm`
TIMM_EQUIVALENT = {
    "levit_128s": "levit_128s",
    "levit_128": "levit_128",
    "levit_192": "levit_192",
    "levit_256": "levit_256",
    "levit_384": "levit_384",
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "resnet50": "resnet50",
}


def model_img_size(model, default: int = 224) -> int:
    """The input resolution a model (grafts or timm) expects."""
    size = getattr(model, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = (cfg.get("input_size") or (3, default, default))[-1]
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def build_model(cfg: Mapping[str, Any]):
    """A grafts model on the CPU (moved to the bench device by the measurement)."""
    import grafts

    return grafts.build(copy.deepcopy(dict(cfg)))


def complexity(cfg: Mapping[str, Any], model=None) -> tuple[int, int]:
    """(params, MACs per image) of a grafts config (params of `model` when given, before folding)."""
    import grafts

    c = grafts.config_from_dict(copy.deepcopy(dict(cfg)))
    if model is None:
        model = grafts.build(c)
    return int(grafts.count_params(model)), int(grafts.count_macs(c))


def resolve_model(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A grafts config dict validated and resolved by grafts (zoo defaults filled in)."""
    import grafts

    return grafts.config_to_dict(grafts.config_from_dict(dict(cfg)))


def timm_equivalent(cfg: Mapping[str, Any]) -> Optional[str]:
    """The timm model with the same architecture as this grafts config (ignoring `zoo`), if any."""

    def arch(c):
        d = resolve_model(c)
        d.pop("zoo", None)
        return d

    try:
        mine = arch(cfg)
    except Exception:  # noqa: BLE001
        return None
    zoo = cfg.get("zoo")
    for z in ([zoo] if zoo in TIMM_EQUIVALENT else []) + list(TIMM_EQUIVALENT):
        try:
            if arch(zoo_config(z)) == mine:
                return TIMM_EQUIVALENT[z]
        except Exception:  # noqa: BLE001 - a zoo entry grafts lacks
            continue
    return None


def zoo_config(name: str) -> dict[str, Any]:
    """The grafts zoo config of `name`; a LabError naming the zoo when it is unknown."""
    import grafts

    names = list(grafts.zoo_names())
    if name not in names:
        raise LabError(f"unknown model '{name}'{close_matches(name, names)}; zoo: {', '.join(names)}")
    return dict(grafts.zoo_config(name))


def create_timm(name: str, num_classes: Optional[int] = None):
    """A timm model without weights (no network)."""
    import timm

    kw = {"num_classes": num_classes} if num_classes else {}
    return timm.create_model(name, pretrained=False, **kw)
