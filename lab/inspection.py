"""Look inside a trained variant: the LeViT paper's inspection figures, as numbers.

Pure computation on a built `grafts` model (torch only, no MLflow, no plotting):

- `first_layer`: the first learnt convolution, whatever the token embedding is: the ViT patch
  embedding (`embed.proj`, one k x k x 3 filter per channel), the LeViT PatchConv's first conv
  (`embed.conv1`, 3 x 3) or the ResNet-50 stem (`prefix.conv1`, 7 x 7, also for the grafts).
  A BatchNorm right after the conv is folded in (its scale and sign belong to the filter).
- `smoothness`: per filter, the fraction of its spectral energy at low spatial frequencies
  (radius <= `cutoff` cycles/pixel, DC included): 1 for a constant filter, 0 for a checkerboard.
- `bias_maps`: the learnt attention bias of every head of every layer with `position:
  attention_bias`, laid out over the signed (dy, dx) offset between query and key.
- `attention_distances`: the mean attention distance per head and layer (ViT paper, Fig. 7):
  the average pixel distance between a query and the keys, weighted by attention probabilities,
  averaged over queries and images.

Attention probabilities are recomputed by forward hooks from each attention module's own layers
(`softmax(q k^T * scale + bias)`), because bias-free attention runs fused SDPA, which never
materialises them. Conventions (also in the README):

- Token positions are grid indices times the layer's pixel stride: stage 0's stride is
  `img_size / token_grid` (the patch size of a ViT; 16 for LeViT; `img_size / grid` for a graft),
  and each stage after a downsampling doubles it.
- cls/distillation tokens have no position: they are dropped as queries, and as keys their
  probability mass is dropped and the remaining probabilities renormalised, so the distance is
  "where in the image does a patch look, among patches".
- Shrink attention (LeViT's downsampling) has queries on the stride-2 subsampled grid of its
  keys: a query sits at its key-grid position (2i, 2j), distances are in the key grid's stride.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lab import record as R

__all__ = [
    "DISTANCE_METRIC",
    "LOW_FREQ_CUTOFF",
    "SMOOTHNESS_MEDIAN_METRIC",
    "SMOOTHNESS_METRIC",
    "AttentionSite",
    "FirstLayer",
    "Inspection",
    "attention_distances",
    "attention_sites",
    "bias_maps",
    "capture_attention",
    "distance_metric",
    "filter_images",
    "first_layer",
    "grid_positions",
    "inspect_model",
    "mean_distance",
    "peek_grey",
    "smoothness",
]

LOW_FREQ_CUTOFF = 0.25  # cycles/pixel: half of Nyquist

# MLflow metric names (logged once, at the run's last step; defined in lab.record)
SMOOTHNESS_METRIC = R.INSPECT_SMOOTHNESS  # mean over first-layer filters
SMOOTHNESS_MEDIAN_METRIC = R.INSPECT_SMOOTHNESS_MEDIAN
DISTANCE_METRIC = R.INSPECT_DISTANCE  # mean over layers and heads (pixels)


def distance_metric(layer: int, head: int | None = None) -> str:
    """`inspect/attn_distance/layerNN` (mean over heads) or `.../layerNN/headMM` (one head)."""
    name = f"{DISTANCE_METRIC}/layer{layer:02d}"
    return name if head is None else f"{name}/head{head:02d}"


# --------------------------------------------------------------------------- first-layer filters


@dataclass
class FirstLayer:
    """The first learnt convolution: `weight` (filters, in_chans, k, k), BatchNorm folded."""

    kind: str  # vit_patch | levit_conv | resnet_stem
    name: str  # module path in the model
    weight: torch.Tensor
    stride: int
    grey: bool = False  # weight summed over input channels (grey images replicated to RGB)


def _fold_bn(w: torch.Tensor, bn: nn.Module | None) -> torch.Tensor:
    if isinstance(bn, nn.BatchNorm2d) and bn.running_var is not None:
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        w = w * (gamma / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    return w


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def first_layer(model: nn.Module, grey: bool = False) -> FirstLayer:
    """The first learnt conv of a grafts model (see the module docstring for the three kinds).

    `grey`: the inputs are grey images replicated to RGB (the embedded MNIST data): every
    channel then sees the same pixels, so the filter that acts is the sum over input channels
    (the per-channel parts differ only by their untrained initialisation); that sum is returned.
    """
    fl = _first_layer(model)
    if grey:
        fl.weight, fl.grey = fl.weight.sum(dim=1, keepdim=True), True
    return fl


def _first_layer(model: nn.Module) -> FirstLayer:
    stem = _get(model, "prefix.conv1") if getattr(model, "prefix", None) is not None else None
    if isinstance(stem, nn.Conv2d):
        return FirstLayer(
            "resnet_stem",
            "prefix.conv1",
            _fold_bn(stem.weight, _get(model, "prefix.bn1")).detach(),
            int(stem.stride[0]),
        )
    proj = _get(model, "embed.proj")
    if isinstance(proj, nn.Conv2d) and proj.kernel_size[0] == proj.stride[0] and proj.in_channels <= 4:
        return FirstLayer("vit_patch", "embed.proj", proj.weight.detach(), int(proj.stride[0]))
    conv = _get(model, "embed.conv1.conv")
    if isinstance(conv, nn.Conv2d):
        return FirstLayer(
            "levit_conv",
            "embed.conv1",
            _fold_bn(conv.weight, _get(model, "embed.conv1.bn")).detach(),
            int(conv.stride[0]),
        )
    raise ValueError(f"{type(model).__name__}: no first convolution found (prefix.conv1, embed.proj, embed.conv1)")


def smoothness(weight: torch.Tensor, cutoff: float = LOW_FREQ_CUTOFF) -> torch.Tensor:
    """Per filter of `weight` (F, C, k, k): energy at spatial frequencies of radius <= `cutoff`
    cycles/pixel (DC included) over the total energy, summed over input channels. In [0, 1];
    an all-zero filter scores 0."""
    w = weight.detach().double().cpu()
    k_h, k_w = w.shape[-2:]
    power = torch.fft.fft2(w).abs().pow(2).sum(dim=1)  # (F, kh, kw)
    fy, fx = torch.fft.fftfreq(k_h, dtype=torch.float64), torch.fft.fftfreq(k_w, dtype=torch.float64)
    low = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff + 1e-9
    total = power.flatten(1).sum(1)
    return torch.where(
        total > 0, (power * low).flatten(1).sum(1) / total.clamp_min(1e-300), torch.zeros_like(total)
    ).float()


def filter_images(weight: torch.Tensor) -> torch.Tensor:
    """(F, k, k, 3) float images in [0, 1], each filter min-max normalised on its own (the
    paper's display); one input channel is shown grey, more than three use the first three."""
    w = weight.detach().float().cpu()
    if w.shape[1] == 1:
        w = w.repeat(1, 3, 1, 1)
    w = w[:, :3]
    lo = w.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
    hi = w.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
    img = (w - lo) / (hi - lo).clamp_min(1e-12)
    img = torch.where((hi - lo) > 1e-12, img, torch.full_like(img, 0.5))
    return img.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- attention layers


@dataclass
class AttentionSite:
    """One attention layer: where it sits and the geometry of its tokens."""

    index: int  # depth order among attention layers (0 = first)
    name: str  # module path, e.g. stages.0.blocks.1.attn
    module: nn.Module
    stage: int
    kind: str  # block | shrink
    key_grid: int  # side of the key token grid
    query_step: int  # 1 (block) or 2 (shrink: queries on the subsampled key grid)
    n_extra: int  # cls/dist tokens in front of the keys (and queries)
    stride_px: float  # pixels between neighbouring keys
    heads: int
    has_bias: bool


_SITE = re.compile(r"^stages\.(\d+)\.(?:blocks\.(\d+)|(downsample))\.attn$")


def _is_attention(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("heads", "key_dim", "scale")) and (
        hasattr(m, "qkv") or (hasattr(m, "q") and hasattr(m, "kv"))
    )


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every attention layer of a grafts model in forward order (empty for a pure ResNet)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(model, "has_transformer", True):
        return []
    grids = list(cfg.stage_resolutions())  # (height, width) per stage
    if any(h != w for h, w in grids):
        raise ValueError(f"attention inspection needs square token grids, got {grids} (img_size {cfg.img_size})")
    res = [h for h, _ in grids]
    stride0 = cfg.img_hw[0] / cfg.token_grid()[0]
    halves = cfg.downsample != "none"
    n_extra = int(getattr(model, "n_extra", 0) or 0)
    sites: list[AttentionSite] = []
    for name, m in model.named_modules():
        hit = _SITE.match(name)
        if not hit or not _is_attention(m):
            continue
        stage = int(hit.group(1))
        shrink = hit.group(3) is not None
        grid_stage = stage - 1 if shrink else stage
        sites.append(
            AttentionSite(
                index=len(sites),
                name=name,
                module=m,
                stage=stage,
                kind="shrink" if shrink else "block",
                key_grid=res[grid_stage],
                query_step=2 if shrink else 1,
                n_extra=0 if shrink else n_extra,
                stride_px=stride0 * (2**grid_stage if halves else 1),
                heads=int(m.heads),
                has_bias=getattr(m, "pos_bias", None) is not None,
            )
        )
    return sites


def bias_maps(model: nn.Module) -> list[dict[str, Any]]:
    """Per attention layer with a learnt bias: {'site': AttentionSite, 'maps': (heads, 2r-1, 2r-1)}
    with maps[h, r-1+dy, r-1+dx] = the bias head h adds for a key at offset (dy, dx) from the
    query (symmetric, as the table is indexed by |dy|, |dx|)."""
    out = []
    for s in attention_sites(model):
        if not s.has_bias:
            continue
        table = s.module.pos_bias.table.detach().float().cpu()
        r = s.key_grid
        t = table.reshape(s.heads, r, r)  # [h, |dy|, |dx|]
        idx = (torch.arange(-(r - 1), r)).abs()
        out.append({"site": s, "maps": t[:, idx][:, :, idx]})
    return out


# --------------------------------------------------------------------------- attention probabilities


def _probs(site: AttentionSite, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) of `site` for its input tokens `x` (B, N, C): (B, H, Nq, Nk)."""
    m = site.module
    B, N, C = x.shape
    kd = m.key_dim
    if site.kind == "shrink":
        r = site.key_grid
        k = m.kv(x).view(B, N, m.heads, -1)[..., :kd]
        xq = x.view(B, r, r, C)[:, ::2, ::2].reshape(B, -1, C)
        q = m.q(xq).view(B, xq.shape[1], m.heads, kd)
    else:
        q, k = m.qkv(x).view(B, N, m.heads, -1)[..., : 2 * kd].split([kd, kd], dim=3)
    attn = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)).float() * m.scale
    if site.has_bias:
        attn = attn + m.pos_bias().float()
    return attn.softmax(dim=-1)


@contextmanager
def capture_attention(
    model: nn.Module, sites: list[AttentionSite] | None = None, reduce: Any | None = None
) -> Iterator[dict[int, list]]:
    """While active, every forward of an attention site appends its probabilities (B, H, Nq, Nk)
    to `captured[site.index]` (or `reduce(site, probs)` when given, to keep memory bounded)."""
    sites = attention_sites(model) if sites is None else sites
    captured: dict[int, list] = {s.index: [] for s in sites}
    handles = []
    for s in sites:

        def hook(module, args, output, s=s):
            p = _probs(s, args[0])
            captured[s.index].append(reduce(s, p) if reduce is not None else p)

        handles.append(s.module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def grid_positions(side: int, stride_px: float = 1.0, step: int = 1) -> torch.Tensor:
    """(n*n, 2) pixel positions (y, x) of a token grid's rows, row-major; `step` subsamples
    (positions 0, step, 2*step, ... of the `side` grid, as LeViT's shrink attention does)."""
    a = torch.arange(0, side, step, dtype=torch.float64) * stride_px
    yy, xx = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1)


def mean_distance(probs: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, n_extra: int = 0) -> torch.Tensor:
    """Mean attention distance per head: sum_k p(q, k) |pos_q - pos_k|, averaged over the batch
    and the spatial queries. `probs` (B, H, Nq, Nk) may start with `n_extra` cls/dist tokens on
    both axes: those queries are dropped, and their key mass removed and renormalised away."""
    p = probs.double()
    if n_extra:
        p = p[:, :, n_extra:, n_extra:]
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    if p.shape[-2:] != (q_pos.shape[0], k_pos.shape[0]):
        raise ValueError(
            f"attention {tuple(p.shape[-2:])} does not match {q_pos.shape[0]} queries x {k_pos.shape[0]} keys"
        )
    dist = torch.cdist(q_pos.double(), k_pos.double())  # (Nq, Nk)
    return (p * dist).sum(-1).mean(dim=(0, 2))


def _site_positions(s: AttentionSite) -> tuple[torch.Tensor, torch.Tensor]:
    k = grid_positions(s.key_grid, s.stride_px)
    q = grid_positions(s.key_grid, s.stride_px, s.query_step)
    return q, k


def attention_distances(
    model: nn.Module, batches: Iterable[torch.Tensor], max_images: int = 64
) -> list[dict[str, Any]]:
    """Mean attention distance (pixels) per head and layer over at most `max_images` images of
    `batches` (image tensors at the model's resolution). One dict per (layer, head): layer (depth
    order), name, stage, kind, head, distance_px, images. Empty for models without attention."""
    sites = attention_sites(model)
    if not sites:
        return []
    pos = {s.index: _site_positions(s) for s in sites}
    sums = {s.index: torch.zeros(s.heads, dtype=torch.float64) for s in sites}
    seen = 0

    def reduce(s: AttentionSite, p: torch.Tensor) -> torch.Tensor:
        q, k = pos[s.index]
        return mean_distance(p, q, k, s.n_extra) * p.shape[0]  # sum over images

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        with torch.no_grad(), capture_attention(model, sites, reduce) as cap:
            for x in batches:
                if seen >= max_images:
                    break
                x = x[: max_images - seen].to(dev)
                model(x)
                seen += x.shape[0]
                for s in sites:
                    sums[s.index] += sum(cap[s.index])
                    cap[s.index].clear()
    finally:
        model.train(was_training)
    if seen == 0:
        return []
    rows = []
    for s in sites:
        for h, d in enumerate((sums[s.index] / seen).tolist()):
            rows.append(
                {
                    "layer": s.index,
                    "name": s.name,
                    "stage": s.stage,
                    "kind": s.kind,
                    "head": h,
                    "distance_px": d,
                    "images": seen,
                }
            )
    return rows


# --------------------------------------------------------------------------- everything at once


@dataclass
class Inspection:
    """What `inspect_model` computes for one trained model."""

    filters: FirstLayer | None
    smoothness: torch.Tensor | None
    bias: list[dict[str, Any]] = field(default_factory=list)
    distances: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""  # why attention was not inspected (e.g. a non-square token grid)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: SMOOTHNESS_METRIC(_MEDIAN), DISTANCE_METRIC and `distance_metric(layer[, head])`."""
        out: dict[str, float] = {}
        if self.smoothness is not None and self.smoothness.numel():
            s = self.smoothness.double()
            out[SMOOTHNESS_METRIC] = float(s.mean())
            out[SMOOTHNESS_MEDIAN_METRIC] = float(s.median())
        if self.distances:
            by_layer: dict[int, list[float]] = {}
            for r in self.distances:
                by_layer.setdefault(r["layer"], []).append(r["distance_px"])
                out[distance_metric(r["layer"], r["head"])] = float(r["distance_px"])
            for layer, ds in by_layer.items():
                out[distance_metric(layer)] = sum(ds) / len(ds)
            all_d = [r["distance_px"] for r in self.distances]
            out[DISTANCE_METRIC] = sum(all_d) / len(all_d)
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain numbers for an artifact (`inspection.json`): everything the plots need but the weights."""
        f = self.filters
        return {
            "filters": None
            if f is None
            else {"kind": f.kind, "name": f.name, "shape": list(f.weight.shape), "stride": f.stride, "grey": f.grey},
            "smoothness": None if self.smoothness is None else [round(float(v), 6) for v in self.smoothness],
            "smoothness_cutoff": LOW_FREQ_CUTOFF,
            "bias": [
                {
                    "layer": b["site"].index,
                    "name": b["site"].name,
                    "stage": b["site"].stage,
                    "kind": b["site"].kind,
                    "maps": [[[round(float(v), 5) for v in row] for row in head] for head in b["maps"]],
                }
                for b in self.bias
            ],
            "distances": [{k: v for k, v in r.items()} for r in self.distances],
            "note": self.note,
        }


def peek_grey(batches: Iterable[torch.Tensor]) -> tuple[bool, Iterator[torch.Tensor]]:
    """(whether the first batch's images have identical colour channels, the batches unchanged)."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        return False, iter(())
    grey = (
        first.dim() == 4
        and first.shape[1] == 3
        and bool(torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 1], first[:, 2]))
    )
    return grey, itertools.chain([first], it)


def inspect_model(
    model: nn.Module, batches: Iterable[torch.Tensor] | None = None, max_images: int = 64, grey: bool | None = None
) -> Inspection:
    """Filters + smoothness, bias maps and (with `batches`) attention distances of `model`.
    `grey` (see `first_layer`): None = decided from the first batch (False without batches)."""
    if batches is not None and grey is None:
        grey, batches = peek_grey(batches)
    try:
        fl: FirstLayer | None = first_layer(model, grey=bool(grey))
    except ValueError:
        fl = None
    ins = Inspection(filters=fl, smoothness=smoothness(fl.weight) if fl is not None else None)
    try:
        attention_sites(model)
    except ValueError as e:  # a non-square token grid: the filters still stand
        ins.note = str(e)
        return ins
    ins.bias = bias_maps(model)
    if batches is not None and max_images > 0:
        ins.distances = attention_distances(model, batches, max_images)
    return ins
