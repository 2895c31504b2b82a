"""asyncio mirror of the agent: the same methods, as coroutines.

    import shmbus.aio

    async with await shmbus.aio.connect(bus="demo", name="web") as agent:
        reply = await agent.request("service", {"q": 1}, timeout=1.0)
        async for msg in agent:
            ...

The loop reads a shared-memory inbox itself, never waiting: a small C
thread waits on the inbox's doorbell and wakes the loop through an eventfd
(see :mod:`shmbus.aio.feed`). A uds inbox is read on the loop too: its
sockets sit behind one epoll whose fd the loop watches (``SocketWaiter``).
Any other inbox (the in-process transport) is read by a thread of its own
that hands messages over (:mod:`shmbus.aio.reader`).
RESPONSEs go straight to the ``request`` that waits for them, the rest to
``recv``. Sends are direct calls on the loop; one that would wait for room
in a full inbox ("block") waits in a thread of its own instead, so the loop
never blocks.

Cancelling ``recv`` loses nothing: the message stays for the next ``recv``.
Cancelling ``request`` abandons it: a response that comes later is dropped
(counted in ``late_responses``), never handed to ``recv``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..agent import agent as _agent
from ..core.message import DeadLetter, Message, MessageType, RoutingRule
from ..core.ring import Ring
from ..core.routes import validate_pattern
from ..core.stats import FAILED, BusStats, StatsSegment
from ..errors import Closed, InboxFull, RecvTimeout, RequestTimeout, ShmbusError
from ..transport.peer import Mux
from .feed import RingFeed, SocketWaiter
from .reader import MAX_UNREAD, Reader, join_left, off_loop

__all__ = ["Agent", "connect"]

log = logging.getLogger(__name__)

_REQUEST = int(MessageType.REQUEST)
_ANSWERS = (MessageType.RESPONSE, MessageType.ERROR)
_ABANDONED = 1 << 14  # ids of abandoned requests remembered, to drop their late answers


async def connect(
    bus: str | None = None, name: str | None = None, *, max_unread: int = MAX_UNREAD, **kw: Any
) -> Agent:
    """Join ``bus`` as ``name`` (the other arguments are :func:`shmbus.connect`'s).

    ``max_unread`` bounds the messages read from the inbox but not yet taken
    by ``recv``: past it the agent stops reading (unless a request awaits
    its response), and senders meet a full inbox."""
    if max_unread < 1:
        raise ValueError(f"max_unread is a count of messages, at least 1; got {max_unread}")
    left: set[threading.Thread] = set()
    sync = await off_loop(left, _agent.connect, bus, name, **kw)  # waits for the coordinator
    try:
        return Agent(sync, max_unread=max_unread)
    except BaseException:
        sync.close()
        raise


class Agent:
    """An asyncio face of a :class:`shmbus.Agent`, which it owns (and closes).

    Use it from the loop it was made in only. ``await close()`` (or ``async
    with``) when done: it stops what waits on the inbox and leaves the bus."""

    def __init__(self, agent: _agent.Agent, *, max_unread: int = MAX_UNREAD) -> None:
        self._agent = agent
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[Message] = collections.deque()  # for recv, in order
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._requests: dict[int, asyncio.Future[Message]] = {}
        self._abandoned: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Answers that came while a request's send was still off the loop, before
        # its id was known; matched once it is, else handed to recv.
        self._early: dict[int, Message] = {}
        self._sending_requests = 0
        self._left: set[threading.Thread] = set()
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        #: Responses that came after their request was cancelled or timed out.
        self.late_responses = 0
        # Batches a reader thread handed over, oldest first (a uds inbox).
        self._inbound: collections.deque[list[Message]] = collections.deque()
        self._feed: RingFeed | Reader
        inbox = agent.inbox
        mux = getattr(inbox, "source", None)
        if isinstance(inbox, Ring):
            self._feed = RingFeed(
                agent, inbox, self._loop, self._deliver, self._requests.__len__, max_unread
            )
        elif isinstance(mux, Mux):  # a uds inbox with direct links: sockets behind one epoll
            self._feed = RingFeed(
                agent,
                inbox,
                self._loop,
                self._deliver,
                self._requests.__len__,
                max_unread,
                SocketWaiter(mux),
            )
        else:
            self._feed = Reader(agent, self._hand, self._requests.__len__, max_unread)
            self._feed.start()

    @property
    def name(self) -> str:
        return self._agent.name

    @property
    def bus(self) -> str:
        return self._agent.bus

    @property
    def sync(self) -> _agent.Agent:
        """The synchronous agent underneath (its receiving side is this agent's)."""
        return self._agent

    # ------------------------------------------------------------ send

    async def _send(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A direct call when the recipient has room; else the wait goes off the loop."""
        if self._closed:
            self._check_open()
        policy = kw.get("backpressure") or self._agent.backpressure
        try:
            if policy == "error" and self._agent.link.kind != "shm":
                # uds: it waits for the bridge's verdict, a round trip: not on the loop
                return await off_loop(self._left, fn, *args, **kw)
            if policy != "block":
                return fn(*args, **kw)
            try:
                with self._try_now():
                    return fn(*args, **self._now_kw(kw))
            except InboxFull:
                self._unfail()  # full now: wait for room as "block" says, in a thread
            return await off_loop(self._left, fn, *args, **kw)
        finally:
            self._feed.sent()

    def _now_kw(self, kw: dict[str, Any]) -> dict[str, Any]:
        """A send that must not wait: "error" on shm (it raises when the inbox
        is full). A uds send keeps its policy, for the bridge to apply, and
        raises only if its socket is full (``_try_now``): "error" would wait
        for the bridge's verdict, a round trip with the loop blocked."""
        return kw if self._agent.link.kind != "shm" else {**kw, "backpressure": "error"}

    def _try_now(self) -> Any:
        no_wait = getattr(self._agent.outbox, "no_wait", None)
        return no_wait() if no_wait is not None else contextlib.nullcontext()

    def _unfail(self) -> None:
        """Take back the failure the outbox counted for a try that is not the
        send's end (the counter is unsigned: adding 2**64 - 1 subtracts one)."""
        StatsSegment.add(self._agent.outbox.counters, FAILED, (1 << 64) - 1)

    def _room(self, names: Sequence[str] | None, batch: bool) -> bool:
        """Can a send to these inboxes not wait? One frame fits in ``max_frame``;
        a batch is not known before it is packed, so it never counts as fitting."""
        if names is None or batch:
            return False
        peers = self._agent.outbox.peers
        for n in names:
            ring = peers.get(n)
            if ring is None or ring.capacity - ring.used < ring.max_frame:
                return False
        return True

    async def _maybe_off(
        self,
        names: Sequence[str] | None,
        batch: bool,
        fn: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> Any:
        """For the calls a "block" send cannot try without side effects (a
        publish dead-letters what a full subscriber refused at once; a batch
        sends part): direct when every target has room, else off the loop."""
        if self._closed:
            self._check_open()
        policy = kw.get("backpressure") or self._agent.backpressure
        try:
            if policy != "block" or self._room(names, batch):
                return fn(*args, **kw)
            return await off_loop(self._left, fn, *args, **kw)
        finally:
            self._feed.sent()

    async def send(self, recipient: str, payload: Any, **kw: Any) -> int:
        """:meth:`shmbus.Agent.send`, never blocking the loop."""
        return await self._send(self._agent.send, recipient, payload, **kw)  # type: ignore[no-any-return]

    async def send_many(self, recipient: str, payloads: Sequence[Any], **kw: Any) -> list[int]:
        """:meth:`shmbus.Agent.send_many`; under "block", in a thread."""
        return await self._maybe_off(  # type: ignore[no-any-return]
            [recipient], True, self._agent.send_many, recipient, payloads, **kw
        )

    async def publish(self, topic: str, payload: Any, **kw: Any) -> int:
        """:meth:`shmbus.Agent.publish`; in a thread when a subscriber is (nearly) full."""
        # Known to the shm outbox once it routed the topic (a uds one routes in the bridge).
        names = getattr(self._agent.outbox, "subscribers", {}).get(topic)
        return await self._maybe_off(names, False, self._agent.publish, topic, payload, **kw)  # type: ignore[no-any-return]

    async def publish_many(self, topic: str, payloads: Sequence[Any], **kw: Any) -> list[int]:
        """:meth:`shmbus.Agent.publish_many`; under "block", in a thread."""
        return await self._maybe_off(  # type: ignore[no-any-return]
            None, True, self._agent.publish_many, topic, payloads, **kw
        )

    async def subscribe(self, pattern: str) -> None:
        await off_loop(self._left, self._agent.subscribe, validate_pattern(pattern))

    async def unsubscribe(self, pattern: str) -> None:
        await off_loop(self._left, self._agent.unsubscribe, validate_pattern(pattern))

    async def reply(self, msg: Message, payload: Any, **kw: Any) -> int:
        """Answer a REQUEST."""
        return await self._send(self._agent.reply, msg, payload, **kw)  # type: ignore[no-any-return]

    # --------------------------------------------------------- request

    async def request(
        self, recipient: str, payload: Any, timeout: float = 1.0, **kw: Any
    ) -> Message:
        """Send a REQUEST and await its RESPONSE (or ERROR); :class:`RequestTimeout`.

        Many may wait at once. Cancelled or timed out, the request is
        abandoned: its late response is dropped, never handed to ``recv``."""
        if self._closed:
            self._check_open()
        loop = self._loop
        deadline = loop.time() + timeout
        send = self._agent.send_kind
        kw.setdefault("timeout", timeout)
        policy = kw.get("backpressure") or self._agent.backpressure
        waited = False
        if policy == "error" and self._agent.link.kind != "shm":  # a verdict: off the loop
            msg_id = await self._send_request_off_loop(send, recipient, payload, kw)
            waited = True
        elif policy != "block":
            msg_id = send(recipient, payload, _REQUEST, **kw)
        else:
            try:  # the common case, inline: room in the inbox, no wait
                with self._try_now():
                    msg_id = send(recipient, payload, _REQUEST, **self._now_kw(kw))
            except InboxFull:
                self._unfail()
                msg_id = await self._send_request_off_loop(send, recipient, payload, kw)
                waited = True
        fut = self._requests[msg_id] = loop.create_future()
        if waited:  # its answer may have come before its id was known
            self._sending_requests -= 1
            early = self._early.pop(msg_id, None)
            if early is not None:
                del self._requests[msg_id]  # answered: it waits no more
                self._feed.taken(1)
                fut.set_result(early)
            if not self._sending_requests:
                self._release_early()
        self._feed.need()
        self._feed.sent()
        if not fut.done() and self._feed.spin_for(fut):
            return fut.result()  # answered while it spun: no timer, no turn of the loop
        timer = loop.call_at(deadline, _expire, fut, recipient, timeout, self.name)
        try:
            return await fut
        except BaseException:
            if self._requests.pop(msg_id, None) is not None:
                self._abandon(msg_id)
            raise
        finally:
            timer.cancel()

    async def _send_request_off_loop(
        self, send: Callable[..., int], recipient: str, payload: Any, kw: dict[str, Any]
    ) -> int:
        """Send a REQUEST that waits for room, in a thread. Until its id is
        known, answers with no request to go to are held in ``_early``; on
        success the caller registers the request, then counts it sent."""
        loop = self._loop
        state: dict[str, Any] = {}  # "cancelled", "id": touched on the loop only

        def abandoned(msg_id: int) -> None:  # the task is gone: drop its answer
            self._sending_requests -= 1
            if msg_id:
                if self._early.pop(msg_id, None) is not None:
                    self._feed.taken(1)
                    self.late_responses += 1
                else:
                    self._abandon(msg_id)
            if not self._sending_requests:
                self._release_early()

        def sent(msg_id: int) -> None:  # on the loop, once the thread's send ended
            state["id"] = msg_id
            if state.get("cancelled"):
                abandoned(msg_id)

        def run() -> int:
            msg_id = 0
            try:
                msg_id = send(recipient, payload, _REQUEST, **kw)
                return msg_id
            finally:
                loop.call_soon_threadsafe(sent, msg_id)

        self._sending_requests += 1
        try:
            return await off_loop(self._left, run)  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            state["cancelled"] = True
            if "id" in state:  # the send ended already: its answer may be on the way
                abandoned(state["id"])
            raise
        except BaseException:
            self._sending_requests -= 1
            if not self._sending_requests:
                self._release_early()
            raise

    def _abandon(self, msg_id: int) -> None:
        self._abandoned[msg_id] = None
        if len(self._abandoned) > _ABANDONED:
            self._abandoned.popitem(last=False)

    def _release_early(self) -> None:
        """Answers nobody claimed once no request send is under way: for recv."""
        early, self._early = self._early, {}
        self._queue.extend(early.values())
        self._wake(len(early))

    # --------------------------------------------------------- receive

    def _hand(self, batch: list[Message]) -> None:
        """In a reader thread: pass ``batch`` to the loop."""
        self._inbound.append(batch)
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        inbound = self._inbound
        while inbound:
            self._deliver(inbound.popleft())

    def _deliver(self, batch: list[Message]) -> None:
        """On the loop: a batch read from the inbox."""
        requests = self._requests
        queue = self._queue
        dropped = added = 0
        for msg in batch:
            if msg.type in _ANSWERS and msg.request_id:
                rid = msg.request_id
                fut = requests.pop(rid, None)
                if fut is not None:
                    dropped += 1
                    if not fut.done():
                        fut.set_result(msg)
                    continue
                if rid in self._abandoned:
                    del self._abandoned[rid]
                    dropped += 1
                    self.late_responses += 1
                    log.debug(
                        "agent %s dropped a late response to request %d from %s",
                        self.name,
                        rid,
                        msg.sender,
                    )
                    continue
                if self._sending_requests:
                    self._early[rid] = msg
                    continue
            queue.append(msg)
            added += 1
        if dropped:
            self._feed.taken(dropped)
        if added:
            self._wake(added)

    def _wake(self, n: int) -> None:
        """Wake up to ``n`` waiting receivers (each takes what it finds)."""
        waiters = self._waiters
        while n and waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    async def _wait(self, deadline: float | None, timeout: float | None) -> None:
        """Until a message is queued; RecvTimeout at ``deadline`` (loop time)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        timer = None
        if deadline is not None:
            timer = self._loop.call_at(deadline, _time_out, fut, self.name, timeout)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._wake(1)  # woken, but leaving: the message is for another
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _take(self) -> Message | None:
        """The next queued message still in its TTL (an expired one goes to the DLQ)."""
        msg = self._queue.popleft()
        self._feed.taken(1)
        if msg.ttl is not None and self._agent.expired(msg):
            return None
        return msg

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message; :class:`shmbus.RecvTimeout` after ``timeout`` seconds,
        :class:`shmbus.Closed` once the agent is closed."""
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            while self._queue:
                msg = self._take()
                if msg is not None:
                    return msg
            self._check_open()
            await self._wait(deadline, timeout)

    async def recv_many(self, max_count: int, timeout: float | None = None) -> list[Message]:
        """Up to ``max_count`` messages; waits only while there is none; ``[]`` on timeout."""
        deadline = None if timeout is None else self._loop.time() + timeout
        out: list[Message] = []
        while True:
            while self._queue and len(out) < max_count:
                msg = self._take()
                if msg is not None:
                    out.append(msg)
            if out or max_count <= 0:
                return out
            self._check_open()
            try:
                await self._wait(deadline, timeout)
            except RecvTimeout:
                return out

    def __aiter__(self) -> Agent:
        return self

    async def __anext__(self) -> Message:
        """Messages as they come; ends when the agent is closed."""
        try:
            return await self.recv()
        except Closed:
            raise StopAsyncIteration from None

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"agent {self.name!r} is closed")

    # ---------------------------------------------------------- routing

    def route(self, rule: RoutingRule, handler: Callable[[Message], Any]) -> None:
        """Have ``serve()`` hand what ``rule`` matches to ``handler`` (a plain
        function or a coroutine function); as :meth:`shmbus.Agent.route`."""
        self._agent.router.add(rule, handler)

    async def dispatch(self, msg: Message) -> int:
        """Run (and await) the handlers whose rules match ``msg``; how many ran."""
        router = self._agent.router
        handlers = router.handlers(msg)
        for handler in handlers:
            try:
                result = handler(msg)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as e:  # a handler's failure must not stop the agent
                router.failed(msg, handler, e)
                if msg.type == MessageType.REQUEST:
                    await self._answer_error(msg, e)
                continue
            if result is not None and msg.type == MessageType.REQUEST:
                await self.reply(msg, result)
        if not handlers:
            router.unrouted(msg)
        return len(handlers)

    async def _answer_error(self, msg: Message, error: Exception) -> None:
        """Tell a requester its request failed, as the sync agent does, off the loop if need be."""
        try:
            await self._send(self._agent.send_error, msg, error)
        except ShmbusError as e:  # the requester left: the DLQ entry is what remains
            log.info("agent %s could not answer %s with an error: %s", self.name, msg.sender, e)

    async def serve(self, timeout: float | None = None) -> None:
        """Dispatch to the routed handlers, one message at a time, until the
        agent is closed (or, with ``timeout``, nothing arrives for that long)."""
        while True:
            try:
                msg = await self.recv(timeout)
            except (Closed, RecvTimeout):
                return
            await self.dispatch(msg)

    def on_peer_death(self, callback: Callable[[str], Any]) -> None:
        """``callback(name)`` on the loop when another agent dies (may be a coroutine function)."""
        self._agent.on_peer_death(lambda *args: self._call_on_loop(callback, args))

    def on_peer_hung(self, callback: Callable[[str, bool], Any]) -> None:
        """``callback(name, hung)`` on the loop, as :meth:`shmbus.Agent.on_peer_hung`."""
        self._agent.on_peer_hung(lambda *args: self._call_on_loop(callback, args))

    def _call_on_loop(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        def run() -> None:
            result = callback(*args)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)

        self._loop.call_soon_threadsafe(run)

    # ---------------------------------------------- stats, DLQ, history

    def peers(self) -> list[str]:
        """The agents on the bus now (shared memory: no wait)."""
        return self._agent.peers()

    async def wait_acked(self, timeout: float | None = None) -> bool:
        """Until every message sent with ``requires_ack`` is acknowledged or
        dead-lettered (ACKs are taken in as the inbox is read); False
        if some are still out after ``timeout``."""
        deadline = None if timeout is None else self._loop.time() + timeout
        while self._agent.acks.pending:
            if deadline is not None and self._loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def keep_history(self, pattern: str, n: int) -> None:
        """:meth:`shmbus.Agent.keep_history`."""
        await off_loop(self._left, self._agent.keep_history, pattern, n)

    async def history(self, pattern: str, n: int | None = None) -> list[Message]:
        """:meth:`shmbus.Agent.history`."""
        return await off_loop(self._left, self._agent.history, pattern, n)  # type: ignore[no-any-return]

    def stats(self) -> BusStats:
        """Every counter of the bus now (shared memory: no wait). On uds, a
        control call, and without the sync agent's wait for the bridge to
        handle this agent's sends (which could hold the loop)."""
        return self._agent.link.stats(self._agent.bus)

    async def dlq(self, limit: int = 1000) -> list[DeadLetter]:
        """The newest entries of the bus's dead-letter queue, oldest first."""
        return await off_loop(self._left, self._agent.dlq, limit)  # type: ignore[no-any-return]

    # ----------------------------------------------------------- close

    async def close(self) -> None:
        """Stop reading, end what waits (:class:`shmbus.Closed`), leave the
        bus. Messages read but not handed over go to the DLQ. Idempotent."""
        if self._closing is None:
            self._closed = True
            # A task of its own: a caller cancelled meanwhile must not cut it
            # short, which left the agent on the bus (its inbox, registration
            # and threads) with every later close() returning at once.
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        """The body of :meth:`close`, run once, as a task."""
        after = await self._feed.halt(self._left)
        self._drain()  # what a reader thread handed over last
        error = Closed(f"agent {self.name!r} was closed")
        waiting: list[asyncio.Future[Any]] = [*self._waiters, *self._requests.values()]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()
        self._requests.clear()
        await join_left(self._left, 5.0)
        unread = [*self._queue, *self._early.values(), *after]
        self._queue.clear()
        self._early.clear()
        if self._feed.is_alive():  # wedged: its agent is not ours to close under it
            log.error("agent %s: its reader did not stop; not closed", self.name)
            return
        # The sync agent dead-letters what it kept; these are its to keep.
        self._agent.give_back(unread)
        await off_loop(self._left, self._agent.close)

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<shmbus.aio.Agent {self.name!r} on bus {self.bus!r}{state}>"


def _expire(fut: asyncio.Future[Message], recipient: str, timeout: float, name: str) -> None:
    if not fut.done():
        fut.set_exception(
            RequestTimeout(f"agent {name!r}: no response from {recipient!r} within {timeout}s")
        )


def _time_out(fut: asyncio.Future[None], name: str, timeout: float | None) -> None:
    if not fut.done():
        fut.set_exception(RecvTimeout(f"agent {name!r}: nothing arrived within {timeout}s"))
