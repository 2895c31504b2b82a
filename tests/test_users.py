"""Two users on one machine: buses of one name never meet, neither can list,
map, dial or clean the other's, and root's cleanup never touches a live bus.

Runs as root with a user the test creates (``useradd``); skipped elsewhere.
The other user runs /usr/bin/python3 on a copy of shmbus and its
dependencies in a world-readable dir (root's site-packages is under /root,
which nobody else may enter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import shmbus
from shmbus.core.paths import bus_entries, check_runtime_dir, make_runtime_dir
from tests.conftest import SESSION, start_coordinator

PYTHON = "/usr/bin/python3"
HANG = 30

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not os.access(PYTHON, os.X_OK),
    reason="a second user needs root, useradd and /usr/bin/python3",
)


@dataclass
class Other:
    name: str
    uid: int
    gid: int
    home: Path
    lib: Path

    def env(self) -> dict[str, str]:
        runtime = self.home / "run"
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(runtime),
            "SHMBUS_STATE_DIR": str(self.home / "state"),
            "PYTHONPATH": str(self.lib),
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def popen(self, code: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            env=self.env(),
            cwd=self.home,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        proc = self.popen(code, *args)
        try:
            out, err = proc.communicate(timeout=HANG)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run("import sys; from shmbus.cli import main; sys.exit(main())", *argv)


def _copy_lib(dest: Path) -> None:
    """shmbus (with its built extensions) and what it imports, for the other user."""
    root = Path(shmbus.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(root, dest / "shmbus", ignore=ignore)
    site_dir = Path(site.getsitepackages()[0])
    for name in ("numpy", "numpy.libs", "msgpack", "cffi"):
        if (site_dir / name).is_dir():
            shutil.copytree(site_dir / name, dest / name, ignore=ignore)
    for so in site_dir.glob("_cffi_backend*.so"):
        shutil.copy(so, dest / so.name)


@pytest.fixture(scope="session")
def other() -> Iterator[Other]:
    # One per xdist worker: a worker's teardown kills its user's processes.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")
    name = f"sbt{SESSION}{worker}"[:31]
    made = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    entry = pwd.getpwnam(name)
    home = Path(tempfile.mkdtemp(prefix=f"sbu{entry.pw_uid}-", dir="/tmp"))
    os.chmod(home, 0o755)
    lib = home / "lib"
    _copy_lib(lib)
    subprocess.run(["chmod", "-R", "a+rX", str(lib)], check=True)
    for d in ("run", "state", "work"):
        (home / d).mkdir(mode=0o700)
        os.chown(home / d, entry.pw_uid, entry.pw_gid)
    yield Other(name, entry.pw_uid, entry.pw_gid, home, lib)
    subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
    for uid_bus in list(Path("/dev/shm").iterdir()):
        if uid_bus.name.startswith(f"shmbus.{entry.pw_uid}."):
            uid_bus.unlink(missing_ok=True)
    shutil.rmtree(home, ignore_errors=True)
    subprocess.run(["userdel", name], capture_output=True)


# The other user's live bus: a coordinator and an agent in one process, which
# answers one line on stdin ("send": a message to itself, "peers": who it sees).
LIVE_BUS = """
import sys, shmbus
from shmbus.coordinator.coordinator import Coordinator
import threading
bus = sys.argv[1]
coord = Coordinator(bus, dlq="memory")
t = threading.Thread(target=coord.serve, daemon=True)
t.start()
with shmbus.connect(bus=bus, name="theirs") as me:
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "send":
            me.send("theirs", "still here")
            print(me.recv(timeout=10).payload, flush=True)
        elif line.strip() == "peers":
            print(",".join(me.peers()), flush=True)
coord.stop()
t.join(10)
coord.close()
"""


def _start_live(other: Other, bus: str) -> subprocess.Popen[str]:
    proc = other.popen(LIVE_BUS, bus)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=HANG)
        pytest.fail(f"the other user's bus did not start: {line!r} {err}")
    return proc


def _ask(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str], *, kill: bool = False) -> None:
    """End of stdin: the other user's bus stops cleanly (``kill``: SIGKILL)."""
    if kill and proc.poll() is None:
        proc.kill()
    try:
        proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_two_users_run_buses_of_one_name_apart(names, runtime, children, other):
    bus = names("bus")
    theirs = _start_live(other, bus)
    try:
        # Root's Runner on the same name: it took the other's for a killed
        # bus's leftovers and removed them, before names carried the owner.
        with shmbus.Runner(bus=bus) as runner, runner.connect("mine") as mine:
            mine.send("mine", "hello")
            assert mine.recv(timeout=10).payload == "hello"
            assert mine.peers() == ["mine"]
            assert _ask(theirs, "peers") == "theirs"
        assert _ask(theirs, "send") == "still here"
        assert bus_entries(bus, other.uid)  # all of theirs is still there
        assert bus_entries(bus) == []  # and nothing of ours is left
    finally:
        _stop(theirs)


def test_root_cleanup_never_touches_a_live_bus_of_another_user(names, runtime, other):
    bus = names("bus")
    theirs = _start_live(other, bus)
    try:
        before = bus_entries(bus, other.uid)
        own = _cli("cleanup", bus)
        assert own.returncode == 0 and "removed 0" in own.stdout
        every = _cli("cleanup", "--all-users", bus)
        assert every.returncode == 1, every
        assert f"{bus} (user {other.name}): live" in every.stdout
        assert bus_entries(bus, other.uid) == before
        listing = _cli("ls", "--all-users").stdout
        assert f"{bus} (user {other.name}): live" in listing
        assert _ask(theirs, "send") == "still here"
    finally:
        _stop(theirs, kill=True)  # the bus is left as a killed one is
    after = _cli("cleanup", "--all-users", bus)
    assert after.returncode == 0, after
    assert f"{bus} (user {other.name}): removed" in after.stdout
    assert bus_entries(bus, other.uid) == []


def test_another_user_cannot_list_dial_map_or_clean_a_bus(names, runtime, children, other):
    bus = names("bus")
    coordinator = start_coordinator(children, bus)
    try:
        with shmbus.connect(bus=bus, name="a") as a:
            routes = next(n for n in bus_entries(bus) if ".routes." in n)
            assert bus not in other.cli("ls").stdout  # only their own buses
            listed = other.cli("ls", "--all-users").stdout
            assert f"{bus} (user root): not readable by you" in listed
            refused = other.cli("cleanup", "--all-users", bus)
            assert refused.returncode == 1
            assert refused.stderr.strip().count("\n") == 0, refused.stderr  # one line
            assert "not yours" in refused.stderr and "Traceback" not in refused.stderr
            probe = other.run(
                """
                import sys, socket, shmbus
                from shmbus.core.routes import Table
                try:
                    Table.attach(sys.argv[1].removeprefix("shmbus."))
                except shmbus.ShmbusError as e:
                    print("map:", type(e).__name__)
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(sys.argv[2])
                except OSError as e:
                    print("dial:", type(e).__name__)
                try:
                    shmbus.connect(bus=sys.argv[3], name="spy")
                except shmbus.ShmbusError as e:
                    print("connect:", type(e).__name__)
                """,
                f"shmbus.{routes}" if not routes.startswith("shmbus.") else routes,
                str(shmbus.core.paths.socket_path(bus)),
                bus,
            )
            assert probe.stdout.split("\n")[:3] == [
                "map: SystemFailure",  # EACCES: a 0600 file of root's
                "dial: PermissionError",  # root's runtime dir is 0700
                "connect: CoordinatorUnavailable",  # their own bus of that name: none runs
            ], probe
            assert a.peers() == ["a"]
    finally:
        coordinator.terminate()
        coordinator.wait(HANG)


def test_a_runtime_dir_another_user_made_or_may_write_is_refused(monkeypatch, tmp_path, other):
    bus = "b"
    shared = Path(tempfile.mkdtemp(prefix="sbx", dir="/tmp"))
    try:
        # The /tmp fallback's flaw: someone else made the dir first.
        os.chmod(shared, 0o755)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
        (shared / "shmbus").mkdir(mode=0o700)
        os.chown(shared / "shmbus", other.uid, other.gid)
        with pytest.raises(shmbus.ForeignObject, match="must be a directory of this user"):
            make_runtime_dir(bus)
        with pytest.raises(shmbus.ForeignObject):
            shmbus.connect(bus=bus, name="x")
        os.rmdir(shared / "shmbus")
        # A parent others may write in without the sticky bit: they could
        # rename our dir away and put theirs in its place.
        os.chmod(shared, 0o777)
        with pytest.raises(shmbus.ForeignObject, match="others may replace"):
            check_runtime_dir(bus)
        os.chmod(shared, 0o1777)  # like /tmp: fine
        make_runtime_dir(bus)
        check_runtime_dir(bus)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_coordinator_socket_of_another_user_is_never_talked_to(names, runtime, other):
    bus = names("bus")
    spot = Path(tempfile.mkdtemp(prefix="sbs", dir="/tmp"))
    os.chmod(spot, 0o1777)
    listener = other.popen(
        """
        import socket, sys
        s = socket.socket(socket.AF_UNIX)
        s.bind(sys.argv[1])
        s.listen(4)
        print("ready", flush=True)
        while True:
            c, _ = s.accept()
            c.sendall(b"x" * 64)  # anything: we must not get as far as reading it
        """,
        str(spot / "evil.sock"),
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        # As if it had got into our dir (say, through a dir it owned before).
        os.symlink(spot / "evil.sock", make_runtime_dir(bus) / "control.sock")
        start = time.monotonic()
        with pytest.raises(shmbus.ForeignObject, match=f"uid {other.uid}, not of this user"):
            shmbus.connect(bus=bus, name="victim", timeout=5)
        assert time.monotonic() - start < HANG
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(spot / "evil.sock"))
        with pytest.raises(shmbus.ForeignObject):
            from shmbus.core.creds import check_peer

            check_peer(sock, "the listener")
        sock.close()
    finally:
        _stop(listener, kill=True)
        shutil.rmtree(spot, ignore_errors=True)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *argv], capture_output=True, text=True, timeout=HANG
    )
