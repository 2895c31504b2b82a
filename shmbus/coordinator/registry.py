"""What the coordinator knows of its bus: the agents, their connections and
stats slots, the subscriptions, the ids, the dying and the inboxes it watches.

The coordinator and the takeover of a killed coordinator's bus
(:mod:`shmbus.coordinator.takeover`) both work on it; neither reaches into
the other. Takeover asks the coordinator for what only it can do (tell of a
death, forget an agent, publish the routes) through :class:`Host`.
"""

from __future__ import annotations

import collections
import socket
from dataclasses import dataclass, field
from typing import Protocol

from ..core.control import Reader
from ..core.ring import Ring
from ..core.routes import Table
from ..core.stats import StatsSegment


@dataclass
class Conn:
    """One control connection: an agent's from its registration on."""

    sock: socket.socket
    reader: Reader = field(default_factory=Reader)
    agent: str | None = None


@dataclass
class AgentEntry:
    """One agent of the bus, as the coordinator knows it."""

    name: str
    id: int
    pid: int
    inbox: str
    conn: Conn | None  # None: adopted from a killed coordinator, not rejoined yet
    transport: str = "shm"
    slot: int = 0  # in the stats segment; 0: none was free
    active: bool = False
    hung: bool = False  # no heartbeat for heartbeat_timeout


class Host(Protocol):
    """What the takeover asks of the coordinator that holds the registry."""

    def died(self, agent: AgentEntry, why: str) -> None:
        """``agent`` is dead: its peers are told, its inbox goes to the DLQ."""

    def forget_agent(
        self, agent: AgentEntry, *, publish: bool = True, reason: str = "recipient left"
    ) -> None:
        """``agent`` left: off the routes, its inbox drained to the DLQ."""

    def publish(self) -> None:
        """Write the routes table anew from the registry."""


class Registry:
    """The bus's agents and subscriptions, with the shared table they are
    published in and the stats segment whose slots they hold."""

    def __init__(self, bus: str) -> None:
        self.bus = bus
        self.table: Table = None  # type: ignore[assignment]  # set by takeover.adopt
        self.stats: StatsSegment = None  # type: ignore[assignment]  # likewise
        self.adopted = False  # True: taken over from a killed coordinator
        self.agents: dict[str, AgentEntry] = {}
        self.subs: dict[str, set[str]] = {}
        self.next_id = 1
        # Freed slots go to the back: a sender's late add to a departed agent's
        # counters lands in a slot nobody reuses for as long as possible.
        self.free_slots: collections.deque[int] = collections.deque()
        self.strays: dict[int, int] = {}  # stats slot -> pid: in use, by no agent we know
        self.stray_inboxes_unchecked = False  # see takeover._drain_stray_inboxes
        # Inboxes a dead writer may block, with each lane's tail at the death.
        self.watch: dict[str, tuple[Ring, list[int]]] = {}
        self.dying: list[tuple[AgentEntry, float]] = []  # closed, not yet certainly dead
        self.next_orphan_check = 0.0
