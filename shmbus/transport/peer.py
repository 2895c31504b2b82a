"""Direct links between uds agents: their messages skip the coordinator's bridge.

Through the bridge, every message between two uds agents passes a third
process, which on a small machine costs a wake-up per hop (a round trip of
~45 us on 2 CPUs against ~20 for a socket pair). So each uds agent also
listens on a socket of its own (``<runtime dir>/<id in hex>.peer``), and the
first time it sends to another uds agent it connects there and sends that
agent everything direct from then on; when that fails (the peer is out of
reach, refuses, or does not answer within ``_HELLO_WAIT``) the pair stays
on the bridge. The choice is made once per recipient, before the first
message, so a sender's messages to one recipient never take two paths and
stay in order. Publishes always go through the bridge (it fans them out).

A link carries records as the data socket does (wire.py), both ways. Each
side counts the records of the other's it took and tells it in its own
records (or in a record of counts alone, when it waits): a record is the
sender's until the peer took it, so when the peer dies or leaves without
taking it, the sender puts its frames in the DLQ. The counts for stats
(sent, received) go to the coordinator in ``count`` calls from each side.

The listener checks who connects: the hello must name a live uds agent of
the bus whose process (SO_PEERCRED) is the one at the other end.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import operator
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.control import Reader, recv_msg, send_msg
from ..core.message import HEADER
from ..core.paths import runtime_dir
from ..core.ring import LANES
from ..errors import Closed
from . import wire
from .stream import QUIET, SLICE, Full, Stream

log = logging.getLogger(__name__)

ENV = "SHMBUS_UDS_DIRECT"  # "0": uds agents talk only through the bridge
_HELLO_WAIT = 0.5  # seconds a connect, and its answer, may take before the bridge is used
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: The info word's policy bits of a record of no frames on a link: the
#: sender's last counts, it leaves (so the link's end is no death).
LEAVING = 3
#: ... the numbers (u32 each) of records of the peer's the sender took out of
#: order (a higher lane first), past the ``taken`` count: they are no longer
#: the peer's to dead-letter, nor in its share of the inbox.
TOOK = 1
#: ... a fence: for each priority lane, 8 bytes: the id of the last message
#: of the sender's in that lane that went through the bridge (a publish, or
#: a send of an upper lane), or 0; what comes on the link after the fence
#: waits until they have come, or until FENCE_WAIT, as the two paths would
#: otherwise pass each other.
FENCE = 2
FENCE_WAIT = 1.0
_FENCE_IDS = struct.Struct(f"<{LANES}Q")
_FENCE_SIZE = wire.HEAD - 4 + _FENCE_IDS.size  # its body's
_DOWN = tuple(range(LANES - 1, -1, -1))  # the lanes, highest first
_SENDER_AT = struct.calcsize(HEADER.format[: 1 + wire.FIELDS.index("sender_id")])
_ID_AT = struct.calcsize(HEADER.format[: 1 + wire.FIELDS.index("id")])


def took_record(numbers: list[int]) -> bytearray:
    """A record telling the peer we took these records of its out of order."""
    tail = struct.pack(f"<{len(numbers)}I", *(n & wire.MASK for n in numbers))
    return bytearray(wire.RECORD.pack(wire.HEAD - 4 + len(tail), 0, TOOK, 0, 0) + tail)


def fence_record(ids: list[int]) -> bytearray:
    """A fence for these ids, one per lane (0: none)."""
    return bytearray(wire.RECORD.pack(_FENCE_SIZE, 0, FENCE, 0, 0) + _FENCE_IDS.pack(*ids))


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def peer_path(bus: str, agent_id: int) -> Path:
    """Where uds agent ``agent_id`` listens (no longer than control.sock: it fits)."""
    return runtime_dir(bus) / f"{agent_id:x}.peer"


class Link:
    """One direct connection with another uds agent.

    The peer's inbox is felt as it would be through the bridge: what we
    sent and it has not taken may fill ``capacity`` bytes per priority lane
    (its inbox's, as each shm lane has), and a frame may be ``max_frame``
    bytes at most. The reader reads what the link holds ahead into per-lane
    queues and takes the highest lane first; a record of the peer's counts
    as taken when the reader takes it (``pop``), not when it is read off the
    socket: what a dying reader had not taken, its sender still holds, and
    dead-letters."""

    def __init__(
        self, sock: socket.socket, name: str, peer_id: int, pid: int, capacity: int, max_frame: int
    ) -> None:
        self.name = name
        self.id = peer_id
        self.pid = pid
        self.capacity = capacity
        self.max_frame = max_frame
        self.stream = Stream(sock, f"agent {name!r}")
        self.stream.keep = collections.deque()
        self.fd = sock.fileno()
        self._wpoll = select.poll()
        self._wpoll.register(self.fd, select.POLLIN)
        self.lock = threading.Lock()
        # For the coordinator's stats: messages and frame bytes we took (the
        # reader's alone to count: no lock), those we sent (the stream counts
        # them), as told so far; [failed, dropped] of ours not told yet.
        self.rx_frames = self.rx_bytes = 0
        self._told = (0, 0, 0, 0)
        self.lost = [0, 0]
        self.broken: str | None = None  # we are done sending on it (and said why)
        self.ended: str | None = None  # the peer's side closed: read what it left, then go
        self.leaving = False  # the peer said it leaves (else a link that ends: it died)
        # Ours to send before the next record: per lane, the last id of a message
        # the peer gets through the bridge (None: no fence is due).
        self.fences: list[int] | None = None
        # The peer's fences: per lane, the last id of its messages that come
        # through the bridge as of what we read (None: no fence yet), and
        # what came from it through the bridge. As in an inbox, where those
        # would be already, a record on the link waits for the ones of its
        # lane that were sent before it, and for every one of a higher lane;
        # a wait (per lane) ends FENCE_WAIT after the bridge last brought one.
        self._need: tuple[int, ...] | None = None
        self.bridged = [0] * LANES
        self.stalled = [0.0] * LANES
        self.blocked = False  # head() found a record that waits for the bridge
        # The peer's records read and not taken, by lane: (number, body, the
        # _need as of it); the reader takes the highest lane first, as from an
        # shm inbox. A record taken past ``stream.taken`` + 1 waits in _ooo
        # until those before it are taken; the peer is told of it (TOOK).
        self._lanes: list[collections.deque[tuple[int, bytes, Any]]] = [
            collections.deque() for _ in range(LANES)
        ]
        self.queued = 0
        self.queued_bytes = 0
        self.overran = False
        # Read no further ahead than this (Mux.limit): a peer that ignores the
        # room must not make us buffer without bound; its sends block instead.
        self.limit = 1 << 62
        self.lane = 0  # head()'s
        self.readable = False  # a poll saw data on the socket since the last read
        self._seq = 0
        self._ooo: set[int] = set()
        self._untold: list[int] = []

    # ------------------------------------------------------------ counts

    def count_lost(self, n: int, dropped: bool) -> None:
        with self.lock:
            self.lost[dropped] += n

    def take_counts(self) -> tuple[list[int], list[int], list[int]]:
        """[messages, bytes] sent and received, and [failed, dropped], since
        the last call."""
        stream = self.stream
        with self.lock:
            now = (stream.sent_frames, stream.sent_bytes, self.rx_frames, self.rx_bytes)
            told, self._told = self._told, now
            lost, self.lost = self.lost, [0, 0]
        return [now[0] - told[0], now[1] - told[1]], [now[2] - told[2], now[3] - told[3]], lost

    # ------------------------------------------------------------ sending side

    def room(self, size: int, wait: float | None, lane: int) -> bool:
        """Wait up to ``wait`` (None: forever) until a record of ``size`` bytes
        fits beside what the peer has not taken yet of that lane (each lane
        has the inbox's capacity, as in shm); False if it never did. Closed
        if the peer goes meanwhile."""
        stream = self.stream
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            held = stream.held(lane)
            if not held or held + size <= self.capacity:
                return True
            self.poll_counts()
            if self.ended is not None:
                raise Closed(self.ended)
            held = stream.held(lane)
            if not held or held + size <= self.capacity:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            ms = 100 if left is None else max(1, min(100, math.ceil(left * 1000)))
            self._wpoll.poll(ms)  # the peer's counts come as it reads

    # ------------------------------------------------------------ reading side

    def _read(self, fill: bool = True) -> bytes | None:
        """The next record of the peer's that is the reader's (frames, or a
        fence), from what is set aside or the socket (``fill``: read it when
        no whole record is here); None if none is here. Under the stream's
        ``_rlock``. A peer that breaks the protocol, or an end, is noted in
        ``ended``."""
        stream = self.stream
        if stream._stash:
            return stream._stash.popleft()
        while True:
            start, end = stream._start, stream._end
            if end - start >= wire.HEAD:  # a whole record, as most are, without a call
                size, count, word, taken, _ = wire.RECORD.unpack_from(stream._buf, start)
                if wire.HEAD - 4 <= size <= wire.MAX_RECORD and end - start >= 4 + size:
                    stream._start = start + 4 + size
                    stream.release(taken)
                    whole = bytes(stream._view[start + 4 : start + 4 + size])
                    if count or self._control(word, whole):
                        return whole
                    continue
            elif start == end and self.ended is None:
                stream._start = stream._end = 0  # nothing to take: read, into all the buffer
                if not fill or not self._fill():
                    return None
                continue
            try:  # a record in part, or a length no peer of ours sends
                body = stream.take()
            except Closed as e:
                log.warning("agent %s broke its direct link: %s", self.name, e)
                self.ended = str(e)
                stream._start = stream._end  # what is left of it is garbage
                return None
            if body is None:
                if self.ended is not None or not fill or not self._fill():
                    return None
                continue
            word, taken = wire.COUNTS.unpack_from(body, 4)
            stream.release(taken)
            if body[:4] != b"\0\0\0\0" or self._control(word, body):
                return body

    def _control(self, word: int, body: bytes) -> bool:
        """A record of no frames: note a leave, or records taken out of order;
        True for a fence, which is the reader's."""
        kind = word & 3
        if kind == LEAVING:
            self.leaving = True
        elif kind == TOOK and len(body) % 4 == 0:
            self.stream.release_some(memoryview(body)[wire.HEAD - 4 :].cast("I").tolist())
        return kind == FENCE and len(body) == _FENCE_SIZE

    def _fill(self) -> bool:
        try:
            return self.stream.fill()
        except Closed as e:
            self.ended = str(e)
            return False

    def _pull(self, fill: bool) -> None:
        """Queue the records that are here by lane, each with the fences read
        before it; ``fill``: read the socket once."""
        stream = self.stream
        with stream._rlock:  # the heartbeat's, or a waiting sender's, look is brief
            while True:
                if self.queued_bytes >= self.limit:
                    self._overrun()
                    return
                body = self._read(fill)
                if body is None:
                    return
                self._queue(body)
                if stream._end - stream._start < wire.HEAD and not stream._stash:
                    if not fill or stream._end == stream._start:
                        return  # (all read; a read that finds nothing costs an exception)
                    fill = False

    def _queue(self, body: bytes) -> None:
        if body[0] or body[1] or body[2] or body[3]:  # frames (else a fence)
            self._seq += 1
            self._lanes[wire.lane(body, 16)].append((self._seq, body, self._need))
            self.queued += 1
            self.queued_bytes += len(body)
        else:
            ids = _FENCE_IDS.unpack_from(body, 16)
            self._need = tuple(map(max, ids, self._need or ids))

    def _overrun(self) -> None:
        if not self.overran:
            self.overran = True
            log.warning(
                "agent %s sends past the room of our inbox on its direct link: "
                "it is read no further ahead (its sends wait)",
                self.name,
            )

    def take_only(self) -> bytes | None:
        """``head()`` and ``pop()`` in one, for a reader whose only source is
        this link: when no record waits here, one that comes alone is taken
        as it is read, with no queue (a round trip's usual case)."""
        stream = self.stream
        if (
            self.queued
            or stream._stash
            or (self._need is not None and any(map(operator.gt, self._need, self.bridged)))
        ):  # records wait here, or one may wait for the bridge
            return self.pop() if self.head() is not None else None
        with stream._rlock:
            body = self._read(True)
        self.readable = False
        if body is None:
            if self.ended is not None and not stream._stash:
                raise Closed(self.ended)
            return None
        fence = not (body[0] or body[1] or body[2] or body[3])  # (a count of no frames)
        if fence or stream._end - stream._start >= 4 or stream._stash:
            self._queue(body)  # more came (the highest lane first), or a fence
            return self.pop() if self.head() is not None else None
        self._seq += 1
        return self._took(self._seq, body)

    def head(self) -> bytes | None:
        """The peer's next record of frames, not taken yet (the highest lane's
        first, its lane in ``lane``, unless it waits for what its fences name
        to come through the bridge): None if none is here. Closed once the
        peer has gone and all it sent is taken."""
        stream = self.stream
        if self.readable or not self.queued:
            self._pull(True)
            self.readable = False
        elif stream._stash or stream._end - stream._start >= wire.HEAD:
            self._pull(False)  # read already (by a look for counts, or with the last)
        self.blocked = False
        if self.queued:
            lanes = self._lanes
            for lane in _DOWN:
                if lanes[lane]:
                    break
            if self._need is not None and not self._may_take(lane, lanes[lane][0][2]):
                self.blocked = True
                return None
            self.lane = lane
            return lanes[lane][0][1]
        if self.ended is not None and not self.stream._stash:
            raise Closed(self.ended)
        return None

    def _may_take(self, lane: int, need: tuple[int, ...] | None) -> bool:
        """May the first record of ``lane`` (its fences: ``need``) go, or does
        it wait for one of our messages from the bridge? (Its wait ends
        FENCE_WAIT after the bridge last brought one of that lane.)"""
        announced, bridged = self._need, self.bridged
        assert announced is not None
        for k in _DOWN:
            if k < lane:
                return True
            wanted = announced[k] if k > lane else need[k] if need is not None else 0
            if wanted <= bridged[k]:
                continue
            now = time.monotonic()
            if not self.stalled[k]:
                self.stalled[k] = now
            elif now >= self.stalled[k] + FENCE_WAIT:  # it never came (dropped, or no
                bridged[k] = announced[k]  # longer subscribed): go on
                self.stalled[k] = 0.0
                continue
            return False
        return True

    def waits_for(self, lane: int) -> bool:
        """Is one of our messages of ``lane`` from the bridge yet to come (so
        what a record here waited for may have come with the last one)?"""
        return self._need is not None and self.bridged[lane] < self._need[lane]

    def first_id(self, lane: int | None = None) -> int | None:
        """The id of the first message of ``head()`` (or of the first record
        queued in ``lane``; None if none is)."""
        queue = self._lanes[self.lane if lane is None else lane]
        if not queue:
            return None
        body = queue[0][1]
        at = 16 + 4 * int.from_bytes(body[:4], "little") + _ID_AT
        return int.from_bytes(body[at : at + 8], "little")

    def pop(self) -> bytes:
        """Take ``head()``: it is the reader's now (the peer is told so)."""
        seq, body, _ = self._lanes[self.lane].popleft()
        self.queued -= 1
        self.queued_bytes -= len(body)
        return self._took(seq, body)

    def _took(self, seq: int, body: bytes) -> bytes:
        count = int.from_bytes(body[:4], "little")
        self.rx_frames += count
        self.rx_bytes += len(body) - (wire.HEAD - 4) - 4 * count
        stream = self.stream
        if seq == stream.taken + 1:
            if self._ooo:  # those taken before it, out of order, count now too
                n, ooo = 1, self._ooo
                while stream.taken + n + 1 in ooo:
                    n += 1
                    ooo.discard(stream.taken + n)
                stream.took(n)
            else:
                stream.took()
        else:
            self._ooo.add(seq)
            with self.lock:
                self._untold.append(seq)
        if self._untold:
            self.tell_took()
        return body

    def tell_took(self, wait: float = 0) -> None:
        """Tell the peer the records we took out of order, if the socket
        takes it within ``wait`` (else with a later take, or from the
        heartbeat: until then the peer counts them against our inbox)."""
        with self.lock:
            numbers, self._untold = self._untold, []
        if not numbers:
            return
        try:
            self.stream.write(took_record(numbers), wait)
        except (Full, Closed):
            with self.lock:
                self._untold[:0] = numbers

    def poll_counts(self, wait: bool = False) -> None:
        """Read what the peer sent, for its counts (a sender that never
        receives learns so what it may forget); its records are set aside,
        untaken, for the reader (the peer keeps within our inbox's capacity,
        so they are bounded). Notes an end in ``ended``. ``wait``: for the
        reader's turn, as when the link ended and the peer's last counts
        must be in before we dead-letter what it did not take."""
        stream = self.stream
        if not stream._rlock.acquire(blocking=wait):
            return  # the reader is at it
        try:
            pending = []
            ahead = self.queued_bytes + sum(map(len, stream._stash))
            while ahead < self.limit and (body := self._read()) is not None:
                pending.append(body)
                ahead += len(body)
            if ahead >= self.limit:
                self._overrun()
            stream._stash.extend(pending)
            if pending and stream.on_stash is not None:
                stream.on_stash()
        finally:
            stream._rlock.release()

    def close(self) -> None:
        self.stream.close()


Frame = tuple[int, int, int, int, int]  # sender id, message id, lane, start, end in a body


def _frame_ids(body: bytes) -> list[Frame]:
    """(sender id, message id, lane, start, end) of each frame of a body."""
    count = int.from_bytes(body[:4], "little")
    at = 16 + 4 * count
    out = []
    for length in memoryview(body)[16 : 16 + 4 * count].cast("I"):
        if length >= _ID_AT + 8:
            sender = int.from_bytes(body[at + _SENDER_AT : at + _SENDER_AT + 4], "little")
            msg_id = int.from_bytes(body[at + _ID_AT : at + _ID_AT + 8], "little")
            lane = wire.LANE_OF[body[at + wire.PRIORITY_AT]]
        else:
            sender = msg_id = lane = 0  # not a frame: the reader says so
        out.append((sender, msg_id, lane, at, at + length))
        at += length
    return out


def _body(body: bytes, frames: list[Frame]) -> bytes:
    """A body of these frames of ``body``."""
    return b"".join(
        [
            wire.RECORD.pack(0, len(frames), 0, 0, 0)[4:],
            struct.pack(f"<{len(frames)}I", *(e - s for *_, s, e in frames)),
            *(body[s:e] for *_, s, e in frames),
        ]
    )


class Mux:
    """A uds agent's inbox sources read as one: its data socket and its links.

    The highest lane goes first, among all sources. A sender's messages to
    us keep their order within a lane though some come through the bridge
    (its publishes) and some on its link: a link record waits for what the
    fences before it announce (Link._may_take), and a message from the
    bridge waits while a link from its sender has an older one of its lane."""

    def __init__(self, bridge: Stream, on_broken: Callable[[Link, str], None]) -> None:
        self.bridge = bridge
        self.on_broken = on_broken
        self.spin = bridge.spin
        self._lock = threading.Lock()
        self._links: dict[int, Link] = {}  # by fd
        self.by_id: dict[int, Link] = {}
        self._order: tuple[Link, ...] = ()
        self._streams: tuple[Stream, ...] = (bridge,)  # the bridge's, and each link's
        self._held: tuple[bytes, list[Frame]] | None = None
        self._bridge_ready = False  # the last poll found the bridge's socket readable
        self._more = True  # False: the last look left nothing read and not taken
        self.limit = 1 << 62  # bytes a link may have read ahead (UdsLink sets it)
        self._unwatched: set[int] = set()  # fds of ended links no longer polled
        self._next = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()  # (quicker than an epoll when a socket is ready)
        # The same sockets in an epoll, whose own fd says "something is here"
        # to an event loop that reads this inbox (shmbus.aio: epoll nests).
        self._epoll = select.epoll()
        self._bridge_fd = bridge.sock.fileno()
        for fd in (self._bridge_fd, self._wake):
            self._poll.register(fd, select.POLLIN)
            self._epoll.register(fd, select.EPOLLIN)
        bridge.on_stash = self.signal

    def links(self) -> tuple[Link, ...]:
        return self._order

    def add(self, link: Link) -> None:
        link.stream.on_stash = self.signal
        link.limit = self.limit
        with self._lock:
            # Two agents that dial each other at once have two links; what
            # came from the peer through the bridge is one for both.
            for other in self._links.values():
                if other.id == link.id:
                    link.bridged, link.stalled = other.bridged, other.stalled
                    break
            self._links[link.fd] = link
            self.by_id.setdefault(link.id, link)
            self._order = tuple(self._links.values())
            self._streams = (self.bridge, *(link.stream for link in self._order))
            self._poll.register(link.fd, select.POLLIN)
            self._epoll.register(link.fd, select.EPOLLIN)
        self.signal()  # a reader asleep polls the new link too

    def remove(self, link: Link) -> bool:
        """Off the list (False if it was not on it)."""
        with self._lock:
            if self._links.pop(link.fd, None) is not link:
                return False
            if self.by_id.get(link.id) is link:
                del self.by_id[link.id]
                for other in self._links.values():
                    if other.id == link.id:
                        self.by_id[link.id] = other
                        break
            self._order = tuple(self._links.values())
            self._streams = (self.bridge, *(link.stream for link in self._order))
            self._unwatched.discard(link.fd)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poll.unregister(link.fd)
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._epoll.unregister(link.fd)
        return True

    def broken(self, link: Link, reason: str) -> None:
        """The link ended and all it brought is taken: off the list, and closed."""
        if self.remove(link):
            self.on_broken(link, reason)
            link.close()

    def ended(self, link: Link, reason: str) -> None:
        """A sender found the link ended: what the peer never took is dead-
        lettered now; the reader takes what it brought, then drops it."""
        self.on_broken(link, reason)  # (it reads what is left first: the peer's last counts)
        link.ended = link.ended or reason
        self.signal()

    # ------------------------------------------------------------ reading

    def poll_record(self, read: bool = True) -> bytes | None:
        """The next record's body if one is here now: no wait, no counts told.
        ``read=False``: only if one was read off a socket already (a look for
        more behind a record just taken, which must not cost a system call)."""
        if read:
            return self._look() if self._ready() else None
        return self._look() if self._more and self._buffered() else None

    def _ready(self, ready: list[tuple[int, int]] | None = None) -> bool:
        """Is there anything to look at? One system call for all the sockets
        (unless the caller's ``ready`` is one just made), where a look makes
        one a socket (and an exception where it finds none)."""
        if ready is None:
            ready = self._poll.poll(0)
        if ready:
            links = self._links
            for fd, _ in ready:
                if fd == self._bridge_fd:
                    self._bridge_ready = True
                elif (link := links.get(fd)) is not None:
                    link.readable = True  # (a look reads it, though records wait there)
            if len(ready) == 1 and ready[0][0] == self._wake:
                self._drain_wake()
                return bool(self._order)  # a new link, or an end: look
            return True
        return self._buffered()

    def _buffered(self) -> bool:
        """Is a record here without a read: set aside, held, or in a buffer
        (or a fence's wait over)?"""
        if self._held is not None:
            return True
        for s in self._streams:
            if s._stash or s._end - s._start >= 4:
                return True
        for link in self._order:
            if link.queued:
                return True
        return False

    def _head(self, link: Link) -> bytes | None:
        try:
            return link.head()
        except Closed as e:
            self.broken(link, str(e))
            return None

    def _look(self) -> bytes | None:
        """A record from any source, if one is here: of the highest lane, as an
        shm inbox hands them over (a link's records by their lane, a bridge
        record by its first frame's), and the sources in turn among equals."""
        order = self._order
        n = len(order)
        if not n:
            if self._held is not None:  # what a cut left, when the last link went
                body, frames = self._held
                self._held = None
                return _body(body, frames)
            return self.bridge.poll_record()
        bridge = self.bridge
        if self._held is None and (
            self._bridge_ready or bridge._stash or bridge._end - bridge._start >= 4
        ):
            self._bridge_ready = False
            got = bridge.poll_record()  # (a sender reading it for a verdict stashes)
            if got is not None and got[:4] != b"\0\0\0\0":  # (counts alone: nothing to hand)
                self._held = (got, _frame_ids(got))
        held = self._held
        if held is None and n == 1:  # one link, nothing from the bridge: a round trip's case
            link = order[0]
            try:
                only = link.take_only()
            except Closed as e:
                self.broken(link, str(e))
                return None
            stream = link.stream  # (read on for recv_many only if something is here)
            self._more = bool(link.queued or stream._stash or stream._end - stream._start >= 4)
            return only
        self._more = True
        best = choice = -1
        for i in range(n + 1):
            k = (self._next + i) % (n + 1)
            if k == n:  # the bridge's turn
                if held is not None and held[1][0][2] > best:
                    best, choice = held[1][0][2], n
                continue
            link = order[k]
            if self._head(link) is None or link.lane <= best:
                continue
            if held is not None:  # an older message of its sender's in that lane waits?
                lane, first = link.lane, link.first_id()
                if any(
                    s == link.id and ln == lane and m < first  # type: ignore[operator]
                    for s, m, ln, _, _ in held[1]
                ):
                    continue
            best, choice = link.lane, k
        if choice < 0:
            return None
        if choice == n:
            self._held = None
            self._next = 0
            return self._from_bridge(*held)  # type: ignore[misc]
        self._next = choice + 1
        return order[choice].pop()

    def _from_bridge(self, body: bytes, frames: list[Frame]) -> bytes | None:
        """The frames of a bridge record up to where the link of a sender has
        an older message of the same lane (that goes first: the rest is held),
        or up to a message a record on a link waits for (that may go next)."""
        links: dict[int, tuple[Link, ...]] = {}
        for sender, *_ in frames:
            if sender not in links:
                links[sender] = tuple(x for x in self._order if x.id == sender)
        # Each sender's links are read first: what it sent there before these
        # frames is in their sockets by now.
        for some in links.values():
            for link in some:
                link.readable = True
                self._head(link)
        blocker = None
        cut = len(frames)
        for k, (sender, msg_id, lane, _, _) in enumerate(frames):
            for link in links[sender]:
                first = link.first_id(lane)
                if first is not None and first < msg_id:  # an older one of its lane first
                    blocker, cut = link, k
                    break
                if link.waits_for(lane):  # it may wait for this one: look again after it
                    cut = k + 1
                    break
            if cut < len(frames):
                break
        if cut < len(frames):
            self._held = (body, frames[cut:])
        for sender, msg_id, lane, _, _ in frames[:cut]:
            some = links[sender]
            if some and msg_id > some[0].bridged[lane]:  # (shared by a peer's links)
                some[0].bridged[lane] = msg_id  # a fence read later need not wait for it
                some[0].stalled[lane] = 0.0
        if blocker is not None and cut == 0:  # its older message first (or a higher lane's)
            return blocker.pop() if self._head(blocker) is not None else None
        if cut == len(frames) and frames[0][3] == 16 + 4 * len(frames):
            return body  # whole, as it came
        return _body(body, frames[:cut])

    def read_record(self, timeout: float | None) -> bytes | None:
        """The next record's body from any source; None on timeout. As
        Stream.read_record: spin first, and tell the counts before a sleep."""
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = None if timeout != 0 else 0.0
        ready = None
        while True:
            if self._ready(ready):
                body = self._look()
                if body is not None:
                    return body
            ready = None
            if spin_until is None:
                spin_until = time.perf_counter() + self.spin
            if time.perf_counter() < spin_until:
                poll, clock = self._poll.poll, time.perf_counter
                while not (ready := poll(0)) and clock() < spin_until:
                    pass
                continue  # (with what the poll found: a second one costs a round trip 1 us)
            streams = self._streams
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                for s in streams:
                    s.idle()
                return None
            for s in streams:
                if s.granted == s.taken:
                    s.granted += 1  # nothing asked for: ask for the next record
            if any(s._told != (s.taken, s.granted) for s in streams):
                quiet = QUIET if left is None else min(left, QUIET)
                if self._poll.poll(math.ceil(quiet * 1000)):
                    self._drain_wake()
                    continue
                if not all([s.idle() for s in streams]):
                    left = SLICE if left is None else min(left, SLICE)
                left = None if deadline is None else deadline - time.monotonic()
            if self.bridge._rlock.locked():
                left = SLICE if left is None else min(left, SLICE)  # a verdict's reader stashes
            if self._unwatch_ended():  # its records wait for the bridge: its wait runs out
                left = SLICE if left is None else min(left, SLICE)
            self._poll.poll(-1 if left is None else max(math.ceil(left * 1000), 0))
            self._drain_wake()

    def _unwatch_ended(self) -> bool:
        """Before a wait: a link whose socket ended but whose records wait for
        the bridge stays readable (the end) and would wake every wait: stop
        watching it (its records are looked at all the same). Whether a
        link's record waits for the bridge."""
        blocked = False
        for link in self._order:
            if link.blocked:
                blocked = True
                if link.ended is not None and link.fd not in self._unwatched:
                    self._unwatched.add(link.fd)
                    with self._lock:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            self._poll.unregister(link.fd)
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            self._epoll.unregister(link.fd)
        return blocked

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):  # (nothing there; or closed: -1)
            os.eventfd_read(self._wake)

    def close(self) -> None:
        for link in self._order:
            self.remove(link)
            link.close()
        self._epoll.close()
        wake, self._wake = self._wake, -1  # (a late signal must not write to a reused fd)
        with contextlib.suppress(OSError):
            os.close(wake)

    def fileno(self) -> int:
        """Readable while a source has bytes unread, or after ``signal()``."""
        return self._epoll.fileno()

    def signal(self) -> None:
        """Make ``fileno()`` readable: a record was set aside without a read
        of the loop's (a look for counts, a verdict's reader), or a wait ran out."""
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

    def pending(self) -> bool:
        """Is a record here already (read, set aside or held), so that a
        waiter must not sleep? (As in read_record: no system call.)"""
        self._unwatch_ended()
        return self._buffered()


class Listener(threading.Thread):
    """Takes the connections of other uds agents (a thread: the hello must be
    answered whether or not the agent reads just now)."""

    def __init__(self, path: Path, admit: Callable[[socket.socket], None]) -> None:
        super().__init__(name=f"shmbus-uds-listen-{path.name}", daemon=True)
        self.path = path
        self.admit = admit
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a killed namesake's (ids are never reused while the bus runs)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(64)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        self.sock = sock
        self._halt = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.start()

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._halt, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._halt in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                self.admit(conn)
            except Exception as e:  # noqa: BLE001 - a bad peer must not stop the listener
                log.warning("refused a direct connection: %s", e)
                conn.close()

    def close(self) -> None:
        os.eventfd_write(self._halt, 1)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)
        self.sock.close()
        os.close(self._halt)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def peer_pid(sock: socket.socket) -> int:
    pid, _, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(pid)


def admit(
    conn: socket.socket,
    me: str,
    lookup: Callable[[str], Any],
    inbox: dict[str, int],
    add: Callable[[Link], None],
    remove: Callable[[Link], Any],
) -> Link:
    """Check a connecting agent's hello and answer it (with ``inbox``, our
    capacity and max_frame), the link ``add``-ed first; ValueError if refused."""
    conn.settimeout(_HELLO_WAIT)
    hello = recv_msg(conn, Reader(), [])
    if not isinstance(hello, dict):
        raise ValueError("not a link hello")
    name: Any = hello.get("name")
    agent_id: Any = hello.get("id")
    why = ""
    if hello.get("op") != "link" or not isinstance(name, str) or type(agent_id) is not int:
        why = "not a link hello"
    elif hello.get("to") != me:
        why = f"this is agent {me!r}, not {hello.get('to')!r}"
    else:
        info = lookup(name)
        if info is None or info[0] != agent_id or info[4] != "uds":
            why = f"no uds agent {name!r} with id {agent_id} on the bus"
        elif peer_pid(conn) != info[2]:
            why = f"the process at the other end is not agent {name!r}'s"
        elif not _inbox_ok(hello):
            why = "no inbox capacity and max_frame in the hello"
    if why:
        with contextlib.suppress(OSError):
            send_msg(conn, {"ok": False, "message": why})
        raise ValueError(why)
    # The link is ours to read before the answer: what the peer sends once it
    # has it is there for a recv that does not wait, as in an inbox.
    answer = {"ok": True, **inbox}
    link = Link(conn, name, agent_id, info[2], hello["capacity"], hello["max_frame"])
    add(link)
    try:
        send_msg(conn, answer)
    except BaseException:
        remove(link)
        raise
    return link


def _inbox_ok(msg: dict[str, Any]) -> bool:
    cap, most = msg.get("capacity"), msg.get("max_frame")
    return type(cap) is int and type(most) is int and 0 < most <= cap < 1 << 48


def dial(
    bus: str, me: str, my_id: int, name: str, info: list[Any], inbox: dict[str, int]
) -> Link | None:
    """A link to uds agent ``name`` (its routes entry ``info``), accepted by
    its listener; None if it cannot be had."""
    peer_id = info[0]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = Reader()
    try:
        sock.settimeout(_HELLO_WAIT)
        sock.connect(str(peer_path(bus, peer_id)))
        send_msg(sock, {"op": "link", "name": me, "id": my_id, "to": name, **inbox})
        answer = recv_msg(sock, reader, [])
    except Exception as e:  # noqa: BLE001 - out of reach, or not a listener: the bridge
        log.debug("no direct link to %s: %s", name, e)
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    if not isinstance(answer, dict) or not answer.get("ok") or not _inbox_ok(answer):
        log.info(
            "agent %s refused a direct link: %s",
            name,
            answer.get("message") if isinstance(answer, dict) else answer,
        )
        sock.close()
        return None
    link = Link(sock, name, peer_id, info[2], answer["capacity"], answer["max_frame"])
    # The peer may have sent its first record right behind its answer.
    rest = bytes(reader._buf)
    stream = link.stream
    stream._buf[: len(rest)] = rest
    stream._end = len(rest)
    return link
