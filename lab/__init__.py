"""lab: grafting and ablation experiments for hybrid conv/transformer vision models."""

__version__ = "0.1.0"
