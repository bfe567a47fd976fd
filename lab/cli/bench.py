"""`lab bench`: inference throughput of a spec's variants or of zoo models (lab.bench does the work)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional

from lab.bench import DTYPES
from lab.cli.common import add_spec_args, emit_json, expand_from_args, print_table, select_variants
from lab.errors import LabError


def _fmt(x: Optional[float], nd: int = 1) -> Optional[str]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from lab.bench import BENCH_FLAGS, BenchItem, bench_models, bench_settings, footer
    from lab.match import resolve_match
    from lab.models import zoo_config

    if bool(args.spec) == bool(args.models):
        raise LabError("give a SPEC or --models NAME ..., one of the two")
    if args.log and not args.spec:
        raise LabError("--log writes onto a spec's variant runs: give a SPEC")
    flags = {k: getattr(args, k, None) for k in BENCH_FLAGS}
    items: list[BenchItem] = []
    if args.spec:
        _, variants = expand_from_args(args)
        first: dict[str, Any] = {}
        for v in select_variants(variants, args.variant, args.spec):  # one bench per variant, not per seed:
            first.setdefault(v.key, v)  # throughput belongs to the architecture
        for v in first.values():
            if v.match is not None:
                v = resolve_match(v, variants)
            items.append(BenchItem(label=v.key, cfg=v.model, bench=bench_settings(v.bench, flags), variant=v))
    else:
        for name in args.models:
            items.append(BenchItem(label=name, cfg=zoo_config(name), bench=bench_settings(None, flags), zoo=name))
    rows = bench_models(items, compare=args.compare, log=args.log)

    if args.format == "json":
        emit_json({"rows": rows, "torch": torch.__version__})
        return 0
    table: list[dict[str, Any]] = []
    for r in rows:
        res, t = r["result"], r["timm"]
        table.append(
            {
                "model": r["model"],
                "params (M)": f"{r['params'] / 1e6:.2f}",
                "MACs (M)": f"{r['macs'] / 1e6:.0f}",
                "img/s min": _fmt(res["images_per_s_min"]),
                "img/s median": _fmt(res["images_per_s_median"]),
                "img/s max": _fmt(res["images_per_s_max"]),
                "timm img/s": _fmt(t["images_per_s_median"]) if t else None,
                "ratio": _fmt(r["ratio"], 2) if r["ratio"] is not None else None,
            }
        )
    print_table(table)
    print(footer([r["result"] for r in rows]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="inference throughput (paper protocol) of a spec's variants or zoo models",
        description="Measure images/s: eval, BatchNorm folded, inference_mode, warmup, synced timed "
        "steps; CPU: 1 thread, batch 16, fp32; GPU: bf16 autocast, largest power-of-two batch.",
    )
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
    p.add_argument(
        "--compare",
        choices=["timm"],
        default=None,
        help="also time the matching timm model, interleaved with ours, and print ours/timm",
    )
    p.add_argument("--log", action="store_true", help="write the figures onto the variants' MLflow runs")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_bench)
