"""Tests for the grafts package: timm parity, paper figures, switches, validation, fuse."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn

import grafts
from grafts.build import GraftModel

from conftest import randomize_bn

torch.set_num_threads(2)

LEVITS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
PAPER_MACS = {"levit_128s": 305, "levit_128": 406, "levit_192": 658, "levit_256": 1120, "levit_384": 2353}


def meta_build(d) -> GraftModel:
    with torch.device("meta"):
        return grafts.build(d)


def params(d) -> int:
    return grafts.count_params(meta_build(d))


# ----------------------------------------------------------------------------- timm parity


@pytest.mark.parametrize("name", LEVITS)
def test_levit_params_and_state_dict_match_timm(name):
    ours = grafts.build({"zoo": name})
    ref = timm.create_model(name, pretrained=False)
    assert grafts.count_params(ours) == sum(p.numel() for p in ref.parameters())
    res = grafts.load_timm_levit(ours, ref.state_dict())  # strict
    assert not res.missing_keys and not res.unexpected_keys


@pytest.mark.parametrize("name", ["levit_128s", "levit_256"])
def test_levit_logits_match_timm(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    randomize_bn(ref)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "attention_biases" in n:
                p.normal_()
    ours = grafts.build({"zoo": name}).eval()
    grafts.load_timm_levit(ours, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (2, 1000)
    assert (a - b).abs().max().item() < 1e-5


def test_keymap_drops_index_buffers_and_rejects_unknown():
    assert grafts.map_timm_levit_key("stages.0.blocks.0.attn.attention_bias_idxs") is None
    assert (
        grafts.map_timm_levit_key("stages.1.downsample.attn_downsample.q.ln.bn.weight")
        == "stages.1.downsample.attn.q.bn.weight"
    )
    with pytest.raises(KeyError):
        grafts.map_timm_levit_key("something.else")


# ----------------------------------------------------------------------------- paper figures


@pytest.mark.parametrize("name", LEVITS)
def test_levit_macs_match_paper(name):
    macs = grafts.count_macs({"zoo": name}) / 1e6
    assert abs(macs / PAPER_MACS[name] - 1) < 0.02


def test_deit_resnet_macs_and_params():
    assert abs(grafts.count_macs({"zoo": "deit_small"}) / 4.6e9 - 1) < 0.02
    assert abs(grafts.count_macs({"zoo": "resnet50"}) / 4.1e9 - 1) < 0.02
    with torch.device("meta"):
        assert params({"zoo": "deit_small"}) == grafts.count_params(
            timm.create_model("deit_small_patch16_224", pretrained=False)
        )
        assert params({"zoo": "deit_tiny"}) == grafts.count_params(
            timm.create_model("deit_tiny_patch16_224", pretrained=False)
        )
        assert params({"zoo": "resnet50"}) == grafts.count_params(timm.create_model("resnet50", pretrained=False))


GRAFT_TABLE = {  # name: (params M, conv MACs M, transformer MACs M)
    "resnet0_deit12": (22.0, 57, 4519),
    "resnet1_deit9": (17.1, 820, 3389),
    "resnet2_deit6": (13.1, 1876, 2260),
    "resnet3_deit3": (15.1, 3385, 1130),
    "resnet4_deit0": (25.5, 4119, 0),
}


@pytest.mark.parametrize("name", list(GRAFT_TABLE))
def test_graft_params_and_mac_split(name):
    p, conv, tr = GRAFT_TABLE[name]
    assert abs(params({"zoo": name}) / 1e6 / p - 1) < 0.02
    split = grafts.count_macs_split({"zoo": name})
    assert abs(split["conv"] / 1e6 / conv - 1) < 0.05
    if tr:
        assert abs(split["transformer"] / 1e6 / tr - 1) < 0.05
    else:
        assert split["transformer"] / 1e6 < 5  # only the fc head


ABLATIONS = {  # paper Table 5: params M, MACs M
    "levit_128s_a0": (7.4, 305),
    "levit_128s_a1": (1.2, 308),
    "levit_128s_a2": (7.4, 275),
    "levit_128s_a3": (7.4, 305),
    "levit_128s_a4": (7.4, 305),
    "levit_128s_a5": (7.4, 305),
    "levit_128s_a6": (6.2, 312),
    "levit_128s_a7": (7.4, 305),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_rows(name):
    p, macs = ABLATIONS[name]
    assert abs(params({"zoo": name}) / 1e6 / p - 1) < 0.05
    assert abs(grafts.count_macs({"zoo": name}) / 1e6 / macs - 1) < 0.05


# ----------------------------------------------------------------------------- switches


def _bias_entries(cfg: grafts.ModelConfig) -> int:
    res = cfg.stage_resolutions()
    n = sum(s.depth * s.heads * res[i][0] * res[i][1] for i, s in enumerate(cfg.stages))
    if cfg.downsample == "shrink_attention":
        n += sum(cfg.downsample_heads_for(i) * res[i - 1][0] * res[i - 1][1] for i in range(1, len(cfg.stages)))
    return n


def test_attention_bias_switch_params():
    base = grafts.config_from_dict({"zoo": "levit_128s"})
    none = params({"zoo": "levit_128s", "position": "none"})
    assert params({"zoo": "levit_128s"}) - none == _bias_entries(base)
    absolute = params({"zoo": "levit_128s", "position": "absolute"})
    assert absolute - none == 14 * 14 * 128


def test_attn_act_switch():
    on, off = meta_build({"zoo": "levit_128s"}), meta_build({"zoo": "levit_128s", "attn_act": False})
    assert grafts.count_params(on) == grafts.count_params(off)
    hs = lambda m: sum(isinstance(x, nn.Hardswish) for x in m.modules())  # noqa: E731
    n_attn = sum(s.depth for s in on.config.stages) + len(on.config.stages) - 1
    assert hs(on) - hs(off) == n_attn


def test_mlp_ratio_delta():
    d = 384  # stage 2 of levit_128s, depth 4, BN-linears without bias
    stages = grafts.zoo_config("levit_128s")["stages"]
    stages[2]["mlp_ratio"] = 3.0
    delta = params({"zoo": "levit_128s", "stages": stages}) - params({"zoo": "levit_128s"})
    dh = d  # hidden grows by d
    assert delta == 4 * (2 * d * dh + 2 * dh)
    # DeiT (biased linears + LayerNorm): fc1 weight+bias and fc2 weight per block
    st = grafts.zoo_config("deit_small")["stages"]
    st[0]["mlp_ratio"] = 5.0
    delta = params({"zoo": "deit_small", "stages": st}) - params({"zoo": "deit_small"})
    assert delta == 12 * (384 * 384 * 2 + 384)


def test_distillation_adds_exactly_one_head():
    levit = params({"zoo": "levit_128s"}) - params({"zoo": "levit_128s", "distillation": False})
    assert levit == 2 * 384 + 384 * 1000 + 1000  # BN1d + Linear
    deit = params({"zoo": "deit_small", "distillation": True}) - params({"zoo": "deit_small"})
    assert deit == 384 * 1000 + 1000 + 384 + 384  # Linear + dist token + its pos-embed entry


def test_norm_and_patch_switches():
    a2 = params({"zoo": "levit_128s_a2"}) - params({"zoo": "levit_128s_a0"})
    conv_patch = (3 * 9 * 16 + 16 * 9 * 32 + 32 * 9 * 64 + 64 * 9 * 128) + 2 * (16 + 32 + 64 + 128)
    assert a2 == 3 * 16 * 16 * 128 + 128 - conv_patch
    m = meta_build({"zoo": "levit_128s_a3"})
    assert any(isinstance(x, nn.LayerNorm) for x in m.modules())
    assert not any(isinstance(x, nn.BatchNorm1d) for x in m.stages.modules())


def test_forward_heads_and_training_average():
    m = grafts.build({"zoo": "levit_128s", "img_size": 64}).train()
    x = torch.randn(2, 3, 64, 64)
    cls, dist = m.forward_heads(x)
    assert cls.shape == dist.shape == (2, 1000)
    m.eval()
    with torch.no_grad():
        cls, dist = m.forward_heads(x)
        assert torch.allclose(m(x), (cls + dist) / 2)
    assert m.forward_features(x).shape == (2, 1, 384)
    assert m.num_classes == 1000 and m.img_size == 64 and m.config.zoo == "levit_128s"
    single = grafts.build({"zoo": "levit_128s", "distillation": False, "img_size": 64})
    assert single.forward_heads(x)[1] is None


# ----------------------------------------------------------------------------- graft forward/backward


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_graft_forward_backward(k):
    name = f"resnet{k}_deit{12 - 3 * k}"
    over = {"zoo": name, "img_size": 64, "num_classes": 10}
    if 1 <= k <= 3:
        over["grid"] = 4
    m = grafts.build(over).train()
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "over",
    [
        {"zoo": "resnet2_deit6", "bridge": "proj", "img_size": 32},
        {"zoo": "levit_128s_a0", "downsample": "pool", "img_size": 64},
        {"zoo": "deit_tiny", "position": "attention_bias", "distillation": True, "img_size": 64},
        {"zoo": "levit_128s_a1", "img_size": 64, "pool": "cls", "distillation": True},
        {"zoo": "levit_128s_a6", "img_size": 48},
    ],
)
def test_other_combinations_run(over):
    m = grafts.build(over).train()
    out = m(torch.randn(2, 3, over["img_size"], over["img_size"]))
    out.mean().backward()
    assert out.shape == (2, 1000)


# ----------------------------------------------------------------------------- fuse


@pytest.mark.parametrize(
    "over",
    [
        {"zoo": "levit_128s", "img_size": 64},
        {"zoo": "resnet2_deit6", "img_size": 64, "grid": 4},
        {"zoo": "resnet1_deit9", "img_size": 32, "grid": 2, "norm": "batchnorm"},
    ],
)
def test_fuse_equal_and_no_batchnorm(over):
    torch.manual_seed(0)
    m = grafts.build(over)
    randomize_bn(m)
    m.eval()
    f = grafts.fuse(m)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in f.modules())
    x = torch.randn(2, 3, over["img_size"], over["img_size"])
    with torch.no_grad():
        assert (m(x) - f(x)).abs().max().item() < 1e-4
    assert not f.training


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", grafts.zoo_names())
def test_config_round_trip(name):
    cfg = grafts.config_from_dict({"zoo": name})
    d = grafts.config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert grafts.config_from_dict(d) == cfg
    assert grafts.config_from_dict({k: v for k, v in d.items() if k != "zoo"}) == grafts.config_from_dict(
        {**d, "zoo": None}
    )


def test_zoo_override_semantics():
    cfg = grafts.config_from_dict({"zoo": "resnet2_deit6", "prefix": {"stages": 3}})
    assert cfg.prefix.stages == 3 and cfg.prefix.arch == "resnet50"  # nested dict deep-merges
    cfg = grafts.config_from_dict({"zoo": "levit_128s", "stages": [{"dim": 64, "depth": 1, "heads": 2}]})
    assert len(cfg.stages) == 1  # lists are replaced whole
    assert set(grafts.zoo_names()) >= {"levit_128s", "deit_small", "resnet50", "resnet3_deit3", "levit_128s_a7"}


@pytest.mark.parametrize(
    "d, path, words",
    [
        ({"zoo": "levit_128s", "stages": [{"dim": 130, "depth": 2, "heads": 4}]}, "stages.0.heads", "divisible"),
        ({"zoo": "resnet2_deit6", "prefix": {"stages": 5}}, "prefix.stages", "0..4"),
        ({"zoo": "levit_128s", "img_size": 100}, "img_size", "divisible"),
        ({"zoo": "levit_128s", "norm": "groupnorm"}, "norm", "batchnorm, layernorm"),
        ({"zoo": "levit_128s", "drop_pth": 0.1}, "drop_pth", "drop_path"),
        (
            {"zoo": "levit_128s", "stages": [{"dim": 64, "depth": 1, "heads": 2, "mlp_ration": 2}]},
            "stages.0.mlp_ration",
            "mlp_ratio",
        ),
        ({"zoo": "levit_128s", "img_size": "224"}, "img_size", "int"),
        ({"zoo": "levit_128s", "distillation": "yes"}, "distillation", "bool"),
        ({"zoo": "levit_128s", "stages": [{"dim": 64, "depth": "2", "heads": 2}]}, "stages.0.depth", "int"),
        ({"zoo": "levit_12s"}, "zoo", "levit_128s"),
        ({"zoo": "levit_128s", "downsample": "none"}, "downsample", "equal"),
        ({"zoo": "levit_128s", "stages": [{"dim": 64, "depth": 0, "heads": 2}]}, "stages.0.depth", "pure ResNet"),
        ({"zoo": "levit_128s", "pool": "cls"}, "pool", "mean"),
        ({"zoo": "levit_128s", "downsample_heads": [8]}, "downsample_heads", "one entry"),
        ({"zoo": "resnet3_deit3", "img_size": 40}, "img_size", "divisible"),
        ({"zoo": "levit_128s", "bridge": "avg"}, "bridge", "pool, proj"),
    ],
)
def test_invalid_configs(d, path, words):
    with pytest.raises(grafts.GraftConfigError) as ei:
        grafts.build(d)
    assert ei.value.path == path
    assert str(ei.value).startswith(f"{path}: ")
    assert words in str(ei.value)
    assert isinstance(ei.value, ValueError)


# ----------------------------------------------------------------------------- timm registry / measure


def test_timm_registry():
    m = timm.create_model("grafts_levit_128s", pretrained=False, num_classes=10, img_size=64)
    assert isinstance(m, GraftModel) and m.num_classes == 10
    assert not isinstance(timm.create_model("levit_128s", pretrained=False), GraftModel)
    assert "grafts_resnet2_deit6" in timm.list_models("grafts_*")


def test_count_macs_model_and_img_size():
    m = grafts.build({"zoo": "levit_128s", "img_size": 64})
    assert grafts.count_macs(m) == grafts.count_macs({"zoo": "levit_128s", "img_size": 64})
    assert grafts.count_macs({"zoo": "levit_128s"}, img_size=64) == grafts.count_macs(m)
    # a plain (non-grafts) module runs on CPU
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    assert grafts.count_macs(lin, img_size=8) == 3 * 8 * 8 * 5


# ----------------------------------------------------------------------------- inference fast paths

from grafts.fuse import InplaceHardswish  # noqa: E402
from grafts.heads import Head  # noqa: E402
from grafts.levit import ConvNorm, LinearNorm, RelPosBias, attend  # noqa: E402


def _bias_modules(m: nn.Module) -> list[RelPosBias]:
    return [x for x in m.modules() if isinstance(x, RelPosBias)]


def test_fuse_leaves_plain_layers_and_keeps_the_original():
    m = grafts.build({"zoo": "levit_128s", "img_size": 64})
    randomize_bn(m)
    f = grafts.fuse(m.eval())
    assert not any(isinstance(x, (ConvNorm, LinearNorm, Head)) for x in f.modules())
    assert type(f.head) is nn.Linear and type(f.head_dist) is nn.Linear
    blk = f.stages[0].blocks[0]
    assert type(blk.attn.qkv) is nn.Linear and type(blk.attn.proj) is nn.Linear
    assert type(blk.mlp.fc1) is nn.Linear and type(f.embed.conv1) is nn.Conv2d
    assert blk.attn.scale == 1.0 and blk.inplace and type(blk.mlp.act) is InplaceHardswish
    # the source model is untouched: wrappers, BN, scale, out-of-place activations
    b0 = m.stages[0].blocks[0]
    assert isinstance(b0.attn.qkv, LinearNorm) and b0.attn.scale == 16**-0.5
    assert not b0.inplace and type(b0.mlp.act) is nn.Hardswish and not b0.mlp.act.inplace
    assert grafts.count_params(m) == grafts.count_params(grafts.build({"zoo": "levit_128s", "img_size": 64}))


@pytest.mark.parametrize(
    "over",
    [
        {"zoo": "levit_128s", "img_size": 64},
        {"zoo": "deit_tiny", "img_size": 64},  # SDPA path, GELU, LayerNorm
        {"zoo": "resnet1_deit9", "img_size": 32, "grid": 2, "norm": "batchnorm"},  # BN bridge + BN heads
        {"zoo": "resnet4_deit0", "img_size": 64},  # pure ResNet-50
        {"zoo": "levit_128s_a0", "downsample": "pool", "img_size": 64},  # pool+projection downsample
        {"zoo": "levit_128s_a5", "img_size": 64},  # no bias: SDPA with dv != dk
        {
            "zoo": "levit_128s_a5",
            "img_size": 64,
            "stages": [  # no bias, dv == dk: flash SDPA
                {"dim": 64, "depth": 1, "heads": 2, "key_dim": 16, "attn_ratio": 1.0, "mlp_ratio": 2.0},
                {"dim": 96, "depth": 1, "heads": 3, "key_dim": 16, "attn_ratio": 1.0, "mlp_ratio": 2.0},
            ],
        },
    ],
)
def test_fused_copy_matches_in_inference_mode_and_still_differentiates(over):
    torch.manual_seed(0)
    m = grafts.build(over)
    randomize_bn(m)
    with torch.no_grad():
        for p in m.parameters():  # zero-init residual branches would hide bugs
            if p.dim() == 1 and not p.abs().sum():
                p.normal_(0, 0.02)
    m.eval()
    f = grafts.fuse(m)
    x = torch.randn(2, 3, over["img_size"], over["img_size"])
    with torch.no_grad():
        ref = m(x)
    with torch.inference_mode():
        a, b = f(x), f(x)  # twice: cached biases, in-place paths
    tol = 1e-4 * ref.abs().max().item() + 1e-6
    assert (a - ref).abs().max().item() < tol and torch.equal(a, b)
    # with autograd recording, the fused copy takes the out-of-place paths
    xg = x.clone().requires_grad_()
    out = f(xg)
    out.sum().backward()
    assert (out.detach() - ref).abs().max().item() < tol and xg.grad is not None


def test_fused_levit_matches_timm():
    torch.manual_seed(0)
    ref = timm.create_model("levit_128s", pretrained=False).eval()
    randomize_bn(ref)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "attention_biases" in n:
                p.normal_()
    ours = grafts.build({"zoo": "levit_128s"}).eval()
    grafts.load_timm_levit(ours, ref.state_dict())
    fused = grafts.fuse(ours)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        a, b = fused(x), ref(x)
    assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()


def test_attention_bias_cache_eval_only_and_invalidated():
    m = grafts.build({"zoo": "levit_128s", "img_size": 64}).eval()
    pb = m.stages[0].blocks[0].attn.pos_bias
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m(x)
        first = pb()
        assert pb() is first and len(pb.cache) == 1  # eval + no grad: cached per device
        assert all(len(b.cache) == 1 for b in _bias_modules(m))
        pb.table.add_(1.0)  # in-place edit (optimizer step, copy_): a new version, no stale bias
        assert torch.equal(pb(), first + 1.0)
    m.train()
    assert all(not b.cache for b in _bias_modules(m))  # train() clears
    with torch.no_grad():
        assert pb() is not pb() and not pb.cache  # never cached in training
    m.eval()
    with torch.no_grad():
        m(x)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["stages.0.blocks.0.attn.pos_bias.table"].normal_()
    m.load_state_dict(sd)  # loading clears too, and the new table is used
    assert not pb.cache
    with torch.no_grad():
        assert torch.equal(pb(), sd["stages.0.blocks.0.attn.pos_bias.table"][:, pb.idx])
        m(x)
    m.to(torch.float64)
    assert all(not b.cache for b in _bias_modules(m))  # _apply (to/cuda/half) clears
    m.float()
    # eval with autograd recording through the table: not cached, gradients flow
    out = m(x).sum()
    out.backward()
    assert pb.table.grad is not None and not pb.cache
    # the cache is derived state: not deep-copied / pickled
    with torch.no_grad():
        m(x)
    import copy

    assert not _bias_modules(copy.deepcopy(m))[0].cache


def test_attend_paths_agree_and_leave_inputs_alone():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8)
    v, bias = torch.randn(2, 3, 12, 16), torch.randn(3, 10, 12)
    bias0 = bias.clone()
    scale = 8**-0.5
    want = ((q @ k.transpose(-2, -1)) * scale + bias).softmax(-1) @ v
    want = want.transpose(1, 2).reshape(2, 10, 48)
    with torch.no_grad():
        assert torch.allclose(attend(q, k, v, bias, scale), want, atol=1e-6)  # in place
        assert torch.allclose(attend(q * scale, k, v, bias, 1.0), want, atol=1e-6)  # scale folded into q
    assert torch.equal(bias, bias0)
    qg = q.clone().requires_grad_()
    got = attend(qg, k, v, bias, scale)  # recording: out of place, differentiable
    got.sum().backward()
    assert torch.allclose(got, want, atol=1e-6) and qg.grad is not None
    # no bias: scaled_dot_product_attention, same math (dv != dk too)
    nob = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
    assert torch.allclose(attend(q, k, v, None, scale), nob.transpose(1, 2).reshape(2, 10, 48), atol=1e-6)


def test_training_forward_unchanged_by_fast_paths():
    """Train mode never caches, never works in place: two forwards from the same state and
    seed give identical outputs and gradients, equal to the eval-mode math with BN in train."""
    m = grafts.build({"zoo": "levit_128s", "img_size": 64, "drop_path": 0.0}).train()
    x = torch.randn(4, 3, 64, 64)
    outs, grads = [], []
    for _ in range(2):
        m.zero_grad()
        out = m(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(m.stages[0].blocks[0].attn.pos_bias.table.grad.clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert all(not b.cache for b in _bias_modules(m))
    assert not any(
        getattr(x, "inplace", False) for x in m.modules() if isinstance(x, (nn.Hardswish, grafts.transformer.Block))
    )
