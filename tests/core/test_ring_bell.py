"""The doorbell is a futex word in the ring's header: whatever another process
writes over it costs that inbox a late wake-up at most, never a process.

With a POSIX semaphore as the bell, 32 bytes of 0xff written over its file
made glibc's sem_post abort (SIGABRT) every process that rang it.
"""

from __future__ import annotations

import mmap
from typing import Any

from shmbus import Ring

SHM = "/dev/shm"
HANG = 30
N = 2_000
# The header words a sleeping reader and its writers share (shmbus_ring.c):
# `sleeping` at 768 and the futex word `bell` at 772, in one cache line.
WORDS = slice(768, 776)


def _reader(name: str, conn: Any) -> None:
    ring = Ring.attach(name, lanes=True)
    ring.spin_ns = 0  # straight to the doorbell whenever it is empty
    got = []
    try:
        while len(got) < N:
            got.append(int(ring.read(timeout=HANG)))
    finally:
        conn.send(got)


def _scribble(name: str) -> None:
    with open(f"{SHM}/shmbus.{name}", "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
        m[WORDS] = b"\xff" * 8


def test_a_doorbell_written_over_costs_no_process(ring_name, children):
    with Ring.create(ring_name, 1 << 16, lanes=3) as inbox:
        parent, child = children.ctx.Pipe(duplex=False)
        reader = children.start(_reader, ring_name, child)
        child.close()
        writer = Ring.attach(ring_name, lanes=True)
        try:
            for i in range(N):
                if i % 50 == 0:
                    _scribble(ring_name)  # between the reader's sleeps, and during them
                writer.lane(i % 101).write(str(i).encode(), timeout=HANG)
            assert parent.poll(HANG), "the reader never finished"
            got = parent.recv()
        finally:
            writer.close()
        reader.join(HANG)
        assert reader.exitcode == 0  # not SIGABRT
        # Every frame arrived, each lane in order (lanes reorder between them).
        assert sorted(got) == list(range(N))
        for lane in range(3):
            mine = [v for v in got if Ring.lane(inbox, v % 101) is inbox.lanes[lane]]
            assert mine == sorted(mine)
