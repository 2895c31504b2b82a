"""``shmbus tail PATTERN``: print the messages published on PATTERN as they pass.

The command joins the bus as an agent of its own (``tail-<pid>``), subscribes
to PATTERN and prints one line per message: time, topic, sender, id and
payload (``--json``: one JSON object per line). ``--history`` first prints
what the coordinator kept of PATTERN (``shmbus coordinator --history
PATTERN=N``), each message once. Then it says ``tailing PATTERN on bus BUS``
on stderr: what follows is live. It ends on Ctrl-C, SIGTERM or after
``--count`` messages, and leaves the bus: what it did not print is dropped,
not dead-lettered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from ..agent.agent import Agent, connect
from ..core.message import Message
from ..core.paths import validate_bus_or_agent
from ..core.routes import validate_pattern
from ..errors import InvalidName, RecvTimeout, ShmbusError
from .send import _await_bus, to_json

__all__ = ["add_parser", "format_message", "run"]

_MAX_PAYLOAD = 500  # characters of a payload's repr on a line


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tail", help="print the messages published on a topic pattern")
    p.add_argument("pattern", metavar="PATTERN", help="topic pattern: a.b exact, * one, > the rest")
    env_bus = os.environ.get("SHMBUS_BUS")
    # Optional in the usage line: $SHMBUS_BUS serves too (main() asks for one).
    p.add_argument("--bus", default=env_bus, help="the bus (default: $SHMBUS_BUS)")
    p.add_argument("--history", action="store_true", help="print the kept messages first")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.add_argument("--count", type=_count, metavar="N", help="stop after N messages")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the coordinator to start (default 0)",
    )


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_count.__name__ = "count"


def format_message(msg: Message, as_json: bool = False) -> str:
    """One line for ``msg``: bytes and arrays shown briefly, never whole."""
    if as_json:
        return json.dumps(
            {
                "time": msg.timestamp,
                "topic": msg.topic,
                "sender": msg.sender,
                "id": msg.id,
                "payload": to_json(msg.payload),
            }
        )
    when = time.strftime("%H:%M:%S", time.localtime(msg.timestamp))
    when += f".{int(msg.timestamp % 1 * 1e6):06d}"
    with np.printoptions(threshold=20, edgeitems=3):
        text = repr(msg.payload)
    if len(text) > _MAX_PAYLOAD:
        text = f"{text[:_MAX_PAYLOAD]}... ({len(text)} characters)"
    return f"{when} {msg.topic} from {msg.sender} #{msg.id}: {text}"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the agent leaves the bus


def run(args: argparse.Namespace) -> int:
    try:
        validate_bus_or_agent(args.bus, "bus")
        validate_pattern(args.pattern)
    except InvalidName as e:
        print(f"shmbus tail: {e}", file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if not _await_bus(args.bus, args.wait):
            print(
                f"shmbus tail: no coordinator runs bus {args.bus!r}; start one with "
                f"`shmbus coordinator --bus {args.bus}`",
                file=sys.stderr,
            )
            return 1
        with connect(bus=args.bus, name=f"tail-{os.getpid()}") as agent:
            try:
                _tail(agent, args)
            finally:
                _leave_quietly(agent, args.pattern)
    except KeyboardInterrupt:
        pass
    except ShmbusError as e:
        print(f"shmbus tail: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `shmbus tail ... | head`: the reader is gone, so are we
        # Python flushes stdout at exit, into the same broken pipe: not there.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0


def _tail(agent: Agent, args: argparse.Namespace) -> None:
    agent.subscribe(args.pattern)
    # Subscribed before the history is asked for: nothing falls between the
    # two, and what is in both is printed once.
    shown: set[tuple[str, int]] = set()
    left = args.count
    out = sys.stdout
    if args.history:
        for msg in agent.history(args.pattern):
            print(format_message(msg, args.json), file=out, flush=True)
            shown.add((msg.sender, msg.id))
            if left is not None:
                left -= 1
                if not left:
                    return
    # Said once subscribed and the history is out: what comes next is live.
    print(f"tailing {args.pattern} on bus {args.bus}", file=sys.stderr, flush=True)
    while left is None or left > 0:
        try:
            msg = agent.recv(timeout=1.0)
        except RecvTimeout:
            continue
        if not msg.topic:
            continue  # sent to us by name: not what we tail
        if shown:
            if (msg.sender, msg.id) in shown:
                continue
            if len(shown) > 100_000:
                shown.clear()
        print(format_message(msg, args.json), file=out, flush=True)
        if left is not None:
            left -= 1


def _leave_quietly(agent: Agent, pattern: str) -> None:
    """Unsubscribe, then drop what came: a tail's unread messages are no dead letters."""
    try:
        agent.unsubscribe(pattern)
        while agent.recv_many(1024, timeout=0):
            pass
    except ShmbusError:
        pass  # the coordinator is gone: close() copes
