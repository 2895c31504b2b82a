"""Direct links between uds agents (shmbus/transport/peer.py): what goes over
them arrives whole and in order, in step with what goes through the bridge,
and nothing is lost when either end goes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmbus
from shmbus.core.control import send_msg
from shmbus.transport import peer

UDS = {"transport": "uds"}


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@contextlib.contextmanager
def pair(bus: str) -> Iterator[tuple[shmbus.Agent, shmbus.Agent]]:
    """Two uds agents, "a" and "b", in this process."""
    with shmbus.connect(bus=bus, name="a", **UDS) as a:
        with shmbus.connect(bus=bus, name="b", **UDS) as b:
            yield a, b


def link_of(agent: shmbus.Agent, name: str) -> peer.Link | None:
    """The link ``agent`` sends to ``name`` on (None: the bridge)."""
    out = agent._link.out
    return out._paths.get(out.agents[name][0])


def _echo(bus: str) -> None:
    with shmbus.connect(bus=bus, name="echo", transport="uds") as agent:
        for msg in agent:
            if msg.payload == "stop":
                return
            agent.reply(msg, msg.payload)


def test_two_uds_agents_talk_over_a_direct_link_both_ways(bus, children):
    with shmbus.connect(bus=bus, name="a", **UDS) as a:
        children.start(_echo, bus)
        wait_for(lambda: "echo" in a.peers())
        for i in range(500):
            assert a.request("echo", i, timeout=10).payload == i
        link = link_of(a, "echo")
        assert isinstance(link, peer.Link) and link.broken is None
        # The bridge saw none of it; the counts come from the two ends.
        stats = a.stats()  # ours are told before it asks
        assert stats.agents["a"].sent == 500 and stats.agents["echo"].delivered == 500
        wait_for(lambda: a.stats().agents["a"].received == 500)
        wait_for(lambda: a.stats().agents["echo"].received == 500)
        a.send("echo", "stop")


def test_many_messages_arrive_in_order_and_recv_many_takes_what_waits(bus):
    with pair(bus) as (a, b):
        for i in range(2000):
            a.send("b", i)
        a.send_many("b", list(range(2000, 2500)))
        assert isinstance(link_of(a, "b"), peer.Link)
        first = b.recv_many(100, timeout=10)
        assert len(first) == 100  # as from an shm inbox: not one record's worth
        got = [m.payload for m in first]
        while len(got) < 2500:
            got += [m.payload for m in b.recv_many(1000, timeout=10)]
        assert got == list(range(2500))


def test_publishes_and_direct_sends_reach_a_subscriber_in_the_order_sent(bus):
    """The publish goes through the bridge, the send on the link: a fence
    keeps the link's next message behind the publish."""
    with pair(bus) as (a, b):
        b.subscribe("news.>")
        wait_for(lambda: (a._link.out.refresh(), a._link.out.subs)[1])
        sent = []
        for i in range(200):
            a.send("b", ("direct", i))
            a.publish("news.x", ("publish", i))
            sent += [["direct", i], ["publish", i]]
        got = []
        while len(got) < len(sent):
            got += [m.payload for m in b.recv_many(100, timeout=10)]
        assert got == sent


def test_a_fence_whose_publish_never_comes_holds_the_link_only_a_moment(bus):
    with pair(bus) as (a, b):
        a.send("b", "hello")
        assert b.recv(timeout=10).payload == "hello"
        out = a._link.out
        out.subs = {"news.x": ["b"]}  # a stale copy: b is not subscribed
        out._refreshed = time.monotonic()
        a.publish("news.x", "nobody gets this")
        a.send("b", "after")
        start = time.monotonic()
        assert b.recv(timeout=10).payload == "after"
        assert time.monotonic() - start < peer.FENCE_WAIT + 5


def _count_then_die(bus: str, n: int) -> None:
    agent = shmbus.connect(bus=bus, name="counter", transport="uds")
    agent.send("driver", "ready")
    for i in range(n):
        agent.send("driver", i)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_sender_killed_right_after_its_sends_loses_none_of_them(bus, children):
    with shmbus.connect(bus=bus, name="driver", **UDS) as driver:
        proc = children.start(_count_then_die, bus, 3000)
        proc.join(20)
        assert proc.exitcode == -signal.SIGKILL
        got = []
        while True:
            more = driver.recv_many(1000, timeout=1)
            if not more:
                break
            got += [m.payload for m in more]
        assert got == ["ready", *range(3000)]


def _take_some_then_wait(bus: str, n: int) -> None:
    with shmbus.connect(bus=bus, name="holder", transport="uds") as agent:
        agent.send("driver", "ready")
        for _ in range(n):
            agent.recv_many(1, timeout=20)  # one at a time: no read-ahead it would take
        agent.send("driver", "took them")
        time.sleep(60)  # killed here


@pytest.mark.parametrize("how", ["killed", "closed"])
def test_what_a_linked_reader_never_took_goes_to_the_dlq_once(bus, children, how):
    with shmbus.connect(bus=bus, name="driver", **UDS) as driver:
        died: list[str] = []
        driver.on_peer_death(died.append)
        if how == "killed":
            holder = children.start(_take_some_then_wait, bus, 10)
            assert driver.recv(timeout=20).payload == "ready"
            ids = [driver.send("holder", i) for i in range(100)]
            assert isinstance(link_of(driver, "holder"), peer.Link)
            assert driver.recv(timeout=20).payload == "took them"
            os.kill(holder.pid, signal.SIGKILL)
            reason = "recipient died: 'holder'"
        else:
            holder = shmbus.connect(bus=bus, name="holder", **UDS)
            ids = [driver.send("holder", i) for i in range(100)]
            # It reads ahead (as from shm): what it took and did not read, it
            # dead-letters; what it never took, the driver does, seeing it go.
            assert [holder.recv(timeout=10).payload for _ in range(10)] == list(range(10))
            holder.close()
            reason = ""
        wait_for(lambda: "holder" not in driver.peers())
        lost = ids[10:]

        def dead() -> list:
            return [d for d in driver.dlq() if d.message.recipient == "holder"]

        wait_for(lambda: len(dead()) >= len(lost))
        time.sleep(0.6)  # a heartbeat more: nothing else comes
        entries = dead()
        assert [d.message.id for d in entries] == lost  # each once, in order
        assert all(d.reason.startswith(reason) for d in entries)
        assert not driver.recv_many(10, timeout=0.2) or how == "killed"


def test_capacity_and_policies_are_the_recipients_inbox_as_through_the_bridge(bus):
    with (
        shmbus.connect(bus=bus, name="tiny", inbox_capacity=1 << 14, **UDS) as tiny,
        shmbus.connect(bus=bus, name="a", send_timeout=0.2, **UDS) as a,
    ):
        with pytest.raises(shmbus.MessageTooLarge):
            a.send("tiny", b"x" * (1 << 14))  # over its max_frame: nothing is sent
        with pytest.raises(shmbus.BackpressureTimeout, match="'tiny'"):
            for i in range(100):
                a.send("tiny", b"x" * 1000 + bytes([i]))
        fit = i
        assert 5 < fit < 40  # about its inbox's worth
        ids = [a.send("tiny", b"y" * 1000, backpressure="drop") for _ in range(3)]
        dropped = {d.message.id: d.reason for d in a.dlq()}
        assert all(dropped[i].startswith("inbox full") for i in ids)
        got = tiny.recv_many(100, timeout=5)
        assert [m.payload[-1] for m in got] == list(range(fit))  # in order, none lost
        a.send("tiny", b"room again", backpressure="error")
        assert tiny.recv(timeout=10).payload == b"room again"
        stats = a.stats().agents["a"]
        assert stats.failed == 2 and stats.dropped == 3  # too large, and the timeout


def test_a_peer_that_breaks_the_link_protocol_loses_the_link_and_not_the_bus(bus, caplog):
    with pair(bus) as (a, b):
        a.send("b", "first")
        assert b.recv(timeout=10).payload == "first"
        link = link_of(a, "b")
        link.stream.sock.send(struct.pack("<I", 0xFFFFFFF0))  # a record longer than any may be
        with pytest.raises(shmbus.RecvTimeout):
            b.recv(timeout=0.3)  # it drops the link...
        wait_for(lambda: link.broken is not None or link.ended is not None, 5)
        a.send("b", "second")  # ...and a goes through the bridge from now on
        assert b.recv(timeout=10).payload == "second"
        assert link_of(a, "b") is link and a._link.out._link("b", a._link.out.agents["b"]) is None


def _hello(path: Path, hello: object, raw: bytes = b"") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        if raw:
            s.sendall(raw)
        else:
            send_msg(s, hello)  # type: ignore[arg-type]
        try:
            return s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            return b""


def test_the_listener_refuses_strangers_and_goes_on(bus):
    with pair(bus) as (a, b):
        path = peer.peer_path(bus, b.id)
        inbox = {"capacity": 1 << 20, "max_frame": 1 << 17}
        for hello, raw in [
            (None, b"\xff\xff\xff\xffjunk"),  # an oversized control message
            (None, b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1"),  # not msgpack
            ([1, 2, 3], b""),  # not a dict
            ({"op": "link", "name": "nobody", "id": 99, "to": "b", **inbox}, b""),
            ({"op": "link", "name": "a", "id": a.id + 1, "to": "b", **inbox}, b""),  # wrong id
            ({"op": "link", "name": "a", "id": a.id, "to": "c", **inbox}, b""),  # not b
            ({"op": "link", "name": "a", "id": a.id, "to": "b"}, b""),  # no inbox
        ]:
            answer = _hello(path, hello, raw)
            assert b'"ok": true' not in answer and b"\xa2ok\xc3" not in answer
        assert b._link.listener.is_alive() and not b._link.mux.links()
        a.send("b", "still here")
        assert b.recv(timeout=10).payload == "still here"
        assert isinstance(link_of(a, "b"), peer.Link)


def test_without_direct_links_uds_agents_use_the_bridge(bus, monkeypatch):
    monkeypatch.setenv(peer.ENV, "0")
    with pair(bus) as (a, b):
        assert b._link.listener is None and not peer.peer_path(bus, b.id).exists()
        a.send("b", "through the bridge")
        assert b.recv(timeout=10).payload == "through the bridge"
        assert not a._link.out._paths


def _linked_then_wait(bus: str) -> None:
    with shmbus.connect(bus=bus, name="victim", transport="uds") as agent:
        agent.send("driver", "ready")
        time.sleep(60)


def test_listener_sockets_go_when_their_agents_do(bus, children, runtime):
    with shmbus.connect(bus=bus, name="driver", **UDS) as driver:
        mine = peer.peer_path(bus, driver.id)
        assert mine.exists()
        proc = children.start(_linked_then_wait, bus)
        assert driver.recv(timeout=20).payload == "ready"
        theirs = peer.peer_path(bus, driver._link.out.agents["victim"][0])
        assert theirs.exists()
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not theirs.exists())  # the coordinator removes what the dead left
    assert not mine.exists()
    assert not list(Path(runtime).rglob("*.peer"))


def _mixed(agent: shmbus.Agent, to: str, topic: str | None, n: int = 30) -> list[list]:
    """Sends (and publishes) of every lane, interleaved; what a reader that
    starts after them must get: the highest lane first, each lane in order."""
    lanes: dict[int, list[list]] = {90: [], 50: [], 0: []}
    for i in range(n):
        for priority, name, every in ((0, "low", 1), (90, "high", 3), (50, "mid", 2)):
            if i % every:
                continue
            agent.send(to, ["direct", name, i], priority=priority)
            lanes[priority].append(["direct", name, i])
            if topic is not None:
                agent.publish(topic, ["publish", name, i], priority=priority)
                lanes[priority].append(["publish", name, i])
    return lanes[90] + lanes[50] + lanes[0]


@pytest.mark.parametrize("publish", [False, True], ids=["direct", "with-publishes"])
def test_a_linked_reader_takes_the_highest_lane_first_and_each_lane_in_order(bus, publish):
    """As from an shm inbox: what waits on the link is handed over by lane,
    and publishes (through the bridge) keep their place in their lane."""
    with pair(bus) as (a, b):
        if publish:
            b.subscribe("news.>")
            wait_for(lambda: (a._link.out.refresh(), a._link.out.subs)[1])
        expected = _mixed(a, "b", "news.x" if publish else None)
        assert isinstance(link_of(a, "b"), peer.Link)
        got = [b.recv(timeout=10).payload for _ in expected]
        assert got == expected
        with pytest.raises(shmbus.RecvTimeout):
            b.recv(timeout=0.1)
        # What b took out of order is b's: a holds nothing of it once told.
        link = link_of(a, "b")
        wait_for(
            lambda: (link.poll_counts(), [link.stream.held(k) for k in range(3)])[1] == [0, 0, 0]
        )


def _take_highs_then_wait(bus: str, go: Any, n: int) -> None:
    with shmbus.connect(bus=bus, name="holder", transport="uds") as agent:
        agent.send("driver", "ready")
        assert go.wait(20)
        # One at a time (no read-ahead it would take), the highest lane first.
        took = [agent.recv_many(1, timeout=20)[0].payload for _ in range(n)]
        agent.send("driver", ["took", took])
        time.sleep(60)  # killed here


def test_what_a_reader_took_out_of_order_is_not_dead_lettered(bus, children):
    """The holder takes the high ones first, past lows it never takes, then
    is killed: its sender dead-letters exactly the lows."""
    with shmbus.connect(bus=bus, name="driver", **UDS) as driver:
        go = children.ctx.Event()
        holder = children.start(_take_highs_then_wait, bus, go, 10)
        assert driver.recv(timeout=20).payload == "ready"
        ids = [driver.send("holder", i, priority=90 if i % 10 == 5 else 0) for i in range(100)]
        assert isinstance(link_of(driver, "holder"), peer.Link)
        go.set()
        assert driver.recv(timeout=20).payload == ["took", list(range(5, 100, 10))]
        os.kill(holder.pid, signal.SIGKILL)
        wait_for(lambda: "holder" not in driver.peers())
        lost = [m for i, m in enumerate(ids) if i % 10 != 5]

        def dead() -> list:
            return [d for d in driver.dlq() if d.message.recipient == "holder"]

        wait_for(lambda: len(dead()) >= len(lost))
        time.sleep(0.6)  # a heartbeat more: nothing else comes
        assert [d.message.id for d in dead()] == lost


def test_a_reader_that_takes_a_backlog_at_once_and_goes_quiet_frees_its_senders_room(bus):
    """Its counts reach the sender without the reader waiting (a link's
    sender does not wait for grants, so the reader tells what it took)."""
    with (
        shmbus.connect(bus=bus, name="small", inbox_capacity=1 << 16, **UDS) as small,
        shmbus.connect(bus=bus, name="a", **UDS) as a,
    ):
        sent = 0
        with pytest.raises(shmbus.InboxFull, match="direct link"):
            while True:
                a.send("small", b"x" * 1000, backpressure="error")
                sent += 1
        assert len(small.recv_many(1000, timeout=0)) == sent  # all at once, then quiet
        for _ in range(sent):  # room for as much again, told without small reading
            a.send("small", b"y" * 1000, timeout=10)
        got = 0
        while got < sent:
            more = small.recv_many(1000, timeout=5)
            assert more, "messages missing"
            got += len(more)
        assert got == sent


def test_a_reader_that_leaves_after_taking_out_of_order_is_not_dead_lettered_for_it(bus):
    """It tells what it took out of order before it says it leaves: its
    sender dead-letters exactly what it never took."""
    with shmbus.connect(bus=bus, name="a", **UDS) as a:
        b = shmbus.connect(bus=bus, name="b", **UDS)
        lows = [a.send("b", ["low", i]) for i in range(10)]
        highs = [a.send("b", ["high", i], priority=90) for i in range(5)]
        took = [b.recv_many(1, timeout=10)[0] for _ in range(5)]  # one at a time
        assert [m.id for m in took] == highs
        b.close()
        dead = [d for d in a.dlq() if d.message.recipient == "b"]
        assert [d.message.id for d in dead] == lows
        assert all(d.reason.startswith("recipient left: 'b'") for d in dead)


def test_a_send_to_a_linked_recipient_that_left_raises_as_for_shm(bus):
    with shmbus.connect(bus=bus, name="a", **UDS) as a:
        b = shmbus.connect(bus=bus, name="b", **UDS)
        a.send("b", 1)
        assert isinstance(link_of(a, "b"), peer.Link)
        assert b.recv(timeout=10).payload == 1
        b.close()
        with pytest.raises(shmbus.UnknownRecipient):
            a.send("b", 2)
        dead = [d for d in a.dlq() if d.message.recipient == "b"]
        assert [d.message.payload for d in dead] == [2]  # 1 was taken: b told so as it left
        assert dead[0].reason.startswith("no recipient")


def test_a_peer_that_ignores_the_room_is_read_only_so_far_ahead(bus, monkeypatch, caplog):
    """Its records wait in the socket (its sends block) rather than in our
    memory; all of them still come, in order."""
    with (
        shmbus.connect(bus=bus, name="b", inbox_capacity=1 << 14, **UDS) as b,
        shmbus.connect(bus=bus, name="a", **UDS) as a,
    ):
        a.send("b", 0)
        assert b.recv(timeout=10).payload == 0
        sending = link_of(a, "b")
        monkeypatch.setattr(sending, "room", lambda size, wait, lane: True)  # it ignores it
        n = 300  # 300 KB: over twice the three lanes' 16 KiB, within the socket's buffers
        for i in range(1, n + 1):
            a.send("b", i.to_bytes(2, "little") + b"x" * 1000)
        reading = b._link.out.mux.links()[0]
        got = [int.from_bytes(m.payload[:2], "little") for m in b.recv_many(1, timeout=10)]
        assert reading.queued_bytes < reading.limit + 2048  # no further than the limit
        assert reading.limit == 2 * 3 * (1 << 14)
        while len(got) < n:
            more = b.recv_many(100, timeout=10)
            assert more, "messages missing"
            got += [int.from_bytes(m.payload[:2], "little") for m in more]
        assert got == list(range(1, n + 1))
        assert "sends past the room of our inbox" in caplog.text
