"""The shmbus command's errors: one line (``shmbus SUB: what; what to do``) and
exit status 1, the traceback only with -v or SHMBUS_DEBUG=1; Ctrl-C is one
line and 130; --version; --bus optional in the usage where $SHMBUS_BUS serves."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys

import pytest

import shmbus
from shmbus.cli import coordinator as cli_coordinator
from tests.conftest import start_coordinator

cli_main = importlib.import_module("shmbus.cli.main")  # shmbus.cli.main is also the function


def shmbus_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("SHMBUS_DEBUG", "SHMBUS_BUS")}
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**full, **(env or {})},
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


BAD = "invalid bus name 'a/b'"


@pytest.mark.parametrize(
    "args",
    [
        ("coordinator", "--bus", "a/b"),
        ("stats", "--bus", "a/b"),
        ("cleanup", "a/b"),
        ("demo", "--bus", "a/b"),
    ],
    ids=lambda a: a[0],
)
def test_a_bad_bus_name_is_one_line_naming_it_as_typed(args, runtime):
    result = shmbus_cli(*args)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"shmbus {args[0]}: {BAD}") and "a/b.routes" not in line
    assert "letters, digits" in line  # and what a name may be


@pytest.mark.parametrize("how", [("-v",), ("--verbose",), ("SHMBUS_DEBUG",)])
def test_the_traceback_comes_with_verbose_or_shmbus_debug(how, runtime):
    env = {"SHMBUS_DEBUG": "1"} if how == ("SHMBUS_DEBUG",) else {}
    flags = () if env else how
    for sub, args in (
        ("coordinator", ("coordinator", *flags, "--bus", "a/b")),
        ("stats", (*flags, "stats", "--bus", "a/b")),
    ):
        result = shmbus_cli(*args, env=env)
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "InvalidName" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"shmbus {sub}: {BAD}")
    result = shmbus_cli("stats", "-v", "--bus", "a/b")  # after the subcommand, too
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_demo_on_a_bus_in_use_says_so_and_what_to_do(names, runtime, children):
    bus = names("bus")
    first = start_coordinator(children, bus)
    result = shmbus_cli("demo", "--bus", bus, "--seconds", "1")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"bus {bus!r} is in use" in line and f"shmbus demo --bus {bus}-2" in line
    first.terminate()
    assert first.wait(10) == 0


def test_stats_of_a_bus_nobody_runs_names_it_not_its_segment(names, runtime):
    bus = names("none")
    result = shmbus_cli("stats", "--bus", bus)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert f"no coordinator runs bus {bus!r}" in line and "no stats" in line
    assert ".routes" not in line and "shmbus ls" in line


def _permission_denied(*args: object) -> list[str]:
    raise PermissionError(errno.EACCES, "Permission denied", "/dev/shm/shmbus.other.routes")


def test_a_bus_of_another_user_is_one_line_per_bus_in_cleanup(monkeypatch, capsys, runtime):
    # Root can unlink anything, so the refusal a non-root user meets is staged.
    monkeypatch.setattr(cli_main, "remove_killed_bus", _permission_denied)
    assert cli_main.main(["cleanup", "other", "another"]) == 1
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in out.err
    assert lines[0] == (
        "shmbus cleanup: other: not removed: Permission denied: /dev/shm/shmbus.other.routes; "
        "it belongs to another user: run this as that user"
    )
    assert lines[1].startswith("shmbus cleanup: another: not removed")


def test_any_shmbus_or_os_error_reaching_main_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "run_ls", _permission_denied)
    assert cli_main.main(["ls"]) == 1
    err = capsys.readouterr().err
    assert one_line(err) == (
        "shmbus ls: Permission denied: /dev/shm/shmbus.other.routes; "
        "it belongs to another user: run this as that user"
    )

    def unavailable(*args: object) -> int:
        raise shmbus.CoordinatorUnavailable("no coordinator answers for bus 'x'")

    monkeypatch.setattr(cli_main, "run_ls", unavailable)
    assert cli_main.main(["ls"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("shmbus ls: no coordinator answers for bus 'x'; is its coordinator")
    monkeypatch.setenv("SHMBUS_DEBUG", "1")
    assert cli_main.main(["ls"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SHMBUS_DEBUG", "0")
    assert cli_main.main(["ls"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_a_subcommand_is_one_line_and_130(monkeypatch, capsys):
    def interrupted(*args: object, **kw: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_main, "run_ls", interrupted)
    assert cli_main.main(["ls"]) == 130
    assert one_line(capsys.readouterr().err) == "shmbus ls: interrupted"
    monkeypatch.setattr(cli_main.cli_send, "_await_bus", interrupted)
    assert cli_main.main(["send", "--bus", "b", "w", "1"]) == 130
    assert one_line(capsys.readouterr().err) == "shmbus send: interrupted"
    monkeypatch.setattr(cli_coordinator, "Coordinator", interrupted)
    assert cli_coordinator.main(["--bus", "b"]) == 130
    assert one_line(capsys.readouterr().err) == "shmbus coordinator: interrupted"


def test_version():
    result = shmbus_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"shmbus {shmbus.__version__}"


@pytest.mark.parametrize(
    "args",
    [("send", "w", "1"), ("publish", "t", "1"), ("tail", "t"), ("dlq", "list"), ("dlq", "purge")],
    ids=" ".join,
)
def test_bus_is_optional_in_the_usage_and_asked_for_when_missing(args):
    command = args[:2] if args[0] == "dlq" else args[:1]
    usage = shmbus_cli(*command, "-h")
    assert usage.returncode == 0 and "[--bus BUS]" in usage.stdout
    missing = shmbus_cli(*args)
    assert missing.returncode == 2
    assert one_line(missing.stderr) == (
        f"shmbus {' '.join(command)}: which bus? give --bus NAME, or set $SHMBUS_BUS"
    )
    with_env = shmbus_cli(*args, "-h", env={"SHMBUS_BUS": "b"})
    assert "[--bus BUS]" in with_env.stdout
