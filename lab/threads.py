"""CPU thread policy for training: how many torch threads, and no spinning against other processes.

Two things make a CPU training step 15-20x slower on a shared machine: more compute threads than
free cores, and OpenMP threads that busy-wait (spin) for each other while a core they need is
running someone else. So:

  - `OMP_WAIT_POLICY=PASSIVE` (idle OpenMP threads sleep instead of spinning) is set when `lab`
    is imported, before torch loads OpenMP (`ensure_passive_wait`; an explicit setting in the
    environment wins). If torch was imported first it is too late, and the run's record says so.
  - The thread count is chosen from the CPUs this process may really use: its affinity mask
    (`os.sched_getaffinity`), the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), minus the current load of the machine (1-minute load average),
    rounded, at least 1. `train.threads` in the spec overrides it.

`decide` returns a `ThreadChoice` (threads, reason, and the inputs) that lab run records on the
parent and every child run (tags `lab.threads`, `lab.threads.reason`, ...). All inputs are
injectable so tests fake affinity, quota and load.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

WAIT_ENV = "OMP_WAIT_POLICY"
_WAIT_STATE: dict[str, str] = {}


def ensure_passive_wait() -> str:
    """Set OMP_WAIT_POLICY=PASSIVE unless the environment sets it; how it stands, in words."""
    if _WAIT_STATE:
        return _WAIT_STATE["state"]
    given = os.environ.get(WAIT_ENV)
    if given:
        state = f"{given.upper()} (from the environment)"
    elif "torch" in sys.modules:
        state = "unset: torch was imported before lab, OpenMP threads may spin (import lab first)"
    else:
        os.environ[WAIT_ENV] = "PASSIVE"
        state = "PASSIVE (set by lab)"
    _WAIT_STATE["state"] = state
    return state


def wait_policy() -> str:
    return _WAIT_STATE.get("state") or ensure_passive_wait()


# --------------------------------------------------------------------------- inputs


def affinity_cpus() -> Optional[int]:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read(p: Path) -> Optional[str]:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> Optional[float]:
    """CPUs the cgroup quota allows this process (the tightest along its cgroup path); None: no quota."""
    lines = (_read(proc_cgroup) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            d = root / rel if rel else root
            while True:
                text = _read(d / "cpu.max")
                if text:
                    quota, _, period = text.partition(" ")
                    if quota != "max" and period:
                        limits.append(int(quota) / int(period))
                if d == root or root not in d.parents:
                    break
                d = d.parent
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                d = base / rel if rel else base
                q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if q and p and int(q) > 0 and int(p) > 0:
                    limits.append(int(q) / int(p))
                    break
    return min(limits) if limits else None


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_times(stat: Path, cpus: Optional[set] = None) -> Optional[dict[str, tuple[float, float]]]:
    """{'cpuN': (total, idle)} from /proc/stat for the CPUs in `cpus` (all when None; the
    aggregate 'cpu' line when there are no per-CPU lines)."""
    text = _read(stat)
    if not text:
        return None
    out: dict[str, tuple[float, float]] = {}
    agg = None
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        vals = [float(x) for x in fields]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
        times = (sum(vals[:8]), idle)  # guest time is already counted in user
        if name == "cpu":
            agg = times
        elif cpus is None or int(name[3:]) in cpus:
            out[name] = times
    if not out and agg is not None:
        out["cpu"] = agg
    return out or None


def busy_cpus(
    interval: float = 0.5,
    stat: Path = Path("/proc/stat"),
    sleep: Callable[[float], None] = time.sleep,
    ncpu: Optional[int] = None,
    cpus: Optional[set] = None,
) -> Optional[float]:
    """CPUs kept busy (by others: this process sleeps while it looks) over `interval` seconds,
    among the CPUs in `cpus` (default: this process's affinity mask), from /proc/stat; None
    where there is no /proc/stat. `ncpu` scales an aggregate-only /proc/stat."""
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = None
    a = _cpu_times(stat, cpus)
    if a is None:
        return None
    sleep(interval)
    b = _cpu_times(stat, cpus)
    if b is None:
        return None
    busy = 0.0
    for name, (t0, i0) in a.items():
        if name not in b or b[name][0] <= t0:
            continue
        t1, i1 = b[name]
        frac = 1.0 - (i1 - i0) / (t1 - t0)
        busy += frac * (float(ncpu or os.cpu_count() or 1) if name == "cpu" else 1.0)
    return busy


def current_load() -> Optional[float]:
    """The load now on the CPUs this process may use: busy CPUs over half a second (/proc/stat),
    else the 1-minute load average (which lags a process that has just started by about a minute)."""
    now = busy_cpus()
    return now if now is not None else load_average()


# --------------------------------------------------------------------------- the policy


@dataclass
class ThreadChoice:
    threads: int
    reason: str
    source: str  # "spec" (train.threads) | "policy"
    cpus: Optional[float] = None  # CPUs this process may use (affinity, quota)
    load: Optional[float] = None  # CPUs busy with other processes when decided
    wait_policy: str = ""

    def tags(self) -> dict[str, str]:
        from lab.record import threads_tag

        out = {
            threads_tag(): str(self.threads),
            threads_tag("source"): self.source,
            threads_tag("reason"): self.reason,
            threads_tag("wait_policy"): self.wait_policy,
        }
        if self.cpus is not None:
            out[threads_tag("cpus")] = f"{self.cpus:g}"
        if self.load is not None:
            out[threads_tag("load")] = f"{self.load:.2f}"
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def usable_cpus(affinity: Optional[int], quota: Optional[float], total: Optional[int] = None) -> tuple[float, str]:
    """The CPUs this process may use, and which limit decided it."""
    cands = []
    if affinity:
        cands.append((float(affinity), f"{affinity} CPUs in this process's affinity mask"))
    if quota:
        cands.append((float(quota), f"a cgroup quota of {quota:g} CPUs"))
    if not cands:
        n = total or os.cpu_count() or 1
        return float(n), f"{n} CPUs"
    return min(cands, key=lambda c: c[0])


def choose(cpus: float, load: Optional[float], explicit: Optional[int] = None, processes: int = 1) -> tuple[int, str]:
    """(threads, reason): `explicit` if given; else the usable CPUs, less the other processes'
    load, shared among `processes` training processes of this machine, at least 1."""
    if explicit:
        return int(explicit), f"train.threads = {explicit} in the spec"
    cap = max(1, math.floor(cpus + 1e-9))
    busy = max(0.0, load or 0.0)
    free = max(1, min(cap, round(cpus - busy)))
    n = max(1, free // max(1, processes))
    why = f"{cap} usable CPU(s)"
    if load is not None:
        why += f", load {busy:.2f} from other processes -> {free} free"
    if processes > 1:
        why += f", shared by {processes} training processes"
    return n, why


def decide(
    explicit: Optional[int] = None,
    *,
    processes: int = 1,
    affinity: Callable[[], Optional[int]] = affinity_cpus,
    quota: Callable[[], Optional[float]] = cgroup_cpu_limit,
    load: Callable[[], Optional[float]] = current_load,
) -> ThreadChoice:
    """The thread count for training in this process (see the module docstring)."""
    wait = wait_policy()
    if explicit:
        n, why = choose(0, None, explicit)
        return ThreadChoice(threads=n, reason=why, source="spec", wait_policy=wait)
    cpus, limit = usable_cpus(affinity(), quota())
    ld = load()
    n, why = choose(cpus, ld, None, processes)
    return ThreadChoice(threads=n, reason=f"{why} ({limit})", source="policy", cpus=cpus, load=ld, wait_policy=wait)


def apply(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


__all__ = [
    "ThreadChoice",
    "affinity_cpus",
    "apply",
    "cgroup_cpu_limit",
    "choose",
    "decide",
    "ensure_passive_wait",
    "busy_cpus",
    "current_load",
    "load_average",
    "usable_cpus",
    "wait_policy",
]
