"""`lab plot EXPERIMENT...`: Pareto or convergence figures as PNG and SVG (lab.report draws them)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lab.cli.table import add_store_args
from lab.errors import LabError
from lab.report import DEVICES, X_KINDS


def out_stem(out: str | None, default_name: str) -> Path:
    """--out as a path without extension: a directory gets `default_name`, .png/.svg are dropped."""
    if not out:
        return Path("out") / default_name
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return p / default_name
    return p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p


def cmd_plot(args: argparse.Namespace) -> int:
    from lab import report

    df = report.load_runs(args.experiment, args.tracking_uri, args.tag)
    if df.empty:
        raise LabError(f"no variant runs in {', '.join(args.experiment)}"
                       + (" matching the --tag filter" if args.tag else ""))
    name = "_".join(args.experiment)
    if args.kind == "pareto":
        data = report.pareto_data(df, device=args.device)
        dev = data["device"].iloc[0] if not data.empty else (args.device or report.pick_device(df))
        fig = report.plot_pareto(data)
        stem = out_stem(args.out, f"{name}_pareto_{dev}")
    else:
        data = report.convergence_data(df, x=args.x)
        fig = report.plot_convergence(data)
        stem = out_stem(args.out, f"{name}_convergence_{args.x}")
    for p in report.save_figure(fig, stem):
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="Pareto (top-1 vs throughput) or convergence plot, as PNG and SVG")
    add_store_args(p)
    p.add_argument("--kind", choices=["pareto", "convergence"], default="pareto")
    p.add_argument("--x", choices=list(X_KINDS), default="images_seen", help="convergence x-axis")
    p.add_argument("--device", choices=DEVICES, help="pareto throughput (default: cuda if measured, else cpu)")
    p.add_argument("--out", help="PATH without extension, or a directory (default: out/EXPERIMENT_KIND)")
    p.set_defaults(func=cmd_plot)
