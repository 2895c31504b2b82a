"""Coordinator restart: agents outlive a killed coordinator, and a new one takes the bus over."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

import shmbus
from shmbus import MessageType
from shmbus.core.paths import find_segments, socket_path
from tests.conftest import start_coordinator


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met in time"
        time.sleep(0.02)


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def take_over(children, bus: str, *args: str, **kw) -> subprocess.Popen[bytes]:
    """A new coordinator for a bus whose coordinator was killed, once it listens."""
    socket_path(bus).unlink(missing_ok=True)  # the killed one's: start_coordinator waits for it
    if not kw:
        return start_coordinator(children, bus, *args)
    proc = children.popen(
        [sys.executable, "-m", "shmbus", "coordinator", "--bus", bus, *args], **kw
    )
    wait_for(lambda: socket_path(bus).exists() or proc.poll() is not None, what="listening")
    assert proc.poll() is None, "the coordinator exited"
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(10) == 0


def bus_entries(bus: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if f".{bus}." in n]


def _echo(bus: str) -> None:
    """Answers whatever comes: direct messages and publishes to their sender
    (publishes to "driver"), requests with a response; "stop" ends it."""
    with shmbus.connect(bus=bus, name="echo") as agent:
        agent.subscribe("t.>")
        agent.send("driver", "ready")
        for msg in agent:
            if msg.payload == "stop":
                return
            if msg.type == MessageType.REQUEST:
                agent.reply(msg, {"echo": msg.payload})
            elif msg.type == MessageType.PUBLISH:
                agent.send("driver", {"pub": msg.payload})
            elif msg.type == MessageType.DIRECT:
                agent.send(msg.sender, {"echo": msg.payload})


def _holder(bus: str) -> None:
    """Joins, says so, and then reads nothing until it is killed."""
    with shmbus.connect(bus=bus, name="holder") as agent:
        agent.send("driver", "ready")
        time.sleep(60)


def exchange(driver: shmbus.Agent, tag: object) -> None:
    """A direct message, a publish and a request to the echo agent, and their answers."""
    driver.send("echo", tag)
    assert driver.recv(timeout=10).payload == {"echo": tag}
    driver.publish("t.x", tag)
    assert driver.recv(timeout=10).payload == {"pub": tag}
    assert driver.request("echo", tag, timeout=10).payload == {"echo": tag}


def test_agents_keep_talking_and_rejoin_a_coordinator_that_takes_over(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus)
    with shmbus.connect(bus=bus, name="driver") as driver:
        echo = children.start(_echo, bus)
        assert driver.recv(timeout=20).payload == "ready"
        exchange(driver, 0)
        before = driver.stats()
        kill(first)
        for i in range(1, 6):  # over the routes they have
            exchange(driver, i)
        new = take_over(children, bus)
        driver.subscribe("u.*")  # waits for the driver to rejoin
        ls = subprocess.run(
            [sys.executable, "-m", "shmbus", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        lines = ls.splitlines()
        at = lines.index(f"{bus}: live")
        section = itertools.takewhile(lambda line: line.startswith("  "), lines[at + 1 :])
        listed = [line.split()[0] for line in section if "id" in line.split()]
        assert listed == ["driver", "echo"]
        assert driver.peers() == ["driver", "echo"]
        after = driver.stats()
        for name in ("driver", "echo"):  # the same slots, counting on
            assert after.agents[name].id == before.agents[name].id
            assert after.agents[name].sent >= before.agents[name].sent + 10
        assert after.totals.sent >= before.totals.sent + 20
        exchange(driver, "after")
        # A newcomer reaches the old agents and they reach it.
        with shmbus.connect(bus=bus, name="late") as late:
            assert late.id > max(a.id for a in before.agents.values())
            late.send("echo", "hi")
            assert late.recv(timeout=10).payload == {"echo": "hi"}
            late.subscribe("t.>")
            driver.publish("t.y", "both")
            assert late.recv(timeout=10).payload == "both"
            assert driver.recv(timeout=10).payload == {"pub": "both"}
            driver.send("late", "direct")
            assert late.recv(timeout=10).payload == "direct"
            late.publish("u.1", "to the driver")  # the subscription made after the takeover
            assert driver.recv(timeout=10).payload == "to the driver"
        driver.send("echo", "stop")
        echo.join(20)
        assert echo.exitcode == 0
    stop(new)
    assert bus_entries(bus) == []


def test_an_agent_killed_while_no_coordinator_runs_is_found_dead(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus)
    with shmbus.connect(bus=bus, name="driver") as driver:
        died: list[str] = []
        driver.on_peer_death(died.append)
        holder = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        kill(first)
        ids = driver.send_many("holder", list(range(20)))  # into its inbox, unread
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        new = take_over(children, bus)

        def told() -> bool:
            try:
                driver.recv(timeout=0.05)
            except shmbus.RecvTimeout:
                pass
            return died == ["holder"]

        wait_for(told, what="the driver told of the death")
        assert driver.peers() == ["driver"]
        dead = [d for d in driver.dlq() if d.message.recipient == "holder"]
        assert [d.message.id for d in dead] == ids
        assert all(d.reason.startswith("recipient died: 'holder'") for d in dead)
        assert not [n for n in bus_entries(bus) if ".inbox.holder" in n]
    stop(new)
    assert bus_entries(bus) == []


def test_an_inbox_its_coordinator_died_before_draining_goes_to_the_dlq(names, children, runtime):
    from shmbus.core.message import encode_frame
    from shmbus.core.paths import inbox_name

    bus = names("bus")
    first = start_coordinator(children, bus)
    with shmbus.connect(bus=bus, name="driver") as driver:
        kill(first)
        # As a coordinator killed between taking "ghost" off the routes and
        # draining its inbox leaves it: an inbox on no agent's entry.
        with shmbus.Ring.create(inbox_name(bus, "ghost"), 1 << 16, lanes=3) as ghost:
            for i in range(3):
                ghost.lane(50 * i).write(
                    encode_frame(
                        int(MessageType.DIRECT),
                        sender=b"driver",
                        recipient=b"ghost",
                        payload=b"%d" % i,
                        msg_id=100 + i,
                        priority=50 * i,
                    )
                )
            ghost.owner = False  # its removal is the new coordinator's job
        new = take_over(children, bus)
        wait_for(lambda: len(driver.dlq()) == 3, what="the stray inbox drained")
        dead = driver.dlq()
        assert [d.message.id for d in dead] == [102, 101, 100]  # highest lane first
        assert all(d.reason.startswith("recipient left: 'ghost'") for d in dead)
        assert not [n for n in bus_entries(bus) if ".inbox.ghost" in n]
        assert driver.peers() == ["driver"]
    stop(new)
    assert bus_entries(bus) == []


def test_an_agent_killed_before_it_rejoins_is_found_dead(names, children, runtime):
    # Alive when the new coordinator takes over, dead before it rejoins: the
    # coordinator looks at the processes of agents that have not rejoined.
    bus = names("bus")
    first = start_coordinator(children, bus)
    with shmbus.connect(bus=bus, name="driver") as driver:
        holder = children.start(_holder, bus)
        assert driver.recv(timeout=20).payload == "ready"
        os.kill(holder.pid, signal.SIGSTOP)  # it cannot rejoin
        kill(first)
        new = take_over(children, bus)
        driver.subscribe("x")  # the driver is back
        assert driver.peers() == ["driver", "holder"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        wait_for(lambda: driver.peers() == ["driver"], what="the holder gone")
    stop(new)
    assert bus_entries(bus) == []


def test_dead_letters_made_while_no_coordinator_runs_reach_the_dlq(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus)
    with (
        shmbus.connect(bus=bus, name="a") as a,
        shmbus.connect(bus=bus, name="b") as b,
    ):
        kill(first)
        with pytest.raises(shmbus.UnknownRecipient):
            a.send("nobody", "lost?")
        a.send("b", "stale", ttl=0.05)
        time.sleep(0.1)
        with pytest.raises(shmbus.RecvTimeout):
            b.recv(timeout=0.2)  # expired: to the DLQ, which is down
        new = take_over(children, bus)

        def reasons() -> dict[object, str]:
            return {d.message.payload: d.reason for d in a.dlq()}

        wait_for(lambda: len(reasons()) == 2, what="both dead letters in the DLQ")
        got = reasons()
        assert got["lost?"].startswith("no recipient")
        assert got["stale"].startswith("expired")
    stop(new)
    assert bus_entries(bus) == []


def test_a_control_call_waits_for_the_takeover_then_says_why(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus)
    with shmbus.connect(bus=bus, name="a", timeout=0.5) as a:
        kill(first)
        with pytest.raises(shmbus.CoordinatorUnavailable, match="none took the bus over"):
            a.subscribe("t")
        new = take_over(children, bus)
        a._ctl.timeout = 20.0
        a.subscribe("t")  # waits for the rejoin, then goes through
        assert a.peers() == ["a"]
    stop(new)
    assert bus_entries(bus) == []


def test_a_corrupt_routes_table_makes_a_fresh_bus(names, children, runtime, tmp_path):
    bus = names("bus")
    first = start_coordinator(children, bus)
    old = shmbus.connect(bus=bus, name="old", timeout=20)
    try:
        kill(first)
        with open(f"/dev/shm/shmbus.{find_segments(bus)[0]}", "r+b") as f:
            f.write(b"garbage!")  # over its magic
        log = tmp_path / "coordinator.log"
        with open(log, "wb") as out:
            new = take_over(children, bus, stderr=out)
        with shmbus.connect(bus=bus, name="new") as fresh:
            assert fresh.peers() == ["new"]
            with pytest.raises(shmbus.RejoinRefused, match="fresh bus"):
                old.subscribe("t")
        text = log.read_text()
        assert "routes table left behind is unusable" in text
        assert "starting a fresh bus" in text
    finally:
        old.close()
    stop(new)
    assert bus_entries(bus) == []


def _runner_echo(agent: shmbus.Agent) -> None:
    agent.send("driver", "ready")
    for msg in agent:
        if msg.type == MessageType.REQUEST:
            agent.reply(msg, msg.payload)


def test_runner_restart_after_kill_takes_the_bus_over(names, runtime):
    bus = names("bus")
    with shmbus.Runner(bus=bus) as runner:
        driver = runner.connect("driver")
        runner.spawn("echo", _runner_echo)
        assert driver.recv(timeout=20).payload == "ready"
        runner.coordinator.kill()
        assert driver.request("echo", 1, timeout=10).payload == 1
        runner.coordinator.restart()
        assert runner.coordinator.alive
        driver.subscribe("t")  # rejoined: the same bus, not a fresh one
        assert driver.peers() == ["driver", "echo"]
        assert driver.request("echo", 2, timeout=10).payload == 2
    assert bus_entries(bus) == []


def test_a_graceful_restart_hands_the_bus_over(names, runtime):
    """runner.coordinator.restart() (SIGHUP) leaves the bus as it is: nothing
    in any inbox is drained, and the agents rejoin the new coordinator."""
    bus = names("bus")
    with shmbus.Runner(bus=bus, history={"h.*": 10}) as runner:
        driver = runner.connect("driver")
        runner.spawn("echo", _runner_echo)
        assert driver.recv(timeout=20).payload == "ready"
        driver.publish("h.1", "kept")
        driver.send("driver", "unread")  # sits in its inbox through the restart
        before = driver.stats().totals.sent
        runner.coordinator.restart()
        assert runner.coordinator.alive
        assert driver.recv(timeout=5).payload == "unread"
        assert driver.request("echo", 3, timeout=10).payload == 3
        driver.subscribe("t")  # rejoined: the same bus, not a fresh one
        assert driver.peers() == ["driver", "echo"]
        assert driver.stats().totals.sent > before  # counters carried on
        assert driver.dlq() == []  # nothing was drained
    assert bus_entries(bus) == []


def test_what_the_table_holds_is_checked_and_the_coordinators_own_inbox_skipped():
    from shmbus.coordinator.takeover import _parse
    from shmbus.core.paths import bus_prefix, inbox_name

    inbox = inbox_name("b", "a")
    agents = {"a": [3, inbox, 100, 1, "shm"], ".history": [0, "b.history", 99, 2, "shm"]}
    subs = {"x.*": ["a", ".history"], "y": [".history"]}
    got, got_subs, next_id = _parse("b", {"agents": agents, "subs": subs, "next_id": 7})
    assert got == {"a": (3, inbox, 100, 1, "shm")}
    assert got_subs == {"x.*": ["a"], "y": []}
    assert next_id == 7
    for bad in (
        [],
        {"agents": {"a": [3, inbox_name("b", "other"), 100, 1, "shm"]}, "subs": {}},
        {"agents": {"a": [3, inbox_name("c", "a"), 100, 1, "shm"]}, "subs": {}},
        {"agents": {"a": [3, f"{bus_prefix('b')}inbox.a", 100, 1, "shm"]}, "subs": {}},
        {"agents": {"a": [3, inbox, -1, 1, "shm"]}, "subs": {}},
        {"agents": {"bad name": [3, "b.inbox.bad name", 1, 1, "shm"]}, "subs": {}},
        {"agents": {}, "subs": {"a..b": ["a"]}},
    ):
        with pytest.raises(ValueError):
            _parse("b", bad)


def test_a_bus_that_keeps_history_is_taken_over_too(names, children, runtime):
    bus = names("bus")
    first = start_coordinator(children, bus, "--history", "h.*=10")
    with shmbus.connect(bus=bus, name="a") as a:
        a.publish("h.1", "kept")
        wait_for(lambda: [m.payload for m in a.history("h.*")] == ["kept"], what="history")
        kill(first)
        new = take_over(children, bus, "--history", "h.*=10")
        a.subscribe("t")  # rejoined: the history's inbox in the table is not an agent
        assert a.peers() == ["a"]
        a.publish("h.2", "again")
        wait_for(lambda: "again" in [m.payload for m in a.history("h.*")], what="history")
    stop(new)
    assert bus_entries(bus) == []


# ------------------------------------------ a hand over mid-record or mid-death


def _dies_mid_record(bus: str, victim_inbox: str) -> None:
    """Sends one message to the victim, then reserves room after it and dies there."""
    with shmbus.connect(bus=bus, name="writer") as agent:
        agent.send("victim", "before")
        with shmbus.Ring.attach(victim_inbox) as ring:
            ring._test_reserve(200)  # a writer killed between its CAS and its stores
            agent.send("other", "reserved")
            time.sleep(60)  # killed here


GOES = pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])


def stop_by(old, sig: int) -> None:  # noqa: ANN001 - a Popen
    old.send_signal(sig)
    code = old.wait(10)
    assert code == 0 or sig == signal.SIGKILL


@GOES
def test_a_dead_writers_record_is_unblocked_after_a_hand_over(
    names, children, runtime, sig
) -> None:
    """Found in review: a dead writer's record still blocking an inbox when the
    coordinator goes, handed over (SIGHUP) or killed (SIGKILL): the next one
    finishes the job (the coordinator's pending file)."""
    bus = names("bus")
    old = start_coordinator(children, bus)
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_dies_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        wait_for(lambda: "writer" not in other.peers())
        # The coordinator watches the victim's inbox: it cannot unblock it
        # until the victim has read "before". It is handed over meanwhile.
        stop_by(old, sig)
        socket_path(bus).unlink(missing_ok=True)
        new = start_coordinator(children, bus)
        try:
            other.send("victim", "after")
            # Before the fix the victim read "before", then waited forever.
            got = [victim.recv(timeout=10).payload for _ in range(2)]
        finally:
            new.terminate()
            new.wait(10)
    assert got == ["before", "after"]


def _leaves_mid_record(bus: str, victim_inbox: str) -> None:
    """Reserves room in the victim's inbox, then its control connection ends
    while its process lives on (as in a slow exit), and it is killed later."""
    agent = shmbus.connect(bus=bus, name="writer")
    with shmbus.Ring.attach(victim_inbox) as ring:
        ring._test_reserve(200)
        agent.send("other", "reserved")
        agent._ctl.close()
        time.sleep(60)  # killed here


@GOES
def test_a_death_not_yet_certain_at_a_hand_over_is_finished_by_the_next(
    names, children, runtime, sig
) -> None:
    """Found in review: a death not yet certain when the coordinator goes, handed
    over (SIGHUP) or killed (SIGKILL): the next one finishes the job (the
    coordinator's pending file)."""
    bus = names("bus")
    old = start_coordinator(children, bus)
    with (
        shmbus.connect(bus=bus, name="victim") as victim,
        shmbus.connect(bus=bus, name="other") as other,
    ):
        proc = children.start(_leaves_mid_record, bus, victim.inbox.name)
        assert other.recv(timeout=20).payload == "reserved"
        wait_for(lambda: "writer" not in other.peers())  # its connection ended; it lives
        stop_by(old, sig)
        socket_path(bus).unlink(missing_ok=True)
        new = start_coordinator(children, bus)
        try:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            other.send("victim", "after")
            assert victim.recv(timeout=10).payload == "after"
        finally:
            new.terminate()
            new.wait(10)


def test_a_bus_with_a_uds_agent_is_taken_over(names, children, runtime):
    """Found in the hardening probe: a uds agent in the table made the
    successor call it corrupt, start a fresh bus and refuse every shm agent."""
    bus = names("bus")
    first = start_coordinator(children, bus)
    shm = shmbus.connect(bus=bus, name="shm")
    viauds = shmbus.connect(bus=bus, name="viauds", transport="uds")
    second = None
    try:
        kill(first)
        second = take_over(children, bus)
        # The shm agent carries on with its bus; the uds agent's traffic went
        # through the killed coordinator's bridge, so it is counted as gone.
        wait_for(lambda: shm.peers() == ["shm"], what="the uds agent's departure")
        shm.send("shm", "still on the same bus")
        assert shm.recv(timeout=10).payload == "still on the same bus"
        wait_for(
            lambda: not [n for n in bus_entries(bus) if ".inbox.viauds" in n],
            what="the uds agent's inbox removed",
        )
    finally:
        viauds.close()
        shm.close()
        if second is not None:
            second.terminate()  # SIGTERM: it removes its table and stats
            second.wait(10)
