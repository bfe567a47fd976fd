"""MLflow tracking: where the store is, how runs are named, and how they are written.

Store (first that applies):
  1. the spec's `tracking.uri`                       (a spec that names its store wins)
  2. $MLFLOW_TRACKING_URI                            (the environment overrides the default)
  3. `sqlite:///<cwd>/mlruns/mlflow.db`, artifacts under `<cwd>/mlruns/artifacts`

Checkpoints live next to a SQLite store: `<store dir>/checkpoints/<experiment>/<variant>-<hash>/`
(`<cwd>/mlruns/checkpoints/...` for a remote store).

Naming: one MLflow experiment per spec (`tracking.experiment`, default the spec name); one
parent run per `lab run` invocation (tags lab.role=parent, lab.experiment) and one child run
per variant (tags mlflow.parentRunId, lab.role=variant, lab.experiment, lab.variant, lab.hash,
lab.git_commit, lab.device, lab.changes, lab.baseline, lab.seed, lab.config_hash, lab.smoke,
ref.<field>, lab.error on failure).
Params: the flattened resolved spec (dotted keys, lists JSON). Metrics use the global optimizer
step as their step. Every name is defined in lab.record (the run record).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from lab import record as R
from lab.errors import LabError

# Tags of a variant run beside lab.variant / lab.hash (see variant_tags)
SEED_TAG = R.SEED  # train.seed of this run: one repeat of the variant
CONFIG_HASH_TAG = R.CONFIG_HASH  # content hash without train.seed: the same for all seeds of a variant
SMOKE_TAG = R.SMOKE  # "true" on `lab run --smoke` runs: tables/plots leave them out by default

PARAM_MAX = 6000  # MLflow's param value limit
DEFAULT_DIR = "mlruns"


# --------------------------------------------------------------------------- store location


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / DEFAULT_DIR / 'mlflow.db'}"


def tracking_uri(variant_or_spec: Any = None) -> str:
    """The MLflow URI for a Variant/ExperimentSpec (or None): spec's tracking.uri > $MLFLOW_TRACKING_URI > default."""
    tracking = getattr(variant_or_spec, "tracking", None)
    uri = getattr(tracking, "uri", None) if tracking is not None else None
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return default_uri()


def experiment_name(variant_or_spec: Any) -> str:
    tracking = getattr(variant_or_spec, "tracking", None)
    name = getattr(tracking, "experiment", None) if tracking is not None else None
    return name or getattr(variant_or_spec, "experiment", None) or variant_or_spec.name


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///` URI, else None."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def store_dir(uri: str) -> Path:
    """The folder that holds the store (SQLite file / file store), else ./mlruns."""
    db = sqlite_path(uri)
    if db is not None:
        return db.parent
    if uri.startswith("file:"):
        p = Path(uri[len("file://") :] if uri.startswith("file://") else uri[len("file:") :])
        return p
    if "://" not in uri and uri:  # a plain path is a file store
        return Path(uri)
    return Path.cwd() / DEFAULT_DIR


def local_store_dir(uri: str) -> Optional[Path]:
    """The store's folder when the store is a local file (SQLite, file store), None for a server."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return store_dir(uri)
    return None


def checkpoint_dir(variant: Any, uri: Optional[str] = None) -> Path:
    """`<store>/checkpoints/<experiment>-<h>/<variant>-<hash>` (lab.paths: sanitised, kept under checkpoints/),
    keyed by the MLflow experiment (tracking.experiment, not just the spec name) and the variant hash."""
    from lab import paths

    uri = uri or tracking_uri(variant)
    return paths.variant_checkpoint_dir(store_dir(uri), experiment_name(variant), variant.key, variant.hash)


def checkpoint_root(uri: str) -> Path:
    from lab import paths

    return paths.checkpoint_root(store_dir(uri))


_CHECKED: set[str] = set()


def client(uri: str):
    """An MlflowClient. A SQLite store's folder (and its artifacts/ folder) is created, its schema under a
    file lock (two `lab run`s starting at once on a new store must not both create it). The first client
    of a URI in a process checks the store: an unwritable folder, a read-only database or an unreachable
    server is a LabError (one line, exit 2) naming the URI."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        if uri not in _CHECKED and uri.startswith(("http://", "https://")):
            check_server(uri)
            _CHECKED.add(uri)
        return MlflowClient(tracking_uri=uri)
    if uri in _CHECKED:
        return MlflowClient(tracking_uri=uri)
    from lab import lease

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        (db.parent / "artifacts").mkdir(exist_ok=True)
    except OSError as e:
        raise LabError(
            f"cannot create the tracking store folder {db.parent} ({e.strerror or e}); "
            f"choose a writable place with tracking.uri or MLFLOW_TRACKING_URI"
        ) from None
    if not os.access(db.parent, os.W_OK | os.X_OK):
        raise LabError(f"the tracking store folder {db.parent} is not writable (tracking URI {uri})")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise LabError(f"the tracking database {db} is read-only or unreadable for this user (tracking URI {uri})")
    try:
        with lease.store_lock(db.parent):  # MlflowClient creates or upgrades the schema: one process at a time
            cl = MlflowClient(tracking_uri=uri)
            cl.search_experiments(max_results=1)
    except LabError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken or foreign file, a full disk
        raise LabError(f"cannot open the tracking store {uri}: {short_error(e)}") from None
    _CHECKED.add(uri)
    return cl


def check_server(uri: str) -> None:
    """A tracking server answers within $LAB_TRACKING_TIMEOUT seconds (default 10), else a LabError."""
    import requests

    timeout = float(os.environ.get("LAB_TRACKING_TIMEOUT", "10"))
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise LabError(
            f"the tracking server {uri} is unreachable ({type(e).__name__}, waited up to {timeout:g}s; "
            f"LAB_TRACKING_TIMEOUT sets the wait); is it running, and is the URI right?"
        ) from None


def get_or_create_experiment(cl, name: str, uri: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            cl.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:
        location = (db.parent / "artifacts").resolve().as_uri()
    try:
        return cl.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# --------------------------------------------------------------------------- lookups


def find_variant_runs(
    cl, experiment: str, key: Optional[str] = None, hash: Optional[str] = None, statuses: Optional[Iterable[str]] = None
) -> list:
    """Child (variant) runs of an MLflow experiment (by name), newest first; filtered by key/hash/status."""
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = [f"tags.`{R.ROLE}` = '{R.ROLE_VARIANT}'"]
    if key is not None and not ("'" in key and '"' in key):  # else filtered below (no MLflow literal for it)
        flt.append(f"tags.`{R.VARIANT}` = {_quote(key)}")
    if hash is not None:
        flt.append(f"tags.`{R.HASH}` = {_quote(hash)}")
    runs, token = [], None
    while True:
        page = cl.search_runs(
            [exp.experiment_id],
            filter_string=" and ".join(flt),
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    if key is not None:
        runs = [r for r in runs if r.data.tags.get(R.VARIANT) == key]
    if statuses is not None:
        st = set(statuses)
        runs = [r for r in runs if r.info.status in st]
    return runs


def find_parent_runs(cl, experiment_id: str, *, running: bool = False, max_results: int = 1000) -> list:
    """Parent runs (one per `lab run`) of an experiment, newest first; only RUNNING ones with `running`."""
    flt = f"tags.`{R.ROLE}` = '{R.ROLE_PARENT}'" + (" and attributes.status = 'RUNNING'" if running else "")
    return list(
        cl.search_runs(
            [experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=max_results
        )
    )


def read_client(uri: str):
    """An MlflowClient for reading an existing store: a missing SQLite store is a LabError (reading must not
    create an empty store as a side effect)."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise LabError(
            f"no MLflow store at {db} (run `lab run SPEC` first, or pass --tracking-uri / set MLFLOW_TRACKING_URI)"
        )
    return MlflowClient(tracking_uri=uri)


def _quote(value: str) -> str:
    """A string literal for an MLflow filter (a key from grid values may hold quotes)."""
    v = str(value)
    if "'" not in v:
        return f"'{v}'"
    if '"' not in v:
        return f'"{v}"'
    raise ValueError(f"cannot search MLflow for a value with both quote kinds: {v!r}")


def metric_history(cl, run_id: str, name: str) -> list[tuple[int, float]]:
    """[(step, value)] sorted by step; a step logged twice (resume) keeps its last write."""
    last: dict[int, tuple[int, float]] = {}
    for m in cl.get_metric_history(run_id, name):
        if m.step not in last or m.timestamp >= last[m.step][0]:
            last[m.step] = (m.timestamp, m.value)
    return [(s, last[s][1]) for s in sorted(last)]


# --------------------------------------------------------------------------- writing


def git_commit(cwd: Optional[str] = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def flatten(d: Mapping[str, Any]) -> dict[str, str]:
    """{'train': {'lr': 1e-3}, 'model': {'stages': [...]}} -> {'train.lr': '0.001', 'model.stages': '[...]'}."""
    from lab.spec import flatten_dotted

    return {
        k: (v if isinstance(v, str) else json.dumps(v, default=str))[:PARAM_MAX] for k, v in flatten_dotted(d).items()
    }


def log_metrics(cl, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
    for i in range(0, len(ms), 1000):
        cl.log_batch(run_id, metrics=ms[i : i + 1000])


def log_params(cl, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, params=items[i : i + 100])


def set_tags(cl, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, tags=items[i : i + 100])


def log_text(cl, run_id: str, text: str, artifact_file: str) -> None:
    cl.log_text(run_id, text, artifact_file)


def start_parent_run(cl, experiment_id: str, experiment: str, tags: Optional[Mapping[str, str]] = None) -> str:
    run = cl.create_run(
        experiment_id,
        run_name=f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={R.ROLE: R.ROLE_PARENT, R.EXPERIMENT: experiment, R.GIT_COMMIT: git_commit(), **dict(tags or {})},
    )
    return run.info.run_id


def variant_tags(
    variant: Any,
    *,
    parent_run_id: Optional[str],
    baseline: bool,
    device: Optional[str] = None,
    commit: Optional[str] = None,
) -> dict[str, str]:
    from lab.spec import describe_overrides

    tags = {
        R.ROLE: R.ROLE_VARIANT,
        R.EXPERIMENT: variant.experiment,
        R.VARIANT: variant.key,
        R.HASH: variant.hash,
        R.GIT_COMMIT: commit or git_commit(),
        R.DEVICE: device or device_name(),
        R.CHANGES: getattr(variant, "changes", "") or describe_overrides(variant.overrides),
        R.BASELINE: "true" if baseline else "false",
        R.BUDGET: variant.budget.kind,
        R.SEED: str(getattr(variant, "seed", variant.train.seed)),
    }
    if getattr(variant, "config_hash", ""):
        tags[CONFIG_HASH_TAG] = variant.config_hash
    if parent_run_id:
        tags[R.PARENT_RUN_ID] = parent_run_id
    for k, v in (variant.tags or {}).items():
        tags.setdefault(k, str(v))
    if variant.reference is not None:
        for k, v in variant.reference.model_dump(exclude_none=True).items():
            tags[R.ref_tag(k)] = str(v)
    return tags


def start_variant_run(
    cl, experiment_id: str, variant: Any, *, parent_run_id: Optional[str], baseline: bool, device: Optional[str] = None
) -> str:
    """A child run with the variant's tags (params are logged once the model is final: `log_variant_spec`)."""
    tags = variant_tags(variant, parent_run_id=parent_run_id, baseline=baseline, device=device)
    run = cl.create_run(experiment_id, run_name=getattr(variant, "uid", variant.key), tags=tags)
    return run.info.run_id


def log_variant_spec(cl, run_id: str, variant: Any) -> None:
    """Params (flattened resolved spec) + the resolved spec as `spec.yaml`. Params are immutable: call once."""
    log_params(cl, run_id, flatten(variant.resolved()))
    log_text(cl, run_id, variant.to_yaml(), R.SPEC_YAML)


def short_error(exc: BaseException, limit: int = 500) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    s = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return s[:limit]


def fail_run(cl, run_id: str, exc: BaseException, status: str = "FAILED") -> None:
    """Tag lab.error (one line), attach the traceback as `error.txt`, end the run as FAILED (or KILLED)."""
    try:
        set_tags(cl, run_id, {R.ERROR: short_error(exc)})
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log_text(cl, run_id, tb, R.ERROR_TXT)
    finally:
        cl.set_terminated(run_id, status=status)


def log_artifact_file(cl, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
    cl.log_artifact(run_id, str(path), artifact_path)


def download_artifact(cl, run_id: str, path: str) -> Path:
    dst = Path(tempfile.mkdtemp(prefix="lab-artifact-"))
    return Path(cl.download_artifacts(run_id, path, str(dst)))
