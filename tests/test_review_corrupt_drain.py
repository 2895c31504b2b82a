"""Review: a corrupt inbox of a departing agent does not bring the coordinator down."""

from __future__ import annotations

import mmap
import struct

import shmbus
from shmbus._native import lib


def test_the_coordinator_survives_draining_an_inbox_with_a_corrupt_record(bus) -> None:
    victim = shmbus.connect(bus=bus, name="victim")
    with shmbus.Ring.attach(victim.inbox.name) as ring:
        ring._test_reserve(64)  # room reserved: the drain waits for its record
    # ... whose length a broken (or hostile) writer then made nonsense.
    with open(f"/dev/shm/shmbus.{victim.inbox.name}", "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            struct.pack_into("<i", m, lib.SHMBUS_RING_HEADER_SIZE, -4)
    victim.close()  # the coordinator drains the inbox; it cannot unblock that record
    with shmbus.connect(bus=bus, name="after") as after:  # it still runs
        assert after.peers() == ["after"]
