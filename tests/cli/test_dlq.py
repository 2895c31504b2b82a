"""`shmbus dlq list|replay|purge` and `shmbus cleanup --purge-dlq`, against
coordinators and agents in other processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import shmbus
from shmbus import MessageType
from shmbus.cli.dlq import Control
from shmbus.coordinator.dlq import FILE
from shmbus.core.message import encode_frame, pack_payload
from shmbus.core.paths import socket_path
from tests.conftest import start_coordinator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every bus of these tests keeps its state (the DLQ) in a temporary directory."""
    path = tmp_path / "state"
    monkeypatch.setenv("SHMBUS_STATE_DIR", str(path))
    return path


def shmbus_cli(*args: str) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.run(
        [sys.executable, "-m", "shmbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
    )


def dead_letter(ctl: Control, kind: MessageType, reason: str, payload: object, **kw: object) -> int:
    """Put a message in the DLQ the way an agent does; returns its entry's id."""
    data, flags = pack_payload(payload)
    names = {k: v.encode() for k, v in kw.items() if isinstance(v, str)}
    ints = {k: v for k, v in kw.items() if not isinstance(v, str)}
    frame = encode_frame(int(kind), payload=data, flags=flags, **names, **ints)  # type: ignore[arg-type]
    return ctl.call("dlq_add", frame=frame, reason=reason)["id"]  # type: ignore[no-any-return]


def late(bus: str) -> None:
    """An agent that joins after its messages were dead-lettered; reports what it gets."""
    with shmbus.connect(bus=bus, name="late") as agent:
        agent.subscribe("ev.*")
        agent.send("driver", "ready")
        for msg in agent:
            if msg.sender == "driver" and msg.payload == "stop":
                return
            report = [msg.type.name, msg.sender, msg.topic, msg.payload, msg.id]
            agent.send("driver", report)


def test_replay_sends_each_entry_to_its_agent_in_another_process(bus, children):
    with Control(bus) as ctl, shmbus.connect(bus=bus, name="driver") as driver:
        direct = dead_letter(
            ctl,
            MessageType.DIRECT,
            "no recipient",
            {"d": 1},
            sender="gone",
            recipient="late",
            priority=7,
        )
        request = dead_letter(
            ctl,
            MessageType.REQUEST,
            "handler failed",
            [2],
            sender="asker",
            recipient="late",
            msg_id=77,
        )
        publish = dead_letter(
            ctl, MessageType.PUBLISH, "inbox full", "p", sender="gone", topic="ev.x"
        )
        nobody = dead_letter(
            ctl, MessageType.DIRECT, "no recipient", 4, sender="gone", recipient="nobody"
        )
        quiet = dead_letter(
            ctl, MessageType.PUBLISH, "inbox full", 5, sender="gone", topic="other.x"
        )
        child = children.start(late, bus)
        assert driver.recv(timeout=30).payload == "ready"

        result = shmbus_cli("dlq", "replay", "--bus", bus, "--as", "replayer")
        assert result.returncode == 1, result.stderr  # two entries could not go
        assert "replayed 3, kept 2" in result.stdout
        assert f"{nobody}: kept: no agent named 'nobody'" in result.stderr
        assert f"{quiet}: kept: nobody subscribes to 'other.x'" in result.stderr
        reports = [driver.recv(timeout=30).payload for _ in range(3)]
        got = {r[0]: r[1:4] for r in reports}
        assert got == {
            "DIRECT": ["replayer", "", {"d": 1}],
            "REQUEST": ["asker", "", [2]],  # as it was sent: the asker gets the answer
            "PUBLISH": ["replayer", "ev.x", "p"],
        }
        assert [r[4] for r in reports if r[0] == "REQUEST"] == [77]  # its id kept, too
        left = [e["id"] for e in ctl.call("dlq_list")["entries"]]
        assert left == [nobody, quiet] and direct < request < publish < nobody

        # By id: only what is asked for; an id not in the DLQ is reported.
        again = dead_letter(ctl, MessageType.DIRECT, "x", 6, sender="gone", recipient="late")
        result = shmbus_cli("dlq", "replay", "--bus", bus, str(again), "999")
        assert result.returncode == 1 and "999: not in the DLQ" in result.stderr
        assert driver.recv(timeout=30).payload[3] == 6
        assert [e["id"] for e in ctl.call("dlq_list")["entries"]] == [nobody, quiet]
        driver.send("late", "stop")
        child.join(30)
        assert child.exitcode == 0


def test_list_prints_entries_and_json_and_purge_removes_them(bus):
    with Control(bus) as ctl:
        first = dead_letter(
            ctl,
            MessageType.DIRECT,
            "no recipient: nobody",
            {"k": [1, 2]},
            sender="a",
            recipient="nobody",
            priority=3,
        )
        dead_letter(ctl, MessageType.PUBLISH, "inbox full", b"\x00\x01", sender="a", topic="t.x")
        third = dead_letter(
            ctl, MessageType.DIRECT, "expired", "x" * 500, sender="a", recipient="b"
        )
        junk = ctl.call("dlq_add", frame=b"not a frame", reason="?")["id"]

    result = shmbus_cli("dlq", "list", "--bus", bus, "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == [first, first + 1, third, junk]
    assert "shorter than" in rows[3]["error"] and rows[3]["reason"] == "?"
    assert rows[0]["reason"] == "no recipient: nobody" and rows[0]["type"] == "DIRECT"
    assert (rows[0]["sender"], rows[0]["recipient"], rows[0]["priority"]) == ("a", "nobody", 3)
    assert rows[0]["payload"] == {"k": [1, 2]} and rows[1]["topic"] == "t.x"
    assert rows[1]["payload"] == "AAE=" and abs(rows[0]["time"] - time.time()) < 600

    text = shmbus_cli("dlq", "list", "--bus", bus).stdout.splitlines()
    assert "DIRECT" in text[0] and "a -> nobody" in text[0] and "[no recipient: nobody]" in text[0]
    assert "topic t.x" in text[1] and "<2 bytes>" in text[1]
    assert len(text[2]) < 200 and text[2].endswith("xxx...")  # a long payload is cut short
    assert "corrupt frame" in text[3]
    assert text[-1].startswith("4 in the DLQ") and "4 dead-lettered in all" in text[-1]
    assert shmbus_cli("dlq", "list", "--bus", bus, "--limit", "1", "--json").stdout.count("\n") == 1

    result = shmbus_cli("dlq", "purge", "--bus", bus, str(first), "12345")
    assert result.returncode == 1 and "purged 1 entries" in result.stdout
    assert "12345" in result.stderr
    result = shmbus_cli("dlq", "purge", "--bus", bus)
    assert result.returncode == 0 and "purged 3 entries" in result.stdout
    assert shmbus_cli("dlq", "list", "--bus", bus, "--json").stdout == ""


def test_dlq_commands_on_a_bus_nobody_runs_say_so(names, runtime):
    result = shmbus_cli("dlq", "list", "--bus", names("bus"))
    assert result.returncode == 1 and "no coordinator runs bus" in result.stderr
    assert shmbus_cli("dlq", "list", "--bus", "bad.name").returncode == 2


def test_cleanup_keeps_a_killed_bus_dlq_unless_told_to_purge_it(names, runtime, children, state):
    bus = names("bus")
    proc = start_coordinator(children, bus)
    with Control(bus) as ctl:
        dead_letter(ctl, MessageType.DIRECT, "r", 1, sender="a", recipient="b")
    result = shmbus_cli("cleanup", "--purge-dlq", bus)
    assert result.returncode == 1 and "live" in result.stdout  # never a live bus's
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    result = shmbus_cli("cleanup", bus)
    assert result.returncode == 0 and "kept its DLQ" in result.stdout
    assert (state / bus / FILE).exists()
    assert not socket_path(bus).exists()
    result = shmbus_cli("cleanup", "--purge-dlq", bus)
    assert result.returncode == 0 and "removed its DLQ file" in result.stdout
    assert not (state / bus).exists()


def test_an_entry_whose_recipient_stays_full_is_kept(bus):
    with (
        Control(bus) as ctl,
        shmbus.connect(bus=bus, name="tiny", inbox_capacity=1 << 14) as tiny,
        shmbus.connect(bus=bus, name="driver", backpressure="error") as driver,
    ):
        with pytest.raises(shmbus.errors.InboxFull):
            for _ in range(100):
                driver.send("tiny", b"x" * 1000)
        entry = dead_letter(ctl, MessageType.DIRECT, "r", b"y" * 1000, sender="a", recipient="tiny")
        result = shmbus_cli("dlq", "replay", "--bus", bus, "--timeout", "0.2")
        assert result.returncode == 1 and "replayed 0, kept 1" in result.stdout
        assert f"{entry}: kept: the inbox of 'tiny' stayed full" in result.stderr
        assert [e["id"] for e in ctl.call("dlq_list")["entries"]] == [entry]
        tiny.recv_many(100, timeout=0)  # room again: now it goes
        assert shmbus_cli("dlq", "replay", "--bus", bus).returncode == 0
        assert ctl.call("dlq_list")["entries"] == []
        assert tiny.recv_many(100, timeout=5)[-1].payload == b"y" * 1000
