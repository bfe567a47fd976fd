"""analysis/*.ipynb run headlessly against a synthetic store, and are committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
NOTEBOOKS = ["convergence.ipynb", "ablation.ipynb", "inspection.ipynb"]


@pytest.fixture(scope="module")
def store_uri(report_store) -> str:
    """conftest's report store, written by the lab's own tracking code: `abl` (two `lab run`s, a FAILED
    variant), `fam` (a grid, one variant RUNNING) and `tinyrun` (two variants really trained)."""
    return report_store.uri


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    first = code[0].source
    assert "LAB_EXPERIMENT" in first and "MLFLOW_TRACKING_URI" in first  # parameters come first


def _outputs(nb) -> tuple[str, int]:
    text, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []):
            assert o.output_type != "error", o
            text.append(o.get("text", ""))
            data = o.get("data", {})
            text += [data.get("text/plain", ""), data.get("text/markdown", ""), data.get("text/html", "")]
            images += "image/png" in data
    return "\n".join(text), images


@pytest.mark.parametrize(
    "name, experiments, images", [("convergence.ipynb", "abl,fam,tinyrun", 3), ("ablation.ipynb", "abl", 3)]
)
def test_notebook_executes(name, experiments, images, store_uri, monkeypatch):
    monkeypatch.setenv("LAB_EXPERIMENT", experiments)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    text, n_images = _outputs(nb)
    assert n_images == images
    assert "graft" in text and "broken" in text
    if name == "ablation.ipynb":
        assert "| base * | FINISHED |" in text and "RuntimeError: NaN loss" in text
        assert r"\begin{tabular}" in text
    else:  # a RUNNING grid variant and the really trained runs are plotted too
        assert "fam/depth=2 (running)" in text and "tinyrun/bias" in text


@pytest.mark.slow
def test_inspection_notebook_executes(inspected_store, monkeypatch):
    """analysis/inspection.ipynb on really trained runs (conftest's `inspected_store`): curves,
    filters, one bias figure (the one variant with attention bias), distances, the summary table."""
    uri, _ = inspected_store
    monkeypatch.setenv("LAB_EXPERIMENT", "tinyinspect")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    nb = nbformat.read(ANALYSIS / "inspection.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(ANALYSIS)}}).execute()
    text, n_images = _outputs(nb)
    assert n_images == 4
    assert "vit_patch" in text and "resnet_stem" in text and "distance first (px)" in text
    assert "old: attention distance computed now" in text  # the run without logged distances
