"""Repeat statistics for ablation tables: per-variant summaries over seeds and the delta against
the baseline with a 95% confidence interval and a verdict. Pure functions (numbers in, numbers
out); `lab.report` feeds them the finished runs of each variant.

How a variant is compared with the baseline (values are final top-1 per seed, in %):
  - both have >= 2 finished seeds and exactly the same seeds: a **paired** t interval on the
    per-seed differences (variant - baseline), df = n - 1. Pairing removes what a seed does to
    both (the same initial draw of shared layers, the same data order), so it is the sharper test;
  - otherwise (different or partly missing seeds, >= 2 on each side): **Welch**'s unpaired
    t interval on the two samples, df by Welch-Satterthwaite. A seed missing on one side (it
    FAILED, or is still running) therefore switches the comparison to Welch over all the
    finished seeds of each side, rather than dropping the other side's unmatched seeds;
  - either side has one finished seed: no interval; the verdict is "cannot tell (n=1)".
Verdict: "better" when the whole interval is above 0, "worse" when it is below, else "within
noise". When both samples have no spread at all (identical values) the interval is the point
delta itself. FAILED/KILLED/RUNNING seeds never enter the numbers (callers pass finished ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BETTER, WORSE, NOISE, CANNOT_TELL, BASELINE, NO_DATA = (
    "better",
    "worse",
    "within noise",
    "cannot tell (n=1)",
    "baseline",
    "no finished seed",
)
VERDICTS = (BETTER, WORSE, NOISE, CANNOT_TELL, BASELINE, NO_DATA)
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """n, mean and sample standard deviation (ddof=1; NaN for n < 2) of one variant's values."""

    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class Comparison:
    """A variant's mean minus the baseline's mean, with its interval and verdict."""

    delta: float
    ci: tuple[float, float]
    method: str | None  # "paired" | "welch" | None (no interval)
    df: float
    p_value: float
    verdict: str
    n: int
    n_baseline: int
    seeds_paired: list = field(default_factory=list)


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the finite values (NaN/None ignored)."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Summary(n, mean, std)


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return NOISE


def _interval(delta: float, se: float, df: float, confidence: float) -> tuple[tuple[float, float], float]:
    """(low, high) and the two-sided p-value of delta / se under Student's t with `df`."""
    from scipy import stats

    if se == 0:
        return (delta, delta), (1.0 if delta == 0 else 0.0)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * stats.t.sf(abs(delta / se), df))
    return (delta - half, delta + half), p


def compare(
    variant: Mapping[object, float], baseline: Mapping[object, float], confidence: float = CONFIDENCE
) -> Comparison:
    """Compare `variant` with `baseline`, each {seed: value} over finished seeds (see module doc)."""
    v = {s: float(x) for s, x in variant.items() if x is not None and not math.isnan(float(x))}
    b = {s: float(x) for s, x in baseline.items() if x is not None and not math.isnan(float(x))}
    sv, sb = summarize(list(v.values())), summarize(list(b.values()))
    nan = math.nan
    if sv.n == 0 or sb.n == 0:
        return Comparison(nan, (nan, nan), None, nan, nan, NO_DATA, sv.n, sb.n)
    delta = sv.mean - sb.mean
    if sv.n < 2 or sb.n < 2:
        return Comparison(delta, (nan, nan), None, nan, nan, CANNOT_TELL, sv.n, sb.n)
    if set(v) == set(b):
        seeds = sorted(v, key=str)
        d = summarize([v[s] - b[s] for s in seeds])
        df = float(d.n - 1)
        se = d.std / math.sqrt(d.n)
        (lo, hi), p = _interval(d.mean, se, df, confidence)
        return Comparison(d.mean, (lo, hi), "paired", df, p, _verdict(lo, hi), sv.n, sb.n, seeds)
    a, c = sv.std**2 / sv.n, sb.std**2 / sb.n
    se = math.sqrt(a + c)
    df = (a + c) ** 2 / (a**2 / (sv.n - 1) + c**2 / (sb.n - 1)) if se > 0 else float(sv.n + sb.n - 2)
    (lo, hi), p = _interval(delta, se, df, confidence)
    return Comparison(delta, (lo, hi), "welch", df, p, _verdict(lo, hi), sv.n, sb.n)


def format_ci(c: Comparison, digits: int = 2) -> str:
    """'+1.20 [-0.31, +2.71]' (or the bare delta when there is no interval)."""
    if math.isnan(c.delta):
        return ""
    s = f"{c.delta:+.{digits}f}"
    if c.method is None:
        return s
    return f"{s} [{c.ci[0]:+.{digits}f}, {c.ci[1]:+.{digits}f}]"
