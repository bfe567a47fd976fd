"""Hostile or careless input: bounded specs, one-line errors for environment trouble (exit 2)."""

from __future__ import annotations

import time

import pytest

from lab import cli
from lab import spec as S

from conftest import tiny_spec_dict


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "name: bomb\ntags: {}\nx:\n  " + "\n  ".join(lines) + "\n"


def test_alias_bomb_is_refused_quickly(tmp_path, capsys):
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb())
    assert len(p.read_bytes()) < 1000
    t0 = time.time()
    assert cli.main(["validate", str(p)]) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LAB_MAX_SPEC_VALUES" in err and str(p) in err


def test_recursive_alias_and_small_aliases(tmp_path, monkeypatch):
    p = tmp_path / "rec.yaml"
    p.write_text("name: r\nx: &x [1, *x]\n")
    with pytest.raises(S.SpecError, match="refers to itself"):
        S.load_spec(p)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: ok\ntrain: &t {lr: 0.002}\nvariants: {a: {train: *t}, b: {train: *t}}\n")
    assert S.load_spec(ok).variants["b"]["train"]["lr"] == 0.002
    monkeypatch.setenv("LAB_MAX_SPEC_VALUES", "5")
    with pytest.raises(S.SpecError, match="more than 5 values"):
        S.load_spec(ok)


def test_huge_grid_is_refused_before_expanding(write_spec, capsys, monkeypatch):
    doc = tiny_spec_dict()
    doc["grid"] = {"train.lr": [1e-3 * (i + 1) for i in range(1000)], "train.seed": list(range(1000))}
    p = write_spec(doc)
    t0 = time.time()
    assert cli.main(["validate", str(p)]) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err
    assert "1000000 runs" in err and "LAB_MAX_VARIANTS" in err
    monkeypatch.setenv("LAB_MAX_VARIANTS", "4")
    doc["grid"] = {"train.lr": [1e-3, 2e-3], "train.seed": [0, 1]}
    assert cli.main(["validate", str(write_spec(doc))]) == 0
    doc["grid"]["train.seed"] = [0, 1, 2]
    assert cli.main(["validate", str(write_spec(doc))]) == 2


def test_non_utf8_and_flow_style_env(tmp_path, write_spec, capsys, monkeypatch):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert cli.main(["validate", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not UTF-8" in err and "0xe9" in err
    monkeypatch.setenv("IMAGENET_ROOT", str(tmp_path))
    q = tmp_path / "flow.yaml"
    q.write_text('name: f\ndata: {dataset: imagefolder, root: "${IMAGENET_ROOT}", image_size: 224}\n')
    assert S.load_spec(q).data.root == str(tmp_path)  # the README's example, quoted
    q.write_text("name: f\ndata: {dataset: imagefolder, root: ${IMAGENET_ROOT}, image_size: 224}\n")
    with pytest.raises(S.SpecError, match=r'write "\$\{VAR\}" in quotes'):
        S.load_spec(q)


def test_validate_catches_zero_classes(write_spec, capsys):
    doc = tiny_spec_dict()
    doc["model"]["num_classes"] = 0
    assert cli.main(["validate", str(write_spec(doc))]) == 2
    assert "model.num_classes" in capsys.readouterr().err


def test_unreachable_server_and_unusable_store_are_one_line(write_spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAB_TRACKING_TIMEOUT", "2")
    p = write_spec(tiny_spec_dict(tracking={"uri": "http://127.0.0.1:9"}))
    t0 = time.time()
    assert cli.main(["run", str(p), "--no-progress"]) == 2
    assert time.time() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "http://127.0.0.1:9" in err and "unreachable" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    p = write_spec(tiny_spec_dict(tracking={"uri": f"sqlite:///{blocker}/sub/mlflow.db"}))
    assert cli.main(["run", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot create the tracking store folder" in err
    bad_db = tmp_path / "bad" / "mlflow.db"
    bad_db.parent.mkdir()
    bad_db.write_text("this is not sqlite")
    p = write_spec(tiny_spec_dict(tracking={"uri": f"sqlite:///{bad_db}"}))
    assert cli.main(["run", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot open the tracking store" in err
