"""The in-process transport, for tests: agents of one process, no coordinator.

``shmbus.connect(bus, name, transport="inproc")`` joins an in-memory bus of
this process (made on first use): a :class:`Hub` plays the coordinator
(registry, subscriptions, DLQ) and the bridge (routing), and each agent
reads its frames from a queue. The agent's side is the uds transport's
(its frames, inbox and outbox, shmbus/transport/uds.py) over a queue instead
of a socket, so code under test runs the real send and receive paths.

Not a bus for production: no backpressure (queues grow), no counters
(``stats()`` lists the agents with zeros), nothing outlives the process.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

from ..core.message import HEADER, HEADER_SIZE, MessageType
from ..core.routes import subscribers, validate_pattern
from ..core.stats import AgentStats, BusStats, Counters
from ..errors import Closed, NameTaken, ShmbusError
from . import wire
from .uds import UdsInbox, UdsOutbox

__all__ = ["Hub", "control", "open"]

_PUBLISH = int(MessageType.PUBLISH)
_HUBS: dict[str, Hub] = {}
_HUBS_LOCK = threading.Lock()


class Hub:
    """One in-memory bus: what the coordinator and its bridge do, for one process."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.lock = threading.Condition()
        self.queues: dict[str, collections.deque[bytes]] = {}
        self.ids: dict[str, int] = {}
        self.subs: dict[str, set[str]] = {}
        self.dlq: list[dict[str, Any]] = []
        self._next_id = 1

    def dead_letter(self, frame: bytes, reason: str) -> None:
        self.dlq.append(
            {"id": len(self.dlq) + 1, "time": time.time(), "reason": reason, "frame": bytes(frame)}
        )

    def deliver(self, frames: list[bytes]) -> None:
        """Route frames as the bridge does: direct to the recipient, publish to subscribers."""
        with self.lock:
            for frame in frames:
                f = HEADER.unpack_from(frame)
                kind, sl, rl, tl = f[2], f[13], f[14], f[15]
                at = HEADER_SIZE + sl
                if kind == _PUBLISH:
                    topic = bytes(frame[at + rl : at + rl + tl]).decode()
                    names = set(subscribers(self.subs, topic))
                else:
                    name = bytes(frame[at : at + rl]).decode()
                    if name not in self.queues:
                        self.dead_letter(frame, f"no recipient: no agent named {name!r}")
                        continue
                    names = {name}
                for name in sorted(names):
                    self.queues[name].append(bytes(wire.record([frame]))[4:])
            self.lock.notify_all()

    def call(self, who: list[str | None], op: str, **args: Any) -> dict[str, Any]:
        """A control request, as the coordinator answers it (``who``: the caller's name)."""
        with self.lock:
            name = who[0]
            if op == "register":
                name = args["name"]
                if name in self.queues:
                    raise NameTaken(f"agent name {name!r} is taken on bus {self.bus!r}")
                self.queues[name] = collections.deque()
                self.ids[name] = self._next_id
                self._next_id += 1
                who[0] = name
                return {"ok": True, "id": self.ids[name]}
            if name is None:
                raise ShmbusError("register first: this connection has no agent")
            if op in ("activate", "ping"):
                return {"ok": True}
            if op in ("subscribe", "unsubscribe"):
                pattern = validate_pattern(args["pattern"])
                if op == "subscribe":
                    self.subs.setdefault(pattern, set()).add(name)
                else:
                    self.subs.get(pattern, set()).discard(name)
                return {"ok": True}
            if op == "routes":
                agents = {n: [i, "", os.getpid(), 0, "inproc"] for n, i in self.ids.items()}
                subs = {p: sorted(ns) for p, ns in self.subs.items() if ns}
                return {"ok": True, "agents": agents, "subs": subs}
            if op == "dlq_add":
                self.dead_letter(args["frame"], args["reason"])
                return {"ok": True}
            if op == "dlq_list":
                return {"ok": True, "entries": self.dlq[-int(args.get("limit", 1000)) :]}
            if op == "unregister":
                self._leave(name)
                who[0] = None
                return {"ok": True}
            raise ShmbusError(f"op {op!r} is not available on the inproc transport")

    def _leave(self, name: str) -> None:
        for body in self.queues.pop(name, ()):
            count = int.from_bytes(body[:4], "little")
            lens = memoryview(body)[16 : 16 + 4 * count].cast("I")
            pos = 16 + 4 * count
            for n in lens:
                self.dead_letter(body[pos : pos + n], f"recipient left: {name!r}")
                pos += n
        self.ids.pop(name, None)
        for names in self.subs.values():
            names.discard(name)


def hub(bus: str) -> Hub:
    with _HUBS_LOCK:
        if bus not in _HUBS:
            _HUBS[bus] = Hub(bus)
        return _HUBS[bus]


class _Control:
    """What the agent calls its control connection: requests to the hub."""

    connected = True  # the hub lives as long as the process: never a rejoin
    rejoins = False
    refused = None

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.who: list[str | None] = [None]

    def call(self, op: str, *, wait: float | None = None, **args: Any) -> dict[str, Any]:
        return self.hub.call(self.who, op, **args)

    def close(self) -> None:
        if self.who[0] is not None:  # closed without unregistering: gone all the same
            self.call("unregister")


def control(bus: str, who: str) -> _Control:
    return _Control(hub(bus))


class _Queue:
    """The part of uds.Stream the agent's inbox and outbox use, over the hub's queue."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub, self.name = hub, name
        self.wlock = threading.Lock()
        self.spin = 0.0
        self.taken = self.granted = 0
        self.last_write = time.monotonic()

    def write(self, data: bytearray, wait: float | None) -> int:
        self.hub.deliver(wire.frames_of(data))
        return 0

    def send_one(self, *build: Any) -> int:
        return 0  # no socket to send on: every record comes to write

    def verdict(self, number: int, timeout: float) -> tuple[int, int]:
        return 0, 0  # the hub's queues have no limit: every send went

    def read_record(self, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.hub.lock:
            while True:
                queue = self.hub.queues.get(self.name)
                if queue is None:
                    raise Closed(f"agent {self.name!r} has left bus {self.hub.bus!r}")
                if queue:  # all that waits, as one record: as a ring read takes a block
                    self.taken += 1
                    bodies = list(queue)
                    queue.clear()
                    return wire.merge(bodies)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.hub.lock.wait(left)

    def poll_record(self, read: bool = True) -> bytes | None:
        return None  # read_record took all that waited

    def ack(self) -> bool:
        return True

    def flush(self, wait: float) -> None:
        pass

    def close(self) -> None:
        pass


class InprocLink:
    kind = "inproc"
    stats_segment = None
    slot = 0

    def __init__(
        self, ctl: _Control, bus: str, name: str, *, inbox_capacity: int, dead_letter: Any
    ) -> None:
        self.ctl = ctl
        self.id: int = ctl.call("register", name=name, pid=os.getpid())["id"]
        self.stream = _Queue(ctl.hub, name)
        self.inbox = UdsInbox(self.stream)  # type: ignore[arg-type]
        self.out = UdsOutbox(
            bus=bus,
            name=name,
            agent_id=self.id,
            ctl=ctl,  # type: ignore[arg-type]
            stream=self.stream,  # type: ignore[arg-type]  # a Stream's duck: the hub's queue
            dead_letter=dead_letter,
        )
        self.out.refresh()

    def stats(self, bus: str) -> BusStats:
        self.out.refresh()
        agents = {
            n: AgentStats(name=n, id=info[0], pid=info[2]) for n, info in self.out.agents.items()
        }
        return BusStats(
            bus=bus,
            totals=Counters(),
            agents=agents,
            topics={},
            dlq=len(self.ctl.hub.dlq),
            dlq_total=len(self.ctl.hub.dlq),
            dlq_evicted=0,
            departed=Counters(),
        )

    def sync(self) -> None:
        pass  # the hub delivers as we send

    def leave(self, dead_letter: Any) -> None:
        pass  # the hub dead-letters what is still queued when we unregister

    def close(self) -> None:
        self.out.close()


open = InprocLink
