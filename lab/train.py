"""Train one variant into a prepared MLflow run: build, plan, fit, record.

`train_variant` is the four steps in order; each step is a function of its own:
  - `build_variant`: threads (lab.threads), seed, the model, its complexity, the teacher, the data
    and the trainer settings (also used by lab.run_calibration to measure every variant together);
  - `plan_budget`: the budget plan (a resumed run keeps its plan; a seconds budget takes its entry of
    the calibration of all variants, or calibrates alone); `log_start` records it on a new run;
  - `fit`: the Lightning Trainer with lab's callbacks, run until the budget is spent, then a final
    validation when the last one is stale;
  - `record_final`: the final metrics, the final weights, the inspection of the trained model
    (`inspect_trained`, lab.inspection), the inference throughput after training
    (`bench_after_train`) and the variant's `VariantResult`.
Skip/resume decisions, the run's status and the error handling live in lab.execute; the
metric and tag names in lab.record.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lab import record as R
from lab import track
from lab.errors import LabError


def data_key(v) -> str:
    """Variants with equal data sections share one datamodule under this key."""
    import json

    return json.dumps(v.data.model_dump(mode="json"), sort_keys=True)


def find_file(path: str, spec_file: Optional[str]) -> Optional[Path]:
    """`path` as given (absolute), else relative to the working directory, else to the spec's folder."""
    p = Path(os.path.expanduser(path))
    cands = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(spec_file).parent / p] if spec_file else [])
    return next((c for c in cands if c.is_file()), None)


def runs_by_key(variants: list) -> dict[str, list]:
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
    runs = runs_by_key(variants).get(d.variant, [])
    return next((t for t in runs if t.seed == v.seed), runs[0] if runs else None)


def teacher_config(v, model: dict[str, Any]) -> dict[str, Any]:
    """A teacher's grafts config: `model` at the student's input size and classes."""
    cfg = v.model_cfg
    return {"img_size": cfg.img_size, "num_classes": cfg.num_classes, **model}


def load_teacher(v, ctx):
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
                    path = track.download_artifact(ctx.cl, r.info.run_id, R.FINAL_CHECKPOINT)
                    break
                except Exception:  # noqa: BLE001
                    continue
            else:
                raise RuntimeError(
                    f"teacher variant '{d.variant}' has no finished run with weights "
                    f"(it failed, or tracking.log_checkpoint is off)"
                )
    else:
        found = find_file(d.checkpoint, v.source)
        if found is None:
            raise LabError(f"teacher checkpoint not found: {d.checkpoint}")
        path = found
    cfg, sd = model_state_from_file(path)
    if d.model:
        cfg = teacher_config(v, d.model)
    elif cfg is None:
        cfg = teacher_config(v, {"zoo": v.model_cfg.zoo})
    teacher = grafts.build(cfg)
    teacher.load_state_dict(sd)
    return teacher.eval()


def world_size(train, accelerator: str) -> int:
    """Training processes of a TrainSpec: devices x nodes ('auto' devices: every GPU, or 1)."""
    import torch

    dev = train.devices
    if dev == "auto":
        dev = torch.cuda.device_count() if accelerator == "gpu" else 1
    return max(1, int(dev)) * train.num_nodes


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (when a process group is up; else `obj`): ranks that
    time their own calibration must still agree on one step count, or DDP would hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def sync_stop_callback():
    import lightning.pytorch as pl

    class SyncStop(pl.Callback):
        """Wall-clock budgets under DDP: stop every rank once any rank's timer says stop."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = bool(trainer.strategy.reduce_boolean_decision(bool(trainer.should_stop), all=False))

    return SyncStop()


def last_eval_callback():
    import lightning.pytorch as pl

    class LastEval(pl.Callback):
        """The step of the last validation during fit, on every rank."""

        step: Optional[int] = None

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and trainer.state.fn == "fit" and pl_module.last_val:
                self.step = trainer.global_step

    return LastEval()


def planned_steps(cl, run_id: str) -> Optional[int]:
    """The step count a run planned (a resumed seconds budget keeps it)."""
    hist = track.metric_history(cl, run_id, R.BUDGET_PLANNED_STEPS)
    return int(hist[-1][1]) if hist else None


# --------------------------------------------------------------------------- the four steps


@dataclass
class Built:
    """A variant ready to train (what `build_variant` makes): model, data, threads, Trainer settings."""

    variant: Any
    model: Any
    params: int
    macs: int
    teacher: Any
    dm: Any
    accelerator: str
    precision: Any
    world: int
    global_batch: int
    train_size: int
    steps_per_epoch: int
    device: Any
    threads: Any  # lab.threads.ThreadChoice
    trainer_kw: dict

    def make_module(self, model, total_steps: Optional[int] = None):
        """The LightningModule training `model` (the variant's recipe, its teacher and data augmentation)."""
        from lab.module import LabModule

        v, dm = self.variant, self.dm
        return LabModule(
            model,
            v.train,
            num_classes=v.model_cfg.num_classes,
            total_steps=total_steps,
            global_batch=self.global_batch,
            mixup_fn=getattr(dm, "mixup_fn", None),
            label_smoothing=float(getattr(dm, "label_smoothing", 0.0) or 0.0),
            teacher=self.teacher,
        )


@dataclass
class Fitted:
    """What `fit` leaves: the trained module, its trainer, the timer and the checkpoint folder."""

    module: Any
    trainer: Any
    timer: Any
    ckdir: Path


def thread_choice(v, ctx, accelerator: Optional[str] = None):
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
            c = T.ThreadChoice(
                **{
                    **ctx.threads,
                    "threads": max(1, c.threads // procs),
                    "reason": f"{c.reason}, shared by {procs} training processes",
                }
            )
        return c
    return T.decide(processes=procs)


def teacher_stand_in(v, ctx):
    """For calibration: the teacher's architecture (random weights: the cost is the same), or the
    real teacher where its weights already exist."""
    import grafts

    d = v.train.distill
    if d is None:
        return None
    if d.variant:
        tv = next(x for x in ctx.variants if x.key == d.variant)
        cfg = dict(tv.model) if not d.model else teacher_config(v, d.model)
        return grafts.build(cfg).eval()
    return load_teacher(v, ctx)


def build_variant(v, ctx, *, calibrating: bool = False) -> Built:
    """Threads and seed set, the model and its teacher built, device and precision picked, data sized;
    `calibrating`: a stand-in teacher with the right architecture when the real one has not trained yet."""
    import torch

    import grafts
    from lab.module import resolve_accelerator, resolve_precision

    tr = v.train
    accelerator = resolve_accelerator(tr)
    choice = apply_threads_and_seed(v, ctx, accelerator)
    precision = resolve_precision(tr, accelerator)
    dm = seeded_datamodule(v, ctx)
    model = grafts.build(v.model)
    world = world_size(tr, accelerator)
    steps_per_epoch = epoch_steps(dm, world)
    return Built(
        variant=v,
        model=model,
        params=grafts.count_params(model),
        macs=int(grafts.count_macs(v.model)),
        teacher=teacher_stand_in(v, ctx) if calibrating else load_teacher(v, ctx),
        dm=dm,
        accelerator=accelerator,
        precision=precision,
        world=world,
        global_batch=v.data.batch_size * world,
        train_size=int(dm.train_size),
        steps_per_epoch=steps_per_epoch,
        device=torch.device("cuda") if accelerator == "gpu" else torch.device("cpu"),
        threads=choice,
        trainer_kw=trainer_settings(tr, accelerator, precision),
    )


def apply_threads_and_seed(v, ctx, accelerator: str):
    """The variant's thread choice (`thread_choice`), applied, and its train.seed set; the choice."""
    import lightning.pytorch as pl

    from lab import threads as T

    choice = thread_choice(v, ctx, accelerator)
    T.apply(choice.threads)
    pl.seed_everything(v.train.seed, workers=True, verbose=False)
    return choice


def seeded_datamodule(v, ctx):
    """The variant's (shared) datamodule, its training order seeded with train.seed."""
    dm = ctx.datamodules[data_key(v)]
    # train.seed: init, augmentation and the training data order; data.seed keeps the dataset and
    # its train/val split fixed, so every seed of every variant is scored on the same images
    dm.shuffle_seed = v.train.seed
    return dm


def epoch_steps(dm, world: int) -> int:
    """Optimizer steps per epoch: the training batches, shared among `world` ranks."""
    n_batches = len(dm.train_dataloader())
    return max(1, n_batches // world if world > 1 else n_batches)


def trainer_settings(tr, accelerator: str, precision) -> dict:
    """The Lightning Trainer arguments of a TrainSpec that every fit and calibration shares (lab logs,
    checkpoints and reports progress itself)."""
    return dict(
        accelerator=accelerator,
        devices=tr.devices,
        num_nodes=tr.num_nodes,
        strategy=tr.strategy,
        precision=precision,
        gradient_clip_val=tr.grad_clip,
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )


def plan_budget(v, ctx, run_id: str, resume_ckpt: Optional[Path], b: Built) -> tuple[Any, str]:
    """The budget plan and how a seconds budget was calibrated ("" otherwise): a resumed run keeps its
    plan; a variant calibrated with the others (lab.run_calibration) takes its entry; else it
    calibrates alone here."""
    planned = planned_steps(ctx.cl, run_id) if resume_ckpt is not None else None
    together = ctx.calibration.get(v.key)
    timed = v.budget.kind == "seconds" and not v.budget.wall_clock
    if timed and planned is not None:
        return resumed_plan(ctx, run_id, b, planned), ""
    if timed and together is not None:
        return together_plan(b, together), together["how"]
    return plan_alone(v, b)


def resumed_plan(ctx, run_id: str, b: Built, planned: int):
    """A resumed seconds budget: the step count the run planned, and the step cost it planned with."""
    from lab import budget as B

    plan = B.BudgetPlan(
        kind="seconds",
        total_steps=planned,
        global_batch=b.global_batch,
        steps_per_epoch=b.steps_per_epoch,
        macs_per_image=b.macs,
    )
    prev = track.metric_history(ctx.cl, run_id, R.calibration_metric("step_seconds"))
    if prev:
        plan.calibration["step_seconds"] = prev[-1][1]
    return plan


def together_plan(b: Built, together: dict):
    """A seconds budget from the variant's entry of the calibration of all variants (lab.run_calibration)."""
    from lab import budget as B

    return B.BudgetPlan(
        kind="seconds",
        total_steps=int(together["steps"]),
        global_batch=b.global_batch,
        steps_per_epoch=b.steps_per_epoch,
        macs_per_image=b.macs,
        calibration={
            "step_seconds": together["step_seconds"],
            "images_per_s": b.global_batch / together["step_seconds"],
            "relative": together["relative"],
            "spread": together["spread"],
            "timed_steps": float(together["timed_steps"]),
        },
    )


def plan_alone(v, b: Built) -> tuple[Any, str]:
    """The plan of lab.budget, a seconds budget calibrated alone here (`calibrate_alone`), and how;
    the seed set again afterwards."""
    import lightning.pytorch as pl

    from lab import budget as B

    plan = B.plan(
        v.budget,
        global_batch=b.global_batch,
        steps_per_epoch=b.steps_per_epoch,
        macs_per_image=b.macs,
        calibrate=lambda: calibrate_alone(v, b),
    )
    how = ""
    if plan.calibration:
        how = (
            "alone, in its own worker"
            + (f" (rank 0's figure, {b.world} ranks)" if b.world > 1 else "")
            + ": not interleaved with the other variants"
        )
    pl.seed_everything(v.train.seed, workers=True, verbose=False)  # calibration consumed randomness
    return plan, how


def calibrate_alone(v, b: Built) -> dict:
    """The variant's step cost timed on its own (lab.budget.calibrate); rank 0's figure on every rank."""
    from lab import budget as B

    return from_rank_zero(
        B.calibrate(
            lambda: b.make_module(copy.deepcopy(b.model)),
            b.dm,
            b.trainer_kw,
            steps=v.budget.calibration_steps,
            threads=b.threads.threads,
        )
    )


def log_start(v, ctx, run_id: str, b: Built, plan, calibrated_by: str) -> None:
    """Step-0 metrics and the run's training tags (a new run, rank 0)."""
    first: dict[str, Any] = {R.PARAMS: b.params, R.MACS: b.macs}
    if plan.total_steps is not None:
        first[R.BUDGET_PLANNED_STEPS] = plan.total_steps
    if v.budget.kind == "seconds":
        first[R.BUDGET_PLANNED_SECONDS] = float(v.budget.seconds)
    for k, val in plan.calibration.items():
        first[R.calibration_metric(k)] = val
    track.log_metrics(ctx.cl, run_id, first, 0)
    tags = {
        R.PRECISION: b.precision,
        R.WORLD_SIZE: b.world,
        R.BUDGET_PLAN: plan.describe(),
        R.TRAIN_SIZE: b.train_size,
        R.VAL_SIZE: getattr(b.dm, "val_size", None),
        R.STEPS_PER_EPOCH: b.steps_per_epoch,
        **b.threads.tags(),
        R.DATA_SKIPPED_FILES: len(getattr(b.dm, "bad_files", ())) or None,
    }
    if calibrated_by:
        tags[R.CALIBRATION] = calibrated_by
    track.set_tags(ctx.cl, run_id, tags)


def fit(v, ctx, run_id: str, resume_ckpt: Optional[Path], b: Built, plan, ckdir: Path) -> Fitted:
    """Train under the plan with lab's callbacks, checkpointing into `ckdir`; a final validation when
    the last one is stale. A resumed run replays exactly the batches it would have seen (lab.resume)."""
    import lightning.pytorch as pl

    from lab import budget as B
    from lab.module import LastCheckpoint

    tr = v.train
    module = b.make_module(b.model, plan.total_steps)
    timer = B.TrainTimer(max_seconds=plan.max_seconds, skip_first=1 if tr.compile else 0)
    if plan.max_seconds is not None:
        module.progress_fn = lambda: timer.progress
    ckpt = LastCheckpoint(ckdir / "last.ckpt", every_n_steps=tr.eval_every or max(50, b.steps_per_epoch), timer=timer)
    last_eval = last_eval_callback()
    callbacks = fit_callbacks(v, ctx, run_id, b, plan, timer, ckpt, last_eval)
    trainer = pl.Trainer(**b.trainer_kw, **B.trainer_limits(plan), callbacks=callbacks, **validation_schedule(tr))

    B.fit(trainer, module, datamodule=b.dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    check_fitted(module, trainer, ckpt)
    if last_eval.step != trainer.global_step or not module.last_val:
        trainer.validate(module, datamodule=b.dm, verbose=False)
    return Fitted(module=module, trainer=trainer, timer=timer, ckdir=ckdir)


def fit_callbacks(v, ctx, run_id: str, b: Built, plan, timer, ckpt, last_eval) -> list:
    """Lab's Lightning callbacks in their order: exact resume, the timer, the stop shared by DDP ranks
    (a wall-clock budget), the metrics (rank 0), the checkpoint, the last validation's step, the
    progress line (`ctx.progress`), then `ctx.callbacks`."""
    from lab.module import MlflowMetrics, StepProgress
    from lab.resume import ExactResume

    tr = v.train
    # Only rank 0 logs; the decisions in `fit` (final validation) must not depend on logging, or
    # the ranks of a DDP run would disagree about a collective call and hang.
    callbacks: list = [ExactResume(getattr(b.dm, "resume_point", None), v.data.batch_size), timer]
    if b.world > 1 and plan.max_seconds is not None:
        callbacks.append(sync_stop_callback())  # every rank stops at the same step
    if ctx.rank_zero:
        callbacks.append(
            MlflowMetrics(
                ctx.cl,
                run_id,
                log_every=tr.log_every,
                timer=timer,
                global_batch=b.global_batch,
                train_size=b.train_size,
            )
        )
    callbacks += [ckpt, last_eval]
    if ctx.progress:
        callbacks.append(StepProgress(v.uid, plan.total_steps, timer, plan.max_seconds))
    callbacks.extend(ctx.callbacks)
    return callbacks


def validation_schedule(tr) -> dict[str, Any]:
    """The Trainer's validation arguments: every train.eval_every steps, else every epoch."""
    if tr.eval_every:
        return dict(val_check_interval=tr.eval_every, check_val_every_n_epoch=None)
    return dict(val_check_interval=1.0, check_val_every_n_epoch=1)


def check_fitted(module, trainer, ckpt) -> None:
    """Raise what went wrong during fit: the checkpoint callback's error, or a non-finite training loss."""
    import torch

    from lab.module import NonFiniteLoss

    if ckpt.exception is not None:
        raise ckpt.exception
    if module.last_loss is not None and not torch.isfinite(module.last_loss).all():
        raise NonFiniteLoss(f"training loss is {float(module.last_loss)} at step {trainer.global_step}")


def record_final(v, ctx, run_id: str, b: Built, f: Fitted, result: R.VariantResult) -> R.VariantResult:
    """The final metrics and weights (rank 0), the inference throughput after training
    (bench.after_train) and the variant's result."""
    from lab import budget as B
    from lab.module import save_final

    steps = f.trainer.global_step
    final_val = f.module.last_val
    use = B.usage(
        steps=steps,
        global_batch=b.global_batch,
        train_seconds=f.timer.train_seconds,
        macs_per_image=b.macs,
        peak_mem_mb=B.peak_memory_mb(b.device),
    )
    final = {
        R.FINAL_VAL_TOP1: final_val[R.VAL_TOP1],
        R.FINAL_VAL_TOP5: final_val[R.VAL_TOP5],
        R.FINAL_VAL_LOSS: final_val[R.VAL_LOSS],
        R.BEST_VAL_TOP1: max(f.module.best_top1, final_val[R.VAL_TOP1]),
        **use,
        R.PARAMS: b.params,
        R.MACS: b.macs,
    }
    writes = f.trainer.is_global_zero and ctx.rank_zero
    if writes:
        track.log_metrics(ctx.cl, run_id, final, steps)
        final_path = save_final(f.ckdir / "final.pt", f.module, v.model, variant=v.key, hash=v.hash, steps=steps)
        if v.tracking.log_checkpoint:
            track.log_artifact_file(ctx.cl, run_id, final_path, R.CHECKPOINT_ARTIFACT_DIR)
        if v.tracking.inspect:
            inspect_trained(v, ctx, run_id, f.module.eval_model, b.dm, steps)
    result.update(
        steps=steps,
        top1=final[R.FINAL_VAL_TOP1],
        best_top1=final[R.BEST_VAL_TOP1],
        train_seconds=f.timer.train_seconds,
        images_seen=use[R.BUDGET_IMAGES_SEEN],
    )
    if v.bench.after_train and writes:
        result.imgs_per_s = bench_after_train(v, f.module.model, b.accelerator, ctx, run_id)
    return result


def inspect_trained(v, ctx, run_id: str, model, dm, step: int) -> None:
    """Filters, attention-bias maps and mean attention distance of the trained model onto its run
    (lab.inspection); a failure is tagged `lab.inspect_error` and never fails the trained run."""
    from lab.inspection_plot import log_inspection

    n = v.tracking.inspect_images
    try:
        batches = (x for x, _ in dm.val_dataloader())  # also tells grey (MNIST) from colour input
        log_inspection(ctx.cl, run_id, model, batches, label=v.key, max_images=n, step=step)
    except Exception as e:  # noqa: BLE001
        track.set_tags(ctx.cl, run_id, {R.INSPECT_ERROR: track.short_error(e)})
        ctx.say(f"warning: {v.key}: inspection not recorded (the trained run stands): {track.short_error(e)}")


def bench_after_train(v, model, accelerator: str, ctx, run_id: str) -> Optional[float]:
    """Inference images/s of the trained model with the bench protocol (lab.bench) on the run's
    device, logged as `lab bench --log` does; a failure is a warning, not a failed variant."""
    from lab.bench import bench_record, measure_throughput, protocol
    from lab.models import model_img_size

    device = "cuda" if accelerator == "gpu" else "cpu"
    try:
        res = measure_throughput(
            copy.deepcopy(model), img_size=model_img_size(model, v.img_hw[0]), device=device, **protocol(v.bench)
        )
    except Exception as e:  # noqa: BLE001 - the training result stands without it
        track.set_tags(ctx.cl, run_id, {R.BENCH_ERROR: track.short_error(e)})
        ctx.say(f"warning: {v.key}: inference throughput not measured: {track.short_error(e)}")
        return None
    metrics, tags = bench_record(res)
    track.log_metrics(ctx.cl, run_id, metrics, 0)
    track.set_tags(ctx.cl, run_id, tags)
    return res.images_per_s


def train_variant(
    v, ctx, run_id: str, resume_ckpt: Optional[Path], result: R.VariantResult, ckdir: Optional[Path] = None
) -> R.VariantResult:
    """Train, evaluate and log one variant into `run_id`: build, plan, fit, record; fills and returns
    `result`. `ckdir`: the checkpoint folder prepared for the run (default: the variant's own)."""
    from lab import budget as B
    from lab.weights import apply_init, record_init

    b = build_variant(v, ctx)
    if v.init is not None and resume_ckpt is None:  # model.init (a resumed run restores its own weights)
        init = apply_init(b.model, v, ctx.cl, ctx.uri, ctx.variants)
        ctx.say(f"[{v.key}] {init.line()}")
        if ctx.rank_zero:
            record_init(ctx.cl, run_id, init)
    result.update(params=b.params, macs=b.macs)
    B.reset_peak_memory(b.device)
    plan, calibrated_by = plan_budget(v, ctx, run_id, resume_ckpt, b)
    result.update(budget=plan.describe(), calibrated_step_seconds=plan.calibration.get("step_seconds"))
    if resume_ckpt is None and ctx.rank_zero:
        log_start(v, ctx, run_id, b, plan, calibrated_by)
    f = fit(v, ctx, run_id, resume_ckpt, b, plan, ckdir or track.checkpoint_dir(v, ctx.uri))
    return record_final(v, ctx, run_id, b, f, result)
