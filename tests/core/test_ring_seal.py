"""Sealing an inbox whose reader has gone: nothing can land in it after its drain."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import shmbus
from shmbus import Ring, RingSealed

# --------------------------------------------------------------- the ring


def test_a_sealed_ring_refuses_writes_and_still_gives_what_it_holds(ring_name):
    with Ring.create(ring_name, 1 << 16, lanes=3) as reader:
        writer = Ring.attach(ring_name, lanes=True)
        writer.write(b"before")
        writer.lane(90).write(b"urgent")
        reader.seal()
        assert writer.sealed and all(lane.sealed for lane in reader.lanes)
        for lane in writer.lanes:
            with pytest.raises(RingSealed, match="sealed"):
                lane.write(b"after")
            with pytest.raises(RingSealed):
                lane.try_write(b"after")
            with pytest.raises(RingSealed):
                lane.claim(8)
        assert reader.read_many(10, timeout=0) == [b"urgent"]
        assert reader.read_many(10, timeout=0) == [b"before"]
        assert reader.read_many(10, timeout=0) == []
        writer.close()


def test_a_writer_waiting_on_a_full_ring_stops_waiting_at_the_seal(ring_name):
    with Ring.create(ring_name, 1 << 12) as reader:
        writer = Ring.attach(ring_name)
        while writer.try_write(b"x" * 100):
            pass
        errors: list[BaseException] = []

        def blocked() -> None:
            try:
                writer.write(b"y" * 100, timeout=30)
            except BaseException as e:  # noqa: BLE001 - the test looks at it
                errors.append(e)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.1)
        reader.seal()
        t.join(10)
        assert not t.is_alive(), "the writer still waits on a sealed ring"
        assert len(errors) == 1 and isinstance(errors[0], RingSealed)
        writer.close()


def _hammer(ring_name: str, done, count) -> None:  # noqa: ANN001 - mp.Value
    """Writes numbered frames until the ring is sealed; counts what it wrote."""
    n = 0
    with Ring.attach(ring_name, lanes=True) as ring:
        try:
            while True:
                ring.lane(n % 101).write(b"%d" % n, timeout=20)
                n += 1
                count.value = n
        except RingSealed:
            pass
    done.value = 1


def test_everything_written_before_the_seal_is_read_after_it(ring_name, children):
    """The X1/X2 pairing: every write that returned is read by a drain that
    stops at the tail it loads after sealing; nothing is committed later."""
    ctx = children.ctx
    workers = [(ctx.Value("q", 0, lock=False), ctx.Value("b", 0, lock=False)) for _ in range(2)]
    with Ring.create(ring_name, 1 << 12, lanes=3) as reader:  # small: writers wait often
        for count, done in workers:
            children.start(_hammer, ring_name, done, count)
        got = 0
        deadline = time.monotonic() + 30
        while got < 20_000 or not all(c.value for c, _ in workers):
            assert time.monotonic() < deadline
            got += len(reader.read_many(64, timeout=1))
        reader.seal()
        tails = [lane.positions[1] for lane in reader.lanes]
        while any(
            (lane.positions[0] - t) % (1 << 64) >= 1 << 63
            for lane, t in zip(reader.lanes, tails, strict=True)
        ):
            assert time.monotonic() < deadline
            got += len(reader.read_many(64, timeout=0.01))
        for _, done in workers:
            while not done.value:
                assert time.monotonic() < deadline, "a writer did not see the seal"
                time.sleep(0.01)
        time.sleep(0.05)
        assert reader.read_many(64, timeout=0) == [], "a frame was committed after the drain"
        assert got == sum(c.value for c, _ in workers)


# ---------------------------------------------------------------- the bus


def _holder(bus: str) -> None:
    with shmbus.connect(bus=bus, name="holder", inbox_capacity=1 << 12) as agent:
        agent.subscribe("jobs.*")
        agent.send("driver", "ready")
        time.sleep(60)  # killed here, reading nothing


def wait_dlq(agent: shmbus.Agent, n: int) -> list[shmbus.DeadLetter]:
    deadline = time.monotonic() + 20
    while len(dead := agent.dlq()) < n:
        assert time.monotonic() < deadline, f"{len(dead)} of {n} dead letters"
        time.sleep(0.05)
    return dead


@pytest.mark.parametrize("how", ["send", "publish"])
def test_a_sender_blocked_on_a_dead_agents_full_inbox_is_released(bus, children, how):
    with shmbus.connect(bus=bus, name="driver") as driver:
        proc = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        sent = []
        while True:  # fill it
            try:
                sent.append(driver.send("holder", b"x" * 100, backpressure="error"))
            except shmbus.InboxFull:
                break
        threading.Timer(0.3, os.kill, (proc.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        if how == "send":
            with pytest.raises(shmbus.UnknownRecipient):
                driver.send("holder", b"last", timeout=30)  # blocks until the death
        else:
            driver.publish("jobs.x", b"last", timeout=30)  # its copy: dead-lettered
        assert time.monotonic() - started < 20, "it waited for its timeout, not the death"
        dead = wait_dlq(driver, len(sent) + 1)
        by_id = {d.message.id: d for d in dead}
        assert set(sent) <= set(by_id)
        assert all(by_id[i].reason.startswith("recipient died") for i in sent)
        (last,) = [d for d in dead if d.message.payload == b"last"]
        assert last.reason.startswith(("no recipient", "recipient left"))
        assert len(dead) == len(sent) + 1  # every message once
