"""Shared test helpers (no test module imports another): a throw-away MLflow store, tiny
training specs, a Ctrl-C simulator (`KillAt`), synthetic runs written with lab.track
(`log_variant_run`) and the session's synthetic report store (`report_store`: experiments abl,
fam, empty and the really trained tinyrun), read by test_report and test_notebooks."""

from __future__ import annotations

# isort: off
import lab  # noqa: F401 - first, so that OMP_WAIT_POLICY=PASSIVE is set before torch loads OpenMP
# isort: on

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

from lab import budget as B
from lab import record as REC
from lab import spec as S
from lab import track


@pytest.fixture
def store(tmp_path, monkeypatch):
    """cwd = tmp_path and MLFLOW_TRACKING_URI = a fresh SQLite store there; returns the URI."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


TINY_MODEL = {
    "zoo": "deit_tiny",
    "img_size": 16,
    "patch_size": 4,
    "num_classes": 4,
    "stages": [{"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
}


def tiny_spec_dict(name: str = "tiny", **sections) -> dict:
    """A spec that trains in well under a second per variant (synthetic 16 px, 4 classes)."""
    doc = {
        "name": name,
        "data": {
            "dataset": "synthetic",
            "image_size": 16,
            "batch_size": 16,
            "synthetic_size": 160,
            "num_classes": 4,
            "augment": {"hflip": 0.0, "scale": [0.9, 1.0]},
        },
        "model": dict(TINY_MODEL),
        "train": {"lr": 3e-3, "log_every": 2, "eval_every": 5, "threads": 2, "warmup": 0.1},
        "budget": {"steps": 12},
        # the after-training inspection (figures) costs ~1-2 s per variant: tests/test_inspection.py
        # turns it on where it is the subject
        "tracking": {"inspect": False},
        # inference throughput after training costs seconds per variant: on only where a test asks
        "bench": {"after_train": False},
    }
    for k, v in sections.items():
        doc[k] = v
    return doc


@pytest.fixture
def write_spec(tmp_path):
    """write_spec(doc) -> path of a YAML spec in tmp_path."""

    def _write(doc: dict, name: str = "spec.yaml") -> Path:
        p = tmp_path / name
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        return p

    return _write


class KillAt(pl.Callback):
    """Simulates Ctrl-C after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- synthetic runs


def log_variant_run(
    variant: Any,
    *,
    uri: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    history: Optional[Mapping[str, Iterable[tuple[int, float]]]] = None,
    final: Optional[Mapping[str, float]] = None,
    status: str = "FINISHED",
    error: Optional[str] = None,
    baseline: bool = False,
    device: str = "cpu",
    extra_tags: Optional[Mapping[str, str]] = None,
) -> str:
    """Write one complete variant run without training (tests, notebooks, imports of old results).

    `variant`: a lab.spec.Variant. `history`: {metric: [(step, value), ...]} (e.g. val/top1,
    images_seen, train/loss); `final`: {metric: value} logged at the last step (final/val_top1,
    budget/*, params, macs ...). A parent run is created when none is given. `status` RUNNING
    leaves the run open (no end time), like a `lab run` still in progress. Returns the run id.
    """
    uri = uri or track.tracking_uri(variant)
    cl = track.client(uri)
    name = track.experiment_name(variant)
    exp_id = track.get_or_create_experiment(cl, name, uri)
    if parent_run_id is None:
        parent_run_id = track.start_parent_run(cl, exp_id, variant.experiment)
        cl.set_terminated(parent_run_id, status="FINISHED")
    run_id = track.start_variant_run(cl, exp_id, variant, parent_run_id=parent_run_id, baseline=baseline, device=device)
    track.log_variant_spec(cl, run_id, variant)
    if status == "RUNNING":  # held by this process, like a `lab run` in progress (lab.lease)
        from lab import lease

        track.set_tags(cl, run_id, lease.claim_tags())
    if extra_tags:
        track.set_tags(cl, run_id, extra_tags)
    by_step: dict[int, dict[str, float]] = {}  # one write per step, as the training callbacks do
    for metric, points in (history or {}).items():
        for step, value in points:
            by_step.setdefault(int(step), {})[metric] = value
    for step in sorted(by_step):
        track.log_metrics(cl, run_id, by_step[step], step)
    last = max(by_step, default=0)
    if final:
        track.log_metrics(cl, run_id, final, last)
    if error:
        track.set_tags(cl, run_id, {REC.ERROR: error})
    if status != "RUNNING":  # a run still in flight has no end time
        cl.set_terminated(run_id, status=status)
    return run_id


# --------------------------------------------------------------------------- the report store

EVAL_STEPS = (10, 20, 30)
BATCH = 32  # images per optimizer step
TRAIN_SIZE = 320  # images per epoch: epoch = step * BATCH / TRAIN_SIZE = step / 10
WRITTEN = set(REC.TRAIN_METRICS + REC.EVAL_METRICS + REC.FINAL_METRICS)


@dataclass
class Store:
    uri: str
    ids: dict[str, str]  # name -> MLflow run id
    trained: list  # run_experiment's VariantResults of the really trained experiment
    specs: dict[str, tuple]  # experiment -> (ExperimentSpec, {key: Variant})


def _spec(root: Path, uri: str, doc: dict) -> tuple:
    doc = {**doc, "tracking": {"uri": uri, "log_checkpoint": False}}
    path = root / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = S.load_spec(path)
    return spec, {v.key: v for v in S.expand(spec)}


def run_outcome(top1=(), *, final=None, best=None, params=None, macs=None, seconds_per_step=0.5, **kw) -> dict:
    """log_variant_run's arguments for one variant: curves at EVAL_STEPS, train/loss every 5 steps,
    and, for a finished run, the final/budget metrics exactly as the runner assembles them."""
    steps = EVAL_STEPS[: len(top1)]
    last = steps[-1] if steps else 0
    history = {
        "val/top1": list(zip(steps, top1)),
        "val/top5": [(s, min(100.0, a + 20)) for s, a in zip(steps, top1)],
        "val/loss": [(s, 3.0 - i) for i, s in enumerate(steps)],
        "epoch": [(s, s * BATCH / TRAIN_SIZE) for s in steps],
        "images_seen": [(s, s * BATCH) for s in steps],
        "train_seconds": [(s, s * seconds_per_step) for s in steps],
        "train/loss": [(s, 3.0 - s / 20) for s in range(5, last + 1, 5)],
        "lr": [(s, 1e-3) for s in range(5, last + 1, 5)],
    }
    fin = {} if params is None else {"params": params, "macs": macs}
    if final is not None:
        fin.update(
            {
                "final/val_top1": final,
                "final/val_top5": min(100.0, final + 20),
                "final/val_loss": 1.0,
                "best/val_top1": best,
                **B.usage(
                    steps=last,
                    global_batch=BATCH,
                    train_seconds=last * seconds_per_step,
                    macs_per_image=int(macs),
                    peak_mem_mb=100.0,
                ),
            }
        )
    assert set(history) | set(fin) <= WRITTEN, set(history) | set(fin) - WRITTEN  # names the lab writes
    return {"history": history, "final": fin or None, **kw}


def _lab_run(spec, variants: dict, outcomes: dict[str, dict], parent_tags: dict | None = None) -> dict[str, str]:
    """One `lab run` invocation as the runner records it: a parent run, one child run per variant
    (the spec's baseline flagged), the parent ended FINISHED if every variant finished, FAILED if
    one did not, left open while one is still RUNNING (or none has started). Returns {key: child run id}."""
    uri = track.tracking_uri(spec)
    cl = track.client(uri)
    exp_id = track.get_or_create_experiment(cl, track.experiment_name(spec), uri)
    base = S.baseline_key(spec, list(variants.values()))
    parent = track.start_parent_run(
        cl, exp_id, spec.name, tags={"lab.variants": ",".join(outcomes), **spec.tags, **(parent_tags or {})}
    )
    ids = {
        k: log_variant_run(variants[k], parent_run_id=parent, baseline=(k == base), **o) for k, o in outcomes.items()
    }
    statuses = {o.get("status", "FINISHED") for o in outcomes.values()}
    if outcomes and "RUNNING" not in statuses:
        cl.set_terminated(parent, status="FINISHED" if statuses == {"FINISHED"} else "FAILED")
    return ids


def fake_bench(variant, **imgs_per_s: float) -> None:
    """`lab bench SPEC --log`'s write, with made-up figures: {device: images/s}."""
    from lab.bench import ThroughputResult, log_bench

    for device, ips in imgs_per_s.items():
        res = ThroughputResult(
            images_per_s_min=ips * 0.9,
            images_per_s_median=ips,
            images_per_s_max=ips * 1.1,
            samples=[ips] * 3,
            batch=16,
            dtype="fp32",
            device=device,
            device_name="test",
            threads=1,
            torch_version="x",
            compiled=False,
            channels_last=False,
            img_size=16,
            repeats=3,
        )
        assert log_bench(variant, res) is not None


REF_BASE = {
    "params_m": 7.4,
    "macs_m": 305,
    "top1": 71.9,
    "throughput_gpu": 12880,
    "throughput_cpu": 88,
    "epochs": 100,
    "source": "LeViT Table 5",
}
REF_ATTN = {
    "params_m": 7.4,
    "macs_m": 305,
    "top1": 70.4,
    "throughput_gpu": 9000,
    "epochs": 100,
    "source": "LeViT Table 5",
}
GRAFT = {"model": {"prefix": {"arch": "resnet50", "stages": 1}}}


def build_store(root: Path, train: bool = True) -> Store:
    """Experiments in one SQLite store:
    abl      4 variants over two `lab run`s: attn finished twice (newer wins), graft finished then
             failed (the finished one wins), broken failed (its only run); paper figures for base/attn
    fam      a grid (model.stages.0.depth = 1, 2) whose `lab run` is in progress: depth=2 RUNNING on cuda
    empty    a `lab run` that has not reached its first variant
    tinyrun  two variants really trained by `lab.runner.run_experiment` (12 steps; skipped if not `train`)
    """
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids: dict[str, str] = {}
    specs: dict[str, tuple] = {}

    doc = tiny_spec_dict(name="abl", tags={"study": "ablation"}, baseline="base")
    doc["variants"] = {
        "base": {},
        "attn": {"model": {"position": "attention_bias"}},
        "graft": GRAFT,
        "broken": {"train": {"lr": 10.0}},
    }
    doc["reference"] = {"base": REF_BASE, "attn": REF_ATTN}
    spec, vs = specs["abl"] = _spec(root, uri, doc)
    first = _lab_run(
        spec,
        vs,
        {
            "base": run_outcome((20.0, 40.0, 50.0), final=50.0, best=50.0, params=5e6, macs=300e6),
            "attn": run_outcome((15.0, 30.0, 44.0), final=44.0, best=44.0, params=5.5e6, macs=320e6),
            "graft": run_outcome(
                (30.0, 45.0, 55.0), final=54.0, best=55.0, params=8e6, macs=600e6, seconds_per_step=1.0
            ),
            "broken": run_outcome(
                (10.0, 20.0), params=4e6, macs=200e6, status="FAILED", error="RuntimeError: NaN loss"
            ),
        },
    )
    ids.update(base=first["base"], attn_old=first["attn"], graft=first["graft"], broken=first["broken"])
    # a second `lab run` (a tag set on its parent only): attn finishes again, graft fails this time
    second = _lab_run(
        spec,
        vs,
        {
            "attn": run_outcome((18.0, 35.0, 47.0), final=47.0, best=47.5, params=5.5e6, macs=320e6),
            "graft": run_outcome((5.0,), status="FAILED", error="OOM"),
        },
        parent_tags={"sweep": "rerun"},
    )
    ids.update(attn=second["attn"], graft_failed=second["graft"])
    fake_bench(vs["base"], cpu=100.0, cuda=1000.0)
    fake_bench(vs["attn"], cpu=80.0, cuda=1250.0)  # onto the newer FINISHED attn
    fake_bench(vs["graft"], cpu=50.0, cuda=1500.0)  # onto the older FINISHED graft

    doc = tiny_spec_dict(name="fam")
    doc["grid"] = {"model.stages.0.depth": [1, 2]}
    spec, vs = specs["fam"] = _spec(root, uri, doc)
    run = _lab_run(
        spec,
        vs,
        {
            "depth=1": run_outcome((25.0, 35.0, 45.0), final=45.0, best=45.0, params=2e6, macs=100e6, device="cpu"),
            "depth=2": run_outcome((30.0, 52.0), params=20e6, macs=900e6, status="RUNNING", device="cuda"),
        },
    )
    ids.update(d1=run["depth=1"], d2=run["depth=2"])
    fake_bench(vs["depth=1"], cpu=300.0)
    fake_bench(vs["depth=2"], cpu=40.0)

    spec, vs = specs["empty"] = _spec(root, uri, tiny_spec_dict(name="empty"))
    _lab_run(spec, vs, {})

    trained: list = []
    if train:
        from lab.runner import run_experiment

        doc = tiny_spec_dict(name="tinyrun")
        doc["variants"] = {"base": {}, "bias": {"model": {"position": "attention_bias"}}}
        doc["reference"] = {"base": {"top1": 72.2, "params_m": 5.7}}
        spec, vs = specs["tinyrun"] = _spec(root, uri, doc)
        trained = run_experiment(spec, list(vs.values()), progress=False, say=lambda s: None)
        assert [r.status for r in trained] == ["finished", "finished"], trained
        fake_bench(vs["base"], cpu=2000.0)
        fake_bench(vs["bias"], cpu=1500.0)
    return Store(uri, ids, trained, specs)


@pytest.fixture(scope="session")
def report_store(tmp_path_factory) -> Store:
    """One synthetic store per test session, read by tests/test_report.py and tests/test_notebooks.py."""
    return build_store(tmp_path_factory.mktemp("mlruns"))


# --------------------------------------------------------------------------- the inspected store (lab.inspection)


@pytest.fixture(scope="session")
def inspected_store(tmp_path_factory) -> tuple[str, Path]:
    """(tracking URI, spec path) of `tinyinspect`, really trained once per session (tests/test_notebooks.py
    reads it too): a ViT, a ViT with attention bias and a ResNet graft, all inspected after training,
    and `old`, a ViT trained with `tracking.inspect: false` like a run from before inspection existed."""
    from lab.runner import run_experiment

    root = tmp_path_factory.mktemp("inspect")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    doc = tiny_spec_dict(
        "tinyinspect", budget={"steps": 3}, tracking={"uri": uri, "inspect": True, "inspect_images": 8}
    )
    doc["train"]["eval_every"] = 3
    doc["variants"] = {
        "vit": {},
        "bias": {"model": {"position": "attention_bias"}},
        "graft": {"model": {"prefix": {"arch": "resnet50", "stages": 1}, "bridge": "pool", "grid": 2}},
        "old": {"tracking": {"inspect": False}},
    }
    path = root / "tinyinspect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = S.load_spec(path)
    res = run_experiment(spec, S.expand(spec), progress=False, say=lambda s: None)
    assert [r.status for r in res] == ["finished"] * 4
    return uri, path


# --------------------------------------------------------------------------- models


def randomize_bn(model: nn.Module, seed: int = 0) -> torch.Generator:
    """Non-trivial BN statistics/affines so BN folding and zero-init don't hide bugs; returns the
    generator, for callers that randomise more from the same stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return g
