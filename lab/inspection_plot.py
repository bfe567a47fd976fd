"""Figures and MLflow records for `lab.inspection`: after training, and for any finished run.

- `log_inspection`: at the end of `lab run`, computes the inspection of the trained model on a few
  validation images and logs it on the child run: metrics (`inspect/*`), `inspect/inspection.json`
  and the figures `inspect/filters`, `inspect/attention_bias`, `inspect/attention_distance`
  (PNG and SVG).
- `collect`: for runs read back by `lab.report.load_runs`, the same numbers from the run's final
  weights (`checkpoint/final.pt` artifact, else the local checkpoint folder); attention
  distances come from the logged metrics, or are computed on the fly from the run's validation
  data for older runs that predate them.
- `plot_filters`, `plot_attention_bias`, `plot_attention_distance`: the figures, for several
  variants at once; seeds of one variant (keys differing only in `seed=`) are aggregated.
- `cmd_plot`: `lab plot EXP --kind filters | attention-bias`.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from lab import record as R
from lab.errors import LabError
from lab.figures import pyplot, save_figure
from lab.inspection import (
    DISTANCE_METRIC,
    Inspection,
    attention_distances,
    bias_maps,
    filter_images,
    first_layer,
    inspect_model,
    smoothness,
)

KINDS = ("filters", "attention-bias")
MAX_FILTERS = 64  # per variant in the filter grid (the smoothest first)
_HEAD_METRIC = re.compile("^metrics\\." + re.escape(DISTANCE_METRIC) + r"/layer(\d+)/head(\d+)$")


def variant_group(key: str) -> str:
    """The variant a key belongs to when the grid repeats it over seeds (`x-seed=1` -> `x`)."""
    return re.sub(r"(^|-)seed=[^-]+", "", key).strip("-") or "base"


# --------------------------------------------------------------------------- figures


def _plt():
    return pyplot()


def filter_mosaic(images: torch.Tensor, cols: int = 8, pad: int = 1):
    """(F, k, k, 3) images -> one (rows*(k+pad)+pad, cols*(k+pad)+pad, 3) numpy mosaic on white."""
    import numpy as np

    n, k = images.shape[0], images.shape[1]
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.ones((rows * (k + pad) + pad, cols * (k + pad) + pad, 3), dtype=np.float32)
    arr = images.numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        out[pad + r * (k + pad) : pad + r * (k + pad) + k, pad + c * (k + pad) : pad + c * (k + pad) + k] = arr[i]
    return out


def plot_filters(panels: list[dict[str, Any]], title: str | None = None, max_filters: int = MAX_FILTERS):
    """One mosaic per variant: its first-layer filters, each colour-normalised on its own, the
    smoothest first. Panel: {label, kind, weight (F, C, k, k), smoothness (F,), seeds_smoothness
    (one mean per seed, optional)}."""
    if not panels:
        raise LabError("nothing to plot: no finished run with final weights")
    plt, _ = _plt()
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    mosaics = []
    for p in panels:
        order = torch.argsort(p["smoothness"], descending=True)[:max_filters]
        mosaics.append((order, filter_mosaic(filter_images(p["weight"][order]))))
    aspect = max(m.shape[0] / m.shape[1] for _, m in mosaics)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, (4.2 * aspect + 0.9) * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p, (order, mosaic) in zip(axes.flat, panels, mosaics):
        s = p["smoothness"]
        ax.imshow(mosaic, interpolation="nearest")
        k = p["weight"].shape[-1]
        grey = "\nsummed over R, G, B (grey input)" if p["weight"].shape[1] == 1 else ""
        seeds = p.get("seeds_smoothness") or []
        spread = f" ± {torch.tensor(seeds).std().item():.2f} ({len(seeds)} seeds)" if len(seeds) > 1 else ""
        shown = f"{len(order)} of {p['weight'].shape[0]}" if len(order) < p["weight"].shape[0] else f"{len(order)}"
        ax.set_title(
            f"{p['label']}\n{p['kind'].replace('_', ' ')} {k}x{k}, {shown} filters{grey}\n"
            f"low-freq. energy {float(s.mean()):.2f}{spread}",
            fontsize=9,
        )
    fig.suptitle(title or "first-layer filters (each normalised on its own; smoothest first)", fontsize=11)
    fig.tight_layout()
    return fig


def bias_mosaic(layers: list[dict[str, Any]], cell: int | None = None):
    """One (rows, cols) numpy image of every layer's (row) heads' (column) bias maps, each row
    divided by its largest |bias| (so in [-1, 1]), each map enlarged by an integer factor into a
    `cell` x `cell` square (default: the largest map), NaN between and around. Returns
    (image, cell, per-row scale)."""
    import numpy as np

    maps = [torch.as_tensor(lay["maps"]).float().numpy() for lay in layers]
    cell = cell or max(m.shape[-1] for m in maps)
    heads = max(m.shape[0] for m in maps)
    img = np.full((len(maps) * (cell + 1) + 1, heads * (cell + 1) + 1), np.nan, dtype=np.float32)
    scales = []
    for i, m in enumerate(maps):
        scale = float(np.abs(m).max())
        scales.append(scale)
        scale = scale or 1.0  # an all-zero layer (e.g. one whose bias gets no gradient) stays white
        f = max(1, cell // m.shape[-1])
        big = np.repeat(np.repeat(m / scale, f, axis=1), f, axis=2)
        off = (cell - big.shape[-1]) // 2
        for h in range(m.shape[0]):
            y, x = 1 + i * (cell + 1) + off, 1 + h * (cell + 1) + off
            img[y : y + big.shape[-1], x : x + big.shape[-1]] = big[h]
    return img, cell, scales


def plot_attention_bias(label: str, layers: list[dict[str, Any]], title: str | None = None):
    """The learnt attention bias of every head (columns) of every layer (rows), over the (dy, dx)
    offset from the query (each map's centre, marked +). Colours are relative per layer: each
    row is divided by its largest |bias|, written in the row label. layers: [{name, stage, kind,
    maps (H, 2r-1, 2r-1)}] in depth order. Drawn as one image, so it renders fast at any depth."""
    if not layers:
        raise LabError(f"{label}: no attention-bias layers (position is not attention_bias)")
    plt, _ = _plt()
    img, cell, scales = bias_mosaic(layers)
    rows, heads = len(layers), (img.shape[1] - 1) // (cell + 1)
    fig, ax = plt.subplots(figsize=(1.6 + 0.95 * heads, 0.9 + 0.95 * rows))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    im = ax.imshow(img, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    centre = 1 + (cell - 1) / 2
    xs = [centre + h * (cell + 1) for h in range(heads)]
    ys = [centre + i * (cell + 1) for i in range(rows)]
    pts = [(x, y) for i, y in enumerate(ys) for h, x in enumerate(xs) if h < layers[i]["maps"].shape[0]]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="+", color="black", s=14, linewidths=0.7)
    ax.set_xticks(xs, [f"head {h}" for h in range(heads)], fontsize=7)
    ax.set_yticks(
        ys,
        [
            f"stage {lay['stage']} {'shrink' if lay['kind'] == 'shrink' else 'block ' + _block_no(lay['name'])}"
            f" (±{sc:.2g})"
            for lay, sc in zip(layers, scales)
        ],
        fontsize=7,
    )
    ax.xaxis.tick_top()
    ax.grid(False)
    for side in ax.spines.values():
        side.set_visible(False)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, ticks=[-1, 0, 1])
    cb.ax.set_yticklabels(["-max", "0", "+max"], fontsize=7)
    ax.set_title(
        title
        or f"{label}: learnt attention bias per head over the (dy, dx) offset\n"
        "(red: attend more, blue: less; + = the query's own position)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def _block_no(name: str) -> str:
    m = re.search(r"blocks\.(\d+)", name)
    return m.group(1) if m else ""


def plot_attention_distance(data: pd.DataFrame, title: str | None = None):
    """Mean attention distance (pixels) per layer against depth, one line per variant: the mean
    over heads, averaged over seeds with a band (min..max of the seeds' means) when there are
    several; dots: single heads. data: label, run_id, layer, head, distance_px."""
    if data.empty:
        raise LabError("nothing to plot: no attention layers with a mean attention distance")
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.2))
    per_run = data.groupby(["label", "run_id", "layer"], as_index=False)["distance_px"].mean()
    labels = list(dict.fromkeys(data["label"]))
    palette = dict(zip(labels, sns.color_palette("tab10", max(len(labels), 1))))
    for lab in labels:
        d = per_run[per_run["label"] == lab]
        agg = d.groupby("layer")["distance_px"].agg(["mean", "min", "max", "count"]).reset_index()
        n_runs = d["run_id"].nunique()
        name = f"{lab} ({n_runs} seeds)" if n_runs > 1 else lab
        ax.plot(agg["layer"] + 1, agg["mean"], marker="o", color=palette[lab], label=name)
        if n_runs > 1:
            ax.fill_between(agg["layer"] + 1, agg["min"], agg["max"], color=palette[lab], alpha=0.2, linewidth=0)
        heads = data[data["label"] == lab]
        ax.scatter(heads["layer"] + 1, heads["distance_px"], s=10, color=palette[lab], alpha=0.35, linewidths=0)
    ax.set_xlabel("attention layer (depth)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "mean attention distance per layer (lines: mean over heads; dots: heads)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def distance_frame(label: str, run_id: str, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "label": label,
                "run_id": run_id,
                "layer": int(r["layer"]),
                "head": int(r["head"]),
                "distance_px": float(r["distance_px"]),
            }
            for r in rows
        ],
        columns=["label", "run_id", "layer", "head", "distance_px"],
    )


def _bias_layers(bias: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": b["site"].name, "stage": b["site"].stage, "kind": b["site"].kind, "maps": b["maps"]} for b in bias]


def inspection_figures(ins: Inspection, label: str, run_id: str = "") -> dict[str, Any]:
    """The figures of one trained model: {'filters', 'attention_bias', 'attention_distance'} (those that apply)."""
    figs: dict[str, Any] = {}
    if ins.filters is not None and ins.smoothness is not None:
        figs["filters"] = plot_filters(
            [{"label": label, "kind": ins.filters.kind, "weight": ins.filters.weight, "smoothness": ins.smoothness}]
        )
    if ins.bias:
        figs["attention_bias"] = plot_attention_bias(label, _bias_layers(ins.bias))
    if ins.distances:
        figs["attention_distance"] = plot_attention_distance(
            distance_frame(label, run_id, ins.distances), title=f"{label}: mean attention distance per layer"
        )
    return figs


def save_and_close(fig, stem: Path) -> list[Path]:
    """STEM.png and STEM.svg, then the figure is closed (many figures per command)."""
    paths = save_figure(fig, stem)
    pyplot()[0].close(fig)
    return paths


# --------------------------------------------------------------------------- after training


def log_inspection(
    cl,
    run_id: str,
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor] | None,
    *,
    label: str,
    max_images: int,
    step: int,
) -> dict[str, float]:
    """Inspect the trained `model` and log metrics, `inspect/inspection.json` and the figures on
    `run_id`. Returns the metrics."""
    from lab import track

    ins = inspect_model(model, batches, max_images=max_images)
    metrics = ins.metrics()
    if metrics:
        track.log_metrics(cl, run_id, metrics, step)
    with tempfile.TemporaryDirectory(prefix="lab-inspect-") as tmp:
        d = Path(tmp)
        (d / "inspection.json").write_text(json.dumps(ins.to_json()))
        for name, fig in inspection_figures(ins, label, run_id).items():
            save_and_close(fig, d / name)
        cl.log_artifacts(run_id, str(d), "inspect")
    return metrics


# --------------------------------------------------------------------------- from the store


@dataclass
class RunInspection:
    """One run read back: its row from `load_runs`, weights-based results and distances."""

    row: pd.Series
    label: str
    filters: dict[str, Any] | None  # {kind, weight, smoothness}
    bias: list[dict[str, Any]]  # plot_attention_bias layers
    distances: pd.DataFrame  # distance_frame
    note: str = ""


def final_weights(cl, row: pd.Series, uri: str) -> Path | None:
    """The run's `final.pt`: the local checkpoint folder of the store, else the run's artifact."""
    from lab import track

    exp, key, h = row.get("experiment"), row.get("key"), row.get("hash")
    if exp and key and h:
        root = (track.store_dir(uri) / "checkpoints").resolve()
        local = track.checkpoint_dir(SimpleNamespace(experiment=exp, key=key, hash=h), uri) / "final.pt"
        if local.resolve().is_relative_to(root) and local.is_file():
            return local
    try:
        return track.download_artifact(cl, row["run_id"], R.FINAL_CHECKPOINT)
    except Exception:  # noqa: BLE001 - no artifact (tracking.log_checkpoint off, or a foreign run)
        return None


def _load_model(path: Path):
    import grafts
    from lab.module import model_state_from_file

    cfg, sd = model_state_from_file(path)
    if cfg is None:
        raise LabError(f"{path}: no model config in the checkpoint")
    model = grafts.build(cfg)
    model.load_state_dict(sd)
    return model.eval()


def _logged_distances(row: pd.Series, label: str) -> pd.DataFrame:
    rows = []
    for col, val in row.items():
        m = _HEAD_METRIC.match(str(col))
        if m and pd.notna(val):
            rows.append({"layer": int(m.group(1)), "head": int(m.group(2)), "distance_px": float(val)})
    return distance_frame(label, row["run_id"], rows)


def _grey_input(cl, row: pd.Series) -> bool:
    """Whether the run trained on grey images replicated to RGB: as its inspection found, else
    (runs from before inspection) when its data is the embedded MNIST set."""
    from lab import track

    try:
        doc = json.loads(track.download_artifact(cl, row["run_id"], R.INSPECTION_FILE).read_text())
        return bool((doc.get("filters") or {}).get("grey", False))
    except Exception:  # noqa: BLE001 - no inspection artifact
        return str(row.get("params.data.dataset", "")) == "embedded"


def _val_batches(cl, run_id: str):
    """Validation images of a run, rebuilt from its `spec.yaml` artifact (None when impossible)."""
    import yaml

    from lab import track
    from lab.data import build_datamodule
    from lab.spec import DataSpec

    doc = yaml.safe_load(track.download_artifact(cl, run_id, R.SPEC_YAML).read_text())
    dm = build_datamodule(DataSpec.model_validate(doc["data"]))
    dm.setup("validate")
    return (x for x, _ in dm.val_dataloader())


def collect(
    df: pd.DataFrame, *, want_distances: bool = True, max_images: int = 64, say: Callable[[str], None] = print
) -> list[RunInspection]:
    """Inspect every FINISHED run of `df` (from `lab.report.load_runs`) from its final weights."""
    from lab import track

    uri = df.attrs.get("tracking_uri") or track.tracking_uri(None)
    cl = track.client(uri)
    out = []
    for _, row in df.iterrows():
        label = _run_label(df, row)
        if row["status"] != "FINISHED":
            say(f"{row['key']}: skipped ({row['status']}, no final weights)")
            continue
        path = final_weights(cl, row, uri)
        if path is None:
            say(f"{row['key']}: skipped (no checkpoint/final.pt artifact and no local checkpoint)")
            continue
        model = _load_model(path)
        out.append(_inspect_run(cl, row, label, model, want_distances=want_distances, max_images=max_images, say=say))
    return out


def _run_label(df: pd.DataFrame, row: pd.Series) -> str:
    """The run's variant group, prefixed with its experiment when `df` holds several."""
    label = variant_group(str(row["key"]))
    if len(set(df["experiment"])) > 1:
        label = f"{row['experiment']}/{label}"
    return label


def _inspect_run(
    cl, row: pd.Series, label: str, model, *, want_distances: bool, max_images: int, say: Callable[[str], None]
) -> RunInspection:
    """What the run's trained `model` shows: first-layer filters, attention bias maps and distances."""
    filters = _first_layer_filters(cl, row, model)
    try:
        bias = _bias_layers(bias_maps(model))
    except ValueError as e:  # a non-square token grid: filters only
        say(f"{row['key']}: attention not inspected ({e})")
        return RunInspection(
            row=row,
            label=label,
            filters=filters,
            bias=[],
            distances=distance_frame(label, row["run_id"], []),
            note=str(e),
        )
    dist, note = _run_distances(cl, row, label, model, want_distances=want_distances, max_images=max_images, say=say)
    return RunInspection(row=row, label=label, filters=filters, bias=bias, distances=dist, note=note)


def _first_layer_filters(cl, row: pd.Series, model) -> dict[str, Any] | None:
    """{kind, weight, smoothness} of the model's first layer (None: no first layer to show)."""
    try:
        fl = first_layer(model, grey=_grey_input(cl, row))
        return {"kind": fl.kind, "weight": fl.weight, "smoothness": smoothness(fl.weight)}
    except ValueError:
        return None


def _run_distances(
    cl, row: pd.Series, label: str, model, *, want_distances: bool, max_images: int, say: Callable[[str], None]
) -> tuple[pd.DataFrame, str]:
    """The run's mean attention distances as logged, else (a transformer that logged none)
    computed now on validation images; with a note on how they were found ('' when logged)."""
    dist = _logged_distances(row, label) if want_distances else distance_frame(label, row["run_id"], [])
    if not (want_distances and dist.empty and getattr(model, "has_transformer", False)):
        return dist, ""
    try:
        dist = distance_frame(
            label, row["run_id"], attention_distances(model, _val_batches(cl, row["run_id"]), max_images)
        )
        note = f"attention distance computed now on {max_images} validation images"
    except Exception as e:  # noqa: BLE001 - e.g. the data root of an old run is gone
        note = f"no attention distance ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    say(f"{row['key']}: {note}")
    return dist, note


def filter_panels(found: list[RunInspection]) -> list[dict[str, Any]]:
    """One panel per variant group: the first run's filters, the seeds' mean smoothness alongside."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        if r.filters is not None:
            groups.setdefault(r.label, []).append(r.filters)
    panels = []
    for label, filters in groups.items():
        f = filters[0]
        panels.append(
            {
                "label": label,
                "kind": f["kind"],
                "weight": f["weight"],
                "smoothness": f["smoothness"],
                "seeds_smoothness": [float(x["smoothness"].mean()) for x in filters],
            }
        )
    return panels


def summary(found: list[RunInspection]) -> pd.DataFrame:
    """One row per variant (seeds averaged): first-layer kind, mean filter smoothness, mean
    attention distance of the first and the last attention layer and over all layers (pixels)."""
    rows = []
    for r in found:
        d = r.distances.groupby("layer")["distance_px"].mean() if not r.distances.empty else pd.Series(dtype=float)
        rows.append(
            {
                "variant": r.label,
                "first layer": r.filters["kind"] if r.filters else None,
                "smoothness": float(r.filters["smoothness"].mean()) if r.filters else float("nan"),
                "bias layers": len(r.bias),
                "distance first (px)": float(d.iloc[0]) if len(d) else float("nan"),
                "distance last (px)": float(d.iloc[-1]) if len(d) else float("nan"),
                "distance mean (px)": float(d.mean()) if len(d) else float("nan"),
            }
        )
    cols = [
        "variant",
        "first layer",
        "smoothness",
        "bias layers",
        "distance first (px)",
        "distance last (px)",
        "distance mean (px)",
    ]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows, columns=cols)
    n = df.groupby("variant", sort=False).size().rename("seeds")
    out = df.groupby("variant", sort=False).agg(
        {
            "first layer": "first",
            "smoothness": "mean",
            "bias layers": "first",
            "distance first (px)": "mean",
            "distance last (px)": "mean",
            "distance mean (px)": "mean",
        }
    )
    return out.join(n).reset_index()


# --------------------------------------------------------------------------- `lab plot --kind filters|attention-bias`


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("._") or "variant"


def cmd_plot(
    df: pd.DataFrame, kind: str, stem: Path, *, max_images: int = 64, say: Callable[[str], None] = print
) -> list[Path]:
    """Write the figures of `kind` for the runs of `df`; returns the files written.

    filters: STEM.{png,svg}, one panel per variant. attention-bias: STEM_<variant>.{png,svg} per
    variant with an attention bias, and the mean attention distance of every attention variant
    in STEM with `attention_bias` replaced by `attention_distance` (else STEM_distance)."""
    found = collect(df, want_distances=kind == "attention-bias", max_images=max_images, say=say)
    if not found:
        raise LabError("nothing to plot: no FINISHED run with final weights (checkpoint/final.pt)")
    written: list[Path] = []
    if kind == "filters":
        written += save_and_close(plot_filters(filter_panels(found)), stem)
        return written
    seen: set[str] = set()
    for r in found:
        if r.bias and r.label not in seen:  # one bias figure per variant (the first seed)
            seen.add(r.label)
            written += save_and_close(
                plot_attention_bias(r.label, r.bias), stem.with_name(f"{stem.name}_{_safe(r.label)}")
            )
    if not seen:
        say("no variant has position: attention_bias: no bias maps")
    dist = pd.concat(
        [r.distances for r in found if not r.distances.empty] or [distance_frame("", "", [])], ignore_index=True
    )
    if not dist.empty:
        name = (
            stem.name.replace("attention_bias", "attention_distance")
            if "attention_bias" in stem.name
            else f"{stem.name}_distance"
        )
        written += save_and_close(plot_attention_distance(dist), stem.with_name(name))
    elif not seen:
        raise LabError("nothing to plot: no variant has attention layers")
    return written
