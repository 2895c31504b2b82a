"""unblock(): a record left behind by a dead writer must not stall the reader forever."""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest

import shmbus
from shmbus import Ring

FRAME = struct.Struct("<II")  # producer, sequence


def _die_mid_claim(name: str, claimed, before: int) -> None:
    ring = Ring.attach(name)
    for seq in range(before):
        ring.write(FRAME.pack(99, seq))
    claim = ring.claim(64)
    view = claim.__enter__()
    view[:8] = b"halfway!"
    claimed.set()
    time.sleep(60)  # killed here, the claim never committed


def _produce(name: str, producer: int, count: int) -> None:
    ring = Ring.attach(name)
    try:
        for seq in range(count):
            ring.write(FRAME.pack(producer, seq) + bytes(seq % 50), timeout=30)
    finally:
        ring.close()


def test_writer_killed_mid_claim_is_unblocked_and_live_writers_lose_nothing(ring_name, children):
    per_producer, before = 3000, 5
    ring = Ring.create(ring_name, 1 << 15)  # small: the live writers fill it while stalled
    try:
        claimed = children.ctx.Event()
        victim = children.start(_die_mid_claim, ring_name, claimed, before)
        assert claimed.wait(20), "the victim never claimed"
        for producer in (1, 2):
            children.start(_produce, ring_name, producer, per_producer)

        got = [FRAME.unpack_from(f) for f in ring.read_many(before, timeout=10)]
        assert got == [(99, seq) for seq in range(before)]
        # The reader stalls behind the open claim while the live writers fill the ring.
        deadline = time.monotonic() + 10
        while ring.used + 64 < ring.capacity and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.read_many(100, timeout=0.2) == []
        assert ring.used > 0

        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
        assert ring.unblock()

        seen = {1: [], 2: []}
        deadline = time.monotonic() + 30
        while sum(map(len, seen.values())) < 2 * per_producer and time.monotonic() < deadline:
            for frame in ring.read_many(512, timeout=1):
                producer, seq = FRAME.unpack_from(frame)
                seen[producer].append(seq)
        for producer in (1, 2):
            assert seen[producer] == list(range(per_producer)), f"producer {producer}"
        children.join_all(10)
        assert ring.try_read() is None
    finally:
        ring.close()
        ring.unlink()


# A claim still open by a live writer looks exactly like a dead one's, which
# is why callers must be certain of the death (the coordinator is, from the
# closed control socket and the exit status). The ring does not guess.
def test_unblock_cannot_tell_a_live_claim_from_a_dead_one(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        claim = ring.claim(8)
        claim.__enter__()
        assert ring.unblock()  # so only call it once the writer is known dead
        with pytest.raises(shmbus.ClaimLost):  # the claim was turned into padding
            claim.__exit__(None, None, None)
        assert ring.try_read() is None


def test_space_reserved_with_nothing_written_is_padded_up_to_the_next_record(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        ring.write(b"before")
        ring._test_reserve(100)  # a writer killed between its CAS and its first store
        ring.write_many([b"after-1", b"after-2"])
        assert ring.read_many(10, 0) == [b"before"]
        assert ring.read_many(10, timeout=0.05) == []  # stalled on the zero length
        assert ring.unblock()
        assert ring.read_many(10, 0) == [b"after-1", b"after-2"]
        assert ring.used == 0


def test_reserved_space_that_wraps_with_its_padding_written(ring_name):
    with Ring.create(ring_name, 4096, max_frame=2040) as ring:
        ring.write_many([b"x" * 488] * 7)
        assert len(ring.read_many(10, 0)) == 7
        ring._test_reserve(700)  # died after the padding, before its own record
        ring.write(b"live")
        assert ring.read_many(10, timeout=0.05) == []  # the padding went, index 0 stalls
        assert ring.unblock()
        assert ring.read_many(10, 0) == [b"live"]


def test_space_reserved_at_the_tail_with_nothing_after_waits_for_a_later_record(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        ring._test_reserve(40)
        # Its length is unknown and nothing follows: nothing can be done yet.
        assert not ring.unblock()
        ring.write(b"later")
        assert ring.unblock()
        assert ring.read_many(10, 0) == [b"later"]


def test_reserved_space_that_wraps_is_padded_to_the_end_then_from_zero(ring_name):
    with Ring.create(ring_name, 4096, max_frame=2040) as ring:
        # Move the tail near the end of the buffer.
        for _ in range(7):
            ring.write(b"x" * 488)  # 496 bytes a record: 3472 of 4096
        assert len(ring.read_many(10, 0)) == 7
        # Needs wrap padding (624 bytes to the end) + 712 at index 0, and dies
        # before it writes even the padding: the rest of the lap is all zeros.
        ring._test_reserve(700, write_padding=False)
        ring.write(b"live")
        assert ring.read_many(10, timeout=0.05) == []
        assert ring.unblock()  # pads the rest of this lap (Agrona would give up here)
        assert ring.read_many(10, timeout=0.05) == []  # now stalled at index 0
        assert ring.unblock()  # pads the dead record up to the live one
        assert ring.read_many(10, 0) == [b"live"]
        assert ring.used == 0


def test_unblock_on_a_healthy_ring_does_nothing(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        assert not ring.unblock()  # empty
        ring.write(b"committed")
        assert not ring.unblock()  # committed records need no help
        with pytest.raises(RuntimeError):
            with ring.claim(4):
                raise RuntimeError  # aborted: padding, already skippable
        assert not ring.unblock()
        assert ring.read_many(10, 0) == [b"committed"]


def _unblock_forever(name: str, stop, results) -> None:
    ring = Ring.attach(name)
    unblocked = errors = calls = 0
    while not stop.is_set():
        try:
            unblocked += ring.unblock()
        except shmbus.ShmbusError:
            errors += 1
        calls += 1
    results.put((unblocked, errors, calls))
    ring.close()


def test_unblock_from_another_process_never_touches_a_busy_healthy_ring(ring_name, children):
    """The coordinator calls unblock() while the reader runs: with no dead
    writer it must find nothing to do, however the reader and writers move."""
    per_producer = 20_000
    with Ring.create(ring_name, 4096) as ring:  # small: laps every few dozen frames
        stop, results = children.ctx.Event(), children.ctx.Queue()
        children.start(_unblock_forever, ring_name, stop, results)
        for producer in (1, 2):
            children.start(_produce, ring_name, producer, per_producer)
        seen = {1: [], 2: []}
        deadline = time.monotonic() + 60
        while sum(map(len, seen.values())) < 2 * per_producer and time.monotonic() < deadline:
            for frame in ring.read_many(64, timeout=1):
                producer, seq = FRAME.unpack_from(frame)
                seen[producer].append(seq)
        stop.set()
        unblocked, errors, calls = results.get(timeout=20)
        children.join_all(20)
        assert seen == {1: list(range(per_producer)), 2: list(range(per_producer))}
        assert (unblocked, errors) == (0, 0), f"over {calls} calls"
