"""lab.inspection: first-layer filters, smoothness, attention-bias maps, mean attention distance."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch

import grafts
from lab import inspection as I
from lab import report as R

# one small config per patch-descriptor kind (and one per zoo family), at tiny sizes
VIT = {
    "zoo": "deit_tiny",
    "img_size": 32,
    "patch_size": 4,
    "num_classes": 4,
    "stages": [{"dim": 32, "depth": 2, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
}
VIT_BIAS = dict(VIT, position="attention_bias")
GRAFT = dict(VIT, prefix={"arch": "resnet50", "stages": 1}, bridge="pool", grid=4, distillation=True)
LEVIT = {"zoo": "levit_128s", "img_size": 64, "num_classes": 4}
LEVIT_VIT_PATCH = {"zoo": "levit_128s_a2", "img_size": 64, "num_classes": 4}
RESNET = {"zoo": "resnet50", "img_size": 32, "num_classes": 4}


def _build(cfg):
    torch.manual_seed(0)
    return grafts.build(cfg).eval()


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize(
    "cfg, kind, name, shape",
    [
        (VIT, "vit_patch", "embed.proj", (32, 3, 4, 4)),
        (LEVIT_VIT_PATCH, "vit_patch", "embed.proj", (128, 3, 16, 16)),
        (LEVIT, "levit_conv", "embed.conv1", (16, 3, 3, 3)),
        (GRAFT, "resnet_stem", "prefix.conv1", (64, 3, 7, 7)),
        (RESNET, "resnet_stem", "prefix.conv1", (64, 3, 7, 7)),
    ],
)
def test_first_layer_each_patch_descriptor(cfg, kind, name, shape):
    m = _build(cfg)
    fl = I.first_layer(m)
    assert (fl.kind, fl.name, tuple(fl.weight.shape)) == (kind, name, shape)
    conv = m.get_submodule(name if kind == "vit_patch" else name + (".conv" if kind == "levit_conv" else ""))
    if kind == "vit_patch":
        assert torch.equal(fl.weight, conv.weight)
        assert fl.stride == cfg.get("patch_size", 16)
    else:  # BatchNorm folded: filter f scaled by gamma / sqrt(var + eps), checked against the layers' output
        bn = m.get_submodule("embed.conv1.bn" if kind == "levit_conv" else "prefix.bn1")
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(-2, 2, bn.num_features))
            bn.running_var.uniform_(0.5, 2.0)
            bn.running_mean.zero_()
            bn.bias.zero_()
        fl = I.first_layer(m)
        x = torch.randn(2, 3, 16, 16)
        want = bn(conv(x))
        got = torch.nn.functional.conv2d(x, fl.weight, stride=conv.stride, padding=conv.padding)
        assert torch.allclose(got, want, atol=1e-5)


def test_grey_input_sums_the_colour_channels():
    m = _build(VIT)
    fl = I.first_layer(m, grey=True)
    assert fl.grey and fl.weight.shape == (32, 1, 4, 4)
    assert torch.allclose(fl.weight, m.embed.proj.weight.sum(1, keepdim=True))
    grey_batch = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8)
    is_grey, it = I.peek_grey([grey_batch, torch.rand(2, 3, 8, 8)])
    assert is_grey and len(list(it)) == 2  # the peeked batch is not lost
    assert not I.peek_grey([torch.rand(2, 3, 8, 8)])[0]
    assert I.inspect_model(m, [torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32)], max_images=2).filters.grey


def test_smoothness_constant_vs_checkerboard():
    k = 8
    const = torch.ones(1, 3, k, k)
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(k)] for i in range(k)]).expand(1, 3, k, k)
    stripes = torch.tensor([[math.cos(2 * math.pi * j / k) for j in range(k)] for _ in range(k)]).expand(1, 3, k, k)
    s = I.smoothness(torch.cat([const, checker, stripes, torch.zeros(1, 3, k, k)]))
    # constant: all energy at DC; checkerboard: all at (1/2, 1/2); a 1/8-cycle cosine: low; zero: 0
    assert s.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-6)
    # a 3/8-cycle cosine is above the 1/4 cutoff
    fast = torch.tensor([[math.cos(2 * math.pi * 3 * j / k) for j in range(k)] for _ in range(k)]).expand(1, 3, k, k)
    assert float(I.smoothness(fast)[0]) == pytest.approx(0.0, abs=1e-9)
    # a 3x3 checkerboard still has a small mean (5 vs 4 cells): mostly high frequency
    c3 = torch.tensor([[(-1.0) ** (i + j) for j in range(3)] for i in range(3)]).expand(1, 3, 3, 3)
    assert float(I.smoothness(c3)[0]) == pytest.approx(1 / 81, rel=1e-6)  # DC power 1^2 of total 9 * 9 (Parseval)


def test_filter_images_normalised_per_filter():
    w = torch.stack([torch.arange(12.0).reshape(3, 2, 2) * 10, torch.full((3, 2, 2), 7.0)])
    img = I.filter_images(w)
    assert img.shape == (2, 2, 2, 3)
    assert float(img[0].min()) == 0.0 and float(img[0].max()) == 1.0  # each filter spans [0, 1]
    assert torch.all(img[1] == 0.5)  # a flat filter is mid-grey, not NaN


# --------------------------------------------------------------------------- mean attention distance


def _brute_uniform(side: int, stride: float) -> float:
    pts = list(itertools.product(range(side), repeat=2))
    return sum(math.dist(p, q) for p in pts for q in pts) / len(pts) ** 2 * stride


def test_mean_distance_uniform_self_and_offset():
    side, stride = 5, 4.0
    n = side * side
    pos = I.grid_positions(side, stride)
    uniform = torch.full((2, 1, n, n), 1.0 / n)
    assert float(I.mean_distance(uniform, pos, pos)[0]) == pytest.approx(_brute_uniform(side, stride), rel=1e-6)
    self_only = torch.eye(n).expand(3, 2, n, n)
    assert I.mean_distance(self_only, pos, pos).tolist() == [0.0, 0.0]
    # every query of a 2x2 query grid attends to the key 3 rows down and 4 columns right: 5 cells
    q_pos = I.grid_positions(2, stride)
    k_pos = I.grid_positions(6, stride)
    p = torch.zeros(1, 1, 4, 36)
    for qi, (y, x) in enumerate(itertools.product(range(2), repeat=2)):
        p[0, 0, qi, (y + 3) * 6 + (x + 4)] = 1.0
    assert float(I.mean_distance(p, q_pos, k_pos)[0]) == pytest.approx(5 * stride)


def test_mean_distance_drops_extra_tokens_and_renormalises():
    pos = I.grid_positions(2, 1.0)  # 4 patches, + 1 cls token in front
    p = torch.zeros(1, 1, 5, 5)
    p[0, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # the cls query: ignored
    for q in range(4):  # each patch: half its mass on cls, the rest on its horizontal neighbour
        p[0, 0, q + 1, 0] = 0.5
        p[0, 0, q + 1, 1 + (q ^ 1)] = 0.5
    assert float(I.mean_distance(p, pos, pos, n_extra=1)[0]) == pytest.approx(1.0)


def test_subsampled_queries_positions():
    q = I.grid_positions(5, 16.0, step=2)
    assert q.shape == (9, 2) and q[:, 1].unique().tolist() == [0.0, 32.0, 64.0]


@pytest.mark.parametrize("cfg", [VIT, VIT_BIAS, LEVIT])
def test_captured_probabilities_reproduce_the_module_output(cfg):
    """The hooks' recomputed softmax(q k^T * scale + bias), applied to v, gives the module's own output."""
    m = _build(cfg)
    sites = I.attention_sites(m)
    assert sites and {s.kind for s in sites} == ({"block", "shrink"} if cfg is LEVIT else {"block"})
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    inputs, outputs = {}, {}

    def keep(i):
        def hook(mod, args, out):
            inputs[i], outputs[i] = args[0], out

        return hook

    hooks = [s.module.register_forward_hook(keep(s.index)) for s in sites]
    with torch.no_grad(), I.capture_attention(m, sites) as cap:
        m(x)
    for h in hooks:
        h.remove()
    for s in sites:
        (p,) = cap[s.index]
        mod, t = s.module, inputs[s.index]
        B, N, _ = t.shape
        if s.kind == "shrink":
            v = mod.kv(t).view(B, N, mod.heads, -1)[..., mod.key_dim :]
        else:
            v = mod.qkv(t).view(B, N, mod.heads, -1)[..., 2 * mod.key_dim :]
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
        y = (p @ v.transpose(1, 2)).transpose(1, 2).reshape(B, p.shape[2], -1)
        assert torch.allclose(mod.proj(mod.act(y)), outputs[s.index], atol=1e-4)


def test_sites_geometry_levit_and_vit():
    lv = I.attention_sites(_build(LEVIT))  # 64 px: grids 4 -> 2 -> 1, strides 16 -> 32 -> 64
    assert [(s.stage, s.kind, s.key_grid, s.stride_px, s.query_step) for s in lv[:4]] == [
        (0, "block", 4, 16.0, 1),
        (0, "block", 4, 16.0, 1),
        (1, "shrink", 4, 16.0, 2),
        (1, "block", 2, 32.0, 1),
    ]
    vit = I.attention_sites(_build(GRAFT))  # ResNet stage 1 -> pooled to a 4x4 grid of 32 px: 8 px per token
    assert [(s.key_grid, s.stride_px, s.n_extra) for s in vit] == [(4, 8.0, 2)] * 2
    assert I.attention_sites(_build(RESNET)) == []


def test_attention_distances_at_init_are_near_uniform_and_bounded():
    m = _build(VIT)  # random init: attention close to uniform over the 8x8 grid of 4 px tokens
    rows = I.attention_distances(m, [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)], max_images=4)
    assert len(rows) == 2 * 2 and {r["images"] for r in rows} == {4}
    uniform = _brute_uniform(8, 4.0)
    for r in rows:
        assert 0 < r["distance_px"] < 8 * 4 * math.sqrt(2)
        assert r["distance_px"] == pytest.approx(uniform, rel=0.05)


def test_bias_maps_layout():
    m = _build(VIT_BIAS)
    site = I.attention_sites(m)[0]
    with torch.no_grad():  # table[h, |dy| * r + |dx|]: give each offset a recognisable value
        r = site.key_grid
        site.module.pos_bias.table.copy_(torch.arange(2 * r * r, dtype=torch.float32).reshape(2, r * r))
    maps = I.bias_maps(m)
    assert len(maps) == 2 and maps[0]["maps"].shape == (2, 2 * r - 1, 2 * r - 1)
    b = maps[0]["maps"]
    c = r - 1
    assert float(b[1, c, c]) == r * r  # head 1, offset (0, 0)
    assert float(b[0, c - 2, c + 3]) == 2 * r + 3 == float(b[0, c + 2, c - 3])  # |dy| = 2, |dx| = 3, symmetric
    assert I.bias_maps(_build(VIT)) == []


def test_non_square_model_keeps_its_filters():
    m = _build(dict(VIT_BIAS, img_size=[32, 48]))
    ins = I.inspect_model(m, [torch.randn(2, 3, 32, 48)], max_images=2)
    assert ins.filters.kind == "vit_patch" and ins.bias == [] and ins.distances == []
    assert "square" in ins.note and set(ins.metrics()) == {I.SMOOTHNESS_METRIC, I.SMOOTHNESS_MEDIAN_METRIC}


def test_inspect_model_metrics():
    ins = I.inspect_model(_build(LEVIT), [torch.randn(2, 3, 64, 64)], max_images=2)
    met = ins.metrics()
    assert met["inspect/filter_smoothness"] == pytest.approx(float(ins.smoothness.mean()))
    assert met["inspect/attn_distance/layer02/head07"] >= 0  # the shrink attention has 8 heads
    layer0 = [met[f"inspect/attn_distance/layer00/head{h:02d}"] for h in range(4)]
    assert met["inspect/attn_distance/layer00"] == pytest.approx(sum(layer0) / 4)
    assert len(ins.bias) == 11
    doc = ins.to_json()
    assert doc["filters"]["kind"] == "levit_conv" and len(doc["smoothness"]) == 16


# --------------------------------------------------------------------------- figures


ZOO_FAMILIES = {  # one variant of every zoo family, tiny
    "levit": LEVIT,
    "levit_ablation_one_stage": {"zoo": "levit_128s_a1", "img_size": 64, "num_classes": 4},
    "deit": VIT,
    "resnet50": RESNET,
    "graft": {
        "zoo": "resnet2_deit6",
        "img_size": 32,
        "num_classes": 4,
        "grid": 2,
        "stages": [{"dim": 32, "depth": 1, "heads": 2, "attn_ratio": 1.0, "mlp_ratio": 2.0}],
    },
}


@pytest.mark.parametrize("family", list(ZOO_FAMILIES))
def test_figures_render_for_every_zoo_family(family, tmp_path):
    from PIL import Image

    from lab import inspection_plot as P

    cfg = ZOO_FAMILIES[family]
    m = _build(cfg)
    ins = I.inspect_model(m, [torch.randn(2, 3, cfg["img_size"], cfg["img_size"])], max_images=2)
    figs = P.inspection_figures(ins, family, "run")
    want = (
        {"filters"}
        | ({"attention_bias"} if family.startswith("levit") else set())
        | (set() if family == "resnet50" else {"attention_distance"})
    )
    assert set(figs) == want
    for name, fig in figs.items():
        png, svg = P.save_and_close(fig, tmp_path / name)
        w, h = Image.open(png).size
        assert w > 300 and h > 200 and svg.read_text().lstrip().startswith("<?xml")


def test_seeds_aggregate_in_the_distance_plot():
    from lab import inspection_plot as P

    assert P.variant_group("vit-seed=1") == "vit" and P.variant_group("seed=0") == "base"
    assert P.variant_group("vit-lr=0.1-seed=2") == "vit-lr=0.1" and P.variant_group("vit") == "vit"
    rows = [
        {"layer": layer, "head": h, "distance_px": 10.0 * (layer + 1) + seed + h}
        for layer in range(3)
        for h in range(2)
        for seed in range(1)
    ]
    d = pd.concat(
        [
            P.distance_frame("vit", f"r{seed}", [dict(r, distance_px=r["distance_px"] + seed) for r in rows])
            for seed in range(3)
        ]
        + [P.distance_frame("bias", "b0", rows)]
    )
    fig = P.plot_attention_distance(d)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["vit (3 seeds)", "bias"]
    vit_line = ax.get_lines()[0]
    # mean over heads (+0.5) and seeds (+1): 11.5, 21.5, 31.5 at depths 1..3
    assert list(vit_line.get_xdata()) == [1, 2, 3] and list(vit_line.get_ydata()) == pytest.approx([11.5, 21.5, 31.5])
    assert len(ax.collections) == 3  # the seeds' band for vit, head dots for both
    P.pyplot()[0].close(fig)


# --------------------------------------------------------------------------- after `lab run`, and `lab plot`


@pytest.mark.slow
def test_run_logs_inspection_and_lab_plot_draws_any_finished_run(inspected_store, tmp_path, monkeypatch, capsys):
    """Training logs the metrics and figures; `lab plot` draws from final weights, also for a run
    trained without inspection (distances computed on the fly from its logged spec's data) and
    whose local checkpoint folder is gone (weights from the checkpoint/final.pt artifact)."""
    import shutil

    from PIL import Image

    from lab import cli, track
    from lab import inspection_plot as P
    from lab import spec as S

    store, path = inspected_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cl = track.client(store)
    runs = {r.data.tags["lab.variant"]: r for r in track.find_variant_runs(cl, "tinyinspect")}
    for key in ("vit", "bias", "graft"):
        m = runs[key].data.metrics
        assert 0 <= m[I.SMOOTHNESS_METRIC] <= 1
        heads = [m[I.distance_metric(0, h)] for h in range(2)]  # depth 1, 2 heads
        assert all(d > 0 for d in heads) and m[I.distance_metric(0)] == pytest.approx(sum(heads) / 2)
        assert m[I.DISTANCE_METRIC] == pytest.approx(m[I.distance_metric(0)])
        arts = {a.path.split("/")[-1] for a in cl.list_artifacts(runs[key].info.run_id, "inspect")}
        want = {"inspection.json", "filters.png", "filters.svg", "attention_distance.png", "attention_distance.svg"}
        assert arts == want | ({"attention_bias.png", "attention_bias.svg"} if key == "bias" else set())
    # the 16 px ViT has a 4x4 grid of 4 px tokens, the graft a 2x2 grid of 8 px tokens: bounded distances
    assert runs["vit"].data.metrics[I.DISTANCE_METRIC] < 3 * 4 * math.sqrt(2)
    assert runs["graft"].data.metrics[I.DISTANCE_METRIC] <= 8 * math.sqrt(2)
    assert not any(k.startswith("inspect/") for k in runs["old"].data.metrics)
    v_old = next(v for v in S.expand(S.load_spec(path)) if v.key == "old")
    shutil.rmtree(track.checkpoint_dir(v_old, store), ignore_errors=True)
    capsys.readouterr()

    out = tmp_path / "figs"
    assert cli.main(["plot", "tinyinspect", "--kind", "filters", "--out", str(out / "t_filters")]) == 0
    assert (
        cli.main(
            ["plot", "tinyinspect", "--kind", "attention-bias", "--images", "8", "--out", str(out / "t_attention_bias")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "old: attention distance computed now on 8 validation images" in printed
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "t_attention_bias_bias.png",
        "t_attention_bias_bias.svg",
        "t_attention_distance.png",
        "t_attention_distance.svg",
        "t_filters.png",
        "t_filters.svg",
    ]
    assert Image.open(out / "t_filters.png").size[0] > 600  # panels side by side (3 per row)
    # on-the-fly distances for `old` equal a direct computation on the same weights and images
    import grafts
    from lab.data import build_datamodule
    from lab.module import model_state_from_file

    cfg, sd = model_state_from_file(track.download_artifact(cl, runs["old"].info.run_id, "checkpoint/final.pt"))
    model = grafts.build(cfg)
    model.load_state_dict(sd)
    dm = build_datamodule(v_old.data)
    dm.setup("validate")
    rows = I.attention_distances(model, (x for x, _ in dm.val_dataloader()), max_images=8)
    found = {r.row["key"]: r for r in P.collect(R.load_runs(["tinyinspect"]), max_images=8, say=lambda s: None)}
    assert found["old"].distances["distance_px"].tolist() == pytest.approx([r["distance_px"] for r in rows])
    assert found["vit"].distances["distance_px"].tolist() == pytest.approx(
        [runs["vit"].data.metrics[I.distance_metric(0, h)] for h in range(2)]
    )
    # bad input: an unknown experiment is a one-line error
    assert cli.main(["plot", "nope", "--kind", "filters"]) == 2
