"""Budgets: every kind stops where it should and records what it used; matched runtime budgets."""

from __future__ import annotations

import pytest

import grafts
from lab import budget as B
from lab import spec as S
from lab import track
from lab.module import lr_at
from lab.runner import run_experiment

from conftest import tiny_spec_dict

NO_BUDGET = {"epochs": None, "steps": None, "images": None, "train_flops": None, "seconds": None}


def test_steps_for_each_kind():
    bs = lambda **kw: S.BudgetSpec(**kw)  # noqa: E731
    assert B.steps_for(bs(steps=7), global_batch=16) == 7
    assert B.steps_for(bs(epochs=2.5), global_batch=16, steps_per_epoch=8) == 20
    assert B.steps_for(bs(images=100), global_batch=16) == 7
    assert B.steps_for(bs(train_flops=6 * 1000 * 16 * 5), global_batch=16, macs_per_image=1000) == 5
    assert B.steps_for(bs(seconds=10), global_batch=16, images_per_s=160) == 100
    with pytest.raises(ValueError):
        B.steps_for(bs(seconds=10), global_batch=16)
    p = B.plan(bs(seconds=3, wall_clock=True), global_batch=16)
    assert p.total_steps is None and p.max_seconds == 3 and B.trainer_limits(p)["max_steps"] == -1
    p = B.plan(bs(seconds=3), global_batch=16, calibrate=lambda: {"images_per_s": 32.0, "step_seconds": 0.5})
    assert p.total_steps == 6


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup=0.2)
    assert lr_at(0.0, **kw) == 0.0
    assert lr_at(0.1, **kw) == pytest.approx(0.5)
    assert lr_at(0.2, **kw) == pytest.approx(1.0)
    assert lr_at(0.6, **kw) == pytest.approx(0.55)
    assert lr_at(1.0, **kw) == pytest.approx(0.1)
    vals = [lr_at(p / 100, **kw) for p in range(20, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def _metrics(store, key):
    cl = track.client(store)
    (r,) = track.find_variant_runs(cl, "tiny", key=key)
    assert r.info.status == "FINISHED", r.data.tags.get("lab.error")
    return r.data.metrics


def test_every_kind_stops_where_it_should(store, write_spec):
    doc = tiny_spec_dict()
    doc["train"]["eval_every"] = 100  # only the final evaluation
    macs = grafts.count_macs(S.expand(S.load_spec(write_spec(tiny_spec_dict())))[0].model)
    # 160 images, val_fraction 0.2 -> 128 train images -> 8 batches of 16 per epoch
    doc["variants"] = {
        "steps": {"budget": {**NO_BUDGET, "steps": 5}},
        "epochs": {"budget": {**NO_BUDGET, "epochs": 0.5}},
        "images": {"budget": {**NO_BUDGET, "images": 100}},
        "flops": {"budget": {**NO_BUDGET, "train_flops": 6.0 * macs * 16 * 3}},
    }
    spec = S.load_spec(write_spec(doc))
    res = run_experiment(spec, S.expand(spec), progress=False)
    assert all(r.status == "finished" for r in res)
    for key, steps in (("steps", 5), ("epochs", 4), ("images", 7), ("flops", 3)):
        m = _metrics(store, key)
        assert m["budget/steps"] == steps, key
        assert m["budget/images_seen"] == steps * 16
        assert m["budget/train_flops"] == pytest.approx(6.0 * macs * steps * 16)
        assert m["budget/train_seconds"] > 0 and m["budget/peak_mem_mb"] > 0


def test_matched_seconds_budget_gives_every_variant_the_same_time(store, write_spec):
    doc = tiny_spec_dict(budget={"seconds": 2.0, "calibration_steps": 12})
    doc["train"]["eval_every"] = 1000
    doc["variants"] = {"small": {}, "wide": {"model": {"stages": [{"dim": 96, "depth": 2, "heads": 4}]}}}
    spec = S.load_spec(write_spec(doc))
    res = run_experiment(spec, S.expand(spec), progress=False)
    assert all(r.status == "finished" for r in res)
    planned = {}
    for key in ("small", "wide"):
        m = _metrics(store, key)
        step_s = m["budget/calibration_step_seconds"]
        steps = m["budget/planned_steps"]
        assert m["budget/steps"] == steps
        # calibrated steps x calibrated step time = the budget, up to rounding to whole steps
        assert abs(steps * step_s - 2.0) <= step_s / 2 + 1e-6
        assert m["budget/calibration_images_per_s"] == pytest.approx(16 / step_s)
        assert m["budget/train_seconds"] > 0 and m["budget/planned_seconds"] == 2.0
        planned[key] = steps
        tags = track.find_variant_runs(track.client(store), "tiny", key=key)[0].data.tags
        assert tags["lab.calibration"].startswith("together with small, wide, interleaved")
        assert tags["lab.threads"] == "2" and tags["lab.threads.source"] == "spec"
    assert planned["small"] > planned["wide"]  # the wider model is slower: fewer steps, same seconds


def test_wall_clock_budget_stops_on_training_time(store, write_spec):
    doc = tiny_spec_dict(budget={"seconds": 1.5, "wall_clock": True})
    doc["train"]["eval_every"] = 10
    doc["variants"] = {"small": {}, "wide": {"model": {"stages": [{"dim": 96, "depth": 2, "heads": 4}]}}}
    spec = S.load_spec(write_spec(doc))
    res = run_experiment(spec, S.expand(spec), progress=False)
    assert all(r.status == "finished" for r in res)
    secs = {}
    for key in ("small", "wide"):
        m = _metrics(store, key)
        # stops at the first step that reaches the budget: at most one (slow) step beyond it
        assert 1.5 <= m["budget/train_seconds"] < 1.5 + 1.0
        assert m["budget/images_seen"] == m["budget/steps"] * 16
        secs[key] = m["budget/train_seconds"]
    # the timer counts training only: setup, evaluation and checkpoints are outside it
    assert all(r.wall_seconds > secs[r.key] for r in res)
