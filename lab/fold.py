"""BatchNorm folding before inference: grafts models fold with grafts.fuse, other models (timm
baselines) with timm's own `fuse()` and torch's conv-bn folding (`prepare_for_inference`)."""

from __future__ import annotations

from typing import Any


def _set_module(root, name: str, new) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def fold_batchnorm(model) -> tuple[Any, int]:
    """Fold BatchNorm into the preceding layer for models that are not grafts (timm baselines).

    Uses timm's own `fuse()` (LeViT ConvNorm / LinearNorm / NormLinear) and torch's
    `fuse_conv_bn_eval` for Conv2d -> BatchNorm2d pairs that are certainly applied in sequence
    (adjacent in an nn.Sequential; convN/bnN in timm ResNet blocks). Returns (model, folded).
    """
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    folded = 0
    replaced: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or any(name.startswith(p + ".") for p in replaced):
            continue
        if callable(getattr(mod, "fuse", None)) and any(isinstance(c, bn_types) for c in mod.children()):
            new = mod.fuse()
            if isinstance(new, nn.Module):
                _set_module(model, name, new)
                replaced.append(name)
                folded += 1
    for _name, mod in list(model.named_modules()):
        pairs: list[tuple[str, str]] = []
        kids = list(mod._modules.items())
        if isinstance(mod, nn.Sequential):
            pairs = [
                (a, b)
                for (a, ma), (b, mb) in zip(kids, kids[1:])
                if type(ma) is nn.Conv2d and type(mb) is nn.BatchNorm2d
            ]
        elif type(mod).__module__.startswith("timm.models.resnet"):
            names = dict(kids)
            pairs = [
                (n, "bn" + n[4:])
                for n in names
                if n.startswith("conv")
                and type(names[n]) is nn.Conv2d
                and type(names.get("bn" + n[4:])) is nn.BatchNorm2d
            ]
        for a, b in pairs:
            conv, bn = mod._modules[a], mod._modules[b]
            if conv.out_channels != bn.num_features:
                continue
            mod._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
            mod._modules[b] = nn.Identity()
            folded += 1
    return model, folded


def _is_grafts_model(model) -> bool:
    return type(model).__module__.split(".")[0] == "grafts"


def prepare_for_inference(model) -> tuple[Any, bool, str]:
    """eval() + BatchNorm folded. Returns (model, fused: no BN left, how)."""
    import torch.nn as nn

    model = model.eval()
    if _is_grafts_model(model):
        import grafts

        model = grafts.fuse(model).eval()
        how = "grafts.fuse"
    else:
        model, n = fold_batchnorm(model)
        model = model.eval()
        how = f"timm fuse()/conv-bn fold ({n} folded)" if n else "none needed"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if left:
        how += f"; {left} BatchNorm left in eval mode"
    elif how == "none needed":
        how = "no BatchNorm to fold"
    return model, left == 0, how
