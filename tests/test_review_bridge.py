"""Review of the uds bridge's C data path and its client: each test shows a
bug found in review (it failed before its fix)."""

from __future__ import annotations

import socket
import threading
import time

from shmbus.transport import wire
from shmbus.transport.uds import Stream


class _GatedLock:
    """A lock whose blocking acquire waits for ``go`` first: a thread is
    held right where it waits for the lock, as a reader is while another
    thread reads for a verdict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()
        self.go = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self.waiting.set()
            assert self.go.wait(10)
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _verdict_record(number: int) -> bytes:
    return wire.RECORD.pack(wire.HEAD - 4, 0, wire.VERDICT, number, 1)


def test_a_record_read_while_waiting_for_a_verdict_reaches_the_reader_waiting_then():
    """A reader that waited for the socket while a sender read it for its
    verdict gets the record that sender stashed, not the next one (or a
    timeout while it sits in the stash)."""
    ours, bridge = socket.socketpair()
    stream = Stream(ours)
    try:
        gate = _GatedLock()
        stream._rlock = gate  # type: ignore[assignment]
        got: list[bytes | None] = []
        reader = threading.Thread(target=lambda: got.append(stream.read_record(1.0)))
        reader.start()
        assert gate.waiting.wait(10)  # the stash was empty: it waits for the socket
        bridge.sendall(bytes(wire.record([b"message"])) + _verdict_record(1))
        assert stream.verdict(1, 10) == (0, 1)  # read the record (stashed), then the verdict
        gate.go.set()
        reader.join(10)
        assert got and got[0] is not None, "the stashed record never reached the reader"
        assert got[0].endswith(b"message")
    finally:
        stream.close()
        bridge.close()


def test_what_a_uds_agent_took_before_it_left_is_counted_received(bus):
    """Its counts of the records it took ride lazily on its next record: one
    that leaves before it wrote again still has them counted."""
    import shmbus

    with shmbus.connect(bus=bus, name="obs") as obs:
        with shmbus.connect(bus=bus, name="rx", transport="uds") as rx:
            for i in range(3):
                obs.send("rx", i)
                assert rx.recv(timeout=10).payload == i
        deadline = time.monotonic() + 10
        while "rx" in obs.stats().agents:
            assert time.monotonic() < deadline, "rx never left"
            time.sleep(0.02)
        stats = obs.stats()
        assert stats.dlq == 0
        assert stats.departed.received == 3


def test_a_uds_resend_keeps_no_verdict_nobody_waits_for(bus):
    """A resend goes as a record of policy "error" (never waiting), whose
    verdict nobody waits for: it must not be kept for ever."""
    import shmbus
    from shmbus.transport.uds import _Peer

    with (
        shmbus.connect(bus=bus, name="rx") as rx,
        shmbus.connect(bus=bus, name="tx", transport="uds") as tx,
    ):
        out = tx._link.out
        for _ in range(5):
            frame = out.frame(int(shmbus.MessageType.DIRECT), b"\xa1x", 0, out._take(1),
                              recipient="rx", recipient_id=out._recipient("rx")[0])  # fmt: skip
            assert _Peer(out).try_write(frame)
            assert rx.recv(timeout=10) is not None
        tx.send("rx", "last", backpressure="error")  # waits for its own verdict, after theirs
        assert rx.recv(timeout=10).payload == "last"
        assert tx._link.stream._verdicts == {}
