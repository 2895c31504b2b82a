"""A ring whose shared memory is overwritten must fail cleanly: never crash, never hang.

Another process can write anything over the segment. After that, every call
of a process that has the ring mapped must return, raise a
:class:`shmbus.ShmbusError` (usually :class:`shmbus.CorruptFrame`) or time out
(a ``TimeoutError``), and attaching to garbage must raise
:class:`shmbus.BadSegment`. A segfault, an abort or an endless loop in the C
code would take the whole process down, so the corrupting and calling runs
in spawned children: the parent asserts they reported back and exited 0, and
fails (with the seed or example) if one crashed or stopped answering.

Corruption is written through the file in /dev/shm (``os.pwrite``), as a
foreign process would, while the rings stay mapped. Each case is a *plan*
(plain data): capacity, a seed for the traffic and the call arguments, the
corruption, then a list of steps (calls, or more corruption). The fixed seeds
make a failure reproducible from its seed alone::

    python -c "import tests.core.test_ring_corrupt as t; print(t.run_seed('repro', 'data', 17))"
"""

from __future__ import annotations

import faulthandler
import os
import random
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmbus
from shmbus import Ring

SHM = Path("/dev/shm")

# Layout (csrc/shmbus_ring.h): meta, then one 128-byte line per control word.
MAGIC, TAIL, HEAD_CACHE, HEAD, CORRELATION, HEARTBEAT, SLEEPING = 0, 128, 256, 384, 512, 640, 768
CONTROL = (TAIL, HEAD_CACHE, HEAD, CORRELATION, HEARTBEAT, SLEEPING)
DATA = 1024
U64 = struct.Struct("<Q")
I32 = struct.Struct("<i")

#: What a call on a corrupt ring may raise. Anything else fails the test.
ALLOWED = (shmbus.ShmbusError, TimeoutError)
#: Every wait is this short at most, so a corrupt ring cannot hold a call long.
TIMEOUTS = (0, 0.001, 0.01)
#: Frames over 256 KiB skip the reader's scratch buffer (Ring._read_large).
BIG = 256 * 1024 + 1
#: A child that makes no progress for this long is hung: a case takes well
#: under a second (its calls wait 0.01 s at most), even on a loaded machine.
HANG = 30.0
PLAN_HANG = 20.0


def seg_path(name: str) -> Path:
    return SHM / f"shmbus.{name}"


class _Abort(Exception):
    """Raised inside a claim block to abort the claim."""


# ------------------------------------------------------------ corruption


class Segment:
    """The segment file, written with pwrite as a foreign process would."""

    def __init__(self, name: str) -> None:
        self.fd = os.open(seg_path(name), os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.capacity = self.size - DATA

    def close(self) -> None:
        os.close(self.fd)

    def write(self, offset: int, data: bytes) -> None:
        offset %= self.size
        os.pwrite(self.fd, data[: self.size - offset], offset)  # never grow the file

    def u64(self, offset: int) -> int:
        return U64.unpack(os.pread(self.fd, 8, offset))[0]

    def index_of(self, field: int) -> int:
        """Data-area offset of the record the head or tail points at (8-aligned)."""
        return DATA + (self.u64(field) & (self.capacity - 1) & ~7)

    def apply(self, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "bytes":  # ("bytes", offset, data)
            self.write(action[1], action[2])
        elif kind == "random":  # ("random", offset, length, seed)
            _, offset, length, seed = action
            self.write(offset, random.Random(seed).randbytes(min(length, self.size)))
        elif kind == "u64":  # ("u64", offset, value)
            self.write(action[1], U64.pack(action[2] % (1 << 64)))
        elif kind == "rel64":  # ("rel64", field, base_field, delta): field = base + delta
            _, field, base, delta = action
            self.write(field, U64.pack((self.u64(base) + delta) % (1 << 64)))
        elif kind == "i32":  # ("i32", "head" | "tail" | "abs", offset, value)
            _, where, offset, value = action
            base = {"head": self.index_of(HEAD), "tail": self.index_of(TAIL), "abs": DATA}[where]
            pos = base + offset % self.capacity
            if pos + 4 > self.size:
                pos = DATA + (pos - DATA) % (self.capacity - 4)
            self.write(pos, I32.pack(value))
        else:
            raise AssertionError(f"unknown corruption {action!r}")


def _u64_values(rng: random.Random, capacity: int) -> int:
    near = [0, 1, 4, 7, 8, capacity - 8, capacity, capacity + 8]
    far = [1 << 31, 1 << 32, 1 << 63, (1 << 64) - 8, (1 << 64) - 1]
    return rng.choice([*near, *far, rng.getrandbits(64), rng.getrandbits(20) * 8])


def _i32_values(rng: random.Random, capacity: int, max_frame: int) -> int:
    small = [0, 1, 4, 7, 8, 9, 13, 16, 48]
    large = [max_frame + 8, max_frame + 9, max_frame + 16, capacity - 8, capacity, capacity + 8]
    huge = [(1 << 31) - 1, (1 << 31) - 8, -(1 << 31)]
    negative = [-1, -7, -8, -9, -48, -capacity]
    anything = [rng.randint(-(1 << 31), (1 << 31) - 1), rng.randint(1, 4096)]
    return rng.choice([*small, *large, *huge, *negative, *anything])


def random_action(rng: random.Random, kind: str, capacity: int, max_frame: int) -> tuple:
    """One corruption of the given kind, as plain data."""
    size = DATA + capacity
    if kind == "mixed":
        kind = rng.choice(["header", "control", "data", "data", "whole"])
    if kind == "header":
        offset = rng.randrange(DATA)
        return ("random", offset, rng.randint(1, DATA - offset), rng.getrandbits(32))
    if kind == "control":
        roll = rng.randrange(4)
        if roll == 0:
            return ("u64", rng.choice(CONTROL), _u64_values(rng, capacity))
        if roll == 1:  # a position close to the other one: plausible but wrong
            field, base = rng.choice([(TAIL, HEAD), (HEAD, TAIL), (HEAD_CACHE, TAIL)])
            deltas = [0, 4, 8, -8, capacity, capacity + 8, -capacity, -capacity - 8]
            delta = rng.choice([*deltas, rng.randint(-capacity, capacity)])
            return ("rel64", field, base, delta)
        if roll == 2:
            return ("u64", rng.choice(CONTROL) + rng.choice([0, 4]), rng.getrandbits(64))
        offset = rng.randrange(TAIL, 896)
        return ("random", offset, rng.randint(1, 896 - offset), rng.getrandbits(32))
    if kind == "data":
        roll = rng.randrange(3)
        if roll == 0:  # a length or type word where the reader or a writer will look
            where = rng.choice(["head", "head", "tail", "abs"])
            offset = rng.choice(
                [0, 0, 0, 4, 8, 48, rng.randrange(capacity) & ~7, rng.randrange(capacity)]
            )
            return ("i32", where, offset, _i32_values(rng, capacity, max_frame))
        offset = DATA + rng.randrange(capacity)
        length = rng.randint(1, min(rng.choice([8, 64, 512, capacity]), size - offset))
        if roll == 1:
            return ("random", offset, length, rng.getrandbits(32))
        return ("bytes", offset, bytes([rng.choice([0, 0xFF, 0x80, 0x7F])]) * length)
    if kind == "whole":
        roll = rng.randrange(3)
        if roll == 0:
            return ("random", 0, size, rng.getrandbits(32))
        if roll == 1:
            return ("bytes", 0, bytes([rng.choice([0, 0xFF])]) * size)
        offset = rng.randrange(size)
        return ("random", offset, rng.randint(1, size - offset), rng.getrandbits(32))
    raise AssertionError(f"unknown kind {kind!r}")


# ------------------------------------------------------------------ calls
#
# Each call takes (rng, reader, writer, held) and checks what it returns; an
# allowed exception is counted by the caller. `held` is a list of claims
# still open, committed or aborted later (so corruption can hit them).


def _frame(rng: random.Random, ring: Ring) -> bytes:
    roll = rng.randrange(10)
    if roll == 0:
        size = ring.max_frame + rng.randint(1, 9)  # MessageTooLarge
    elif roll < 3:
        size = rng.randint(0, ring.max_frame)
    else:
        size = rng.randint(0, 120)
    return rng.randbytes(size)


def _check_frame(ring: Ring, frame: object) -> None:
    assert isinstance(frame, bytes), type(frame)
    assert len(frame) <= ring.max_frame, f"a frame of {len(frame)} bytes > max_frame"


def call_read(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    _check_frame(reader, reader.read(rng.choice(TIMEOUTS)))


def call_read_many(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    n = rng.choice([1, 2, 7, 64, 1000])
    frames = reader.read_many(n, rng.choice(TIMEOUTS))
    assert isinstance(frames, list) and len(frames) <= n
    for f in frames:
        _check_frame(reader, f)


def call_try_read(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    frame = reader.try_read()
    if frame is not None:
        _check_frame(reader, frame)


def call_read_view(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    with reader.read_view(rng.choice(TIMEOUTS)) as view:
        assert view.nbytes <= reader.max_frame
        bytes(view)


def call_write(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    writer.write(_frame(rng, writer), rng.choice(TIMEOUTS))


def call_try_write(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    assert writer.try_write(_frame(rng, writer)) in (True, False)


def call_write_many(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    frames = [_frame(rng, writer) for _ in range(rng.randint(1, 20))]
    done = writer.write_many(frames, timeout=rng.choice(TIMEOUTS))
    assert 0 <= done <= len(frames)


def call_claim(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    size = len(_frame(rng, writer))
    try:
        with writer.claim(size, timeout=rng.choice(TIMEOUTS)) as buf:
            assert buf.nbytes == size
            buf[:] = rng.randbytes(size)
            if rng.randrange(4) == 0:
                raise _Abort
    except _Abort:
        pass


def call_hold_claim(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    size = rng.randint(0, min(writer.max_frame, 200))
    claim = writer.claim(size, timeout=rng.choice(TIMEOUTS))
    buf = claim.__enter__()
    buf[:] = rng.randbytes(size)
    held.append(claim)


def call_finish_claim(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    if held:
        finish_claim(held.pop(rng.randrange(len(held))), commit=rng.randrange(2) == 0)


def finish_claim(claim: Any, commit: bool) -> None:
    if commit:
        claim.__exit__(None, None, None)
    else:
        claim.__exit__(_Abort, _Abort(), None)


def call_unblock(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    assert reader.unblock(grace=0) in (True, False)


def call_dead_writer(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    writer._test_reserve(rng.randint(0, 100), write_padding=rng.randrange(2) == 0)


def call_figures(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    assert 0 <= reader.used <= reader.capacity
    assert 0 <= writer.used <= writer.capacity
    assert isinstance(reader.heartbeat, int)
    writer.next_correlation_id()
    repr(reader)


def call_attach(rng: random.Random, reader: Ring, writer: Ring, held: list) -> None:
    Ring.attach(reader.name).close()  # BadSegment once the meta is overwritten


CALLS: dict[str, Callable[..., None]] = {
    name[len("call_") :]: fn for name, fn in globals().items() if name.startswith("call_")
}
OPS = sorted(CALLS)


# ------------------------------------------------------------------ plans


def prepare(rng: random.Random, reader: Ring, writer: Ring, held: list, stats: Counter) -> None:
    """Healthy traffic first: positions anywhere, some frames pending, maybe claims open."""
    small = min(120, writer.max_frame)
    target, moved = rng.randrange(3 * min(reader.capacity, 1 << 16)), 0
    while moved < target:  # move the positions anywhere, up to a few laps
        frames = [rng.randbytes(rng.randint(0, small)) for _ in range(8)]
        done = writer.write_many(frames, timeout=0)
        moved += sum((8 + len(f) + 7) & ~7 for f in frames[:done])
        if done < len(frames) or rng.randrange(3) == 0:
            reader.read_many(1000, timeout=0)
    reader.read_many(1000, timeout=0)
    for _ in range(rng.randint(0, 3)):  # some pending
        writer.try_write(rng.randbytes(rng.randint(0, small)))
    if writer.max_frame > BIG and rng.randrange(2):  # one the reader copies without scratch
        writer.try_write(rng.randbytes(rng.randint(BIG, writer.max_frame)))
    for step in rng.choices(["hold_claim", "dead_writer", "try_write"], k=rng.randint(0, 3)):
        attempt(stats, step, rng, reader, writer, held)


def random_plan(kind: str, seed: int) -> dict:
    rng = random.Random(f"{kind}:{seed}")
    capacity = rng.choice([4096, 4096, 4096, 8192, 8192, 1 << 16, 1 << 16, 1 << 20])
    limit = capacity // 2 - 8
    max_frame = rng.choice([None, limit, 100])
    mf = max_frame if max_frame is not None else capacity // 8 - 8
    steps: list = []
    for _ in range(rng.randint(5, 30)):
        if rng.randrange(8) == 0:
            steps.append(random_action(rng, kind, capacity, mf))
        else:
            steps.append(rng.choice(OPS))
    return {
        "capacity": capacity,
        "max_frame": max_frame,
        "seed": rng.getrandbits(32),
        "corrupt": [random_action(rng, kind, capacity, mf) for _ in range(rng.randint(1, 4))],
        "steps": steps,
    }


def attempt(
    stats: Counter, label: str, rng: random.Random, reader: Ring, writer: Ring, held: list
) -> None:
    """Make one call; count its outcome, or let a disallowed exception through."""
    try:
        CALLS[label](rng, reader, writer, held)
    except ALLOWED as e:
        stats[type(e).__name__] += 1
    else:
        stats["ok"] += 1


def run_plan(name: str, plan: dict) -> Counter:
    """Build the ring, corrupt it, make the calls; any disallowed exception propagates."""
    stats: Counter = Counter()
    rng = random.Random(plan["seed"])
    reader = Ring.create(name, plan["capacity"], max_frame=plan["max_frame"])
    held: list = []
    try:
        writer = Ring.attach(name)
        seg = Segment(name)
        try:
            prepare(rng, reader, writer, held, Counter())
            for action in plan["corrupt"]:
                seg.apply(action)
            for step in plan["steps"]:
                if isinstance(step, str):
                    attempt(stats, step, rng, reader, writer, held)
                else:
                    seg.apply(step)
            for op in OPS:  # every call at least once on the corrupt ring
                attempt(stats, op, rng, reader, writer, held)
            while held:
                attempt(stats, "finish_claim", rng, reader, writer, held)
        finally:
            for claim in held:  # only after a failure: let the handles close
                try:
                    finish_claim(claim, commit=False)
                except Exception:
                    pass
            seg.close()
            writer.close()
    finally:
        reader.close()
        reader.unlink()
    return stats


def run_seed(base: str, kind: str, seed: int) -> Counter:
    return run_plan(f"{base}.{seed}", random_plan(kind, seed))


# ------------------------------------------------------------ the children


def _seeds_child(conn: Any, progress: Any, base: str, kind: str, seeds: list[int]) -> None:
    faulthandler.enable()
    stats: Counter = Counter()
    for seed in seeds:
        progress.value = seed
        try:
            stats.update(run_seed(base, kind, seed))
        except BaseException:
            conn.send(("fail", seed, traceback.format_exc()))
            return
    conn.send(("ok", None, dict(stats)))


def _plans_child(conn: Any, base: str) -> None:
    faulthandler.enable()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        index, plan = msg
        try:
            conn.send(("ok", dict(run_plan(f"{base}.{index}", plan))))
        except BaseException:
            conn.send(("fail", traceback.format_exc()))


def _cleanup(name: str) -> None:
    """After a crashed child: remove the ring it had open."""
    Ring.unlink_name(name)


def _await(
    conn: Any,
    proc: Any,
    what: Callable[[], str],
    cleanup: Callable[[], None],
    progress: Any = None,
    stall: float = HANG,
) -> Any:
    """The child's next message; fail if it dies first or makes no progress for ``stall`` s.

    ``what()`` names the case for the failure message; ``progress`` is the
    shared value the child moves on at every case.
    """
    last, since = None, time.monotonic()
    while not conn.poll(0.2):  # True on a message, or on EOF when the child died
        mark = None if progress is None else progress.value
        if mark != last:
            last, since = mark, time.monotonic()
        elif time.monotonic() - since > stall:
            proc.kill()
            proc.join(10)
            cleanup()
            pytest.fail(f"{what()}: the child made no progress for {stall}s (a hang in the ring?)")
    try:
        return conn.recv()
    except EOFError:
        proc.join(10)
        cleanup()
        pytest.fail(
            f"{what()}: the child died with exit code {proc.exitcode} "
            "(negative: killed by that signal, a crash); see captured stderr"
        )


SEEDS = list(range(400))
KINDS = ["header", "control", "data", "whole", "mixed"]


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_segment_never_crashes_or_hangs(kind, names, children):
    base = names(kind)
    parent, child = children.ctx.Pipe(duplex=False)
    progress = children.ctx.Value("q", -1, lock=False)
    proc = children.start(_seeds_child, child, progress, base, kind, SEEDS)
    child.close()
    status, seed, payload = _await(
        parent,
        proc,
        lambda: f"kind {kind!r}, seed {progress.value}",
        lambda: _cleanup(f"{base}.{progress.value}"),
        progress,
    )
    proc.join(HANG)
    assert status == "ok", f"kind {kind!r}, seed {seed}: run_seed('x', {kind!r}, {seed})\n{payload}"
    assert proc.exitcode == 0
    stats = Counter(payload)
    assert stats["ok"] > 0, stats
    if kind in ("control", "data", "whole", "mixed"):
        assert stats["CorruptFrame"] > 0, f"no corruption was ever detected: {stats}"


class PlanRunner:
    """A child that runs plans sent over a pipe, restarted after a crash or hang."""

    def __init__(self, children: Any, base: str) -> None:
        self.children = children
        self.base = base
        self.index = 0
        self.proc = None
        self.conn = None
        self.hung: str | None = None

    def _start(self) -> None:
        self.conn, child = self.children.ctx.Pipe()
        self.proc = self.children.start(_plans_child, child, self.base)
        child.close()

    def run(self, plan: dict) -> Counter:
        if self.hung:  # fail fast: shrinking by waiting out hang after hang takes ages
            pytest.fail(self.hung)
        if self.proc is None:
            self._start()
        self.index += 1
        name = f"{self.base}.{self.index}"

        def dead() -> None:
            self.proc = None
            _cleanup(name)

        self.conn.send((self.index, plan))
        try:
            reply = _await(self.conn, self.proc, lambda: f"plan {plan!r}", dead, stall=PLAN_HANG)
        except pytest.fail.Exception as e:
            if "no progress" in str(e):
                self.hung = f"{e} (later examples were failed without running)"
            raise
        assert reply[0] == "ok", f"plan {plan!r}:\n{reply[1]}"
        return Counter(reply[1])

    def stop(self) -> None:
        if self.proc is not None:
            self.conn.send(None)
            self.proc.join(30)
            assert self.proc.exitcode == 0, f"the plan runner ended with {self.proc.exitcode}"


_u64 = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 4, 8, 4096, 4104, 8192, 1 << 63, (1 << 64) - 8, (1 << 64) - 1]),
)
_i32 = st.one_of(
    st.integers(-(1 << 31), (1 << 31) - 1),
    st.sampled_from([0, 1, 7, 8, 9, 16, 48, 4096, 8192, (1 << 31) - 1, -1, -8, -48, -(1 << 31)]),
)
_actions = st.one_of(
    st.tuples(st.just("bytes"), st.integers(0, DATA + 8192), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("u64"), st.sampled_from(CONTROL), _u64),
    st.tuples(
        st.just("rel64"),
        st.sampled_from([TAIL, HEAD, HEAD_CACHE]),
        st.sampled_from([TAIL, HEAD]),
        st.integers(-9000, 9000),
    ),
    st.tuples(
        st.just("i32"),
        st.sampled_from(["head", "tail", "abs"]),
        st.one_of(st.sampled_from([0, 4, 8, 48]), st.integers(0, 8191)),
        _i32,
    ),
)
_plans = st.fixed_dictionaries(
    {
        "capacity": st.sampled_from([4096, 8192]),
        "max_frame": st.sampled_from([None, 100]),
        "seed": st.integers(0, 2**32 - 1),
        "corrupt": st.lists(_actions, min_size=1, max_size=5),
        "steps": st.lists(st.one_of(st.sampled_from(OPS), _actions), max_size=25),
    }
)


@pytest.fixture
def _runner_box() -> Iterator[dict]:
    """One plan-running child for all the examples of a Hypothesis test."""
    box: dict = {}
    yield box
    if box.get("runner") is not None:
        box["runner"].stop()


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=_plans)
def test_hypothesis_corruption_never_crashes_or_hangs(plan, names, children, _runner_box):
    runner = _runner_box.get("runner")
    if runner is None:
        runner = _runner_box["runner"] = PlanRunner(children, names("hyp"))
    runner.run(plan)


# --------------------------------------------------------- targeted cases
#
# Each case starts from the same healthy state (head and tail at index 3072
# of a 4 KiB ring, three 40-byte frames pending), corrupts one thing, then
# makes one call on a fresh copy. The expected outcome follows from the
# checks in csrc/shmbus_ring.c: a reader must refuse an impossible record
# ("corrupt") rather than return garbage, and must wait ("empty") on a
# record still being written. Then every call is made once more, allowed
# outcomes only.

PENDING = [(b"pending-%d" % i).ljust(40, b"p") for i in range(3)]
READS = ("read", "read_many", "try_read", "read_view")
WRITES = ("write", "write_many", "claim")
BAD_UNBLOCK = {"unblock": "corrupt"}
HEALTHY = {"read": "data", "write": "ok", "unblock": "False", "attach": "attached"}


def _targeted_state(name: str) -> tuple[Ring, Ring]:
    reader = Ring.create(name, 4096)  # max_frame 504
    writer = Ring.attach(name)
    for _ in range(4):  # 64 frames of 48 bytes: head = tail = 3072
        assert writer.write_many([b"f" * 40] * 16, timeout=0) == 16
        assert len(reader.read_many(100, 0)) == 16
    assert writer.write_many(PENDING, timeout=0) == 3
    return reader, writer


def _i32_at_head(value: int, offset: int = 0) -> tuple:
    return ("i32", "head", offset, value)


TARGETED: dict[str, tuple[list[tuple], dict[str, Any]]] = {
    "huge_length_at_head": ([_i32_at_head(0x7FFFFFF8)], {"read": "corrupt"}),
    "int32_max_length_at_head": ([_i32_at_head(0x7FFFFFFF)], {"read": "corrupt"}),
    "length_past_the_end": ([_i32_at_head(1024 + 8)], {"read": "corrupt"}),
    "length_over_max_frame": ([_i32_at_head(504 + 8 + 1)], {"read": "corrupt"}),
    "length_beyond_the_tail": ([_i32_at_head(200)], {"read": "corrupt"}),
    "length_shorter_than_a_header": ([_i32_at_head(5)], {"read": "corrupt"}),
    # 13 is a valid (empty-ish) record of 5 bytes; the next one starts inside
    # a payload, where "0ppp" reads as a huge length (see the scenario below).
    "length_not_aligned": ([_i32_at_head(13)], {"read": "data"}),
    "negative_length_in_progress": ([_i32_at_head(-48)], {"read": "empty", "unblock": "True"}),
    "negative_length_minus_one": ([_i32_at_head(-1)], {"read": "empty", **BAD_UNBLOCK}),
    "negative_length_int32_min": ([_i32_at_head(-(1 << 31))], {"read": "empty", **BAD_UNBLOCK}),
    "negative_length_beyond_the_tail": ([_i32_at_head(-200)], {"read": "empty", **BAD_UNBLOCK}),
    "padding_past_the_end": ([_i32_at_head(-1, 4), _i32_at_head(4096)], {"read": "corrupt"}),
    "padding_beyond_the_tail": ([_i32_at_head(-1, 4), _i32_at_head(1024)], {"read": "corrupt"}),
    "tail_more_than_capacity_ahead": (
        [("rel64", TAIL, HEAD, 4096 + 8)],
        {"write": "corrupt", "unblock": "corrupt"},
    ),
    # A writer checks the tail against its cached head, which still looks
    # fine here, so its write may go through (into space the reader has
    # passed): "ok" or "corrupt" both do.
    "tail_behind_head": (
        [("rel64", TAIL, HEAD, -8)],
        {"read": "corrupt", "write": ("ok", "corrupt"), "unblock": "corrupt"},
    ),
    "head_ahead_of_tail": (
        [("rel64", HEAD, TAIL, 64)],
        {"read": "empty", "write": ("ok", "corrupt"), "unblock": "corrupt"},
    ),
    "head_and_its_cache_ahead_of_tail": (
        [("rel64", HEAD, TAIL, 64), ("rel64", HEAD_CACHE, TAIL, 64)],
        {"read": "empty", "write": "corrupt", "unblock": "corrupt"},
    ),
    "head_not_aligned": ([("rel64", HEAD, HEAD, 4)], {"read": "corrupt", "unblock": "corrupt"}),
    "tail_not_aligned": ([("rel64", TAIL, TAIL, 4)], {"write": "corrupt"}),
    "head_cache_garbage": ([("u64", HEAD_CACHE, (1 << 64) - 1)], {}),
    "head_cache_ahead_of_tail": ([("rel64", HEAD_CACHE, TAIL, 4096 + 64)], {}),
    "meta_overwritten": ([("random", 0, 128, 1)], {"attach": "bad"}),
    "flags_and_counters_overwritten": (
        [("u64", SLEEPING, (1 << 64) - 1), ("u64", HEARTBEAT, 1 << 63), ("u64", CORRELATION, 7)],
        {},
    ),
    "positions_zeroed": (
        [("u64", TAIL, 0), ("u64", HEAD, 0), ("u64", HEAD_CACHE, 0)],
        {"read": "empty"},
    ),
}


def _outcome(op: str, reader: Ring, writer: Ring) -> str:
    """What one call did, in the words of the TARGETED table."""
    try:
        if op == "read":
            _check_frame(reader, reader.read(0.01))
            return "data"
        if op == "read_many":
            return "data" if reader.read_many(10, 0.01) else "empty"
        if op == "try_read":
            return "empty" if reader.try_read() is None else "data"
        if op == "read_view":
            with reader.read_view(0.01) as view:
                bytes(view)
            return "data"
        if op == "write":
            writer.write(b"w" * 40, 0.01)
            return "ok"
        if op == "write_many":
            return "ok" if writer.write_many([b"w" * 40] * 2, timeout=0.01) == 2 else "full"
        if op == "claim":
            with writer.claim(40, 0.01) as buf:
                buf[:] = b"c" * 40
            return "ok"
        if op == "unblock":
            return str(reader.unblock(grace=0))
        if op == "attach":
            Ring.attach(reader.name).close()
            return "attached"
    except shmbus.CorruptFrame:
        return "corrupt"
    except shmbus.BadSegment:
        return "bad"
    except shmbus.RingFull:
        return "full"
    except shmbus.ReadTimeout:
        return "empty"
    raise AssertionError(op)


def _targeted_child(conn: Any, progress: Any, base: str) -> None:
    faulthandler.enable()
    wrong = []
    stats: Counter = Counter()
    try:
        for i, (case, (actions, expect)) in enumerate(TARGETED.items()):
            expect = {**HEALTHY, **expect}
            for j, op in enumerate((*READS, *WRITES, "unblock", "attach")):
                name = f"{base}.{i}.{j}"
                progress.value = i * 100 + j
                reader, writer = _targeted_state(name)
                seg = Segment(name)
                try:
                    for action in actions:
                        seg.apply(action)
                    got = _outcome(op, reader, writer)
                    group = "read" if op in READS else "write" if op in WRITES else op
                    want = expect[group]
                    if got != want and not (isinstance(want, tuple) and got in want):
                        wrong.append(f"{case}: {op} -> {got}, expected {expect[group]}")
                    rng = random.Random(i * 100 + j)
                    held: list = []
                    for follow in OPS:  # then anything: allowed outcomes only
                        attempt(stats, follow, rng, reader, writer, held)
                    while held:
                        attempt(stats, "finish_claim", rng, reader, writer, held)
                finally:
                    seg.close()
                    writer.close()
                    reader.close()
                    reader.unlink()
        wrong += _targeted_scenarios(f"{base}.s")
    except BaseException:
        conn.send(("fail", progress.value, traceback.format_exc()))
        return
    conn.send(("ok", None, wrong))


def _targeted_scenarios(name: str) -> list[str]:
    """Cases followed over several calls."""
    wrong = []
    # A record still being written (negative length) that unblock turns into
    # padding: the reader skips it and goes on with the next two frames.
    reader, writer = _targeted_state(name)
    seg = Segment(name)
    try:
        seg.apply(_i32_at_head(-48))
        if reader.read_many(10, 0.01) != []:
            wrong.append("negative length: the reader did not wait")
        if reader.unblock(grace=0) is not True or reader.read_many(10, 0.01) != PENDING[1:]:
            wrong.append("negative length: unblock did not skip exactly that record")
    finally:
        seg.close()
        writer.close()
        reader.close()
        reader.unlink()
    # A length of 13 is a 5-byte frame; the next "record" starts inside a
    # payload and must be refused, by every read call, until a write or
    # unblock changes something.
    reader, writer = _targeted_state(name)
    seg = Segment(name)
    try:
        seg.apply(_i32_at_head(13))
        if reader.read(0.01) != PENDING[0][:5]:
            wrong.append("length 13: not read as a 5-byte frame")
        for op in READS:
            got = _outcome(op, reader, writer)
            if got != "corrupt":
                wrong.append(f"length 13, then {op} -> {got}, expected corrupt")
    finally:
        seg.close()
        writer.close()
        reader.close()
        reader.unlink()
    # A frame too large for the reader's scratch buffer is read another way
    # (peek, copy, release): its length is checked there too.
    cases = [(None, "data"), (BIG + 8 + 64, "corrupt"), (5, "corrupt"), (-BIG, "empty")]
    for value, want in cases:
        for op in READS:
            reader = Ring.create(name, 1 << 20, max_frame=(1 << 19) - 8)
            writer = Ring.attach(name)
            seg = Segment(name)
            try:
                writer.write(bytes(BIG), timeout=0)
                if value is not None:
                    seg.apply(_i32_at_head(value))
                got = _outcome(op, reader, writer)
                if got != want:
                    wrong.append(f"large frame, length {value}: {op} -> {got}, expected {want}")
            finally:
                seg.close()
                writer.close()
                reader.close()
                reader.unlink()
    return wrong


def test_targeted_corruption_is_refused_not_misread(names, children):
    base = names("target")
    parent, child = children.ctx.Pipe(duplex=False)
    progress = children.ctx.Value("q", -1, lock=False)
    proc = children.start(_targeted_child, child, progress, base)
    child.close()

    def cleanup() -> None:
        i, j = divmod(progress.value, 100)
        _cleanup(f"{base}.{i}.{j}")
        _cleanup(f"{base}.s")

    status, where, payload = _await(
        parent, proc, lambda: f"targeted case #{progress.value}", cleanup, progress
    )
    proc.join(HANG)
    assert status == "ok", f"case #{where}:\n{payload}"
    assert proc.exitcode == 0
    assert not payload, "\n".join(["outcomes other than expected:", *payload])


# ------------------------------------------------------------------ attach


def _meta(
    magic: int = 0x676E6952756D6853,
    version: int = 2,
    header: int = 1024,
    capacity: int = 4096,
    max_frame: int = 504,
) -> bytes:
    return struct.pack("<QIIQII", magic, version, header, capacity, max_frame, 0)


ATTACH_CASES: dict[str, tuple[int, bytes]] = {  # name: (file size, content at 0)
    "empty": (0, b""),
    "one_byte": (1, b"\x01"),
    "header_only": (1024, _meta()),
    "one_byte_short": (1024 + 4095, _meta()),
    "zeros": (1024 + 4096, b""),
    "random": (1024 + 8192, random.Random(7).randbytes(1024 + 8192)),
    "random_after_a_valid_magic": (1024 + 4096, _meta()[:8] + random.Random(8).randbytes(1000)),
    "wrong_magic": (1024 + 4096, _meta(magic=0x676E6952756D6854)),
    "wrong_version": (1024 + 4096, _meta(version=1)),
    "wrong_header_size": (1024 + 4096, _meta(header=512)),
    "capacity_not_a_power_of_two": (1024 + 4096, _meta(capacity=4000)),
    "capacity_too_small": (1024 + 4096, _meta(capacity=2048)),
    "capacity_larger_than_the_file": (1024 + 4096, _meta(capacity=8192)),
    "capacity_smaller_than_the_file": (1024 + 8192, _meta(capacity=4096)),
    "capacity_huge": (1024 + 4096, _meta(capacity=1 << 62)),
    "max_frame_zero": (1024 + 4096, _meta(max_frame=0)),
    "max_frame_over_half": (1024 + 4096, _meta(max_frame=2041)),
    "max_frame_huge": (1024 + 4096, _meta(max_frame=0xFFFFFFFF)),
    "sparse_2GiB": (1024 + (2 << 30), _meta(capacity=2 << 30)),
}


def _attach_child(conn: Any, progress: Any, base: str) -> None:
    faulthandler.enable()
    got = {}
    try:
        for i, (case, (size, content)) in enumerate(ATTACH_CASES.items()):
            progress.value = i
            name = f"{base}.{i}"
            Ring.create(name, 4096).close()  # a real ring of this user, mode 0600
            try:
                with open(seg_path(name), "r+b") as f:
                    f.truncate(0)
                    f.truncate(size)
                    f.write(content)
                try:
                    Ring.attach(name).close()
                    got[case] = "attached"
                except shmbus.ShmbusError as e:
                    got[case] = type(e).__name__
            finally:
                Ring.unlink_name(name)
    except BaseException:
        conn.send(("fail", progress.value, traceback.format_exc()))
        return
    conn.send(("ok", None, got))


def test_attach_to_garbage_raises_bad_segment(names, children):
    base = names("attach")
    parent, child = children.ctx.Pipe(duplex=False)
    progress = children.ctx.Value("q", -1, lock=False)
    proc = children.start(_attach_child, child, progress, base)
    child.close()

    def cleanup() -> None:
        _cleanup(f"{base}.{progress.value}")

    status, where, got = _await(
        parent, proc, lambda: f"attach case #{progress.value}", cleanup, progress
    )
    proc.join(HANG)
    assert status == "ok", f"case #{where}:\n{got}"
    assert proc.exitcode == 0
    assert got == {case: "BadSegment" for case in ATTACH_CASES}


# ------------------------------------------------------ under live traffic


READER_CALLS = ("read", "read_many", "try_read", "read_view", "unblock", "figures")
WRITER_CALLS = (
    "write",
    "try_write",
    "write_many",
    "claim",
    "hold_claim",
    "finish_claim",
    "figures",
)


def _live_child(conn: Any, name: str, role: str, seed: int, ready: Any, stop: Any) -> None:
    """Call the ring as a reader or a writer until told to stop; report the outcomes."""
    faulthandler.enable()
    rng = random.Random(seed)
    ring = Ring.attach(name)
    ready.set()
    calls = READER_CALLS if role == "reader" else WRITER_CALLS
    stats: Counter = Counter()
    held: list = []
    while not stop.is_set():
        attempt(stats, rng.choice(calls), rng, ring, ring, held)
    while held:
        attempt(stats, "finish_claim", rng, ring, ring, held)
    ring.close()
    conn.send(dict(stats))


def test_corruption_under_live_traffic(ring_name, children):
    """One reader and two writers in other processes while this one scribbles over the ring.

    Now and then the ring is healed (data zeroed, positions equal) so traffic
    resumes and the next corruption hits live records and positions.
    """
    ctx = children.ctx
    rng = random.Random(2024)
    with Ring.create(ring_name, 4096) as ring:
        stop = ctx.Event()
        started = []
        for i, role in enumerate(["reader", "writer", "writer"]):
            parent, child = ctx.Pipe(duplex=False)
            ready = ctx.Event()
            proc = children.start(_live_child, child, ring_name, role, 100 + i, ready, stop)
            child.close()
            started.append((role, proc, parent, ready))
        for role, proc, _, ready in started:
            assert ready.wait(60), f"the {role} (exit code {proc.exitcode}) did not attach"

        seg = Segment(ring_name)
        try:
            for _round in range(60):
                time.sleep(0.02)  # healthy traffic
                for _ in range(rng.randint(1, 10)):
                    kind = rng.choice(["control", "data", "data", "data", "mixed"])
                    seg.apply(random_action(rng, kind, ring.capacity, ring.max_frame))
                    time.sleep(rng.uniform(0, 0.002))
                position = rng.getrandbits(40) * 8
                seg.write(DATA, bytes(ring.capacity))
                for field in (TAIL, HEAD_CACHE, HEAD):
                    seg.apply(("u64", field, position))
        finally:
            stop.set()
            seg.close()
        children.join_all(30)
        outcomes = {}
        for i, (role, proc, parent, _) in enumerate(started):
            assert proc.exitcode == 0, f"the {role} exited with {proc.exitcode}; see stderr"
            assert parent.poll(10)
            outcomes[f"{role} {i}"] = Counter(parent.recv())
        for stats in outcomes.values():
            assert stats["ok"] > 0, outcomes  # traffic flowed between corruptions
