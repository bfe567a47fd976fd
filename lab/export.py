"""Export a trained model for inference: BatchNorm-fused (``grafts.fuse``), written as ONNX
(always), TorchScript and a ``torch.export`` program (where they work), each checked against the
PyTorch output of the unfused model on the same random batch.

``export_model`` is the API; ``lab export`` (see lab/cli) picks a finished variant of a spec
(``--variant KEY``) or a weights file (``--checkpoint final.pt``). ONNX checking needs the
``export`` extra (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lab.errors import LabError

__all__ = ["ExportResult", "export_model", "FORMATS", "load_trained"]

FORMATS = ("onnx", "torchscript", "torch_export")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "torch_export": ".pt2"}


@dataclass
class ExportResult:
    format: str
    path: Optional[str]
    max_abs_diff: Optional[float] = None  # vs the unfused PyTorch model
    ok: bool = False
    error: Optional[str] = None


@dataclass
class ExportReport:
    model: str
    input_size: list[int]
    fused_max_abs_diff: float
    tolerance: float
    results: list[ExportResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_trained(path: Path, model_cfg: Optional[dict[str, Any]] = None):
    """(GraftModel in eval mode, its config dict) from a lab final.pt (which carries its config),
    or from any weights file with ``model_cfg``."""
    import grafts
    from lab.module import model_state_from_file

    cfg, sd = model_state_from_file(path)
    cfg = cfg or model_cfg
    if cfg is None:
        raise LabError(f"{path}: no model config inside; pass the spec and --variant, or a lab final.pt")
    cfg = {k: v for k, v in cfg.items() if k != "init"}
    model = grafts.build(cfg)
    model.load_state_dict(sd)
    return model.eval(), cfg


def _onnx(fused, x, path: Path) -> Any:
    import torch

    try:
        import onnxruntime as ort
    except ImportError as e:  # the `export` extra is missing
        raise LabError("ONNX export needs the 'export' extra: pip install -e '.[export]'") from e
    torch.onnx.export(
        fused,
        (x,),
        str(path),
        dynamo=False,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])


def _torchscript(fused, x, path: Path) -> Any:
    import torch

    traced = torch.jit.trace(fused, (x,), check_trace=False)
    traced.save(str(path))
    return torch.jit.load(str(path))(x)


def _torch_export(fused, x, path: Path) -> Any:
    import torch

    prog = torch.export.export(fused, (x,))
    torch.export.save(prog, str(path))
    return torch.export.load(str(path)).module()(x)


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "torch_export": _torch_export}


def export_model(
    model,
    out_dir: Path,
    name: str = "model",
    formats: Sequence[str] = FORMATS,
    batch: int = 2,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Fuse ``model`` and write each format under ``out_dir``; every file is run back and compared
    with the unfused model's output (max |diff| <= tolerance * max |output| + 1e-6 to pass).
    ONNX failures raise; TorchScript / torch.export failures are reported (``ok=False``)."""
    import torch

    import grafts

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise LabError(f"unknown export format {unknown[0]!r}; allowed: {', '.join(FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    h, w = model.config.img_hw
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.config.in_chans, h, w, generator=g)
    fused = grafts.fuse(model)
    with torch.no_grad():
        ref = model(x)
        fdiff = float((fused(x) - ref).abs().max())
    tol = tolerance * float(ref.abs().max()) + 1e-6
    rep = ExportReport(model=name, input_size=[model.config.in_chans, h, w], fused_max_abs_diff=fdiff, tolerance=tol)
    for fmt in formats:
        path = out_dir / f"{name}{_SUFFIX[fmt]}"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fixed size
                got = _WRITERS[fmt](fused, x, path)
            d = float((got - ref).abs().max())
            rep.results.append(ExportResult(fmt, str(path), d, d <= tol))
        except LabError:
            raise
        except Exception as e:  # noqa: BLE001 - reported per format
            if fmt == "onnx":
                raise LabError(f"ONNX export of {name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
            rep.results.append(
                ExportResult(fmt, None, None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            )
    (out_dir / f"{name}.export.json").write_text(json.dumps(rep.as_dict(), indent=1))
    return rep
