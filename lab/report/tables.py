"""The ablation table: `run_values` (the numbers of each run), `ablation_table` (one row per
variant, its seeds aggregated, with deltas and verdicts against its experiment's baseline),
`per_seed_table`, `run_table` and `budget_warnings`. A variant with no finished seed still gets a row.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from lab import record as R
from lab.errors import LabError, close_matches
from lab.report.runs import BENCH_METRIC, FINISHED, REF_THROUGHPUT, SMOKE_SUFFIX, history, metric_col, tag_col


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, NaN where absent (runs log different things)."""
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce")
    return pd.Series(math.nan, index=df.index, dtype=float)


def _baseline_key(df: pd.DataFrame, key: str | None) -> Any:
    """Within one experiment's runs: `key` where present, else the key tagged lab.baseline, else the first."""
    if key is not None and (df["key"] == key).any():
        return key
    flagged = df.loc[df["baseline"].astype(bool), "key"] if "baseline" in df.columns else pd.Series(dtype=str)
    real = [k for k in flagged if not k.endswith(SMOKE_SUFFIX)]
    return (real or list(flagged) or list(df["key"]))[0]


TABLE_COLUMNS = [
    "experiment",
    "key",
    "baseline",
    "status",
    "n_seeds",
    "seeds",
    "changes",
    "params_m",
    "macs_m",
    "cpu_imgs_s",
    "gpu_imgs_s",
    "top1",
    "top1_std",
    "top1_best",
    "top1_best_std",
    "d_top1",
    "delta_top1_ci",
    "verdict",
    "d_params_m",
    "d_macs_m",
    "cpu_speedup",
    "gpu_speedup",
    "steps",
    "images_seen",
    "train_s",
    "train_s_std",
    "budget_s",
    "cal_step_s",
    "cpu_imgs_s_std",
    "gpu_imgs_s_std",
    "ref_top1",
    "ref_d_top1",
    "ref_params_m",
    "ref_macs_m",
    "ref_cpu_imgs_s",
    "ref_gpu_imgs_s",
    "ref_epochs",
    "ref_source",
    "top1_mean",
    "delta_top1",
    "ci_method",
    "p_value",
    "n_failed",
    "error",
    "hash",
    "other_hashes",
    "smoke",
    "run_id",
    "run_ids",
    "cpu_imgs_s_lo",
    "cpu_imgs_s_hi",
    "gpu_imgs_s_lo",
    "gpu_imgs_s_hi",
]
_STATUS_ORDER = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")  # what an unfinished variant's row says


def run_values(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (variant x seed) of `load_runs`: the numbers the table aggregates.

    top1 is final/val_top1, or the last val/top1 of a run that has not finished; top1_best
    likewise falls back to the best val/top1 logged so far. Units: params and MACs in millions,
    throughput in images/s, top-1 in %.
    """
    v = pd.DataFrame(index=df.index)
    for c in ("experiment", "key", "status", "run_id"):
        v[c] = df[c]
    v["seed"] = df["seed"] if "seed" in df.columns else 0
    v["baseline"] = df["baseline"].astype(bool) if "baseline" in df.columns else False
    v["changes"] = df["changes"].fillna("") if "changes" in df.columns else ""
    v["error"] = df["error"] if "error" in df.columns else None
    v["hash"] = df["config_hash"] if "config_hash" in df.columns else df.get("hash")
    v["other_hashes"] = df["other_hashes"] if "other_hashes" in df.columns else ""
    v["smoke"] = df["smoke"].astype(bool) if "smoke" in df.columns else False
    v["params_m"] = _col(df, metric_col(R.PARAMS)) / 1e6
    v["macs_m"] = _col(df, metric_col(R.MACS)) / 1e6
    v["cpu_imgs_s"] = _col(df, metric_col(BENCH_METRIC["cpu"]))
    v["gpu_imgs_s"] = _col(df, metric_col(BENCH_METRIC["cuda"]))
    for dev, d in (("cpu", "cpu"), ("gpu", "cuda")):  # the slowest / fastest of the bench repeats
        v[f"{dev}_imgs_s_lo"] = _col(df, metric_col(R.bench_metric(d, "_min")))
        v[f"{dev}_imgs_s_hi"] = _col(df, metric_col(R.bench_metric(d, "_max")))
    v["top1"] = _col(df, metric_col(R.FINAL_VAL_TOP1)).fillna(_col(df, metric_col(R.VAL_TOP1)))
    best = _col(df, metric_col(R.BEST_VAL_TOP1))
    missing = best.isna() & _col(df, metric_col(R.VAL_TOP1)).notna()
    if missing.any():  # partial runs: best so far from the history
        uri = df.attrs.get("tracking_uri")
        for i in df.index[missing]:
            h = history([df.at[i, "run_id"]], R.VAL_TOP1, x="step", tracking_uri=uri)
            best.at[i] = h["value"].max() if not h.empty else math.nan
    v["top1_best"] = best
    v["steps"] = _col(df, metric_col(R.BUDGET_STEPS))
    v["images_seen"] = _col(df, metric_col(R.BUDGET_IMAGES_SEEN)).fillna(_col(df, metric_col(R.IMAGES_SEEN)))
    v["train_s"] = _col(df, metric_col(R.BUDGET_TRAIN_SECONDS)).fillna(_col(df, metric_col(R.TRAIN_SECONDS)))
    v["budget_s"] = _col(df, metric_col(R.BUDGET_PLANNED_SECONDS))  # seconds budgets: what train_s should be
    v["cal_step_s"] = _col(df, metric_col(R.calibration_metric("step_seconds")))
    v["ref_top1"] = _col(df, tag_col(R.ref_tag("top1")))
    v["ref_params_m"] = _col(df, tag_col(R.ref_tag("params_m")))
    v["ref_macs_m"] = _col(df, tag_col(R.ref_tag("macs_m")))
    v["ref_cpu_imgs_s"] = _col(df, tag_col(REF_THROUGHPUT["cpu"]))
    v["ref_gpu_imgs_s"] = _col(df, tag_col(REF_THROUGHPUT["cuda"]))
    v["ref_epochs"] = _col(df, tag_col(R.ref_tag("epochs")))
    v["ref_source"] = df[tag_col(R.ref_tag("source"))] if tag_col(R.ref_tag("source")) in df.columns else None
    return v


def overall_status(statuses: Iterable[str]) -> str:
    """A variant's status over its seeds: FINISHED only when every seed finished, else the first
    of RUNNING, FAILED, KILLED, SCHEDULED among them."""
    st = set(statuses)
    if st == {FINISHED}:
        return FINISHED
    return next((x for x in _STATUS_ORDER if x in st), min(st - {FINISHED}))


def _mean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else math.nan


def _std(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.std(ddof=1)) if len(s) > 1 else math.nan


def _aggregate(g: pd.DataFrame) -> dict[str, Any]:
    """One variant's runs (its seeds) -> one row: statistics over the FINISHED seeds; a variant
    with no finished seed shows the mean of what its runs logged so far (n_seeds 0)."""
    fin = g[g["status"] == FINISHED]
    use = fin if len(fin) else g
    first = g.iloc[0]
    status = overall_status(g["status"])
    row: dict[str, Any] = {
        "experiment": first["experiment"],
        "key": first["key"],
        "status": status,
        "n_seeds": len(fin),
        "seeds": sorted(int(x) for x in g["seed"]),
        "changes": next((c for c in g["changes"] if c), ""),
        "n_failed": int(g["status"].isin(["FAILED", "KILLED"]).sum()),
        "error": next((e for e in g["error"] if isinstance(e, str) and e), None),
        "hash": first["hash"],
        "other_hashes": first["other_hashes"] or "",
        "smoke": bool(g["smoke"].any()),
        "run_id": first["run_id"],
        "run_ids": list(g["run_id"]),
        "_top1_by_seed": dict(zip(fin["seed"], fin["top1"])),
    }
    for c in (
        "params_m",
        "macs_m",
        "cpu_imgs_s",
        "gpu_imgs_s",
        "top1",
        "top1_best",
        "steps",
        "images_seen",
        "train_s",
        "budget_s",
        "cal_step_s",
    ):
        row[c] = _mean(use[c])
    for c in ("top1", "top1_best", "train_s", "cpu_imgs_s", "gpu_imgs_s"):
        row[f"{c}_std"] = _std(fin[c])
    for dev in ("cpu", "gpu"):
        lo, hi = pd.to_numeric(use[f"{dev}_imgs_s_lo"]).dropna(), pd.to_numeric(use[f"{dev}_imgs_s_hi"]).dropna()
        row[f"{dev}_imgs_s_lo"] = float(lo.min()) if len(lo) else math.nan
        row[f"{dev}_imgs_s_hi"] = float(hi.max()) if len(hi) else math.nan
    for c in ("ref_top1", "ref_params_m", "ref_macs_m", "ref_cpu_imgs_s", "ref_gpu_imgs_s", "ref_epochs", "ref_source"):
        vals = [x for x in g[c] if x is not None and not (isinstance(x, float) and math.isnan(x))]
        row[c] = math.nan if row["smoke"] or not vals else vals[0]  # never the paper beside a smoke run
    row["top1_mean"] = row["top1"]
    return row


def _check_baseline(df: pd.DataFrame, baseline: str | None) -> None:
    """An error when `baseline` is given but no variant has that key."""
    if baseline is not None and not (df["key"] == baseline).any():
        keys = list(dict.fromkeys(df["key"]))
        raise LabError(
            f"no variant '{baseline}' to use as baseline{close_matches(baseline, keys)}; variants: {', '.join(keys)}"
        )


def _per_variant(vals: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (`_aggregate`), its comparison columns still empty."""
    rows = []
    for (_, _key), g in vals.groupby(["experiment", "key"], sort=False):
        rows.append(_aggregate(g))
    t = pd.DataFrame(rows)
    t["baseline"] = False
    for c in ("d_top1", "d_params_m", "d_macs_m", "cpu_speedup", "gpu_speedup", "ref_d_top1", "delta_top1", "p_value"):
        t[c] = math.nan
    t["delta_top1_ci"] = [[math.nan, math.nan] for _ in range(len(t))]
    t["ci_method"] = None
    t["verdict"] = None
    return t


def _differences(t: pd.DataFrame, rows: pd.Index, b: Any) -> None:
    """Fills d_* (variant - baseline) and *_speedup (variant / baseline) of `rows` against row `b`."""
    for c, src in (("d_top1", "top1"), ("d_params_m", "params_m"), ("d_macs_m", "macs_m"), ("ref_d_top1", "ref_top1")):
        t.loc[rows, c] = t.loc[rows, src] - t.at[b, src]
    for c, src in (("cpu_speedup", "cpu_imgs_s"), ("gpu_speedup", "gpu_imgs_s")):
        t.loc[rows, c] = t.loc[rows, src] / t.at[b, src]


def _verdicts(t: pd.DataFrame, rows: pd.Index, b: Any) -> None:
    """Fills delta_top1, delta_top1_ci, ci_method, p_value and verdict of `rows` from `lab.stats.compare`
    of their finished seeds' top-1 with those of the baseline row `b`."""
    from lab import stats

    base_seeds = t.at[b, "_top1_by_seed"]
    for i in rows:
        if i == b:
            t.at[i, "verdict"] = stats.BASELINE
            t.at[i, "delta_top1"] = 0.0 if base_seeds else math.nan
            continue
        c = stats.compare(t.at[i, "_top1_by_seed"], base_seeds)
        t.at[i, "delta_top1"] = c.delta
        t.at[i, "delta_top1_ci"] = [c.ci[0], c.ci[1]]
        t.at[i, "ci_method"] = c.method
        t.at[i, "p_value"] = c.p_value
        t.at[i, "verdict"] = c.verdict


def ablation_table(df: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant (its seeds aggregated) with deltas against its experiment's baseline.

    Baseline: `baseline` (a variant key) where that experiment has it, else the variant tagged
    lab.baseline=true, else the first. n_seeds counts FINISHED seeds; top1/top1_best (= top1_mean)
    and the costs are means over them (*_std: sample std), or, for a variant with no finished
    seed yet, over what its runs logged so far. d_* are differences of means (variant - baseline),
    *_speedup throughput ratios. delta_top1 (= d_top1 when both have finished seeds),
    delta_top1_ci ([low, high], 95%), ci_method and verdict come from `lab.stats.compare` over
    the finished seeds (paired by seed when both have the same seeds, else Welch).
    """
    if df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    _check_baseline(df, baseline)
    vals = run_values(df)
    t = _per_variant(vals)
    for exp, g in t.groupby("experiment", sort=False):
        bkey = _baseline_key(vals[vals["experiment"] == exp], baseline)
        b = g.index[g["key"] == bkey][0]
        t.loc[b, "baseline"] = True
        _differences(t, g.index, b)
        _verdicts(t, g.index, b)
    t.attrs.update(df.attrs)
    return t[TABLE_COLUMNS].reset_index(drop=True)


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """`run_values` with each run named for people: KEY, or 'KEY seed N' where a variant has several."""
    v = run_values(df)
    several = v.groupby(["experiment", "key"])["seed"].transform("nunique") > 1
    v["variant"] = v["key"]
    v["key"] = v["key"].where(~several, v["key"] + " seed " + v["seed"].astype(str))
    return v


def budget_warnings(table: pd.DataFrame) -> list[str]:
    """lab.fidelity's warnings for each experiment of an ablation table (time budgets only)."""
    from lab import fidelity as F

    out = []
    multi = table["experiment"].nunique() > 1 if not table.empty else False
    for exp, g in table.groupby("experiment", sort=False):
        rows = [
            {
                "key": r["key"],
                "variant": r["variant"],
                "budget_kind": "seconds" if pd.notna(r["budget_s"]) else None,
                "planned_seconds": r["budget_s"],
                "train_seconds": r["train_s"],
                "steps": r["steps"],
                "calibrated_step_seconds": r["cal_step_s"],
            }
            for _, r in g.iterrows()
            if r["status"] in (FINISHED, "RUNNING")
        ]
        out += [f"{exp}: {w}" if multi else w for w in F.budget_warnings(rows)]
    return out


PER_SEED_COLUMNS = [
    "experiment",
    "key",
    "seed",
    "status",
    "top1",
    "top1_best",
    "steps",
    "train_s",
    "params_m",
    "cpu_imgs_s",
    "gpu_imgs_s",
    "hash",
    "run_id",
    "error",
]


def per_seed_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run shown (variant x seed), without aggregation."""
    if df.empty:
        return pd.DataFrame(columns=PER_SEED_COLUMNS)
    v = run_values(df)
    return v[PER_SEED_COLUMNS].reset_index(drop=True)
