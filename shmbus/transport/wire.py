"""The uds transport's stream format, shared by the client (uds.py) and the bridge.

After a hello (one control-format message each way, shmbus/core/control.py), both
directions carry *records*, each many frames written with one system call::

    u32 body length | u32 count | u32 info | u32 taken | u32 granted |
    count x u32 frame length | frames

little-endian, the frames back to back exactly as they are in a ring
(csrc/shmbus_frame.h). ``info`` from the client is the backpressure policy
of the record's frames (bits 0-1: 0 block, 1 error, 2 drop) and, for
"block", how long the bridge may wait for room in milliseconds (bits 2-31;
all ones: no limit). ``taken`` and ``granted`` from the client count the
bridge's records it has taken off the socket and the ones it asks for (mod
2**32): the bridge sends a record only when asked, so a backlog waits in the
inbox's lanes (the highest first, as for shm readers) rather than in the
socket, and it keeps each record until it is taken, so what a dying agent
never took goes to the DLQ. A record with no frames is a heartbeat, or just
the counts. The reader checks every length against the limits below before
it reads the body; a peer that breaks them is disconnected.
"""

from __future__ import annotations

import functools
import struct

from ..core.message import HEADER
from ..core.ring import lane_of

RECORD = struct.Struct("<IIIII")  # body length, count, info, taken, granted
COUNTS = struct.Struct("<II")  # taken, granted: at COUNTS_AT in a record
COUNTS_AT = 12
HEAD = RECORD.size
MAX_RECORD = 64 << 20  # a record's body; frames of up to an inbox's max_frame fit
MAX_COUNT = 1 << 16
POLICY_CODES = {"block": 0, "error": 1, "drop": 2}
POLICY_NAMES = {v: k for k, v in POLICY_CODES.items()}
FOREVER_MS = (1 << 30) - 1
#: From the bridge, a record of no frames whose info word's bits 0-1 are 1 is
#: a verdict on one of the client's records of policy "error" (which waits
#: for it): bits 2-4 say what failed first (0: nothing; csrc/shmbus_bridge.h's
#: SHMBUS_DEAD_*), 5-6 the full lane, 7-13 its fill in percent; ``taken``
#: holds the number of the client's record (counting from 1, every record it
#: wrote), ``granted`` the frames delivered before the failure.
VERDICT = 1
VERDICT_FIELDS = struct.Struct("<III")  # info, record number, frames delivered: at 8
MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=256)  # on every send; few (policy, wait) pairs are in use
def info(policy: str, wait: float | None) -> int:
    """A record's ``info`` word: the policy, and for "block" the wait (None: forever)."""
    ms = FOREVER_MS if wait is None else min(max(round(wait * 1000), 0), FOREVER_MS - 1)
    return POLICY_CODES[policy] | (ms << 2 if policy == "block" else 0)


def policy_of(word: int) -> tuple[str, float | None]:
    """(policy, wait in seconds or None) of an ``info`` word; ValueError if unknown."""
    policy = POLICY_NAMES[word & 3]
    ms = word >> 2
    return policy, None if ms == FOREVER_MS else ms / 1000


def record(frames: list[bytes] | tuple[bytes, ...], word: int = 0) -> bytearray:
    """One record holding ``frames`` (the client's writer fills in its counts)."""
    lens = struct.pack(f"<{len(frames)}I", *map(len, frames))
    body = HEAD - 4 + len(lens) + sum(map(len, frames))
    return bytearray().join((RECORD.pack(body, len(frames), word, 0, 0), lens, *frames))


#: The frame header's fields, in order (csrc/shmbus_frame.h).
FIELDS = (
    "magic",
    "version",
    "type",
    "priority",
    "flags",
    "attempts",
    "sender_id",
    "recipient_id",
    "id",
    "request_id",
    "correlation_id",
    "timestamp_ns",
    "ttl_ms",
    "sender_len",
    "recipient_len",
    "topic_len",
    "payload_len",
    "reserved",
)
TYPE_AT = struct.calcsize(HEADER.format[: 1 + FIELDS.index("type")])  # the type's offset
PRIORITY_AT = struct.calcsize(HEADER.format[: 1 + FIELDS.index("priority")])
LANE_OF = bytes(lane_of(min(p, 100)) for p in range(256))  # by a frame's priority byte


def lane(data: bytes | bytearray, at: int = HEAD) -> int:
    """The lane of the first frame of a record (``at``: where its frame
    lengths start: HEAD in a record as written, 16 in a body as read)."""
    pos = at + 4 * int.from_bytes(data[at - 16 : at - 12], "little") + PRIORITY_AT
    return LANE_OF[data[pos]] if pos < len(data) else 0


def frames_of(data: bytes | bytearray) -> list[bytes]:
    """The frames of a whole record (length prefix included), as built."""
    count = int.from_bytes(data[4:8], "little")
    pos = HEAD + 4 * count
    out = []
    for length in memoryview(data)[HEAD : HEAD + 4 * count].cast("I"):
        out.append(bytes(data[pos : pos + length]))
        pos += length
    return out


def merge(bodies: list[bytes]) -> bytes:
    """Records' bodies (as read: no length prefix) as one body, their frames
    in order; every body's lengths must have been checked."""
    if len(bodies) == 1:
        return bodies[0]
    lens, frames = [], []
    for body in bodies:
        count = int.from_bytes(body[:4], "little")
        lens.append(body[16 : 16 + 4 * count])
        frames.append(body[16 + 4 * count :])
    count = sum(len(x) for x in lens) // 4
    return b"".join((RECORD.pack(0, count, 0, 0, 0)[4:], *lens, *frames))
