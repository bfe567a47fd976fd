"""`lab run` with matched runtime budgets: the calibration kept on the parent run, a variant added
later scaled to it, budget fidelity in the summary and the table, throughput measured after
training so that a Pareto plot follows `lab run` directly."""

from __future__ import annotations

import json

import pytest

from lab import calibration as C
from lab import report, track
from lab import spec as S
from lab.cli import main
from lab.runner import run_experiment

from conftest import tiny_spec_dict

WIDE = {"model": {"stages": [{"dim": 64, "depth": 2, "heads": 4}]}}


def _parents(cl, experiment="tiny"):
    exp = cl.get_experiment_by_name(experiment)
    runs = cl.search_runs(
        [exp.experiment_id], filter_string="tags.`lab.role` = 'parent'", order_by=["attributes.start_time ASC"]
    )
    return runs


def _calibration(cl, run_id) -> C.Calibration:
    return C.Calibration.from_json(track.download_artifact(cl, run_id, "calibration.json").read_text())


@pytest.mark.slow
def test_newcomer_is_scaled_to_the_stored_reference(store, write_spec):
    doc = tiny_spec_dict(budget={"seconds": 0.6, "calibration_steps": 6})
    doc["train"]["eval_every"] = 1000
    doc["variants"] = {"small": {}, "wide": WIDE}
    spec = S.load_spec(write_spec(doc))
    said: list[str] = []
    res = run_experiment(spec, S.expand(spec), progress=False, say=said.append)
    assert [r.status for r in res] == ["finished", "finished"]
    assert any(s.startswith("calibrating small, wide together") for s in said)
    assert any(s.startswith("budget used: small") for s in said)
    cl = track.client(store)
    (p1,) = _parents(cl)
    first = _calibration(cl, p1.info.run_id)
    assert first.reference == "small" and set(first.costs) == {"small", "wide"}
    assert first.order[:2] == ["small", "wide"] and first.rounds == 2
    assert p1.data.tags["lab.calibration.reference"] == "small" and "lab.threads" in p1.data.tags
    # the planned steps are the calibrated costs applied to the budget
    for key in ("small", "wide"):
        m = track.find_variant_runs(cl, "tiny", key=key)[0].data.metrics
        assert m["budget/planned_steps"] == first.steps(key, 0.6)
        assert m["budget/calibration_step_seconds"] == pytest.approx(first.costs[key].step_seconds)

    # a variant added later: the finished ones are skipped, the newcomer is measured beside the
    # stored reference and scaled to the reference's stored cost
    doc["variants"]["mid"] = {"model": {"stages": [{"dim": 48, "depth": 1, "heads": 2}]}}
    spec = S.load_spec(write_spec(doc))
    said.clear()
    res = run_experiment(spec, S.expand(spec), progress=False, say=said.append)
    assert [r.status for r in res] == ["skipped", "skipped", "finished"]
    p2 = _parents(cl)[-1]
    second = _calibration(cl, p2.info.run_id)
    assert second.reference == "small" and second.context["rescaled"]["newcomers"] == ["mid"]
    assert second.context["rescaled"]["from"] == p1.info.run_id
    assert second.costs["small"].step_seconds == first.costs["small"].step_seconds  # the stored scale
    assert second.costs["wide"].step_seconds == first.costs["wide"].step_seconds
    mid = second.costs["mid"]
    assert mid.scaled_from == p1.info.run_id
    assert mid.step_seconds == pytest.approx(mid.relative * first.costs["small"].step_seconds)
    run = track.find_variant_runs(cl, "tiny", key="mid")[0]
    assert f"scaled to its cost in parent run {p1.info.run_id}" in run.data.tags["lab.calibration"]
    assert run.data.metrics["budget/planned_steps"] == second.steps("mid", 0.6)


@pytest.mark.slow
def test_run_then_pareto_and_fidelity_in_table(store, write_spec, capsys, tmp_path):
    doc = tiny_spec_dict(
        budget={"seconds": 0.6, "calibration_steps": 6},
        bench={"after_train": True, "warmup": 0.02, "duration": 0.05, "repeats": 2},
    )
    doc["train"]["eval_every"] = 1000
    doc["variants"] = {"small": {}, "wide": WIDE}
    path = write_spec(doc)
    assert main(["run", str(path), "--no-progress"]) == 0
    # nothing in between: the throughput is already on the runs
    out = tmp_path / "pareto"
    assert main(["plot", "tiny", "--kind", "pareto", "--out", str(out)]) == 0
    assert out.with_suffix(".png").is_file()
    df = report.load_runs("tiny")
    data = report.pareto_data(df)
    assert set(data[data["source"] == "measured"]["key"]) == {"small", "wide"}
    cl = track.client(store)
    for key in ("small", "wide"):
        r = track.find_variant_runs(cl, "tiny", key=key)[0]
        assert r.data.metrics["bench/cpu_imgs_per_s"] > 0
        assert r.data.tags["bench.cpu.threads"] == "1" and r.data.tags["bench.cpu.repeats"] == "2"
    # the table shows the budget used; a variant that trained off its budget is named in words
    capsys.readouterr()
    assert main(["table", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "budget s" in text and "train s" in text
    wide = track.find_variant_runs(cl, "tiny", key="wide")[0]
    small = track.find_variant_runs(cl, "tiny", key="small")[0]
    cl.log_metric(small.info.run_id, "budget/train_seconds", 0.6, step=10**6)  # on budget (whatever the load was)
    cl.log_metric(wide.info.run_id, "budget/train_seconds", 1.5, step=10**6)  # as if load slowed it down
    assert main(["table", "tiny"]) == 0
    text = capsys.readouterr().out
    assert "warning: 'wide' trained 1.5 s against a budget of 0.6 s (+150%)" in text
    assert "apart" in text
    assert main(["table", "tiny", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"]: r["budget_s"] for r in rows} == {"small": 0.6, "wide": 0.6}


def test_thread_choice_policy_spec_and_cpu_ranks(write_spec):
    from lab import threads as T
    from lab.execute import Context
    from lab.train import thread_choice

    doc = tiny_spec_dict()
    doc["train"].pop("threads")
    doc["variants"] = {
        "plain": {},
        "pinned": {"train": {"threads": 3}},
        "ddp": {"train": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}},
    }
    spec = S.load_spec(write_spec(doc))
    vs = {v.key: v for v in S.expand(spec)}
    policy = T.decide(affinity=lambda: 8, quota=lambda: None, load=lambda: 2.0)
    assert policy.threads == 6
    ctx = Context(
        spec=spec,
        variants=list(vs.values()),
        uri="",
        cl=None,
        experiment="tiny",
        experiment_id="0",
        parent_run_id="",
        baseline="plain",
        threads=policy.as_dict(),
    )
    assert thread_choice(vs["plain"], ctx).threads == 6
    c = thread_choice(vs["pinned"], ctx)
    assert c.threads == 3 and c.source == "spec"
    c = thread_choice(vs["ddp"], ctx)  # two CPU ranks on this machine share the policy's threads
    assert c.threads == 3 and "shared by 2 training processes" in c.reason


@pytest.mark.slow
def test_a_variant_failing_in_calibration_does_not_stop_the_others(store, write_spec):
    doc = tiny_spec_dict(budget={"seconds": 0.5, "calibration_steps": 6})
    doc["train"]["eval_every"] = 1000
    doc["variants"] = {"ok": {}, "diverges": {"train": {"lr": 1.0e30, "grad_clip": None, "warmup": 0.0}}}
    spec = S.load_spec(write_spec(doc))
    said: list[str] = []
    res = run_experiment(spec, S.expand(spec), progress=False, say=said.append)
    by = {r.key: r for r in res}
    assert by["ok"].status == "finished" and by["diverges"].status == "failed"
    assert any("calibration: 'diverges' failed" in s for s in said)
    ok = track.find_variant_runs(track.client(store), "tiny", key="ok")[0]
    assert ok.data.tags["lab.calibration"].startswith("together with ok, interleaved")
