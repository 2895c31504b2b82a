"""The agent's side of the bus: send, publish, request, receive.

An agent registers with the coordinator over its control socket, owns one
inbox ring, and writes straight into other agents' inboxes: the coordinator
is never on a message's path. Routes (who is where, who listens to what) come
from the routes table in shared memory; the agent checks its version before
it routes and reloads it only when it moved.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..core.control import Client
from ..core.message import (
    DeadLetter,
    Message,
    MessageType,
    PayloadPacker,
    RoutingRule,
    decode_frame,
    decode_state,
    encode_message,
)
from ..core.paths import validate_bus_or_agent
from ..core.ring import _ns
from ..core.routes import check_keep, validate_pattern
from ..core.stats import BusStats
from ..errors import (
    Closed,
    CorruptFrame,
    RecvTimeout,
    RequestTimeout,
    ShmbusError,
)
from ..transport import Link, Outbox, open_link
from ..transport.shm_outbox import check_policy
from .acks import Acks
from .letters import Letters
from .liveness import Beater
from .receiver import Receiver
from .router import Router, error_answer
from .sender import Sender

__all__ = ["Agent", "connect"]

log = logging.getLogger(__name__)

DEFAULT_INBOX = 1 << 22  # 4 MiB: frames up to 512 KiB
_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)


def connect(
    bus: str | None = None,
    name: str | None = None,
    *,
    transport: str = "auto",
    inbox_capacity: int = DEFAULT_INBOX,
    spin: float | None = None,
    backpressure: str = "block",
    send_timeout: float | None = 30.0,
    ack_timeout: float = 1.0,
    max_attempts: int = 3,
    timeout: float = 5.0,
    default: Callable[[Any], Any] | None = None,
) -> Agent:
    """Join ``bus`` as ``name``; both default to $SHMBUS_BUS and $SHMBUS_AGENT.

    ``backpressure`` says what a send does when the recipient's inbox is
    full: "block" waits (with growing backoff, no busy core) up to
    ``send_timeout`` seconds (None: forever), then raises
    :class:`BackpressureTimeout`; "error" raises :class:`InboxFull` at once;
    "drop" dead-letters the message ("inbox full") and returns its id. Each
    send may override both.

    ``transport`` is "shm" (shared memory), "uds" (a Unix socket to the
    coordinator's bridge, for a process that cannot map shared memory) or
    "auto": shm, falling back to uds (logged) when the shared memory cannot be
    created or mapped; $SHMBUS_TRANSPORT overrides "auto".

    A message sent with ``requires_ack=True`` is sent again (same id,
    ``attempts + 1``) when no ACK came within ``ack_timeout`` seconds, up to
    ``max_attempts`` sends in all, then dead-lettered ("retries exhausted");
    its recipient hands it over once, however many copies arrive.

    ``default``, as in ``json.dumps(default=)``: a function that gets each
    object of a payload msgpack cannot carry and returns one it can (a dict, a
    str, ...), sent in its place; it raises TypeError for what it cannot
    convert. Without it such a payload raises TypeError naming the type.
    """
    if not ack_timeout > 0 or max_attempts < 1:
        raise ValueError("ack_timeout must be > 0 and max_attempts at least 1")
    check_policy(backpressure)
    if send_timeout is not None and not send_timeout >= 0:
        raise ValueError(f"send_timeout is seconds (or None), got {send_timeout}")
    bus = bus if bus is not None else os.environ.get("SHMBUS_BUS", "default")
    name = name if name is not None else os.environ.get("SHMBUS_AGENT")
    if name is None:
        raise ValueError("give the agent a name, or set SHMBUS_AGENT")
    agent = Agent(
        bus,
        name,
        inbox_capacity=inbox_capacity,
        timeout=timeout,
        transport=transport,
        default=default,
    )
    agent.backpressure = backpressure
    agent.send_timeout = send_timeout
    agent._acks.timeout = ack_timeout
    agent._acks.max_attempts = max_attempts
    if spin is None and "SHMBUS_SPIN_US" in os.environ:
        spin = float(os.environ["SHMBUS_SPIN_US"]) / 1e6
    if spin is not None:
        if not 0 <= spin <= 1:
            agent.close()
            raise ValueError(f"spin is in seconds, from 0 to 1; got {spin}")
        agent.inbox.spin_ns = round(spin * 1e9)
    return agent


class Agent(Sender, Receiver):
    """A member of a bus. Use :func:`connect`; close it (or use ``with``) when done."""

    def __init__(
        self,
        bus: str,
        name: str,
        *,
        inbox_capacity: int,
        timeout: float,
        transport: str = "auto",
        default: Callable[[Any], Any] | None = None,
    ) -> None:
        self.bus = validate_bus_or_agent(bus, "bus")
        self.name = validate_bus_or_agent(name, "agent")
        # connect's default=: only an agent given one packs with it (Sender._repack).
        self._payload_packer = None if default is None else PayloadPacker(default)
        self._name_b = name.encode()
        self._closed = False
        self._subscriptions: set[str] = set()  # told again to a coordinator that takes over
        self._reading = threading.Lock()  # the inbox has one reader at a time
        self._events: collections.deque[Any] = collections.deque()  # see _service_acks
        # False while an event loop reads the inbox (shmbus.aio): the heartbeat
        # thread's read would take messages no wake-up tells the loop of.
        self.acks_on_beat = True
        # Dead letters made while no coordinator runs, sent once one took over.
        self._letters = Letters(
            self.name, lambda *a, **kw: self._ctl.call(*a, **kw), lambda: self._ctl.connected
        )
        self._dlq_kept = self._letters.kept  # (the same deque: read on close and rejoin)
        self._ctl, self._link = open_link(
            transport,
            bus,
            name,
            lambda: Client(bus, timeout, wait=timeout, who=f"agent {name!r}: "),
            inbox_capacity=inbox_capacity,
            dead_letter=self._dead_letter,
        )
        try:
            self.id: int = self._link.id
            self._slot: int = self._link.slot
            self.inbox = self._link.inbox
            self._out = self._link.out
            self._beater = Beater(
                self.name,
                self._link.stats_segment,
                self._link.slot,
                weakref.WeakMethod(self._on_beat),
            )
            self._call("activate")
        except BaseException:
            if hasattr(self, "_beater"):
                self._beater.close()
            self._ctl.close()
            self._link.close()
            raise
        # The fast paths' caches: the outbox fills them and clears them in place.
        self._direct = self._out.direct
        self._topics = self._out.topics
        self._decode_state = decode_state()
        self._ahead: collections.deque[Message] = collections.deque()  # read ahead, in order
        self._kept: collections.deque[Message] = collections.deque()  # set aside by request()
        self.router = Router(name, self._dead_letter)  # serve()'s rules, shared with aio
        self._death_callbacks: list[Callable[[str], Any]] = []
        self._hung_callbacks: list[Callable[[str, bool], Any]] = []
        self._acks = Acks(self._out, 1.0, 3)
        self._to_ack: dict[str, list[int]] = {}
        self._backpressure = "block"
        self._send_timeout: float | None = 30.0
        self._wait_ns = _ns(30.0)
        # From now on, a new coordinator takes us back. Not a uds agent: its
        # messages went through the bridge, which died with the coordinator.
        self._ctl.rejoins = self._link.kind == "shm"

    # -------------------------------------------------------- control

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        return self._ctl.call(op, **args)

    def _on_beat(self, backoff: float) -> float:
        """The heartbeat thread's round: rejoin a new coordinator if ours is
        gone, then take in ACKs and resend what is due; the wait before the
        next try to rejoin (0: none)."""
        try:
            backoff = self._keep_connected(backoff)
        except Exception as e:  # never let the beats stop
            log.error("agent %s: rejoining the bus failed: %r", self.name, e)
        try:
            if self.acks_on_beat:
                self._service_acks()
        except Exception as e:
            log.error("agent %s: taking in ACKs failed: %r", self.name, e)
        return backoff

    def _keep_connected(self, backoff: float) -> float:
        """The heartbeat thread's look at the control connection; returns the
        wait before the next try to rejoin (0: connected, or given up)."""
        ctl = self._ctl
        if self._closed or not ctl.rejoins or ctl.refused:
            return 0.0
        if ctl.connected:
            if ctl.check():
                if self._dlq_kept:
                    self._flush_dead_letters()
                return 0.0
            log.warning(
                "agent %s: the coordinator of bus %r is gone; sending over the routes "
                "known until a new one takes over",
                self.name,
                self.bus,
            )
            return 0.05
        try:
            if not ctl.rejoin(self._hello):
                return min(max(backoff, 0.025) * 2, 1.0)
        except ShmbusError as e:
            log.error("agent %s could not rejoin bus %r: %s", self.name, self.bus, e)
            return 0.0
        log.warning("agent %s rejoined bus %r under a new coordinator", self.name, self.bus)
        self._flush_dead_letters()
        return 0.0

    def _hello(self) -> dict[str, Any]:
        """The rejoin request: who we are, and what we listen to."""
        return {
            "op": "rejoin",
            "name": self.name,
            "id": self.id,
            "pid": os.getpid(),
            "inbox": self.inbox.name,
            "slot": self._slot,
            "subs": sorted(self._subscriptions),
        }

    def subscribe(self, pattern: str) -> None:
        """Receive what is published on topics matching ``pattern`` (``*``, ``>``).

        While the coordinator is gone, waits for a new one to take over (up
        to the agent's ``timeout``), then raises :class:`CoordinatorUnavailable`."""
        # Noted first: a rejoin that comes between the call and its reply
        # must tell the new coordinator.
        pattern = validate_pattern(pattern)
        known = pattern in self._subscriptions
        self._subscriptions.add(pattern)
        try:
            self._call("subscribe", pattern=pattern)
        except ShmbusError:
            if not known:
                self._subscriptions.discard(pattern)
            raise

    def unsubscribe(self, pattern: str) -> None:
        pattern = validate_pattern(pattern)
        self._call("unsubscribe", pattern=pattern)
        self._subscriptions.discard(pattern)

    # --------------------------------------------------------- history

    def keep_history(self, pattern: str, n: int) -> None:
        """Have the coordinator keep the last ``n`` messages published on
        ``pattern`` from now on (0: stop, and forget them), for every agent
        of the bus; see :meth:`history`. Kept in the coordinator's memory: a
        restarted coordinator keeps only its ``--history`` patterns, empty."""
        check_keep(pattern, n)
        self._call("keep_history", pattern=pattern, n=n)

    def history(self, pattern: str, n: int | None = None) -> list[Message]:
        """The kept messages whose topic matches ``pattern`` (a kept pattern,
        or any topic or pattern), oldest first; the last ``n`` of them (None:
        all). Everything published before this call is in it, as far as it
        is kept; ``[]`` when nothing is."""
        validate_pattern(pattern)
        if n is not None:
            check_keep(pattern, n, stop=False)
        out = []
        self._link.sync()  # a uds agent's publishes are the bridge's to keep first
        reply = self._call("history", pattern=pattern, n=n)
        while True:
            for frame in reply["frames"]:
                try:
                    out.append(decode_frame(frame))
                except CorruptFrame as e:
                    log.warning("agent %s: a kept frame does not decode: %s", self.name, e)
            if reply.get("next") is None:
                return out
            reply = self._call("history", pattern=pattern, start=reply["next"], end=reply["end"])

    def request(
        self,
        recipient: str,
        payload: Any,
        timeout: float = 1.0,
        *,
        wait_for_recipient: bool = False,
        **kw: Any,
    ) -> Message:
        """Send a REQUEST and wait for its RESPONSE; other messages are kept for ``recv``.

        ``timeout`` bounds the whole call. A ``recipient`` not on the bus
        raises :class:`UnknownRecipient` at once, or, with
        ``wait_for_recipient=True``, is waited for within ``timeout`` (an
        agent still starting up)."""
        deadline = time.monotonic() + timeout
        msg_id = self.send_kind(
            recipient,
            payload,
            _REQUEST,
            timeout=timeout,
            wait_for_recipient=wait_for_recipient,
            **kw,
        )
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self._next(max(left, 0.0))
            except RecvTimeout:
                raise RequestTimeout(
                    f"agent {self.name!r}: no response from {recipient!r} within {timeout}s"
                ) from None
            if msg.type in (MessageType.RESPONSE, MessageType.ERROR) and msg.request_id == msg_id:
                if not ((msg.ttl is None and not msg.requires_ack) or self._accept(msg)):
                    continue
                if msg.requires_ack:
                    self._ack(msg)
                return msg
            self._kept.append(msg)  # recv checks it as it hands it over

    def reply(self, msg: Message, payload: Any, **kw: Any) -> int:
        """Answer a REQUEST."""
        return self.send_kind(msg.sender, payload, _RESPONSE, msg.id, msg.correlation_id, **kw)

    # ---------------------------------------------------------- routing

    def route(self, rule: RoutingRule, handler: Callable[[Message], Any]) -> None:
        """Have ``serve()`` hand the messages ``rule`` matches to ``handler``.

        Rules run by priority, highest first; every matching handler gets
        the message. A handler's return value answers a REQUEST.
        """
        self.router.add(rule, handler)

    def dispatch(self, msg: Message) -> int:
        """Run the handlers whose rules match ``msg``; returns how many ran.

        A handler that raises sends the message to the DLQ with the reason;
        a message no rule matches goes there too ("no route").
        """
        handlers = self.router.handlers(msg)
        for handler in handlers:
            try:
                result = handler(msg)
            except Exception as e:  # a handler's failure must not stop the agent
                self.router.failed(msg, handler, e)
                if msg.type == MessageType.REQUEST:
                    self._answer_error(msg, e)
                continue
            if result is not None and msg.type == MessageType.REQUEST:
                self.reply(msg, result)
        if not handlers:
            self.router.unrouted(msg)
        return len(handlers)

    def _answer_error(self, msg: Message, error: Exception) -> None:
        """Tell a requester its request failed, rather than leave it to time out."""
        try:
            self.send_error(msg, error)
        except ShmbusError as e:  # the requester left: the DLQ entry is what remains
            log.info("agent %s could not answer %s with an error: %s", self.name, msg.sender, e)

    def send_error(self, msg: Message, error: Exception, **kw: Any) -> int:
        """Answer the REQUEST ``msg`` with an ERROR naming ``error`` (``kw`` as for send)."""
        return self.send_kind(
            msg.sender,
            error_answer(error),
            int(MessageType.ERROR),
            msg.id,
            msg.correlation_id,
            **kw,
        )

    def serve(self, timeout: float | None = None) -> None:
        """Dispatch messages to the routed handlers until the agent is closed
        (or, with ``timeout``, until nothing arrives for that long)."""
        while not self._closed:
            try:
                msg = self._receive(0.2 if timeout is None else timeout)
            except RecvTimeout:
                if timeout is None:
                    continue
                return
            except Closed:
                return
            self.dispatch(msg)
            if msg.requires_ack:  # once the handlers are done with it
                self._ack(msg)

    # -------------------------------------------------------------- DLQ

    def _dead_letter(self, frame: bytes, reason: str) -> None:
        """To the coordinator's DLQ; kept while there is none (see letters.py)."""
        self._letters.add(frame, reason)

    def _flush_dead_letters(self) -> None:
        """Hand the dead letters kept while no coordinator ran to the DLQ."""
        self._letters.flush()

    def dlq(self, limit: int = 1000) -> list[DeadLetter]:
        """The newest entries of the bus's dead-letter queue, oldest first."""
        self._link.sync()  # what the bridge could not deliver of ours is in it
        reply = self._call("dlq_list", limit=limit)
        out = []
        for entry in reply["entries"]:
            try:
                msg = decode_frame(entry["frame"])
            except CorruptFrame:
                continue
            out.append(DeadLetter(msg, entry["reason"], entry["time"], entry.get("id", 0)))
        return out

    # ------------------------------------------------ for the asyncio mirror
    # The named hooks shmbus.aio builds on, as pyzmq's asyncio layer uses named
    # hooks of its sync socket: not for applications.

    @property
    def link(self) -> Link:
        """This agent's transport (its ``kind``, ``inbox``, ``out`` and ``stats``)."""
        return self._link

    @property
    def outbox(self) -> Outbox:
        """The sending half of the transport."""
        return self._out

    @property
    def acks(self) -> Acks:
        """What this agent sent with ``requires_ack`` and waits for."""
        return self._acks

    def expired(self, msg: Message) -> bool:
        """Is ``msg`` past its TTL? Then it is dead-lettered ("expired")."""
        return self._expired(msg)

    def give_back(self, msgs: Sequence[Message]) -> None:
        """Messages read but not handed over, first in line for the next ``recv``."""
        self._kept.extendleft(reversed(msgs))

    def dead_letter(self, frame: bytes, reason: str) -> None:
        """``frame`` to the DLQ with ``reason`` (kept while no coordinator runs)."""
        self._dead_letter(frame, reason)

    def service_acks(self) -> None:
        """Take in ACKs and resend what is due, as the heartbeat thread does."""
        self._service_acks()

    # ------------------------------------------------------------ stats

    def peers(self) -> list[str]:
        """The agents on the bus now (this one included), from the routes table."""
        self._out.fresh()
        return sorted(n for n in self._out.agents if not n.startswith("."))  # .history: the bus's

    def stats(self) -> BusStats:
        """Every counter of the bus now, read from shared memory (no coordinator
        call; a uds agent asks the coordinator, once the bridge has handled
        what it sent)."""
        self._link.sync()
        return self._link.stats(self.bus)

    # ----------------------------------------------------------- close

    def close(self) -> None:
        """Leave the bus: unregister, close every mapping, remove the inbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._to_ack:
            self._flush_acks()
        # Read from the inbox but never handed over: the DLQ has them, and the
        # coordinator moves what is still in the inbox there when we go.
        for msg in [*self._kept, *self._ahead]:
            self._dead_letter(encode_message(msg), "unread: its recipient closed")
        self._kept.clear()
        self._ahead.clear()
        self._link.leave(self._dead_letter)
        if self._dlq_kept:
            self._flush_dead_letters()
        if self._dlq_kept:
            log.error(
                "agent %s closes with %d dead letters no coordinator took: lost",
                self.name,
                len(self._dlq_kept),
            )
        try:
            self._ctl.call("unregister", wait=0)
        except ShmbusError:
            pass  # the coordinator is gone: nothing to tell
        self._ctl.close()
        self._beater.close()  # it writes to the stats mapping: done before that goes
        self._link.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Agent {self.name!r} on bus {self.bus!r}{' closed' if self._closed else ''}>"
