"""How :mod:`shmbus.aio` reads a shared-memory inbox: on the loop's own thread.

The inbox's doorbell is a POSIX semaphore, which the loop cannot select on;
a :class:`~shmbus.core.waiter.Waiter` (a thread in C, never holding the GIL)
waits on it and makes an eventfd readable. (A uds inbox with direct links
is sockets behind one epoll, which the loop selects on as it is:
:class:`SocketWaiter`.) The loop selects on that, reads
the ring itself without waiting (the synchronous agent's ``recv_many``:
ACKs, TTL and bus notices as ever) and arms the waiter again once the ring
is empty and nothing else will read it. No Python thread takes part, so no
message waits for a thread to win the GIL back.

A request's answer usually comes within microseconds, sooner than the loop
could sleep and be woken. So while a request waits, the loop spins for it,
reading the ring in C without the GIL for up to the inbox's ``spin_ns``
(50 us; never over ``SPIN_MAX_NS``), as a synchronous reader does before
it sleeps:

* inline, in ``request()`` right after the send, when it is the agent's
  only request waiting: its answer comes back without a turn of the loop,
  and without a timer. A task whose requests keep being answered this way
  still lets the loop turn every ``STREAK`` of them, so other tasks run;
* else in :meth:`RingFeed._settle`, a callback, when the ring was empty
  and requests wait.

A spin that finds nothing (the answer is slow, or comes from a task of this
same loop, which cannot run while it spins) makes the next spins skip 1, 2,
4 ... 64 chances: a loop whose answers are slow spins at most once in 64
waits. The waiter is never armed while the loop spins, so the two never
spin at once. Idle, the waiter sleeps on the doorbell: no busy core.

The loop stops reading while it holds ``max_unread`` messages and no
request waits for an answer, so the inbox fills and senders feel the
backpressure instead of Python buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from ..agent.agent import Agent
from ..core.message import Message
from ..core.waiter import Waiter

log = logging.getLogger(__name__)

BATCH = 64  # messages per read of the ring at most, between turns of the loop
RETRY = 0.5  # seconds before reading again after a read or a wait failed
SKIP_MAX = 64  # chances to spin skipped, at most, after spins that found nothing
STREAK = 8  # requests answered inline, at most, between turns of the loop
SPIN_MAX_NS = 100_000  # the longest the loop spins, whatever the inbox's spin
BLOCKED_LOOK = 0.05  # seconds: a uds record that waits for the bridge is looked at again


class RingFeed:
    """Reads ``agent``'s ``inbox`` (its ring) on ``loop``; ``deliver(batch)`` takes what it read.

    Whenever the loop may sleep, either the waiter is armed or a read is on
    the loop's list (``_read``, ``_settle``, a retry), or the feed is paused
    (``taken``/``need`` read on) or stopped: no message is left unseen."""

    def __init__(
        self,
        agent: Agent,
        inbox: Any,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[Message]], None],
        requests_waiting: Callable[[], int],
        max_unread: int,
        waiter: Any = None,
    ) -> None:
        self.agent = agent
        self.loop = loop
        self.deliver = deliver
        self.requests_waiting = requests_waiting
        self.high = max_unread
        self.low = max_unread // 2
        self.backlog = 0  # delivered, not yet taken by recv
        self.paused = False  # holding max_unread: neither reading nor armed
        self.stopped = False
        self.armed = False  # the waiter waits: the loop leaves the ring alone
        # The waiter's thread spins as long as the inbox says; the loop, which
        # nothing else can use meanwhile, never longer than SPIN_MAX_NS.
        self.wait_spin_ns: int = inbox.spin_ns
        self.spin_ns = min(self.wait_spin_ns, SPIN_MAX_NS)
        self._reading = False  # a _read is on the loop's list
        self._settling = False  # a _settle is on the loop's list
        self._inline = False  # a request spun inline since _settle last ran
        self._streak = 0  # requests answered inline since the loop last turned
        self._skip = 0  # chances to spin left to skip (after spins that found nothing)
        self._backoff = 0  # the skip after the next spin that finds nothing
        self._resend: asyncio.TimerHandle | None = None
        self.waiter = Waiter(inbox) if waiter is None else waiter
        # The loop is the inbox's one reader now: the heartbeat thread's read
        # (for agents that never receive) would take messages no wake-up
        # tells the loop of. Resends fall due on the loop instead (sent()).
        agent.acks_on_beat = False
        try:
            attach = getattr(self.waiter, "attach", None)
            if attach is not None:
                attach(loop, self._woken)  # it watches its fd only while armed
            else:
                loop.add_reader(self.waiter.fd, self._woken)
        except BaseException:
            self.waiter.close()
            agent.acks_on_beat = True
            raise
        self._reading = True  # what came before, once the agent is made; then arm
        loop.call_soon(self._read)

    # ---------------------------------------------------------- the loop's side

    def taken(self, n: int) -> None:
        """The loop took ``n`` messages: read on once few are left."""
        self.backlog -= n
        if self.paused and self.backlog <= self.low:
            self._resume()

    def need(self) -> None:
        """A request waits for its answer: read, however full the loop is."""
        if self.paused:
            self._resume()

    def sent(self) -> None:
        """After a send from the loop: its resend, if it wants an ACK, falls due here."""
        if self._resend is None and self.agent.acks.pending and not self.stopped:
            self._schedule_resend()

    def spin_for(self, fut: asyncio.Future[Any]) -> bool:
        """Spin for the answer ``fut`` waits for, in ``request()`` right after
        its send; True if it came (``fut`` is done). Only for the agent's
        one waiting request, while the waiter is not armed, STREAK times
        between turns of the loop, and not while spins keep finding nothing."""
        if (
            self.armed
            or self.paused
            or self.stopped
            or not self.spin_ns
            or self._streak >= STREAK
            or self.requests_waiting() != 1
        ):
            return False
        if self._skip:
            self._skip -= 1
            return False
        self._inline = True
        if not self._settling:  # the loop reads, or arms, once it turns
            self._settling = True
            self.loop.call_soon(self._settle)
        self._spin()
        if not fut.done():
            return False
        self._streak += 1
        return True

    def is_alive(self) -> bool:
        return not self.waiter.closed

    async def halt(self, left: object = None) -> list[Message]:
        """Stop reading, stop the waiter's thread and close its eventfd (at
        once: it never blocks). Nothing is left over: every read was delivered."""
        self.stopped = True
        if self._resend is not None:
            self._resend.cancel()
            self._resend = None
        if not self.waiter.closed:
            self.loop.remove_reader(self.waiter.fd)
            self.waiter.close()
            self.agent.acks_on_beat = True
        return []

    # --------------------------------------------------------------- reading

    def _resume(self) -> None:
        self.paused = False
        if not self._reading:
            self._reading = True
            self.loop.call_soon(self._read)

    def _woken(self) -> None:
        """The eventfd: a frame came after the waiter was armed."""
        self.armed = False
        self.waiter.clear()
        self._read()

    def _read(self) -> None:
        """One batch from the ring, not waiting; another turn of the loop if
        there may be more, else :meth:`_settle` once what it woke has run."""
        self._reading = False
        if self.stopped or self.armed:
            return
        want = self._want()
        got = self._take(want, 0.0)
        if got is None:
            return
        if len(got) == want:  # maybe more: read on after what else is due
            self._reading = True
            self.loop.call_soon(self._read)
        elif not self._settling:
            self._settling = True
            self.loop.call_soon(self._settle)

    def _settle(self) -> None:
        """The ring was empty a turn ago: spin for the answers requests wait
        for, or arm the waiter. Once a request spun inline since the last
        time, wait one more turn: the task that sent it may send another."""
        self._settling = False
        self._streak = 0  # the loop turned
        if self.stopped or self.paused or self.armed:
            return
        if self._inline:
            self._inline = False
            self._settling = True
            self.loop.call_soon(self._settle)
            return
        spin = self.wait_spin_ns
        if self.spin_ns and self.requests_waiting():
            if self._skip:
                self._skip -= 1
            else:
                got = self._spin()
                if got is None:
                    return
                if got:  # what it woke runs first, then we look again
                    self._reading = True
                    self.loop.call_soon(self._read)
                    return
            spin = 0  # the loop spun already, or spins find nothing now
        self.armed = True
        try:
            self.waiter.arm(spin)
        except Exception as e:  # not expected: read now and then rather than never
            self.armed = False
            log.error(
                "agent %s: waiting on the inbox failed: %r; it is read every %ss",
                self.agent.name,
                e,
                RETRY,
            )
            self._retry()

    def _spin(self) -> list[Message] | None:
        """Read, spinning up to ``spin_ns`` for the first frame; spins that
        find nothing make the next chances to spin be skipped."""
        got = self._take(self._want(), self.spin_ns / 1e9)
        if got == []:
            self._backoff = self._skip = min(self._backoff * 2 or 1, SKIP_MAX)
        elif got:
            self._backoff = 0
        return got

    def _want(self) -> int:
        """How many messages the next read may take: 0 while the loop holds
        ``max_unread`` (one at a time then, if a request waits)."""
        room = self.high - self.backlog
        if room <= 0 and not self.requests_waiting():
            return 0
        return min(BATCH, max(room, 1))

    def _take(self, want: int, wait: float) -> list[Message] | None:
        """Read up to ``want`` (spinning up to ``wait`` seconds for the
        first) and deliver them; None when it must not read now (paused, or
        the read failed)."""
        if not want:
            self.paused = True  # not armed: taken() or need() reads on
            return None
        try:
            got = self.agent.recv_many(want, timeout=wait)
        except Exception as e:  # not expected: say so, retry later rather than spin
            log.error("agent %s: reading the inbox failed: %r", self.agent.name, e)
            self._retry()
            return None
        if self._resend is None and self.agent.acks.pending:
            self._schedule_resend()
        if got:
            self.backlog += len(got)
            self.deliver(got)
        return got

    def _retry(self) -> None:
        self._reading = True
        self.loop.call_later(RETRY, self._read)

    # ---------------------------------------------------------------- resends

    def _schedule_resend(self) -> None:
        due = self.agent.acks.next_due
        if math.isfinite(due):
            self._resend = self.loop.call_later(max(due - time.monotonic(), 0.0), self._resend_due)

    def _resend_due(self) -> None:
        self._resend = None
        if self.stopped:
            return
        acks = self.agent.acks
        acks.resend_due(time.monotonic())
        if acks.pending:
            self._schedule_resend()


class SocketWaiter:
    """A :class:`~shmbus.core.waiter.Waiter` for a uds inbox read through a
    :class:`~shmbus.transport.peer.Mux`: its epoll's fd is readable while a
    socket holds bytes, or once a record was set aside by another thread
    (the heartbeat's look for a link's counts, a verdict's reader: the Mux
    signals). No thread: the loop's own spin is all the spinning there is.
    The loop watches the fd only while armed: bytes the feed leaves unread
    (it holds ``max_unread``) must not wake it over and over."""

    def __init__(self, mux: Any) -> None:
        self.mux = mux
        self.fd: int = mux.fileno()
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: Callable[[], None] | None = None
        self._watching = False
        self._timer: threading.Timer | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, woken: Callable[[], None]) -> None:
        self._loop, self._woken = loop, woken

    def arm(self, spin_ns: int = 0) -> None:
        """Wake the loop for the next record: at once if one is here already
        (read ahead, or set aside), else when a socket is readable; a link's
        record that waits for the bridge is looked at again in a while."""
        mux = self.mux
        if mux.pending():
            if not any(link.blocked for link in mux.links()):
                mux.signal()
            elif self._timer is None or not self._timer.is_alive():
                self._timer = threading.Timer(BLOCKED_LOOK, mux.signal)
                self._timer.daemon = True
                self._timer.start()
        if not self._watching and self._loop is not None and self._woken is not None:
            self._loop.add_reader(self.fd, self._woken)
            self._watching = True

    def clear(self) -> bool:
        self._unwatch()
        self.mux._drain_wake()
        return True

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._watching = False

    def close(self) -> None:
        self._unwatch()
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
