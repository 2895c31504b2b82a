"""The data socket of a uds agent, and of a direct link between two: records
in (one reader thread), records out (any thread), with the counts of records
taken and granted that pace a sender (wire.py)."""

from __future__ import annotations

import collections
import errno
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .._native import ffi, lib
from ..core.ring import DEFAULT_SPIN_NS, LANES
from ..errors import Closed, CoordinatorUnavailable
from . import wire

_BUF = 1 << 20
_SOCKBUF = 4 << 20
QUIET = 1e-3  # seconds a wait lasts before it tells the bridge our counts
SLICE = 0.05  # seconds a wait lasts at most between looks at a close
AHEAD = 8  # records the bridge may send ahead of what we took (its limit too)
_SCRATCH = 64 << 10  # a one-frame record up to this size is built and sent in one C call
_EAGAIN = -errno.EAGAIN
_record_send = lib.shmbus_record_send


class Full(Exception):
    """The data socket took nothing of the record within the wait."""


class Stream:
    """The data socket: records in (one reader thread), records out (any thread)."""

    def __init__(self, sock: socket.socket, label: str = "the bridge") -> None:
        self.label = label  # who is at the other end, for errors
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
            except OSError:
                pass  # the system's limit applies
        sock.setblocking(False)  # every wait is a poll with a timeout of ours
        self.sock = sock
        self._fd = sock.fileno()
        self._scratch = ffi.new("char[]", _SCRATCH)
        self._sent = ffi.new("int64_t *")
        self._rpoll = select.poll()
        self._rpoll.register(sock, select.POLLIN)
        self._wpoll = select.poll()
        self._wpoll.register(sock, select.POLLOUT)
        self._buf = bytearray(_BUF)
        self._view = memoryview(self._buf)  # (slices of a view are a step quicker to make)
        self._start = self._end = 0
        self.wlock = threading.Lock()
        self._closed = False
        self.last_write = time.monotonic()
        # Records taken from the bridge and asked for (wire.py), in every record we write.
        self.taken = self.granted = 0
        self._told = (0, 0)
        self.written = 0  # records we wrote: a verdict names the record it is on
        # A direct link's (peer.py): records of frames written and not yet taken
        # by the peer, numbered as its ``taken`` counts them. They are the
        # sender's until taken: if the peer goes first, they go to the DLQ.
        self.keep: collections.deque[tuple[int, bytes | bytearray, int]] | None = None
        self.kept = 0
        self.keep_bytes = [0] * LANES  # of keep, per lane of their frames
        self.peer_taken = 0
        self.sent_frames = self.sent_bytes = 0  # a link's, for its stats (under wlock)
        self._early: set[int] = set()  # taken out of order before _keep had them
        self._klock = threading.Lock()
        self._rlock = threading.Lock()  # one reader of the socket at a time
        self._stash: collections.deque[bytes] = collections.deque()  # read while awaiting a verdict
        # Called when a record is set aside by a reader other than the inbox's
        # (its reader may be an event loop that waits for a readable fd).
        self.on_stash: Callable[[], None] | None = None
        self._verdicts: dict[int, tuple[int, int]] = {}
        self._unwaited: set[int] = set()  # records whose verdict nobody waits for
        self._vcond = threading.Condition()
        # Seconds of polling before a wait (the agent's ``spin``), as an shm reader
        # spins: in a round trip the answer comes sooner than a sleeping reader
        # wakes (50 against 70 us here). The bridge's hub then sleeps between
        # records (SHMBUS_BRIDGE_SPIN_US=0): a third spinner on 2 CPUs slows all.
        self.spin = DEFAULT_SPIN_NS / 1e9

    # ------------------------------------------------------------ reading

    def read_record(self, timeout: float | None) -> bytes | None:
        """The next record's body (count, info, lengths, frames); None on timeout."""
        if self._stash:
            return self._stash.popleft()
        with self._rlock:
            # A verdict's waiter may have stashed one while we waited for the lock.
            if self._stash:
                return self._stash.popleft()
            return self._read(timeout)

    def poll_record(self, read: bool = True) -> bytes | None:
        """The next record's body if it is here now: no wait, no counts told.
        ``read=False``: only if it was read off the socket already."""
        if self._stash:
            return self._stash.popleft()
        if not self._rlock.acquire(blocking=False):
            return None
        try:
            while True:
                if self._stash:
                    return self._stash.popleft()
                body = self.take()
                if body is not None or not read or not self.fill():
                    return body
        finally:
            self._rlock.release()

    def verdict(self, number: int, timeout: float) -> tuple[int, int]:
        """The bridge's verdict on our record ``number`` (a send of policy
        "error"): (a SHMBUS_DEAD_* code or 0, and its info word's fill; the
        frames it delivered). Reads the socket for it unless another thread
        does; what else comes meanwhile waits for the reader."""
        deadline = time.monotonic() + timeout
        while True:
            with self._vcond:
                found = self._verdicts.pop(number & wire.MASK, None)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                self.forget(number)
                raise CoordinatorUnavailable(f"no word from the bridge on a send in {timeout}s")
            if self._rlock.acquire(blocking=False):
                try:
                    body = self._read(min(left, SLICE))
                    if body is not None:
                        self._stash.append(body)
                        if self.on_stash is not None:
                            self.on_stash()
                finally:
                    self._rlock.release()
            else:  # the reader stores it and tells us
                with self._vcond:
                    if (number & wire.MASK) not in self._verdicts:
                        self._vcond.wait(min(left, SLICE))

    def forget(self, number: int) -> None:
        """Nobody waits for the verdict on our record ``number``: drop it,
        whether it came already or comes later."""
        number &= wire.MASK
        with self._vcond:
            if self._verdicts.pop(number, None) is None:
                self._unwaited.add(number)

    def take(self) -> bytes | None:
        """The next whole record among the bytes read already (a verdict is
        stored for its waiter); None if there is none. Under ``_rlock``."""
        while True:
            buf, start, avail = self._buf, self._start, self._end - self._start
            need = wire.HEAD
            if avail >= 4:
                body = int.from_bytes(buf[start : start + 4], "little")
                if not wire.HEAD - 4 <= body <= wire.MAX_RECORD:
                    raise Closed(f"{self.label} sent a record of {body} bytes: not a shmbus peer")
                need = 4 + body
                if avail >= need:
                    self._start = start + need
                    if (
                        body == wire.HEAD - 4
                        and buf[start + 8] & 3 == wire.VERDICT
                        and self.keep is None
                    ):  # (only the bridge gives verdicts)
                        word, number, done = wire.VERDICT_FIELDS.unpack_from(buf, start + 8)
                        with self._vcond:
                            if number in self._unwaited:
                                self._unwaited.discard(number)
                            else:
                                self._verdicts[number] = (word >> 2, done)
                                self._vcond.notify_all()
                        continue  # not one of the records the bridge counts
                    if buf[start + 4 : start + 8] != b"\0\0\0\0" and self.keep is None:
                        self.took()  # a link's reader counts it when it takes it (peer.py)
                    return bytes(memoryview(buf)[start + 4 : start + need])
            if len(buf) - start < need or len(buf) - self._end < 4096:
                self._compact(need)
            return None

    def took(self, n: int = 1) -> None:
        """Records of frames are taken (records of no frames, the counts, are not counted)."""
        self.taken += n
        # More may come while this one is read. The counts ride on our next
        # record, or go on their own once the peer has used most of what we
        # granted it, or when a wait goes on: a record of its own costs a
        # system call and wakes the peer, so a stream or a ping-pong must
        # not pay one per record.
        self.granted = self.taken + AHEAD
        if (self._told[1] - self.taken) & wire.MASK <= AHEAD // 4 or (
            self.keep is not None and self.taken - self._told[0] >= AHEAD // 2
        ):  # (a link's sender does not wait for grants: it must hear of takes)
            self.ack()

    def fill(self) -> bool:
        """Read what the socket holds now; False if it held nothing. Under ``_rlock``."""
        try:
            n = self.sock.recv_into(self._view[self._end :])
        except BlockingIOError:
            return False
        except OSError as e:
            raise Closed(f"the connection to {self.label} broke: {e}") from None
        if not n:
            raise Closed(f"{self.label} closed the connection")
        self._end += n
        return True

    def idle(self) -> bool:
        """Before a wait: ask for the next record if we asked for none; True
        if our counts are told (or nothing was to tell)."""
        if self.granted == self.taken:
            self.granted += 1  # nothing asked for: ask for the next record
        return self._told == (self.taken, self.granted) or self.ack()

    def _read(self, timeout: float | None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = None if timeout != 0 else 0.0
        while True:
            body = self.take()
            if body is not None:
                return body
            if self.fill():
                continue
            if spin_until is None:
                spin_until = time.perf_counter() + self.spin
            if time.perf_counter() < spin_until:
                continue  # as an shm reader spins before it sleeps: an answer is near
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                # Ask for the next record all the same: a look that never
                # waits (the heartbeat thread's) finds it later.
                self.idle()
                return None
            if self.granted == self.taken:
                self.granted += 1  # nothing asked for: ask for the next record
            told = self._told == (self.taken, self.granted)
            if not told and (self._told[1] - self.taken) & wire.MASK > 0:
                # The bridge may still send: an answer near at hand comes before
                # the counts are worth a record of their own.
                quiet = QUIET if left is None else min(left, QUIET)
                if self._rpoll.poll(math.ceil(quiet * 1000)):
                    continue
                left = None if deadline is None else deadline - time.monotonic()
            if not told and not self.ack():
                left = SLICE if left is None else min(left, SLICE)  # a sender has the socket
            self._rpoll.poll(-1 if left is None else max(math.ceil(left * 1000), 0))

    def _compact(self, need: int) -> None:
        avail = self._end - self._start
        if len(self._buf) < need or len(self._buf) - avail < 4096:
            old = self._buf  # a record larger than the buffer: a larger one
            self._buf = bytearray(max(need, len(old)) + _BUF)
            self._view = memoryview(self._buf)
            self._buf[:avail] = old[self._start : self._end]
            self._start, self._end = 0, avail
            return
        buf = self._buf
        buf[:avail] = buf[self._start : self._end]
        self._start, self._end = 0, avail

    # ------------------------------------------------------------ writing

    def write(self, data: bytearray, wait: float | None) -> int:
        """Write one record, waiting up to ``wait`` (None: forever) for the
        socket to take its first byte; :class:`Full` if it took none.

        A record the socket took in part is finished before this returns,
        however long that takes: nothing a send returned for is left in this
        process, so the kernel hands it to the bridge even if a SIGKILL comes
        next (a user-space cork, once here, lost exactly those records;
        batches are ``send_many``'s)."""
        deadline = None if wait is None else time.monotonic() + wait
        if not self.wlock.acquire(timeout=-1 if wait is None else wait):
            raise Full  # another sender holds the socket, waiting for room
        try:
            told = self._write(data, deadline)
            if self.keep is not None and data[4:8] != b"\0\0\0\0":
                self._keep(data, int.from_bytes(data[4:8], "little"), wire.lane(data))
            return self._wrote(told)
        finally:
            self.wlock.release()

    def send_one(self, lane: int, *build: Any) -> int:
        """Build a record of one frame of ``lane`` (``shmbus_record_send``'s
        arguments from ``names`` to ``flags``) and send it, in one C call: a send's
        usual path. The record's number; 0 when another thread has the
        socket or it took nothing at once, and the caller writes the record
        the usual way (which waits, or raises)."""
        if not self.wlock.acquire(blocking=False):
            return 0
        try:
            sent = self._sent
            told = (self.taken, self.granted)  # (the reader's thread may take on meanwhile)
            size = _record_send(
                self._fd,
                told[0] & wire.MASK,
                told[1] & wire.MASK,
                *build,
                self._scratch,
                _SCRATCH,
                sent,
            )
            n = sent[0]
            if size <= 0 or n == _EAGAIN or n == 0:
                return 0  # too large for the scratch, or full: the usual path
            if n < 0:
                raise Closed(f"the connection to {self.label} broke: {os.strerror(-n)}")
            if n < size:  # the frame boundaries must hold: the rest goes now
                self._send(ffi.buffer(self._scratch, size)[n:], None)
            if self.keep is not None:
                self._keep(ffi.buffer(self._scratch, size)[:], 1, lane)
            return self._wrote(told)
        finally:
            self.wlock.release()

    def _write(self, data: bytearray, deadline: float | None) -> tuple[int, int]:
        """Send ``data`` with our counts in it; the counts."""
        told = (self.taken, self.granted)
        wire.COUNTS.pack_into(data, wire.COUNTS_AT, told[0] & wire.MASK, told[1] & wire.MASK)
        rest = self._send(data, deadline)
        if rest is data:
            raise Full
        if rest is not None:  # the frame boundaries must hold: the rest goes now
            self._send(rest, None)
        return told

    def _keep(self, record: bytes | bytearray, count: int, lane: int) -> None:
        self.sent_frames += count
        self.sent_bytes += len(record) - wire.HEAD - 4 * count
        self.kept += 1
        number = self.kept & wire.MASK
        with self._klock:
            self._trim()
            # The peer may have taken it (and said so) before we got here.
            if self._early and number in self._early:
                self._early.discard(number)
            elif (self.peer_taken - number) & wire.MASK >= 1 << 31:
                self.keep.append((number, record, lane))  # type: ignore[union-attr]  # a link's only
                self.keep_bytes[lane] += len(record)

    def release(self, taken: int) -> None:
        """The peer has taken our records up to number ``taken``: they are its
        own now. Its reader says so with no lock (the records come in order,
        one reader at a time): who looks at ``keep`` trims it first."""
        self.peer_taken = taken

    def _trim(self) -> None:
        keep, taken = self.keep, self.peer_taken
        while keep and (taken - keep[0][0]) & wire.MASK < 1 << 31:
            _, record, lane = keep.popleft()
            self.keep_bytes[lane] -= len(record)
        if self._early:
            self._early = {n for n in self._early if (taken - n) & wire.MASK >= 1 << 31}

    def release_some(self, numbers: list[int]) -> None:
        """The peer took these records of ours out of order (a higher lane
        first): they are its own now, though ``taken`` has not passed them."""
        with self._klock:
            self._trim()
            wanted = {n for n in numbers if (self.peer_taken - n) & wire.MASK >= 1 << 31}
            if not wanted or self.keep is None:
                return
            rest: collections.deque[tuple[int, bytes | bytearray, int]] = collections.deque()
            for entry in self.keep:
                if entry[0] in wanted:
                    wanted.discard(entry[0])
                    self.keep_bytes[entry[2]] -= len(entry[1])
                else:
                    rest.append(entry)
            self.keep = rest
            self._early |= wanted  # taken before we noted them sent (_keep)

    def held(self, lane: int) -> int:
        """Bytes of our records of ``lane`` the peer has not taken."""
        if self.keep_bytes[lane]:
            with self._klock:
                self._trim()
        return self.keep_bytes[lane]

    def untaken(self) -> list[bytes]:
        """The frames of the records the peer never took, the highest lane
        first and each lane in order, as a dead inbox's go (and forget them)."""
        with self._klock:
            self._trim()
            records = [r for _, r, _ in sorted(self.keep or (), key=lambda e: -e[2])]
            if self.keep:
                self.keep.clear()
            self.keep_bytes = [0] * LANES
        return [f for r in records for f in wire.frames_of(r)]

    def _wrote(self, told: tuple[int, int]) -> int:
        """A whole record is in the kernel, our counts ``told`` in it: its number."""
        self.last_write = time.monotonic()
        self._told = told
        self.written += 1
        return self.written

    def ack(self) -> bool:
        """Tell the bridge our counts now, unless a sender has the socket (then
        its record tells them); False if nothing could be written."""
        if not self.wlock.acquire(blocking=False):
            return False
        self.wlock.release()
        try:
            self.write(wire.record([]), 0)
        except (Full, Closed):
            return False
        return True

    def _send(self, data: bytes | bytearray, deadline: float | None) -> Any:
        """What is left of ``data`` at the deadline (None: all sent)."""
        view = memoryview(data)
        off = 0
        while off < len(data):
            try:
                off += self.sock.send(view[off:])
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                raise Closed(f"the connection to {self.label} broke: {e}") from None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return data if off == 0 else bytes(view[off:])
            if self._closed:
                raise Closed("the data connection is closed")
            # In slices: a close from another thread is seen within one.
            self._wpoll.poll(100 if left is None else max(1, min(100, math.ceil(left * 1000))))
        return None

    def close(self) -> None:
        self._closed = True
        self.sock.close()
