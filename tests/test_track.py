"""lab.track: store resolution, naming, synthetic runs, lookups, metric history."""

from __future__ import annotations

import json
from pathlib import Path

from lab import spec as S
from lab import track

from conftest import log_variant_run, tiny_spec_dict


def _variants(write_spec, **kw):
    doc = tiny_spec_dict(**kw)
    doc["variants"] = {"base": {}, "bias": {"model": {"position": "attention_bias"}}}
    doc["reference"] = {"base": {"top1": 72.2, "params_m": 5.7}}
    spec = S.load_spec(write_spec(doc))
    return spec, S.expand(spec)


def test_tracking_uri_precedence(tmp_path, monkeypatch, write_spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec, vs = _variants(write_spec)
    assert track.tracking_uri(None) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert track.tracking_uri(vs[0]) == track.tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/env.db")
    assert track.tracking_uri(vs[0]) == "sqlite:////x/env.db"  # env overrides the default
    v = vs[0].model_copy(update={"tracking": vs[0].tracking.model_copy(update={"uri": "sqlite:////x/spec.db"})})
    assert track.tracking_uri(v) == "sqlite:////x/spec.db"  # the spec's uri overrides env
    from lab.paths import short_hash

    assert track.checkpoint_dir(v) == Path(f"/x/checkpoints/tiny-{short_hash('tiny')}") / f"base-{v.hash}"


def test_default_store_creates_artifact_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = track.tracking_uri(None)
    cl = track.client(uri)
    exp_id = track.get_or_create_experiment(cl, "e", uri)
    assert (tmp_path / "mlruns" / "artifacts").is_dir()
    assert cl.get_experiment(exp_id).artifact_location.startswith((tmp_path / "mlruns" / "artifacts").as_uri())


def test_flatten_dotted_and_json_lists():
    flat = track.flatten({"train": {"lr": 0.001, "distill": None}, "model": {"stages": [{"dim": 8}], "zoo": "x"}})
    assert flat == {
        "train.lr": "0.001",
        "train.distill": "null",
        "model.stages": json.dumps([{"dim": 8}]),
        "model.zoo": "x",
    }


def test_log_variant_run_and_read_back(store, write_spec):
    spec, (base, bias) = _variants(write_spec)
    cl = track.client(store)
    rid = log_variant_run(
        base,
        baseline=True,
        history={"val/top1": [(5, 40.0), (10, 55.0)], "images_seen": [(5, 80), (10, 160)]},
        final={"final/val_top1": 55.0, "params": 1234, "macs": 5678},
    )
    rid2 = log_variant_run(bias, status="FAILED", error="RuntimeError: boom")
    runs = track.find_variant_runs(cl, "tiny")
    assert {r.info.run_id for r in runs} == {rid, rid2}
    (r,) = track.find_variant_runs(cl, "tiny", key="base", hash=base.hash)
    t = r.data.tags
    assert t["lab.role"] == "variant" and t["lab.variant"] == "base" and t["lab.hash"] == base.hash
    assert t["lab.baseline"] == "true" and t["lab.experiment"] == "tiny" and t["ref.top1"] == "72.2"
    assert t["lab.changes"] == "(baseline)" and "mlflow.parentRunId" in t and t["lab.git_commit"]
    parent = cl.get_run(t["mlflow.parentRunId"])
    assert parent.data.tags["lab.role"] == "parent"
    assert r.data.params["train.lr"] == "0.003" and json.loads(r.data.params["model.stages"])[0]["dim"] == 32
    assert track.metric_history(cl, rid, "val/top1") == [(5, 40.0), (10, 55.0)]
    assert r.data.metrics["final/val_top1"] == 55.0
    assert "spec.yaml" in {a.path for a in cl.list_artifacts(rid)}
    (f,) = track.find_variant_runs(cl, "tiny", key="bias")
    assert f.info.status == "FAILED" and f.data.tags["lab.error"] == "RuntimeError: boom"
    assert f.data.tags["lab.changes"] == "model.position=attention_bias"
    assert track.find_variant_runs(cl, "nope") == []
