"""The transports of bench_ring.py: the channel each one needs, and the measured loops.

The parent builds one channel per measurement (:func:`make_ends`) and starts two
children on :func:`child_main`. Each child opens its end as an :class:`Io`, a
handful of bound methods (``send``, ``recv``, ...), so the measured loops below
are written once for every transport and call the library directly, with no
wrapper of ours between the loop and the library.

Children import the peer libraries only when they need them, so a missing one
costs its rows and nothing else.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Ring capacity (and faster_fifo buffer size) for frames up to 4 KiB, and above.
SMALL_CAPACITY = 1 << 20
LARGE_CAPACITY = 1 << 25
#: Headroom over the payload for max_frame in the large-frame ring.
FRAME_SLACK = 4096

#: The roles of the two children: (the one that starts the exchange, the other one).
ROLES = {"pingpong": ("client", "server"), "tput": ("writer", "reader")}


@dataclass(frozen=True)
class Spec:
    """What one measurement does; both children get a copy."""

    mode: str  # "pingpong" or "tput"
    size: int  # payload bytes
    count: int  # measured round trips or messages
    warmup: int  # round trips or messages before the clock starts
    batch: int = 1  # frames per call (write_many / put_many / read_many / get_many)
    view: bool = False  # read in place: shmbus read_view, zmq recv(copy=False)
    spin_ns: int | None = None  # shmbus readers' spin; None keeps the ring default
    timeout: float = 60.0  # seconds the whole measurement may take

    @property
    def capacity(self) -> int:
        return SMALL_CAPACITY if self.size <= 4096 else LARGE_CAPACITY


# ---------------------------------------------------------------- parent side


def make_ends(
    kind: str, spec: Spec, ctx: Any, tmpdir: str, tag: str
) -> tuple[tuple[Any, Any], tuple[Any, Any], Callable[[], None]]:
    """Create one measurement's channel.

    Returns the ``(tx, rx)`` end of the first role (client or writer), that of
    the second role (server or reader), and a cleanup that the caller must run
    whatever happens. ``tag`` is unique per measurement and names rings and
    socket files.
    """
    pingpong = spec.mode == "pingpong"
    if kind == "shmbus":
        from shmbus import Ring

        names = [f"{tag}-ping", f"{tag}-pong"] if pingpong else [f"{tag}-data"]
        max_frame = spec.size + FRAME_SLACK if spec.capacity == LARGE_CAPACITY else None

        def cleanup() -> None:
            for name in names:
                Ring.unlink_name(name)

        try:
            for name in names:
                # The parent owns the names so that it can unlink them whatever
                # the children do; it keeps no mapping itself.
                Ring.create(name, spec.capacity, max_frame=max_frame).close()
        except BaseException:
            cleanup()
            raise
        if pingpong:
            return (names[0], names[1]), (names[1], names[0]), cleanup
        return (names[0], None), (None, names[0]), cleanup

    if kind == "pipe":
        if pingpong:
            a, b = ctx.Pipe()
            conns = [a, b]
            first, second = (a, a), (b, b)
        else:
            r, w = ctx.Pipe(duplex=False)
            conns = [r, w]
            first, second = (w, None), (None, r)

        def close_pipes() -> None:
            for c in conns:
                c.close()

        return first, second, close_pipes

    if kind in ("queue", "ffifo"):
        if kind == "queue":

            def new_queue() -> Any:
                return ctx.Queue()

        else:
            import faster_fifo

            def new_queue() -> Any:
                # Raw bytes in and out (bytes(b) is b for bytes; loads copies the
                # memoryview it is given): faster_fifo without pickle, its best case.
                return faster_fifo.Queue(max_size_bytes=spec.capacity, loads=bytes, dumps=bytes)

        queues = [new_queue() for _ in range(2 if pingpong else 1)]

        def close_queues() -> None:
            for q in queues:
                if kind == "queue":
                    q.close()

        if pingpong:
            return (queues[0], queues[1]), (queues[1], queues[0]), close_queues
        return (queues[0], None), (None, queues[0]), close_queues

    if kind == "zmq":
        path = os.path.join(tmpdir, tag)
        addr = f"ipc://{path}"

        def remove_socket() -> None:
            if os.path.exists(path):
                os.unlink(path)

        # (address, bind?): the second role binds, the first connects.
        return (addr, False), (addr, True), remove_socket

    raise ValueError(f"unknown transport kind {kind!r}")


# ----------------------------------------------------------------- child side


@dataclass
class Io:
    """One child's end of a channel, as bound methods of the library underneath."""

    send: Callable[[Any], Any] | None = None
    recv: Callable[[], Any] | None = None
    send_many: Callable[[list[bytes]], Any] | None = None
    recv_many: Callable[[int], list[Any]] | None = None
    view: Callable[[], Any] | None = None  # a context manager giving a memoryview
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def open_io(kind: str, end: tuple[Any, Any], spec: Spec) -> Io:
    """Open this child's end: ``end`` is what :func:`make_ends` gave its role."""
    io = Io()
    if kind == "zmq":  # one socket, both ways: end is (address, bind?)
        _open_zmq(io, end, spec)
        return io
    tx, rx = end
    if kind == "shmbus":
        from shmbus import Ring

        if tx is not None:
            out = Ring.attach(tx)
            io.closers.append(out.close)
            io.send, io.send_many = out.write, out.write_many
        if rx is not None:
            inp = Ring.attach(rx)
            io.closers.append(inp.close)
            if spec.spin_ns is not None:
                inp.spin_ns = spec.spin_ns
            io.recv, io.recv_many, io.view = inp.read, inp.read_many, inp.read_view
    elif kind == "pipe":
        if tx is not None:
            io.send = tx.send_bytes
        if rx is not None:
            io.recv = rx.recv_bytes
    elif kind == "queue":
        if tx is not None:
            io.send = tx.put
        if rx is not None:
            io.recv = rx.get
    elif kind == "ffifo":
        if tx is not None:
            io.send, io.send_many = tx.put, tx.put_many
        if rx is not None:
            io.recv = rx.get
            get_many = rx.get_many
            io.recv_many = lambda n: get_many(max_messages_to_get=n)
    else:
        raise ValueError(f"unknown transport kind {kind!r}")
    return io


def _open_zmq(io: Io, end: tuple[str, bool], spec: Spec) -> None:
    import zmq

    addr, bind = end
    ctx = zmq.Context()
    io.closers.append(ctx.term)
    if spec.mode == "pingpong":
        kind = zmq.PAIR
    else:
        kind = zmq.PULL if bind else zmq.PUSH
    sock = ctx.socket(kind)
    io.closers.append(functools.partial(sock.close, linger=0))
    if spec.capacity == LARGE_CAPACITY:
        # Bound what is in flight to about the ring's capacity (the default
        # high-water mark of 1000 messages would be 1000 MiB per side).
        sock.sndhwm = sock.rcvhwm = max(2, spec.capacity // spec.size)
    if bind:
        sock.bind(addr)
    else:
        sock.connect(addr)
    if spec.view:
        # Zero-copy both ways: the frame zmq received, handed over as a memoryview.
        recv = sock.recv
        io.send = functools.partial(sock.send, copy=False)
        io.recv = lambda: recv(copy=False).buffer
    else:
        io.send, io.recv = sock.send, sock.recv


# ---------------------------------------------------------------- the loops


def pingpong_client(io: Io, spec: Spec, sync: Callable[[], None]) -> dict[str, Any]:
    """Send, wait for the echo; time each round trip after the warm-up."""
    msg = os.urandom(spec.size)
    send, recv = io.send, io.recv
    assert send is not None and recv is not None
    clock = time.perf_counter_ns
    for _ in range(spec.warmup):
        send(msg)
        recv()
    lat = [0] * spec.count
    wrong = 0
    for i in range(spec.count):
        t = clock()
        send(msg)
        reply = recv()
        lat[i] = clock() - t
        if reply != msg:
            wrong += 1
    sync()
    if wrong:
        raise AssertionError(f"{wrong} of {spec.count} echoes differed from what was sent")
    return latency_summary(lat)


def pingpong_server(io: Io, spec: Spec, sync: Callable[[], None]) -> dict[str, Any]:
    """Echo every message back."""
    send, recv = io.send, io.recv
    assert send is not None and recv is not None
    for _ in range(spec.warmup + spec.count):
        send(recv())
    sync()
    return {}


def _push(io: Io, spec: Spec, payload: bytes, n: int) -> None:
    if spec.batch > 1:
        send_many = io.send_many
        assert send_many is not None
        frames = [payload] * spec.batch
        for _ in range(n // spec.batch):
            send_many(frames)
    else:
        send = io.send
        assert send is not None
        for _ in range(n):
            send(payload)


def _pull(io: Io, spec: Spec, n: int) -> tuple[int, int]:
    """Receive ``n`` frames; returns (frames, bytes) as counted on arrival.

    Every frame reaches Python as bytes or a memoryview and has its first byte
    read, so no transport can skip the delivery.
    """
    frames = nbytes = touched = 0
    if spec.batch > 1:
        recv_many = io.recv_many
        assert recv_many is not None
        batch = spec.batch
        while frames < n:
            got = recv_many(min(batch, n - frames))
            frames += len(got)
            nbytes += sum(map(len, got))
            touched ^= got[-1][0] if got else 0
    elif spec.view and io.view is not None:
        view = io.view
        for _ in range(n):
            with view() as v:
                nbytes += len(v)
                touched ^= v[0]
        frames = n
    else:
        recv = io.recv
        assert recv is not None
        for _ in range(n):
            m = recv()
            nbytes += len(m)
            touched ^= m[0]
        frames = n
    return frames, nbytes


def tput_writer(io: Io, spec: Spec, sync: Callable[[], None]) -> dict[str, Any]:
    """Warm up, then send ``count`` frames as fast as the transport takes them."""
    payload = os.urandom(spec.size)
    _push(io, spec, payload, spec.warmup)
    sync()  # the reader has drained the warm-up
    t0 = time.perf_counter()
    _push(io, spec, payload, spec.count)
    t_sent = time.perf_counter()
    sync()  # stay up (and keep sockets and feeder threads alive) until all arrived
    return {"t0": t0, "t_sent": t_sent}


def tput_reader(io: Io, spec: Spec, sync: Callable[[], None]) -> dict[str, Any]:
    """Drain the warm-up, then receive and check ``count`` frames; the clock stops here."""
    _pull(io, spec, spec.warmup)
    sync()
    t_start = time.perf_counter()
    frames, nbytes = _pull(io, spec, spec.count)
    t1 = time.perf_counter()
    sync()
    if frames != spec.count or nbytes != spec.count * spec.size:
        raise AssertionError(
            f"received {frames} frames and {nbytes} bytes, "
            f"expected {spec.count} frames of {spec.size} bytes"
        )
    return {"t_start": t_start, "t1": t1, "frames": frames, "bytes": nbytes}


LOOPS = {
    "client": pingpong_client,
    "server": pingpong_server,
    "writer": tput_writer,
    "reader": tput_reader,
}


def child_main(role: str, kind: str, spec: Spec, end: Any, barrier: Any, conn: Any) -> None:
    """A child's whole life: open its end, run its loop, report ("ok"|"error", data)."""
    # Ctrl-C is the parent's business: it kills the children and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    io: Io | None = None
    try:

        def sync() -> None:
            barrier.wait(spec.timeout)

        # The side that binds (zmq) opens first, the other one after the barrier.
        if role in ("server", "reader"):
            io = open_io(kind, end, spec)
            sync()
        else:
            sync()
            io = open_io(kind, end, spec)
        result = LOOPS[role](io, spec, sync)
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", f"{role} ({kind}): {traceback.format_exc()}"))
    finally:
        if io is not None:
            io.close()
        conn.close()


def latency_summary(lat: list[int]) -> dict[str, Any]:
    """Round-trip times in nanoseconds as percentiles (nearest rank) in microseconds."""
    lat.sort()
    n = len(lat)

    def pct(q: float) -> float:
        return lat[min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))] / 1e3

    return {
        "round_trips": n,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "mean_us": sum(lat) / n / 1e3,
        "min_us": lat[0] / 1e3,
        "max_us": lat[-1] / 1e3,
    }
