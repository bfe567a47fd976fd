"""lab.report: tables, deltas, run selection, figure data, plot files and the table/plot CLI,
all against a small synthetic MLflow store (no training)."""
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
from lab.cli import main
from lab.errors import LabError

T0 = 1_700_000_000_000  # ms; explicit start times make "latest" deterministic
EVAL_STEPS = (10, 20, 30)
BATCH = 32


def _variant(client, exp_id: str, parent: str, experiment: str, key: str, start: int, *, status="FINISHED",
             top1=(), final=None, best=None, params=None, macs=None, bench=None, ref=None, baseline=False,
             changes="", device="cpu", error=None, seconds_per_step=0.5, extra_tags=None) -> str:
    """One child run exactly as the training side logs it (see the MLflow conventions in lab.report)."""
    from mlflow.entities import Metric, Param

    tags = {"mlflow.parentRunId": parent, "lab.role": "variant", "lab.experiment": experiment, "lab.variant": key,
            "lab.hash": f"h_{key}", "lab.git_commit": "abc123", "lab.device": device, "lab.changes": changes,
            "mlflow.runName": key}
    if baseline:
        tags["lab.baseline"] = "true"
    if error:
        tags["lab.error"] = error
    tags.update({f"ref.{k}": str(v) for k, v in (ref or {}).items()})
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, start_time=start, tags=tags)
    rid = run.info.run_id
    ms: list = []
    for i, step in enumerate(EVAL_STEPS[:len(top1)]):
        ts = start + step
        ms += [Metric("val/top1", top1[i], ts, step), Metric("val/top5", min(100.0, top1[i] + 20), ts, step),
               Metric("val/loss", 3.0 - i, ts, step), Metric("epoch", step / 10, ts, step),
               Metric("images_seen", step * BATCH, ts, step),
               Metric("train_seconds", step * seconds_per_step, ts, step)]
    for step in range(1, (EVAL_STEPS[len(top1) - 1] if top1 else 0) + 1):
        ms += [Metric("train/loss", 3.0 - step / 20, start + step, step), Metric("lr", 1e-3, start + step, step)]
    last = EVAL_STEPS[len(top1) - 1] if top1 else 0
    if final is not None:
        ms += [Metric("final/val_top1", final, start + 99, last), Metric("best/val_top1", best, start + 99, last),
               Metric("budget/steps", last, start + 99, last), Metric("budget/images_seen", last * BATCH, start + 99, last),
               Metric("budget/train_seconds", last * seconds_per_step, start + 99, last),
               Metric("budget/train_flops", 1e12, start + 99, last), Metric("budget/peak_mem_mb", 100, start + 99, last)]
    if params is not None:
        ms += [Metric("params", params, start, 0), Metric("macs", macs, start, 0)]
    for dev, v in (bench or {}).items():
        ms.append(Metric(f"bench/{dev}_imgs_per_s", v, start + 200, 0))
    params_ = [Param("model.zoo", key), Param("train.lr", "0.001")]
    for i in range(0, len(ms), 900):
        client.log_batch(rid, metrics=ms[i:i + 900], params=params_ if i == 0 else [])
    if not ms:
        client.log_batch(rid, params=params_)
    client.set_terminated(rid, status=status, end_time=start + 500) if status != "RUNNING" else None
    return rid


def build_store(root: Path) -> tuple[str, dict[str, str]]:
    """Experiment 'abl' (two `lab run`s) and experiment 'fam'; returns (uri, {name: run_id})."""
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    ids: dict[str, str] = {}
    abl = c.create_experiment("abl")
    ref_base = {"params_m": 7.4, "macs_m": 305, "top1": 71.9, "throughput_gpu": 12880, "throughput_cpu": 88,
                "epochs": 100, "source": "LeViT Table 5"}
    ref_attn = {"params_m": 7.4, "macs_m": 305, "top1": 70.4, "throughput_gpu": 9000, "epochs": 100,
                "source": "LeViT Table 5"}
    # first `lab run`
    p1 = c.create_run(abl, start_time=T0, tags={"lab.role": "parent", "lab.experiment": "abl", "study": "ablation"})
    p1 = p1.info.run_id
    ids["base"] = _variant(c, abl, p1, "abl", "base", T0 + 1000, top1=(20.0, 40.0, 50.0), final=50.0, best=50.0,
                           params=5e6, macs=300e6, bench={"cpu": 100.0, "cuda": 1000.0}, ref=ref_base,
                           baseline=True, changes="(baseline)")
    ids["attn_old"] = _variant(c, abl, p1, "abl", "attn", T0 + 2000, top1=(15.0, 30.0, 44.0), final=44.0, best=44.0,
                               params=5.5e6, macs=320e6, ref=ref_attn, changes="model.position=absolute")
    ids["graft"] = _variant(c, abl, p1, "abl", "graft", T0 + 3000, top1=(30.0, 45.0, 55.0), final=54.0, best=55.0,
                            params=8e6, macs=600e6, bench={"cpu": 50.0, "cuda": 1500.0},
                            changes="model.prefix.resnet50.stages=2", seconds_per_step=1.0)
    ids["broken"] = _variant(c, abl, p1, "abl", "broken", T0 + 4000, status="FAILED", top1=(10.0, 20.0),
                             params=4e6, macs=200e6, changes="model.norm=layernorm", error="RuntimeError: NaN loss")
    c.set_terminated(p1, status="FAILED", end_time=T0 + 5000)
    # second `lab run` (re-run): attn finishes again (newer wins), graft fails (older FINISHED wins)
    p2 = c.create_run(abl, start_time=T0 + 10_000, tags={"lab.role": "parent", "lab.experiment": "abl",
                                                         "study": "ablation"}).info.run_id
    ids["attn"] = _variant(c, abl, p2, "abl", "attn", T0 + 11_000, top1=(18.0, 35.0, 47.0), final=47.0, best=47.5,
                           params=5.5e6, macs=320e6, bench={"cpu": 80.0, "cuda": 1250.0}, ref=ref_attn,
                           changes="model.position=absolute")
    ids["graft_failed"] = _variant(c, abl, p2, "abl", "graft", T0 + 12_000, status="FAILED", top1=(5.0,),
                                   error="OOM", changes="model.prefix.resnet50.stages=2")
    c.set_terminated(p2, status="FINISHED", end_time=T0 + 20_000)
    # a second experiment, one run per device
    fam = c.create_experiment("fam")
    p3 = c.create_run(fam, start_time=T0, tags={"lab.role": "parent", "lab.experiment": "fam"}).info.run_id
    ids["small"] = _variant(c, fam, p3, "fam", "small", T0 + 1000, top1=(25.0, 35.0, 45.0), final=45.0, best=45.0,
                            params=2e6, macs=100e6, bench={"cpu": 300.0}, baseline=True, device="cpu")
    ids["big"] = _variant(c, fam, p3, "fam", "big", T0 + 2000, status="RUNNING", top1=(30.0, 52.0),
                          params=20e6, macs=900e6, bench={"cpu": 40.0}, device="cuda")
    c.set_terminated(p3, status="FINISHED", end_time=T0 + 5000)
    # an experiment whose `lab run` has only just started: a parent run, no variant yet
    c.create_run(c.create_experiment("empty"), start_time=T0, tags={"lab.role": "parent", "lab.experiment": "empty"})
    return uri, ids


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    return build_store(tmp_path_factory.mktemp("mlruns"))


@pytest.fixture(scope="session")
def abl(store) -> pd.DataFrame:
    return R.load_runs(["abl"], tracking_uri=store[0])


# --------------------------------------------------------------------------- load_runs


def test_load_runs_one_row_per_variant_latest_finished_wins(abl, store):
    uri, ids = store
    assert list(abl["key"]) == ["base", "attn", "graft", "broken"]  # first-seen order
    chosen = dict(zip(abl["key"], abl["run_id"]))
    assert chosen["attn"] == ids["attn"]            # newer FINISHED beats older FINISHED
    assert chosen["graft"] == ids["graft"]          # older FINISHED beats newer FAILED
    assert chosen["broken"] == ids["broken"]        # only run: FAILED, still a row
    row = abl.set_index("key")
    assert row.at["graft", "n_runs"] == 2 and row.at["base", "n_runs"] == 1
    assert row.at["broken", "status"] == "FAILED" and row.at["broken", "error"] == "RuntimeError: NaN loss"
    assert bool(row.at["base", "baseline"]) and not bool(row.at["attn", "baseline"])
    assert row.at["attn", "metrics.final/val_top1"] == 47.0
    assert row.at["attn", "params.model.zoo"] == "attn" and row.at["attn", "tags.ref.top1"] == "70.4"


def test_load_runs_tag_filter_and_multiple_experiments(store):
    uri, ids = store
    both = R.load_runs(["abl", "fam"], tracking_uri=uri)
    assert list(both["experiment"]) == ["abl"] * 4 + ["fam"] * 2
    cuda = R.load_runs(["fam"], tracking_uri=uri, tags={"lab.device": "cuda"})
    assert list(cuda["key"]) == ["big"] and cuda["status"].tolist() == ["RUNNING"]
    # a key the child lacks is looked up on its parent run (spec-level tags)
    assert len(R.load_runs(["abl"], tracking_uri=uri, tags={"study": "ablation"})) == 4
    assert R.load_runs(["abl"], tracking_uri=uri, tags={"study": "nope"}).empty


def test_unknown_experiment_names_close_matches(store):
    with pytest.raises(LabError, match=r"unknown experiment 'abll'.*did you mean 'abl'.*known experiments: abl, empty, fam"):
        R.load_runs(["abll"], tracking_uri=store[0])


def test_missing_sqlite_store_is_an_error_not_a_new_file(tmp_path):
    with pytest.raises(LabError, match="no MLflow store"):
        R.load_runs(["abl"], tracking_uri=f"sqlite:///{tmp_path / 'nope.db'}")
    assert not (tmp_path / "nope.db").exists()


def test_history_joins_x_on_step(store):
    uri, ids = store
    for x, expect in (("images_seen", [320, 640, 960]), ("epoch", [1.0, 2.0, 3.0]),
                      ("train_seconds", [5.0, 10.0, 15.0]), ("step", [10, 20, 30])):
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
    assert t.at["attn", "d_top1"] == pytest.approx(-3.0) and t.at["graft", "d_top1"] == pytest.approx(4.0)
    assert t.at["base", "d_top1"] == 0
    assert t.at["graft", "d_params_m"] == pytest.approx(3.0) and t.at["graft", "d_macs_m"] == pytest.approx(300.0)
    assert t.at["graft", "cpu_speedup"] == pytest.approx(0.5) and t.at["graft", "gpu_speedup"] == pytest.approx(1.5)
    assert t.at["attn", "gpu_imgs_s"] == 1250.0
    # partial run: last val/top1 as top-1, best from the history so far; nothing measured
    assert t.at["broken", "status"] == "FAILED" and t.at["broken", "top1"] == 20.0
    assert t.at["broken", "top1_best"] == 20.0 and math.isnan(t.at["broken", "cpu_imgs_s"])
    assert t.at["broken", "d_top1"] == pytest.approx(-30.0)
    # budget actually used
    assert t.at["graft", "steps"] == 30 and t.at["graft", "images_seen"] == 960 and t.at["graft", "train_s"] == 30.0
    # the paper, side by side
    assert t.at["attn", "ref_top1"] == 70.4 and t.at["attn", "ref_d_top1"] == pytest.approx(-1.5)
    assert t.at["base", "ref_params_m"] == 7.4 and t.at["base", "ref_macs_m"] == 305
    assert math.isnan(t.at["graft", "ref_top1"]) and t.at["attn", "changes"] == "model.position=absolute"


def test_ablation_table_explicit_baseline_and_per_experiment(store, abl):
    t = R.ablation_table(abl, baseline="graft").set_index("key")
    assert bool(t.at["graft", "baseline"]) and t.at["base", "d_top1"] == pytest.approx(-4.0)
    with pytest.raises(LabError, match="no variant 'grft'.*did you mean 'graft'"):
        R.ablation_table(abl, baseline="grft")
    both = R.ablation_table(R.load_runs(["abl", "fam"], tracking_uri=store[0]))
    fam = both[both["experiment"] == "fam"].set_index("key")
    assert bool(fam.at["small", "baseline"]) and fam.at["big", "d_top1"] == pytest.approx(7.0)
    assert fam.at["big", "cpu_speedup"] == pytest.approx(40 / 300)
    assert R.ablation_table(abl.iloc[0:0]).empty


def test_table_formats(abl):
    t = R.ablation_table(abl)
    md = R.format_table(t, "markdown")
    lines = md.splitlines()
    assert lines[0].startswith("| variant | status |") and "Δ top-1" in lines[0] and "paper top-1" in lines[0]
    assert lines[1].startswith("|:---|:---|")
    assert "| base * | FINISHED |" in md and "| graft | FINISHED |" in md and "+4.00" in md and "-3.00" in md
    assert len(lines) == 2 + 4
    csv = pd.read_csv(pd.io.common.StringIO(R.format_table(t, "csv")))
    assert csv.columns.tolist() == R.TABLE_COLUMNS and csv.set_index("key").at["graft", "d_top1"] == pytest.approx(4.0)
    tex = R.format_table(t, "latex")
    assert tex.startswith(r"\begin{tabular}") and r"\bottomrule" in tex and r"$\Delta$ top-1" in tex
    assert "broken" in tex and r"model.prefix.resnet50.stages=2" in tex
    j = json.loads(R.format_table(t, "json"))
    assert [r["key"] for r in j] == ["base", "attn", "graft", "broken"]
    term = R.format_table(t, "terminal")
    assert "base *" in term and "GPU speed" in term and "1.50x" in term
    with pytest.raises(LabError):
        R.format_table(t, "html")


def test_latex_escapes_underscores():
    t = pd.DataFrame([{**{c: math.nan for c in R.TABLE_COLUMNS}, "experiment": "e", "key": "A1_no_pyramid",
                       "baseline": True, "status": "FINISHED", "changes": "a_b=50%", "run_id": "r"}])
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
    cpu = R.pareto_data(abl, device="cpu").query("source == 'measured'").set_index("key")
    assert cpu["on_front"].to_dict() == {"base": True, "attn": False, "graft": True}
    assert R.pick_device(abl) == "cuda"
    assert R.pareto_front([1, 2, 3, 3], [3, 2, 1, 1]) == [True, True, True, True]
    assert R.pareto_front([1, 2], [1, 2]) == [False, True]


def test_convergence_data_each_x(abl):
    for x, base_x, graft_x in (("images_seen", [320, 640, 960], [320, 640, 960]),
                               ("epoch", [1, 2, 3], [1, 2, 3]),
                               ("train_seconds", [5, 10, 15], [10, 20, 30]),
                               ("step", [10, 20, 30], [10, 20, 30])):
        c = R.convergence_data(abl, x=x)
        assert set(c["key"]) == {"base", "attn", "graft", "broken"}
        g = {k: d.sort_values("step") for k, d in c.groupby("key")}
        assert g["base"]["x"].tolist() == base_x and g["base"]["top1"].tolist() == [20, 40, 50]
        assert g["graft"]["x"].tolist() == graft_x and g["graft"]["top1"].tolist() == [30, 45, 55]
        assert g["attn"]["top1"].tolist() == [18, 35, 47]  # the chosen (newer) run's curve
        assert g["broken"]["top1"].tolist() == [10, 20]
        assert g["broken"]["label"].iloc[0] == "broken (failed)"


# --------------------------------------------------------------------------- plots and CLI


def test_plots_write_png_and_svg(abl, tmp_path):
    fig = R.plot_pareto(R.pareto_data(abl))
    paths = R.save_figure(fig, tmp_path / "p")
    fig2 = R.plot_convergence(R.convergence_data(abl, x="epoch"))
    paths += R.save_figure(fig2, tmp_path / "sub" / "c")
    assert [p.name for p in paths] == ["p.png", "p.svg", "c.png", "c.svg"]
    for p in paths:
        assert p.stat().st_size > 1000
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()[:2000]
    with pytest.raises(LabError, match="nothing to plot"):
        R.plot_pareto(R.pareto_data(abl.iloc[0:0]))


def test_cli_table_and_plot_in_process(store, tmp_path, capsys):
    uri = store[0]
    assert main(["table", "abl", "--tracking-uri", uri, "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| variant |") and "| attn |" in out
    out_file = tmp_path / "t" / "abl.csv"
    assert main(["table", "abl", "fam", "--tracking-uri", uri, "--format", "csv", "--out", str(out_file)]) == 0
    assert len(pd.read_csv(out_file)) == 6 and capsys.readouterr().out.strip() == str(out_file)
    assert main(["table", "fam", "--tracking-uri", uri, "--tag", "lab.device=cuda", "--format", "json"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == ["big"]
    assert main(["table", "abl", "--tracking-uri", uri]) == 0
    assert "abl: 4 variant(s) (3 finished, 1 failed); * = baseline" in capsys.readouterr().out

    assert main(["plot", "abl", "--tracking-uri", uri, "--kind", "pareto", "--device", "cpu",
                 "--out", str(tmp_path / "figs") + "/"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "figs" / "abl_pareto_cpu.png"), str(tmp_path / "figs" / "abl_pareto_cpu.svg")]
    assert main(["plot", "abl", "fam", "--tracking-uri", uri, "--kind", "convergence", "--x", "train_seconds",
                 "--out", str(tmp_path / "conv.png")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "conv.png"), str(tmp_path / "conv.svg")]
    assert all(Path(p).stat().st_size > 0 for p in printed)

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
    env = {**os.environ, "MLFLOW_TRACKING_URI": store[0]}  # the env var, not the option
    ok = subprocess.run([sys.executable, "-m", "lab", "table", "abl", "--format", "markdown"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| graft | FINISHED |" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lab", "plot", "nope", "--kind", "convergence"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown experiment 'nope'")
    assert "Traceback" not in bad.stderr
