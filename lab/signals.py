"""SIGTERM and SIGINT end a `lab run` the same careful way: checkpoint, KILLED, exit 143 / 130.

`timeout`, SLURM, Docker and Kubernetes stop jobs with SIGTERM; a person presses Ctrl-C (SIGINT).
Both become `Interrupted` (a KeyboardInterrupt, so every `except KeyboardInterrupt` cleanup in
the runner and the launchers applies), which carries the signal and the exit code 128 + signum.

Outside training, the handlers raise at once. While a Lightning fit is running (`training()`),
they only record the signal: `LastCheckpoint` sees it at the next batch boundary, writes
`last.ckpt` there (a consistent state: the optimizer step is complete) and raises `Interrupted`.
Lightning's own SIGTERM notifier (which would raise `SIGTERMException`, a `SystemExit`, and let
the process exit 0) is turned into `Interrupted` as well (`as_interrupted`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

NAMES: dict[int, str] = {int(signal.SIGTERM): "SIGTERM", int(signal.SIGINT): "SIGINT"}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal."""

    def __init__(self, signum: int = signal.SIGINT, where: str = ""):
        self.signum = int(signum)
        self.where = where
        super().__init__(self.reason)

    @property
    def name(self) -> str:
        return NAMES.get(self.signum, f"signal {self.signum}")

    @property
    def reason(self) -> str:
        return f"stopped by {self.name}" + (f" {self.where}" if self.where else "")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict[str, int] = {"training": 0}  # bodies of training() running
_pending: list[int] = []  # the signal waiting for the next batch boundary (at most one)
_lock = threading.Lock()


def _handler(signum, frame) -> None:
    if _state["training"] and not _pending:
        _pending.append(signum)  # acted on at the next batch boundary (LastCheckpoint)
        return
    raise Interrupted(signum)  # not training, or a second signal: stop now


def install() -> None:
    """Route SIGTERM and SIGINT through `_handler` (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, _handler)


def installed() -> bool:
    return signal.getsignal(signal.SIGTERM) is _handler


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Defer signals to batch boundaries while the body (a Lightning fit) runs."""
    with _lock:
        _state["training"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["training"] -= 1


def pending() -> Optional[int]:
    return _pending[0] if _pending else None


def clear() -> None:
    _pending.clear()


def as_interrupted(exc: BaseException) -> Optional[Interrupted]:
    """`exc` as an Interrupted when it means a signal stopped the run (else None)."""
    if isinstance(exc, Interrupted):
        return exc
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        return Interrupted(signal.SIGTERM)
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return None
