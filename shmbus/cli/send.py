"""``shmbus send`` and ``shmbus publish``: one message from a script or a shell.

The command joins the bus as an agent of its own (``cli-<pid>`` unless
``--as`` names it), sends, and leaves. A PAYLOAD is JSON (``'{"a": 1}'``,
``42``, ``'"text"'``); ``--text`` sends it as a string and ``--raw`` as
bytes; ``-`` reads it from stdin. ``send --request`` prints the response's
payload as one line of JSON, with bytes as base64 strings and numpy arrays as
nested lists.

Exit status: 0 on success, 1 when the bus refused or did not answer (no
coordinator, unknown recipient, timeout), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ..agent.agent import Agent, connect
from ..core.message import MessageType
from ..core.paths import bus_is_live, validate_bus_or_agent
from ..core.routes import validate_topic
from ..errors import (
    InvalidName,
    RequestTimeout,
    ShmbusError,
    UnknownRecipient,
)

__all__ = ["read_payload", "run_publish", "run_send", "to_json"]


class PayloadError(ValueError):
    """The PAYLOAD argument (or stdin) is not what the options say it is."""


def read_payload(
    arg: str, *, text: bool = False, raw: bool = False, stdin: BinaryIO | None = None
) -> Any:
    """The payload ``arg`` stands for: JSON, ``text`` as str, ``raw`` as bytes; ``-`` is stdin."""
    data = (stdin or sys.stdin.buffer).read() if arg == "-" else None
    if raw:
        return data if data is not None else os.fsencode(arg)
    if text:
        if data is None:
            return arg
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise PayloadError("stdin is not UTF-8 text; use --raw to send bytes") from None
    try:
        return json.loads(data if data is not None else arg)
    except ValueError as e:
        where = "stdin" if data is not None else f"the payload {arg!r}"
        raise PayloadError(
            f"{where} is not JSON ({e}); use --text to send it as a string, --raw as bytes"
        ) from None


def to_json(obj: Any) -> Any:
    """A payload as JSON can hold it: bytes become base64 strings, arrays lists."""
    if isinstance(obj, dict):
        return {_key(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return base64.b64encode(obj).decode("ascii")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, without importing numpy here
        return to_json(obj.tolist())
    return repr(obj)


def _key(key: Any) -> Any:
    if key is None or isinstance(key, (str, int, float, bool)):
        return key  # json.dumps turns these into strings itself
    return to_json(key) if isinstance(key, (bytes, bytearray)) else repr(key)


# ------------------------------------------------------------------ errors


# ---------------------------------------------------------------- commands


def _await_bus(bus: str, wait: float) -> bool:
    # Checking the coordinator's lock first fails at once on a bus nobody
    # runs, where connect() would keep dialling for its whole timeout.
    deadline = time.monotonic() + wait
    while not bus_is_live(bus):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _session(
    args: argparse.Namespace,
    prog: str,
    check: Callable[[], object],
    act: Callable[[Agent, Any], int],
) -> int:
    """Check the arguments (``check`` for the command's own), parse the payload,
    join the bus, run ``act(agent, payload)``, leave; returns the exit status."""

    def fail(text: str, status: int = 1) -> int:
        print(f"{prog}: {text}", file=sys.stderr)
        return status

    try:  # bad arguments are 2 whether or not the bus runs
        validate_bus_or_agent(args.bus, "bus")
        if args.as_ is not None:
            validate_bus_or_agent(args.as_, "agent")
        check()
        payload = read_payload(args.payload, text=args.text, raw=args.raw)
    except (InvalidName, PayloadError) as e:
        return fail(str(e), 2)
    try:
        if not _await_bus(args.bus, args.wait):
            return fail(
                f"no coordinator runs bus {args.bus!r}; start one with "
                f"`shmbus coordinator --bus {args.bus}` or `shmbus run FILE`"
            )
        with connect(bus=args.bus, name=args.as_ or f"cli-{os.getpid()}") as agent:
            return act(agent, payload)
    except UnknownRecipient as e:
        return fail(f"{e}; the message is in the bus's dead-letter queue")
    except (ShmbusError, TypeError) as e:  # TypeError: a payload msgpack cannot carry
        return fail(str(e))


def run_send(args: argparse.Namespace) -> int:
    """``shmbus send``: print the message id, or with --request the response as JSON."""

    def act(agent: Agent, payload: Any) -> int:
        kw = {"priority": args.priority, "ttl": args.ttl}
        if not args.request:
            print(agent.send(args.recipient, payload, timeout=args.timeout, **kw))
            return 0
        try:
            msg = agent.request(args.recipient, payload, timeout=args.timeout, **kw)
        except RequestTimeout:
            print(
                f"shmbus send: no response from {args.recipient!r} on bus {args.bus!r} "
                f"within {args.timeout:g}s",
                file=sys.stderr,
            )
            return 1
        text = json.dumps(to_json(msg.payload))
        if msg.type == MessageType.ERROR:
            print(f"shmbus send: {args.recipient!r} answered an error: {text}", file=sys.stderr)
            return 1
        print(text)
        return 0

    return _session(
        args, "shmbus send", lambda: validate_bus_or_agent(args.recipient, "agent"), act
    )


def run_publish(args: argparse.Namespace) -> int:
    """``shmbus publish``: print the message id (a topic nobody follows is no error)."""

    def act(agent: Agent, payload: Any) -> int:
        kw = {"priority": args.priority, "ttl": args.ttl, "timeout": args.timeout}
        print(agent.publish(args.topic, payload, **kw))
        return 0

    return _session(args, "shmbus publish", lambda: validate_topic(args.topic), act)


def add_arguments(p: argparse.ArgumentParser, request: bool) -> None:
    """The options send and publish share (and --request for send)."""
    env_bus = os.environ.get("SHMBUS_BUS")
    # Optional in the usage line: $SHMBUS_BUS serves too (main() asks for one).
    p.add_argument("--bus", default=env_bus, help="the bus (default: $SHMBUS_BUS)")
    p.add_argument("--as", dest="as_", metavar="NAME", help="agent name (default: cli-PID)")
    p.add_argument("payload", metavar="PAYLOAD", help="JSON, or '-' to read it from stdin")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--text", action="store_true", help="send PAYLOAD as a string")
    kind.add_argument("--raw", action="store_true", help="send PAYLOAD (or stdin) as bytes")
    p.add_argument("--priority", type=_priority, default=0, help="0-100 (default 0)")
    p.add_argument("--ttl", type=positive_seconds, help="seconds the message stays valid")
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        help="seconds to wait for room in a full inbox"
        + (" and for the response" if request else "")
        + " (default 5)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the bus's coordinator to start (default 0)",
    )
    if request:
        p.add_argument(
            "--request",
            action="store_true",
            help="send a request; print the response's payload as JSON",
        )


def _priority(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"priority must be 0-100, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: seconds, more than 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


_priority.__name__ = "priority"  # argparse names the type in "invalid priority value: 'x'"
positive_seconds.__name__ = "seconds"
