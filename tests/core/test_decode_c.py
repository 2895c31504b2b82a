"""shmbus._decode against shmbus.core.message.decode_frame: the same Messages, the same refusals.

Frames come from other processes, so the C decoder is fed valid, damaged and
hostile frames here. Where Python raises CorruptFrame, C must put a str in that
place; everywhere else both must build equal Messages, payload types included.
Whatever could crash the interpreter (argument abuse, reads past the buffer,
caught with PROT_NONE guard pages) runs in a child process, so a segfault fails
a test instead of ending the run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
import subprocess
import sys
import threading
from array import array
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shmbus.core.message as m
from shmbus._decode import decode_block
from shmbus.core.message import (
    HEADER,
    HEADER_SIZE,
    Message,
    MessageType,
    decode_frame,
    decode_state,
    encode_frame,
    encode_message,
)
from shmbus.errors import CorruptFrame


def fuzz(examples: int) -> settings:
    """Fixed examples (derandomized), so a run is repeatable and its time known."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ------------------------------------------------------------ comparing


def bits(a: np.ndarray | np.generic) -> Any:
    """An array's or a numpy scalar's values, exact (NaN, NaT, -0.0); field by
    field when structured, since ndarray.copy() leaves alignment padding undefined."""
    if a.dtype.names:
        return [bits(a[name]) for name in a.dtype.names]
    return a.tobytes()


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down; floats and arrays bit for bit.
    Iterative, because a valid payload may nest a thousand lists deep."""
    todo = [(a, b)]
    while todo:
        a, b = todo.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, np.ndarray):
            if not (
                a.dtype == b.dtype
                and a.shape == b.shape
                and a.flags.writeable == b.flags.writeable
                and bits(a) == bits(b)
            ):
                return False
        elif isinstance(a, np.generic):
            if not (a.dtype == b.dtype and bits(a) == bits(b)):
                return False
        elif type(a) is float:  # NaN equals NaN here, and -0.0 differs from 0.0
            if struct.pack("<d", a) != struct.pack("<d", b):
                return False
        elif type(a) in (list, tuple, dict):
            if len(a) != len(b):
                return False
            if type(a) is dict:  # keys in order, with their types
                todo += zip(a.keys(), b.keys(), strict=True)
                todo += zip(a.values(), b.values(), strict=True)
            else:
                todo += zip(a, b, strict=True)
        elif a != b:
            return False
    return True


def same_message(got: Any, want: Message) -> bool:
    return (
        type(got) is Message
        and len(got) == len(want)
        and got.type is want.type
        and all(map(same, got, want))
    )


def py_decode(frame: bytes) -> Message | CorruptFrame:
    try:
        return decode_frame(frame)
    except CorruptFrame as e:
        return e


def c_decode(frames: list[bytes], slack: bytes = b"", state: tuple | None = None) -> list:
    """decode_block over ``frames`` back to back in a scratch with ``slack`` after them."""
    scratch = bytearray(b"".join(frames) + slack)
    out = decode_block(scratch, array("I", map(len, frames)), len(frames), state or decode_state())
    # Nothing may still point into the scratch, which the ring reuses: a
    # leftover export would make this resize fail, a borrowed view would
    # change the payloads checked afterwards.
    scratch[:] = b"\xa5" * (len(scratch) + 1)
    return out


def check_block(frames: list[bytes], slack: bytes = b"") -> list[Message | CorruptFrame]:
    """C on the block and Python frame by frame, each from an empty names cache
    (which decides nothing by itself but is shared by both)."""
    m._names.clear()
    got = c_decode(frames, slack)
    m._names.clear()
    want = [py_decode(f) for f in frames]
    assert len(got) == len(frames)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, CorruptFrame):
            assert type(g) is str and g, f"frame {i}: Python refused ({w}), C gave {g!r}"
        else:
            assert same_message(g, w), f"frame {i}: C {g!r} != Python {w!r}"
    return want


# ----------------------------------------------------------- strategies

U64 = st.integers(0, 2**64 - 1)
INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(
    [0, -1, 1, 127, 128, -32, -33, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1]
)
FLOATS = st.floats() | st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf")])
# Every limit exactly: 255-byte names, 1024-byte topics, in 1- to 4-byte characters.
NAMES = st.text(max_size=30) | st.sampled_from(
    ["", "wörker-2", "日本語", "🙂" * 63, "é" * 127 + "a"]
)
TOPICS = (
    st.text(max_size=60)
    | st.sampled_from(["", "a.b.c", "ß" * 512, "x" * 1024, "🙂" * 256])
    | st.text(min_size=1, max_size=10).map(lambda s: ".".join([s] * 3))
)

PLAIN_DTYPES = (
    hnp.scalar_dtypes() | hnp.byte_string_dtypes(max_len=4) | hnp.unicode_string_dtypes(max_len=4)
)
# Structured dtypes, nested and padded, but with plain field names and no
# subarray fields (those have a test of their own below).
FIELDS = st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
STRUCTURED = st.recursive(
    PLAIN_DTYPES,
    lambda inner: FIELDS.flatmap(
        lambda names: st.tuples(*[inner] * len(names), st.booleans()).map(
            lambda t: np.dtype(list(zip(names, t[:-1], strict=True)), align=t[-1])
        )
    ),
    max_leaves=4,
)
DTYPES = PLAIN_DTYPES | STRUCTURED
ARRAYS = DTYPES.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
)
NP_SCALARS = DTYPES.flatmap(lambda dt: hnp.arrays(dt, ())).map(lambda a: a[()])
KEYS = st.text(max_size=6) | INTS | st.binary(max_size=4) | st.none() | st.booleans()
LEAVES = (
    st.none()
    | st.booleans()
    | INTS
    | FLOATS
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | ARRAYS
    | NP_SCALARS
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(KEYS, inner, max_size=4)
    ),
    max_leaves=10,
)
# bytes and bytearray at the top travel raw, without msgpack.
PAYLOADS = VALUES | st.binary(max_size=64) | st.binary(max_size=16).map(bytearray)

MESSAGES = st.builds(
    Message,
    id=U64,
    type=st.sampled_from(MessageType),
    sender=NAMES,
    recipient=NAMES,
    topic=TOPICS,
    request_id=U64,
    payload=PAYLOADS,
    priority=st.integers(0, 100),
    timestamp=st.floats(-9e9, 9e9) | st.sampled_from([0.0, 1_700_000_000.123456789, -0.5]),
    correlation_id=U64,
    attempts=st.integers(0, 0xFFFF),
    requires_ack=st.booleans(),
    ttl=st.none() | st.floats(0, 4_000_000) | st.just(4294967.295),
)


@st.composite
def raw_frames(draw: st.DrawFn) -> bytes:
    """Valid frames with every header number at its full range (timestamps
    before 1970, flag bits nobody defined), which encode_message never makes."""
    flags = draw(st.integers(0, 255))
    if flags & m.FLAG_RAW:
        payload = draw(st.binary(max_size=32))
    else:
        # A bytes value packs raw: the frame must say so, or it is not valid.
        payload, raw = m.pack_payload(draw(VALUES))
        flags |= raw
    return encode_frame(
        draw(st.sampled_from([int(t) for t in MessageType])),
        sender=draw(NAMES).encode(),
        recipient=draw(NAMES).encode(),
        topic=draw(TOPICS).encode(),
        payload=payload,
        flags=flags,
        msg_id=draw(U64),
        request_id=draw(U64),
        correlation_id=draw(U64),
        priority=draw(st.integers(0, 100)),
        attempts=draw(st.integers(0, 0xFFFF)),
        sender_id=draw(st.integers(0, 2**32 - 1)),
        recipient_id=draw(st.integers(0, 2**32 - 1)),
        timestamp_ns=draw(st.integers(-(2**63), 2**63 - 1)),
        ttl_ms=draw(st.integers(0, 2**32 - 1)),
    )


VALID_FRAMES = MESSAGES.map(encode_message) | raw_frames()


# --------------------------------------------------------- valid frames


@fuzz(150)
@given(msgs=st.lists(MESSAGES, min_size=1, max_size=5), slack=st.binary(max_size=8))
def test_valid_messages_decode_as_decode_frame_decodes_them(msgs, slack):
    want = check_block([encode_message(msg) for msg in msgs], slack)
    assert all(isinstance(w, Message) for w in want)


@fuzz(150)
@given(frames=st.lists(raw_frames(), min_size=1, max_size=4))
def test_every_header_value_decodes_as_decode_frame_decodes_it(frames):
    # Mostly valid frames; an empty payload without the raw flag is not
    # msgpack, and both decoders must refuse it alike (check_block checks).
    check_block(frames)


def test_timestamps_and_ttls_at_their_extremes_are_the_same_floats():
    frames = [
        encode_frame(1, sender=b"t", timestamp_ns=ns, ttl_ms=ttl)
        for ns in (
            0,
            1,
            -1,
            999_999_999,
            -999_999_999,
            -1_000_000_000,
            2**63 - 1,
            -(2**63),
            1_700_000_000_123_456_789,
            -1_700_000_000_123_456_789,
        )
        for ttl in (0, 1, 999, 2**32 - 1)
    ]
    check_block(frames)


def test_an_empty_block_is_an_empty_list():
    assert decode_block(b"", array("I"), 0, decode_state()) == []
    assert decode_block(b"junk", array("I", [5, 6]), 0, decode_state()) == []


def test_payloads_are_fresh_objects_not_views_of_the_scratch():
    arr = np.arange(6, dtype="<i4").reshape(2, 3)
    frames = [
        encode_message(Message(sender="a", payload=b"raw bytes")),
        encode_message(Message(sender="a", payload={"a": arr, "b": b"bin", "s": np.int16(7)})),
    ]
    raw, packed = c_decode(frames)  # c_decode overwrites the scratch afterwards
    assert raw.payload == b"raw bytes"
    assert same(packed.payload, {"a": arr, "b": b"bin", "s": np.int16(7)})
    assert packed.payload["a"].flags.writeable


# ------------------------------------------------------- damaged frames


def hostile_payloads() -> list[bytes]:
    """msgpack a sender could never produce, aimed at the decoder's bounds."""
    ext = msgpack.ExtType

    def nd(*parts: Any) -> bytes:
        return msgpack.packb(ext(1, msgpack.packb(list(parts))))

    def sc(*parts: Any) -> bytes:
        return msgpack.packb(ext(2, msgpack.packb(list(parts))))

    big = 2**64 - 1
    return [
        b"",
        b"\xc1",
        b"\x01\x02",
        b"\x92\x01",
        b"\xdb\xff\xff\xff\xff",
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xffab",
        b"\xa5ab",
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\x91" * 5000 + b"\xc0",
        b"\x91" * 1023 + b"\xc0",
        b"\x91" * 1025 + b"\xc0",
        b"\x81\xc0" * 3000 + b"\xc0",
        b"\x81\x91\x01\x02",  # map with a list key: unhashable
        b"\x81\x80\x01",  # map with a map key
        b"\x91" * 900 + nd("<f8", [1], b"\0" * 8),  # arrays deep inside nesting
        msgpack.packb(ext(42, b"?")),
        b"\xd6\xff" + b"\0" * 4,  # a msgpack Timestamp: fine
        b"\xd7\xff" + b"\xff" * 8,
        b"\xc7\x0c\xff" + b"\xff" * 12,  # timestamps out of range
        b"\xc7\x05\xff" + b"\0" * 5,
        b"\xc7\x00\x80",  # reserved negative codes
        msgpack.packb(ext(1, b"")),
        msgpack.packb(ext(1, b"\xc1")),
        msgpack.packb(ext(2, b"")),
        msgpack.packb(ext(1, msgpack.packb(ext(1, b"")))),  # ext inside ext data
        nd("<f8", [1000], b"short"),
        nd("<f8", [-1], b""),
        nd("<f8", [big], b""),
        nd("<f8", [2**32, 2**32], b""),
        nd("<f8", [3, 6148914691236517206], b"\0" * 16),
        nd("<f8", [1] * 33, b"\0" * 8),
        nd("<f8", [True], b"\0" * 8),
        nd("<f8", [1.0], b"\0" * 8),
        nd("<f8", 1, b"\0" * 8),
        nd("<f8", [1], "not bytes"),
        nd("<f8", [1]),
        nd("<f8"),
        nd("|O", [1], b"\0" * 8),
        nd("bogus", [1], b"\0"),
        nd(None, [1], b"\0"),
        nd(7, [0], b""),
        nd("V0", [2**40], b""),
        nd("S0", [5], b""),
        nd("(0,)f8", [2**40], b""),
        nd("V2000000000", [0], b""),
        nd("(2147483647,2147483647)f8", [0], b""),
        nd("(3,)<i4", [2], b"\0" * 24),
        nd("<M8[ns]", [1], b"\0" * 8),
        nd("<U1", [1], b"\xff" * 4),
        nd([["a", "<f8", [2**31, 2**31]]], [0], b""),
        nd([], [2**40], b""),
        nd([["", "V0"]], [2**40], b""),
        nd([["o", "|O"]], [1], b"\0" * 8),
        nd([["a", "<i4"], ["a", "<i4"]], [1], b"\0" * 8),
        nd([["a"]], [1], b""),
        nd([[1, "<i4"]], [1], b"\0" * 4),
        nd([[["x", "y"], "<i4"]], [1], b"\0" * 4),
        nd([["a", [["b", [["c", "<i2"]]]]]], [2], b"\0" * 4),
        nd(eval("[" * 200 + "]" * 200), [0], b""),  # a descr nested far too deep
        sc("<f8", b"\0"),
        sc("<f8", b"\0" * 8),
        sc("|O", b"\0" * 8),
        sc("V0", b""),
        sc("S0", b""),
        sc("(2,)f8", b"\0" * 16),
        sc("<f8", "str"),
        sc("<f8"),
        sc([], b""),
        sc([["x", "<u2"]], b"\1\2"),
    ]


def damage_header(frame: bytes, field: int, value: int) -> bytes:
    fields = list(HEADER.unpack_from(frame))
    fields[field] = value
    return HEADER.pack(*fields) + frame[HEADER_SIZE:]


DESCRS = (
    st.sampled_from(
        [
            "<f8",
            ">i2",
            "|b1",
            "<c16",
            "S3",
            "<U2",
            "V4",
            "|O",
            "S0",
            "V0",
            "<M8[s]",
            "(2,)<i4",
            "(0,)f8",
            "(99999999999,)u1",
            "f9",
            "",
            "<f8 ",
            "O8",
        ]
    )
    | st.text(max_size=6)
    | st.lists(
        st.tuples(st.text(max_size=3), st.sampled_from(["<f8", "|u1", "|O", "V0", "S0"])),
        max_size=3,
    )
    | st.none()
    | INTS
)
SHAPES = st.lists(st.integers(-2, 5) | INTS | st.booleans() | st.none(), max_size=4) | INTS
FIELD_LIMITS = [2 ** (8 * struct.calcsize("<" + c)) for c in HEADER.format.lstrip("<")]


@st.composite
def damaged_frames(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(st.binary(max_size=120))
    if choice == 1:  # a header that adds up, names that need not be UTF-8
        return encode_frame(
            draw(st.integers(1, 10)),
            sender=draw(st.binary(max_size=8)),
            recipient=draw(st.binary(max_size=8)),
            topic=draw(st.binary(max_size=8)),
            payload=b"\xc0",
        )
    if choice == 2:  # a header that adds up, any payload bytes
        return encode_frame(1, sender=b"s", payload=draw(st.binary(max_size=64)))
    if choice == 3:
        return encode_frame(2, sender=b"s", topic=b"t", payload=draw(st.sampled_from(HOSTILE)))
    if choice == 4:  # a numpy extension with any dtype, shape and data
        parts = [draw(DESCRS), draw(SHAPES), draw(st.binary(max_size=40))]
        code = draw(st.sampled_from([1, 2]))
        if code == 2:
            del parts[1]
        del parts[draw(st.integers(0, len(parts))) :]  # sometimes too few parts
        ext = msgpack.ExtType(code, msgpack.packb(parts))
        return encode_frame(1, sender=b"s", payload=msgpack.packb([ext]))
    frame = bytearray(draw(VALID_FRAMES))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 4))
        if op == 0:
            del frame[draw(st.integers(0, len(frame))) :]
        elif op == 1:
            frame += draw(st.binary(min_size=1, max_size=16))
        elif op == 2 and frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
        elif op == 3 and len(frame) >= HEADER_SIZE:
            field = draw(st.integers(0, len(FIELD_LIMITS) - 1))
            value = draw(st.integers(0, FIELD_LIMITS[field] - 1) | st.integers(0, 3))
            if field == 11:
                value -= 2**63  # the timestamp is signed
            frame = bytearray(damage_header(bytes(frame), field, max(value, -(2**63))))
        elif op == 4 and frame:
            at = draw(st.integers(0, len(frame)))
            frame[at : at + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
    return bytes(frame)


HOSTILE = hostile_payloads()


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_hostile_payloads_are_refused_or_decoded_exactly_as_python_does(index):
    check_block([encode_frame(1, sender=b"evil", payload=HOSTILE[index])])


@fuzz(500)
@given(frame=damaged_frames())
def test_a_damaged_frame_is_a_str_exactly_where_decode_frame_refuses_it(frame):
    check_block([frame])


@fuzz(200)
@given(
    before=st.lists(VALID_FRAMES, max_size=2),
    bad=st.lists(damaged_frames(), min_size=1, max_size=3),
    after=st.lists(VALID_FRAMES, max_size=2),
)
def test_corrupt_frames_between_valid_ones_leave_the_others_decoded(before, bad, after):
    want = check_block(before + bad + after)
    kept = want[: len(before)] + want[len(before) + len(bad) :]
    assert all(isinstance(w, Message) for w in kept)


def test_every_header_byte_flipped_to_every_kind_of_value():
    base = encode_message(
        Message(
            id=5,
            type=MessageType.REQUEST,
            sender="wörker",
            recipient="b",
            topic="",
            payload={"k": [1, 2]},
            priority=100,
            timestamp=1.5,
            attempts=1,
            ttl=2.0,
            requires_ack=True,
        )
    )
    frames = [base]
    for at in range(HEADER_SIZE):
        for value in {0, 1, 0x7F, 0x80, 0xFF, base[at] ^ 1, base[at] ^ 0xFF}:
            frames.append(base[:at] + bytes([value]) + base[at + 1 :])
    for cut in range(len(base)):
        frames.append(base[:cut])
    want = check_block(frames)
    assert isinstance(want[0], Message) and isinstance(want[-1], CorruptFrame)


def test_reasons_for_bad_headers_are_the_ones_decode_frame_gives():
    good = encode_frame(1, sender=b"a", payload=b"\xc0")
    frames = [
        b"",
        b"x" * 63,
        bytes(64),
        damage_header(good, 1, 2),
        damage_header(good, 0, 0x1234),
        good + b"!",
        damage_header(good, 2, 0),
        damage_header(good, 3, 101),
        damage_header(good, 15, 1025),
        encode_frame(1, sender=b"\xff", payload=b"\xc0"),
    ]
    m._names.clear()
    got = c_decode(frames)
    assert got == [str(py_decode(f)) for f in frames]


def test_reasons_for_bad_payloads_name_what_decode_frame_names():
    frames = [encode_frame(1, sender=b"a", payload=p) for p in (b"\x92\x01", b"\x01\x02")]
    frames.append(encode_frame(1, sender=b"a", payload=msgpack.packb(msgpack.ExtType(9, b""))))
    m._names.clear()
    for frame, got in zip(frames, c_decode(frames), strict=True):
        assert str(py_decode(frame)) in got


@pytest.mark.parametrize(
    "dtype",
    [[("a", "<i4", (2,))], [(("title", "f"), "<f8")], [("a", [("b", "<u2")], (2, 1))]],
    ids=["subarray", "title", "nested-subarray"],
)
def test_structured_dtypes_with_subarrays_or_titles_are_carried(dtype):
    arr = np.zeros(2, dtype=dtype)
    frame = encode_message(Message(sender="a", payload=[arr, arr[0]]))
    want = check_block([frame])[0]
    assert isinstance(want, Message) and same(want.payload, [arr, arr[0]])


# ---------------------------------------------------------- names cache


def test_more_distinct_topics_than_the_names_cache_holds_all_decode():
    count = m._MAX_NAMES * 2 + 17
    frames = [
        encode_message(Message(type=MessageType.PUBLISH, sender="pub", topic=f"t.{i}", payload=i))
        for i in range(count)
    ]
    want = check_block(frames)  # one block of every frame
    assert [w.topic for w in want] == [f"t.{i}" for i in range(count)]
    for start in range(0, count, 1000):  # and block by block, from a cache left as it is
        got = decode_block(
            b"".join(frames[start : start + 1000]),
            array("I", map(len, frames[start : start + 1000])),
            len(frames[start : start + 1000]),
            decode_state(),
        )
        assert [g.topic for g in got] == [f"t.{i}" for i in range(start, start + len(got))]
        assert len(m._names) <= m._MAX_NAMES


def test_a_names_cache_limit_of_one_still_decodes_every_frame():
    state = decode_state()
    cache: dict = {}
    state = state[:2] + (cache,) + state[3:5] + (1,)
    frames = [
        encode_message(Message(sender=f"s{i % 3}", recipient="r", payload=i)) for i in range(9)
    ]
    got = decode_block(b"".join(frames), array("I", map(len, frames)), len(frames), state)
    assert [(g.sender, g.payload) for g in got] == [(f"s{i % 3}", i) for i in range(9)]
    assert len(cache) == 1


def test_threads_decoding_at_once_share_the_names_cache_safely():
    # ext_hook is Python code, so threads switch in the middle of a block, and
    # one may clear the shared cache while another is between lookup and use.
    count = m._MAX_NAMES + 300
    frames = [
        encode_message(
            Message(type=MessageType.PUBLISH, sender=f"s{i}", topic=f"t.{i}", payload=np.full(2, i))
        )
        for i in range(count)
    ]
    scratch, lens = b"".join(frames), array("I", map(len, frames))
    failures: list[str] = []

    def work() -> None:
        for _ in range(2):
            got = decode_block(scratch, lens, count, decode_state())
            if [(g.sender, g.topic, int(g.payload[1])) for g in got] != [
                (f"s{i}", f"t.{i}", i) for i in range(count)
            ]:
                failures.append("wrong decode")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        sys.setswitchinterval(old)
    assert not failures and not any(thread.is_alive() for thread in threads)


def test_names_that_split_the_same_bytes_differently_stay_apart():
    pairs = [("ab", "c", ""), ("a", "bc", ""), ("", "abc", ""), ("a", "", "bc"), ("é", "", "")]
    frames = [
        encode_message(Message(sender=s, recipient=r, topic=t, payload=None)) for s, r, t in pairs
    ]
    # b"\xc3" + b"\xa9" is "é" whole, but neither half is UTF-8
    frames.append(encode_frame(1, sender=b"\xc3", recipient=b"\xa9", payload=b"\xc0"))
    m._names.clear()
    got = c_decode(frames)
    assert [g[2:5] for g in got[:-1]] == pairs and type(got[-1]) is str
    m._names.clear()
    assert [decode_frame(f)[2:5] for f in frames[:-1]] == pairs
    with pytest.raises(CorruptFrame):
        decode_frame(frames[-1])


# ------------------------------------------------ crashes, in a child


PROT_NONE = 0  # the mmap module has PROT_READ and PROT_WRITE but not this


def guarded(data: bytes | array, at_end: bool = True) -> memoryview:
    """``data`` in an mmap between two PROT_NONE pages, touching the one after
    it (``at_end``) or the one before it: a read past either edge faults.
    The pages holding it are read-only, so a write into the scratch faults too."""
    data = bytes(data)
    page = mmap.PAGESIZE
    pages = max(1, -(-len(data) // page))
    area = mmap.mmap(-1, (pages + 2) * page)
    start = page + (pages * page - len(data) if at_end else 0)
    area[start : start + len(data)] = data
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for offset, size, prot in (
        (0, page, PROT_NONE),
        (page, pages * page, mmap.PROT_READ),
        ((pages + 1) * page, page, PROT_NONE),
    ):
        assert mprotect(base + offset, size, prot) == 0, os.strerror(ctypes.get_errno())
    return memoryview(area)[start : start + len(data)]


def corpus(seed: int) -> list[bytes]:
    """Valid frames, every truncation and extension of them, their header bytes
    set to every value class, random pokes and the hostile payloads."""
    rng = random.Random(seed)
    bases = [
        encode_message(Message(id=1, sender="a", recipient="日本", payload=None)),
        encode_message(
            Message(
                type=MessageType.PUBLISH,
                sender="p",
                topic="x" * 1024,
                payload={"a": np.arange(5.0), 1: [b"b", None]},
            )
        ),
        encode_message(Message(sender="é" * 127, payload=b"\0raw" * 9, ttl=1.0)),
        encode_message(Message(sender="s", payload=np.zeros((2, 2), dtype=[("q", "<u2")]))),
        encode_frame(3, sender=b"", payload=b""),
    ]
    frames = list(bases)
    for base in bases:
        frames += [base[:cut] for cut in range(len(base))]
        frames += [base + rng.randbytes(k) for k in (1, 2, 7)]
        for at in range(HEADER_SIZE):
            frames += [base[:at] + bytes([v]) + base[at + 1 :] for v in (0, 0xFF, base[at] ^ 1)]
        for _ in range(100):
            poked = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                poked[rng.randrange(len(poked))] = rng.randrange(256)
            frames.append(bytes(poked))
    frames += [encode_frame(1, sender=b"e", payload=p) for p in HOSTILE]
    frames += [rng.randbytes(rng.randrange(200)) for _ in range(200)]
    return frames


def child_decodes_guarded_frames() -> None:
    state = decode_state()
    frames = corpus(1)
    for frame in frames:
        for at_end in (True, False):
            m._names.clear()
            one = array("I", [len(frame)]).tobytes()
            got = decode_block(guarded(frame, at_end), guarded(one), 1, state)
            m._names.clear()
            want = py_decode(frame)
            assert (
                type(got[0]) is str
                if isinstance(want, CorruptFrame)
                else same_message(got[0], want)
            )
    for start in range(0, len(frames), 500):  # in blocks, lens also against a guard
        block = frames[start : start + 500]
        m._names.clear()
        got = decode_block(
            guarded(b"".join(block)),
            guarded(array("I", map(len, block)).tobytes()),
            len(block),
            state,
        )
        assert len(got) == len(block)
    print("ok", len(frames))


def child_abuses_arguments() -> None:
    """Each case must raise ValueError, TypeError, OverflowError or BufferError, nothing worse."""
    state = decode_state()
    frame = encode_frame(1, sender=b"a", payload=b"\xc0")
    one = array("I", [len(frame)])
    g_frame, g_one = guarded(frame), guarded(one.tobytes())
    cls, types, names, unpackb, kwargs, limit = state
    cases = {
        "count past lens": (frame, one, 2, state),
        "count past guarded lens": (g_frame, g_one, 2, state),
        "count 2**62 wraps count*4": (frame, one, 2**62, state),
        "count 2**62+1": (frame, one, 2**62 + 1, state),
        "count maxsize": (frame, one, sys.maxsize, state),
        "count -1": (frame, one, -1, state),
        "count -2**63": (frame, one, -(2**63), state),
        "count 2**64": (frame, one, 2**64, state),
        "count a float": (frame, one, 1.0, state),
        "lens past scratch": (frame, array("I", [len(frame) + 1]), 1, state),
        "lens past guarded scratch": (g_frame, guarded(array("I", [len(frame) + 1])), 1, state),
        "lens 2**32-1": (frame, array("I", [2**32 - 1]), 1, state),
        "lens sum past scratch": (frame + frame, array("I", [len(frame)] * 3), 3, state),
        "lens wrap": (frame, array("I", [len(frame), 2**32 - len(frame)]), 2, state),
        "lens 3 bytes": (frame, b"\0\0\0", 1, state),
        "lens a list": (frame, [len(frame)], 1, state),
        "lens not contiguous": (frame, memoryview(array("I", [len(frame)] * 4))[::2], 2, state),
        "scratch a str": ("x" * 80, one, 1, state),
        "scratch None": (None, one, 1, state),
        "state None": (frame, one, 1, None),
        "state a list": (frame, one, 1, list(state)),
        "state short": (frame, one, 1, state[:5]),
        "state long": (frame, one, 1, (*state, 0)),
        "class not a type": (frame, one, 1, (1, types, names, unpackb, kwargs, limit)),
        "class not a tuple": (frame, one, 1, (dict, types, names, unpackb, kwargs, limit)),
        "types short": (frame, one, 1, (cls, types[:255], names, unpackb, kwargs, limit)),
        "types a list": (frame, one, 1, (cls, list(types), names, unpackb, kwargs, limit)),
        "names a list": (frame, one, 1, (cls, types, [], unpackb, kwargs, limit)),
        "unpackb not callable": (frame, one, 1, (cls, types, names, 5, kwargs, limit)),
        "kwargs a list": (frame, one, 1, (cls, types, names, unpackb, [], limit)),
        "limit 0": (frame, one, 1, (cls, types, names, unpackb, kwargs, 0)),
        "limit -1": (frame, one, 1, (cls, types, names, unpackb, kwargs, -1)),
        "limit a str": (frame, one, 1, (cls, types, names, unpackb, kwargs, "9")),
        "limit 2**70": (frame, one, 1, (cls, types, names, unpackb, kwargs, 2**70)),
    }
    for label, args in cases.items():
        try:
            decode_block(*args)
        except (ValueError, TypeError, OverflowError, BufferError):
            continue
        except BaseException as e:
            raise AssertionError(f"{label}: {type(e).__name__}: {e}") from None
        raise AssertionError(f"{label}: no error")
    # Not an error: a block of frames whose lengths are fine but sum to less.
    assert len(decode_block(frame + frame, one, 1, state)) == 1
    print("ok", len(cases))


def child_bad_cache_entry() -> None:
    """A names cache holding something other than a (sender, recipient, topic)
    tuple under a frame's key: ignored and replaced, never trusted."""
    cls, types, _, unpackb, kwargs, limit = decode_state()
    frame = encode_frame(1, sender=b"a", payload=b"\xc0")
    key = frame[52:56] + frame[64:65]
    for entry in (5, (), ("a",), None, (1, 2, 3, 4)):
        cache = {key: entry}
        state = (cls, types, cache, unpackb, kwargs, limit)
        (msg,) = decode_block(frame, array("I", [len(frame)]), 1, state)
        assert msg.sender == "a" and cache[key] == ("a", "", ""), entry
    print("ok")


def run_child(function: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        f"import tests.core.test_decode_c as t; t.{function}()"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{function} hung")
    assert done.returncode == 0, f"{function} exited with {done.returncode}:\n{done.stderr[-3000:]}"
    assert done.stdout.startswith("ok")


def test_frames_against_guard_pages_decode_without_reading_past_them():
    run_child("child_decodes_guarded_frames")


def test_bad_arguments_raise_python_errors_not_crashes():
    run_child("child_abuses_arguments")


def test_a_names_cache_with_a_wrong_entry_is_replaced_not_trusted():
    run_child("child_bad_cache_entry")
