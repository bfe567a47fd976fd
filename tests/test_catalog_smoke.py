"""Issue 8's CI check: the catalog's headline specs run end to end with `--smoke` on the embedded
data into a temporary store, the runs carry the paper's reference figures, and `lab table` renders
them when asked (`--include-smoke`), never beside those figures (issue 14: smoke runs are
plumbing checks, not results)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from lab import cli
from lab import report as R
from lab import spec as S
from lab.smoke import SMOKE

ROOT = Path(__file__).resolve().parents[1]


def _smoke_and_table(path: Path, capsys) -> list[dict]:
    # --smoke shrinks data/model resolution and steps; 3 steps keep the suite fast, and the
    # teacher of the ablation spec is trained first like in a real run.
    rc = cli.main(["run", str(path), "--smoke", "--set", "budget.steps=3", "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    name = S.load_spec(path, SMOKE).name
    assert cli.main(["table", name]) == 0  # by default smoke runs are left out
    out = capsys.readouterr()
    assert out.out.startswith("(no variant runs)") and "smoke run(s) left out" in out.out
    assert cli.main(["table", name, "--format", "csv", "--include-smoke"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["graft_resnet2_deit6", "ablation_levit128s"])
def test_smoke_run_then_table_with_reference(stem, store, capsys, monkeypatch):
    path = ROOT / "experiments" / f"{stem}.yaml"
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)  # --smoke replaces data.root: no ImageNet needed
    rows = _smoke_and_table(path, capsys)
    variants = S.expand(S.load_spec(path, SMOKE))
    assert sorted(r["key"] for r in rows) == sorted(f"{v.key} (smoke)" for v in variants)
    assert all(r["status"] == "FINISHED" for r in rows), [(r["key"], r["status"]) for r in rows]
    assert all(float(r["steps"]) == 3 for r in rows)
    assert all(r["smoke"] == "True" and r["ref_top1"] == "" and r["ref_params_m"] == "" for r in rows)
    refs = {v.key: v.reference for v in variants if v.reference and v.reference.top1}
    assert refs
    runs = R.load_runs(S.load_spec(path, SMOKE).name, include_smoke=True)
    for _, r in runs.iterrows():  # the figures are on the runs, for a real run's table
        key = r["key"].removesuffix(" (smoke)")
        if key in refs:
            assert float(r["tags.ref.top1"]) == pytest.approx(refs[key].top1)
            assert float(r["tags.ref.params_m"]) == pytest.approx(refs[key].params_m)
