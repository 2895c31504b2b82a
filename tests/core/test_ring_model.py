"""The ring against a plain Python model, driven by Hypothesis.

The model keeps Agrona's space accounting (free-running head and tail, 8-byte
aligned records with an 8-byte header, padding at the wrap, a record that
wraps must end before the head) and the reader's rules (it stops at a claim
still open, skips padding, and does not run past the last frame it returns).
It predicts, for every call, whether a write fits, what a read returns and
how many bytes are in use.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmbus
from shmbus import Ring

HEADER = 8


def aligned(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Record:
    size: int  # aligned bytes it takes in the ring
    payload: bytes | None  # None: padding, or an aborted claim
    open: bool = False


class Model:
    def __init__(self, capacity: int, max_frame: int) -> None:
        self.capacity = capacity
        self.max_frame = max_frame
        self.head = 0
        self.tail = 0
        self.records: list[Record] = []

    def reserve(self, length: int) -> Record | None:
        """Agrona's claimCapacity; None when the ring is full."""
        required = aligned(HEADER + length)
        if required > self.capacity - (self.tail - self.head):
            return None
        to_end = self.capacity - self.tail % self.capacity
        if required > to_end:
            if required > self.head % self.capacity:
                return None
            self.records.append(Record(to_end, None))
            self.tail += to_end
        record = Record(required, None, open=True)
        self.records.append(record)
        self.tail += required
        return record

    def read(self, max_count: int) -> list[bytes]:
        got: list[bytes] = []
        while self.records and len(got) < max_count:
            first = self.records[0]
            if first.open:
                break
            self.records.pop(0)
            self.head += first.size
            if first.payload is not None:
                got.append(first.payload)
        return got


CAPACITY = 4096
# Mostly small, some up to half the ring (past the default max_frame of 504).
sizes = st.one_of(st.integers(0, 120), st.integers(0, 2100))
_names = itertools.count()


class RingMachine(RuleBasedStateMachine):
    prefix = "model"
    max_frame: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.name = f"{self.prefix}-{next(_names)}"
        self.ring = Ring.create(self.name, CAPACITY, max_frame=self.max_frame)
        self.writer = Ring.attach(self.name)
        self.model = Model(CAPACITY, self.ring.max_frame)
        self.claims: list[tuple[object, memoryview, Record, bytes]] = []

    def teardown(self) -> None:
        for claim, *_ in self.claims:
            claim.__exit__(RuntimeError, None, None)  # type: ignore[attr-defined]
        self.writer.close()
        self.ring.close()
        self.ring.unlink()

    def _payload(self, size: int) -> bytes:
        return bytes((size + i) % 251 for i in range(size))

    @rule(size=sizes)
    def try_write(self, size: int) -> None:
        data = self._payload(size)
        if size > self.model.max_frame:
            with pytest.raises(shmbus.MessageTooLarge):
                self.writer.try_write(data)
            return
        record = self.model.reserve(size)
        assert self.writer.try_write(data) == (record is not None)
        if record:
            record.payload, record.open = data, False

    @rule(count=st.integers(1, 6), size=sizes)
    def write_many(self, count: int, size: int) -> None:
        frames = [self._payload((size + 37 * i) % (self.model.max_frame + 1)) for i in range(count)]
        expected = 0
        for frame in frames:
            record = self.model.reserve(len(frame))
            if record is None:
                break
            record.payload, record.open = frame, False
            expected += 1
        assert self.writer.write_many(frames, timeout=0) == expected

    @precondition(lambda self: len(self.claims) < 3)
    @rule(size=st.integers(0, 300))
    def open_claim(self, size: int) -> None:
        record = self.model.reserve(size)
        if record is None:
            with pytest.raises(shmbus.RingFull):
                self.writer.claim(size, timeout=0)
            return
        claim = self.writer.claim(size, timeout=0)
        view = claim.__enter__()
        data = self._payload(size)
        view[:] = data
        self.claims.append((claim, view, record, data))

    @precondition(lambda self: self.claims)
    @rule(which=st.integers(0, 2), commit=st.booleans())
    def close_claim(self, which: int, commit: bool) -> None:
        claim, _, record, data = self.claims.pop(which % len(self.claims))
        if commit:
            claim.__exit__(None, None, None)  # type: ignore[attr-defined]
            record.payload = data
        else:
            claim.__exit__(RuntimeError, None, None)  # type: ignore[attr-defined]
        record.open = False

    @rule(count=st.integers(1, 8))
    def read_many(self, count: int) -> None:
        assert self.ring.read_many(count, timeout=0) == self.model.read(count)

    @rule()
    def read_one(self) -> None:
        expected = self.model.read(1)
        assert self.ring.try_read() == (expected[0] if expected else None)

    @rule()
    def read_view(self) -> None:
        expected = self.model.read(1)
        if not expected:
            with pytest.raises(shmbus.ReadTimeout):
                self.ring.read_view(timeout=0)
            return
        with self.ring.read_view(timeout=0) as view:
            assert bytes(view) == expected[0]

    @invariant()
    def bytes_in_use_match(self) -> None:
        assert self.ring.used == self.model.tail - self.model.head


class BigFrameMachine(RingMachine):
    prefix = "model-big"
    max_frame = CAPACITY // 2 - HEADER  # frames up to half the ring: wraps all the time


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize("machine", [RingMachine, BigFrameMachine])
def test_ring_matches_the_model(machine, names):
    machine.prefix = names("model")
    state_machine_test = machine.TestCase
    state_machine_test.settings = SETTINGS
    state_machine_test().runTest()
