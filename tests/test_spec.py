"""Specs: strict validation, extends, ${ENV}, variants x grid, hashes, and the CLI's exit-2 errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lab import spec as S
from lab.cli import main
from lab.errors import SpecError

TINY_MODEL = """
model:
  zoo: deit_tiny
  img_size: 32
  patch_size: 8
  num_classes: 10
  stages: [{dim: 48, depth: 1, heads: 3}]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def spec_text(extra: str = "") -> str:
    return "name: demo\n" + TINY_MODEL + "budget: {steps: 5}\n" + textwrap.dedent(extra)


def err(path: Path, **kw) -> SpecError:
    with pytest.raises(SpecError) as e:
        S.expand(S.load_spec(path, kw.get("overrides")))
    return e.value


def test_minimal_spec_expands_to_one_variant(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text())
    vs = S.expand(S.load_spec(p))
    assert [v.key for v in vs] == ["base"]
    assert vs[0].budget.kind == "steps" and vs[0].budget.steps == 5
    assert vs[0].model["stages"][0]["dim"] == 48  # zoo entry resolved, override kept
    assert vs[0].model["position"] == "absolute"  # inherited from deit_tiny
    assert len(vs[0].hash) == 12


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as e:
        S.load_spec(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value) and "not found" in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "name: x\ndata:\n  image_size: [1, 2\nbudget: {steps: 1}\n")
    with pytest.raises(SpecError) as e:
        S.load_spec(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "line 4" in msg and "YAML syntax" in msg


def test_unknown_key_has_dotted_path_and_close_match(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text("train:\n  lrr: 0.1\n"))
    e = err(p)
    assert e.path == "train.lrr"
    assert "did you mean 'lr'" in e.message and "a.yaml" in str(e)


def test_nested_unknown_key(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text("data:\n  augment: {mixupp: 0.8}\n"))
    e = err(p)
    assert e.path == "data.augment.mixupp" and "'mixup'" in e.message


def test_wrong_type_and_range_say_what_is_allowed(tmp_path):
    e = err(write(tmp_path, "a.yaml", spec_text("data: {batch_size: many}\n")))
    assert e.path == "data.batch_size" and "integer" in e.message and "'many'" in e.message
    e = err(write(tmp_path, "b.yaml", spec_text("data: {batch_size: 0}\n")))
    assert e.path == "data.batch_size" and "allowed: >= 1" in e.message
    e = err(write(tmp_path, "c.yaml", spec_text("data: {dataset: cifar}\n")))
    assert e.path == "data.dataset" and "embedded" in e.message and "imagefolder" in e.message


def test_budget_needs_exactly_one_kind(tmp_path):
    p = write(tmp_path, "a.yaml", "name: demo\n" + TINY_MODEL + "budget: {steps: 5, epochs: 1}\n")
    e = err(p)
    assert e.path == "budget" and "exactly one" in e.message


def test_extends_deep_merge_child_wins(tmp_path):
    write(tmp_path, "base.yaml", spec_text("train: {lr: 0.1, weight_decay: 0.3}\n"))
    p = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\ntrain: {lr: 0.2}\n")
    v = S.expand(S.load_spec(p))[0]
    assert v.experiment == "child" and v.train.lr == 0.2 and v.train.weight_decay == 0.3


def test_extends_cycle_detected(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(SpecError) as e:
        S.load_spec(tmp_path / "a.yaml")
    assert "cycle" in e.value.message and "a.yaml -> b.yaml -> a.yaml" in e.value.message
    assert e.value.path == "extends"


def test_env_interpolation(tmp_path, monkeypatch):
    p = write(tmp_path, "a.yaml", spec_text("data: {dataset: imagefolder, root: '${LAB_TEST_ROOT}/imnet'}\n"))
    monkeypatch.delenv("LAB_TEST_ROOT", raising=False)
    with pytest.raises(SpecError) as e:
        S.load_spec(p)
    assert e.value.path == "data.root" and "LAB_TEST_ROOT" in e.value.message and "not set" in e.value.message
    monkeypatch.setenv("LAB_TEST_ROOT", "/data")
    assert S.load_spec(p).data.root == "/data/imnet"
    q = write(tmp_path, "b.yaml", spec_text("data: {dataset: imagefolder, root: '${LAB_UNSET_X:-/fallback}'}\n"))
    assert S.load_spec(q).data.root == "/fallback"


def test_variants_override_and_unknown_override_key(tmp_path):
    p = write(
        tmp_path,
        "a.yaml",
        spec_text("""
        variants:
          base: {}
          bias: {model: {position: attention_bias}}
          lr: {train: {lr: 0.01}}
        reference:
          bias: {top1: 70.4, params_m: 7.4}
        """),
    )
    vs = S.expand(S.load_spec(p))
    assert [v.key for v in vs] == ["base", "bias", "lr"]
    assert vs[1].model["position"] == "attention_bias" and vs[0].model["position"] == "absolute"
    assert vs[1].reference.top1 == 70.4 and vs[0].reference is None
    assert len({v.hash for v in vs}) == 3
    assert S.describe_overrides(vs[2].overrides) == "train.lr=0.01"

    q = write(tmp_path, "b.yaml", spec_text("variants:\n  x: {trian: {lr: 1}}\n"))
    e = err(q)
    assert e.path == "variants.x.trian" and "'train'" in e.message
    r = write(tmp_path, "c.yaml", spec_text("variants:\n  x: {train: {lrate: 1}}\n"))
    e = err(r)
    assert e.path == "variants.x.train.lrate"
    m = write(tmp_path, "d.yaml", spec_text("variants:\n  x: {model: {positon: none}}\n"))
    e = err(m)
    assert e.path.startswith("variants.x.model") and "positon" in str(e) and "position" in e.message


def test_reference_must_name_a_variant(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text("variants: {base: {}, bias: {}}\nreference: {bais: {top1: 1}}\n"))
    e = err(p)
    assert e.path == "reference.bais" and "'bias'" in e.message


def test_grid_is_cartesian_with_stable_keys(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text("grid:\n  train.lr: [0.1, 0.01]\n  model.stages.0.depth: [1, 2]\n"))
    vs = S.expand(S.load_spec(p))
    assert [v.key for v in vs] == ["lr=0.1-depth=1", "lr=0.1-depth=2", "lr=0.01-depth=1", "lr=0.01-depth=2"]
    assert vs[3].train.lr == 0.01 and vs[3].model["stages"][0]["depth"] == 2
    # same spec, same hashes; hashes ignore tracking/bench
    again = S.expand(S.load_spec(p, S.parse_set(["tracking.experiment=other", "bench.threads=2"])))
    assert [v.hash for v in again] == [v.hash for v in vs]


def test_set_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", spec_text())
    v = S.expand(S.load_spec(p, S.parse_set(["budget.steps=7", "train.lr=3e-4"])))[0]
    assert v.budget.steps == 7 and v.train.lr == pytest.approx(3e-4)


def test_safe_loader_refuses_python_tags(tmp_path):
    p = write(tmp_path, "a.yaml", "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError) as e:
        S.load_spec(p)
    assert "YAML" in e.value.message


def test_model_errors_name_the_field(tmp_path):
    e = err(
        write(tmp_path, "a.yaml", spec_text("variants:\n  x: {model: {stages: [{dim: 50, depth: 1, heads: 3}]}}\n"))
    )
    assert e.path.startswith("variants.x.model.stages") and "heads" in str(e)
    e = err(write(tmp_path, "b.yaml", spec_text("variants:\n  x: {model: {zoo: levit_999}}\n")))
    assert "levit_128s" in e.message


# ------------------------------------------------------------------ CLI


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", spec_text())
    bad = write(tmp_path, "bad.yaml", spec_text("train: {lrr: 1}\n"))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), str(bad)]) == 2
    out = capsys.readouterr()
    assert "bad.yaml: train.lrr: unknown key" in out.err and "Traceback" not in out.err


def test_cli_show_json_is_one_document(tmp_path, capsys):
    p = write(
        tmp_path,
        "a.yaml",
        spec_text("variants: {base: {}, bias: {model: {position: attention_bias}}}\nreference: {bias: {top1: 70.4}}\n"),
    )
    assert main(["show", str(p), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == ["base", "bias"]
    assert all(isinstance(r["params"], int) and isinstance(r["macs"], int) for r in rows)
    assert rows[1]["reference"] == {"top1": 70.4}
    # attention bias: a heads x (4 x 4 offsets) table per block replaces the learned position
    # embedding of (cls + 4 x 4 tokens) x dim (LeViT section 4.2; 32 px / patch 8 = a 4 x 4 grid)
    assert rows[1]["params"] - rows[0]["params"] == 3 * 16 - (1 + 16) * 48
    assert main(["show", str(p), "--variant", "bias"]) == 0
    assert "attention_bias" in capsys.readouterr().out


def test_python_m_lab_runs_without_traceback(tmp_path):
    bad = write(tmp_path, "bad.yaml", "name: x\nbudget: {steps: 1}\ndata: {image_size: -3}\n")
    r = subprocess.run([sys.executable, "-m", "lab", "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "data.image_size" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "lab", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "validate" in r.stdout and "show" in r.stdout


def test_changes_are_described_against_the_baseline_variant(tmp_path):
    # the baseline itself overrides the base section: the other rows must show what differs
    # from *it*, including the base value where the baseline's override does not apply to them
    p = write(
        tmp_path,
        "a.yaml",
        spec_text("""
        baseline: small
        variants:
          small: {model: {stages: [{dim: 48, depth: 2, heads: 3}]}, train: {lr: 0.01}}
          plain: {}
          bias: {model: {position: attention_bias, stages: [{dim: 48, depth: 2, heads: 3}]}, train: {lr: 0.01}}
        grid: {train.weight_decay: [0.0]}
        """),
    )
    vs = {v.key: v for v in S.expand(S.load_spec(p))}
    assert vs["small-weight_decay=0.0"].changes == "(baseline)"
    assert vs["bias-weight_decay=0.0"].changes == "model.position=attention_bias"
    plain = vs["plain-weight_decay=0.0"].changes
    assert "train.lr=0.001" in plain and '"depth": 1' in plain, plain


def test_launch_section_is_validated_and_cli_flags_win(tmp_path):
    import argparse

    from lab.cli.run import launch_options, register

    p = write(
        tmp_path,
        "a.yaml",
        spec_text("""
        launch:
          launcher: slurm
          slurm: {partition: gpu, time: 2880, setup: ["module load cuda"], params: {mail_type: END}}
        """),
    )
    spec = S.load_spec(p)
    assert spec.launch.launcher == "slurm" and spec.launch.slurm.time == 2880
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "run",
            str(p),
            "--slurm-partition",
            "big",
            "--slurm-setup",
            "ulimit -n 4096",
            "--slurm-param",
            "mail_user=me@x",
        ]
    )
    o = launch_options(args, spec.launch)
    assert o.slurm_partition == "big" and o.slurm_time == 2880 and o.slurm_cluster == "slurm"
    assert o.slurm_setup == ["module load cuda", "ulimit -n 4096"]
    assert o.slurm_params == {"mail_type": "END", "mail_user": "me@x"}
    assert args.launcher is None  # -> the spec's launcher

    e = err(write(tmp_path, "b.yaml", spec_text("launch: {slurm: {partiton: gpu}}\n")))
    assert e.path == "launch.slurm.partiton" and "partition" in str(e)
    e = err(write(tmp_path, "c.yaml", spec_text("launch: {launcher: k8s}\n")))
    assert e.path == "launch.launcher" and "slurm" in str(e)
