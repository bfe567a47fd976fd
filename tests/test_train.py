"""`lab run`: training, MLflow records, skip/resume, failures, distillation (tiny models, a few steps)."""

from __future__ import annotations

import pytest

import grafts
from lab import cli, track
from lab import record as REC
from lab import spec as S
from lab.runner import order_variants, run_experiment

from conftest import KillAt, tiny_spec_dict


def _load(write_spec, doc):
    spec = S.load_spec(write_spec(doc))
    return spec, S.expand(spec)


def test_run_records_everything(store, write_spec):
    doc = tiny_spec_dict(baseline="base")
    doc["variants"] = {"base": {}, "ema_ls": {"train": {"ema": 0.9}, "data": {"augment": {"label_smoothing": 0.1}}}}
    doc["reference"] = {"base": {"top1": 72.2, "params_m": 5.7}}
    spec, vs = _load(write_spec, doc)
    res = run_experiment(spec, vs, progress=False)
    assert [r.status for r in res] == ["finished", "finished"]
    cl = track.client(store)
    for r, v in zip(res, vs):
        run = cl.get_run(r.run_id)
        m, t = run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        assert m["budget/steps"] == 12 and m["budget/images_seen"] == 12 * 16
        assert m["budget/train_flops"] == pytest.approx(6 * m["macs"] * 12 * 16)
        assert m["macs"] == grafts.count_macs(v.model) and m["params"] > 0
        assert m["budget/train_seconds"] > 0 and m["budget/peak_mem_mb"] > 0
        assert 0 <= m["final/val_top1"] <= 100 and m["best/val_top1"] >= m["final/val_top1"]
        assert t["lab.role"] == "variant" and t["lab.variant"] == v.key and t["lab.hash"] == v.hash
        assert t["lab.device"] == "cpu" and t["lab.git_commit"]
        assert t["lab.baseline"] == ("true" if v.key == "base" else "false")
        parent = cl.get_run(t["mlflow.parentRunId"])
        assert parent.data.tags["lab.role"] == "parent" and parent.info.status == "FINISHED"
        assert run.data.params["budget.steps"] == "12"
        # metric histories with the optimizer step as step
        assert [s for s, _ in track.metric_history(cl, r.run_id, "val/top1")] == [5, 10, 12]
        assert [s for s, _ in track.metric_history(cl, r.run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
        assert [v_ for _, v_ in track.metric_history(cl, r.run_id, "images_seen")] == [80, 160, 192]
        lrs = dict(track.metric_history(cl, r.run_id, "lr"))
        assert lrs[2] > lrs[12] >= 1e-5  # cosine decay after warmup
        arts = {a.path for a in cl.list_artifacts(r.run_id)}
        assert {"spec.yaml", "checkpoint"} <= arts
        # every name the run holds is in the run record (lab.record), which the README documents
        assert [k for k in m if not REC.documented("metric", k)] == []
        assert [
            k for k in t if k.startswith(("lab.", "ref.", "match.", "bench.")) and not REC.documented("tag", k)
        ] == []
        assert [k for k in run.data.params if not REC.documented("param", k)] == []
        assert all(any(e.name.split("/")[0] == a for e in REC.ENTRIES if e.kind == "artifact") for a in arts), arts
        # tracking.keep: final (default): the weights once (the MLflow artifact), no resume checkpoints left
        assert not track.checkpoint_dir(v, store).exists()
    assert cl.get_run(res[0].run_id).data.tags["ref.top1"] == "72.2"
    assert cl.get_run(res[1].run_id).data.tags["lab.changes"] == "train.ema=0.9, data.augment.label_smoothing=0.1"
    # the synthetic data is easy: the baseline learns something in 12 steps
    assert res[0].top1 > 25

    # a second invocation skips both; --force retrains into new runs
    again = run_experiment(spec, vs, progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert [r.run_id for r in again] == [r.run_id for r in res]
    forced = run_experiment(spec, vs[:1], force=True, progress=False)
    assert forced[0].status == "finished" and forced[0].run_id != res[0].run_id
    assert len(track.find_variant_runs(cl, "tiny", key="base")) == 2


def test_resume_after_kill_continues_the_same_run(store, write_spec):
    spec, vs = _load(write_spec, tiny_spec_dict())
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, vs, progress=False, callbacks=[KillAt(7)])
    cl = track.client(store)
    (killed,) = track.find_variant_runs(cl, "tiny")
    assert killed.info.status == "KILLED"
    assert cl.get_run(killed.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert [s for s, _ in track.metric_history(cl, killed.info.run_id, "train/loss")] == [2, 4, 6]
    res = run_experiment(spec, vs, progress=False)
    assert res[0].status == "finished" and res[0].resumed
    assert res[0].run_id == killed.info.run_id
    run = cl.get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["lab.resumed"] == "1"
    assert run.data.metrics["budget/steps"] == 12
    assert [s for s, _ in track.metric_history(cl, run.info.run_id, "train/loss")] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in track.metric_history(cl, run.info.run_id, "val/top1")] == [5, 10, 12]
    assert len(track.find_variant_runs(cl, "tiny")) == 1


def test_failures_do_not_stop_the_others(store, write_spec, monkeypatch):
    doc = tiny_spec_dict()
    doc["variants"] = {
        "nan": {"train": {"lr": 1.0e30, "warmup": 0.0}},
        "ok": {},
        "broken": {"model": {"drop_rate": 0.25}},
    }
    path = write_spec(doc)
    real_build = grafts.build

    def build(cfg, *a, **kw):
        d = grafts.config_to_dict(grafts.config_from_dict(cfg))
        if d.get("drop_rate") == 0.25:
            raise RuntimeError("simulated build failure")
        return real_build(cfg, *a, **kw)

    monkeypatch.setattr(grafts, "build", build)
    rc = cli.main(["run", str(path), "--no-progress"])
    assert rc == 1
    cl = track.client(store)
    by_key = {r.data.tags["lab.variant"]: r for r in track.find_variant_runs(cl, "tiny")}
    assert by_key["ok"].info.status == "FINISHED"
    for key, err in (("nan", "NonFiniteLoss"), ("broken", "simulated build failure")):
        r = by_key[key]
        assert r.info.status == "FAILED" and err in r.data.tags["lab.error"]
        assert "error.txt" in {a.path for a in cl.list_artifacts(r.info.run_id)}
    parent = cl.get_run(by_key["ok"].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_bad_data_root_is_exit_2_before_training(store, write_spec, capsys):
    doc = tiny_spec_dict()
    doc["data"] = {"dataset": "imagefolder", "root": "/nonexistent/imagenet", "image_size": 16, "batch_size": 16}
    rc = cli.main(["run", str(write_spec(doc)), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "/nonexistent/imagenet" in err and "Traceback" not in err
    assert track.find_variant_runs(track.client(store), "tiny") == []


def test_distillation_trains_teacher_first(store, write_spec):
    doc = tiny_spec_dict(budget={"steps": 6})
    doc["train"]["eval_every"] = 6
    doc["variants"] = {
        "student": {"model": {"distillation": True}, "train": {"distill": {"variant": "teacher", "alpha": 0.5}}},
        "teacher": {},
    }
    spec, vs = _load(write_spec, doc)
    assert [v.key for v in order_variants(vs)] == ["teacher", "student"]
    res = run_experiment(spec, vs, progress=False)
    assert [(r.key, r.status) for r in res] == [("teacher", "finished"), ("student", "finished")]


def test_cli_variant_subset_adds_teacher(store, write_spec, capsys):
    doc = tiny_spec_dict(budget={"steps": 4})
    doc["train"]["eval_every"] = 4
    doc["variants"] = {
        "teacher": {},
        "other": {"train": {"lr": 1e-3}},
        "student": {"train": {"distill": {"variant": "teacher"}}},
    }
    rc = cli.main(["run", str(write_spec(doc)), "--variant", "student", "--no-progress"])
    assert rc == 0
    keys = {r.data.tags["lab.variant"] for r in track.find_variant_runs(track.client(store), "tiny")}
    assert keys == {"teacher", "student"}
    out = capsys.readouterr().out
    assert "student" in out and "finished" in out


def test_quickstart_smoke_runs_end_to_end(store):
    from pathlib import Path

    qs = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    spec = S.load_spec(qs)
    assert spec.budget.kind == "seconds" and len(S.expand(spec)) >= 3
    assert cli.main(["run", str(qs), "--smoke", "--set", "train.eval_every=20", "--no-progress"]) == 0
    runs = track.find_variant_runs(track.client(store), "quickstart")
    assert {r.data.tags["lab.variant"] for r in runs} == {"deit_tiny", "resnet2_graft", "attention_bias"}
    assert all(r.info.status == "FINISHED" and r.data.metrics["budget/steps"] == 20 for r in runs)


@pytest.mark.slow
def test_matched_variant_is_sized_before_it_trains(store, write_spec):
    """A `match:` variant is resized in the worker (lab.execute -> lab.match) and trains at that size."""
    import json

    from conftest import TINY_MODEL

    stage = dict(TINY_MODEL["stages"][0])
    doc = tiny_spec_dict(budget={"steps": 4})
    doc["bench"] = {"threads": 1}
    doc["variants"] = {
        "target": {"model": {"stages": [{**stage, "depth": 2}]}},
        "sized": {"match": {"throughput_of": "target", "vary": "model.stages.0.depth", "values": [1, 3]}},
    }
    spec, vs = _load(write_spec, doc)
    res = run_experiment(spec, vs, progress=False, say=lambda s: None)
    assert [(r.key, r.status) for r in res] == [("target", "finished"), ("sized", "finished")], res
    run = track.client(store).get_run(res[1].run_id)
    t = run.data.tags
    assert t["match.throughput_of"] == "target" and t["match.value"] in ("1", "3")
    assert t["lab.resolved_hash"] != vs[1].hash  # the sized model is another model
    depth = int(t["match.value"])
    assert json.loads(run.data.params["model.stages"])[0]["depth"] == depth  # logged as trained
    built = grafts.build({**vs[1].model, "stages": [{**vs[1].model["stages"][0], "depth": depth}]})
    assert run.data.metrics["params"] == grafts.count_params(built) == res[1].params
