"""lab: grafting and ablation experiments for hybrid conv/transformer vision models."""

from lab.threads import ensure_passive_wait as _ensure_passive_wait

# OpenMP reads OMP_WAIT_POLICY once, when torch loads it: set it (PASSIVE: no spin-waiting against
# other processes) before anything imports torch (see lab/threads.py).
_ensure_passive_wait()

__version__ = "0.1.0"
