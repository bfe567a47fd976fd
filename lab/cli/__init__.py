"""`python -m lab` / `lab`: one entry point, one small module per subcommand.

Each module in `COMMANDS` (lab/cli/<name>.py) exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int`; it parses arguments and calls the domain API (lab.runner,
lab.bench, lab.report, lab.spec), which never imports the CLI. User mistakes raise `LabError`
and become one line on stderr and exit 2. Shared argument helpers: lab/cli/common.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import lab
from lab.cli import bench, export, plot, run, show, table, validate
from lab.errors import LabError

# Subcommand modules, in the order `--help` lists them. A new command: add lab/cli/<name>.py
# with `register(sub)` and list it here.
COMMANDS = (validate, show, run, bench, table, plot, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab", description="Grafting and ablation lab for hybrid conv/transformer models."
    )
    parser.add_argument("--version", action="version", version=f"lab {lab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


# Permission, disk, database and network trouble: one line and exit 2, not a traceback (LAB_DEBUG=1 shows it)
ENV_ERRORS = ("OSError", "OperationalError", "MlflowException", "ConnectionError", "Timeout")


def environment_error(e: BaseException) -> bool:
    return any(c.__name__ in ENV_ERRORS for c in type(e).__mro__)


def main(argv: list[str] | None = None) -> int:
    from lab import signals

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # no command: the full help, not just a usage line
        parser.print_help()
        return 0
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signals.install()  # SIGTERM like Ctrl-C: checkpoint, KILLED, exit 143 (130 for Ctrl-C)
    try:
        return int(args.func(args) or 0)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if not environment_error(e) or os.environ.get("LAB_DEBUG"):
            raise
        from lab.track import short_error

        print(f"error: {short_error(e)} (LAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        stop = signals.as_interrupted(e)
        if stop is None:
            raise
        print(f"interrupted: {stop.reason}", file=sys.stderr)
        return stop.exit_code
    finally:
        for s, h in old.items():
            if h is not None:
                try:
                    signal.signal(s, h)
                except ValueError:  # not the main thread
                    pass


if __name__ == "__main__":
    sys.exit(main())
