"""lab.fold (BatchNorm folding), lab.bench (the batch search, throughput figures and their metadata),
lab.match (runtime matching: synthetic cost model and real tiny models), the `bench` subcommand."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
import torch.nn as nn

from lab import bench as B
from lab import device as D
from lab import fold as F
from lab import match as MT
from lab.errors import LabError

FAST = dict(warmup=0.0, duration=0.05, repeats=2)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding is really exercised
    (zero-initialised residual BNs would otherwise make branches vanish)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _assert_fold_keeps_outputs(model: nn.Module, img_size: int) -> B.ThroughputResult | None:
    model = _randomize_bn(model)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ref = model(x)
    fused, ok, how = F.prepare_for_inference(copy.deepcopy(model))
    assert ok, how
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():
        out = fused(x)
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item() + 1e-6), (out - ref).abs().max()
    return how


# --------------------------------------------------------------------------- folding


def test_fold_plain_sequential_conv_bn():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    how = _assert_fold_keeps_outputs(model, 8)
    assert "2 folded" in how


def test_fold_timm_levit_and_resnet():
    timm = pytest.importorskip("timm")
    lv = timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=10)
    assert "folded" in _assert_fold_keeps_outputs(lv, 64)
    rn = timm.create_model("resnet18", pretrained=False, num_classes=10)
    assert "folded" in _assert_fold_keeps_outputs(rn, 32)


def test_fold_grafts_levit_keeps_outputs():
    grafts = pytest.importorskip("grafts")
    model = grafts.build({"zoo": "levit_128s", "img_size": 64, "num_classes": 10})
    assert _assert_fold_keeps_outputs(model, 64).startswith("grafts.fuse")


def test_fold_grafts_resnet_graft_keeps_outputs():
    grafts = pytest.importorskip("grafts")
    cfg = {
        "zoo": "resnet1_deit9",
        "img_size": 32,
        "grid": 2,
        "num_classes": 10,
        "stages": [{"dim": 64, "depth": 2, "heads": 2, "key_dim": None, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
    }
    model = grafts.build(cfg)
    assert _assert_fold_keeps_outputs(model, 32).startswith("grafts.fuse")


TINY_DEIT = [{"dim": 64, "depth": 2, "heads": 2, "key_dim": None, "attn_ratio": 1.0, "mlp_ratio": 2.0}]


@pytest.mark.parametrize(
    "cfg, size",
    [
        ({"zoo": "deit_tiny", "img_size": 32, "num_classes": 10, "stages": TINY_DEIT}, 32),  # DeiT (SDPA, GELU)
        (
            {"zoo": "resnet0_deit12", "img_size": 32, "num_classes": 10, "stages": TINY_DEIT, "distillation": True},
            32,
        ),  # DeiT-S graft, k = 0
        (
            {
                "zoo": "resnet2_deit6",
                "img_size": 64,
                "grid": 4,
                "num_classes": 10,
                "norm": "batchnorm",
                "stages": TINY_DEIT,
            },
            64,
        ),  # BN bridge + BN heads
        ({"zoo": "resnet4_deit0", "img_size": 32, "num_classes": 10}, 32),  # pure ResNet-50
    ],
)
def test_fold_grafts_deit_and_resnet_grafts_keep_outputs(cfg, size):
    grafts = pytest.importorskip("grafts")
    assert _assert_fold_keeps_outputs(grafts.build(cfg), size).startswith("grafts.fuse")


def test_fold_grafts_inference_mode_matches_and_is_repeatable():
    """The bench runs the fused copy under inference_mode (cached biases, in-place paths)."""
    grafts = pytest.importorskip("grafts")
    model = _randomize_bn(grafts.build({"zoo": "levit_128s", "img_size": 64, "num_classes": 10}))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    fused, ok, _ = F.prepare_for_inference(copy.deepcopy(model))
    with torch.inference_mode():
        a, b = fused(x), fused(x)
    assert ok and torch.equal(a, b)
    assert torch.allclose(a, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item() + 1e-6)


# --------------------------------------------------------------------------- batch search


def test_batch_search_largest_power_of_two_under_memory_cap():
    mib = 2**20
    tried = []

    def try_fn(b):  # 10 MiB of weights + 3 MiB per image
        tried.append(b)
        return 10 * mib + 3 * mib * b

    assert B.find_max_batch(try_fn, 2048, mem_cap_bytes=100 * mib) == 16  # 58 MiB fits, 106 does not
    assert tried == [1, 2, 4, 8, 16, 32]
    assert B.find_max_batch(try_fn, 48, mem_cap_bytes=10**12) == 32  # capped by max_batch, power of two
    assert B.find_max_batch(lambda b: None, 8) == 8  # unknown peak: only OOM limits


def test_batch_search_treats_oom_as_not_fitting():
    def try_fn(b):
        if b >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0

    assert B.find_max_batch(try_fn, 2048) == 32

    def runtime_oom(b):
        if b > 4:
            raise RuntimeError("CUDA error: out of memory")
        return 0

    assert B.find_max_batch(runtime_oom, 2048) == 4


def test_batch_search_nothing_fits_is_a_clear_error():
    with pytest.raises(B.BatchSearchError, match="not even 1.*cap"):
        B.find_max_batch(lambda b: 2**30 * b, 2048, mem_cap_bytes=2**20)
    with pytest.raises(LabError, match="not even 1.*out of memory"):
        B.find_max_batch(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out of memory")), 16)


def test_batch_search_propagates_real_errors():
    def broken(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        B.find_max_batch(broken, 16)


# --------------------------------------------------------------------------- figures


def _tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_figures_carry_their_metadata_and_threads_are_restored():
    before = torch.get_num_threads()
    r = B.measure_throughput(_tiny_net(), img_size=16, **FAST)
    assert torch.get_num_threads() == before
    assert r.device == "cpu" and r.device_name and r.device_name == D.device_name("cpu")
    assert (r.dtype, r.batch, r.threads, r.torch_version) == ("fp32", 16, 1, torch.__version__)
    assert r.fused and "folded" in r.fusion and not r.compiled and not r.channels_last
    assert len(r.samples) == 2 and r.images_per_s_min <= r.images_per_s_median <= r.images_per_s_max
    assert all(s > 0 for s in r.samples) and r.img_size == 16
    meta = r.metadata()
    for k in ("device_name", "dtype", "batch", "threads", "torch", "compiled", "channels_last"):
        assert meta[k], k
    json.dumps(r.as_dict())  # serialisable as is


def test_measure_options_batch_threads_channels_last_bf16():
    r = B.measure_throughput(_tiny_net(), img_size=16, batch=4, threads=2, channels_last=True, dtype="bf16", **FAST)
    assert (r.batch, r.threads, r.channels_last, r.dtype) == (4, 2, True, "bf16")


def test_measure_many_interleaves_and_reports_each():
    lines = []
    res = B.measure_many({"a": _tiny_net(), "b": _tiny_net()}, img_size=16, progress=lines.append, **FAST)
    assert set(res) == {"a", "b"}
    order = [ln.split(":")[0].strip() for ln in lines if "repeat" in ln]
    assert order == ["a", "b", "b", "a"]  # ABBA


def test_unknown_dtype_and_missing_gpu_are_lab_errors():
    with pytest.raises(LabError, match="dtype"):
        B.measure_throughput(_tiny_net(), img_size=16, dtype="int8", **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(LabError, match="no GPU"):
            B.measure_throughput(_tiny_net(), img_size=16, device="cuda", **FAST)


def test_auto_device_without_gpu_measures_on_cpu():
    """GPU code paths import and stay out of the way on a CPU-only machine."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: 'auto' picks it")
    assert D.resolve_device("auto") == "cpu" and D.default_dtype("cpu") == "fp32"
    r = B.measure_throughput(_tiny_net(), img_size=16, device="auto", **FAST)
    assert (r.device, r.dtype, r.batch, r.threads) == ("cpu", "fp32", B.CPU_BATCH, 1)
    assert r.device_name == D.device_name("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_largest_batch_bf16_and_memory_cap():
    r = B.measure_throughput(_tiny_net(), img_size=32, device="cuda", max_batch=64, **FAST)
    assert r.device == "cuda" and r.dtype == "bf16" and r.batch == 64
    assert r.device_name == torch.cuda.get_device_name()
    base = B.measure_throughput(_tiny_net(), img_size=32, device="cuda", batch=1, **FAST)
    assert base.batch == 1
    # a cap below what batch 1 needs: nothing fits
    with pytest.raises(B.BatchSearchError):
        B.measure_throughput(_tiny_net(), img_size=32, device="cuda", mem_cap_bytes=1, **FAST)
    r16 = B.measure_throughput(_tiny_net(), img_size=32, device="cuda", dtype="fp16", batch=8, **FAST)
    assert r16.dtype == "fp16"


# --------------------------------------------------------------------------- runtime matching


def _spec(tmp_path, body: str):
    from lab import spec as S

    p = tmp_path / "m.yaml"
    p.write_text(textwrap.dedent(body))
    return S.expand(S.load_spec(p))


TINY_STAGE = "{dim: 32, depth: %d, heads: 2, key_dim: 16, attn_ratio: 2.0, mlp_ratio: 2.0}"
MATCH_SPEC = f"""
    name: match_test
    data: {{dataset: synthetic, image_size: 32}}
    model: {{zoo: levit_128s, img_size: 32, num_classes: 10, distillation: false,
            stages: [{TINY_STAGE % 1}]}}
    bench: {{threads: 1}}
    variants:
      target: {{model: {{stages: [{TINY_STAGE % 4}]}}}}
      sized:
        match: {{throughput_of: target, vary: model.stages.0.depth, values: [1, 2, 4, 8]}}
"""


def test_matcher_finds_depth_on_a_synthetic_cost_model(tmp_path):
    pytest.importorskip("grafts")
    variants = _spec(
        tmp_path,
        MATCH_SPEC.replace(
            "target: {model: {stages: [" + TINY_STAGE % 4, "target: {model: {stages: [" + TINY_STAGE % 3
        ),
    )
    sized = next(v for v in variants if v.key == "sized")
    seen = []

    def cost(cfg, *, device):  # throughput = k / depth
        seen.append(cfg["stages"][0]["depth"])
        return 1200.0 / cfg["stages"][0]["depth"]

    r = MT.match_throughput(sized, variants, measure_fn=cost)
    assert seen == [3, 1, 2, 4, 8]  # target first, then every candidate once
    assert r.value == 4  # 300 img/s is nearest 400 (|d| 100) vs 600 (|d| 200)
    assert r.target_imgs_per_s == 400 and r.candidates == {1: 1200, 2: 600, 4: 300, 8: 150}
    assert r.miss_pct == pytest.approx(-25.0)
    v = r.variant
    assert v.model["stages"][0]["depth"] == 4 and v.match is None
    assert v.hash != sized.hash and v.tags["match.value"] == "4" and v.tags["match.miss_pct"] == "-25.00"
    # the hash is the content's: matching again gives it again (skip/resume find the run), another value not
    assert MT.match_throughput(sized, variants, measure_fn=cost).variant.hash == v.hash
    other = MT.match_throughput(
        sized,
        variants,  # target (depth 3) and depth 2 both at 600 img/s
        measure_fn=lambda cfg, *, device: {2: 600.0, 3: 600.0}.get(cfg["stages"][0]["depth"], 1.0),
    )
    assert other.value == 2 and other.variant.hash not in (v.hash, sized.hash)
    # an exact candidate: no miss; resolve_match returns the variant and prints the miss
    lines = []
    v2 = MT.resolve_match(
        sized.model_copy(update={"match": sized.match.model_copy(update={"values": [2, 3]})}),
        variants,
        measure_fn=cost,
        progress=lines.append,
    )
    assert v2.model["stages"][0]["depth"] == 3 and "misses by +0.0%" in lines[-1]
    # no match section: unchanged
    target = next(v for v in variants if v.key == "target")
    assert MT.resolve_match(target, variants, measure_fn=cost) is target


def test_matcher_against_a_zoo_name_and_errors(tmp_path):
    pytest.importorskip("grafts")
    variants = _spec(tmp_path, MATCH_SPEC)
    sized = next(v for v in variants if v.key == "sized")

    def cost(cfg, *, device):
        return 1000.0 / sum(s["depth"] for s in cfg["stages"])

    zoo = sized.model_copy(update={"match": sized.match.model_copy(update={"throughput_of": "levit_128s"})})
    r = MT.match_throughput(zoo, variants, measure_fn=cost)  # levit_128s: 2+3+4 blocks -> depth 8 nearest 9
    assert r.value == 8 and r.target == "levit_128s"
    bad = sized.model_copy(update={"match": sized.match.model_copy(update={"vary": "model.stages.5.depth"})})
    with pytest.raises(LabError, match=r"match\.vary.*does not exist"):
        MT.match_throughput(bad, variants, measure_fn=cost)
    bad = sized.model_copy(update={"match": sized.match.model_copy(update={"throughput_of": "levit_12s"})})
    with pytest.raises(LabError, match="neither a variant.*did you mean 'levit_128s'"):
        MT.match_throughput(bad, variants, measure_fn=cost)
    bad = sized.model_copy(update={"match": sized.match.model_copy(update={"values": [0, -1]})})
    with pytest.raises(LabError, match=r"depth=0 is not a valid model") as e:
        MT.match_throughput(bad, variants, measure_fn=cost)
    assert e.value.path == "variants.sized.match.values"


def test_matcher_on_a_real_tiny_model_picks_the_measured_nearest(tmp_path):
    pytest.importorskip("grafts")
    variants = _spec(tmp_path, MATCH_SPEC)
    sized = next(v for v in variants if v.key == "sized")
    real = MT.default_match_measure(sized.bench, warmup=0.05, duration=0.1, repeats=3)
    made: list[tuple[int, float]] = []

    def measured(cfg, *, device):
        ips = real(cfg, device=device)
        made.append((cfg["stages"][0]["depth"], ips))
        return ips

    r = MT.match_throughput(sized, variants, measure_fn=measured)
    (tdepth, target), cands = made[0], dict(made[1:])
    assert tdepth == 4 and set(cands) == {1, 2, 4, 8}
    nearest = min(cands, key=lambda d: abs(cands[d] - target))
    assert r.value == nearest and r.variant.model["stages"][0]["depth"] == nearest
    assert r.miss_pct == pytest.approx((cands[nearest] - target) / target * 100)
    assert r.variant.tags["match.miss_pct"] == f"{r.miss_pct:+.2f}"
    assert cands[1] > cands[8]  # deeper is slower, even this small


# --------------------------------------------------------------------------- bench CLI


def test_bench_json_is_one_document_with_timm_compare(capsys):
    pytest.importorskip("grafts")
    from lab.cli import main

    rc = main(
        [
            "bench",
            "--models",
            "levit_128s",
            "--batch",
            "2",
            "--warmup",
            "0",
            "--duration",
            "0.05",
            "--repeats",
            "1",
            "--compare",
            "timm",
            "--format",
            "json",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)  # exactly one JSON document on stdout
    (row,) = doc["rows"]
    assert row["model"] == "levit_128s" and row["timm_model"] == "levit_128s"
    assert 7.0e6 < row["params"] < 8.5e6 and 2.8e8 < row["macs"] < 3.2e8
    assert row["ratio"] == pytest.approx(row["result"]["images_per_s_median"] / row["timm"]["images_per_s_median"])
    for k in ("device", "device_name", "dtype", "batch", "threads", "torch_version"):
        assert row["result"][k] not in (None, ""), k
    assert row["result"]["batch"] == 2 and row["timm"]["fused"]
    assert "bench levit_128s" in err  # progress on stderr


def test_bench_spec_table_and_log_onto_mlflow_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("grafts")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from lab.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "s.yaml").write_text(
        textwrap.dedent(f"""
        name: bench_test
        data: {{dataset: synthetic, image_size: 32}}
        model: {{zoo: levit_128s, img_size: 32, num_classes: 10, stages: [{TINY_STAGE % 1}]}}
        bench: {{warmup: 0.0, duration: 0.05, repeats: 2}}
        variants:
          a: {{}}
          b: {{model: {{stages: [{TINY_STAGE % 2}]}}}}
    """)
    )
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench_test")
    child = {"lab.role": "variant", "lab.experiment": "bench_test", "lab.variant": "a"}
    old = client.create_run(exp, tags={**child, "lab.hash": "x"})
    client.set_terminated(old.info.run_id, "FINISHED")
    run = client.create_run(exp, tags={**child, "lab.hash": "y"})
    client.set_terminated(run.info.run_id, "FINISHED")
    failed = client.create_run(exp, tags=child)
    client.set_terminated(failed.info.run_id, "FAILED")

    rc = main(["bench", str(tmp_path / "s.yaml"), "--log"])
    out, err = capsys.readouterr()
    assert rc == 0
    header, *lines = out.strip().splitlines()
    for col in ("model", "params (M)", "MACs (M)", "img/s min", "img/s median", "img/s max", "timm img/s", "ratio"):
        assert col in header
    assert (
        lines[-1].startswith("device cpu (")
        and "dtype fp32" in lines[-1]
        and "batch 16" in lines[-1]
        and "threads 1" in lines[-1]
        and f"torch {torch.__version__}" in lines[-1]
    )
    assert "b: no MLflow run" in err  # warned, not failed
    logged = client.get_run(run.info.run_id).data  # the latest FINISHED one
    assert (
        logged.metrics["bench/cpu_imgs_per_s_min"]
        <= logged.metrics["bench/cpu_imgs_per_s"]
        <= logged.metrics["bench/cpu_imgs_per_s_max"]
    )
    assert logged.tags["bench.cpu.dtype"] == "fp32" and logged.tags["bench.cpu.batch"] == "16"
    assert logged.tags["bench.cpu.threads"] == "1" and logged.tags["bench.cpu.torch"] == torch.__version__
    assert logged.tags["bench.cpu.device_name"] and logged.tags["bench.cpu.compiled"] == "False"
    assert "bench/cpu_imgs_per_s" not in client.get_run(old.info.run_id).data.metrics
    assert "bench/cpu_imgs_per_s" not in client.get_run(failed.info.run_id).data.metrics


def test_bench_argument_errors(capsys):
    from lab.cli import main

    assert main(["bench"]) == 2
    assert main(["bench", "--models", "levit_128s", "--log"]) == 2
    err = capsys.readouterr().err
    assert "give a SPEC or --models" in err and "--log" in err
