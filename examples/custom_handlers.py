"""Custom handlers: a shop agent built from routing rules and domain handlers.

What it shows:

* ``agent.route(RoutingRule(...), handler)`` and ``agent.serve()``: the shop
  (its own process) declares which handler takes which messages, by
  - message type and sender: direct messages from ``warehouse`` restock,
    requests from ``frontend`` get a price quote, requests from ``admin``
    get a report;
  - topic pattern: ``orders.new`` places an order, ``orders.cancel``
    cancels one, ``orders.>`` (every order topic) is audited;
  - rule priority: rules run highest first; the audit (100) sees an order
    before it is placed (50), a catch-all counter (-100) sees it last;
* several handlers taking one message: every matching rule's handler runs;
* validation: the order handler checks the payload and raises on a bad
  one; the bus puts that message in the dead-letter queue with the reason,
  which any agent can read with ``agent.dlq()``;
* a request answered by a handler's return value (the quote, the report).

Run it from the repository root (with shmbus installed, or PYTHONPATH=.)::

    python examples/custom_handlers.py [--bus NAME]

It exits 0 when every handler did what it should and 1 otherwise, and
leaves nothing in /dev/shm. The shop logs each rejected order on stderr.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any

import shmbus
from shmbus import Message, MessageType, RoutingRule

PRICES = {"widget": 2.5, "gadget": 10.0}
TIMEOUT = 10.0  # seconds for any one wait; agent processes take a moment to start


# ------------------------------------------------------ the shop's handlers


class ValidationError(ValueError):
    """A payload the shop refuses."""


class Shop:
    """The shop's state; its methods are the handlers."""

    def __init__(self) -> None:
        self.stock: dict[str, int] = collections.Counter()
        self.orders: dict[str, dict[str, Any]] = {}
        self.trail: dict[str, list[str]] = collections.defaultdict(list)  # order -> handlers
        self.counts: dict[str, int] = collections.Counter()  # message type -> seen

    @staticmethod
    def validate(order: Any) -> dict[str, Any]:
        if not isinstance(order, dict):
            raise ValidationError(f"an order is a map, not {type(order).__name__}")
        missing = {"order", "sku", "qty"} - order.keys()
        if missing:
            raise ValidationError(f"order lacks {sorted(missing)}")
        if order["sku"] not in PRICES:
            raise ValidationError(f"unknown sku {order['sku']!r}")
        if not isinstance(order["qty"], int) or order["qty"] < 1:
            raise ValidationError(f"qty must be a whole number >= 1, not {order['qty']!r}")
        return order

    def audit(self, msg: Message) -> None:  # orders.>, priority 100
        if isinstance(msg.payload, dict) and "order" in msg.payload:
            self.trail[msg.payload["order"]].append("audit")

    def place(self, msg: Message) -> None:  # orders.new, priority 50
        order = self.validate(msg.payload)  # raises: the message goes to the DLQ
        sku, qty = order["sku"], order["qty"]
        if self.stock[sku] < qty:
            raise ValidationError(f"not enough {sku}: {qty} asked, {self.stock[sku]} in stock")
        self.stock[sku] -= qty
        self.orders[order["order"]] = {"sku": sku, "qty": qty, "status": "placed"}
        self.trail[order["order"]].append("place")

    def cancel(self, msg: Message) -> None:  # orders.cancel, priority 50
        order = self.orders[msg.payload["order"]]  # KeyError: to the DLQ as well
        if order["status"] == "placed":
            self.stock[order["sku"]] += order["qty"]
            order["status"] = "cancelled"
        self.trail[msg.payload["order"]].append("cancel")

    def restock(self, msg: Message) -> None:  # DIRECT from warehouse
        self.stock[msg.payload["sku"]] += msg.payload["qty"]

    def quote(self, msg: Message) -> dict[str, Any]:  # REQUEST from frontend
        sku, qty = msg.payload["sku"], msg.payload["qty"]
        return {"sku": sku, "qty": qty, "total": PRICES[sku] * qty, "in_stock": self.stock[sku]}

    def report(self, msg: Message) -> dict[str, Any]:  # REQUEST from admin
        return {
            "stock": dict(self.stock),
            "orders": self.orders,
            "trail": dict(self.trail),
            "counts": dict(self.counts),
        }

    def count(self, msg: Message) -> None:  # everything, priority -100
        self.counts[msg.type.name] += 1
        if isinstance(msg.payload, dict) and msg.topic.startswith("orders."):
            self.trail[msg.payload.get("order", "?")].append("count")


def shop_agent(agent: shmbus.Agent) -> None:
    """The shop's process: its rules, then the dispatch loop."""
    shop = Shop()
    agent.subscribe("orders.>")
    agent.route(RoutingRule(topic="orders.>", priority=100), shop.audit)
    agent.route(
        RoutingRule(topic="orders.new", msg_type=MessageType.PUBLISH, priority=50), shop.place
    )
    agent.route(RoutingRule(topic="orders.cancel", priority=50), shop.cancel)
    agent.route(RoutingRule(msg_type=MessageType.DIRECT, sender="warehouse"), shop.restock)
    agent.route(RoutingRule(msg_type=MessageType.REQUEST, sender="frontend"), shop.quote)
    agent.route(RoutingRule(msg_type=MessageType.REQUEST, sender="admin"), shop.report)
    agent.route(RoutingRule(priority=-100), shop.count)  # no filter: every message
    agent.send("admin", "ready")
    agent.serve()  # until the runner stops this process


# ------------------------------------------------------------------ driver


class Failed(Exception):
    """Something the example expected did not happen."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


ORDERS = [  # (payload, why it should be refused, or None)
    ({"order": "o1", "sku": "widget", "qty": 4}, None),
    ({"order": "o2", "sku": "widget", "qty": -1}, "qty must be a whole number >= 1"),
    ({"order": "o3", "sku": "unicorn", "qty": 1}, "unknown sku 'unicorn'"),
    ({"order": "o4", "sku": "gadget", "qty": 2}, None),
    ({"order": "o5", "sku": "gadget", "qty": 5}, "not enough gadget: 5 asked, 1 in stock"),
    ({"sku": "widget"}, "order lacks ['order', 'qty']"),
]


def run(bus: str) -> None:
    with shmbus.Runner(bus=bus, dlq="memory") as runner:  # an example leaves no DLQ file
        admin = runner.connect("admin")
        frontend = runner.connect("frontend")
        warehouse = runner.connect("warehouse")
        shop = runner.spawn("shop", shop_agent)
        msg = admin.recv(timeout=TIMEOUT)  # subscribed and routed: ready for orders
        expect(msg.payload == "ready", f"expected 'ready', got {msg.payload!r}")
        print(f"bus {bus!r}: the shop is open")

        # Rule by sender: direct messages from the warehouse restock.
        warehouse.send("shop", {"sku": "widget", "qty": 10})
        warehouse.send("shop", {"sku": "gadget", "qty": 3})

        # Rule by type and sender: the handler's return value answers the request.
        quote = frontend.request("shop", {"sku": "widget", "qty": 4}, timeout=TIMEOUT).payload
        print(f"quote: {quote}")
        expect(quote == {"sku": "widget", "qty": 4, "total": 10.0, "in_stock": 10}, repr(quote))

        # Rules by topic: orders, good and bad, then a cancellation.
        refused = {}
        for order, why in ORDERS:
            msg_id = frontend.publish("orders.new", order)
            if why:
                refused[msg_id] = why
        frontend.publish("orders.cancel", {"order": "o4"})

        # The shop handles its inbox in order: the report reflects all of the above.
        report = admin.request("shop", "report", timeout=TIMEOUT).payload
        print(f"orders: {report['orders']}")
        print(f"stock: {report['stock']}")
        for order in ("o1", "o2", "o4"):
            print(f"handlers that took {order}, in order: {report['trail'][order]}")
        print(f"messages counted by the catch-all rule: {report['counts']}")
        expect(
            report["orders"]
            == {
                "o1": {"sku": "widget", "qty": 4, "status": "placed"},
                "o4": {"sku": "gadget", "qty": 2, "status": "cancelled"},
            },
            repr(report["orders"]),
        )
        expect(report["stock"] == {"widget": 6, "gadget": 3}, repr(report["stock"]))
        expect(report["trail"]["o1"] == ["audit", "place", "count"], repr(report["trail"]))
        expect(report["trail"]["o4"][:3] == ["audit", "place", "count"], repr(report["trail"]))
        expect("cancel" in report["trail"]["o4"], repr(report["trail"]))
        expect("place" not in report["trail"]["o2"], repr(report["trail"]))
        expect(report["counts"].get("PUBLISH") == len(ORDERS) + 1, repr(report["counts"]))

        # Validation: each refused order is in the DLQ, with the handler's reason.
        letters = {d.message.id: d for d in admin.dlq() if d.message.id in refused}
        for msg_id, why in refused.items():
            letter = letters.get(msg_id)
            if letter is None:
                raise Failed(f"no dead letter for the order refused with {why!r}")
            print(f"dead letter: {letter.message.payload} -> {letter.reason}")
            expect(letter.reason.startswith("handler failed: ValidationError: "), letter.reason)
            expect(why in letter.reason, f"{letter.reason!r} does not say {why!r}")
            expect(letter.message.topic == "orders.new", repr(letter.message))
            expect(letter.message.sender == "frontend", repr(letter.message))
    expect(shop.exitcode == 0, f"the shop exited with {shop.exitcode}")


def leftovers(bus: str) -> list[str]:
    prefixes = (f"shmbus.{bus}.", f"sem.shmbus.{bus}.")
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bus", default="example-handlers", help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        run(args.bus)
    except (Failed, shmbus.ShmbusError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    left = leftovers(args.bus)
    if left:
        print(f"FAILED: left in /dev/shm: {left}", file=sys.stderr)
        return 1
    print("custom_handlers: every rule and handler worked; nothing left in /dev/shm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
