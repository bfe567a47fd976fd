"""grafts honours timm's model contract: every zoo entry (shrunk) builds, runs forward and
backward, resets its classifier, extracts features, fuses, and runs non-square; timm files
load through ``checkpoint_path``; weights move between resolutions."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config

import grafts
from grafts.build import GraftModel
from grafts.levit import RelPosBias, resize_bias_table

from conftest import randomize_bn as shared_randomize_bn

torch.set_num_threads(2)

H, W = 32, 64  # tiny non-square input every zoo entry accepts once shrunk (ResNet-50 stride 32)


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """conftest's BN randomisation, then parameters left at zero get values from the same stream."""
    g = shared_randomize_bn(model, seed)
    with torch.no_grad():
        for p in model.parameters():  # zero-init branches and zero bias tables would hide bugs
            if not p.abs().sum():
                p.normal_(0, 0.02, generator=g)


def tiny(name: str, **over) -> dict:
    """The zoo entry with the same structure (stages, switches) but tiny widths and depth 1."""
    d = grafts.zoo_config(name)
    stages = []
    for i, s in enumerate(d["stages"]):
        if s["depth"] == 0:  # pure ResNet-50: no transformer
            stages.append(s)
            continue
        kd = 8 if s.get("key_dim") is not None else None
        stages.append(dict(s, dim=32 + 16 * i, depth=1, heads=2, key_dim=kd))
    d["stages"] = stages
    if isinstance(d.get("downsample_heads"), list):
        d["downsample_heads"] = [2] * len(d["downsample_heads"])
    d.update(img_size=[H, W], num_classes=7, **over)
    if d.get("grid") is not None:
        d["grid"] = [H // 16, W // 16]  # the pool bridge's grid at this input (stride 16)
    return {"zoo": name, **d}


ALIASES = {"resnet4_deit0": "resnet50", "resnet0_deit12": "deit_small"}  # identical configs


def test_aliases_are_identical():
    for a, b in ALIASES.items():
        da, db = (grafts.config_to_dict(grafts.config_from_dict({"zoo": n})) for n in (a, b))
        assert da.pop("zoo") == a and db.pop("zoo") == b and da == db


@pytest.mark.parametrize("name", [n for n in grafts.zoo_names() if n not in ALIASES])
def test_zoo_entry_contract(name):
    torch.manual_seed(0)
    cfg = tiny(name)
    m = grafts.build(cfg).train()
    x = torch.randn(2, 3, H, W)
    out = m(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"

    m.eval()
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, m.num_features)
        assert torch.allclose(m.forward_head(feats), m(x), atol=1e-6)
    # feature_info / forward_intermediates agree (channels, reductions from the input)
    inter = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in inter] == [f["num_chs"] for f in m.feature_info]
    assert [tuple(f.shape[2:]) for f in inter] == [
        (-(-H // f["reduction"]), -(-W // f["reduction"])) for f in m.feature_info
    ]  # ceil: stride-2 steps round up

    # fused == unfused (BN with real statistics)
    randomize_bn(m)
    m.eval()
    with torch.no_grad():
        ref = m(x)
        fused = grafts.fuse(m)(x)
    assert (fused - ref).abs().max().item() < 1e-4 * ref.abs().max().item() + 1e-5

    # classifier reset keeps the pooled features
    heads = m.get_classifier()
    assert isinstance(heads, tuple) == (m.head_dist is not None)
    m.reset_classifier(5)
    with torch.no_grad():
        assert m(x).shape == (2, 5) and m.config.num_classes == 5
    m.reset_classifier(0)
    with torch.no_grad():
        assert m(x).shape == (2, m.num_features)

    # features_only through timm's builder
    over = {k: v for k, v in cfg.items() if k != "zoo"}
    f = timm.create_model(f"grafts_{name}", features_only=True, **over)
    outs = f(x)
    assert [o.shape[1] for o in outs] == f.feature_info.channels()
    assert [-(-H // r) for r in f.feature_info.reduction()] == [o.shape[2] for o in outs]


def test_pre_logits_unchanged_by_reset_classifier():
    m = grafts.build(tiny("levit_128s")).eval()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        before = m.forward_head(m.forward_features(x), pre_logits=True)
        m.reset_classifier(3)
        assert torch.equal(m.forward_head(m.forward_features(x), pre_logits=True), before)
        assert m(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["levit_384", "deit_small", "resnet50", "resnet2_deit6"])
def test_full_size_meta_contract(name):
    """Full-size entries on the meta device: feature_info, pretrained_cfg, data config."""
    with torch.device("meta"):
        m = timm.create_model(f"grafts_{name}")
    assert isinstance(m, GraftModel)
    red = [f["reduction"] for f in m.feature_info]
    assert red == sorted(red) and m.feature_info[-1]["num_chs"] == m.num_features
    dc = resolve_data_config({}, model=m)
    assert dc["input_size"] == (3, 224, 224) and dc["crop_pct"] == 0.9
    assert dc["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and dc["interpolation"] == "bicubic"
    if name == "resnet2_deit6":
        assert red == [4, 8, 16]
    if name == "levit_384":
        assert red == [16, 32, 64] and m.pretrained_cfg["classifier"] == ("head.fc", "head_dist.fc")


def test_timm_checkpoint_path_levit_256_equals_timm(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("levit_256").eval()
    randomize_bn(ref)
    f = tmp_path / "levit_256.pth"
    torch.save(ref.state_dict(), f)
    ours = timm.create_model("grafts_levit_256", checkpoint_path=str(f)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert (a - b).abs().max().item() < 1e-5 * b.abs().max().item() + 1e-6


def test_timm_checkpoint_path_resnet50(tmp_path):
    ref = timm.create_model("resnet50", num_classes=10).eval()
    randomize_bn(ref)
    f = tmp_path / "r50.pth"
    torch.save({"state_dict": ref.state_dict()}, f)
    ours = timm.create_model("grafts_resnet50", num_classes=10, img_size=64, checkpoint_path=str(f)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5
    # only the prefix of a graft: ResNet stages 1..2 from the same file
    g = grafts.build({"zoo": "resnet2_deit6", "img_size": 64, "grid": 4})
    rep = grafts.load_weights(g, torch.load(f), include=["prefix."])
    assert rep.loaded and all(k.startswith("prefix.") for k in rep.loaded)
    assert any(k.startswith("stages.") for k in rep.random) and not rep.resized
    assert torch.equal(g.prefix.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)


def test_non_square_levit_matches_timm():
    """A (64, 96) LeViT: timm supports tuple img_size; same weights -> same logits."""
    torch.manual_seed(0)
    ref = timm.create_model("levit_128s", img_size=(64, 96)).eval()
    randomize_bn(ref)
    ours = grafts.build({"zoo": "levit_128s", "img_size": [64, 96]}).eval()
    grafts.load_timm_levit(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "name, over",
    [
        ("levit_128s", {}),
        ("deit_tiny", {}),
        ("resnet2_deit6", {"grid": 4}),
    ],
)
def test_wrong_input_size_is_a_clear_error(name, over):
    m = grafts.build({"zoo": name, "img_size": 64, **over})
    with pytest.raises(ValueError, match=r"input size 64x96 does not match the model's img_size 64x64"):
        m(torch.randn(1, 3, 64, 96))
    with pytest.raises(grafts.GraftConfigError, match="img_size: .*list"):
        grafts.build({"zoo": name, "img_size": "64x96"})


@pytest.mark.parametrize(
    "over",
    [
        {"zoo": "levit_128s_a0"},  # attention-bias tables (+ shrink attention)
        {"zoo": "deit_tiny", "patch_size": 8},  # absolute position + cls token
        {
            "zoo": "resnet2_deit6",
            "grid": 2,
            "stages": [  # pool bridge keeps its pooling factor
                {"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}
            ],
        },
    ],
)
def test_dynamic_img_size_equals_a_model_built_at_that_size(over):
    """A dynamic-size model on a 48x64 input == the same weights loaded (resized) into a model
    built at 48x64: runtime and load-time resizing agree, and both keep the aspect ratio."""
    torch.manual_seed(0)
    dyn = grafts.build({**over, "img_size": 32, "dynamic_img_size": True})
    randomize_bn(dyn)
    dyn.eval()
    grid = {"grid": [3, 4]} if "grid" in over else {}
    fixed = grafts.build({**over, "img_size": [48, 64], **grid}).eval()
    fixed.load_state_dict(dyn.state_dict())  # resizes position tables
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        a, b = dyn(x), fixed(x)
        assert (a - b).abs().max().item() < 1e-4
        assert dyn(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert fixed.grid == (3, 4) if "grid" in over else True


def test_resize_bias_table_keeps_offsets_and_is_identity_at_same_size():
    t = torch.randn(3, 16)
    assert torch.equal(resize_bias_table(t, (4, 4), (4, 4)), t)
    big = resize_bias_table(t, (4, 4), (7, 10))
    assert big.shape == (3, 70)
    g, gb = t.view(3, 4, 4), big.view(3, 7, 10)
    assert torch.allclose(gb[:, 0, 0], g[:, 0, 0], atol=1e-6)  # self-offset bias kept
    assert torch.allclose(gb[:, -1, -1], g[:, -1, -1], atol=1e-6)  # farthest offset -> farthest
    # a 64 LeViT state dict into a 96x128 model: every table rebuilt, nothing else touched
    src = grafts.build({"zoo": "levit_128s_a0", "img_size": 64})
    dst = grafts.build({"zoo": "levit_128s_a0", "img_size": [96, 128]})
    rep = grafts.load_weights(dst, src.state_dict())
    tables = [k for k in dst.state_dict() if k.endswith("pos_bias.table")]
    assert sorted(rep.resized) == sorted(tables) and not rep.random and not rep.skipped
    few = grafts.build({"zoo": "levit_128s_a0", "img_size": 64, "num_classes": 3})
    with pytest.raises(RuntimeError, match="size mismatch"):  # a head for other classes still fails strict loads
        few.load_state_dict(src.state_dict())
    rep = grafts.load_weights(few, src.state_dict(), exclude=["head_dist"])  # fine-tuning to 3 classes
    assert sorted(rep.random) == ["head.fc.bias", "head.fc.weight"]
    assert any(s.startswith("head.fc.weight (shape") for s in rep.skipped) and "head.norm.weight" in rep.loaded


def _shape_data(n: int, size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes drawn at random places of a 32x32 image: a horizontal bar, a vertical bar, a
    square, a cross (spatial structure matters; resizing the image keeps the class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.2
    pos = torch.randint(2, 16, (n, 2), generator=g)
    for i, c in enumerate(y.tolist()):
        r, q = pos[i].tolist()
        if c == 0:
            x[i, :, r + 6 : r + 9, q : q + 14] += 2.0
        elif c == 1:
            x[i, :, r : r + 14, q + 6 : q + 9] += 2.0
        elif c == 2:
            x[i, :, r + 3 : r + 11, q + 3 : q + 11] += 2.0
        else:
            x[i, :, r + 6 : r + 9, q : q + 14] += 2.0
            x[i, :, r : r + 14, q + 6 : q + 9] += 2.0
    if size != (32, 32):
        x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x, y


@pytest.mark.parametrize(
    "over",
    [
        {"zoo": "levit_128s_a0", "patch": "vit", "patch_size": 8},  # attention-bias tables
        {"zoo": "levit_128s_a5", "patch": "vit", "patch_size": 8},  # absolute position embedding
    ],
)
@pytest.mark.slow
def test_trained_at_32_still_classifies_at_48_and_32x48(over):
    torch.manual_seed(0)
    base = {
        **over,
        "num_classes": 4,
        "distillation": False,
        "stages": [
            {"dim": 32, "depth": 1, "heads": 2, "key_dim": 8, "attn_ratio": 2.0, "mlp_ratio": 2.0},
            {"dim": 48, "depth": 1, "heads": 2, "key_dim": 8, "attn_ratio": 2.0, "mlp_ratio": 2.0},
        ],
    }
    m = grafts.build({**base, "img_size": 32})
    x, y = _shape_data(128, (32, 32), 0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for step in range(40):
        idx = torch.randint(0, 128, (32,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        acc32 = (m(x).argmax(1) == y).float().mean().item()
    assert acc32 > 0.9
    for size in ([48, 48], [32, 48]):
        big = grafts.build({**base, "img_size": size}).eval()
        rep = grafts.load_weights(big, m.state_dict())
        assert rep.resized and not rep.random
        xs, ys = _shape_data(128, tuple(size), 0)
        with torch.no_grad():
            acc = (big(xs).argmax(1) == ys).float().mean().item()
        assert acc > 0.6, (size, acc)  # chance: 0.25


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = grafts.build(tiny("levit_128s")).train()
    m2 = copy.deepcopy(m)
    m2.set_grad_checkpointing(True)
    x = torch.randn(2, 3, H, W)
    for mm in (m, m2):
        mm(x).sum().backward()
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert torch.allclose(p.grad, p2.grad, atol=1e-5), n


def test_global_pool_and_classifier_through_timm():
    m = timm.create_model("grafts_deit_tiny", img_size=32, patch_size=8, global_pool="avg", num_classes=3)
    assert m.config.pool == "mean" and m.cls_token is None and m.global_pool == "avg"
    m = timm.create_model("grafts_deit_tiny", img_size=32, patch_size=8, num_classes=3)
    assert m.global_pool == "token"
    m.reset_classifier(4, global_pool="avg")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4) and m.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        grafts.build({"zoo": "levit_128s", "img_size": 64}).reset_classifier(3, global_pool="token")
    assert timm.create_model("grafts_levit_128s", img_size=64).pretrained_cfg["input_size"] == (3, 64, 64)


def test_attention_probabilities():
    m = grafts.build({"zoo": "levit_128s_a0", "img_size": 64}).eval()
    blk = m.stages[0].blocks[0]
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        p = blk.attn.get_attention(x)
        assert p.shape == (2, 4, 16, 16) and torch.allclose(p.sum(-1), torch.ones(2, 4, 16))
        ds = m.stages[1].downsample.attn.get_attention(x)
        assert ds.shape == (2, 8, 4, 16)
    assert isinstance(blk.attn.pos_bias, RelPosBias)


def test_timm_deit_file_loads_with_qkv_permuted(tmp_path):
    """timm's DeiT stores qkv head-major ([q all heads | k | v]); ours per head: same logits."""
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    f = tmp_path / "deit.pth"
    torch.save(ref.state_dict(), f)
    ours = timm.create_model("grafts_deit_tiny", img_size=64, num_classes=10, checkpoint_path=str(f)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5


def test_features_only_out_indices_prunes_later_stages():
    f = timm.create_model("grafts_resnet2_deit6", img_size=64, grid=4, features_only=True, out_indices=(1,))
    outs = f(torch.randn(1, 3, 64, 64))
    assert [o.shape for o in outs] == [(1, 512, 8, 8)] and len(f.model.stages) == 0
    f = timm.create_model("grafts_levit_128s", img_size=64, features_only=True, out_indices=(0, 1))
    assert [o.shape[1] for o in f(torch.randn(1, 3, 64, 64))] == [128, 256] and len(f.model.stages) == 2
