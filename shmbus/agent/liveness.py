"""An agent's heartbeat: the thread that shows the coordinator the agent's
process is alive, and on each beat lets the agent rejoin a new coordinator
and service its ACKs (the ``on_beat`` it is handed)."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

from ..core.control import BEAT_EVERY
from ..core.stats import StatsSegment


class Beater(threading.Thread):
    """Stores the time in the agent's stats slot every BEAT_EVERY seconds, so
    the coordinator can tell a stopped or wedged process (no beats) from a
    busy one (a thread runs while Python code does, the GIL switching).

    On each beat it calls ``on_beat(backoff)``, which returns the wait before
    the next (0: the usual BEAT_EVERY): once the coordinator is gone the agent
    tries to rejoin a new one, backing off from 0.05 s to 1 s, and hands over
    the dead letters kept meanwhile; it also takes in ACKs and resends what is
    due for an agent that only sends.

    ``on_beat`` is a weak method, so the thread never keeps its agent alive:
    it ends with its agent, closed or collected without close. It holds the
    stats segment, so the mapping it writes to lives as long as it runs."""

    def __init__(
        self,
        name: str,
        stats: StatsSegment | None,
        slot: int,
        on_beat: weakref.WeakMethod[Callable[[float], float]],
    ) -> None:
        super().__init__(name=f"shmbus-heartbeat-{name}", daemon=True)
        self.on_beat = on_beat
        self.stats = stats
        self.where = stats.heartbeat(slot) if stats is not None else None  # uds: the bridge beats
        self.stop = threading.Event()
        if self.where:
            self.beat()
        self.start()

    def beat(self) -> None:
        if self.where:
            StatsSegment.beat(self.where, time.monotonic_ns())

    def run(self) -> None:
        backoff = 0.0  # while not 0, the coordinator is gone: the next try to rejoin
        while not self.stop.wait(backoff or BEAT_EVERY):
            on_beat = self.on_beat()
            if on_beat is None:
                break
            self.beat()
            backoff = on_beat(backoff)
            del on_beat
        self.stats = None  # let the mapping go

    def close(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join(5)
