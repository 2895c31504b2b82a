"""The bus's counters: a shared-memory segment of atomics (csrc/shmbus_stats.h).

Agents bump their counters from C in the send and read paths; anyone reads
them all at once, without asking the coordinator, as a :class:`BusStats`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from .._native import ffi, lib
from ..errors import ShmbusError, raise_for
from .ring import Ring
from .segment import Segment

__all__ = ["AgentStats", "BusStats", "Counters", "StatsSegment", "TopicStats"]

SENT: int = lib.SHMBUS_STAT_SENT
BYTES_SENT: int = lib.SHMBUS_STAT_BYTES_SENT
DELIVERED_BYTES: int = lib.SHMBUS_STAT_DELIVERED_BYTES
AGENT_SLOTS: int = lib.SHMBUS_STATS_AGENT_SLOTS
RECEIVED: int = lib.SHMBUS_STAT_RECEIVED
FAILED: int = lib.SHMBUS_STAT_FAILED
BYTES_RECEIVED: int = lib.SHMBUS_STAT_BYTES_RECEIVED
DEAD_LETTERED: int = lib.SHMBUS_STAT_DEAD_LETTERED
DROPPED: int = lib.SHMBUS_STAT_DROPPED
RETRIED: int = lib.SHMBUS_STAT_RETRIED
DELIVERED: int = lib.SHMBUS_STAT_DELIVERED
DLQ_SIZE: int = lib.SHMBUS_STAT_DLQ_SIZE
DLQ_TOTAL: int = lib.SHMBUS_STAT_DLQ_TOTAL
DLQ_EVICTED: int = lib.SHMBUS_STAT_DLQ_EVICTED

_SLOT = lib.SHMBUS_STATS_SLOT_SIZE // 8  # u64 words per slot
_HEADER = lib.SHMBUS_STATS_HEADER_SIZE // 8
_AGENTS = lib.SHMBUS_STATS_AGENT_SLOTS
_TOPICS = lib.SHMBUS_STATS_TOPIC_SLOTS
_READY = 2
_OWN = 16  # word offset of a slot's counters (byte 128)
_OTHERS = 32  # senders' counters (byte 256); a topic's counters too
_BEAT = lib.SHMBUS_STATS_HEARTBEAT_AT // 8


@dataclasses.dataclass(frozen=True)
class Counters:
    """Message counts and frame bytes (header, names and payload)."""

    sent: int = 0
    received: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: int = 0
    retried: int = 0
    dead_lettered: int = 0

    @classmethod
    def _from(cls, words: Any) -> Counters:
        return cls(*(int(w) for w in words[: len(_COUNTER_FIELDS)]))


_COUNTER_FIELDS = [f.name for f in dataclasses.fields(Counters)]


@dataclasses.dataclass(frozen=True)
class AgentStats(Counters):
    """One live agent: its counters, and what waits in its inbox."""

    name: str = ""
    id: int = 0
    pid: int = 0
    delivered: int = 0  # messages senders put in its inbox
    pending: int = 0  # of those, not read yet
    inbox_used: int = 0  # bytes
    inbox_capacity: int = 0
    heartbeat_age: float | None = None  # seconds since its last beat (None: none yet)


@dataclasses.dataclass(frozen=True)
class TopicStats:
    topic: str
    published: int = 0  # publish calls (a publish_many counts each message)
    delivered: int = 0  # copies written into subscribers' inboxes
    bytes: int = 0  # payload bytes published


@dataclasses.dataclass(frozen=True)
class BusStats:
    """A snapshot of a bus's counters. ``totals`` includes agents that left."""

    bus: str
    totals: Counters
    agents: dict[str, AgentStats]
    topics: dict[str, TopicStats]
    dlq: int  # entries in the DLQ now
    dlq_total: int  # entries ever added
    dlq_evicted: int  # entries pushed out by newer ones
    departed: Counters  # what agents that left had counted

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StatsSegment(Segment):
    """The stats segment of one bus: ``/dev/shm/shmbus.BUS.stats``."""

    kind = "stats segment"
    _c = "shmbus_stats"
    _ctype = "shmbus_stats_t"

    def __init__(self, handle: Any, name: str, *, owner: bool) -> None:
        super().__init__(handle, name, owner=owner)
        size = lib.shmbus_stats_segment_size()
        # A read-only numpy view of the whole mapping, for snapshots: aligned
        # 64-bit loads on x86-64 and arm64 are single-copy atomic.
        self._words = np.frombuffer(
            ffi.buffer(lib.shmbus_stats_base(handle), size), dtype=np.uint64
        )

    @classmethod
    def create(cls, name: str) -> StatsSegment:
        return cls._open("create", name)  # type: ignore[no-any-return]

    @classmethod
    def attach(cls, name: str) -> StatsSegment:
        return cls._open("attach", name)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._words = np.zeros(0, dtype=np.uint64)  # the view must not outlive the mapping
        super().close()

    # ------------------------------------------------------------ writers

    def agent(self, slot: int) -> Any:
        """The counters of agent slot ``slot`` (cdata ``uint64_t *``; NULL for slot 0)."""
        return lib.shmbus_stats_agent(self._handle(), slot)

    def heartbeat(self, slot: int) -> Any:
        """Where agent slot ``slot`` stores its beats (cdata ``uint64_t *``; NULL for 0)."""
        return lib.shmbus_stats_heartbeat(self._handle(), slot)

    @staticmethod
    def beat(where: Any, now_ns: int) -> None:
        """Store a heartbeat at ``where`` (from :meth:`heartbeat`)."""
        lib.shmbus_stats_set(where, 0, now_ns)

    def topic(self, topic: bytes) -> Any:
        return lib.shmbus_stats_topic(self._handle(), topic, len(topic))

    def open_agent(self, slot: int, agent_id: int, pid: int, name: str) -> None:
        raw = name.encode()
        rc = lib.shmbus_stats_agent_open(self._handle(), slot, agent_id, pid, raw, len(raw))
        if rc != lib.SHMBUS_OK:
            raise_for(rc, f"open stats slot {slot}")

    def close_agent(self, slot: int) -> None:
        lib.shmbus_stats_agent_close(self._handle(), slot)

    def set_bus(self, index: int, value: int) -> None:
        lib.shmbus_stats_set(lib.shmbus_stats_bus(self._handle()), index, value)

    @staticmethod
    def add(counters: Any, index: int, n: int = 1) -> None:
        lib.shmbus_stats_add(counters, index, n)  # NULL counters: a no-op

    def open_slots(self) -> dict[int, tuple[int, int]]:
        """The agent slots in use now: slot -> (agent id, pid). A coordinator
        that takes the bus over learns from this which slots are not free."""
        slots = self._words[_HEADER : _HEADER + _AGENTS * _SLOT].reshape(_AGENTS, _SLOT)
        return {
            int(i): (int(slots[i, 1]), int(slots[i, 2].astype(np.int64)))
            for i in np.flatnonzero(slots[:, 0] == _READY)
            if i
        }

    # ------------------------------------------------------------ readers

    def snapshot(self, bus: str, inboxes: dict[str, tuple[int, int]] | None = None) -> BusStats:
        """Every counter now. ``inboxes`` maps agent names to (used, capacity) bytes."""
        words = self._words.copy()  # one pass over the mapping, then no more races
        now = time.monotonic_ns()
        if not len(words):
            raise ShmbusError(f"{self.kind} {self.name!r} is closed")
        raw = words.view(np.uint8)
        agents_at = _HEADER
        slots = words[agents_at : agents_at + _AGENTS * _SLOT].reshape(_AGENTS, _SLOT)
        departed = Counters._from(slots[0, _OWN:])
        totals = np.array(slots[0, _OWN : _OWN + len(_COUNTER_FIELDS)], dtype=object)
        agents: dict[str, AgentStats] = {}
        for slot in np.flatnonzero(slots[:, 0] == _READY):
            row = slots[slot]
            base = (agents_at + slot * _SLOT) * 8
            name_len = min(int(row[3] & 0xFFFFFFFF), lib.SHMBUS_STATS_NAME)
            name = bytes(raw[base + 28 : base + 28 + name_len]).decode(errors="replace")
            own = row[_OWN : _OWN + len(_COUNTER_FIELDS)]
            totals += np.array(own, dtype=object)
            if name.startswith("."):
                continue  # the coordinator's own inbox (.history): counted, not an agent
            delivered = int(row[_OTHERS])
            received = int(own[RECEIVED])
            used, capacity = (inboxes or {}).get(name, (0, 0))
            counts = dict(zip(_COUNTER_FIELDS, (int(w) for w in own), strict=True))
            agents[name] = AgentStats(
                **counts,
                name=name,
                id=int(row[1]),
                pid=int(row[2].astype(np.int64)),
                delivered=delivered,
                pending=max(delivered - received, 0),
                inbox_used=used,
                inbox_capacity=capacity,
                heartbeat_age=max(now - int(row[_BEAT]), 0) / 1e9 if row[_BEAT] else None,
            )
        topics_at = agents_at + _AGENTS * _SLOT
        tslots = words[topics_at : topics_at + _TOPICS * _SLOT].reshape(_TOPICS, _SLOT)
        topics: dict[str, TopicStats] = {}
        for tslot in range(_TOPICS):
            row = tslots[tslot]
            last = tslot == _TOPICS - 1
            if not last and int(row[0]) & 0xFFFFFFFF != _READY:
                continue
            if last and not row[_OTHERS]:
                continue
            base = (topics_at + tslot * _SLOT) * 8
            name_len = min(int(row[1] & 0xFFFFFFFF), lib.SHMBUS_STATS_TOPIC_NAME)
            name = (
                "(other topics)"
                if last
                else bytes(raw[base + 12 : base + 12 + name_len]).decode(errors="replace")
            )
            topics[name] = TopicStats(name, *(int(w) for w in row[_OTHERS : _OTHERS + 3]))
        bus_line = words[16:32]
        return BusStats(
            bus=bus,
            totals=Counters(*(int(t) for t in totals)),
            agents=agents,
            topics=topics,
            dlq=int(bus_line[DLQ_SIZE]),
            dlq_total=int(bus_line[DLQ_TOTAL]),
            dlq_evicted=int(bus_line[DLQ_EVICTED]),
            departed=departed,
        )


def inbox_fill(
    agents: dict[str, list[Any]], open_rings: dict[str, Ring] | None = None
) -> dict[str, tuple[int, int]]:
    """(used, capacity) bytes of each agent's inbox, from the routes table's
    entries; rings already open are looked at, the others attached briefly."""
    fill = {}
    for name, info in agents.items():
        ring = (open_rings or {}).get(name)
        try:
            if ring is not None:
                fill[name] = ring.fill
            else:
                with Ring.attach(info[1], lanes=True) as peer:
                    fill[name] = peer.fill
        except ShmbusError:
            pass  # gone since the table was read
    return fill


def format_stats(s: BusStats) -> str:
    """A table for people: totals, one line per agent and per topic."""
    t = s.totals
    lines = [
        f"bus {s.bus}: sent {t.sent}  received {t.received}  failed {t.failed}  "
        f"bytes {t.bytes_sent}/{t.bytes_received}  dead-lettered {t.dead_lettered}  "
        f"DLQ {s.dlq} (ever {s.dlq_total}, evicted {s.dlq_evicted})",
        f"  {'agent':20s} {'pid':>8s} {'sent':>10s} {'received':>10s} {'failed':>7s} "
        f"{'pending':>8s} {'inbox':>18s} {'beat':>7s}",
    ]
    for a in sorted(s.agents.values(), key=lambda a: a.name):
        inbox = f"{a.inbox_used}/{a.inbox_capacity}" if a.inbox_capacity else "-"
        beat = "-" if a.heartbeat_age is None else f"{a.heartbeat_age:.1f}s"
        lines.append(
            f"  {a.name:20s} {a.pid:>8d} {a.sent:>10d} {a.received:>10d} {a.failed:>7d} "
            f"{a.pending:>8d} {inbox:>18s} {beat:>7s}"
        )
    if s.topics:
        lines.append(f"  {'topic':40s} {'published':>10s} {'delivered':>10s} {'bytes':>12s}")
        for tp in sorted(s.topics.values(), key=lambda tp: tp.topic):
            lines.append(
                f"  {tp.topic[:40]:40s} {tp.published:>10d} {tp.delivered:>10d} {tp.bytes:>12d}"
            )
    return "\n".join(lines)


def count_reads(ring: Ring, counters: Any) -> None:
    """Have the C reader of ``ring`` count what it takes (messages, bytes) into
    an agent's ``counters`` (from :meth:`StatsSegment.agent`); ``None`` stops it,
    which must happen before the stats segment is unmapped."""
    if counters is None:
        lib.shmbus_ring_count_reads(ring._handle(), ffi.NULL, ffi.NULL)
    else:
        lib.shmbus_ring_count_reads(ring._handle(), counters + RECEIVED, counters + BYTES_RECEIVED)
