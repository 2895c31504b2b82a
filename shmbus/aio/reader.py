"""The threads behind :mod:`shmbus.aio`: an inbox reader, and calls that may block.

An asyncio agent whose inbox is not a shared-memory ring (the uds
transport's socket) has one reader thread that waits in the synchronous
agent's receive path and hands what it read to the loop in batches, one
wake-up of the loop for many messages. (A ring inbox is read on the loop
itself: :mod:`shmbus.aio.feed`.) It stops reading while the loop holds
``max_unread`` messages and no request waits, so the inbox fills and
senders feel the backpressure instead of Python buffering without bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..agent.agent import Agent
from ..core.message import Message, encode_message
from ..errors import Closed

log = logging.getLogger(__name__)

#: Unread messages the loop may hold, by default, before the reader stops
#: reading; it goes on once half of them are taken.
MAX_UNREAD = 4096
BATCH = 64  # messages per read, and per wake-up of the loop, at most
IDLE = 0.5  # seconds a read waits at most: resends fall due, a stop is seen


class Reader(threading.Thread):
    """Reads the agent's inbox for the loop; ``hand(batch)`` passes a batch over."""

    def __init__(
        self,
        agent: Agent,
        hand: Callable[[list[Message]], None],
        requests_waiting: Callable[[], int],
        max_unread: int,
    ) -> None:
        super().__init__(name=f"shmbus-aio-reader-{agent.name}", daemon=True)
        self.agent = agent
        self.hand = hand
        self.requests_waiting = requests_waiting
        self.high = max_unread
        self.low = max_unread // 2
        self.cond = threading.Condition()
        self.backlog = 0  # handed to the loop, not yet taken by recv (under cond)
        self.paused = False
        self.stopping = False

    # ------------------------------------------------------ loop's side

    def taken(self, n: int) -> None:
        """The loop took ``n`` messages: the reader may go on once few are left."""
        with self.cond:
            self.backlog -= n
            if self.paused and self.backlog <= self.low:
                self.cond.notify()

    def need(self) -> None:
        """A request waits for its response: read, however full the loop is."""
        if self.paused:
            with self.cond:
                self.cond.notify()

    def sent(self) -> None:
        """A send from the loop: this thread resends what falls due itself."""

    def spin_for(self, fut: asyncio.Future[Any]) -> bool:
        """A request's answer comes from this thread: the loop never spins for it."""
        return False

    async def halt(self, left: set[threading.Thread]) -> list[Message]:
        """:meth:`stop`, off the loop; what was read after it."""
        return await off_loop(left, self.stop, 5.0)  # type: ignore[no-any-return]

    def stop(self, timeout: float) -> list[Message]:
        """Have the thread end (blocking up to ``timeout``: run it off the loop);
        it sees the stop within its read's wait (IDLE). Nothing is read after
        it: what is left stays in the inbox, as for a closing sync agent."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join(timeout)
        return []

    # ---------------------------------------------------- thread's side

    def _wait_for_room(self) -> bool:
        """Wait while the loop holds enough unread; False when told to stop."""
        acks = self.agent.acks
        with self.cond:
            while self.backlog >= self.high and not self.stopping and not self.requests_waiting():
                self.paused = True
                self.cond.wait(IDLE)
                if acks.pending:  # our own unacknowledged sends still fall due
                    acks.resend_due(time.monotonic())
            self.paused = False
            return not self.stopping

    def run(self) -> None:
        agent = self.agent
        acks = agent.acks
        name = agent.name
        while self._wait_for_room():
            wait = IDLE
            if acks.pending:  # wake for the next resend
                wait = min(wait, max(acks.next_due - time.monotonic(), 0.0))
            try:
                got = agent.recv_many(min(BATCH, max(self.high - self.backlog, 1)), timeout=wait)
            except Closed:
                return
            except Exception as e:  # not expected: say so, do not spin on it, go on
                log.error("agent %s: reading the inbox failed: %r", name, e)
                time.sleep(0.05)
                continue
            if not got:
                continue
            batch = got
            with self.cond:
                self.backlog += len(batch)
            try:
                self.hand(batch)
            except RuntimeError:  # the loop is closed: nobody will take them
                log.error(
                    "agent %s: its event loop closed while %d messages came; they go to the DLQ",
                    name,
                    len(batch),
                )
                for msg in batch:
                    agent.dead_letter(encode_message(msg), "unread: its event loop closed")
                return


async def off_loop(
    left: set[threading.Thread], fn: Callable[..., Any], *args: Any, **kw: Any
) -> Any:
    """``fn(*args, **kw)`` in a thread of its own, awaited: for calls that may
    block (a full inbox under "block", the coordinator). A thread per call,
    not a pool: these calls are rare. A cancelled task leaves the call to
    finish on its own (bounded by its timeout); its thread goes in ``left``."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            result = fn(*args, **kw)
        except BaseException as e:  # handed to the awaiting task
            ok, value = False, e
        else:
            ok, value = True, result
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop closed meanwhile: nobody awaits it
            pass

    thread = threading.Thread(target=run, name=f"shmbus-aio-{fn.__name__}", daemon=True)
    thread.start()
    try:
        return await fut
    except asyncio.CancelledError:
        left.add(thread)
        raise
    finally:
        if fut.done() and not fut.cancelled():
            thread.join()  # it has handed its result over: its last step


async def join_left(left: set[threading.Thread], timeout: float) -> None:
    """Let the calls cancelled tasks left running finish, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for t in [t for t in left if not t.is_alive()]:
            left.discard(t)
        if not left or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.01)
