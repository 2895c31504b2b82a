"""How the coordinator and its agents talk (where a bus lives: :mod:`shmbus.core.paths`).

A bus NAME has a private runtime directory, ``$XDG_RUNTIME_DIR/shmbus/NAME/``
(or ``/tmp/shmbus-UID/NAME/``), mode 0700, holding the coordinator's control
socket and its lock. Its shared memory is ``/dev/shm/shmbus.NAME.*``. What
outlives the bus (the dead-letter queue) is in its state directory, see
:func:`~shmbus.core.paths.state_dir`.

Control messages are msgpack maps, each behind a 4-byte little-endian length,
on a Unix stream socket; a request carries ``op`` and gets one reply with
``ok`` (and ``error``/``message`` when refused). Control traffic is rare
(register, subscribe, DLQ): messages themselves never pass through here.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from ..errors import CoordinatorUnavailable, NameTaken, RejoinRefused, ShmbusError
from .creds import check_peer
from .paths import check_runtime_dir, socket_path

_LEN = struct.Struct("<I")
MAX_CONTROL = 4 << 20  # control messages are small; DLQ listings are the largest
BEAT_EVERY = 0.5  # seconds between an agent's heartbeats (the coordinator's timeout is 10x)


class ControlError(ShmbusError):
    """The control connection broke or carried something malformed."""


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(_LEN.pack(len(body)) + body)


def encode(msg: dict[str, Any]) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class Reader:
    """Splits a byte stream into control messages, checking every length."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > MAX_CONTROL:
                raise ControlError(f"control message of {size} bytes (limit {MAX_CONTROL})")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            try:
                msg = msgpack.unpackb(body, raw=False)
            except Exception as e:
                raise ControlError(f"malformed control message: {e}") from None
            if not isinstance(msg, dict):
                raise ControlError("control message is not a map")
            out.append(msg)
        return out


def recv_msg(sock: socket.socket, reader: Reader, pending: list[dict[str, Any]]) -> dict[str, Any]:
    """The next message from a blocking socket (its timeout applies)."""
    while not pending:
        data = sock.recv(65536)
        if not data:
            raise ControlError("the coordinator closed the control connection")
        pending.extend(reader.feed(data))
    return pending.pop(0)


_C = TypeVar("_C", bound="Client")


class Client:
    """A control connection to a bus's coordinator: one request, one reply.

    Agents keep one open for their lifetime (its closing is how the
    coordinator learns of their death); ``shmbus dlq`` opens one without
    registering. ``wait`` is how long to retry while no coordinator listens.

    Calls are serialized by a lock, so an agent's own thread can watch the
    connection and, with ``rejoin``, replace it when a new coordinator takes
    the bus over; meanwhile a call waits for that, up to its timeout.
    """

    _ERRORS = {"NameTaken": NameTaken, "RejoinRefused": RejoinRefused}

    def __init__(
        self, bus: str, timeout: float = 10.0, *, wait: float = 0.0, who: str = "", hint: str = ""
    ) -> None:
        self.bus = bus
        self.timeout = timeout
        self._who = who
        self._hint = hint
        check_runtime_dir(bus)
        self._path = str(socket_path(bus))
        self._cond = threading.Condition(threading.Lock())
        self._sock: socket.socket | None = self._connect(wait)
        self._reader = Reader()
        self._pending: list[dict[str, Any]] = []
        self._owed = 0  # calls that timed out: their replies come first, unread
        self._closed = False
        self._lost = ""  # why the connection ended
        self.rejoins = False  # set by a registered agent: calls wait for its rejoin
        self.refused = ""  # why a coordinator that took the bus over refused us

    def _connect(self, wait: float) -> socket.socket:
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._path)
                break
            except OSError as e:
                sock.close()
                retry = isinstance(e, FileNotFoundError | ConnectionRefusedError)
                if not retry or time.monotonic() >= deadline:
                    raise CoordinatorUnavailable(
                        f"no coordinator answers for bus {self.bus!r} at {self._path} ({e}); "
                        f"start one with `shmbus coordinator --bus {self.bus}`{self._hint}"
                    ) from None
                time.sleep(0.02)
        try:
            # A socket in our private dir, but who listens on it is the
            # kernel's to say: never talk to a coordinator of another user.
            check_peer(sock, f"the coordinator of bus {self.bus!r} at {self._path}")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        return sock

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def call(self, op: str, *, wait: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and return its reply. With ``rejoins`` set, a call
        made while the coordinator is gone waits up to ``wait`` seconds (None:
        the timeout) for the connection to be rejoined, and one cut short by
        the coordinator's death is made again on the new connection."""
        deadline = time.monotonic() + (self.timeout if wait is None else wait)
        with self._cond:
            while True:
                while self._sock is None:
                    left = deadline - time.monotonic()
                    if self._closed or self.refused or not self.rejoins or left <= 0:
                        raise self._gone()
                    self._cond.wait(left)
                sending = False
                try:
                    while self._owed:  # late replies to calls that timed out: not ours
                        recv_msg(self._sock, self._reader, self._pending)
                        self._owed -= 1
                    sending = True
                    send_msg(self._sock, {"op": op, **args})
                    sending = False
                    self._owed += 1  # until its reply is read
                    reply = recv_msg(self._sock, self._reader, self._pending)
                    self._owed -= 1
                    break
                except TimeoutError as e:
                    if not sending:
                        # Slow, not gone: closing would tell the coordinator we
                        # died (our inbox drained, our rejoin refused for good).
                        raise self._slow() from None
                    self._lose(e)  # a request cut off half-way: the stream is lost
                except (OSError, ControlError) as e:
                    self._lose(e)
                if not self.rejoins:
                    raise self._gone() from None
        if not reply.get("ok"):
            cls = self._ERRORS.get(reply.get("error", ""), ShmbusError)
            raise cls(reply.get("message", f"{op} refused"))
        return reply

    def _gone(self) -> CoordinatorUnavailable:
        if self.refused:
            return RejoinRefused(f"{self._who}{self.refused}")
        if self._closed:
            return CoordinatorUnavailable(f"{self._who}the control connection is closed")
        waited = f"; none took the bus over within {self.timeout}s" if self.rejoins else ""
        return CoordinatorUnavailable(
            f"{self._who}the coordinator of bus {self.bus!r} is gone ({self._lost}){waited}; "
            f"start one with `shmbus coordinator --bus {self.bus}`"
        )

    def _slow(self) -> CoordinatorUnavailable:
        return CoordinatorUnavailable(
            f"{self._who}the coordinator of bus {self.bus!r} did not answer within "
            f"{self.timeout}s (busy or stopped); the connection is kept: try again"
        )

    def _lose(self, why: object) -> None:
        """The connection ended (the lock is held)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._lost = str(why) or type(why).__name__
        self._reader = Reader()
        self._pending = []
        self._owed = 0

    def check(self) -> bool:
        """Is the connection still open? Never blocks: while a call runs, that
        call is the one to find out."""
        if not self._cond.acquire(blocking=False):
            return True
        try:
            if self._sock is None:
                return False
            try:
                # A poll, not a recv: the socket's timeout would make that wait.
                if not select.select([self._sock], [], [], 0)[0]:
                    return True
                if self._sock.recv(1, socket.MSG_PEEK):
                    return True  # nothing is sent unasked; whatever it is, a call reads it
                self._lose("the coordinator closed the control connection")
            except InterruptedError:
                return True
            except OSError as e:
                self._lose(e)
            return False
        finally:
            self._cond.release()

    def rejoin(self, hello: Callable[[], dict[str, Any]]) -> bool:
        """Connect once to the bus's socket and send ``hello()`` (a request
        with its op), taken under the lock so no call interleaves; True once
        a coordinator accepted it, False if none listens yet.
        :class:`RejoinRefused` if it refused (every later call raises it too)."""
        try:
            sock = self._connect(0)
        except CoordinatorUnavailable:
            return False
        reader: Reader = Reader()
        pending: list[dict[str, Any]] = []
        with self._cond:
            if self._closed or self._sock is not None:
                sock.close()
                return self._sock is not None
            try:
                send_msg(sock, hello())
                reply = recv_msg(sock, reader, pending)
            except (OSError, ControlError):
                sock.close()
                return False  # it died too, or is not ready: try again later
            if not reply.get("ok"):
                sock.close()
                self.refused = reply.get("message", "the coordinator refused to take us back")
                self._cond.notify_all()
                raise RejoinRefused(self.refused)
            self._sock, self._reader, self._pending = sock, reader, pending
            self._cond.notify_all()
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._cond.notify_all()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
