"""Priority lanes: a reader takes higher lanes first, FIFO within a lane."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import shmbus
from shmbus import Ring
from shmbus.core.ring import LANES, lane_of

# --------------------------------------------------------------- the ring


def drain(ring: Ring) -> list[bytes]:
    out: list[bytes] = []
    while frames := ring.read_many(7, timeout=0):  # small batches: many lane choices
        out += frames
    return out


def test_the_mapping_of_priorities_to_lanes():
    assert LANES == 3
    assert [lane_of(p) for p in (0, 33, 34, 66, 67, 100)] == [0, 0, 1, 1, 2, 2]


def test_higher_lanes_come_first_and_each_lane_keeps_its_order(ring_name):
    with Ring.create(ring_name, 1 << 16, lanes=3) as reader:
        writer = Ring.attach(ring_name, lanes=True)
        assert [lane.name for lane in writer.lanes] == [
            ring_name,
            f"{ring_name}.lane1",
            f"{ring_name}.lane2",
        ]
        for i in range(20):
            for priority in (0, 50, 90):
                writer.lane(priority).write(b"%d:%d" % (priority, i))
        got = drain(reader)
        expect = [b"%d:%d" % (p, i) for p in (90, 50, 0) for i in range(20)]
        assert got == expect
        # A high frame that comes while lane 0 has a backlog is next.
        for i in range(5):
            writer.lane(0).write(b"low%d" % i)
        assert reader.read(timeout=0) == b"low0"
        writer.lane(100).write(b"urgent")
        assert reader.read(timeout=0) == b"urgent"
        with reader.read_view(timeout=0) as view:
            assert bytes(view) == b"low1"
        writer.lane(40).write(b"mid")
        with reader.read_view(timeout=0) as view:
            assert bytes(view) == b"mid"
        assert drain(reader) == [b"low2", b"low3", b"low4"]
        assert reader.fill == (0, 3 * (1 << 16))
        writer.close()


def test_a_frame_larger_than_the_scratch_on_an_upper_lane(ring_name):
    with Ring.create(ring_name, 1 << 21, max_frame=600_000, lanes=3) as reader:
        with Ring.attach(ring_name, lanes=True) as writer:
            big = os.urandom(500_000)
            writer.lane(0).write(b"small")
            writer.lane(80).write(big)
            assert reader.read_many(10, timeout=0) == [big]
            assert reader.read(timeout=0) == b"small"


@pytest.mark.parametrize("priority", [0, 50, 100])
def test_a_sleeping_reader_wakes_for_any_lane(ring_name, priority):
    with Ring.create(ring_name, 1 << 16, lanes=3) as reader:
        reader.spin_ns = 0  # straight to the doorbell
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(reader.read(timeout=10)))
        t.start()
        with Ring.attach(ring_name, lanes=True) as writer:
            time.sleep(0.1)  # let it go to sleep (the test holds either way)
            writer.lane(priority).write(b"wake")
            t.join(10)
        assert got == [b"wake"]


def test_a_ring_without_lanes_is_one_lane(ring_name):
    with Ring.create(ring_name, 1 << 16) as reader:
        writer = Ring.attach(ring_name, lanes=True)
        assert writer.lanes == [writer] and writer.lane(100) is writer
        writer.write(b"x")
        assert reader.read(timeout=0) == b"x"
        writer.close()


def test_lanes_are_checked_and_removed_with_their_ring(ring_name):
    with pytest.raises(shmbus.InvalidArgument, match="lanes"):
        Ring.create(ring_name, 1 << 16, lanes=4)
    with pytest.raises(shmbus.InvalidArgument, match="lanes"):
        Ring.create(ring_name, 1 << 16, lanes=0)
    ring = Ring.create(ring_name, 1 << 16, lanes=3)
    assert (
        sum(ring_name in n for n in os.listdir("/dev/shm")) == 3
    )  # 3 segments; the doorbell is a word in lane 0's
    ring.close()
    assert Ring.unlink_name(ring_name)
    assert not [n for n in os.listdir("/dev/shm") if ring_name in n]


def _lane_writer(ring_name: str, me: int, count: int) -> None:
    with Ring.attach(ring_name, lanes=True) as ring:
        for i in range(count):
            priority = (0, 50, 100)[(i * 7 + me) % 3]
            ring.lane(priority).write(b"%d %d %d" % (me, priority, i), timeout=20)


def test_writers_on_every_lane_lose_nothing_and_keep_each_lanes_order(ring_name, children):
    count = 6000
    with Ring.create(ring_name, 1 << 12, lanes=3) as reader:  # small: it wraps and fills often
        reader.spin_ns = 0  # sleep on the doorbell whenever it is empty
        procs = [children.start(_lane_writer, ring_name, me, count) for me in (1, 2)]
        last: dict[tuple[int, int], int] = {}
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 2 * count:
            assert time.monotonic() < deadline, f"only {seen} of {2 * count} frames came"
            block = reader.read_many(64, timeout=1)
            lanes = {int(f.split()[1]) for f in block}
            assert len(lanes) <= 1, "a block mixes lanes"
            for frame in block:
                me, priority, i = map(int, frame.split())
                assert last.get((me, priority), -1) < i, "a lane went out of order"
                last[me, priority] = i
            seen += len(block)
        for proc in procs:
            proc.join(20)
            assert proc.exitcode == 0
        assert reader.read_many(64, timeout=0) == []


# ---------------------------------------------------------------- the bus


def _sender(bus: str) -> None:
    """Sends every priority before its recipient reads anything, then leaves."""
    with shmbus.connect(bus=bus, name="sender") as agent:
        for i in range(30):
            agent.send("receiver", ("low", i))
            agent.publish("news.x", ("low", i))
            if i % 3 == 0:
                agent.send("receiver", ("high", i), priority=90)
                agent.publish("news.x", ("high", i), priority=90)
            if i % 2 == 0:
                agent.send("receiver", ("mid", i), priority=50)
                agent.publish("news.x", ("mid", i), priority=50)


def test_a_receiver_takes_higher_priorities_first_across_processes(bus, children):
    with (
        shmbus.connect(bus=bus, name="receiver") as receiver,
        shmbus.connect(bus=bus, name="listener") as listener,
    ):
        listener.subscribe("news.*")
        proc = children.start(_sender, bus)
        proc.join(30)
        assert proc.exitcode == 0
        direct = [receiver.recv(timeout=10) for _ in range(55)]
        published = [listener.recv(timeout=10) for _ in range(55)]
        for got in (direct, published):
            payloads = [tuple(m.payload) for m in got]
            assert payloads == (
                [("high", i) for i in range(0, 30, 3)]
                + [("mid", i) for i in range(0, 30, 2)]
                + [("low", i) for i in range(30)]
            )
            assert [m.priority for m in got[:10]] == [90] * 10
        with pytest.raises(shmbus.RecvTimeout):
            receiver.recv(timeout=0.1)


def test_a_full_lane_is_named_and_other_lanes_still_take_messages(bus):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="slow", inbox_capacity=1 << 12) as slow,
    ):
        with pytest.raises(shmbus.InboxFull, match="priority lane 2"):
            for _ in range(1000):
                driver.send("slow", b"x" * 200, priority=100, backpressure="error")
        driver.send("slow", "low", backpressure="error")  # lane 0 has room
        assert slow.recv(timeout=5).priority == 100


def _holder(bus: str) -> None:
    with shmbus.connect(bus=bus, name="holder") as agent:
        agent.send("driver", "ready")
        time.sleep(60)  # killed here, reading nothing


def test_a_dead_agents_lanes_all_go_to_the_dlq(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        proc = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        ids = [driver.send("holder", (p, i), priority=p) for i in range(5) for p in (0, 50, 99)]
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len([d for d in driver.dlq() if d.message.recipient == "holder"]) < len(ids):
            assert time.monotonic() < deadline, "the inbox was not drained in time"
            time.sleep(0.05)
        dead = [d for d in driver.dlq() if d.message.recipient == "holder"]
        assert sorted(d.message.id for d in dead) == sorted(ids)
        assert [d.message.priority for d in dead] == [99] * 5 + [50] * 5 + [0] * 5
        assert all(d.reason.startswith("recipient died") for d in dead)


def _dies_mid_record(bus: str, victim_inbox: str) -> None:
    """Reserves room on the victim's top lane and dies before writing it."""
    with shmbus.connect(bus=bus, name="writer") as agent:
        with Ring.attach(victim_inbox, lanes=True) as ring:
            ring.lanes[2]._test_reserve(200)
            agent.send("other", "reserved")
            time.sleep(60)  # killed here


def test_a_dead_writers_record_on_an_upper_lane_is_unblocked(bus, children):
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_dies_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        other.send("victim", "urgent", priority=100)  # behind the reservation
        other.send("victim", "low")
        assert victim.recv(timeout=5).payload == "low"  # lane 0 is not held up
        with pytest.raises(shmbus.RecvTimeout):
            victim.recv(timeout=0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert victim.recv(timeout=10).payload == "urgent"


def test_a_resend_goes_to_the_lane_of_its_priority(bus) -> None:
    """Found in review: a resend of an acked message keeps its priority lane."""
    with (
        shmbus.connect(bus=bus, name="a", ack_timeout=0.1, max_attempts=3) as a,
        shmbus.connect(bus=bus, name="b") as b,
    ):
        a.send("b", "urgent", priority=90, requires_ack=True)
        lanes = b.inbox.lanes
        first = lanes[2].used
        assert first > 0 and lanes[0].used == 0
        deadline = time.monotonic() + 20
        while a.stats().agents["a"].retried < 1:  # b reads nothing: no ACK, a resends
            assert time.monotonic() < deadline, "no resend"
            a.recv_many(16, timeout=0.05)
        assert lanes[0].used == 0, "the resend went to lane 0"
        assert lanes[2].used > first
