"""The ``shmbus`` command: run a coordinator, a demo or a run file, list buses,
send and publish from scripts, see to the DLQ, clean up."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import sys
import time
from pathlib import Path

from ..coordinator import dlq
from ..core.paths import (
    all_buses,
    bus_is_live,
    coordinator_runs,
    find_segments,
    own_buses,
    remove_bus_shm,
    remove_killed_bus,
    routes_locked,
    runtime_dir,
    state_dir,
    validate_bus_or_agent,
)
from ..core.ring import Ring
from ..core.routes import Table
from ..core.stats import BusStats, StatsSegment, format_stats, inbox_fill
from ..errors import CoordinatorRunning, InvalidName, ShmbusError
from . import coordinator as _coordinator
from . import demo, report
from . import dlq as cli_dlq
from . import run as runfile
from . import send as cli_send
from . import tail as cli_tail

# ------------------------------------------------------------- ls, cleanup


def bus_names() -> list[str]:
    """This user's buses with anything on this machine: a runtime dir or
    shared memory of theirs."""
    names: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        names.update(p.name for p in runtime_dir("x").parent.iterdir() if p.is_dir())
    names.update(own_buses())
    return sorted(names)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _other_buses() -> list[tuple[int, str, list[str]]]:
    """Other users' buses, by the UID their names claim (what is done to
    them checks who owns each file)."""
    me = os.getuid()
    out = []
    for (uid, bus), entries in sorted(all_buses().items()):
        if uid != me:
            out.append((uid, bus, entries))
    return out


def _live_elsewhere(uid: int, bus: str) -> bool | None:
    """Does a coordinator of user ``uid`` run ``bus``? None when we may not
    look (not root)."""
    try:
        return routes_locked(bus, uid)
    except PermissionError:
        return None


def run_ls(all_users: bool = False) -> int:
    for bus in bus_names():
        live = coordinator_runs(bus)
        print(f"{bus}: {'live' if live else 'not running'}")
        if live:
            _list_agents(bus)
    if all_users:
        for uid, bus, entries in _other_buses():
            seen = _live_elsewhere(uid, bus)
            state = {True: "live", False: "not running", None: "not readable by you"}[seen]
            print(f"{bus} (user {_user(uid)}): {state}, {len(entries)} shared-memory entries")
    return 0


def _list_agents(bus: str) -> None:
    try:
        with Table.attach(find_segments(bus)[0]) as table:
            _, routes = table.read()
    except ShmbusError as e:
        print(f"  (routes unreadable: {e})")
        return
    for name, (agent_id, inbox, pid, _, transport, *_) in sorted(
        (routes or {}).get("agents", {}).items()
    ):
        if name.startswith("."):  # the coordinator's own (.history): not an agent
            continue
        try:
            with Ring.attach(inbox, lanes=True) as ring:
                fill = "{}/{} bytes".format(*ring.fill)
        except ShmbusError:
            fill = "inbox gone"
        print(f"  {name:20s} id {agent_id:<5d} pid {pid:<8d} {transport:4s} inbox {fill}")
    for pattern, names in sorted((routes or {}).get("subs", {}).items()):
        names = [n for n in names if not n.startswith(".")]
        if names:
            print(f"  sub {pattern} -> {', '.join(names)}")
    for pattern, n in sorted((routes or {}).get("history", {}).items()):
        print(f"  history {pattern}: the last {n} messages kept")


def state_bus_names() -> list[str]:
    """Buses with a state directory (a DLQ file), running or not."""
    names = []
    with contextlib.suppress(FileNotFoundError):
        for path in state_dir("x").parent.iterdir():
            with contextlib.suppress(InvalidName):  # not one of ours
                if path.is_dir():
                    names.append(validate_bus_or_agent(path.name, "bus"))
    return sorted(names)


def run_cleanup(buses: list[str], purge_dlq: bool = False, all_users: bool = False) -> int:
    """Remove what killed buses left; never touch a bus whose coordinator lives.

    Only this user's buses, unless ``all_users`` (root's business: nobody
    else may remove another user's files from /dev/shm). A bus's DLQ file is
    data, not debris: it stays unless ``purge_dlq``.
    """
    status = 0
    found = sorted(set(bus_names()) | set(state_bus_names() if purge_dlq else []))
    for bus in buses or found:
        validate_bus_or_agent(bus, "bus")
        try:
            removed = remove_killed_bus(bus)
        except OSError as e:
            hint = report.error_hint(e)
            print(
                f"shmbus cleanup: {bus}: not removed: {report.error_text(e)}"
                + (f"; {hint}" if hint else ""),
                file=sys.stderr,
            )
            status = 1
            continue
        if removed is None:
            print(f"{bus}: live (its coordinator holds the lock): left alone")
            status = status or (1 if buses else 0)
            continue
        print(f"{bus}: removed {len(removed)} shared-memory entries")
        status = max(status, _purge_dlq(bus) if purge_dlq else _say_dlq_kept(bus))
    if all_users:
        wanted = set(buses)
        for uid, bus, _ in _other_buses():
            if not wanted or bus in wanted:
                status = max(status, _cleanup_other(uid, bus, named=bool(wanted)))
    return status


def _cleanup_other(uid: int, bus: str, *, named: bool) -> int:
    """Another user's bus: removed only by root, only once its coordinator is
    dead, and only the files that user owns."""
    who = f"{bus} (user {_user(uid)})"
    if os.geteuid() != 0:
        print(
            f"shmbus cleanup: {who}: not yours: only its owner or root may remove it",
            file=sys.stderr,
        )
        return 1 if named else 0
    if _live_elsewhere(uid, bus):
        print(f"{who}: live (its coordinator holds the lock on its routes): left alone")
        return 1 if named else 0
    removed = remove_bus_shm(bus, uid)  # only the files that user owns
    print(f"{who}: removed {len(removed)} shared-memory entries")
    return 0


def _purge_dlq(bus: str) -> int:
    try:
        files = dlq.remove_files(bus)
    except (CoordinatorRunning, OSError) as e:
        print(f"{bus}: DLQ kept: {e}")
        return 1
    print(f"{bus}: removed its DLQ file" if files else f"{bus}: no DLQ file")
    return 0


def _say_dlq_kept(bus: str) -> int:
    if (state_dir(bus) / dlq.FILE).exists():
        print(f"{bus}: kept its DLQ, {state_dir(bus) / dlq.FILE} (--purge-dlq removes it)")
    return 0


# ------------------------------------------------------------------ stats


def read_stats(bus: str) -> BusStats:
    """A snapshot of a live bus's counters, straight from shared memory."""
    routes_seg, stats_seg = find_segments(bus)
    with Table.attach(routes_seg) as table, StatsSegment.attach(stats_seg) as stats:
        _, routes = table.read()
        return stats.snapshot(bus, inbox_fill((routes or {}).get("agents", {})))


def run_stats(buses: list[str], as_json: bool, watch: float | None) -> int:
    for bus in buses:
        validate_bus_or_agent(bus, "bus")  # named as typed, not as the segment it would be
    buses = buses or [b for b in bus_names() if bus_is_live(b)]
    if not buses:
        print("no live bus on this machine", file=sys.stderr)
        return 1
    try:
        while True:
            for bus in buses:
                try:
                    snap = read_stats(bus)
                except (ShmbusError, OSError) as e:
                    if not bus_is_live(bus):
                        why = f"no coordinator runs bus {bus!r}"
                        hint = "`shmbus ls` lists the buses of this machine"
                    else:
                        why = f"bus {bus!r}: {report.error_text(e)}"
                        hint = report.error_hint(e) or "is its coordinator running?"
                    print(f"shmbus stats: {why}, so no stats; {hint}", file=sys.stderr)
                    return 1
                print(json.dumps(snap.as_dict()) if as_json else format_stats(snap), flush=True)
            if watch is None:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0


# ----------------------------------------------------------------- bench


def run_bench(argv: list[str]) -> int:
    """Become bench/bench_bus.py (``--ring``: bench_ring.py, ``--aio``: bench_aio.py)
    of the source checkout.

    The process is replaced, not wrapped: Ctrl-C and SIGTERM reach the
    benchmark itself, which stops its children and removes its buses.
    """
    bench = Path(__file__).resolve().parents[2] / "bench"
    which = "ring" if "--ring" in argv else "aio" if "--aio" in argv else "bus"
    script = bench / f"bench_{which}.py"
    if not script.is_file():
        print(
            f"shmbus bench: no {script.name} in {bench}: the benchmarks ship with the "
            "source tree, not with the installed package; run this from a git checkout "
            "installed with pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return 2
    args = [a for a in argv if a not in ("--ring", "--aio")]
    if "-h" in args or "--help" in args:
        print(
            "usage: shmbus bench [--ring] [--aio] [ARGS ...]\n\n"
            f"Runs {bench / 'bench_bus.py'} (with --ring: bench_ring.py, with --aio: "
            "bench_aio.py) with ARGS.\n"
            f"The options of {script.name}:\n",
            flush=True,
        )
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(script), *args])


# ------------------------------------------------------------------ main


def _version() -> str:
    # The package's own __version__, read without importing the package (it
    # sits above the cli): running any of its modules has imported it.
    return str(getattr(sys.modules[__name__.partition(".")[0]], "__version__", "unknown"))


def main(argv: list[str] | None = None) -> int:
    """The ``shmbus`` command; returns its exit status.

    An error (any :class:`ShmbusError` or ``OSError``) that reaches here is
    one line on stderr, ``shmbus SUBCOMMAND: what happened; what to do``, and
    exit status 1; ``-v``/``--verbose`` or $SHMBUS_DEBUG=1 print its traceback
    too. Ctrl-C is one line and exit status 130.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the subcommand was known
        print("shmbus: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="shmbus", description=__doc__)
    parser.add_argument("--version", action="version", version=f"shmbus {_version()}")
    report.add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("coordinator", help="run a bus's coordinator", add_help=False)
    p = sub.add_parser("demo", help="run a few agents on a bus for a few seconds")
    p.add_argument("--bus", default="demo")
    p.add_argument("--seconds", type=float, default=3.0)
    sub.add_parser("bench", help="run the benchmarks (from a source checkout)", add_help=False)
    p = sub.add_parser("ls", help="list your buses, their agents and inbox fill")
    p.add_argument(
        "--all-users", action="store_true", help="also list other users' buses (names only)"
    )
    p = sub.add_parser("stats", help="a bus's counters: totals, per agent, per topic, DLQ")
    p.add_argument("--bus", action="append", default=[], help="a bus (default: every live one)")
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=1.0,
        metavar="SECONDS",
        help="print again every SECONDS (default 1) until interrupted",
    )
    p = sub.add_parser("cleanup", help="remove what your killed buses left (never a live bus)")
    p.add_argument("buses", nargs="*", help="bus names (default: every bus found)")
    p.add_argument(
        "--purge-dlq",
        action="store_true",
        help="also delete their dead-letter queues (kept by default: they are data)",
    )
    p.add_argument(
        "--all-users",
        action="store_true",
        help="also other users' killed buses (root only; a live one is never touched)",
    )
    cli_dlq.add_parser(sub)
    p = sub.add_parser("run", help="run a bus and its agents from a TOML file")
    p.add_argument("file", help="the run file, e.g. agents.toml")
    p.add_argument("--bus", help="run this bus instead of the file's")
    p.add_argument(
        "--for",
        dest="seconds",
        type=cli_send.positive_seconds,
        metavar="SECONDS",
        help="stop everything after this long (default: until the agents exit)",
    )
    p = sub.add_parser("send", help="send one message (or a request) to an agent")
    p.add_argument("recipient", metavar="RECIPIENT")
    cli_send.add_arguments(p, request=True)
    p = sub.add_parser("publish", help="publish one message on a topic")
    p.add_argument("topic", metavar="TOPIC")
    cli_send.add_arguments(p, request=False)
    cli_tail.add_parser(sub)
    for name, choice in sub.choices.items():
        if name not in ("coordinator", "bench"):  # those parse their own arguments
            report.add_verbose(choice)
    args, rest = parser.parse_known_args(argv)
    if args.command == "coordinator":
        return _coordinator.main(rest, verbose=args.verbose)
    if args.command == "bench":
        return run_bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    prog = f"shmbus {args.command}"
    if args.command == "dlq":
        prog += f" {args.dlq_command}"
    if args.command in ("send", "publish", "tail", "dlq") and args.bus is None:
        print(f"{prog}: which bus? give --bus NAME, or set $SHMBUS_BUS", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except CoordinatorRunning as e:
        hint = f"run the demo on a bus of its own: shmbus demo --bus {args.bus}-2"
        return report.report(
            prog, e, verbose=args.verbose, hint=hint if args.command == "demo" else ""
        )
    except (ShmbusError, OSError, KeyboardInterrupt) as e:
        return report.report(prog, e, verbose=args.verbose)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        if bus_is_live(args.bus):  # said here, before a Runner starts a coordinator to fail
            raise CoordinatorRunning(f"bus {args.bus!r} is in use: a coordinator runs it")
        return demo.run_demo(args.bus, args.seconds)
    if args.command == "ls":
        return run_ls(args.all_users)
    if args.command == "stats":
        return run_stats(args.bus, args.json, args.watch)
    if args.command == "run":
        return runfile.main(args.file, bus=args.bus, seconds=args.seconds)
    if args.command == "send":
        return cli_send.run_send(args)
    if args.command == "publish":
        return cli_send.run_publish(args)
    if args.command == "dlq":
        return cli_dlq.run(args)
    if args.command == "tail":
        return cli_tail.run(args)
    return run_cleanup(args.buses, args.purge_dlq, args.all_users)


if __name__ == "__main__":
    sys.exit(main())
