"""A typed wrapper over the C ring (csrc/shmbus_ring.c): create, attach, read, write.

One shared-memory segment holds the ring; a futex word in its header is the
doorbell a sleeping consumer waits on. Many processes may write, one reads.
Nothing above this module touches ``ffi``.

A ring made with ``lanes=3`` is an inbox with priority lanes: rings ``NAME``
(lane 0), ``NAME.lane1`` and ``NAME.lane2`` sharing lane 0's doorbell. Its reader
takes the highest lane that has a frame first, FIFO within a lane; a writer
picks its lane with :meth:`Ring.lane` (see :func:`lane_of` for the mapping).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from .._native import ffi, lib
from ..errors import (
    ClaimLost,
    Closed,
    InvalidArgument,
    InvalidName,
    MessageTooLarge,
    ReadTimeout,
    RingFull,
    raise_for,
)

__all__ = ["LANES", "Ring", "lane_name", "lane_of", "segment_name", "validate_name"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\Z")
PREFIX = "shmbus."

_OK = lib.SHMBUS_OK
_EAGAIN = lib.SHMBUS_EAGAIN
_ETIMEDOUT = lib.SHMBUS_ETIMEDOUT
_ETOOBIG = lib.SHMBUS_ETOOBIG
_EINTR = lib.SHMBUS_EINTR
_EINVAL = lib.SHMBUS_EINVAL
_ESMALL = lib.SHMBUS_ESMALL

#: The reader's scratch buffer: batches of small frames are copied into it in
#: one C call and cut into bytes; larger frames go straight to their bytes.
_SCRATCH = 256 * 1024

#: How long a reader spins before it sleeps on the doorbell, by default. Long
#: enough to catch a reply in a ping-pong, short enough not to burn a core.
DEFAULT_SPIN_NS = 50_000

#: Priority lanes an inbox can have; priority 0-33 is lane 0, 34-66 lane 1,
#: 67-100 lane 2 (shmbus_lane_of in csrc/shmbus_ring.c).
LANES: int = lib.SHMBUS_RING_LANES
lane_of = lib.shmbus_lane_of

_read_many = lib.shmbus_ring_read_many
_read_one = lib.shmbus_ring_read_one
_write = lib.shmbus_ring_write
_unpack = ffi.unpack
# A closed ring keeps a typed NULL handle: the C calls answer SHMBUS_EINVAL,
# which the slow path turns into Closed, so the hot path needs no check.
_NULL = ffi.cast("shmbus_ring_t *", 0)


def validate_name(name: object) -> str:
    """Check a ring name: 1-200 of letters, digits, ``_ . -``, not starting with ``.`` or ``-``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid ring name {name!r}: use 1-200 letters, digits, '_', '.' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


def segment_name(name: str) -> str:
    """The POSIX name of a ring's segment."""
    return f"/{PREFIX}{validate_name(name)}"


def lane_name(name: str, lane: int) -> str:
    """The ring name of lane ``lane`` (1 or more) of the inbox ``name``."""
    return f"{name}.lane{lane}"


#: Timeouts longer than this (about 31 years) mean "wait forever": the C side
#: counts nanoseconds in an int64.
_FOREVER = 1e9


def _ns(timeout: float | None) -> int:
    if timeout is None or timeout > _FOREVER:
        return -1
    return int(timeout * 1e9) if timeout > 0 else 0


# For the retry loops after EINTR: a wait goes on with what is left of it.
def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(timeout, 0.0)


def _left_ns(deadline: float | None) -> int:
    return -1 if deadline is None else _ns(max(deadline - time.monotonic(), 0.0))


class _Claim:
    """``with ring.claim(n) as buf``: commit on a clean exit, abort on an exception."""

    __slots__ = ("_ring", "_index", "_view")

    def __init__(self, ring: Ring, index: int, view: memoryview) -> None:
        self._ring = ring
        self._index = index
        self._view = view

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._view.release()
        ring = self._ring
        ring._open_views -= 1
        fn = lib.shmbus_ring_abort if exc_type is not None else lib.shmbus_ring_commit
        rc = fn(ring._handle(), self._index)
        if rc == _EINVAL:
            raise ClaimLost(
                f"{'abort' if exc_type else 'commit'} a claim on ring {ring.name!r}: the record "
                "is no longer there (unblocked as a dead writer's, or overwritten); the frame "
                "was not sent"
            )
        if rc != _OK:
            raise_for(rc, f"{'abort' if exc_type else 'commit'} a claim on ring {ring.name!r}")


class _View:
    """``with ring.read_view() as buf``: a frame read in place, consumed on exit."""

    __slots__ = ("_ring", "_view")

    def __init__(self, ring: Ring, view: memoryview) -> None:
        self._ring = ring
        self._view = view

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._view.release()
        self._ring._open_views -= 1
        rc = lib.shmbus_ring_release(self._ring._handle())
        if rc != _OK:
            raise_for(rc, f"release a frame of ring {self._ring.name!r}")


class Ring:
    """A many-to-one ring of frames in POSIX shared memory.

    Use :meth:`create` (the owner, usually the reader) or :meth:`attach`.
    Any number of processes may write; exactly one may read.
    """

    def __init__(self, handle: Any, name: str, *, owner: bool) -> None:
        self._r = handle
        self.name = name
        self.shm_name = segment_name(name)
        self.owner = owner
        #: This ring's lanes, lane 0 (itself) first; see the module's doc.
        self.lanes: list[Ring] = [self]
        self.capacity: int = lib.shmbus_ring_capacity(handle)
        self.max_frame: int = lib.shmbus_ring_max_frame(handle)
        #: Nanoseconds a reader spins before it sleeps; 0 sleeps at once.
        self.spin_ns = DEFAULT_SPIN_NS
        self._open_views = 0
        # The reader's scratch: frames are copied out of the ring in one C
        # call, then cut into bytes. Allocated on first read only.
        self._out: Any = None
        self._outbuf: Any = None
        self._out_cap = 0
        self._lens: Any = None
        self._lens_cap = 0
        self._count = ffi.new("uint32_t *")
        self._bytes = ffi.new("uint64_t *")
        self._index = ffi.new("int64_t *")
        self._ptr = ffi.new("char **")
        # A plain pointer to the handle for the views' finalizers: the handle
        # object itself is released by close().
        self._raw = ffi.cast("shmbus_ring_t *", handle)

    def _view(self, ptr: Any, size: int) -> memoryview:
        """A view of ring memory that keeps the mapping alive as long as it,
        or anything derived from it, lives."""
        lib.shmbus_ring_retain(self._raw)
        owner = ffi.gc(ptr, lambda _, raw=self._raw: lib.shmbus_ring_close(raw))
        return memoryview(ffi.buffer(owner, size))

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls, name: str, capacity: int = 1 << 20, *, max_frame: int | None = None, lanes: int = 1
    ) -> Ring:
        """Create a ring of ``capacity`` data bytes (a power of two, 4 KiB to 1 GiB).

        ``max_frame`` (bytes of payload) defaults to an eighth of the capacity and
        may be raised to about half of it. The segment is mode 0600.
        ``lanes`` (1 to LANES) makes priority lanes, each a ring of ``capacity``
        (memory is only used as frames pass). Raises :class:`AlreadyExists` when
        the name is taken.
        """
        shm = segment_name(name).encode()
        if type(lanes) is not int or not 1 <= lanes <= LANES:
            raise InvalidArgument(f"lanes must be an int from 1 to {LANES}, got {lanes!r}")
        lo, hi = lib.SHMBUS_RING_MIN_CAPACITY, lib.SHMBUS_RING_MAX_CAPACITY
        if (
            not isinstance(capacity, int)
            or capacity < lo
            or capacity > hi
            or capacity & (capacity - 1)
        ):
            raise InvalidArgument(
                f"ring capacity must be a power of two from {lo} to {hi} bytes, got {capacity!r}"
            )
        limit = lib.shmbus_ring_limit_max_frame(capacity)
        if max_frame is None:
            max_frame = lib.shmbus_ring_default_max_frame(capacity)
        elif not 0 < max_frame <= limit:
            raise InvalidArgument(
                f"max_frame must be from 1 to {limit} bytes for a ring of {capacity} bytes, "
                f"got {max_frame}; raise the capacity for larger frames"
            )
        out = ffi.new("shmbus_ring_t **")
        rc = lib.shmbus_ring_create(shm, ffi.NULL, capacity, max_frame, out)
        if rc != _OK:
            raise_for(rc, f"create ring {name!r}", err=ffi.errno)
        ring = cls(ffi.gc(out[0], lib.shmbus_ring_close), name, owner=True)
        try:
            for k in range(1, lanes):
                lane_shm = segment_name(lane_name(name, k)).encode()
                rc = lib.shmbus_ring_create_lane(lane_shm, shm, capacity, max_frame, out)
                if rc != _OK:
                    raise_for(rc, f"create lane {k} of ring {name!r}", err=ffi.errno)
                ring._link(
                    k, cls(ffi.gc(out[0], lib.shmbus_ring_close), lane_name(name, k), owner=False)
                )
        except BaseException:
            ring.close()
            cls.unlink_name(name)
            raise
        return ring

    def _link(self, k: int, lane: Ring) -> None:
        rc = lib.shmbus_ring_link_lane(self._handle(), k, lane._handle())
        if rc != _OK:
            lane.close()
            self._fail(rc, f"link lane {k} to")
        self.lanes.append(lane)

    @classmethod
    def attach(cls, name: str, *, lanes: bool = False) -> Ring:
        """Map an existing ring, and with ``lanes`` the lanes it has.

        Raises :class:`NotFound`, :class:`BadSegment`, or :class:`ForeignObject`
        for a segment of another user or one others may open.
        """
        shm = segment_name(name).encode()
        out = ffi.new("shmbus_ring_t **")
        rc = lib.shmbus_ring_attach(shm, ffi.NULL, out)
        if rc != _OK:
            raise_for(rc, f"attach ring {name!r}", err=ffi.errno)
        ring = cls(ffi.gc(out[0], lib.shmbus_ring_close), name, owner=False)
        for k in range(1, LANES if lanes else 1):
            lane_shm = segment_name(lane_name(name, k)).encode()
            rc = lib.shmbus_ring_attach(lane_shm, shm, out)
            if rc != _OK:
                break  # no such lane: the inbox has fewer (its writers use the highest)
            ring._link(
                k, cls(ffi.gc(out[0], lib.shmbus_ring_close), lane_name(name, k), owner=False)
            )
        return ring

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove a ring's segment by name, and its lanes' if any; False if
        there was no ring."""
        for k in range(1, LANES):
            lib.shmbus_ring_unlink(segment_name(lane_name(name, k)).encode())
        return lib.shmbus_ring_unlink(segment_name(name).encode()) == _OK

    def lane(self, priority: int) -> Ring:
        """The ring a frame of ``priority`` (0-100) goes to: its lane, or the
        highest lane below it that this inbox has."""
        return self.lanes[min(lane_of(priority), len(self.lanes) - 1)]

    def close(self) -> None:
        """Unmap the ring from this process. Idempotent."""
        if self._r is _NULL:
            return
        if self._open_views:
            raise BufferError(
                f"ring {self.name!r} has {self._open_views} claim or read_view open; "
                "leave those with blocks before closing"
            )
        handle, self._r = self._r, _NULL
        ffi.release(handle)  # runs shmbus_ring_close now, not at collection
        for lane in self.lanes[1:]:
            lane.close()

    def unlink(self) -> None:
        """Remove the segment's name (mapped processes keep their mapping). Idempotent."""
        self.unlink_name(self.name)

    @property
    def closed(self) -> bool:
        return self._r is _NULL

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close; the creator also unlinks."""
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self._r is _NULL else f"{self.used}/{self.capacity} bytes used"
        return f"<Ring {self.name!r} {state}>"

    def _handle(self) -> Any:
        if self._r is _NULL:
            raise Closed(f"ring {self.name!r} is closed")
        return self._r

    def _fail(self, rc: int, what: str, detail: str = "") -> Any:
        if rc == _EINVAL and self._r is _NULL:
            raise Closed(f"ring {self.name!r} is closed")
        raise_for(rc, f"{what} ring {self.name!r}", detail=detail)

    # ------------------------------------------------------------- figures

    @property
    def used(self) -> int:
        """Bytes reserved by writers and not yet consumed (the fill level) of this
        ring; :attr:`fill` counts the lanes too."""
        return lib.shmbus_ring_used(self._handle())  # type: ignore[no-any-return]

    @property
    def fill(self) -> tuple[int, int]:
        """(used, capacity) bytes of the inbox: every lane it has."""
        return sum(lane.used for lane in self.lanes), self.capacity * len(self.lanes)

    @property
    def heartbeat(self) -> int:
        """CLOCK_MONOTONIC nanoseconds of the reader's last read or wait."""
        return lib.shmbus_ring_heartbeat(self._handle())

    def next_correlation_id(self) -> int:
        """A number unique among all users of this ring (a shared atomic counter)."""
        return lib.shmbus_ring_next_correlation(self._handle())

    # ------------------------------------------------------------- writing

    def _too_big(self, size: int) -> MessageTooLarge:
        return MessageTooLarge(size, self.max_frame, f"ring {self.name!r}")

    def _full(self, size: int, timeout: float | None) -> RingFull:
        return RingFull(
            f"ring {self.name!r} stayed full for {timeout}s: {self.used} of {self.capacity} "
            f"bytes in use, frame of {size} bytes waiting; the reader is slow or gone"
        )

    def write(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> None:
        """Write one frame, waiting up to ``timeout`` seconds for room (None: forever).

        Raises :class:`RingFull` when the timeout passes and
        :class:`MessageTooLarge` for a frame over ``max_frame``.
        """
        buf = data if type(data) is bytes else ffi.from_buffer(data)
        n = len(buf)
        ns = -1 if timeout is None else _ns(timeout)
        rc = _write(self._r, buf, n, ns)
        if rc == _OK:
            return
        self._write_failed(rc, buf, n, timeout)

    def _write_failed(self, rc: int, buf: Any, n: int, timeout: float | None) -> None:
        deadline = _deadline(timeout)
        while rc == _EINTR:  # a signal: its handler ran on return; go on waiting
            rc = _write(self._handle(), buf, n, _left_ns(deadline))
        if rc == _OK:
            return
        if rc == _ETOOBIG:
            raise self._too_big(n)
        if rc in (_EAGAIN, _ETIMEDOUT):
            raise self._full(n, timeout)
        self._fail(rc, "write to")

    def try_write(self, data: bytes | bytearray | memoryview) -> bool:
        """Write one frame if there is room now; False if the ring is full."""
        buf = data if type(data) is bytes else ffi.from_buffer(data)
        rc = _write(self._r, buf, len(buf), 0)
        if rc == _OK:
            return True
        if rc == _EAGAIN:
            return False
        self._write_failed(rc, buf, len(buf), 0)
        return True

    def write_many(
        self, frames: Sequence[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> int:
        """Write frames in order in one C call; returns how many were written.

        Waits for room up to ``timeout`` (None: as long as it takes, so all are
        written; 0: only what fits now). A frame over ``max_frame`` raises
        :class:`MessageTooLarge` before anything is written.
        """
        count = len(frames)
        if not count:
            return 0
        blob = b"".join(frames)
        lens = list(map(len, frames))
        if sum(lens) != len(blob):  # memoryviews of wider items: count bytes
            lens = [memoryview(f).nbytes for f in frames]
        c_lens = ffi.new("uint32_t[]", lens)
        written = self._count
        rc = lib.shmbus_ring_write_many(self._handle(), blob, c_lens, count, _ns(timeout), written)
        done = written[0]
        if rc == _EINTR:  # a signal: its handler ran on return; go on with the rest
            deadline = _deadline(timeout)
            view = ffi.from_buffer(blob)
            offset = sum(lens[:done])
            while rc == _EINTR:
                rc = lib.shmbus_ring_write_many(
                    self._handle(),
                    view + offset,
                    c_lens + done,
                    count - done,
                    _left_ns(deadline),
                    written,
                )
                offset += sum(lens[done : done + written[0]])
                done += written[0]
        if rc == _OK or rc in (_EAGAIN, _ETIMEDOUT):
            return done
        if rc == _ETOOBIG:
            raise self._too_big(max(lens))
        return self._fail(rc, "write to")

    def claim(self, size: int, timeout: float | None = None) -> _Claim:
        """Reserve ``size`` bytes in place: ``with ring.claim(n) as buf: buf[:] = ...``.

        The frame is committed when the block ends and aborted (skipped by the
        reader) if it raises. Readers wait for a claim in order, so keep it short.
        The view is released when the block ends; a slice or numpy array taken
        from it stays valid memory (the mapping lives while it does) but aliases
        the ring, whose bytes are then the reader's and later other frames'.
        """
        if not 0 <= size <= self.max_frame:
            if size < 0:
                raise InvalidArgument(f"claim size must not be negative, got {size}")
            raise self._too_big(size)
        index = self._index
        ptr = self._ptr
        deadline = _deadline(timeout)
        while True:
            rc = lib.shmbus_ring_claim(self._handle(), size, _left_ns(deadline), index, ptr)
            if rc != _EINTR:
                break
        if rc in (_EAGAIN, _ETIMEDOUT):
            raise self._full(size, timeout)
        if rc != _OK:
            self._fail(rc, "claim in")
        self._open_views += 1
        return _Claim(self, index[0], self._view(ptr[0], size))

    # ------------------------------------------------------------- reading

    def _scratch(self, max_count: int = 1) -> None:
        if self._out is None:
            # Frames larger than this skip the scratch and are copied once,
            # straight from the ring into their bytes (see _read_large).
            self._out_cap = min(self.capacity, _SCRATCH)
            self._out = ffi.new("char[]", self._out_cap)
            self._outbuf = ffi.buffer(self._out)
        if max_count > self._lens_cap:
            self._lens_cap = max(max_count, 256)
            self._lens = ffi.new("uint32_t[]", self._lens_cap)

    def _split(self, n: int) -> list[bytes]:
        buf = self._outbuf
        out = []
        pos = 0
        for length in _unpack(self._lens, n):
            end = pos + length
            out.append(buf[pos:end])
            pos = end
        return out

    def _read_large(self) -> bytes:
        """The next frame, known to be there and larger than the scratch."""
        ptr = self._ptr
        rc = lib.shmbus_ring_peek(self._handle(), 0, 0, ptr, self._count)
        if rc != _OK:
            self._fail(rc, "read from")
        data = ffi.buffer(ptr[0], self._count[0])[:]
        rc = lib.shmbus_ring_release(self._r)
        if rc != _OK:
            self._fail(rc, "read from")
        return data

    def _after_read(self, rc: int, max_count: int, timeout: float | None) -> int:
        """After a read call that got no frame: retry after signals. Returns
        how many frames are in the scratch, -1 if the next is larger than the
        scratch, 0 if the timeout passed."""
        deadline = _deadline(timeout)
        while rc == _EINTR:  # a signal: its handler ran on return; go on waiting
            rc = _read_many(
                self._handle(),
                self._out,
                self._out_cap,
                self._lens,
                max_count,
                _left_ns(deadline),
                self.spin_ns,
                self._count,
                self._bytes,
            )
        if rc > 0:
            return rc
        if rc == _ESMALL:
            return -1
        if rc in (_EAGAIN, _ETIMEDOUT):
            return 0
        return self._fail(rc, "read from")  # type: ignore[no-any-return]

    def _read_slow(self, rc: int, max_count: int, timeout: float | None) -> list[bytes]:
        """After a read call that got no frame: the frames that came after
        signals, a large frame, or [] when the timeout passed."""
        n = self._after_read(rc, max_count, timeout)
        if n > 0:
            return self._split(n)
        return [self._read_large()] if n < 0 else []

    def read(self, timeout: float | None = None) -> bytes:
        """The next frame, waiting up to ``timeout`` seconds (None: forever).

        Raises :class:`ReadTimeout` (a ``TimeoutError``) when nothing came.
        """
        if self._out is None:
            self._scratch()
        ns = -1 if timeout is None else _ns(timeout)
        n = _read_one(self._r, self._out, self._out_cap, ns, self.spin_ns)
        if n >= 0:
            return self._outbuf[0:n]
        frames = self._read_slow(n, 1, timeout)
        if frames:
            return frames[0]
        raise ReadTimeout(f"nothing arrived in ring {self.name!r} within {timeout}s")

    def try_read(self) -> bytes | None:
        """The next frame if one is there now, else None."""
        if self._out is None:
            self._scratch()
        n = _read_one(self._r, self._out, self._out_cap, 0, 0)
        if n >= 0:
            return self._outbuf[0:n]
        frames = self._read_slow(n, 1, 0)
        return frames[0] if frames else None

    def read_many(self, max_count: int, timeout: float | None = None) -> list[bytes]:
        """Up to ``max_count`` frames in one C call; ``[]`` if nothing came in time.

        Waits only while the ring is empty: as soon as one frame is there, it
        returns what is there, up to ``max_count``.
        """
        if max_count <= 0:
            return []
        n = self.read_block(max_count, timeout)
        if n > 0:
            return self._split(n)
        return [self._read_large()] if n < 0 else []

    def read_block(self, max_count: int, timeout: float | None = None) -> int:
        """Up to ``max_count`` frames into the reader's scratch, for a decoder
        that reads them in place; returns how many (0: nothing in time).

        They are ``scratch_view`` back to back, their lengths the first ones
        of ``lens_view`` (native uint32), valid until the next read. Returns
        -1 when the next frame is larger than the scratch: ``read()`` it.
        """
        if self._out is None or max_count > self._lens_cap:
            self._scratch(max_count)
        ns = -1 if timeout is None else _ns(timeout)
        n = _read_many(
            self._r,
            self._out,
            self._out_cap,
            self._lens,
            max_count,
            ns,
            self.spin_ns,
            self._count,
            self._bytes,
        )
        if n > 0:
            return n  # type: ignore[no-any-return]
        return self._after_read(n, max_count, timeout)

    @property
    def scratch_view(self) -> Any:
        return self._outbuf

    @property
    def lens_view(self) -> Any:
        return ffi.buffer(self._lens)

    def read_view(self, timeout: float | None = None) -> _View:
        """The next frame in place, with no copy: ``with ring.read_view() as buf``.

        The view is valid inside the block only; the frame is consumed on exit,
        and anything derived from the view then aliases reused ring memory.
        Raises :class:`ReadTimeout` when nothing came.
        """
        ptr = self._ptr
        length = self._count
        deadline = _deadline(timeout)
        while True:
            rc = lib.shmbus_ring_peek(self._handle(), _left_ns(deadline), self.spin_ns, ptr, length)
            if rc != _EINTR:
                break
        if rc in (_EAGAIN, _ETIMEDOUT):
            raise ReadTimeout(f"nothing arrived in ring {self.name!r} within {timeout}s")
        if rc != _OK:
            self._fail(rc, "read from")
        self._open_views += 1
        return _View(self, self._view(ptr[0], length[0]))

    def seal(self) -> None:
        """Seal the ring and its lanes for good: its reader has gone. Every
        write from now on raises :class:`RingSealed` (a writer waiting for room
        stops waiting); read on until :attr:`positions` says the head reached
        the tail it gives after this call, and nothing more can come."""
        lib.shmbus_ring_seal(self._handle())

    @property
    def sealed(self) -> bool:
        return bool(lib.shmbus_ring_sealed(self._handle()))

    @property
    def positions(self) -> tuple[int, int]:
        """(head, tail): free-running byte positions read up to and reserved up to."""
        handle = self._handle()
        return lib.shmbus_ring_head(handle), lib.shmbus_ring_tail(handle)

    def unblock(self, grace: float = 0.1) -> bool:
        """Skip a record that a dead writer left half-written; True if one was.

        Call it only when the writer's death is certain. Even then, a live
        writer's record at the same spot looks the same for a moment, so it
        acts only if the reader's position and the record stay unchanged for
        ``grace`` seconds (waited here). Handles both a record started
        (negative length) and space reserved with nothing written yet.
        """
        rc = lib.shmbus_ring_unblock(self._handle(), _ns(grace))
        if rc < 0:
            self._fail(rc, "unblock")
        return rc == 1

    def _test_reserve(self, size: int, *, write_padding: bool = True) -> None:
        """Tests only: reserve space and write nothing, as a writer killed after its CAS."""
        rc = lib.shmbus_ring_test_reserve(self._handle(), size, int(write_padding))
        if rc != _OK:
            self._fail(rc, "reserve in")
