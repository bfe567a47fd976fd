"""Seeds as a first-class idea: spec expansion, the runner's per-seed runs, aggregated tables with
confidence intervals and verdicts, smoke runs kept apart, plots with spread for 12 variants x 3
seeds. Stores are written by the lab's own code (lab.runner for the trained runs, lab.track /
lab.bench for the made-up ones), as tests/conftest.py's report store does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from lab import report as R
from lab import spec as S
from lab import stats, track
from lab.cli import main
from lab.errors import SpecError
from lab.figures import save_figure

from conftest import log_variant_run, tiny_spec_dict

T975_DF2 = 4.302652729911275


# --------------------------------------------------------------------------- spec


def _load(tmp_path, doc, overrides=None):
    p = tmp_path / f"{doc['name']}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return S.load_spec(p, overrides)


def test_seeds_expand_to_one_run_per_seed(tmp_path):
    doc = tiny_spec_dict(name="s", variants={"base": {}, "bias": {"model": {"position": "attention_bias"}}})
    plain = {v.key: v for v in S.expand(_load(tmp_path, doc))}
    vs = S.expand(_load(tmp_path, {**doc, "seeds": 3}))
    assert [(v.key, v.seed, v.train.seed, v.uid) for v in vs][:3] == [
        ("base", 0, 0, "base-seed0"),
        ("base", 1, 1, "base-seed1"),
        ("base", 2, 2, "base-seed2"),
    ]
    assert len(vs) == 6 and all(v.repeated for v in vs)
    for key in ("base", "bias"):
        mine = [v for v in vs if v.key == key]
        assert len({v.hash for v in mine}) == 3 and len({v.config_hash for v in mine}) == 1
        # seed 0 is the run a spec without `seeds` makes: it is reused, not retrained
        assert mine[0].hash == plain[key].hash and mine[0].config_hash == plain[key].config_hash
        assert {v.changes for v in mine} == {plain[key].changes}
    assert plain["base"].uid == "base" and not plain["base"].repeated
    # seeds count up from the variant's own train.seed; a list names them
    assert [v.seed for v in S.expand(_load(tmp_path, {**doc, "seeds": 2, "train": {**doc["train"], "seed": 7}}))][
        :2
    ] == [7, 8]
    assert [v.seed for v in S.expand(_load(tmp_path, {**doc, "seeds": [3, 5]}))] == [3, 5, 3, 5]
    # a grid over train.seed is the same thing: repeats of each variant, not new variants
    gridded = S.expand(_load(tmp_path, {**doc, "grid": {"train.seed": [0, 1, 2]}}))
    assert [(v.key, v.seed, v.hash) for v in gridded] == [(v.key, v.seed, v.hash) for v in vs]
    assert [v.seed for v in S.expand(_load(tmp_path, doc, {"seeds": 1}))] == [0, 0]


def test_seed_spec_errors(tmp_path):
    doc = tiny_spec_dict(name="s")
    with pytest.raises(SpecError, match="seeds must be >= 1"):
        _load(tmp_path, {**doc, "seeds": 0})
    with pytest.raises(SpecError, match="distinct"):
        _load(tmp_path, {**doc, "seeds": [1, 1]})
    with pytest.raises(SpecError, match=r"grid\.train\.seed.*give the seeds once"):
        S.expand(_load(tmp_path, {**doc, "seeds": 2, "grid": {"train.seed": [0, 1]}}))
    assert main(["show", str(tmp_path / "s.yaml"), "--seeds", "0", "--no-complexity"]) == 2


def test_show_lists_a_variant_once_with_its_seeds(tmp_path, capsys):
    doc = tiny_spec_dict(name="s", variants={"base": {}, "bias": {"model": {"position": "attention_bias"}}})
    _load(tmp_path, doc)
    assert main(["show", str(tmp_path / "s.yaml"), "--seeds", "3", "--format", "json", "--no-complexity"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["key"], r["seeds"]) for r in rows] == [("base", [0, 1, 2]), ("bias", [0, 1, 2])]
    assert main(["show", str(tmp_path / "s.yaml"), "--seeds", "3", "--no-complexity"]) == 0
    assert "s: 2 variant(s) from" in capsys.readouterr().out


def test_seed_changes_data_order_not_the_split():
    from lab.data import build_datamodule

    spec = S.DataSpec(**tiny_spec_dict()["data"])
    dm = build_datamodule(spec)
    dm.setup("fit")
    orders = []
    for seed in (0, 1, 0):
        dm.shuffle_seed = seed
        orders.append(next(iter(dm.train_dataloader()))[1].tolist())
    assert orders[0] == orders[2] != orders[1]
    val = [b[1].tolist() for b in dm.val_dataloader()]
    dm2 = build_datamodule(spec)
    dm2.setup("fit")
    dm2.shuffle_seed = 5
    assert [b[1].tolist() for b in dm2.val_dataloader()] == val  # data.seed fixes the split


# --------------------------------------------------------------------------- the runner, really


@pytest.mark.slow
def test_runner_trains_each_seed_and_skips_finished_ones(store, tmp_path, capsys):
    from lab.runner import run_experiment

    doc = tiny_spec_dict(
        name="seeded",
        variants={"base": {}, "bias": {"model": {"position": "attention_bias"}}},
        budget={"steps": 6},
        reference={"base": {"top1": 72.0, "params_m": 5.7}},
        seeds=2,
    )
    doc["train"]["eval_every"] = 3
    spec = _load(tmp_path, doc)
    recs = run_experiment(spec, S.expand(spec), progress=False, say=lambda s: None)
    assert [(r.uid, r.status) for r in recs] == [
        ("base-seed0", "finished"),
        ("base-seed1", "finished"),
        ("bias-seed0", "finished"),
        ("bias-seed1", "finished"),
    ]
    cl = track.client(store)
    runs = {(r.data.tags["lab.variant"], r.data.tags["lab.seed"]): r for r in track.find_variant_runs(cl, "seeded")}
    assert set(runs) == {("base", "0"), ("base", "1"), ("bias", "0"), ("bias", "1")}
    assert runs[("base", "0")].info.run_name == "base-seed0"
    assert runs[("base", "0")].data.tags["lab.config_hash"] == runs[("base", "1")].data.tags["lab.config_hash"]
    assert runs[("base", "0")].data.params["train.seed"] == "0" and runs[("base", "1")].data.params["train.seed"] == "1"
    loss = {s: track.metric_history(cl, runs[("base", s)].info.run_id, "train/loss") for s in ("0", "1")}
    assert loss["0"][0][1] != loss["1"][0][1]  # another init and data order: another first loss

    # seeds: 3 later: seeds 0 and 1 are skipped (same hash), only seed 2 trains
    spec3 = _load(tmp_path, {**doc, "seeds": 3})
    recs = run_experiment(spec3, [v for v in S.expand(spec3) if v.key == "base"], progress=False, say=lambda s: None)
    assert [r.status for r in recs] == ["skipped", "skipped", "finished"]

    # a smoke run in the same store (same key): tagged, and left out of the table by default
    assert (
        main(
            [
                "run",
                str(tmp_path / "seeded.yaml"),
                "--smoke",
                "--set",
                "budget.steps=2",
                "--set",
                "data.num_classes=null",
                "--seeds",
                "1",
                "--variant",
                "bias",
                "--no-progress",
            ]
        )
        == 0
    )
    smoke = [r for r in track.find_variant_runs(cl, "seeded") if r.data.tags.get("lab.smoke") == "true"]
    assert len(smoke) == 1 and smoke[0].data.tags["lab.variant"] == "bias"
    capsys.readouterr()
    assert main(["table", "seeded", "--format", "json"]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert [(r["key"], r["n_seeds"], r["seeds"]) for r in rows] == [("base", 3, [0, 1, 2]), ("bias", 2, [0, 1])]
    assert "1 smoke run(s) left out" in out.err
    assert rows[0]["ref_top1"] == 72.0
    b = rows[1]
    lo, hi = b["delta_top1_ci"]
    assert b["ci_method"] == "welch" and lo <= b["delta_top1"] <= hi
    assert b["verdict"] in ("better", "worse", "within noise")
    assert b["delta_top1"] == pytest.approx(b["top1_mean"] - rows[0]["top1_mean"])
    assert main(["table", "seeded", "--format", "json", "--include-smoke"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == ["base", "bias", "bias (smoke)"]
    assert rows[2]["smoke"] and rows[2]["n_seeds"] == 1 and rows[0]["baseline"]
    assert main(["table", "seeded", "--include-smoke"]) == 0
    assert "note: smoke runs shown" in capsys.readouterr().out


# --------------------------------------------------------------------------- aggregation, by hand

# final top-1 per seed; None = that seed FAILED (it logged 10% before failing)
TOP1 = {
    "base": {0: 60.0, 1: 62.0, 2: 61.0},
    "better": {0: 65.0, 1: 66.0, 2: 66.5},  # paired differences 5, 4, 5.5
    "noise": {0: 61.0, 1: 61.0, 2: 63.0},  # paired differences 1, -1, 2
    "worse": {0: 50.0, 1: 51.0, 2: 52.0},
    "failed": {0: 63.0, 1: 64.0, 2: None},  # seed 2 failed: Welch over 2 vs 3
    "missing": {0: 61.5, 1: 62.5},  # seed 2 never ran: Welch
    "single": {0: 70.0},  # n = 1
    **{f"f{i}": {s: 56.0 + 0.3 * i + s for s in range(3)} for i in range(5)},  # close together: labels collide
}
SPEED = {
    "base": 300.0,
    "better": 120.0,
    "noise": 290.0,
    "worse": 500.0,
    "failed": 200.0,
    "missing": 250.0,
    "single": 80.0,
    **{f"f{i}": 205.0 + 4 * i for i in range(5)},
}


@pytest.fixture(scope="module")
def agg(tmp_path_factory):
    """12 variants x up to 3 seeds, benchmarked, plus an older spec version of 'noise' and a smoke run."""
    from conftest import fake_bench, run_outcome

    root = tmp_path_factory.mktemp("agg")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    variants = {
        k: ({"model": {"position": "attention_bias"}} if k == "worse" else {"train": {"lr": 1e-3 * (1 + i)}})
        for i, k in enumerate(TOP1)
        if k != "base"
    }
    doc = tiny_spec_dict(
        name="agg",
        baseline="base",
        seeds=3,
        variants={"base": {}, **variants},
        reference={"base": {"top1": 71.9, "throughput_cpu": 88.0}},
        tracking={"uri": uri, "log_checkpoint": False},
    )
    spec = _load(root, doc)
    by = {(v.key, v.seed): v for v in S.expand(spec)}
    cl = track.client(uri)
    exp_id = track.get_or_create_experiment(cl, "agg", uri)
    # an older version of 'noise' (another lr): a FINISHED run that must not mix with the current seeds
    old = _load(root, {**doc, "variants": {**doc["variants"], "noise": {"train": {"lr": 0.5}}}})
    old_noise = next(v for v in S.expand(old) if v.key == "noise" and v.seed == 0)
    log_variant_run(old_noise, **run_outcome((30.0, 40.0, 99.0), final=99.0, best=99.0, params=5e6, macs=3e8))
    parent = track.start_parent_run(cl, exp_id, "agg")
    ids = {}
    for key, seeds in TOP1.items():
        for seed, top1 in seeds.items():
            v = by[(key, seed)]
            curve = (top1 - 20, top1 - 8, top1) if top1 is not None else (5.0, 10.0)
            o = (
                run_outcome(curve, final=top1, best=top1 + 0.5, params=5e6, macs=3e8)
                if top1 is not None
                else run_outcome(curve, params=5e6, macs=3e8, status="FAILED", error="RuntimeError: boom")
            )
            ids[(key, seed)] = log_variant_run(v, parent_run_id=parent, baseline=(key == "base"), **o)
    cl.set_terminated(parent, status="FAILED")
    for key in TOP1:
        fake_bench(by[(key, 0)], cpu=SPEED[key])  # lab bench SPEC --log: onto every seed of the variant
    smoke = S.expand(_load(root, doc, {"data": {"image_size": 32}}))[0]
    smoke = smoke.model_copy(update={"tags": {**smoke.tags, track.SMOKE_TAG: "true"}})
    log_variant_run(smoke, baseline=True, **run_outcome((10.0,), final=10.0, best=10.0, params=5e6, macs=3e8))
    return {"uri": uri, "ids": ids, "old_hash": old_noise.config_hash, "noise_hash": by[("noise", 0)].config_hash}


@pytest.fixture(scope="module")
def agg_runs(agg):
    return R.load_runs("agg", tracking_uri=agg["uri"])


def test_load_runs_one_row_per_seed_of_the_latest_version(agg, agg_runs):
    df = agg_runs
    assert len(df) == sum(len(s) for s in TOP1.values()) and not df["smoke"].any()
    assert df.groupby("key", sort=False)["seed"].apply(list).to_dict() == {k: list(s) for k, s in TOP1.items()}
    noise = df[df["key"] == "noise"]
    assert set(noise["config_hash"]) == {agg["noise_hash"]} and noise["n_hashes"].iloc[0] == 2
    assert noise["other_hashes"].iloc[0] == agg["old_hash"]
    notes = df.attrs["notes"]
    assert "1 smoke run(s) left out (--include-smoke shows them)" in notes
    (which,) = [n for n in notes if n.startswith("agg/noise")]
    assert f"showing config hash {agg['noise_hash']}" in which and "--all-hashes" in which and "--hash" in which


def test_aggregated_table_against_hand_computed_statistics(agg_runs):
    t = R.ablation_table(agg_runs).set_index("key")
    assert list(t.index) == list(TOP1)
    base = t.loc["base"]
    assert bool(base["baseline"]) and base["verdict"] == "baseline" and base["n_seeds"] == 3
    assert base["top1"] == base["top1_mean"] == pytest.approx(61.0) and base["top1_std"] == pytest.approx(1.0)
    assert base["top1_best"] == pytest.approx(61.5) and base["ref_top1"] == 71.9
    # paired: differences 5, 4, 5.5 -> mean 29/6, sd sqrt(7/12), se sd/sqrt(3)
    b = t.loc["better"]
    half = T975_DF2 * math.sqrt(7 / 12) / math.sqrt(3)
    assert b["ci_method"] == "paired" and b["delta_top1"] == pytest.approx(29 / 6) == b["d_top1"]
    assert b["delta_top1_ci"] == pytest.approx([29 / 6 - half, 29 / 6 + half]) and b["verdict"] == "better"
    n = t.loc["noise"]
    assert n["verdict"] == "within noise" and n["delta_top1_ci"][0] < n["delta_top1"] < n["delta_top1_ci"][1]
    assert n["top1"] == pytest.approx(61 + 2 / 3)  # the older version's 99% is not mixed in
    assert t.at["worse", "verdict"] == "worse"
    # a FAILED seed: left out of every number, the comparison falls back to Welch over 2 vs 3
    f = t.loc["failed"]
    assert (f["n_seeds"], f["seeds"], f["status"], f["n_failed"]) == (2, [0, 1, 2], "FAILED", 1)
    assert f["top1"] == pytest.approx(63.5) and f["error"] == "RuntimeError: boom"
    want = stats.compare({0: 63.0, 1: 64.0}, TOP1["base"])
    assert f["ci_method"] == "welch" and f["delta_top1_ci"] == pytest.approx(list(want.ci))
    assert t.at["missing", "ci_method"] == "welch" and t.at["missing", "n_seeds"] == 2
    s = t.loc["single"]
    assert s["verdict"] == "cannot tell (n=1)" and s["delta_top1"] == pytest.approx(9.0)
    assert all(math.isnan(x) for x in s["delta_top1_ci"]) and math.isnan(s["top1_std"])
    # costs aggregated the same way
    assert t.at["better", "cpu_imgs_s"] == 120.0 and t.at["better", "cpu_speedup"] == pytest.approx(0.4)
    assert t.at["better", "train_s"] == pytest.approx(15.0) and t.at["better", "params_m"] == 5.0
    md = R.format_table(R.ablation_table(agg_runs), "markdown")
    assert "| base * | FINISHED | 3 |" in md and "| 61.00 ± 1.00 |" in md
    assert f"| +4.83 [+{29 / 6 - half:.2f}, +{29 / 6 + half:.2f}] | better |" in md
    assert "| failed | FAILED (2/3 done) | 2 |" in md and "| cannot tell (n=1) |" in md


def test_which_version_is_shown_and_how_to_see_the_others(agg, capsys):
    every = R.load_runs("agg", tracking_uri=agg["uri"], all_hashes=True)
    keys = list(dict.fromkeys(every["key"]))
    assert f"noise@{agg['old_hash'][:7]}" in keys and f"noise@{agg['noise_hash'][:7]}" in keys and "base" in keys
    older = R.ablation_table(R.load_runs("agg", tracking_uri=agg["uri"], hash=agg["old_hash"][:8]))
    assert older["key"].tolist() == ["noise"] and older["top1"].tolist() == [99.0]
    assert main(["table", "agg", "--tracking-uri", agg["uri"]]) == 0
    out = capsys.readouterr().out
    assert "note: agg/noise: runs of 2 spec versions" in out and "note: 1 smoke run(s) left out" in out
    with_smoke = R.load_runs("agg", tracking_uri=agg["uri"], include_smoke=True)
    t = R.ablation_table(with_smoke).set_index("key")
    assert t.at["base (smoke)", "smoke"] and math.isnan(t.at["base (smoke)", "ref_top1"])
    assert bool(t.at["base", "baseline"]) and t.at["base", "n_seeds"] == 3  # the smoke run joins no real seeds
    assert R.pareto_data(with_smoke, device="cpu")["source"].unique().tolist() == ["measured"]  # no paper beside smoke
    assert "paper" in set(R.pareto_data(R.load_runs("agg", tracking_uri=agg["uri"]), device="cpu")["source"])
    assert main(["table", "agg", "--tracking-uri", agg["uri"], "--per-seed", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 33 and {r["seed"] for r in rows if r["key"] == "base"} == {0, 1, 2}


# --------------------------------------------------------------------------- plots with spread


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_pareto_plot_12_variants_3_seeds(agg_runs):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_hex

    data = R.pareto_data(agg_runs, device="cpu")
    ours = data[data["source"] == "measured"].set_index("key")
    assert len(ours) == 12 and ours.at["better", "top1_std"] == pytest.approx(stats.summarize([65, 66, 66.5]).std)
    assert ours.at["better", "throughput_lo"] == pytest.approx(108.0) and ours.at["better", "throughput_hi"] == 132.0
    fig = R.plot_pareto(data)
    ax = fig.axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 2  # x and y error bars
    handles = dict(zip([t.get_text() for t in ax.get_legend().get_texts()], ax.get_legend().legend_handles))
    labels = ours["label"].tolist()
    assert "failed (failed)" in labels and set(labels) <= set(handles)
    styles = {(to_hex(handles[k].get_color()), handles[k].get_marker()) for k in labels}
    assert len(styles) == 12  # a distinct colour+marker per variant
    assert "baseline: base" in handles
    texts = [t for t in ax.texts if t.get_text() in TOP1]
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t, fig.canvas.get_renderer()) for t in texts]  # the words, not the leader lines
    assert len(texts) == 12
    assert not [
        (texts[i].get_text(), texts[j].get_text())
        for i in range(12)
        for j in range(i + 1, 12)
        if _overlap(boxes[i], boxes[j])
    ]
    assert {t.get_text() for t in ax.texts} - set(TOP1) == {"base (paper)"}  # paper point distinct
    plt.close(fig)


def test_convergence_band_and_seeds_view(agg_runs, tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    data = R.convergence_data(agg_runs, x="step")
    fig = R.plot_convergence(data)
    ax = fig.axes[0]
    bands = [
        c
        for c in ax.collections
        if isinstance(c, PolyCollection)
        and any(len(pth.vertices) and np.isfinite(pth.vertices).all() for pth in c.get_paths())
    ]
    assert len(bands) == 11  # every variant with two or more seeds has a band; 'single' has none
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 12 and "failed (failed)" in labels
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
    means = {tuple(ln.get_ydata().round(6)) for ln in lines}
    assert (41.0, 53.0, 61.0) in means  # base: mean over its three seeds at each step
    plt.close(fig)

    s = R.seeds_data(agg_runs)
    assert len(s) == 33 - 1  # finished seeds only (failed's seed 2 is left out)
    fig = R.plot_seeds(s)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(dict.fromkeys(s["label"]))
    assert sum(len(c.get_offsets()) for c in ax.collections) == 32
    assert save_figure(fig, tmp_path / "seeds")[0].stat().st_size > 1000
    np.random.seed(123)
    outside = np.random.random()
    np.random.seed(123)
    again = R.plot_seeds(s)  # the same runs draw the same points (the jitter is seeded), the caller's RNG untouched
    assert np.random.random() == outside
    for c1, c2 in zip(ax.collections, again.axes[0].collections):
        assert np.array_equal(c1.get_offsets(), c2.get_offsets())
    plt.close(fig)
    plt.close(again)
    assert (
        main(
            [
                "plot",
                "agg",
                "--tracking-uri",
                agg_runs.attrs["tracking_uri"],
                "--kind",
                "seeds",
                "--out",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    assert Path(tmp_path / "s.png").is_file()
