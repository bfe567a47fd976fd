"""Matched runtime budgets: the training-step cost of every variant, measured together.

A `seconds` budget gives each variant `round(seconds / step_seconds)` optimizer steps. If each
variant were timed on its own, just before it trains, whatever load the machine had in those
few seconds would become that variant's budget. Here every variant of an invocation is timed
before any of them trains, **interleaved in rounds** whose order alternates (A B C, C B A,
A B C, ...), so a change of load hits all variants alike:

  1. warm-up: `warmup` untimed steps of each variant (allocator, thread pools, caches);
  2. `rounds` rounds; in each, every variant runs `rewarm` untimed steps (its caches were just
     used by another variant) and then `per_round` timed steps;
  3. per round, each variant's median step time is divided by the reference variant's
     (normally the experiment's baseline) in the same round; a variant's **relative cost** is
     the median of these ratios over the rounds, and its **step cost** is that ratio times the
     reference's median step time over all its timed steps. Medians, not means: a shared
     machine adds the odd multi-second hiccup. The spread (interquartile range / median of its
     steps) and a 10% trimmed mean are kept for the record.

A calibration is kept on the parent MLflow run (`calibration.json`, see lab/runner.py), so a
variant added to the experiment later is calibrated against the same reference: the reference
is measured again beside the newcomer, interleaved, and the newcomer's relative cost is
applied to the stored reference cost (`rescale`).

Everything here is pure: a variant is a *runner*, `runner(n)` runs n training steps and
returns their durations in seconds (`timed_steps` makes one from a one-step function and a
clock), so tests drive it with a fake clock.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

VERSION = 1

Runner = Callable[[int], Sequence[float]]  # run n steps -> n step durations (seconds)


def timed_steps(step: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> Runner:
    """A runner from a function that runs ONE training step: each call is timed with `clock`."""

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = clock()
            step()
            out.append(clock() - t0)
        return out

    return run


def trimmed_mean(xs: Sequence[float], cut: float = 0.1) -> float:
    """Mean of `xs` without the lowest and highest `cut` share (scipy.stats.trim_mean)."""
    from scipy.stats import trim_mean

    return float(trim_mean(list(xs), cut))


def relative_spread(xs: Sequence[float]) -> float:
    """Interquartile range / median (0 for fewer than 2 values)."""
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    med = statistics.median(xs)
    return (q[2] - q[0]) / med if med > 0 else math.inf


@dataclass
class VariantCost:
    key: str
    step_seconds: float  # the cost steps are planned with (reference-scaled)
    relative: float  # step_seconds / the reference's step_seconds
    median: float  # median of this variant's own timed steps
    trimmed_mean: float
    spread: float  # IQR / median of its timed steps
    samples: list[float] = field(default_factory=list)  # timed step durations, in measuring order
    round_medians: list[float] = field(default_factory=list)
    scaled_from: Optional[str] = None  # id of the stored calibration it was scaled to (newcomers)

    def steps_for(self, seconds: float) -> int:
        return max(1, round(seconds / self.step_seconds))


@dataclass
class Calibration:
    reference: str
    costs: dict[str, VariantCost]
    order: list[str]  # every (variant) measuring turn, warm-up first
    warmup: int
    rewarm: int
    rounds: int
    per_round: int
    seconds_spent: float = 0.0
    context: dict[str, Any] = field(default_factory=dict)  # threads, device, hashes, budget, ...
    version: int = VERSION

    def steps(self, key: str, seconds: float) -> int:
        return self.costs[key].steps_for(seconds)

    def relative(self) -> dict[str, float]:
        return {k: c.relative for k, c in self.costs.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        d = json.loads(text)
        if d.get("version") != VERSION:
            raise ValueError(f"calibration version {d.get('version')} (this lab reads {VERSION})")
        d["costs"] = {k: VariantCost(**c) for k, c in d["costs"].items()}
        return cls(**d)


def schedule(keys: Sequence[str], rounds: int) -> list[list[str]]:
    """The measuring order of each round: keys, reversed keys, keys, ..."""
    keys = list(keys)
    return [keys if r % 2 == 0 else keys[::-1] for r in range(rounds)]


def split_steps(steps: int, n_variants: int, rounds: Optional[int] = None) -> tuple[int, int]:
    """(rounds, timed steps per round) for about `steps` timed steps per variant.

    Alone, a variant needs no interleaving: one round. Together: up to 4 rounds with at least 3
    timed steps in each (a round's median resists one hiccup), so that a load change lands in
    more than one round.
    """
    steps = max(1, int(steps))
    if rounds is None:
        rounds = 1 if n_variants <= 1 else max(1, min(4, steps // 3))
    return rounds, max(1, math.ceil(steps / rounds))


def interleaved(
    runners: Mapping[str, Runner],
    *,
    steps: int = 20,
    rounds: Optional[int] = None,
    warmup: int = 5,
    rewarm: int = 1,
    reference: Optional[str] = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: Optional[Callable[[str], None]] = None,
) -> Calibration:
    """Time every runner in alternating rounds (see the module docstring); a Calibration.

    `steps`: about this many timed steps per variant in all; `reference`: the variant the
    others are relative to (default: the first).
    """
    keys = list(runners)
    reference = _pick_reference(keys, reference)
    rounds, per_round = split_steps(steps, len(keys), rounds)
    t0 = clock()
    order = _warm_up(runners, keys, warmup)
    samples, per = _timed_rounds(runners, keys, rounds, rewarm, per_round, order, progress)
    costs = _costs(keys, reference, samples, per)
    return Calibration(
        reference=reference,
        costs=costs,
        order=order,
        warmup=warmup,
        rewarm=rewarm,
        rounds=rounds,
        per_round=per_round,
        seconds_spent=clock() - t0,
    )


def _pick_reference(keys: list[str], reference: Optional[str]) -> str:
    """`reference`, which must be among `keys`, else the first key."""
    if not keys:
        raise ValueError("nothing to calibrate")
    reference = reference if reference is not None else keys[0]
    if reference not in keys:
        raise ValueError(f"reference '{reference}' is not among the calibrated variants {keys}")
    return reference


def _warm_up(runners: Mapping[str, Runner], keys: list[str], warmup: int) -> list[str]:
    """`warmup` untimed steps of each variant in turn; the measuring order so far."""
    order: list[str] = []
    for k in keys:
        if warmup > 0:
            runners[k](warmup)
        order.append(k)
    return order


def _timed_rounds(
    runners: Mapping[str, Runner],
    keys: list[str],
    rounds: int,
    rewarm: int,
    per_round: int,
    order: list[str],
    progress: Optional[Callable[[str], None]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """The rounds of `schedule`, each turn appended to `order`; (every variant's timed steps,
    its median step of each round)."""
    samples: dict[str, list[float]] = {k: [] for k in keys}
    per: dict[str, list[float]] = {k: [] for k in keys}
    for r, turn in enumerate(schedule(keys, rounds)):
        for k in turn:
            got = _timed_turn(runners[k], k, rewarm, per_round)
            samples[k].extend(got)
            per[k].append(statistics.median(got))
            order.append(k)
        if progress:
            progress(
                f"calibration round {r + 1}/{rounds}: " + ", ".join(f"{k} {per[k][-1] * 1000:.0f} ms" for k in keys)
            )
    return samples, per


def _timed_turn(runner: Runner, key: str, rewarm: int, per_round: int) -> list[float]:
    """One variant's turn in a round: `rewarm` untimed steps, then the durations of `per_round` timed ones."""
    got = list(runner(rewarm + per_round))[rewarm:]
    if not got:
        raise RuntimeError(f"calibration of '{key}' timed no step")
    return got


def _costs(
    keys: list[str], reference: str, samples: dict[str, list[float]], per: dict[str, list[float]]
) -> dict[str, VariantCost]:
    """Each variant's cost: the median of its per-round ratios to the reference, times the
    reference's median step."""
    ref_cost = statistics.median(samples[reference])
    costs = {}
    for k in keys:
        ratios = [a / b for a, b in zip(per[k], per[reference])]
        rel = 1.0 if k == reference else statistics.median(ratios)
        costs[k] = VariantCost(
            key=k,
            step_seconds=rel * ref_cost,
            relative=rel,
            median=statistics.median(samples[k]),
            trimmed_mean=trimmed_mean(samples[k]),
            spread=relative_spread(samples[k]),
            samples=samples[k],
            round_medians=per[k],
        )
    return costs


def rescale(fresh: Calibration, stored: Calibration, stored_id: str = "") -> Calibration:
    """Newcomers of `fresh` (measured beside `stored`'s reference, which `fresh` also has as its
    reference) get the stored reference's cost times their fresh relative cost; the stored
    variants keep their entries. The result has `stored`'s reference and cost scale."""
    ref = stored.reference
    if fresh.reference != ref or ref not in stored.costs:
        raise ValueError(f"rescale needs the stored reference '{ref}' as the fresh calibration's reference")
    base = stored.costs[ref].step_seconds
    costs = dict(stored.costs)
    for k, c in fresh.costs.items():
        if k == ref:
            continue
        costs[k] = VariantCost(**{**asdict(c), "step_seconds": c.relative * base, "scaled_from": stored_id or "stored"})
    ctx = dict(stored.context)
    ctx["rescaled"] = {
        "reference_then_s": base,
        "reference_now_s": fresh.costs[ref].step_seconds,
        "newcomers": [k for k in fresh.costs if k != ref],
        "from": stored_id,
    }
    return Calibration(
        reference=ref,
        costs=costs,
        order=fresh.order,
        warmup=fresh.warmup,
        rewarm=fresh.rewarm,
        rounds=fresh.rounds,
        per_round=fresh.per_round,
        seconds_spent=fresh.seconds_spent,
        context=ctx,
    )


__all__ = [
    "Calibration",
    "Runner",
    "VariantCost",
    "interleaved",
    "relative_spread",
    "rescale",
    "schedule",
    "split_steps",
    "timed_steps",
    "trimmed_mean",
]
