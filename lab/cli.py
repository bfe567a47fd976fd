"""`python -m lab` / `lab`: one entry point, one subcommand per capability.

Every subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int`. User mistakes raise `LabError` and become one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from typing import Any

from lab.errors import LabError

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = ("lab.cli", "lab.runner", "lab.measure", "lab.report", "lab.export_command")


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
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a field of the spec before variants are expanded (repeatable), e.g. --set budget.steps=50")
    p.add_argument("--smoke", action="store_true",
                   help="shrink to a smoke run: embedded data at 32px, 20 steps, tiny eval (see README); "
                        "its runs are tagged lab.smoke=true and left out of tables and plots")
    p.add_argument("--seeds", type=int, metavar="N",
                   help="repeat each variant with N seeds (train.seed, +1, ...): the spec's `seeds: N`")


# --smoke: same architectures and training recipe (augmentation, distillation, schedule shape),
# shrunk to the embedded data at 32 px, 20 steps, one CPU process, no data workers, local launcher,
# one seed.
SMOKE = {"data": {"dataset": "embedded", "root": None, "image_size": 32, "batch_size": 32,
                  "eval_batch_size": 250, "num_workers": 0},
         "budget": {"epochs": None, "steps": 20, "images": None, "train_flops": None, "seconds": None,
                    "wall_clock": False},
         "train": {"eval_every": 10, "accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto",
                   "precision": "auto", "compile": False},
         "launch": {"launcher": "local"}, "seeds": None}  # one seed unless --seeds asks for more


def load_from_args(args: argparse.Namespace):
    from lab import spec as S

    over = S.parse_set(getattr(args, "set", None))
    if getattr(args, "seeds", None) is not None:
        if args.seeds < 1:
            raise LabError(f"--seeds must be >= 1 (got {args.seeds})")
        over = S.deep_merge(over, {"seeds": args.seeds})
    if getattr(args, "smoke", False):
        over = S.deep_merge(SMOKE, over)
    spec = S.load_spec(args.spec, over)
    return spec


def expand_from_args(args: argparse.Namespace, check_models: bool = True):
    from lab import spec as S

    spec = load_from_args(args)
    variants = S.expand(spec, check_models=check_models)
    if getattr(args, "smoke", False):
        variants = [smoke_variant(v) for v in variants]
    return spec, variants


def smoke_variant(v):
    """Shrink a resolved variant's model to the smoke resolution (keeps its architecture)."""
    import grafts
    from lab import spec as S
    from lab.track import SMOKE_TAG

    model = dict(v.model)
    model.update(img_size=32, num_classes=10)
    if model.get("grid") is not None or (model.get("prefix") or {}).get("stages"):
        model["grid"] = 2
    model = grafts.config_to_dict(grafts.config_from_dict(model))
    resolved = {s: S._plain(getattr(v, s)) for s in ("data", "train", "budget")} | {"model": model}
    return v.model_copy(update={"model": model, "hash": S.content_hash(resolved),
                                "config_hash": S.config_hash(resolved),
                                "tags": {**v.tags, SMOKE_TAG: "true"}})


# --------------------------------------------------------------------------- validate / show


def _cmd_validate(args: argparse.Namespace) -> int:
    from lab import spec as S

    bad = 0
    for path in args.spec:
        try:
            spec = S.load_spec(path, S.parse_set(args.set))
            variants = S.expand(spec)
            n = len({v.key for v in variants})
            print(f"ok   {path}: {spec.name}, {n} variant(s)" + (f", {len(variants)} runs" if len(variants) > n else ""))
        except LabError as e:
            print(f"error: {e}", file=sys.stderr)
            bad += 1
    return 2 if bad else 0


def variant_rows(variants, with_complexity: bool = True) -> list[dict[str, Any]]:
    import grafts
    from lab import spec as S

    rows = []
    seeds: dict[str, list[int]] = {}
    for v in variants:
        seeds.setdefault(v.key, []).append(v.seed)
    for v in variants:
        if v.key in {r["key"] for r in rows}:
            continue  # one row per variant, whatever its seeds
        row: dict[str, Any] = {"key": v.key, "hash": v.config_hash if v.repeated else v.hash,
                               "seeds": seeds[v.key], "changes": v.changes}
        if with_complexity:
            cfg = grafts.config_from_dict(v.model)
            row["params"] = int(grafts.count_params(grafts.build(cfg, device="meta")))
            row["macs"] = int(grafts.count_macs(cfg))
        row["reference"] = v.reference.model_dump(exclude_none=True) if v.reference else {}
        rows.append(row)
    return rows


def _cmd_show(args: argparse.Namespace) -> int:
    spec, variants = expand_from_args(args)
    if args.variant:
        match = [v for v in variants if v.key == args.variant]
        if not match:
            from lab.errors import close_matches
            raise LabError(f"no variant '{args.variant}'{close_matches(args.variant, [v.key for v in variants])}",
                           file=args.spec, path="variants")
        v = match[0]
        if args.format == "json":
            emit_json({**v.resolved(), "hash": v.hash, "overrides": v.overrides})
        else:
            print(v.to_yaml(), end="")
        return 0
    rows = variant_rows(variants, with_complexity=not args.no_complexity)
    if args.format == "json":
        emit_json(rows)
        return 0
    print(f"{spec.name}: {len(rows)} variant(s) from {args.spec}"
          + (f", {len(variants)} runs with their seeds" if len(variants) > len(rows) else ""))
    table = []
    for r in rows:
        ref = r["reference"]
        t = {"key": r["key"], "hash": r["hash"]}
        if len(r["seeds"]) > 1:
            t["seeds"] = ",".join(map(str, r["seeds"]))
        if "params" in r:
            t["params (M)"] = f"{r['params'] / 1e6:.2f}"
            t["MACs (M)"] = f"{r['macs'] / 1e6:.0f}"
        t["paper params (M)"] = ref.get("params_m")
        t["paper MACs (M)"] = ref.get("macs_m")
        t["changes"] = r["changes"]
        table.append(t)
    print_table(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check specs strictly; exit 2 on the first problem in each")
    p.add_argument("spec", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("show", help="print a spec's resolved variants with params and MACs")
    p.add_argument("spec")
    add_spec_args(p)
    p.add_argument("--variant", help="print this variant's full resolved spec")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-complexity", action="store_true", help="skip params/MACs")
    p.set_defaults(func=_cmd_show)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="Grafting and ablation lab for hybrid conv/transformer models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = sys.modules[__name__] if name == __name__ else importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        mod.register(sub)
    return parser


ENV_ERRORS = ("OSError", "OperationalError", "MlflowException", "ConnectionError", "Timeout")


def _environment_error(e: BaseException) -> bool:
    """Permission, disk, database and network trouble: one line and exit 2, not a traceback."""
    return any(c.__name__ in ENV_ERRORS for c in type(e).__mro__)


def main(argv: list[str] | None = None) -> int:
    from lab import signals

    parser = build_parser()
    args = parser.parse_args(argv)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals.install()  # SIGTERM like Ctrl-C: checkpoint, KILLED, exit 143 (130 for Ctrl-C)
    try:
        return int(args.func(args) or 0)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if not _environment_error(e) or os.environ.get("LAB_DEBUG"):
            raise
        from lab.track import short_error

        print(f"error: {short_error(e)} (LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        stop = signals.as_interrupted(e)
        if stop is None:
            raise
        print(f"interrupted: {stop.reason}", file=sys.stderr)
        return stop.exit_code
    finally:
        for s, h in old.items():
            if h is not None:
                try:
                    signal.signal(s, h)
                except ValueError:  # not the main thread
                    pass


if __name__ == "__main__":
    sys.exit(main())
