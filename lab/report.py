"""Read MLflow back into pandas: ablation tables, Pareto and convergence plots. Never trains.

Everything works on partial results: a variant that is RUNNING, FAILED or KILLED still gets a
row (with whatever it logged), and several `lab run`s of one experiment are merged by taking,
per variant key, the latest FINISHED child run, else the latest child run of any status.

Data functions (`load_runs`, `history`, `ablation_table`, `pareto_data`, `convergence_data`)
return plain DataFrames so tests and notebooks can assert on them; plotting functions only
draw what those return; `register()` adds the `table` and `plot` subcommands.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import pandas as pd

from lab import lease, track
from lab import record as R
from lab.errors import LabError, close_matches
from lab.figures import pyplot

X_KINDS = ("images_seen", "epoch", "train_seconds", "step")
X_LABELS = {
    "images_seen": "images seen",
    "epoch": "epoch",
    "train_seconds": "training time (s)",
    "step": "optimizer step",
}
DEVICES = ("cpu", "cuda")
FORMATS = ("terminal", "markdown", "csv", "latex", "json")
BENCH_METRIC = {d: R.bench_metric(d) for d in DEVICES}
REF_THROUGHPUT = {"cpu": R.ref_tag("throughput_cpu"), "cuda": R.ref_tag("throughput_gpu")}
FINISHED = "FINISHED"


def metric_col(name: str) -> str:
    """The load_runs column of metric `name` (a lab.record name)."""
    return f"metrics.{name}"


def tag_col(name: str) -> str:
    """The load_runs column of tag `name` (a lab.record name)."""
    return f"tags.{name}"


SMOKE_SUFFIX = " (smoke)"

# --------------------------------------------------------------------------- store access


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else lab.track's rule ($MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)."""
    return uri or track.tracking_uri(None)


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


def parse_tag_filter(tags: dict[str, str] | Iterable[str] | None) -> dict[str, str]:
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


def _seed_of(t: dict, params: dict) -> int:
    raw = t.get(R.SEED, params.get("train.seed"))
    try:
        return int(str(raw))
    except (TypeError, ValueError):
        return 0


RUN_COLUMNS = [
    "run_id",
    "parent_run_id",
    "experiment",
    "key",
    "seed",
    "status",
    "baseline",
    "changes",
    "hash",
    "config_hash",
    "smoke",
    "git_commit",
    "device",
    "error",
    "start_time",
    "end_time",
    "first_start",
    "n_runs",
    "n_hashes",
    "other_hashes",
]


def _is_smoke(t: dict) -> bool:
    """Whether a run's tags mark it as a smoke run (`lab run --smoke`)."""
    return str(t.get(R.SMOKE, "")).lower() == "true"


def _tags_match(t: dict, want: dict[str, str], by_id: dict) -> bool:
    """Whether a child run's tags `t` match every key=value of `want` (a key the child lacks is looked
    up on its parent run, one of `by_id`)."""
    parent = by_id.get(t.get(R.PARENT_RUN_ID, ""))
    ptags = parent.data.tags if parent is not None else {}
    return all(t.get(k, ptags.get(k)) == v for k, v in want.items())


def run_row(r, experiment_names: dict[str, str]) -> dict[str, Any]:
    """One variant run as a load_runs row, before the per-key columns (first_start, n_runs, n_hashes,
    other_hashes); `experiment_names`: experiment id -> name, for runs without the experiment tag."""
    t = r.data.tags
    smoke = _is_smoke(t)
    row: dict[str, Any] = {
        "run_id": r.info.run_id,
        "parent_run_id": t.get(R.PARENT_RUN_ID),
        "experiment": t.get(R.EXPERIMENT) or experiment_names.get(r.info.experiment_id, ""),
        # a smoke run, when asked for, is a variant of its own: it never joins or replaces real seeds
        "key": t[R.VARIANT] + (SMOKE_SUFFIX if smoke else ""),
        "seed": _seed_of(t, r.data.params),
        "status": lease.shown_status(r.info.status, t),  # STALE: RUNNING, but its process is gone
        "baseline": str(t.get(R.BASELINE, "")).lower() == "true",
        "changes": t.get(R.CHANGES, ""),
        "hash": t.get(R.HASH),
        "config_hash": t.get(R.CONFIG_HASH) or t.get(R.HASH),
        "smoke": smoke,
        "git_commit": t.get(R.GIT_COMMIT),
        "device": t.get(R.DEVICE),
        "error": t.get(R.ERROR),
        "start_time": _ts(r.info.start_time),
        "end_time": _ts(r.info.end_time),
    }
    row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
    row.update({f"params.{k}": v for k, v in r.data.params.items()})
    row.update({f"tags.{k}": v for k, v in t.items()})
    return row


def _variant_rows(
    client, experiments: Sequence[str], tags: dict[str, str] | None, include_smoke: bool
) -> tuple[list[dict[str, Any]], int]:
    """A row (`run_row`) for every variant run of `experiments` whose tags match `tags`, and how
    many smoke runs were left out (all of them unless `include_smoke`)."""
    ids = _experiment_ids(client, experiments)
    want = parse_tag_filter(tags)
    runs = _search_all(client, list(dict.fromkeys(ids.values())))
    id_to_name = {v: k for k, v in ids.items()}
    by_id = {r.info.run_id: r for r in runs}
    rows: list[dict[str, Any]] = []
    smoke_left_out = 0
    for r in runs:
        t = r.data.tags
        if t.get(R.ROLE) == R.ROLE_PARENT or R.VARIANT not in t:
            continue
        if want and not _tags_match(t, want, by_id):
            continue
        if _is_smoke(t) and not include_smoke:
            smoke_left_out += 1
            continue
        rows.append(run_row(r, id_to_name))
    return rows, smoke_left_out


def _newest_first(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows with n_runs and n_hashes per variant key, FINISHED runs first, each part latest first."""
    all_runs = pd.DataFrame(rows)
    all_runs["_finished"] = all_runs["status"] == FINISHED
    all_runs["_start"] = all_runs["start_time"].map(lambda x: x.value if x is not None else 0)
    grp = all_runs.groupby(["experiment", "key"], sort=False)
    all_runs["n_runs"] = grp["run_id"].transform("count")
    all_runs["n_hashes"] = grp["config_hash"].transform("nunique")
    return all_runs.sort_values(["_finished", "_start"], ascending=[False, False], kind="stable")


def _matching_hash(runs: pd.DataFrame, hash: str, experiments: Sequence[str]) -> pd.DataFrame:
    """The runs whose config hash or run hash starts with `hash` (an error when there are none)."""
    hit = runs["config_hash"].fillna("").str.startswith(hash) | runs["hash"].fillna("").str.startswith(hash)
    if not hit.any():
        raise LabError(
            f"no run with hash '{hash}' in {', '.join(experiments)}; hashes there: "
            f"{', '.join(sorted(set(runs['config_hash'].dropna())))}"
        )
    return runs[hit]


def _spec_versions(newest: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """(experiment, key) -> its config hashes, the one of its first run in `newest` first."""
    return {
        (e, k): list(dict.fromkeys(g["config_hash"])) for (e, k), g in newest.groupby(["experiment", "key"], sort=False)
    }


def _with_first_start(newest: pd.DataFrame) -> pd.DataFrame:
    """Adds first_start: the spec order, roughly: when each version of each variant first started
    (any seed or status)."""
    first = newest.groupby(["experiment", "key", "config_hash"])["start_time"].min().to_dict()
    return newest.assign(
        first_start=[first[(e, k, c)] for e, k, c in zip(newest["experiment"], newest["key"], newest["config_hash"])]
    )


def _every_version(newest: pd.DataFrame) -> pd.DataFrame:
    """Per key, version and seed its first run in `newest`; where a key has several versions,
    each becomes its own variant KEY@HASH7."""
    chosen = newest.drop_duplicates(["experiment", "key", "config_hash", "seed"], keep="first").copy()
    several = chosen.groupby(["experiment", "key"])["config_hash"].transform("nunique") > 1
    chosen.loc[several, "key"] = chosen.loc[several, "key"] + "@" + chosen.loc[several, "config_hash"].str[:7]
    return chosen


def _shown_version(newest: pd.DataFrame) -> pd.DataFrame:
    """Per key the version of its first run in `newest`, and of that version per seed its first run."""
    shown = newest.drop_duplicates(["experiment", "key"], keep="first")[["experiment", "key", "config_hash"]]
    chosen = newest.merge(shown, on=["experiment", "key", "config_hash"], how="inner")
    return chosen.drop_duplicates(["experiment", "key", "seed"], keep="first")


def _other_hashes(chosen: pd.DataFrame, versions: dict[tuple[str, str], list[str]]) -> list[str]:
    """Per row: the other config hashes of its key, comma-separated."""
    return [
        ", ".join(h for h in versions[(e, k.split("@")[0])] if h != c)
        for e, k, c in zip(chosen["experiment"], chosen["key"], chosen["config_hash"])
    ]


def _version_notes(versions: dict[tuple[str, str], list[str]]) -> list[str]:
    """A note for each key with runs of several spec versions, naming the one shown."""
    return [
        f"{e}/{k}: runs of {len(hs)} spec versions; showing config hash {hs[0]} (its latest finished run), "
        f"not {', '.join(hs[1:])}: `--all-hashes` lists every version, `--hash HASH` picks one"
        for (e, k), hs in versions.items()
        if len(hs) > 1
    ]


def _in_spec_order(chosen: pd.DataFrame, experiments: Sequence[str]) -> pd.DataFrame:
    """Rows by experiment (as named), first_start, key, seed; RUN_COLUMNS, then the other columns
    with a value."""
    order = {e: i for i, e in enumerate(experiments)}
    chosen = chosen.assign(_exp=chosen["experiment"].map(order).fillna(len(order)))
    chosen = chosen.sort_values(["_exp", "first_start", "key", "seed"], kind="stable")
    chosen = chosen.drop(columns=["_finished", "_start", "_exp"]).reset_index(drop=True)
    # superseded runs may have logged keys the chosen ones lack: drop those all-empty columns
    extra = sorted(c for c in chosen.columns if c not in RUN_COLUMNS and chosen[c].notna().any())
    return chosen[RUN_COLUMNS + extra]


def _shown_runs(
    rows: list[dict[str, Any]], experiments: Sequence[str], *, all_hashes: bool, hash: str | None
) -> tuple[pd.DataFrame, list[str]]:
    """load_runs' rows from every variant run's: the shown spec version(s) of each key, per seed its
    latest FINISHED run, else its latest run; and notes on the versions left out."""
    newest = _newest_first(rows)
    if hash:
        newest = _matching_hash(newest, hash, experiments)
        all_hashes = True  # every matching version, named as such where a key has several
    versions = _spec_versions(newest)
    newest = _with_first_start(newest)
    chosen = _every_version(newest) if all_hashes else _shown_version(newest)
    chosen["other_hashes"] = _other_hashes(chosen, versions)
    notes = [] if all_hashes else _version_notes(versions)
    return _in_spec_order(chosen, experiments), notes


def load_runs(
    experiments: Sequence[str] | str,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    *,
    include_smoke: bool = False,
    all_hashes: bool = False,
    hash: str | None = None,
) -> pd.DataFrame:
    """One row per variant and seed: for each variant key, the runs of one spec version (its
    `config_hash`, the content hash without train.seed), and per seed the latest FINISHED run,
    else the latest run of any status.

    Which spec version: the one of the variant's latest FINISHED run, else of its latest run
    (`hash`: the version whose config hash or run hash starts with it; `all_hashes`: every
    version, each as its own variant `KEY@HASH7` where a key has several). Smoke runs
    (`lab run --smoke`, tag lab.smoke) are left out unless `include_smoke`. `tags` keeps only runs
    whose tags match every key=value (a key the child lacks is looked up on its parent run, so
    spec-level tags work either way). Columns: run_id, parent_run_id, experiment, key, seed,
    status, baseline, changes, hash, config_hash, smoke, git_commit, device, error, start_time,
    end_time, first_start (earliest run of the shown version of that key: the spec order, roughly), n_runs (runs of
    the key, every version and seed), n_hashes (its spec versions), other_hashes, then
    `metrics.*` (last value), `params.*`, `tags.*`. Rows are in first_start order, then seed.
    `attrs`: tracking_uri, smoke_left_out (runs), notes (lines for people).
    """

    if isinstance(experiments, str):
        experiments = [experiments]
    if not experiments:
        raise LabError("name at least one experiment")
    uri = resolve_tracking_uri(tracking_uri)
    rows, smoke_left_out = _variant_rows(track.read_client(uri), experiments, tags, include_smoke)
    notes: list[str] = []
    if smoke_left_out:
        notes.append(f"{smoke_left_out} smoke run(s) left out (--include-smoke shows them)")
    attrs: dict[str, Any] = {"tracking_uri": uri, "smoke_left_out": smoke_left_out, "notes": notes}
    if not rows:
        df = pd.DataFrame(columns=RUN_COLUMNS)
        df.attrs.update(attrs)
        return df
    chosen, shown_notes = _shown_runs(rows, experiments, all_hashes=all_hashes, hash=hash)
    notes += shown_notes
    chosen.attrs.update(attrs)
    return chosen


def history(
    run_ids: Sequence[str] | str, metric: str = R.VAL_TOP1, x: str = R.IMAGES_SEEN, tracking_uri: str | None = None
) -> pd.DataFrame:
    """`metric` of each run against `x`, joined on the optimizer step.

    Columns: run_id, step, x, value (x is the step itself for x='step'); rows sorted by run
    then step. Points whose x was not logged at the same step are dropped.
    """
    if x not in X_KINDS:
        raise LabError(f"unknown x '{x}'{close_matches(x, X_KINDS)}; choose one of {', '.join(X_KINDS)}")
    if isinstance(run_ids, str):
        run_ids = [run_ids]
    client = track.read_client(resolve_tracking_uri(tracking_uri))
    parts = []
    for rid in run_ids:
        ys = pd.DataFrame(
            [(m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, metric)],
            columns=["step", "value", "ts"],
        )
        if ys.empty:
            continue
        # a resumed run may log a step twice: keep the last write
        ys = ys.sort_values(["step", "ts"]).drop_duplicates("step", keep="last").drop(columns="ts")
        if x == "step":
            ys["x"] = ys["step"].astype(float)
        else:
            xs = pd.DataFrame(
                [(m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, x)], columns=["step", "x", "ts"]
            )
            xs = xs.sort_values(["step", "ts"]).drop_duplicates("step", keep="last").drop(columns="ts")
            ys = ys.merge(xs, on="step", how="inner")
        ys.insert(0, "run_id", rid)
        parts.append(ys[["run_id", "step", "x", "value"]])
    if not parts:
        return pd.DataFrame(
            {
                "run_id": pd.Series(dtype=str),
                "step": pd.Series(dtype="int64"),
                "x": pd.Series(dtype=float),
                "value": pd.Series(dtype=float),
            }
        )
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(metric=metric, x=x)
    return out


# --------------------------------------------------------------------------- the ablation table


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


# --------------------------------------------------------------------------- rendering tables

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


# --------------------------------------------------------------------------- figure data


def _variant_status(df: pd.DataFrame) -> pd.Series:
    """Per row: its variant's status over all its seeds (FINISHED only when every seed finished)."""
    return df.groupby(["experiment", "key"], sort=False)["status"].transform(overall_status)


def _label(df: pd.DataFrame) -> pd.Series:
    """A variant's name in figures (one per variant, whatever its seeds): KEY, EXPERIMENT/KEY
    when several experiments are shown, '(running)' etc. while not every seed has finished."""
    multi = df["experiment"].nunique() > 1
    lab = (df["experiment"] + "/" + df["key"]) if multi else df["key"].copy()
    status = _variant_status(df) if not df.empty else df["status"]
    unfinished = status != FINISHED
    return lab.where(~unfinished, lab + " (" + status.str.lower() + ")")


def pick_device(df: pd.DataFrame) -> str:
    """cuda when any run has a GPU throughput (ours or the paper's), else cpu."""
    for c in (metric_col(BENCH_METRIC["cuda"]), tag_col(REF_THROUGHPUT["cuda"])):
        if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any():
            return "cuda"
    return "cpu"


def pareto_front(throughput: Sequence[float], top1: Sequence[float]) -> list[bool]:
    """True where no other point is at least as fast and as accurate, and better in one."""
    pts = list(zip(throughput, top1))
    return [not any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for t2, a2 in pts) for t, a in pts]


def _spread(t: pd.DataFrame, dev: str, side: int) -> pd.Series:
    """The throughput error bar's end: the slowest (side -1) / fastest (+1) of the bench repeats,
    widened to mean -/+ std over seeds where that is wider."""
    mean, std = t[f"{dev}_imgs_s"], t[f"{dev}_imgs_s_std"].fillna(0)
    end = t[f"{dev}_imgs_s_lo" if side < 0 else f"{dev}_imgs_s_hi"].fillna(mean)
    return end.combine(mean + side * std, min if side < 0 else max)


PARETO_COLUMNS = [
    "experiment",
    "key",
    "label",
    "source",
    "device",
    "throughput",
    "top1",
    "throughput_lo",
    "throughput_hi",
    "top1_std",
    "n_seeds",
    "baseline",
    "on_front",
]


def pareto_data(df: pd.DataFrame, device: str | None = None) -> pd.DataFrame:
    """Top-1 vs inference throughput per variant (means over its finished seeds), ours and the
    paper's, with Pareto-front membership.

    Columns: experiment, key, label, source ('measured' | 'paper'), device, throughput (img/s),
    top1 (%), throughput_lo/_hi (slowest/fastest bench repeat, or mean -/+ std over seeds where
    wider), top1_std (over seeds; NaN for one), n_seeds, baseline, on_front
    (within its source). Variants missing either number are left out; no paper points when a
    smoke run is among the variants (a smoke run is not comparable with the paper).
    """
    if df.empty:
        return pd.DataFrame(columns=PARETO_COLUMNS)
    device = device or pick_device(df)
    if device not in DEVICES:
        raise LabError(f"unknown device '{device}'; choose cpu or cuda")
    t = ablation_table(df)
    ours = _measured_points(t, df, device)
    paper = _paper_points(t, device)
    if t["smoke"].astype(bool).any():
        paper = paper.iloc[0:0]
    return _with_fronts([ours, paper])


def _measured_points(t: pd.DataFrame, df: pd.DataFrame, device: str) -> pd.DataFrame:
    """Our point of every variant of the ablation table `t` (labels from the runs `df`)."""
    labels = dict(zip(zip(df["experiment"], df["key"]), _label(df)))
    dev = "cpu" if device == "cpu" else "gpu"
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "key": t["key"],
            "label": [labels[(e, k)] for e, k in zip(t["experiment"], t["key"])],
            "source": "measured",
            "device": device,
            "throughput": t[f"{dev}_imgs_s"],
            "top1": t["top1"],
            "throughput_lo": _spread(t, dev, -1),
            "throughput_hi": _spread(t, dev, 1),
            "top1_std": t["top1_std"],
            "n_seeds": t["n_seeds"],
            "baseline": t["baseline"],
        }
    )


def _paper_points(t: pd.DataFrame, device: str) -> pd.DataFrame:
    """The paper's point of every variant of the ablation table `t` (no spread, no seeds)."""
    dev = "cpu" if device == "cpu" else "gpu"
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "key": t["key"],
            "label": t["key"] + " (paper)",
            "source": "paper",
            "device": device,
            "throughput": t[f"ref_{dev}_imgs_s"],
            "top1": t["ref_top1"],
            "throughput_lo": math.nan,
            "throughput_hi": math.nan,
            "top1_std": math.nan,
            "n_seeds": math.nan,
            "baseline": t["baseline"],
        }
    )


def _with_fronts(sources: list[pd.DataFrame]) -> pd.DataFrame:
    """The points of every source that have both numbers, each marked on_front within its source."""
    parts = []
    for part in sources:
        part = part.dropna(subset=["throughput", "top1"]).copy()
        part["on_front"] = pareto_front(part["throughput"].tolist(), part["top1"].tolist())
        parts.append(part)
    out = (
        pd.concat([p for p in parts if not p.empty], ignore_index=True)
        if any(not p.empty for p in parts)
        else pd.DataFrame(columns=PARETO_COLUMNS)
    )
    return out[PARETO_COLUMNS].reset_index(drop=True)


def convergence_data(
    df: pd.DataFrame, x: str = R.IMAGES_SEEN, metric: str = R.VAL_TOP1, tracking_uri: str | None = None
) -> pd.DataFrame:
    """Validation curves of the chosen runs (every finished seed; a variant with none: every run
    as far as it got): experiment, key, label (one per variant), seed, status, run_id, step, x, top1."""
    cols = ["experiment", "key", "label", "seed", "status", "run_id", "step", "x", "top1"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    # a variant with finished seeds is drawn from those (as the table counts them); others as far as they got
    done = (df["status"] == FINISHED).groupby([df["experiment"], df["key"]]).transform("any")
    df = df.assign(_label=_label(df))[(df["status"] == FINISHED) | ~done]
    h = history(df["run_id"].tolist(), metric=metric, x=x, tracking_uri=tracking_uri or df.attrs.get("tracking_uri"))
    seed = df["seed"] if "seed" in df.columns else 0
    meta = df[["run_id", "experiment", "key", "status"]].assign(label=df["_label"], seed=seed)
    out = meta.merge(h, on="run_id", how="inner").rename(columns={"value": "top1"})
    out = out[cols].reset_index(drop=True)
    out.attrs.update(x=x, metric=metric)
    return out


def seeds_data(df: pd.DataFrame) -> pd.DataFrame:
    """Final top-1 of every finished seed: experiment, key, label, seed, top1, baseline."""
    cols = ["experiment", "key", "label", "seed", "top1", "baseline"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    t = ablation_table(df)
    base = set(zip(t.loc[t["baseline"], "experiment"], t.loc[t["baseline"], "key"]))
    v = run_values(df).assign(label=_label(df))
    v = v[(v["status"] == FINISHED) & v["top1"].notna()]
    v = v.assign(baseline=[(e, k) in base for e, k in zip(v["experiment"], v["key"])])
    return v[cols].reset_index(drop=True)


# --------------------------------------------------------------------------- plots


_plt = pyplot  # (pyplot, seaborn) with the lab theme (lab.figures)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "d", "H", "8")


def variant_styles(labels: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """label -> (colour, marker), distinct for every label: tab10 up to 10 variants, tab20 up to 20
    (then husl), with the marker cycling on its own period so colour+marker pairs never repeat."""
    import seaborn as sns

    labels = list(dict.fromkeys(labels))
    n = max(len(labels), 1)
    colours = sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)
    return {lab: (colours[i], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def _repel(ax, texts: list, max_iter: int = 500, pad: float = 2.0) -> None:
    """Move annotation labels apart until their boxes no longer overlap (a small stand-in for
    adjustText): boxes are measured once, overlapping pairs are pushed apart along the axis of
    least overlap in display space, and the result becomes each label's offset from its point."""
    if len(texts) < 2:
        return
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text alone, not its leader line
    cx = [(b.x0 + b.x1) / 2 for b in boxes]
    cy = [(b.y0 + b.y1) / 2 for b in boxes]
    hw = [b.width / 2 + pad for b in boxes]
    hh = [b.height / 2 + pad for b in boxes]
    x0, y0 = list(cx), list(cy)
    n = len(texts)
    for _ in range(max_iter):
        moved = False
        for i in range(n):
            for j in range(i + 1, n):
                ox = hw[i] + hw[j] - abs(cx[i] - cx[j])
                oy = hh[i] + hh[j] - abs(cy[i] - cy[j])
                if ox <= 0 or oy <= 0:
                    continue
                moved = True
                if oy <= ox:  # cheaper to separate vertically
                    d = (oy / 2 + 0.5) * (1 if cy[i] > cy[j] or (cy[i] == cy[j] and i < j) else -1)
                    cy[i] += d
                    cy[j] -= d
                else:
                    d = (ox / 2 + 0.5) * (1 if cx[i] > cx[j] or (cx[i] == cx[j] and i < j) else -1)
                    cx[i] += d
                    cx[j] -= d
        if not moved:
            break
    for t, a, b, c, d in zip(texts, x0, y0, cx, cy):
        ox, oy = t.xyann
        t.xyann = (ox + (c - a) / px_per_pt, oy + (d - b) / px_per_pt)


def _error_bars(ax, ours: pd.DataFrame) -> None:
    """Grey error bars where there is a spread: throughput from the slowest to the fastest bench
    repeat, top-1 ± 1 std over seeds."""
    xerr = None
    if {"throughput_lo", "throughput_hi"} <= set(ours.columns):
        xerr = [
            (ours["throughput"] - ours["throughput_lo"]).clip(lower=0).fillna(0).tolist(),
            (ours["throughput_hi"] - ours["throughput"]).clip(lower=0).fillna(0).tolist(),
        ]
        xerr = xerr if any(x > 0 for side in xerr for x in side) else None
    yerr = ours["top1_std"].fillna(0) if "top1_std" in ours and ours["top1_std"].notna().any() else None
    if xerr is not None or yerr is not None:
        ax.errorbar(
            ours["throughput"],
            ours["top1"],
            xerr=xerr,
            yerr=yerr,
            fmt="none",
            ecolor="grey",
            elinewidth=1,
            capsize=3,
            alpha=0.8,
            zorder=2,
        )


def _baseline_line(ax, ours: pd.DataFrame) -> None:
    """The baseline's top-1 as a dashed horizontal line (none without a baseline)."""
    base = ours[ours["baseline"].astype(bool)] if "baseline" in ours else ours.iloc[0:0]
    if not base.empty:
        ax.axhline(
            base["top1"].iloc[0],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"baseline: {base['key'].iloc[0]}",
            zorder=1,
        )


def _draw_measured(ax, sns, ours: pd.DataFrame) -> list:
    """Our points (error bars, a colour and marker per variant, the front ringed and as a step line,
    the baseline line); returns their labels."""
    styles = variant_styles(ours["label"])
    _error_bars(ax, ours)
    sns.scatterplot(
        data=ours,
        x="throughput",
        y="top1",
        hue="label",
        style="label",
        palette={k: c for k, (c, _) in styles.items()},
        markers={k: m for k, (_, m) in styles.items()},
        s=90,
        ax=ax,
        edgecolor="black",
        linewidth=0.6,
        zorder=3,
    )
    front = ours[ours["on_front"]]
    ax.scatter(
        front["throughput"],
        front["top1"],
        s=230,
        facecolors="none",
        edgecolors="black",
        linewidths=1.4,
        label="on Pareto front",
        zorder=4,
    )
    _front_line(ax, ours, color="black", style="-", label="Pareto front")
    _baseline_line(ax, ours)
    return [
        ax.annotate(
            r["key"],
            (r["throughput"], r["top1"]),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
            arrowprops=dict(arrowstyle="-", color="grey", lw=0.5, shrinkA=0, shrinkB=4),
        )
        for _, r in ours.iterrows()
    ]


def _draw_paper(ax, paper: pd.DataFrame) -> list:
    """The paper's points as light open diamonds with their dotted front; returns their labels."""
    ax.scatter(
        paper["throughput"],
        paper["top1"],
        marker="D",
        s=50,
        facecolors="none",
        edgecolors="grey",
        alpha=0.7,
        label="paper",
        zorder=2,
    )
    _front_line(ax, paper, color="grey", style=":", label="paper front")
    return [
        ax.annotate(
            f"{r['key']} (paper)",
            (r["throughput"], r["top1"]),
            xytext=(6, -10),
            textcoords="offset points",
            fontsize=7,
            color="grey",
            arrowprops=dict(arrowstyle="-", color="lightgrey", lw=0.5, shrinkA=0, shrinkB=4),
        )
        for _, r in paper.iterrows()
    ]


def _pareto_axes(ax, data: pd.DataFrame, ours: pd.DataFrame, title: str | None) -> None:
    """Log throughput axis, axis labels, title and the legend outside on the right."""
    device = data["device"].iloc[0]
    ax.set_xscale("log")
    _log_ticks(ax)
    ax.set_xlabel(f"{'GPU' if device == 'cuda' else 'CPU'} inference throughput (images/s, log scale)")
    n = ours["n_seeds"].max() if "n_seeds" in ours and not ours.empty else math.nan
    ax.set_ylabel("top-1 accuracy (%)" + (", mean ± std over seeds" if n and n > 1 else ""))
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: accuracy vs {'GPU' if device == 'cuda' else 'CPU'} speed")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)


def plot_pareto(data: pd.DataFrame, title: str | None = None):
    """Top-1 vs throughput (log x): one point per variant at its mean over seeds with error bars
    on both axes (top-1: ± 1 std over seeds; throughput: the slowest to fastest bench repeat), a distinct colour and marker per variant, labels kept apart, the
    baseline's top-1 as a dashed line, the Pareto front as a step line, the paper's points as
    light open diamonds. Returns the matplotlib Figure."""
    if data.empty:
        raise LabError(
            "nothing to plot: no variant has both a top-1 and a throughput for this device "
            "(run `lab bench`, or try --device cpu/cuda)"
        )
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 6))
    ours = data[data["source"] == "measured"]
    paper = data[data["source"] == "paper"]
    texts: list = []
    if not ours.empty:
        texts += _draw_measured(ax, sns, ours)
    if not paper.empty:
        texts += _draw_paper(ax, paper)
    _pareto_axes(ax, data, ours, title)
    fig.tight_layout()
    _repel(ax, texts)
    return fig


def _front_line(ax, pts: pd.DataFrame, color: str, style: str, label: str) -> None:
    """The front as a staircase, the edge of what the points dominate: at throughput x it is the best
    top-1 of the points at least that fast ("steps-pre": from each front point down, then right)."""
    f = pts[pts["on_front"]].sort_values("throughput")
    if len(f) >= 2:
        ax.plot(
            f["throughput"],
            f["top1"],
            linestyle=style,
            color=color,
            linewidth=1.2,
            alpha=0.8,
            drawstyle="steps-pre",
            label=label,
            zorder=1,
        )


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


def plot_convergence(data: pd.DataFrame, title: str | None = None, errorbar: Any = "sd"):
    """Validation top-1 vs the chosen x, one line per variant (the LeViT paper's Figure 3 shape):
    the mean over its seeds at each evaluation step (x: the seeds' mean x at that step) with a
    band (`errorbar`, seaborn's: "sd" = ± 1 std, ("ci", 95), or None)."""
    if data.empty:
        raise LabError("nothing to plot: no run has logged val/top1 with that x yet")
    plt, sns = _plt()
    from matplotlib.ticker import EngFormatter

    x = data.attrs.get("x", "images_seen")
    data = data.assign(x=data.groupby(["label", "step"])["x"].transform("mean"))
    styles = variant_styles(data["label"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sns.lineplot(
        data=data,
        x="x",
        y="top1",
        hue="label",
        style="label",
        markers={k: m for k, (_, m) in styles.items()},
        palette={k: c for k, (c, _) in styles.items()},
        dashes=False,
        estimator="mean",
        errorbar=errorbar,
        sort=True,
        ax=ax,
    )
    ax.set_xlabel(X_LABELS.get(x, x))
    if x == "images_seen":
        ax.xaxis.set_major_formatter(EngFormatter())
    several = "seed" in data and data.groupby("label")["seed"].nunique().max() > 1
    ax.set_ylabel("validation top-1 (%)" + (" (mean ± std over seeds)" if several and errorbar == "sd" else ""))
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: convergence (validation top-1 vs {X_LABELS.get(x, x).split(' (')[0]})")
    ax.legend(title="variant", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_seeds(data: pd.DataFrame, title: str | None = None):
    """Final top-1 of every seed per variant (a strip plot, one row per variant), each variant's
    mean with its 95% t-interval as a black bar, the baseline's mean as a dashed line."""
    if data.empty:
        raise LabError("nothing to plot: no variant has a finished seed")
    plt, sns = _plt()
    order = list(dict.fromkeys(data["label"]))
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.45 * len(order)))
    _seed_strips(sns, ax, data, order)
    _mean_bars(ax, data, order)
    _baseline_mean(ax, data)
    ax.set_xlabel("final validation top-1 (%), one point per seed; bar: mean and 95% CI")
    ax.set_ylabel("")
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: top-1 over seeds")
    fig.tight_layout()
    return fig


def _seed_strips(sns, ax, data: pd.DataFrame, order: list[str]) -> None:
    """One point per seed, a row per variant in `order`, in the variant's colour."""
    styles = variant_styles(order)
    sns.stripplot(
        data=data,
        x="top1",
        y="label",
        hue="label",
        order=order,
        hue_order=order,
        palette={k: c for k, (c, _) in styles.items()},
        size=7,
        jitter=0.15,
        edgecolor="black",
        linewidth=0.5,
        legend=False,
        ax=ax,
        zorder=3,
    )


def _mean_bars(ax, data: pd.DataFrame, order: list[str]) -> None:
    """Each variant's mean top-1 as a tick, with its 95% t-interval as a bar when the seeds differ."""
    from scipy import stats as sps

    from lab import stats

    for i, lab in enumerate(order):
        vals = data.loc[data["label"] == lab, "top1"]
        sm = stats.summarize(vals.tolist())
        ax.plot([sm.mean], [i], marker="|", markersize=18, color="black", zorder=4)
        if sm.n > 1 and sm.std > 0:
            half = float(sps.t.ppf(0.975, sm.n - 1)) * sm.std / math.sqrt(sm.n)
            ax.plot([sm.mean - half, sm.mean + half], [i, i], color="black", linewidth=1.5, zorder=4)


def _baseline_mean(ax, data: pd.DataFrame) -> None:
    """The baseline's mean top-1 as a dashed vertical line, named in a legend (none without a baseline)."""
    base = data[data["baseline"].astype(bool)]
    if not base.empty:
        ax.axvline(
            base["top1"].mean(),
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"baseline mean: {base['key'].iloc[0]}",
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)


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
