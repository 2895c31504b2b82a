"""The bus across processes: a coordinator process, agents in child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import shmbus
from shmbus import MessageType

pytestmark = pytest.mark.usefixtures("transport")  # shm, uds and mixed: see conftest.py


# ------------------------------------------------------------ children


def _echo(bus: str, name: str, patterns: list[str]) -> None:
    """Answers requests, forwards everything else it gets to 'driver', stops on 'stop'."""
    with shmbus.connect(bus=bus, name=name) as agent:
        for p in patterns:
            agent.subscribe(p)
        agent.send("driver", "ready")
        for msg in agent:
            if msg.type == MessageType.REQUEST:
                agent.reply(msg, {"echo": msg.payload})
            elif isinstance(msg.payload, str) and msg.payload == "stop":
                return
            else:
                agent.send("driver", [msg.type.name, msg.sender, msg.topic, msg.payload])


def _sender(bus: str, name: str, to: str, count: int) -> None:
    with shmbus.connect(bus=bus, name=name) as agent:
        while True:  # the recipient may not be there yet
            try:
                agent.send(to, 0)
                break
            except shmbus.UnknownRecipient:
                time.sleep(0.01)
        for i in range(1, count):
            agent.send(to, i)
        agent.send_many(to, list(range(count, count + 100)))


def _linger(bus: str, name: str) -> None:
    agent = shmbus.connect(bus=bus, name=name)
    agent.send("driver", "ready")
    time.sleep(60)


def start_echo(children, bus, driver, name="echo", patterns=()):
    children.start(_echo, bus, name, list(patterns))
    assert driver.recv(timeout=20).payload == "ready"


# ---------------------------------------------------------------- tests


def test_direct_messages_cross_processes_in_order_with_every_payload_kind(bus, children, transport):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_sender, bus, "sender", "driver", 2000)
        got = [driver.recv(timeout=20) for _ in range(2100)]
        assert [m.payload for m in got] == list(range(2100))
        assert {m.sender for m in got} == {"sender"} and {m.recipient for m in got} == {"driver"}
        assert len({m.id for m in got}) == 2100  # ids unique without asking anyone
        start_echo(children, bus, driver)
        driver.peers()  # the routes table says which transport each one uses
        assert (driver._link.kind, driver._out.agents["echo"][4]) == {
            "shm": ("shm", "shm"),
            "uds": ("uds", "uds"),
            "mixed": ("shm", "uds"),
        }[transport]
        arr = np.arange(12, dtype=np.float32).reshape(3, 4)
        for payload in ({"cmd": "start", "n": [1, 2.5, None]}, b"\x00raw", arr, "text"):
            driver.send("echo", payload)
            kind, sender, _, back = driver.recv(timeout=20).payload
            assert (kind, sender) == ("DIRECT", "driver")
            if isinstance(payload, np.ndarray):
                assert back.dtype == arr.dtype and np.array_equal(back, arr)
            else:
                assert back == payload
        driver.send("echo", "stop")
        children.join_all(20)


def test_publish_reaches_each_matching_subscriber_once(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        start_echo(children, bus, driver, "s1", ["events.*", "events.>"])  # both match
        start_echo(children, bus, driver, "s2", ["events.start"])
        start_echo(children, bus, driver, "s3", ["other.*"])
        driver.publish("events.start", {"n": 1})
        driver.publish("events.stop", {"n": 2})
        driver.publish_many("events.a.b", [3, 4])
        driver.publish("nobody.listens", 5)
        got = []
        while len(got) < 5:
            msg = driver.recv(timeout=20)
            got.append(tuple(msg.payload[:3]) + (str(msg.payload[3]),))
        got.sort()
        assert got == sorted(
            [
                ("PUBLISH", "driver", "events.start", "{'n': 1}"),
                ("PUBLISH", "driver", "events.start", "{'n': 1}"),
                ("PUBLISH", "driver", "events.stop", "{'n': 2}"),
                ("PUBLISH", "driver", "events.a.b", "3"),
                ("PUBLISH", "driver", "events.a.b", "4"),
            ]
        )
        with pytest.raises(shmbus.RecvTimeout):
            driver.recv(timeout=0.3)  # s3 got nothing, nobody got anything twice
        for name in ("s1", "s2", "s3"):
            driver.send(name, "stop")
        children.join_all(20)


def test_unsubscribe_stops_delivery(bus, children):
    with (
        shmbus.connect(bus=bus, name="driver") as driver,
        shmbus.connect(bus=bus, name="listener") as listener,
    ):
        listener.subscribe("a.*")
        driver.publish("a.x", 1)
        assert listener.recv(timeout=10).payload == 1
        listener.unsubscribe("a.*")
        driver.publish("a.x", 2)
        with pytest.raises(shmbus.RecvTimeout):
            listener.recv(timeout=0.3)


def test_request_response_keeps_other_messages_for_recv_in_order(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        start_echo(children, bus, driver)
        driver.send("echo", "before-1")
        driver.send("echo", "before-2")
        reply = driver.request("echo", [1, 2], timeout=20)
        assert reply.type == MessageType.RESPONSE and reply.payload == {"echo": [1, 2]}
        assert [driver.recv(timeout=20).payload[3] for _ in range(2)] == ["before-1", "before-2"]
        for i in range(200):
            assert driver.request("echo", i, timeout=20).payload == {"echo": i}
        driver.send("echo", "stop")
        children.join_all(20)


def test_request_to_a_silent_agent_times_out(bus):
    with shmbus.connect(bus=bus, name="driver") as driver, shmbus.connect(bus=bus, name="silent"):
        with pytest.raises(shmbus.RequestTimeout) as info:
            driver.request("silent", "hello?", timeout=0.2)
        assert isinstance(info.value, TimeoutError) and "silent" in str(info.value)


def test_unknown_recipient_is_a_lookup_error(bus):
    with shmbus.connect(bus=bus, name="driver") as driver:
        with pytest.raises(shmbus.UnknownRecipient) as info:
            driver.send("nobody", {"x": 1})
        assert isinstance(info.value, LookupError) and "nobody" in str(info.value)


def test_refused_payload_sends_nothing(bus):
    with shmbus.connect(bus=bus, name="a") as a, shmbus.connect(bus=bus, name="b") as b:
        with pytest.raises(TypeError, match="object"):
            a.send("b", {"x": object()})
        with pytest.raises(TypeError, match="dtype object"):
            a.publish("t.x", np.array([None], dtype=object))
        a.send("b", "after")
        assert b.recv(timeout=10).payload == "after"


def test_a_live_name_is_refused_and_a_dead_agents_name_is_freed(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        victim = children.start(_linger, bus, "worker")
        assert driver.recv(timeout=20).payload == "ready"
        with pytest.raises(shmbus.NameTaken) as info:
            shmbus.connect(bus=bus, name="worker")
        assert isinstance(info.value, ValueError) and str(victim.pid) in str(info.value)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        deadline = time.monotonic() + 10
        while True:  # the coordinator hears of the death from the closed socket
            try:
                driver.send("worker", "are you there?")
            except shmbus.UnknownRecipient:
                break
            assert time.monotonic() < deadline, "the dead agent is still routed"
            time.sleep(0.02)
        # Its inbox goes too (the coordinator may still be between the two).
        while left := [n for n in os.listdir("/dev/shm") if bus in n and ".inbox.worker" in n]:
            assert time.monotonic() < deadline, f"the dead agent's inbox is still there: {left}"
            time.sleep(0.01)
        with shmbus.connect(bus=bus, name="worker") as again:
            driver.send("worker", "welcome back")
            assert again.recv(timeout=10).payload == "welcome back"


def test_a_second_coordinator_for_the_same_bus_is_refused(bus):
    result = subprocess.run(
        [sys.executable, "-m", "shmbus.coordinator", "--bus", bus],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "already runs" in result.stderr
    with shmbus.connect(bus=bus, name="still-works"):
        pass


def test_connect_without_a_coordinator_fails_fast(names, runtime):
    t0 = time.monotonic()
    with pytest.raises(shmbus.CoordinatorUnavailable, match="shmbus coordinator"):
        shmbus.connect(bus=names("nobus"), name="a", timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_connect_reads_the_environment(bus, monkeypatch):
    monkeypatch.setenv("SHMBUS_BUS", bus)
    monkeypatch.setenv("SHMBUS_AGENT", "from-env")
    with shmbus.connect() as agent:
        assert (agent.bus, agent.name) == (bus, "from-env")


@pytest.mark.parametrize("bad", ["", "a.b", "a/b", "x" * 65, "sp ace", 7])
def test_bad_agent_names_are_refused(bus, bad):
    with pytest.raises(shmbus.InvalidName):
        shmbus.connect(bus=bus, name=bad)


def test_bad_topics_and_priorities_are_refused(bus):
    with shmbus.connect(bus=bus, name="a") as a:
        for topic in ("", "a..b", "a.*"):
            with pytest.raises(shmbus.InvalidName):
                a.publish(topic, 1)
        with pytest.raises(shmbus.InvalidName):
            a.subscribe("a.>.b")
        with pytest.raises(ValueError, match="priority"):
            a.send("a", 1, priority=101)


def test_iteration_ends_when_the_agent_is_closed(bus):
    import threading

    agent = shmbus.connect(bus=bus, name="it")
    agent.send("it", 1)
    seen = []

    def consume():
        for msg in agent:
            seen.append(msg.payload)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    agent._closed = True  # what close() sets first; iteration must notice within 0.2 s
    t.join(5)
    assert not t.is_alive() and seen == [1]
    agent._closed = False
    agent.close()


def test_a_hostile_register_is_refused_and_the_coordinator_lives_on(bus):
    from shmbus.core.control import Reader, recv_msg, send_msg
    from shmbus.core.paths import socket_path

    for pid in (2**64 - 1, -5, "x", 0):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path(bus)))
            send_msg(sock, {"op": "register", "name": "evil", "pid": pid})
            reply = recv_msg(sock, Reader(), [])
            assert reply["ok"] is False and "pid" in reply["message"]
    with shmbus.connect(bus=bus, name="evil") as agent:  # the name was not kept
        assert agent.peers() == ["evil"]
