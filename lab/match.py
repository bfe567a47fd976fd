"""Runtime matching (spec `match:` section): size a variant to another's inference throughput
before training. `match_throughput` measures each candidate value of `match.vary` and picks the
one nearest the target; the measurement function is injectable so it can be tested on a cost
model (`default_match_measure` takes short real measurements with lab.bench)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from lab import record as R
from lab.bench import measure_throughput
from lab.device import resolve_device
from lab.errors import LabError
from lab.models import build_model, model_img_size, resolve_model, zoo_config


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _get_dotted(d: Any, parts: list[str]) -> Any:
    node = d
    for p in parts:
        if isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            raise KeyError(p)
    return node


def _set_dotted(d: Any, parts: list[str], value: Any) -> None:
    parent = _get_dotted(d, parts[:-1])
    last = parts[-1]
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value


@dataclass
class MatchResult:
    variant: Any  # the sized Variant
    value: int  # chosen candidate
    target: str  # what was matched (variant key or zoo name)
    target_imgs_per_s: float
    candidates: dict[int, float]  # value -> measured images/s
    miss_pct: float  # (chosen - target) / target * 100

    def describe(self) -> str:
        return (
            f"{self.variant.tags.get(R.match_tag('vary'))}={self.value}: {self.candidates[self.value]:.1f} img/s vs "
            f"{self.target} {self.target_imgs_per_s:.1f} img/s (misses by {self.miss_pct:+.1f}%)"
        )


MeasureFn = Callable[..., float]


def default_match_measure(bench=None, *, warmup: float = 0.3, duration: float = 0.5, repeats: int = 3) -> MeasureFn:
    """measure_fn(model_cfg_dict, device=) -> median images/s: short real measurements."""

    def fn(model_cfg: Mapping[str, Any], *, device: str = "cpu") -> float:
        m = build_model(model_cfg)
        kw = {}
        if bench is not None:
            kw = {
                "threads": bench.threads,
                "batch": bench.batch,
                "dtype": bench.dtype,
                "channels_last": bench.channels_last,
                "max_batch": bench.max_batch,
            }
        return measure_throughput(
            m, img_size=model_img_size(m), device=device, warmup=warmup, duration=duration, repeats=repeats, **kw
        ).images_per_s_median

    return fn


def _match_error(variant, message: str, field: Optional[str] = None) -> LabError:
    """A LabError at the variant's `match` section (or its `field`), in the variant's spec file."""
    where = f"variants.{variant.key}.match"
    return LabError(message, file=getattr(variant, "source", None) or None, path=f"{where}.{field}" if field else where)


def _vary_path(variant) -> list[str]:
    """`match.vary` split into parts; it must name an integer field of the resolved model."""
    m = variant.match
    parts = m.vary.split(".")
    if parts[0] != "model" or len(parts) < 2:
        raise _match_error(
            variant,
            f"vary must be a dotted path into the model section, e.g. model.stages.0.depth (got '{m.vary}')",
            "vary",
        )
    try:
        current = _get_dotted(variant.model, parts[1:])
    except KeyError as e:
        raise _match_error(
            variant, f"'{m.vary}' does not exist in the resolved model (no '{e.args[0]}')", "vary"
        ) from None
    if isinstance(current, bool) or not isinstance(current, int):
        raise _match_error(variant, f"'{m.vary}' is {current!r}, not an integer", "vary")
    return parts


def _target_config(variant, variants: Iterable) -> dict:
    """The model config of `match.throughput_of`: another variant's, else a grafts zoo entry's."""
    m = variant.match
    by_key = {v.key: v for v in variants}
    if m.throughput_of == variant.key:
        raise _match_error(variant, "a variant cannot match its own throughput", "throughput_of")
    if m.throughput_of in by_key:
        return copy.deepcopy(by_key[m.throughput_of].model)
    try:
        return zoo_config(m.throughput_of)
    except LabError as e:
        raise _match_error(
            variant,
            f"'{m.throughput_of}' is neither a variant ({', '.join(by_key) or 'none'}) nor a zoo model: {e.message}",
            "throughput_of",
        ) from None


def _candidate_config(variant, parts: list[str], value: int) -> dict:
    """The variant's model with `match.vary` set to ``value``, validated by grafts."""
    cfg = copy.deepcopy(variant.model)
    _set_dotted(cfg, parts[1:], int(value))
    try:
        return resolve_model(cfg)
    except Exception as e:  # noqa: BLE001 - grafts.GraftConfigError and friends
        raise _match_error(
            variant, f"{variant.match.vary}={value} is not a valid model: {getattr(e, 'message', e)}", "values"
        ) from None


def _measure_candidates(
    variant, parts: list[str], measure_fn: MeasureFn, device: str, say: Callable[[str], None]
) -> tuple[dict[int, dict], dict[int, float]]:
    """(config, images/s) of every distinct `match.values` candidate, in order."""
    m = variant.match
    cands: dict[int, float] = {}
    cfgs: dict[int, dict] = {}
    for value in dict.fromkeys(m.values):
        cfgs[value] = _candidate_config(variant, parts, value)
        cands[value] = float(measure_fn(cfgs[value], device=device))
        say(f"match {variant.key}: {m.vary}={value}: {cands[value]:.1f} img/s")
    return cfgs, cands


def _matched(variant, cfgs: dict[int, dict], cands: dict[int, float], target_ips: float, device: str) -> MatchResult:
    """The result for the candidate nearest the target: the sized variant with its `match.*` tags."""
    from lab.spec import with_model

    m = variant.match
    best = min(cands, key=lambda v: abs(cands[v] - target_ips))
    miss = (cands[best] - target_ips) / target_ips * 100.0
    tags = dict(variant.tags) | {
        R.match_tag(k): v
        for k, v in {
            "throughput_of": m.throughput_of,
            "vary": m.vary,
            "value": str(best),
            "device": device,
            "target_imgs_per_s": f"{target_ips:.2f}",
            "imgs_per_s": f"{cands[best]:.2f}",
            "miss_pct": f"{miss:+.2f}",
        }.items()
    }
    out = with_model(variant, cfgs[best], match=None, tags=tags)
    return MatchResult(
        variant=out, value=best, target=m.throughput_of, target_imgs_per_s=target_ips, candidates=cands, miss_pct=miss
    )


def match_throughput(
    variant,
    variants: Iterable = (),
    *,
    measure_fn: Optional[MeasureFn] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> MatchResult:
    """Pick `match.values` candidate for `match.vary` whose throughput is nearest the target's.

    The target is `match.throughput_of`: another variant's key, else a grafts zoo name. Every
    candidate config is validated by grafts before it is measured; the returned variant has the
    value set, its content hash recomputed, `match` cleared and `match.*` tags recording it.
    """
    m = variant.match
    if m is None:
        raise _match_error(variant, "variant has no match section")
    parts = _vary_path(variant)
    target_cfg = _target_config(variant, variants)
    if measure_fn is None:
        measure_fn = default_match_measure(getattr(variant, "bench", None))
    say = progress or (lambda s: None)
    device = resolve_device(m.device)

    target_ips = float(measure_fn(target_cfg, device=device))
    say(f"match {variant.key}: target {m.throughput_of}: {target_ips:.1f} img/s")
    cfgs, cands = _measure_candidates(variant, parts, measure_fn, device, say)
    return _matched(variant, cfgs, cands, target_ips, device)


def resolve_match(
    variant,
    variants: Iterable = (),
    *,
    measure_fn: Optional[MeasureFn] = None,
    progress: Optional[Callable[[str], None]] = None,
):
    """The variant sized by its `match` section (unchanged if it has none). Prints the miss to stderr."""
    if variant.match is None:
        return variant
    say = progress or _stderr
    r = match_throughput(variant, variants, measure_fn=measure_fn, progress=say)
    say(f"match {variant.key}: {r.describe()}")
    return r.variant
