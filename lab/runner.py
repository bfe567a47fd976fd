"""`lab run SPEC`: train every variant under the experiment's shared budget, evaluate, record in MLflow.

Per invocation: a data pre-flight (a bad data root or a missing teacher checkpoint is a
LabError -> exit 2 before anything trains), one MLflow parent run, then one child run per
variant, teachers first. Per variant:
  - a FINISHED run with the same hash is skipped (`force=True` retrains);
  - a KILLED/RUNNING/FAILED run whose checkpoint is still there is resumed into the same
    MLflow run from `<store>/checkpoints/<experiment>/<variant>-<hash>/last.ckpt`;
  - any exception (including a non-finite loss) marks the run FAILED with `lab.error` and the
    traceback as `error.txt`, and the next variant runs;
  - Ctrl-C saves a checkpoint, marks the run (and the parent) KILLED and exits 130.

Where variants run (`--launcher`, see lab/launch.py): `local` trains them one after the other
(in this process, or in a subprocess of its own when a variant is distributed), `ray` and
`slurm` submit one task/job per variant. Every launcher decides skip/resume and creates the
child run here, in the driver (`prepare_variant`), and the worker trains into that run
(`execute_variant`); in a distributed worker only global rank 0 writes to MLflow
(`Context.rank_zero`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from lab import paths, track
from lab.errors import LabError, close_matches
from lab.weights import apply_init, init_dependency, record_init

LAUNCHERS = ("local", "ray", "slurm")  # implemented in lab.launch
RESUMABLE = ("KILLED", "RUNNING", "FAILED")
NOT_TRAINED = ("skipped", "busy")  # prepare_variant statuses that train nothing


# --------------------------------------------------------------------------- helpers


@dataclass
class Context:
    spec: Any
    variants: list  # every variant of the invocation (for teachers and matching)
    uri: str
    cl: Any
    experiment: str
    experiment_id: str
    parent_run_id: str
    baseline: str
    force: bool = False
    progress: bool = True
    callbacks: list = field(default_factory=list)
    datamodules: dict = field(default_factory=dict)
    say: Callable[[str], None] = print
    # False in the non-zero ranks of a distributed worker: they train but never write to MLflow
    # (no runs, params, metrics, tags, artifacts, status changes).
    rank_zero: bool = True
    launcher: str = "local"
    keeper: Any = None  # lab.lease.Keeper of the driver: heartbeats of the runs it holds
    # lab.threads.ThreadChoice.as_dict() of the policy decided once per invocation (None: decide here)
    threads: Optional[dict] = None
    # variant key -> its planned steps and calibrated cost, from the calibration of all variants of
    # the invocation together (calibrate_together); a variant not in it calibrates alone
    calibration: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # variant key -> the variant with `match:` resolved


def _by_key(variants: list) -> dict[str, list]:
    """Variant key -> its runs (one per seed), in spec order."""
    out: dict[str, list] = {}
    for v in variants:
        out.setdefault(v.key, []).append(v)
    return out


def teacher_of(v, variants: list):
    """The teacher run of a distilled variant: the teacher variant's run with the same seed, else
    its first seed (None without distill.variant or when the teacher is not among `variants`)."""
    d = v.train.distill
    if d is None or not d.variant:
        return None
    runs = _by_key(variants).get(d.variant, [])
    return next((t for t in runs if t.seed == v.seed), runs[0] if runs else None)


def order_variants(variants: list) -> list:
    """Teachers (train.distill.variant) before their students; otherwise the spec order
    (all seeds of a variant together)."""
    by_key = _by_key(variants)
    out, seen, visiting = [], set(), set()

    def visit(key):
        if key in seen:
            return
        if key in visiting:
            v = by_key[key][0]
            raise LabError(f"distillation cycle through variant '{key}'", file=v.source,
                           path=f"variants.{key}.train.distill.variant")
        visiting.add(key)
        for v in by_key[key]:
            d = v.train.distill
            # the teacher (train.distill.variant) and model.init.variant (the weights come from there)
            for dep in (d.variant if d is not None else None, init_dependency(v)):
                if dep and dep in by_key:
                    visit(dep)
        visiting.discard(key)
        seen.add(key)
        out.extend(by_key[key])

    for key in by_key:
        visit(key)
    return out


def with_teachers(selected: list, variants: list) -> list:
    """`selected` plus the runs they need (transitively), in spec order: each one's teacher run
    (same seed where it has one) and every seed of its model.init.variant."""
    by_key = _by_key(variants)
    want = {v.uid for v in selected}
    stack = list(selected)
    while stack:
        cur = stack.pop()
        deps = [teacher_of(cur, variants), *by_key.get(init_dependency(cur) or "", [])]
        for t in deps:
            if t is not None and t.uid not in want:
                want.add(t.uid)
                stack.append(t)
    return [v for v in variants if v.uid in want]


def _data_key(v) -> str:
    return json.dumps(v.data.model_dump(mode="json"), sort_keys=True)


def preflight(variants: list, datamodules: dict) -> None:
    """Build (and set up) each distinct dataset once; missing data or teacher files are LabErrors."""
    from lab.data import build_datamodule

    for v in variants:
        k = _data_key(v)
        if k not in datamodules:
            dm = build_datamodule(v.data, num_classes_expected=v.model.get("num_classes"), spec_file=v.source or None)
            dm.setup("fit")
            datamodules[k] = dm
        else:
            dm = datamodules[k]
            nc = v.model.get("num_classes")
            if nc is not None and getattr(dm, "num_classes", nc) != nc:
                raise LabError(f"the model has {nc} classes but the data has {dm.num_classes}", file=v.source,
                               path=f"variants.{v.key}.model.num_classes")
        d = v.train.distill
        if d is not None and d.checkpoint and _find_file(d.checkpoint, v.source) is None:
            raise LabError(f"teacher checkpoint not found: {d.checkpoint}", file=v.source,
                           path=f"variants.{v.key}.train.distill.checkpoint")
        size = v.model.get("img_size")
        if size is not None and not v.model.get("dynamic_img_size") and size != v.data.image_size:
            raise LabError(f"model.img_size {size} differs from data.image_size {v.data.image_size} (square "
                           "images); set them equal, or model.dynamic_img_size: true", file=v.source,
                           path=f"variants.{v.key}.model.img_size")
        if v.init is not None and v.init.checkpoint and _find_file(v.init.checkpoint, v.source) is None:
            raise LabError(f"init checkpoint not found: {v.init.checkpoint}", file=v.source,
                           path=f"variants.{v.key}.model.init.checkpoint")


def _find_file(path: str, spec_file: Optional[str]) -> Optional[Path]:
    p = Path(os.path.expanduser(path))
    cands = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(spec_file).parent / p] if spec_file else [])
    return next((c for c in cands if c.is_file()), None)


def load_teacher(v, ctx: Context):
    """The frozen teacher of a distilled variant (None without distillation)."""
    import grafts
    from lab.module import model_state_from_file

    d = v.train.distill
    if d is None:
        return None
    if d.variant:
        tv = teacher_of(v, ctx.variants)
        path = track.checkpoint_dir(tv, ctx.uri) / "final.pt"
        if not path.is_file():
            runs = track.find_variant_runs(ctx.cl, ctx.experiment, key=tv.key, hash=tv.hash, statuses=["FINISHED"])
            for r in runs:
                try:
                    path = track.download_artifact(ctx.cl, r.info.run_id, "checkpoint/final.pt")
                    break
                except Exception:  # noqa: BLE001
                    continue
            else:
                raise RuntimeError(f"teacher variant '{d.variant}' has no finished run with weights "
                                   f"(it failed, or tracking.log_checkpoint is off)")
    else:
        path = _find_file(d.checkpoint, v.source)
        if path is None:
            raise LabError(f"teacher checkpoint not found: {d.checkpoint}")
    cfg, sd = model_state_from_file(path)
    if d.model:
        cfg = {"img_size": v.model.get("img_size"), "num_classes": v.model.get("num_classes"), **d.model}
    elif cfg is None:
        cfg = {"zoo": v.model.get("zoo"), "img_size": v.model.get("img_size"), "num_classes": v.model.get("num_classes")}
    teacher = grafts.build(cfg)
    teacher.load_state_dict(sd)
    return teacher.eval()


def _world_size(train, accelerator: str) -> int:
    import torch

    dev = train.devices
    if dev == "auto":
        dev = torch.cuda.device_count() if accelerator == "gpu" else 1
    return max(1, int(dev)) * train.num_nodes


def _from_rank_zero(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (when a process group is up; else `obj`): ranks that
    time their own calibration must still agree on one step count, or DDP would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _sync_stop_callback():
    import lightning.pytorch as pl

    class SyncStop(pl.Callback):
        """Wall-clock budgets under DDP: stop every rank once any rank's timer says stop."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = bool(trainer.strategy.reduce_boolean_decision(bool(trainer.should_stop), all=False))

    return SyncStop()


def _last_eval_callback():
    import lightning.pytorch as pl

    class LastEval(pl.Callback):
        """The step of the last validation during fit, on every rank."""

        step: Optional[int] = None

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and trainer.state.fn == "fit" and pl_module.last_val:
                self.step = trainer.global_step

    return LastEval()


def _planned_steps(cl, run_id: str) -> Optional[int]:
    hist = track.metric_history(cl, run_id, "budget/planned_steps")
    return int(hist[-1][1]) if hist else None


# --------------------------------------------------------------------------- one variant


@dataclass
class Built:
    """A variant ready to train: its model, data, module factory and Trainer settings."""

    model: Any
    params: int
    macs: int
    world: int
    global_batch: int
    train_size: int
    steps_per_epoch: int
    dm: Any
    accelerator: str
    precision: Any
    device: Any
    threads: Any  # lab.threads.ThreadChoice
    trainer_kw: dict
    make_module: Callable[..., Any]


def thread_choice(v, ctx: Context, accelerator: Optional[str] = None):
    """train.threads, else the invocation's policy (lab.threads), split among this machine's ranks on CPU."""
    from lab import threads as T
    from lab.module import resolve_accelerator

    if v.train.threads:
        return T.decide(v.train.threads)
    accelerator = accelerator or resolve_accelerator(v.train)
    procs = 1
    if accelerator == "cpu":
        dev = v.train.devices
        procs = max(1, int(dev)) if str(dev).isdigit() else 1
    if ctx.threads:
        c = T.ThreadChoice(**ctx.threads)
        if procs > 1:
            c = T.ThreadChoice(**{**ctx.threads, "threads": max(1, c.threads // procs),
                                  "reason": f"{c.reason}, shared by {procs} training processes"})
        return c
    return T.decide(processes=procs)


def build_variant(v, ctx: Context, *, calibrating: bool = False) -> Built:
    """Model, data and Trainer settings of `v` (threads set); `calibrating`: a stand-in teacher
    with the right architecture when the real one has not trained yet."""
    import grafts
    import lightning.pytorch as pl
    import torch

    from lab import threads as T
    from lab.module import LabModule, resolve_accelerator, resolve_precision

    tr = v.train
    accelerator = resolve_accelerator(tr)
    choice = thread_choice(v, ctx, accelerator)
    T.apply(choice.threads)
    pl.seed_everything(tr.seed, workers=True, verbose=False)
    precision = resolve_precision(tr, accelerator)
    dm = ctx.datamodules[_data_key(v)]
    # train.seed: init, augmentation and the training data order; data.seed keeps the dataset and
    # its train/val split fixed, so every seed of every variant is scored on the same images
    dm.shuffle_seed = tr.seed
    model = grafts.build(v.model)
    params = grafts.count_params(model)
    macs = int(grafts.count_macs(v.model))
    world = _world_size(tr, accelerator)
    global_batch = v.data.batch_size * world
    train_size = int(dm.train_size)
    n_batches = len(dm.train_dataloader())
    steps_per_epoch = max(1, n_batches // world if world > 1 else n_batches)
    teacher = teacher_stand_in(v, ctx) if calibrating else load_teacher(v, ctx)
    device = torch.device("cuda") if accelerator == "gpu" else torch.device("cpu")

    def make_module(m, total_steps=None):
        return LabModule(m, tr, num_classes=int(v.model["num_classes"]), total_steps=total_steps,
                         global_batch=global_batch, mixup_fn=getattr(dm, "mixup_fn", None),
                         label_smoothing=float(getattr(dm, "label_smoothing", 0.0) or 0.0), teacher=teacher)

    trainer_kw: dict[str, Any] = dict(
        accelerator=accelerator, devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
        precision=precision, gradient_clip_val=tr.grad_clip, logger=False, enable_model_summary=False,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_checkpointing=False)
    return Built(model=model, params=params, macs=macs, world=world, global_batch=global_batch, train_size=train_size,
                 steps_per_epoch=steps_per_epoch, dm=dm, accelerator=accelerator, precision=precision, device=device,
                 threads=choice, trainer_kw=trainer_kw, make_module=make_module)


def teacher_stand_in(v, ctx: Context):
    """For calibration: the teacher's architecture (random weights: the cost is the same), or the
    real teacher where its weights already exist."""
    import grafts

    d = v.train.distill
    if d is None:
        return None
    if d.variant:
        tv = next(x for x in ctx.variants if x.key == d.variant)
        cfg = dict(tv.model) if not d.model else {"img_size": v.model.get("img_size"),
                                                   "num_classes": v.model.get("num_classes"), **d.model}
        return grafts.build(cfg).eval()
    return load_teacher(v, ctx)


def train_variant(v, ctx: Context, run_id: str, resume_ckpt: Optional[Path], record: dict,
                  ckdir: Optional[Path] = None) -> dict:
    """Train, evaluate and log one variant into `run_id`; fills and returns `record`."""
    import lightning.pytorch as pl
    import torch

    from lab import budget as B
    from lab.module import LastCheckpoint, MlflowMetrics, StepProgress, save_final

    tr = v.train
    b = build_variant(v, ctx)
    if v.init is not None and resume_ckpt is None:  # model.init (a resumed run restores its own weights)
        init = apply_init(b.model, v, ctx.cl, ctx.uri, ctx.variants)
        ctx.say(f"[{v.key}] {init.line()}")
        if ctx.rank_zero:
            record_init(ctx.cl, run_id, init)
    model, params, macs, world, global_batch = b.model, b.params, b.macs, b.world, b.global_batch
    train_size, steps_per_epoch, dm, device, make_module = b.train_size, b.steps_per_epoch, b.dm, b.device, b.make_module
    precision, trainer_kw = b.precision, b.trainer_kw
    record.update(params=params, macs=macs)
    B.reset_peak_memory(device)

    planned = _planned_steps(ctx.cl, run_id) if resume_ckpt is not None else None
    together = ctx.calibration.get(v.key)
    calibrated_by = ""
    if v.budget.kind == "seconds" and not v.budget.wall_clock and planned is not None:
        plan = B.BudgetPlan(kind="seconds", total_steps=planned, global_batch=global_batch,
                            steps_per_epoch=steps_per_epoch, macs_per_image=macs)
        prev = track.metric_history(ctx.cl, run_id, "budget/calibration_step_seconds")
        if prev:
            plan.calibration["step_seconds"] = prev[-1][1]
    elif v.budget.kind == "seconds" and not v.budget.wall_clock and together is not None:
        plan = B.BudgetPlan(kind="seconds", total_steps=int(together["steps"]), global_batch=global_batch,
                            steps_per_epoch=steps_per_epoch, macs_per_image=macs,
                            calibration={"step_seconds": together["step_seconds"],
                                         "images_per_s": global_batch / together["step_seconds"],
                                         "relative": together["relative"], "spread": together["spread"],
                                         "timed_steps": float(together["timed_steps"])})
        calibrated_by = together["how"]
    else:
        plan = B.plan(v.budget, global_batch=global_batch, steps_per_epoch=steps_per_epoch, macs_per_image=macs,
                      calibrate=lambda: _from_rank_zero(B.calibrate(lambda: make_module(copy.deepcopy(model)), dm,
                                                                    trainer_kw, steps=v.budget.calibration_steps,
                                                                    threads=b.threads.threads)))
        if plan.calibration:
            calibrated_by = ("alone, in its own worker" + (f" (rank 0's figure, {world} ranks)" if world > 1 else "")
                             + ": not interleaved with the other variants")
        pl.seed_everything(tr.seed, workers=True, verbose=False)  # calibration consumed randomness
    record["budget"] = plan.describe()
    record["budget_kind"] = v.budget.kind
    record["planned_seconds"] = float(v.budget.seconds) if v.budget.kind == "seconds" else None
    record["calibrated_step_seconds"] = plan.calibration.get("step_seconds")
    if resume_ckpt is None and ctx.rank_zero:
        first = {"params": params, "macs": macs}
        if plan.total_steps is not None:
            first["budget/planned_steps"] = plan.total_steps
        if v.budget.kind == "seconds":
            first["budget/planned_seconds"] = float(v.budget.seconds)
        for k, val in plan.calibration.items():
            first[f"budget/calibration_{k}"] = val
        track.log_metrics(ctx.cl, run_id, first, 0)
        tags = {"lab.precision": precision, "lab.world_size": world, "lab.budget_plan": plan.describe(),
                "lab.train_size": train_size, "lab.val_size": getattr(dm, "val_size", None),
                "lab.steps_per_epoch": steps_per_epoch, **b.threads.tags(),
                "lab.data.skipped_files": len(getattr(dm, "bad_files", ())) or None}
        if calibrated_by:
            tags["lab.calibration"] = calibrated_by
        track.set_tags(ctx.cl, run_id, tags)

    module = make_module(model, plan.total_steps)
    timer = B.TrainTimer(max_seconds=plan.max_seconds, skip_first=1 if tr.compile else 0)
    if plan.max_seconds is not None:
        module.progress_fn = lambda: timer.progress
    ckdir = ckdir or track.checkpoint_dir(v, ctx.uri)
    ckpt = LastCheckpoint(ckdir / "last.ckpt", every_n_steps=tr.eval_every or max(50, steps_per_epoch), timer=timer)
    metrics_cb = MlflowMetrics(ctx.cl, run_id, log_every=tr.log_every, timer=timer, global_batch=global_batch,
                               train_size=train_size)
    last_eval = _last_eval_callback()
    from lab.resume import ExactResume

    exact = ExactResume(getattr(dm, "resume_point", None), v.data.batch_size)
    # Only rank 0 logs; the decisions below (final validation) must not depend on logging, or
    # the ranks of a DDP run would disagree about a collective call and hang.
    callbacks = [exact, timer, metrics_cb, ckpt, last_eval] if ctx.rank_zero else [exact, timer, ckpt, last_eval]
    if world > 1 and plan.max_seconds is not None:
        callbacks.insert(1, _sync_stop_callback())  # every rank stops at the same step
    if ctx.progress:
        callbacks.append(StepProgress(v.uid, plan.total_steps, timer, plan.max_seconds))
    callbacks.extend(ctx.callbacks)
    if tr.eval_every:
        val_kw = dict(val_check_interval=tr.eval_every, check_val_every_n_epoch=None)
    else:
        val_kw = dict(val_check_interval=1.0, check_val_every_n_epoch=1)
    trainer = pl.Trainer(**trainer_kw, **B.trainer_limits(plan), callbacks=callbacks, **val_kw)

    B.fit(trainer, module, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    if ckpt.exception is not None:
        raise ckpt.exception
    if module.last_loss is not None and not torch.isfinite(module.last_loss).all():
        from lab.module import NonFiniteLoss

        raise NonFiniteLoss(f"training loss is {float(module.last_loss)} at step {trainer.global_step}")

    steps = trainer.global_step
    if last_eval.step != steps or not module.last_val:
        trainer.validate(module, datamodule=dm, verbose=False)
    final_val = module.last_val
    use = B.usage(steps=steps, global_batch=global_batch, train_seconds=timer.train_seconds, macs_per_image=macs,
                  peak_mem_mb=B.peak_memory_mb(device))
    final = {"final/val_top1": final_val["val/top1"], "final/val_top5": final_val["val/top5"],
             "final/val_loss": final_val["val/loss"], "best/val_top1": max(module.best_top1, final_val["val/top1"]),
             **use, "params": params, "macs": macs}
    if trainer.is_global_zero and ctx.rank_zero:
        track.log_metrics(ctx.cl, run_id, final, steps)
        final_path = save_final(ckdir / "final.pt", module, v.model, variant=v.key, hash=v.hash, steps=steps)
        if v.tracking.log_checkpoint:
            track.log_artifact_file(ctx.cl, run_id, final_path, "checkpoint")
        if v.tracking.inspect:
            inspect_trained(v, ctx, run_id, module.eval_model, dm, steps)
    record.update(steps=steps, top1=final["final/val_top1"], best_top1=final["best/val_top1"],
                  train_seconds=timer.train_seconds, images_seen=use["budget/images_seen"])
    if v.bench.after_train and trainer.is_global_zero and ctx.rank_zero:
        record["imgs_per_s"] = bench_after_train(v, module.model, b.accelerator, ctx, run_id)
    return record


def inspect_trained(v, ctx: Context, run_id: str, model, dm, step: int) -> None:
    """Filters, attention-bias maps and mean attention distance of the trained model onto its run
    (lab.inspection); a failure is tagged `lab.inspect_error` and never fails the trained run."""
    from lab.inspection_plot import log_inspection

    n = v.tracking.inspect_images
    try:
        batches = (x for x, _ in dm.val_dataloader())  # also tells grey (MNIST) from colour input
        log_inspection(ctx.cl, run_id, model, batches, label=v.key, max_images=n, step=step)
    except Exception as e:  # noqa: BLE001
        track.set_tags(ctx.cl, run_id, {"lab.inspect_error": track.short_error(e)})
        ctx.say(f"warning: {v.key}: inspection not recorded (the trained run stands): {track.short_error(e)}")


def bench_after_train(v, model, accelerator: str, ctx: Context, run_id: str) -> Optional[float]:
    """Inference images/s of the trained model with the bench protocol (lab.measure) on the run's
    device, logged as `lab bench --log` does; a failure is a warning, not a failed variant."""
    from lab.measure import bench_record, measure_throughput, model_img_size

    device = "cuda" if accelerator == "gpu" else "cpu"
    b = v.bench
    try:
        res = measure_throughput(copy.deepcopy(model), img_size=model_img_size(model, int(v.model.get("img_size") or 224)),
                                 device=device, batch=b.batch, dtype=b.dtype, threads=b.threads, warmup=b.warmup,
                                 duration=b.duration, repeats=b.repeats, channels_last=b.channels_last,
                                 compile=b.compile, max_batch=b.max_batch)
    except Exception as e:  # noqa: BLE001 - the training result stands without it
        track.set_tags(ctx.cl, run_id, {"lab.bench_error": track.short_error(e)})
        ctx.say(f"warning: {v.key}: inference throughput not measured: {track.short_error(e)}")
        return None
    metrics, tags = bench_record(res)
    track.log_metrics(ctx.cl, run_id, metrics, 0)
    track.set_tags(ctx.cl, run_id, tags)
    return res.images_per_s


def new_record(v) -> dict[str, Any]:
    return {"key": v.key, "uid": v.uid, "seed": v.seed, "hash": v.hash, "run_id": None, "status": None, "params": None, "macs": None,
            "budget": v.budget.kind, "steps": None, "top1": None, "best_top1": None, "train_seconds": None,
            "wall_seconds": None, "error": None, "resumed": False, "budget_kind": v.budget.kind,
            "planned_seconds": float(v.budget.seconds) if v.budget.kind == "seconds" else None,
            "calibrated_step_seconds": None, "imgs_per_s": None}


def prepare_variant(v, ctx: Context) -> tuple[dict, Optional[str], Optional[Path]]:
    """The driver's half of a variant: skip it, or claim the MLflow child run it trains into.

    Returns (record, run_id, resume_ckpt). record["status"] is "skipped" (run_id None) when a
    FINISHED run with the same hash exists and not `ctx.force`, or "busy" when another live
    process holds a RUNNING run of this variant (lab.lease; never trained twice, never mixed).
    Else the run to train into: a resumable KILLED/FAILED run, or a RUNNING run whose owner died
    (a stale lease, taken over), that owns a checkpoint which verifies (lab.checkpoints; an
    unreadable one is moved aside and the previous one used), set RUNNING again; or a new child
    run of `ctx.parent_run_id`. This process holds the run's lease from here on.
    """
    from lab import checkpoints, lease

    rec = new_record(v)
    ckdir = track.checkpoint_dir(v, ctx.uri)
    with lease.store_lock(track.local_store_dir(ctx.uri)):
        runs = track.find_variant_runs(ctx.cl, ctx.experiment, key=v.key, hash=v.hash)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished and not ctx.force:
            r = finished[0]
            m = r.data.metrics
            rec.update(run_id=r.info.run_id, status="skipped", params=m.get("params"), macs=m.get("macs"),
                       steps=m.get("budget/steps"), top1=m.get("final/val_top1"), best_top1=m.get("best/val_top1"),
                       train_seconds=m.get("budget/train_seconds"), wall_seconds=0.0,
                       budget=r.data.tags.get("lab.budget_plan", v.budget.kind),
                       calibrated_step_seconds=m.get("budget/calibration_step_seconds"))
            return rec, None, None
        live = lease.first_live(runs)
        if live is not None:
            return _busy(rec, live), None, None

        owner = None
        if (ckdir / "run.json").is_file():
            try:
                owner = json.loads((ckdir / "run.json").read_text()).get("run_id")
            except Exception:  # noqa: BLE001
                owner = None
        resume = None if ctx.force else next(
            (r for r in runs if r.info.status in RESUMABLE and r.info.run_id == owner), None)
        last, notes = (None, [])
        if resume is not None:
            last, notes = checkpoints.pick_resume(ckdir)
            if last is None:
                resume = None
        for r in runs:  # RUNNING runs whose owner died and that we do not resume: say so
            if r.info.status == "RUNNING" and (resume is None or r.info.run_id != resume.info.run_id):
                _end_stale(ctx, r)
        if resume is not None:
            run_id = resume.info.run_id
            prev_owner = resume.data.tags.get(lease.OWNER) if resume.info.status == "RUNNING" else None
            ctx.cl.update_run(run_id, status="RUNNING")
            n = int(resume.data.tags.get("lab.resumed", "0")) + 1
            tags = {"lab.resumed": n, "lab.resumed_by": ctx.parent_run_id, "lab.launcher": ctx.launcher,
                    "lab.resumed_from": last.name, **lease.claim_tags(prev_owner)}
            if notes:
                tags["lab.checkpoint_recovery"] = "; ".join(notes)[:5000]
            track.set_tags(ctx.cl, run_id, tags)
            if "lab.error" in resume.data.tags:
                ctx.cl.delete_tag(run_id, "lab.error")
            rec["resumed"] = True
        else:
            if ckdir.exists():
                paths.safe_rmtree(ckdir, track.checkpoint_root(ctx.uri))
            ckdir.mkdir(parents=True, exist_ok=True)
            run_id = track.start_variant_run(ctx.cl, ctx.experiment_id, v, parent_run_id=ctx.parent_run_id,
                                             baseline=(v.key == ctx.baseline))
            tags = {"lab.launcher": ctx.launcher, **lease.claim_tags()}
            if notes:
                tags["lab.checkpoint_recovery"] = ("; ".join(notes) + "; no readable checkpoint: restarted")[:5000]
            track.set_tags(ctx.cl, run_id, tags)
            (ckdir / "run.json").write_text(json.dumps({"run_id": run_id, "experiment": ctx.experiment}))
        for note in notes:
            ctx.say(f"{v.key}: {note}")
    # A server store has no lock: read back; of two processes that claimed at once the oldest run wins.
    others = lease.first_live(track.find_variant_runs(ctx.cl, ctx.experiment, key=v.key, hash=v.hash),
                              exclude=run_id)
    if others is not None and (others.info.start_time or 0, others.info.run_id) < _start_key(ctx.cl, run_id):
        ctx.cl.set_terminated(run_id, status="KILLED")
        track.set_tags(ctx.cl, run_id, {"lab.error": "another lab run claimed this variant at the same time"})
        return _busy(rec, others), None, None
    if not lease.confirm_claim(ctx.cl, run_id):
        return _busy(rec, ctx.cl.get_run(run_id)), None, None
    if ctx.keeper is not None:
        ctx.keeper.hold(run_id)
    rec["run_id"] = run_id
    return rec, run_id, (last if resume is not None else None)


def _start_key(cl, run_id: str) -> tuple:
    r = cl.get_run(run_id)
    return (r.info.start_time or 0, r.info.run_id)


def _busy(rec: dict, run) -> dict:
    from lab import lease

    who = lease.describe(run.data.tags.get(lease.OWNER))
    rec.update(run_id=run.info.run_id, status="busy", wall_seconds=0.0,
               error=f"being trained by {who} (run {run.info.run_id}); skipped here")
    return rec


def _end_stale(ctx: Context, run) -> None:
    """A RUNNING run whose owner is gone (SIGKILL, OOM, lost node) and that nobody resumes: KILLED."""
    from lab import lease

    who = lease.describe(run.data.tags.get(lease.OWNER))
    try:
        track.set_tags(ctx.cl, run.info.run_id, {"lab.error": f"its process ({who}) died without ending it"})
        ctx.cl.set_terminated(run.info.run_id, status="KILLED")
    except Exception:  # noqa: BLE001
        pass


def execute_variant(v, ctx: Context, rec: dict, run_id: str, resume_ckpt: Optional[Path],
                    started: Optional[float] = None) -> dict:
    """The worker's half: train `v` into `run_id` (prepared by `prepare_variant`) and end the run.

    Never raises except when a signal stops it (lab.signals.Interrupted, a KeyboardInterrupt: SIGINT
    or SIGTERM; the run is KILLED with the reason and has a checkpoint). With `ctx.rank_zero` False (a non-zero rank of a distributed
    worker) it trains in lockstep with rank 0 but writes nothing to MLflow.
    """
    import socket

    t0 = started if started is not None else time.time()
    ckdir = track.checkpoint_dir(v, ctx.uri)  # the prepared folder (runtime matching may change the hash)
    try:
        if ctx.rank_zero:
            track.set_tags(ctx.cl, run_id, {"lab.worker.host": socket.gethostname(), "lab.worker.pid": os.getpid(),
                                            "lab.worker.started": f"{t0:.3f}"})
        if v.match is not None:
            from lab.measure import resolve_match

            v = _same_seed(ctx.resolved.get(v.key), v) or resolve_match(v, ctx.variants)
            if ctx.rank_zero:
                track.set_tags(ctx.cl, run_id, {k: val for k, val in v.tags.items() if k.startswith("match.")})
                track.set_tags(ctx.cl, run_id, {"lab.resolved_hash": v.hash})
        if resume_ckpt is None and ctx.rank_zero:
            track.log_variant_spec(ctx.cl, run_id, v)
        if _data_key(v) not in ctx.datamodules:  # a worker process: build this variant's data here
            preflight([v], ctx.datamodules)
        train_variant(v, ctx, run_id, resume_ckpt, rec, ckdir=ckdir)
        if ctx.rank_zero:
            ctx.cl.set_terminated(run_id, status="FINISHED")
            _retain(v, ctx, ckdir)
        rec["status"] = "finished"
    except BaseException as e:  # noqa: BLE001 - one variant's failure must not stop the others
        from lab import signals

        stop = signals.as_interrupted(e)
        if stop is None and not isinstance(e, Exception):
            raise
        rec["wall_seconds"] = time.time() - t0
        if stop is not None:  # SIGTERM / SIGINT: checkpoint written by LastCheckpoint; KILLED with the reason
            rec.update(status="killed", error=stop.reason)
            if ctx.rank_zero:
                try:
                    track.set_tags(ctx.cl, run_id, {"lab.error": stop.reason})
                finally:
                    ctx.cl.set_terminated(run_id, status="KILLED")
            raise stop from None
        rec.update(status="failed", error=track.short_error(e))
        if ctx.rank_zero:
            try:
                track.fail_run(ctx.cl, run_id, e)
            except Exception:  # noqa: BLE001
                pass
    finally:
        if ctx.keeper is not None:
            ctx.keeper.release(run_id)
    rec["wall_seconds"] = time.time() - t0
    return rec


def _retain(v, ctx: Context, ckdir: Path) -> None:
    """After FINISHED: keep what tracking.keep asks for (default: the final weights, once)."""
    from lab import checkpoints

    try:
        checkpoints.apply_retention(ckdir, v.tracking.keep,
                                    final_logged=bool(v.tracking.log_checkpoint), root=track.checkpoint_root(ctx.uri))
    except Exception as e:  # noqa: BLE001 - the run is FINISHED; a leftover file is no failure
        ctx.say(f"{v.key}: could not clean up its checkpoints ({track.short_error(e)})")


def run_variant(v, ctx: Context) -> dict:
    """Skip / resume / train one variant in this process with its own MLflow child run;
    never raises except Ctrl-C."""
    t0 = time.time()
    rec, run_id, resume_ckpt = prepare_variant(v, ctx)
    if rec["status"] in NOT_TRAINED:
        return rec
    return execute_variant(v, ctx, rec, run_id, resume_ckpt, started=t0)


# --------------------------------------------------------------------------- calibration together

CALIBRATION_FILE = "calibration.json"


def _same_seed(resolved, v):
    """A `match:`-resolved variant (resolved once per variant key) for this run's seed."""
    if resolved is None or resolved.seed == v.seed:
        return resolved
    from lab.spec import content_hash

    out = resolved.model_copy(update={"train": v.train, "seed": v.seed})
    return out.model_copy(update={"hash": content_hash(out.resolved())})


def cost_group(v) -> str:
    """Variants that differ only in train.seed cost the same per step: they share one measurement."""
    import hashlib

    train = v.train.model_dump(mode="json")
    train.pop("seed", None)
    doc = {"model": v.model, "data": v.data.model_dump(mode="json"), "train": train,
           "match": v.match.model_dump(mode="json") if v.match is not None else None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _will_train_fresh(v, ctx: Context) -> bool:
    """Neither skipped (FINISHED with this hash, or being trained by another live process) nor resumed
    from a checkpoint (which keeps its plan)."""
    from lab import lease

    runs = track.find_variant_runs(ctx.cl, ctx.experiment, key=v.key, hash=v.hash)
    if lease.first_live(runs) is not None:
        return False
    if ctx.force:
        return True
    if any(r.info.status == "FINISHED" for r in runs):
        return False
    return not (track.checkpoint_dir(v, ctx.uri) / "last.ckpt").is_file()


def calibrated_together(v, ctx: Context) -> bool:
    """Whether `lab run` measures this variant in the driver beside the others: a calibrated
    `seconds` budget, the local launcher, one process (a distributed variant, or one on a Ray/SLURM
    worker, calibrates alone where it trains)."""
    from lab.module import resolve_accelerator

    return (v.budget.kind == "seconds" and not v.budget.wall_clock and ctx.launcher == "local"
            and _world_size(v.train, resolve_accelerator(v.train)) == 1)


def _stored_calibration(ctx: Context, exclude: set, threads: int):
    """The latest calibration kept on an earlier parent run whose reference variant still exists
    with the same hash, has a FINISHED run and is not retrained now; (calibration, parent id,
    reference variant) or (None, None, None)."""
    from lab import calibration as C
    from lab.spec import Variant

    try:
        parents = ctx.cl.search_runs([ctx.experiment_id], filter_string="tags.`lab.role` = 'parent'",
                                     order_by=["attributes.start_time DESC"], max_results=20)
    except Exception:  # noqa: BLE001
        return None, None, None
    for r in parents:
        if r.info.run_id == ctx.parent_run_id or r.data.tags.get("lab.calibration.reference") is None:
            continue
        try:
            cal = C.Calibration.from_json(track.download_artifact(ctx.cl, r.info.run_id, CALIBRATION_FILE).read_text())
        except Exception:  # noqa: BLE001 - an unreadable or older calibration: look further back
            continue
        ref = cal.reference
        ref_hash = cal.context.get("hashes", {}).get(ref)
        if ref in exclude or not ref_hash or cal.context.get("threads") != threads:
            continue
        if not track.find_variant_runs(ctx.cl, ctx.experiment, key=ref, hash=ref_hash, statuses=["FINISHED"]):
            continue
        rv = next((x for x in ctx.variants if x.key == ref and x.hash == ref_hash), None)
        if rv is None and cal.context.get("reference_variant"):
            try:
                rv = Variant.model_validate(cal.context["reference_variant"])
            except Exception:  # noqa: BLE001
                rv = None
        if rv is not None:
            return cal, r.info.run_id, rv
    return None, None, None


def calibrate_together(ordered: list, ctx: Context) -> None:
    """Measure the step cost of every variant that will train in this invocation (calibrated
    `seconds` budget, see `calibrated_together`) before any of them trains, interleaved
    (lab.calibration); fills `ctx.calibration` and keeps the calibration on the parent run.

    A variant added to an experiment that already has a stored calibration is measured beside
    that calibration's reference variant and scaled to it, so that its steps match the ones
    the finished variants got."""
    import lightning.pytorch as pl

    from lab import budget as B
    from lab import calibration as C

    todo = [v for v in ordered if calibrated_together(v, ctx) and _will_train_fresh(v, ctx)]
    if not todo:
        return
    for i, v in enumerate(todo):
        if v.match is not None and v.key not in ctx.resolved:
            from lab.measure import resolve_match

            ctx.resolved[v.key] = resolve_match(v, ctx.variants)
        todo[i] = ctx.resolved.get(v.key, v)
    groups: dict[str, list] = {}
    for v in todo:
        groups.setdefault(cost_group(v), []).append(v)
    reps = [vs[0] for vs in groups.values()]
    threads = thread_choice(reps[0], ctx).threads
    stored, stored_id, ref_variant = _stored_calibration(ctx, {v.key for v in todo}, threads)
    measured = ([ref_variant] if stored is not None else []) + reps
    if stored is not None:
        reference = ref_variant.key
    else:
        reference = ctx.baseline if any(v.key == ctx.baseline for v in reps) else reps[0].key
    runners: dict[str, Any] = {}
    failing: list[str] = []

    def guarded(key: str, run: Any):
        def call(n: int):
            failing.append(key)
            out = run(n)
            failing.pop()
            return out
        return call

    for v in measured:
        try:
            if _data_key(v) not in ctx.datamodules:
                preflight([v], ctx.datamodules)
            b = build_variant(v, ctx, calibrating=True)
            runners[v.key] = guarded(v.key, B.LightningSteps(b.make_module(copy.deepcopy(b.model)), b.dm,
                                                              b.trainer_kw, threads=b.threads.threads))
        except Exception as e:  # noqa: BLE001 - that variant fails where it trains; the others go on
            ctx.say(f"warning: calibration: cannot build '{v.key}' ({track.short_error(e)}); it calibrates alone")
    steps = max(v.budget.calibration_steps for v in measured)
    cal = None
    while runners and reference in runners:
        ctx.say(f"calibrating {', '.join(runners)} together ({steps} timed steps each, interleaved"
                + (f"; reference '{reference}' from parent run {stored_id}" if stored is not None else "") + ")")
        try:
            cal = C.interleaved(runners, steps=steps, warmup=B.CALIBRATION_WARMUP, rewarm=1, reference=reference,
                                progress=ctx.say if ctx.progress else None)
            break
        except Exception as e:  # noqa: BLE001
            bad = failing[-1] if failing else reference
            failing.clear()
            ctx.say(f"warning: calibration: '{bad}' failed ({track.short_error(e)}); it calibrates alone")
            runners.pop(bad, None)
    if cal is None:
        return
    todo = [v for v in todo if groups[cost_group(v)][0].key in runners]
    names = list(runners)
    if not todo:
        return
    del runners
    cal.context = {"threads": threads, "hashes": {v.key: v.hash for v in measured},
                   "reference_variant": next(v for v in measured if v.key == reference).model_dump(mode="json"),
                   "device": track.device_name(), "parent_run_id": ctx.parent_run_id}
    if stored is not None:
        hashes = {**stored.context.get("hashes", {}), **cal.context["hashes"]}
        cal = C.rescale(cal, stored, stored_id)
        cal.context.update(threads=threads, hashes=hashes, parent_run_id=ctx.parent_run_id,
                           reference_variant=stored.context.get("reference_variant"))
        how = (f"beside reference '{reference}', scaled to its cost in parent run {stored_id} "
               f"({stored.costs[reference].step_seconds:.3f} s/step then)")
    else:
        how = f"together with {', '.join(names)}, interleaved (reference '{reference}')"
    for v in todo:
        rep = groups[cost_group(v)][0]
        c = cal.costs[rep.key]
        ctx.calibration[v.key] = {"steps": c.steps_for(float(v.budget.seconds)), "step_seconds": c.step_seconds,
                                  "relative": c.relative, "spread": c.spread, "timed_steps": len(c.samples),
                                  "how": how}
    rel = ", ".join(f"{k} {c.step_seconds * 1000:.0f} ms ({c.relative:.2f}x)" for k, c in cal.costs.items()
                    if k in names)
    ctx.say(f"calibrated in {cal.seconds_spent:.1f}s: {rel}; steps: "
            + ", ".join(f"{v.key} {ctx.calibration[v.key]['steps']}" for v in todo))
    if ctx.rank_zero:
        track.log_text(ctx.cl, ctx.parent_run_id, cal.to_json(), CALIBRATION_FILE)
        track.set_tags(ctx.cl, ctx.parent_run_id, {"lab.calibration.reference": reference,
                                                   "lab.calibration.how": how})
        track.log_metrics(ctx.cl, ctx.parent_run_id, {"calibration/seconds_spent": cal.seconds_spent}, 0)
    pl.seed_everything(todo[0].train.seed, workers=True, verbose=False)


def budget_summary(results: list[dict]) -> list[str]:
    """What `lab run` says after training: the budget used and the fidelity warnings (lab.fidelity)."""
    from lab import fidelity as F

    rows = [{**r, "variant": r["key"], "key": r.get("uid") or r["key"]} for r in results  # a run per seed: named with it
            if r.get("status") in ("finished", "skipped")]
    out = []
    used = F.used_line(rows)
    if used:
        out.append(used)
    out += [f"warning: {w}" for w in F.budget_warnings(rows)]
    return out


# --------------------------------------------------------------------------- the experiment


def _fmt_line(r: dict) -> str:
    def num(x, scale, fmt):
        return format(x / scale, fmt) if isinstance(x, (int, float)) and x is not None else "-"

    top1 = f"{r['top1']:.2f}%" if isinstance(r.get("top1"), (int, float)) else "-"
    secs = f"{r['train_seconds']:.1f}s" if isinstance(r.get("train_seconds"), (int, float)) else "-"
    line = (f"{r.get('uid', r['key']):<22} params {num(r['params'], 1e6, '.2f')}M  MACs {num(r['macs'], 1e6, '.1f')}M  "
            f"{r['budget']:<24} {r['status']:<8} top-1 {top1:>7}  train {secs:>7}")
    if isinstance(r.get("imgs_per_s"), (int, float)):
        line += f"  {r['imgs_per_s']:.0f} img/s"
    if r.get("error"):
        line += f"  error: {r['error']}"
    return line


def quiet_logs() -> None:
    """Lightning's banners and tips, MLflow's DB migration notes and known-harmless warnings off."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - its import sets its loggers to INFO: import first, then lower

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading calibration.json back

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning", "mlflow.store.db.utils",
                 "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*", ".*resuming from a checkpoint that ended.*",
                ".*is not a valid metric.*", r".*module\(s\) in eval mode.*",
                ".*Using `DistributedSampler` with the dataloaders.*"):  # DDP eval pads < world_size samples
        warnings.filterwarnings("ignore", message=msg)


def run_experiment(spec, variants: list, *, force: bool = False, progress: bool = True,
                   callbacks: Optional[Iterable] = None, baseline: Optional[str] = None,
                   say: Optional[Callable[[str], None]] = None, launcher: str = "local",
                   launch_options: Any = None) -> list[dict]:
    """Train `variants` (teachers first) in one parent run; one status dict per variant.

    Status: finished | skipped (already FINISHED with the same hash) | failed. Ctrl-C marks the
    current run and the parent KILLED and re-raises KeyboardInterrupt. `callbacks`: extra
    Lightning callbacks added to every training that runs in this process (tests use them to
    interrupt). `launcher`: local | ray | slurm (lab.launch); `launch_options`: a
    lab.launch.LaunchOptions.
    """
    from lab import launch
    from lab.spec import baseline_key

    say = say or (lambda s: print(s, flush=True))
    quiet_logs()
    if not variants:
        return []
    uris = {track.tracking_uri(v) for v in variants}
    if len(uris) > 1:
        raise LabError(f"variants of one run must share a tracking store (got {sorted(uris)})")
    uri = uris.pop()
    ordered = order_variants(variants)
    backend = launch.get_launcher(launcher, launch_options)
    backend.check(ordered)
    datamodules: dict = {}
    preflight(ordered, datamodules)

    from lab import lease

    cl = track.client(uri)
    experiment = track.experiment_name(variants[0])
    exp_id = track.get_or_create_experiment(cl, experiment, uri)
    _end_stale_parents(cl, exp_id)
    keeper = lease.Keeper(lambda: track.client(uri))
    backend.start()
    parent = None
    try:
        parent = track.start_parent_run(cl, exp_id, spec.name, tags={
            "lab.variants": ",".join(dict.fromkeys(v.key for v in ordered))[:5000], "lab.launcher": launcher,
            **({track.SMOKE_TAG: "true"} if any(v.tags.get(track.SMOKE_TAG) for v in variants) else {}),
            **lease.claim_tags(), **{k: str(x) for k, x in (spec.tags or {}).items()}})
        keeper.hold(parent)
        ctx = Context(spec=spec, variants=list(variants), uri=uri, cl=cl, experiment=experiment,
                      experiment_id=exp_id, parent_run_id=parent, baseline=baseline or baseline_key(spec, variants),
                      force=force, progress=progress, callbacks=list(callbacks or []), datamodules=datamodules,
                      say=say, launcher=launcher, keeper=keeper)
        n_keys = len(dict.fromkeys(v.key for v in ordered))
        runs = f"{n_keys} variant(s)" + (f", {len(ordered)} runs (seeds)" if len(ordered) > n_keys else "")
        say(f"{spec.name}: {runs}, tracking {uri} (experiment '{experiment}', parent run {parent}"
            f"{', launcher ' + launcher if launcher != 'local' else ''})")
        try:
            policy = thread_policy(ordered)
            ctx.threads = policy.as_dict()
            track.set_tags(cl, parent, policy.tags())
            if any(v.budget.kind == "seconds" for v in ordered):
                say(f"threads: {policy.threads} ({policy.reason}; OpenMP wait policy {policy.wait_policy})"
                    + (" where train.threads does not say otherwise"
                       if policy.source == "policy" and any(v.train.threads for v in ordered) else ""))
            calibrate_together(ordered, ctx)
            results = backend.run(ordered, ctx)
        except KeyboardInterrupt as e:
            from lab import signals

            stop = signals.as_interrupted(e)
            try:
                track.set_tags(cl, parent, {"lab.error": stop.reason if stop else "interrupted"})
            finally:
                cl.set_terminated(parent, status="KILLED")
            say(f"{stop.reason if stop else 'interrupted'}: the current run is KILLED with a checkpoint; "
                f"run the same command again to resume it")
            raise
        except BaseException:
            cl.set_terminated(parent, status="FAILED")
            raise
    finally:
        keeper.close()
        backend.close()
    ok = all(r["status"] in ("finished", *NOT_TRAINED) for r in results)
    cl.set_terminated(parent, status="FINISHED" if ok else "FAILED")
    for line in budget_summary(results):
        say(line)
    return results


def _end_stale_parents(cl, exp_id: str) -> None:
    """Parent runs still RUNNING whose `lab run` died (SIGKILL, lost node): KILLED, with the reason."""
    from lab import lease

    try:
        runs = cl.search_runs([exp_id], filter_string="tags.`lab.role` = 'parent' and attributes.status = 'RUNNING'",
                              max_results=1000)
    except Exception:  # noqa: BLE001
        return
    for r in runs:
        if lease.state(r) == "stale":
            who = lease.describe(r.data.tags.get(lease.OWNER))
            try:
                track.set_tags(cl, r.info.run_id, {"lab.error": f"its process ({who}) died without ending it"})
                cl.set_terminated(r.info.run_id, status="KILLED")
            except Exception:  # noqa: BLE001
                pass


def thread_policy(variants: list):
    """The invocation's CPU thread policy (lab.threads), decided once in the driver (the spec's
    train.threads when every variant sets the same)."""
    from lab import threads as T

    given = {v.train.threads for v in variants}
    if len(given) == 1 and None not in given:
        return T.decide(given.pop())
    return T.decide()


# --------------------------------------------------------------------------- CLI


def _cmd_run(args: argparse.Namespace) -> int:
    from lab.cli import expand_from_args

    sets = list(args.set or [])
    if args.devices is not None:
        sets.append(f"train.devices={args.devices}")
    if args.num_nodes is not None:
        sets.append(f"train.num_nodes={args.num_nodes}")
    if args.strategy is not None:
        sets.append(f"train.strategy={args.strategy}")
    args.set = sets
    spec, variants = expand_from_args(args)
    options = _launch_options(args, spec.launch)
    launcher = args.launcher or spec.launch.launcher
    from lab.spec import baseline_key

    base = baseline_key(spec, variants)
    chosen = variants
    if args.variant:
        keys = [v.key for v in variants]
        for k in args.variant:
            if k not in keys:
                raise LabError(f"no variant '{k}'{close_matches(k, keys)}; variants: {', '.join(keys)}",
                               file=args.spec, path="variants")
        chosen = with_teachers([v for v in variants if v.key in args.variant], variants)
    results = run_experiment(spec, chosen, force=args.force, progress=not args.no_progress and sys.stderr.isatty(),
                             baseline=base, launcher=launcher, launch_options=options)
    bad = [r for r in results if r["status"] not in ("finished", *NOT_TRAINED)]
    return 1 if bad else 0


def _launch_options(args: argparse.Namespace, launch=None):
    """The spec's `launch:` section, with every --ray-*/--slurm-* flag given on the command line on top."""
    from lab.launch import LaunchOptions
    from lab.spec import LaunchSpec

    launch = launch or LaunchSpec()
    ray, sl = launch.ray, launch.slurm
    params = dict(sl.params)
    for a in args.slurm_param or []:
        if "=" not in a:
            raise LabError(f"--slurm-param expects KEY=VALUE, got {a!r}")
        k, val = a.split("=", 1)
        params[k.strip().lstrip("-").replace("-", "_")] = val

    def pick(flag: str, spec_value):
        given = getattr(args, flag, None)
        return spec_value if given is None else given

    return LaunchOptions(
        ray_address=pick("ray_address", ray.address), ray_num_cpus=pick("ray_num_cpus", ray.num_cpus),
        slurm_cluster=pick("slurm_cluster", sl.cluster), slurm_folder=pick("slurm_folder", sl.folder),
        slurm_partition=pick("slurm_partition", sl.partition), slurm_account=pick("slurm_account", sl.account),
        slurm_qos=pick("slurm_qos", sl.qos), slurm_constraint=pick("slurm_constraint", sl.constraint),
        slurm_mem_gb=pick("slurm_mem_gb", sl.mem_gb), slurm_cpus_per_task=pick("slurm_cpus_per_task", sl.cpus_per_task),
        slurm_gpus_per_node=pick("slurm_gpus_per_node", sl.gpus_per_node),
        slurm_setup=list(sl.setup) + list(args.slurm_setup or []), slurm_params=params,
        slurm_time=pick("slurm_time", sl.time))


def register(sub: argparse._SubParsersAction) -> None:
    from lab.cli import add_spec_args

    p = sub.add_parser("run", help="train every variant of a spec under its budget and record it in MLflow")
    p.add_argument("spec")
    add_spec_args(p)
    p.add_argument("--force", action="store_true", help="retrain variants that already have a FINISHED run")
    p.add_argument("--variant", action="append", default=[], metavar="KEY",
                   help="train only this variant (repeatable; teachers it needs are added)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help="default: the spec's launch.launcher, else local. local: variants one after the other; ray: one Ray task per variant "
                        "($RAY_ADDRESS or a local instance); slurm: one sbatch job per variant (submitit)")
    p.add_argument("--devices", help="override train.devices (int or auto)")
    p.add_argument("--num-nodes", type=int, help="override train.num_nodes")
    p.add_argument("--strategy", help="override train.strategy (e.g. ddp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("ray launcher")
    g.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)")
    g.add_argument("--ray-num-cpus", type=float, help="CPUs per variant task (default: devices x threads on CPU)")
    g = p.add_argument_group("slurm launcher (submitit)")
    g.add_argument("--slurm-partition", help="sbatch --partition")
    g.add_argument("--slurm-time", type=int, metavar="MINUTES", help="sbatch --time in minutes (default 240)")
    g.add_argument("--slurm-account", help="sbatch --account")
    g.add_argument("--slurm-qos", help="sbatch --qos")
    g.add_argument("--slurm-constraint", help="sbatch --constraint")
    g.add_argument("--slurm-mem-gb", type=float, help="memory per node in GB")
    g.add_argument("--slurm-cpus-per-task", type=int, help="CPUs per task (default: train.threads)")
    g.add_argument("--slurm-gpus-per-node", type=int,
                   help="GPUs per node (default: train.devices when train.accelerator is gpu)")
    g.add_argument("--slurm-setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before training (repeatable), e.g. 'module load cuda'")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch parameter (repeatable), e.g. --slurm-param mail_type=END")
    g.add_argument("--slurm-folder", help="submitit folder for job logs (default <store>/submitit/<experiment>/%%j)")
    g.add_argument("--slurm-cluster", choices=["slurm", "local"], default=None,
                   help="local: run the jobs on this machine with submitit's LocalExecutor (testing)")
    p.set_defaults(func=_cmd_run)
