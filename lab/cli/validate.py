"""`lab validate SPEC...`: check specs strictly; exit 2 when any has a problem."""

from __future__ import annotations

import argparse
import sys

from lab.errors import LabError


def cmd_validate(args: argparse.Namespace) -> int:
    from lab import spec as S

    bad = 0
    for path in args.spec:
        try:
            spec = S.load_spec(path, S.parse_set(args.set))
            variants = S.expand(spec)
            n = len({v.key for v in variants})
            print(
                f"ok   {path}: {spec.name}, {n} variant(s)" + (f", {len(variants)} runs" if len(variants) > n else "")
            )
        except LabError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
    return 2 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check specs strictly; exit 2 on the first problem in each")
    p.add_argument("spec", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=cmd_validate)
