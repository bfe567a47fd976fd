"""Reading runs back from MLflow: the store, `load_runs` (one row per variant and seed), `history`
(one metric's curve per run) and the names of their columns. Never trains.

Everything works on partial results: a variant that is RUNNING, FAILED or KILLED still gets a
row (with whatever it logged), and several `lab run`s of one experiment are merged by taking,
per variant key, the latest FINISHED child run, else the latest child run of any status.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pandas as pd

from lab import lease, track
from lab import record as R
from lab.errors import LabError, close_matches

X_KINDS = ("images_seen", "epoch", "train_seconds", "step")
X_LABELS = {
    "images_seen": "images seen",
    "epoch": "epoch",
    "train_seconds": "training time (s)",
    "step": "optimizer step",
}
DEVICES = ("cpu", "cuda")
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
