"""shmbus: a message bus for agents in separate processes on one machine.

The core is a lock-free many-to-one ring in POSIX shared memory
(:class:`shmbus.Ring`); see docs/architecture.md for the whole design.
"""

from .agent.agent import Agent, connect
from .core.message import DeadLetter, Message, MessageType, RoutingRule
from .core.ring import Ring
from .core.stats import AgentStats, BusStats, Counters, TopicStats
from .errors import (
    AgentExited,
    AlreadyExists,
    BackpressureTimeout,
    BadSegment,
    ClaimLost,
    Closed,
    CoordinatorRunning,
    CoordinatorUnavailable,
    CorruptFrame,
    ForeignObject,
    InboxFull,
    InvalidArgument,
    InvalidName,
    InvalidRunFile,
    MessageTooLarge,
    NameTaken,
    NotFound,
    ReadTimeout,
    ReadyTimeout,
    RecvTimeout,
    RejoinRefused,
    RequestTimeout,
    RingFull,
    RingSealed,
    ShmbusError,
    ShmbusTimeout,
    SystemFailure,
    UnknownRecipient,
)
from .runner import AgentProcess, Runner

__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> object:
    if name == "aio":  # imported on first use: not every agent needs asyncio
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'shmbus' has no attribute {name!r}")


__all__ = [
    "Agent",
    "AgentProcess",
    "AgentExited",
    "AgentStats",
    "BusStats",
    "Counters",
    "TopicStats",
    "Runner",
    "AlreadyExists",
    "BackpressureTimeout",
    "InboxFull",
    "CoordinatorRunning",
    "CoordinatorUnavailable",
    "DeadLetter",
    "Message",
    "MessageType",
    "RoutingRule",
    "NameTaken",
    "RecvTimeout",
    "RequestTimeout",
    "UnknownRecipient",
    "connect",
    "BadSegment",
    "ForeignObject",
    "ClaimLost",
    "Closed",
    "CorruptFrame",
    "InvalidArgument",
    "InvalidName",
    "InvalidRunFile",
    "MessageTooLarge",
    "NotFound",
    "ReadTimeout",
    "ReadyTimeout",
    "RejoinRefused",
    "Ring",
    "RingFull",
    "RingSealed",
    "ShmbusError",
    "ShmbusTimeout",
    "SystemFailure",
]
