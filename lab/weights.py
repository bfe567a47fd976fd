"""Starting weights for a variant (`model.init` in a spec): find the source, load what fits into
the freshly built model (renaming timm keys, resizing position tables for a new resolution,
skipping a head for another class count), and record where the weights came from.

Sources (exactly one):
- `checkpoint: PATH`  a lab `final.pt`, a Lightning `.ckpt`, a plain state dict, or a timm
  `levit_*` / `resnet50` state dict saved on disk (no network: nothing is downloaded);
- `variant: KEY`  a variant of this experiment (trained first, like a distillation teacher);
- `variant: EXPERIMENT/KEY`  the newest finished run of that variant in the same store.
`include` / `exclude` select key prefixes (e.g. `include: [prefix.]`: only the ResNet stages).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from lab import paths, track
from lab import record as R
from lab.errors import LabError

__all__ = [
    "InitResult",
    "apply_init",
    "finished_variant_file",
    "init_dependency",
    "record_init",
    "resolve_init_file",
    "INIT_TAGS",
]

# Tags a run started from weights carries (and the artifact with the full key lists).
INIT_TAGS = {k: R.init_tag(k) for k in ("source", "loaded", "resized", "random", "skipped")}
INIT_REPORT_ARTIFACT = R.INIT_REPORT


@dataclass
class InitResult:
    source: str  # what was loaded: a path, or EXPERIMENT/KEY (run RUN_ID)
    path: Path
    report: Any  # grafts.LoadReport

    def tags(self) -> dict[str, str]:
        r = self.report
        return {
            INIT_TAGS["source"]: self.source,
            INIT_TAGS["loaded"]: str(len(r.loaded)),
            INIT_TAGS["resized"]: str(len(r.resized)),
            INIT_TAGS["random"]: str(len(r.random)),
            INIT_TAGS["skipped"]: str(len(r.skipped)),
        }

    def line(self) -> str:
        return f"init from {self.source}: {self.report.summary()}"


def init_dependency(v) -> Optional[str]:
    """The key of the variant of the same experiment whose weights `v` starts from, if any."""
    init = getattr(v, "init", None)
    if init is None or not init.variant or "/" in init.variant:
        return None
    return init.variant


def _find_file(path: str, spec_file: Optional[str]) -> Optional[Path]:
    p = Path(path).expanduser()
    cands = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(spec_file).parent / p] if spec_file else [])
    return next((c for c in cands if c.is_file()), None)


def finished_variant_file(cl, uri: str, experiment: str, key: str, hash: Optional[str]) -> tuple[Path, str]:
    """final.pt of the newest finished run of EXPERIMENT/KEY (the local checkpoint folder first,
    then the run's logged `checkpoint/final.pt` artifact)."""
    runs = track.find_variant_runs(cl, experiment, key=key, hash=hash, statuses=["FINISHED"])
    if not runs and hash is not None:  # the spec changed since: any finished run of that key
        runs = track.find_variant_runs(cl, experiment, key=key, statuses=["FINISHED"])
    for r in runs:
        h = r.data.tags.get(R.HASH)
        local = paths.variant_checkpoint_dir(track.store_dir(uri), experiment, key, h) / "final.pt" if h else None
        if local is not None and local.is_file():
            return local, r.info.run_id
        try:
            return track.download_artifact(cl, r.info.run_id, R.FINAL_CHECKPOINT), r.info.run_id
        except Exception:  # noqa: BLE001 - no logged checkpoint: try an older run
            continue
    raise LabError(
        f"no finished run of variant '{experiment}/{key}' with weights in {uri} "
        "(train it first; with another store set MLFLOW_TRACKING_URI)"
    )


def resolve_init_file(v, cl, uri: str, variants: Sequence[Any] = ()) -> tuple[Path, str]:
    """(file, source description) of `v.init`."""
    init = v.init
    if init.checkpoint:
        p = _find_file(init.checkpoint, v.source or None)
        if p is None:
            raise LabError(
                f"init checkpoint not found: {init.checkpoint}",
                file=v.source or None,
                path=f"variants.{v.key}.model.init.checkpoint",
            )
        return p, str(p)
    exp, _, key = init.variant.rpartition("/")
    exp = exp or v.experiment
    same = next((x for x in variants if x.key == key), None) if exp == v.experiment else None
    path, run_id = finished_variant_file(cl, uri, exp, key, same.hash if same is not None else None)
    return path, f"{exp}/{key} (run {run_id})"


def apply_init(model, v, cl, uri: str, variants: Sequence[Any] = ()) -> InitResult:
    """Load `v.init` into `model` (in place) and return what happened."""
    import grafts
    from lab.module import model_state_from_file

    path, source = resolve_init_file(v, cl, uri, variants)
    try:
        _, sd = model_state_from_file(path)  # final.pt, Lightning (EMA) checkpoint or state dict
        report = grafts.load_weights(model, sd, include=v.init.include, exclude=v.init.exclude)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise LabError(
            f"cannot load init weights from {path}: {str(e).splitlines()[0]}",
            file=v.source or None,
            path=f"variants.{v.key}.model.init",
        ) from None
    if not report.loaded:
        raise LabError(
            f"init weights from {source}: no tensor fits this model "
            f"({len(report.skipped)} skipped, e.g. {report.skipped[:2]})",
            file=v.source or None,
            path=f"variants.{v.key}.model.init",
        )
    return InitResult(source, path, report)


def record_init(cl, run_id: str, result: InitResult) -> None:
    """Tags on the run and the full key lists as an artifact."""
    track.set_tags(cl, run_id, result.tags())
    track.log_text(
        cl, run_id, json.dumps({"source": result.source, **result.report.as_dict()}, indent=1), INIT_REPORT_ARTIFACT
    )
