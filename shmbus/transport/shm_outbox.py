"""An agent's sending side: routes to other agents' inboxes, and the slow paths.

A route (csrc/shmbus_send.h) is what the agent knows about one destination:
the inbox rings to write to, the names that go in every frame, the counters
to bump, and the routes-table version it was built from. The agent's fast
path is a dictionary hit and one C call; everything else (the first send to
a name, a table that moved, a full inbox, a signal, bad arguments) lands
here. Routes are rebuilt lazily whenever the coordinator's table moves.
"""

from __future__ import annotations

import array
import operator
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._native import ffi, lib
from ..core.message import FLAG_ACK, FLAG_RAW, HEADER_SIZE, _packer, encode_frame
from ..core.message import pack_payload as _pack_payload
from ..core.ring import Ring, _deadline, _left_ns
from ..core.routes import Table, subscribers, validate_topic
from ..core.stats import DROPPED, FAILED, StatsSegment
from ..errors import (
    BackpressureTimeout,
    InboxFull,
    InvalidArgument,
    MessageTooLarge,
    NotFound,
    UnknownRecipient,
    raise_for,
)

_OK = lib.SHMBUS_OK
_EINTR = lib.SHMBUS_EINTR
_ESTALE = lib.SHMBUS_ESTALE
_EINVAL = lib.SHMBUS_EINVAL
_ETOOBIG = lib.SHMBUS_ETOOBIG
_ECLOSED = lib.SHMBUS_ECLOSED  # the recipient's inbox is sealed: it left or died
_FULL = (lib.SHMBUS_EAGAIN, lib.SHMBUS_ETIMEDOUT)
_MAX_TTL = 0xFFFFFFFF / 1000
_MAX_TOPIC_ROUTES = 4096  # beyond this many distinct topics, start the cache over

DeadLetterFn = Callable[[bytes, str], None]
SentFn = Callable[[int, bytes, int], None]  # message id, payload, flags
POLICIES = ("block", "error", "drop")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise InvalidArgument(f"backpressure must be one of {POLICIES}, got {policy!r}")
    return policy


def ttl_ms(ttl: float | None) -> int:
    """A TTL in seconds as the header's milliseconds (0: none)."""
    if ttl is None:
        return 0
    if not 0 < ttl <= _MAX_TTL:
        raise InvalidArgument(f"ttl must be more than 0 and at most {_MAX_TTL:.0f} s, got {ttl}")
    return max(1, round(ttl * 1000))


def check_priority(priority: Any) -> int:
    """An int from 0 to 100 (anything int-like, as the fast path's C call takes it)."""
    try:
        value = operator.index(priority)
    except TypeError:
        value = -1
    if not 0 <= value <= 100:
        raise InvalidArgument(f"priority must be an int from 0 to 100, got {priority!r}")
    return value


def pack_many(payloads: Sequence[Any], extra_flags: int) -> tuple[bytes, Any, Any]:
    """Payloads back to back, their lengths and their flags, for one C call."""
    pack = _packer().pack
    datas = []
    flags = bytearray(len(payloads))
    for i, p in enumerate(payloads):
        if type(p) is bytes:
            datas.append(p)
            flags[i] = FLAG_RAW | extra_flags
            continue
        try:
            datas.append(pack(p))
            flags[i] = extra_flags
        except Exception:  # the full path says exactly what is wrong with it
            data, f = _pack_payload(p)
            datas.append(data)
            flags[i] = f | extra_flags
    lens = array.array("I", map(len, datas))
    return b"".join(datas), lens, flags


class Outbox:
    """Routes of one agent. ``direct`` and ``topics`` are the fast paths' caches."""

    def __init__(
        self,
        *,
        bus: str,
        name: str,
        agent_id: int,
        table: Table,
        stats: StatsSegment,
        counters: Any,
        dead_letter: DeadLetterFn,
    ) -> None:
        self.bus = bus
        self.name = name
        self._name_b = name.encode()
        self.agent_id = agent_id
        self.table = table
        self.stats = stats
        self.counters = counters
        self.dead_letter = dead_letter
        sender = lib.shmbus_sender_new(
            agent_id, self._name_b, len(self._name_b), counters, table._handle()
        )
        if sender == ffi.NULL:
            raise InvalidArgument(f"agent id {agent_id} or name {name!r} out of range")
        self.sender = ffi.gc(sender, lib.shmbus_sender_free)
        self.direct: dict[str, Any] = {}
        self.topics: dict[str, Any] = {}
        self.subscribers: dict[str, list[str]] = {}  # topic -> names, in target order
        self.peers: dict[str, Ring] = {}
        self.agents: dict[str, list[Any]] = {}
        self.subs: dict[str, list[str]] = {}
        self.version = -1
        # A receiving thread (resends, ACKs, a peer's death) and a sending
        # one may both find the table moved: one of them rebuilds the caches.
        self._lock = threading.RLock()
        self.refresh()

    # ----------------------------------------------------------- routes

    def refresh(self) -> None:
        """Read the routes table again; every route is rebuilt on its next use."""
        with self._lock:
            version, routes = self.table.read()
            routes = routes or {"agents": {}, "subs": {}}
            agents = routes["agents"]
            for peer in [p for p in self.peers if agents.get(p) != self.agents.get(p)]:
                self.peers.pop(peer).close()  # gone, or back with a new inbox
            self.agents = agents
            self.subs = routes["subs"]
            # Cleared in place: the agent's fast paths hold these very dicts.
            self.direct.clear()
            self.topics.clear()
            self.subscribers.clear()
            self.version = version

    def fresh(self) -> None:
        if self.table.version != self.version:
            with self._lock:
                if self.table.version != self.version:  # not done by another thread meanwhile
                    self.refresh()

    def target(self, name: str) -> Ring | None:
        ring = self.peers.get(name)
        if ring is None:
            with self._lock:
                ring = self.peers.get(name)
                if ring is not None:
                    return ring
                info = self.agents.get(name)
                if info is None:
                    return None
                try:
                    ring = Ring.attach(info[1], lanes=True)
                except NotFound:
                    return None  # left between the table and now
                if ring.sealed:  # leaving: the coordinator is draining it
                    ring.close()
                    return None
                self.peers[name] = ring
        return ring

    def _forget_peer(self, name: str) -> None:
        """A send found ``name``'s inbox sealed: no route may use it again."""
        with self._lock:
            ring = self.peers.pop(name, None)
            self.direct.pop(name, None)
            self.topics.clear()
            self.subscribers.clear()
        if ring is not None:
            ring.close()

    def _new_route(
        self,
        recipient: bytes,
        recipient_id: int,
        topic: bytes,
        topic_counters: Any,
        names: list[str],
    ) -> Any:
        found = [(n, self.target(n)) for n in names]
        rings = [(n, r) for n, r in found if r is not None]
        rt = lib.shmbus_route_new(
            self.sender,
            self.version,
            recipient_id,
            recipient,
            len(recipient),
            topic,
            len(topic),
            topic_counters,
            len(rings),
        )
        if rt == ffi.NULL:
            raise MemoryError("no memory for a route")
        rt = ffi.gc(rt, lib.shmbus_route_free)
        for i, (n, ring) in enumerate(rings):
            slot = self.agents[n][3] if len(self.agents[n]) > 3 else 0
            rc = lib.shmbus_route_set(rt, i, ring._handle(), self.stats.agent(slot))
            if rc == _OK and n.startswith("."):  # .history: never waited for (see publish)
                rc = lib.shmbus_route_lossy(rt, i)
            if rc != _OK:
                raise_for(rc, f"route to {n!r}")
        return rt, [n for n, _ in rings]

    def route_to(self, name: str) -> Any:
        """The route to agent ``name``; :class:`UnknownRecipient` if there is none."""
        with self._lock:  # built from one table: not refreshed under it by another thread
            self.fresh()
            rt = self.direct.get(name)
            if rt is not None:
                return rt
            info = None if name.startswith(".") else self.agents.get(name)  # .history: the bus's
            if info is None or self.target(name) is None:
                raise UnknownRecipient(f"no agent named {name!r} on bus {self.bus!r}")
            rt, _ = self._new_route(name.encode(), info[0], b"", ffi.NULL, [name])
            self.direct[name] = rt
            return rt

    def route_topic(self, topic: str) -> Any:
        """The route to every subscriber of ``topic`` (a subscriber matched twice gets it once)."""
        with self._lock:
            self.fresh()
            rt = self.topics.get(topic)
            if rt is not None:
                return rt
            validate_topic(topic)
            if len(self.topics) >= _MAX_TOPIC_ROUTES:
                self.topics.clear()
                self.subscribers.clear()
            names = subscribers(self.subs, topic)
            raw = topic.encode()
            rt, names = self._new_route(b"", 0, raw, self.stats.topic(raw), names)
            self.topics[topic] = rt
            self.subscribers[topic] = names
            return rt

    def close(self) -> None:
        self.direct.clear()
        self.topics.clear()
        for ring in self.peers.values():
            ring.close()
        self.peers.clear()

    # ------------------------------------------------------------ frames

    def frame(
        self,
        kind: int,
        data: bytes,
        flags: int,
        msg_id: int,
        *,
        recipient: str = "",
        topic: str = "",
        priority: int = 0,
        ttl: int = 0,
        request_id: int = 0,
        correlation_id: int = 0,
        attempts: int = 0,
        timestamp_ns: int | None = None,
    ) -> bytes:
        """A frame built in Python, for the DLQ or a resend: the message as it goes."""
        return encode_frame(
            kind,
            sender=self._name_b,
            recipient=recipient.encode(),
            topic=topic.encode(),
            payload=data,
            flags=flags,
            msg_id=msg_id,
            request_id=request_id,
            correlation_id=correlation_id,
            priority=priority,
            timestamp_ns=time.time_ns() if timestamp_ns is None else timestamp_ns,
            ttl_ms=ttl,
            attempts=attempts,
            sender_id=self.agent_id,
        )

    def _failed(self, n: int = 1) -> None:
        StatsSegment.add(self.counters, FAILED, n)

    def _too_big(self, data_len: int, where: str) -> MessageTooLarge:
        ring = self.peers.get(where)
        limit = ring.max_frame if ring is not None else 0
        size = HEADER_SIZE + len(self._name_b) + len(where.encode()) + data_len
        return MessageTooLarge(size, limit, f"the inbox of {where!r}")

    def _fill(self, name: str, priority: int) -> str:
        """How full the lane of ``priority`` in ``name``'s inbox is."""
        ring = self.peers.get(name)
        if ring is None:
            return "fill unknown"
        lane = ring.lane(priority)
        where = f"priority lane {ring.lanes.index(lane)}: " if len(ring.lanes) > 1 else ""
        return (
            f"{where}{lane.used} of {lane.capacity} bytes in use, "
            f"{100 * lane.used // lane.capacity}%"
        )

    def _full(self, name: str, timeout: float | None, policy: str, priority: int) -> InboxFull:
        fill = self._fill(name, priority)
        if policy == "error":
            return InboxFull(
                f"the inbox of {name!r} on bus {self.bus!r} is full ({fill}); "
                "backpressure policy 'error' does not wait"
            )
        return BackpressureTimeout(
            f"the inbox of {name!r} on bus {self.bus!r} stayed full for {timeout}s ({fill}); "
            "its reader is slow or stuck"
        )

    def _drop(self, frame: bytes, name: str, priority: int) -> None:
        StatsSegment.add(self.counters, DROPPED, 1)
        self.dead_letter(
            frame, f"inbox full: {name!r} ({self._fill(name, priority)}); policy 'drop'"
        )

    # ------------------------------------------------------------- sends

    def send(
        self,
        name: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: Any,
        ttl: Any,
        timeout: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
        policy: str = "block",
        first_rc: int = 0,
        on_sent: SentFn | None = None,
    ) -> int:
        """One direct message, the whole way (the agent's fast path did not
        finish it; ``first_rc`` is what that path's C call returned: a full
        inbox there has had its wait already). ``on_sent(id, data, flags)``
        runs once it is in the recipient's inbox (not when dead-lettered)."""
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        deadline = _deadline(timeout)
        rc = first_rc if first_rc in _FULL else 0
        if first_rc == _ECLOSED:
            self._forget_peer(name)
        while not rc:
            try:
                rt = self.route_to(name)
            except UnknownRecipient as e:
                self._failed()
                msg_id = lib.shmbus_sender_next_id(self.sender)
                frame = self.frame(
                    kind,
                    data,
                    flags,
                    msg_id,
                    recipient=name,
                    priority=priority,
                    ttl=ms,
                    request_id=request_id,
                    correlation_id=correlation_id,
                )
                self.dead_letter(frame, f"no recipient: {e}")
                raise
            rc = lib.shmbus_send_ex(
                rt,
                kind,
                flags,
                priority,
                ms,
                data,
                len(data),
                _left_ns(deadline),
                request_id,
                correlation_id,
                0,
            )
            if rc > 0:
                if on_sent is not None:
                    on_sent(int(rc), data, flags)
                return int(rc)
            if rc == _ESTALE:
                self.refresh()
                rc = 0
            elif rc == _ECLOSED:  # it left as we sent: the next look says so
                self._forget_peer(name)
                rc = 0
            elif rc == _EINTR:  # a signal: its handler ran on return; go on
                rc = 0
        if rc in _FULL and policy == "drop":
            msg_id = lib.shmbus_sender_next_id(self.sender)
            frame = self.frame(
                kind,
                data,
                flags,
                msg_id,
                recipient=name,
                priority=priority,
                ttl=ms,
                request_id=request_id,
                correlation_id=correlation_id,
            )
            self._drop(frame, name, priority)
            return int(msg_id)
        self._failed()
        if rc in _FULL:
            raise self._full(name, timeout, policy, priority)
        if rc == _ETOOBIG:
            raise self._too_big(len(data), name)
        return raise_for(rc, f"send to {name!r}")  # type: ignore[no-any-return]

    def send_many(
        self,
        name: str,
        kind: int,
        payloads: Sequence[Any],
        priority: Any,
        ttl: Any,
        requires_ack: bool,
        timeout: float | None,
        policy: str = "block",
        on_sent: SentFn | None = None,
    ) -> list[int]:
        """Messages to one recipient in one C call; ``on_sent`` as for :meth:`send`,
        for each message that reached the inbox."""
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        blob, lens, flags = pack_many(payloads, FLAG_ACK if requires_ack else 0)
        n = len(lens)
        if not n:
            return []
        deadline = _deadline(timeout)
        while True:
            try:
                rt = self.route_to(name)
            except UnknownRecipient as e:
                self._failed(n)
                for i, data in enumerate(split_blob(blob, lens)):
                    msg_id = lib.shmbus_sender_next_id(self.sender)
                    self.dead_letter(
                        self.frame(
                            kind, data, flags[i], msg_id, recipient=name, priority=priority, ttl=ms
                        ),
                        f"no recipient: {e}",
                    )
                raise
            rc = _send_many(rt, kind, priority, ms, blob, lens, flags, _left_ns(deadline))
            if rc != _ESTALE:
                break
            self.refresh()
        first = int(rc) if rc > 0 else int(lib.shmbus_route_last_id(rt))
        written = n
        if rc < 0:
            rc = self._finish(rt, 0, deadline)
            if rc != _OK:
                written = lib.shmbus_route_written(rt, 0)
        if on_sent is not None:
            for i, data in enumerate(split_blob(blob, lens)):
                if i >= written:
                    break
                on_sent(first + i, data, flags[i])
        if written == n:
            return list(range(first, first + n))
        if rc in _FULL and policy == "drop":
            for i, data in enumerate(split_blob(blob, lens)):
                if i >= written:
                    frame = self.frame(
                        kind, data, flags[i], first + i, recipient=name, priority=priority, ttl=ms
                    )
                    self._drop(frame, name, priority)
            return list(range(first, first + n))
        self._failed(n - written)
        if rc == _ECLOSED:
            self._forget_peer(name)
            for i, data in enumerate(split_blob(blob, lens)):
                if i >= written:
                    frame = self.frame(
                        kind, data, flags[i], first + i, recipient=name, priority=priority, ttl=ms
                    )
                    self.dead_letter(frame, f"recipient left: {name!r} closed its inbox")
            raise UnknownRecipient(
                f"agent {name!r} left bus {self.bus!r} during the send: {written} of {n} "
                "messages were sent, the rest are in the DLQ"
            )
        if rc in _FULL:
            err = self._full(name, timeout, policy, priority)
            err.args = (f"{err.args[0]}; {written} of {n} messages were sent",)
            raise err
        if rc == _ETOOBIG:
            raise self._too_big(max(lens), name)
        return raise_for(rc, f"send to {name!r}")  # type: ignore[no-any-return]

    def _finish(self, rt: Any, target: int, deadline: float | None) -> int:
        """After a failed send: finish target's share once signals ran; its last error."""
        rc = lib.shmbus_route_error(rt, target)
        while rc == _EINTR:
            rc = lib.shmbus_route_resume(rt, target, _left_ns(deadline))
        return rc

    def publish(
        self,
        topic: str,
        kind: int,
        blob: bytes,
        lens: Any,
        flags: Any,
        priority: Any,
        ttl: Any,
        timeout: float | None,
        rt: Any = None,
        rc: int = _ESTALE,
    ) -> int:
        """A publish (one message, or a batch) whose fast path did not finish it."""
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        deadline = _deadline(timeout)
        n = len(lens)
        while rt is None or rc in (_ESTALE, _EINVAL):  # nothing was written yet
            rt = self.route_topic(topic)
            if n == 1:
                rc = lib.shmbus_send(
                    rt, kind, flags[0], priority, ms, blob, len(blob), _left_ns(deadline)
                )
            else:
                rc = _send_many(rt, kind, priority, ms, blob, lens, flags, _left_ns(deadline))
            if rc == _ESTALE:
                self.refresh()
            elif rc == _EINVAL:
                raise InvalidArgument(f"cannot publish on {topic!r}: a field is out of range")
        first = int(rc) if rc > 0 else int(lib.shmbus_route_last_id(rt))
        if rc > 0:
            return first
        # Some subscriber did not take it all: finish after signals, and
        # dead-letter what a full inbox refused, so nothing vanishes.
        names = self.subscribers.get(topic, [])
        datas = list(split_blob(blob, lens))
        for target, name in enumerate(names):
            if name.startswith("."):
                # The coordinator's history inbox: a cache, best-effort. With
                # no coordinator to read it, it fills, and waiting for it or
                # dead-letter copies would stall every publish on its topics.
                continue
            err = self._finish(rt, target, deadline)
            if err == _OK:
                continue
            written = lib.shmbus_route_written(rt, target)
            self._failed(n - written)
            if err == _ECLOSED:
                self._forget_peer(name)
            why = {_ETOOBIG: "too large for the inbox", _ECLOSED: "recipient left"}.get(
                err, "inbox full" if err in _FULL else f"error {err}"
            )
            for i in range(written, n):
                self.dead_letter(
                    self.frame(  # the subscriber as recipient: a replay goes to it alone
                        kind,
                        datas[i],
                        flags[i],
                        first + i,
                        recipient=name,
                        topic=topic,
                        priority=priority,
                        ttl=ms,
                    ),
                    f"{why}: subscriber {name!r} of {topic!r}",
                )
        return first


def _send_many(
    rt: Any, kind: int, priority: int, ms: int, blob: bytes, lens: Any, flags: Any, ns: int
) -> int:
    """One C call for a batch: lengths and flags go as C arrays over Python's buffers."""
    return lib.shmbus_send_many(  # type: ignore[no-any-return]
        rt,
        kind,
        priority,
        ms,
        blob,
        ffi.from_buffer("uint32_t[]", lens),
        ffi.from_buffer("uint8_t[]", flags),
        len(lens),
        ns,
    )


def split_blob(blob: bytes, lens: Any) -> Any:
    """The payloads back to back in ``blob`` (``lens``: their lengths), one by one."""
    pos = 0
    for n in lens:
        yield blob[pos : pos + n]
        pos += n
