"""matplotlib set-up and figure files shared by every plot the lab draws (report, inspection)."""

from __future__ import annotations

import sys
from pathlib import Path


def pyplot():
    """(pyplot, seaborn) with the lab's theme; the Agg backend unless a notebook chose one."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def save_figure(fig, stem: str | Path) -> list[Path]:
    """Write STEM.png (150 dpi) and STEM.svg; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = stem.with_name(stem.name + "." + ext)
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    return paths
