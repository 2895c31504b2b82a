"""``shmbus coordinator``: run the control plane of one bus in this process."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from ..coordinator import coordinator as _coordinator
from ..coordinator.coordinator import Coordinator
from ..core.routes import MAX_KEEP, check_keep
from ..errors import CoordinatorRunning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shmbus coordinator", description=_coordinator.__doc__)
    parser.add_argument("--bus", default=os.environ.get("SHMBUS_BUS", "default"))
    parser.add_argument("--log-level", default="WARNING")
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
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    try:
        coordinator = Coordinator(
            args.bus,
            dlq_size=args.dlq_size,
            heartbeat_timeout=args.heartbeat_timeout,
            history=history,
        )
    except CoordinatorRunning as e:
        print(f"shmbus coordinator: {e}", file=sys.stderr)
        return 2

    coordinator.parent = args.exit_with_parent
    hand_over = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal hand_over
        hand_over = signum == signal.SIGHUP
        coordinator.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)  # a restart: leave the bus to the next one
    try:
        coordinator.serve()
    finally:
        coordinator.close(hand_over=hand_over)
    return 0
