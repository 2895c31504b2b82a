"""shmbus.aio on a shared-memory inbox: the loop reads the ring itself, woken by
the C waiter (shmbus/aio/feed.py), and spins for the answers requests wait for.

No pytest-asyncio: each test runs its coroutine with :func:`run`, which bounds it.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Coroutine
from typing import Any

import shmbus
import shmbus.aio
from shmbus import MessageType, RoutingRule
from shmbus.core.paths import find_inbox

GUARD = 20.0  # seconds any single wait may take before the test fails


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    """Run ``coro`` in a fresh loop, failing the test past ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _settled(before: tuple[int, int]) -> None:
    """Until this process has as many threads and descriptors as ``before``
    (a joined thread leaves /proc/self/task a moment after its join)."""
    deadline = time.monotonic() + GUARD
    while (threads(), fds()) != before:
        assert time.monotonic() < deadline, f"left behind: {(threads(), fds())} vs {before}"
        await asyncio.sleep(0.01)


async def _wait_for_peer(agent: shmbus.aio.Agent, name: str) -> None:
    deadline = time.monotonic() + GUARD
    while name not in agent.peers():
        assert time.monotonic() < deadline, f"{name} never joined"
        await asyncio.sleep(0.01)


def _pause(rnd: random.Random) -> None:
    """0 to 1000 us, busy for the short ones (a sleep's granularity is coarse)."""
    us = rnd.choice((0, 0, 1, 5, 20, 50, 100, 1000))
    until = time.perf_counter() + us * 1e-6
    while time.perf_counter() < until:
        pass


def _slow_echo(bus: str, name: str, seed: int | None) -> None:
    """Answers each request after a random pause, so some answers come while
    the requester spins and some after it gave up and armed the waiter
    (with no ``seed``, at once)."""
    rnd = random.Random(seed)
    with shmbus.connect(bus=bus, name=name) as agent:
        for msg in agent:
            if msg.type == MessageType.REQUEST:
                if seed is not None:
                    _pause(rnd)
                agent.reply(msg, msg.payload)
            elif msg.payload == "stop":
                return


def _await_peer(agent: shmbus.Agent, target: str) -> None:
    deadline = time.monotonic() + GUARD
    while target not in agent.peers():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _requester(bus: str, name: str, target: str, count: int, seed: int) -> None:
    """Requests one at a time with random pauses: each lands on an idle loop,
    anywhere in its re-arming; a lost wake-up is a RequestTimeout (exit 1)."""
    rnd = random.Random(seed)
    with shmbus.connect(bus=bus, name=name) as agent:
        _await_peer(agent, target)
        for i in range(count):
            _pause(rnd)
            priority = (0, 50, 90)[i % 3]
            answer = agent.request(target, i, timeout=GUARD, priority=priority)
            assert answer.payload == i + 1


def _sender(bus: str, name: str, target: str, count: int, seed: int) -> None:
    """``count`` messages on every lane in turn, in bursts with pauses."""
    rnd = random.Random(seed)
    with shmbus.connect(bus=bus, name=name) as agent:
        _await_peer(agent, target)
        for i in range(count):
            agent.send(target, i, priority=(0, 50, 90)[i % 3])
            if rnd.random() < 0.1:
                _pause(rnd)
        agent.wait_acked(GUARD)


# ------------------------------------------------------------ wake-ups


def test_an_idle_loop_is_woken_by_a_message_on_every_lane(bus):
    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
            with shmbus.connect(bus=bus, name="sender") as sender:
                for priority in (90, 50, 0, 100, 40):
                    pending = asyncio.ensure_future(agent.recv(timeout=GUARD))
                    await asyncio.sleep(0.01)  # the loop idles: only the waiter watches
                    sender.send("reader", priority, priority=priority)
                    assert (await pending).payload == priority

    run(main())


def test_no_wake_up_is_lost_when_lone_requests_land_as_the_loop_rearms(bus, children):
    count = 1500
    kids = [children.start(_requester, bus, f"asker{k}", "svc", count, k) for k in range(2)]

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="svc") as svc:
            svc.route(RoutingRule(msg_type=MessageType.REQUEST), lambda m: m.payload + 1)
            serving = asyncio.ensure_future(svc.serve())
            while any(k.is_alive() for k in kids):
                await asyncio.sleep(0.05)
            await svc.close()
            await asyncio.wait_for(serving, GUARD)

    run(main(), timeout=120)
    children.join_all(GUARD)
    assert [k.exitcode for k in kids] == [0, 0]  # every request answered in time


def test_many_senders_on_every_lane_lose_nothing(bus, children):
    senders, count = 3, 2000
    for k in range(senders):
        children.start(_sender, bus, f"sender{k}", "reader", count, k)

    async def main() -> list[shmbus.Message]:
        async with await shmbus.aio.connect(bus=bus, name="reader") as agent:
            got: list[shmbus.Message] = []
            while len(got) < senders * count:
                more = await agent.recv_many(500, timeout=GUARD)
                assert more, f"nothing more after {len(got)} messages"
                got += more
            assert await agent.recv_many(10, timeout=0.2) == []
            return got

    got = run(main(), timeout=120)
    children.join_all(GUARD)
    for k in range(senders):  # every message once, in order within a lane
        mine = [m for m in got if m.sender == f"sender{k}"]
        assert sorted(m.payload for m in mine) == list(range(count))
        for lane in range(3):
            ours = [m.payload for m in mine if m.payload % 3 == lane]
            assert ours == sorted(ours)


# --------------------------------------------------- spinning for answers


def test_answers_that_come_late_or_at_once_all_reach_their_requests(bus, children):
    children.start(_slow_echo, bus, "echo", 7)

    async def main() -> None:
        async with await shmbus.aio.connect(bus=bus, name="client") as agent:
            await _wait_for_peer(agent, "echo")
            for i in range(1500):
                assert (await agent.request("echo", i, timeout=GUARD)).payload == i
            # And many at once, some answered while others are still sent.
            answers = await asyncio.gather(
                *(agent.request("echo", i, timeout=GUARD) for i in range(200))
            )
            assert [a.payload for a in answers] == list(range(200))
            await agent.send("echo", "stop")

    run(main())
    children.join_all(GUARD)


def test_requests_answered_by_the_same_loop_keep_being_answered(bus):
    """Such an answer cannot come while the loop spins: spins that find
    nothing give way, and every request is still answered."""

    async def main() -> None:
        async with (
            await shmbus.aio.connect(bus=bus, name="svc") as svc,
            await shmbus.aio.connect(bus=bus, name="client") as client,
        ):
            svc.route(RoutingRule(msg_type=MessageType.REQUEST), lambda m: m.payload * 2)
            serving = asyncio.ensure_future(svc.serve())
            for i in range(300):
                assert (await client.request("svc", i, timeout=GUARD)).payload == 2 * i
            await svc.close()
            await asyncio.wait_for(serving, GUARD)

    run(main())


def test_other_tasks_run_while_one_task_makes_requests_back_to_back(bus, children):
    children.start(_slow_echo, bus, "echo", None)  # answers at once: requests may spin

    async def main() -> None:
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        async with await shmbus.aio.connect(bus=bus, name="client") as agent:
            await _wait_for_peer(agent, "echo")
            counter = asyncio.ensure_future(count_turns())
            for i in range(50):  # the first ones wait on the loop, which turns meanwhile
                await agent.request("echo", i, timeout=GUARD)
            before = turns
            for i in range(400):
                await agent.request("echo", i, timeout=GUARD)
            # However fast the answers, the loop turned at least every few requests.
            assert turns - before >= 400 // 10
            counter.cancel()
            await agent.send("echo", "stop")

    run(main())
    children.join_all(GUARD)


# ------------------------------------------------------- acks and close


def test_unacknowledged_sends_are_resent_from_the_loop(bus):
    async def main() -> None:
        with shmbus.connect(bus=bus, name="slow") as slow:
            async with await shmbus.aio.connect(
                bus=bus, name="sender", ack_timeout=0.1, max_attempts=50
            ) as agent:
                await agent.send("slow", "once", requires_ack=True)
                deadline = time.monotonic() + GUARD
                while agent.stats().agents["sender"].retried < 2:  # slow reads nothing yet
                    assert time.monotonic() < deadline, "never resent"
                    await asyncio.sleep(0.02)
                assert slow.recv(timeout=GUARD).payload == "once"  # acked as handed over
                assert await agent.wait_acked(timeout=GUARD)
                assert slow.recv_many(100, timeout=0.2) == []  # the resent copies: dropped

    run(main())


def test_close_leaves_no_thread_and_no_descriptor_behind(bus, children):
    children.start(_slow_echo, bus, "echo", 1)

    async def main() -> None:
        before = threads(), fds()
        agent = await shmbus.aio.connect(bus=bus, name="client")
        await _wait_for_peer(agent, "echo")
        for i in range(50):
            await agent.request("echo", i, timeout=GUARD)
        pending = asyncio.ensure_future(agent.recv())
        await asyncio.sleep(0.01)

        await agent.send("echo", "stop")
        await agent.close()
        try:
            await pending
        except shmbus.Closed:
            pass
        await _settled(before)

    run(main())
    children.join_all(GUARD)


def test_a_cancelled_close_still_leaves_the_bus(bus) -> None:
    """Found in review: an asyncio agent whose close() is cancelled still leaves the bus."""

    async def main() -> None:
        agent = await shmbus.aio.connect(bus=bus, name="a")
        closing = asyncio.ensure_future(agent.close())
        await asyncio.sleep(0)  # close() is under way, waiting for the reader to stop
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        await agent.close()  # the caller tries again: this one must finish the job
        assert find_inbox(bus, "a") is None, "the inbox is still there"
        with shmbus.connect(bus=bus, name="b") as b:
            assert "a" not in b.peers()

    asyncio.run(asyncio.wait_for(main(), 30))
