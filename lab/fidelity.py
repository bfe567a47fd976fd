"""Budget fidelity: did each variant really train for the time its budget said, and did they match?

`budget_warnings(rows)` takes one dict per variant (key, budget_kind, planned_seconds,
train_seconds, steps, calibrated_step_seconds) and returns warnings in words, naming the likely
cause and what to do. `lab run`'s summary and `lab table` print them. Only time budgets
(`seconds`, calibrated or wall-clock) are checked: under a steps/epochs/images/FLOPs budget the
variants are meant to take different times.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

TOLERANCE = 0.10  # 10% off the budget, or 10% apart


def _num(x: Any) -> Optional[float]:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def off_budget(row: dict, tol: float = TOLERANCE) -> Optional[str]:
    """A warning when this variant's training time is more than `tol` off its planned seconds."""
    planned, got = _num(row.get("planned_seconds")), _num(row.get("train_seconds"))
    if row.get("budget_kind") != "seconds" or not planned or got is None:
        return None
    dev = got / planned - 1.0
    if abs(dev) <= tol:
        return None
    key = row.get("key")
    msg = f"'{key}' trained {got:.1f} s against a budget of {planned:g} s ({dev:+.0%})"
    steps, cal = _num(row.get("steps")), _num(row.get("calibrated_step_seconds"))
    if steps and cal:
        real = got / steps
        msg += f": its steps took {real:.2f} s/step in training but {cal:.2f} s/step in calibration"
        if dev > 0:
            msg += (
                ", so the machine was probably busier while it trained (another process competing for the CPU or GPU)"
            )
        else:
            msg += ", so the machine was probably quieter while it trained than while it was calibrated"
    elif dev > 0:
        msg += ": a wall-clock budget stops at the first step past the budget, so its steps are long, or the machine was busy"
    else:
        msg += ": training stopped before the budget (the data ran out, or it was interrupted)"
    # `--variant` takes the variant key (all its seeds), not a per-seed label like 'KEY seed 0'
    msg += (
        f". Re-run it on a quiet machine (`lab run SPEC --force --variant {row.get('variant') or key}`), or set "
        f"`budget.wall_clock: true` to stop on training time."
    )
    return msg


def apart(rows: list[dict], tol: float = TOLERANCE) -> Optional[str]:
    """A warning when the variants' training times differ by more than `tol` (max / min - 1)."""
    timed = [(r.get("key"), _num(r.get("train_seconds"))) for r in rows if r.get("budget_kind") == "seconds"]
    known = [(k, t) for k, t in timed if t]
    if len(known) < 2:
        return None
    lo, hi = min(known, key=lambda kt: kt[1]), max(known, key=lambda kt: kt[1])
    spread = hi[1] / lo[1] - 1.0
    if spread <= tol:
        return None
    return (
        f"the variants trained between {lo[1]:.1f} s ('{lo[0]}') and {hi[1]:.1f} s ('{hi[0]}'), {spread:.0%} apart: "
        f"they were not compared at the same runtime. Likely cause: the load from other processes changed while "
        f"they trained. Re-run them together on a quiet machine (`lab run SPEC --force`), where the calibration "
        f"before training then holds."
    )


def budget_warnings(rows: Iterable[dict], tol: float = TOLERANCE) -> list[str]:
    rows = list(rows)
    out = [w for w in (off_budget(r, tol) for r in rows) if w]
    a = apart(rows, tol)
    if a:
        out.append(a)
    return out


def used_line(rows: Iterable[dict]) -> Optional[str]:
    """'budget used: a 79.1 s, b 80.4 s of 80 s' for time budgets (None otherwise)."""
    rows = [r for r in rows if r.get("budget_kind") == "seconds" and _num(r.get("train_seconds")) is not None]
    if not rows:
        return None
    planned = {_num(r.get("planned_seconds")) for r in rows} - {None}
    parts = ", ".join(f"{r['key']} {_num(r['train_seconds']):.1f} s" for r in rows)
    of = f" of {planned.pop():g} s" if len(planned) == 1 else ""
    return f"budget used: {parts}{of}"


__all__ = ["TOLERANCE", "apart", "budget_warnings", "off_budget", "used_line"]
