"""``shmbus dlq list|replay|purge``: a live bus's dead-letter queue from the shell.

``list`` and ``purge`` only talk to the coordinator over its control socket
(they do not join the bus). ``replay`` joins it as an agent (``cli-dlq-PID``
unless ``--as`` names it) and sends every entry again:

- DIRECT with ``Agent.send`` to its recipient, PUBLISH with
  ``Agent.publish`` on its topic (every subscriber now gets it); both come
  from the replaying agent.
- Any other type (REQUEST, RESPONSE, ERROR, ...), and a PUBLISH copy that
  names its subscriber, as the frame it was, original sender and ids kept,
  written straight into the recipient's inbox.

A replayed message gets a new timestamp, so its TTL counts from the replay.
An entry whose recipient is not on the bus (or whose topic nobody follows),
or whose recipient's inbox stays full past ``--timeout``, stays in the DLQ and
is reported; the others are removed once sent.

Exit status: 0 when everything asked for was done; 1 when some entry stayed
or was not found, or the bus does not run; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from ..agent.agent import Agent, connect
from ..core.control import Client
from ..core.message import Message, MessageType, decode_frame, encode_message
from ..core.paths import bus_is_live, find_segments, validate_bus_or_agent
from ..core.ring import Ring
from ..core.routes import Table, match
from ..errors import (
    CorruptFrame,
    InvalidName,
    NotFound,
    RingFull,
    RingSealed,
    ShmbusError,
    UnknownRecipient,
)
from .report import add_verbose
from .send import positive_seconds, to_json

__all__ = ["Control", "add_parser", "run"]

_PAGE = 500  # entries asked for per dlq_list call


class Control(Client):
    """A control connection that does not register an agent: for DLQ requests."""

    def __init__(self, bus: str, timeout: float = 10.0) -> None:
        super().__init__(bus, timeout, hint=" (it reloads the DLQ)")

    def entries(self, ids: list[int] | None = None) -> Iterator[dict[str, Any]]:
        """Entries oldest first: those with ``ids``, or all there are now (not
        those added while this runs, which may be a replay's own)."""
        if ids:
            for start in range(0, len(ids), _PAGE):
                chunk = ids[start : start + _PAGE]
                reply = self.call("dlq_list", ids=chunk, limit=len(chunk))
                for missing in reply["missing"]:
                    yield {"id": missing, "missing": True}
                yield from reply["entries"]
            return
        after, end = 0, None
        while True:
            reply = self.call("dlq_list", after=after, limit=_PAGE)
            end = reply["next_id"] if end is None else end
            for entry in reply["entries"]:
                if entry["id"] >= end:
                    return
                yield entry
                after = entry["id"]
            if not reply["more"]:
                return


# ------------------------------------------------------------------ list


def describe(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as JSON can hold it: the message's fields, the payload converted."""
    out: dict[str, Any] = {"id": entry["id"], "time": entry["time"], "reason": entry["reason"]}
    try:
        msg = decode_frame(entry["frame"])
    except CorruptFrame as e:
        out["error"] = str(e)
        out["frame"] = base64.b64encode(entry["frame"]).decode("ascii")
        return out
    out.update(
        type=msg.type.name,
        sender=msg.sender,
        recipient=msg.recipient,
        topic=msg.topic,
        message_id=msg.id,
        request_id=msg.request_id,
        priority=msg.priority,
        attempts=msg.attempts,
        requires_ack=msg.requires_ack,
        ttl=msg.ttl,
        timestamp=msg.timestamp,
        payload=to_json(msg.payload),
    )
    return out


def _summary(payload: Any, width: int = 60) -> str:
    if isinstance(payload, bytes):
        return f"<{len(payload)} bytes>"
    if hasattr(payload, "shape") and hasattr(payload, "dtype"):
        return f"<array {payload.dtype} {tuple(payload.shape)}>"
    text = json.dumps(to_json(payload))
    return text if len(text) <= width else text[: width - 3] + "..."


def _line(entry: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(entry["time"]).strftime("%Y-%m-%d %H:%M:%S")
    head = f"{entry['id']:>6}  {when}"
    try:
        msg = decode_frame(entry["frame"])
    except CorruptFrame as e:
        return f"{head}  (corrupt frame: {e})  {entry['reason']}"
    to = msg.recipient or f"topic {msg.topic}"
    if msg.type == MessageType.PUBLISH and msg.recipient:
        to = f"{msg.recipient} (topic {msg.topic})"
    return (
        f"{head}  {msg.type.name:<8} {msg.sender} -> {to}  [{entry['reason']}]  "
        f"{_summary(msg.payload)}"
    )


def run_list(ctl: Control, as_json: bool, limit: int | None) -> int:
    if limit is not None:
        entries: Any = ctl.call("dlq_list", limit=limit)["entries"]
    else:
        entries = ctl.entries()
    count = 0
    for entry in entries:
        count += 1
        print(json.dumps(describe(entry)) if as_json else _line(entry))
    if not as_json:
        info = ctl.call("dlq_list", limit=0)
        print(
            f"{info['size']} in the DLQ of bus {ctl.bus!r}"
            + (f", {count} shown" if count != info["size"] else "")
            + f" ({info['added']} dead-lettered in all, {info['evicted']} evicted)"
            + (
                "; kept in memory only, gone when its coordinator stops"
                if info.get("store") == "memory"
                else ""
            )
        )
    return 0


# ---------------------------------------------------------------- replay


def replay_one(agent: Agent, routes: dict[str, Any], msg: Message, timeout: float) -> str | None:
    """Send one dead letter again; None when it went, else why it stays.

    Raises :class:`UnknownRecipient` when the recipient left since ``routes``
    was read (``Agent.send`` has then dead-lettered it again).
    """
    agents = routes.get("agents", {})
    if msg.type == MessageType.PUBLISH and not msg.recipient:
        if not any(match(p, msg.topic) for p in routes.get("subs", {})):
            return f"nobody subscribes to {msg.topic!r} now"
        agent.publish(msg.topic, msg.payload, priority=msg.priority, ttl=msg.ttl, timeout=timeout)
        return None
    if not msg.recipient or msg.recipient not in agents:
        return f"no agent named {msg.recipient!r} is on the bus now"
    if msg.type == MessageType.DIRECT:
        agent.send(
            msg.recipient,
            msg.payload,
            priority=msg.priority,
            ttl=msg.ttl,
            requires_ack=msg.requires_ack,
            timeout=timeout,
        )
        return None
    try:
        with Ring.attach(agents[msg.recipient][1], lanes=True) as inbox:
            inbox.lane(msg.priority).write(
                encode_message(msg._replace(timestamp=time.time())), timeout=timeout
            )
    except (NotFound, RingSealed):
        return f"agent {msg.recipient!r} left the bus"
    return None


def run_replay(ctl: Control, ids: list[int], name: str, timeout: float) -> int:
    replayed = kept = 0
    with connect(bus=ctl.bus, name=name) as agent, Table.attach(find_segments(ctl.bus)[0]) as table:
        for entry in ctl.entries(ids):
            n = entry["id"]
            if entry.get("missing"):
                print(f"{n}: not in the DLQ", file=sys.stderr)
                kept += 1
                continue
            try:
                msg = decode_frame(entry["frame"])
            except CorruptFrame as e:
                why: str | None = f"its frame is corrupt ({e})"
            else:
                try:
                    why = replay_one(agent, table.read()[1] or {}, msg, timeout)
                except UnknownRecipient:
                    ctl.call("dlq_remove", ids=[n])  # the send dead-lettered a new copy
                    print(f"{n}: {msg.recipient!r} left the bus; dead-lettered again")
                    kept += 1
                    continue
                except RingFull:
                    where = msg.recipient or msg.topic
                    why = f"the inbox of {where!r} stayed full for {timeout:g}s"
                except (ShmbusError, TypeError, ValueError) as e:
                    why = f"{type(e).__name__}: {e}"
            if why is not None:
                print(f"{n}: kept: {why}", file=sys.stderr)
                kept += 1
                continue
            # One at a time: if this command dies half-way, at most one entry
            # was sent and is still listed.
            ctl.call("dlq_remove", ids=[n])
            replayed += 1
            print(f"{n}: replayed {msg.type.name} to {msg.recipient or msg.topic}")
    print(f"replayed {replayed}, kept {kept}")
    return 1 if kept else 0


# ----------------------------------------------------------------- purge


def run_purge(ctl: Control, ids: list[int]) -> int:
    if not ids:
        print(f"purged {ctl.call('dlq_purge')['purged']} entries")
        return 0
    reply = ctl.call("dlq_remove", ids=ids)
    print(f"purged {len(reply['removed'])} entries")
    if reply["missing"]:
        print(f"not in the DLQ: {' '.join(map(str, reply['missing']))}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------ main


def add_parser(sub: Any) -> None:
    """``shmbus dlq`` and its three commands, on the ``shmbus`` parser's subparsers."""
    p = sub.add_parser("dlq", help="list, replay or purge a live bus's dead-letter queue")
    cmds = p.add_subparsers(dest="dlq_command", required=True)
    env_bus = os.environ.get("SHMBUS_BUS")

    def common(q: argparse.ArgumentParser) -> None:
        # Optional in the usage line: $SHMBUS_BUS serves too (main() asks for one).
        q.add_argument("--bus", default=env_bus, help="the bus (default: $SHMBUS_BUS)")
        add_verbose(q)

    q = cmds.add_parser("list", help="print the entries, oldest first")
    common(q)
    q.add_argument("--json", action="store_true", help="one JSON object per entry and line")
    q.add_argument("--limit", type=int, metavar="N", help="only the newest N entries")
    q = cmds.add_parser("replay", help="send entries again; remove those sent")
    common(q)
    q.add_argument("ids", nargs="*", type=int, metavar="ID", help="entries (default: all)")
    q.add_argument("--as", dest="as_", metavar="NAME", help="agent name (default: cli-dlq-PID)")
    q.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        help="seconds to wait for room in a full inbox (default 5)",
    )
    q = cmds.add_parser("purge", help="remove entries for good")
    common(q)
    q.add_argument("ids", nargs="*", type=int, metavar="ID", help="entries (default: all)")


def run(args: argparse.Namespace) -> int:
    prog = f"shmbus dlq {args.dlq_command}"
    try:
        validate_bus_or_agent(args.bus, "bus")
        name = args.as_ if getattr(args, "as_", None) else f"cli-dlq-{os.getpid()}"
        validate_bus_or_agent(name, "agent")
    except InvalidName as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not bus_is_live(args.bus):
        print(
            f"{prog}: no coordinator runs bus {args.bus!r}; start one with "
            f"`shmbus coordinator --bus {args.bus}` (it reloads the DLQ from its file)",
            file=sys.stderr,
        )
        return 1
    try:
        with Control(args.bus) as ctl:
            if args.dlq_command == "list":
                return run_list(ctl, args.json, args.limit)
            if args.dlq_command == "replay":
                return run_replay(ctl, args.ids, name, args.timeout)
            return run_purge(ctl, args.ids)
    except ShmbusError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
