"""Fault injection, for real: `lab run` subprocesses on one store, signals at a step, corrupt files,
traversal attempts. Asserts: no duplicate runs, no mixed histories, every run ends in a true status,
nothing written or deleted outside the store, and results equal to an undisturbed run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lab import cli, lease, paths, report, track

from conftest import tiny_spec_dict

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(uri: str) -> dict:
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=uri,
        PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])),
    )
    env.pop("LAB_DEBUG", None)
    return env


def _lab(args, uri, cwd, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lab", *args],
        env=_env(uri),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _write(tmp_path, doc, name):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _wait_for_step(cl, experiment: str, step: int, proc, timeout: float = 120) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        runs = track.find_variant_runs(cl, experiment) if cl.get_experiment_by_name(experiment) else []
        for r in runs:
            hist = track.metric_history(cl, r.info.run_id, "train/loss")
            if hist and hist[-1][0] >= step:
                return r.info.run_id
        time.sleep(0.05)
    raise AssertionError("training never reached the step")


def _no_mixed_history(cl, run_id: str) -> None:
    for name in ("val/top1", "final/val_top1", "budget/steps"):
        steps = [m.step for m in cl.get_metric_history(run_id, name)]
        assert len(steps) == len(set(steps)), f"{name} logged twice at one step: {steps}"


def _long_doc(experiment: str, uri=None) -> dict:
    doc = tiny_spec_dict(
        tracking={"experiment": experiment, "keep": "all", "log_checkpoint": False, "uri": uri}, budget={"steps": 30}
    )
    doc["train"].update(eval_every=5, log_every=1)
    doc["data"]["augment"] = {"hflip": 0.5, "scale": [0.5, 1.0]}
    return doc


def _final(uri: str, experiment: str):
    cl = track.client(uri)
    (run,) = track.find_variant_runs(cl, experiment)
    d = paths.variant_checkpoint_dir(
        track.store_dir(uri), experiment, run.data.tags["lab.variant"], run.data.tags["lab.hash"]
    )
    return run, torch.load(d / "final.pt", map_location="cpu", weights_only=False)["state_dict"]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_lab_runs_on_one_new_store_never_mix(store, tmp_path):
    doc = tiny_spec_dict()
    doc["variants"] = {"a": {}, "b": {"train": {"lr": 2e-3}}, "c": {"train": {"lr": 1e-3}}}
    spec = _write(tmp_path, doc, "two.yaml")
    procs = [_lab(["run", str(spec), "--no-progress"], store, tmp_path) for _ in range(2)]  # same instant, new store
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    cl = track.client(store)
    runs = track.find_variant_runs(cl, "tiny")
    by_key: dict = {}
    for r in runs:
        by_key.setdefault(r.data.tags["lab.variant"], []).append(r)
    assert sorted(by_key) == ["a", "b", "c"]
    for key, rs in by_key.items():
        assert [r.info.status for r in rs] == ["FINISHED"], (key, [r.info.status for r in rs])
        _no_mixed_history(cl, rs[0].info.run_id)
        assert [s for s, _ in track.metric_history(cl, rs[0].info.run_id, "val/top1")] == [5, 10, 12]
    parents = cl.search_runs([cl.get_experiment_by_name("tiny").experiment_id], "tags.`lab.role` = 'parent'")
    assert sorted(p.info.status for p in parents) == ["FINISHED", "FINISHED"]
    said = outs[0][0] + outs[1][0]
    status = re.findall(r"^(\S+) +params .*? (finished|busy|skipped|failed) +top-1", said, flags=re.M)
    assert sorted(k for k, st in status if st == "finished") == ["a", "b", "c"], said  # each trained once
    assert sorted(k for k, st in status if st != "finished") == ["a", "b", "c"], said  # and left alone once


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    """One undisturbed run (its own store), trained once for the signal tests."""
    from lab import spec as S
    from lab.runner import run_experiment

    d = tmp_path_factory.mktemp("undisturbed")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    spec = S.load_spec(_write(d, _long_doc("undisturbed", uri), "ref.yaml"))
    assert run_experiment(spec, S.expand(spec), progress=False)[0].status == "finished"
    return _final(uri, "undisturbed")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_at_a_step_then_resume_equals_undisturbed(store, tmp_path, sig, undisturbed):
    cl = track.client(store)
    spec = _write(tmp_path, _long_doc("disturbed"), "dis.yaml")
    p = _lab(["run", str(spec), "--no-progress"], store, tmp_path)
    rid = _wait_for_step(cl, "disturbed", 12, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    run = cl.get_run(rid)
    parent = cl.get_run(run.data.tags["mlflow.parentRunId"])
    if sig == signal.SIGTERM:
        assert p.returncode == 143, err[-2000:]
        assert "SIGTERM" in err and "Traceback" not in err
        assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["lab.error"]
        assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["lab.error"]
    else:
        assert p.returncode == -signal.SIGKILL
        assert run.info.status == "RUNNING" and lease.state(run) == "stale"
        table = report.load_runs("disturbed", store)
        assert table["status"].tolist() == [lease.STALE]  # not shown as RUNNING
    done = _lab(["run", str(spec), "--no-progress"], store, tmp_path)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    run = cl.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["lab.resumed"] == "1"
    if sig == signal.SIGKILL:
        assert run.data.tags[lease.TAKEN_FROM]  # the stale lease was taken over
        assert cl.get_run(parent.info.run_id).info.status == "KILLED"  # the dead parent is ended, with why
        assert "died" in cl.get_run(parent.info.run_id).data.tags["lab.error"]
    assert len(track.find_variant_runs(cl, "disturbed")) == 1
    _no_mixed_history(cl, rid)
    ref_run, ref_weights = undisturbed
    _same(ref_weights, _final(store, "disturbed")[1])
    a, b = ref_run.data.metrics, run.data.metrics
    assert a["final/val_top1"] == b["final/val_top1"] and a["final/val_loss"] == b["final/val_loss"]


def test_bad_images_are_named_or_skipped(store, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for split, n in (("train", 10), ("val", 3)):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (i * 20, 80 if c == "cat" else 160, 30)).save(d / f"{i}.png")
    (root / "train" / "cat" / "text.jpg").write_text("not really a jpeg")
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    doc = tiny_spec_dict(
        data={"dataset": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 4}, budget={"steps": 2}
    )
    doc["model"]["num_classes"] = 2
    spec = _write(tmp_path, doc, "img.yaml")
    assert cli.main(["run", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 bad image file(s)" in err
    assert "train/cat/text.jpg" in err and "train/dog/cut.png" in err
    assert cli.main(["run", str(spec), "--no-progress", "--set", "data.skip_bad_files=true"]) == 0
    (r,) = track.find_variant_runs(track.client(store), "tiny")
    assert r.info.status == "FINISHED" and r.data.tags["lab.data.skipped_files"] == "2"


def test_traversal_attempts_stay_in_the_store(store, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    victim = tmp_path / "elsewhere-victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    doc = tiny_spec_dict(name="..", budget={"steps": 2}, tracking={"experiment": "../../../x", "keep": "last"})
    doc["train"]["eval_every"] = 1
    doc["grid"] = {"data.root": ["x/../../../../elsewhere-victim", "/tmp/../etc", "a b/'\"c"]}
    spec = _write(work, doc, "evil.yaml")

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if "store" not in p.relative_to(tmp_path).parts}

    before = snapshot()
    assert cli.main(["run", str(spec), "--no-progress"]) == 0
    assert cli.main(["run", str(spec), "--no-progress", "--force"]) == 0
    assert cli.main(["plot", "../../../x", "--kind", "convergence"]) == 0
    after = snapshot()
    new = sorted(str(p.relative_to(tmp_path)) for p in set(after) - set(before))
    assert all(n.startswith("work/out") for n in new), new  # the plot, under ./out only
    assert set(before) - set(after) == set() and (victim / "precious.txt").read_text() == "keep me"
    cks = tmp_path / "store" / "checkpoints"
    assert len(list(cks.glob("*/*/last.ckpt"))) == 3


def test_preempted_slurm_job_requeues_and_resumes(store, tmp_path, undisturbed):
    """submitit's LocalExecutor stands in for SLURM; SIGUSR2 is what submitit gets before a preemption."""
    pytest.importorskip("submitit")
    import threading

    from lab import launch
    from lab import spec as S
    from lab.runner import run_experiment

    spec = S.load_spec(_write(tmp_path, _long_doc("preempted"), "pre.yaml"))
    vs = S.expand(spec)
    opts = launch.LaunchOptions(
        slurm_cluster="local", slurm_folder=str(tmp_path / "submitit" / "%j"), slurm_time=10, poll_s=0.2
    )
    out: dict = {}
    t = threading.Thread(
        target=lambda: out.update(res=run_experiment(spec, vs, progress=False, launcher="slurm", launch_options=opts))
    )
    t.start()
    cl = track.client(store)

    class Alive:  # _wait_for_step polls a process; here the driver is a thread
        def poll(self):
            return None if t.is_alive() else 0

    rid = _wait_for_step(cl, "preempted", 12, Alive())
    os.kill(int(cl.get_run(rid).data.tags["lab.worker.pid"]), signal.SIGUSR2)
    t.join(timeout=300)
    assert [r.status for r in out["res"]] == ["finished"]
    run = cl.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["lab.requeued"] == "1"
    assert len(track.find_variant_runs(cl, "preempted")) == 1
    _no_mixed_history(cl, rid)
    _same(undisturbed[1], _final(store, "preempted")[1])
