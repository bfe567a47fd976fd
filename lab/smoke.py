"""`--smoke`: the same architectures and training recipe (augmentation, distillation, schedule
shape), shrunk to the embedded data at 32 px, 20 steps, one CPU process, no data workers and the
local launcher. `SMOKE` is the override merged into a spec; `smoke_variant` shrinks a resolved
variant's model to the smoke resolution."""

from __future__ import annotations

from typing import Any

SMOKE: dict[str, Any] = {
    "data": {
        "dataset": "embedded",
        "root": None,
        "image_size": 32,
        "batch_size": 32,
        "eval_batch_size": 250,
        "num_workers": 0,
    },
    "budget": {"epochs": None, "steps": 20, "images": None, "train_flops": None, "seconds": None, "wall_clock": False},
    "train": {
        "eval_every": 10,
        "accelerator": "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": "auto",
        "compile": False,
    },
    "launch": {"launcher": "local"},
    "seeds": None,  # one seed unless --seeds asks for more
}


def smoke_variant(v):
    """Shrink a resolved variant's model to the smoke resolution (keeps its architecture)."""
    import grafts
    from lab.record import SMOKE as SMOKE_TAG
    from lab.spec import config_hash, plain, with_model

    model = dict(v.model)
    model.update(img_size=32, num_classes=10)
    if model.get("grid") is not None or (model.get("prefix") or {}).get("stages"):
        model["grid"] = 2
    model = grafts.config_to_dict(grafts.config_from_dict(model))
    out = with_model(v, model, tags={**v.tags, SMOKE_TAG: "true"})
    resolved = {s: plain(getattr(out, s)) for s in ("data", "train", "budget")} | {"model": model}
    return out.model_copy(update={"config_hash": config_hash(resolved)})


def load_spec(path: str, sets: list[str] | None = None, smoke: bool = False, seeds: int | None = None):
    """A spec file with `--set PATH=VALUE` overrides, `--seeds N` (and the smoke shrink on top when asked)."""
    from lab import spec as S
    from lab.errors import LabError

    over = S.parse_set(sets)
    if seeds is not None:
        if seeds < 1:
            raise LabError(f"--seeds must be >= 1 (got {seeds})")
        over = S.deep_merge(over, {"seeds": seeds})
    if smoke:
        over = S.deep_merge(SMOKE, over)
    return S.load_spec(path, over)


def expand(path: str, sets: list[str] | None = None, smoke: bool = False, seeds: int | None = None):
    """(spec, variants) of a spec file, as `lab show/run/bench SPEC [--set ...] [--smoke] [--seeds N]` see them."""
    from lab import spec as S

    spec = load_spec(path, sets, smoke, seeds)
    variants = S.expand(spec)
    if smoke:
        variants = [smoke_variant(v) for v in variants]
    return spec, variants
