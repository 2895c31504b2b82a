"""Topic history: the coordinator keeps the last N messages of chosen topics.

Opt-in per pattern (``shmbus coordinator --history 'events.*=100'``, or
``Agent.keep_history`` at run time). The coordinator then owns one more
inbox, registered in the routes table under the reserved name ``.history``
(agent names cannot start with a dot) and subscribed to the kept patterns, so
publishers copy frames into it like into any subscriber's: the coordinator
stays off the message path. A thread reads that inbox and keeps the raw
frames; it reads the header's topic only, never a payload (frames are
untrusted: the agent that asks for them decodes them with the bounded
decoder). Kept in memory: a restarted coordinator starts empty.
"""

from __future__ import annotations

import collections
import heapq
import logging
import struct
import threading
import time
from typing import Any

from ..core.message import HEADER_SIZE, MAGIC, VERSION, MessageType
from ..core.ring import Ring
from ..core.routes import check_keep, match, validate_pattern
from ..core.stats import count_reads
from ..errors import Closed, InvalidArgument, ShmbusError

__all__ = ["HISTORY", "OPS", "History"]

log = logging.getLogger(__name__)

#: The inbox's name in the routes table; no agent can take it (see
#: control.validate_bus_or_agent), and agents hide names starting with a dot.
HISTORY = ".history"
OPS = ("keep_history", "history")
MAX_PATTERNS = 64
#: Bytes kept per pattern, whatever N says: the oldest go first past it.
MAX_BYTES = 64 << 20
#: Larger frames are not kept: one must fit a control reply (control.MAX_CONTROL).
MAX_KEPT_FRAME = 1 << 20
PAGE_BYTES = 2 << 20  # frames per history reply, in bytes
#: Big enough to take bursts while the thread sleeps between batches; frames
#: up to half of it fit, so a large publish is never refused by it.
CAPACITY = 32 << 20
_BATCH = 1024
_NAP = 0.002  # between batches that did not fill: publishers pay no doorbell meanwhile

# magic, version, type at 0; sender, recipient, topic and payload lengths at 52.
_PEEK = struct.Struct("<HBB48xBBHI")
_PUBLISH = int(MessageType.PUBLISH)


class _Kept:
    """The last ``n`` frames (and at most MAX_BYTES) of one pattern: (seq, topic, frame)."""

    __slots__ = ("pattern", "n", "items", "bytes")

    def __init__(self, pattern: str, n: int) -> None:
        self.pattern = pattern
        self.n = n
        self.items: collections.deque[tuple[int, str, bytes]] = collections.deque()
        self.bytes = 0

    def trim(self) -> None:
        while self.bytes > MAX_BYTES:
            self.bytes -= len(self.items.popleft()[2])

    def resize(self, n: int) -> None:
        self.n = n
        while len(self.items) > n:
            self.bytes -= len(self.items.popleft()[2])


class History:
    """The history inbox, its reader thread and what it kept."""

    def __init__(self, inbox: str, counters: Any = None, slot: int = 0) -> None:
        """``counters``: the stats slot ``slot``'s, for what it reads (None: not counted)."""
        self.inbox = inbox
        self.slot = slot
        try:
            # A killed coordinator's (we hold the bus's lock: it is dead):
            # taken over, since its agents' routes may still lead there.
            self.ring = Ring.attach(inbox)
        except ShmbusError:
            Ring.unlink_name(inbox)  # none, or not a ring we can use
            self.ring = Ring.create(inbox, CAPACITY, max_frame=CAPACITY // 2 - 64)
        self.ring.spin_ns = 0  # it waits on the doorbell at once: no core spent
        self._counted = bool(counters)
        if counters:
            count_reads(self.ring, counters)
        self._probe = Ring.attach(inbox)  # positions, from the coordinator's thread
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._kept: dict[str, _Kept] = {}
        self._by_topic: dict[bytes, tuple[str, list[_Kept]]] = {}
        self._seq = 0
        self._read_to = self.ring.positions[0]  # the head, once what was before it is kept
        self.skipped = 0  # frames too large to keep, or not a publish
        self._stop = threading.Event()
        # Started by the first keep(): a taken-over inbox may hold frames
        # already, which must not be read before there is a pattern to keep.
        self._thread = threading.Thread(target=self._run, name="shmbus-history", daemon=True)

    # ---------------------------------------------------------- settings

    def patterns(self) -> dict[str, int]:
        with self._lock:
            return {p: k.n for p, k in self._kept.items()}

    def keep(self, patterns: dict[str, int]) -> None:
        """Keep the last N messages of each pattern (0: stop, forgetting them)."""
        with self._lock:
            new = [p for p, n in patterns.items() if n and p not in self._kept]
            if len(set(self._kept) | set(new)) > MAX_PATTERNS:
                raise InvalidArgument(
                    f"history is kept for at most {MAX_PATTERNS} patterns; stop one first "
                    "(keep 0 messages of it)"
                )
            for pattern, n in patterns.items():
                kept = self._kept.get(pattern)
                if n == 0:
                    self._kept.pop(pattern, None)
                elif kept is not None:
                    kept.resize(n)
                else:
                    self._kept[pattern] = _Kept(pattern, n)
            self._by_topic.clear()
        if self._kept and self._thread.ident is None and not self._stop.is_set():
            self._thread.start()

    # ------------------------------------------------------------ reader

    def _run(self) -> None:
        ring = self.ring
        while not self._stop.is_set():
            try:
                frames = ring.read_many(_BATCH, 0.25)
                head = ring.positions[0]
            except Closed:
                return
            except ShmbusError as e:  # a corrupt inbox: say so, do not spin on it
                log.error("history inbox unreadable: %s", e)
                self._stop.wait(1.0)
                continue
            with self._done:
                try:
                    self._keep(frames)
                except Exception:  # a bug here must not stop the reader: publishers would wait
                    log.exception("history: %d frames not kept", len(frames))
                self._read_to = head
                self._done.notify_all()
            if 0 < len(frames) < _BATCH:
                self._stop.wait(_NAP)

    def _keep(self, frames: list[bytes]) -> None:
        """Keep each frame under every pattern its topic matches (the hot loop:
        one header unpack and one dict hit per frame)."""
        by_topic = self._by_topic
        peek = _PEEK.unpack_from
        seq = self._seq
        for frame in frames:
            size = len(frame)
            try:
                magic, version, kind, slen, rlen, tlen, plen = peek(frame)
            except struct.error:
                self.skipped += 1
                continue
            at = HEADER_SIZE + slen + rlen
            if (
                magic != MAGIC
                or version != VERSION
                or kind != _PUBLISH
                or size > MAX_KEPT_FRAME
                or at + tlen + plen != size
            ):
                self.skipped += 1
                continue
            raw = frame[at : at + tlen]
            route = by_topic.get(raw)
            if route is None:
                route = self._route(raw)
            if route[1]:
                seq += 1
                item = (seq, route[0], frame)
                for kept in route[1]:
                    items = kept.items
                    if len(items) >= kept.n:
                        kept.bytes -= len(items.popleft()[2])
                    items.append(item)
                    kept.bytes += size
                    if kept.bytes > MAX_BYTES:
                        kept.trim()
        self._seq = seq

    def _route(self, raw: bytes) -> tuple[str, list[_Kept]]:
        """The topic's name and the patterns it falls under, cached."""
        try:
            topic = raw.decode()
        except UnicodeDecodeError:
            topic = ""  # no pattern matches it: not kept
        if len(self._by_topic) >= 4096:
            self._by_topic.clear()  # many distinct topics: start over rather than grow
        route = self._by_topic[raw] = (
            topic,
            [k for p, k in self._kept.items() if topic and match(p, topic)],
        )
        return route

    def caught_up(self, timeout: float = 0.5) -> bool:
        """Wait until what was in the inbox now is kept (a publish that
        returned before this call is in the history after it)."""
        target = self._probe.positions[1]
        deadline = time.monotonic() + timeout
        with self._done:
            while (self._read_to - target) % (1 << 64) >= 1 << 63:  # not there yet
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(left)
        return True

    # ----------------------------------------------------------- queries

    def select(self, query: str, n: int | None, start: int, end: int | None) -> list[Any]:
        """Kept (seq, topic, frame) whose topic matches ``query`` (a kept pattern
        or any pattern or topic), oldest first, seq in [start, end]; the last
        ``n`` of them."""
        with self._lock:
            kept = self._kept.get(query)
            if kept is not None:
                items = list(kept.items)
            else:
                merged = heapq.merge(*(list(k.items) for k in self._kept.values()), key=_seq_of)
                items = []
                last = 0
                hits: dict[str, bool] = {}
                for item in merged:
                    if item[0] == last:
                        continue  # kept for two patterns: once
                    last = item[0]
                    ok = hits.get(item[1])
                    if ok is None:
                        ok = hits[item[1]] = match(query, item[1])
                    if ok:
                        items.append(item)
        items = [i for i in items if i[0] >= start and (end is None or i[0] <= end)]
        return items[-n:] if n is not None else items

    def page(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The ``history`` op: frames of one reply, and where the next starts."""
        query = validate_pattern(msg["pattern"])
        n = msg.get("n")
        if n is not None:
            check_keep(query, n, stop=False)
        start, end = msg.get("start", 0), msg.get("end")
        if type(start) is not int or not (end is None or type(end) is int):
            raise InvalidArgument("history: start and end are message sequence numbers")
        if start == 0:  # the first page: what was published before the ask counts
            self.caught_up()
        items = self.select(query, n, start, end)
        if end is None:
            end = items[-1][0] if items else 0
        frames: list[bytes] = []
        size = 0
        for seq, _, frame in items:
            if frames and size + len(frame) > PAGE_BYTES:
                return {"ok": True, "frames": frames, "next": seq, "end": end}
            frames.append(frame)
            size += len(frame)
        return {"ok": True, "frames": frames, "next": None, "end": end}

    # ------------------------------------------------------------- close

    def close(self, *, unlink: bool = True) -> None:
        """Stop the reader and remove the inbox (its frames are dropped: history
        only); without ``unlink``, a successor takes the inbox over."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)
        self._probe.close()
        if not self._thread.is_alive():
            if self._counted:  # the stats mapping may go first
                count_reads(self.ring, None)
            self.ring.close()
        if unlink:
            self.ring.unlink()


def _seq_of(item: tuple[int, str, bytes]) -> int:
    return item[0]
