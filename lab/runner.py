"""`lab run`'s domain API: train every variant of an experiment under its shared budget and
record it in MLflow (the command line is lab.cli.run).

Per invocation: a data pre-flight (a bad data root or a missing teacher checkpoint is a
LabError -> exit 2 before anything trains), one MLflow parent run, then one child run per
variant, teachers first. Before any trains, the CPU thread policy is decided once (lab.threads)
and variants with a seconds budget are calibrated together (lab.run_calibration). Each variant
is skipped, resumed or trained by lab.execute
(`prepare_variant` in this driver, `execute_variant` in the worker; lab.train does the
training); a failure in one variant never loses the others' results; Ctrl-C marks the current
run (and the parent) KILLED and re-raises.

Where variants run (`launcher`, see lab/launch.py): `local` trains them one after the other
(in this process, or in a subprocess of its own when a variant is distributed), `ray` and
`slurm` submit one task/job per variant. Each variant's outcome is a lab.record.VariantResult.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from lab import launch, lease, signals, track
from lab import record as R
from lab.errors import LabError
from lab.execute import Context, end_stale, preflight, quiet_logs
from lab.record import VariantResult
from lab.run_calibration import calibrate_together
from lab.train import runs_by_key, teacher_of
from lab.weights import init_dependency

LAUNCHERS = launch.LAUNCHERS


def order_variants(variants: list) -> list:
    """Teachers (train.distill.variant) before their students; otherwise the spec order
    (all seeds of a variant together)."""
    by_key = runs_by_key(variants)
    out, seen, visiting = [], set(), set()

    def visit(key):
        if key in seen:
            return
        if key in visiting:
            v = by_key[key][0]
            raise LabError(
                f"distillation cycle through variant '{key}'",
                file=v.source,
                path=f"variants.{key}.train.distill.variant",
            )
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
    by_key = runs_by_key(variants)
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


def run_experiment(
    spec,
    variants: list,
    *,
    force: bool = False,
    progress: bool = True,
    callbacks: Optional[Iterable] = None,
    baseline: Optional[str] = None,
    say: Optional[Callable[[str], None]] = None,
    launcher: str = "local",
    launch_options: Any = None,
) -> list[VariantResult]:
    """Train `variants` (teachers first) in one parent run; one VariantResult per variant.

    Status: finished | skipped (already FINISHED with the same hash) | busy (held by another live
    process) | failed | killed. SIGINT / SIGTERM mark the current run and the parent KILLED with the
    reason and re-raise (lab.signals.Interrupted, a KeyboardInterrupt). `callbacks`: extra
    Lightning callbacks added to every training that runs in this process (tests use them to
    interrupt). `launcher`: local | ray | slurm (lab.launch); `launch_options`: a
    lab.launch.LaunchOptions.
    """
    from lab.spec import baseline_key

    say = say or (lambda s: print(s, flush=True))
    quiet_logs()
    if not variants:
        return []
    uri, ordered, backend, datamodules = set_up(variants, launcher, launch_options)
    cl, experiment, exp_id = open_experiment(uri, variants)
    keeper = lease.Keeper(lambda: track.client(uri))
    backend.start()
    try:
        parent = start_parent(cl, exp_id, spec, variants, ordered, launcher)
        keeper.hold(parent)
        ctx = Context(
            spec=spec,
            variants=list(variants),
            uri=uri,
            cl=cl,
            experiment=experiment,
            experiment_id=exp_id,
            parent_run_id=parent,
            baseline=baseline or baseline_key(spec, variants),
            force=force,
            progress=progress,
            callbacks=list(callbacks or []),
            datamodules=datamodules,
            say=say,
            launcher=launcher,
            keeper=keeper,
        )
        announce(ctx, ordered)
        results = run_in_parent(ordered, ctx, backend)
    finally:
        keeper.close()
        backend.close()
    ok = all(r.ok for r in results)
    cl.set_terminated(parent, status="FINISHED" if ok else "FAILED")
    for line in budget_summary(results):
        say(line)
    return results


def set_up(variants: list, launcher: str, launch_options: Any) -> tuple[str, list, Any, dict]:
    """Before anything is recorded: the one tracking store, the training order, the launcher
    (checked) and every dataset built (the data pre-flight); (uri, ordered, launcher, datamodules)."""
    uris = {track.tracking_uri(v) for v in variants}
    if len(uris) > 1:
        raise LabError(f"variants of one run must share a tracking store (got {sorted(uris)})")
    uri = uris.pop()
    ordered = order_variants(variants)
    backend = launch.get_launcher(launcher, launch_options)
    backend.check(ordered)
    datamodules: dict = {}
    preflight(ordered, datamodules)
    return uri, ordered, backend, datamodules


def open_experiment(uri: str, variants: list) -> tuple[Any, str, str]:
    """The store's client and the variants' MLflow experiment (created if new), its dead parent runs
    ended; (client, experiment name, experiment id)."""
    cl = track.client(uri)
    experiment = track.experiment_name(variants[0])
    exp_id = track.get_or_create_experiment(cl, experiment, uri)
    end_stale_parents(cl, exp_id)
    return cl, experiment, exp_id


def start_parent(cl, exp_id: str, spec, variants: list, ordered: list, launcher: str) -> str:
    """The invocation's parent run, claimed by this process; its id."""
    return track.start_parent_run(
        cl,
        exp_id,
        spec.name,
        tags={
            R.VARIANTS: ",".join(dict.fromkeys(v.key for v in ordered))[:5000],
            R.LAUNCHER: launcher,
            **({R.SMOKE: "true"} if any(v.tags.get(R.SMOKE) for v in variants) else {}),
            **lease.claim_tags(),
            **{k: str(x) for k, x in (spec.tags or {}).items()},
        },
    )


def announce(ctx: Context, ordered: list) -> None:
    """Say what runs where: the variants (and runs), the store, the experiment and the parent run."""
    n_keys = len(dict.fromkeys(v.key for v in ordered))
    runs = f"{n_keys} variant(s)" + (f", {len(ordered)} runs (seeds)" if len(ordered) > n_keys else "")
    launcher = ctx.launcher
    ctx.say(
        f"{ctx.spec.name}: {runs}, tracking {ctx.uri} (experiment '{ctx.experiment}', parent run "
        f"{ctx.parent_run_id}{', launcher ' + launcher if launcher != 'local' else ''})"
    )


def run_in_parent(ordered: list, ctx: Context, backend) -> list[VariantResult]:
    """Decide the thread policy, calibrate, and run every variant; an interrupt ends the parent run
    KILLED and any other exception FAILED (both re-raised)."""
    try:
        apply_thread_policy(ordered, ctx)
        calibrate_together(ordered, ctx)
        return backend.run(ordered, ctx)
    except KeyboardInterrupt as e:
        end_interrupted(ctx, e)
        raise
    except BaseException:
        ctx.cl.set_terminated(ctx.parent_run_id, status="FAILED")
        raise


def apply_thread_policy(ordered: list, ctx: Context) -> None:
    """Decide the CPU thread policy once, into `ctx.threads` and the parent run's tags; said when
    a variant has a seconds budget (it depends on it)."""
    policy = thread_policy(ordered)
    ctx.threads = policy.as_dict()
    track.set_tags(ctx.cl, ctx.parent_run_id, policy.tags())
    if any(v.budget.kind == "seconds" for v in ordered):
        ctx.say(
            f"threads: {policy.threads} ({policy.reason}; OpenMP wait policy {policy.wait_policy})"
            + (
                " where train.threads does not say otherwise"
                if policy.source == "policy" and any(v.train.threads for v in ordered)
                else ""
            )
        )


def end_interrupted(ctx: Context, e: KeyboardInterrupt) -> None:
    """SIGINT / SIGTERM / Ctrl-C: the parent run KILLED with the reason (lab.signals), and how to resume."""
    stop = signals.as_interrupted(e)
    reason = stop.reason if stop else "interrupted"
    try:
        track.set_tags(ctx.cl, ctx.parent_run_id, {R.ERROR: reason})
    finally:
        ctx.cl.set_terminated(ctx.parent_run_id, status="KILLED")
    ctx.say(f"{reason}: the current run is KILLED with a checkpoint; run the same command again to resume it")


def end_stale_parents(cl, exp_id: str) -> None:
    """Parent runs still RUNNING whose `lab run` died (SIGKILL, lost node): KILLED, with the reason."""
    try:
        runs = track.find_parent_runs(cl, exp_id, running=True)
    except Exception:  # noqa: BLE001 - a store that cannot search: nothing to tidy
        return
    for r in runs:
        if lease.state(r) == "stale":
            end_stale(cl, r)


def thread_policy(variants: list):
    """The invocation's CPU thread policy (lab.threads), decided once in the driver (the spec's
    train.threads when every variant sets the same)."""
    from lab import threads as T

    given = {v.train.threads for v in variants}
    if len(given) == 1 and None not in given:
        return T.decide(given.pop())
    return T.decide()


def budget_summary(results: list[VariantResult]) -> list[str]:
    """What `lab run` says after training: the budget used and the fidelity warnings (lab.fidelity)."""
    from lab import fidelity as F

    # a run per seed: named with it (KEY-seedN); the re-run advice names the variant key
    rows = [{**r.to_dict(), "variant": r.key, "key": r.uid or r.key} for r in results if r.has_result]
    out = []
    used = F.used_line(rows)
    if used:
        out.append(used)
    out += [f"warning: {w}" for w in F.budget_warnings(rows)]
    return out
