"""Read MLflow back into pandas: ablation tables, Pareto and convergence plots. Never trains.

Everything works on partial results: a variant that is RUNNING, FAILED or KILLED still gets a
row (with whatever it logged), and several `lab run`s of one experiment are merged by taking,
per variant key, the latest FINISHED child run, else the latest child run of any status.

Data functions (`load_runs`, `history`, `ablation_table`, `pareto_data`, `convergence_data`)
return plain DataFrames so tests and notebooks can assert on them; plotting functions only
draw what those return; `register()` adds the `table` and `plot` subcommands.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from lab import lease
from lab.errors import LabError, close_matches
from lab.figures import pyplot, save_figure

X_KINDS = ("images_seen", "epoch", "train_seconds", "step")
X_LABELS = {"images_seen": "images seen", "epoch": "epoch", "train_seconds": "training time (s)",
            "step": "optimizer step"}
DEVICES = ("cpu", "cuda")
FORMATS = ("terminal", "markdown", "csv", "latex", "json")
BENCH_METRIC = {"cpu": "bench/cpu_imgs_per_s", "cuda": "bench/cuda_imgs_per_s"}
REF_THROUGHPUT = {"cpu": "ref.throughput_cpu", "cuda": "ref.throughput_gpu"}
FINISHED = "FINISHED"

# --------------------------------------------------------------------------- store access


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else lab.track's rule ($MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)."""
    from lab.track import tracking_uri

    return uri or tracking_uri(None)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    from lab.track import _sqlite_path

    db = _sqlite_path(uri)
    if db is not None and not db.is_file():  # reading must not create an empty store as a side effect
        raise LabError(f"no MLflow store at {db} (run `lab run SPEC` first, or pass --tracking-uri / "
                       f"set MLFLOW_TRACKING_URI)")
    return MlflowClient(tracking_uri=uri)


def _experiment_ids(client, names: Sequence[str]) -> dict[str, str]:
    known = [e.name for e in client.search_experiments()]
    out: dict[str, str] = {}
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            listed = ", ".join(sorted(n for n in known if n != "Default")) or "none yet"
            raise LabError(f"unknown experiment '{name}'{close_matches(name, known)}; known experiments: {listed}")
        out[name] = exp.experiment_id
    return out


def _search_all(client, experiment_ids: list[str]) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _ts(ms: int | None) -> pd.Timestamp | None:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _parse_tag_filter(tags: dict[str, str] | Iterable[str] | None) -> dict[str, str]:
    if not tags:
        return {}
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    out = {}
    for t in tags:
        if "=" not in t:
            raise LabError(f"--tag expects key=value, got {t!r}")
        k, v = t.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_runs(experiments: Sequence[str] | str, tracking_uri: str | None = None,
              tags: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per variant: the latest FINISHED child run of each key, else its latest run.

    `tags` keeps only runs whose tags match every key=value (a key the child lacks is looked up
    on its parent run, so spec-level tags work either way). Columns: run_id, parent_run_id,
    experiment, key, status, baseline, changes, hash, git_commit, device, error, start_time,
    end_time, first_start (earliest run of that key: the spec order, roughly), n_runs, then
    `metrics.*` (last value), `params.*`, `tags.*`. Rows are in first_start order.
    """
    if isinstance(experiments, str):
        experiments = [experiments]
    if not experiments:
        raise LabError("name at least one experiment")
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    ids = _experiment_ids(client, experiments)
    want = _parse_tag_filter(tags)
    runs = _search_all(client, list(dict.fromkeys(ids.values())))
    id_to_name = {v: k for k, v in ids.items()}
    by_id = {r.info.run_id: r for r in runs}

    rows: list[dict[str, Any]] = []
    for r in runs:
        t = r.data.tags
        if t.get("lab.role") == "parent" or "lab.variant" not in t:
            continue
        if want:
            parent = by_id.get(t.get("mlflow.parentRunId", ""))
            ptags = parent.data.tags if parent is not None else {}
            if any(t.get(k, ptags.get(k)) != v for k, v in want.items()):
                continue
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "parent_run_id": t.get("mlflow.parentRunId"),
            "experiment": t.get("lab.experiment") or id_to_name.get(r.info.experiment_id, ""),
            "key": t["lab.variant"],
            "status": lease.shown_status(r.info.status, t),  # STALE: RUNNING, but its process is gone
            "baseline": str(t.get("lab.baseline", "")).lower() == "true",
            "changes": t.get("lab.changes", ""),
            "hash": t.get("lab.hash"),
            "git_commit": t.get("lab.git_commit"),
            "device": t.get("lab.device"),
            "error": t.get("lab.error"),
            "start_time": _ts(r.info.start_time),
            "end_time": _ts(r.info.end_time),
        }
        row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"tags.{k}": v for k, v in t.items()})
        rows.append(row)

    base_cols = ["run_id", "parent_run_id", "experiment", "key", "status", "baseline", "changes", "hash",
                 "git_commit", "device", "error", "start_time", "end_time", "first_start", "n_runs"]
    if not rows:
        df = pd.DataFrame(columns=base_cols)
        df.attrs["tracking_uri"] = uri
        return df
    all_runs = pd.DataFrame(rows)
    all_runs["_finished"] = all_runs["status"] == FINISHED
    all_runs["_start"] = all_runs["start_time"].map(lambda x: x.value if x is not None else 0)
    grp = all_runs.groupby(["experiment", "key"], sort=False)
    all_runs["first_start"] = grp["start_time"].transform("min")
    all_runs["n_runs"] = grp["run_id"].transform("count")
    chosen = (all_runs.sort_values(["_finished", "_start"], ascending=[False, False], kind="stable")
              .drop_duplicates(["experiment", "key"], keep="first"))
    order = {e: i for i, e in enumerate(experiments)}
    chosen = chosen.assign(_exp=chosen["experiment"].map(order).fillna(len(order)))
    chosen = chosen.sort_values(["_exp", "first_start", "key"], kind="stable")
    chosen = chosen.drop(columns=["_finished", "_start", "_exp"]).reset_index(drop=True)
    # superseded runs may have logged keys the chosen ones lack: drop those all-empty columns
    extra = sorted(c for c in chosen.columns if c not in base_cols and chosen[c].notna().any())
    chosen = chosen[base_cols + extra]
    chosen.attrs["tracking_uri"] = uri
    return chosen


def history(run_ids: Sequence[str] | str, metric: str = "val/top1", x: str = "images_seen",
            tracking_uri: str | None = None) -> pd.DataFrame:
    """`metric` of each run against `x`, joined on the optimizer step.

    Columns: run_id, step, x, value (x is the step itself for x='step'); rows sorted by run
    then step. Points whose x was not logged at the same step are dropped.
    """
    if x not in X_KINDS:
        raise LabError(f"unknown x '{x}'{close_matches(x, X_KINDS)}; choose one of {', '.join(X_KINDS)}")
    if isinstance(run_ids, str):
        run_ids = [run_ids]
    client = _client(resolve_tracking_uri(tracking_uri))
    parts = []
    for rid in run_ids:
        ys = pd.DataFrame([(m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, metric)],
                          columns=["step", "value", "ts"])
        if ys.empty:
            continue
        # a resumed run may log a step twice: keep the last write
        ys = ys.sort_values(["step", "ts"]).drop_duplicates("step", keep="last").drop(columns="ts")
        if x == "step":
            ys["x"] = ys["step"].astype(float)
        else:
            xs = pd.DataFrame([(m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, x)],
                              columns=["step", "x", "ts"])
            xs = xs.sort_values(["step", "ts"]).drop_duplicates("step", keep="last").drop(columns="ts")
            ys = ys.merge(xs, on="step", how="inner")
        ys.insert(0, "run_id", rid)
        parts.append(ys[["run_id", "step", "x", "value"]])
    if not parts:
        return pd.DataFrame({"run_id": pd.Series(dtype=str), "step": pd.Series(dtype="int64"),
                             "x": pd.Series(dtype=float), "value": pd.Series(dtype=float)})
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(metric=metric, x=x)
    return out


# --------------------------------------------------------------------------- the ablation table


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, NaN where absent (runs log different things)."""
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce")
    return pd.Series(math.nan, index=df.index, dtype=float)


def _baseline_index(df: pd.DataFrame, key: str | None) -> Any:
    if key is not None and (df["key"] == key).any():
        return df.index[df["key"] == key][0]
    flagged = df.index[df["baseline"].astype(bool)] if "baseline" in df.columns else []
    return flagged[0] if len(flagged) else df.index[0]


TABLE_COLUMNS = ["experiment", "key", "baseline", "status", "changes", "params_m", "macs_m", "cpu_imgs_s",
                 "gpu_imgs_s", "top1", "top1_best", "d_top1", "d_params_m", "d_macs_m", "cpu_speedup",
                 "gpu_speedup", "steps", "images_seen", "train_s", "budget_s", "cal_step_s", "ref_top1", "ref_d_top1", "ref_params_m",
                 "ref_macs_m", "ref_cpu_imgs_s", "ref_gpu_imgs_s", "ref_epochs", "ref_source", "run_id"]


def ablation_table(df: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant with deltas against its experiment's baseline row.

    Baseline: `baseline` (a variant key) where that experiment has it, else the row tagged
    lab.baseline=true, else the first row. Units: params and MACs in millions, throughput in
    images/s, top-1 in %. d_* are differences (variant - baseline), *_speedup are throughput
    ratios (variant / baseline). top1 is final/val_top1, or the last val/top1 of a run that has
    not finished; top1_best likewise falls back to the best val/top1 logged so far.
    """
    if df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    if baseline is not None and not (df["key"] == baseline).any():
        raise LabError(f"no variant '{baseline}' to use as baseline{close_matches(baseline, df['key'])}; "
                       f"variants: {', '.join(df['key'])}")
    t = pd.DataFrame(index=df.index)
    t["experiment"] = df["experiment"]
    t["key"] = df["key"]
    t["baseline"] = False
    t["status"] = df["status"]
    t["changes"] = df["changes"].fillna("") if "changes" in df.columns else ""
    t["params_m"] = _col(df, "metrics.params") / 1e6
    t["macs_m"] = _col(df, "metrics.macs") / 1e6
    t["cpu_imgs_s"] = _col(df, "metrics." + BENCH_METRIC["cpu"])
    t["gpu_imgs_s"] = _col(df, "metrics." + BENCH_METRIC["cuda"])
    t["top1"] = _col(df, "metrics.final/val_top1").fillna(_col(df, "metrics.val/top1"))
    best = _col(df, "metrics.best/val_top1")
    missing = best.isna() & _col(df, "metrics.val/top1").notna()
    if missing.any():  # partial runs: best so far from the history
        uri = df.attrs.get("tracking_uri")
        for i in df.index[missing]:
            h = history([df.at[i, "run_id"]], "val/top1", x="step", tracking_uri=uri)
            best.at[i] = h["value"].max() if not h.empty else math.nan
    t["top1_best"] = best
    t["steps"] = _col(df, "metrics.budget/steps")
    t["images_seen"] = _col(df, "metrics.budget/images_seen").fillna(_col(df, "metrics.images_seen"))
    t["train_s"] = _col(df, "metrics.budget/train_seconds").fillna(_col(df, "metrics.train_seconds"))
    t["budget_s"] = _col(df, "metrics.budget/planned_seconds")  # seconds budgets: what train_s should be
    t["cal_step_s"] = _col(df, "metrics.budget/calibration_step_seconds")
    t["ref_top1"] = _col(df, "tags.ref.top1")
    t["ref_params_m"] = _col(df, "tags.ref.params_m")
    t["ref_macs_m"] = _col(df, "tags.ref.macs_m")
    t["ref_cpu_imgs_s"] = _col(df, "tags.ref.throughput_cpu")
    t["ref_gpu_imgs_s"] = _col(df, "tags.ref.throughput_gpu")
    t["ref_epochs"] = _col(df, "tags.ref.epochs")
    t["ref_source"] = df["tags.ref.source"] if "tags.ref.source" in df.columns else None
    t["run_id"] = df["run_id"]
    for c in ("d_top1", "d_params_m", "d_macs_m", "cpu_speedup", "gpu_speedup", "ref_d_top1"):
        t[c] = math.nan
    for _, g in t.groupby("experiment", sort=False):
        b = _baseline_index(df.loc[g.index], baseline)
        t.loc[b, "baseline"] = True
        for c, src in (("d_top1", "top1"), ("d_params_m", "params_m"), ("d_macs_m", "macs_m"),
                       ("ref_d_top1", "ref_top1")):
            t.loc[g.index, c] = t.loc[g.index, src] - t.at[b, src]
        for c, src in (("cpu_speedup", "cpu_imgs_s"), ("gpu_speedup", "gpu_imgs_s")):
            t.loc[g.index, c] = t.loc[g.index, src] / t.at[b, src]
    return t[TABLE_COLUMNS].reset_index(drop=True)


# --------------------------------------------------------------------------- rendering tables

PRETTY = {"experiment": "experiment", "key": "variant", "status": "status", "changes": "changes",
          "params_m": "params (M)", "macs_m": "MACs (M)", "cpu_imgs_s": "CPU img/s", "gpu_imgs_s": "GPU img/s",
          "top1": "top-1 (%)", "top1_best": "best top-1", "d_top1": "Δ top-1", "d_params_m": "Δ params (M)",
          "d_macs_m": "Δ MACs (M)", "cpu_speedup": "CPU speed ×", "gpu_speedup": "GPU speed ×",
          "steps": "steps", "images_seen": "images seen", "train_s": "train s", "budget_s": "budget s", "ref_top1": "paper top-1",
          "ref_d_top1": "paper Δ top-1", "ref_params_m": "paper params (M)", "ref_macs_m": "paper MACs (M)",
          "ref_cpu_imgs_s": "paper CPU img/s", "ref_gpu_imgs_s": "paper GPU img/s"}
# shown only where at least one row has a value ("throughput where measured", paper figures where given)
OPTIONAL = {"cpu_imgs_s", "gpu_imgs_s", "cpu_speedup", "gpu_speedup", "ref_top1", "ref_d_top1", "ref_params_m",
            "ref_macs_m", "ref_cpu_imgs_s", "ref_gpu_imgs_s", "params_m", "macs_m", "d_params_m", "d_macs_m",
            "steps", "images_seen", "train_s", "budget_s", "top1_best"}


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


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: rounded, units in headers, the baseline marked '*', empty columns dropped."""
    rows = []
    multi = table["experiment"].nunique() > 1
    for _, r in table.iterrows():
        d: dict[str, str] = {}
        if multi:
            d["experiment"] = r["experiment"]
        d["key"] = r["key"] + (" *" if r["baseline"] else "")
        d["status"] = r["status"]
        for c in ("params_m", "macs_m", "cpu_imgs_s", "gpu_imgs_s"):
            d[c] = _num(r[c])
        for c in ("top1", "top1_best"):
            d[c] = _pct(r[c])
        d["d_top1"] = "" if r["baseline"] else _pct(r["d_top1"], signed=True)
        for c in ("d_params_m", "d_macs_m"):
            d[c] = "" if r["baseline"] else _num(r[c], signed=True)
        for c in ("cpu_speedup", "gpu_speedup"):
            d[c] = "" if (r["baseline"] or pd.isna(r[c])) else f"{r[c]:.2f}x"
        d["steps"] = "" if pd.isna(r["steps"]) else f"{int(r['steps'])}"
        d["images_seen"] = "" if pd.isna(r["images_seen"]) else f"{int(r['images_seen']):,}"
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


def budget_warnings(table: pd.DataFrame) -> list[str]:
    """lab.fidelity's warnings for each experiment of an ablation table (time budgets only)."""
    from lab import fidelity as F

    out = []
    multi = table["experiment"].nunique() > 1 if not table.empty else False
    for exp, g in table.groupby("experiment", sort=False):
        rows = [{"key": r["key"], "budget_kind": "seconds" if pd.notna(r["budget_s"]) else None,
                 "planned_seconds": r["budget_s"], "train_seconds": r["train_s"], "steps": r["steps"],
                 "calibrated_step_seconds": r["cal_step_s"]} for _, r in g.iterrows()
                if r["status"] in (FINISHED, "RUNNING")]
        out += [f"{exp}: {w}" if multi else w for w in F.budget_warnings(rows)]
    return out


def _markdown(disp: pd.DataFrame) -> str:
    """GitHub markdown without tabulate (numbers right-aligned)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    numeric = [c for c in disp.columns if c not in ("experiment", "variant", "status", "changes")]
    lines = ["| " + " | ".join(cell(c) for c in disp.columns) + " |",
             "|" + "|".join("---:" if c in numeric else ":---" for c in disp.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in disp.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(disp: pd.DataFrame) -> str:
    def esc(v: Any) -> str:
        s = "".join(_LATEX_ESC.get(ch, ch) for ch in str(v))
        return s.replace("Δ", r"$\Delta$").replace("×", r"$\times$")

    numeric = [c for c in disp.columns if c not in ("experiment", "variant", "status", "changes")]
    spec = "".join("r" if c in numeric else "l" for c in disp.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(esc(c) for c in disp.columns) + r" \\", r"\midrule"]
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
    left = [c for c in ("experiment", "variant", "status", "changes") if c in disp.columns]
    width = {c: max(len(c), *(len(str(v)) for v in disp[c])) for c in left}
    disp = disp.assign(**{c: disp[c].map(lambda v, w=width[c]: str(v).ljust(w)) for c in left})
    disp = disp.rename(columns={c: c.ljust(width[c]) for c in left})
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 80):
        return disp.to_string(index=False) + "\n"


# --------------------------------------------------------------------------- figure data


def _label(df: pd.DataFrame) -> pd.Series:
    multi = df["experiment"].nunique() > 1
    lab = (df["experiment"] + "/" + df["key"]) if multi else df["key"].copy()
    unfinished = df["status"] != FINISHED
    return lab.where(~unfinished, lab + " (" + df["status"].str.lower() + ")")


def pick_device(df: pd.DataFrame) -> str:
    """cuda when any run has a GPU throughput (ours or the paper's), else cpu."""
    for c in ("metrics." + BENCH_METRIC["cuda"], "tags." + REF_THROUGHPUT["cuda"]):
        if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any():
            return "cuda"
    return "cpu"


def pareto_front(throughput: Sequence[float], top1: Sequence[float]) -> list[bool]:
    """True where no other point is at least as fast and as accurate, and better in one."""
    pts = list(zip(throughput, top1))
    return [not any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for t2, a2 in pts) for t, a in pts]


def pareto_data(df: pd.DataFrame, device: str | None = None) -> pd.DataFrame:
    """Top-1 vs inference throughput, ours and the paper's, with Pareto-front membership.

    Columns: experiment, key, label, source ('measured' | 'paper'), device, throughput (img/s),
    top1 (%), on_front (within its source). Variants missing either number are left out.
    """
    cols = ["experiment", "key", "label", "source", "device", "throughput", "top1", "on_front"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    device = device or pick_device(df)
    if device not in DEVICES:
        raise LabError(f"unknown device '{device}'; choose cpu or cuda")
    top1 = _col(df, "metrics.final/val_top1").fillna(_col(df, "metrics.val/top1"))
    ours = pd.DataFrame({"experiment": df["experiment"], "key": df["key"], "label": _label(df),
                         "source": "measured", "device": device,
                         "throughput": _col(df, "metrics." + BENCH_METRIC[device]), "top1": top1})
    paper = pd.DataFrame({"experiment": df["experiment"], "key": df["key"], "label": df["key"] + " (paper)",
                          "source": "paper", "device": device,
                          "throughput": _col(df, "tags." + REF_THROUGHPUT[device]), "top1": _col(df, "tags.ref.top1")})
    parts = []
    for part in (ours, paper):
        part = part.dropna(subset=["throughput", "top1"]).copy()
        part["on_front"] = pareto_front(part["throughput"].tolist(), part["top1"].tolist())
        parts.append(part)
    out = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(not p.empty for p in parts) \
        else pd.DataFrame(columns=cols)
    return out[cols].reset_index(drop=True)


def convergence_data(df: pd.DataFrame, x: str = "images_seen", metric: str = "val/top1",
                     tracking_uri: str | None = None) -> pd.DataFrame:
    """Validation curves of the chosen runs: experiment, key, label, status, run_id, step, x, top1."""
    cols = ["experiment", "key", "label", "status", "run_id", "step", "x", "top1"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    h = history(df["run_id"].tolist(), metric=metric, x=x, tracking_uri=tracking_uri or df.attrs.get("tracking_uri"))
    meta = df[["run_id", "experiment", "key", "status"]].assign(label=_label(df))
    out = meta.merge(h, on="run_id", how="inner").rename(columns={"value": "top1"})
    out = out[cols].reset_index(drop=True)
    out.attrs.update(x=x, metric=metric)
    return out


# --------------------------------------------------------------------------- plots


_plt = pyplot  # (pyplot, seaborn) with the lab theme (lab.figures)


def plot_pareto(data: pd.DataFrame, title: str | None = None):
    """Top-1 vs throughput (log x): measured points labelled, the Pareto front as a step line,
    the paper's points as light open diamonds. Returns the matplotlib Figure."""
    if data.empty:
        raise LabError("nothing to plot: no variant has both a top-1 and a throughput for this device "
                       "(run `lab bench`, or try --device cpu/cuda)")
    plt, sns = _plt()
    device = data["device"].iloc[0]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ours = data[data["source"] == "measured"]
    paper = data[data["source"] == "paper"]
    palette = dict(zip(ours["label"], sns.color_palette("tab10", max(len(ours), 1))))
    if not ours.empty:
        sns.scatterplot(data=ours, x="throughput", y="top1", hue="label", palette=palette, s=80, ax=ax,
                        edgecolor="black", linewidth=0.6, zorder=3)
        front = ours[ours["on_front"]]
        ax.scatter(front["throughput"], front["top1"], s=230, facecolors="none", edgecolors="black",
                   linewidths=1.4, label="on Pareto front", zorder=4)
        _front_line(ax, ours, color="black", style="-", label="Pareto front")
        for _, r in ours.iterrows():
            ax.annotate(r["key"], (r["throughput"], r["top1"]), xytext=(5, 4), textcoords="offset points", fontsize=8)
    if not paper.empty:
        ax.scatter(paper["throughput"], paper["top1"], marker="D", s=50, facecolors="none", edgecolors="grey",
                   alpha=0.7, label="paper", zorder=2)
        _front_line(ax, paper, color="grey", style=":", label="paper front")
        for _, r in paper.iterrows():
            ax.annotate(f"{r['key']} (paper)", (r["throughput"], r["top1"]), xytext=(5, -10),
                        textcoords="offset points", fontsize=7, color="grey")
    ax.set_xscale("log")
    _log_ticks(ax)
    ax.set_xlabel(f"{'GPU' if device == 'cuda' else 'CPU'} inference throughput (images/s, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: accuracy vs {'GPU' if device == 'cuda' else 'CPU'} speed")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _front_line(ax, pts: pd.DataFrame, color: str, style: str, label: str) -> None:
    """The front as a staircase, the edge of what the points dominate: at throughput x it is the best
    top-1 of the points at least that fast ("steps-pre": from each front point down, then right)."""
    f = pts[pts["on_front"]].sort_values("throughput")
    if len(f) >= 2:
        ax.plot(f["throughput"], f["top1"], linestyle=style, color=color, linewidth=1.2, alpha=0.8,
                drawstyle="steps-pre", label=label, zorder=1)


def _log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    lo, hi = lo / 1.25, hi * 1.6  # room for the point labels
    # 1-2-5 ticks over decades; a narrow range (variants of similar speed) gets denser ticks
    subs = (1.0, 2.0, 5.0) if hi / lo > 10 else (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def plot_convergence(data: pd.DataFrame, title: str | None = None):
    """Validation top-1 vs the chosen x, one line per variant (the LeViT paper's Figure 3 shape)."""
    if data.empty:
        raise LabError("nothing to plot: no run has logged val/top1 with that x yet")
    plt, sns = _plt()
    from matplotlib.ticker import EngFormatter

    x = data.attrs.get("x", "images_seen")
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sns.lineplot(data=data, x="x", y="top1", hue="label", style="label", markers=True, dashes=False,
                 estimator=None, sort=True, ax=ax)
    ax.set_xlabel(X_LABELS.get(x, x))
    if x == "images_seen":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("validation top-1 (%)")
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: convergence (validation top-1 vs {X_LABELS.get(x, x).split(' (')[0]})")
    ax.legend(title="variant", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8,
              frameon=False)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI


def _cmd_table(args: argparse.Namespace) -> int:
    df = load_runs(args.experiment, args.tracking_uri, _parse_tag_filter(args.tag))
    table = ablation_table(df, baseline=args.baseline)
    text = format_table(table, args.format)
    warnings = [f"warning: {w}" for w in budget_warnings(table)] if not table.empty else []
    if args.format == "terminal" and not table.empty:
        n = table["status"].value_counts()
        summary = ", ".join(f"{v} {k.lower()}" for k, v in n.items())
        text = f"{', '.join(args.experiment)}: {len(table)} variant(s) ({summary}); * = baseline\n" + text
        text += "".join(w + "\n" for w in warnings)
    elif warnings:
        for w in warnings:
            print(w, file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)
    else:
        sys.stdout.write(text)
    return 0


def _out_stem(out: str | None, default_name: str) -> Path:
    """--out as given (the user's own path), else out/NAME; NAME (built from experiment names) is a
    sanitised slug that stays inside its folder."""
    from lab import paths

    if not out:
        return paths.output_stem("out", default_name)
    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return paths.output_stem(p, default_name)
    return p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p


def _cmd_plot(args: argparse.Namespace) -> int:
    df = load_runs(args.experiment, args.tracking_uri, _parse_tag_filter(args.tag))
    if df.empty:
        raise LabError(f"no variant runs in {', '.join(args.experiment)}" + (" matching the --tag filter" if args.tag else ""))
    name = "_".join(args.experiment)
    if args.kind in ("filters", "attention-bias"):  # lab.inspection: from the runs' final weights
        from lab.inspection_plot import cmd_plot

        stem = _out_stem(args.out, f"{name}_{args.kind.replace('-', '_')}")
        for p in cmd_plot(df, args.kind, stem, max_images=args.images):
            print(p)
        return 0
    if args.kind == "pareto":
        data = pareto_data(df, device=args.device)
        dev = data["device"].iloc[0] if not data.empty else (args.device or pick_device(df))
        fig = plot_pareto(data)
        stem = _out_stem(args.out, f"{name}_pareto_{dev}")
    else:
        data = convergence_data(df, x=args.x)
        fig = plot_convergence(data)
        stem = _out_stem(args.out, f"{name}_convergence_{args.x}")
    for p in save_figure(fig, stem):
        print(p)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="+", help="MLflow experiment name(s) (a spec's name)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="keep only runs with this tag (repeatable), e.g. --tag lab.device=cuda")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="ablation table of an experiment's runs (partial results welcome)")
    _common(p)
    p.add_argument("--format", choices=FORMATS, default="terminal")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--baseline", help="variant key to compare against (default: the spec's baseline, else the first)")
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("plot", help="Pareto, convergence, first-layer filters or attention bias/distance, as PNG and SVG")
    _common(p)
    p.add_argument("--kind", choices=["pareto", "convergence", "filters", "attention-bias"], default="pareto",
                   help="filters: first-layer filter grids; attention-bias: bias maps per head and the mean attention "
                        "distance per layer (both from each finished run's final weights)")
    p.add_argument("--images", type=int, default=64,
                   help="attention-bias: validation images for runs that did not log their attention distance")
    p.add_argument("--x", choices=[k for k in X_KINDS], default="images_seen", help="convergence x-axis")
    p.add_argument("--device", choices=DEVICES, help="pareto throughput (default: cuda if measured, else cpu)")
    p.add_argument("--out", help="PATH without extension, or a directory (default: out/EXPERIMENT_KIND)")
    p.set_defaults(func=_cmd_plot)
