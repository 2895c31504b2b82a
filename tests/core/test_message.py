"""Frames and payloads: the C header layout, round trips, refusals, hostile frames."""

from __future__ import annotations

import pickle
import struct
from datetime import datetime

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shmbus
from shmbus._native import ffi, lib
from shmbus.core.message import (
    HEADER,
    HEADER_SIZE,
    Message,
    MessageType,
    PayloadPacker,
    decode_frame,
    encode_frame,
    encode_message,
    pack_payload,
    unpack_payload,
)


def test_python_header_layout_is_the_c_struct():
    out = ffi.new("uint32_t[]", 32)
    n = lib.shmbus_frame_offsets(out, 32)
    *offsets, size = list(out)[:n]
    assert size == HEADER.size == HEADER_SIZE == 64
    # Offsets of the struct format's fields, computed by struct itself.
    fmt = HEADER.format.lstrip("<")
    python_offsets = [struct.calcsize("<" + fmt[:i]) for i in range(len(fmt))]
    assert python_offsets == offsets


def message(payload, **kw):
    fields = dict(
        id=(7 << 40) | 12345,
        type=MessageType.DIRECT,
        sender="worker-1",
        recipient="wörker-2",
        topic="",
        request_id=99,
        payload=payload,
        priority=50,
        timestamp=1_700_000_000.25,
        correlation_id=3,
        attempts=2,
        requires_ack=True,
        ttl=5.0,
    )
    fields.update(kw)
    return Message(**fields)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)

arrays = hnp.arrays(
    dtype=hnp.scalar_dtypes() | hnp.byte_string_dtypes() | hnp.unicode_string_dtypes(),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


@settings(max_examples=300, deadline=None)
@given(payload=msgpack_values)
def test_msgpack_payloads_round_trip(payload):
    msg = message(payload)
    assert decode_frame(encode_message(msg)) == msg


@settings(max_examples=200, deadline=None)
@given(arr=arrays)
def test_numpy_arrays_round_trip_with_dtype_and_shape(arr):
    got = decode_frame(encode_message(message({"a": arr, "n": [arr]}))).payload
    for back in (got["a"], got["n"][0]):
        assert back.dtype == arr.dtype and back.shape == arr.shape
        assert back.tobytes() == arr.tobytes()  # exact, NaN and NaT included
        assert back.flags.writeable


def test_non_contiguous_structured_and_scalar_numpy_values():
    strided = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    structured = np.zeros(3, dtype=[("x", "<f8"), ("tag", "S4")])
    structured["tag"] = b"ab"
    payload = {"s": strided, "r": structured, "f": np.float32(1.5), "i": np.int64(-3)}
    got = decode_frame(encode_message(message(payload))).payload
    assert np.array_equal(got["s"], strided) and got["s"].shape == (4, 3)
    assert got["r"].dtype == structured.dtype and np.array_equal(got["r"], structured)
    assert got["f"] == np.float32(1.5) and type(got["f"]) is np.float32
    assert got["i"] == -3 and type(got["i"]) is np.int64


def test_bytes_payloads_travel_raw():
    data, flags = pack_payload(b"\x00raw")
    assert data == b"\x00raw" and flags == shmbus.core.message.FLAG_RAW
    for raw in (b"abc", bytearray(b"abc"), memoryview(b"abc")):
        assert decode_frame(encode_message(message(raw))).payload == b"abc"


@pytest.mark.parametrize(
    "bad",
    [
        object(),
        {1, 2},
        datetime(2020, 1, 1),
        np.array([object()]),
        {"nested": [object()]},
        np.zeros(2, dtype=[("o", "O")]),
        2**70,
        complex(1, 2),
    ],
    ids=lambda v: type(v).__name__,
)
def test_objects_msgpack_cannot_carry_are_refused_with_their_type(bad):
    with pytest.raises(TypeError) as info:
        pack_payload(bad)
    text = str(info.value)
    if isinstance(bad, np.ndarray):
        assert "dtype" in text and "Python objects" in text
    elif isinstance(bad, int):
        assert "encode" in text
    else:
        culprit = bad["nested"][0] if isinstance(bad, dict) else bad
        assert type(culprit).__qualname__ in text


def test_object_array_refusal_names_the_dtype():
    with pytest.raises(TypeError, match="dtype object"):
        pack_payload(np.array([1, "a"], dtype=object))


def test_unset_fields_and_all_message_types():
    for kind in MessageType:
        msg = Message(type=kind, sender="a", payload=None, ttl=None, requires_ack=False)
        assert decode_frame(encode_message(msg)) == msg


# ------------------------------------------------------- hostile frames


def good_frame() -> bytes:
    return encode_message(message({"k": [1, 2, 3]}))


def test_short_or_foreign_frames_are_corrupt():
    for frame in (b"", b"x" * 63, b"\0" * 64, bytes(64) + b"payload"):
        with pytest.raises(shmbus.CorruptFrame):
            decode_frame(frame)


@pytest.mark.parametrize("field,value", [(13, 200), (14, 255), (15, 9999), (16, 1 << 31)])
def test_lengths_that_do_not_add_up_are_corrupt(field, value):
    fields = list(HEADER.unpack_from(good_frame()))
    fields[field] = value
    frame = HEADER.pack(*fields) + good_frame()[HEADER_SIZE:]
    with pytest.raises(shmbus.CorruptFrame, match="do not add up"):
        decode_frame(frame)


def test_unknown_type_priority_and_bad_utf8_are_corrupt():
    fields = list(HEADER.unpack_from(good_frame()))
    for index, value in ((2, 77), (3, 101)):
        bad = list(fields)
        bad[index] = value
        with pytest.raises(shmbus.CorruptFrame):
            decode_frame(HEADER.pack(*bad) + good_frame()[HEADER_SIZE:])
    frame = encode_frame(1, sender=b"\xff\xfe", payload=b"")
    with pytest.raises(shmbus.CorruptFrame, match="UTF-8"):
        decode_frame(frame)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"\xdb\xff\xff\xff\xff",  # str claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array claiming 4G items
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than the decoder allows
        msgpack.packb(msgpack.ExtType(42, b"?")),  # unknown extension
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<f8", [1000], b"short"]))),
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\0" * 8]))),
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["bogus", [1], b"\0"]))),
        msgpack.packb(msgpack.ExtType(1, msgpack.packb(["<f8", [-1], b""]))),
        msgpack.packb(msgpack.ExtType(1, b"\xc1")),
        msgpack.packb(msgpack.ExtType(2, msgpack.packb(["<f8", b"\0"]))),
        pickle.dumps(object()),  # a pickle is just invalid msgpack here
    ],
)
def test_hostile_payloads_raise_corrupt_frame_not_anything_else(payload):
    with pytest.raises(shmbus.CorruptFrame):
        unpack_payload(payload, 0)
    frame = encode_frame(1, sender=b"evil", payload=payload)
    with pytest.raises(shmbus.CorruptFrame):
        decode_frame(frame)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_random_damage_to_a_frame_decodes_or_raises_corrupt_frame(data):
    frame = bytearray(good_frame())
    for _ in range(data.draw(st.integers(1, 8))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        decode_frame(bytes(frame[:cut] if data.draw(st.booleans()) else frame))
    except shmbus.CorruptFrame:
        pass


def test_fields_a_receiver_would_refuse_are_refused_at_the_sender():
    for kw in (
        {"priority": 101},
        {"priority": -1},
        {"attempts": 70_000},
        {"id": -1},
        {"ttl": 60 * 86400},
    ):
        with pytest.raises(shmbus.InvalidArgument):
            encode_message(message(None, **kw))


def test_a_frame_given_as_a_memoryview_or_bytearray_decodes():
    frame = good_frame()
    assert decode_frame(memoryview(frame)) == decode_frame(bytearray(frame))


def test_payloads_packed_from_many_threads_never_mix():
    import threading

    failures = []

    def work(seed):
        for i in range(1500):
            payload = {"seed": seed, "i": i, "a": np.full(7, seed, dtype=np.int16)}
            got = decode_frame(encode_message(message(payload))).payload
            if got["seed"] != seed or got["i"] != i or not (got["a"] == seed).all():
                failures.append((seed, i))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures


def test_a_message_is_an_immutable_record_with_a_replace():
    msg = Message(id=7, sender="a", payload=np.arange(3))
    with pytest.raises(AttributeError):
        msg.payload = 1  # type: ignore[misc]
    changed = msg._replace(payload=np.arange(4))
    assert changed.id == 7 and changed.payload.shape == (4,) and msg.payload.shape == (3,)
    assert msg == Message(id=7, sender="a", payload=np.arange(3)) and msg != changed
    with pytest.raises(TypeError):
        hash(msg)


# ------------------------------------------- connect(..., default=fn)


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


def _to_msgpack(obj):
    if isinstance(obj, Point):
        return {"x": obj.x, "y": obj.y}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, complex):
        return np.complex128(obj)  # the bus carries numpy scalars itself
    if isinstance(obj, int):
        return str(obj)  # past 64 bits
    raise TypeError(f"no conversion for {type(obj).__name__}")


def test_a_refusal_names_the_type_and_says_default_and_tuples_arrive_as_lists():
    with pytest.raises(TypeError) as info:
        pack_payload({"p": Point(1, 2)})
    assert "Point" in str(info.value) and "default=" in str(info.value)
    data, flags = pack_payload({"t": (1, (2, 3))})
    assert unpack_payload(data, flags) == {"t": [1, [2, 3]]}


def test_default_converts_what_msgpack_cannot_carry_wherever_it_is():
    pack = PayloadPacker(_to_msgpack)
    when = datetime(2020, 1, 2, 3, 4, 5)
    payload = {"p": Point(1, 2), "l": [when, (Point(3, 4),)], "c": 1 + 2j, "big": 2**70}
    got = unpack_payload(*pack(payload))
    assert got == {
        "p": {"x": 1, "y": 2},
        "l": [when.isoformat(), [{"x": 3, "y": 4}]],
        "c": np.complex128(1 + 2j),
        "big": str(2**70),
    }
    assert unpack_payload(*pack(Point(5, 6))) == {"x": 5, "y": 6}  # the payload itself
    arr = np.arange(4)  # numpy stays the bus's own: never handed to default
    assert (unpack_payload(*pack({"a": arr}))["a"] == arr).all()
    assert pack(b"raw") == (b"raw", lib.SHMBUS_FRAME_FLAG_RAW)
    # Without a default, the same payload is refused as before.
    with pytest.raises(TypeError, match="Point"):
        pack_payload(payload)


def test_a_default_that_fails_or_returns_the_unsendable_says_so():
    with pytest.raises(TypeError, match="no conversion for object"):
        PayloadPacker(_to_msgpack)({"o": object()})
    with pytest.raises(TypeError) as info:
        PayloadPacker(lambda obj: obj)({"p": Point(1, 2)})  # handed back as it came
    text = str(info.value)
    assert "default=" in text and "Point" in text and "raise TypeError" in text
    with pytest.raises(TypeError, match="default must be a function"):
        PayloadPacker("not callable")  # type: ignore[arg-type]


def test_an_installed_default_serves_the_batch_packer_and_is_removed_after():
    from shmbus.transport.shm_outbox import pack_many

    pack = PayloadPacker(_to_msgpack)
    with pack.installed():
        blob, lens, flags = pack_many([Point(1, 2), {"n": 1}, b"x"], 0)
        assert unpack_payload(blob[: lens[0]], flags[0]) == {"x": 1, "y": 2}
    with pytest.raises(TypeError, match="Point"):
        pack_many([Point(1, 2)], 0)  # the module's packer again


def test_an_agent_with_default_sends_every_way_and_one_without_is_unchanged(bus):
    with (
        shmbus.connect(bus=bus, name="a", default=_to_msgpack) as a,
        shmbus.connect(bus=bus, name="b") as b,
    ):
        assert b._payload_packer is None  # no default: the module's packer, as before
        b.subscribe("pts.*")
        a.send("b", {"p": Point(1, 2)})
        a.send_many("b", [Point(3, 4), (Point(5, 6),)])
        a.publish("pts.one", Point(7, 8))
        a.publish_many("pts.many", [Point(9, 10)])
        got = [m.payload for m in b.recv_many(16, timeout=10)]
        while len(got) < 5:
            got += [m.payload for m in b.recv_many(16, timeout=10)]
        assert got == [
            {"p": {"x": 1, "y": 2}},
            {"x": 3, "y": 4},
            [{"x": 5, "y": 6}],  # the tuple arrives as a list
            {"x": 7, "y": 8},
            {"x": 9, "y": 10},
        ]
        with pytest.raises(TypeError) as info:
            b.send("a", Point(0, 0))
        assert "Point" in str(info.value) and "default=" in str(info.value)
        assert info.value.__context__ is None or info.value.__suppress_context__
        with pytest.raises(TypeError, match="no conversion for object"):
            a.send("b", object())
        assert b.dlq() == []  # nothing refused was sent, nor dead-lettered


def test_the_asyncio_connect_takes_default(bus):
    import asyncio

    import shmbus.aio

    async def main() -> object:
        async with await shmbus.aio.connect(bus=bus, name="x", default=_to_msgpack) as x:
            with shmbus.connect(bus=bus, name="y") as y:
                await x.send("y", Point(1, 2))
                return y.recv(timeout=10).payload

    assert asyncio.run(asyncio.wait_for(main(), 60)) == {"x": 1, "y": 2}
