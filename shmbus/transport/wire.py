"""The uds transport's stream format, shared by the client (uds.py) and the bridge.

After a hello (one control-format message each way, shmbus/control.py), both
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

import struct
from typing import Any

import numpy as np

from ..message import HEADER, HEADER_SIZE

RECORD = struct.Struct("<IIIII")  # body length, count, info, taken, granted
COUNTS = struct.Struct("<II")  # taken, granted: at COUNTS_AT in a record
COUNTS_AT = 12
HEAD = RECORD.size
MAX_RECORD = 64 << 20  # a record's body; frames of up to an inbox's max_frame fit
MAX_COUNT = 1 << 16
POLICY_CODES = {"block": 0, "error": 1, "drop": 2}
POLICY_NAMES = {v: k for k, v in POLICY_CODES.items()}
FOREVER_MS = (1 << 30) - 1
MASK = 0xFFFFFFFF


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


#: The frame header (csrc/shmbus_frame.h) as a numpy record, for checking and
#: building many frames at once; its layout comes from the C struct's format.
FIELDS = ("magic", "version", "type", "priority", "flags", "attempts", "sender_id",
          "recipient_id", "id", "request_id", "correlation_id", "timestamp_ns", "ttl_ms",
          "sender_len", "recipient_len", "topic_len", "payload_len", "reserved")  # fmt: skip
HEADER_DTYPE = np.dtype(
    [(f, "<" + c) for f, c in zip(FIELDS, HEADER.format.lstrip("<"), strict=True)]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE
_COLS = np.arange(HEADER_SIZE)


def headers(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The headers of the frames at ``offsets`` in ``buf`` (uint8), as HEADER_DTYPE records."""
    return buf[offsets[:, None] + _COLS].view(HEADER_DTYPE).reshape(len(offsets))


def strided(body: bytes, at: int, count: int, size: int, dtype: Any, width: int = 1) -> Any:
    """A view of ``count`` frames of ``size`` bytes each from ``at``: their headers
    (dtype HEADER_DTYPE) or ``width`` bytes of each (uint8), with no copy."""
    shape, strides = ((count,), (size,)) if width == 1 else ((count, width), (size, 1))
    return np.ndarray(shape, dtype, buffer=body, offset=at, strides=strides)


def offsets(first: int, lens: np.ndarray) -> np.ndarray:
    """Where each frame starts, frames back to back from ``first``."""
    out = np.empty(len(lens), np.int64)
    out[0] = first
    np.cumsum(lens[:-1], out=out[1:])
    out[1:] += first
    return out


def build(
    hdr: np.ndarray, names: bytes, blob: bytes, plens: np.ndarray
) -> tuple[bytes, np.ndarray]:
    """Frames back to back (header, names, payload) and their lengths, built in a few
    numpy calls: ``hdr`` holds every header, ``names`` is the same for all."""
    n, nl = len(hdr), len(names)
    flens = (HEADER_SIZE + nl + plens).astype("<u4")
    data = np.frombuffer(blob, np.uint8)
    if n and (plens == plens[0]).all():  # all of one size: a 2-D fill, no index arrays
        out = np.empty((n, int(flens[0])), np.uint8)
        out[:, :HEADER_SIZE] = hdr.view(np.uint8).reshape(n, HEADER_SIZE)
        out[:, HEADER_SIZE : HEADER_SIZE + nl] = np.frombuffer(names, np.uint8)
        out[:, HEADER_SIZE + nl :] = data.reshape(n, int(plens[0]))
        return out.tobytes(), flens
    total = int(flens.sum())
    out = np.empty(total, np.uint8)
    starts = offsets(0, flens)
    out[starts[:, None] + _COLS] = hdr.view(np.uint8).reshape(n, HEADER_SIZE)
    if nl:
        out[starts[:, None] + HEADER_SIZE + np.arange(nl)] = np.frombuffer(names, np.uint8)
    if len(data):
        pstarts = offsets(0, plens)
        shift = np.repeat(starts + HEADER_SIZE + nl - pstarts, plens)
        out[shift + np.arange(len(data))] = data
    return out.tobytes(), flens


def record_of(blob: bytes, flens: np.ndarray, word: int = 0) -> bytearray:
    """One record of frames already back to back in ``blob``."""
    body = HEAD - 4 + 4 * len(flens) + len(blob)
    return bytearray().join((RECORD.pack(body, len(flens), word, 0, 0), flens.tobytes(), blob))


def split(blob: bytes, flens: np.ndarray) -> list[bytes]:
    out, pos = [], 0
    for n in flens.tolist():
        out.append(blob[pos : pos + n])
        pos += n
    return out
