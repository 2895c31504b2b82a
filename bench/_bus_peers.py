"""The transports of bench_bus.py, and the loops its child processes measure.

Each child opens its end of a channel as an :class:`Io`: a few callables of
the library underneath (``send``, ``recv``, ``send_many``, ...) plus how to
turn what arrives into the payload (``decode``) and a cheap check of it
(``touch``). The loops below are written once for every transport; they call
the library directly, with no wrapper of ours on the way, except where the
peer needs one to do the same work as the bus (zmq moves bytes, so a dict is
msgpack-packed before ``send`` and unpacked after ``recv``).

shmbus children are agents started by ``shmbus.Runner.spawn`` on a fresh bus
(:func:`shmbus_child`); the peers' children are plain processes
(:func:`peer_child`). Peer libraries are imported only by the children that
need them, so a missing one costs its rows and nothing else.
"""

from __future__ import annotations

import cProfile
import functools
import io as _io
import operator
import os
import pstats
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from _peers import latency_summary

#: The small dict of the dict cases, as an agent might send a sensor reading.
DICT_PAYLOAD = {"id": 7, "name": "sensor-7", "value": 3.25, "ok": True}
TOPIC = "bench.data"
#: How long a zmq subscriber waits for the next message before it counts the
#: rest as dropped (PUB drops instead of blocking once a queue is full).
SUB_IDLE_MS = 2000

#: Agent names on the bus, by role (publish adds -1, -2, ... to "subscriber").
RECEIVER, SERVER = "receiver", "server"


@dataclass(frozen=True)
class Spec:
    """What one measurement does; every child gets a copy."""

    mode: str  # "tput", "request" or "publish"
    payload: str  # "bytes" or "dict"
    size: int  # size of a bytes payload
    count: int  # measured messages (or round trips)
    warmup: int  # messages (or round trips) before the clock starts
    batch: int = 1  # messages per send_many / recv_many call (shmbus only)
    subscribers: int = 0
    timeout: float = 60.0  # seconds the whole measurement may take
    profile: bool = False  # run the measured part of shmbus children under cProfile

    def make_payload(self) -> Any:
        return os.urandom(self.size) if self.payload == "bytes" else dict(DICT_PAYLOAD)

    def touched(self, n: int) -> int:
        """What ``touch`` adds up to over ``n`` intact payloads."""
        return n * (self.size if self.payload == "bytes" else DICT_PAYLOAD["id"])


def roles(spec: Spec) -> list[str]:
    """The children of one measurement; those that bind or serve come first."""
    if spec.mode == "tput":
        return ["receiver", "sender"]
    if spec.mode == "request":
        return ["server", "client"]
    return ["publisher"] + [f"subscriber-{i}" for i in range(1, spec.subscribers + 1)]


def _binds(role: str) -> bool:
    return role in ("receiver", "server", "publisher")


# --------------------------------------------------------------------- Io


@dataclass
class Io:
    """One child's end of a channel, as callables of the library underneath."""

    send: Callable[[Any], Any] | None = None
    recv: Callable[[], Any] | None = None
    encode: Callable[[Any], Any] | None = None  # before send (zmq: msgpack.packb)
    decode: Callable[[Any], Any] | None = None  # after recv (shmbus: .payload)
    touch: Callable[[Any], int] = len  # a cheap look at each payload: len or ["id"]
    send_many: Callable[[list[Any]], Any] | None = None
    recv_many: Callable[[int], list[Any]] | None = None
    roundtrip: Callable[[Any], Any] | None = None  # request -> the reply's payload
    echo: Callable[[], Any] | None = None  # serve one request
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def _touch(spec: Spec) -> Callable[[Any], int]:
    return len if spec.payload == "bytes" else operator.itemgetter("id")


def open_shmbus(agent: Any, role: str, spec: Spec) -> Io:
    """An agent's end: sends go to the receiver/server, publishes to TOPIC."""
    io = Io(touch=_touch(spec), decode=operator.attrgetter("payload"))
    if role == "sender":
        io.send = functools.partial(agent.send, RECEIVER)
        io.send_many = functools.partial(agent.send_many, RECEIVER)
    elif role in ("receiver", "server") or role.startswith("subscriber"):
        io.recv, io.recv_many = agent.recv, agent.recv_many
    if role.startswith("subscriber"):
        agent.subscribe(TOPIC)
    elif role == "publisher":
        io.send = functools.partial(agent.publish, TOPIC)
    elif role == "client":
        request = agent.request

        def roundtrip(payload: Any) -> Any:
            return request(SERVER, payload, timeout=spec.timeout).payload

        io.roundtrip = roundtrip
    elif role == "server":
        recv, reply = agent.recv, agent.reply

        def echo() -> None:
            msg = recv()
            reply(msg, msg.payload)

        io.echo = echo
    return io


def open_peer(kind: str, role: str, end: Any, spec: Spec) -> Io:
    """A peer's end: ``end`` is what bench_bus.make_ends gave this role."""
    io = Io(touch=_touch(spec))
    if kind == "zmq":
        _open_zmq(io, role, end, spec)
    elif kind == "queue":
        if spec.mode == "request":  # a pair of queues: requests one way, replies the other
            out, inp = end
            put, get = out.put, inp.get
            if role == "client":

                def roundtrip(payload: Any) -> Any:
                    put(payload)
                    return get()

                io.roundtrip = roundtrip
            else:
                io.echo = lambda: put(get())
        else:
            io.send, io.recv = end.put, end.get
    elif kind == "pipe":  # request only: one duplex pipe
        send, recv = end.send, end.recv
        if role == "client":

            def roundtrip(payload: Any) -> Any:
                send(payload)
                return recv()

            io.roundtrip = roundtrip
        else:
            io.echo = lambda: send(recv())
    else:
        raise ValueError(f"unknown transport kind {kind!r}")
    return io


def _open_zmq(io: Io, role: str, addr: str, spec: Spec) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    io.closers.append(ctx.term)
    kinds = {
        "receiver": zmq.PULL,
        "sender": zmq.PUSH,
        "server": zmq.REP,
        "client": zmq.REQ,
        "publisher": zmq.PUB,
    }
    sock = ctx.socket(kinds.get(role, zmq.SUB))
    io.closers.append(functools.partial(sock.close, linger=0))
    if spec.mode == "publish":
        # Room for every message of the run, so that PUB never has to drop.
        sock.sndhwm = sock.rcvhwm = spec.warmup + spec.count + 10_000
        if role != "publisher":
            sock.rcvtimeo = SUB_IDLE_MS
            sock.setsockopt(zmq.SUBSCRIBE, b"")
    if _binds(role):
        sock.bind(addr)
    else:
        sock.connect(addr)
    io.send, io.recv = sock.send, sock.recv
    pack, unpack = msgpack.packb, msgpack.unpackb
    if spec.payload == "dict":
        io.encode, io.decode = pack, unpack
    send, recv = sock.send, sock.recv
    if role == "client":

        def roundtrip(payload: Any) -> Any:
            send(pack(payload))
            return unpack(recv())

        io.roundtrip = roundtrip
    elif role == "server":
        io.echo = lambda: send(pack(unpack(recv())))


# ------------------------------------------------------------------- loops


class Window:
    """Marks the measured part of a loop; under --profile, cProfile runs only there."""

    def __init__(self, profile: bool) -> None:
        self.prof = cProfile.Profile() if profile else None

    def open(self) -> None:
        if self.prof is not None:
            self.prof.enable()

    def close(self) -> None:
        if self.prof is not None:
            self.prof.disable()

    def report(self, top: int = 15) -> str | None:
        if self.prof is None:
            return None
        out = _io.StringIO()
        pstats.Stats(self.prof, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


def _push(io: Io, spec: Spec, payload: Any, n: int) -> None:
    if spec.batch > 1:
        send_many = io.send_many
        assert send_many is not None
        frames = [payload] * spec.batch
        full, rest = divmod(n, spec.batch)
        for _ in range(full):
            send_many(frames)
        if rest:
            send_many(frames[:rest])
        return
    send, encode = io.send, io.encode
    assert send is not None
    if encode is None:
        for _ in range(n):
            send(payload)
    else:
        for _ in range(n):
            send(encode(payload))


def _pull(io: Io, spec: Spec, n: int) -> int:
    """Receive ``n`` messages; returns the sum of ``touch`` over their payloads."""
    total = 0
    touch, decode = io.touch, io.decode
    if spec.batch > 1:
        recv_many = io.recv_many
        assert recv_many is not None and decode is not None
        got = 0
        while got < n:
            msgs = recv_many(min(spec.batch, n - got))
            got += len(msgs)
            for m in msgs:
                total += touch(decode(m))
        return total
    recv = io.recv
    assert recv is not None
    if decode is None:
        for _ in range(n):
            total += touch(recv())
    else:
        for _ in range(n):
            total += touch(decode(recv()))
    return total


def sender(io: Io, spec: Spec, sync: Callable[[], None], window: Window, **_: Any) -> dict:
    payload = spec.make_payload()
    _push(io, spec, payload, spec.warmup)
    sync()  # the receiver has drained the warm-up
    window.open()
    t0 = time.perf_counter()
    _push(io, spec, payload, spec.count)
    t_sent = time.perf_counter()
    window.close()
    sync()  # stay up (sockets, feeder threads) until everything arrived
    return {"t0": t0, "t_sent": t_sent}


def receiver(io: Io, spec: Spec, sync: Callable[[], None], window: Window, **_: Any) -> dict:
    """The clock runs from the first measured message to the last, here."""
    _pull(io, spec, spec.warmup)
    sync()
    total = _pull(io, replace(spec, batch=1), 1)  # waits for the sender: not timed
    window.open()
    t_first = time.perf_counter()
    total += _pull(io, spec, spec.count - 1)
    t_last = time.perf_counter()
    window.close()
    sync()
    if total != spec.touched(spec.count):
        raise AssertionError("payloads differ from those sent")
    return {"received": spec.count, "t_first": t_first, "t_last": t_last}


def client(io: Io, spec: Spec, sync: Callable[[], None], window: Window, **_: Any) -> dict:
    """Time each request round trip after the warm-up."""
    roundtrip, touch = io.roundtrip, io.touch
    assert roundtrip is not None
    payload = spec.make_payload()
    for _ in range(spec.warmup):
        roundtrip(payload)
    clock = time.perf_counter_ns
    lat = [0] * spec.count
    total = 0
    window.open()
    for i in range(spec.count):
        t = clock()
        reply = roundtrip(payload)
        lat[i] = clock() - t
        total += touch(reply)
    window.close()
    sync()
    if total != spec.touched(spec.count):
        raise AssertionError("replies differ from the requests")
    return latency_summary(lat)


def server(io: Io, spec: Spec, sync: Callable[[], None], window: Window, **_: Any) -> dict:
    echo = io.echo
    assert echo is not None
    for _ in range(spec.warmup):
        echo()
    window.open()
    for _ in range(spec.count):
        echo()
    window.close()
    sync()
    return {}


def publisher(io: Io, spec: Spec, sync: Callable[[], None], window: Window, ready: Any) -> dict:
    """Probe until every subscriber hears us, warm up, then publish ``count`` messages.

    Probes and warm-up messages are one byte shorter than the measured ones,
    which is how a subscriber tells where the measurement starts (zmq's
    subscriptions take a moment to reach the publisher, so how many probes a
    subscriber sees is not known in advance).
    """
    send = io.send
    assert send is not None
    payload = spec.make_payload()
    probe = payload[:-1]
    deadline = time.monotonic() + spec.timeout
    while ready.value < spec.subscribers:
        send(probe)
        time.sleep(0.001)
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready.value} of {spec.subscribers} subscribers heard us")
    for _ in range(spec.warmup):
        send(probe)
    window.open()
    t0 = time.perf_counter()
    for _ in range(spec.count):
        send(payload)
    t_sent = time.perf_counter()
    window.close()
    sync()
    return {"t0": t0, "t_sent": t_sent}


def subscriber(io: Io, spec: Spec, sync: Callable[[], None], window: Window, ready: Any) -> dict:
    """Count what arrives; a zmq subscriber that waits SUB_IDLE_MS for more stops there."""
    recv, decode = io.recv, io.decode
    assert recv is not None
    m = recv() if decode is None else decode(recv())
    with ready.get_lock():
        ready.value += 1
    while len(m) != spec.size:
        m = recv() if decode is None else decode(recv())
    got, total = 1, len(m)
    window.open()
    t_first = t_last = time.perf_counter()
    try:
        if decode is None:
            for _ in range(spec.count - 1):
                total += len(recv())
                got += 1
        else:
            for _ in range(spec.count - 1):
                total += len(decode(recv()))
                got += 1
        t_last = time.perf_counter()
    except Exception as e:  # zmq.Again: nothing for SUB_IDLE_MS, the rest was dropped
        if type(e).__name__ != "Again":
            raise
        t_last = time.perf_counter() - SUB_IDLE_MS / 1e3
    window.close()
    sync()
    if total != got * spec.size:
        raise AssertionError("payloads differ from those published")
    return {"received": got, "t_first": t_first, "t_last": max(t_last, t_first)}


LOOPS = {
    "sender": sender,
    "receiver": receiver,
    "client": client,
    "server": server,
    "publisher": publisher,
    "subscriber": subscriber,
}


# --------------------------------------------------------------- children


def _run(role: str, spec: Spec, open_end: Callable[[], Io], barrier: Any, ready: Any) -> dict:
    """Open this end in turn (binding roles first), run the loop, close the end."""

    def sync() -> None:
        barrier.wait(spec.timeout)

    io: Io | None = None
    try:
        if _binds(role):
            io = open_end()
            sync()
            sync()
        else:
            sync()
            io = open_end()
            sync()
        window = Window(spec.profile)
        result = LOOPS[role.split("-")[0]](io, spec, sync, window, ready=ready)
        profile = window.report()
        if profile is not None:
            result["profile"] = profile
        return result
    finally:
        if io is not None:
            io.close()


def _child(
    conn: Any,
    role: str,
    kind: str,
    spec: Spec,
    open_end: Callable[[], Io],
    barrier: Any,
    ready: Any,
) -> None:
    """A child's whole life: run its role, report ("ok"|"error", data) on ``conn``."""
    # Ctrl-C is the parent's business: it kills the children and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn.send(("ok", _run(role, spec, open_end, barrier, ready)))
    except BaseException:
        conn.send(("error", f"{role} ({kind}): {traceback.format_exc()}"))
    finally:
        conn.close()


def shmbus_child(agent: Any, role: str, spec: Spec, barrier: Any, ready: Any, conn: Any) -> None:
    """The target of Runner.spawn: ``agent`` is connected, under the name ``role``."""
    open_end = functools.partial(open_shmbus, agent, role, spec)
    _child(conn, role, "shmbus", spec, open_end, barrier, ready)


def peer_child(
    kind: str, role: str, spec: Spec, end: Any, barrier: Any, ready: Any, conn: Any
) -> None:
    open_end = functools.partial(open_peer, kind, role, end, spec)
    _child(conn, role, kind, spec, open_end, barrier, ready)
