"""lab.record: the run record's names are the ones lab writes, and the README documents exactly them."""
from __future__ import annotations

from pathlib import Path

import pytest

from lab import record, track

ROOT = Path(__file__).resolve().parents[1]


def test_record_metric_names_are_the_ones_the_lab_writes():
    # lab.track's lists are what lab.module / lab.runner / lab.budget log (tests/test_report.py checks them)
    assert set(record.TRAIN_METRICS) == set(track.TRAIN_METRICS)
    assert set(record.EVAL_METRICS) == set(track.EVAL_METRICS)
    assert set(record.FINAL_METRICS) == set(track.FINAL_METRICS)
    assert record.SEED == track.SEED_TAG and record.CONFIG_HASH == track.CONFIG_HASH_TAG
    assert record.SMOKE == track.SMOKE_TAG


def test_readme_documents_the_run_record():
    readme = (ROOT / "README.md").read_text()
    assert record.markdown() in readme, "README's run-record table is stale: paste `python -m lab.record`"
    names = [e.name for e in record.ENTRIES]
    assert len(names) == len(set(names))
    for name in (*record.TRAIN_METRICS, *record.EVAL_METRICS, *record.FINAL_METRICS):
        assert f"`{name}`" in readme
    assert "`train_loss`" not in readme and "`val_top1`" not in readme  # never recorded under these names


def test_variant_result_round_trips_and_prints_one_line():
    r = record.VariantResult(key="base", hash="abc", budget="steps", status="failed", params=5.7e6, macs=3.05e8,
                             top1=12.345, train_seconds=3.21, error="RuntimeError: boom")
    assert record.VariantResult.from_dict({**r.to_dict(), "unknown": 1}) == r
    line = r.line()
    assert line.startswith("base ") and "params 5.70M" in line and "MACs 305.0M" in line
    assert "top-1  12.35%" in line and line.endswith("error: RuntimeError: boom")
    assert not r.ok and record.VariantResult(key="k", hash="h", budget="steps", status="skipped").ok
    with pytest.raises(AttributeError, match="nope"):
        r.update(nope=1)


def test_the_import_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    ig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ig)
    pkg = tmp_path / "lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lab import b\n")
    (pkg / "b.py").write_text("def f():\n    from lab.a import x\n    return x\n")
    (tmp_path / "grafts").mkdir()
    (tmp_path / "grafts" / "__init__.py").write_text("")
    g = ig.graph(tmp_path)
    assert g["lab.a"] == ["lab.b"] and g["lab.b"] == ["lab.a"]
    assert ig.find_cycle(g) in (["lab.a", "lab.b", "lab.a"], ["lab.b", "lab.a", "lab.b"])
    assert ig.unresolved(tmp_path) == ["lab/b.py:2: lab.a has no x"]
