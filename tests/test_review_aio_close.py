"""Review: an asyncio agent whose close() is cancelled still leaves the bus."""

from __future__ import annotations

import asyncio
import os

import shmbus
import shmbus.aio
from shmbus.control import inbox_name


def test_a_cancelled_close_still_leaves_the_bus(bus) -> None:
    async def main() -> None:
        agent = await shmbus.aio.connect(bus=bus, name="a")
        closing = asyncio.ensure_future(agent.close())
        await asyncio.sleep(0)  # close() is under way, waiting for the reader to stop
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        await agent.close()  # the caller tries again: this one must finish the job
        inbox = f"/dev/shm/shmbus.{inbox_name(bus, 'a')}"
        assert not os.path.exists(inbox), "the inbox is still there"
        with shmbus.connect(bus=bus, name="b") as b:
            assert "a" not in b.peers()

    asyncio.run(asyncio.wait_for(main(), 30))
