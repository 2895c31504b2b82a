"""`shmbus send` and `shmbus publish`: one message from a script, to agents in other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shmbus
from shmbus import MessageType

ROOT = Path(__file__).resolve().parents[2]


def shmbus_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = subprocess.run(
        [sys.executable, "-m", "shmbus", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)),
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def sink(bus: str) -> None:
    """An agent in another process: reports what it gets to 'driver', answers requests."""
    with shmbus.connect(bus=bus, name="sink") as agent:
        agent.subscribe("events.*")
        agent.send("driver", "ready")
        for msg in agent:
            if msg.type == MessageType.REQUEST:
                agent.reply(msg, {"echo": msg.payload, "raw": b"\x00\xff", "arr": np.arange(3)})
            elif msg.payload == "stop":
                return
            else:
                got = [int(msg.type), msg.sender, msg.payload, msg.priority, msg.topic, msg.id]
                agent.send("driver", got)


@pytest.fixture
def driver(bus, children):
    """This test's agent, with a sink agent in a child process; stops the sink afterwards."""
    with shmbus.connect(bus=bus, name="driver") as agent:
        child = children.start(sink, bus)
        assert agent.recv(timeout=30).payload == "ready"
        yield agent
        agent.send("sink", "stop")
        child.join(30)
        assert child.exitcode == 0


def delivered(driver: shmbus.Agent, result: subprocess.CompletedProcess[str]) -> list:
    """What the sink reported for the message the command sent (checked by id)."""
    assert result.returncode == 0, result.stderr
    msg_type, sender, payload, priority, topic, msg_id = driver.recv(timeout=30).payload
    assert msg_id == int(result.stdout)  # the command prints the message id
    return [MessageType(msg_type), sender, payload, priority, topic]


def test_send_delivers_json_text_and_options(bus, driver):
    result = shmbus_cli("send", "--bus", bus, "--priority", "70", "sink", '{"a": [1, 2]}')
    kind, sender, payload, priority, _ = delivered(driver, result)
    assert (kind, payload, priority) == (MessageType.DIRECT, {"a": [1, 2]}, 70)
    assert sender.startswith("cli-")
    for args, expected in [(["42"], 42), (['"text"'], "text"), (["--text", "a b"], "a b")]:
        result = shmbus_cli("send", "--bus", bus, "sink", *args)
        assert delivered(driver, result)[2] == expected
    result = shmbus_cli("send", "--bus", bus, "--as", "script-1", "--ttl", "5", "sink", "null")
    assert delivered(driver, result)[1:3] == ["script-1", None]


def test_payload_from_stdin_as_json_text_or_raw_bytes(bus, driver):
    cases = [
        ([], b'{"x": [1, 2]}\n', {"x": [1, 2]}),
        (["--text"], "héllo\n".encode(), "héllo\n"),
        (["--raw"], b"\x00\x01\xfe", b"\x00\x01\xfe"),
    ]
    for options, stdin, expected in cases:
        result = shmbus_cli("send", "--bus", bus, *options, "sink", "-", stdin=stdin)
        assert delivered(driver, result)[2] == expected


def test_publish_reaches_subscribers_in_other_processes(bus, driver):
    result = shmbus_cli("publish", "--bus", bus, "--priority", "9", "events.start", '{"n": 1}')
    kind, sender, payload, priority, topic = delivered(driver, result)
    assert (kind, payload, priority, topic) == (MessageType.PUBLISH, {"n": 1}, 9, "events.start")
    assert sender.startswith("cli-")
    # A topic nobody follows is no error, as with Agent.publish.
    result = shmbus_cli("publish", "--bus", bus, "nobody.listens", "1")
    assert result.returncode == 0 and int(result.stdout) > 0


def test_request_prints_the_response_as_json(bus, driver):
    result = shmbus_cli("send", "--bus", bus, "--request", "sink", "[1, 2]")
    assert result.returncode == 0, result.stderr
    # bytes come out as base64, numpy arrays as lists
    assert json.loads(result.stdout) == {"echo": [1, 2], "raw": "AP8=", "arr": [0, 1, 2]}


def test_a_request_nobody_answers_times_out_with_exit_1(bus, driver):
    result = shmbus_cli("send", "--bus", bus, "--request", "--timeout", "0.3", "driver", "1")
    assert result.returncode == 1 and result.stdout == ""
    assert "no response from 'driver'" in result.stderr and "0.3s" in result.stderr
    assert driver.recv(timeout=30).type == MessageType.REQUEST  # it did arrive


def test_an_unknown_recipient_is_named_and_dead_lettered(bus, driver):
    result = shmbus_cli("send", "--bus", bus, "nobody", '{"lost": true}')
    assert result.returncode == 1 and result.stdout == ""
    assert "'nobody'" in result.stderr and "dead-letter" in result.stderr
    [entry] = [e for e in driver.dlq() if e.message.recipient == "nobody"]
    assert entry.message.payload == {"lost": True} and "no recipient" in entry.reason


def test_a_name_taken_on_the_bus_is_refused(bus, driver):
    result = shmbus_cli("send", "--bus", bus, "--as", "sink", "driver", "1")
    assert result.returncode == 1 and "taken" in result.stderr


def test_no_coordinator_fails_at_once_with_exit_1(names, runtime):
    for command in (
        ["send", "--bus", names("none"), "x", "1"],
        ["publish", "--bus", names("none"), "a.b", "1"],
    ):
        result = shmbus_cli(*command)
        assert result.returncode == 1 and "no coordinator runs bus" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["send", "--bus", "b", "x", "{bad"], "is not JSON"),
        (["send", "--bus", "b", "x", "-"], "stdin is not JSON"),
        (["send", "--bus", "b", "--text", "x", "-"], "stdin is not UTF-8"),
        (["send", "--bus", "b", "--priority", "101", "x", "1"], "priority must be 0-100"),
        (["send", "--bus", "b", "--timeout", "0", "x", "1"], "must be more than 0"),
        (["send", "--bus", "b", "--text", "--raw", "x", "1"], "not allowed with"),
        (["send", "--bus", "b", "a.b", "1"], "invalid agent name 'a.b'"),
        (["send", "--bus", "b", "--as", "a b", "x", "1"], "invalid agent name 'a b'"),
        (["send", "--bus", "b c", "x", "1"], "invalid bus name"),
        (["publish", "--bus", "b", "events.*", "1"], "invalid topic"),
    ],
)
def test_bad_arguments_exit_2_before_touching_the_bus(runtime, args, message):
    result = shmbus_cli(*args, stdin=b"\xff not json")
    assert result.returncode == 2 and message in result.stderr, result.stderr
