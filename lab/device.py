"""Device helpers for measuring: which device, its name, the default dtype, autocast, OOM detection."""

from __future__ import annotations

import contextlib
import platform

from lab.errors import LabError


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' from 'cpu' | 'cuda' | 'auto'; a LabError when CUDA is asked for and absent."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise LabError(f"unknown device '{device}'; allowed: cpu, cuda, auto")
    if device == "cuda" and not torch.cuda.is_available():
        raise LabError("device 'cuda' requested but torch sees no GPU (use --device cpu or auto)")
    return device


def device_name(device: str) -> str:
    """'AMD EPYC 7R13 Processor' / 'NVIDIA H100 80GB HBM3': where the figure was measured."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def default_dtype(device: str) -> str:
    """The paper's: fp32 on CPU, bf16 autocast on GPU."""
    return "bf16" if device == "cuda" else "fp32"


def autocast(device: str, dtype: str):
    """torch.autocast for bf16/fp16 on `device`; a no-op for fp32."""
    import torch

    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error (torch's, or a RuntimeError saying so)."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
