"""The dead-letter queue: bounded in the coordinator's memory, kept in a file.

The coordinator holds the newest ``maxlen`` entries (the oldest is evicted
first, and counted). Every change is appended to ``dlq.log`` in the bus's
state directory (:func:`shmbus.core.paths.state_dir`), so a coordinator that
stops, or is killed, gets the same queue back when it starts again.

The file: 8 bytes of magic, then records, each a 4-byte little-endian length
and a CRC-32 of the body, then the body, a msgpack map::

    {"op": "add", "id": 7, "time": 1.7e9, "reason": "...", "frame": b"..."}
    {"op": "del", "ids": [7, 9]}
    {"op": "meta", "next_id": 12, "total": 40, "evicted": 3}   # a compacted file's first

Loading replays the records in order into the same bounded queue, so it
ends up with what the running coordinator had (the newest ``maxlen``; older
ones count as evicted). Ids come from a counter the file keeps: an entry's
id never changes and is never given to another entry.

Durability: a record is one ``write()`` made before the coordinator answers,
so it is in the kernel's page cache when the sender hears back, and a
SIGKILL loses at most the record being written. That one is a torn tail,
found by its length or CRC on the next load, cut off and logged. ``fdatasync``
runs at most once a second (from the coordinator's loop) and at close: a power
cut loses at most the last second. The file is rewritten (compacted) when it
has grown past twice what it holds and past ``compact_min`` bytes.

With ``persist=False`` (``shmbus coordinator --dlq memory``) there is no file:
the queue lives as long as its coordinator, nothing is read or written in the
state directory, and a restarted coordinator starts with an empty queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from ..core.paths import check_private_dir, make_state_dir, state_dir
from ..errors import CoordinatorRunning

log = logging.getLogger(__name__)

FILE = "dlq.log"
MAGIC = b"SBDLQ01\n"
MAX_FRAME = 1 << 20
MAX_REASON = 1000
_HEAD = struct.Struct("<II")  # body length, CRC-32 of the body
_MAX_BODY = MAX_FRAME + MAX_REASON + 4096  # a length past this is corruption
_LIST_BUDGET = 3 << 20  # bytes of entries in one reply (control messages: 4 MiB)
OPS = ("dlq_add", "dlq_list", "dlq_remove", "dlq_purge")


def _record(body: dict[str, Any]) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    return _HEAD.pack(len(data), zlib.crc32(data)) + data


def _cost(entry: dict[str, Any]) -> int:
    """About what an entry takes in the file: enough to decide when to compact."""
    return len(entry["frame"]) + len(entry["reason"]) + 64


def _ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise ValueError("ids must be a list of integers")
    return value


class _Corrupt(Exception):
    pass


class DeadLetterQueue:
    """The bus's DLQ: ``entries`` (id -> entry, oldest first) and its log file.

    ``directory`` defaults to the bus's state directory; nothing is created
    there until the first entry comes (a bus that never dead-letters leaves no
    file). Raises :class:`CoordinatorRunning` when another coordinator already
    keeps this DLQ. ``persist=False``: memory only, no file read or written.
    """

    def __init__(
        self,
        bus: str,
        maxlen: int = 10_000,
        *,
        directory: Path | None = None,
        compact_min: int = 1 << 20,
        sync_interval: float = 1.0,
        persist: bool = True,
    ) -> None:
        if maxlen < 1:
            raise ValueError(f"the DLQ must hold at least 1 entry, not {maxlen}")
        self.bus = bus
        self.maxlen = maxlen
        self.dir = directory if directory is not None else state_dir(bus)
        self.path = self.dir / FILE
        self.entries: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.total = 0  # ever added (what the file remembers)
        self.evicted = 0
        self.compact_min = compact_min
        self.sync_interval = sync_interval
        self._fd = -1
        self._dir_fd = -1
        self._size = 0  # bytes in the file
        self._live = 0  # about what a compacted file would take
        self._dirty = False
        self._synced = time.monotonic()
        self._disabled = False  # the file is there but unusable: memory only
        self.persist = persist
        if persist and self.dir.exists():
            self._lock()
            if self.path.exists():
                try:
                    self._load()
                except OSError as e:
                    log.error(
                        "bus %s: cannot read the DLQ file %s (%s): the DLQ lives in "
                        "memory only, and the file is left as it is",
                        bus,
                        self.path,
                        e,
                    )
                    self._disabled = True
                    if self._fd >= 0:
                        os.close(self._fd)
                        self._fd = -1

    # ------------------------------------------------------------ ops

    def add(self, frame: bytes, reason: str, when: float | None = None) -> dict[str, Any]:
        """Append a message (its whole frame) with why it could not be delivered."""
        if not isinstance(frame, bytes) or len(frame) > MAX_FRAME:
            raise ValueError("a dead letter is the frame as bytes, up to 1 MiB")
        entry = {
            "id": self.next_id,
            "time": time.time() if when is None else when,
            "reason": str(reason)[:MAX_REASON],
            "frame": frame,
        }
        self.next_id += 1
        self.total += 1
        self._insert(entry)
        self._append({"op": "add", **entry})
        return entry

    def remove(self, ids: Iterable[int]) -> list[int]:
        """Remove the entries with these ids; returns the ids that were there."""
        removed = [i for i in dict.fromkeys(ids) if self._pop(i)]
        if removed:
            self._append({"op": "del", "ids": removed})
        return removed

    def purge(self) -> int:
        """Remove every entry; returns how many there were."""
        ids = list(self.entries)
        self.entries.clear()
        self._live = 0
        if ids:
            # Recorded first: should the rewrite below fail, the file still says so.
            self._append({"op": "del", "ids": ids})
        if self._fd >= 0:
            self._compact()
        return len(ids)

    def list(
        self, limit: int = 1000, *, after: int | None = None, ids: list[int] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Entries oldest first, and whether more were left out.

        ``ids``: those entries; ``after``: the oldest with a larger id (to
        page forward); neither: the newest ``limit``. Stops short of
        ``limit`` where the reply would grow past a few MiB.
        """
        if ids is not None:
            source: Iterable[dict[str, Any]] = (self.entries[i] for i in ids if i in self.entries)
        elif after is not None:
            source = (e for i, e in self.entries.items() if i > after)
        else:
            source = reversed(self.entries.values())
        out: list[dict[str, Any]] = []
        budget = _LIST_BUDGET
        more = False
        for entry in source:
            budget -= _cost(entry)
            if len(out) >= limit or (budget < 0 and out):
                more = True
                break
            out.append(entry)
        if ids is None and after is None:
            out.reverse()
        return out, more

    def handle(self, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        """One control request (``OPS``); KeyError/TypeError/ValueError for bad ones."""
        if op == "dlq_add":
            if msg.get("unless_recent"):
                # Sent again after a coordinator died before its reply: look
                # for it among the last entries (a killed one's last adds).
                for entry in itertools.islice(reversed(self.entries.values()), 256):
                    if entry["frame"] == msg["frame"] and entry["reason"] == msg["reason"]:
                        return {"ok": True, "id": entry["id"]}
            entry = self.add(msg["frame"], msg["reason"])
            return {"ok": True, "id": entry["id"]}
        if op == "dlq_list":
            limit = int(msg.get("limit", 1000))
            after = msg.get("after")
            ids = msg.get("ids")
            entries, more = self.list(
                limit,
                after=None if after is None else int(after),
                ids=None if ids is None else _ids(ids),
            )
            reply = {
                "ok": True,
                "entries": entries,
                "more": more,
                "size": len(self.entries),
                "total": len(self.entries),
                "added": self.total,
                "evicted": self.evicted,
                "next_id": self.next_id,
                "store": "file" if self.persist else "memory",
            }
            if ids is not None:
                reply["missing"] = [i for i in ids if i not in self.entries]
            return reply
        if op == "dlq_remove":
            ids = _ids(msg["ids"])
            removed = self.remove(ids)
            return {"ok": True, "removed": removed, "missing": sorted(set(ids) - set(removed))}
        if op == "dlq_purge":
            if msg.get("ids") is None:
                return {"ok": True, "purged": self.purge()}
            return {"ok": True, "purged": len(self.remove(_ids(msg["ids"])))}
        raise ValueError(f"unknown DLQ op {op!r}")

    # ----------------------------------------------------- in memory

    def _insert(self, entry: dict[str, Any]) -> None:
        while len(self.entries) >= self.maxlen:
            oldest = next(iter(self.entries))
            self._pop(oldest)
            self.evicted += 1
        self.entries[entry["id"]] = entry
        self._live += _cost(entry)

    def _pop(self, entry_id: int) -> bool:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return False
        self._live -= _cost(entry)
        return True

    # ------------------------------------------------------- the file

    def _lock(self) -> None:
        check_private_dir(self.dir)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CoordinatorRunning(
                f"another coordinator of bus {self.bus!r} keeps its DLQ in {self.dir} (it runs "
                "with another XDG_RUNTIME_DIR?); stop it first"
            ) from None
        self._dir_fd = fd

    def _open(self) -> bool:
        """Open the file for appending, creating it (and the directory) on first use."""
        if self._fd >= 0:
            return True
        if self._disabled or not self.persist:
            return False
        try:
            if self._dir_fd < 0:
                if self.dir == state_dir(self.bus):
                    make_state_dir(self.bus)
                else:
                    self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._lock()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except (OSError, CoordinatorRunning) as e:
            log.error(
                "bus %s: cannot keep the DLQ in %s (%s): it lives in memory only",
                self.bus,
                self.path,
                e,
            )
            return False
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if self._size == 0:
            self._write(MAGIC)
            with contextlib.suppress(OSError):
                os.fsync(fd)
                os.fsync(self._dir_fd)  # the new name, too
        return True

    def _write(self, data: bytes) -> bool:
        """Append ``data`` whole, or leave the file as it was (and say so)."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            log.error(
                "bus %s: DLQ file %s: write failed (%s); that change is in memory only",
                self.bus,
                self.path,
                e,
            )
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # no torn record ahead of later ones
            return False
        self._size += len(data)
        return True

    def _append(self, body: dict[str, Any]) -> None:
        if not self._open():
            return
        if self._write(_record(body)):
            self._dirty = True
            self.tick()
            if self._size >= self.compact_min and self._size > 2 * self._live + len(MAGIC):
                self._compact()

    def tick(self) -> None:
        """Flush to disk if a change waits and the last flush is old enough."""
        if self._dirty and time.monotonic() - self._synced >= self.sync_interval:
            self.sync()

    def sync(self) -> None:
        if self._dirty and self._fd >= 0:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                log.error("bus %s: DLQ file %s: fdatasync failed: %s", self.bus, self.path, e)
            self._dirty = False
            self._synced = time.monotonic()

    def close(self) -> None:
        self.sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # the lock goes with it
            self._dir_fd = -1

    def _compact(self) -> None:
        """Rewrite the file with only what the queue holds (atomically, by rename)."""
        tmp = self.path.with_name(FILE + ".tmp")
        meta = {
            "op": "meta",
            "next_id": self.next_id,
            "evicted": self.evicted,
            "total": self.total - len(self.entries),
        }
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                size = 0
                for chunk in self._records(meta):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    size += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            os.fsync(self._dir_fd)
            new = os.open(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as e:
            log.error(
                "bus %s: could not compact the DLQ file %s (%s); it keeps growing",
                self.bus,
                self.path,
                e,
            )
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        os.close(self._fd)
        self._fd, self._size, self._dirty = new, size, False
        log.info(
            "bus %s: compacted the DLQ file to %d bytes, %d entries",
            self.bus,
            size,
            len(self.entries),
        )

    def _records(self, meta: dict[str, Any]) -> Iterable[bytes]:
        yield MAGIC + _record(meta)
        for entry in self.entries.values():
            yield _record({"op": "add", **entry})

    # ------------------------------------------------------- loading

    def _load(self) -> None:
        """Replay the file; cut off a torn or corrupt tail; never raise for its content."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._fd = fd
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                if MAGIC.startswith(magic):  # killed while creating it: nothing in it yet
                    os.ftruncate(fd, 0)
                    self._size = 0
                else:
                    self._set_aside(fd)
                self._write(MAGIC)
                return
            pos = len(MAGIC)
            count = 0
            while pos < size:
                try:
                    pos += self._replay(f, size - pos)
                    count += 1
                except _Corrupt as e:
                    log.warning(
                        "bus %s: DLQ file %s: %s at byte %d; cut off the last %d bytes there "
                        "(a coordinator killed while it wrote leaves this)",
                        self.bus,
                        self.path,
                        e,
                        pos,
                        size - pos,
                    )
                    os.ftruncate(fd, pos)
                    break
        self._size = pos
        log.info(
            "bus %s: reloaded %d DLQ entries from %s (%d records, %d evicted)",
            self.bus,
            len(self.entries),
            self.path,
            count,
            self.evicted,
        )
        if self._size >= self.compact_min and self._size > 2 * self._live + len(MAGIC):
            self._compact()

    def _replay(self, f: Any, left: int) -> int:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise _Corrupt("a torn record header")
        length, crc = _HEAD.unpack(head)
        if length > _MAX_BODY:
            raise _Corrupt(f"a record length of {length} bytes")
        if _HEAD.size + length > left:
            raise _Corrupt("a torn record")
        body = f.read(length)
        if zlib.crc32(body) != crc:
            raise _Corrupt("a record whose checksum does not match")
        try:
            rec = msgpack.unpackb(body, raw=False)
            self._apply(rec)
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as e:
            raise _Corrupt(f"a malformed record ({type(e).__name__}: {e})") from None
        return _HEAD.size + length

    def _apply(self, rec: Any) -> None:
        op = rec["op"]
        if op == "add":
            entry = {
                "id": rec["id"],
                "time": rec["time"],
                "reason": rec["reason"],
                "frame": rec["frame"],
            }
            if (
                type(entry["id"]) is not int
                or entry["id"] < 1
                or not isinstance(entry["time"], (int, float))
                or not isinstance(entry["reason"], str)
                or not isinstance(entry["frame"], bytes)
            ):
                raise ValueError("an entry with fields of the wrong types")
            self.next_id = max(self.next_id, entry["id"] + 1)
            self.total += 1
            self._pop(entry["id"])  # the same id twice: keep the later one
            self._insert(entry)
        elif op == "del":
            for i in _ids(rec["ids"]):
                self._pop(i)
        elif op == "meta":
            if not all(type(rec[k]) is int for k in ("next_id", "total", "evicted")):
                raise ValueError("meta fields must be integers")
            self.next_id = max(self.next_id, rec["next_id"])
            self.total += rec["total"]
            self.evicted += rec["evicted"]
        else:
            raise ValueError(f"unknown record op {op!r}")

    def _set_aside(self, fd: int) -> None:
        """Not a DLQ file: keep it under another name and start a new one."""
        aside = self.path.with_name(f"{FILE}.bad-{int(time.time())}")
        os.rename(self.path, aside)
        log.error(
            "bus %s: %s is not a DLQ file (wrong magic); moved it to %s and started anew",
            self.bus,
            self.path,
            aside,
        )
        os.close(fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0


def remove_files(bus: str) -> list[Path]:
    """Delete a stopped bus's DLQ file (``shmbus cleanup --purge-dlq``); returns what went.

    Raises :class:`CoordinatorRunning` while a coordinator keeps it.
    """
    directory = state_dir(bus)
    if not directory.exists():
        return []
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CoordinatorRunning(
                f"a coordinator of bus {bus!r} keeps its DLQ in {directory}: not removed"
            ) from None
        removed = []
        for path in sorted(directory.glob(FILE + "*")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        with contextlib.suppress(OSError):  # left alone if anything else is in it
            directory.rmdir()
        return removed
    finally:
        os.close(fd)
