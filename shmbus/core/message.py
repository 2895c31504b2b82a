"""Messages and their frames: the fixed C header (csrc/shmbus_frame.h) plus a payload.

A payload is anything msgpack takes, plus numpy arrays and scalars of any
dtype without Python objects in it (an extension type carrying the dtype, the
shape and the raw bytes). ``bytes`` payloads travel raw, without msgpack.
Nothing is ever pickled: a frame from another process is untrusted, so every
length is checked before it is used and msgpack decodes with bounds.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from .._native import ffi, lib
from ..errors import CorruptFrame, InvalidArgument, InvalidName

__all__ = [
    "DeadLetter",
    "Message",
    "PayloadPacker",
    "MessageType",
    "RoutingRule",
    "decode_frame",
    "encode_frame",
    "pack_payload",
]

HEADER = struct.Struct(ffi.string(lib.shmbus_frame_struct()).decode())
HEADER_SIZE: int = lib.SHMBUS_FRAME_HEADER_SIZE
MAGIC: int = lib.SHMBUS_FRAME_MAGIC
VERSION: int = lib.SHMBUS_FRAME_VERSION
FLAG_ACK: int = lib.SHMBUS_FRAME_FLAG_ACK
FLAG_RAW: int = lib.SHMBUS_FRAME_FLAG_RAW
MAX_NAME: int = lib.SHMBUS_FRAME_MAX_NAME
MAX_TOPIC: int = lib.SHMBUS_FRAME_MAX_TOPIC


def _field_offsets() -> list[int]:
    out = ffi.new("uint32_t[32]")
    return list(out[0 : lib.shmbus_frame_offsets(out, 32)])


_LENGTHS_AT = _field_offsets()[13]  # sender, recipient and topic lengths: 4 bytes

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 2
_MAX_DIMS = 32


class MessageType(enum.IntEnum):
    DIRECT = 1
    PUBLISH = 2
    SUBSCRIBE = 3
    UNSUBSCRIBE = 4
    REQUEST = 5
    RESPONSE = 6
    ACK = 7
    ERROR = 8
    HEARTBEAT = 9
    CONTROL = 10


_TYPES = {int(t): t for t in MessageType}
#: Frame types that are the bus's own bookkeeping: never dead letters, never
#: handed to an agent's recv (the type byte is at offset 3 of the header).
NOT_MESSAGES = frozenset((MessageType.ACK, MessageType.CONTROL, MessageType.HEARTBEAT))


_MessageRecord = collections.namedtuple(
    "_MessageRecord",
    "id type sender recipient topic request_id payload priority timestamp correlation_id "
    "attempts requires_ack ttl",
    defaults=(0, MessageType.DIRECT, "", "", "", 0, None, 0, 0.0, 0, 0, False, None),
)


class Message(_MessageRecord):
    """One message as a receiver sees it: an immutable record.

    Immutable because several handlers may take the same message, and none
    should see what another changed; ``msg._replace(payload=...)`` makes a
    changed copy. A tuple underneath because building one is the cheapest
    way Python has to make a record, and the receive path makes one per
    message.
    """

    __slots__ = ()

    @property
    def expired(self) -> bool:
        """True once ``ttl`` seconds have passed since ``timestamp``."""
        return self.ttl is not None and time.time() > self.timestamp + self.ttl

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self[:6] == other[:6]
            and self[7:] == other[7:]
            and _payload_equal(self.payload, other.payload)
        )

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = f"topic={self.topic!r}" if self.topic else f"to={self.recipient!r}"
        return (
            f"Message(id={self.id}, type={self.type.name}, from={self.sender!r}, {where}, "
            f"payload={self.payload!r})"
        )


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message the bus could not deliver, with why and when (wall-clock seconds)."""

    message: Message
    reason: str
    time: float
    id: int = 0  # the DLQ's own number for the entry (for `shmbus dlq replay|purge ID`)


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """Which messages a handler takes: every filter given must match.

    ``topic`` is a pattern (``*`` one word, ``>`` the rest); rules with a
    higher ``priority`` run first.
    """

    topic: str | None = None
    msg_type: MessageType | None = None
    sender: str | None = None
    recipient: str | None = None
    priority: int = 0


def _payload_equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    return bool(a == b)


# ------------------------------------------------------------- payloads


_KINDS = (
    "None, bool, int, float, str, bytes, list, tuple (it arrives as a list), dict and "
    "numpy arrays or scalars without Python objects"
)


def _refuse(obj: Any) -> TypeError:
    return TypeError(
        f"cannot send an object of type {type(obj).__module__}.{type(obj).__qualname__}: "
        f"payloads are {_KINDS} (nothing is pickled); convert it first, or give "
        "connect(..., default=fn) a function that turns such objects into those "
        "(as json.dumps(default=) does)"
    )


def _dtype_descr(dtype: np.dtype) -> Any:
    if dtype.hasobject:
        raise TypeError(
            f"cannot send a numpy array of dtype {dtype}: it holds Python objects, which "
            "would need pickling; convert it to a numeric or string dtype first"
        )
    return np.lib.format.dtype_to_descr(dtype)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        descr = _dtype_descr(obj.dtype)
        data = np.ascontiguousarray(obj).tobytes()
        return msgpack.ExtType(_EXT_NDARRAY, msgpack.packb([descr, list(obj.shape), data]))
    if isinstance(obj, np.generic):
        descr = _dtype_descr(obj.dtype)
        return msgpack.ExtType(_EXT_NPSCALAR, msgpack.packb([descr, obj.tobytes()]))
    if isinstance(obj, int):  # msgpack hands over the ints it cannot carry
        raise TypeError(
            f"cannot encode the integer {obj}: payload integers go from -2**63 to 2**64-1"
        )
    raise _refuse(obj)


# One packer per thread: _default runs Python code, so a thread switch can
# land in the middle of a pack, and a shared packer would mix two payloads.
_local = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _local.packer  # type: ignore[no-any-return]
    except AttributeError:
        _local.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=True)
        return _local.packer  # type: ignore[no-any-return]


def pack_payload(payload: Any) -> tuple[bytes, int]:
    """Encode a payload; returns the bytes and the flags they need (FLAG_RAW or 0)."""
    if type(payload) is bytes:
        return payload, FLAG_RAW
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload), FLAG_RAW
    try:
        return _packer().pack(payload), 0
    except TypeError:
        raise
    except (ValueError, OverflowError) as e:  # ints beyond 64 bits, too deep nesting
        raise TypeError(f"cannot encode payload: {e}") from None


class PayloadPacker:
    """:func:`pack_payload` with a ``default`` (``connect(..., default=fn)``): an
    object msgpack cannot carry (numpy arrays aside, which the bus carries
    itself) goes to ``fn``, and what ``fn`` returns is packed in its place, as
    with ``json.dumps(default=)``. ``fn`` raises TypeError for what it cannot
    convert either.

    An agent without ``default`` has none of this: its sends use the
    module's packer, whose ``default`` is the numpy one only.
    """

    __slots__ = ("default", "_local")

    def __init__(self, default: Callable[[Any], Any]) -> None:
        if not callable(default):
            raise TypeError(
                f"default must be a function of one object, like json.dumps's; got {default!r}"
            )
        self.default = default
        self._local = threading.local()  # a packer per thread, as for _packer()

    def _convert(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray | np.generic):
            return _default(obj)
        out = self.default(obj)
        if isinstance(out, np.ndarray | np.generic):  # msgpack would not ask again
            return _default(out)
        return out

    def packer(self) -> msgpack.Packer:
        """This thread's packer, with ``default`` behind the numpy one."""
        try:
            return self._local.packer  # type: ignore[no-any-return]
        except AttributeError:
            self._local.packer = msgpack.Packer(
                default=self._convert, use_bin_type=True, autoreset=True
            )
            return self._local.packer  # type: ignore[no-any-return]

    def again(self, payload: Any, refused: TypeError) -> tuple[bytes, int]:
        """Pack ``payload`` that :func:`pack_payload` ``refused``, from the
        handler of that error: an error now is not shown chained to it."""
        try:
            return self(payload)
        except TypeError as e:
            if e.__context__ is refused:
                e.__suppress_context__ = True
            raise

    def __call__(self, payload: Any) -> tuple[bytes, int]:
        if type(payload) is bytes:
            return payload, FLAG_RAW
        if isinstance(payload, bytearray | memoryview):
            return bytes(payload), FLAG_RAW
        try:
            return self.packer().pack(payload), 0
        except TypeError as e:
            if str(e).startswith("can not serialize"):  # msgpack's: what default returned
                raise TypeError(
                    f"cannot send the payload: {self.default!r} (connect's default=) "
                    f"returned an object msgpack cannot carry either ({e}); it must return "
                    f"{_KINDS}, or raise TypeError"
                ) from None
            raise
        except (ValueError, OverflowError) as e:
            raise TypeError(f"cannot encode payload: {e}") from None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within: this thread's :func:`pack_payload` and batch packing use our
        packer (for the batch paths, which pack in the transports)."""
        old = _packer()
        _local.packer = self.packer()
        try:
            yield
        finally:
            _local.packer = old


def _tuplify(descr: Any) -> Any:
    """msgpack turns the tuples of a structured dtype's descr into lists: make
    each field (name, format[, shape]) again, where a name may be (title,
    name), a format a nested descr, and a shape a tuple."""
    if not isinstance(descr, list):
        return descr
    fields = []
    for field in descr:
        if not isinstance(field, list) or not 2 <= len(field) <= 3:
            raise TypeError(f"bad field {field!r}")
        name = tuple(field[0]) if isinstance(field[0], list) else field[0]
        rest = [_tuplify(field[1])]
        if len(field) == 3:
            rest.append(tuple(field[2]) if isinstance(field[2], list) else field[2])
        fields.append((name, *rest))
    return fields


def _dtype(descr: Any) -> np.dtype:
    try:
        if isinstance(descr, list):
            dtype = np.lib.format.descr_to_dtype(_tuplify(descr))
        elif isinstance(descr, str):
            dtype = np.dtype(descr)
        else:
            raise TypeError(type(descr).__name__)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptFrame(f"payload holds a numpy array of unknown dtype: {e}") from None
    if dtype.hasobject:
        raise CorruptFrame("payload holds a numpy array with Python objects: refused")
    return dtype


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        parts = msgpack.unpackb(data, raw=False)
        if not (isinstance(parts, list) and len(parts) == 3):
            raise CorruptFrame("payload holds a malformed numpy array")
        descr, shape, raw = parts
        dtype = _dtype(descr)
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(type(n) is int and n >= 0 for n in shape)
            or not isinstance(raw, bytes)
            or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(raw)
        ):
            raise CorruptFrame("payload holds a numpy array whose shape does not fit its data")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # writable, like the sender's
    if code == _EXT_NPSCALAR:
        parts = msgpack.unpackb(data, raw=False)
        if not (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[1], bytes)):
            raise CorruptFrame("payload holds a malformed numpy scalar")
        dtype = _dtype(parts[0])
        if dtype.itemsize != len(parts[1]):
            raise CorruptFrame("payload holds a numpy scalar of the wrong size")
        return np.frombuffer(parts[1], dtype=dtype)[0]
    raise CorruptFrame(f"payload holds an unknown msgpack extension type {code}")


def unpack_payload(data: bytes | memoryview, flags: int) -> Any:
    """Decode a payload from an untrusted frame; raises :class:`CorruptFrame`."""
    if flags & FLAG_RAW:
        return bytes(data)
    try:
        # unpackb bounds every str, bin, array and map by the input's length,
        # so a hostile length cannot make it allocate more than it was given.
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=False)
    except CorruptFrame:
        raise
    except Exception as e:  # msgpack raises several kinds, ValueError among them
        raise CorruptFrame(f"payload is not valid msgpack: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------- frames


# Whole and fractional seconds apart: ts * 1e9 in one float loses the last
# digits at today's epoch, and a timestamp should come back as it was sent.
def seconds_to_ns(ts: float) -> int:
    whole = int(ts)
    return whole * 1_000_000_000 + round((ts - whole) * 1e9)


def ns_to_seconds(ns: int) -> float:
    whole, frac = divmod(ns, 1_000_000_000)
    return whole + frac / 1e9


def _name_bytes(name: str, what: str, limit: int) -> bytes:
    raw = name.encode()
    if len(raw) > limit:
        raise InvalidName(f"{what} {name!r} is {len(raw)} bytes long; the limit is {limit}")
    return raw


def encode_frame(
    msg_type: int,
    *,
    sender: bytes,
    recipient: bytes = b"",
    topic: bytes = b"",
    payload: bytes = b"",
    flags: int = 0,
    msg_id: int = 0,
    request_id: int = 0,
    correlation_id: int = 0,
    priority: int = 0,
    attempts: int = 0,
    sender_id: int = 0,
    recipient_id: int = 0,
    timestamp_ns: int = 0,
    ttl_ms: int = 0,
) -> bytes:
    """Build a frame from already-encoded names (UTF-8) and payload.

    Refuses here what a receiver would refuse as corrupt, so a bad field is
    an error at the sender, never a frame every receiver drops.
    """
    if len(sender) > MAX_NAME or len(recipient) > MAX_NAME or len(topic) > MAX_TOPIC:
        raise InvalidName(f"names are limited to {MAX_NAME} bytes and topics to {MAX_TOPIC} bytes")
    if not 0 <= priority <= 100:
        raise InvalidArgument(f"priority must be 0-100, got {priority}")
    if not 0 <= attempts <= 0xFFFF:
        raise InvalidArgument(f"attempts must be 0-65535, got {attempts}")
    if not 0 <= ttl_ms <= 0xFFFFFFFF:
        raise InvalidArgument(f"ttl must be at most {0xFFFFFFFF // 1000} s (about 49 days)")
    if msg_type not in _TYPES:
        raise InvalidArgument(f"unknown message type {msg_type}")
    if not (0 <= msg_id < 1 << 64 and 0 <= request_id < 1 << 64 and 0 <= correlation_id < 1 << 64):
        raise InvalidArgument("message, request and correlation ids are unsigned 64-bit numbers")
    header = HEADER.pack(
        MAGIC,
        VERSION,
        msg_type,
        priority,
        flags,
        attempts,
        sender_id,
        recipient_id,
        msg_id,
        request_id,
        correlation_id,
        timestamp_ns,
        ttl_ms,
        len(sender),
        len(recipient),
        len(topic),
        len(payload),
        0,
    )
    return b"".join((header, sender, recipient, topic, payload))


def encode_message(msg: Message) -> bytes:
    """A Message as a frame (the agent's send path builds frames directly)."""
    payload, flags = pack_payload(msg.payload)
    if msg.requires_ack:
        flags |= FLAG_ACK
    return encode_frame(
        int(msg.type),
        sender=_name_bytes(msg.sender, "sender", MAX_NAME),
        recipient=_name_bytes(msg.recipient, "recipient", MAX_NAME),
        topic=_name_bytes(msg.topic, "topic", MAX_TOPIC),
        payload=payload,
        flags=flags,
        msg_id=msg.id,
        request_id=msg.request_id,
        correlation_id=msg.correlation_id,
        priority=msg.priority,
        attempts=msg.attempts,
        timestamp_ns=seconds_to_ns(msg.timestamp),
        ttl_ms=0 if msg.ttl is None else max(1, round(msg.ttl * 1000)),
    )


_unpack_header = HEADER.unpack_from
_unpackb = msgpack.unpackb
_new_record = tuple.__new__


def _bad_frame(frame: bytes) -> CorruptFrame:
    """Why a frame failed the quick checks in decode_frame, in words."""
    size = len(frame)
    if size < HEADER_SIZE:
        return CorruptFrame(f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    (magic, version, msg_type, priority, _, _, _, _, _, _, _, _, _, slen, rlen, tlen, plen, _) = (
        _unpack_header(frame)
    )
    if magic != MAGIC or version != VERSION:
        return CorruptFrame(
            f"not a shmbus frame of version {VERSION} (magic {magic:#x}, v{version})"
        )
    if HEADER_SIZE + slen + rlen + tlen + plen != size:
        return CorruptFrame(
            f"frame lengths do not add up: header {HEADER_SIZE} + names {slen}+{rlen}+{tlen} "
            f"+ payload {plen} != {size} bytes"
        )
    return CorruptFrame(
        f"frame has type {msg_type}, priority {priority}, topic length {tlen}: out of range"
    )


_names: dict[bytes, tuple[str, str, str]] = {}
_MAX_NAMES = 4096


def _decode_names(key: bytes, slen: int, rlen: int) -> tuple[str, str, str]:
    raw = key[4:]
    try:
        names = (raw[:slen].decode(), raw[slen : slen + rlen].decode(), raw[slen + rlen :].decode())
    except UnicodeDecodeError:
        raise CorruptFrame("frame names are not valid UTF-8") from None
    if len(_names) >= _MAX_NAMES:
        _names.clear()  # many distinct topics: start over rather than grow
    _names[key] = names
    return names


def _types_table() -> tuple[MessageType | None, ...]:
    return tuple(_TYPES.get(code) for code in range(256))


def decode_state() -> tuple[Any, ...]:
    """What shmbus._decode needs to build Messages as decode_frame does."""
    kwargs = (("raw", "ext_hook", "strict_map_key"), (False, _ext_hook, False))
    return (Message, _types_table(), _names, msgpack.unpackb, kwargs, _MAX_NAMES)


def decode_frame(frame: bytes | bytearray | memoryview) -> Message:
    """Check and decode a frame from another process; raises :class:`CorruptFrame`.

    On every receive: kept to one header unpack, a handful of comparisons
    and the slices, because Python's per-message cost is the bus's speed.
    """
    if type(frame) is not bytes:
        frame = bytes(frame)
    try:
        (
            magic,
            version,
            msg_type,
            priority,
            flags,
            attempts,
            _sid,
            _rid,
            msg_id,
            request_id,
            correlation_id,
            timestamp_ns,
            ttl_ms,
            slen,
            rlen,
            tlen,
            plen,
            _,
        ) = _unpack_header(frame)
    except struct.error:
        raise _bad_frame(frame) from None
    c = HEADER_SIZE + slen + rlen + tlen
    kind = _TYPES.get(msg_type)
    if (
        magic != MAGIC
        or version != VERSION
        or c + plen != len(frame)
        or kind is None
        or priority > 100
        or tlen > MAX_TOPIC
    ):
        raise _bad_frame(frame)
    # Sender, recipient and topic repeat from frame to frame: one slice and
    # one dict hit instead of three slices and three decodes.
    # The lengths too, so ("ab", "c") and ("a", "bc") differ; shmbus_pydecode.c
    # builds the same key, and shares the dict.
    key = frame[_LENGTHS_AT : _LENGTHS_AT + 4] + frame[HEADER_SIZE:c]
    names = _names.get(key)
    if names is None:
        names = _decode_names(key, slen, rlen)
    sender, recipient, topic = names
    if flags & FLAG_RAW:
        payload = frame[c:]
    else:
        try:  # unpack_payload, inlined: a function call is a tenth of the cost here
            payload = _unpackb(frame[c:], raw=False, ext_hook=_ext_hook, strict_map_key=False)
        except CorruptFrame:
            raise
        except Exception as e:
            raise CorruptFrame(f"payload is not valid msgpack: {type(e).__name__}: {e}") from None
    whole, frac = divmod(timestamp_ns, 1_000_000_000)
    return _new_record(
        Message,
        (
            msg_id,
            kind,
            sender,
            recipient,
            topic,
            request_id,
            payload,
            priority,
            whole + frac / 1e9,
            correlation_id,
            attempts,
            bool(flags & FLAG_ACK),
            ttl_ms / 1000 if ttl_ms else None,
        ),
    )
