"""The uds transport's own cases: fallback, hostile peers, deaths, backpressure.

(Every test of tests/agent/test_bus.py also runs on uds and mixed with shm.)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import pytest

import shmbus
from shmbus.core.control import Client, Reader, recv_msg, send_msg
from shmbus.core.message import MessageType, decode_frame, encode_frame
from shmbus.core.paths import socket_path
from shmbus.transport import ShmUnavailable, wire
from shmbus.transport import shm as shm_transport


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ------------------------------------------------------------ fallback


def test_auto_falls_back_to_uds_when_shared_memory_cannot_be_made(bus, monkeypatch, caplog):
    with shmbus.connect(bus=bus, name="peer", transport="shm") as peer:

        def no_shm(*args, **kw):
            raise PermissionError(13, "Permission denied", "/dev/shm")

        monkeypatch.setattr(shm_transport.Ring, "create", no_shm)
        with pytest.raises(ShmUnavailable, match="Permission denied"):
            shmbus.connect(bus=bus, name="forced", transport="shm")
        with caplog.at_level(logging.WARNING, logger="shmbus.transport"):
            agent = shmbus.connect(bus=bus, name="forced")  # "auto"; the name is free again
        with agent:
            assert agent._link.kind == "uds"
            assert "shared memory unavailable" in caplog.text and "uds" in caplog.text
            agent.send("peer", "over the socket")
            assert peer.recv(timeout=10).payload == "over the socket"
            peer.send("forced", "and back")
            assert agent.recv(timeout=10).payload == "and back"
            assert agent.peers() == ["forced", "peer"]


def test_the_environment_forces_a_transport(bus, monkeypatch):
    monkeypatch.setenv("SHMBUS_TRANSPORT", "uds")
    with shmbus.connect(bus=bus, name="a") as a:
        assert a._link.kind == "uds"
    with shmbus.connect(bus=bus, name="b", transport="shm") as b:  # an explicit choice wins
        assert b._link.kind == "shm"
    monkeypatch.setenv("SHMBUS_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ValueError, match="SHMBUS_TRANSPORT"):
        shmbus.connect(bus=bus, name="c")


# ------------------------------------------------------- hostile peers


@pytest.fixture
def logged_bus(names, children, runtime, tmp_path):
    """A coordinator whose log (warnings) goes to a file: (bus, path of the log)."""
    bus = names("bus")
    log = tmp_path / "coordinator.log"
    with open(log, "wb") as f:
        proc = children.popen(
            [sys.executable, "-m", "shmbus", "coordinator", "--bus", bus], stderr=f
        )
    deadline = time.monotonic() + 20
    while not socket_path(bus).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no coordinator"
        time.sleep(0.02)
    yield bus, log
    proc.terminate()
    proc.wait(10)


def raw_uds_agent(bus: str, name: str) -> tuple[socket.socket, socket.socket, int]:
    """An agent on the uds transport by hand: (control socket, data socket, id)."""
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.settimeout(10)
    ctl.connect(str(socket_path(bus)))
    send_msg(ctl, {"op": "register", "name": name, "pid": os.getpid(), "transport": "uds"})
    reply = recv_msg(ctl, Reader(), [])
    assert reply["ok"], reply
    data = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    data.settimeout(10)
    data.connect(reply["data"])
    send_msg(data, {"op": "hello", "name": name, "token": reply["token"]})
    assert recv_msg(data, Reader(), [])["ok"]
    send_msg(ctl, {"op": "activate"})
    assert recv_msg(ctl, Reader(), [])["ok"]
    return ctl, data, reply["id"]


def _frame(sender: str, sender_id: int, **kw) -> bytes:
    return encode_frame(
        int(MessageType.DIRECT),
        sender=sender.encode(),
        sender_id=sender_id,
        recipient=b"good",
        payload=b"\xa2hi",
        **kw,
    )


def _bad_records(name: str, my_id: int) -> dict[str, bytes]:
    good = _frame(name, my_id)
    bad_magic = b"XX" + good[2:]
    short = wire.record([good])
    short[20:24] = (30).to_bytes(4, "little")  # a frame length that leaves bytes over
    return {
        "not a frame": bytes(wire.record([bad_magic])),
        "limit": wire.RECORD.pack(wire.MAX_RECORD + 1, 1, 0, 0, 0),
        "names another sender": bytes(wire.record([_frame("good", my_id)])),
        "do not add up": bytes(short),
        "frames (limit": wire.RECORD.pack(16, wire.MAX_COUNT + 1, 0, 0, 0),
    }


def test_malformed_and_oversized_records_disconnect_the_peer_and_nobody_else(logged_bus):
    bus, log = logged_bus
    with (
        shmbus.connect(bus=bus, name="good", transport="shm") as good,
        shmbus.connect(bus=bus, name="fine", transport="uds") as fine,
    ):
        for i, (why, record) in enumerate(_bad_records("evil0", 0).items()):
            name = f"evil{i}"
            ctl, data, my_id = raw_uds_agent(bus, name)
            record = _bad_records(name, my_id)[why]
            with ctl, data:
                data.sendall(record)
                assert data.recv(1 << 16) == b""  # the bridge hung up
                assert ctl.recv(1 << 16) == b""  # and the coordinator dropped the agent
            wait_for(lambda name=name: name not in good.peers())
            wait_for(lambda why=why: why in log.read_text())
            fine.send("good", i)  # the bus and the other agents are unaffected
            assert good.recv(timeout=10).payload == i
            good.send("fine", i)
            assert fine.recv(timeout=10).payload == i
        assert good.recv_many(10, timeout=0.1) == []  # nothing of theirs was delivered
        text = log.read_text()
        assert text.count("disconnected") >= 5


def test_a_record_to_more_destinations_than_the_route_cache_holds_disconnects_the_peer(bus):
    """Its routes would evict each other for ever: the up thread spun, and
    nothing the peer sent after it was read. A client sends one destination
    per record."""
    with shmbus.connect(bus=bus, name="good", transport="shm") as good:
        ctl, data, my_id = raw_uds_agent(bus, "evil")
        with ctl, data:
            frames = [
                encode_frame(
                    int(MessageType.PUBLISH),
                    sender=b"evil",
                    sender_id=my_id,
                    topic=b"t%d" % i,
                    payload=b"\xa0",
                )
                for i in range(4200)
            ]
            data.sendall(bytes(wire.record(frames)))
            data.settimeout(30)
            assert data.recv(1 << 16) == b""  # the bridge hung up
        wait_for(lambda: "evil" not in good.peers())


def test_a_hello_with_a_wrong_token_is_refused(bus):
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.settimeout(10)
    ctl.connect(str(socket_path(bus)))
    send_msg(ctl, {"op": "register", "name": "x", "pid": os.getpid(), "transport": "uds"})
    reply = recv_msg(ctl, Reader(), [])
    with ctl, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as data:
        data.settimeout(10)
        data.connect(reply["data"])
        send_msg(data, {"op": "hello", "name": "x", "token": "0" * 32})
        assert recv_msg(data, Reader(), [])["ok"] is False


# -------------------------------------------------------------- deaths


def _counter(bus: str) -> None:
    """Sends 0, 1, 2, ... to 'driver' until it is killed."""
    with shmbus.connect(bus=bus, name="counter", transport="uds") as agent:
        i = 0
        while True:
            agent.send_many("driver", list(range(i, i + 100)))
            i += 100


def _holder(bus: str) -> None:
    with shmbus.connect(bus=bus, name="holder", transport="uds") as agent:
        agent.send("driver", "ready")
        assert agent.recv(timeout=60).payload == "first"  # and asks the bridge for more
        agent.send("driver", "took it")
        time.sleep(60)  # killed here, with what the bridge sent it in its socket


@pytest.mark.parametrize("driver_transport", ["shm", "uds"])
def test_a_uds_agent_killed_mid_stream(bus, children, driver_transport):
    with shmbus.connect(bus=bus, name="driver", transport=driver_transport) as driver:
        died = []
        driver.on_peer_death(died.append)
        sender = children.start(_counter, bus)
        got = [driver.recv(timeout=20).payload for _ in range(1000)]
        os.kill(sender.pid, signal.SIGKILL)
        sender.join(10)
        while True:  # what it wrote before it died arrives whole and in order
            more = driver.recv_many(1000, timeout=1)
            got += [m.payload for m in more]
            if not more and died:
                break
        assert got == list(range(len(got)))
        assert died == ["counter"]

        holder = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        driver.send("holder", "first")
        assert driver.recv(timeout=20).payload == "took it"
        ids = driver.send_many("holder", list(range(50)))

        def in_its_socket() -> bool:  # delivered, and out of its inbox: the bridge sent them
            holder = driver.stats().agents["holder"]
            return holder.delivered >= 51 and holder.inbox_used == 0

        wait_for(in_its_socket)
        os.kill(holder.pid, signal.SIGKILL)
        wait_for(lambda: "holder" not in driver.peers())
        wait_for(lambda: not driver.recv_many(10, timeout=0.05) and "holder" in died)
        dead = [d for d in driver.dlq() if d.message.recipient == "holder"]
        assert [d.message.id for d in dead] == ids  # none lost, in order
        assert all(d.reason.startswith("recipient died: 'holder'") for d in dead)
        with shmbus.connect(bus=bus, name="holder", transport="uds") as again:  # name freed
            driver.send("holder", "welcome back")
            assert again.recv(timeout=10).payload == "welcome back"


def _burst_then_die(bus: str, n: int) -> None:
    """Sends ``n`` messages one at a time, as fast as it can, then dies at once."""
    agent = shmbus.connect(bus=bus, name="burst", transport="uds")
    for i in range(n):
        agent.send("driver", i)
        agent.publish("burst.n", i)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: whatever send returned is out


@pytest.mark.parametrize("n", [1, 2, 50])
def test_a_uds_sender_killed_right_after_its_sends_returned_loses_none_of_them(bus, children, n):
    with shmbus.connect(bus=bus, name="driver") as driver:
        driver.subscribe("burst.>")
        proc = children.start(_burst_then_die, bus, n)
        proc.join(20)
        assert proc.exitcode == -signal.SIGKILL
        got: list[tuple[str, int]] = []
        deadline = time.monotonic() + 20
        while len(got) < 2 * n and time.monotonic() < deadline:
            got += [(m.type.name, m.payload) for m in driver.recv_many(100, timeout=0.5)]
        directs = [p for t, p in got if t == "DIRECT"]
        publishes = [p for t, p in got if t == "PUBLISH"]
        assert directs == list(range(n))
        assert publishes == list(range(n))


# -------------------------------------------------------- backpressure


def test_a_uds_reader_that_does_not_read_holds_back_an_shm_sender(bus):
    with (
        shmbus.connect(bus=bus, name="slow", transport="uds", inbox_capacity=1 << 14) as slow,
        shmbus.connect(bus=bus, name="fast", transport="shm", send_timeout=0.3) as fast,
    ):
        with pytest.raises(shmbus.BackpressureTimeout, match="slow"):
            for i in range(10_000):
                fast.send("slow", i)
        assert [m.payload for m in slow.recv_many(10_000, timeout=5)][:3] == [0, 1, 2]


def _all_dead_letters(bus: str) -> list[tuple[int, str]]:
    """(message id, reason) of every DLQ entry, page by page (a reply is size-limited)."""
    out: list[tuple[int, str]] = []
    with Client(bus) as ctl:
        after = 0
        while True:
            reply = ctl.call("dlq_list", limit=10_000, after=after)
            out += [(decode_frame(e["frame"]).id, e["reason"]) for e in reply["entries"]]
            if not reply["more"] or not reply["entries"]:
                return out
            after = reply["entries"][-1]["id"]


def test_a_uds_sender_to_a_full_inbox_times_out_and_loses_nothing(bus):
    with (
        shmbus.connect(bus=bus, name="full", transport="shm", inbox_capacity=1 << 16) as full,
        shmbus.connect(bus=bus, name="writer", transport="uds", send_timeout=0.2) as writer,
    ):
        sent = []  # large messages: what the sockets hold stays well inside the DLQ's size
        with pytest.raises(shmbus.BackpressureTimeout, match="'full'"):
            for _ in range(100_000):
                sent.append(writer.send("full", b"x" * 8000))
        # What the bridge still holds waits out its 0.2 s, to the DLQ, or goes in as
        # the reader makes room: each message ends up in one place or the other.
        got: list[int] = []
        deadline = time.monotonic() + 60
        while True:
            got += [m.id for m in full.recv_many(1000, timeout=0.2)]
            dead = _all_dead_letters(bus)
            if len(got) + len(dead) >= len(sent) or time.monotonic() > deadline:
                break
        assert all(reason.startswith("inbox full for 0.2s") for _, reason in dead), dead[:1]
        assert sorted(got + [i for i, _ in dead]) == sent  # each once, none lost
        assert got == sorted(got)  # in order


def _block_then_die(bus: str, n: int) -> None:
    """Sends ``n`` large messages to a full inbox, willing to wait 60 s for room, then dies."""
    agent = shmbus.connect(bus=bus, name="blocked", transport="uds", send_timeout=60)
    ids = [agent.send("full", b"x" * 8000) for _ in range(n)]
    agent.send("driver", ids)  # to another inbox, with room: it goes behind the blocked ones
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_uds_sender_that_dies_while_the_bridge_waits_for_room_loses_nothing(bus, children):
    """The bridge waits for room on behalf of a sender that can wait no more: when the
    sender dies, what it sent goes in if there is room, else to the DLQ, and nothing
    waits out the sender's 60 s."""
    with (
        shmbus.connect(bus=bus, name="full", transport="shm", inbox_capacity=1 << 16) as full,
        shmbus.connect(bus=bus, name="driver") as driver,
    ):
        proc = children.start(_block_then_die, bus, 50)
        proc.join(20)
        assert proc.exitcode == -signal.SIGKILL
        sent = driver.recv(timeout=20).payload  # delivered after the 50: they were not waited for
        dead = [(i, r) for i, r in _all_dead_letters(bus) if i in sent]
        got = [m.id for m in full.recv_many(1000, timeout=0.5)]
        assert got and dead  # some fitted; the rest did not wait 60 s
        assert got + sorted(i for i, _ in dead) == sent  # each once, in order
        assert all("'blocked' had left" in r for _, r in dead), dead[:1]


def test_what_a_uds_agent_asks_right_after_sending_includes_what_it_sent(bus):
    """stats() and dlq() wait for the bridge to finish this agent's records
    (shm sends are done when they return; uds sends are pipelined)."""
    with (
        shmbus.connect(bus=bus, name="full", transport="shm", inbox_capacity=1 << 14) as full,
        shmbus.connect(bus=bus, name="u", transport="uds", backpressure="drop") as u,
    ):
        for _ in range(3):
            before = u.stats().agents["u"].sent
            ids = [u.send("full", b"x" * 1000) for _ in range(40)]  # about 14 fit
            dead = {d.message.id for d in u.dlq()} & set(ids)  # asked at once
            sent = u.stats().agents["u"].sent - before
            assert dead and sent and sent + len(dead) == 40
            got = {m.id for m in full.recv_many(100, timeout=5)}
            while more := full.recv_many(100, timeout=0.2):
                got |= {m.id for m in more}
            assert got | dead == set(ids) and not got & dead  # each in one place


def test_acks_ttl_and_counters_work_for_uds_agents(bus):
    with (
        shmbus.connect(bus=bus, name="u", transport="uds", ack_timeout=0.2) as u,
        shmbus.connect(bus=bus, name="s", transport="shm") as s,
    ):
        u.send("s", "ack me", requires_ack=True)
        assert s.recv(timeout=10).payload == "ack me"  # acks it
        assert u.wait_acked(timeout=10)
        s.send("u", "stale", ttl=0.05)
        time.sleep(0.2)
        u.send("u", "fresh")
        assert u.recv(timeout=10).payload == "fresh"
        assert any(d.reason.startswith("expired") for d in u.dlq())
        # A uds agent's "received" moves when it tells the bridge what it took
        # (with its next record, or its heartbeat within 0.5 s).
        wait_for(lambda: u.stats().agents["u"].received >= 2)
        stats = u.stats()
        assert stats.agents["u"].sent >= 2
        assert stats.agents["s"].received >= 1 and stats.agents["u"].heartbeat_age is not None


def test_a_uds_sender_keeps_the_order_within_a_lane_across_priorities(bus):
    with (
        shmbus.connect(bus=bus, name="r", transport="shm") as r,
        shmbus.connect(bus=bus, name="u", transport="uds") as u,
    ):
        # 0-33 share lane 0 and 67-100 lane 2: the order within each lane is the send order.
        sent = [(p, i) for i in range(20) for p in (0, 10, 90, 100)]
        for p, i in sent:
            u.send("r", [p, i], priority=p)
        got = []
        while len(got) < len(sent):
            got += [tuple(m.payload) for m in r.recv_many(100, timeout=10)]
        assert [g for g in got if g[0] >= 67] == [s for s in sent if s[0] >= 67]
        assert [g for g in got if g[0] < 34] == [s for s in sent if s[0] < 34]


def _shm_echo(bus: str) -> None:
    with shmbus.connect(bus=bus, name="echo", transport="shm") as agent:
        agent.send("a", "ready")
        for msg in agent:
            if msg.payload == "stop":
                return
            agent.reply(msg, msg.payload)


def test_an_asyncio_agent_over_uds(bus, children):
    import asyncio

    import shmbus.aio

    async def main() -> None:
        a = await shmbus.aio.connect(bus=bus, name="a", transport="uds")
        b = await shmbus.aio.connect(bus=bus, name="b", transport="uds")
        try:
            children.start(_shm_echo, bus)
            assert (await a.recv(timeout=20)).payload == "ready"
            got = await asyncio.gather(*(a.request("echo", i, timeout=10) for i in range(20)))
            assert [m.payload for m in got] == list(range(20))
            await b.subscribe("x.*")
            await a.publish("x.1", {"n": 1})
            assert (await b.recv(timeout=10)).payload == {"n": 1}
            await a.send("echo", "stop")
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())
    children.join_all(20)


def test_an_asyncio_uds_agent_keeps_its_loop_free_under_policy_error(bus):
    """A uds send of policy "error" waits for the bridge's verdict: the asyncio
    agent waits off the loop, which keeps running, and raises as for shm."""
    import asyncio

    import shmbus.aio

    async def main() -> None:
        with shmbus.connect(bus=bus, name="tiny", transport="shm", inbox_capacity=1 << 14) as tiny:
            agent = await shmbus.aio.connect(
                bus=bus, name="u", transport="uds", backpressure="error"
            )
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.ensure_future(ticker())
            try:
                sent = []
                with pytest.raises(shmbus.InboxFull, match="'tiny'"):
                    for i in range(100):
                        before = ticks
                        sent.append(await agent.send("tiny", b"x" * 1500 + bytes([i])))
                        assert ticks > before  # the loop ran while the send waited
                assert [m.id for m in tiny.recv_many(100, timeout=5)] == sent
            finally:
                task.cancel()
                await agent.close()

    asyncio.run(main())


def test_a_coordinator_restart_cuts_uds_agents_off_and_drains_their_inboxes(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver", transport="shm")
        far = shmbus.connect(bus=bus, name="far", transport="uds")
        try:
            driver.send("far", "unread")
            wait_for(lambda: driver.stats().agents["far"].delivered == 1)
            runner.coordinator.restart()
            wait_for(lambda: "far" not in driver.peers())
            dead = [d for d in driver.dlq() if d.message.recipient == "far"]
            assert [d.message.payload for d in dead] == ["unread"]
            assert dead[0].reason.startswith("recipient died")
            driver.subscribe("t")
        finally:
            far.close()


@pytest.mark.parametrize("tiny_transport", ["shm", "uds"])
def test_policy_error_raises_in_a_uds_sender_as_in_an_shm_one(bus, tiny_transport):
    """The sender waits for the bridge's verdict on a send of policy "error"."""
    with shmbus.connect(bus=bus, name="u", transport="uds", backpressure="error") as u:
        tiny = shmbus.connect(
            bus=bus, name="tiny", transport=tiny_transport, inbox_capacity=1 << 14
        )
        blob = b"x" * 1500
        sent = []
        with pytest.raises(shmbus.InboxFull, match=r"'tiny'.*full.*% in use.*does not wait") as e:
            for i in range(100):
                sent.append(u.send("tiny", blob + bytes([i])))
        assert not isinstance(e.value, TimeoutError)
        assert 5 < len(sent) < 40  # the inbox's worth (one lane), then the error
        with pytest.raises(shmbus.InboxFull, match=r"0 of 3 messages were sent"):
            u.send_many("tiny", [blob] * 3)
        wait_for(lambda: u.stats().agents["u"].failed == 1 + 3)
        assert [m.id for m in tiny.recv_many(100, timeout=5)] == sent  # in order, none lost
        assert not [d for d in u.dlq() if d.message.recipient == "tiny"]  # the caller has them
        tiny.close()
        # u still thinks 'tiny' is there (its routes are a copy): the bridge says otherwise.
        with pytest.raises(shmbus.UnknownRecipient, match="'tiny'"):
            u.send("tiny", "gone")
        wait_for(lambda: any(d.message.payload == "gone" for d in u.dlq()))


def test_a_uds_resend_keeps_no_verdict_nobody_waits_for(bus):
    """A resend goes as a record of policy "error" (never waiting), whose
    verdict nobody waits for: it must not be kept for ever.

    Found in review of the uds bridge's C data path and its client (it failed
    before its fix)."""
    import shmbus
    from shmbus.transport.uds import _Peer

    with (
        shmbus.connect(bus=bus, name="rx") as rx,
        shmbus.connect(bus=bus, name="tx", transport="uds") as tx,
    ):
        out = tx._link.out
        for _ in range(5):
            frame = out.frame(
                int(shmbus.MessageType.DIRECT),
                b"\xa1x",
                0,
                out._take(1),
                recipient="rx",
                recipient_id=out._recipient("rx")[0],
            )
            assert _Peer(out).try_write(frame)
            assert rx.recv(timeout=10) is not None
        tx.send("rx", "last", backpressure="error")  # waits for its own verdict, after theirs
        assert rx.recv(timeout=10).payload == "last"
        assert tx._link.stream._verdicts == {}
