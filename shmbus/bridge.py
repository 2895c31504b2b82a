"""The coordinator's bridge: carries the traffic of agents on the uds transport.

A uds agent cannot map the bus's shared memory, so the coordinator makes its
inbox ring on its behalf, and this bridge moves its frames, with two threads
per agent so that neither a slow agent nor a full inbox ever stalls the
coordinator's control loop or another agent:

- *down*: reads the agent's inbox (highest lane first, as any reader) and
  writes the frames to its data socket, a block of them per record. A slow
  reader fills its socket, then its inbox: its senders feel backpressure as
  for any other agent.
- *up*: reads records from the data socket, checks every length and header
  field (the peer is untrusted), and writes each frame into its recipient's
  inbox lane (a publish: into every subscriber's, per the routes table),
  grouped per destination, one ``write_many`` each. It counts in the stats
  segment on the agent's behalf, and dead-letters, with the reason, what it
  cannot deliver.

A peer that sends a malformed or oversized record is disconnected with the
reason logged, and the coordinator then drops the agent as dead. DLQ entries
and such deaths are handed to the coordinator's loop (``pump``), the only
thread that touches its registry and DLQ.

The data socket is ``data.sock`` next to the control socket; a connection
opens with a hello naming the agent and the token its registration got.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._native import ffi, lib
from .control import ControlError, Reader, data_socket_path, encode, routes_name
from .errors import MessageTooLarge, ShmbusError
from .message import HEADER, HEADER_SIZE, MAGIC, VERSION, MessageType
from .ring import DEFAULT_SPIN_NS, Ring, _ns
from .routes import Table, match
from .stats import (
    BYTES_RECEIVED,
    DROPPED,
    FAILED,
    RECEIVED,
    RETRIED,
    SENT,
    StatsSegment,
)
from .transport import wire

__all__ = ["Bridge", "data_path"]

log = logging.getLogger("shmbus.bridge")

_SPIN = DEFAULT_SPIN_NS / 1e9  # seconds an up thread polls before it sleeps
_NUMPY_FROM = 16  # frames in a record from which it is checked with numpy
_SLICE = 0.1  # seconds: how often a waiting thread looks whether it must stop
_HELLO_WAIT = 5.0
_SOCKBUF = 4 << 20
_MASK = wire.MASK
_COUNTS = wire.COUNTS.unpack_from
_BYTES_SENT: int = lib.SHMBUS_STAT_BYTES_SENT
_DELIVERED: int = lib.SHMBUS_STAT_DELIVERED
_DELIVERED_BYTES: int = lib.SHMBUS_STAT_DELIVERED_BYTES
_PUBLISHED: int = lib.SHMBUS_STAT_PUBLISHED
_TOPIC_DELIVERED: int = lib.SHMBUS_STAT_TOPIC_DELIVERED
_TOPIC_BYTES: int = lib.SHMBUS_STAT_TOPIC_BYTES
_PUBLISH = int(MessageType.PUBLISH)
_ACK = int(MessageType.ACK)
_TYPE_AT: int = wire.HEADER_DTYPE.fields["type"][1]  # its offset in a frame header
_TYPES = frozenset(int(t) for t in MessageType)
_DIRECT_TYPES = _TYPES - {_PUBLISH}
_unpack = HEADER.unpack_from


def data_path(bus: str) -> str:
    return str(data_socket_path(bus))


class BadPeer(Exception):
    """What a uds peer sent breaks the format: the connection goes."""


@dataclass
class _Expected:
    name: str
    id: int
    token: str
    inbox: str
    slot: int


class _Routes:
    """One thread's view of the routes table, and the inboxes it writes to."""

    def __init__(self, bus: str) -> None:
        self.table = Table.attach(routes_name(bus))
        self.version = -1
        self.agents: dict[str, list[Any]] = {}
        self.subs: dict[str, list[str]] = {}
        self.rings: dict[str, Ring] = {}
        self.subscribers: dict[str, list[str]] = {}

    def fresh(self) -> None:
        if self.table.version == self.version:
            return
        self.version, routes = self.table.read()
        routes = routes or {"agents": {}, "subs": {}}
        agents = routes["agents"]
        for name in [n for n in self.rings if agents.get(n) != self.agents.get(n)]:
            self.rings.pop(name).close()
        self.agents, self.subs = agents, routes["subs"]
        self.subscribers.clear()

    def ring(self, name: str) -> Ring | None:
        ring = self.rings.get(name)
        if ring is None and name in self.agents:
            try:
                ring = self.rings[name] = Ring.attach(self.agents[name][1], lanes=True)
            except ShmbusError:
                return None
        return ring

    def of_topic(self, topic: str) -> list[str]:
        names = self.subscribers.get(topic)
        if names is None:
            if len(self.subscribers) > 4096:
                self.subscribers.clear()
            names = sorted({n for p, ns in self.subs.items() if match(p, topic) for n in ns})
            self.subscribers[topic] = names
        return names

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.table.close()


class _Link:
    """One uds agent's two threads."""

    def __init__(self, bridge: Bridge, who: _Expected, sock: socket.socket) -> None:
        self.bridge = bridge
        self.who = who
        self.name_b = who.name.encode()
        self.sock = sock
        self.stop = threading.Event()  # the coordinator dropped the agent
        self.eof = threading.Event()  # the agent finished writing: down may end
        self.counts = (0, 0)  # records the agent took and asked for (up writes, down reads)
        self.counted = threading.Event()  # they moved while down waited for them
        self.starved = False
        self.lost: list[bytes] = []  # frames sent that it never took, for the DLQ
        stats = bridge.stats
        self.counters = stats.agent(who.slot)
        self.beat_at = stats.heartbeat(who.slot)
        self.up = threading.Thread(target=self._up, name=f"shmbus-bridge-up-{who.name}",
                                   daemon=True)  # fmt: skip
        self.down = threading.Thread(target=self._down, name=f"shmbus-bridge-down-{who.name}",
                                     daemon=True)  # fmt: skip
        self.up.start()
        self.down.start()

    def _beat(self) -> None:
        if self.beat_at:
            lib.shmbus_stats_set(self.beat_at, 0, time.monotonic_ns())

    def _fail(self, reason: str) -> None:
        """The agent broke the protocol, or its socket broke: it is dead to the bus."""
        if not self.stop.is_set():
            self.bridge.events.put(("kill", self.who.name, reason))
            self.bridge.wake()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _dead_letter(self, frame: bytes, reason: str) -> None:
        self.bridge.events.put(("dlq", self.who.name, frame, reason))
        self.bridge.wake()

    # ---------------------------------------------------------- down

    def _down(self) -> None:
        """Inbox -> socket. Records stay here until the agent counts them
        taken: what a dying agent never took goes to the DLQ, as what is
        left in its inbox does."""
        try:
            inbox = Ring.attach(self.who.inbox, lanes=True)
        except ShmbusError as e:
            self._fail(f"its inbox is gone: {e}")
            return
        if self.counters:
            lib.shmbus_ring_count_reads(
                inbox._handle(), self.counters + RECEIVED, self.counters + BYTES_RECEIVED
            )
        head = wire.RECORD.pack
        sent: collections.deque[tuple[int, bytes]] = collections.deque()  # not taken yet
        seq = 0  # records sent
        try:
            while not self.stop.is_set() and not self.eof.is_set():
                taken, granted = self.counts
                while sent and (taken - sent[0][0]) & _MASK < 1 << 31:
                    sent.popleft()
                if (granted - seq) & _MASK == 0 or (granted - seq) & _MASK >= 1 << 31:
                    self.counted.clear()  # not asked for more: the backlog waits in the lanes
                    self.starved = True
                    if self.counts[1] == granted:
                        self.counted.wait(_SLICE)
                    self.starved = False
                    continue
                n = inbox.read_block(256, _SLICE)
                if n > 0:
                    lens = bytes(inbox.lens_view[: 4 * n])
                    size = sum(memoryview(lens).cast("I"))
                    data = b"".join((head(16 + 4 * n + size, n, 0, 0, 0), lens,
                                     inbox.scratch_view[:size]))  # fmt: skip
                elif n < 0:
                    data = bytes(wire.record([inbox.read(0)]))
                else:
                    continue
                seq = (seq + 1) & _MASK
                sent.append((seq, data))
                if not self._send(data):
                    break
            if self.eof.is_set():  # it left: it dead-lettered what it had not read
                sent.clear()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)  # the agent reads to here, then goes
        finally:
            taken = self.counts[0]
            for s, data in sent:
                if (taken - s) & _MASK >= 1 << 31:  # never taken: for the DLQ, in order
                    self.lost.extend(_frames_of(data))
            lib.shmbus_ring_count_reads(inbox._handle(), ffi.NULL, ffi.NULL)
            inbox.close()

    def _send(self, data: bytes) -> bool:
        view = memoryview(data)
        off = 0
        while off < len(data):
            if self.stop.is_set():
                return False
            try:
                off += self.sock.send(view[off:])
            except TimeoutError:
                continue
            except OSError as e:
                self._fail(f"its data connection broke: {e}")
                return False
        return True

    # ------------------------------------------------------------ up

    def _up(self) -> None:
        """Socket -> inboxes."""
        routes = _Routes(self.bridge.bus)
        reader = _RecordReader(self.sock)
        try:
            while not self.stop.is_set():
                try:
                    bodies = reader.ready(self.stop)
                except BadPeer as e:
                    log.warning("uds agent %s disconnected: %s", self.who.name, e)
                    self._fail(str(e))
                    return
                except OSError as e:
                    self._fail(f"its data connection broke: {e}")
                    return
                if not bodies:  # the agent finished writing (it leaves), or stop
                    self.eof.set()
                    return
                self._beat()
                counts = _COUNTS(bodies[-1], 8)
                if counts != self.counts:
                    self.counts = counts
                    if self.starved:  # wake it only if it waits for this (a GIL handover)
                        self.counted.set()
                routes.fresh()
                # Small records that came together (sends one at a time) are routed
                # together: one write_many per destination for all of them, in order.
                small: list[Any] = []
                small_word = -1
                for body in bodies:
                    word = int.from_bytes(body[4:8], "little")
                    try:
                        policy, wait = wire.policy_of(word)
                        block = self._check_many(body)
                        frames = self._check(body) if block is None else []
                    except (BadPeer, KeyError, UnicodeDecodeError) as e:
                        log.warning("uds agent %s disconnected: %s", self.who.name, e)
                        self._fail(str(e))
                        return
                    if small and (block is not None or word != small_word):
                        self._route(routes, small, *wire.policy_of(small_word))
                        small = []
                    if block is not None:
                        self._route_many(routes, body, *block, policy, wait)
                    elif frames:
                        small += frames
                        small_word = word
                if small:
                    self._route(routes, small, *wire.policy_of(small_word))
        finally:
            routes.close()

    def _check_many(self, body: bytes) -> tuple[Any, ...] | None:
        """A record of many frames to one place (a send_many, a publish_many),
        checked in a few numpy calls: (frame lengths, type, priority, recipient
        or topic, resent frames); None when it is not one of those, for ``_check``."""
        count = int.from_bytes(body[0:4], "little")
        at = 16 + 4 * count
        if count < _NUMPY_FROM or count > wire.MAX_COUNT or at > len(body):
            return None
        buf = np.frombuffer(body, np.uint8)
        lens = np.frombuffer(body, "<u4", count, 16)
        if int(lens.sum(dtype=np.int64)) != len(body) - at or int(lens.min()) < HEADER_SIZE:
            return None  # _check says what is wrong
        same = int(lens[0]) if (lens == lens[0]).all() else 0  # frames all of one size?
        offs = None if same else wire.offsets(at, lens)
        hdr = (wire.strided(body, at, count, same, wire.HEADER_DTYPE) if same
               else wire.headers(buf, offs))  # fmt: skip
        kind, priority = int(hdr["type"][0]), int(hdr["priority"][0])
        rl, tl = int(hdr["recipient_len"][0]), int(hdr["topic_len"][0])
        slen = len(self.name_b)
        uniform = (
            (hdr["magic"] == MAGIC).all() and (hdr["version"] == VERSION).all()
            and (hdr["type"] == kind).all() and (hdr["priority"] == priority).all()
            and (hdr["sender_len"] == slen).all() and (hdr["sender_id"] == self.who.id).all()
            and (hdr["recipient_len"] == rl).all() and (hdr["topic_len"] == tl).all()
            and (HEADER_SIZE + slen + rl + tl + hdr["payload_len"].astype(np.int64) == lens).all()
            and kind in _TYPES and priority <= 100
            and ((kind == _PUBLISH and tl and not rl) or (kind != _PUBLISH and rl))
        )  # fmt: skip
        if not uniform:
            return None
        width = slen + rl + tl
        names = (wire.strided(body, at + HEADER_SIZE, count, same, np.uint8, width) if same
                 else buf[offs[:, None] + HEADER_SIZE + np.arange(width)])  # fmt: skip
        if (names != names[0]).any() or bytes(names[0, :slen]) != self.name_b:
            return None
        where = bytes(names[0, slen + rl :] if kind == _PUBLISH else names[0, slen:]).decode()
        return lens, kind, priority, where, int(np.count_nonzero(hdr["attempts"]))

    def _check(self, body: bytes) -> list[tuple[Any, ...]]:
        """Every frame of a record, each (view, type, priority, recipient or
        topic, attempts), checked field by field before any is used."""
        count = int.from_bytes(body[0:4], "little")
        if count > wire.MAX_COUNT:
            raise BadPeer(f"a record of {count} frames (limit {wire.MAX_COUNT})")
        at = 16 + 4 * count
        if at > len(body):
            raise BadPeer(f"a record of {count} frames has no room for their lengths")
        view = memoryview(body)
        lens = view[16:at].cast("I")
        if sum(lens) != len(body) - at:
            raise BadPeer("a record whose frame lengths do not add up to its size")
        me, my_id, slen = self.name_b, self.who.id, len(self.name_b)
        out = []
        pos = at
        for length in lens:
            if length < HEADER_SIZE:
                raise BadPeer(f"a frame of {length} bytes, shorter than its header")
            (magic, version, kind, priority, _flags, attempts, sender_id, _rid, _id, _req, _corr,
             _ts, _ttl, sl, rl, tl, plen, _res) = _unpack(body, pos)  # fmt: skip
            if magic != MAGIC or version != VERSION:
                raise BadPeer(f"a frame with magic {magic:#x} version {version}: not a frame")
            if kind not in _TYPES or priority > 100:
                raise BadPeer(f"a frame of type {kind} priority {priority}")
            if HEADER_SIZE + sl + rl + tl + plen != length:
                raise BadPeer("a frame whose field lengths do not add up to its size")
            names = pos + HEADER_SIZE
            if sl != slen or sender_id != my_id or body[names : names + sl] != me:
                raise BadPeer("a frame that names another sender")
            if kind == _PUBLISH:
                if not tl or rl:
                    raise BadPeer("a publish without a topic, or with a recipient")
                where = bytes(view[names + sl + rl : names + sl + rl + tl]).decode()
            else:
                if not rl:
                    raise BadPeer("a direct frame without a recipient")
                where = bytes(view[names + sl : names + sl + rl]).decode()
            out.append((view[pos : pos + length], kind, priority, where, attempts))
            pos += length
        return out

    def _route(self, routes: _Routes, frames: list[tuple[Any, ...]], policy: str,
               wait: float | None) -> None:  # fmt: skip
        """Group per destination lane, keeping the order within each (as a
        reader sees it); one write_many per group."""
        lanes: dict[tuple[str, int], tuple[Ring, list[Any]]] = {}
        counters = self.counters
        for view, kind, priority, where, attempts in frames:
            if attempts:
                StatsSegment.add(counters, RETRIED)
            for name, ring, topic in self._targets(routes, kind, where, 1, len(view),
                                                   lambda view=view: [bytes(view)]):  # fmt: skip
                lane = ring.lane(priority)
                key = (name, id(lane))
                if key not in lanes:
                    lanes[key] = (lane, [])
                lanes[key][1].append((view, topic))
        for (name, _), (lane, items) in lanes.items():
            self._write(routes, name, lane, items, policy, wait)

    def _targets(self, routes: _Routes, kind: int, where: str, n: int, size: int,
                 frames: Any) -> Iterator[tuple[str, Ring, str | None]]:  # fmt: skip
        """(name, inbox, topic) of each recipient of ``n`` frames (``size``
        bytes) sent to ``where``: a topic's subscribers for a publish, else
        the agent. ``frames()`` gives them, to dead-letter for any who is not
        (or no longer) on the bus."""
        counters = self.counters
        if kind == _PUBLISH:
            topic_counters = self.bridge.stats.topic(where.encode())
            StatsSegment.add(topic_counters, _PUBLISHED, n)
            StatsSegment.add(topic_counters, _TOPIC_BYTES, size)
            names, topic = routes.of_topic(where), where
        elif where not in routes.agents:
            StatsSegment.add(counters, FAILED, n)
            for frame in frames():
                self._dead_letter(frame, f"no recipient: no agent named {where!r} on bus "
                                  f"{self.bridge.bus!r}")  # fmt: skip
            return
        else:
            names, topic = [where], None
        for name in names:
            ring = routes.ring(name)
            if ring is None:
                StatsSegment.add(counters, FAILED, n)
                for frame in frames():
                    self._dead_letter(frame, f"no recipient: {name!r} left the bus")
                continue
            yield name, ring, topic

    def _given_up(self, name: str, lane: Ring, policy: str, wait: float | None,
                  deadline: float | None) -> str | None:  # fmt: skip
        """Why a write to a full lane stops now (the dead letter's reason), or
        None while the policy still waits for room."""
        if (
            policy == "block"
            and not self.stop.is_set()
            and (deadline is None or time.monotonic() < deadline)
        ):
            return None
        return ("inbox full" + (f" for {wait}s" if policy == "block" else "")
                + f": {name!r} ({lane.used} of {lane.capacity} bytes in use); "
                f"policy {policy!r}")  # fmt: skip

    def _write(self, routes: _Routes, name: str, lane: Ring, items: list[Any], policy: str,
               wait: float | None) -> None:  # fmt: skip
        views = [v for v, _ in items]
        deadline = None if wait is None or policy != "block" else time.monotonic() + wait
        done = 0
        while True:
            left = 0.0 if policy != "block" else _SLICE
            if deadline is not None:
                left = max(min(left, deadline - time.monotonic()), 0.0)
            try:
                done += lane.write_many(views[done:], left)
            except MessageTooLarge:
                why = f"too large for the inbox: {name!r} (max frame {lane.max_frame} bytes)"
                self._undelivered(items[done:], name, why, FAILED)
                break
            except ShmbusError as e:  # the inbox broke
                self._undelivered(items[done:], name, f"the inbox of {name!r} failed: {e}", FAILED)
                break
            if done == len(views):
                break
            why = self._given_up(name, lane, policy, wait, deadline)
            if why is not None:
                self._undelivered(items[done:], name, why, DROPPED if policy == "drop" else FAILED)
                break
            self._beat()  # blocked on a full inbox is alive, as an shm sender is
        if done:
            size = sum(len(v) for v in views[:done])
            topics = [t for _, t in items[:done] if t is not None]
            for topic in set(topics):
                self._delivered(routes, name, 0, 0, [t for t in topics if t == topic])
            self._delivered(routes, name, done, size, [])

    def _route_many(self, routes: _Routes, body: bytes, lens: Any, kind: int, priority: int,
                    where: str, resent: int, policy: str, wait: float | None) -> None:  # fmt: skip
        """A checked record to one place: one write_many per inbox, in place."""
        counters = self.counters
        n = len(lens)
        if resent:
            StatsSegment.add(counters, RETRIED, resent)
        at = 16 + 4 * n
        for name, ring, topic in self._targets(routes, kind, where, n, len(body) - at,
                                               lambda: _split(body, at, lens)):  # fmt: skip
            self._write_many(routes, name, ring.lane(priority), body, at, lens, policy, wait,
                             topic)  # fmt: skip

    def _write_many(self, routes: _Routes, name: str, lane: Ring, body: bytes, at: int,
                    lens: Any, policy: str, wait: float | None,
                    topic: str | None) -> None:  # fmt: skip
        n = len(lens)
        base = ffi.from_buffer(body)
        c_lens = ffi.cast("uint32_t *", base + 16)
        written = ffi.new("uint32_t *")
        deadline = None if wait is None or policy != "block" else time.monotonic() + wait
        done = off = 0
        why = ""
        while done < n:
            left = 0.0 if policy != "block" else _SLICE
            if deadline is not None:
                left = max(min(left, deadline - time.monotonic()), 0.0)
            rc = lib.shmbus_ring_write_many(lane._handle(), base + at + off, c_lens + done,
                                            n - done, _ns(left), written)  # fmt: skip
            if written[0]:
                off += int(lens[done : done + written[0]].sum(dtype=np.int64))
                done += written[0]
            if rc == lib.SHMBUS_OK or rc == lib.SHMBUS_EINTR:
                continue
            if rc == lib.SHMBUS_ETOOBIG:
                why = f"too large for the inbox: {name!r} (max frame {lane.max_frame} bytes)"
                break
            if rc not in (lib.SHMBUS_EAGAIN, lib.SHMBUS_ETIMEDOUT):
                why = f"the inbox of {name!r} failed: error {rc}"
                break
            why = self._given_up(name, lane, policy, wait, deadline)
            if why is not None:
                break
            self._beat()
        if done < n:
            items = [(f, topic) for f in _split(body, at + off, lens[done:])]
            self._undelivered(items, name, why, DROPPED if policy == "drop" else FAILED)
        if done:
            self._delivered(routes, name, done, off, [topic] * done if topic else [])

    def _delivered(self, routes: _Routes, name: str, count: int, size: int,
                   topics: list[str]) -> None:  # fmt: skip
        StatsSegment.add(self.counters, SENT, count)
        StatsSegment.add(self.counters, _BYTES_SENT, size)
        info = routes.agents.get(name)
        if info is not None and len(info) > 3 and info[3]:
            theirs = self.bridge.stats.agent(info[3])
            StatsSegment.add(theirs, _DELIVERED, count)
            StatsSegment.add(theirs, _DELIVERED_BYTES, size)
        if topics:
            StatsSegment.add(self.bridge.stats.topic(topics[0].encode()), _TOPIC_DELIVERED,
                             len(topics))  # fmt: skip

    def _undelivered(self, items: list[Any], name: str, why: str, counter: int) -> None:
        StatsSegment.add(self.counters, counter, len(items))
        acks = 0
        for view, topic in items:
            if view[_TYPE_AT] == _ACK:  # an shm sender would log it, not dead-letter it:
                acks += 1  # its sender resends, and the copy is acked again
                continue
            who = f"subscriber {name!r} of {topic!r}" if topic is not None else repr(name)
            self._dead_letter(bytes(view), f"{why.replace(repr(name), who, 1)}")
        if acks:
            log.info("uds agent %s could not ack %d messages to %s: %s", self.who.name, acks,
                     name, why)  # fmt: skip

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for t in (self.up, self.down):
            if t is not threading.current_thread():
                t.join(10)
        self.sock.close()


def _split(body: bytes, at: int, lens: Any) -> list[bytes]:
    out, pos = [], at
    for n in lens.tolist():
        out.append(body[pos : pos + n])
        pos += n
    return out


def _frames_of(data: bytes) -> list[bytes]:
    """The frames of a record as sent (length prefix included)."""
    count = int.from_bytes(data[4:8], "little")
    pos = wire.HEAD + 4 * count
    out = []
    for length in memoryview(data)[wire.HEAD : wire.HEAD + 4 * count].cast("I"):
        out.append(bytes(data[pos : pos + length]))
        pos += length
    return out


class _RecordReader:
    """Records off a blocking socket with a short timeout, every length checked first."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(1 << 20)
        self.start = self.end = 0

    def _fill(self, need: int, stop: threading.Event) -> bool:
        """At least ``need`` bytes from ``start``; False at the end of the stream or on stop."""
        while self.end - self.start < need:
            if stop.is_set():
                return False
            if len(self.buf) - self.start < need or len(self.buf) - self.end < 65536:
                have = self.end - self.start
                if len(self.buf) < need + 65536:
                    self.buf = self.buf[self.start : self.end] + bytearray(need + (1 << 20))
                else:
                    self.buf[:have] = self.buf[self.start : self.end]
                self.start, self.end = 0, have
            view = memoryview(self.buf)[self.end :]
            try:
                # A short busy poll before the blocking wait, as shm readers spin: the
                # next record of a busy agent is near, and waking a thread is slow.
                spin_until = time.perf_counter() + _SPIN
                while True:
                    try:
                        n = self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                        break
                    except BlockingIOError:
                        if time.perf_counter() >= spin_until:
                            n = self.sock.recv_into(view)
                            break
            except TimeoutError:
                continue
            if not n:
                if self.end > self.start:
                    raise BadPeer(f"the connection ended inside a record "
                                  f"({self.end - self.start} bytes)")  # fmt: skip
                return False
            self.end += n
        return True

    def ready(self, stop: threading.Event) -> list[bytes]:
        """The next record, waited for, and every other already here; [] at the end."""
        out = []
        body = self.next(stop)
        while body is not None:
            out.append(body)
            if len(out) >= 4096 or not self._complete():
                break
            body = self.next(stop)
        return out

    def _complete(self) -> bool:
        """Is a whole record in the buffer?"""
        have = self.end - self.start
        if have < 4:
            return False
        body = int.from_bytes(self.buf[self.start : self.start + 4], "little")
        return body <= wire.MAX_RECORD and have >= 4 + body

    def next(self, stop: threading.Event) -> bytes | None:
        if not self._fill(4, stop):
            return None
        body = int.from_bytes(self.buf[self.start : self.start + 4], "little")
        if body > wire.MAX_RECORD:
            raise BadPeer(f"a record of {body} bytes (limit {wire.MAX_RECORD})")
        if body < wire.HEAD - 4:
            raise BadPeer(f"a record of {body} bytes, shorter than its header")
        if not self._fill(4 + body, stop):
            if stop.is_set():
                return None
            raise BadPeer("the connection ended inside a record")
        at = self.start + 4
        self.start = at + body
        return bytes(memoryview(self.buf)[at : at + body])


class Bridge:
    """Every uds agent's link; ``expect`` at registration, ``detach`` when it goes."""

    def __init__(self, bus: str, stats: StatsSegment) -> None:
        self.bus = bus
        self.stats = stats
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self.links: dict[str, _Link] = {}
        self._stopping = threading.Event()
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        path = data_path(bus)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._listener.settimeout(_SLICE * 2)
        self._acceptor = threading.Thread(target=self._accept_loop, name="shmbus-bridge-accept",
                                          daemon=True)  # fmt: skip
        self._acceptor.start()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # ------------------------------------------- the coordinator's thread

    def expect(self, name: str, agent_id: int, inbox: str, slot: int) -> dict[str, Any]:
        """A uds agent registered: what its data connection needs."""
        token = secrets.token_hex(16)
        with self._lock:
            self._expected[name] = _Expected(name, agent_id, token, inbox, slot)
        return {"token": token, "data": data_path(self.bus)}

    def detach(self, name: str) -> list[bytes]:
        """The agent is off the bus: stop its threads before its inbox is
        drained. Returns the frames it was sent but never took, oldest first:
        they go to the DLQ ahead of what is left in the inbox."""
        with self._lock:
            self._expected.pop(name, None)
            link = self.links.pop(name, None)
        if link is None:
            return []
        link.close()
        return link.lost

    def pump(self, dead_letter: Any, kill: Any) -> None:
        """Hand the threads' events to the coordinator: dead letters, deaths."""
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(4096):
                pass
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "dlq":
                dead_letter(event[1], event[2], event[3])
            elif event[0] == "kill":
                kill(event[1], event[2])

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_path(self.bus))
        for name in list(self.links):
            self.detach(name)
        self.wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------- the accept thread

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._hello(sock)
            except (OSError, ControlError, BadPeer, KeyError, TypeError) as e:
                log.warning("refused a data connection: %s", e)
                sock.close()

    def _hello(self, sock: socket.socket) -> None:
        sock.settimeout(_HELLO_WAIT)  # a client that says nothing cannot hold the thread
        reader = Reader()
        msgs: list[dict[str, Any]] = []
        while not msgs:
            data = sock.recv(4096)
            if not data:
                raise BadPeer("closed before its hello")
            msgs = reader.feed(data)
        hello = msgs[0]
        name, token = hello["name"], hello["token"]
        with self._lock:
            who = self._expected.get(name) if isinstance(name, str) else None
            ok = (who is not None and isinstance(token, str)
                  and secrets.compare_digest(token, who.token))  # fmt: skip
        if not ok or who is None:
            sock.sendall(encode({"ok": False, "message": "no such registration"}))
            raise BadPeer(f"a hello for {name!r} with a wrong or stale token")
        sock.sendall(encode({"ok": True}))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        sock.settimeout(_SLICE)
        with self._lock:  # still expected: not detached meanwhile
            if self._expected.get(name) is not who or self._stopping.is_set():
                raise BadPeer(f"{name!r} left before its data connection was up")
            del self._expected[name]
            self.links[name] = _Link(self, who, sock)
