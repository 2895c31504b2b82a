"""The routes segment: who is on the bus and who listens to what.

The coordinator writes the whole routing state (agents and subscriptions) as
one msgpack blob into a seqlock-versioned shared-memory table
(csrc/shmbus_table.c); agents read it without asking the coordinator, and
check whether it moved with one atomic load. Topic patterns: ``a.b.c``
exact, ``*`` one level, ``>`` the rest (one level or more, last only).
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Any

import msgpack

from .._native import ffi, lib
from ..errors import CorruptFrame, InvalidArgument, InvalidName, MessageTooLarge, raise_for
from .segment import Segment

__all__ = [
    "MAX_KEEP",
    "Table",
    "check_keep",
    "match",
    "subscribers",
    "validate_pattern",
    "validate_topic",
]

#: Messages the coordinator keeps per history pattern (Agent.keep_history).
MAX_KEEP = 100_000

_TOKEN = re.compile(r"[A-Za-z0-9_\-:]+\Z")
MAX_TOPIC: int = lib.SHMBUS_FRAME_MAX_TOPIC


def _tokens(topic: object, what: str) -> list[str]:
    if not isinstance(topic, str) or not topic or len(topic.encode()) > MAX_TOPIC:
        raise InvalidName(
            f"invalid {what} {topic!r}: 1 to {MAX_TOPIC} bytes of dot-separated words"
        )
    return topic.split(".")


def validate_topic(topic: object) -> str:
    """A topic to publish on: words of letters, digits, ``_ - :`` joined by dots."""
    for word in _tokens(topic, "topic"):
        if not _TOKEN.match(word):
            raise InvalidName(
                f"invalid topic {topic!r}: each dot-separated word is letters, digits, '_', "
                "'-' or ':' (wildcards '*' and '>' are for subscribing)"
            )
    return topic  # type: ignore[return-value]


def validate_pattern(pattern: object) -> str:
    """A subscription pattern: a topic whose words may be ``*``, and whose last may be ``>``."""
    words = _tokens(pattern, "pattern")
    for i, word in enumerate(words):
        if word == "*" or (word == ">" and i == len(words) - 1):
            continue
        if not _TOKEN.match(word):
            raise InvalidName(
                f"invalid pattern {pattern!r}: words are letters, digits, '_', '-', ':', "
                "'*' (one word) or, last only, '>' (one word or more)"
            )
    return pattern  # type: ignore[return-value]


@lru_cache(maxsize=4096)
def _pattern_words(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def match(pattern: str, topic: str) -> bool:
    """Does ``topic`` fall under ``pattern``?"""
    pw = _pattern_words(pattern)
    tw = topic.split(".")
    for i, word in enumerate(pw):
        if word == ">":
            return len(tw) > i
        if i >= len(tw) or (word != "*" and word != tw[i]):
            return False
    return len(tw) == len(pw)


def subscribers(subs: Mapping[str, Collection[str]], topic: str) -> list[str]:
    """The agents subscribed to ``topic`` (``subs``: pattern -> agents), each once, sorted."""
    return sorted({n for p, names in subs.items() if match(p, topic) for n in names})


class Table(Segment):
    """A versioned msgpack blob in shared memory: one writer, many readers."""

    kind = "table"
    _c = "shmbus_table"
    _ctype = "shmbus_table_t"

    def __init__(self, handle: Any, name: str, *, owner: bool) -> None:
        super().__init__(handle, name, owner=owner)
        self.capacity: int = lib.shmbus_table_capacity(handle)
        self._out = ffi.new("char[]", 4096)
        self._len = ffi.new("uint64_t *")
        self._ver = ffi.new("uint64_t *")

    @classmethod
    def create(cls, name: str, capacity: int = 4 << 20) -> Table:
        """Create the table ``/shmbus.NAME``, mode 0600, holding up to ``capacity`` bytes."""
        return cls._open("create", name, capacity)  # type: ignore[no-any-return]

    @classmethod
    def attach(cls, name: str) -> Table:
        return cls._open("attach", name)  # type: ignore[no-any-return]

    @property
    def version(self) -> int:
        """Moves by one with every write; one atomic load."""
        return lib.shmbus_table_version(self._handle())

    def write(self, value: Any) -> int:
        """Replace the content; returns the new version."""
        blob = msgpack.packb(value, use_bin_type=True)
        rc = lib.shmbus_table_write(self._handle(), blob, len(blob), self._ver)
        if rc == lib.SHMBUS_ETOOBIG:
            raise MessageTooLarge(len(blob), self.capacity, f"table {self.name!r}")
        if rc != lib.SHMBUS_OK:
            raise_for(rc, f"write table {self.name!r}")
        return self._ver[0]

    def read(self) -> tuple[int, Any]:
        """A consistent copy of the content and its version (None before the first write)."""
        handle = self._handle()
        deadline = time.monotonic() + 5
        while True:
            rc = lib.shmbus_table_read(handle, self._out, len(self._out), self._len, self._ver)
            if rc == lib.SHMBUS_OK:
                break
            if rc == lib.SHMBUS_ESMALL:
                self._out = ffi.new("char[]", max(self._len[0], 2 * len(self._out)))
            elif rc == lib.SHMBUS_EAGAIN and time.monotonic() < deadline:
                time.sleep(0.001)  # a writer kept racing us: let it finish
            else:
                raise_for(rc, f"read table {self.name!r}")
        if self._ver[0] == 0:
            return 0, None
        try:
            value = msgpack.unpackb(
                ffi.buffer(self._out, self._len[0]), raw=False, strict_map_key=False
            )
        except Exception as e:
            raise CorruptFrame(f"table {self.name!r} holds invalid msgpack: {e}") from None
        return self._ver[0], value


def check_keep(pattern: object, n: object, *, stop: bool = True) -> tuple[str, int]:
    """A history setting: a pattern, and how many messages (0: stop keeping)."""
    validate_pattern(pattern)
    lo = 0 if stop else 1
    if type(n) is not int or not lo <= n <= MAX_KEEP:
        raise InvalidArgument(
            f"history of {pattern!r}: keep {lo} to {MAX_KEEP} messages"
            f"{' (0 stops keeping)' if stop else ''}, got {n!r}"
        )
    return pattern, n  # type: ignore[return-value]
