"""Helpers shared by the subcommand modules: output (JSON, aligned tables) and the spec arguments."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def emit_json(obj: Any) -> None:
    """One JSON document on stdout, nothing else there."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """A plain aligned terminal table (pandas does the alignment)."""
    import pandas as pd

    if not rows:
        print("(no rows)")
        return
    df = pd.DataFrame(rows, columns=columns)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60):
        print(df.to_string(index=False, na_rep="-"))


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """--set PATH=VALUE (repeatable) and --smoke."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a field of the spec before variants are expanded (repeatable), e.g. --set budget.steps=50",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="shrink to a smoke run: embedded data at 32px, 20 steps, tiny eval (see README); "
        "its runs are tagged lab.smoke=true and left out of tables and plots",
    )
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="repeat each variant with N seeds (train.seed, +1, ...): the spec's `seeds: N`",
    )


def expand_from_args(args: argparse.Namespace):
    """(spec, variants) of `args.spec` with its --set overrides and --smoke."""
    from lab.smoke import expand

    return expand(
        args.spec, getattr(args, "set", None), smoke=getattr(args, "smoke", False), seeds=getattr(args, "seeds", None)
    )


def select_variants(variants: list, keys: list[str] | None, spec_file: str) -> list:
    """The variants named by --variant (all when none); an unknown key is a LabError."""
    from lab.errors import LabError, close_matches

    if not keys:
        return list(variants)
    known = [v.key for v in variants]
    for k in keys:
        if k not in known:
            raise LabError(
                f"no variant '{k}'{close_matches(k, known)}; variants: {', '.join(known)}",
                file=spec_file,
                path="variants",
            )
    return [v for v in variants if v.key in keys]
