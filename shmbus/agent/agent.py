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
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._decode import decode_block as _decode_block
from .._native import lib
from ..core.control import Client
from ..core.message import (
    FLAG_ACK,
    FLAG_RAW,
    DeadLetter,
    Message,
    MessageType,
    RoutingRule,
    decode_frame,
    decode_state,
    encode_message,
    pack_payload,
)
from ..core.paths import validate_bus_or_agent
from ..core.ring import _ns
from ..core.routes import check_keep
from ..core.stats import BusStats
from ..errors import (
    Closed,
    CorruptFrame,
    RecvTimeout,
    RequestTimeout,
    ShmbusError,
)
from ..transport import Link, Outbox, open_link
from ..transport.shm_outbox import check_policy, pack_many
from .acks import ACK_BATCH, Acks
from .letters import Letters
from .liveness import Beater
from .router import Router, error_answer, validate_pattern

__all__ = ["Agent", "connect"]

log = logging.getLogger(__name__)

DEFAULT_INBOX = 1 << 22  # 4 MiB: frames up to 512 KiB
_send = lib.shmbus_send
_send_ex = lib.shmbus_send_ex
_DIRECT = int(MessageType.DIRECT)
_PUBLISH = int(MessageType.PUBLISH)
_REQUEST = int(MessageType.REQUEST)
_RESPONSE = int(MessageType.RESPONSE)
_CONTROL = MessageType.CONTROL
_ACK = MessageType.ACK
_READ_AHEAD = 64  # frames taken from the inbox per C call when they are there
_SERVICE_AHEAD = 1024  # read-ahead the heartbeat thread leaves alone (see _service_acks)


class _AgentDefault:
    def __repr__(self) -> str:
        return "<the agent's send_timeout>"


_DEFAULT: Any = _AgentDefault()  # "timeout not given": the agent's own applies


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
    agent = Agent(bus, name, inbox_capacity=inbox_capacity, timeout=timeout, transport=transport)
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


class Agent:
    """A member of a bus. Use :func:`connect`; close it (or use ``with``) when done."""

    def __init__(
        self, bus: str, name: str, *, inbox_capacity: int, timeout: float, transport: str = "auto"
    ) -> None:
        self.bus = validate_bus_or_agent(bus, "bus")
        self.name = validate_bus_or_agent(name, "agent")
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

    # ------------------------------------------------------------ send

    def send(
        self,
        recipient: str,
        payload: Any,
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> int:
        """Send one message to the agent ``recipient``; returns its id.

        A full inbox is met with the agent's backpressure policy (see
        :func:`connect`), or ``backpressure`` and ``timeout`` (None: wait as
        long as it takes) if given. Raises :class:`UnknownRecipient` (and
        dead-letters the message) for a name nobody has.
        """
        if type(payload) is bytes:
            data, flags = payload, FLAG_RAW
        else:
            data, flags = pack_payload(payload)
        if requires_ack:
            flags |= FLAG_ACK
        rt = self._direct.get(recipient)
        if rt is not None:
            # The fast path: one C call. Anything unusual (a moved table, a
            # full inbox, a bad field, a signal) goes the whole way below.
            try:
                rc = _send(
                    rt,
                    _DIRECT,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    self._wait_ns
                    if timeout is _DEFAULT and backpressure is None
                    else self._policy(timeout, backpressure)[2],
                )
                if rc > 0:
                    if requires_ack:
                        self._track(rc, recipient, _DIRECT, data, flags, priority, ttl)
                    return rc  # type: ignore[no-any-return]
            except (TypeError, OverflowError, ValueError):
                rc = 0  # a field of the wrong type or range: the full path says which
        else:
            rc = 0
        policy, wait, _ = self._policy(timeout, backpressure)
        on_sent = self._tracker(recipient, _DIRECT, priority, ttl) if requires_ack else None
        return self._out.send(
            recipient, _DIRECT, data, flags, priority, ttl, wait, 0, 0, policy, rc, on_sent
        )

    def _tracker(
        self,
        recipient: str,
        kind: int,
        priority: Any,
        ttl: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
    ) -> Any:
        """What the outbox calls for each message that reached the inbox: wait for its ACK."""
        return lambda msg_id, data, flags: self._track(
            msg_id, recipient, kind, data, flags, priority, ttl, request_id, correlation_id
        )

    def _track(
        self,
        msg_id: int,
        recipient: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: Any,
        ttl: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
    ) -> None:
        """Wait for the ACK of ``msg_id``."""
        now = time.monotonic()
        acks = self._acks
        acks.track(
            msg_id,
            recipient,
            kind,
            data,
            flags,
            operator.index(priority),
            0 if ttl is None else max(1, round(ttl * 1000)),
            request_id,
            correlation_id,
            now,
        )
        if now >= acks.next_due:
            acks.resend_due(now)

    def send_kind(
        self,
        recipient: str,
        payload: Any,
        kind: int,
        request_id: int = 0,
        correlation_id: int = 0,
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> int:
        """A REQUEST, RESPONSE or ERROR: ``send`` with a type and the ids replies carry."""
        data, flags = pack_payload(payload)
        if requires_ack:
            flags |= FLAG_ACK
        policy, wait, ns = self._policy(timeout, backpressure)
        rc = 0
        rt = self._direct.get(recipient)
        if rt is not None:
            try:
                rc = _send_ex(
                    rt,
                    kind,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    ns,
                    request_id,
                    correlation_id,
                    0,
                )
            except (TypeError, OverflowError, ValueError):
                rc = 0
        if rc > 0:
            if requires_ack:
                self._track(
                    rc, recipient, kind, data, flags, priority, ttl, request_id, correlation_id
                )
            return rc  # type: ignore[no-any-return]
        on_sent = (
            self._tracker(recipient, kind, priority, ttl, request_id, correlation_id)
            if requires_ack
            else None
        )
        return self._out.send(
            recipient,
            kind,
            data,
            flags,
            priority,
            ttl,
            wait,
            request_id,
            correlation_id,
            policy,
            rc,
            on_sent,
        )

    @property
    def backpressure(self) -> str:
        """What a send does when the recipient's inbox is full: "block", "error" or "drop"."""
        return self._backpressure

    @backpressure.setter
    def backpressure(self, policy: str) -> None:
        self._backpressure = check_policy(policy)
        self._wait_ns = self._policy(_DEFAULT, None)[2]

    @property
    def send_timeout(self) -> float | None:
        """How long a "block" send waits for room, by default (None: forever)."""
        return self._send_timeout

    @send_timeout.setter
    def send_timeout(self, seconds: float | None) -> None:
        self._send_timeout = seconds
        self._wait_ns = self._policy(_DEFAULT, None)[2]

    def _policy(self, timeout: Any, backpressure: str | None) -> tuple[str, float | None, int]:
        """The policy, the wait in seconds and in C's nanoseconds for one send."""
        policy = self._backpressure if backpressure is None else check_policy(backpressure)
        if policy != "block":
            return policy, 0.0, 0
        wait = self._send_timeout if timeout is _DEFAULT else timeout
        return policy, wait, -1 if wait is None else _ns(wait)

    def send_many(
        self,
        recipient: str,
        payloads: Sequence[Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> list[int]:
        """Send several messages to one recipient in one C call; returns their ids.

        With "block" or "error", a full inbox raises after what fitted was
        sent (the exception says how many); with "drop" the rest is
        dead-lettered.
        """
        policy, wait, _ = self._policy(timeout, backpressure)
        on_sent = self._tracker(recipient, _DIRECT, priority, ttl) if requires_ack else None
        return self._out.send_many(
            recipient, _DIRECT, payloads, priority, ttl, requires_ack, wait, policy, on_sent
        )

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> int:
        """Copy a message into the inbox of every subscriber of ``topic``; returns its id.

        A full subscriber never holds up the others, nor makes the publish
        raise: once the backpressure policy's wait is over ("block": up to
        ``timeout``; "error" and "drop": none), its copy goes to the DLQ
        ("inbox full").
        """
        if type(payload) is bytes:
            data, flags = payload, FLAG_RAW
        else:
            data, flags = pack_payload(payload)
        rt = self._topics.get(topic)
        rc = lib.SHMBUS_ESTALE
        if rt is not None:
            try:
                ns = (
                    self._wait_ns
                    if timeout is _DEFAULT and backpressure is None
                    else self._policy(timeout, backpressure)[2]
                )
                rc = _send(
                    rt,
                    _PUBLISH,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    ns,
                )
                if rc > 0:
                    return rc  # type: ignore[no-any-return]
            except (TypeError, OverflowError, ValueError):
                rt = None
        _, wait, _ = self._policy(timeout, backpressure)
        return self._out.publish(
            topic, _PUBLISH, data, [len(data)], bytes((flags,)), priority, ttl, wait, rt, rc
        )

    def publish_many(
        self,
        topic: str,
        payloads: Sequence[Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> list[int]:
        """Publish several messages on ``topic`` in one C call; returns their ids."""
        if not payloads:
            return []
        blob, lens, flags = pack_many(payloads, 0)
        _, wait, _ = self._policy(timeout, backpressure)
        first = self._out.publish(topic, _PUBLISH, blob, lens, flags, priority, ttl, wait)
        return list(range(first, first + len(lens)))

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

    # --------------------------------------------------------- receive

    def _fill(self, max_count: int, timeout: float | None) -> bool:
        """Decode up to ``max_count`` frames from the inbox into ``_ahead``, in
        one read and one C decode; corrupt frames are logged and skipped.
        False if nothing arrived within ``timeout``."""
        if self._to_ack:
            self._flush_acks()  # before a wait: what was handed over is acked now
        if self._events:
            self._run_events()
        with self._reading:  # the heartbeat thread's _service_acks reads too
            return self._read_ahead(max_count, timeout, self._bus_event)

    def _service_acks(self) -> None:
        """From the heartbeat thread: an agent that only sends still takes in
        its ACKs and resends what falls due, though it never calls a
        receiving method. Only while none runs (they do this themselves), and
        not past a backlog the application has yet to receive: the inbox then
        fills and its senders feel it, as they should."""
        acks = getattr(self, "_acks", None)  # None: still connecting
        if acks is None or not acks.pending or len(self._ahead) >= _SERVICE_AHEAD:
            return
        if not self._reading.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._read_ahead(_READ_AHEAD, 0, self._events.append)
        finally:
            self._reading.release()
        acks.resend_due(time.monotonic())

    def _run_events(self) -> None:
        """Notices the heartbeat thread read: their callbacks run here, in the
        receiving thread, as documented."""
        while self._events:
            self._bus_event(self._events.popleft())

    def _read_ahead(
        self, max_count: int, timeout: float | None, on_event: Callable[[Any], Any]
    ) -> bool:
        inbox = self.inbox
        n = inbox.read_block(max_count, timeout)
        if n > 0:
            try:
                items = _decode_block(inbox.scratch_view, inbox.lens_view, n, self._decode_state)
            except BaseException:
                # No memory, or Ctrl-C inside a payload's decoding: the frames
                # are off the ring already, so keep what decodes, then raise.
                self._salvage(inbox._split(n))
                raise
        elif n < 0:  # one frame larger than the scratch, copied once from the ring
            try:
                items = [decode_frame(inbox.read(0))]
            except CorruptFrame as e:
                items = [str(e)]
        else:
            return False
        ahead = self._ahead
        for item in items:
            if type(item) is str:
                log.warning("agent %s dropped a corrupt frame: %s", self.name, item)
            elif item.type is _ACK:  # for our sending side, not for recv
                ids = item.payload
                for msg_id in ids if isinstance(ids, list) else (item.request_id,):
                    self._acks.acked(msg_id)
            elif item.type is _CONTROL and not item.sender:
                on_event(item.payload)  # from the coordinator: not for recv
            else:
                ahead.append(item)
        return True

    def on_peer_death(self, callback: Callable[[str], Any]) -> None:
        """Call ``callback(name)`` when another agent of the bus dies (its
        process ends without leaving). It runs in the thread that receives,
        from inside ``recv`` and the other receiving calls."""
        self._death_callbacks.append(callback)

    def on_peer_hung(self, callback: Callable[[str, bool], Any]) -> None:
        """Call ``callback(name, True)`` when another agent stops beating (the
        coordinator's ``--heartbeat-timeout``: a stopped or wedged process),
        and ``callback(name, False)`` when it beats again. Runs like
        :meth:`on_peer_death`'s callbacks."""
        self._hung_callbacks.append(callback)

    def _bus_event(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("agent"), str):
            return  # noise: nothing for us
        kind, name = event.get("event"), event["agent"]
        if kind == "peer_died":
            self._out.fresh()  # its routes are gone already: drop our cached ones
            calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
            calls = [(cb, (name,)) for cb in self._death_callbacks]
        elif kind in ("peer_hung", "peer_resumed"):
            calls = [(cb, (name, kind == "peer_hung")) for cb in self._hung_callbacks]
        else:
            return  # a newer coordinator's event
        for callback, args in calls:
            try:
                callback(*args)
            except Exception as e:  # a callback's failure must not stop the agent
                log.warning("agent %s: %s callback %r failed: %r", self.name, kind, callback, e)

    def _salvage(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self._ahead.append(decode_frame(frame))
            except Exception as e:  # CorruptFrame, or whatever failed the block
                log.warning("agent %s dropped a frame it could not decode: %s", self.name, e)

    def _next(self, timeout: float | None) -> Message:
        """The next message from the inbox, read ahead: what is already there
        comes in one C call, and a reader that keeps up gets one frame a call.
        Resends of unacknowledged messages fall due while it waits."""
        ahead = self._ahead
        if ahead:
            return ahead.popleft()
        acks = self._acks
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            wait = left
            if acks.pending:  # wake for the next resend
                due = max(acks.next_due - time.monotonic(), 0.0)
                wait = due if wait is None else min(wait, due)
            got = self._fill(_READ_AHEAD, wait)
            if acks.pending:
                acks.resend_due(time.monotonic())
            if ahead:
                return ahead.popleft()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 and not got:
                    raise RecvTimeout(f"agent {self.name!r}: nothing arrived within {timeout}s")
                left = max(left, 0.0)

    def _accept(self, msg: Message) -> bool:
        """May ``msg`` be handed over? Not past its TTL (to the DLQ), nor a
        copy of an acknowledged message handed over before (acked again)."""
        if msg.ttl is not None and self._expired(msg):
            return False
        if msg.requires_ack and not self._acks.first_time(msg.id):
            self._ack(msg)  # our first ACK may have been lost: the sender resent
            return False
        return True

    def _ack(self, msg: Message) -> None:
        """Acknowledge ``msg``: gathered per sender, sent ``ACK_BATCH`` at a time
        or before this agent waits (whichever first), so one ACK message
        carries many."""
        ids = self._to_ack.get(msg.sender)
        if ids is None:
            ids = self._to_ack[msg.sender] = []
        ids.append(msg.id)
        if len(ids) >= ACK_BATCH or not self._ahead:
            self._flush_acks()

    def _flush_acks(self) -> None:
        to_ack, self._to_ack = self._to_ack, {}
        for sender, ids in to_ack.items():
            try:
                self.send_kind(sender, ids, int(_ACK), ids[0], timeout=0, backpressure="error")
            except ShmbusError as e:  # gone, or its inbox full: it resends, we ack the copy
                log.info(
                    "agent %s could not ack %d messages to %s: %s", self.name, len(ids), sender, e
                )

    def _expired(self, msg: Message) -> bool:
        """Is ``msg`` past its TTL? Then it goes to the DLQ, never to the caller."""
        now = time.time()
        if now <= msg.timestamp + msg.ttl:
            return False
        late = now - msg.timestamp - msg.ttl
        self._dead_letter(
            encode_message(msg), f"expired: ttl {msg.ttl}s ran out {late:.3f}s before delivery"
        )
        return True

    def _receive(self, timeout: float | None) -> Message:
        """The next message to hand over (not acked yet)."""
        deadline = None
        while True:
            if self._kept:
                msg = self._kept.popleft()
            elif self._ahead:
                msg = self._ahead.popleft()
            else:
                left = timeout if deadline is None else max(deadline - time.monotonic(), 0.0)
                msg = self._next(left)
            if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                return msg
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout

    def recv(self, timeout: float | None = None) -> Message:
        """The next message, waiting up to ``timeout`` (None: forever); :class:`RecvTimeout`.

        A message past its TTL is never handed over: it goes to the DLQ
        ("expired"). One sent with ``requires_ack`` is acknowledged as it is
        handed over, and handed over once however often it was resent.
        """
        ahead = self._ahead
        if ahead and not self._kept:  # the common case, with no call deeper
            msg = ahead.popleft()
            if msg.ttl is None and not msg.requires_ack:
                return msg
            ahead.appendleft(msg)  # the full path decides
        msg = self._receive(timeout)
        if msg.requires_ack:
            self._ack(msg)
        return msg

    def recv_many(self, max_count: int, timeout: float | None = None) -> list[Message]:
        """Up to ``max_count`` messages; waits only while there is none; ``[]`` on timeout."""
        out: list[Message] = []
        for queue in (self._kept, self._ahead):
            while queue and len(out) < max_count:
                msg = queue.popleft()
                if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                    out.append(msg)
        if len(out) < max_count:
            deadline = None if timeout is None else time.monotonic() + timeout
            left = 0 if out else timeout
            while self._fill(max_count - len(out), left):
                ahead = self._ahead
                while ahead and len(out) < max_count:
                    msg = ahead.popleft()
                    if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                        out.append(msg)
                if out or deadline is None and left == 0:
                    break
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if self._acks.pending:
            self._acks.resend_due(time.monotonic())
        for msg in out:
            if msg.requires_ack:
                self._ack(msg)
        if self._to_ack:
            self._flush_acks()
        return out

    def wait_acked(self, timeout: float | None = None) -> bool:
        """Receive (and resend) until every message sent with ``requires_ack``
        is acknowledged or dead-lettered; False if some are still out after
        ``timeout``. Other messages that arrive meanwhile stay for ``recv``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        acks = self._acks
        while acks.pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = max(acks.next_due - now, 0.0)
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._fill(_READ_AHEAD, wait)
            acks.resend_due(time.monotonic())
        return True

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
        msg_id = self.send_kind(recipient, payload, _REQUEST, timeout=timeout, **kw)
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
