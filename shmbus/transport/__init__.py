"""Transports: how an agent's frames reach other agents' inboxes, behind one protocol.

An :class:`~shmbus.agent.Agent` talks to its transport through a
:class:`Link`: the receiving half (:class:`Inbox`, read a block of frames
for the C decoder) and the sending half (:class:`Outbox`, the fast paths'
route caches and the slow paths). Every transport carries the same frames
(csrc/shmbus_frame.h), so its peers cannot tell which one an agent uses.

- ``shm`` (:mod:`.shm`): the agent's own inbox ring in shared memory, and
  writes straight into its peers' inboxes. The fast one.
- ``uds`` (:mod:`.uds`): a Unix stream socket to the coordinator's bridge,
  which keeps an inbox ring on the agent's behalf; for agents that cannot
  map the bus's shared memory.
- ``inproc`` (:mod:`.inproc`): agents of one process, for tests.

A transport is one module with an ``open(ctl, bus, name, **options) ->
Link`` function (and, if it needs no coordinator, a ``control(bus, name)``
that stands in for the control connection), named in ``OPENERS``;
``open_link`` picks one.
``transport="auto"`` (the default; ``$SHMBUS_TRANSPORT`` overrides it)
tries ``shm`` and falls back to ``uds`` when the shared memory cannot be
created or mapped, and logs it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.control import Client
from ..core.stats import BusStats
from ..errors import InvalidArgument, ShmbusError

__all__ = ["Inbox", "Link", "Outbox", "ShmUnavailable", "TRANSPORTS", "open_link"]

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "shm", "uds", "inproc")
OPENERS = {"shm": ".shm", "uds": ".uds", "inproc": ".inproc"}


class ShmUnavailable(ShmbusError):
    """This process cannot create or map the bus's shared memory (``auto`` then uses ``uds``)."""


class Inbox(Protocol):
    """What the agent reads its messages from."""

    name: str  # its ring's, for the coordinator
    spin_ns: int

    def read_block(self, max_count: int, timeout: float | None = None) -> int:
        """Up to ``max_count`` frames into ``scratch_view`` (lengths in ``lens_view``,
        native uint32); 0 when none came in time, -1 when the next is too large: ``read`` it."""

    @property
    def scratch_view(self) -> Any: ...

    @property
    def lens_view(self) -> Any: ...

    def read(self, timeout: float | None = None) -> bytes: ...

    def _split(self, n: int) -> list[bytes]: ...


class Outbox(Protocol):
    """What the agent sends through. ``direct`` and ``topics`` map names to
    routes for the C fast path (``lib.shmbus_send``); a transport without one
    leaves them empty and every send takes ``send``/``send_many``/``publish``."""

    direct: dict[str, Any]
    topics: dict[str, Any]
    agents: dict[str, list[Any]]  # the routes table's entries: name -> [id, inbox, pid, slot, ...]
    peers: dict[str, Any]
    counters: Any

    dead_letter: Callable[[bytes, str], None]  # a frame it could not deliver, and why

    def fresh(self) -> None:
        """Drop the cached routes: the next send reads the routes table."""

    def target(self, name: str) -> Any:
        """Where a frame for agent ``name`` goes (its inbox or link); None: no such agent."""

    def frame(self, kind: int, data: bytes, flags: int, msg_id: int, **fields: Any) -> bytes: ...

    def send(
        self,
        name: str,
        kind: int,
        data: bytes,
        flags: int,
        priority: Any,
        ttl: Any,
        timeout: float | None,
        request_id: int = 0,
        correlation_id: int = 0,
        policy: str = "block",
        first_rc: int = 0,
        on_sent: Any = None,
    ) -> int: ...

    def send_many(
        self,
        name: str,
        kind: int,
        payloads: Sequence[Any],
        priority: Any,
        ttl: Any,
        requires_ack: bool,
        timeout: float | None,
        policy: str = "block",
        on_sent: Any = None,
    ) -> list[int]: ...

    def publish(
        self,
        topic: str,
        kind: int,
        blob: bytes,
        lens: Any,
        flags: Any,
        priority: Any,
        ttl: Any,
        timeout: float | None,
        rt: Any = None,
        rc: int = ...,
    ) -> int: ...

    def close(self) -> None: ...


class Link(Protocol):
    """One agent's open transport, made by a transport module's ``open``."""

    kind: str  # "shm", "uds", ...
    id: int  # the agent's id on the bus
    slot: int  # its stats slot (0: none)
    inbox: Inbox
    out: Outbox
    stats_segment: Any  # the mapped stats segment, or None (then no heartbeat thread)

    def stats(self, bus: str) -> BusStats: ...

    def sync(self) -> None:
        """Return once what this agent sent shows in what the coordinator
        reports (stats, the DLQ, history): at once where sends are synchronous."""

    def leave(self, dead_letter: Callable[[bytes, str], None]) -> None:
        """Before ``unregister``: finish what is in flight; frames received
        but never to be read go to ``dead_letter(frame, reason)``."""

    def close(self) -> None:
        """After ``unregister``: close every mapping and socket, remove the inbox."""


Opener = Callable[..., Link]


def choose(transport: str) -> str:
    """The transport asked for, with ``$SHMBUS_TRANSPORT`` overriding ``auto``."""
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    forced = os.environ.get("SHMBUS_TRANSPORT", "").strip()
    if transport == "auto" and forced:
        if forced not in TRANSPORTS:
            raise InvalidArgument(f"SHMBUS_TRANSPORT must be one of {TRANSPORTS}, got {forced!r}")
        return forced
    return transport


def open_link(
    transport: str, bus: str, name: str, connect: Callable[[], Client], **options: Any
) -> tuple[Client, Link]:
    """Register ``name`` over a new control connection and open its transport.

    ``connect`` makes the control connection (a fresh one after a failed
    ``shm`` try: the coordinator drops an agent whose connection closes).
    """
    kind = choose(transport)
    tries = ["shm", "uds"] if kind == "auto" else [kind]
    for i, attempt in enumerate(tries):
        module = importlib.import_module(OPENERS[attempt], __name__)
        # A transport with a control of its own (inproc) needs no coordinator.
        ctl = module.control(bus, name) if hasattr(module, "control") else connect()
        try:
            return ctl, module.open(ctl, bus, name, **options)
        except ShmUnavailable as e:
            ctl.close()
            if i + 1 == len(tries):
                raise
            log.warning(
                "agent %s: shared memory unavailable (%s); using the uds transport", name, e
            )
        except BaseException:
            ctl.close()
            raise
    raise AssertionError("unreachable")
