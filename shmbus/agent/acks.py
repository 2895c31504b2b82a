"""Acknowledgements: a sender's unacknowledged messages and their resends,
and a receiver's filter that hands a resent message over once.

A message sent with ``requires_ack=True`` stays here until the recipient's
ACK comes back (the recipient sends it once ``recv`` has handed the message
over, or once the handler returned under ``serve``). Past ``timeout`` it is
sent again, the same id with ``attempts + 1``, up to ``max_attempts`` sends
in all; then it goes to the DLQ ("retries exhausted"). There is no thread:
resends happen while the agent receives or sends, and ``wait_acked`` waits
for the ACKs.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any

from ..core.stats import RETRIED, StatsSegment
from ..errors import ShmbusError
from ..transport import Outbox

log = logging.getLogger(__name__)

SEEN = 1 << 16  # ids a receiver remembers, to drop resent copies


# A pending message is a list (building one is cheap; this runs per send):
# recipient, kind, data, flags, priority, ttl_ms, request_id, correlation_id,
# attempts, due, sent_ns.
_RECIPIENT, _KIND, _DATA, _FLAGS, _PRIORITY, _TTL, _REQUEST, _CORRELATION = range(8)
_ATTEMPTS, _DUE, _SENT = 8, 9, 10
ACK_BATCH = 64  # ACKs sent in one message, at most


class Acks:
    """One agent's side of acknowledgements, both as sender and as receiver."""

    def __init__(self, out: Outbox, timeout: float, max_attempts: int) -> None:
        if not timeout > 0 or max_attempts < 1:
            raise ValueError("ack_timeout must be > 0 and max_attempts >= 1")
        self.out = out
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.pending: dict[int, list[Any]] = {}
        self.next_due = math.inf
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()
        # The sender's side may be used by two threads, one sending (track)
        # while one receives (acked, resend_due): next_due and the resends
        # must not be decided on a stale view. The receiver's side is the
        # receiving thread's alone.
        self._lock = threading.Lock()

    # ------------------------------------------------------------ sender

    def track(
        self,
        msg_id: int,
        recipient: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: int,
        ttl_ms: int,
        request_id: int,
        correlation_id: int,
        now: float,
    ) -> None:
        due = now + self.timeout
        entry = [
            recipient,
            kind,
            data,
            flags,
            priority,
            ttl_ms,
            request_id,
            correlation_id,
            1,
            due,
            time.time_ns(),
        ]
        with self._lock:
            self.pending[msg_id] = entry
            if due < self.next_due:
                self.next_due = due

    def acked(self, msg_id: int) -> None:
        with self._lock:
            self.pending.pop(msg_id, None)
            if not self.pending:
                self.next_due = math.inf

    def resend_due(self, now: float) -> None:
        """Send again what waited past its timeout; dead-letter what ran out of attempts."""
        if now < self.next_due:
            return
        with self._lock:
            self._resend_due(now)

    def _resend_due(self, now: float) -> None:
        if now < self.next_due:  # another thread did this round
            return
        self.out.fresh()  # once for the round: a recipient may have left
        next_due = math.inf
        for msg_id, p in list(self.pending.items()):
            if p[_DUE] > now:
                next_due = min(next_due, p[_DUE])
                continue
            if p[_ATTEMPTS] >= self.max_attempts:
                del self.pending[msg_id]
                self.out.dead_letter(
                    self._frame(msg_id, p),
                    f"retries exhausted: {p[_ATTEMPTS]} sends to {p[_RECIPIENT]!r}, no ACK "
                    f"within {self.timeout}s of each",
                )
                continue
            p[_ATTEMPTS] += 1
            p[_DUE] = now + self.timeout
            next_due = min(next_due, p[_DUE])
            self._resend(msg_id, p)
        self.next_due = next_due

    def _frame(self, msg_id: int, p: list[Any]) -> bytes:
        return self.out.frame(
            p[_KIND],
            p[_DATA],
            p[_FLAGS],
            msg_id,
            recipient=p[_RECIPIENT],
            priority=p[_PRIORITY],
            ttl=p[_TTL],
            request_id=p[_REQUEST],
            correlation_id=p[_CORRELATION],
            attempts=p[_ATTEMPTS],
            timestamp_ns=p[_SENT],  # a resend keeps the TTL's start
        )

    def _resend(self, msg_id: int, p: list[Any]) -> None:
        recipient = p[_RECIPIENT]
        ring = self.out.target(recipient)
        if ring is None:
            # Gone for now. What it had not read is in the DLQ already
            # ("recipient left/died"), but what it had read ahead and not
            # handed over is nowhere else: an agent restarted under its name
            # gets it, else it runs out of attempts into the DLQ. (What it
            # handled without its ACK reaching us may so be there twice.)
            log.info("no resend of %d yet: %r is not on the bus", msg_id, recipient)
            return
        try:
            # Its own lane: a resend of an urgent message must not queue
            # behind the recipient's backlog of lesser ones.
            if ring.lane(p[_PRIORITY]).try_write(self._frame(msg_id, p)):
                StatsSegment.add(self.out.counters, RETRIED)
            # else: its inbox is full; the next round tries again
        except ShmbusError as e:
            log.warning("resend of %d to %r failed: %s", msg_id, recipient, e)

    # ---------------------------------------------------------- receiver

    def first_time(self, msg_id: int) -> bool:
        """Has a message with this id not been handed over before?"""
        seen = self._seen
        if msg_id in seen:
            return False
        seen[msg_id] = None
        if len(seen) > SEEN:
            seen.popitem(last=False)
        return True
