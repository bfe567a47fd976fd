"""Paths built from user text stay under their root (lab.paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import paths, track
from lab.spec import ExperimentSpec, expand

HOSTILE = [
    "..",
    ".",
    "",
    "/",
    "/etc/passwd",
    "x/../../../../elsewhere",
    "../..",
    "a\\..\\b",
    "~root",
    "name with spaces",
    "ünïcødé",
    "a\x00b",
    "-rf",
    ".hidden",
    "a" * 500,
    "C:\\Windows",
    "..a",
    "a..b",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_slug_is_one_safe_component(text, tmp_path):
    s = paths.slug(text)
    assert s and s not in (".", "..") and "/" not in s and "\\" not in s and ".." not in s
    assert not s.startswith((".", "-"))
    assert len(s) <= paths.MAX_SLUG + 9
    assert (tmp_path / s).resolve().parent == tmp_path.resolve()


def test_slug_keeps_plain_names_and_separates_lookalikes():
    assert paths.slug("levit_128s") == "levit_128s"
    assert paths.slug("depth=2-lr=0.001") == "depth=2-lr=0.001"
    assert paths.slug("a/b") != paths.slug("a_b")
    assert paths.slug("a/b") != paths.slug("a:b")


def test_inside_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert paths.inside(root, root / "a" / "b") == (root / "a" / "b").resolve()
    for bad in (root / ".." / "x", tmp_path, Path("/etc/passwd")):
        with pytest.raises(paths.PathEscape):
            paths.inside(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(paths.PathEscape):
        paths.inside(root, root / "link" / "x")


def test_safe_rmtree_never_deletes_outside(tmp_path):
    root = tmp_path / "store" / "checkpoints"
    victim = tmp_path / "elsewhere"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    root.mkdir(parents=True)
    with pytest.raises(paths.PathEscape):
        paths.safe_rmtree(root / ".." / ".." / "elsewhere", root)
    with pytest.raises(paths.PathEscape):
        paths.safe_rmtree(root, root)
    assert (victim / "keep.txt").read_text() == "precious"
    (root / "x").mkdir()
    paths.safe_rmtree(root / "x", root)
    assert not (root / "x").exists()


def test_checkpoint_dir_from_hostile_grid_value_and_names(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    spec = ExperimentSpec.model_validate(
        {
            "name": "..",
            "model": {"zoo": "deit_tiny", "img_size": 16, "patch_size": 4, "num_classes": 4},
            "data": {"dataset": "synthetic"},
            "tracking": {"uri": uri, "experiment": "/abs/../../x"},
            "grid": {"data.root": ["x/../../../../elsewhere", "/etc"]},
        }
    )
    variants = expand(spec)
    root = (tmp_path / "store" / "checkpoints").resolve()
    dirs = set()
    for v in variants:
        d = track.checkpoint_dir(v, uri).resolve()
        assert root in d.parents and d.parent.parent == root
        dirs.add(d)
    assert len(dirs) == len(variants)


def test_checkpoints_are_keyed_by_mlflow_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    doc = {
        "name": "same",
        "model": {"zoo": "deit_tiny", "img_size": 16, "patch_size": 4, "num_classes": 4},
        "data": {"dataset": "synthetic"},
    }
    a = expand(ExperimentSpec.model_validate({**doc, "tracking": {"experiment": "exp-a"}}))[0]
    b = expand(ExperimentSpec.model_validate({**doc, "tracking": {"experiment": "exp-b"}}))[0]
    assert a.hash == b.hash
    assert track.checkpoint_dir(a, uri) != track.checkpoint_dir(b, uri)


def test_plot_default_output_stays_in_out(tmp_path, monkeypatch):
    from lab.cli.plot import out_stem

    monkeypatch.chdir(tmp_path)
    for name in ("../../evil", "/abs/evil", "a/../../b"):
        stem = out_stem(None, f"{name}_pareto_cpu")
        assert (tmp_path / "out").resolve() in stem.resolve().parents
        stem = out_stem(str(tmp_path / "figs") + "/", name)
        assert (tmp_path / "figs").resolve() in stem.resolve().parents
