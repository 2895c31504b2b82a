"""What the coordinator and its agents share: where a bus lives and how they talk.

A bus NAME has a private runtime directory, ``$XDG_RUNTIME_DIR/shmbus/NAME/``
(or ``/tmp/shmbus-UID/NAME/``), mode 0700, holding the coordinator's control
socket and its lock. Its shared memory is ``/dev/shm/shmbus.NAME.*``. What
outlives the bus (the dead-letter queue) is in its state directory, see
:func:`state_dir`.

Control messages are msgpack maps, each behind a 4-byte little-endian length,
on a Unix stream socket; a request carries ``op`` and gets one reply with
``ok`` (and ``error``/``message`` when refused). Control traffic is rare
(register, subscribe, DLQ): messages themselves never pass through here.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from .errors import CoordinatorUnavailable, InvalidName, NameTaken, RejoinRefused, ShmbusError

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z")
_LEN = struct.Struct("<I")
MAX_CONTROL = 4 << 20  # control messages are small; DLQ listings are the largest


def validate_bus_or_agent(name: object, what: str) -> str:
    """Bus and agent names: 1-64 of letters, digits, ``_`` and ``-`` (no dots:
    they join into segment names like ``BUS.inbox.AGENT``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '_' or '-', "
            "starting with a letter, digit or '_'"
        )
    return name


def runtime_dir(bus: str) -> Path:
    """The bus's private directory (not created here)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = Path(base) / "shmbus" if base else Path(f"/tmp/shmbus-{os.getuid()}")
    return root / validate_bus_or_agent(bus, "bus")


def make_runtime_dir(bus: str) -> Path:
    return _make_private_dir(runtime_dir(bus))


def state_dir(bus: str) -> Path:
    """Where a bus keeps what must outlive it (the DLQ file), not created here.

    ``$SHMBUS_STATE_DIR/BUS/`` when that is set (tests point it at a temporary
    directory), else ``$XDG_STATE_HOME/shmbus/BUS/``, else
    ``~/.local/state/shmbus/BUS/``. Not the runtime directory: that one is
    removed when the bus stops, and a tmpfs loses it at reboot.
    """
    validate_bus_or_agent(bus, "bus")
    base = os.environ.get("SHMBUS_STATE_DIR")
    if base:
        return Path(base) / bus
    xdg = os.environ.get("XDG_STATE_HOME")
    # The XDG spec: a relative path in the variable is invalid and ignored.
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return root / "shmbus" / bus


def make_state_dir(bus: str) -> Path:
    """Create the bus's state directory (mode 0700) and check it is private."""
    return _make_private_dir(state_dir(bus))


def _make_private_dir(path: Path) -> Path:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path


def check_private_dir(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{path} must belong to this user with mode 0700 (it has {oct(st.st_mode & 0o777)})"
        )


def socket_path(bus: str) -> Path:
    path = runtime_dir(bus) / "control.sock"
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the NUL
        raise InvalidName(
            f"the control socket path {path} is longer than a Unix socket allows (107 bytes); "
            "use a shorter bus name or XDG_RUNTIME_DIR"
        )
    return path


def data_socket_path(bus: str) -> Path:
    """Where the coordinator's bridge takes uds agents' data connections."""
    return socket_path(bus).with_name("data.sock")  # no longer than control.sock: fits


def lock_path(bus: str) -> Path:
    return runtime_dir(bus) / "coordinator.lock"


def pending_path(bus: str) -> Path:
    """What the coordinator has yet to finish (deaths, unblocks), for a successor."""
    return runtime_dir(bus) / "pending"


def bus_is_live(bus: str) -> bool:
    """Does a coordinator hold this bus's lock? (The kernel drops the lock when
    its holder dies, so this never mistakes a killed bus for a live one.)"""
    import fcntl

    try:
        fd = os.open(lock_path(bus), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_bus_shm(bus: str) -> list[str]:
    """Unlink every shared-memory entry of ``bus`` (segments and doorbells);
    returns their names. Only for a bus nobody runs any more."""
    validate_bus_or_agent(bus, "bus")
    removed = []
    for entry in Path("/dev/shm").iterdir():
        if entry.name.startswith((f"shmbus.{bus}.", f"sem.shmbus.{bus}.")):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry.name)
    return removed


def routes_name(bus: str) -> str:
    """Ring/Table name (without the ``shmbus.`` prefix) of the routes table."""
    return f"{bus}.routes"


def stats_name(bus: str) -> str:
    """Name (without the ``shmbus.`` prefix) of the bus's stats segment."""
    return f"{bus}.stats"


def inbox_name(bus: str, agent: str) -> str:
    return f"{bus}.inbox.{agent}"


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

    def __init__(self, bus: str, timeout: float = 10.0, *, wait: float = 0.0, who: str = "",
                 hint: str = "") -> None:  # fmt: skip
        self.bus = bus
        self.timeout = timeout
        self._who = who
        self._hint = hint
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

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
