"""Ablation tables for people: `display_table` (rounded strings, units in headers) and
`format_table` (terminal, markdown, csv, latex or json).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lab.errors import LabError
from lab.report.runs import FINISHED

FORMATS = ("terminal", "markdown", "csv", "latex", "json")

PRETTY = {
    "experiment": "experiment",
    "key": "variant",
    "status": "status",
    "n_seeds": "n",
    "changes": "changes",
    "params_m": "params (M)",
    "macs_m": "MACs (M)",
    "cpu_imgs_s": "CPU img/s",
    "gpu_imgs_s": "GPU img/s",
    "top1": "top-1 (%)",
    "top1_best": "best top-1",
    "d_top1": "Δ top-1",
    "verdict": "verdict",
    "d_params_m": "Δ params (M)",
    "d_macs_m": "Δ MACs (M)",
    "cpu_speedup": "CPU speed ×",
    "gpu_speedup": "GPU speed ×",
    "steps": "steps",
    "images_seen": "images seen",
    "train_s": "train s",
    "budget_s": "budget s",
    "ref_top1": "paper top-1",
    "ref_d_top1": "paper Δ top-1",
    "ref_params_m": "paper params (M)",
    "ref_macs_m": "paper MACs (M)",
    "ref_cpu_imgs_s": "paper CPU img/s",
    "ref_gpu_imgs_s": "paper GPU img/s",
}
# shown only where at least one row has a value ("throughput where measured", paper figures where given)
OPTIONAL = {
    "cpu_imgs_s",
    "gpu_imgs_s",
    "cpu_speedup",
    "gpu_speedup",
    "ref_top1",
    "ref_d_top1",
    "ref_params_m",
    "ref_macs_m",
    "ref_cpu_imgs_s",
    "ref_gpu_imgs_s",
    "params_m",
    "macs_m",
    "d_params_m",
    "d_macs_m",
    "steps",
    "images_seen",
    "train_s",
    "budget_s",
    "top1_best",
}


def _num(v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    a = abs(v)
    s = f"{v:+.0f}" if signed and a >= 100 else f"{v:.0f}" if a >= 100 else None
    if s is None:
        prec = 1 if a >= 10 else 2
        s = f"{v:+.{prec}f}" if signed else f"{v:.{prec}f}"
    return s


def _pct(v: float, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pm(mean: float, std: float, fmt=None) -> str:
    """'72.13 ± 1.20' (just the mean without a spread)."""
    fmt = fmt or _pct
    if _isnan(mean):
        return ""
    return fmt(mean) if _isnan(std) else f"{fmt(mean)} ± {fmt(std)}"


def _delta_ci(r: pd.Series) -> str:
    if r["baseline"] or _isnan(r["d_top1"]):
        return ""
    ci = r.get("delta_top1_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(_isnan(x) for x in ci):
        return f"{_pct(r['d_top1'], signed=True)} [{_pct(ci[0], signed=True)}, {_pct(ci[1], signed=True)}]"
    return _pct(r["d_top1"], signed=True)


def _status(r: pd.Series) -> str:
    seeds = r.get("seeds")
    total = len(seeds) if isinstance(seeds, (list, tuple)) else 1
    if r["status"] != FINISHED and total > 1:
        return f"{r['status']} ({int(r['n_seeds'])}/{total} done)"
    return str(r["status"])


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: rounded, units in headers, the baseline marked '*', mean ± std over
    seeds, Δ top-1 with its 95% interval, empty columns dropped."""
    rows = []
    multi = table["experiment"].nunique() > 1
    for _, r in table.iterrows():
        d: dict[str, str] = {}
        if multi:
            d["experiment"] = r["experiment"]
        d["key"] = r["key"] + (" *" if r["baseline"] else "")
        d["status"] = _status(r)
        d["n_seeds"] = "" if _isnan(r.get("n_seeds")) else str(int(r["n_seeds"]))
        for c in ("params_m", "macs_m", "cpu_imgs_s", "gpu_imgs_s"):
            d[c] = _num(r[c])
        d["top1"] = _pm(r["top1"], r.get("top1_std"))
        d["top1_best"] = _pm(r["top1_best"], r.get("top1_best_std"))
        d["d_top1"] = _delta_ci(r)
        d["verdict"] = "" if _isnan(r.get("verdict")) or r["baseline"] else str(r["verdict"])
        for c in ("d_params_m", "d_macs_m"):
            d[c] = "" if r["baseline"] else _num(r[c], signed=True)
        for c in ("cpu_speedup", "gpu_speedup"):
            d[c] = "" if (r["baseline"] or pd.isna(r[c])) else f"{r[c]:.2f}x"
        d["steps"] = "" if pd.isna(r["steps"]) else f"{round(r['steps'])}"
        d["images_seen"] = "" if pd.isna(r["images_seen"]) else f"{round(r['images_seen']):,}"
        d["train_s"] = _num(r["train_s"])
        d["budget_s"] = _num(r["budget_s"])
        d["ref_top1"] = _pct(r["ref_top1"])
        d["ref_d_top1"] = "" if r["baseline"] else _pct(r["ref_d_top1"], signed=True)
        for c in ("ref_params_m", "ref_macs_m", "ref_cpu_imgs_s", "ref_gpu_imgs_s"):
            d[c] = _num(r[c])
        d["changes"] = r["changes"] or ""
        rows.append(d)
    out = pd.DataFrame(rows)
    keep = [c for c in out.columns if c not in OPTIONAL or (out[c] != "").any()]
    return out[keep].rename(columns=PRETTY)


def _markdown(disp: pd.DataFrame) -> str:
    """GitHub markdown without tabulate (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    numeric = [c for c in disp.columns if c not in ("experiment", "variant", "status", "verdict", "changes")]
    lines = [
        "| " + " | ".join(cell(c) for c in disp.columns) + " |",
        "|" + "|".join("---:" if c in numeric else ":---" for c in disp.columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in disp.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_ESC = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _latex(disp: pd.DataFrame) -> str:
    def esc(v: Any) -> str:
        s = "".join(_LATEX_ESC.get(ch, ch) for ch in str(v))
        return s.replace("Δ", r"$\Delta$").replace("×", r"$\times$").replace("±", r"$\pm$")

    numeric = [c for c in disp.columns if c not in ("experiment", "variant", "status", "verdict", "changes")]
    spec = "".join("r" if c in numeric else "l" for c in disp.columns)
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(esc(c) for c in disp.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in disp.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def format_table(table: pd.DataFrame, fmt: str = "terminal") -> str:
    """terminal/markdown/latex: rounded, for people (the baseline marked '*'); csv/json: every column, raw."""
    if fmt not in FORMATS:
        raise LabError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2) + "\n"
    if table.empty:
        return "(no variant runs)\n"
    disp = display_table(table)
    if fmt == "markdown":
        return _markdown(disp)
    if fmt == "latex":
        return _latex(disp)
    left = [c for c in ("experiment", "variant", "status", "verdict", "changes") if c in disp.columns]
    width = {c: max(len(c), *(len(str(v)) for v in disp[c])) for c in left}
    disp = disp.assign(**{c: disp[c].map(lambda v, w=width[c]: str(v).ljust(w)) for c in left})
    disp = disp.rename(columns={c: c.ljust(width[c]) for c in left})
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 80):
        return disp.to_string(index=False) + "\n"
