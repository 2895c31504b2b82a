"""Review: the dead letters an agent kept while no coordinator ran are handed over once each."""

from __future__ import annotations

import threading

import shmbus


class _SlowControl:
    """A control client whose first call waits for a second one (at most a
    second: one flush at a time makes none), as the beater's flush after a
    rejoin meets close()'s flush."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.first = threading.Event()
        self.second = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def call(self, op: str, *, wait: float | None = None, **args: object) -> dict[str, object]:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == 2:
            self.second.set()
        self.sent.append(args["frame"])  # type: ignore[arg-type]
        if n == 1:
            self.first.set()
            self.second.wait(1.0)
        return {"ok": True}


def test_two_threads_flushing_kept_dead_letters_send_each_once(bus) -> None:
    agent = shmbus.connect(bus, "a")
    real = agent._ctl
    try:
        fake = _SlowControl()
        agent._ctl = fake  # type: ignore[assignment]
        letters = [f"letter {i}".encode() for i in range(4)]
        agent._dlq_kept.extend((f, "why", False) for f in letters)
        beater = threading.Thread(target=agent._flush_dead_letters)
        beater.start()
        assert fake.first.wait(10)
        agent._flush_dead_letters()  # as close() does while the beater flushes
        beater.join(10)
        assert sorted(fake.sent) == sorted(letters)
        assert not agent._dlq_kept
    finally:
        agent._ctl = real
        agent.close()
