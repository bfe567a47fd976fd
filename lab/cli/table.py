"""`lab table EXPERIMENT...`: the ablation table of an experiment's runs, seeds aggregated (lab.report does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lab.report import FORMATS


def add_store_args(p: argparse.ArgumentParser) -> None:
    """The experiments to read and where from (shared by `table` and `plot`)."""
    p.add_argument("experiment", nargs="+", help="MLflow experiment name(s) (a spec's name)")
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only runs with this tag (repeatable), e.g. --tag lab.device=cuda",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)")
    p.add_argument(
        "--include-smoke",
        action="store_true",
        help="also show `lab run --smoke` runs (left out by default; never beside the paper's figures)",
    )
    p.add_argument(
        "--all-hashes",
        action="store_true",
        help="every spec version of a variant as its own row (KEY@HASH), not just the latest finished",
    )
    p.add_argument("--hash", help="show the spec version whose config hash (or run hash) starts with this")


def load(args: argparse.Namespace) -> pd.DataFrame:
    """lab.report.load_runs with the store arguments."""
    from lab.report import load_runs

    return load_runs(
        args.experiment,
        args.tracking_uri,
        args.tag,
        include_smoke=args.include_smoke,
        all_hashes=getattr(args, "all_hashes", False),
        hash=getattr(args, "hash", None),
    )


def cmd_table(args: argparse.Namespace) -> int:
    from lab.report import SMOKE_SUFFIX, ablation_table, budget_warnings, format_table, per_seed_table, run_table

    df = load(args)
    notes = list(df.attrs.get("notes", []))
    if args.per_seed:
        table = per_seed_table(df)
        if args.format == "json":
            text = table.to_json(orient="records", indent=2) + "\n"
        elif args.format == "csv":
            text = table.to_csv(index=False)
        else:
            with pd.option_context("display.max_columns", None, "display.width", 250):
                text = table.to_string(index=False, na_rep="") + "\n" if not table.empty else "(no variant runs)\n"
    else:
        table = ablation_table(df, baseline=args.baseline)
        text = format_table(table, args.format)
        if not table.empty and table["smoke"].astype(bool).any():
            notes.append(
                f"smoke runs shown (marked '{SMOKE_SUFFIX.strip()}'): plumbing checks, not results; "
                f"no paper figures beside them"
            )
    if args.format == "terminal" and not table.empty and not args.per_seed:
        n = table["status"].value_counts()
        summary = ", ".join(f"{v} {k.lower()}" for k, v in n.items())
        seeds = table["n_seeds"].max()
        head = f"{', '.join(args.experiment)}: {len(table)} variant(s) ({summary}); * = baseline"
        if seeds > 1:
            head += "; top-1 mean ± std over finished seeds (n), Δ top-1 [95% CI]"
        text = head + "\n" + text
    warnings = [f"warning: {w}" for w in budget_warnings(run_table(df))] if not df.empty else []
    extra = warnings + [f"note: {n}" for n in notes]
    if args.format == "terminal":
        text += "".join(f"{line}\n" for line in extra)
    else:
        for line in extra:
            print(line, file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)
    else:
        sys.stdout.write(text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table", help="ablation table of an experiment's runs, seeds aggregated (partial results welcome)"
    )
    add_store_args(p)
    p.add_argument("--format", choices=FORMATS, default="terminal")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--baseline", help="variant key to compare against (default: the spec's baseline, else the first)")
    p.add_argument("--per-seed", action="store_true", help="one row per run (variant x seed) instead of per variant")
    p.set_defaults(func=cmd_table)
