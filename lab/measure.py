"""Inference throughput after the LeViT paper's speed test, the `bench` subcommand, runtime matching.

Protocol (paper, official repo): eval mode, BatchNorm folded into the preceding layer,
`torch.inference_mode`, random input at the model's resolution, warmup, then timed forwards
with a device sync after each one; images/s = batch * iterations / elapsed, per repeat, and we
report min/median/max over repeats. CPU: fp32, 1 thread, batch 16. GPU: autocast (bf16 by
default, fp16 on request), the largest power-of-two batch that fits (`find_max_batch`).

`measure_many` times several models with their repeats interleaved (A B, B A, ...), so that
`bench --compare timm` puts ours and timm's under the same machine conditions.

`resolve_match` sizes a variant to the throughput of another (spec `match:` section) before
training; its measurement function is injectable so it can be tested on a cost model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from lab.errors import LabError, close_matches

CPU_BATCH = 16
DTYPES = ("fp32", "bf16", "fp16")
# grafts zoo name -> timm model name, for `bench --compare timm`
TIMM_EQUIVALENT = {
    "levit_128s": "levit_128s", "levit_128": "levit_128", "levit_192": "levit_192",
    "levit_256": "levit_256", "levit_384": "levit_384",
    "deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224",
    "resnet50": "resnet50",
}


class BatchSearchError(LabError):
    """Not even batch 1 fits on the device (or under the memory cap)."""


# --------------------------------------------------------------------------- results


@dataclass
class ThroughputResult:
    """Images per second over `repeats` timed windows, with what is needed to interpret them."""

    images_per_s_min: float
    images_per_s_median: float
    images_per_s_max: float
    samples: list[float]
    batch: int
    dtype: str
    device: str              # 'cpu' | 'cuda' (the metric key)
    device_name: str         # CPU model string / GPU name
    threads: int
    torch_version: str
    compiled: bool
    channels_last: bool
    img_size: int
    fused: bool = True       # no BatchNorm left un-folded in the measured model
    fusion: str = ""         # how it was folded: grafts.fuse / timm fuse() + conv-bn / nothing to fold
    warmup_s: float = 0.0
    duration_s: float = 0.0
    repeats: int = 0
    iterations: list[int] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images_per_s_median

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def metadata(self) -> dict[str, str]:
        """The context a figure must travel with (MLflow tags `bench.<device>.*`)."""
        return {"device_name": self.device_name, "dtype": self.dtype, "batch": str(self.batch),
                "threads": str(self.threads), "torch": self.torch_version, "compiled": str(self.compiled),
                "channels_last": str(self.channels_last), "fused": str(self.fused), "fusion": self.fusion,
                "img_size": str(self.img_size), "repeats": str(self.repeats), "duration_s": f"{self.duration_s:g}"}


def _summarise(samples: list[float], iters: list[int], **meta) -> ThroughputResult:
    return ThroughputResult(images_per_s_min=min(samples), images_per_s_median=statistics.median(samples),
                            images_per_s_max=max(samples), samples=list(samples), iterations=list(iters), **meta)


# --------------------------------------------------------------------------- devices


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise LabError(f"unknown device '{device}'; allowed: cpu, cuda, auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise LabError("device 'cuda' requested but torch sees no GPU (use --device cpu or auto)")
    return device


def device_name(device: str) -> str:
    """'AMD EPYC 7R13 Processor' / 'NVIDIA H100 80GB HBM3': where the figure was measured."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_dtype(device: str) -> str:
    return "bf16" if device == "cuda" else "fp32"


def _autocast(device: str, dtype: str):
    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


# --------------------------------------------------------------------------- BatchNorm folding


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
    for name, mod in list(model.named_modules()):
        pairs: list[tuple[str, str]] = []
        kids = list(mod._modules.items())
        if isinstance(mod, nn.Sequential):
            pairs = [(a, b) for (a, ma), (b, mb) in zip(kids, kids[1:])
                     if type(ma) is nn.Conv2d and type(mb) is nn.BatchNorm2d]
        elif type(mod).__module__.startswith("timm.models.resnet"):
            names = dict(kids)
            pairs = [(n, "bn" + n[4:]) for n in names if n.startswith("conv") and type(names[n]) is nn.Conv2d
                     and type(names.get("bn" + n[4:])) is nn.BatchNorm2d]
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


# --------------------------------------------------------------------------- batch search


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def find_max_batch(try_fn: Callable[[int], Optional[int]], max_batch: int = 2048,
                   mem_cap_bytes: Optional[int] = None) -> int:
    """Largest power of two <= max_batch for which `try_fn(batch)` fits.

    `try_fn` runs the model at that batch and returns its peak memory in bytes (or None when
    unknown); an out-of-memory error, or a peak above `mem_cap_bytes`, means it does not fit.
    Memory grows with the batch, so the search doubles from 1 and stops at the first misfit.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    best = 0
    last_reason = ""
    b = 1
    while b <= max_batch:
        try:
            peak = try_fn(b)
        except Exception as e:  # noqa: BLE001 - only OOM means "too big"; anything else is a bug
            if not is_oom(e):
                raise
            last_reason = f"out of memory at batch {b}"
            break
        if mem_cap_bytes is not None and peak is not None and peak > mem_cap_bytes:
            last_reason = f"batch {b} needs {peak / 2**20:.1f} MiB > cap {mem_cap_bytes / 2**20:.1f} MiB"
            break
        best = b
        b *= 2
    if best == 0:
        raise BatchSearchError(f"no batch size fits, not even 1 ({last_reason}); lower the resolution, "
                               f"raise the memory cap or use another device")
    return best


# --------------------------------------------------------------------------- timing


class _Timed:
    """One prepared model: fused, on device, input ready; `window(seconds)` -> (iterations, elapsed)."""

    def __init__(self, model, *, img_size: int, device: str, batch: Optional[int], dtype: str, channels_last: bool,
                 compile: bool, max_batch: int, mem_cap_bytes: Optional[int]):
        import torch

        self.device = device
        self.dtype = dtype
        model, self.fused, self.fusion = prepare_for_inference(model)
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.img_size = img_size
        self.channels_last = channels_last
        if batch is None:
            batch = CPU_BATCH if device == "cpu" else find_max_batch(self._try_batch, max_batch, mem_cap_bytes)
        self.batch = batch
        self.x = self._input(batch)
        self.forward = torch.compile(model) if compile else model
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def _input(self, batch: int):
        import torch

        x = torch.randn(batch, 3, self.img_size, self.img_size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _try_batch(self, batch: int) -> Optional[int]:
        import torch

        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode(), _autocast(self.device, self.dtype):
                self.model(self._input(batch))
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        except Exception as e:  # noqa: BLE001
            if is_oom(e):
                torch.cuda.empty_cache()
            raise

    def step(self) -> None:
        self.forward(self.x)
        self.sync()

    def window(self, seconds: float, min_iters: int = 1) -> tuple[int, float]:
        import torch

        with torch.inference_mode(), _autocast(self.device, self.dtype):
            self.sync()
            n = 0
            t0 = time.perf_counter()
            while True:
                self.step()
                n += 1
                el = time.perf_counter() - t0
                if el >= seconds and n >= min_iters:
                    return n, el


@contextlib.contextmanager
def _threads(device: str, threads: Optional[int]):
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def measure_many(models: Mapping[str, Any], *, img_size: int | Mapping[str, int], device: str = "cpu",
                 batch: Optional[int] = None, dtype: Optional[str] = None, threads: Optional[int] = 1,
                 warmup: float = 1.0, duration: float = 3.0, repeats: int = 3, channels_last: bool = False,
                 compile: bool = False, max_batch: int = 2048, mem_cap_bytes: Optional[int] = None,
                 progress: Optional[Callable[[str], None]] = None) -> dict[str, ThroughputResult]:
    """Time several models with interleaved repeats (ABAB.., order reversed every other repeat).

    On GPU without an explicit batch each model gets its own largest power-of-two batch; the
    models are then compared at the smaller of them so that the ratio is like for like.
    """
    import torch

    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPES:
        raise LabError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    if repeats < 1 or duration <= 0:
        raise LabError("need repeats >= 1 and duration > 0")
    sizes = img_size if isinstance(img_size, Mapping) else {k: img_size for k in models}
    name = device_name(device)
    with _threads(device, threads) as n_threads:
        timed = {k: _Timed(m, img_size=int(sizes[k]), device=device, batch=batch, dtype=dtype,
                           channels_last=channels_last, compile=compile, max_batch=max_batch,
                           mem_cap_bytes=mem_cap_bytes) for k, m in models.items()}
        if batch is None and len({t.batch for t in timed.values()}) > 1:
            common = min(t.batch for t in timed.values())
            for t in timed.values():
                t.batch, t.x = common, t._input(common)
        for k, t in timed.items():
            if progress:
                progress(f"  warmup {k}: {warmup:g}s at batch {t.batch}")
            t.window(warmup)
        samples: dict[str, list[float]] = {k: [] for k in timed}
        iters: dict[str, list[int]] = {k: [] for k in timed}
        order = list(timed)
        rewarm = min(warmup, 0.1 * duration) if len(order) > 1 else 0.0
        for r in range(repeats):
            for k in (order if r % 2 == 0 else order[::-1]):
                t = timed[k]
                if rewarm:  # caches were just used by the other model
                    t.window(rewarm)
                n, el = t.window(duration)
                samples[k].append(t.batch * n / el)
                iters[k].append(n)
                if progress:
                    progress(f"  {k}: repeat {r + 1}/{repeats}: {samples[k][-1]:.1f} img/s ({n} iters)")
        out = {}
        for k, t in timed.items():
            out[k] = _summarise(samples[k], iters[k], batch=t.batch, dtype=dtype, device=device, device_name=name,
                                threads=n_threads if device == "cpu" else torch.get_num_threads(),
                                torch_version=torch.__version__, compiled=compile, channels_last=channels_last,
                                img_size=t.img_size, fused=t.fused, fusion=t.fusion, warmup_s=warmup,
                                duration_s=duration, repeats=repeats)
    return out


def measure_throughput(model, *, img_size: int, device: str = "cpu", batch: Optional[int] = None,
                       dtype: Optional[str] = None, threads: Optional[int] = 1, warmup: float = 1.0,
                       duration: float = 3.0, repeats: int = 3, channels_last: bool = False, compile: bool = False,
                       max_batch: int = 2048, mem_cap_bytes: Optional[int] = None,
                       progress: Optional[Callable[[str], None]] = None) -> ThroughputResult:
    """Inference images/s of one model under the paper's protocol (see module docstring).

    The model is put in eval mode and BatchNorm-folded in place (grafts.fuse for grafts models,
    timm/torch folding otherwise); pass a copy if you still need the unfused one.
    """
    return measure_many({"model": model}, img_size=img_size, device=device, batch=batch, dtype=dtype,
                        threads=threads, warmup=warmup, duration=duration, repeats=repeats,
                        channels_last=channels_last, compile=compile, max_batch=max_batch,
                        mem_cap_bytes=mem_cap_bytes, progress=progress)["model"]


# --------------------------------------------------------------------------- models by name / config


def model_img_size(model, default: int = 224) -> int:
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
            if arch(_zoo_config(z)) == mine:
                return TIMM_EQUIVALENT[z]
        except Exception:  # noqa: BLE001 - a zoo entry grafts lacks
            continue
    return None


def _zoo_config(name: str) -> dict[str, Any]:
    import grafts

    names = list(grafts.zoo_names())
    if name not in names:
        raise LabError(f"unknown model '{name}'{close_matches(name, names)}; zoo: {', '.join(names)}")
    return dict(grafts.zoo_config(name))


def create_timm(name: str, num_classes: Optional[int] = None):
    import timm

    kw = {"num_classes": num_classes} if num_classes else {}
    return timm.create_model(name, pretrained=False, **kw)


# --------------------------------------------------------------------------- runtime matching


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
    variant: Any                 # the sized Variant
    value: int                   # chosen candidate
    target: str                  # what was matched (variant key or zoo name)
    target_imgs_per_s: float
    candidates: dict[int, float]  # value -> measured images/s
    miss_pct: float              # (chosen - target) / target * 100

    def describe(self) -> str:
        return (f"{self.variant.tags.get('match.vary')}={self.value}: {self.candidates[self.value]:.1f} img/s vs "
                f"{self.target} {self.target_imgs_per_s:.1f} img/s (misses by {self.miss_pct:+.1f}%)")


MeasureFn = Callable[..., float]


def default_match_measure(bench=None, *, warmup: float = 0.3, duration: float = 0.5, repeats: int = 3) -> MeasureFn:
    """measure_fn(model_cfg_dict, device=) -> median images/s: short real measurements."""
    def fn(model_cfg: Mapping[str, Any], *, device: str = "cpu") -> float:
        m = build_model(model_cfg)
        kw = {}
        if bench is not None:
            kw = {"threads": bench.threads, "batch": bench.batch, "dtype": bench.dtype,
                  "channels_last": bench.channels_last, "max_batch": bench.max_batch}
        return measure_throughput(m, img_size=model_img_size(m), device=device, warmup=warmup,
                                  duration=duration, repeats=repeats, **kw).images_per_s_median
    return fn


def match_throughput(variant, variants: Iterable = (), *, measure_fn: Optional[MeasureFn] = None,
                     validate: bool = True, progress: Optional[Callable[[str], None]] = None) -> MatchResult:
    """Pick `match.values` candidate for `match.vary` whose throughput is nearest the target's.

    The target is `match.throughput_of`: another variant's key, else a grafts zoo name. Every
    candidate config is validated by grafts before it is measured; the returned variant has the
    value set, its content hash recomputed, `match` cleared and `match.*` tags recording it.
    """
    from lab import spec as S

    m = variant.match
    file = getattr(variant, "source", None) or None
    where = f"variants.{variant.key}.match"
    if m is None:
        raise LabError("variant has no match section", file=file, path=where)
    parts = m.vary.split(".")
    if parts[0] != "model" or len(parts) < 2:
        raise LabError(f"vary must be a dotted path into the model section, e.g. model.stages.0.depth "
                       f"(got '{m.vary}')", file=file, path=f"{where}.vary")
    try:
        current = _get_dotted(variant.model, parts[1:])
    except KeyError as e:
        raise LabError(f"'{m.vary}' does not exist in the resolved model (no '{e.args[0]}')",
                       file=file, path=f"{where}.vary") from None
    if isinstance(current, bool) or not isinstance(current, int):
        raise LabError(f"'{m.vary}' is {current!r}, not an integer", file=file, path=f"{where}.vary")

    by_key = {v.key: v for v in variants}
    if m.throughput_of == variant.key:
        raise LabError("a variant cannot match its own throughput", file=file, path=f"{where}.throughput_of")
    if m.throughput_of in by_key:
        target_cfg = copy.deepcopy(by_key[m.throughput_of].model)
    else:
        try:
            target_cfg = _zoo_config(m.throughput_of)
        except LabError as e:
            raise LabError(f"'{m.throughput_of}' is neither a variant ({', '.join(by_key) or 'none'}) "
                           f"nor a zoo model: {e.message}", file=file, path=f"{where}.throughput_of") from None
    if measure_fn is None:
        measure_fn = default_match_measure(getattr(variant, "bench", None))
    say = progress or (lambda s: None)
    device = resolve_device(m.device)

    target_ips = float(measure_fn(target_cfg, device=device))
    say(f"match {variant.key}: target {m.throughput_of}: {target_ips:.1f} img/s")
    cands: dict[int, float] = {}
    cfgs: dict[int, dict] = {}
    for value in dict.fromkeys(m.values):
        cfg = copy.deepcopy(variant.model)
        _set_dotted(cfg, parts[1:], int(value))
        if validate:
            try:
                cfg = resolve_model(cfg)
            except Exception as e:  # noqa: BLE001 - grafts.GraftConfigError and friends
                raise LabError(f"{m.vary}={value} is not a valid model: {getattr(e, 'message', e)}",
                               file=file, path=f"{where}.values") from None
        cfgs[value] = cfg
        cands[value] = float(measure_fn(cfg, device=device))
        say(f"match {variant.key}: {m.vary}={value}: {cands[value]:.1f} img/s")
    best = min(cands, key=lambda v: abs(cands[v] - target_ips))
    miss = (cands[best] - target_ips) / target_ips * 100.0
    model = cfgs[best]
    resolved = {s: S._plain(getattr(variant, s)) for s in ("data", "train", "budget")} | {"model": model}
    tags = dict(variant.tags) | {
        "match.throughput_of": m.throughput_of, "match.vary": m.vary, "match.value": str(best),
        "match.device": device, "match.target_imgs_per_s": f"{target_ips:.2f}",
        "match.imgs_per_s": f"{cands[best]:.2f}", "match.miss_pct": f"{miss:+.2f}",
    }
    out = variant.model_copy(update={"model": model, "hash": S.content_hash(resolved), "match": None, "tags": tags})
    return MatchResult(variant=out, value=best, target=m.throughput_of, target_imgs_per_s=target_ips,
                       candidates=cands, miss_pct=miss)


def resolve_match(variant, variants: Iterable = (), *, measure_fn: Optional[MeasureFn] = None,
                  progress: Optional[Callable[[str], None]] = None, quiet: bool = False, validate: bool = True):
    """The variant sized by its `match` section (unchanged if it has none). Prints the miss to stderr."""
    if variant.match is None:
        return variant
    say = progress or ((lambda s: None) if quiet else _stderr)
    r = match_throughput(variant, variants, measure_fn=measure_fn, progress=say, validate=validate)
    say(f"match {variant.key}: {r.describe()}")
    return r.variant


# --------------------------------------------------------------------------- MLflow


def bench_record(result: ThroughputResult, timm: Optional[ThroughputResult] = None,
                 timm_name: Optional[str] = None) -> tuple[dict[str, float], dict[str, str]]:
    """The MLflow metrics (bench/<device>_imgs_per_s, _min, _max, ...) and tags (bench.<device>.*) of a result."""
    d = result.device
    metrics = {f"bench/{d}_imgs_per_s": result.images_per_s_median, f"bench/{d}_imgs_per_s_min": result.images_per_s_min,
               f"bench/{d}_imgs_per_s_max": result.images_per_s_max}
    tags = {f"bench.{d}.{k}": v for k, v in result.metadata().items()}
    if timm is not None:
        metrics[f"bench/{d}_timm_imgs_per_s"] = timm.images_per_s_median
        metrics[f"bench/{d}_ratio_vs_timm"] = result.images_per_s_median / timm.images_per_s_median
        tags[f"bench.{d}.timm_model"] = str(timm_name)
    return metrics, tags


def log_bench(variant, result: ThroughputResult, timm: Optional[ThroughputResult] = None,
              timm_name: Optional[str] = None) -> Optional[str]:
    """Write the figures onto the variant's latest FINISHED (else latest) child run; its run id or None."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    from lab.track import tracking_uri

    uri = tracking_uri(variant)
    client = MlflowClient(tracking_uri=uri)
    exp_name = variant.tracking.experiment or variant.experiment
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        raise LabError(f"no MLflow experiment '{exp_name}' in {uri} (run `lab run` first)")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`lab.variant` = '{variant.key}'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    runs = [r for r in runs if r.data.tags.get("lab.experiment", variant.experiment) == variant.experiment
            and r.data.tags.get("lab.role") != "parent"]
    if not runs:
        return None
    finished = [r for r in runs if r.info.status == "FINISHED"]
    run = (finished or runs)[0]
    # a variant run with several seeds: the figures belong to the architecture, so every seed's
    # latest finished run of this spec version gets them (the first one's id is returned)
    config = getattr(variant, "config_hash", "")
    same = [r for r in finished if config and r.data.tags.get("lab.config_hash") == config]
    targets = list({r.data.tags.get("lab.seed"): r for r in reversed(same)}.values()) if same else [run]
    if same:
        run = same[0]
    if run.data.tags.get("lab.hash") not in (None, variant.hash) and not same:
        _stderr(f"warning: {variant.key}: run {run.info.run_id} has hash {run.data.tags.get('lab.hash')}, "
                f"the spec now resolves to {variant.hash}")
    now = int(time.time() * 1000)
    metrics, tags = bench_record(result, timm, timm_name)
    for target in targets:
        client.log_batch(target.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run.info.run_id


# --------------------------------------------------------------------------- CLI


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


_FLAGS = ("device", "threads", "batch", "dtype", "warmup", "duration", "repeats", "channels_last", "compile")


def _bench_settings(base, args: argparse.Namespace):
    """BenchSpec of the variant (or defaults) with the command-line flags on top."""
    from pydantic import ValidationError

    from lab.spec import BenchSpec

    data = (base or BenchSpec()).model_dump()
    for k in _FLAGS:
        v = getattr(args, k, None)
        if v is not None:
            data[k] = v
    try:
        return BenchSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "bench"
        raise LabError(f"--{name.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


def _fmt(x: Optional[float], nd: int = 1) -> Optional[str]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if bool(args.spec) == bool(args.models):
        raise LabError("give a SPEC or --models NAME ..., one of the two")
    if args.log and not args.spec:
        raise LabError("--log writes onto a spec's variant runs: give a SPEC")
    if args.compare not in (None, "timm"):
        raise LabError(f"--compare supports only 'timm' (got '{args.compare}')")

    items: list[dict[str, Any]] = []  # label, cfg, bench, variant
    if args.spec:
        from lab.cli import expand_from_args

        spec, variants = expand_from_args(args)
        chosen = variants
        if args.variant:
            keys = [v.key for v in variants]
            for k in args.variant:
                if k not in keys:
                    raise LabError(f"no variant '{k}'{close_matches(k, keys)}", file=args.spec, path="variants")
            chosen = [v for v in variants if v.key in args.variant]
        first: dict[str, Any] = {}
        for v in chosen:  # one bench per variant, not per seed: throughput belongs to the architecture
            first.setdefault(v.key, v)
        chosen = list(first.values())
        for v in chosen:
            if v.match is not None:
                v = resolve_match(v, variants)
            items.append({"label": v.key, "cfg": v.model, "bench": _bench_settings(v.bench, args), "variant": v})
    else:
        for name in args.models:
            items.append({"label": name, "cfg": _zoo_config(name), "bench": _bench_settings(None, args),
                          "variant": None, "zoo": name})

    rows: list[dict[str, Any]] = []
    for it in items:
        b = it["bench"]
        device = resolve_device(b.device)
        model = build_model(it["cfg"])
        params, macs = complexity(it["cfg"], model)
        models = {"ours": model}
        timm_name = None
        if args.compare == "timm":
            timm_name = TIMM_EQUIVALENT.get(it.get("zoo")) if it.get("zoo") else timm_equivalent(it["cfg"])
            if timm_name:
                models["timm"] = create_timm(timm_name, getattr(model, "num_classes", None))
            else:
                _stderr(f"{it['label']}: no timm equivalent (the model differs from every zoo entry); not compared")
        size = model_img_size(model)
        _stderr(f"bench {it['label']}: {params / 1e6:.2f}M params, {macs / 1e6:.0f}M MACs, {size}px on {device}"
                + (f" (interleaved with timm {timm_name})" if timm_name else ""))
        res = measure_many(models, img_size=size, device=device, batch=b.batch, dtype=b.dtype, threads=b.threads,
                           warmup=b.warmup, duration=b.duration, repeats=b.repeats, channels_last=b.channels_last,
                           compile=b.compile, max_batch=b.max_batch, progress=_stderr)
        ours, theirs = res["ours"], res.get("timm")
        row = {"model": it["label"], "params": params, "macs": macs, "result": ours.as_dict(),
               "timm_model": timm_name, "timm": theirs.as_dict() if theirs else None,
               "ratio": ours.images_per_s_median / theirs.images_per_s_median if theirs else None}
        if theirs is not None:
            row["timm_params"] = sum(p.numel() for p in models["timm"].parameters())
        if args.log and it["variant"] is not None:
            run_id = log_bench(it["variant"], ours, theirs, timm_name)
            row["run_id"] = run_id
            if run_id is None:
                _stderr(f"warning: {it['label']}: no MLflow run for this variant yet (run `lab run` first); not logged")
            else:
                _stderr(f"  logged onto run {run_id}")
        rows.append(row)
        del models, model
        if device == "cuda":
            torch.cuda.empty_cache()

    if args.format == "json":
        from lab.cli import emit_json

        emit_json({"rows": rows, "torch": torch.__version__})
        return 0
    from lab.cli import print_table

    table = []
    for r in rows:
        res, t = r["result"], r["timm"]
        table.append({"model": r["model"], "params (M)": f"{r['params'] / 1e6:.2f}", "MACs (M)": f"{r['macs'] / 1e6:.0f}",
                      "img/s min": _fmt(res["images_per_s_min"]), "img/s median": _fmt(res["images_per_s_median"]),
                      "img/s max": _fmt(res["images_per_s_max"]),
                      "timm img/s": _fmt(t["images_per_s_median"]) if t else None,
                      "ratio": _fmt(r["ratio"], 2) if r["ratio"] is not None else None})
    print_table(table)
    print(_footer([r["result"] for r in rows]))
    return 0


def _footer(results: list[dict[str, Any]]) -> str:
    def vals(k):
        return "/".join(dict.fromkeys(str(r[k]) for r in results)) or "-"
    return (f"device {vals('device')} ({vals('device_name')}), dtype {vals('dtype')}, batch {vals('batch')}, "
            f"threads {vals('threads')}, torch {vals('torch_version')}, compiled {vals('compiled')}, "
            f"channels_last {vals('channels_last')}, BN folded: {vals('fusion')}; "
            f"{vals('repeats')} x {vals('duration_s')}s after {vals('warmup_s')}s warmup")


def register(sub: argparse._SubParsersAction) -> None:
    from lab.cli import add_spec_args

    p = sub.add_parser("bench", help="inference throughput (paper protocol) of a spec's variants or zoo models",
                       description="Measure images/s: eval, BatchNorm folded, inference_mode, warmup, synced timed "
                                   "steps; CPU: 1 thread, batch 16, fp32; GPU: bf16 autocast, largest power-of-two batch.")
    p.add_argument("spec", nargs="?", help="experiment spec (benches every variant)")
    p.add_argument("--models", nargs="+", metavar="NAME", help="grafts zoo names instead of a spec")
    p.add_argument("--variant", action="append", metavar="KEY", help="only these variants of the spec (repeatable)")
    add_spec_args(p)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1, the paper's)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, largest power of two on GPU")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--warmup", type=float, default=None, help="seconds (default 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per repeat (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows (default 3)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the fused model")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--compare", choices=["timm"], default=None,
                   help="also time the matching timm model, interleaved with ours, and print ours/timm")
    p.add_argument("--log", action="store_true", help="write the figures onto the variants' MLflow runs")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd_bench)
