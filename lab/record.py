"""The run record: every MLflow metric, tag, param and artifact name lab writes or reads, and
`VariantResult`, the typed outcome of one variant of a `lab run`.

This module is the single definition. Writers (lab.module, lab.train, lab.budget, lab.bench,
lab.track) and readers (lab.report, lab.runner) use the constants below, never string literals,
and the README's "Tracking" table is generated from `ENTRIES` (`python -m lab.record` prints it;
tests/test_architecture.py checks the README matches).

Names with a `{...}` placeholder are families; the functions next to them fill them in.
Metrics use the global optimizer step as their step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional

Kind = Literal["metric", "tag", "param", "artifact"]


@dataclass(frozen=True)
class Entry:
    """One name of the record: what kind it is, when it is written and what it holds."""

    kind: Kind
    name: str
    doc: str


ENTRIES: list[Entry] = []


def _add(kind: Kind, name: str, doc: str) -> str:
    ENTRIES.append(Entry(kind, name, doc))
    return name


# --------------------------------------------------------------------------- metrics
# during training (lab.module.MlflowMetrics)
TRAIN_LOSS = _add("metric", "train/loss", "training loss, every `train.log_every` steps")
LR = _add("metric", "lr", "learning rate, with train/loss")
VAL_TOP1 = _add("metric", "val/top1", "validation top-1 (%), at every evaluation")
VAL_TOP5 = _add("metric", "val/top5", "validation top-5 (%), at every evaluation")
VAL_LOSS = _add("metric", "val/loss", "validation loss, at every evaluation")
EPOCH = _add("metric", "epoch", "images seen / training-set size, at every evaluation")
IMAGES_SEEN = _add("metric", "images_seen", "training images seen so far, at every evaluation")
TRAIN_SECONDS = _add("metric", "train_seconds", "timed training seconds so far, at every evaluation")
# at step 0 of a new run (lab.train)
PARAMS = _add("metric", "params", "parameter count (also at the end)")
MACS = _add("metric", "macs", "multiply-accumulates per image (also at the end)")
BUDGET_PLANNED_STEPS = _add("metric", "budget/planned_steps", "optimizer steps the budget plan allows")
BUDGET_PLANNED_SECONDS = _add("metric", "budget/planned_seconds", "a seconds budget: the training seconds planned")
BUDGET_CALIBRATION = _add(
    "metric",
    "budget/calibration_{key}",
    "a seconds budget's calibration: step_seconds, images_per_s, spread, timed_steps, relative, seconds_spent",
)
# at the last step (lab.train; budget/* from lab.budget.usage)
FINAL_VAL_TOP1 = _add("metric", "final/val_top1", "top-1 (%) of the final evaluation")
FINAL_VAL_TOP5 = _add("metric", "final/val_top5", "top-5 (%) of the final evaluation")
FINAL_VAL_LOSS = _add("metric", "final/val_loss", "loss of the final evaluation")
BEST_VAL_TOP1 = _add("metric", "best/val_top1", "best validation top-1 (%) of the run")
BUDGET_STEPS = _add("metric", "budget/steps", "optimizer steps taken")
BUDGET_IMAGES_SEEN = _add("metric", "budget/images_seen", "training images seen")
BUDGET_TRAIN_SECONDS = _add("metric", "budget/train_seconds", "timed training seconds")
BUDGET_TRAIN_FLOPS = _add("metric", "budget/train_flops", "training FLOPs (6 x MACs x images)")
BUDGET_PEAK_MEM_MB = _add("metric", "budget/peak_mem_mb", "peak accelerator memory (MB; CPU: none)")
# `lab bench --log` (lab.bench.log_bench), step 0
BENCH_IMGS_PER_S = _add(
    "metric", "bench/{device}_imgs_per_s", "median inference images/s (device cpu or cuda); also _min, _max"
)
BENCH_TIMM_IMGS_PER_S = _add("metric", "bench/{device}_timm_imgs_per_s", "timm's model, with --compare timm")
BENCH_RATIO_VS_TIMM = _add("metric", "bench/{device}_ratio_vs_timm", "our median / timm's median")
# after training (lab.inspection, tracking.inspect), at the last step
INSPECT_SMOOTHNESS = _add("metric", "inspect/filter_smoothness", "first-layer filters: mean low-frequency energy share")
INSPECT_SMOOTHNESS_MEDIAN = _add("metric", "inspect/filter_smoothness_median", "the median over the filters")
INSPECT_DISTANCE = _add(
    "metric",
    "inspect/attn_distance",
    "mean attention distance (pixels) over layers and heads; also /layerNN and /layerNN/headMM",
)
# on the parent run (lab.run_calibration)
CALIBRATION_SECONDS_SPENT = _add(
    "metric", "calibration/seconds_spent", "parent: wall time of calibrating the variants together"
)

TRAIN_METRICS = (TRAIN_LOSS, LR)
EVAL_METRICS = (VAL_TOP1, VAL_TOP5, VAL_LOSS, EPOCH, IMAGES_SEEN, TRAIN_SECONDS)
FINAL_METRICS = (
    FINAL_VAL_TOP1,
    FINAL_VAL_TOP5,
    FINAL_VAL_LOSS,
    BEST_VAL_TOP1,
    BUDGET_STEPS,
    BUDGET_IMAGES_SEEN,
    BUDGET_TRAIN_SECONDS,
    BUDGET_TRAIN_FLOPS,
    BUDGET_PEAK_MEM_MB,
    PARAMS,
    MACS,
)


def init_tag(field: str) -> str:
    return INIT.format(field=field)


def threads_tag(field: str = "") -> str:
    """lab.threads, or lab.threads.<field>."""
    return f"{THREADS}.{field}" if field else THREADS


def calibration_metric(key: str) -> str:
    return BUDGET_CALIBRATION.format(key=key)


def bench_metric(device: str, suffix: str = "") -> str:
    """bench/{device}_imgs_per_s plus an optional suffix ('_min', '_max')."""
    return BENCH_IMGS_PER_S.format(device=device) + suffix


def bench_timm_metric(device: str) -> str:
    return BENCH_TIMM_IMGS_PER_S.format(device=device)


def bench_ratio_metric(device: str) -> str:
    return BENCH_RATIO_VS_TIMM.format(device=device)


# --------------------------------------------------------------------------- tags
# parent and child runs (lab.track)
PARENT_RUN_ID = _add("tag", "mlflow.parentRunId", "child runs: the parent run of the `lab run` invocation")
ROLE = _add("tag", "lab.role", "`parent` (one per `lab run`) or `variant` (one per variant)")
EXPERIMENT = _add("tag", "lab.experiment", "the experiment (spec) name")
GIT_COMMIT = _add("tag", "lab.git_commit", "the code's git commit")
VARIANTS = _add("tag", "lab.variants", "parent: the variant keys, comma-separated, in training order")
LAUNCHER = _add("tag", "lab.launcher", "local, ray or slurm")
# child runs only
VARIANT = _add("tag", "lab.variant", "the variant key")
HASH = _add("tag", "lab.hash", "content hash of the resolved variant (skip/resume identity)")
DEVICE = _add("tag", "lab.device", "`cpu` or `cuda:<GPU name>`")
CHANGES = _add("tag", "lab.changes", "what differs from the baseline, e.g. model.position=attention_bias")
BASELINE = _add("tag", "lab.baseline", "`true` on the experiment's baseline variant")
BUDGET = _add("tag", "lab.budget", "the budget kind: steps, epochs, images, train_flops or seconds")
SEED = _add("tag", "lab.seed", "train.seed of this run: one repeat of the variant (spec `seeds:`)")
CONFIG_HASH = _add("tag", "lab.config_hash", "content hash without train.seed: the same for every seed of a variant")
SMOKE = _add("tag", "lab.smoke", "`true` on `lab run --smoke` runs (and their parent): tables and plots leave them out")
REF = _add("tag", "ref.{field}", "the spec's paper reference figures (top1, params_m, macs_m, throughput_cpu, ...)")
ERROR = _add("tag", "lab.error", "a failed run's error, one line (traceback in error.txt)")
PRECISION = _add("tag", "lab.precision", "Lightning precision used")
WORLD_SIZE = _add("tag", "lab.world_size", "training processes (devices x nodes)")
BUDGET_PLAN = _add("tag", "lab.budget_plan", "the budget plan, in words")
TRAIN_SIZE = _add("tag", "lab.train_size", "training images")
VAL_SIZE = _add("tag", "lab.val_size", "validation images")
STEPS_PER_EPOCH = _add("tag", "lab.steps_per_epoch", "optimizer steps per epoch")
RESUMED = _add("tag", "lab.resumed", "how many times the run was resumed")
RESUMED_BY = _add("tag", "lab.resumed_by", "the parent run that resumed it last")
RESUMED_FROM = _add("tag", "lab.resumed_from", "the checkpoint file the last resume started from")
REQUEUED = _add("tag", "lab.requeued", "how many times SLURM requeued the job (preemption, time limit)")
CHECKPOINT_RECOVERY = _add(
    "tag", "lab.checkpoint_recovery", "unreadable checkpoints moved aside, and which one was used instead"
)
LEASE_OWNER = _add("tag", "lab.lease.owner", "the process that holds a RUNNING run (host, pid, start) (lab.lease)")
LEASE_HEARTBEAT = _add("tag", "lab.lease.heartbeat", "the owner's last heartbeat (epoch seconds); stale when old")
LEASE_TAKEN_FROM = _add("tag", "lab.lease.taken_from", "the dead owner a resumed run was taken over from")
DATA_SKIPPED_FILES = _add("tag", "lab.data.skipped_files", "unreadable images left out (data.skip_bad_files)")
WORKER_HOST = _add("tag", "lab.worker.host", "host that trained the variant")
WORKER_PID = _add("tag", "lab.worker.pid", "process that trained the variant")
WORKER_STARTED = _add("tag", "lab.worker.started", "when the worker started (epoch seconds)")
RESOLVED_HASH = _add("tag", "lab.resolved_hash", "hash after runtime matching resized the model")
THREADS = _add(
    "tag",
    "lab.threads",
    "CPU threads used (parent: the invocation's policy); also lab.threads.source, .reason, .wait_policy, .cpus, .load",
)
CALIBRATION = _add("tag", "lab.calibration", "how a seconds budget was calibrated (together, alone, scaled)")
CALIBRATION_REFERENCE = _add("tag", "lab.calibration.reference", "parent: the calibration's reference variant")
CALIBRATION_HOW = _add("tag", "lab.calibration.how", "parent: how the variants were calibrated")
BENCH_ERROR = _add("tag", "lab.bench_error", "why the inference throughput after training is missing")
INSPECT_ERROR = _add("tag", "lab.inspect_error", "why the inspection after training is missing")
INIT = _add(
    "tag", "lab.init.{field}", "a run started from weights (model.init): source, loaded, resized, random, skipped"
)
MATCH = _add(
    "tag",
    "match.{field}",
    "runtime matching (spec `match:`): throughput_of, vary, value, device, target_imgs_per_s, imgs_per_s, miss_pct",
)
BENCH_TAG = _add(
    "tag",
    "bench.{device}.{field}",
    "`lab bench --log` conditions: dtype, batch, threads, torch, device_name, compiled, ... timm_model",
)

ROLE_PARENT = "parent"
ROLE_VARIANT = "variant"


def ref_tag(field: str) -> str:
    return REF.format(field=field)


def match_tag(field: str) -> str:
    return MATCH.format(field=field)


def bench_tag(device: str, field: str) -> str:
    return BENCH_TAG.format(device=device, field=field)


# --------------------------------------------------------------------------- params and artifacts
PARAM_EXPERIMENT = _add("param", "experiment", "the spec's name")
PARAM_KEY = _add("param", "key", "the variant key")
SPEC_PARAMS = _add(
    "param", "<section>.<field>", "the flattened resolved spec (data.*, model.*, train.*, budget.*, ...; lists as JSON)"
)
SPEC_YAML = _add("artifact", "spec.yaml", "the resolved variant spec")
ERROR_TXT = _add("artifact", "error.txt", "a failed run's traceback")
INIT_REPORT = _add("artifact", "init_report.json", "model.init: the full lists of loaded, resized and skipped keys")
CALIBRATION_FILE = _add("artifact", "calibration.json", "parent: the calibration of the variants (lab.calibration)")
INSPECTION_FILE = _add(
    "artifact",
    "inspect/inspection.json",
    "the inspection's figures as data; figures inspect/filters, attention_bias, attention_distance (.png, .svg)",
)
FINAL_CHECKPOINT = _add(
    "artifact", "checkpoint/final.pt", "final weights and model config (when tracking.log_checkpoint)"
)
CHECKPOINT_ARTIFACT_DIR = "checkpoint"


# --------------------------------------------------------------------------- a variant's result

Status = Literal["finished", "skipped", "busy", "failed", "killed"]
STATUSES: tuple[str, ...] = ("finished", "skipped", "busy", "failed", "killed")
# skipped: FINISHED before with the same hash; busy: another live `lab run` holds it (lab.lease)
NOT_TRAINED = ("skipped", "busy")
OK_STATUSES = ("finished", *NOT_TRAINED)
WITH_RESULTS = ("finished", "skipped")  # a result to report (a busy variant's is still coming)


@dataclass
class VariantResult:
    """What `lab run` reports for one variant (one line of its summary). `status` None: not yet run."""

    key: str
    hash: str
    budget: str  # the budget kind, then the plan in words once planned
    uid: str = ""  # the key, plus -seedN when the variant repeats with several seeds
    seed: Optional[int] = None
    run_id: Optional[str] = None
    status: Optional[str] = None  # one of STATUSES
    params: Optional[float] = None
    macs: Optional[float] = None
    steps: Optional[float] = None
    top1: Optional[float] = None
    best_top1: Optional[float] = None
    train_seconds: Optional[float] = None
    images_seen: Optional[float] = None
    wall_seconds: Optional[float] = None
    error: Optional[str] = None
    resumed: bool = False
    worker_exit_code: Optional[int] = None
    budget_kind: Optional[str] = None  # steps | epochs | images | train_flops | seconds
    planned_seconds: Optional[float] = None  # a seconds budget
    calibrated_step_seconds: Optional[float] = None
    imgs_per_s: Optional[float] = None  # inference throughput after training (bench.after_train)

    @classmethod
    def new(cls, variant: Any) -> VariantResult:
        b = variant.budget
        return cls(
            key=variant.key,
            hash=variant.hash,
            budget=b.kind,
            budget_kind=b.kind,
            uid=getattr(variant, "uid", variant.key),
            seed=getattr(variant, "seed", None),
            planned_seconds=float(b.seconds) if b.kind == "seconds" else None,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def update(self, **changes: Any) -> VariantResult:
        """Set fields in place (unknown names are an error); returns self."""
        for k, v in changes.items():
            if not hasattr(self, k):
                raise AttributeError(f"VariantResult has no field {k!r}")
            setattr(self, k, v)
        return self

    @property
    def ok(self) -> bool:
        """Nothing went wrong: trained, skipped, or left to the process that holds it."""
        return self.status in OK_STATUSES

    @property
    def has_result(self) -> bool:
        """Trained now or before (finished, skipped): its figures are this run's to report."""
        return self.status in WITH_RESULTS

    def line(self) -> str:
        """The one-line summary `lab run` prints per variant."""

        def num(x: Any, scale: float, fmt: str) -> str:
            return format(x / scale, fmt) if isinstance(x, (int, float)) else "-"

        top1 = f"{self.top1:.2f}%" if isinstance(self.top1, (int, float)) else "-"
        secs = f"{self.train_seconds:.1f}s" if isinstance(self.train_seconds, (int, float)) else "-"
        line = (
            f"{self.uid or self.key:<22} params {num(self.params, 1e6, '.2f')}M  MACs {num(self.macs, 1e6, '.1f')}M  "
            f"{self.budget:<24} {self.status or '-':<8} top-1 {top1:>7}  train {secs:>7}"
        )
        if isinstance(self.imgs_per_s, (int, float)):
            line += f"  {self.imgs_per_s:.0f} img/s"
        if self.error:
            line += f"  error: {self.error}"
        return line


# --------------------------------------------------------------------------- documentation


def documented(kind: Kind, name: str) -> bool:
    """Whether `name` (a metric, tag, param or artifact a run holds) is in the record: an entry of
    that kind, a `{...}` family filled in, or a documented sub-name of one (`NAME/...`, `NAME.x`,
    `NAME_min`, as the entries' docs describe)."""
    import re

    for e in ENTRIES:
        if e.kind != kind:
            continue
        pattern = re.escape(e.name)
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", pattern).replace(re.escape("<section>.<field>"), r"\w+\.\S+")
        if re.fullmatch(pattern + r"(?:[/._][\w./-]+)?", name):
            return True
    return False


README_BEGIN = "<!-- record:begin (generated by `python -m lab.record`; do not edit) -->"
README_END = "<!-- record:end -->"


def markdown() -> str:
    """The record as a Markdown table (the README's Tracking section embeds it)."""
    lines = [README_BEGIN, "", "| kind | name | what |", "|---|---|---|"]
    for e in ENTRIES:
        lines.append(f"| {e.kind} | `{e.name}` | {e.doc.replace('|', '/')} |")
    lines += ["", README_END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
