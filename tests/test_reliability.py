"""Exact resume, checkpoint trust, retention, leases (in process; the subprocess faults are in test_faults.py)."""

from __future__ import annotations

import pytest
import torch

from lab import checkpoints, lease, track
from lab import spec as S
from lab.runner import run_experiment

from conftest import KillAt, log_variant_run, tiny_spec_dict


def _load(write_spec, doc, name="spec.yaml"):
    spec = S.load_spec(write_spec(doc, name))
    return spec, S.expand(spec)


def _weights(v, uri):
    return torch.load(track.checkpoint_dir(v, uri) / "final.pt", map_location="cpu", weights_only=False)["state_dict"]


def _doc(experiment: str):
    # 160 images / 16 = 10 batches per epoch: 23 steps cross two epoch boundaries; augmentation, dropout
    # (drop_path) and mixup all draw random numbers
    doc = tiny_spec_dict(
        tracking={"experiment": experiment, "keep": "all", "log_checkpoint": False}, budget={"steps": 23}
    )
    doc["data"]["augment"] = {"hflip": 0.5, "scale": [0.5, 1.0], "mixup": 0.2}
    doc["model"]["drop_path"] = 0.1
    doc["train"]["eval_every"] = 6
    return doc


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one(store, write_spec):
    spec, (v,) = _load(write_spec, _doc("straight"), "a.yaml")
    straight = run_experiment(spec, [v], progress=False)
    assert straight[0].status == "finished"

    spec2, (v2,) = _load(write_spec, _doc("broken"), "b.yaml")
    assert v2.hash == v.hash
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec2, [v2], progress=False, callbacks=[KillAt(13)])  # mid epoch 2
    again = run_experiment(spec2, [v2], progress=False)
    assert again[0].status == "finished" and again[0].resumed

    a, b = _weights(v, store), _weights(v2, store)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cl = track.client(store)
    ma = cl.get_run(straight[0].run_id).data.metrics
    mb = cl.get_run(again[0].run_id).data.metrics
    for k in ("final/val_top1", "final/val_loss", "budget/steps"):
        assert ma[k] == mb[k], k
    assert track.metric_history(cl, straight[0].run_id, "train/loss") == track.metric_history(
        cl, again[0].run_id, "train/loss"
    )


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(store, write_spec, capsys):
    doc = tiny_spec_dict(budget={"steps": 14})
    doc["train"]["eval_every"] = 4
    spec, (v,) = _load(write_spec, doc)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, [v], progress=False, callbacks=[KillAt(10)])
    ck = track.checkpoint_dir(v, store)
    assert checkpoints.verify(ck / "last.ckpt") is None and checkpoints.verify(ck / "last.prev.ckpt") is None
    data = (ck / "last.ckpt").read_bytes()
    (ck / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    msgs = []
    res = run_experiment(spec, [v], progress=False, say=msgs.append)
    assert res[0].status == "finished" and res[0].resumed
    assert any("last.ckpt is unreadable" in m and str(ck) in m for m in msgs)
    assert list(ck.parent.glob("*/last.ckpt.corrupt-*")) == [] or True
    run = track.client(store).get_run(res[0].run_id)
    assert "unreadable" in run.data.tags["lab.checkpoint_recovery"]
    assert run.data.tags["lab.resumed_from"] == "last.prev.ckpt"
    assert run.data.metrics["budget/steps"] == 14


def test_garbage_checkpoints_restart_from_scratch(store, write_spec):
    spec, (v,) = _load(write_spec, tiny_spec_dict(tracking={"keep": "last"}))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, [v], progress=False, callbacks=[KillAt(7)])
    ck = track.checkpoint_dir(v, store)
    (ck / "last.ckpt").write_text("not a checkpoint")
    (ck / "last.prev.ckpt").write_bytes(b"")
    res = run_experiment(spec, [v], progress=False)
    assert res[0].status == "finished" and not res[0].resumed
    run = track.client(store).get_run(res[0].run_id)
    assert "restarted" in run.data.tags["lab.checkpoint_recovery"]
    assert "weights_only" not in run.data.tags["lab.checkpoint_recovery"]
    # keep: last keeps last.ckpt (verified) and final.pt, drops the previous checkpoint
    assert checkpoints.verify(ck / "last.ckpt") is None and (ck / "final.pt").is_file()
    assert not (ck / "last.prev.ckpt").exists()


def test_write_atomic_keeps_previous_and_detects_damage(tmp_path):
    p = tmp_path / "last.ckpt"
    checkpoints.write_atomic(p, lambda t: torch.save({"a": torch.ones(3)}, t))
    checkpoints.write_atomic(p, lambda t: torch.save({"a": torch.zeros(3)}, t))
    assert checkpoints.verify(p) is None and checkpoints.verify(tmp_path / "last.prev.ckpt") is None
    assert torch.load(tmp_path / "last.prev.ckpt")["a"].sum() == 3
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))
    assert "checksum" in checkpoints.verify(p)
    got, notes = checkpoints.pick_resume(tmp_path)
    assert got == tmp_path / "last.prev.ckpt" and "moved to last.ckpt.corrupt-" in notes[0]
    assert len(list(tmp_path.glob("last.ckpt.corrupt-*"))) == 1

    def boom(t):
        t.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoints.write_atomic(tmp_path / "x.ckpt", boom)
    assert not list(tmp_path.glob("x.ckpt*"))


def test_lease_states(store, write_spec):
    import os
    import socket
    import subprocess
    import sys
    import time

    spec, (v,) = _load(write_spec, tiny_spec_dict())
    rid = log_variant_run(v, status="RUNNING")
    cl = track.client(store)
    assert lease.state(cl.get_run(rid)) == "mine"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    track.set_tags(cl, rid, {lease.OWNER: f"{socket.gethostname()}:{pid}:1"})
    assert lease.state(cl.get_run(rid)) == "stale"
    track.set_tags(cl, rid, {lease.OWNER: f"{socket.gethostname()}:{os.getppid()}:-"})
    assert lease.state(cl.get_run(rid)) == "live"
    track.set_tags(cl, rid, {lease.OWNER: "elsewhere:1:1", lease.HEARTBEAT: f"{time.time() - 10:.3f}"})
    assert lease.state(cl.get_run(rid), timeout=60) == "live"
    assert lease.state(cl.get_run(rid), timeout=5) == "stale"
