"""Where a bus lives: its private runtime directory (the control and data
sockets, the coordinator's lock, what it left pending), its state directory
(the DLQ file), and the names of its shared-memory segments. Also the rule
for bus and agent names, which become parts of all of these."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import InvalidName

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\Z")


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
