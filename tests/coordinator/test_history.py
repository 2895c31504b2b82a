"""Topic history: the coordinator keeps the last N messages of opted-in
patterns for late joiners, and `shmbus tail PATTERN` prints messages as they pass."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shmbus
from shmbus.coordinator.history import HISTORY, MAX_KEPT_FRAME, PAGE_BYTES
from shmbus.core.paths import find_own, remove_bus_shm
from shmbus.core.routes import MAX_KEEP
from tests.conftest import start_coordinator

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


@pytest.fixture
def hbus(names, children, runtime):
    """A coordinator keeping the last 5 of events.* and the last 3 of events.>."""
    bus = names("bus")
    proc = start_coordinator(children, bus, "--history", "events.*=5", "--history=events.>=3")
    try:
        yield bus
    finally:
        proc.terminate()
        proc.wait(10)


def _publisher(bus: str, plan: list[tuple[str, object]]) -> None:
    """An agent in another process: publishes ``plan`` in order, then leaves."""
    with shmbus.connect(bus=bus, name="publisher") as agent:
        for topic, payload in plan:
            agent.publish(topic, payload)


def _publish_elsewhere(children, bus: str, plan: list[tuple[str, object]]) -> None:
    proc = children.start(_publisher, bus, plan)
    proc.join(60)
    assert proc.exitcode == 0


def test_keeps_exactly_the_last_n_per_pattern_in_order(hbus, children):
    plan = [(f"events.{'a' if i % 2 else 'b'}", i) for i in range(20)]
    plan += [("events.deep.x", "d1"), ("other", "o"), ("events", "e"), ("events.deep.y", "d2")]
    _publish_elsewhere(children, hbus, plan)
    with shmbus.connect(bus=hbus, name="late") as late:
        assert [m.payload for m in late.history("events.*")] == [15, 16, 17, 18, 19]
        # Overlapping: events.> keeps its own last 3, two levels deep included.
        assert [m.payload for m in late.history("events.>")] == [19, "d1", "d2"]
        got = late.history("events.*")
        assert {m.topic for m in got} == {"events.a", "events.b"}
        assert all(m.sender == "publisher" and m.type == shmbus.MessageType.PUBLISH for m in got)
        # Not matching any kept pattern: not kept.
        assert late.history("other") == [] and late.history("events") == []


def test_a_query_selects_from_what_is_kept_once_in_order(hbus, children):
    plan = [("events.a", 1), ("events.deep.x", 2), ("events.b", 3), ("events.a", 4)]
    _publish_elsewhere(children, hbus, plan)
    with shmbus.connect(bus=hbus, name="late") as late:
        # A topic, or a pattern nobody keeps: from every kept pattern, each message once.
        assert [m.payload for m in late.history("events.a")] == [1, 4]
        assert [m.payload for m in late.history(">")] == [1, 2, 3, 4]
        assert [m.payload for m in late.history(">", n=2)] == [3, 4]
        assert [m.payload for m in late.history("events.*", n=1)] == [4]


def test_history_runs_from_the_coordinators_thread_not_from_an_agent(hbus, children):
    # Everything a publisher published before the ask is in the answer, at
    # once: no waiting for the history to catch up.
    with shmbus.connect(bus=hbus, name="pub") as pub:
        for i in range(3):
            pub.publish("events.now", i)
            assert pub.history("events.now")[-1].payload == i


def test_keep_history_at_run_time_resize_and_stop(bus, children):
    with shmbus.connect(bus=bus, name="admin") as admin:
        assert admin.history(">") == []  # nothing kept: no history inbox either
        admin.keep_history("logs.*", 4)
        _publish_elsewhere(children, bus, [("logs.app", i) for i in range(10)])
        assert [m.payload for m in admin.history("logs.*")] == [6, 7, 8, 9]
        admin.keep_history("logs.*", 2)  # fewer: the oldest go
        assert [m.payload for m in admin.history("logs.*")] == [8, 9]
        admin.keep_history("logs.*", 0)  # stop: forgotten, and no longer kept
        admin.publish("logs.app", "after")
        assert admin.history("logs.*") == []
        assert "logs.*" not in admin._out.subs


def test_a_runner_starts_its_coordinator_with_the_history_asked_for(names, runtime):
    with shmbus.Runner(bus=names("bus"), history={"events.*": 2, "x": 1}) as runner:
        agent = runner.connect("a")
        for i in range(3):
            agent.publish("events.a", i)
        assert [m.payload for m in agent.history("events.*")] == [1, 2]


def test_bad_patterns_and_counts_are_refused_with_clear_errors(hbus, runtime, names):
    with shmbus.connect(bus=hbus, name="admin") as admin:
        for pattern, n in [("a..b", 1), ("a.>.b", 1), ("", 1), (3, 1)]:
            with pytest.raises(shmbus.InvalidName, match="pattern"):
                admin.keep_history(pattern, n)
        for n in [-1, MAX_KEEP + 1, 1.5, "3", None]:
            with pytest.raises(shmbus.errors.InvalidArgument, match=f"0 to {MAX_KEEP}"):
                admin.keep_history("events.*", n)
        with pytest.raises(shmbus.errors.InvalidArgument, match=f"1 to {MAX_KEEP}"):
            admin.history("events.*", n=0)
        with pytest.raises(shmbus.errors.InvalidArgument):
            shmbus.Runner(bus=names("other"), history={"events.*": 0})
    for spec, why in [
        ("events.*", "give PATTERN=N"),
        ("events.*=0", "keep 1 to"),
        ("a..b=3", "invalid pattern 'a..b'"),
        ("events.*=x", "give PATTERN=N"),
        (f"e=1{MAX_KEEP}", f"keep 1 to {MAX_KEEP} messages"),
    ]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "shmbus",
                "coordinator",
                "--bus",
                names("bad"),
                "--history",
                spec,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert result.returncode == 2
        assert f"--history {spec!r}: " in result.stderr and why in result.stderr


def test_the_history_inbox_is_no_agent(hbus):
    with shmbus.connect(bus=hbus, name="a") as a:
        a.publish("events.x", 1)
        assert a.peers() == ["a"]
        assert a.history("events.x")  # read by the history: counted as received
        stats = a.stats()
        assert set(stats.agents) == {"a"}
        assert stats.totals.sent == stats.totals.received == 1
        with pytest.raises(shmbus.UnknownRecipient):
            a.send(HISTORY, "hello")
        with pytest.raises(shmbus.InvalidName):
            shmbus.connect(bus=hbus, name=HISTORY)
        ls = subprocess.run(
            [sys.executable, "-m", "shmbus", "ls"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        mine = ls.stdout[ls.stdout.index(f"{hbus}: live") :].split("\n\n")[0]
        assert HISTORY not in mine and "  a " in mine
        assert "history events.*: the last 5 messages kept" in mine
    # UnknownRecipient dead-lettered that send; nothing else went there.
    with shmbus.connect(bus=hbus, name="b") as b:
        assert [d.message.recipient for d in b.dlq()] == [HISTORY]


def test_large_histories_come_in_pages_and_huge_frames_are_not_kept(bus):
    with shmbus.connect(bus=bus, name="a") as a:
        a.keep_history("big", 10)
        blobs = [bytes([i]) * (PAGE_BYTES // 3) for i in range(8)]  # more than two pages
        for blob in blobs:
            a.publish("big", blob)
        a.publish("big", b"x" * (MAX_KEPT_FRAME + 1))  # published, just not kept
        assert [m.payload for m in a.history("big")] == blobs
        assert a.dlq() == []


def test_a_burst_of_publishes_never_waits_for_the_history(hbus):
    # With backpressure "error", a full history inbox would raise InboxFull
    # or dead-letter copies: it must take the whole burst.
    with shmbus.connect(bus=hbus, name="fast", backpressure="error") as fast:
        for i in range(100_000):
            fast.publish("events.burst", i)
        for start in range(0, 100_000, 1000):
            fast.publish_many("events.burst", list(range(start, start + 1000)))
        assert [m.payload for m in fast.history("events.*")] == list(range(99_995, 100_000))
        assert fast.dlq() == []
        assert fast.stats().totals.failed == 0


def _dies_mid_record(bus: str, inbox: str) -> None:
    """Reserves room in the history inbox and dies before writing it."""
    with shmbus.connect(bus=bus, name="writer") as agent:
        with shmbus.Ring.attach(inbox) as ring:
            ring._test_reserve(200)
            agent.send("other", "reserved")
            time.sleep(60)  # killed here


def test_history_moves_past_a_record_a_dead_writer_left(hbus, children):
    with shmbus.connect(bus=hbus, name="other") as other:
        proc = children.start(_dies_mid_record, hbus, find_own(hbus, "history"))
        assert other.recv(timeout=20).payload == "reserved"
        other.publish("events.x", "behind")  # stuck behind the reservation while it lives
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        deadline = time.monotonic() + 20
        while not other.history("events.x"):
            assert time.monotonic() < deadline, "the history stayed blocked"
            time.sleep(0.05)
        assert [m.payload for m in other.history("events.x")] == ["behind"]


def test_a_restarted_coordinator_keeps_its_command_line_patterns(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus, "--history", "events.*=3")
    old = shmbus.connect(bus=bus, name="old")
    try:
        old.publish("events.a", 1)
        assert old.history("events.*")
        first.kill()  # its history inbox is left behind in /dev/shm
        first.wait(10)
        second = start_coordinator(children, bus, "--history", "events.*=3")
        try:
            # The old agent's routes still lead to the old inbox: the new
            # coordinator took it over.
            old.publish("events.a", 2)
            _publish_elsewhere(children, bus, [("events.a", 3)])
            with shmbus.connect(bus=bus, name="late") as late:
                # In memory: 1 went with the first coordinator.
                assert [m.payload for m in late.history("events.*")] == [2, 3]
        finally:
            second.terminate()
            second.wait(10)
    finally:
        old.close()  # its coordinator is gone: it leaves by itself


def test_publishes_on_a_kept_topic_go_on_while_the_coordinator_is_dead(
    names, children, runtime
) -> None:
    """Found in review: publishers keep publishing on kept topics while no coordinator runs."""
    # The history inbox (32 MiB) has no reader once the coordinator is
    # killed; publishers must not wait for it, nor dead-letter its copies.
    bus = names("bus")
    coord = start_coordinator(children, bus, "--history", "t.*=10")
    try:
        _publish_while_dead(bus, coord)
    finally:
        remove_bus_shm(bus)  # what the killed coordinator left


def _publish_while_dead(bus, coord) -> None:
    with (
        shmbus.connect(bus=bus, name="pub", send_timeout=0.2) as pub,
        shmbus.connect(bus=bus, name="sub") as sub,
    ):
        sub.subscribe("t.x")
        coord.send_signal(signal.SIGKILL)
        coord.wait(10)
        payload = b"x" * (256 << 10)
        for _ in range(200):  # 50 MiB: more than the history inbox holds
            pub.publish("t.x", payload)
            assert sub.recv(timeout=10).payload == payload
        assert not pub._dlq_kept, f"{len(pub._dlq_kept)} dead letters for the history"


# ------------------------------------------------------------------ tail


def _tail(children, bus: str, *args: str) -> subprocess.Popen[str]:
    """`shmbus tail` in a subprocess, once it says it is tailing."""
    proc = children.popen(
        [sys.executable, "-m", "shmbus", "tail", "--bus", bus, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    line = _line(proc.stderr)  # once it is subscribed (or "" if it exits)
    assert line.startswith("tailing "), line + proc.stderr.read()
    return proc


def _line(stream, timeout: float = 60.0) -> str:  # type: ignore[no-untyped-def]
    """The next line of a child's output, waiting at most ``timeout``."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line within {timeout}s"
    return stream.readline()  # type: ignore[no-any-return]


def test_tail_prints_what_is_published_after_it_starts_and_stops_at_count(bus, children):
    with shmbus.connect(bus=bus, name="pub") as pub:
        pub.publish("sensors.temp", "before")  # nobody tails yet: not printed
        tail = _tail(children, bus, "sensors.*", "--count", "4")
        pub.publish("sensors.temp", {"celsius": 21.5})
        pub.publish("other.topic", "not printed")
        pub.publish("sensors.raw", b"\x00\xffbytes")
        pub.publish("sensors.image", np.arange(1000, dtype=np.uint16))
        pub.publish("sensors.load", "x" * 5000)
        out, err = tail.communicate(timeout=60)
        assert tail.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 4
        assert " sensors.temp from pub #" in lines[0] and "{'celsius': 21.5}" in lines[0]
        assert "sensors.raw" in lines[1] and r"b'\x00\xffbytes'" in lines[1]
        assert "array([  0,   1,   2, ..., 997, 998, 999]" in lines[2]  # summarised
        assert len(lines[3]) < 1000 and "(5002 characters)" in lines[3]
        assert pub.peers() == ["pub"]  # the tail left the bus
        assert pub.dlq() == []  # and its leftovers are no dead letters


def test_tail_history_prints_the_kept_messages_first_each_once(hbus, children):
    with shmbus.connect(bus=hbus, name="pub") as pub:
        for i in range(7):
            pub.publish("events.a", i)
        tail = _tail(children, hbus, "events.*", "--history", "--json", "--count", "7")
        pub.publish("events.b", "live")
        pub.publish("events.b", b"\x01\x02")
        out, err = tail.communicate(timeout=60)
        assert tail.returncode == 0, err
        got = [json.loads(line) for line in out.splitlines()]
        assert [g["payload"] for g in got] == [2, 3, 4, 5, 6, "live", "AQI="]
        assert {g["topic"] for g in got[:5]} == {"events.a"}
        assert all(g["sender"] == "pub" and g["id"] > 0 and g["time"] > 0 for g in got)


def test_tail_ends_cleanly_on_sigterm_and_ctrl_c(bus, children):
    with shmbus.connect(bus=bus, name="pub") as pub:
        for sig in (signal.SIGTERM, signal.SIGINT):
            tail = _tail(children, bus, ">")
            pub.publish("a.b", 1)
            assert _line(tail.stdout).endswith(": 1\n")
            pub.publish("a.b", 2)  # perhaps unread when the signal comes: dropped
            tail.send_signal(sig)
            _, err = tail.communicate(timeout=60)
            assert tail.returncode == 0 and "Traceback" not in err
            assert pub.peers() == ["pub"]
        assert pub.dlq() == []


def test_tail_refuses_bad_arguments_and_a_missing_bus(names, runtime):
    def tail(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shmbus", "tail", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )

    result = tail("--bus", names("nobus"), "a.>.b")
    assert result.returncode == 2 and "invalid pattern" in result.stderr
    result = tail("--bus", names("nobus"), "a.b")
    assert result.returncode == 1 and "no coordinator runs bus" in result.stderr
    result = tail("--bus", names("nobus"), "a.b", "--count", "0")
    assert result.returncode == 2
