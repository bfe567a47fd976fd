"""Who owns a RUNNING run: leases with a heartbeat, recorded on the MLflow run itself.

A `lab run` that trains a variant (or waits for a launcher to train it) *holds the lease* of
that variant's child run (and of its parent run): tags

  lab.lease.owner      "<host>:<pid>:<process start, unix s>"
  lab.lease.heartbeat  unix seconds, refreshed every `heartbeat_s` by a daemon thread

Because they are tags on the run they work the same for a SQLite file and a shared tracking
server. A RUNNING run is

  live   its owner is this process; or another process on this host that is still alive; or a
         process on another host whose heartbeat is younger than `timeout_s`;
  stale  otherwise (the owner was killed, SIGKILL, OOM, a lost node): it may be taken over.

Deciding and claiming must not interleave between two `lab run`s: for a store on the local
file system the decision is made under an exclusive `fcntl` lock on `<store>/.lab.lock`
(`store_lock`); for a server store the claim is written and read back after a short pause
(`confirm_claim`), and of two runs created at once for one variant the older one wins
(`first_live`).

Settings (environment): LAB_LEASE_TIMEOUT (seconds without a heartbeat after which a run
owned by another host is stale; default 300), LAB_HEARTBEAT (seconds between heartbeats;
default 30).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lab import record as R

OWNER = R.LEASE_OWNER
HEARTBEAT = R.LEASE_HEARTBEAT
TAKEN_FROM = R.LEASE_TAKEN_FROM
STALE = "STALE"  # the status `lab table` shows for a RUNNING run whose owner is gone


def timeout_s() -> float:
    return float(os.environ.get("LAB_LEASE_TIMEOUT", "300"))


def heartbeat_s() -> float:
    return float(os.environ.get("LAB_HEARTBEAT", "30"))


# --------------------------------------------------------------------------- owners


def _proc_start(pid: int) -> Optional[str]:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str  # /proc start ticks (or "-")

    @property
    def token(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    @classmethod
    def parse(cls, token: Optional[str]) -> Optional["Owner"]:
        if not token:
            return None
        try:
            host, pid, start = token.rsplit(":", 2)
            return cls(host, int(pid), start)
        except ValueError:
            return None

    def alive_here(self) -> bool:
        """On this host: the process exists and is the same one (same start time)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        start = _proc_start(self.pid)
        return start is None or self.start in ("-", start)


def me() -> Owner:
    return Owner(socket.gethostname(), os.getpid(), _proc_start(os.getpid()) or "-")


def describe(token: Optional[str]) -> str:
    o = Owner.parse(token)
    return f"pid {o.pid} on {o.host}" if o else "an unknown process"


def state(run: Any, now: Optional[float] = None, timeout: Optional[float] = None) -> str:
    """'done' (not RUNNING) | 'mine' | 'live' | 'stale' for an MLflow run."""
    return state_of(run.info.status, run.data.tags, now, timeout)


def state_of(status: str, tags: dict, now: Optional[float] = None, timeout: Optional[float] = None) -> str:
    if status != "RUNNING":
        return "done"
    owner = Owner.parse(tags.get(OWNER))
    if owner is None:
        return "stale"  # RUNNING without an owner: left by a lab that had no leases, or a crash
    mine = me()
    if owner == mine:
        return "mine"
    if owner.host == mine.host:
        return "live" if owner.alive_here() else "stale"
    now = time.time() if now is None else now
    timeout = timeout_s() if timeout is None else timeout
    try:
        beat = float(tags.get(HEARTBEAT, "0"))
    except ValueError:
        beat = 0.0
    return "live" if now - beat <= timeout else "stale"


def shown_status(run_status: str, tags: dict) -> str:
    """The status to show for a run: STALE instead of RUNNING when its owner is gone."""
    return STALE if state_of(run_status, tags) == "stale" else run_status


# --------------------------------------------------------------------------- claiming


def claim_tags(previous: Optional[str] = None) -> dict[str, str]:
    tags = {OWNER: me().token, HEARTBEAT: f"{time.time():.3f}"}
    if previous:
        tags[TAKEN_FROM] = previous
    return tags


def confirm_claim(cl, run_id: str, pause: float = 0.0) -> bool:
    """After writing our claim: is the run's owner still us (no other process overwrote it)?"""
    if pause:
        time.sleep(pause)
    return cl.get_run(run_id).data.tags.get(OWNER) == me().token


def first_live(runs: list, exclude: Optional[str] = None) -> Optional[Any]:
    """The oldest RUNNING run (of one variant) that is live and not ours/`exclude`."""
    cands = [r for r in runs if r.info.run_id != exclude and state(r) == "live"]
    return min(cands, key=lambda r: (r.info.start_time or 0, r.info.run_id)) if cands else None


@contextlib.contextmanager
def store_lock(store_dir: Optional[Path]) -> Iterator[None]:
    """An exclusive lock on `<store_dir>/.lab.lock` (no-op for a server store: `store_dir` None)."""
    if store_dir is None:
        yield
        return
    store_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(store_dir / ".lab.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- heartbeats


class Keeper:
    """A daemon thread that refreshes the heartbeat of every run this process holds."""

    def __init__(self, make_client, interval: Optional[float] = None):
        self._make_client = make_client
        self.interval = heartbeat_s() if interval is None else interval
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def hold(self, run_id: str) -> None:
        with self._lock:
            self._held.add(run_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lab-lease-heartbeat", daemon=True)
            self._thread.start()

    def release(self, run_id: str) -> None:
        with self._lock:
            self._held.discard(run_id)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def _loop(self) -> None:
        cl = None
        while not self._stop.wait(self.interval):
            ids = self.held()
            if not ids:
                continue
            try:
                cl = cl or self._make_client()
                for rid in ids:
                    cl.set_tag(rid, HEARTBEAT, f"{time.time():.3f}")
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the lease times out only after many
                pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
