"""Calibrate every variant of a `lab run` together before any trains (seconds budgets).

`calibrate_together` measures the step cost of each variant that will train fresh in this
invocation with a calibrated `seconds` budget, interleaved (lab.calibration, the statistics),
fills `Context.calibration` (variant key -> planned steps and cost; lab.train.plan_budget reads it)
and keeps the calibration on the parent run (`calibration.json`, see lab.record). A variant added
later is measured beside a stored calibration's reference variant and scaled to it. Called by
lab.runner.run_experiment; a distributed or remote variant calibrates alone where it trains.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Optional

from lab import lease, track
from lab import record as R
from lab.execute import Context, preflight
from lab.train import build_variant, data_key, thread_choice, world_size


def cost_group(v) -> str:
    """Variants that differ only in train.seed cost the same per step: they share one measurement."""
    train = v.train.model_dump(mode="json")
    train.pop("seed", None)
    doc = {
        "model": v.model,
        "data": v.data.model_dump(mode="json"),
        "train": train,
        "match": v.match.model_dump(mode="json") if v.match is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def will_train_fresh(v, ctx: Context) -> bool:
    """Neither skipped (FINISHED with this hash, or being trained by another live process) nor resumed
    from a checkpoint (which keeps its plan)."""
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

    return (
        v.budget.kind == "seconds"
        and not v.budget.wall_clock
        and ctx.launcher == "local"
        and world_size(v.train, resolve_accelerator(v.train)) == 1
    )


def stored_calibration(ctx: Context, exclude: set, threads: int):
    """The latest calibration kept on an earlier parent run whose reference variant still exists
    with the same hash, has a FINISHED run and is not retrained now; (calibration, parent id,
    reference variant) or (None, None, None)."""
    from lab import calibration as C
    from lab.spec import Variant

    try:
        parents = track.find_parent_runs(ctx.cl, ctx.experiment_id, max_results=20)
    except Exception:  # noqa: BLE001
        return None, None, None
    for r in parents:
        if r.info.run_id == ctx.parent_run_id or r.data.tags.get(R.CALIBRATION_REFERENCE) is None:
            continue
        try:
            cal = C.Calibration.from_json(
                track.download_artifact(ctx.cl, r.info.run_id, R.CALIBRATION_FILE).read_text()
            )
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

    todo = calibration_todo(ordered, ctx)
    if not todo:
        return
    groups = by_cost(todo)
    reps = [vs[0] for vs in groups.values()]
    threads = thread_choice(reps[0], ctx).threads
    stored, stored_id, ref_variant = stored_calibration(ctx, {v.key for v in todo}, threads)
    measured = ([ref_variant] if stored is not None else []) + reps
    if stored is not None:
        reference = ref_variant.key
    else:
        reference = ctx.baseline if any(v.key == ctx.baseline for v in reps) else reps[0].key
    source = f"; reference '{reference}' from parent run {stored_id}" if stored is not None else ""
    cal, names = measure(measured, reference, source, ctx)
    if cal is None:
        return
    todo = [v for v in todo if groups[cost_group(v)][0].key in names]
    if not todo:
        return
    note_context(cal, measured, reference, threads, ctx)
    if stored is not None:
        cal = rescale_to_stored(cal, stored, stored_id, threads, ctx)
    how = how_calibrated(reference, names, stored, stored_id)
    plan_steps(todo, groups, cal, how, ctx)
    rel = ", ".join(
        f"{k} {c.step_seconds * 1000:.0f} ms ({c.relative:.2f}x)" for k, c in cal.costs.items() if k in names
    )
    ctx.say(
        f"calibrated in {cal.seconds_spent:.1f}s: {rel}; steps: "
        + ", ".join(f"{v.key} {ctx.calibration[v.key]['steps']}" for v in todo)
    )
    if ctx.rank_zero:
        keep_on_parent(cal, reference, how, ctx)
    pl.seed_everything(todo[0].train.seed, workers=True, verbose=False)


def calibration_todo(ordered: list, ctx: Context) -> list:
    """The variants measured together (calibrated together and training fresh), with `match:`
    resolved (once per variant key, kept in `ctx.resolved`)."""
    todo = [v for v in ordered if calibrated_together(v, ctx) and will_train_fresh(v, ctx)]
    for i, v in enumerate(todo):
        if v.match is not None and v.key not in ctx.resolved:
            from lab.match import resolve_match

            ctx.resolved[v.key] = resolve_match(v, ctx.variants)
        todo[i] = ctx.resolved.get(v.key, v)
    return todo


def by_cost(variants: list) -> dict[str, list]:
    """The variants by `cost_group`, in order; the first of each group is measured for all."""
    groups: dict[str, list] = {}
    for v in variants:
        groups.setdefault(cost_group(v), []).append(v)
    return groups


class GuardedSteps:
    """A variant's step runner that names itself in `failing` while its steps run, so that a failure
    of the interleaved measurement is put on the variant that raised it."""

    def __init__(self, key: str, run: Any, failing: list[str]):
        self.key = key
        self.run = run
        self.failing = failing

    def __call__(self, n: int):
        self.failing.append(self.key)
        out = self.run(n)
        self.failing.pop()
        return out


def build_runners(measured: list, ctx: Context, failing: list[str]) -> dict[str, Any]:
    """A guarded step runner (lab.budget.LightningSteps on a copy of the model) per variant; a
    variant that cannot be built is left out, with a warning (it calibrates alone)."""
    from lab import budget as B

    runners: dict[str, Any] = {}
    for v in measured:
        try:
            if data_key(v) not in ctx.datamodules:
                preflight([v], ctx.datamodules)
            b = build_variant(v, ctx, calibrating=True)
            runners[v.key] = GuardedSteps(
                v.key,
                B.LightningSteps(b.make_module(copy.deepcopy(b.model)), b.dm, b.trainer_kw, threads=b.threads.threads),
                failing,
            )
        except Exception as e:  # noqa: BLE001 - that variant fails where it trains; the others go on
            ctx.say(f"warning: calibration: cannot build '{v.key}' ({track.short_error(e)}); it calibrates alone")
    return runners


def measure(measured: list, reference: str, source: str, ctx: Context) -> tuple[Any, list[str]]:
    """The interleaved calibration of the variants that could be built, and their keys; a variant
    that fails is dropped (it calibrates alone) and the others measured again. (None, keys) when
    the reference cannot be measured. `source` ends the announcement (where the reference comes from)."""
    from lab import budget as B
    from lab import calibration as C

    failing: list[str] = []
    runners = build_runners(measured, ctx, failing)
    steps = max(v.budget.calibration_steps for v in measured)
    cal = None
    while runners and reference in runners:
        ctx.say(f"calibrating {', '.join(runners)} together ({steps} timed steps each, interleaved{source})")
        try:
            cal = C.interleaved(
                runners,
                steps=steps,
                warmup=B.CALIBRATION_WARMUP,
                rewarm=1,
                reference=reference,
                progress=ctx.say if ctx.progress else None,
            )
            break
        except Exception as e:  # noqa: BLE001
            bad = failing[-1] if failing else reference
            failing.clear()
            ctx.say(f"warning: calibration: '{bad}' failed ({track.short_error(e)}); it calibrates alone")
            runners.pop(bad, None)
    return cal, list(runners)


def note_context(cal, measured: list, reference: str, threads: int, ctx: Context) -> None:
    """What the calibration was measured under, kept with it (`stored_calibration` reads it back)."""
    cal.context = {
        "threads": threads,
        "hashes": {v.key: v.hash for v in measured},
        "reference_variant": next(v for v in measured if v.key == reference).model_dump(mode="json"),
        "device": track.device_name(),
        "parent_run_id": ctx.parent_run_id,
    }


def rescale_to_stored(cal, stored, stored_id: str, threads: int, ctx: Context):
    """A calibration measured beside a stored one's reference, scaled to it (lab.calibration.rescale),
    knowing the hashes of both and keeping the stored reference variant."""
    from lab import calibration as C

    hashes = {**stored.context.get("hashes", {}), **cal.context["hashes"]}
    cal = C.rescale(cal, stored, stored_id)
    cal.context.update(
        threads=threads,
        hashes=hashes,
        parent_run_id=ctx.parent_run_id,
        reference_variant=stored.context.get("reference_variant"),
    )
    return cal


def how_calibrated(reference: str, names: list[str], stored, stored_id: Optional[str]) -> str:
    """How the variants were calibrated, in words (said, and tagged on each run)."""
    if stored is not None:
        return (
            f"beside reference '{reference}', scaled to its cost in parent run {stored_id} "
            f"({stored.costs[reference].step_seconds:.3f} s/step then)"
        )
    return f"together with {', '.join(names)}, interleaved (reference '{reference}')"


def plan_steps(todo: list, groups: dict[str, list], cal, how: str, ctx: Context) -> None:
    """Each variant's planned steps and cost (its cost group's) into `ctx.calibration`."""
    for v in todo:
        rep = groups[cost_group(v)][0]
        c = cal.costs[rep.key]
        ctx.calibration[v.key] = {
            "steps": c.steps_for(float(v.budget.seconds)),
            "step_seconds": c.step_seconds,
            "relative": c.relative,
            "spread": c.spread,
            "timed_steps": len(c.samples),
            "how": how,
        }


def keep_on_parent(cal, reference: str, how: str, ctx: Context) -> None:
    """The calibration on the parent run: calibration.json, its reference and how, the seconds it took."""
    track.log_text(ctx.cl, ctx.parent_run_id, cal.to_json(), R.CALIBRATION_FILE)
    track.set_tags(ctx.cl, ctx.parent_run_id, {R.CALIBRATION_REFERENCE: reference, R.CALIBRATION_HOW: how})
    track.log_metrics(ctx.cl, ctx.parent_run_id, {R.CALIBRATION_SECONDS_SPENT: cal.seconds_spent}, 0)
