"""Read MLflow back into pandas: ablation tables, Pareto, convergence and seed figures. Never trains.

Data functions (`load_runs`, `history`, `ablation_table`, `pareto_data`, `convergence_data`,
`seeds_data`) return plain DataFrames so tests and notebooks can assert on them; plotting functions
only draw what those return. `lab table` and `lab plot` (lab/cli) call them. One module per job:

- `lab.report.runs`: reading runs back from MLflow: the store, `load_runs`, `history`, and the
  names of their columns (`metric_col`, `tag_col`, `RUN_COLUMNS`, `BENCH_METRIC`, ...).
- `lab.report.tables`: the ablation table: `run_values`, `ablation_table` (seeds aggregated, deltas
  and verdicts against the baseline), `per_seed_table`, `run_table`, `budget_warnings`.
- `lab.report.render`: tables for people: `display_table`, `format_table` (terminal, markdown,
  csv, latex, json).
- `lab.report.plots`: figures: their data (`pick_device`, `pareto_front`, `pareto_data`,
  `convergence_data`, `seeds_data`) and their drawing (`variant_styles`, `plot_pareto`,
  `plot_convergence`, `plot_seeds`).
"""

from __future__ import annotations

from lab.report.plots import (
    MARKERS,
    PARETO_COLUMNS,
    convergence_data,
    pareto_data,
    pareto_front,
    pick_device,
    plot_convergence,
    plot_pareto,
    plot_seeds,
    seeds_data,
    variant_styles,
)
from lab.report.render import FORMATS, OPTIONAL, PRETTY, display_table, format_table
from lab.report.runs import (
    BENCH_METRIC,
    DEVICES,
    FINISHED,
    REF_THROUGHPUT,
    RUN_COLUMNS,
    SMOKE_SUFFIX,
    X_KINDS,
    X_LABELS,
    history,
    load_runs,
    metric_col,
    parse_tag_filter,
    resolve_tracking_uri,
    run_row,
    tag_col,
)
from lab.report.tables import (
    PER_SEED_COLUMNS,
    TABLE_COLUMNS,
    ablation_table,
    budget_warnings,
    overall_status,
    per_seed_table,
    run_table,
    run_values,
)

__all__ = [
    # runs
    "BENCH_METRIC",
    "DEVICES",
    "FINISHED",
    "REF_THROUGHPUT",
    "RUN_COLUMNS",
    "SMOKE_SUFFIX",
    "X_KINDS",
    "X_LABELS",
    "history",
    "load_runs",
    "metric_col",
    "parse_tag_filter",
    "resolve_tracking_uri",
    "run_row",
    "tag_col",
    # tables
    "PER_SEED_COLUMNS",
    "TABLE_COLUMNS",
    "ablation_table",
    "budget_warnings",
    "overall_status",
    "per_seed_table",
    "run_table",
    "run_values",
    # render
    "FORMATS",
    "OPTIONAL",
    "PRETTY",
    "display_table",
    "format_table",
    # plots
    "MARKERS",
    "PARETO_COLUMNS",
    "convergence_data",
    "pareto_data",
    "pareto_front",
    "pick_device",
    "plot_convergence",
    "plot_pareto",
    "plot_seeds",
    "seeds_data",
    "variant_styles",
]
