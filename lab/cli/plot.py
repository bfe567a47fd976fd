"""`lab plot EXPERIMENT...`: Pareto or convergence figures (lab.report draws them), first-layer filters
or attention-bias maps (lab.inspection_plot), as PNG and SVG."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lab import paths
from lab.cli.table import add_store_args, load
from lab.errors import LabError
from lab.figures import save_figure
from lab.report import DEVICES, X_KINDS


def out_stem(out: str | None, default_name: str) -> Path:
    """--out as a path without extension (the user's own path; .png/.svg are dropped), else out/NAME; a
    directory gets NAME. NAME (built from experiment names) is a sanitised slug that stays in its folder."""
    if not out:
        return paths.output_stem("out", default_name)
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return paths.output_stem(p, default_name)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p


def cmd_plot(args: argparse.Namespace) -> int:
    import sys

    from lab import report

    df = load(args)
    if df.empty:
        raise LabError(
            f"no variant runs in {', '.join(args.experiment)}" + (" matching the --tag filter" if args.tag else "")
        )
    for n in df.attrs.get("notes", []):
        print(f"note: {n}", file=sys.stderr)
    name = "_".join(args.experiment)
    if args.kind in ("filters", "attention-bias"):  # lab.inspection: from the runs' final weights
        from lab.inspection_plot import cmd_plot as inspection_plots

        stem = out_stem(args.out, f"{name}_{args.kind.replace('-', '_')}")
        for p in inspection_plots(df, args.kind, stem, max_images=args.images):
            print(p)
        return 0
    if args.kind == "pareto":
        data = report.pareto_data(df, device=args.device)
        dev = data["device"].iloc[0] if not data.empty else (args.device or report.pick_device(df))
        fig = report.plot_pareto(data)
        stem = out_stem(args.out, f"{name}_pareto_{dev}")
    elif args.kind == "seeds":
        fig = report.plot_seeds(report.seeds_data(df))
        stem = out_stem(args.out, f"{name}_seeds")
    else:
        data = report.convergence_data(df, x=args.x)
        fig = report.plot_convergence(data)
        stem = out_stem(args.out, f"{name}_convergence_{args.x}")
    for p in save_figure(fig, stem):
        print(p)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot", help="Pareto, convergence, per-seed, first-layer filters or attention bias/distance, as PNG and SVG"
    )
    add_store_args(p)
    p.add_argument(
        "--kind",
        choices=["pareto", "convergence", "seeds", "filters", "attention-bias"],
        default="pareto",
        help="seeds: final top-1 of every seed per variant, with mean and 95%% CI; filters: first-layer "
        "filter grids; attention-bias: bias maps per head and the mean attention distance per layer "
        "(both from each finished run's final weights)",
    )
    p.add_argument(
        "--images",
        type=int,
        default=64,
        help="attention-bias: validation images for runs that did not log their attention distance",
    )
    p.add_argument("--x", choices=list(X_KINDS), default="images_seen", help="convergence x-axis")
    p.add_argument("--device", choices=DEVICES, help="pareto throughput (default: cuda if measured, else cpu)")
    p.add_argument("--out", help="PATH without extension, or a directory (default: out/EXPERIMENT_KIND)")
    p.set_defaults(func=cmd_plot)
