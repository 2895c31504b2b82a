"""The receive path's C msgpack decoder agrees with msgpack on every payload.

shmbus._decode decodes the common msgpack subset itself and leaves the rest
to msgpack.unpackb; this feeds both random payloads, half of them mutated,
and demands the same value or the same refusal.
"""

from __future__ import annotations

import array
import math
import random

import msgpack
import pytest

from shmbus._decode import decode_block
from shmbus.core.message import CorruptFrame, decode_frame, decode_state, encode_frame

ODD_BYTES = [0xC1, 0xD4, 0xC7, 0xDD, 0xDF, 0xDB, 0xA5, 0x9F, 0x8F, 0xCA, 0xCB, 0xD3]


def _value(rnd: random.Random, depth: int = 0):  # type: ignore[no-untyped-def]
    kind = rnd.randrange(12 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.choice([True, False])
    if kind == 2:
        return rnd.choice(
            [
                0,
                1,
                -1,
                127,
                128,
                -32,
                -33,
                255,
                256,
                65535,
                65536,
                -(2**31),
                2**32,
                2**63 - 1,
                -(2**63),
                2**64 - 1,
            ]
        )
    if kind == 3:
        return rnd.choice([0.0, -1.5, 1e300, float("inf"), float("nan"), 3.25])
    if kind == 4:
        return "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(rnd.randrange(40)))
    if kind == 5:
        return rnd.randbytes(rnd.randrange(300))
    if kind == 6:
        return "x" * rnd.choice([31, 32, 255, 256, 70000])
    if kind == 7:
        return rnd.randrange(-100, 100)
    if kind in (8, 9):
        return [_value(rnd, depth + 1) for _ in range(rnd.choice([0, 1, 5, 15, 16, 20]))]
    keys = ["a", "b", 1, 2.5, None, b"k", True, "x" * 40]
    return {rnd.choice(keys): _value(rnd, depth + 1) for _ in range(rnd.choice([0, 1, 3, 16]))}


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randrange(1, 4)):
        op = rnd.randrange(4)
        if op == 0 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op == 1 and b:
            del b[rnd.randrange(len(b)) :]
        elif op == 2:
            b += rnd.randbytes(rnd.randrange(4))
        elif op == 3:
            b.insert(rnd.randrange(len(b) + 1), rnd.choice(ODD_BYTES))
    return bytes(b)


def _same(a, b) -> bool:  # type: ignore[no-untyped-def]
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("seed", range(4))
def test_c_and_msgpack_agree_on_random_and_mutated_payloads(seed):
    rnd = random.Random(seed)
    state = decode_state()
    frames, wanted = [], []
    for _ in range(1500):
        payload = msgpack.packb(_value(rnd), use_bin_type=True)
        if rnd.random() < 0.5:
            payload = _mutate(rnd, payload)
        frame = encode_frame(1, sender=b"s", recipient=b"r", payload=payload, msg_id=1)
        frames.append(frame)
        try:
            wanted.append(decode_frame(frame).payload)
        except CorruptFrame:
            wanted.append(CorruptFrame)
    got = decode_block(b"".join(frames), array.array("I", map(len, frames)), len(frames), state)
    for want, item in zip(wanted, got, strict=True):
        if want is CorruptFrame:
            assert type(item) is str
        else:
            assert type(item) is not str and _same(item.payload, want), (item, want)
