"""Where the variants of a `lab run` train: `--launcher local | ray | slurm`.

Roles. The *driver* is the `lab run` process: it validates the spec and the data, creates the
ONE MLflow parent run of the invocation and, per variant, decides skip / resume / new child run
(`lab.execute.prepare_variant`), so the skip/resume rules and the parent are the same for every
launcher. A *job* (`VariantJob`, picklable) carries what a worker needs: the invocation's
`execute.Context` (spec, variants, tracking URI, parent run id; `Context.portable()`), the
variant's key, the child run id to train into and its result so far. `run_job(job)` is the
per-variant function every launcher calls: in the driver (local), in a Ray task (ray) or in a
submitit job (slurm).

One process per distributed variant. Lightning's `ddp` strategy starts ranks 1..N-1 by
re-running the current command (`sys.argv`, or `python -m <module> argv` when started with -m)
with LOCAL_RANK/NODE_RANK/WORLD_SIZE set. Inside `lab run SPEC` that would replay the whole
sweep in every rank (new parent and child runs, other variants trained N times). So a variant
whose world size is > 1 runs in a fresh `python -m lab.launch worker JOB RESULT` process: the
re-launch replays only that command, i.e. only that variant, into the run the driver prepared.
We keep `ddp` (not `ddp_spawn`): spawn pickles the trainer into new processes and returns only
the weights, so the module state read after `fit` (last validation, best top-1, timer) would be
lost in the parent, and it is slower and fragile with non-picklable callbacks (MLflow client).
Under SLURM (`srun` starts one task per device) and torchrun the processes exist already;
Lightning detects that and does not re-launch, and the same worker command runs in each task.

Rank 0 only writes. A worker's global rank comes from the environment, before any Trainer
exists: it is rank 0 iff every rank variable that is set (RANK, LOCAL_RANK, NODE_RANK,
SLURM_PROCID, JSM_NAMESPACE_RANK) is 0 (`is_rank_zero`). Other ranks train in lockstep but
never touch MLflow (`Context.rank_zero = False`) and write no result file.

Parent run id. Created by the driver before anything is submitted and carried in each job;
child runs are created by the driver with tag `mlflow.parentRunId`, so whichever launcher ran
them, `lab table` sees one sweep. A worker that dies without ending its run (killed, OOM,
scheduler time limit) is marked FAILED by the driver when it collects the job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from lab import execute, paths, signals, track
from lab.errors import LabError
from lab.record import VariantResult

LAUNCHERS = ("local", "ray", "slurm")
# a worker that exits with these (Ctrl-C / SIGTERM, lab.signals) was stopped, not broken
KILLED_EXIT_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_SLURM_TASK_VARS = (
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_STEP_NUM_TASKS",
)
_ROOT = str(Path(__file__).resolve().parents[1])  # the folder that holds the `lab` package


# --------------------------------------------------------------------------- ranks


def is_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    """True unless a rank variable of this process says it is not global rank 0."""
    values = os.environ if env is None else env
    for k in RANK_VARS:
        val = str(values.get(k, "") or "").strip()
        if val and val != "0":
            return False
    return True


def world_size(v) -> int:
    """Processes a variant trains with (devices x nodes), resolved on this machine."""
    from lab.module import resolve_accelerator
    from lab.train import world_size as train_world_size

    return train_world_size(v.train, resolve_accelerator(v.train))


def needs_own_process(v) -> bool:
    return world_size(v) > 1


# --------------------------------------------------------------------------- jobs


@dataclass
class VariantJob:
    """Everything a worker needs to train one variant into a prepared MLflow run (picklable)."""

    ctx: execute.Context  # portable: no client, callbacks or datamodules
    key: str  # the variant's uid (key, plus -seedN when it repeats)
    run_id: str
    resume_ckpt: Optional[str]
    record: VariantResult
    cwd: str = field(default_factory=os.getcwd)

    @property
    def variant(self):
        return next(v for v in self.ctx.variants if v.uid == self.key)


def make_job(
    v, ctx, rec: VariantResult, run_id: str, resume_ckpt: Optional[Path], progress: bool = False
) -> VariantJob:
    return VariantJob(
        ctx=ctx.portable(v.key, progress=progress),
        key=v.uid,
        run_id=run_id,
        resume_ckpt=str(resume_ckpt) if resume_ckpt else None,
        record=dataclasses.replace(rec),
    )


def execute_job(job: VariantJob, started: Optional[float] = None) -> VariantResult:
    """Train the job's variant in THIS process (one rank of it when distributed); its result."""
    started = started if started is not None else time.time()
    import lightning.pytorch  # noqa: F401 - before quiet_logs: importing it resets its loggers

    execute.quiet_logs()
    if job.cwd and os.path.isdir(job.cwd):
        os.chdir(job.cwd)  # relative paths (data roots, ./mlruns checkpoints) as in the driver
    # a single-process variant is its own rank 0 whatever the environment says (e.g. a Ray worker
    # on a node whose raylet was started by srun inherits SLURM_PROCID)
    rank_zero = is_rank_zero() if needs_own_process(job.variant) else True
    ctx = job.ctx.attach(rank_zero=rank_zero)
    rec = dataclasses.replace(job.record)
    resume = Path(job.resume_ckpt) if job.resume_ckpt else None
    return execute.execute_variant(job.variant, ctx, rec, job.run_id, resume, started=started)


def run_job(job: VariantJob) -> VariantResult:
    """The per-variant function of every launcher: train one variant, return its result.

    A distributed variant runs in a worker subprocess (so Lightning's DDP re-launch replays only
    that worker); a single-process one runs here.
    """
    started = time.time()
    if needs_own_process(job.variant):
        return _run_worker_process(job)
    return execute_job(job, started=started)


def _run_worker_process(job: VariantJob) -> VariantResult:
    tmp = Path(tempfile.mkdtemp(prefix=f"lab-{paths.slug(job.key, 40)}-"))
    jobfile, resfile = tmp / "job.pkl", tmp / "result.json"
    jobfile.write_bytes(pickle.dumps(job))
    env = dict(os.environ)
    if job.ctx.launcher != "slurm":
        # We start this worker and Lightning starts its ranks: an enclosing SLURM allocation (lab run
        # inside salloc, a Ray node started by srun) must not make it think srun made them.
        for k in _SLURM_TASK_VARS:
            env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "lab.launch", "worker", str(jobfile), str(resfile)]
    proc = subprocess.Popen(cmd, env=env, cwd=job.cwd if os.path.isdir(job.cwd) else None)
    try:
        try:
            rc = proc.wait()
        except KeyboardInterrupt as e:
            # the worker saves a checkpoint and marks its run KILLED on SIGINT / SIGTERM (lab.signals)
            proc.send_signal(getattr(e, "signum", signal.SIGINT))
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if resfile.is_file():
            rec = VariantResult.from_dict(json.loads(resfile.read_text()))
        else:
            rec = dataclasses.replace(
                job.record,
                status="failed" if rc not in KILLED_EXIT_CODES else "killed",
                error=f"worker process exited with code {rc} without a result",
            )
        rec.worker_exit_code = rc
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def worker_main(argv: list[str]) -> int:
    """`python -m lab.launch worker JOB.pkl RESULT.json`: one variant, one (rank's) process."""
    if len(argv) != 3 or argv[0] != "worker":
        print("usage: python -m lab.launch worker JOB.pkl RESULT.json", file=sys.stderr)
        return 2
    from lab import signals

    signals.install()
    job: VariantJob = pickle.loads(Path(argv[1]).read_bytes())
    started = time.time()
    code = 0
    try:
        rec = execute_job(job, started=started)
    except KeyboardInterrupt as e:
        stop = signals.as_interrupted(e)
        rec = dataclasses.replace(job.record, status="killed", error=stop.reason if stop else "interrupted")
        code = stop.exit_code if stop else 130
    if is_rank_zero():
        out = Path(argv[2])
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec.to_dict(), default=str))
        os.replace(tmp, out)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return code


# --------------------------------------------------------------------------- driver side


def finish_record(ctx, rec: VariantResult, outcome: Any) -> VariantResult:
    """The driver's view of a job that ended: its result, and the run ended if the worker could not."""
    if isinstance(outcome, VariantResult) and outcome.status in ("finished", "failed", "killed"):
        rec = outcome
    else:
        err = (
            outcome if isinstance(outcome, BaseException) else RuntimeError(f"worker returned no result ({outcome!r})")
        )
        rec = dataclasses.replace(rec, status="failed", error=track.short_error(err))
    if ctx.keeper is not None and rec.run_id:
        ctx.keeper.release(rec.run_id)
    if rec.run_id and rec.status != "finished":
        try:
            run = ctx.cl.get_run(rec.run_id)
            if run.info.status == "RUNNING":  # the worker died before it could end its run
                if rec.status == "killed":
                    ctx.cl.set_terminated(rec.run_id, status="KILLED")
                else:
                    track.fail_run(ctx.cl, rec.run_id, RuntimeError(rec.error or "worker failed"))
        except Exception:  # noqa: BLE001 - best effort: the store may be the reason it died
            pass
    return rec


def _mark_killed(ctx, run_ids: list[str]) -> None:
    for rid in run_ids:
        try:
            if ctx.cl.get_run(rid).info.status == "RUNNING":
                ctx.cl.set_terminated(rid, status="KILLED")
        except Exception:  # noqa: BLE001
            pass


def waves(ordered: list) -> list[list]:
    """Variants grouped so that teachers (train.distill.variant) finish before their students."""
    level: dict[str, int] = {}
    for v in ordered:  # teachers come first in `ordered`
        d = v.train.distill
        t = d.variant if d is not None else None
        level[v.key] = level[t] + 1 if t in level else 0
    out: list[list] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for v in ordered:
        out[level[v.key]].append(v)
    return out


@dataclass
class LaunchOptions:
    # ray
    ray_address: Optional[str] = None  # default: $RAY_ADDRESS, else a local Ray instance
    ray_num_cpus: Optional[float] = None  # CPUs per task (default: devices x threads on CPU, 1 with GPUs)
    ray_init: dict = field(default_factory=dict)  # extra ray.init kwargs for a local instance
    # slurm (submitit)
    slurm_cluster: str = "slurm"  # "local": submitit's LocalExecutor on this machine (tests, dry runs)
    slurm_folder: Optional[str] = None  # submitit logs/pickles; default <store>/submitit/<experiment>/%j
    slurm_partition: Optional[str] = None
    slurm_time: int = 240  # minutes
    slurm_account: Optional[str] = None
    slurm_qos: Optional[str] = None
    slurm_constraint: Optional[str] = None
    slurm_mem_gb: Optional[float] = None
    slurm_cpus_per_task: Optional[int] = None
    slurm_gpus_per_node: Optional[int] = None  # default: train.devices when the variant trains on GPU
    slurm_setup: list = field(default_factory=list)  # shell lines run before the job (module load ...)
    slurm_params: dict = field(default_factory=dict)  # extra #SBATCH parameters
    poll_s: float = 5.0


class Launcher:
    name = "local"

    def __init__(self, opts: Optional[LaunchOptions] = None):
        self.opts = opts or LaunchOptions()

    def check(self, variants: list) -> None:
        for v in variants:
            if v.train.num_nodes > 1:
                raise LabError(
                    f"variant '{v.key}' asks for train.num_nodes={v.train.num_nodes}: "
                    f"multi-node training needs --launcher slurm",
                    file=v.source,
                    path=f"variants.{v.key}.train.num_nodes",
                )

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def run(self, ordered: list, ctx) -> list[VariantResult]:
        """Local: one variant after the other; a distributed one in a worker process of its own."""
        results = []
        for v in ordered:
            if needs_own_process(v):
                rec, run_id, resume = execute.prepare_variant(v, ctx)
                if rec.status not in execute.NOT_TRAINED and run_id is not None:
                    job = make_job(v, ctx, rec, run_id, resume, progress=ctx.progress)
                    try:
                        outcome = run_job(job)
                    except KeyboardInterrupt:
                        _mark_killed(ctx, [run_id])
                        raise
                    rec = finish_record(ctx, rec, outcome)
                    if rec.status == "killed":
                        results.append(rec)
                        raise signals.Interrupted(signal.SIGTERM if "SIGTERM" in str(rec.error) else signal.SIGINT)
            else:
                rec = execute.run_variant(v, ctx)
            results.append(rec)
            ctx.say(rec.line())
        return results


class _Parallel(Launcher):
    """Submit every variant of a wave at once, collect them as they finish."""

    def submit(self, v, job: VariantJob) -> Any:
        raise NotImplementedError

    def completed(self, handles: list):
        """Yield (handle, record-or-exception) as jobs end."""
        raise NotImplementedError

    def cancel(self, handles: list) -> None:
        raise NotImplementedError

    def spans_machines(self) -> bool:
        return False

    def run(self, ordered: list, ctx) -> list[VariantResult]:
        if self.spans_machines() and (ctx.uri.startswith(("sqlite:", "file:")) or "://" not in ctx.uri):
            ctx.say(
                f"note: the tracking store {ctx.uri} is a local file; every worker machine must see it at "
                f"that path. A tracking server is safer: export MLFLOW_TRACKING_URI=http://HOST:PORT"
            )
        results: dict[str, VariantResult] = {}
        for wave in waves(ordered):
            pending: dict[int, tuple[Any, Any, VariantResult]] = {}
            try:
                for v in wave:
                    rec, run_id, resume = execute.prepare_variant(v, ctx)
                    if rec.status in execute.NOT_TRAINED or run_id is None:
                        results[v.uid] = rec
                        ctx.say(rec.line())
                        continue
                    try:
                        handle = self.submit(v, make_job(v, ctx, rec, run_id, resume))
                    except Exception as e:  # noqa: BLE001 - a refused submission fails this variant only
                        results[v.uid] = finish_record(ctx, rec, e)
                        ctx.say(results[v.uid].line())
                        continue
                    pending[id(handle)] = (handle, v, rec)
                for handle, outcome in self.completed([h for h, _, _ in pending.values()]):
                    _, v, rec = pending.pop(id(handle))
                    results[v.uid] = finish_record(ctx, rec, outcome)
                    ctx.say(results[v.uid].line())
            except KeyboardInterrupt:
                self.cancel([h for h, _, _ in pending.values()])
                _mark_killed(ctx, [rec.run_id for _, _, rec in pending.values() if rec.run_id])
                raise
        return [results[v.uid] for v in ordered]


# --------------------------------------------------------------------------- ray


class RayLauncher(_Parallel):
    """One Ray task per variant with the variant's resources; `ray.init()` finds the cluster from
    --ray-address / $RAY_ADDRESS (or a running local one), else starts a local instance."""

    name = "ray"

    def __init__(self, opts: Optional[LaunchOptions] = None):
        super().__init__(opts)
        self._started = False
        self._gpu_cluster = False

    def check(self, variants: list) -> None:
        super().check(variants)
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise LabError(f"--launcher ray needs Ray: pip install -e '.[scale]' ({e})") from None

    def start(self) -> None:
        import ray

        if not ray.is_initialized():
            address = self.opts.ray_address or os.environ.get("RAY_ADDRESS") or None
            if address:
                try:
                    ray.init(address=address)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise LabError(f"cannot connect to the Ray cluster at {address}: {e}") from None
            else:
                kw = {"include_dashboard": False, **self.opts.ray_init}
                ray.init(**kw)
            self._started = True
        self._gpu_cluster = ray.cluster_resources().get("GPU", 0) > 0

    def spans_machines(self) -> bool:
        import ray

        return len([n for n in ray.nodes() if n.get("Alive")]) > 1

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def resources(self, v) -> dict[str, float]:
        tr = v.train
        gpu = tr.accelerator == "gpu" or (tr.accelerator == "auto" and self._gpu_cluster)
        devices = tr.devices if isinstance(tr.devices, int) else 1
        if gpu:
            return {"num_cpus": self.opts.ray_num_cpus or 1, "num_gpus": devices}
        return {"num_cpus": self.opts.ray_num_cpus or devices * (tr.threads or 1), "num_gpus": 0}

    def submit(self, v, job: VariantJob) -> Any:
        import ray

        task = ray.remote(run_job).options(name=f"lab:{job.ctx.experiment}:{v.uid}", max_retries=0, **self.resources(v))
        return task.remote(job)

    def completed(self, handles: list):
        import ray

        left = list(handles)
        while left:
            ready, left = ray.wait(left, num_returns=1)
            for ref in ready:
                try:
                    yield ref, ray.get(ref)
                except Exception as e:  # noqa: BLE001 - task crashed / worker died
                    yield ref, e

    def cancel(self, handles: list) -> None:
        import ray

        for ref in handles:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------- slurm (submitit)


class SlurmLauncher(_Parallel):
    """One sbatch job per variant through submitit: nodes = train.num_nodes, tasks per node =
    train.devices (one task per device; Lightning's SLURM environment wires DDP), GPUs per
    node = train.devices on GPU. `slurm_cluster="local"` runs the jobs on this machine with
    submitit's LocalExecutor (one task; Lightning starts the ranks itself)."""

    name = "slurm"

    def __init__(self, opts: Optional[LaunchOptions] = None):
        super().__init__(opts)
        self._executor = None

    def check(self, variants: list) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError as e:
            raise LabError(f"--launcher slurm needs submitit: pip install -e '.[scale]' ({e})") from None
        if self.opts.slurm_cluster == "slurm":
            missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
            if missing:
                raise LabError(
                    f"--launcher slurm: {' and '.join(missing)} not on PATH (run on a SLURM login node, "
                    f"or use --slurm-cluster local to run the jobs on this machine)"
                )
        else:
            super().check(variants)  # the local executor is one node

    def spans_machines(self) -> bool:
        return self.opts.slurm_cluster == "slurm"

    def _folder(self, ctx) -> str:
        if self.opts.slurm_folder:
            return self.opts.slurm_folder
        return str(track.store_dir(ctx.uri).resolve() / "submitit" / paths.experiment_dirname(ctx.experiment) / "%j")

    def params(self, v) -> dict[str, Any]:
        o, tr = self.opts, v.train
        gpu = tr.accelerator == "gpu" or (tr.accelerator == "auto" and bool(o.slurm_gpus_per_node))
        devices = tr.devices if isinstance(tr.devices, int) else (o.slurm_gpus_per_node or 1)
        local = o.slurm_cluster != "slurm"
        p: dict[str, Any] = {
            "name": f"lab-{v.experiment}-{v.uid}"[:120],
            "timeout_min": int(o.slurm_time),
            "nodes": 1 if local else tr.num_nodes,
            "tasks_per_node": 1 if local else devices,
            "gpus_per_node": (o.slurm_gpus_per_node or devices) if gpu else 0,
            "cpus_per_task": o.slurm_cpus_per_task or (tr.threads or (devices if local else None)),
            "mem_gb": o.slurm_mem_gb,
        }
        if not local:
            extra = {
                "slurm_partition": o.slurm_partition,
                "slurm_account": o.slurm_account,
                "slurm_qos": o.slurm_qos,
                "slurm_constraint": o.slurm_constraint,
                "slurm_setup": list(o.slurm_setup) or None,
                "slurm_additional_parameters": dict(o.slurm_params) or None,
            }
            p.update({k: val for k, val in extra.items() if val is not None})
        return {k: val for k, val in p.items() if val is not None}

    def _get_executor(self, ctx):
        import submitit

        if self._executor is None:
            self._executor = submitit.AutoExecutor(folder=self._folder(ctx), cluster=self.opts.slurm_cluster)
        return self._executor

    def run(self, ordered: list, ctx) -> list[VariantResult]:
        self._ctx = ctx
        return super().run(ordered, ctx)

    def submit(self, v, job: VariantJob) -> Any:
        ex = self._get_executor(self._ctx)
        ex.update_parameters(**self.params(v))
        from lab.requeue import VariantTask  # preempted / timed-out jobs requeue and resume

        return ex.submit(VariantTask(run_job), job)

    def completed(self, handles: list):
        import submitit

        for job in submitit.helpers.as_completed(handles, poll_frequency=self.opts.poll_s):
            try:
                # multi-task jobs: one result per task, task 0 is global rank 0
                yield job, (job.results()[0])
            except Exception as e:  # noqa: BLE001 - failed / cancelled / timed out job
                yield job, e

    def cancel(self, handles: list) -> None:
        for job in handles:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001
                pass


def get_launcher(name: str, opts: Optional[LaunchOptions] = None) -> Launcher:
    classes = {"local": Launcher, "ray": RayLauncher, "slurm": SlurmLauncher}
    if name not in classes:
        raise LabError(f"unknown launcher '{name}' (choose from {', '.join(LAUNCHERS)})")
    return classes[name](opts)


if __name__ == "__main__":
    # Re-import under the real module name so that pickled jobs and the runner share one module.
    from lab.launch import worker_main as _main

    _code = _main(sys.argv[1:])
    # Everything is written (MLflow calls are synchronous, the result file is in place): skip the
    # interpreter's teardown, whose final garbage collection of torch/mlflow/pyarrow modules takes
    # seconds per process and rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)
