"""Inference throughput after the LeViT paper's speed test (what `lab bench` runs).

Protocol (paper, official repo): eval mode, BatchNorm folded into the preceding layer
(lab.fold), `torch.inference_mode`, random input at the model's resolution, warmup, then timed
forwards with a device sync after each one; images/s = batch * iterations / elapsed, per repeat,
and we report min/median/max over repeats. CPU: fp32, 1 thread, batch 16. GPU: autocast (bf16 by
default, fp16 on request), the largest power-of-two batch that fits (`find_max_batch`).

`measure_many` times several models with their repeats interleaved (A B, B A, ...), so that
`bench --compare timm` puts ours and timm's under the same machine conditions. `bench_models`
is the whole `lab bench` (the command line is lab.cli.bench); `log_bench` writes the figures
onto a variant's MLflow run (names: lab.record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from lab import record as R
from lab.device import autocast, default_dtype, device_name, is_oom, resolve_device
from lab.errors import LabError
from lab.fold import prepare_for_inference

CPU_BATCH = 16
DTYPES = ("fp32", "bf16", "fp16")


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
    device: str  # 'cpu' | 'cuda' (the metric key)
    device_name: str  # CPU model string / GPU name
    threads: int
    torch_version: str
    compiled: bool
    channels_last: bool
    img_size: int
    fused: bool = True  # no BatchNorm left un-folded in the measured model
    fusion: str = ""  # how it was folded: grafts.fuse / timm fuse() + conv-bn / nothing to fold
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
        return {
            "device_name": self.device_name,
            "dtype": self.dtype,
            "batch": str(self.batch),
            "threads": str(self.threads),
            "torch": self.torch_version,
            "compiled": str(self.compiled),
            "channels_last": str(self.channels_last),
            "fused": str(self.fused),
            "fusion": self.fusion,
            "img_size": str(self.img_size),
            "repeats": str(self.repeats),
            "duration_s": f"{self.duration_s:g}",
        }


def _summarise(samples: list[float], iters: list[int], **meta) -> ThroughputResult:
    return ThroughputResult(
        images_per_s_min=min(samples),
        images_per_s_median=statistics.median(samples),
        images_per_s_max=max(samples),
        samples=list(samples),
        iterations=list(iters),
        **meta,
    )


def find_max_batch(
    try_fn: Callable[[int], Optional[int]], max_batch: int = 2048, mem_cap_bytes: Optional[int] = None
) -> int:
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
        raise BatchSearchError(
            f"no batch size fits, not even 1 ({last_reason}); lower the resolution, "
            f"raise the memory cap or use another device"
        )
    return best


# --------------------------------------------------------------------------- timing


class _Timed:
    """One prepared model: fused, on device, input ready; `window(seconds)` -> (iterations, elapsed)."""

    def __init__(
        self,
        model,
        *,
        img_size: int,
        device: str,
        batch: Optional[int],
        dtype: str,
        channels_last: bool,
        compile: bool,
        max_batch: int,
        mem_cap_bytes: Optional[int],
    ):
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
            with torch.inference_mode(), autocast(self.device, self.dtype):
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

        with torch.inference_mode(), autocast(self.device, self.dtype):
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


def _same_batch(timed: Mapping[str, _Timed]) -> None:
    """Models that found different largest batches are all timed at the smallest (like for like)."""
    if len({t.batch for t in timed.values()}) > 1:
        common = min(t.batch for t in timed.values())
        for t in timed.values():
            t.batch, t.x = common, t._input(common)


def _interleaved(
    timed: Mapping[str, _Timed],
    *,
    repeats: int,
    duration: float,
    warmup: float,
    progress: Optional[Callable[[str], None]],
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Images/s and iterations per repeat of each model, the order reversed every other repeat
    (ABAB.. BA..), each model re-warmed briefly after the other one used the caches."""
    samples: dict[str, list[float]] = {k: [] for k in timed}
    iters: dict[str, list[int]] = {k: [] for k in timed}
    order = list(timed)
    rewarm = min(warmup, 0.1 * duration) if len(order) > 1 else 0.0
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            t = timed[k]
            if rewarm:  # caches were just used by the other model
                t.window(rewarm)
            n, el = t.window(duration)
            samples[k].append(t.batch * n / el)
            iters[k].append(n)
            if progress:
                progress(f"  {k}: repeat {r + 1}/{repeats}: {samples[k][-1]:.1f} img/s ({n} iters)")
    return samples, iters


def _check_settings(dtype: str, repeats: int, duration: float) -> None:
    """LabError for an unknown dtype, fewer than one repeat or no duration."""
    if dtype not in DTYPES:
        raise LabError(f"unknown dtype '{dtype}'; allowed: {', '.join(DTYPES)}")
    if repeats < 1 or duration <= 0:
        raise LabError("need repeats >= 1 and duration > 0")


def _warm_up(timed: Mapping[str, _Timed], seconds: float, progress: Optional[Callable[[str], None]]) -> None:
    for k, t in timed.items():
        if progress:
            progress(f"  warmup {k}: {seconds:g}s at batch {t.batch}")
        t.window(seconds)


def _results(
    timed: Mapping[str, _Timed], samples: Mapping[str, list[float]], iters: Mapping[str, list[int]], **conditions: Any
) -> dict[str, ThroughputResult]:
    """Each model's figures: its own batch, resolution and folding, and the `conditions` they share."""
    return {
        k: _summarise(
            samples[k], iters[k], batch=t.batch, img_size=t.img_size, fused=t.fused, fusion=t.fusion, **conditions
        )
        for k, t in timed.items()
    }


def measure_many(
    models: Mapping[str, Any],
    *,
    img_size: int | Mapping[str, int],
    device: str = "cpu",
    batch: Optional[int] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = 1,
    warmup: float = 1.0,
    duration: float = 3.0,
    repeats: int = 3,
    channels_last: bool = False,
    compile: bool = False,
    max_batch: int = 2048,
    mem_cap_bytes: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, ThroughputResult]:
    """Time several models with interleaved repeats (ABAB.., order reversed every other repeat).

    On GPU without an explicit batch each model gets its own largest power-of-two batch; the
    models are then compared at the smaller of them so that the ratio is like for like.
    """
    import torch

    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    _check_settings(dtype, repeats, duration)
    sizes = img_size if isinstance(img_size, Mapping) else {k: img_size for k in models}
    name = device_name(device)
    with _threads(device, threads) as n_threads:
        timed = {
            k: _Timed(
                m,
                img_size=int(sizes[k]),
                device=device,
                batch=batch,
                dtype=dtype,
                channels_last=channels_last,
                compile=compile,
                max_batch=max_batch,
                mem_cap_bytes=mem_cap_bytes,
            )
            for k, m in models.items()
        }
        if batch is None:
            _same_batch(timed)
        _warm_up(timed, warmup, progress)
        samples, iters = _interleaved(timed, repeats=repeats, duration=duration, warmup=warmup, progress=progress)
        return _results(
            timed,
            samples,
            iters,
            dtype=dtype,
            device=device,
            device_name=name,
            threads=n_threads if device == "cpu" else torch.get_num_threads(),
            torch_version=torch.__version__,
            compiled=compile,
            channels_last=channels_last,
            warmup_s=warmup,
            duration_s=duration,
            repeats=repeats,
        )


def measure_throughput(
    model,
    *,
    img_size: int,
    device: str = "cpu",
    batch: Optional[int] = None,
    dtype: Optional[str] = None,
    threads: Optional[int] = 1,
    warmup: float = 1.0,
    duration: float = 3.0,
    repeats: int = 3,
    channels_last: bool = False,
    compile: bool = False,
    max_batch: int = 2048,
    mem_cap_bytes: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> ThroughputResult:
    """Inference images/s of one model under the paper's protocol (see module docstring).

    The model is put in eval mode and BatchNorm-folded in place (grafts.fuse for grafts models,
    timm/torch folding otherwise); pass a copy if you still need the unfused one.
    """
    return measure_many(
        {"model": model},
        img_size=img_size,
        device=device,
        batch=batch,
        dtype=dtype,
        threads=threads,
        warmup=warmup,
        duration=duration,
        repeats=repeats,
        channels_last=channels_last,
        compile=compile,
        max_batch=max_batch,
        mem_cap_bytes=mem_cap_bytes,
        progress=progress,
    )["model"]


# --------------------------------------------------------------------------- MLflow


def bench_record(
    result: ThroughputResult, timm: Optional[ThroughputResult] = None, timm_name: Optional[str] = None
) -> tuple[dict[str, float], dict[str, str]]:
    """The MLflow metrics (bench/<device>_imgs_per_s, _min, _max, ...) and tags (bench.<device>.*) of a result."""
    d = result.device
    metrics = {
        R.bench_metric(d): result.images_per_s_median,
        R.bench_metric(d, "_min"): result.images_per_s_min,
        R.bench_metric(d, "_max"): result.images_per_s_max,
    }
    tags = {R.bench_tag(d, k): v for k, v in result.metadata().items()}
    if timm is not None:
        metrics[R.bench_timm_metric(d)] = timm.images_per_s_median
        metrics[R.bench_ratio_metric(d)] = result.images_per_s_median / timm.images_per_s_median
        tags[R.bench_tag(d, "timm_model")] = str(timm_name)
    return metrics, tags


def log_bench(
    variant, result: ThroughputResult, timm: Optional[ThroughputResult] = None, timm_name: Optional[str] = None
) -> Optional[str]:
    """Write the figures onto the variant's latest FINISHED (else latest) child run; its run id or None."""
    from lab import track

    uri = track.tracking_uri(variant)
    cl = track.client(uri)
    exp_name = track.experiment_name(variant)
    if cl.get_experiment_by_name(exp_name) is None:
        raise LabError(f"no MLflow experiment '{exp_name}' in {uri} (run `lab run` first)")
    runs = [
        r
        for r in track.find_variant_runs(cl, exp_name, key=variant.key)
        if r.data.tags.get(R.EXPERIMENT, variant.experiment) == variant.experiment
    ]
    if not runs:
        return None
    finished = [r for r in runs if r.info.status == "FINISHED"]
    run = (finished or runs)[0]
    # a variant run with several seeds: the figures belong to the architecture, so every seed's
    # latest finished run of this spec version gets them (the first one's id is returned)
    config = getattr(variant, "config_hash", "")
    same = [r for r in finished if config and r.data.tags.get(R.CONFIG_HASH) == config]
    targets = list({r.data.tags.get(R.SEED): r for r in reversed(same)}.values()) if same else [run]
    if same:
        run = same[0]
    if run.data.tags.get(R.HASH) not in (None, variant.hash) and not same:
        _stderr(
            f"warning: {variant.key}: run {run.info.run_id} has hash {run.data.tags.get(R.HASH)}, "
            f"the spec now resolves to {variant.hash}"
        )
    metrics, tags = bench_record(result, timm, timm_name)
    for target in targets:
        track.log_metrics(cl, target.info.run_id, metrics, 0)
        track.set_tags(cl, target.info.run_id, tags)
    return run.info.run_id


# --------------------------------------------------------------------------- `lab bench`


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


BENCH_FLAGS = ("device", "threads", "batch", "dtype", "warmup", "duration", "repeats", "channels_last", "compile")


def bench_settings(base, overrides: Mapping[str, Any]):
    """The BenchSpec `base` (or the defaults) with the given settings on top (None: keep)."""
    from pydantic import ValidationError

    from lab.spec import BenchSpec

    data = (base or BenchSpec()).model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return BenchSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "bench"
        raise LabError(f"--{name.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


@dataclass
class BenchItem:
    """One model to bench: a variant of a spec, or a zoo model by name."""

    label: str
    cfg: dict
    bench: Any  # lab.spec.BenchSpec
    variant: Any = None
    zoo: Optional[str] = None


def bench_models(
    items: list[BenchItem], *, compare: Optional[str] = None, log: bool = False, say: Callable[[str], None] = _stderr
) -> list[dict[str, Any]]:
    """Time every item (interleaved with timm's equivalent when compare='timm'); one row each.

    A row: model, params, macs, result (ThroughputResult.as_dict()), timm_model, timm, ratio,
    timm_params and, with `log`, the run_id the figures were written onto (None: no run yet).
    """
    import torch

    rows: list[dict[str, Any]] = []
    for it in items:
        device = resolve_device(it.bench.device)
        rows.append(_bench_item(it, device, compare=compare, log=log, say=say))
        if device == "cuda":  # the item's models went with _bench_item's frame
            torch.cuda.empty_cache()
    return rows


def _bench_item(
    it: BenchItem, device: str, *, compare: Optional[str], log: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Time one item (beside timm's equivalent when compare='timm'), log it when asked; its row."""
    from lab.models import build_model, complexity, model_img_size

    model = build_model(it.cfg)
    params, macs = complexity(it.cfg, model)
    models, timm_name = _with_timm(it, model, compare, say)
    size = model_img_size(model)
    say(
        f"bench {it.label}: {params / 1e6:.2f}M params, {macs / 1e6:.0f}M MACs, {size}px on {device}"
        + (f" (interleaved with timm {timm_name})" if timm_name else "")
    )
    res = _measure_item(models, it.bench, img_size=size, device=device, say=say)
    ours, theirs = res["ours"], res.get("timm")
    row = {
        "model": it.label,
        "params": params,
        "macs": macs,
        "result": ours.as_dict(),
        "timm_model": timm_name,
        "timm": theirs.as_dict() if theirs else None,
        "ratio": ours.images_per_s_median / theirs.images_per_s_median if theirs else None,
    }
    if theirs is not None:
        row["timm_params"] = sum(p.numel() for p in models["timm"].parameters())
    if log and it.variant is not None:
        row["run_id"] = _log_item(it, ours, theirs, timm_name, say)
    return row


def _with_timm(
    it: BenchItem, model, compare: Optional[str], say: Callable[[str], None]
) -> tuple[dict[str, Any], Optional[str]]:
    """The models to time together: {'ours'}, and 'timm' (its name alongside) when compare='timm'
    and the model has a timm equivalent."""
    from lab.models import TIMM_EQUIVALENT, create_timm, timm_equivalent

    models = {"ours": model}
    timm_name = None
    if compare == "timm":
        timm_name = TIMM_EQUIVALENT.get(it.zoo) if it.zoo else timm_equivalent(it.cfg)
        if timm_name:
            models["timm"] = create_timm(timm_name, getattr(model, "num_classes", None))
        else:
            say(f"{it.label}: no timm equivalent (the model differs from every zoo entry); not compared")
    return models, timm_name


def _measure_item(
    models: Mapping[str, Any], b, *, img_size: int, device: str, say: Callable[[str], None]
) -> dict[str, ThroughputResult]:
    """`measure_many` under the item's bench settings `b` (a lab.spec.BenchSpec)."""
    return measure_many(models, img_size=img_size, device=device, progress=say, **protocol(b))


def protocol(b) -> dict[str, Any]:
    """The timing settings of a lab.spec.BenchSpec as keyword arguments of `measure_many` /
    `measure_throughput`."""
    return {
        "batch": b.batch,
        "dtype": b.dtype,
        "threads": b.threads,
        "warmup": b.warmup,
        "duration": b.duration,
        "repeats": b.repeats,
        "channels_last": b.channels_last,
        "compile": b.compile,
        "max_batch": b.max_batch,
    }


def _log_item(
    it: BenchItem,
    ours: ThroughputResult,
    theirs: Optional[ThroughputResult],
    timm_name: Optional[str],
    say: Callable[[str], None],
) -> Optional[str]:
    """Write the item's figures onto its variant's run (`log_bench`), saying where; the run id or None."""
    run_id = log_bench(it.variant, ours, theirs, timm_name)
    if run_id is None:
        say(f"warning: {it.label}: no MLflow run for this variant yet (run `lab run` first); not logged")
    else:
        say(f"  logged onto run {run_id}")
    return run_id


def footer(results: list[dict[str, Any]]) -> str:
    """The conditions of a bench table (ThroughputResult dicts), one line."""

    def vals(k):
        return "/".join(dict.fromkeys(str(r[k]) for r in results)) or "-"

    return (
        f"device {vals('device')} ({vals('device_name')}), dtype {vals('dtype')}, batch {vals('batch')}, "
        f"threads {vals('threads')}, torch {vals('torch_version')}, compiled {vals('compiled')}, "
        f"channels_last {vals('channels_last')}, BN folded: {vals('fusion')}; "
        f"{vals('repeats')} x {vals('duration_s')}s after {vals('warmup_s')}s warmup"
    )
