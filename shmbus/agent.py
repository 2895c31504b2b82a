"""The agent's side of the bus: send, publish, request, receive.

An agent registers with the coordinator over its control socket, owns one
inbox ring, and writes straight into other agents' inboxes: the coordinator
is never on a message's path. Routes (who is where, who listens to what) come
from the routes table in shared memory; the agent checks its version before
it routes and reloads it only when it moved.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .control import (
    ControlError,
    Reader,
    recv_msg,
    routes_name,
    send_msg,
    socket_path,
    validate_bus_or_agent,
)
from .errors import (
    Closed,
    CoordinatorUnavailable,
    CorruptFrame,
    NameTaken,
    NotFound,
    ReadTimeout,
    RecvTimeout,
    RequestTimeout,
    ShmbusError,
    UnknownRecipient,
)
from .message import (
    FLAG_ACK,
    DeadLetter,
    Message,
    MessageType,
    RoutingRule,
    decode_frame,
    encode_frame,
    encode_message,
    pack_payload,
)
from .ring import Ring
from .routes import Table, match, validate_pattern, validate_topic

__all__ = ["Agent", "connect"]

log = logging.getLogger("shmbus.agent")

DEFAULT_INBOX = 1 << 22  # 4 MiB: frames up to 512 KiB
_ERRORS = {"NameTaken": NameTaken}


def connect(
    bus: str | None = None,
    name: str | None = None,
    *,
    transport: str = "auto",
    inbox_capacity: int = DEFAULT_INBOX,
    timeout: float = 5.0,
) -> Agent:
    """Join ``bus`` as ``name``; both default to $SHMBUS_BUS and $SHMBUS_AGENT."""
    bus = bus if bus is not None else os.environ.get("SHMBUS_BUS", "default")
    name = name if name is not None else os.environ.get("SHMBUS_AGENT")
    if name is None:
        raise ValueError("give the agent a name, or set SHMBUS_AGENT")
    if transport not in ("auto", "shm"):
        raise ValueError(f"transport {transport!r} is not available yet; use 'shm'")
    return Agent(bus, name, inbox_capacity=inbox_capacity, timeout=timeout)


class Agent:
    """A member of a bus. Use :func:`connect`; close it (or use ``with``) when done."""

    def __init__(self, bus: str, name: str, *, inbox_capacity: int, timeout: float) -> None:
        self.bus = validate_bus_or_agent(bus, "bus")
        self.name = validate_bus_or_agent(name, "agent")
        self._name_b = name.encode()
        self._closed = False
        self._sock = self._dial(timeout)
        self._reader = Reader()
        self._replies: list[dict[str, Any]] = []
        try:
            reply = self._call("register", name=name, pid=os.getpid())
            self.id: int = reply["id"]
            self.inbox = Ring.create(reply["inbox"], inbox_capacity)
            self._table = Table.attach(routes_name(bus))
            self._call("activate")
        except BaseException:
            self._sock.close()
            if hasattr(self, "inbox"):
                self.inbox.__exit__(None, None, None)
            raise
        self._seq = itertools.count(1)
        self._pending: collections.deque[Message] = collections.deque()
        self._version = -1
        self._agents: dict[str, list[Any]] = {}
        self._subs: dict[str, list[str]] = {}
        self._peers: dict[str, Ring] = {}
        self._topics: dict[str, list[Ring]] = {}
        self._rules: list[tuple[RoutingRule, Callable[[Message], Any]]] = []
        self._refresh()

    # -------------------------------------------------------- control

    def _dial(self, timeout: float) -> socket.socket:
        path = str(socket_path(self.bus))
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                sock.settimeout(timeout)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise CoordinatorUnavailable(
                        f"no coordinator answers for bus {self.bus!r} at {path} ({e}); "
                        f"start one with `shmbus coordinator --bus {self.bus}`"
                    ) from None
                time.sleep(0.02)

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            send_msg(self._sock, {"op": op, **args})
            reply = recv_msg(self._sock, self._reader, self._replies)
        except (OSError, ControlError) as e:
            raise CoordinatorUnavailable(
                f"agent {self.name!r}: the coordinator of bus {self.bus!r} is gone ({e})"
            ) from None
        if not reply.get("ok"):
            cls = _ERRORS.get(reply.get("error", ""), ShmbusError)
            raise cls(reply.get("message", f"{op} refused"))
        return reply

    # --------------------------------------------------------- routes

    def _refresh(self) -> None:
        version, routes = self._table.read()
        routes = routes or {"agents": {}, "subs": {}}
        agents = routes["agents"]
        for peer in [p for p in self._peers if agents.get(p) != self._agents.get(p)]:
            self._peers.pop(peer).close()  # gone, or back with a new inbox
        self._agents = agents
        self._subs = routes["subs"]
        self._topics = {}
        self._version = version

    def _ring_for(self, name: str) -> Ring:
        if self._table.version != self._version:
            self._refresh()
        ring = self._peers.get(name)
        if ring is not None:
            return ring
        info = self._agents.get(name)
        if info is None:
            raise UnknownRecipient(f"no agent named {name!r} on bus {self.bus!r}")
        try:
            ring = Ring.attach(info[1])
        except NotFound:
            raise UnknownRecipient(f"agent {name!r} on bus {self.bus!r} has just left") from None
        self._peers[name] = ring
        return ring

    def _subscribers(self, topic: str) -> list[Ring]:
        if self._table.version != self._version:
            self._refresh()
        rings = self._topics.get(topic)
        if rings is None:
            validate_topic(topic)
            names = {n for p, members in self._subs.items() if match(p, topic) for n in members}
            rings = []
            for n in sorted(names):
                try:
                    rings.append(self._ring_for(n))
                except UnknownRecipient:
                    pass  # left between the table and now: not a subscriber any more
            self._topics[topic] = rings
        return rings

    # ---------------------------------------------------------- frames

    def _frame(
        self,
        kind: MessageType,
        payload: Any,
        *,
        recipient: str = "",
        topic: str = "",
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        request_id: int = 0,
        correlation_id: int = 0,
    ) -> tuple[int, bytes]:
        data, flags = pack_payload(payload)
        if requires_ack:
            flags |= FLAG_ACK
        msg_id = (self.id << 40) | next(self._seq)  # unique on the bus, no round trip
        frame = encode_frame(
            int(kind),
            sender=self._name_b,
            recipient=recipient.encode(),
            topic=topic.encode(),
            payload=data,
            flags=flags,
            msg_id=msg_id,
            request_id=request_id,
            correlation_id=correlation_id,
            priority=priority,
            sender_id=self.id,
            timestamp_ns=time.time_ns(),
            ttl_ms=0 if ttl is None else max(1, round(ttl * 1000)),
        )
        return msg_id, frame

    # ------------------------------------------------------------ send

    def send(
        self,
        recipient: str,
        payload: Any,
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = None,
        _kind: MessageType = MessageType.DIRECT,
        _request_id: int = 0,
        _correlation_id: int = 0,
    ) -> int:
        """Send one message to the agent ``recipient``; returns its id.

        Waits up to ``timeout`` (None: as long as it takes) while the
        recipient's inbox is full. Raises :class:`UnknownRecipient`.
        """
        msg_id, frame = self._frame(
            _kind, payload, recipient=recipient, priority=priority, ttl=ttl,
            requires_ack=requires_ack, request_id=_request_id, correlation_id=_correlation_id,
        )  # fmt: skip
        try:
            ring = self._ring_for(recipient)
        except UnknownRecipient as e:
            self._dead_letter(frame, f"no recipient: {e}")
            raise
        ring.write(frame, timeout)
        return msg_id

    def send_many(self, recipient: str, payloads: Sequence[Any], **kw: Any) -> list[int]:
        """Send several messages to one recipient in one write; returns their ids."""
        built = [self._frame(MessageType.DIRECT, p, recipient=recipient, **kw) for p in payloads]
        try:
            ring = self._ring_for(recipient)
        except UnknownRecipient as e:
            for _, frame in built:
                self._dead_letter(frame, f"no recipient: {e}")
            raise
        ring.write_many([f for _, f in built])
        return [i for i, _ in built]

    def publish(self, topic: str, payload: Any, *, priority: int = 0, ttl: float | None = None,
                timeout: float | None = None) -> int:  # fmt: skip
        """Copy a message into the inbox of every subscriber of ``topic``; returns its id."""
        rings = self._subscribers(topic)
        msg_id, frame = self._frame(
            MessageType.PUBLISH, payload, topic=topic, priority=priority, ttl=ttl
        )
        for ring in rings:
            ring.write(frame, timeout)
        return msg_id

    def publish_many(self, topic: str, payloads: Sequence[Any], **kw: Any) -> list[int]:
        rings = self._subscribers(topic)
        built = [self._frame(MessageType.PUBLISH, p, topic=topic, **kw) for p in payloads]
        frames = [f for _, f in built]
        for ring in rings:
            ring.write_many(frames)
        return [i for i, _ in built]

    def subscribe(self, pattern: str) -> None:
        """Receive what is published on topics matching ``pattern`` (``*``, ``>``)."""
        self._call("subscribe", pattern=validate_pattern(pattern))

    def unsubscribe(self, pattern: str) -> None:
        self._call("unsubscribe", pattern=validate_pattern(pattern))

    # --------------------------------------------------------- receive

    def _next(self, timeout: float | None) -> Message:
        """The next decodable message from the inbox; corrupt frames are logged and skipped."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                frame = self.inbox.read(left)
            except ReadTimeout:
                raise RecvTimeout(
                    f"agent {self.name!r}: nothing arrived within {timeout}s"
                ) from None
            try:
                return decode_frame(frame)
            except CorruptFrame as e:
                log.warning("agent %s dropped a corrupt frame: %s", self.name, e)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message, waiting up to ``timeout`` (None: forever); :class:`RecvTimeout`."""
        if self._pending:
            return self._pending.popleft()
        return self._next(timeout)

    def recv_many(self, max_count: int, timeout: float | None = None) -> list[Message]:
        """Up to ``max_count`` messages; waits only while there is none; ``[]`` on timeout."""
        out: list[Message] = []
        while self._pending and len(out) < max_count:
            out.append(self._pending.popleft())
        if len(out) < max_count:
            for frame in self.inbox.read_many(max_count - len(out), 0 if out else timeout):
                try:
                    out.append(decode_frame(frame))
                except CorruptFrame as e:
                    log.warning("agent %s dropped a corrupt frame: %s", self.name, e)
        return out

    def __iter__(self) -> Iterator[Message]:
        """Messages as they come; ends when the agent is closed."""
        while not self._closed:
            try:
                yield self.recv(timeout=0.2)
            except RecvTimeout:
                continue
            except Closed:
                return

    def request(self, recipient: str, payload: Any, timeout: float = 1.0, **kw: Any) -> Message:
        """Send a REQUEST and wait for its RESPONSE; other messages are kept for ``recv``."""
        deadline = time.monotonic() + timeout
        msg_id = self.send(recipient, payload, _kind=MessageType.REQUEST, timeout=timeout, **kw)
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self._next(max(left, 0.0))
            except RecvTimeout:
                raise RequestTimeout(
                    f"agent {self.name!r}: no response from {recipient!r} within {timeout}s"
                ) from None
            if msg.type in (MessageType.RESPONSE, MessageType.ERROR) and msg.request_id == msg_id:
                return msg
            self._pending.append(msg)

    def reply(self, msg: Message, payload: Any, **kw: Any) -> int:
        """Answer a REQUEST."""
        return self.send(
            msg.sender, payload, _kind=MessageType.RESPONSE, _request_id=msg.id,
            _correlation_id=msg.correlation_id, **kw,
        )  # fmt: skip

    # ---------------------------------------------------------- routing

    def route(self, rule: RoutingRule, handler: Callable[[Message], Any]) -> None:
        """Have ``serve()`` hand the messages ``rule`` matches to ``handler``.

        Rules run by priority, highest first; every matching handler gets
        the message. A handler's return value answers a REQUEST.
        """
        if rule.topic is not None:
            validate_pattern(rule.topic)
        self._rules.append((rule, handler))
        self._rules.sort(key=lambda rh: -rh[0].priority)  # stable: ties keep their order

    def _matches(self, rule: RoutingRule, msg: Message) -> bool:
        return (
            (rule.msg_type is None or msg.type == rule.msg_type)
            and (rule.sender is None or msg.sender == rule.sender)
            and (rule.recipient is None or msg.recipient == rule.recipient)
            and (rule.topic is None or (bool(msg.topic) and match(rule.topic, msg.topic)))
        )

    def dispatch(self, msg: Message) -> int:
        """Run the handlers whose rules match ``msg``; returns how many ran.

        A handler that raises sends the message to the DLQ with the reason;
        a message no rule matches goes there too ("no route").
        """
        ran = 0
        for rule, handler in self._rules:
            if not self._matches(rule, msg):
                continue
            ran += 1
            try:
                result = handler(msg)
            except Exception as e:  # a handler's failure must not stop the agent
                log.warning("agent %s: handler %r failed: %r", self.name, handler, e)
                self._dead_letter(encode_message(msg), f"handler failed: {type(e).__name__}: {e}")
                continue
            if result is not None and msg.type == MessageType.REQUEST:
                self.reply(msg, result)
        if not ran:
            self._dead_letter(encode_message(msg), "no route: no rule matched")
        return ran

    def serve(self, timeout: float | None = None) -> None:
        """Dispatch messages to the routed handlers until the agent is closed
        (or, with ``timeout``, until nothing arrives for that long)."""
        while not self._closed:
            try:
                msg = self.recv(timeout=0.2 if timeout is None else timeout)
            except RecvTimeout:
                if timeout is None:
                    continue
                return
            except Closed:
                return
            self.dispatch(msg)

    # -------------------------------------------------------------- DLQ

    def _dead_letter(self, frame: bytes, reason: str) -> None:
        try:
            self._call("dlq_add", frame=frame, reason=reason)
        except ShmbusError as e:  # no coordinator: say so loudly, it is a loss
            log.error("agent %s could not dead-letter a message (%s): %s", self.name, reason, e)

    def dlq(self, limit: int = 1000) -> list[DeadLetter]:
        """The newest entries of the bus's dead-letter queue, oldest first."""
        reply = self._call("dlq_list", limit=limit)
        out = []
        for entry in reply["entries"]:
            try:
                msg = decode_frame(entry["frame"])
            except CorruptFrame:
                continue
            out.append(DeadLetter(msg, entry["reason"], entry["time"]))
        return out

    # ----------------------------------------------------------- close

    def close(self) -> None:
        """Leave the bus: unregister, close every mapping, remove the inbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call("unregister")
        except ShmbusError:
            pass  # the coordinator is gone: nothing to tell
        self._sock.close()
        for ring in self._peers.values():
            ring.close()
        self._peers.clear()
        self._topics.clear()
        self._table.close()
        self.inbox.close()
        self.inbox.unlink()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Agent {self.name!r} on bus {self.bus!r}{' closed' if self._closed else ''}>"
