"""`lab show SPEC`: a spec's resolved variants with params and MACs (or one variant's full spec)."""

from __future__ import annotations

import argparse
from typing import Any

from lab.cli.common import add_spec_args, emit_json, expand_from_args, print_table, select_variants


def variant_rows(variants, with_complexity: bool = True) -> list[dict[str, Any]]:
    """key, hash, changes, params and MACs (grafts, on the meta device), paper reference figures."""
    import grafts

    rows: list[dict[str, Any]] = []
    seeds: dict[str, list[int]] = {}
    for v in variants:
        seeds.setdefault(v.key, []).append(v.seed)
    for v in variants:
        if v.key in {r["key"] for r in rows}:
            continue  # one row per variant, whatever its seeds
        row: dict[str, Any] = {
            "key": v.key,
            "hash": v.config_hash if v.repeated else v.hash,
            "seeds": seeds[v.key],
            "changes": v.changes,
        }
        if with_complexity:
            cfg = grafts.config_from_dict(v.model)
            row["params"] = int(grafts.count_params(grafts.build(cfg, device="meta")))
            row["macs"] = int(grafts.count_macs(cfg))
        row["reference"] = v.reference.model_dump(exclude_none=True) if v.reference else {}
        rows.append(row)
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    spec, variants = expand_from_args(args)
    if args.variant:
        v = select_variants(variants, [args.variant], args.spec)[0]
        if args.format == "json":
            emit_json({**v.resolved(), "hash": v.hash, "overrides": v.overrides})
        else:
            print(v.to_yaml(), end="")
        return 0
    rows = variant_rows(variants, with_complexity=not args.no_complexity)
    if args.format == "json":
        emit_json(rows)
        return 0
    print(
        f"{spec.name}: {len(rows)} variant(s) from {args.spec}"
        + (f", {len(variants)} runs with their seeds" if len(variants) > len(rows) else "")
    )
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
    p = sub.add_parser("show", help="print a spec's resolved variants with params and MACs")
    p.add_argument("spec")
    add_spec_args(p)
    p.add_argument("--variant", help="print this variant's full resolved spec")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-complexity", action="store_true", help="skip params/MACs")
    p.set_defaults(func=cmd_show)
