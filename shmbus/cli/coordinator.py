"""``shmbus coordinator``: run the control plane of one bus in this process."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from ..coordinator import coordinator as _coordinator
from ..coordinator.coordinator import DLQ_STORES, Coordinator
from ..core.routes import MAX_KEEP, check_keep
from ..errors import CoordinatorRunning, ShmbusError
from .report import add_verbose, report

PROG = "shmbus coordinator"


def main(argv: list[str] | None = None, *, verbose: bool = False) -> int:
    """``shmbus coordinator``; returns the exit status: 0 once stopped (SIGTERM,
    SIGINT, SIGHUP), 2 for bad arguments or a bus another coordinator runs, 1
    for any other error (one line; the traceback with ``-v`` or $SHMBUS_DEBUG=1)."""
    parser = argparse.ArgumentParser(prog=PROG, description=_coordinator.__doc__)
    parser.add_argument(
        "--bus",
        default=os.environ.get("SHMBUS_BUS", "default"),
        help="the bus (default: $SHMBUS_BUS, else 'default')",
    )
    parser.add_argument("--log-level", default="WARNING")
    add_verbose(parser, top=True)
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="an agent silent this long is hung; its peers are told",
    )
    parser.add_argument(
        "--dlq-size",
        type=int,
        default=10_000,
        metavar="N",
        help="dead letters kept (the oldest go first; default 10000)",
    )
    parser.add_argument(
        "--dlq",
        choices=DLQ_STORES,
        default="file",
        help="where dead letters live: 'file' (default) keeps them in the bus's state "
        "directory, for the next coordinator of the bus; 'memory' for this one's life only",
    )
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        default=0,
        metavar="PID",
        help="stop the bus when process PID, our parent, is gone (a Runner's "
        "coordinator: nothing else would stop it)",
    )
    parser.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="PATTERN=N",
        help="keep the last N messages published on PATTERN (repeatable)",
    )
    args = parser.parse_args(argv)
    verbose = verbose or args.verbose
    history: dict[str, int] = {}
    for spec in args.history:
        pattern, _, n = spec.rpartition("=")
        try:
            if not n.isdigit():
                raise ValueError(f"give PATTERN=N, N a number from 1 to {MAX_KEEP}")
            history.update([check_keep(pattern, int(n), stop=False)])
        except ValueError as e:  # and InvalidName, InvalidArgument
            parser.error(f"--history {spec!r}: {e}")
    if not args.heartbeat_timeout > 0:
        parser.error(f"--heartbeat-timeout must be positive, got {args.heartbeat_timeout}")
    if args.dlq_size < 1:
        parser.error(f"--dlq-size must be at least 1, got {args.dlq_size}")
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    except ValueError as e:
        parser.error(f"--log-level: {e}")
    # The handlers go in before the coordinator is made: a SIGTERM that came
    # once its socket was there, but before the handlers, killed it with its
    # segments left behind (a test's teardown found them).
    hand_over = False
    asked: list[int] = []
    coordinator: Coordinator | None = None

    def stop(signum: int, frame: Any) -> None:
        nonlocal hand_over
        hand_over = signum == signal.SIGHUP
        asked.append(signum)
        if coordinator is not None:
            coordinator.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)  # a restart: leave the bus to the next one
    try:
        coordinator = Coordinator(
            args.bus,
            dlq_size=args.dlq_size,
            heartbeat_timeout=args.heartbeat_timeout,
            history=history,
            dlq=args.dlq,
        )
    except CoordinatorRunning as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except (ShmbusError, OSError, KeyboardInterrupt) as e:
        return report(PROG, e, verbose=verbose)
    signal.signal(signal.SIGINT, stop)
    coordinator.parent = args.exit_with_parent
    if asked:
        coordinator.stop()  # asked while it was being made: it stops at once
    try:
        try:
            coordinator.serve()
        finally:
            coordinator.close(hand_over=hand_over)
    except (ShmbusError, OSError) as e:
        return report(PROG, e, verbose=verbose)
    return 0
