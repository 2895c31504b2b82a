"""Where a bus lives: its private runtime directory (the control and data
sockets, the coordinator's lock, what it left pending), its state directory
(the DLQ file), and the names of its shared-memory segments. Also the rule
for bus and agent names, which become parts of all of these."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

from ..errors import ForeignObject, InvalidName, NotFound

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
    path = runtime_dir(bus)
    _check_parent(path.parent.parent)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    check_private_dir(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path


def check_runtime_dir(bus: str) -> None:
    """Before we dial a bus's socket: every directory on the way is ours and
    private, or its owner could have put another's socket there. With
    ``XDG_RUNTIME_DIR`` unset the dirs live in ``/tmp``, where anyone could
    make ``/tmp/shmbus-UID`` first. A dir that does not exist is fine (there
    is no socket to dial in it either)."""
    path = runtime_dir(bus)
    _check_parent(path.parent.parent)
    for d in (path.parent, path):
        if os.path.lexists(d):
            check_private_dir(d)


def _check_parent(path: Path) -> None:
    """The dir our runtime root is made in (``/tmp``, ``$XDG_RUNTIME_DIR``):
    root's or ours, and if others may write in it, sticky (so that nobody
    else can rename or remove what we make there)."""
    st = path.stat()
    if st.st_uid not in (0, os.getuid()) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
        raise ForeignObject(
            f"{path} belongs to another user or others may replace what is in it "
            f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}): a bus's sockets "
            "are never made or dialled there; set XDG_RUNTIME_DIR to a private dir"
        )


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
    """A dir of this user that nobody else may enter, never a symlink (one
    made by another user would lead wherever they like)."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else f"mode {oct(st.st_mode & 0o777)}"
        raise ForeignObject(
            f"{path} must be a directory of this user (uid {os.getuid()}) with mode 0700; "
            f"it has owner uid {st.st_uid}, {what}: refused"
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


def _locked(path: Path, flags: int = 0) -> bool:
    """Does a process hold an exclusive flock on ``path``? The kernel drops a
    lock when its holder dies, so this never mistakes a killed holder for a
    live one."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | flags)
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


def bus_is_live(bus: str) -> bool:
    """Does a coordinator hold this bus's lock (in our runtime dir)?"""
    return _locked(lock_path(bus))


# ---------------------------------------------------- shared-memory names
#
# /dev/shm is one directory for every user, so a bus's segment names start
# with its owner's UID (two users' buses of one name never meet) and end in
# a random token: nobody can pre-create, and so block or squat, a name the
# bus will make. The coordinator picks the tokens (a bus's routes and stats
# when it starts, an inbox's at each registration) and tells them to its
# agents; tools that need them without asking it find them in /dev/shm,
# among the entries this user owns (see find_segments).

SHM = Path("/dev/shm")
PREFIX = "shmbus."  # of every entry, before the ring names below


def bus_prefix(bus: str, uid: int | None = None) -> str:
    """What every segment name of ``bus`` (of ``uid``, by default ours) starts with."""
    return f"{os.getuid() if uid is None else uid}.{validate_bus_or_agent(bus, 'bus')}."


def _token() -> str:
    return secrets.token_hex(8)


def routes_name(bus: str) -> str:
    """A new name for the bus's routes table (without the ``shmbus.`` prefix)."""
    return f"{bus_prefix(bus)}routes.{_token()}"


def stats_name(bus: str) -> str:
    """A new name for the bus's stats segment."""
    return f"{bus_prefix(bus)}stats.{_token()}"


def inbox_prefix(bus: str, agent: str) -> str:
    return f"{bus_prefix(bus)}inbox.{validate_bus_or_agent(agent, 'agent')}."


def inbox_name(bus: str, agent: str) -> str:
    """A new name for an inbox of ``agent`` (its lanes add ``.laneN``)."""
    return f"{inbox_prefix(bus, agent)}{_token()}"


def is_inbox_of(name: str, bus: str, agent: str) -> bool:
    """Is ``name`` a lane-0 inbox name of ``agent`` on ``bus`` (ours)?"""
    rest = name.removeprefix(inbox_prefix(bus, agent))
    return rest != name and _TOKEN.fullmatch(rest) is not None


def own_entry(path: Path) -> bool:
    """Is this /dev/shm entry a plain file of ours that only we may open? Never
    follows a link: another user may plant one."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o7777 == 0o600


def bus_entries(bus: str, uid: int | None = None) -> list[str]:
    """The /dev/shm entries (file names) of ``bus`` of ``uid`` (ours by default)."""
    head = PREFIX + bus_prefix(bus, uid)
    return sorted(e.name for e in SHM.iterdir() if e.name.startswith(head))


_KINDS = ("routes", "stats", "history", "inbox")
_TOKEN = re.compile(r"[0-9a-f]{16}")


def _new_style(parts: list[str]) -> bool:
    return len(parts) >= 5 and parts[0] == "shmbus" and parts[1].isdigit() and parts[3] in _KINDS


def all_buses() -> dict[tuple[int, str], list[str]]:
    """Every bus with an entry in /dev/shm, by (owner's UID, bus name): the
    UID the name claims, which :func:`entry_owner` checks."""
    found: dict[tuple[int, str], list[str]] = {}
    for entry in SHM.iterdir():
        parts = entry.name.split(".")
        if not _new_style(parts):
            continue
        with contextlib.suppress(InvalidName):
            key = (int(parts[1]), validate_bus_or_agent(parts[2], "bus"))
            found.setdefault(key, []).append(entry.name)
    return found


def legacy_buses() -> dict[str, list[str]]:
    """Our entries named as shmbus named them before names carried the owner
    (``shmbus.BUS.routes``, ``shmbus.BUS.inbox.AGENT``, ``sem.shmbus.BUS.*``):
    what a bus of an older shmbus left, by bus name."""
    found: dict[str, list[str]] = {}
    for entry in SHM.iterdir():
        parts = entry.name.removeprefix("sem.").split(".")
        if _new_style(parts) or len(parts) < 3 or parts[0] != "shmbus" or parts[2] not in _KINDS:
            continue
        if entry.lstat().st_uid != os.getuid():
            continue
        with contextlib.suppress(InvalidName):
            found.setdefault(validate_bus_or_agent(parts[1], "bus"), []).append(entry.name)
    return found


def entry_owner(name: str) -> int | None:
    """The UID that owns /dev/shm entry ``name`` (None if it is gone)."""
    try:
        return (SHM / name).lstat().st_uid
    except FileNotFoundError:
        return None


def find_own(bus: str, kind: str) -> str | None:
    """The name of our ``bus``'s segment of ``kind`` ("routes", "stats",
    "history") in /dev/shm: only an entry we own with mode 0600 counts
    (another user's look-alike is never picked); of several (a killed bus's
    and its successor's), the newest."""
    head = f"{PREFIX}{bus_prefix(bus)}{kind}."
    best: tuple[float, str] | None = None
    for entry in SHM.iterdir():
        token = entry.name.removeprefix(head)
        if token == entry.name or not _TOKEN.fullmatch(token):
            continue
        if not own_entry(entry):
            continue
        with contextlib.suppress(FileNotFoundError):
            when = entry.stat().st_mtime
            if best is None or when > best[0]:
                best = (when, entry.name.removeprefix(PREFIX))
    return None if best is None else best[1]


def find_segments(bus: str) -> tuple[str, str]:
    """The names of the routes table and stats segment of our ``bus``, as its
    coordinator made them (see :func:`find_own`). Raises :class:`NotFound`."""
    routes, stats = find_own(bus, "routes"), find_own(bus, "stats")
    if routes is None or stats is None:
        raise NotFound(errno.ENOENT, f"no coordinator has run bus {bus!r} of this user")
    return routes, stats


def history_name(bus: str) -> str:
    """A new name for the coordinator's history inbox."""
    return f"{bus_prefix(bus)}history.{_token()}"


def find_inbox(bus: str, agent: str) -> str | None:
    """The name of an inbox of ``agent`` that is in /dev/shm, if any."""
    for entry in SHM.iterdir():
        name = entry.name.removeprefix(PREFIX)
        if is_inbox_of(name, bus, agent) and own_entry(entry):
            return name
    return None


def routes_locked(bus: str, uid: int | None = None) -> bool:
    """Does a coordinator of ``uid`` (ours by default) hold the lock on the
    routes table's file of ``bus``? Root may look at any user's bus: how
    ``cleanup --all-users`` tells a live bus of another user from a killed
    one. PermissionError when we may not open the file."""
    owner = os.getuid() if uid is None else uid
    return any(
        _locked(SHM / e, os.O_NOFOLLOW | os.O_NONBLOCK)
        for e in bus_entries(bus, uid)
        if ".routes." in e and entry_owner(e) == owner
    )


def coordinator_runs(bus: str) -> bool:
    """Does a coordinator run our ``bus``? Its lock in our runtime dir says so,
    and so does the lock on its routes table's file (which a coordinator
    started with another ``XDG_RUNTIME_DIR`` holds too)."""
    return bus_is_live(bus) or routes_locked(bus)


def own_buses(prefix: str = "") -> list[str]:
    """Our buses (whose names start with ``prefix``) with entries in /dev/shm."""
    me = os.getuid()
    buses = {b for uid, b in all_buses() if uid == me} | set(legacy_buses())
    return sorted(b for b in buses if b.startswith(prefix))


def remove_killed_bus(bus: str) -> list[str] | None:
    """Remove what a killed bus of ours left: its /dev/shm entries, sockets,
    lock and runtime dir. Returns the entries removed, or None (and removes
    nothing) while its coordinator runs."""
    if coordinator_runs(bus):
        return None
    removed = remove_bus_shm(bus)
    for name in legacy_buses().get(bus, []):  # an older shmbus's, of a bus that is dead
        (SHM / name).unlink(missing_ok=True)
        removed.append(name)
    for path in (socket_path(bus), data_socket_path(bus), lock_path(bus)):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # left alone if anything else is in it
        runtime_dir(bus).rmdir()
    return removed


def remove_killed_buses(prefix: str) -> list[str]:
    """Every killed bus of ours whose name starts with ``prefix``, removed
    (for tools that name their buses uniquely, and so never meet a killed
    run's leftovers again); returns their names."""
    return [bus for bus in own_buses(prefix) if remove_killed_bus(bus) is not None]


def remove_bus_shm(bus: str, uid: int | None = None) -> list[str]:
    """Unlink every shared-memory entry of ``bus`` of ``uid`` (ours by
    default); returns their names. Only for a bus nobody runs any more."""
    removed = []
    owner = os.getuid() if uid is None else uid
    for name in bus_entries(bus, uid):
        if entry_owner(name) != owner:
            continue  # named like it, made by someone else: not ours to remove
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()
            removed.append(name)
    return removed
