"""`model.init` (start a variant from weights) and `lab export` (fused ONNX / TorchScript /
torch.export checked against PyTorch): tiny models, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import grafts
from lab import cli, track
from lab import spec as S
from lab.errors import SpecError
from lab.export import export_model
from lab.runner import order_variants, run_experiment

from conftest import tiny_spec_dict


def _expand(write_spec, doc):
    spec = S.load_spec(write_spec(doc))
    return spec, S.expand(spec)


@pytest.mark.parametrize(
    "init, words",
    [
        ({}, "exactly one"),
        ({"checkpoint": "a.pt", "variant": "base"}, "exactly one"),
        ({"variant": "bsae"}, "no variant named 'bsae'"),
        ({"variant": "../x/y"}, "EXPERIMENT/KEY"),
        ({"checkpoint": "a.pt", "inclde": ["prefix."]}, "unknown key 'inclde'"),
    ],
)
def test_init_spec_errors_name_the_field(write_spec, init, words):
    doc = tiny_spec_dict()
    doc["variants"] = {"base": {}, "ft": {"model": {"init": init}}}
    with pytest.raises(SpecError) as ei:
        _expand(write_spec, doc)
    assert words in str(ei.value) and "model.init" in str(ei.value)


def test_init_is_hashed_and_orders_variants(write_spec):
    doc = tiny_spec_dict()
    doc["variants"] = {"ft": {"model": {"init": {"variant": "base"}}}, "base": {}}
    _, vs = _expand(write_spec, doc)
    ft, base = vs
    assert ft.init.variant == "base" and "init" not in ft.model and ft.hash != base.hash
    assert ft.resolved()["model"]["init"]["variant"] == "base"
    assert [v.key for v in order_variants(vs)] == ["base", "ft"]


@pytest.mark.slow
def test_finetune_from_a_finished_variant_at_a_new_resolution(store, write_spec):
    doc = tiny_spec_dict(name="pre")
    _, vs = _expand(write_spec, doc)
    spec, _ = _expand(write_spec, doc)
    assert run_experiment(spec, vs, progress=False)[0].status == "finished"
    # a second experiment fine-tunes pre/base at 24 px (position embedding resized); head kept
    doc2 = tiny_spec_dict(name="ft")
    doc2["data"]["image_size"] = 24
    doc2["model"] = dict(doc2["model"], img_size=24, init={"variant": "pre/base"})
    spec2, vs2 = _expand(write_spec, doc2)
    res = run_experiment(spec2, vs2, progress=False)
    assert res[0].status == "finished", res[0].error
    run = track.client(store).get_run(res[0].run_id)
    t = run.data.tags
    assert t["lab.init.source"].startswith("pre/base (run ")
    assert t["lab.init.resized"] == "1" and t["lab.init.random"] == "0"
    rep = json.loads(track.download_artifact(track.client(store), run.info.run_id, "init_report.json").read_text())
    assert rep["resized"] == ["pos_embed"] and "head.fc.weight" in rep["loaded"]


@pytest.mark.slow
def test_init_from_timm_file_only_the_prefix(store, write_spec, tmp_path):
    """A timm resnet50 state dict on disk; only the ResNet stages (include: [prefix.]) are used."""
    f = tmp_path / "resnet50.pth"
    ref = timm.create_model("resnet50")
    torch.save(ref.state_dict(), f)
    doc = tiny_spec_dict(name="graft")
    doc["model"] = {
        "zoo": "resnet1_deit9",
        "img_size": 16,
        "grid": 2,
        "num_classes": 4,
        "stages": [{"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
        "init": {"checkpoint": str(f), "include": ["prefix."]},
    }
    doc["budget"] = {"steps": 2}
    spec, vs = _expand(write_spec, doc)
    res = run_experiment(spec, vs, progress=False)
    assert res[0].status == "finished", res[0].error
    t = track.client(store).get_run(res[0].run_id).data.tags
    assert t["lab.init.source"] == str(f)
    n_prefix = len(
        [
            k
            for k in grafts.build({k: v for k, v in doc["model"].items() if k != "init"}).state_dict()
            if k.startswith("prefix.")
        ]
    )
    assert int(t["lab.init.loaded"]) == n_prefix and int(t["lab.init.random"]) > 0


def test_missing_init_checkpoint_is_exit_2(store, write_spec, capsys):
    doc = tiny_spec_dict()
    doc["model"] = dict(doc["model"], init={"checkpoint": "nope.pt"})
    assert cli.main(["run", str(write_spec(doc)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "init checkpoint not found: nope.pt" in err and "model.init.checkpoint" in err


@pytest.mark.parametrize(
    "over",
    [
        {
            "zoo": "levit_128s",
            "img_size": 32,
            "num_classes": 5,
            "stages": [
                {"dim": 32, "depth": 1, "heads": 2, "key_dim": 8, "attn_ratio": 2.0, "mlp_ratio": 2.0},
                {"dim": 48, "depth": 1, "heads": 2, "key_dim": 8, "attn_ratio": 2.0, "mlp_ratio": 2.0},
            ],
        },
        {
            "zoo": "resnet1_deit9",
            "img_size": [32, 48],
            "grid": [2, 3],
            "num_classes": 5,
            "stages": [{"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
        },
    ],
)
def test_export_model_onnx_matches_pytorch(tmp_path, over):
    torch.manual_seed(0)
    m = grafts.build(over)
    with torch.no_grad():  # non-trivial BN statistics and zero-init branches
        for p in m.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_var.uniform_(0.5, 1.5)
                mod.running_mean.normal_(0, 0.1)
    rep = export_model(m, tmp_path, name="tiny", formats=("onnx", "torchscript"))
    by = {r.format: r for r in rep.results}
    assert by["onnx"].ok and by["onnx"].max_abs_diff <= rep.tolerance and (tmp_path / "tiny.onnx").is_file()
    assert by["torchscript"].ok, by["torchscript"].error
    import onnx

    proto = onnx.load(str(tmp_path / "tiny.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # fused
    assert json.loads((tmp_path / "tiny.export.json").read_text())["results"][0]["format"] == "onnx"


@pytest.mark.slow
def test_lab_export_cli_finished_variant(store, write_spec, capsys):
    doc = tiny_spec_dict(name="exp")
    path = write_spec(doc)
    assert cli.main(["run", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(path), "--variant", "base", "--format", "onnx,torch_export"]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "ok" in out
    assert Path("exports/exp/base/base.onnx").is_file() and Path("exports/exp/base/base.pt2").is_file()
    assert cli.main(["export", str(path), "--variant", "nope"]) == 2


def test_model_and_data_sizes_must_agree_before_training(store, write_spec, capsys):
    doc = tiny_spec_dict()
    doc["data"]["image_size"] = 24  # the model stays at 16
    assert cli.main(["run", str(write_spec(doc)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.img_size 16 differs from data.image_size 24" in err and "dynamic_img_size" in err
