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
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from .errors import CoordinatorUnavailable, InvalidName, NameTaken, ShmbusError

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
    """

    _ERRORS = {"NameTaken": NameTaken}

    def __init__(self, bus: str, timeout: float = 10.0, *, wait: float = 0.0, who: str = "",
                 hint: str = "") -> None:  # fmt: skip
        self.bus = bus
        self._who = who
        path = str(socket_path(bus))
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except OSError as e:
                sock.close()
                retry = isinstance(e, FileNotFoundError | ConnectionRefusedError)
                if not retry or time.monotonic() >= deadline:
                    raise CoordinatorUnavailable(
                        f"no coordinator answers for bus {bus!r} at {path} ({e}); "
                        f"start one with `shmbus coordinator --bus {bus}`{hint}"
                    ) from None
                time.sleep(0.02)
        sock.settimeout(timeout)
        self._sock = sock
        self._reader = Reader()
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # one request and its reply at a time, whatever the thread

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            with self._lock:
                send_msg(self._sock, {"op": op, **args})
                reply = recv_msg(self._sock, self._reader, self._pending)
        except (OSError, ControlError) as e:
            raise CoordinatorUnavailable(
                f"{self._who}the coordinator of bus {self.bus!r} is gone ({e})"
            ) from None
        if not reply.get("ok"):
            cls = self._ERRORS.get(reply.get("error", ""), ShmbusError)
            raise cls(reply.get("message", f"{op} refused"))
        return reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
