"""`lab table EXPERIMENT...`: the ablation table of an experiment's runs (lab.report does the work)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab.report import FORMATS


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The experiments to read and where from (shared by `table` and `plot`)."""
    p.add_argument("experiment", nargs="+", help="MLflow experiment name(s) (a spec's name)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep only runs with this tag (repeatable), e.g. --tag lab.device=cuda")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)")


def cmd_table(args: argparse.Namespace) -> int:
    from lab.report import ablation_table, budget_warnings, format_table, load_runs

    df = load_runs(args.experiment, args.tracking_uri, args.tag)
    table = ablation_table(df, baseline=args.baseline)
    text = format_table(table, args.format)
    warnings = [f"warning: {w}" for w in budget_warnings(table)] if not table.empty else []
    if args.format == "terminal" and not table.empty:
        n = table["status"].value_counts()
        summary = ", ".join(f"{v} {k.lower()}" for k, v in n.items())
        text = f"{', '.join(args.experiment)}: {len(table)} variant(s) ({summary}); * = baseline\n" + text
        text += "".join(w + "\n" for w in warnings)
    elif warnings:
        for w in warnings:
            print(w, file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)
    else:
        sys.stdout.write(text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="ablation table of an experiment's runs (partial results welcome)")
    add_store_args(p)
    p.add_argument("--format", choices=FORMATS, default="terminal")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--baseline", help="variant key to compare against (default: the spec's baseline, else the first)")
    p.set_defaults(func=cmd_table)
