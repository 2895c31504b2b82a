"""shmbus: a message bus for agents in separate processes on one machine.

The core is a lock-free many-to-one ring in POSIX shared memory
(:class:`shmbus.Ring`); see docs/architecture.md for the whole design.
"""

from .errors import (
    AlreadyExists,
    BadSegment,
    ClaimLost,
    Closed,
    CorruptFrame,
    InvalidName,
    MessageTooLarge,
    NotFound,
    ReadTimeout,
    RingFull,
    ShmbusError,
    ShmbusTimeout,
)
from .ring import Ring

__version__ = "0.1.0.dev0"

__all__ = [
    "AlreadyExists",
    "BadSegment",
    "ClaimLost",
    "Closed",
    "CorruptFrame",
    "InvalidName",
    "MessageTooLarge",
    "NotFound",
    "ReadTimeout",
    "Ring",
    "RingFull",
    "ShmbusError",
    "ShmbusTimeout",
]
