"""Counters in shared memory, the fast send path's slow branches, and `shmbus stats`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import shmbus
from shmbus import MessageType
from shmbus.core.ring import LANES


def _worker(bus: str, name: str, count: int) -> None:
    """Sends `count` messages to 'driver', publishes 3 on jobs.done, then leaves."""
    with shmbus.connect(bus=bus, name=name) as agent:
        agent.send("driver", "ready")
        assert agent.recv(timeout=20).payload == "go"
        for i in range(count):
            agent.send("driver", i)
        agent.publish_many("jobs.done", [b"a", b"b"])
        agent.publish("jobs.done", {"last": True})
        assert agent.recv(timeout=20).payload == "bye"


def _subscriber(bus: str, name: str) -> None:
    """Subscribes, says so, reads nothing until told to stop (so its inbox fills)."""
    with shmbus.connect(bus=bus, name=name, inbox_capacity=1 << 16) as agent:
        agent.subscribe("jobs.>")
        agent.send("driver", "ready")
        while True:
            msg = agent.recv(timeout=30)
            if msg.type == MessageType.DIRECT and msg.payload == "stop":
                return
            time.sleep(30)  # the test's "stop" arrives after it stops looking


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_counters_are_exact_across_processes_and_survive_departures(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_worker, bus, "w1", 500)
        assert driver.recv(timeout=20).payload == "ready"
        with shmbus.connect(bus=bus, name="listener") as listener:
            listener.subscribe("jobs.*")
            driver.send("w1", "go")
            got = [driver.recv(timeout=20).payload for _ in range(500)]
            assert got == list(range(500))
            assert [listener.recv(timeout=20).payload for _ in range(3)] == [
                b"a",
                b"b",
                {"last": True},
            ]

            s = driver.stats()
            assert isinstance(s, shmbus.BusStats) and s.bus == bus
            w1, d, li = s.agents["w1"], s.agents["driver"], s.agents["listener"]
            assert (w1.sent, w1.received) == (504, 1)  # 'ready', 500, 3 published
            assert (d.sent, d.received, d.pending) == (1, 501, 0)  # 'ready' + 500
            assert (li.received, li.delivered, li.pending) == (3, 3, 0)
            assert w1.pid != os.getpid() and d.pid == os.getpid()
            assert d.bytes_received > 500 * 64 and d.inbox_capacity == LANES << 22  # every lane
            topic = s.topics["jobs.done"]
            assert (topic.published, topic.delivered) == (3, 3)
            assert s.totals.sent == s.totals.received == 505
            driver.send("w1", "bye")
            children.join_all(20)
            # w1 left: its counts move to the departed totals, nothing is lost.
            wait_for(lambda: "w1" not in driver.stats().agents)
            s = driver.stats()
            assert s.departed.sent == 504 and s.totals.sent == s.totals.received == 506


def test_pending_and_inbox_fill_of_a_reader_that_does_not_read(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_subscriber, bus, "slow")
        assert driver.recv(timeout=20).payload == "ready"
        driver.send("slow", "first")  # it takes this one, then stops reading
        wait_for(lambda: driver.stats().agents["slow"].received >= 1)
        for i in range(40):
            driver.publish("jobs.x", i)
        s = driver.stats()
        slow = s.agents["slow"]
        assert slow.pending == 40 and slow.delivered == 41
        assert 0 < slow.inbox_used <= slow.inbox_capacity == LANES << 16


def test_a_full_subscriber_does_not_starve_the_others_and_nothing_vanishes(bus, children):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="small", inbox_capacity=1 << 14) as small,
        shmbus.connect(bus=bus, name="big") as big,
    ):
        small.subscribe("t.*")
        big.subscribe("t.*")
        payload = b"x" * 1500
        for i in range(20):  # about 10 fit in 16 KiB
            driver.publish("t.a", payload + bytes([i]), timeout=0.01)
        driver.publish_many("t.a", [payload + bytes([i]) for i in range(20, 30)], timeout=0.01)
        assert [m.payload[-1] for m in big.recv_many(100, timeout=5)] == list(range(30))
        kept = [m.payload[-1] for m in small.recv_many(100, timeout=5)]
        assert 0 < len(kept) < 20 and kept == list(range(len(kept)))
        dead = [e for e in driver.dlq() if e.message.topic == "t.a"]
        assert len(dead) == 30 - len(kept)
        assert all("inbox full" in e.reason and "'small'" in e.reason for e in dead)
        assert all(e.message.recipient == "small" for e in dead)  # a replay goes to it alone
        assert len({e.id for e in dead}) == len(dead) and min(e.id for e in dead) > 0
        assert [e.message.payload[-1] for e in dead] == list(range(len(kept), 30))
        s = driver.stats()
        assert s.agents["driver"].failed == 30 - len(kept) and s.dlq >= len(dead)


def test_a_full_inbox_raises_ring_full_and_counts_a_failure(bus):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="tiny", inbox_capacity=1 << 14),
    ):
        with pytest.raises(shmbus.RingFull, match="inbox of 'tiny'"):
            for _ in range(100):
                driver.send("tiny", b"y" * 1500, timeout=0.01)
        with pytest.raises(shmbus.RingFull, match="of 20 messages were sent"):
            driver.send_many("tiny", [b"z" * 1500] * 20, timeout=0.01)
        with pytest.raises(shmbus.MessageTooLarge):
            driver.send("tiny", b"w" * 3000)
        assert driver.stats().agents["driver"].failed == 1 + 20 + 1


def test_routes_follow_an_agent_that_leaves_and_comes_back(bus):
    with shmbus.connect(bus=bus, name="driver") as driver:
        first = shmbus.connect(bus=bus, name="peer")
        driver.send("peer", 1)  # the route to the first inbox is cached now
        assert first.recv(timeout=5).payload == 1
        first.close()
        with pytest.raises(shmbus.UnknownRecipient):
            driver.send("peer", 2)
        with shmbus.connect(bus=bus, name="peer") as second:
            driver.send("peer", 3)
            assert second.recv(timeout=5).payload == 3


@pytest.mark.parametrize(
    "kwargs",
    [{"priority": 101}, {"priority": -1}, {"priority": 2.5}, {"ttl": -1.0}, {"ttl": 1e9}],
)
def test_bad_fields_are_refused_on_the_fast_path_too(bus, kwargs):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="peer") as peer,
    ):
        driver.send("peer", 0)  # warm: the route is cached, so the fast path runs
        driver.publish("x.y", 0)
        with pytest.raises(shmbus.InvalidArgument):
            driver.send("peer", 1, **kwargs)
        with pytest.raises(shmbus.InvalidArgument):
            driver.publish("x.y", 1, **kwargs)
        with pytest.raises(shmbus.InvalidArgument):
            driver.send_many("peer", [1, 2], **kwargs)
        assert peer.recv(timeout=5).payload == 0
        with pytest.raises(shmbus.RecvTimeout):
            peer.recv(timeout=0.1)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_shmbus_stats_text_json_and_watch(bus):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="peer") as peer,
    ):
        peer.subscribe("a.b")
        for i in range(7):
            driver.send("peer", i)
        driver.publish("a.b", "hello")
        text = _cli("stats", "--bus", bus)
        assert text.returncode == 0, text.stderr
        assert f"bus {bus}: sent 8" in text.stdout and "peer" in text.stdout
        assert "a.b" in text.stdout
        data = json.loads(_cli("stats", "--bus", bus, "--json").stdout)
        assert data["agents"]["peer"]["pending"] == 8 and data["topics"]["a.b"]["published"] == 1
        # --watch prints until interrupted: take two snapshots, then stop it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmbus", "stats", "--bus", bus, "--json", "--watch", "0.05"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            lines = [proc.stdout.readline() for _ in range(2)]  # type: ignore[union-attr]
            assert all(json.loads(line)["bus"] == bus for line in lines)
        finally:
            proc.kill()
            proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]
    missing = _cli("stats", "--bus", bus + "-none")
    assert missing.returncode == 1 and "no stats" in missing.stderr


def test_peers_lists_the_agents_on_the_bus(bus):
    with shmbus.connect(bus=bus, name="driver") as driver:
        assert driver.peers() == ["driver"]
        with shmbus.connect(bus=bus, name="other"):
            assert driver.peers() == ["driver", "other"]
        assert driver.peers() == ["driver"]


def _late_reader(bus: str) -> None:
    """A small inbox that is left alone for a moment, then read to the end."""
    with shmbus.connect(bus=bus, name="slow", inbox_capacity=1 << 14) as agent:
        agent.send("driver", "ready")
        time.sleep(0.3)
        got = [agent.recv(timeout=20).payload for _ in range(30)]
        agent.send("driver", [g[0] for g in got])


def test_backpressure_policies_block_error_and_drop(bus, children):
    with shmbus.connect(bus=bus, name="driver", send_timeout=0.05) as driver:
        assert driver.backpressure == "block" and driver.send_timeout == 0.05
        with shmbus.connect(bus=bus, name="tiny", inbox_capacity=1 << 14):
            blob = b"x" * 1500
            sent = 0
            with pytest.raises(shmbus.BackpressureTimeout, match=r"'tiny'.*stayed full.*% ?\)"):
                while True:  # block (default): waits send_timeout, then says how full
                    driver.send("tiny", blob)
                    sent += 1
            assert 5 < sent < 12
            with pytest.raises(shmbus.InboxFull, match="'error' does not wait") as err:
                driver.send("tiny", blob, backpressure="error")
            assert not isinstance(err.value, TimeoutError)
            dropped_id = driver.send("tiny", blob + b"!", backpressure="drop")
            ids = driver.send_many("tiny", [b"a" * 1500] * 3, backpressure="drop")
            assert len(ids) == 3 and dropped_id < ids[0]
            dead = [d for d in driver.dlq() if d.message.recipient == "tiny"]
            assert [d.message.id for d in dead] == [dropped_id, *ids]
            assert all("inbox full" in d.reason and "'drop'" in d.reason for d in dead)
            assert dead[0].message.payload == blob + b"!"
            mine = driver.stats().agents["driver"]
            assert mine.dropped == 4 and mine.failed == 2  # the timeout and the error
        with pytest.raises(shmbus.InvalidArgument):
            driver.send("driver", 1, backpressure="wait")
        with pytest.raises(ValueError):
            shmbus.connect(bus=bus, name="x", backpressure="never")


def test_a_blocked_send_goes_through_once_the_reader_drains(bus, children):
    with shmbus.connect(bus=bus, name="driver", send_timeout=None) as driver:
        children.start(_late_reader, bus)
        assert driver.recv(timeout=20).payload == "ready"
        for i in range(30):  # about 10 fit: the rest wait for room, forever if need be
            driver.send("slow", bytes([i]) * 1500)
        assert driver.recv(timeout=20).payload == list(range(30))
        assert driver.stats().agents["driver"].failed == 0


def test_a_publish_to_one_full_subscriber_is_dead_lettered_not_lost(bus):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="only", inbox_capacity=1 << 14) as only,
    ):
        only.subscribe("one.*")
        ids = [driver.publish("one.x", bytes([i]) * 1500, timeout=0) for i in range(12)]
        too_big = driver.publish("one.x", b"z" * 5000)
        assert len(set(ids)) == 12 and too_big not in ids
        kept = [m.id for m in only.recv_many(100, timeout=5)]
        dead = {d.message.id: d.reason for d in driver.dlq()}
        assert sorted(kept + list(dead)) == sorted([*ids, too_big])
        assert dead[too_big].startswith("too large for the inbox: subscriber 'only'")
        assert all(dead[i].startswith("inbox full") for i in ids if i in dead)


@pytest.mark.parametrize("priority", [np.int64(50), True, 7])
def test_int_like_priorities_are_taken_alike_on_both_paths(bus, priority):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="peer") as peer,
    ):
        driver.send("peer", 0, priority=priority)  # the first send builds the route
        driver.send("peer", 1, priority=priority)  # the fast path
        assert [m.priority for m in peer.recv_many(2, timeout=5)] == [int(priority)] * 2


def test_threads_sharing_an_agent_do_not_corrupt_what_it_sends(bus):
    import threading

    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="s1") as s1,
        shmbus.connect(bus=bus, name="s2") as s2,
    ):
        s1.subscribe("th.*")
        s2.subscribe("th.*")
        driver.publish("th.x", b"warm")  # one route, shared by the threads below

        def publisher(tag: int) -> None:
            for i in range(300):  # growing sizes: the route's scratch is reallocated
                driver.publish_many("th.x", [bytes([tag]) * (i * 7 + 1)] * 2)

        threads = [threading.Thread(target=publisher, args=(t,)) for t in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for sub in (s1, s2):
            got = []
            while len(got) < 1 + 1200:
                got.extend(m.payload for m in sub.recv_many(1000, timeout=10))
            body = got[1:]
            assert all(len(set(p)) == 1 and p[0] in (1, 2) for p in body)  # never mixed
            assert sorted(len(p) for p in body if p[0] == 1) == sorted(
                i * 7 + 1 for i in range(300) for _ in range(2)
            )
