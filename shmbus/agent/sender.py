"""The sending half of :class:`~shmbus.agent.Agent`: send, publish, their
batches, requests' and replies' frames, and the backpressure policy.

A mixin of the Agent class, not a helper object: the hot paths stay one
method call deep. It uses the Agent's transport (``_out``, the fast paths'
caches ``_direct`` and ``_topics``) and its ack tracker (``_acks``).
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._native import lib
from ..core.message import (
    FLAG_ACK,
    FLAG_RAW,
    MessageType,
    PayloadPacker,
    pack_payload,
)
from ..core.ring import _ns
from ..errors import UnknownRecipient
from ..transport import Outbox
from ..transport.shm_outbox import check_policy, pack_many
from .acks import Acks

log = logging.getLogger(__name__)

_send = lib.shmbus_send
_send_ex = lib.shmbus_send_ex
_DIRECT = int(MessageType.DIRECT)
_PUBLISH = int(MessageType.PUBLISH)


class _AgentDefault:
    def __repr__(self) -> str:
        return "<the agent's send_timeout>"


_DEFAULT: Any = _AgentDefault()  # "timeout not given": the agent's own applies


class _Waited(NamedTuple):
    """What a ``wait_for_recipient`` wait leaves for the send: the wait for
    room (``left``), and for the error if the name never came."""

    left: float | None
    seconds: float
    limit: float | None


class Sender:
    """Agent methods that send (see the module docstring)."""

    # The Agent's state this half works on (set in Agent.__init__).
    _out: Outbox
    _acks: Acks
    _direct: dict[str, Any]  # the outbox's fast-path caches, filled and cleared in place
    _topics: dict[str, Any]
    _payload_packer: PayloadPacker | None  # connect's default=, if given

    def _repack(self, payload: Any, refused: TypeError) -> tuple[bytes, int]:
        """A payload the module's packer ``refused``: packed with connect's
        ``default=``, or that refusal raised again (it names the type and ``default=``)."""
        if self._payload_packer is None:
            raise refused
        return self._payload_packer.again(payload, refused)

    def send(
        self,
        recipient: str,
        payload: Any,
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
        wait_for_recipient: bool = False,
    ) -> int:
        """Send one message to the agent ``recipient``; returns its id.

        A full inbox is met with the agent's backpressure policy (see
        :func:`connect`), or ``backpressure`` and ``timeout`` (None: wait as
        long as it takes) if given. Raises :class:`UnknownRecipient` (and
        dead-letters the message) for a name nobody has; with
        ``wait_for_recipient=True``, first waits for the name to join, up to
        ``timeout`` (the agent's send_timeout by default; None: as long as
        it takes).
        """
        if type(payload) is bytes:
            data, flags = payload, FLAG_RAW
        else:
            try:  # costs nothing unless it raises: then connect's default= has a go
                data, flags = pack_payload(payload)
            except TypeError as refused:
                data, flags = self._repack(payload, refused)
        if requires_ack:
            flags |= FLAG_ACK
        rt = self._direct.get(recipient)
        if rt is not None:
            # The fast path: one C call. Anything unusual (a moved table, a
            # full inbox, a bad field, a signal) goes the whole way below.
            try:
                rc = _send(
                    rt,
                    _DIRECT,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    self._wait_ns
                    if timeout is _DEFAULT and backpressure is None
                    else self._policy(timeout, backpressure)[2],
                )
                if rc > 0:
                    if requires_ack:
                        self._track(rc, recipient, _DIRECT, data, flags, priority, ttl)
                    return rc  # type: ignore[no-any-return]
            except (TypeError, OverflowError, ValueError):
                rc = 0  # a field of the wrong type or range: the full path says which
        else:
            rc = 0
        policy, wait, _ = self._policy(timeout, backpressure)
        on_sent = self._tracker(recipient, _DIRECT, priority, ttl) if requires_ack else None
        waited = None
        if wait_for_recipient:  # off the fast path: no route to it was cached
            waited = self._await_recipient(recipient, timeout, policy)
            wait = waited.left
        return self._deliver(
            recipient, _DIRECT, data, flags, priority, ttl, wait, 0, 0, policy, rc, on_sent, waited
        )

    def _deliver(
        self,
        recipient: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: Any,
        ttl: float | None,
        wait: Any,
        request_id: int,
        correlation_id: int,
        policy: str,
        rc: int,
        on_sent: Any,
        waited: _Waited | None = None,
    ) -> int:
        """The outbox's whole send path (past the one-call fast path). After
        a ``wait_for_recipient`` wait (``waited``), an UnknownRecipient says
        how long it waited."""
        try:
            return self._out.send(
                recipient,
                kind,
                data,
                flags,
                priority,
                ttl,
                wait,
                request_id,
                correlation_id,
                policy,
                rc,
                on_sent,
            )
        except UnknownRecipient as e:
            if waited is None:
                raise
            raise UnknownRecipient(
                f"{e}, after waiting {waited.seconds:.3g}s for it to join "
                f"(wait_for_recipient; the timeout was {waited.limit}s): is it started, and "
                "under that name?"
            ) from None

    def _await_recipient(self, name: str, timeout: Any, policy: str) -> _Waited:
        """``wait_for_recipient``: wait until ``name`` is on the bus, up to the
        call's timeout (the agent's send_timeout by default; None: until it
        is), before the send: waiting after an UnknownRecipient would leave a
        dead letter for a message that is then delivered."""
        limit = self._send_timeout if timeout is _DEFAULT else timeout
        start = time.monotonic()
        out = self._out
        deadline = None if limit is None else start + limit
        pause = 0.001
        while True:
            out.fresh()  # one atomic load on shm while the routes did not move
            if not name.startswith(".") and out.target(name) is not None:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            time.sleep(pause if deadline is None else min(pause, deadline - now))
            pause = min(pause * 2, 0.02)
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return _Waited(left if policy == "block" else 0.0, time.monotonic() - start, limit)

    def _tracker(
        self,
        recipient: str,
        kind: int,
        priority: Any,
        ttl: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
    ) -> Any:
        """What the outbox calls for each message that reached the inbox: wait for its ACK."""
        return lambda msg_id, data, flags: self._track(
            msg_id, recipient, kind, data, flags, priority, ttl, request_id, correlation_id
        )

    def _track(
        self,
        msg_id: int,
        recipient: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: Any,
        ttl: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
    ) -> None:
        """Wait for the ACK of ``msg_id``."""
        now = time.monotonic()
        acks = self._acks
        acks.track(
            msg_id,
            recipient,
            kind,
            data,
            flags,
            operator.index(priority),
            0 if ttl is None else max(1, round(ttl * 1000)),
            request_id,
            correlation_id,
            now,
        )
        if now >= acks.next_due:
            acks.resend_due(now)

    def send_kind(
        self,
        recipient: str,
        payload: Any,
        kind: int,
        request_id: int = 0,
        correlation_id: int = 0,
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
        wait_for_recipient: bool = False,
    ) -> int:
        """A REQUEST, RESPONSE or ERROR: ``send`` with a type and the ids replies carry."""
        try:
            data, flags = pack_payload(payload)
        except TypeError as refused:
            data, flags = self._repack(payload, refused)
        if requires_ack:
            flags |= FLAG_ACK
        policy, wait, ns = self._policy(timeout, backpressure)
        rc = 0
        rt = self._direct.get(recipient)
        if rt is not None:
            try:
                rc = _send_ex(
                    rt,
                    kind,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    ns,
                    request_id,
                    correlation_id,
                    0,
                )
            except (TypeError, OverflowError, ValueError):
                rc = 0
        if rc > 0:
            if requires_ack:
                self._track(
                    rc, recipient, kind, data, flags, priority, ttl, request_id, correlation_id
                )
            return rc  # type: ignore[no-any-return]
        on_sent = (
            self._tracker(recipient, kind, priority, ttl, request_id, correlation_id)
            if requires_ack
            else None
        )
        waited = None
        if wait_for_recipient:
            waited = self._await_recipient(recipient, timeout, policy)
            wait = waited.left
        return self._deliver(
            recipient,
            kind,
            data,
            flags,
            priority,
            ttl,
            wait,
            request_id,
            correlation_id,
            policy,
            rc,
            on_sent,
            waited,
        )

    @property
    def backpressure(self) -> str:
        """What a send does when the recipient's inbox is full: "block", "error" or "drop"."""
        return self._backpressure

    @backpressure.setter
    def backpressure(self, policy: str) -> None:
        self._backpressure = check_policy(policy)
        self._wait_ns = self._policy(_DEFAULT, None)[2]

    @property
    def send_timeout(self) -> float | None:
        """How long a "block" send waits for room, by default (None: forever)."""
        return self._send_timeout

    @send_timeout.setter
    def send_timeout(self, seconds: float | None) -> None:
        self._send_timeout = seconds
        self._wait_ns = self._policy(_DEFAULT, None)[2]

    def _policy(self, timeout: Any, backpressure: str | None) -> tuple[str, float | None, int]:
        """The policy, the wait in seconds and in C's nanoseconds for one send."""
        policy = self._backpressure if backpressure is None else check_policy(backpressure)
        if policy != "block":
            return policy, 0.0, 0
        wait = self._send_timeout if timeout is _DEFAULT else timeout
        return policy, wait, -1 if wait is None else _ns(wait)

    def send_many(
        self,
        recipient: str,
        payloads: Sequence[Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        requires_ack: bool = False,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> list[int]:
        """Send several messages to one recipient in one C call; returns their ids.

        With "block" or "error", a full inbox raises after what fitted was
        sent (the exception says how many); with "drop" the rest is
        dead-lettered.
        """
        policy, wait, _ = self._policy(timeout, backpressure)
        on_sent = self._tracker(recipient, _DIRECT, priority, ttl) if requires_ack else None
        if self._payload_packer is not None:  # the transport packs: with default= too
            with self._payload_packer.installed():
                return self._out.send_many(
                    recipient, _DIRECT, payloads, priority, ttl, requires_ack, wait, policy, on_sent
                )
        return self._out.send_many(
            recipient, _DIRECT, payloads, priority, ttl, requires_ack, wait, policy, on_sent
        )

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> int:
        """Copy a message into the inbox of every subscriber of ``topic``; returns its id.

        A full subscriber never holds up the others, nor makes the publish
        raise: once the backpressure policy's wait is over ("block": up to
        ``timeout``; "error" and "drop": none), its copy goes to the DLQ
        ("inbox full").
        """
        if type(payload) is bytes:
            data, flags = payload, FLAG_RAW
        else:
            try:
                data, flags = pack_payload(payload)
            except TypeError as refused:
                data, flags = self._repack(payload, refused)
        rt = self._topics.get(topic)
        rc = lib.SHMBUS_ESTALE
        if rt is not None:
            try:
                ns = (
                    self._wait_ns
                    if timeout is _DEFAULT and backpressure is None
                    else self._policy(timeout, backpressure)[2]
                )
                rc = _send(
                    rt,
                    _PUBLISH,
                    flags,
                    priority,
                    0 if ttl is None else (round(ttl * 1000) or -1),
                    data,
                    len(data),
                    ns,
                )
                if rc > 0:
                    return rc  # type: ignore[no-any-return]
            except (TypeError, OverflowError, ValueError):
                rt = None
        _, wait, _ = self._policy(timeout, backpressure)
        return self._out.publish(
            topic, _PUBLISH, data, [len(data)], bytes((flags,)), priority, ttl, wait, rt, rc
        )

    def publish_many(
        self,
        topic: str,
        payloads: Sequence[Any],
        *,
        priority: int = 0,
        ttl: float | None = None,
        timeout: float | None = _DEFAULT,
        backpressure: str | None = None,
    ) -> list[int]:
        """Publish several messages on ``topic`` in one C call; returns their ids."""
        if not payloads:
            return []
        if self._payload_packer is None:
            blob, lens, flags = pack_many(payloads, 0)
        else:
            with self._payload_packer.installed():
                blob, lens, flags = pack_many(payloads, 0)
        _, wait, _ = self._policy(timeout, backpressure)
        first = self._out.publish(topic, _PUBLISH, blob, lens, flags, priority, ttl, wait)
        return list(range(first, first + len(lens)))
