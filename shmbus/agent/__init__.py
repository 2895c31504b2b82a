"""The agent: a name on a bus, its inbox, and what it sends and receives.

:class:`Agent` is the sync API; :func:`connect` makes one. The helpers beside it
(acks, ...) are handed what they need, never the Agent itself.
"""

from .agent import Agent, connect

__all__ = ["Agent", "connect"]
