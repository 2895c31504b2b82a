"""The C waiter (shmbus/core/waiter.py): a ring's doorbell as an eventfd a loop selects on."""

from __future__ import annotations

import os
import random
import select
import time

import pytest

from shmbus import Closed, Ring
from shmbus.core.waiter import Waiter

GUARD = 10.0  # seconds a wait that must end may take before the test fails


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def settled(count: int) -> bool:
    """Has this process ``count`` threads, now or soon? (A joined thread
    leaves /proc/self/task a moment after its join.)"""
    deadline = time.monotonic() + GUARD
    while threads() != count and time.monotonic() < deadline:
        time.sleep(0.001)
    return threads() == count


def test_armed_it_fires_once_a_frame_comes_on_any_lane_and_reads_nothing(ring_name):
    with Ring.create(ring_name, 1 << 16, lanes=3) as inbox, Waiter(inbox) as waiter:
        writer = Ring.attach(ring_name, lanes=True)
        for priority in (0, 50, 90):
            waiter.arm()
            assert not readable(waiter.fd, 0)
            writer.lane(priority).write(b"p%d" % priority)
            assert readable(waiter.fd, GUARD)
            assert waiter.clear()
            assert not readable(waiter.fd, 0)
            assert not waiter.clear()
            assert inbox.read(timeout=0) == b"p%d" % priority  # still there: it never reads
        writer.close()


def test_a_frame_there_before_it_is_armed_fires_as_soon_as_it_is(ring_name):
    with Ring.create(ring_name, 1 << 16, lanes=3) as inbox, Waiter(inbox) as waiter:
        writer = Ring.attach(ring_name, lanes=True)
        writer.lane(90).write(b"early")
        assert not readable(waiter.fd, 0.05)  # not armed: it does not look
        waiter.arm(spin_ns=0)
        assert readable(waiter.fd, GUARD)
        waiter.clear()
        waiter.arm()  # the frame is still unread: armed again, it fires again
        assert readable(waiter.fd, GUARD)
        assert inbox.read_many(10, timeout=0) == [b"early"]
        writer.close()


def test_arming_an_armed_waiter_fires_it_once(ring_name):
    with Ring.create(ring_name, 1 << 16) as inbox, Waiter(inbox) as waiter:
        writer = Ring.attach(ring_name)
        waiter.arm()
        waiter.arm()
        writer.write(b"x")
        assert readable(waiter.fd, GUARD)
        assert os.read(waiter.fd, 8) == (1).to_bytes(8, "little")
        writer.close()


@pytest.mark.parametrize("armed", [False, True])
def test_close_ends_its_thread_and_closes_its_fd(ring_name, armed):
    with Ring.create(ring_name, 1 << 16, lanes=3) as inbox:
        before = threads()
        waiter = Waiter(inbox)
        assert threads() == before + 1
        fd = waiter.fd
        if armed:
            waiter.arm(spin_ns=0)  # asleep on the doorbell
            time.sleep(0.01)
        waiter.close()
        assert settled(before)
        with pytest.raises(OSError):
            os.fstat(fd)
        waiter.close()  # idempotent
        assert waiter.closed and not waiter.clear()
        with pytest.raises(Closed):
            waiter.arm()
        # The ring is the reader's as before (the waiter's reference is gone).
        writer = Ring.attach(ring_name, lanes=True)
        writer.lane(90).write(b"after")
        assert inbox.read(timeout=GUARD) == b"after"
        writer.close()


def test_a_closed_ring_is_refused(ring_name):
    inbox = Ring.create(ring_name, 1 << 16)
    inbox.close()
    inbox.unlink()
    with pytest.raises(Closed):
        Waiter(inbox)


def _write(name: str, who: int, count: int, seed: int) -> None:
    """A writer process: ``count`` frames on every lane in turn, in bursts
    with short pauses, so frames land as the reader re-arms."""
    rnd = random.Random(seed)
    ring = Ring.attach(name, lanes=True)
    for i in range(count):
        ring.lane((0, 50, 90)[i % 3]).write(b"%d:%d" % (who, i), timeout=GUARD)
        if rnd.random() < 0.2:
            time.sleep(rnd.choice((0, 0.00001, 0.00005, 0.0002)))
    ring.close()


def _ping(name: str, back: str, count: int) -> None:
    """A writer process that sends one frame at a time: the next only once
    the reader answered, after a pause of 0 to ~100 us, so each frame may
    land anywhere in the reader's re-arming, and is the only one to come."""
    rnd = random.Random(count)
    ring, answers = Ring.attach(name, lanes=True), Ring.attach(back)
    for i in range(count):
        pause = time.perf_counter() + rnd.choice((0, 1, 5, 20, 50, 100)) * 1e-6
        while time.perf_counter() < pause:
            pass
        ring.lane((0, 50, 90)[i % 3]).write(b"%d" % i, timeout=GUARD)
        answers.read(timeout=GUARD)
    ring.close()
    answers.close()


def _read_all(inbox: Ring, waiter: Waiter, total: int, back: Ring | None = None) -> list[bytes]:
    """Arm, wait for the fd (failing if nothing comes), read what is there; until ``total``."""
    got: list[bytes] = []
    while len(got) < total:
        waiter.arm(spin_ns=random.choice((0, 0, 20_000)))
        assert readable(waiter.fd, GUARD), f"a wake-up was lost after {len(got)} frames"
        waiter.clear()
        while frames := inbox.read_many(64, timeout=0):
            got += frames
            if back is not None:
                back.write(b"ok")
    return got


def test_no_wake_up_is_lost_when_a_lone_frame_comes_as_it_is_rearmed(names, children):
    count = 2000
    with (
        Ring.create(names("inbox"), 1 << 16, lanes=3) as inbox,
        Ring.create(names("back"), 1 << 12) as back,
        Waiter(inbox) as waiter,
    ):
        children.start(_ping, inbox.name, back.name, count)
        got = _read_all(inbox, waiter, count, back)
        children.join_all(GUARD)
        assert got == [b"%d" % i for i in range(count)]


def test_many_writers_on_every_lane_lose_nothing(ring_name, children):
    writers, count = 3, 3000
    with Ring.create(ring_name, 1 << 16, lanes=3) as inbox, Waiter(inbox) as waiter:
        for who in range(writers):
            children.start(_write, ring_name, who, count, who)
        got = _read_all(inbox, waiter, writers * count)
        children.join_all(GUARD)
        assert len(got) == writers * count
        for who in range(writers):  # every frame once; in order within a lane
            mine = [int(f.split(b":")[1]) for f in got if f.startswith(b"%d:" % who)]
            assert sorted(mine) == list(range(count))
            for lane in range(3):
                ours = [i for i in mine if i % 3 == lane]
                assert ours == sorted(ours)
