"""`lab export`: write a finished variant (or a weights file) fused, as ONNX / TorchScript /
torch.export, each checked against PyTorch. Thin: parses arguments, calls lab.export."""

from __future__ import annotations

import argparse
from pathlib import Path

from lab.errors import LabError


def cmd_export(args: argparse.Namespace) -> int:
    from lab import export as E
    from lab import track
    from lab.smoke import expand
    from lab.weights import finished_variant_file

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if args.checkpoint:
        path, name = Path(args.checkpoint), Path(args.checkpoint).parent.name or "model"
        if not path.is_file():
            raise LabError(f"checkpoint not found: {args.checkpoint}")
        model_cfg = None
        if args.spec:
            _, variants = expand(args.spec, args.set)
            model_cfg = (
                variants[0].model
                if not args.variant
                else next((v.model for v in variants if v.key == args.variant), None)
            )
        model, _ = E.load_trained(path, model_cfg)
        out = Path(args.out or Path("exports") / name)
    else:
        if not args.spec or not args.variant:
            raise LabError("give SPEC --variant KEY (a finished variant) or --checkpoint FILE")
        _, variants = expand(args.spec, args.set)
        v = next((x for x in variants if x.key == args.variant), None)
        if v is None:
            from lab.errors import close_matches

            raise LabError(
                f"no variant named '{args.variant}'{close_matches(args.variant, [x.key for x in variants])}",
                file=args.spec,
                path="variants",
            )
        uri = track.tracking_uri(v)
        path, run_id = finished_variant_file(track.client(uri), uri, v.experiment, v.key, v.hash)
        model, _ = E.load_trained(path, v.model)
        name = v.key
        out = Path(args.out or Path("exports") / v.experiment / v.key)
    if not args.out and not out.resolve().is_relative_to(Path("exports").resolve()):
        raise LabError(f"refusing to write outside ./exports: {out}; pass --out")
    rep = E.export_model(model, out, name=name, formats=formats, tolerance=args.tolerance)
    print(f"{name}: fused vs unfused max |diff| {rep.fused_max_abs_diff:.2e} (tolerance {rep.tolerance:.2e})")
    bad = 0
    for r in rep.results:
        if r.ok:
            print(f"  {r.format:<13} {r.path}  max |diff| vs PyTorch {r.max_abs_diff:.2e}  ok")
        else:
            bad += r.format == "onnx" or args.strict
            why = r.error or f"max |diff| {r.max_abs_diff:.2e} > tolerance"
            print(f"  {r.format:<13} FAILED: {why}")
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a finished variant fused as ONNX (+ TorchScript, torch.export), checked against PyTorch"
    )
    p.add_argument("spec", nargs="?", help="the experiment spec (with --variant)")
    p.add_argument("--variant", help="the finished variant to export (its final.pt in the store)")
    p.add_argument("--checkpoint", help="a lab final.pt (or a weights file, with SPEC for the model config)")
    p.add_argument("--out", help="output folder (default exports/EXPERIMENT/VARIANT)")
    p.add_argument(
        "--format",
        default="onnx,torchscript,torch_export",
        help="comma list of onnx, torchscript, torch_export (default: all)",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative max |diff| allowed vs PyTorch")
    p.add_argument("--strict", action="store_true", help="exit 1 when TorchScript / torch.export fail too")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.set_defaults(func=cmd_export)
