"""Figures: their data (`pareto_data`, `convergence_data`, `seeds_data`: plain DataFrames that
tests and notebooks can assert on) and the drawing of it (`plot_pareto`, `plot_convergence`,
`plot_seeds`: each draws only what its data function returns and gives back the matplotlib Figure).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from lab import record as R
from lab.errors import LabError
from lab.figures import pyplot
from lab.report.runs import BENCH_METRIC, DEVICES, FINISHED, REF_THROUGHPUT, X_LABELS, history, metric_col, tag_col
from lab.report.tables import ablation_table, overall_status, run_values

# --------------------------------------------------------------------------- figure data


def _variant_status(df: pd.DataFrame) -> pd.Series:
    """Per row: its variant's status over all its seeds (FINISHED only when every seed finished)."""
    return df.groupby(["experiment", "key"], sort=False)["status"].transform(overall_status)


def _label(df: pd.DataFrame) -> pd.Series:
    """A variant's name in figures (one per variant, whatever its seeds): KEY, EXPERIMENT/KEY
    when several experiments are shown, '(running)' etc. while not every seed has finished."""
    multi = df["experiment"].nunique() > 1
    lab = (df["experiment"] + "/" + df["key"]) if multi else df["key"].copy()
    status = _variant_status(df) if not df.empty else df["status"]
    unfinished = status != FINISHED
    return lab.where(~unfinished, lab + " (" + status.str.lower() + ")")


def pick_device(df: pd.DataFrame) -> str:
    """cuda when any run has a GPU throughput (ours or the paper's), else cpu."""
    for c in (metric_col(BENCH_METRIC["cuda"]), tag_col(REF_THROUGHPUT["cuda"])):
        if c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any():
            return "cuda"
    return "cpu"


def pareto_front(throughput: Sequence[float], top1: Sequence[float]) -> list[bool]:
    """True where no other point is at least as fast and as accurate, and better in one."""
    pts = list(zip(throughput, top1))
    return [not any((t2 >= t and a2 >= a) and (t2 > t or a2 > a) for t2, a2 in pts) for t, a in pts]


def _spread(t: pd.DataFrame, dev: str, side: int) -> pd.Series:
    """The throughput error bar's end: the slowest (side -1) / fastest (+1) of the bench repeats,
    widened to mean -/+ std over seeds where that is wider."""
    mean, std = t[f"{dev}_imgs_s"], t[f"{dev}_imgs_s_std"].fillna(0)
    end = t[f"{dev}_imgs_s_lo" if side < 0 else f"{dev}_imgs_s_hi"].fillna(mean)
    return end.combine(mean + side * std, min if side < 0 else max)


PARETO_COLUMNS = [
    "experiment",
    "key",
    "label",
    "source",
    "device",
    "throughput",
    "top1",
    "throughput_lo",
    "throughput_hi",
    "top1_std",
    "n_seeds",
    "baseline",
    "on_front",
]


def pareto_data(df: pd.DataFrame, device: str | None = None) -> pd.DataFrame:
    """Top-1 vs inference throughput per variant (means over its finished seeds), ours and the
    paper's, with Pareto-front membership.

    Columns: experiment, key, label, source ('measured' | 'paper'), device, throughput (img/s),
    top1 (%), throughput_lo/_hi (slowest/fastest bench repeat, or mean -/+ std over seeds where
    wider), top1_std (over seeds; NaN for one), n_seeds, baseline, on_front
    (within its source). Variants missing either number are left out; no paper points when a
    smoke run is among the variants (a smoke run is not comparable with the paper).
    """
    if df.empty:
        return pd.DataFrame(columns=PARETO_COLUMNS)
    device = device or pick_device(df)
    if device not in DEVICES:
        raise LabError(f"unknown device '{device}'; choose cpu or cuda")
    t = ablation_table(df)
    ours = _measured_points(t, df, device)
    paper = _paper_points(t, device)
    if t["smoke"].astype(bool).any():
        paper = paper.iloc[0:0]
    return _with_fronts([ours, paper])


def _measured_points(t: pd.DataFrame, df: pd.DataFrame, device: str) -> pd.DataFrame:
    """Our point of every variant of the ablation table `t` (labels from the runs `df`)."""
    labels = dict(zip(zip(df["experiment"], df["key"]), _label(df)))
    dev = "cpu" if device == "cpu" else "gpu"
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "key": t["key"],
            "label": [labels[(e, k)] for e, k in zip(t["experiment"], t["key"])],
            "source": "measured",
            "device": device,
            "throughput": t[f"{dev}_imgs_s"],
            "top1": t["top1"],
            "throughput_lo": _spread(t, dev, -1),
            "throughput_hi": _spread(t, dev, 1),
            "top1_std": t["top1_std"],
            "n_seeds": t["n_seeds"],
            "baseline": t["baseline"],
        }
    )


def _paper_points(t: pd.DataFrame, device: str) -> pd.DataFrame:
    """The paper's point of every variant of the ablation table `t` (no spread, no seeds)."""
    dev = "cpu" if device == "cpu" else "gpu"
    return pd.DataFrame(
        {
            "experiment": t["experiment"],
            "key": t["key"],
            "label": t["key"] + " (paper)",
            "source": "paper",
            "device": device,
            "throughput": t[f"ref_{dev}_imgs_s"],
            "top1": t["ref_top1"],
            "throughput_lo": math.nan,
            "throughput_hi": math.nan,
            "top1_std": math.nan,
            "n_seeds": math.nan,
            "baseline": t["baseline"],
        }
    )


def _with_fronts(sources: list[pd.DataFrame]) -> pd.DataFrame:
    """The points of every source that have both numbers, each marked on_front within its source."""
    parts = []
    for part in sources:
        part = part.dropna(subset=["throughput", "top1"]).copy()
        part["on_front"] = pareto_front(part["throughput"].tolist(), part["top1"].tolist())
        parts.append(part)
    out = (
        pd.concat([p for p in parts if not p.empty], ignore_index=True)
        if any(not p.empty for p in parts)
        else pd.DataFrame(columns=PARETO_COLUMNS)
    )
    return out[PARETO_COLUMNS].reset_index(drop=True)


def convergence_data(
    df: pd.DataFrame, x: str = R.IMAGES_SEEN, metric: str = R.VAL_TOP1, tracking_uri: str | None = None
) -> pd.DataFrame:
    """Validation curves of the chosen runs (every finished seed; a variant with none: every run
    as far as it got): experiment, key, label (one per variant), seed, status, run_id, step, x, top1."""
    cols = ["experiment", "key", "label", "seed", "status", "run_id", "step", "x", "top1"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    # a variant with finished seeds is drawn from those (as the table counts them); others as far as they got
    done = (df["status"] == FINISHED).groupby([df["experiment"], df["key"]]).transform("any")
    df = df.assign(_label=_label(df))[(df["status"] == FINISHED) | ~done]
    h = history(df["run_id"].tolist(), metric=metric, x=x, tracking_uri=tracking_uri or df.attrs.get("tracking_uri"))
    seed = df["seed"] if "seed" in df.columns else 0
    meta = df[["run_id", "experiment", "key", "status"]].assign(label=df["_label"], seed=seed)
    out = meta.merge(h, on="run_id", how="inner").rename(columns={"value": "top1"})
    out = out[cols].reset_index(drop=True)
    out.attrs.update(x=x, metric=metric)
    return out


def seeds_data(df: pd.DataFrame) -> pd.DataFrame:
    """Final top-1 of every finished seed: experiment, key, label, seed, top1, baseline."""
    cols = ["experiment", "key", "label", "seed", "top1", "baseline"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    t = ablation_table(df)
    base = set(zip(t.loc[t["baseline"], "experiment"], t.loc[t["baseline"], "key"]))
    v = run_values(df).assign(label=_label(df))
    v = v[(v["status"] == FINISHED) & v["top1"].notna()]
    v = v.assign(baseline=[(e, k) in base for e, k in zip(v["experiment"], v["key"])])
    return v[cols].reset_index(drop=True)


# --------------------------------------------------------------------------- plots


_plt = pyplot  # (pyplot, seaborn) with the lab theme (lab.figures)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "d", "H", "8")


def variant_styles(labels: Sequence[str]) -> dict[str, tuple[Any, str]]:
    """label -> (colour, marker), distinct for every label: tab10 up to 10 variants, tab20 up to 20
    (then husl), with the marker cycling on its own period so colour+marker pairs never repeat."""
    import seaborn as sns

    labels = list(dict.fromkeys(labels))
    n = max(len(labels), 1)
    colours = sns.color_palette("tab10" if n <= 10 else "tab20" if n <= 20 else "husl", n)
    return {lab: (colours[i], MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def _repel(ax, texts: list, max_iter: int = 500, pad: float = 2.0) -> None:
    """Move annotation labels apart until their boxes no longer overlap (a small stand-in for
    adjustText): boxes are measured once, overlapping pairs are pushed apart along the axis of
    least overlap in display space, and the result becomes each label's offset from its point."""
    if len(texts) < 2:
        return
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, renderer) for t in texts]  # the text alone, not its leader line
    cx = [(b.x0 + b.x1) / 2 for b in boxes]
    cy = [(b.y0 + b.y1) / 2 for b in boxes]
    hw = [b.width / 2 + pad for b in boxes]
    hh = [b.height / 2 + pad for b in boxes]
    x0, y0 = list(cx), list(cy)
    n = len(texts)
    for _ in range(max_iter):
        moved = False
        for i in range(n):
            for j in range(i + 1, n):
                ox = hw[i] + hw[j] - abs(cx[i] - cx[j])
                oy = hh[i] + hh[j] - abs(cy[i] - cy[j])
                if ox <= 0 or oy <= 0:
                    continue
                moved = True
                if oy <= ox:  # cheaper to separate vertically
                    d = (oy / 2 + 0.5) * (1 if cy[i] > cy[j] or (cy[i] == cy[j] and i < j) else -1)
                    cy[i] += d
                    cy[j] -= d
                else:
                    d = (ox / 2 + 0.5) * (1 if cx[i] > cx[j] or (cx[i] == cx[j] and i < j) else -1)
                    cx[i] += d
                    cx[j] -= d
        if not moved:
            break
    for t, a, b, c, d in zip(texts, x0, y0, cx, cy):
        ox, oy = t.xyann
        t.xyann = (ox + (c - a) / px_per_pt, oy + (d - b) / px_per_pt)


def _error_bars(ax, ours: pd.DataFrame) -> None:
    """Grey error bars where there is a spread: throughput from the slowest to the fastest bench
    repeat, top-1 ± 1 std over seeds."""
    xerr = None
    if {"throughput_lo", "throughput_hi"} <= set(ours.columns):
        xerr = [
            (ours["throughput"] - ours["throughput_lo"]).clip(lower=0).fillna(0).tolist(),
            (ours["throughput_hi"] - ours["throughput"]).clip(lower=0).fillna(0).tolist(),
        ]
        xerr = xerr if any(x > 0 for side in xerr for x in side) else None
    yerr = ours["top1_std"].fillna(0) if "top1_std" in ours and ours["top1_std"].notna().any() else None
    if xerr is not None or yerr is not None:
        ax.errorbar(
            ours["throughput"],
            ours["top1"],
            xerr=xerr,
            yerr=yerr,
            fmt="none",
            ecolor="grey",
            elinewidth=1,
            capsize=3,
            alpha=0.8,
            zorder=2,
        )


def _baseline_line(ax, ours: pd.DataFrame) -> None:
    """The baseline's top-1 as a dashed horizontal line (none without a baseline)."""
    base = ours[ours["baseline"].astype(bool)] if "baseline" in ours else ours.iloc[0:0]
    if not base.empty:
        ax.axhline(
            base["top1"].iloc[0],
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"baseline: {base['key'].iloc[0]}",
            zorder=1,
        )


def _draw_measured(ax, sns, ours: pd.DataFrame) -> list:
    """Our points (error bars, a colour and marker per variant, the front ringed and as a step line,
    the baseline line); returns their labels."""
    styles = variant_styles(ours["label"])
    _error_bars(ax, ours)
    sns.scatterplot(
        data=ours,
        x="throughput",
        y="top1",
        hue="label",
        style="label",
        palette={k: c for k, (c, _) in styles.items()},
        markers={k: m for k, (_, m) in styles.items()},
        s=90,
        ax=ax,
        edgecolor="black",
        linewidth=0.6,
        zorder=3,
    )
    front = ours[ours["on_front"]]
    ax.scatter(
        front["throughput"],
        front["top1"],
        s=230,
        facecolors="none",
        edgecolors="black",
        linewidths=1.4,
        label="on Pareto front",
        zorder=4,
    )
    _front_line(ax, ours, color="black", style="-", label="Pareto front")
    _baseline_line(ax, ours)
    return [
        ax.annotate(
            r["key"],
            (r["throughput"], r["top1"]),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=8,
            arrowprops=dict(arrowstyle="-", color="grey", lw=0.5, shrinkA=0, shrinkB=4),
        )
        for _, r in ours.iterrows()
    ]


def _draw_paper(ax, paper: pd.DataFrame) -> list:
    """The paper's points as light open diamonds with their dotted front; returns their labels."""
    ax.scatter(
        paper["throughput"],
        paper["top1"],
        marker="D",
        s=50,
        facecolors="none",
        edgecolors="grey",
        alpha=0.7,
        label="paper",
        zorder=2,
    )
    _front_line(ax, paper, color="grey", style=":", label="paper front")
    return [
        ax.annotate(
            f"{r['key']} (paper)",
            (r["throughput"], r["top1"]),
            xytext=(6, -10),
            textcoords="offset points",
            fontsize=7,
            color="grey",
            arrowprops=dict(arrowstyle="-", color="lightgrey", lw=0.5, shrinkA=0, shrinkB=4),
        )
        for _, r in paper.iterrows()
    ]


def _pareto_axes(ax, data: pd.DataFrame, ours: pd.DataFrame, title: str | None) -> None:
    """Log throughput axis, axis labels, title and the legend outside on the right."""
    device = data["device"].iloc[0]
    ax.set_xscale("log")
    _log_ticks(ax)
    ax.set_xlabel(f"{'GPU' if device == 'cuda' else 'CPU'} inference throughput (images/s, log scale)")
    n = ours["n_seeds"].max() if "n_seeds" in ours and not ours.empty else math.nan
    ax.set_ylabel("top-1 accuracy (%)" + (", mean ± std over seeds" if n and n > 1 else ""))
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: accuracy vs {'GPU' if device == 'cuda' else 'CPU'} speed")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)


def plot_pareto(data: pd.DataFrame, title: str | None = None):
    """Top-1 vs throughput (log x): one point per variant at its mean over seeds with error bars
    on both axes (top-1: ± 1 std over seeds; throughput: the slowest to fastest bench repeat), a distinct colour and marker per variant, labels kept apart, the
    baseline's top-1 as a dashed line, the Pareto front as a step line, the paper's points as
    light open diamonds. Returns the matplotlib Figure."""
    if data.empty:
        raise LabError(
            "nothing to plot: no variant has both a top-1 and a throughput for this device "
            "(run `lab bench`, or try --device cpu/cuda)"
        )
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 6))
    ours = data[data["source"] == "measured"]
    paper = data[data["source"] == "paper"]
    texts: list = []
    if not ours.empty:
        texts += _draw_measured(ax, sns, ours)
    if not paper.empty:
        texts += _draw_paper(ax, paper)
    _pareto_axes(ax, data, ours, title)
    fig.tight_layout()
    _repel(ax, texts)
    return fig


def _front_line(ax, pts: pd.DataFrame, color: str, style: str, label: str) -> None:
    """The front as a staircase, the edge of what the points dominate: at throughput x it is the best
    top-1 of the points at least that fast ("steps-pre": from each front point down, then right)."""
    f = pts[pts["on_front"]].sort_values("throughput")
    if len(f) >= 2:
        ax.plot(
            f["throughput"],
            f["top1"],
            linestyle=style,
            color=color,
            linewidth=1.2,
            alpha=0.8,
            drawstyle="steps-pre",
            label=label,
            zorder=1,
        )


def _log_ticks(ax) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_xlim()
    lo, hi = lo / 1.25, hi * 1.6  # room for the point labels
    # 1-2-5 ticks over decades; a narrow range (variants of similar speed) gets denser ticks
    subs = (1.0, 2.0, 5.0) if hi / lo > 10 else (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo, hi)


def plot_convergence(data: pd.DataFrame, title: str | None = None, errorbar: Any = "sd"):
    """Validation top-1 vs the chosen x, one line per variant (the LeViT paper's Figure 3 shape):
    the mean over its seeds at each evaluation step (x: the seeds' mean x at that step) with a
    band (`errorbar`, seaborn's: "sd" = ± 1 std, ("ci", 95), or None)."""
    if data.empty:
        raise LabError("nothing to plot: no run has logged val/top1 with that x yet")
    plt, sns = _plt()
    from matplotlib.ticker import EngFormatter

    x = data.attrs.get("x", "images_seen")
    data = data.assign(x=data.groupby(["label", "step"])["x"].transform("mean"))
    styles = variant_styles(data["label"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    sns.lineplot(
        data=data,
        x="x",
        y="top1",
        hue="label",
        style="label",
        markers={k: m for k, (_, m) in styles.items()},
        palette={k: c for k, (c, _) in styles.items()},
        dashes=False,
        estimator="mean",
        errorbar=errorbar,
        sort=True,
        ax=ax,
    )
    ax.set_xlabel(X_LABELS.get(x, x))
    if x == "images_seen":
        ax.xaxis.set_major_formatter(EngFormatter())
    several = "seed" in data and data.groupby("label")["seed"].nunique().max() > 1
    ax.set_ylabel("validation top-1 (%)" + (" (mean ± std over seeds)" if several and errorbar == "sd" else ""))
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: convergence (validation top-1 vs {X_LABELS.get(x, x).split(' (')[0]})")
    ax.legend(title="variant", loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_seeds(data: pd.DataFrame, title: str | None = None):
    """Final top-1 of every seed per variant (a strip plot, one row per variant), each variant's
    mean with its 95% t-interval as a black bar, the baseline's mean as a dashed line."""
    if data.empty:
        raise LabError("nothing to plot: no variant has a finished seed")
    plt, sns = _plt()
    order = list(dict.fromkeys(data["label"]))
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.45 * len(order)))
    _seed_strips(sns, ax, data, order)
    _mean_bars(ax, data, order)
    _baseline_mean(ax, data)
    ax.set_xlabel("final validation top-1 (%), one point per seed; bar: mean and 95% CI")
    ax.set_ylabel("")
    exps = ", ".join(dict.fromkeys(data["experiment"]))
    ax.set_title(title or f"{exps}: top-1 over seeds")
    fig.tight_layout()
    return fig


def _seed_strips(sns, ax, data: pd.DataFrame, order: list[str]) -> None:
    """One point per seed, a row per variant in `order`, in the variant's colour; the jitter is the same
    every time (seaborn draws it from numpy's global generator: seeded here, then restored)."""
    import numpy as np

    styles = variant_styles(order)
    state = np.random.get_state()
    np.random.seed(0)
    try:
        sns.stripplot(
            data=data,
            x="top1",
            y="label",
            hue="label",
            order=order,
            hue_order=order,
            palette={k: c for k, (c, _) in styles.items()},
            size=7,
            jitter=0.15,
            edgecolor="black",
            linewidth=0.5,
            legend=False,
            ax=ax,
            zorder=3,
        )
    finally:
        np.random.set_state(state)


def _mean_bars(ax, data: pd.DataFrame, order: list[str]) -> None:
    """Each variant's mean top-1 as a tick, with its 95% t-interval as a bar when the seeds differ."""
    from scipy import stats as sps

    from lab import stats

    for i, lab in enumerate(order):
        vals = data.loc[data["label"] == lab, "top1"]
        sm = stats.summarize(vals.tolist())
        ax.plot([sm.mean], [i], marker="|", markersize=18, color="black", zorder=4)
        if sm.n > 1 and sm.std > 0:
            half = float(sps.t.ppf(0.975, sm.n - 1)) * sm.std / math.sqrt(sm.n)
            ax.plot([sm.mean - half, sm.mean + half], [i, i], color="black", linewidth=1.5, zorder=4)


def _baseline_mean(ax, data: pd.DataFrame) -> None:
    """The baseline's mean top-1 as a dashed vertical line, named in a legend (none without a baseline)."""
    base = data[data["baseline"].astype(bool)]
    if not base.empty:
        ax.axvline(
            base["top1"].mean(),
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"baseline mean: {base['key'].iloc[0]}",
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, frameon=False)
