"""Routing rules, serve(), and dead letters with their reasons."""

from __future__ import annotations

import pytest

import shmbus
from shmbus import MessageType, RoutingRule


def _service(bus: str) -> None:
    """Handlers in their own process, reporting what they saw to 'driver'."""
    with shmbus.connect(bus=bus, name="service") as agent:
        agent.subscribe("alerts.>")
        agent.subscribe("metrics.*")
        log = []

        def note(tag):
            def handler(msg):
                log.append([tag, msg.payload])

            return handler

        def double(msg):
            return msg.payload * 2  # answers the request

        def explode(msg):
            raise RuntimeError("bad reading")

        def report(msg):
            agent.send("driver", log)

        agent.route(RoutingRule(topic="alerts.*", msg_type=MessageType.PUBLISH), note("alert-low"))
        agent.route(RoutingRule(topic="alerts.>", priority=10), note("alert-high"))
        agent.route(RoutingRule(msg_type=MessageType.REQUEST, sender="driver"), double)
        agent.route(RoutingRule(topic="metrics.bad"), explode)
        agent.route(RoutingRule(msg_type=MessageType.DIRECT, sender="driver"), report)
        agent.send("driver", "ready")
        agent.serve()


def test_rules_by_priority_several_handlers_and_replies(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_service, bus)
        assert driver.recv(timeout=20).payload == "ready"
        driver.publish("alerts.disk", "full")
        driver.publish("alerts.disk.sda", "hot")  # only alerts.> matches
        assert driver.request("service", 21, timeout=20).payload == 42
        driver.send("service", "report")
        log = driver.recv(timeout=20).payload
        assert log == [["alert-high", "full"], ["alert-low", "full"], ["alert-high", "hot"]]
        driver.send("service", "stop")  # a DIRECT: report again, harmless


def test_a_failing_handler_and_an_unrouted_message_go_to_the_dlq(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_service, bus)
        assert driver.recv(timeout=20).payload == "ready"
        driver.publish("metrics.bad", {"v": -1})  # explode() raises
        driver.publish("metrics.good", {"v": 1})  # no rule matches
        driver.request("service", 1, timeout=20)  # the service has handled both by now
        reasons = {d.message.topic: d.reason for d in driver.dlq()}
        assert reasons["metrics.bad"].startswith("handler failed: RuntimeError: bad reading")
        assert reasons["metrics.good"].startswith("no route")
        bad = next(d for d in driver.dlq() if d.message.topic == "metrics.bad")
        assert bad.message.payload == {"v": -1} and bad.message.sender == "driver"
        assert bad.time > 0


def test_a_send_to_nobody_raises_and_leaves_a_dead_letter(bus):
    with shmbus.connect(bus=bus, name="driver") as driver:
        with pytest.raises(shmbus.UnknownRecipient):
            driver.send("ghost", {"lost": True}, priority=7)
        with pytest.raises(shmbus.UnknownRecipient):
            driver.send_many("ghost", [1, 2])
        letters = driver.dlq()
        assert [d.message.payload for d in letters] == [{"lost": True}, 1, 2]
        assert all(d.reason.startswith("no recipient") for d in letters)
        assert letters[0].message.recipient == "ghost" and letters[0].message.priority == 7


def test_bad_rule_patterns_are_refused(bus):
    with shmbus.connect(bus=bus, name="a") as agent:
        with pytest.raises(shmbus.InvalidName):
            agent.route(RoutingRule(topic="a.>.b"), print)


def test_a_request_whose_handler_raises_gets_an_error_back_at_once(bus, children):
    with shmbus.connect(bus=bus, name="driver") as driver:
        children.start(_service, bus)
        assert driver.recv(timeout=20).payload == "ready"
        reply = driver.request("service", {"not": "a number"}, timeout=20)  # dict * 2 raises
        assert reply.type == MessageType.ERROR and reply.payload["error"] == "TypeError"
        assert driver.request("service", 2, timeout=20).payload == 4  # it serves on
        failed = [d for d in driver.dlq() if d.message.type == MessageType.REQUEST]
        assert failed and failed[-1].reason.startswith("handler failed: TypeError")
