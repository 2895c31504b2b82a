"""Dead letters an agent makes while its bus has no coordinator: kept here
(bounded, in order) and handed to the coordinator's DLQ once one takes over."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..errors import CoordinatorUnavailable, ShmbusError

log = logging.getLogger(__name__)

KEPT = 10_000  # dead letters kept while the bus has no coordinator


class Letters:
    """The agent's way to the DLQ. ``call`` is the control call
    (``Client.call``), ``connected`` says whether a coordinator is there."""

    def __init__(
        self, name: str, call: Callable[..., dict[str, Any]], connected: Callable[[], bool]
    ) -> None:
        self._name = name
        self._call = call
        self._connected = connected
        self._lock = threading.Lock()
        # (frame, reason, maybe_added): the last is True for a letter whose
        # dlq_add the coordinator may have done just before it was killed.
        self.kept: collections.deque[tuple[bytes, str, bool]] = collections.deque()
        self.lost = 0
        # One flush at a time: the beater's after a rejoin and close()'s would
        # both send the oldest letter, then each drop one (the second unsent).
        self._flush_lock = threading.Lock()

    def add(self, frame: bytes, reason: str) -> None:
        """To the coordinator's DLQ; kept here while there is none (never
        waited for: this runs on the send and receive paths)."""
        with self._lock:
            keep = bool(self.kept) or not self._connected()  # keeps their order
            if keep:
                self._keep(frame, reason)
                return
        try:
            self._call("dlq_add", wait=0, frame=frame, reason=reason)
        except CoordinatorUnavailable:
            with self._lock:
                self._keep(frame, reason, maybe_added=True)
        except ShmbusError as e:  # refused (too big...): say so loudly, it is a loss
            log.error("agent %s could not dead-letter a message (%s): %s", self._name, reason, e)

    def _keep(self, frame: bytes, reason: str, maybe_added: bool = False) -> None:
        if len(self.kept) < KEPT:
            self.kept.append((frame, reason, maybe_added))
            return
        self.lost += 1
        if self.lost == 1 or self.lost % 1000 == 0:
            log.error(
                "agent %s: %d dead letters lost: %d kept while the bus has no "
                "coordinator, the most there is room for",
                self._name,
                self.lost,
                KEPT,
            )

    def flush(self) -> None:
        """Hand the kept dead letters to the coordinator, oldest first."""
        with self._flush_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        sent = 0
        while True:
            with self._lock:
                if not self.kept:
                    break
                frame, reason, maybe_added = self.kept[0]
            try:
                # unless_recent: the killed coordinator may have added it
                # without living to reply; the DLQ then keeps it once.
                self._call("dlq_add", wait=0, frame=frame, reason=reason, unless_recent=maybe_added)
            except CoordinatorUnavailable:
                with self._lock:
                    self.kept[0] = (frame, reason, True)
                break  # gone again: the next rejoin goes on
            except ShmbusError as e:
                log.error(
                    "agent %s could not dead-letter a message (%s): %s", self._name, reason, e
                )
            with self._lock:
                self.kept.popleft()
            sent += 1
        if sent:
            log.info("agent %s handed %d kept dead letters to the DLQ", self._name, sent)
