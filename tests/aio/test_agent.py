"""shmbus.aio: the asyncio agent against sync agents, other asyncio agents and itself.

No pytest-asyncio: each test runs its coroutine with :func:`run`, which bounds it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import pytest

import shmbus
import shmbus.aio
from shmbus import MessageType, RoutingRule


@pytest.fixture(autouse=True, params=["shm", "uds"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on shm, and on uds (its agents, and its children's, talk
    over direct links there: the loop reads their sockets itself)."""
    monkeypatch.setenv("SHMBUS_TRANSPORT", request.param)
    return str(request.param)


# ------------------------------------------------------------- helpers


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    """Run ``coro`` in a fresh loop, failing the test past ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def aio_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shmbus-")]


def _echo(bus: str, name: str) -> None:
    """A sync agent in another process: answers requests, stops on 'stop'."""
    with shmbus.connect(bus=bus, name=name) as agent:
        for msg in agent:
            if msg.type == MessageType.REQUEST:
                agent.reply(msg, {"echo": msg.payload})
            elif msg.payload == "stop":
                return


async def _wait_for_peer(agent: shmbus.aio.Agent, name: str) -> None:
    while name not in agent.sync.peers():
        await asyncio.sleep(0.01)


class Ticker:
    """A task that counts the loop's turns: it stops counting if the loop blocks."""

    def __init__(self) -> None:
        self.ticks = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.ticks += 1

    def stop(self) -> int:
        self.task.cancel()
        return self.ticks


# ---------------------------------------------------- request/response


def test_request_to_a_sync_agent_in_another_process_is_answered(bus, children):
    children.start(_echo, bus, "echo")

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="client") as agent:
            await _wait_for_peer(agent, "echo")
            reply = await agent.request("echo", {"n": 1}, timeout=10)
            assert reply.type == MessageType.RESPONSE and reply.payload == {"echo": {"n": 1}}
            await agent.send("echo", "stop")

    run(main())
    children.join_all(10)


def test_many_concurrent_requests_from_one_loop_each_get_their_own_answer(bus, children):
    children.start(_echo, bus, "echo")

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="client") as agent:
            await _wait_for_peer(agent, "echo")
            replies = await asyncio.gather(
                *(agent.request("echo", i, timeout=20) for i in range(250))
            )
            assert [r.payload for r in replies] == [{"echo": i} for i in range(250)]
            await agent.send("echo", "stop")

    run(main())
    children.join_all(10)


def test_two_asyncio_agents_serve_and_request_with_async_handlers(bus):
    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="svc") as svc,
            await shmbus.aio.connect(bus=bus, name="client") as client,
        ):

            async def double(msg: shmbus.Message) -> Any:
                await asyncio.sleep(0)
                if msg.payload < 0:
                    raise ValueError("negative")
                return msg.payload * 2

            svc.route(RoutingRule(msg_type=MessageType.REQUEST), double)
            serving = asyncio.ensure_future(svc.serve())
            answers = await asyncio.gather(
                *(client.request("svc", i, timeout=10) for i in range(20))
            )
            assert [a.payload for a in answers] == [2 * i for i in range(20)]
            failed = await client.request("svc", -1, timeout=10)
            assert failed.type == MessageType.ERROR and failed.payload["error"] == "ValueError"
            await svc.close()
            await asyncio.wait_for(serving, 10)  # serve ends when its agent closes

    run(main())


def test_request_with_no_answer_raises_request_timeout_and_the_loop_runs_meanwhile(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="mute"):
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                ticker = Ticker()
                with pytest.raises(shmbus.RequestTimeout, match="'mute'"):
                    await agent.request("mute", 1, timeout=0.3)
                assert ticker.stop() > 0

    run(main())


# ------------------------------------------------------------- receive


def test_async_for_yields_messages_in_order_and_ends_when_closed(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender") as sender:
            agent = await shmbus.aio.connect(bus=bus, name="reader")
            sender.send_many("reader", list(range(100)))
            got = []
            async for msg in agent:
                got.append(msg.payload)
                if len(got) == 100:
                    asyncio.get_running_loop().call_soon(asyncio.ensure_future, agent.close())
            assert got == list(range(100))

    run(main())


def test_recv_timeout_raises_the_sync_recv_timeout_and_recv_many_gives_empty(bus):
    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
            with pytest.raises(shmbus.RecvTimeout):
                await agent.recv(timeout=0.05)
            assert await agent.recv_many(10, timeout=0.05) == []

    run(main())


def test_recv_many_gives_what_is_there_up_to_the_count(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender") as sender:
            async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
                sender.send_many("reader", list(range(10)))
                got: list[Any] = []
                while len(got) < 10:
                    batch = await agent.recv_many(4, timeout=10)
                    assert 1 <= len(batch) <= 4
                    got += [m.payload for m in batch]
                assert got == list(range(10))

    run(main())


def test_publish_and_subscribe(bus):
    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="pub") as pub,
            await shmbus.aio.connect(bus=bus, name="sub") as sub,
        ):
            await sub.subscribe("ev.*")
            await pub.publish("ev.one", 1)
            await pub.publish_many("ev.two", [2, 3])
            got = [await sub.recv(timeout=10) for _ in range(3)]
            assert [(m.topic, m.payload) for m in got] == [
                ("ev.one", 1),
                ("ev.two", 2),
                ("ev.two", 3),
            ]
            await sub.unsubscribe("ev.*")

    run(main())


# -------------------------------------------------------- cancellation


def test_a_cancelled_recv_loses_nothing(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender") as sender:
            async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
                pending = asyncio.ensure_future(agent.recv())
                await asyncio.sleep(0.05)
                pending.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pending
                sender.send("reader", "after")
                assert (await agent.recv(timeout=10)).payload == "after"

    run(main())


def test_a_recv_cancelled_as_its_message_comes_leaves_it_for_the_next(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender") as sender:
            async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
                first = asyncio.ensure_future(agent.recv())
                second = asyncio.ensure_future(agent.recv())
                await asyncio.sleep(0.05)
                sender.send("reader", "only")
                while not agent._queue and not first.done():  # delivered, first one woken
                    await asyncio.sleep(0)
                first.cancel()
                assert (await asyncio.wait_for(second, 10)).payload == "only"

    run(main())


def test_a_cancelled_request_drops_its_late_response_and_recv_never_sees_it(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="slow") as slow:
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                task = asyncio.ensure_future(agent.request("slow", "q", timeout=10))
                await asyncio.sleep(0)  # the task sends
                request = slow.recv(timeout=10)  # it came; the answer waits
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                slow.reply(request, "late")
                slow.send("client", "next")
                assert (await agent.recv(timeout=10)).payload == "next"
                assert agent.late_responses == 1
                with pytest.raises(shmbus.RecvTimeout):
                    await agent.recv(timeout=0.1)

    run(main())


def test_a_timed_out_request_drops_its_late_response(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="slow") as slow:
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                with pytest.raises(shmbus.RequestTimeout):
                    await agent.request("slow", "q", timeout=0.1)
                slow.reply(slow.recv(timeout=10), "late")
                slow.send("client", "next")
                assert (await agent.recv(timeout=10)).payload == "next"
                assert agent.late_responses == 1

    run(main())


# ------------------------------------------------- the loop never blocks


def test_the_loop_runs_while_recv_waits(bus):
    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
            ticker = Ticker()
            with pytest.raises(shmbus.RecvTimeout):
                await agent.recv(timeout=0.3)
            assert ticker.stop() > 0

    run(main())


def test_a_send_to_a_full_inbox_waits_off_the_loop(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="small", inbox_capacity=1 << 16) as small:
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                blob = b"x" * 1000
                _fill(agent.sync, "small")
                failed = agent.stats().agents["client"].failed
                ticker = Ticker()
                send = asyncio.ensure_future(agent.send("small", b"last", timeout=10))
                while ticker.ticks < 5:  # the loop turns while the send waits
                    await asyncio.sleep(0.005)
                assert not send.done()
                got = [m.payload for m in small.recv_many(1000, timeout=0)]
                msg_id = await send
                ticker.stop()
                got += [m.payload for m in small.recv_many(1000, timeout=10)]
                assert got[-1] == b"last" and set(got[:-1]) == {blob, b"fill"}
                assert msg_id > 0
                assert agent.stats().agents["client"].failed == failed  # it did not fail

    run(main())


def _fill(agent: shmbus.Agent, recipient: str) -> None:
    """Fill ``recipient``'s inbox to the last byte a small frame would take."""
    for fill in (b"x" * 1000, b"fill"):
        while True:
            try:
                agent.send(recipient, fill, backpressure="error")
            except shmbus.InboxFull:
                break


def _drain(agent: shmbus.Agent) -> list[shmbus.Message]:
    """Everything in the inbox now, up to and including the first REQUEST."""
    got: list[shmbus.Message] = []
    while not got or got[-1].type != MessageType.REQUEST:
        got += agent.recv_many(1, timeout=10)
    return got


def test_a_request_to_a_full_inbox_waits_off_the_loop_and_gets_its_answer(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="svc", inbox_capacity=1 << 16) as svc:
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                _fill(agent.sync, "svc")
                task = asyncio.ensure_future(agent.request("svc", "q", timeout=10))
                await asyncio.sleep(0.05)
                assert not task.done()  # waiting for room, the loop turning
                request = _drain(svc)[-1]
                assert request.payload == "q"
                svc.reply(request, "a")
                assert (await task).payload == "a"

    run(main())


def test_a_request_cancelled_while_it_waits_for_room_drops_its_answer(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="svc", inbox_capacity=1 << 16) as svc:
            async with await shmbus.aio.connect(bus=bus, name="client") as agent:
                _fill(agent.sync, "svc")
                task = asyncio.ensure_future(agent.request("svc", "q", timeout=10))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                request = _drain(svc)[-1]  # the send went on in its thread
                svc.reply(request, "late")
                svc.send("client", "next")
                assert (await agent.recv(timeout=10)).payload == "next"
                # The answer may be read before the loop hears that the send it
                # answers ended (two fds ready at once): it is held until then.
                for _ in range(500):
                    if agent.late_responses:
                        break
                    await asyncio.sleep(0.01)
                assert agent.late_responses == 1

    run(main())


def test_an_unread_inbox_fills_and_senders_feel_it(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender", backpressure="error") as sender:
            agent = await shmbus.aio.connect(
                bus=bus, name="reader", inbox_capacity=1 << 16, max_unread=100
            )
            async with agent:
                sent = 0
                with pytest.raises(shmbus.InboxFull):
                    for sent in range(100_000):  # noqa: B007  # count what fitted
                        sender.send("reader", sent)
                        if sent % 50 == 0:
                            await asyncio.sleep(0.001)  # the reader's chance to read
                assert sent < 10_000  # bounded by max_unread and the inbox, not by Python
                got = [(await agent.recv(timeout=10)).payload for _ in range(sent)]
                assert got == list(range(sent))

    run(main())


# ----------------------------------------------------------------- close


def test_close_ends_a_pending_recv_with_closed_and_leaves_no_thread(bus):
    async def main() -> None:
        agent = await shmbus.aio.connect(bus=bus, name="reader")
        pending = asyncio.ensure_future(agent.recv())
        await asyncio.sleep(0.05)
        await agent.close()
        with pytest.raises(shmbus.Closed):
            await pending
        with pytest.raises(shmbus.Closed):
            await agent.recv(timeout=1)
        with pytest.raises(shmbus.Closed):
            await agent.send("reader", 1)
        with pytest.raises(shmbus.Closed):
            await agent.request("reader", 1)
        await agent.close()  # idempotent
        assert aio_threads() == []

    run(main())


def test_messages_read_but_never_taken_go_to_the_dlq_at_close(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="sender") as sender:
            agent = await shmbus.aio.connect(bus=bus, name="reader")
            sender.send_many("reader", ["a", "b", "c"])
            assert (await agent.recv(timeout=10)).payload == "a"
            await agent.close()
            unread = [d for d in sender.dlq() if d.message.recipient == "reader"]
            assert sorted(d.message.payload for d in unread) == ["b", "c"]
            assert all("unread" in d.reason or "left" in d.reason for d in unread)

    run(main())


def test_bad_arguments_are_refused_by_name(bus):
    async def main() -> None:
        with pytest.raises(ValueError, match="max_unread"):
            await shmbus.aio.connect(bus=bus, name="x", max_unread=0)
        async with await shmbus.aio.connect(bus=bus, name="x") as agent:
            with pytest.raises(shmbus.UnknownRecipient):
                await agent.send("nobody", 1)
            with pytest.raises(shmbus.InvalidName):
                await agent.subscribe("bad pattern!")

    run(main())


# ------------------------------------------- the reader thread and the loop


def test_acked_sends_from_the_loop_while_the_reader_takes_their_acks(bus):
    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="a", ack_timeout=5.0) as a,
            await shmbus.aio.connect(bus=bus, name="b") as b,
        ):
            got: list[Any] = []

            async def receive() -> None:
                while len(got) < 500:
                    got.extend(m.payload for m in await b.recv_many(100, timeout=10))

            receiving = asyncio.ensure_future(receive())
            for i in range(500):  # the loop tracks, a's reader takes the ACKs meanwhile
                await a.send("b", i, requires_ack=True)
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(receiving, 20)
            assert sorted(got) == list(range(500))
            assert await a.wait_acked(timeout=20)  # every one acknowledged, none lost track of
            assert await b.recv_many(10, timeout=0.1) == []  # handed over once

    run(main())


def _linger(bus: str, name: str) -> None:
    import time

    with shmbus.connect(bus=bus, name=name):
        time.sleep(60)


def test_peer_death_callbacks_run_on_the_loop(bus, children):
    import os
    import signal

    victim = children.start(_linger, bus, "victim")

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="watcher") as agent:
            died: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
            on_loop = threading.get_ident()

            async def callback(name: str) -> None:  # a coroutine function is awaited
                died.set_result((name, threading.get_ident() == on_loop))

            agent.on_peer_death(callback)
            await _wait_for_peer(agent, "victim")
            os.kill(victim.pid, signal.SIGKILL)
            assert await asyncio.wait_for(died, 20) == ("victim", True)

    run(main())


def test_a_request_is_answered_while_unread_messages_hold_the_reader(bus):
    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="svc") as svc,
            await shmbus.aio.connect(bus=bus, name="client", max_unread=10) as client,
        ):
            svc.route(RoutingRule(msg_type=MessageType.REQUEST), lambda m: m.payload + 1)
            seen: list[Any] = []
            svc.route(RoutingRule(msg_type=MessageType.DIRECT), lambda m: seen.append(m.payload))
            serving = asyncio.ensure_future(svc.serve())
            with shmbus.connect(bus=bus, name="flood") as flood:
                flood.send_many("client", list(range(100)))
                await asyncio.sleep(0.1)  # the reader stops at max_unread
                answer = await client.request("svc", 1, timeout=10)  # it reads on for this
                assert answer.payload == 2
                got = [(await client.recv(timeout=10)).payload for _ in range(100)]
                assert got == list(range(100))
                flood.send("svc", "plain")
                while not seen:
                    await asyncio.sleep(0.01)
                assert seen == ["plain"]
            await svc.close()
            await asyncio.wait_for(serving, 10)

    run(main())


def test_history_and_peers_mirror_the_sync_agent(bus):
    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="pub") as pub,
            await shmbus.aio.connect(bus=bus, name="late") as late,
        ):
            assert pub.peers() == ["late", "pub"]
            await pub.keep_history("hist.*", 2)
            for i in range(3):
                await pub.publish("hist.x", i)
            assert [m.payload for m in await late.history("hist.*")] == [1, 2]

    run(main())


def test_a_reader_held_at_max_unread_is_not_woken_again_and_again(bus, monkeypatch):
    """While the loop holds max_unread messages it reads nothing, and what
    comes meanwhile must not wake it on every turn (a busy loop)."""
    from shmbus.aio import feed as _aio_ring

    woken: list[int] = []
    original = _aio_ring.RingFeed._woken

    def counting(self: Any) -> None:
        woken.append(1)
        original(self)

    monkeypatch.setattr(_aio_ring.RingFeed, "_woken", counting)

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="client", max_unread=10) as client:
            with shmbus.connect(bus=bus, name="flood") as flood:
                for i in range(50):
                    flood.send("client", i)
                await asyncio.sleep(0.2)  # the feed reads up to max_unread, then holds
                before = len(woken)
                for i in range(50, 70):  # comes while it holds
                    flood.send("client", i)
                await asyncio.sleep(0.3)
                assert len(woken) - before <= 2
                got = [(await client.recv(timeout=10)).payload for _ in range(70)]
                assert got == list(range(70))

    run(main())
