"""The receiving half of :class:`~shmbus.agent.Agent`: the read-ahead from
the inbox (one C read and one C decode per block), what may be handed over
(TTL, duplicates of acked messages), the ACKs it owes, and the bus's events.

A mixin of the Agent class, not a helper object: ``recv`` stays one method
call deep. It uses the Agent's inbox, its ack tracker (``_acks``) and the
``send_kind`` and ``_dead_letter`` of the sending and DLQ sides.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._decode import decode_block as _decode_block
from ..core.message import (
    Message,
    MessageType,
    decode_frame,
    encode_message,
)
from ..errors import (
    Closed,
    CorruptFrame,
    RecvTimeout,
    ShmbusError,
)
from ..transport import Outbox
from .acks import ACK_BATCH, Acks

log = logging.getLogger(__name__)

_CONTROL = MessageType.CONTROL
_ACK = MessageType.ACK
_READ_AHEAD = 64  # frames taken from the inbox per C call when they are there
_SERVICE_AHEAD = 1024  # read-ahead the heartbeat thread leaves alone (see _service_acks)


class Receiver:
    """Agent methods that receive (see the module docstring)."""

    # The Agent's state this half works on (set in Agent.__init__).
    name: str
    inbox: Any  # the transport's Inbox
    _out: Outbox
    _acks: Acks
    _closed: bool
    _reading: threading.Lock  # the inbox has one reader at a time
    _events: collections.deque[Any]
    _decode_state: Any
    _ahead: collections.deque[Message]
    _kept: collections.deque[Message]
    _to_ack: dict[str, list[int]]
    _death_callbacks: list[Callable[[str], Any]]
    _hung_callbacks: list[Callable[[str, bool], Any]]

    def send_kind(self, recipient: str, payload: Any, kind: int, *args: Any, **kw: Any) -> int:
        raise NotImplementedError  # the Agent's (Sender)

    def _dead_letter(self, frame: bytes, reason: str) -> None:
        raise NotImplementedError  # the Agent's

    def _fill(self, max_count: int, timeout: float | None) -> bool:
        """Decode up to ``max_count`` frames from the inbox into ``_ahead``, in
        one read and one C decode; corrupt frames are logged and skipped.
        False if nothing arrived within ``timeout``."""
        if self._to_ack:
            self._flush_acks()  # before a wait: what was handed over is acked now
        if self._events:
            self._run_events()
        with self._reading:  # the heartbeat thread's _service_acks reads too
            return self._read_ahead(max_count, timeout, self._bus_event)

    def _service_acks(self) -> None:
        """From the heartbeat thread: an agent that only sends still takes in
        its ACKs and resends what falls due, though it never calls a
        receiving method. Only while none runs (they do this themselves), and
        not past a backlog the application has yet to receive: the inbox then
        fills and its senders feel it, as they should."""
        acks = getattr(self, "_acks", None)  # None: still connecting
        if acks is None or not acks.pending or len(self._ahead) >= _SERVICE_AHEAD:
            return
        if not self._reading.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._read_ahead(_READ_AHEAD, 0, self._events.append)
        finally:
            self._reading.release()
        acks.resend_due(time.monotonic())

    def _run_events(self) -> None:
        """Notices the heartbeat thread read: their callbacks run here, in the
        receiving thread, as documented."""
        while self._events:
            self._bus_event(self._events.popleft())

    def _read_ahead(
        self, max_count: int, timeout: float | None, on_event: Callable[[Any], Any]
    ) -> bool:
        inbox = self.inbox
        n = inbox.read_block(max_count, timeout)
        if n > 0:
            try:
                items = _decode_block(inbox.scratch_view, inbox.lens_view, n, self._decode_state)
            except BaseException:
                # No memory, or Ctrl-C inside a payload's decoding: the frames
                # are off the ring already, so keep what decodes, then raise.
                self._salvage(inbox._split(n))
                raise
        elif n < 0:  # one frame larger than the scratch, copied once from the ring
            try:
                items = [decode_frame(inbox.read(0))]
            except CorruptFrame as e:
                items = [str(e)]
        else:
            return False
        ahead = self._ahead
        for item in items:
            if type(item) is str:
                log.warning("agent %s dropped a corrupt frame: %s", self.name, item)
            elif item.type is _ACK:  # for our sending side, not for recv
                ids = item.payload
                for msg_id in ids if isinstance(ids, list) else (item.request_id,):
                    self._acks.acked(msg_id)
            elif item.type is _CONTROL and not item.sender:
                on_event(item.payload)  # from the coordinator: not for recv
            else:
                ahead.append(item)
        return True

    def on_peer_death(self, callback: Callable[[str], Any]) -> None:
        """Call ``callback(name)`` when another agent of the bus dies (its
        process ends without leaving). It runs in the thread that receives,
        from inside ``recv`` and the other receiving calls."""
        self._death_callbacks.append(callback)

    def on_peer_hung(self, callback: Callable[[str, bool], Any]) -> None:
        """Call ``callback(name, True)`` when another agent stops beating (the
        coordinator's ``--heartbeat-timeout``: a stopped or wedged process),
        and ``callback(name, False)`` when it beats again. Runs like
        :meth:`on_peer_death`'s callbacks."""
        self._hung_callbacks.append(callback)

    def _bus_event(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("agent"), str):
            return  # noise: nothing for us
        kind, name = event.get("event"), event["agent"]
        if kind == "peer_died":
            self._out.fresh()  # its routes are gone already: drop our cached ones
            calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]
            calls = [(cb, (name,)) for cb in self._death_callbacks]
        elif kind in ("peer_hung", "peer_resumed"):
            calls = [(cb, (name, kind == "peer_hung")) for cb in self._hung_callbacks]
        else:
            return  # a newer coordinator's event
        for callback, args in calls:
            try:
                callback(*args)
            except Exception as e:  # a callback's failure must not stop the agent
                log.warning("agent %s: %s callback %r failed: %r", self.name, kind, callback, e)

    def _salvage(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                self._ahead.append(decode_frame(frame))
            except Exception as e:  # CorruptFrame, or whatever failed the block
                log.warning("agent %s dropped a frame it could not decode: %s", self.name, e)

    def _next(self, timeout: float | None) -> Message:
        """The next message from the inbox, read ahead: what is already there
        comes in one C call, and a reader that keeps up gets one frame a call.
        Resends of unacknowledged messages fall due while it waits."""
        ahead = self._ahead
        if ahead:
            return ahead.popleft()
        acks = self._acks
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            wait = left
            if acks.pending:  # wake for the next resend
                due = max(acks.next_due - time.monotonic(), 0.0)
                wait = due if wait is None else min(wait, due)
            got = self._fill(_READ_AHEAD, wait)
            if acks.pending:
                acks.resend_due(time.monotonic())
            if ahead:
                return ahead.popleft()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 and not got:
                    raise RecvTimeout(f"agent {self.name!r}: nothing arrived within {timeout}s")
                left = max(left, 0.0)

    def _accept(self, msg: Message) -> bool:
        """May ``msg`` be handed over? Not past its TTL (to the DLQ), nor a
        copy of an acknowledged message handed over before (acked again)."""
        if msg.ttl is not None and self._expired(msg):
            return False
        if msg.requires_ack and not self._acks.first_time(msg.id):
            self._ack(msg)  # our first ACK may have been lost: the sender resent
            return False
        return True

    def _ack(self, msg: Message) -> None:
        """Acknowledge ``msg``: gathered per sender, sent ``ACK_BATCH`` at a time
        or before this agent waits (whichever first), so one ACK message
        carries many."""
        ids = self._to_ack.get(msg.sender)
        if ids is None:
            ids = self._to_ack[msg.sender] = []
        ids.append(msg.id)
        if len(ids) >= ACK_BATCH or not self._ahead:
            self._flush_acks()

    def _flush_acks(self) -> None:
        to_ack, self._to_ack = self._to_ack, {}
        for sender, ids in to_ack.items():
            try:
                self.send_kind(sender, ids, int(_ACK), ids[0], timeout=0, backpressure="error")
            except ShmbusError as e:  # gone, or its inbox full: it resends, we ack the copy
                log.info(
                    "agent %s could not ack %d messages to %s: %s", self.name, len(ids), sender, e
                )

    def _expired(self, msg: Message) -> bool:
        """Is ``msg`` past its TTL? Then it goes to the DLQ, never to the caller."""
        now = time.time()
        if now <= msg.timestamp + msg.ttl:
            return False
        late = now - msg.timestamp - msg.ttl
        self._dead_letter(
            encode_message(msg), f"expired: ttl {msg.ttl}s ran out {late:.3f}s before delivery"
        )
        return True

    def _receive(self, timeout: float | None) -> Message:
        """The next message to hand over (not acked yet)."""
        deadline = None
        while True:
            if self._kept:
                msg = self._kept.popleft()
            elif self._ahead:
                msg = self._ahead.popleft()
            else:
                left = timeout if deadline is None else max(deadline - time.monotonic(), 0.0)
                msg = self._next(left)
            if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                return msg
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout

    def recv(self, timeout: float | None = None) -> Message:
        """The next message, waiting up to ``timeout`` (None: forever); :class:`RecvTimeout`.

        A message past its TTL is never handed over: it goes to the DLQ
        ("expired"). One sent with ``requires_ack`` is acknowledged as it is
        handed over, and handed over once however often it was resent.
        """
        ahead = self._ahead
        if ahead and not self._kept:  # the common case, with no call deeper
            msg = ahead.popleft()
            if msg.ttl is None and not msg.requires_ack:
                return msg
            ahead.appendleft(msg)  # the full path decides
        msg = self._receive(timeout)
        if msg.requires_ack:
            self._ack(msg)
        return msg

    def recv_many(self, max_count: int, timeout: float | None = None) -> list[Message]:
        """Up to ``max_count`` messages; waits only while there is none; ``[]`` on timeout."""
        out: list[Message] = []
        for queue in (self._kept, self._ahead):
            while queue and len(out) < max_count:
                msg = queue.popleft()
                if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                    out.append(msg)
        if len(out) < max_count:
            deadline = None if timeout is None else time.monotonic() + timeout
            left = 0 if out else timeout
            while self._fill(max_count - len(out), left):
                ahead = self._ahead
                while ahead and len(out) < max_count:
                    msg = ahead.popleft()
                    if (msg.ttl is None and not msg.requires_ack) or self._accept(msg):
                        out.append(msg)
                if out or deadline is None and left == 0:
                    break
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if self._acks.pending:
            self._acks.resend_due(time.monotonic())
        for msg in out:
            if msg.requires_ack:
                self._ack(msg)
        if self._to_ack:
            self._flush_acks()
        return out

    def wait_acked(self, timeout: float | None = None) -> bool:
        """Receive (and resend) until every message sent with ``requires_ack``
        is acknowledged or dead-lettered; False if some are still out after
        ``timeout``. Other messages that arrive meanwhile stay for ``recv``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        acks = self._acks
        while acks.pending:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = max(acks.next_due - now, 0.0)
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._fill(_READ_AHEAD, wait)
            acks.resend_due(time.monotonic())
        return True

    def __iter__(self) -> Iterator[Message]:
        """Messages as they come; ends when the agent is closed."""
        while not self._closed:
            try:
                yield self.recv(timeout=0.2)
            except RecvTimeout:
                continue
            except Closed:
                return
