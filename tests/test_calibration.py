"""Interleaved calibration (fake clock), the CPU thread policy (faked inputs), budget fidelity warnings."""

from __future__ import annotations

import statistics

import pytest

from lab import calibration as C
from lab import fidelity as F
from lab import threads as T


class FakeMachine:
    """A clock that only moves when a variant steps: cost x the load at that moment."""

    def __init__(self, cost: dict[str, float], load=lambda t: 1.0):
        self.t = 0.0
        self.cost = cost
        self.load = load
        self.calls: list[tuple[str, int]] = []

    def clock(self) -> float:
        return self.t

    def runner(self, key: str):
        def step():
            self.t += self.cost[key] * self.load(self.t)

        run = C.timed_steps(step, clock=self.clock)

        def counted(n):
            self.calls.append((key, n))
            return run(n)

        return counted


def test_rounds_alternate_order_and_exclude_warmup():
    m = FakeMachine({"a": 0.1, "b": 0.2, "c": 0.4})
    cal = C.interleaved({k: m.runner(k) for k in "abc"}, steps=12, warmup=3, rewarm=1, clock=m.clock)
    assert (cal.rounds, cal.per_round) == (4, 3)
    # warm-up once each (3 steps), then 4 rounds of rewarm 1 + 3 timed, order reversed every other round
    assert m.calls[:3] == [("a", 3), ("b", 3), ("c", 3)]
    assert [k for k, _ in m.calls[3:]] == list("abc" + "cba" + "abc" + "cba")
    assert all(n == 4 for _, n in m.calls[3:])
    assert cal.order == list("abc") + list("abccbaabccba")
    # only timed steps are kept: 4 rounds x 3 steps
    assert all(len(c.samples) == 12 for c in cal.costs.values())
    assert C.split_steps(20, 3) == (4, 5) and C.split_steps(20, 1) == (1, 20) and C.split_steps(4, 2) == (1, 4)
    assert cal.costs["b"].relative == pytest.approx(2.0) and cal.costs["c"].relative == pytest.approx(4.0)
    assert cal.costs["a"].step_seconds == pytest.approx(0.1)
    assert cal.steps("a", 10) == 100 and cal.steps("b", 10) == 50 and cal.steps("c", 10) == 25
    assert cal.seconds_spent == pytest.approx(m.t)


def test_a_load_change_hits_every_variant_alike():
    # the machine gets 3x slower half-way through the calibration: measured alone, one after the
    # other, the later variants would look 3x dearer; interleaved, the ratios stay right
    m = FakeMachine({"a": 0.1, "b": 0.3}, load=lambda t: 1.0 if t < 2.0 else 3.0)
    cal = C.interleaved({"a": m.runner("a"), "b": m.runner("b")}, steps=12, warmup=2, clock=m.clock)
    assert cal.costs["b"].relative == pytest.approx(3.0)
    assert cal.steps("a", 60) / cal.steps("b", 60) == pytest.approx(3.0, rel=0.02)
    # the same load change, measured one variant after the other, gets the ratio wrong
    m2 = FakeMachine({"a": 0.1, "b": 0.3}, load=lambda t: 1.0 if t < 2.0 else 3.0)
    alone = {k: C.interleaved({k: m2.runner(k)}, steps=12, warmup=2, clock=m2.clock).costs[k] for k in "ab"}
    assert alone["b"].step_seconds / alone["a"].step_seconds == pytest.approx(9.0)


def test_statistics_resist_hiccups():
    seq = iter([0.1] * 6 + [0.1, 0.1, 5.0, 0.1, 0.1, 0.1] * 10)
    t = {"now": 0.0}

    def step():
        t["now"] += next(seq)

    cal = C.interleaved({"a": C.timed_steps(step, clock=lambda: t["now"])}, steps=20, warmup=5, clock=lambda: t["now"])
    c = cal.costs["a"]
    assert cal.rounds == 1 and len(c.samples) == 20
    assert c.median == pytest.approx(0.1) and c.step_seconds == pytest.approx(0.1)
    assert statistics.mean(c.samples) > 0.5  # the mean would have been fooled
    assert c.trimmed_mean < statistics.mean(c.samples)
    assert c.spread == pytest.approx(0.0, abs=1e-9)
    assert C.relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)


def test_reference_and_rescaling_a_newcomer():
    m = FakeMachine({"base": 0.2, "x": 0.1})
    stored = C.interleaved(
        {"base": m.runner("base"), "x": m.runner("x")}, steps=8, warmup=1, clock=m.clock, reference="base"
    )
    assert stored.reference == "base" and stored.costs["x"].relative == pytest.approx(0.5)
    # later, on a machine twice as slow: the newcomer is measured beside the reference and scaled
    m2 = FakeMachine({"base": 0.4, "new": 0.6})
    fresh = C.interleaved(
        {"base": m2.runner("base"), "new": m2.runner("new")}, steps=8, warmup=1, clock=m2.clock, reference="base"
    )
    merged = C.rescale(fresh, stored, stored_id="run123")
    assert merged.reference == "base"
    assert merged.costs["new"].step_seconds == pytest.approx(0.3)  # 1.5 x the stored 0.2 s, not 0.6 s
    assert merged.costs["new"].scaled_from == "run123"
    assert merged.costs["x"].step_seconds == pytest.approx(0.1) and merged.costs["base"].step_seconds == pytest.approx(
        0.2
    )
    back = C.Calibration.from_json(merged.to_json())
    assert back.steps("new", 30) == 100 and back.context["rescaled"]["newcomers"] == ["new"]
    with pytest.raises(ValueError):
        C.rescale(C.interleaved({"new": m2.runner("new")}, steps=2, warmup=0, clock=m2.clock), stored)
    with pytest.raises(ValueError):
        C.interleaved({"a": m.runner("base")}, reference="zzz", clock=m.clock)


# --------------------------------------------------------------------------- thread policy


def test_thread_choice_from_cpus_and_load():
    assert T.choose(2, 0.05) == (2, T.choose(2, 0.05)[1])
    assert T.choose(2, 1.0)[0] == 1  # one other busy process on 2 cores: 1 thread
    assert T.choose(2, 5.0)[0] == 1  # never below 1
    assert T.choose(16, 3.2)[0] == 13
    assert T.choose(16, 0.0, processes=4)[0] == 4
    assert T.choose(1.5, 0.0)[0] == 1  # a quota of 1.5 CPUs
    n, why = T.choose(8, 0.0, explicit=3)
    assert n == 3 and "train.threads" in why
    assert T.usable_cpus(8, 2.5)[0] == 2.5 and "quota" in T.usable_cpus(8, 2.5)[1]
    assert T.usable_cpus(4, None) == (4.0, "4 CPUs in this process's affinity mask")


def test_decide_records_inputs_and_spec_overrides():
    c = T.decide(affinity=lambda: 4, quota=lambda: None, load=lambda: 1.1)
    assert c.threads == 3 and c.source == "policy" and c.cpus == 4 and c.load == 1.1
    tags = c.tags()
    assert tags["lab.threads"] == "3" and "load 1.10" in tags["lab.threads.reason"]
    c = T.decide(2, affinity=lambda: 64, quota=lambda: None, load=lambda: 60.0)
    assert c.threads == 2 and c.source == "spec"


def test_cgroup_quota_v2_v1_and_busy_cpus(tmp_path):
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("150000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert T.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    proc.write_text("0::/\n")
    assert T.cgroup_cpu_limit(root, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000")
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/job\n")
    assert T.cgroup_cpu_limit(v1, proc) == pytest.approx(3.0)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("-1")
    assert T.cgroup_cpu_limit(v1, proc) is None
    # /proc/stat with only the aggregate line: 4 CPUs, a quarter of the time busy = 1 CPU
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 0 300 0 0 0 0 0 0\n")

    def later(_):
        stat.write_text("cpu  200 0 0 600 0 0 0 0 0 0\n")

    assert T.busy_cpus(0.1, stat=stat, sleep=later, ncpu=4, cpus={0}) == pytest.approx(1.0)
    assert T.busy_cpus(0.1, stat=tmp_path / "missing") is None
    # per-CPU lines: only the CPUs this process may use count (cpu2 is busy but not ours)
    stat.write_text("cpu  0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\ncpu2 0 0 0 0\n")

    def later2(_):
        stat.write_text("cpu  250 0 0 50\ncpu0 50 0 0 50\ncpu1 0 0 0 100\ncpu2 100 0 0 0\n")

    assert T.busy_cpus(0.1, stat=stat, sleep=later2, cpus={0, 1}) == pytest.approx(0.5)
    stat.write_text("cpu  0 0 0 0\ncpu0 0 0 0 0\ncpu1 0 0 0 0\ncpu2 0 0 0 0\n")
    assert T.busy_cpus(0.1, stat=stat, sleep=later2, cpus={0, 1, 2}) == pytest.approx(1.5)


# --------------------------------------------------------------------------- fidelity


def _row(key, planned=80.0, train=80.0, steps=400, step_s=0.2, kind="seconds"):
    return {
        "key": key,
        "planned_seconds": planned,
        "train_seconds": train,
        "steps": steps,
        "calibrated_step_seconds": step_s,
        "budget_kind": kind,
    }


def test_fidelity_quiet_when_matched():
    rows = [_row("a", train=78.0), _row("b", train=83.0), _row("c", train=80.5)]
    assert F.budget_warnings(rows) == []


def test_fidelity_names_the_variant_the_cause_and_the_fix():
    rows = [_row("a", train=79.0), _row("slow", train=195.0, steps=400, step_s=0.2), _row("c", train=81.0)]
    ws = F.budget_warnings(rows)
    assert len(ws) == 2
    off = next(w for w in ws if "slow" in w and "budget" in w)
    assert "195" in off and "+144%" in off
    assert "0.49 s/step" in off and "0.20 s/step" in off  # trained slower than calibrated
    assert "busier" in off and "lab run" in off
    apart = next(w for w in ws if "apart" in w)
    assert "79" in apart and "195" in apart
    # under budget (machine got quieter): the word says so
    ws = F.budget_warnings([_row("a", train=60.0, step_s=0.2), _row("b", train=61.0)])
    assert any("quieter" in w and "-25%" in w for w in ws)


def test_fidelity_ignores_non_time_budgets_and_missing_figures():
    rows = [_row("a", kind="steps", planned=None, train=10.0), _row("b", kind="steps", planned=None, train=50.0)]
    assert F.budget_warnings(rows) == []
    assert F.budget_warnings([_row("a", train=None)]) == []


def test_off_budget_advice_names_the_variant_not_the_seed_label():
    row = {
        "key": "attention_bias seed 0",
        "variant": "attention_bias",
        "budget_kind": "seconds",
        "planned_seconds": 40.0,
        "train_seconds": 30.0,
        "steps": 300,
        "calibrated_step_seconds": 0.13,
    }
    msg = F.off_budget(row)
    assert msg is not None and "'attention_bias seed 0' trained 30.0 s" in msg
    assert "--force --variant attention_bias`" in msg
    assert F.off_budget({**row, "variant": None}).count("--variant attention_bias seed 0") == 1
