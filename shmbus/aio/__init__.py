"""The asyncio mirror of :class:`shmbus.Agent`::

    import shmbus.aio

    async with await shmbus.aio.connect(bus="demo", name="web") as agent:
        reply = await agent.request("service", {"q": 1})

Same method names as the sync agent, as coroutines (see :mod:`shmbus.aio.agent`).
"""

from .agent import Agent, connect

__all__ = ["Agent", "connect"]
