"""lab.report: tables, deltas, run selection, figure data, plot files and the table/plot CLI.

The store is written only by the lab's own code, so the names of tags, params and metrics
cannot drift between the writer and the reader: specs are expanded by `lab.spec`, parent runs
come from `lab.track.start_parent_run`, variant runs from `lab.track.log_variant_run`, bench
figures from `lab.bench.log_bench`, budget usage from `lab.budget.usage`, and one tiny
experiment (`tinyrun`, 2 variants x 12 steps, a few seconds) is really trained by
`lab.runner.run_experiment` while the store is built once per session. The report side only reads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lab import report as R
from lab import track
from lab.cli import main
from lab.errors import LabError
from lab.figures import save_figure


@pytest.fixture(scope="session")
def store(report_store):
    """The session's synthetic report store (tests/conftest.py `report_store`)."""
    return report_store


@pytest.fixture(scope="session")
def abl(store) -> pd.DataFrame:
    return R.load_runs(["abl"], tracking_uri=store.uri)


# --------------------------------------------------------------------------- the store itself


def test_store_written_like_lab_run(store):
    """What the builder wrote is what `lab run` writes: the parent/child layout, an open RUNNING run."""
    cl = track.client(store.uri)
    (d2,) = track.find_variant_runs(cl, "fam", key="depth=2")
    assert d2.info.status == "RUNNING" and not d2.info.end_time  # still in flight
    assert cl.get_run(d2.data.tags["mlflow.parentRunId"]).info.status == "RUNNING"
    (broken,) = track.find_variant_runs(cl, "abl", key="broken")
    assert cl.get_run(broken.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
    assert broken.data.tags["lab.error"] == "RuntimeError: NaN loss" and broken.info.end_time
    assert len(track.find_variant_runs(cl, "abl", statuses=["FINISHED"])) == 4  # base, attn x2, graft
    assert track.metric_history(cl, store.ids["graft"], "train_seconds") == [(10, 10.0), (20, 20.0), (30, 30.0)]


# --------------------------------------------------------------------------- load_runs


def test_load_runs_one_row_per_variant_latest_finished_wins(abl, store):
    ids = store.ids
    assert list(abl["key"]) == ["base", "attn", "graft", "broken"]  # first-seen order
    chosen = dict(zip(abl["key"], abl["run_id"]))
    assert chosen["attn"] == ids["attn"]  # newer FINISHED beats older FINISHED
    assert chosen["graft"] == ids["graft"]  # older FINISHED beats newer FAILED
    assert chosen["broken"] == ids["broken"]  # only run: FAILED, still a row
    row = abl.set_index("key")
    assert row.at["graft", "n_runs"] == 2 and row.at["base", "n_runs"] == 1
    assert row.at["broken", "status"] == "FAILED" and row.at["broken", "error"] == "RuntimeError: NaN loss"
    assert bool(row.at["base", "baseline"]) and not bool(row.at["attn", "baseline"])
    assert row.at["attn", "metrics.final/val_top1"] == 47.0
    assert row.at["attn", "hash"] == store.specs["abl"][1]["attn"].hash
    # params are the flattened resolved spec, tags carry the paper's figures
    assert row.at["attn", "params.model.position"] == "attention_bias" and row.at["broken", "params.train.lr"] == "10.0"
    assert row.at["attn", "tags.ref.top1"] == "70.4" and row.at["base", "tags.ref.source"] == "LeViT Table 5"


def test_load_runs_tag_filter_and_multiple_experiments(store):
    uri, ids = store.uri, store.ids
    both = R.load_runs(["abl", "fam"], tracking_uri=uri)
    assert list(both["experiment"]) == ["abl"] * 4 + ["fam"] * 2
    assert list(both["key"]) == ["base", "attn", "graft", "broken", "depth=1", "depth=2"]
    cuda = R.load_runs(["fam"], tracking_uri=uri, tags={"lab.device": "cuda"})
    assert list(cuda["key"]) == ["depth=2"] and cuda["status"].tolist() == ["RUNNING"]
    cpu = R.load_runs(["abl", "fam"], tracking_uri=uri, tags={"lab.device": "cpu"})
    assert list(cpu["key"]) == ["base", "attn", "graft", "broken", "depth=1"]
    assert len(R.load_runs(["abl"], tracking_uri=uri, tags={"study": "ablation"})) == 4  # spec tags
    assert R.load_runs(["abl"], tracking_uri=uri, tags={"study": "nope"}).empty
    # a key the child lacks is looked up on its parent run; the filter applies before choosing
    rerun = R.load_runs(["abl"], tracking_uri=uri, tags=["sweep=rerun"]).set_index("key")
    assert rerun["run_id"].to_dict() == {"attn": ids["attn"], "graft": ids["graft_failed"]}


def test_unknown_experiment_names_close_matches(store):
    with pytest.raises(
        LabError, match=r"unknown experiment 'abll'.*did you mean 'abl'.*known experiments: abl, empty, fam"
    ):
        R.load_runs(["abll"], tracking_uri=store.uri)


def test_missing_sqlite_store_is_an_error_not_a_new_file(tmp_path):
    with pytest.raises(LabError, match="no MLflow store"):
        R.load_runs(["abl"], tracking_uri=f"sqlite:///{tmp_path / 'nope.db'}")
    assert not (tmp_path / "nope.db").exists()


def test_history_joins_x_on_step(store):
    uri, ids = store.uri, store.ids
    for x, expect in (
        ("images_seen", [320, 640, 960]),
        ("epoch", [1.0, 2.0, 3.0]),
        ("train_seconds", [5.0, 10.0, 15.0]),
        ("step", [10, 20, 30]),
    ):
        h = R.history([ids["base"]], "val/top1", x=x, tracking_uri=uri)
        assert h["x"].tolist() == expect and h["value"].tolist() == [20.0, 40.0, 50.0]
        assert h["step"].tolist() == [10, 20, 30]
    with pytest.raises(LabError, match="unknown x"):
        R.history([ids["base"]], x="wallclock", tracking_uri=uri)


# --------------------------------------------------------------------------- ablation table


def test_ablation_table_values_and_deltas(abl):
    t = R.ablation_table(abl).set_index("key")
    assert t["baseline"].tolist() == [True, False, False, False]
    assert t.at["base", "params_m"] == pytest.approx(5.0) and t.at["graft", "macs_m"] == pytest.approx(600.0)
    assert t.at["attn", "top1"] == 47.0 and t.at["attn", "top1_best"] == 47.5
    assert t.at["graft", "top1"] == 54.0 and t.at["graft", "top1_best"] == 55.0  # final and best differ
    assert t.at["attn", "d_top1"] == pytest.approx(-3.0) and t.at["graft", "d_top1"] == pytest.approx(4.0)
    assert t.at["base", "d_top1"] == 0
    assert t.at["graft", "d_params_m"] == pytest.approx(3.0) and t.at["graft", "d_macs_m"] == pytest.approx(300.0)
    assert t.at["graft", "cpu_speedup"] == pytest.approx(0.5) and t.at["graft", "gpu_speedup"] == pytest.approx(1.5)
    assert t.at["attn", "gpu_imgs_s"] == 1250.0 and t.at["attn", "cpu_imgs_s"] == 80.0
    # partial run: last val/top1 as top-1, best from the history so far; nothing measured
    assert t.at["broken", "status"] == "FAILED" and t.at["broken", "top1"] == 20.0
    assert t.at["broken", "top1_best"] == 20.0 and math.isnan(t.at["broken", "cpu_imgs_s"])
    assert t.at["broken", "d_top1"] == pytest.approx(-30.0)
    assert t.at["broken", "images_seen"] == 640 and math.isnan(t.at["broken", "steps"])  # as far as it got
    # budget actually used
    assert t.at["graft", "steps"] == 30 and t.at["graft", "images_seen"] == 960 and t.at["graft", "train_s"] == 30.0
    assert t.at["base", "train_s"] == 15.0
    # the paper, side by side
    assert t.at["attn", "ref_top1"] == 70.4 and t.at["attn", "ref_d_top1"] == pytest.approx(-1.5)
    assert t.at["base", "ref_params_m"] == 7.4 and t.at["base", "ref_macs_m"] == 305
    assert t.at["base", "ref_cpu_imgs_s"] == 88 and t.at["attn", "ref_gpu_imgs_s"] == 9000
    assert t.at["base", "ref_epochs"] == 100 and t.at["attn", "ref_source"] == "LeViT Table 5"
    assert math.isnan(t.at["graft", "ref_top1"])
    # what each variant changes, in words (lab.spec.describe_overrides, written as lab.changes)
    assert t["changes"].to_dict() == {
        "base": "(baseline)",
        "attn": "model.position=attention_bias",
        "graft": "model.prefix.arch=resnet50, model.prefix.stages=1",
        "broken": "train.lr=10.0",
    }


def test_ablation_table_explicit_baseline_and_per_experiment(store, abl):
    t = R.ablation_table(abl, baseline="graft").set_index("key")
    assert bool(t.at["graft", "baseline"]) and t.at["base", "d_top1"] == pytest.approx(-4.0)
    assert t.at["base", "d_macs_m"] == pytest.approx(-300.0) and t.at["base", "cpu_speedup"] == pytest.approx(2.0)
    with pytest.raises(LabError, match="no variant 'grft'.*did you mean 'graft'"):
        R.ablation_table(abl, baseline="grft")
    both = R.ablation_table(R.load_runs(["abl", "fam"], tracking_uri=store.uri))
    assert both["baseline"].tolist() == [True, False, False, False, True, False]  # one per experiment
    fam = both[both["experiment"] == "fam"].set_index("key")
    assert fam.at["depth=2", "status"] == "RUNNING" and fam.at["depth=2", "top1"] == 52.0
    assert fam.at["depth=2", "d_top1"] == pytest.approx(7.0) and fam.at["depth=2", "top1_best"] == 52.0
    assert fam.at["depth=2", "cpu_speedup"] == pytest.approx(40 / 300)
    assert R.ablation_table(abl.iloc[0:0]).empty


def test_grid_overrides_in_the_changes_column(store):
    """A grid stores its values as flat dotted keys; the table names the path and the value that
    differ from the baseline variant (the first grid point here)."""
    _, vs = store.specs["fam"]
    assert vs["depth=2"].overrides == {"model.stages.0.depth": 2}
    t = R.ablation_table(R.load_runs(["fam"], tracking_uri=store.uri))
    assert t["changes"].tolist() == ["(baseline)", "model.stages.0.depth=2"]
    md = R.format_table(t, "markdown")
    assert "| depth=2 | RUNNING |" in md and md.rstrip().endswith("| model.stages.0.depth=2 |")
    assert "| depth=1 * | FINISHED |" in md


def test_table_formats(abl):
    t = R.ablation_table(abl)
    md = R.format_table(t, "markdown")
    lines = md.splitlines()
    assert lines[0].startswith("| variant | status |") and "Δ top-1" in lines[0] and "paper top-1" in lines[0]
    for col in (
        "params (M)",
        "MACs (M)",
        "CPU img/s",
        "GPU img/s",
        "top-1 (%)",
        "best top-1",
        "steps",
        "images seen",
        "train s",
        "paper Δ top-1",
        "paper params (M)",
        "changes",
    ):
        assert f"| {col} |" in lines[0], col
    assert lines[1].startswith("|:---|:---|")
    assert "| base * | FINISHED |" in md and "| graft | FINISHED |" in md and "+4.00" in md and "-3.00" in md
    (broken,) = [ln for ln in lines if ln.startswith("| broken | FAILED |")]
    assert "| 20.00 |" in broken and "| 640 |" in broken  # as far as it got: top-1, images seen
    assert len(lines) == 2 + 4
    csv = pd.read_csv(pd.io.common.StringIO(R.format_table(t, "csv")))
    assert csv.columns.tolist() == R.TABLE_COLUMNS and csv.set_index("key").at["graft", "d_top1"] == pytest.approx(4.0)
    assert csv.set_index("key").at["attn", "ref_top1"] == 70.4
    tex = R.format_table(t, "latex")
    assert tex.startswith(r"\begin{tabular}") and r"\bottomrule" in tex and r"$\Delta$ top-1" in tex
    assert "broken" in tex and "model.prefix.arch=resnet50, model.prefix.stages=1" in tex
    assert tex.count(r" \\") == 1 + 4  # header + one row per variant
    j = json.loads(R.format_table(t, "json"))
    assert [r["key"] for r in j] == ["base", "attn", "graft", "broken"] and j[1]["d_top1"] == pytest.approx(-3.0)
    term = R.format_table(t, "terminal")
    assert "base *" in term and "GPU speed" in term and "1.50x" in term
    with pytest.raises(LabError):
        R.format_table(t, "html")


def test_latex_escapes_underscores():
    t = pd.DataFrame(
        [
            {
                **{c: math.nan for c in R.TABLE_COLUMNS},
                "experiment": "e",
                "key": "A1_no_pyramid",
                "baseline": True,
                "status": "FINISHED",
                "changes": "a_b=50%",
                "run_id": "r",
            }
        ]
    )
    tex = R.format_table(t, "latex")
    assert r"A1\_no\_pyramid" in tex and r"a\_b=50\%" in tex


# --------------------------------------------------------------------------- figure data


def test_pareto_data_points_and_front(abl):
    p = R.pareto_data(abl, device="cuda")
    ours = p[p["source"] == "measured"].set_index("key")
    assert sorted(ours.index) == ["attn", "base", "graft"]  # broken: no throughput
    assert ours.at["graft", "throughput"] == 1500.0 and ours.at["graft", "top1"] == 54.0
    # graft is faster and more accurate than both others: it alone is on the front
    assert ours["on_front"].to_dict() == {"base": False, "attn": False, "graft": True}
    paper = p[p["source"] == "paper"].set_index("key")
    assert sorted(paper.index) == ["attn", "base"] and paper.at["base", "throughput"] == 12880
    assert paper["on_front"].to_dict() == {"base": True, "attn": False}  # 71.9 at 12880 beats 70.4 at 9000
    assert paper.at["base", "label"] == "base (paper)"
    cpu = R.pareto_data(abl, device="cpu")
    assert cpu.query("source == 'measured'").set_index("key")["on_front"].to_dict() == {
        "base": True,
        "attn": False,
        "graft": True,
    }
    assert cpu.query("source == 'paper'")[["key", "throughput", "top1"]].values.tolist() == [["base", 88.0, 71.9]]
    assert R.pick_device(abl) == "cuda"
    assert R.pareto_front([1, 2, 3, 3], [3, 2, 1, 1]) == [True, True, True, True]
    assert R.pareto_front([1, 2], [1, 2]) == [False, True]


def test_pareto_partial_results(store):
    """A RUNNING variant is placed at its latest val/top1 and labelled as such."""
    p = R.pareto_data(R.load_runs(["abl", "fam"], tracking_uri=store.uri), device="cpu")
    d2 = p[(p["key"] == "depth=2")].iloc[0]
    assert d2["label"] == "fam/depth=2 (running)" and (d2["throughput"], d2["top1"]) == (40.0, 52.0)
    assert p.query("source == 'measured'")["on_front"].tolist() == [True, False, True, True, False]


def test_convergence_data_each_x(abl):
    for x, base_x, graft_x in (
        ("images_seen", [320, 640, 960], [320, 640, 960]),
        ("epoch", [1, 2, 3], [1, 2, 3]),
        ("train_seconds", [5, 10, 15], [10, 20, 30]),
        ("step", [10, 20, 30], [10, 20, 30]),
    ):
        c = R.convergence_data(abl, x=x)
        assert c.attrs["x"] == x and set(c["key"]) == {"base", "attn", "graft", "broken"}
        g = {k: d.sort_values("step") for k, d in c.groupby("key")}
        assert g["base"]["x"].tolist() == base_x and g["base"]["top1"].tolist() == [20, 40, 50]
        assert g["graft"]["x"].tolist() == graft_x and g["graft"]["top1"].tolist() == [30, 45, 55]
        assert g["attn"]["top1"].tolist() == [18, 35, 47]  # the chosen (newer) run's curve
        assert g["broken"]["top1"].tolist() == [10, 20]
        assert g["broken"]["label"].iloc[0] == "broken (failed)"


# --------------------------------------------------------------------------- what the figures draw


def _legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    return ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_pareto_figure_draws_the_data(abl):
    import matplotlib.pyplot as plt

    data = R.pareto_data(abl, device="cpu")
    fig = R.plot_pareto(data)
    ax = fig.axes[0]
    ours, paper = data[data["source"] == "measured"], data[data["source"] == "paper"]
    from matplotlib.collections import LineCollection

    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    by_label = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if c not in bars}
    # the throughput error bars span the bench repeats' slowest to fastest (0.9x to 1.1x here)
    (xbars,) = bars
    spans = sorted((min(seg[:, 0]), max(seg[:, 0])) for seg in xbars.get_segments())
    assert spans == sorted((ips * 0.9, ips * 1.1) for ips in ours["throughput"])
    assert by_label.pop("on Pareto front") == ours[ours["on_front"]][["throughput", "top1"]].values.tolist()
    assert by_label.pop("paper") == paper[["throughput", "top1"]].values.tolist()
    (points,) = by_label.values()  # seaborn's scatter: every measured point
    assert points == ours[["throughput", "top1"]].values.tolist()
    (front,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    assert front.get_drawstyle() == "steps-pre"
    assert list(zip(front.get_xdata(), front.get_ydata())) == [(50.0, 54.0), (100.0, 50.0)]
    assert {t.get_text() for t in ax.texts} == {"base", "attn", "graft", "base (paper)"}
    assert ax.get_xscale() == "log" and "images/s" in ax.get_xlabel() and "CPU" in ax.get_xlabel()
    assert ax.get_ylabel() == "top-1 accuracy (%)" and ax.get_title() == "abl: accuracy vs CPU speed"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"base", "attn", "graft", "on Pareto front", "Pareto front", "paper"} <= set(legend)
    assert _legend_outside(fig, ax)
    plt.close(fig)


def test_convergence_figure_one_line_per_variant(store):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    runs = R.load_runs(["abl", "fam"], tracking_uri=store.uri)
    for x, unit in (("epoch", "epoch"), ("images_seen", "images seen"), ("train_seconds", "training time (s)")):
        data = R.convergence_data(runs, x=x)
        fig = R.plot_convergence(data)
        ax = fig.axes[0]
        drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
        handles = {t.get_text(): h for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
        assert list(handles) == [
            "abl/base",
            "abl/attn",
            "abl/graft",
            "abl/broken (failed)",
            "fam/depth=1",
            "fam/depth=2 (running)",
        ]
        assert len(drawn) == len(handles)
        for label, h in handles.items():  # each legend entry's line carries that variant's curve
            (ln,) = [
                d for d in drawn if to_hex(d.get_color()) == to_hex(h.get_color()) and d.get_marker() == h.get_marker()
            ]
            want = data[data["label"] == label].sort_values("x")
            assert list(ln.get_xdata()) == want["x"].tolist() and list(ln.get_ydata()) == want["top1"].tolist()
        assert ax.get_xlabel() == unit and ax.get_ylabel() == "validation top-1 (%)"
        assert ax.get_title().startswith("abl, fam: convergence")
        assert _legend_outside(fig, ax)
        plt.close(fig)


def test_plots_write_png_and_svg(abl, tmp_path):
    fig = R.plot_pareto(R.pareto_data(abl))
    paths = save_figure(fig, tmp_path / "p")
    fig2 = R.plot_convergence(R.convergence_data(abl, x="epoch"))
    paths += save_figure(fig2, tmp_path / "sub" / "c")
    assert [p.name for p in paths] == ["p.png", "p.svg", "c.png", "c.svg"]
    for p in paths:
        assert p.stat().st_size > 1000
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()[:2000]
    with pytest.raises(LabError, match="nothing to plot"):
        R.plot_pareto(R.pareto_data(abl.iloc[0:0]))
    with pytest.raises(LabError, match="nothing to plot"):
        R.plot_convergence(R.convergence_data(abl.iloc[0:0]))


# --------------------------------------------------------------------------- a really trained experiment


def test_trained_experiment_reads_back(store):
    """`lab run` (lab.runner) writes, `lab table` reads: every number in the row is the runner's."""
    rec = {r.key: r for r in store.trained}
    runs = R.load_runs(["tinyrun"], tracking_uri=store.uri)
    t = R.ablation_table(runs).set_index("key")
    assert list(t.index) == ["base", "bias"] and t["status"].tolist() == ["FINISHED", "FINISHED"]
    assert t["baseline"].tolist() == [True, False] and t["run_id"].to_dict() == {k: r.run_id for k, r in rec.items()}
    for k, r in rec.items():
        assert t.at[k, "top1"] == pytest.approx(r.top1) and t.at[k, "top1_best"] == pytest.approx(r.best_top1)
        assert t.at[k, "steps"] == r.steps == 12 and t.at[k, "images_seen"] == r.images_seen == 12 * 16
        assert t.at[k, "train_s"] == pytest.approx(r.train_seconds)
        assert t.at[k, "params_m"] == pytest.approx(r.params / 1e6) and t.at[k, "macs_m"] == pytest.approx(r.macs / 1e6)
    assert t.at["bias", "d_top1"] == pytest.approx(rec["bias"].top1 - rec["base"].top1)
    assert t.at["bias", "d_params_m"] == pytest.approx((rec["bias"].params - rec["base"].params) / 1e6)
    assert t.at["bias", "cpu_imgs_s"] == 1500.0 and t.at["bias", "cpu_speedup"] == pytest.approx(0.75)
    assert t["changes"].to_dict() == {"base": "(baseline)", "bias": "model.position=attention_bias"}
    assert t.at["base", "ref_top1"] == 72.2 and t.at["base", "ref_params_m"] == 5.7
    # the curves: evaluation every 5 steps and at the end (12), x from the runner's own metrics
    cl = track.client(store.uri)
    for x in ("epoch", "images_seen", "train_seconds"):
        c = R.convergence_data(runs, x=x)
        for k, r in rec.items():
            g = c[c["key"] == k].sort_values("step")
            assert g["step"].tolist() == [5, 10, 12]
            assert list(zip(g["step"], g["x"])) == track.metric_history(cl, r.run_id, x)
            assert list(zip(g["step"], g["top1"])) == track.metric_history(cl, r.run_id, "val/top1")
            assert g["top1"].iloc[-1] == pytest.approx(r.top1)
    seconds = R.convergence_data(runs, x="train_seconds").query("key == 'base'")["x"]
    assert 0 < seconds.iloc[-1] <= rec["base"].train_seconds + 1e-6  # timed up to the last eval
    assert R.convergence_data(runs, x="images_seen").query("key == 'base'")["x"].tolist() == [80, 160, 192]
    p = R.pareto_data(runs, device="cpu").query("source == 'measured'").set_index("key")
    assert p["throughput"].to_dict() == {"base": 2000.0, "bias": 1500.0}


# --------------------------------------------------------------------------- CLI


def test_cli_table_and_plot_in_process(store, tmp_path, capsys, monkeypatch):
    uri = store.uri
    assert main(["table", "abl", "--tracking-uri", uri, "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| variant |") and "| attn |" in out
    out_file = tmp_path / "t" / "abl.csv"
    assert main(["table", "abl", "fam", "--tracking-uri", uri, "--format", "csv", "--out", str(out_file)]) == 0
    assert capsys.readouterr().out.strip() == str(out_file)
    csv = pd.read_csv(out_file)
    assert csv["key"].tolist() == ["base", "attn", "graft", "broken", "depth=1", "depth=2"]
    assert csv["status"].tolist() == ["FINISHED"] * 3 + ["FAILED", "FINISHED", "RUNNING"]
    for fmt, probe in (("latex", r"\begin{tabular}"), ("markdown", "| abl | graft | FINISHED |")):
        f = tmp_path / f"abl_fam.{fmt}"
        assert main(["table", "abl", "fam", "--tracking-uri", uri, "--format", fmt, "--out", str(f)]) == 0
        capsys.readouterr()
        assert probe in f.read_text() and "depth=2" in f.read_text()
    assert main(["table", "fam", "--tracking-uri", uri, "--tag", "lab.device=cuda", "--format", "json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == ["depth=2"]
    assert (
        main(
            [
                "table",
                "abl",
                "fam",
                "--tracking-uri",
                uri,
                "--tag",
                "lab.device=cpu",
                "--tag",
                "study=ablation",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == ["base", "attn", "graft", "broken"]
    assert main(["table", "abl", "--tracking-uri", uri, "--baseline", "graft", "--format", "json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out) if r["baseline"]] == ["graft"]
    assert main(["table", "abl", "--tracking-uri", uri]) == 0
    assert "abl: 4 variant(s) (3 finished, 1 failed); * = baseline" in capsys.readouterr().out
    assert main(["table", "abl", "fam", "--tracking-uri", uri]) == 0
    assert "abl, fam: 6 variant(s) (4 finished, 1 failed, 1 running)" in capsys.readouterr().out

    assert (
        main(
            [
                "plot",
                "abl",
                "--tracking-uri",
                uri,
                "--kind",
                "pareto",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "figs") + "/",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "figs" / "abl_pareto_cpu.png"), str(tmp_path / "figs" / "abl_pareto_cpu.svg")]
    assert all(Path(p).stat().st_size > 0 for p in printed)
    assert (
        main(
            [
                "plot",
                "abl",
                "fam",
                "--tracking-uri",
                uri,
                "--kind",
                "convergence",
                "--x",
                "train_seconds",
                "--out",
                str(tmp_path / "conv.png"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == [str(tmp_path / "conv.png"), str(tmp_path / "conv.svg")]
    monkeypatch.chdir(tmp_path)  # the default --out: out/EXPERIMENT_KIND
    assert main(["plot", "abl", "--tracking-uri", uri, "--kind", "convergence", "--x", "epoch"]) == 0
    assert capsys.readouterr().out.split() == ["out/abl_convergence_epoch.png", "out/abl_convergence_epoch.svg"]
    assert main(["plot", "fam", "--tracking-uri", uri, "--tag", "lab.device=cpu"]) == 0
    assert capsys.readouterr().out.split() == ["out/fam_pareto_cpu.png", "out/fam_pareto_cpu.svg"]
    assert (tmp_path / "out" / "fam_pareto_cpu.svg").is_file()

    # partial results: an experiment with no variant run yet
    assert main(["table", "empty", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out == "(no variant runs)\n"
    assert main(["plot", "empty", "--tracking-uri", uri]) == 2
    assert "no variant runs in empty" in capsys.readouterr().err
    # only measured columns are shown: fam has no GPU throughput and no paper figures
    assert main(["table", "fam", "--tracking-uri", uri, "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "CPU img/s" in md and "GPU img/s" not in md and "paper" not in md

    assert main(["table", "abll", "--tracking-uri", uri]) == 2
    assert "unknown experiment 'abll' (did you mean 'abl'?)" in capsys.readouterr().err
    assert main(["table", "abl", "--tracking-uri", uri, "--tag", "nokv"]) == 2


def test_cli_subprocess_exit_codes(store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}  # the env var, not the option
    ok = subprocess.run(
        [sys.executable, "-m", "lab", "table", "abl", "--format", "markdown"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "| graft | FINISHED |" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lab", "plot", "nope", "--kind", "convergence"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown experiment 'nope'")
    assert "Traceback" not in bad.stderr
