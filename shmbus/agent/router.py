"""Routing rules: which handler ``serve()`` hands a message to. One table for
the sync agent and its asyncio mirror; each runs the handlers its own way
(the mirror awaits a coroutine's result) and both dead-letter alike."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.message import Message, RoutingRule, encode_message
from ..core.routes import match, validate_pattern

log = logging.getLogger(__name__)

Handler = Callable[[Message], Any]


def error_answer(error: Exception) -> dict[str, str]:
    """The payload of the ERROR that tells a requester its handler failed."""
    return {"error": type(error).__name__, "message": str(error)[:1000]}


class Router:
    """Rules by priority, highest first (ties in the order they were added);
    every matching handler gets the message."""

    def __init__(self, name: str, dead_letter: Callable[[bytes, str], None]) -> None:
        self._name = name
        self._dead_letter = dead_letter
        self._rules: list[tuple[RoutingRule, Handler]] = []

    def add(self, rule: RoutingRule, handler: Handler) -> None:
        if rule.topic is not None:
            validate_pattern(rule.topic)
        self._rules.append((rule, handler))
        self._rules.sort(key=lambda rh: -rh[0].priority)  # stable: ties keep their order

    def handlers(self, msg: Message) -> list[Handler]:
        """The handlers whose rules match ``msg``, in the order they run."""
        return [handler for rule, handler in self._rules if _matches(rule, msg)]

    def failed(self, msg: Message, handler: Handler, error: Exception) -> None:
        """A handler raised: the message goes to the DLQ with the reason."""
        log.warning("agent %s: handler %r failed: %r", self._name, handler, error)
        reason = f"handler failed: {type(error).__name__}: {error}"
        self._dead_letter(encode_message(msg), reason)

    def unrouted(self, msg: Message) -> None:
        """No rule matched: the message goes to the DLQ ("no route")."""
        self._dead_letter(encode_message(msg), "no route: no rule matched")


def _matches(rule: RoutingRule, msg: Message) -> bool:
    return (
        (rule.msg_type is None or msg.type == rule.msg_type)
        and (rule.sender is None or msg.sender == rule.sender)
        and (rule.recipient is None or msg.recipient == rule.recipient)
        and (rule.topic is None or (bool(msg.topic) and match(rule.topic, msg.topic)))
    )
