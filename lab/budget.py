"""Training budgets: a BudgetSpec -> a stopping rule for the Trainer + the LR schedule's length.

Kinds (exactly one per spec, shared by every variant of an experiment):
  epochs       steps = ceil(epochs * steps_per_epoch)
  steps        steps
  images       steps = ceil(images / global_batch)
  train_flops  steps = ceil(train_flops / (3 * 2 * MACs/image * global_batch))   (fwd + bwd = 3 fwd)
  seconds      calibration: the cost of a training step, measured on a throw-away copy of the
               model before training, not counted: `lab run` measures all variants of an
               invocation together, interleaved (lab/calibration.py); a distributed or remote
               worker measures its variant alone (`calibrate`). Then
               steps = round(seconds / step_seconds) = round(seconds * images_per_s / global_batch)
  seconds + wall_clock: no step count: training stops once the *training* time (see
               `TrainTimer`) reaches the budget, and the LR schedule follows elapsed time.

`TrainTimer` measures training time only: the time from the end of one training batch (or
the start/resume of training, or the end of an evaluation) to the end of the next, so data
loading counts, evaluation, checkpointing done at eval time, and calibration do not; with
torch.compile the first step of each `fit` (the compilation) is left out.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch

from lab import record as R

CALIBRATION_WARMUP = 5  # untimed steps first: allocator, thread pools and caches settle


@dataclass
class BudgetPlan:
    kind: str
    total_steps: Optional[int]  # None: wall-clock budget (stop on time)
    global_batch: int
    max_seconds: Optional[float] = None  # wall-clock budget only
    steps_per_epoch: Optional[int] = None
    macs_per_image: Optional[int] = None
    calibration: dict[str, float] = field(default_factory=dict)  # images_per_s, step_seconds, seconds_spent

    def describe(self) -> str:
        if self.total_steps is None:
            return f"{self.max_seconds:g}s wall-clock"
        return f"{self.kind}: {self.total_steps} steps"


def steps_for(
    budget,
    *,
    global_batch: int,
    steps_per_epoch: Optional[int] = None,
    macs_per_image: Optional[int] = None,
    images_per_s: Optional[float] = None,
) -> int:
    """Exact optimizer steps for a budget (seconds needs the calibrated images_per_s)."""
    kind = budget.kind
    if kind == "steps":
        return int(budget.steps)
    if kind == "epochs":
        if not steps_per_epoch:
            raise ValueError("an epochs budget needs steps_per_epoch")
        return max(1, math.ceil(budget.epochs * steps_per_epoch))
    if kind == "images":
        return max(1, math.ceil(budget.images / global_batch))
    if kind == "train_flops":
        if not macs_per_image:
            raise ValueError("a train_flops budget needs the model's MACs per image")
        return max(1, math.ceil(budget.train_flops / (6.0 * macs_per_image * global_batch)))
    if kind == "seconds":
        if not images_per_s:
            raise ValueError("a seconds budget needs a calibrated images_per_s")
        return max(1, round(budget.seconds * images_per_s / global_batch))
    raise ValueError(f"unknown budget kind {kind}")


def plan(
    budget,
    *,
    global_batch: int,
    steps_per_epoch: Optional[int] = None,
    macs_per_image: Optional[int] = None,
    calibrate: Optional[Callable[[], dict[str, float]]] = None,
) -> BudgetPlan:
    """The BudgetPlan; `calibrate()` (seconds budgets only) returns {'images_per_s', 'step_seconds', ...}."""
    p = BudgetPlan(
        kind=budget.kind,
        total_steps=None,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        macs_per_image=macs_per_image,
    )
    if budget.kind == "seconds":
        if budget.wall_clock:
            p.max_seconds = float(budget.seconds)
            return p
        if calibrate is None:
            raise ValueError("a seconds budget needs a calibration function")
        p.calibration = dict(calibrate())
        p.total_steps = steps_for(budget, global_batch=global_batch, images_per_s=p.calibration["images_per_s"])
        return p
    p.total_steps = steps_for(
        budget, global_batch=global_batch, steps_per_epoch=steps_per_epoch, macs_per_image=macs_per_image
    )
    return p


def trainer_limits(p: BudgetPlan) -> dict[str, Any]:
    """Trainer kwargs that implement the stopping rule (wall-clock stops via TrainTimer)."""
    if p.total_steps is None:
        return {"max_steps": -1, "max_epochs": -1}
    return {"max_steps": int(p.total_steps), "max_epochs": -1}


# --------------------------------------------------------------------------- timing


def _sync(trainer: "pl.Trainer") -> None:
    if trainer.strategy.root_device.type == "cuda":
        torch.cuda.synchronize(trainer.strategy.root_device)


class TrainTimer(pl.Callback):
    """Accumulates training-only seconds; stops training at `max_seconds` (wall-clock budgets).

    Its state (seconds so far, steps timed) is saved in checkpoints, so a resumed run continues
    the count. `skip_first` steps of each fit are not timed (compile/calibration warm-up); their
    count is in `skipped`.
    """

    def __init__(self, max_seconds: Optional[float] = None, skip_first: int = 0, sync: bool = True):
        self.max_seconds = max_seconds
        self.skip_first = skip_first
        self.sync = sync
        self.train_seconds = 0.0
        self.timed_steps = 0
        self.skipped = 0
        self.step_times: list[float] = []
        self._mark: Optional[float] = None
        self._batches_this_fit = 0

    def _now(self, trainer) -> float:
        if self.sync:
            _sync(trainer)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self._batches_this_fit = 0
        self._mark = self._now(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        if self._mark is None:
            self._mark = self._now(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self._now(trainer)
        if self._mark is not None:
            dt = now - self._mark
            self._batches_this_fit += 1
            if self._batches_this_fit <= self.skip_first:
                self.skipped += 1
            else:
                self.train_seconds += dt
                self.timed_steps += 1
                self.step_times.append(dt)
        if self.max_seconds is not None and self.train_seconds >= self.max_seconds:
            trainer.should_stop = True
        self._mark = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (logging, checkpointing) is not training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._mark is not None:
                self._mark += time.perf_counter() - t0

    def on_validation_start(self, trainer, pl_module):
        self._mark = None  # evaluation is not training time

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self._mark = self._now(trainer)

    def on_train_end(self, trainer, pl_module):
        self._mark = None

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds, "timed_steps": self.timed_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.timed_steps = int(state.get("timed_steps", 0))
        self.skipped = int(state.get("skipped", 0))

    @property
    def progress(self) -> float:
        """Share of a wall-clock budget used so far (0 when there is none)."""
        return min(1.0, self.train_seconds / self.max_seconds) if self.max_seconds else 0.0


class _ExceptionSeen(pl.Callback):
    def __init__(self):
        self.exception: Optional[BaseException] = None

    def on_exception(self, trainer, pl_module, exception):
        self.exception = exception


def fit(trainer: "pl.Trainer", module: "pl.LightningModule", **kwargs: Any) -> None:
    """`trainer.fit` that lets Ctrl-C and SIGTERM out as `lab.signals.Interrupted` (a KeyboardInterrupt;
    Lightning turns Ctrl-C into sys.exit(1) after its on_exception hooks and leaves SIGINT ignored, and
    SIGTERM into SIGTERMException, a SystemExit) and restores the SIGINT handler. While it runs, the
    handlers of `lab.signals` defer a signal to the next batch boundary (see LastCheckpoint)."""
    from lab import signals

    seen = _ExceptionSeen()
    trainer.callbacks.append(seen)
    old = signal.getsignal(signal.SIGINT)
    try:
        with signals.training():
            trainer.fit(module, **kwargs)
    except SystemExit as e:
        stop = signals.as_interrupted(seen.exception) if isinstance(seen.exception, BaseException) else None
        stop = stop or signals.as_interrupted(e)
        if stop is not None:
            raise stop from None
        raise
    finally:
        if old is not None and signal.getsignal(signal.SIGINT) is not old:
            signal.signal(signal.SIGINT, old)


class LightningSteps:
    """A calibration runner (lab.calibration): `steps(n)` trains `module` n steps with a fresh
    Trainer and returns each step's training seconds as `TrainTimer` measures them (data loading
    included). The module keeps its weights between calls; the first step of each call pays for
    a new optimizer and data iterator, so the calibrator leaves it out (`rewarm`). On a GPU the
    module goes back to the CPU between calls, so that several variants fit beside each other."""

    def __init__(
        self, module: "pl.LightningModule", datamodule, trainer_kwargs: dict[str, Any], threads: Optional[int] = None
    ):
        self.module = module
        self.datamodule = datamodule
        self.threads = threads
        kw = dict(trainer_kwargs)
        kw.update(
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            val_check_interval=None,
            check_val_every_n_epoch=None,
        )
        kw.pop("ckpt_path", None)
        self.trainer_kwargs = kw
        self.calls = 0

    def __call__(self, n: int) -> list[float]:
        if self.threads:
            torch.set_num_threads(self.threads)
        timer = TrainTimer()
        trainer = pl.Trainer(**self.trainer_kwargs, max_steps=int(n), callbacks=[timer])
        fit(trainer, self.module, datamodule=self.datamodule)
        self.calls += 1
        if trainer.strategy.root_device.type == "cuda":
            self.module.to("cpu")
            torch.cuda.empty_cache()
        return list(timer.step_times)


def calibrate(
    make_module: Callable[[], "pl.LightningModule"],
    datamodule,
    trainer_kwargs: dict[str, Any],
    steps: int,
    warmup: int = CALIBRATION_WARMUP,
    threads: Optional[int] = None,
) -> dict[str, float]:
    """One variant alone (a distributed or remote worker): `warmup` untimed steps, then `steps` timed
    ones on a fresh module (thrown away) with lab.calibration's statistics.

    `make_module()` must return a module whose weights are a copy (the real one stays untouched).
    Returns images_per_s, step_seconds (median), spread, timed_steps, seconds_spent.
    """
    from lab.calibration import interleaved

    module = make_module()
    runner = LightningSteps(module, datamodule, trainer_kwargs, threads=threads)
    cal = interleaved({"v": runner}, steps=steps, warmup=warmup, rewarm=1)
    c = cal.costs["v"]
    batch = module.global_batch
    del module, runner
    return {
        "images_per_s": batch / c.step_seconds,
        "step_seconds": c.step_seconds,
        "spread": c.spread,
        "timed_steps": float(len(c.samples)),
        "seconds_spent": cal.seconds_spent,
    }


def peak_memory_mb(device: Optional[torch.device] = None) -> float:
    """CUDA max allocated on a GPU, else the process's peak RSS (Linux: KiB, macOS: bytes)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_memory(device: Optional[torch.device] = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def usage(
    *, steps: int, global_batch: int, train_seconds: float, macs_per_image: int, peak_mem_mb: float
) -> dict[str, float]:
    """What a run used, as the budget/* metrics."""
    images = steps * global_batch
    return {
        R.BUDGET_STEPS: steps,
        R.BUDGET_IMAGES_SEEN: images,
        R.BUDGET_TRAIN_SECONDS: train_seconds,
        R.BUDGET_TRAIN_FLOPS: 6.0 * macs_per_image * images,
        R.BUDGET_PEAK_MEM_MB: peak_mem_mb,
    }


__all__ = [
    "BudgetPlan",
    "LightningSteps",
    "TrainTimer",
    "calibrate",
    "plan",
    "steps_for",
    "trainer_limits",
    "usage",
    "peak_memory_mb",
    "reset_peak_memory",
]
