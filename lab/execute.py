"""One variant of a `lab run`, whatever launcher runs it: skip, resume or start its MLflow run
(`prepare_variant`, the driver's half), then train it into that run and end the run
(`execute_variant`, the worker's half; the training itself is lab.train).

  - a FINISHED run with the same hash is skipped (`force=True` retrains);
  - a RUNNING run held by another live process (lab.lease) is left to it ("busy");
  - a KILLED/FAILED run, or a RUNNING one whose process died, whose checkpoint still verifies
    (lab.checkpoints) is resumed into the same MLflow run from
    `<store>/checkpoints/<experiment>-<h>/<variant>-<hash>/last.ckpt` (lab.paths);
  - any exception (including a non-finite loss) marks the run FAILED with `lab.error` and the
    traceback as `error.txt`, and the next variant runs;
  - SIGINT / SIGTERM (lab.signals) write a checkpoint, mark the run KILLED with the reason and
    re-raise.
In a distributed worker only global rank 0 writes to MLflow (`Context.rank_zero`).
The experiment around the variants (parent run, ordering, launchers) is lab.runner.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from lab import checkpoints, lease, paths, signals, track
from lab import record as R
from lab.errors import LabError
from lab.record import NOT_TRAINED, VariantResult
from lab.train import data_key, find_file, train_variant

RESUMABLE = ("KILLED", "RUNNING", "FAILED")
__all__ = ["NOT_TRAINED", "RESUMABLE", "Context", "execute_variant", "preflight", "prepare_variant", "run_variant"]


def silent(_msg: str) -> None:
    """A `say` that prints nothing (picklable, unlike a lambda)."""


@dataclass
class Context:
    """What every variant of one `lab run` shares: the spec, the store, the parent run, options.

    The one record of an invocation for every launcher: a worker gets `portable()`'s copy inside
    its lab.launch.VariantJob and `attach`es its own client to it.
    """

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
    # the invocation together (lab.run_calibration); a variant not in it calibrates alone
    calibration: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # variant key -> the variant with `match:` resolved

    def portable(self, key: Optional[str] = None, progress: bool = False) -> Context:
        """A picklable copy for a worker process training variant `key`: no client, callbacks,
        datamodules or printer; the thread policy only for the local launcher (same machine); only
        that variant's calibration entry."""
        cal = {key: self.calibration[key]} if key in self.calibration else {}
        return dataclasses.replace(
            self,
            cl=None,
            callbacks=[],
            datamodules={},
            say=silent,
            progress=progress,
            keeper=None,
            threads=self.threads if self.launcher == "local" else None,
            calibration=cal,
            resolved={},
        )

    def attach(self, *, rank_zero: bool = True) -> Context:
        """This (portable) context in a worker: its own MLflow client and rank."""
        return dataclasses.replace(self, cl=track.client(self.uri), rank_zero=rank_zero)


def preflight(variants: list, datamodules: dict) -> None:
    """Build (and set up) each distinct dataset once; missing data or teacher files are LabErrors."""
    from lab.data import build_datamodule

    for v in variants:
        k, cfg = data_key(v), v.model_cfg
        if k not in datamodules:
            dm = build_datamodule(v.data, num_classes_expected=cfg.num_classes, spec_file=v.source or None)
            dm.setup("fit")
            datamodules[k] = dm
        else:
            dm = datamodules[k]
            nc = cfg.num_classes
            if getattr(dm, "num_classes", nc) != nc:
                raise LabError(
                    f"the model has {nc} classes but the data has {dm.num_classes}",
                    file=v.source,
                    path=f"variants.{v.key}.model.num_classes",
                )
        d = v.train.distill
        if d is not None and d.checkpoint and find_file(d.checkpoint, v.source) is None:
            raise LabError(
                f"teacher checkpoint not found: {d.checkpoint}",
                file=v.source,
                path=f"variants.{v.key}.train.distill.checkpoint",
            )
        size = cfg.img_size
        if not cfg.dynamic_img_size and cfg.img_hw != (v.data.image_size, v.data.image_size):
            raise LabError(
                f"model.img_size {size} differs from data.image_size {v.data.image_size} (square "
                "images); set them equal, or model.dynamic_img_size: true",
                file=v.source,
                path=f"variants.{v.key}.model.img_size",
            )
        if v.init is not None and v.init.checkpoint and find_file(v.init.checkpoint, v.source) is None:
            raise LabError(
                f"init checkpoint not found: {v.init.checkpoint}",
                file=v.source,
                path=f"variants.{v.key}.model.init.checkpoint",
            )


def prepare_variant(v, ctx: Context) -> tuple[VariantResult, Optional[str], Optional[Path]]:
    """The driver's half of a variant: skip it, or claim the MLflow child run it trains into.

    Returns (result, run_id, resume_ckpt). result.status is "skipped" (run_id None) when a
    FINISHED run with the same hash exists and not `ctx.force`, or "busy" when another live
    process holds a RUNNING run of this variant (lab.lease; never trained twice, never mixed).
    Else the run to train into: a resumable KILLED/FAILED run, or a RUNNING run whose owner died
    (a stale lease, taken over), that owns a checkpoint which verifies (lab.checkpoints; an
    unreadable one is moved aside and the previous one used), set RUNNING again; or a new child
    run of `ctx.parent_run_id`. This process holds the run's lease from here on.
    """
    rec = VariantResult.new(v)
    ckdir = track.checkpoint_dir(v, ctx.uri)
    with lease.store_lock(track.local_store_dir(ctx.uri)):
        runs = track.find_variant_runs(ctx.cl, ctx.experiment, key=v.key, hash=v.hash)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished and not ctx.force:
            return skipped(rec, finished[0], v), None, None
        live = lease.first_live(runs)
        if live is not None:
            return busy(rec, live), None, None
        resume, last, notes = (None, None, []) if ctx.force else resumable(runs, ckdir)
        for r in runs:  # RUNNING runs whose owner died and that we do not resume: say so
            if r.info.status == "RUNNING" and (resume is None or r.info.run_id != resume.info.run_id):
                end_stale(ctx.cl, r)
        if resume is not None and last is not None:
            run_id = reopen(ctx, resume, last, notes)
            rec.resumed = True
        else:
            run_id = start_fresh(ctx, v, ckdir, notes)
        for note in notes:
            ctx.say(f"{v.key}: {note}")
    holder = other_claim(ctx, v, run_id)
    if holder is not None:
        return busy(rec, holder), None, None
    if ctx.keeper is not None:
        ctx.keeper.hold(run_id)
    rec.run_id = run_id
    return rec, run_id, (last if rec.resumed else None)


def resumable(runs: list, ckdir: Path) -> tuple[Any, Optional[Path], list[str]]:
    """(run, checkpoint, notes): the KILLED/FAILED/RUNNING run that owns `ckdir` and a checkpoint of it
    that verifies (lab.checkpoints), else (None, None, notes about what was unreadable)."""
    owner = checkpoints.owner(ckdir)
    run = next((r for r in runs if r.info.status in RESUMABLE and r.info.run_id == owner), None)
    if run is None:
        return None, None, []
    last, notes = checkpoints.pick_resume(ckdir)
    return (run if last is not None else None), last, notes


def other_claim(ctx: Context, v: Any, run_id: str) -> Any:
    """The run of another live process that holds this variant after all, else None (this process keeps
    `run_id`). A server store has no lock: read back; of two processes that claimed at once the oldest
    run wins, and the loser's run is ended KILLED with the reason."""
    others = lease.first_live(track.find_variant_runs(ctx.cl, ctx.experiment, key=v.key, hash=v.hash), exclude=run_id)
    if others is not None and (others.info.start_time or 0, others.info.run_id) < start_key(ctx.cl, run_id):
        ctx.cl.set_terminated(run_id, status="KILLED")
        track.set_tags(ctx.cl, run_id, {R.ERROR: "another lab run claimed this variant at the same time"})
        return others
    if not lease.confirm_claim(ctx.cl, run_id):
        return ctx.cl.get_run(run_id)
    return None


def skipped(rec: VariantResult, run: Any, v: Any) -> VariantResult:
    """The result of a variant FINISHED before with the same hash, read from its run."""
    m = run.data.metrics
    return rec.update(
        run_id=run.info.run_id,
        status="skipped",
        params=m.get(R.PARAMS),
        macs=m.get(R.MACS),
        steps=m.get(R.BUDGET_STEPS),
        top1=m.get(R.FINAL_VAL_TOP1),
        best_top1=m.get(R.BEST_VAL_TOP1),
        train_seconds=m.get(R.BUDGET_TRAIN_SECONDS),
        wall_seconds=0.0,
        budget=run.data.tags.get(R.BUDGET_PLAN, v.budget.kind),
        calibrated_step_seconds=m.get(R.calibration_metric("step_seconds")),
    )


def reopen(ctx: Context, run: Any, last: Path, notes: list[str]) -> str:
    """Set a resumable run RUNNING again, held by this process, with where it resumes from."""
    run_id = run.info.run_id
    prev_owner = run.data.tags.get(lease.OWNER) if run.info.status == "RUNNING" else None
    ctx.cl.update_run(run_id, status="RUNNING")
    tags = {
        **checkpoints.resume_tags(run.data.tags, last, notes),
        R.RESUMED_BY: ctx.parent_run_id,
        R.LAUNCHER: ctx.launcher,
        **lease.claim_tags(prev_owner),
    }
    track.set_tags(ctx.cl, run_id, tags)
    if R.ERROR in run.data.tags:
        ctx.cl.delete_tag(run_id, R.ERROR)
    return run_id


def start_fresh(ctx: Context, v: Any, ckdir: Path, notes: list[str]) -> str:
    """A new child run held by this process, with an empty checkpoint folder that names it."""
    if ckdir.exists():
        paths.safe_rmtree(ckdir, track.checkpoint_root(ctx.uri))
    ckdir.mkdir(parents=True, exist_ok=True)
    run_id = track.start_variant_run(
        ctx.cl, ctx.experiment_id, v, parent_run_id=ctx.parent_run_id, baseline=(v.key == ctx.baseline)
    )
    tags = {R.LAUNCHER: ctx.launcher, **lease.claim_tags()}
    if notes:
        tags[R.CHECKPOINT_RECOVERY] = ("; ".join(notes) + "; no readable checkpoint: restarted")[:5000]
    track.set_tags(ctx.cl, run_id, tags)
    checkpoints.set_owner(ckdir, run_id, ctx.experiment)
    return run_id


def start_key(cl: Any, run_id: str) -> tuple:
    r = cl.get_run(run_id)
    return (r.info.start_time or 0, r.info.run_id)


def busy(rec: VariantResult, run: Any) -> VariantResult:
    who = lease.describe(run.data.tags.get(lease.OWNER))
    return rec.update(
        run_id=run.info.run_id,
        status="busy",
        wall_seconds=0.0,
        error=f"being trained by {who} (run {run.info.run_id}); skipped here",
    )


def end_stale(cl: Any, run: Any) -> None:
    """A RUNNING run (variant or parent) whose owner is gone (SIGKILL, OOM, lost node) and that nobody
    resumes: KILLED, with the reason."""
    who = lease.describe(run.data.tags.get(lease.OWNER))
    try:
        track.set_tags(cl, run.info.run_id, {R.ERROR: f"its process ({who}) died without ending it"})
        cl.set_terminated(run.info.run_id, status="KILLED")
    except Exception:  # noqa: BLE001 - best effort: it is shown STALE meanwhile
        pass


def execute_variant(
    v, ctx: Context, rec: VariantResult, run_id: str, resume_ckpt: Optional[Path], started: Optional[float] = None
) -> VariantResult:
    """The worker's half: train `v` into `run_id` (prepared by `prepare_variant`) and end the run.

    Never raises except when a signal stops it (lab.signals.Interrupted, a KeyboardInterrupt: SIGINT
    or SIGTERM; the run is KILLED with the reason and has a checkpoint). With `ctx.rank_zero` False
    (a non-zero rank of a distributed worker) it trains in lockstep with rank 0 but writes nothing
    to MLflow.
    """
    t0 = started if started is not None else time.time()
    ckdir = track.checkpoint_dir(v, ctx.uri)  # the prepared folder (runtime matching may change the hash)
    try:
        if ctx.rank_zero:
            mark_worker(ctx, run_id, t0)
        v = resolve_and_log(v, ctx, run_id, resume_ckpt)
        if data_key(v) not in ctx.datamodules:  # a worker process: build this variant's data here
            preflight([v], ctx.datamodules)
        train_variant(v, ctx, run_id, resume_ckpt, rec, ckdir=ckdir)
        if ctx.rank_zero:
            ctx.cl.set_terminated(run_id, status="FINISHED")
            retain(v, ctx, ckdir)
        rec.status = "finished"
    except BaseException as e:  # noqa: BLE001 - one variant's failure must not stop the others
        stop = signals.as_interrupted(e)
        if stop is None and not isinstance(e, Exception):
            raise
        rec.wall_seconds = time.time() - t0
        if stop is not None:  # SIGTERM / SIGINT: checkpoint written by LastCheckpoint; KILLED with the reason
            end_killed(ctx, run_id, rec, stop)
            raise stop from None
        end_failed(ctx, run_id, rec, e)
    finally:
        if ctx.keeper is not None:
            ctx.keeper.release(run_id)
    rec.wall_seconds = time.time() - t0
    return rec


def mark_worker(ctx: Context, run_id: str, t0: float) -> None:
    """Tag the run with the host and process that train it, and when they started."""
    import socket

    track.set_tags(
        ctx.cl, run_id, {R.WORKER_HOST: socket.gethostname(), R.WORKER_PID: os.getpid(), R.WORKER_STARTED: f"{t0:.3f}"}
    )


def resolve_and_log(v, ctx: Context, run_id: str, resume_ckpt: Optional[Path]):
    """The variant with `match:` resolved (its match tags and resolved hash on the run) and, unless
    it resumes, its spec logged to the run; the variant that trains."""
    if v.match is not None:
        from lab.match import resolve_match

        v = same_seed(ctx.resolved.get(v.key), v) or resolve_match(v, ctx.variants)
        if ctx.rank_zero:
            prefix = R.match_tag("")
            track.set_tags(ctx.cl, run_id, {k: val for k, val in v.tags.items() if k.startswith(prefix)})
            track.set_tags(ctx.cl, run_id, {R.RESOLVED_HASH: v.hash})
    if resume_ckpt is None and ctx.rank_zero:
        track.log_variant_spec(ctx.cl, run_id, v)
    return v


def end_killed(ctx: Context, run_id: str, rec: VariantResult, stop: signals.Interrupted) -> None:
    """A signal stopped the training: the result and the run KILLED with the reason."""
    rec.update(status="killed", error=stop.reason)
    if ctx.rank_zero:
        try:
            track.set_tags(ctx.cl, run_id, {R.ERROR: stop.reason})
        finally:
            ctx.cl.set_terminated(run_id, status="KILLED")


def end_failed(ctx: Context, run_id: str, rec: VariantResult, e: BaseException) -> None:
    """The training raised: the result and the run FAILED with the error (best effort on the run)."""
    rec.update(status="failed", error=track.short_error(e))
    if ctx.rank_zero:
        try:
            track.fail_run(ctx.cl, run_id, e)
        except Exception:  # noqa: BLE001
            pass


def retain(v, ctx: Context, ckdir: Path) -> None:
    """After FINISHED: keep what tracking.keep asks for (default: the final weights, once)."""
    try:
        checkpoints.apply_retention(
            ckdir, v.tracking.keep, final_logged=bool(v.tracking.log_checkpoint), root=track.checkpoint_root(ctx.uri)
        )
    except Exception as e:  # noqa: BLE001 - the run is FINISHED; a leftover file is no failure
        ctx.say(f"{v.key}: could not clean up its checkpoints ({track.short_error(e)})")


def same_seed(resolved, v):
    """A `match:`-resolved variant (resolved once per variant key) for this run's seed."""
    if resolved is None or resolved.seed == v.seed:
        return resolved
    from lab.spec import content_hash

    out = resolved.model_copy(update={"train": v.train, "seed": v.seed})
    return out.model_copy(update={"hash": content_hash(out.resolved())})


def run_variant(v, ctx: Context) -> VariantResult:
    """Skip / resume / train one variant in this process with its own MLflow child run;
    never raises except Ctrl-C."""
    t0 = time.time()
    rec, run_id, resume_ckpt = prepare_variant(v, ctx)
    if rec.status in NOT_TRAINED or run_id is None:
        return rec
    return execute_variant(v, ctx, rec, run_id, resume_ckpt, started=t0)


def quiet_logs() -> None:
    """Lightning's banners and tips, MLflow's DB migration notes and known-harmless warnings off."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - its import sets its loggers to INFO: import first, then lower

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading calibration.json back

    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning",
        "pytorch_lightning",
        "mlflow.store.db.utils",
        "alembic",
        "alembic.runtime.migration",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    for msg in (
        ".*does not have many workers.*",
        ".*LeafSpec.*",
        ".*litlogger.*",
        ".*resuming from a checkpoint that ended.*",
        ".*is not a valid metric.*",
        r".*module\(s\) in eval mode.*",
        ".*Using `DistributedSampler` with the dataloaders.*",
    ):  # DDP eval pads < world_size samples
        warnings.filterwarnings("ignore", message=msg)
