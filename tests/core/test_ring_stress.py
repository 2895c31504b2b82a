"""Many producer processes, one consumer: nothing lost, duplicated, reordered or damaged.

Each frame is ``crc32 | producer | seq | payload`` (little-endian u32, u32, u64,
then random bytes); the crc covers everything after itself. Producers mix
``write``, ``write_many`` batches and in-place ``claim`` (some claims aborted,
which the reader must never see); the test process is the consumer and checks
every frame. The ring is small and some frames are large, so it wraps and
fills all the time and producers often wait for room.

No timing is asserted: the waits have generous timeouts only so that a bug
turns into a failure instead of a hang.
"""

from __future__ import annotations

import random
import struct
import time
import zlib
from typing import Any

import pytest

from shmbus import Ring, RingFull

HEAD = struct.Struct("<IIQ")  # crc32, producer, seq
BODY = struct.Struct("<IQ")  # producer, seq (what the crc covers, with the payload)
CRC = struct.Struct("<I")
HEAD_SIZE = HEAD.size  # 16
ABORTED_SEQ = 1 << 63  # written into claims that are then aborted: must never arrive
POOL_SIZE = 1 << 16
TABLE = 1 << 13  # per-producer table of (size, payload offset), cycled
WRITE_TIMEOUT = 60.0  # a producer waiting this long for room means the consumer is stuck
START_TIMEOUT = 60.0  # spawned children import the test module (pytest, shmbus) first


class _Abort(Exception):
    """Raised inside a claim block to abort the claim."""


def _plan(seed: int, big_every: int, big_max: int) -> tuple[bytes, list[tuple[int, int]]]:
    """Random payload pool and a table of (frame size, pool offset)."""
    rng = random.Random(seed)
    pool = rng.randbytes(POOL_SIZE)
    table = []
    for _ in range(TABLE):
        if rng.randrange(big_every) == 0:
            size = rng.randint(121, big_max)
        else:
            size = rng.randint(HEAD_SIZE, 120)
        table.append((size, rng.randrange(POOL_SIZE - size)))
    return pool, table


def _producer(
    name: str,
    producer: int,
    count: int,
    seed: int,
    ready: Any,
    go: Any,
    big_every: int,
    big_max: int,
    pause_every: int,
) -> None:
    """Send ``count`` frames numbered 0..count-1, in runs of a random write method.

    With ``pause_every`` > 0, sleep a little after about every that many frames,
    so that a reader with nothing to do goes to sleep on the doorbell.
    """
    pool, table = _plan(seed, big_every, big_max)
    rng = random.Random(seed ^ 0x5EED)
    ring = Ring.attach(name)
    ready.set()
    if not go.wait(START_TIMEOUT):
        raise RuntimeError("never told to start")
    pack_body = BODY.pack
    pack_crc = CRC.pack
    crc32 = zlib.crc32
    mask = TABLE - 1

    def frame(seq: int) -> bytes:
        size, off = table[seq & mask]
        body = pack_body(producer, seq) + pool[off : off + size - HEAD_SIZE]
        return pack_crc(crc32(body)) + body

    seq = 0
    while seq < count:
        run = min(rng.randint(1, 200), count - seq)
        mode = rng.randrange(3)
        if mode == 0:  # one write() per frame
            write = ring.write
            for s in range(seq, seq + run):
                write(frame(s), WRITE_TIMEOUT)
        elif mode == 1:  # write_many() in batches of 1..64
            s = seq
            end = seq + run
            while s < end:
                batch = [frame(i) for i in range(s, min(s + rng.randint(1, 64), end))]
                done = ring.write_many(batch, timeout=WRITE_TIMEOUT)
                if done != len(batch):
                    raise RingFull(f"write_many wrote {done} of {len(batch)} in {WRITE_TIMEOUT}s")
                s += done
        else:  # claim() and fill in place; now and then abort one
            for s in range(seq, seq + run):
                size, off = table[s & mask]
                if rng.randrange(50) == 0:
                    try:
                        with ring.claim(size, timeout=WRITE_TIMEOUT) as buf:
                            HEAD.pack_into(buf, 0, 0, producer, ABORTED_SEQ)
                            raise _Abort
                    except _Abort:
                        pass
                with ring.claim(size, timeout=WRITE_TIMEOUT) as buf:
                    BODY.pack_into(buf, 4, producer, s)
                    buf[HEAD_SIZE:] = pool[off : off + size - HEAD_SIZE]
                    CRC.pack_into(buf, 0, crc32(buf[4:]))
        seq += run
        if pause_every and rng.randrange(pause_every) < run:
            time.sleep(rng.uniform(0.0002, 0.003))
    ring.close()


def _verify(frames: list[bytes], expect: list[int], n_producers: int) -> None:
    """Check every frame; ``expect[p]`` is the next sequence number of producer p."""
    unpack = HEAD.unpack_from
    crc32 = zlib.crc32
    for f in frames:
        try:
            crc, p, seq = unpack(f)
        except struct.error:
            pytest.fail(f"frame of {len(f)} bytes is shorter than its {HEAD_SIZE}-byte header")
        if seq == ABORTED_SEQ:
            pytest.fail(f"an aborted claim of producer {p} was delivered")
        if crc32(f[4:]) != crc:
            pytest.fail(f"checksum mismatch: producer {p} seq {seq}, {len(f)} bytes: {f[:32]!r}")
        if p >= n_producers:
            pytest.fail(f"unknown producer {p} (seq {seq})")
        if seq != expect[p]:
            what = "duplicate or reordered" if seq < expect[p] else "lost"
            pytest.fail(f"producer {p}: expected seq {expect[p]}, got {seq} ({what} frame)")
        expect[p] = seq + 1


def _run(
    ring_name: str,
    children: Any,
    *,
    producers: int,
    per_producer: int,
    capacity: int,
    max_frame: int | None = None,
    big_every: int,
    big_max: int,
    pause_every: int,
    spin_ns: int | None,
    stall_timeout: float,
    stall_is_failure: bool,
    guard: float,
) -> None:
    """Start the producers, then consume and verify every frame here."""
    total = producers * per_producer
    with Ring.create(ring_name, capacity, max_frame=max_frame) as ring:
        if spin_ns is not None:
            ring.spin_ns = spin_ns
        ctx = children.ctx
        go = ctx.Event()
        readies = []
        procs = []
        for p in range(producers):
            ready = ctx.Event()
            readies.append(ready)
            procs.append(
                children.start(
                    _producer,
                    ring_name,
                    p,
                    per_producer,
                    1000 + p,
                    ready,
                    go,
                    big_every,
                    big_max,
                    pause_every,
                )
            )
        start_deadline = time.monotonic() + START_TIMEOUT
        for p, ready in enumerate(readies):
            if not ready.wait(max(start_deadline - time.monotonic(), 0.01)):
                pytest.fail(
                    f"producer {p} did not attach within {START_TIMEOUT}s "
                    f"(exit code {procs[p].exitcode})"
                )
        go.set()

        expect = [0] * producers
        received = 0
        reads = 0
        deadline = time.monotonic() + guard
        while received < total:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"only {received} of {total} frames arrived within {guard}s; "
                    f"next expected per producer: {expect}"
                )
            reads += 1
            frames = []
            if reads % 97 == 0 and total - received >= 2:  # the one-frame paths, now and then
                try:
                    frames.append(ring.read(stall_timeout))
                    with ring.read_view(stall_timeout) as view:
                        frames.append(bytes(view))
                    item = ring.try_read()  # None when the ring happens to be empty
                    if item is not None:
                        frames.append(item)
                except TimeoutError:
                    if frames:  # one frame, then nothing though more are due: a stall
                        _verify(frames, expect, producers)
                        received += len(frames)
                        frames = []
            else:
                frames = ring.read_many(1024, timeout=stall_timeout)
            if frames:
                _verify(frames, expect, producers)
                received += len(frames)
                continue
            failed = {p.pid: p.exitcode for p in procs if p.exitcode not in (None, 0)}
            if failed:
                pytest.fail(f"producers failed (pid: exit code): {failed}; see captured stderr")
            if all(p.exitcode == 0 for p in procs) and ring.used == 0:
                pytest.fail(
                    f"producers are done but only {received} of {total} frames arrived; "
                    f"next expected per producer: {expect}"
                )
            if stall_is_failure:
                pytest.fail(
                    f"the reader waited {stall_timeout}s for nothing with "
                    f"{total - received} frames still to come: a lost doorbell?"
                )

        assert expect == [per_producer] * producers
        children.join_all(30)
        assert [p.exitcode for p in procs] == [0] * producers
        assert ring.try_read() is None, "a frame beyond the last one sent"
        assert ring.used == 0


@pytest.mark.slow
def test_many_producers_no_loss_no_dup_in_order(ring_name, children):
    """6 producers x 350k frames through a 64 KiB ring: 16..120-byte frames, 1% up to 4 KiB."""
    _run(
        ring_name,
        children,
        producers=6,
        per_producer=350_000,
        capacity=64 * 1024,
        big_every=100,
        big_max=4096,
        pause_every=0,
        spin_ns=None,
        stall_timeout=2.0,
        stall_is_failure=False,
        guard=240.0,
    )


@pytest.mark.slow
def test_large_frames_in_a_tiny_ring(ring_name, children):
    """An 8 KiB ring with frames up to its limit (about half of it): it wraps every few frames.

    A frame that does not fit before the end goes to index 0 behind a padding
    record and must end before the head, so producers wait for the head often.
    """
    capacity = 8 * 1024
    limit = capacity // 2 - 8
    _run(
        ring_name,
        children,
        producers=4,
        per_producer=60_000,
        capacity=capacity,
        max_frame=limit,
        big_every=8,
        big_max=limit,
        pause_every=0,
        spin_ns=None,
        stall_timeout=2.0,
        stall_is_failure=False,
        guard=180.0,
    )


@pytest.mark.slow
def test_sleeping_reader_is_woken_by_the_doorbell(ring_name, children):
    """spin_ns = 0: the reader sleeps on the semaphore whenever the ring is empty.

    Producers pause now and then, so the reader really goes to sleep many
    times; a doorbell rung too early or not at all would leave it asleep with
    frames waiting, which shows up as a read that times out (10 s, far beyond
    any pause) while frames are still due.
    """
    _run(
        ring_name,
        children,
        producers=4,
        per_producer=50_000,
        capacity=64 * 1024,
        big_every=50,
        big_max=4096,
        pause_every=40,
        spin_ns=0,
        stall_timeout=10.0,
        stall_is_failure=True,
        guard=120.0,
    )
