"""The Unix-socket transport: for agents that cannot map the bus's shared memory.

The agent registers as ever (transport "uds"); the coordinator makes its
inbox ring on its behalf and its bridge (shmbus/coordinator/bridge.py) carries the
traffic: it reads that inbox and writes the frames to this agent's data
socket, and it routes the frames this agent writes into the recipients'
inboxes. Peers write into the inbox exactly as into any other, so they see no
difference. Both directions carry records of many frames per system call
(shmbus/transport/wire.py).

What differs from shm, apart from speed: a full recipient inbox is felt as a
socket that stops taking records, so "block" raises
:class:`BackpressureTimeout` once the socket stayed full for the wait, and
"error" raises :class:`InboxFull` (or "drop" dead-letters) only when the
socket is full; a frame the bridge cannot deliver in time is dead-lettered
by the bridge, with the reason. Counters are kept by the bridge.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from .._native import ffi, lib
from ..core.control import BEAT_EVERY, Client, Reader, recv_msg, send_msg
from ..core.message import FLAG_ACK, HEADER, HEADER_SIZE, MAGIC, NOT_MESSAGES, VERSION
from ..core.ring import LANES
from ..core.routes import subscribers, validate_topic
from ..core.stats import AgentStats, BusStats, Counters, TopicStats
from ..errors import (
    BackpressureTimeout,
    Closed,
    CoordinatorUnavailable,
    InboxFull,
    InvalidArgument,
    MessageTooLarge,
    ShmbusError,
    UnknownRecipient,
)
from . import peer, wire
from .shm_outbox import check_priority, pack_many, split_blob, ttl_ms
from .stream import Full, Stream

__all__ = ["UdsLink", "open"]

log = logging.getLogger(__name__)

_LEAVE_WAIT = 10.0
ROUTES_TTL = 0.25  # seconds a uds agent trusts its copy of the routes for a direct send
_VERDICT_WAIT = 30.0  # seconds a send of policy "error" waits for the bridge's word
_SYNC_WAIT = 2.0  # seconds ``sync`` waits for the bridge to catch up
_GATHER = 256  # records a read takes together at most
_pack = HEADER.pack


class UdsInbox:
    """The agent's inbox as records from the bridge, handed to the decoder in place."""

    def __init__(self, stream: Stream, source: Any = None) -> None:
        self.stream = stream
        self.source = source or stream  # a peer.Mux when the agent takes direct links
        self._rec = memoryview(b"")
        self._lens: Any = memoryview(b"\0\0\0\0").cast("I")
        self._i = self._n = 0
        self._off = 0
        self.scratch_view: Any = b""
        self.lens_view: Any = b""

    @property
    def spin_ns(self) -> int:
        return round(self.stream.spin * 1e9)

    @spin_ns.setter
    def spin_ns(self, ns: int) -> None:
        self.stream.spin = self.source.spin = ns / 1e9

    def read_block(self, max_count: int, timeout: float | None = None) -> int:
        if self._i >= self._n:
            while True:
                body = self.source.read_record(timeout)
                if body is None:
                    return 0
                count = int.from_bytes(body[:4], "little")
                if count:
                    break
            if count < max_count:
                body, count = self._gather(body, count, max_count)
            at = 16 + 4 * count
            lens = memoryview(body)[16:at].cast("I")
            if len(lens) != count or sum(lens) != len(body) - at:
                raise Closed("the bridge sent a record whose lengths do not add up")
            self._rec, self._lens, self._off = memoryview(body), lens, at
            self._i, self._n = 0, count
        i = self._i
        k = min(max_count, self._n - i)
        self.scratch_view = self._rec[self._off :]
        self.lens_view = self._lens[i : i + k]
        self._off += sum(self.lens_view)
        self._i = i + k
        return k

    def _gather(self, body: bytes, count: int, max_count: int) -> tuple[bytes, int]:
        """More records that are here already, up to ``max_count`` frames, as
        one body: a ``recv_many`` gets what waits, as from an shm inbox, though
        each record came on its own (one message each, on a direct link)."""
        more: list[tuple[bytes, int]] = []
        total = count
        while total < max_count and len(more) < _GATHER:
            nxt = self.source.poll_record(read=False)  # a fill reads all the socket held
            if nxt is None:
                break
            n = int.from_bytes(nxt[:4], "little")
            if n:
                more.append((nxt, n))
                total += n
        if not more:
            return body, count
        for b, n in [(body, count), *more]:  # each its own: one's excess can't hide another's
            lens = memoryview(b)[16 : 16 + 4 * n].cast("I")
            if len(lens) != n or sum(lens) != len(b) - 16 - 4 * n:
                raise Closed("a peer sent a record whose lengths do not add up")
        return wire.merge([body, *(b for b, _ in more)]), total

    def _split(self, n: int) -> list[bytes]:
        out, pos = [], 0
        for length in self.lens_view[:n]:
            out.append(bytes(self.scratch_view[pos : pos + length]))
            pos += length
        return out

    def read(self, timeout: float | None = None) -> bytes:
        n = self.read_block(1, timeout)
        return bytes(self.scratch_view[: self.lens_view[0]]) if n else b""

    def close(self) -> None:
        pass


class _Peer:
    """What acks.py resends through: ``try_write`` of a whole frame, never waiting."""

    def __init__(self, out: UdsOutbox) -> None:
        self.out = out

    def lane(self, priority: int) -> _Peer:
        return self  # the bridge writes to the lane of the frame's priority

    def try_write(self, frame: bytes) -> bool:
        try:
            stream = self.out.stream
            number = stream.write(wire.record([frame], wire.info("error", 0)), 0)
        except Full:
            return False
        stream.forget(number)  # not delivered: no ACK comes, and it is resent
        return True


class UdsOutbox:
    """The sending half: frames built here, routed by the bridge. No C fast
    path (``direct`` and ``topics`` stay empty), so every send comes here."""

    def __init__(
        self, *, bus: str, name: str, agent_id: int, ctl: Client, stream: Stream, dead_letter: Any
    ) -> None:
        self.bus = bus
        self.name = name
        self._name_b = name.encode()
        self.agent_id = agent_id
        self.ctl = ctl
        self.stream = stream
        self.dead_letter = dead_letter
        self.direct: dict[str, Any] = {}
        self.topics: dict[str, Any] = {}
        self.peers: dict[str, Any] = {}
        self.agents: dict[str, list[Any]] = {}
        self.subs: dict[str, list[str]] = {}
        self.counters = ffi.NULL  # the bridge counts for us
        self._ids = threading.Lock()
        self._seq = 0
        self._id_base = agent_id << 40  # as the C sender does: unique without asking anyone
        self._refreshed = 0.0
        self._tls = threading.local()  # no_wait
        # Direct links to other uds agents (peer.py): the path to each recipient,
        # by its id, chosen at the first send to it (a link, or None: the bridge).
        self.mux: Any = None
        self.inbox: dict[str, int] = {}  # ours, for the peers we link to
        self._paths: dict[int, Any] = {}
        self._names: dict[str, tuple[bytes, bytes]] = {}  # a recipient's name, and ours + it
        self._dial_lock = threading.Lock()

    def _take(self, n: int) -> int:
        with self._ids:
            first = self._id_base | (self._seq + 1)
            self._seq += n
        return first

    def refresh(self) -> None:
        reply = self.ctl.call("routes")
        self.agents = reply["agents"]
        self.subs = reply["subs"]
        self._refreshed = time.monotonic()

    fresh = refresh  # no shared table to check: ask (peers(), a death, a resend round)

    def target(self, name: str) -> _Peer | None:
        return _Peer(self) if name in self.agents else None

    def _recipient(self, name: str) -> list[Any]:
        info = self.agents.get(name)
        if info is None or time.monotonic() - self._refreshed > ROUTES_TTL:
            self.refresh()  # it may have come (or gone) since we last asked
            info = self.agents.get(name)
        if info is None or name.startswith("."):  # .history: a subscriber, no agent
            raise UnknownRecipient(f"no agent named {name!r} on bus {self.bus!r}")
        return info

    def frames(
        self,
        kind: int,
        datas: Sequence[bytes],
        flags: Sequence[int],
        first_id: int,
        *,
        recipient: bytes = b"",
        recipient_id: int = 0,
        topic: bytes = b"",
        priority: int = 0,
        ttl: int = 0,
        request_id: int = 0,
        correlation_id: int = 0,
        attempts: int = 0,
        timestamp_ns: int | None = None,
    ) -> list[bytes]:
        names = self._name_b + recipient + topic
        sl, rl, tl = len(self._name_b), len(recipient), len(topic)
        ts = time.time_ns() if timestamp_ns is None else timestamp_ns
        me = self.agent_id
        return [
            _pack(
                MAGIC,
                VERSION,
                kind,
                priority,
                flags[i],
                attempts,
                me,
                recipient_id,
                first_id + i,
                request_id,
                correlation_id,
                ts,
                ttl,
                sl,
                rl,
                tl,
                len(data),
                0,
            )
            + names
            + data
            for i, data in enumerate(datas)
        ]

    def _record(
        self,
        kind: int,
        blob: bytes,
        lens: Any,
        flags: Any,
        first_id: int,
        *,
        recipient: bytes = b"",
        recipient_id: int = 0,
        topic: bytes = b"",
        priority: int = 0,
        ttl: int = 0,
        request_id: int = 0,
        correlation_id: int = 0,
        policy: str = "block",
        timeout: float | None = None,
    ) -> bytearray:
        """The record of these frames, built in one C call (csrc/shmbus_bridge.c)."""
        names = self._name_b + recipient + topic
        if not isinstance(lens, array.array):
            lens = array.array("I", lens)
        if not isinstance(flags, bytes | bytearray):
            flags = bytes(flags)
        n = len(lens)
        size = wire.HEAD + 4 * n + n * (HEADER_SIZE + len(names)) + len(blob)
        if size - 4 > wire.MAX_RECORD:
            raise MessageTooLarge(size - 4, wire.MAX_RECORD, "a uds record")
        out = bytearray(size)
        rc = lib.shmbus_record_build(
            names,
            len(self._name_b),
            len(recipient),
            len(topic),
            self.agent_id,
            recipient_id,
            kind,
            priority,
            ttl,
            wire.info(policy, timeout),
            first_id,
            request_id,
            correlation_id,
            0,
            blob,
            ffi.from_buffer("uint32_t[]", lens),
            ffi.from_buffer("uint8_t[]", flags),
            n,
            ffi.from_buffer(out),
            size,
        )
        if rc != size:
            raise InvalidArgument(f"a uds record could not be built: error {rc}")
        return out

    def frame(
        self,
        kind: int,
        data: bytes,
        flags: int,
        msg_id: int,
        *,
        recipient: str = "",
        topic: str = "",
        **fields: Any,
    ) -> bytes:
        """A frame built in Python, for the DLQ or a resend: the message as it goes."""
        return self.frames(
            kind,
            [data],
            [flags],
            msg_id,
            recipient=recipient.encode(),
            topic=topic.encode(),
            **fields,
        )[0]

    @contextlib.contextmanager
    def no_wait(self) -> Iterator[None]:
        """Sends of this thread in the block raise InboxFull at once when the
        socket is full, whatever their policy (which the bridge still applies):
        for an event loop, which must not wait here."""
        self._tls.no_wait = True
        try:
            yield
        finally:
            self._tls.no_wait = False

    def _link(self, name: str, info: list[Any]) -> Any:
        """The direct link that carries our messages to ``name``; None: the bridge."""
        if self.mux is None:
            return None
        link = self._paths.get(info[0], False)
        if link is False:
            with self._dial_lock:
                link = self._paths.get(info[0], False)
                if link is False:
                    link = None
                    if info[4] == "uds" and info[0] != self.agent_id:  # to itself: the bridge
                        link = self.mux.by_id.get(info[0])  # it linked to us first
                        if link is None:
                            link = peer.dial(
                                self.bus, self.name, self.agent_id, name, info, self.inbox
                            )
                            if link is not None:
                                self.mux.add(link)
                    self._paths[info[0]] = link
        if link is not None and (link.broken is not None or link.ended is not None):
            return None  # all it held is taken or dead-lettered: the bridge from now on
        return link

    def _room(
        self,
        link: Any,
        name: str,
        size: int,
        biggest: int,
        n: int,
        policy: str,
        timeout: float | None,
        frames: Any,
        lane: int,
    ) -> bool:
        """Before a record of ``n`` frames goes on a link: room for it in the
        peer's inbox, as a send through the bridge would find (raise, or
        dead-letter ``frames()`` for "drop" and say False)."""
        where = f"the inbox of {name!r}"
        if biggest > link.max_frame:
            link.count_lost(n, False)
            raise MessageTooLarge(biggest, link.max_frame, where)
        no_wait = getattr(self._tls, "no_wait", False)
        if link.room(size, timeout if policy == "block" and not no_wait else 0, lane):
            return True
        link.count_lost(n, policy == "drop")
        some = f"; 0 of {n} messages were sent" if n > 1 else ""
        held = link.stream.held(lane)
        fill = (
            f"direct link, priority lane {lane}: {held} of {link.capacity} bytes, "
            f"{min(100, held * 100 // max(link.capacity, 1))}% in use"
        )
        if policy == "drop":
            for frame in frames():
                self.dead_letter(frame, f"inbox full: {where} ({fill}); policy 'drop'")
            return False
        if policy == "error" or no_wait:
            raise InboxFull(
                f"{where} on bus {self.bus!r} is full ({fill}); backpressure "
                f"policy 'error' does not wait{some}"
            )
        raise BackpressureTimeout(
            f"{where} on bus {self.bus!r} stayed full for {timeout}s ({fill}); its reader "
            f"is slow or stuck{some}"
        )

    def _lost(self, link: Any, e: Closed) -> None:
        """A send found the link broken: the peer is gone (or leaving)."""
        self.mux.ended(link, str(e))

    def _write(
        self, data: bytearray, where: str, policy: str, timeout: float | None, link: Any = None
    ) -> bool:
        """One record (from ``_record``); False if the socket was full and the
        policy is "drop"."""
        stream = self.stream if link is None else link.stream
        full = (
            "the uds data socket is full"
            if link is None
            else "the direct link is full: its reader is behind"
        )
        if getattr(self._tls, "no_wait", False):
            try:
                stream.write(data, 0)
            except Full:
                raise InboxFull(f"{where} on bus {self.bus!r}: {full} now") from None
            return True
        try:
            number = stream.write(data, timeout if policy == "block" else 0)
        except Full:
            pass
        else:
            if policy == "error" and link is None:  # as for shm, it raises when the inbox
                # is full: ask the bridge (a link's socket is the inbox: full is full now)
                self._verdict(int.from_bytes(data[4:8], "little"), len(data), number, where)
            return True
        if policy == "drop":
            for frame in wire.frames_of(data):
                self.dead_letter(frame, f"inbox full: {where} ({full}); policy 'drop'")
            return False
        if policy == "error":
            raise InboxFull(
                f"{where} on bus {self.bus!r}: {full}; backpressure policy 'error' does not wait"
            )
        raise BackpressureTimeout(
            f"{where} on bus {self.bus!r}: {full}, for {timeout}s; its reader is slow or stuck"
        )

    def _verdict(self, n: int, size: int, number: int, where: str) -> None:
        """Raise as an shm sender would for what the bridge could not deliver
        of record ``number`` (policy "error"): the inbox was full (those
        messages are not dead-lettered: the caller has them), the recipient
        is gone, or a frame was too large (those are in the DLQ)."""
        word, done = self.stream.verdict(number, _VERDICT_WAIT)
        code, lane, pct = word & 7, word >> 3 & 3, word >> 5 & 127
        if not code:
            return
        some = f"; {done} of {n} messages were sent" if n > 1 else ""
        if code == lib.SHMBUS_DEAD_FULL:
            raise InboxFull(
                f"{where} on bus {self.bus!r} is full (priority lane {lane}: {pct}% in use); "
                f"backpressure policy 'error' does not wait{some}"
            )
        if code in (lib.SHMBUS_DEAD_NOAGENT, lib.SHMBUS_DEAD_LEFT):
            self.refresh()
            raise UnknownRecipient(
                f"{where} on bus {self.bus!r} is gone (the message is in the DLQ){some}"
            )
        if code == lib.SHMBUS_DEAD_TOOBIG:
            raise MessageTooLarge(size, 0, f"{where} (the message is in the DLQ){some}")
        raise ShmbusError(f"{where} on bus {self.bus!r} failed (the message is in the DLQ){some}")

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
        on_sent: Any = None,
    ) -> int:
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        while True:
            try:
                info = self._recipient(name)
            except UnknownRecipient as e:
                msg_id = self._take(1)
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
            link = self._link(name, info)
            try:
                return self._send(
                    link,
                    name,
                    info,
                    kind,
                    data,
                    flags,
                    priority,
                    ms,
                    timeout,
                    request_id,
                    correlation_id,
                    policy,
                    on_sent,
                )
            except Closed as e:
                if link is None:
                    raise
                self._lost(link, e)  # and again: the bridge, which knows if it is gone
                self.refresh()  # (it left, most likely: then it raises, as for shm)

    def _send(
        self,
        link: Any,
        name: str,
        info: list[Any],
        kind: int,
        data: bytes,
        flags: int,
        priority: int,
        ms: int,
        timeout: float | None,
        request_id: int,
        correlation_id: int,
        policy: str,
        on_sent: Any,
    ) -> int:
        msg_id = self._take(1)
        lane = wire.LANE_OF[priority]
        names = self._names.get(name)
        if names is None:
            if len(self._names) >= 1024:
                self._names.clear()
            names = self._names[name] = (name.encode(), self._name_b + name.encode())
        recipient = names[0]
        stream = self.stream if link is None else link.stream
        number = 0
        if link is not None:
            if link.fences:
                self._fence(link)
            size = HEADER_SIZE + len(self._name_b) + len(recipient) + len(data)
            held = link.stream.keep_bytes[lane]
            if (
                size > link.max_frame or held and held + wire.HEAD + 4 + size > link.capacity
            ) and not self._room(
                link,
                name,
                wire.HEAD + 4 + size,
                size,
                1,
                policy,
                timeout,
                lambda: [
                    self.frame(
                        kind,
                        data,
                        flags,
                        msg_id,
                        recipient=name,
                        recipient_id=info[0],
                        priority=priority,
                        ttl=ms,
                        request_id=request_id,
                        correlation_id=correlation_id,
                    )
                ],
                lane,
            ):
                return msg_id  # (the test before _room: a round trip's usual case, for 1 us)
        if type(data) is bytes:
            me = self._name_b
            number = stream.send_one(
                lane,
                names[1],
                len(me),
                len(recipient),
                0,
                self.agent_id,
                info[0],
                kind,
                priority,
                ms,
                wire.info(policy, timeout),
                msg_id,
                request_id,
                correlation_id,
                data,
                len(data),
                flags,
            )
        if number:
            if policy == "error" and link is None:
                self._verdict(1, len(data), number, f"the inbox of {name!r}")
        else:
            record = self._record(
                kind,
                data,
                array.array("I", (len(data),)),
                bytes((flags,)),
                msg_id,
                recipient=recipient,
                recipient_id=info[0],
                priority=priority,
                ttl=ms,
                request_id=request_id,
                correlation_id=correlation_id,
                policy=policy,
                timeout=timeout,
            )
            if not self._write(record, f"the inbox of {name!r}", policy, timeout, link):
                return msg_id
        if on_sent:
            on_sent(msg_id, data, flags)
        return msg_id

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
        on_sent: Any = None,
    ) -> list[int]:
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        blob, lens, flags = pack_many(payloads, FLAG_ACK if requires_ack else 0)
        n = len(lens)
        if not n:
            return []
        first = self._take(n)
        try:
            info = self._recipient(name)
        except UnknownRecipient as e:
            datas = list(split_blob(blob, lens))
            for frame in self.frames(
                kind, datas, flags, first, recipient=name.encode(), priority=priority, ttl=ms
            ):
                self.dead_letter(frame, f"no recipient: {e}")
            raise
        record = self._record(
            kind,
            blob,
            lens,
            flags,
            first,
            recipient=name.encode(),
            recipient_id=info[0],
            priority=priority,
            ttl=ms,
            policy=policy,
            timeout=timeout,
        )
        while True:
            link = self._link(name, info)
            try:
                if link is not None and link.fences:
                    self._fence(link)
                if link is not None and not self._room(
                    link,
                    name,
                    len(record),
                    max(lens) + HEADER_SIZE + len(self._name_b) + len(name.encode()),
                    n,
                    policy,
                    timeout,
                    lambda: wire.frames_of(record),
                    wire.LANE_OF[priority],
                ):
                    return list(range(first, first + n))
                written = self._write(record, f"the inbox of {name!r}", policy, timeout, link)
                break
            except Closed as e:
                if link is None:
                    raise
                self._lost(link, e)  # and again: the bridge, which knows if it is gone
                self.refresh()  # (it left, most likely: then it raises, as for shm)
                try:
                    info = self._recipient(name)
                except UnknownRecipient as e:
                    for frame in wire.frames_of(record):
                        self.dead_letter(frame, f"no recipient: {e}")
                    raise
        if written and on_sent:
            for i, data in enumerate(split_blob(blob, lens)):
                on_sent(first + i, data, flags[i])
        return list(range(first, first + n))

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
        rc: int = 0,
    ) -> int:
        priority = check_priority(priority)
        ms = ttl_ms(ttl)
        raw = validate_topic(topic).encode()
        first = self._take(len(lens))
        # A publish never raises for a full subscriber: the bridge dead-letters its copy.
        policy = "block" if timeout is None or timeout > 0 else "drop"
        record = self._record(
            kind,
            blob,
            lens,
            flags,
            first,
            topic=raw,
            priority=priority,
            ttl=ms,
            policy=policy,
            timeout=timeout,
        )
        if self.mux is not None and (self._paths or self.mux.by_id):
            self._fences(topic, priority, first + len(lens) - 1)
        self._write(record, f"the subscribers of {topic!r}", policy, timeout)
        return first

    def _fences(self, topic: str, priority: int, last_id: int) -> None:
        """A publish goes through the bridge: a subscriber we send to on a link
        must not get our next message on the link before this one (peer.py):
        a fence for it goes first."""
        lane = wire.LANE_OF[priority]
        for name in subscribers(self.subs, topic):
            info = self.agents.get(name)
            if not info:
                continue
            link = self._paths.get(info[0], False)
            if link is False:  # not chosen yet: a link it made to us is the one we would take
                link = self.mux.by_id.get(info[0])
            if link is not None:
                fences = link.fences or [0] * LANES
                fences[lane] = last_id
                link.fences = fences

    def _fence(self, link: Any) -> None:
        """Send the fence the bridge's messages left for the link, before the next record on it."""
        fences, link.fences = link.fences, None
        try:
            link.stream.write(peer.fence_record(fences), None)
        except BaseException:
            link.fences = fences
            raise

    def close(self) -> None:
        self.agents = {}


class _Beats(threading.Thread):
    """An empty record now and then while the agent sends nothing: the bridge
    stores the beat in the agent's stats slot, so a stopped process is seen hung."""

    def __init__(self, link: UdsLink) -> None:
        super().__init__(name=f"shmbus-uds-beat-{link.name}", daemon=True)
        self.link = weakref.ref(link)
        self.stream = link.stream
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(BEAT_EVERY) and self.link() is not None:
            stream = self.stream
            if time.monotonic() - stream.last_write >= BEAT_EVERY / 2:
                stream.ack()  # a beat, and our count (a sender that waits beats for us)
            link = self.link()
            if link is not None:
                link.service_links()
                del link

    def close(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(5)


class UdsLink:
    kind = "uds"
    stats_segment = None  # the bridge beats and counts for us

    def __init__(
        self, ctl: Client, bus: str, name: str, *, inbox_capacity: int, dead_letter: Any
    ) -> None:
        self.name = name
        self.ctl = ctl
        reply = ctl.call(
            "register", name=name, pid=os.getpid(), transport="uds", inbox_capacity=inbox_capacity
        )
        self.id: int = reply["id"]
        self.slot: int = reply.get("slot", 0)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(ctl.timeout)
            sock.connect(reply["data"])
            send_msg(sock, {"op": "hello", "name": name, "token": reply["token"]})
            answer = recv_msg(sock, Reader(), [])
        except OSError as e:
            sock.close()
            raise CoordinatorUnavailable(
                f"agent {name!r}: the bridge of bus {bus!r} did not take the data connection ({e})"
            ) from None
        if not answer.get("ok"):
            sock.close()
            raise CoordinatorUnavailable(
                f"agent {name!r}: the bridge refused the data connection: {answer.get('message')}"
            )
        self.stream = Stream(sock)
        self.out = UdsOutbox(
            bus=bus,
            name=name,
            agent_id=self.id,
            ctl=ctl,
            stream=self.stream,
            dead_letter=dead_letter,
        )
        self.dead_letter = dead_letter
        self.mux: Any = None
        self.listener: Any = None
        self._counts_lock = threading.Lock()
        self._sent: dict[int, list[int]] = {}  # counts of links gone, not yet told
        self._received = [0, 0]
        self._lost = [0, 0]  # failed, dropped
        # What a peer that links to us must keep within (as our inbox would).
        self._inbox = {
            "capacity": inbox_capacity,
            "max_frame": int(lib.shmbus_ring_default_max_frame(inbox_capacity)),
        }
        self.out.inbox = self._inbox
        if peer.enabled():
            self.mux = self.out.mux = peer.Mux(self.stream, self._broken)
            # A peer keeps what we have not taken within each lane's capacity:
            # twice all lanes' is more than one that does ever sends ahead.
            self.mux.limit = 2 * LANES * inbox_capacity
            try:
                self.listener = peer.Listener(peer.peer_path(bus, self.id), self._admit)
            except OSError as e:  # peers cannot reach us directly: they use the bridge
                log.warning("agent %s takes no direct links: %s", name, e)
        self.inbox = UdsInbox(self.stream, self.mux)
        self.out.refresh()
        self._beats = _Beats(self)

    # ------------------------------------------------------------ direct links

    def _admit(self, conn: socket.socket) -> None:
        """The listener's: another uds agent connects (peer.py)."""
        out = self.out

        def lookup(name: str) -> Any:
            info = out.agents.get(name)
            if info is None or info[2] != peer.peer_pid(conn):
                out.refresh()  # it may be new since we last asked
                info = out.agents.get(name)
            return info

        peer.admit(conn, self.name, lookup, self._inbox, self.mux.add, self.mux.remove)

    def _broken(self, link: Any, reason: str) -> None:
        """A link ended (the peer left or died, or broke the protocol): what
        it never took of ours goes to the DLQ; its counts are kept to tell."""
        if link.broken is not None:
            return
        link.broken = reason
        link.poll_counts(wait=True)
        self._keep_counts(link)
        # The bus's own traffic to it (ACKs) is nobody's message: as the
        # coordinator drops it from a dead inbox.
        frames = [f for f in link.stream.untaken() if f[wire.TYPE_AT] not in NOT_MESSAGES]
        why = "recipient left" if link.leaving else "recipient died"
        for frame in frames:
            # As the coordinator says of what an inbox held (and an acked
            # message's sender resends it).
            acked = len(frame) > 5 and frame[5] & FLAG_ACK
            self.dead_letter(
                frame,
                f"{why}: {link.name!r} (pid {link.pid})"
                + ("; its sender resends it" if acked else ""),
            )
        if frames:
            log.warning(
                "agent %s: %d messages to %s were never taken: in the DLQ",
                self.name,
                len(frames),
                link.name,
            )

    def _keep_counts(self, link: Any) -> None:
        sent, received, lost = link.take_counts()
        with self._counts_lock:
            self._lost[0] += lost[0]
            self._lost[1] += lost[1]
            if sent[0] or sent[1]:
                mine = self._sent.setdefault(link.id, [0, 0])
                mine[0] += sent[0]
                mine[1] += sent[1]
            self._received[0] += received[0]
            self._received[1] += received[1]

    def tell_counts(self) -> None:
        """Tell the coordinator what went over the links since last time (it
        counts what goes through the bridge itself)."""
        if self.mux is None:
            return
        for link in self.mux.links():
            self._keep_counts(link)
        with self._counts_lock:
            sent, received, lost = self._sent, self._received, self._lost
            if not sent and not received[0] and not any(lost):
                return
            self._sent, self._received, self._lost = {}, [0, 0], [0, 0]
        try:
            self.ctl.call(
                "count",
                sent=[[k, *v] for k, v in sent.items()],
                received=received,
                failed=lost[0],
                dropped=lost[1],
            )
        except ShmbusError as e:
            log.debug("agent %s could not tell its counts: %s", self.name, e)

    def service_links(self) -> None:
        """The heartbeat's: read each link's counts (a sender that never
        receives forgets what was taken, and learns of a peer gone)."""
        if self.mux is None:
            return
        for link in self.mux.links():
            link.poll_counts()
            if link.stream._told[0] != link.stream.taken:
                link.stream.ack()  # a reader that took and went quiet
            link.tell_took()
            if link.ended is not None and link.broken is None:
                self.mux.ended(link, link.ended)
        self.tell_counts()

    def sync(self) -> None:
        """Wait until the bridge has handled every record this agent wrote
        (a record of no frames, policy "error": its verdict comes after
        them), so that stats, the DLQ and history, asked for next, show them.
        Best effort: a socket full past the wait, or no word, and the call
        goes on without it."""
        stream = self.stream
        try:
            number = stream.write(wire.record([], wire.info("error", 0)), _SYNC_WAIT)
            stream.verdict(number, _SYNC_WAIT)
        except (Full, CoordinatorUnavailable, Closed):
            pass  # the call that follows says what is wrong, if anything is
        # A link whose peer left or died: what it never took goes to the DLQ
        # now, not at the next heartbeat (and the counts are told).
        self.service_links()
        self.tell_counts()

    def stats(self, bus: str) -> BusStats:
        d = self.ctl.call("stats")["stats"]
        return BusStats(
            bus=d["bus"],
            totals=Counters(**d["totals"]),
            agents={k: AgentStats(**v) for k, v in d["agents"].items()},
            topics={k: TopicStats(**v) for k, v in d["topics"].items()},
            dlq=d["dlq"],
            dlq_total=d["dlq_total"],
            dlq_evicted=d["dlq_evicted"],
            departed=Counters(**d["departed"]),
        )

    def leave(self, dead_letter: Any) -> None:
        """Before unregistering: tell the bridge our last counts, then take what the bridge had
        sent us already (to the DLQ, unread), until it closes its side."""
        self._beats.close()
        inbox = self.inbox
        self._leave_links(dead_letter)
        try:
            with contextlib.suppress(Full):  # our last counts: what we took is received
                self.stream.write(wire.record([]), _LEAVE_WAIT)
            self.stream.sock.shutdown(socket.SHUT_WR)  # the bridge routes all, then ends
            deadline = time.monotonic() + _LEAVE_WAIT
            while (left := deadline - time.monotonic()) > 0:
                n = inbox.read_block(wire.MAX_COUNT, left)
                if not n:
                    break
                for frame in inbox._split(n):
                    dead_letter(frame, "unread: its recipient closed")
        except (Closed, OSError):
            pass  # the bridge is gone: the coordinator drains the inbox

    def _leave_links(self, dead_letter: Any) -> None:
        """Take no more links, tell each peer what we took (the rest is its to
        dead-letter: it sees the link end), and dead-letter what we took and
        did not read."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.mux is None:
            return
        for link in self.mux.links():
            self.mux.remove(link)
            stream = link.stream
            link.tell_took(1.0)  # what we took out of order is ours: not the DLQ's
            with contextlib.suppress(Full, Closed, OSError):
                stream.write(wire.record([], peer.LEAVING), 1.0)  # our last counts: we leave
            link.broken = "this agent left"
            stream._stash.clear()  # not taken: their sender dead-letters them, seeing us go
            self._keep_counts(link)
            link.close()
        self.tell_counts()

    def close(self) -> None:
        self._beats.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.mux is not None:
            self.mux.close()
        self.stream.close()
        self.out.close()


open = UdsLink


# Last: peer.py builds on Stream (and this module calls it at run time only).
