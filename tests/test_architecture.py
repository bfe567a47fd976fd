"""The code's shape: no import cycles in lab/ or grafts/ (imports inside functions count), no
private name used across modules, one run record that the README documents, a CLI that the
domain modules never import."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lab import record

ROOT = Path(__file__).resolve().parents[1]


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycle_even_inside_functions():
    ig = _import_graph()
    g = ig.graph(ROOT)
    assert "lab.runner" in g and "grafts.zoo" in g and len(g) > 30  # it found the modules
    cycle = ig.find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    ig = _import_graph()
    pkg = tmp_path / "lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from lab import b\n")
    (pkg / "b.py").write_text("def f():\n    from lab.a import x\n    return x\n")
    (pkg / "c.py").write_text("from lab.a import _hidden\nimport lab.b as B\nB._y\n")
    (tmp_path / "grafts").mkdir()
    (tmp_path / "grafts" / "__init__.py").write_text("")
    g = ig.graph(tmp_path)
    assert g["lab.a"] == ["lab.b"] and g["lab.b"] == ["lab.a"]
    assert ig.find_cycle(g) in (["lab.a", "lab.b", "lab.a"], ["lab.b", "lab.a", "lab.b"])
    bad = ig.private_uses(tmp_path)
    assert any("lab.a._hidden" in b for b in bad) and any("lab.b._y" in b for b in bad)


def test_every_package_import_resolves():
    """A function-level import of a module that moved fails only when that code runs: catch it here."""
    assert _import_graph().unresolved(ROOT) == []


def test_the_checker_finds_unresolved_imports(tmp_path):
    ig = _import_graph()
    pkg = tmp_path / "lab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nX = 1\ndef f():\n    pass\n")
    (pkg / "b.py").write_text(
        "from lab.a import X, f, os\ndef g():\n    from lab.gone import y\n    from lab.a import Y\n"
    )
    (tmp_path / "grafts").mkdir()
    (tmp_path / "grafts" / "__init__.py").write_text("")
    assert ig.unresolved(tmp_path) == ["lab/b.py:3: no module lab.gone", "lab/b.py:4: lab.a has no Y"]


def test_no_private_name_used_across_modules():
    assert _import_graph().private_uses(ROOT) == []


def test_domain_modules_never_import_the_cli():
    g = _import_graph().graph(ROOT)
    offenders = {
        m: d
        for m, d in g.items()
        if not m.startswith("lab.cli")
        and m != "lab.__main__"
        and any(x == "lab.cli" or x.startswith("lab.cli.") for x in d)
    }
    assert offenders == {}


def test_script_form_checks_the_repo():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_graph.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no import cycle" in out.stdout


def test_readme_documents_the_run_record():
    readme = (ROOT / "README.md").read_text()
    assert record.markdown() in readme, "README's run-record table is stale: paste `python -m lab.record`"
    names = [e.name for e in record.ENTRIES]
    assert len(names) == len(set(names))
    # the metric names the training writes are the ones documented
    for name in (*record.TRAIN_METRICS, *record.EVAL_METRICS, *record.FINAL_METRICS):
        assert f"`{name}`" in readme
    assert "`train_loss`" not in readme and "`val_top1`" not in readme  # the old, never-recorded names


def test_variant_result_round_trips_and_prints_one_line():
    r = record.VariantResult(
        key="base",
        hash="abc",
        budget="steps",
        status="failed",
        params=5.7e6,
        macs=3.05e8,
        top1=12.345,
        train_seconds=3.21,
        error="RuntimeError: boom",
    )
    assert record.VariantResult.from_dict({**r.to_dict(), "unknown": 1}) == r
    line = r.line()
    assert line.startswith("base ") and "params 5.70M" in line and "MACs 305.0M" in line
    assert "top-1  12.35%" in line and "train    3.2s" in line and line.endswith("error: RuntimeError: boom")
    assert not r.ok and record.VariantResult(key="k", hash="h", budget="steps", status="skipped").ok
    with pytest.raises(AttributeError, match="nope"):
        r.update(nope=1)


def test_cli_without_a_command_prints_help_and_has_a_version(capsys):
    from lab import __version__
    from lab.cli import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("validate", "show", "run", "bench", "table", "plot"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"lab {__version__}"
