"""Agent coordination: a planner agent hands tasks to worker agents and collects results.

What it shows:

* a coordinating *agent* (the ``Planner``, in this process; not the bus's
  coordinator process) that splits a job into tasks and sends them to N
  worker agents, each in its own process, round robin;
* workers built from routing rules: a rule for tasks (direct messages from
  the planner) and a rule for pings (requests, answered by the handler's
  return value);
* two kinds of failure, handled differently:
  - a task that cannot be done (dividing by zero): the worker answers with
    an error, and the planner reports that task as failed;
  - a broken worker (the last one) whose handler raises: the bus puts each
    message it failed in the dead-letter queue with the reason; the planner
    finds its tasks there (``agent.dlq()``), takes the worker off the rota
    and gives the tasks to the others;
* a barrier without sleeping: a worker handles its inbox in order, so once
  it has answered a ping, every task sent to it before has been dealt with;
* a summary of who did what.

Run it from the repository root (with shmbus installed, or PYTHONPATH=.)::

    python examples/agent_coordination.py [--bus NAME] [--workers N]

It exits 0 when every task ended as expected and 1 otherwise, and leaves
nothing in /dev/shm.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import shmbus
from shmbus import MessageType, RoutingRule

PLANNER = "planner"
TIMEOUT = 10.0  # seconds for any one wait; agent processes take a moment to start

OPS: dict[str, Callable[..., Any]] = {
    "sum": sum,
    "max": max,
    "factorial": math.factorial,
    "divide": lambda a, b: a / b,
    "words": lambda text: len(text.split()),
}

JOB: list[tuple[str, list[Any]]] = [
    ("sum", [[1, 2, 3, 4]]),
    ("factorial", [10]),
    ("words", ["the quick brown fox jumps over the lazy dog"]),
    ("divide", [1, 0]),  # fails wherever it runs: the worker reports the error
    ("max", [[3, 9, 2]]),
    ("sum", [list(range(101))]),
    ("factorial", [5]),
    ("divide", [10, 4]),
    ("words", ["shared memory rings"]),
]


# ------------------------------------------------- workers (one process each)


def worker(agent: shmbus.Agent, broken: bool = False) -> None:
    """Does the tasks the planner sends; a ``broken`` worker raises on every one."""

    def do_task(msg: shmbus.Message) -> None:
        task = msg.payload
        if broken:
            raise RuntimeError(f"{agent.name} is out of order")  # -> the DLQ, with this reason
        try:
            result = {"value": OPS[task["op"]](*task["args"])}
        except Exception as e:  # the task's fault, not the worker's: report it
            result = {"error": f"{type(e).__name__}: {e}"}
        agent.send(msg.sender, {"task": task["id"], "worker": agent.name, **result})

    agent.route(RoutingRule(msg_type=MessageType.DIRECT, sender=PLANNER), do_task)
    agent.route(RoutingRule(msg_type=MessageType.REQUEST), lambda msg: "pong")
    agent.send(PLANNER, "ready")
    agent.serve()  # until the runner stops this process


# ----------------------------------------------------------------- planner


class Failed(Exception):
    """Something the example expected did not happen."""


@dataclass
class Outcome:
    op: str
    args: list[Any]
    worker: str = ""
    value: Any = None
    error: str = ""
    attempts: int = 0


@dataclass
class Planner:
    """Hands tasks out to healthy workers until each is done or failed."""

    agent: shmbus.Agent
    workers: list[str]
    unhealthy: dict[str, str] = field(default_factory=dict)  # worker -> why
    reassigned: int = 0

    def await_workers(self) -> None:
        waiting = set(self.workers)
        deadline = time.monotonic() + TIMEOUT
        while waiting:
            msg = self.agent.recv(timeout=max(deadline - time.monotonic(), 0.0))
            if msg.payload != "ready":
                raise Failed(f"expected 'ready', got {msg.payload!r} from {msg.sender}")
            waiting.discard(msg.sender)

    def run(self, job: list[tuple[str, list[Any]]], max_rounds: int = 3) -> dict[int, Outcome]:
        outcomes = {i: Outcome(op, args) for i, (op, args) in enumerate(job)}
        todo = sorted(outcomes)
        for round_no in range(1, max_rounds + 1):
            if not todo:
                break
            healthy = [w for w in self.workers if w not in self.unhealthy]
            if not healthy:
                raise Failed("no healthy worker left")
            print(f"round {round_no}: {len(todo)} tasks to {', '.join(healthy)}")
            sent = self.hand_out(todo, healthy, outcomes)
            todo = self.collect(sent, outcomes)
        if todo:
            raise Failed(f"tasks {todo} still not done after {max_rounds} rounds")
        return outcomes

    def hand_out(
        self, todo: list[int], healthy: list[str], outcomes: dict[int, Outcome]
    ) -> dict[int, tuple[int, str]]:
        """Send each task to a worker, round robin; returns message id -> (task, worker)."""
        sent = {}
        for n, task in enumerate(todo):
            worker = healthy[n % len(healthy)]
            out = outcomes[task]
            msg_id = self.agent.send(worker, {"id": task, "op": out.op, "args": out.args})
            out.attempts += 1
            sent[msg_id] = (task, worker)
        return sent

    def collect(self, sent: dict[int, tuple[int, str]], outcomes: dict[int, Outcome]) -> list[int]:
        """Results and dead letters of this round; returns the tasks to hand out again."""
        # The barrier: a pong comes after the results of every task sent before it,
        # and after the dead letters of those whose handler raised.
        for worker in sorted({w for _, w in sent.values()}):
            self.agent.request(worker, "ping", timeout=TIMEOUT)
        waiting = {task for task, _ in sent.values()}
        retry = []
        for letter in self.agent.dlq():
            if letter.message.id not in sent:
                continue  # not this round's (or not this run's)
            task, worker = sent[letter.message.id]
            print(f"  dead letter: task {task} on {worker}: {letter.reason}")
            self.unhealthy.setdefault(worker, letter.reason)
            waiting.discard(task)
            retry.append(task)
        self.reassigned += len(retry)
        deadline = time.monotonic() + TIMEOUT
        while waiting:  # all here already, after the barrier; the deadline is a guard
            result = self.agent.recv(timeout=max(deadline - time.monotonic(), 0.0)).payload
            out = outcomes[result["task"]]
            out.worker = result["worker"]
            out.value, out.error = result.get("value"), result.get("error", "")
            waiting.discard(result["task"])
        return sorted(retry)


def summarize(planner: Planner, outcomes: dict[int, Outcome]) -> None:
    print(f"  {'task':4s}  {'op':9s}  {'worker':9s}  {'tries':5s}  result")
    for task, out in sorted(outcomes.items()):
        result = f"error: {out.error}" if out.error else repr(out.value)
        print(f"  {task:4d}  {out.op:9s}  {out.worker:9s}  {out.attempts:5d}  {result}")
    done = sum(1 for o in outcomes.values() if not o.error)
    failed = [t for t, o in outcomes.items() if o.error]
    for worker, reason in planner.unhealthy.items():
        print(f"worker {worker} taken off the rota: {reason}")
    print(
        f"summary: {len(outcomes)} tasks, {done} done, {len(failed)} failed, "
        f"{planner.reassigned} reassigned after a worker failed them"
    )


def check(planner: Planner, outcomes: dict[int, Outcome], broken: str) -> None:
    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise Failed(what)

    for task, out in outcomes.items():
        try:
            want: Any = OPS[out.op](*out.args)
        except ZeroDivisionError:
            expect(out.error.startswith("ZeroDivisionError"), f"task {task}: {out}")
            continue
        expect(out.value == want and not out.error, f"task {task}: {out}, wanted {want!r}")
        expect(out.worker != broken, f"task {task} done by the broken worker")
    expect(list(planner.unhealthy) == [broken], f"unhealthy: {planner.unhealthy}")
    expect("RuntimeError" in planner.unhealthy[broken], planner.unhealthy[broken])
    expect(planner.reassigned == len(JOB) // len(planner.workers), f"{planner.reassigned}")


# -------------------------------------------------------------------- main


def run(bus: str, n_workers: int) -> None:
    workers = [f"worker-{i}" for i in range(1, n_workers + 1)]
    broken = workers[-1]
    with shmbus.Runner(bus=bus, dlq="memory") as runner:  # an example leaves no DLQ file
        planner = Planner(runner.connect(PLANNER), workers)  # first: workers report to it
        procs = [runner.spawn(w, worker, args=(w == broken,)) for w in workers]
        planner.await_workers()
        print(f"bus {bus!r}: {PLANNER} and {n_workers} workers ({broken} is broken)")
        outcomes = planner.run(JOB)
        summarize(planner, outcomes)
        check(planner, outcomes, broken)
    for p in procs:  # asked to stop by the runner, each left the bus properly
        if p.exitcode != 0:
            raise Failed(f"{p.name} exited with {p.exitcode}")


def leftovers(bus: str) -> list[str]:
    prefixes = (f"shmbus.{bus}.", f"sem.shmbus.{bus}.")
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefixes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bus", default="example-coordination", help="default: %(default)s")
    parser.add_argument("--workers", type=int, default=3, help="2 or more (default: 3)")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers: at least 2 (the last one is broken)")
    try:
        run(args.bus, args.workers)
    except (Failed, shmbus.ShmbusError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    left = leftovers(args.bus)
    if left:
        print(f"FAILED: left in /dev/shm: {left}", file=sys.stderr)
        return 1
    print("agent_coordination: every task ended as expected; nothing left in /dev/shm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
