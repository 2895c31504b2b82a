"""The shared-memory transport: the agent's own inbox ring, and writes straight
into its peers' inboxes (shmbus/core/ring.py, shmbus/transport/shm_outbox.py).

The agent's fast paths stay one dictionary hit and one C call: ``out.direct``
and ``out.topics`` are the outbox's route caches, and the inbox is the ring.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.control import Client
from ..core.ring import LANES, Ring
from ..core.routes import Table
from ..core.stats import BusStats, StatsSegment, count_reads, inbox_fill
from ..errors import ShmbusError
from . import ShmUnavailable
from .shm_outbox import Outbox

__all__ = ["ShmLink", "open"]


def _map(what: str, make: Any) -> Any:
    """A segment, or :class:`ShmUnavailable` when this process cannot have it
    (no /dev/shm, another IPC namespace, permissions, no memory)."""
    try:
        return make()
    except (ShmbusError, OSError) as e:
        raise ShmUnavailable(f"cannot map the {what}: {e}") from e


class ShmLink:
    kind = "shm"

    def __init__(
        self, ctl: Client, bus: str, name: str, *, inbox_capacity: int, dead_letter: Any
    ) -> None:
        reply = ctl.call("register", name=name, pid=os.getpid(), transport="shm")
        self.id: int = reply["id"]
        self.slot: int = reply.get("slot", 0)
        try:
            self.inbox = _map(
                "inbox", lambda: Ring.create(reply["inbox"], inbox_capacity, lanes=LANES)
            )
        except ShmUnavailable:
            ctl.call("unregister")  # the name is free again before we try the socket
            raise
        try:
            self.table = _map("routes table", lambda: Table.attach(reply["routes"]))
            self.stats_segment = _map("stats segment", lambda: StatsSegment.attach(reply["stats"]))
            counters = self.stats_segment.agent(self.slot)
            if counters:
                count_reads(self.inbox, counters)
            self.out = Outbox(
                bus=bus,
                name=name,
                agent_id=self.id,
                table=self.table,
                stats=self.stats_segment,
                counters=counters,
                dead_letter=dead_letter,
            )
        except BaseException as e:
            if isinstance(e, ShmUnavailable):
                ctl.call("unregister")
            if hasattr(self, "table"):
                self.table.close()
            self.inbox.close()
            self.inbox.unlink()
            raise

    def stats(self, bus: str) -> BusStats:
        self.out.fresh()
        return self.stats_segment.snapshot(bus, inbox_fill(self.out.agents, self.out.peers))

    def sync(self) -> None:
        pass  # a send is in its inbox when it returns

    def leave(self, dead_letter: Any) -> None:
        pass  # nothing in flight: what the inbox holds, the coordinator drains

    def close(self) -> None:
        self.out.close()
        self.table.close()
        count_reads(self.inbox, None)
        self.stats_segment.close()
        self.inbox.close()
        self.inbox.unlink()


open = ShmLink
