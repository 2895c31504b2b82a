"""The uds client's one-call send (``Stream.send_one``, csrc ``shmbus_record_send``).

A send builds and sends its record in one C call; what the socket takes
only in part is finished before the call returns, and what it does not take
at all is left to the caller's usual path. Checked here on a socketpair
with small buffers and a slow reader: every record the calls returned for
arrives whole, in order, and none of the others arrives at all. Then its
reads: a record read while a sender waits for its verdict reaches its reader.
"""

from __future__ import annotations

import socket
import threading
import time

from shmbus.core.message import FLAG_RAW, MessageType, decode_frame
from shmbus.transport import wire
from shmbus.transport.stream import _SCRATCH, Stream


def _args(i: int, payload: bytes) -> tuple:
    names = b"me" + b"you"
    return (
        names,
        2,
        3,
        0,
        1,
        2,
        int(MessageType.DIRECT),
        0,
        0,
        wire.info("block", None),
        i,
        0,
        0,
        payload,
        len(payload),
        FLAG_RAW,
    )


def _records(data: bytes) -> list[bytes]:
    """Whole records, parsed as the bridge would; the stream must end on a boundary."""
    out, pos = [], 0
    while pos < len(data):
        body = int.from_bytes(data[pos : pos + 4], "little")
        assert pos + 4 + body <= len(data), "the stream ends inside a record"
        out.append(data[pos : pos + 4 + body])
        pos += 4 + body
    return out


def test_a_record_the_socket_takes_in_part_is_finished_and_one_it_refuses_is_not_sent():
    a, b = socket.socketpair()
    stream = Stream(a)
    for s in (a, b):  # Stream asks for large buffers: small ones make it fill up
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 14)
    partial = []
    finish = stream._send
    stream._send = lambda data, deadline: partial.append(len(data)) or finish(data, deadline)
    got = bytearray()

    def reader() -> None:  # slow: the sender meets a full socket, often half-way
        b.settimeout(10)
        while chunk := b.recv(3000):
            got.extend(chunk)
            time.sleep(0.0005)

    thread = threading.Thread(target=reader)
    thread.start()
    sent, refused = [], 0
    try:
        deadline = time.monotonic() + 60
        i = 0
        while (len(partial) < 5 or refused < 5) and time.monotonic() < deadline:
            i += 1
            payload = bytes([i % 256]) * (40_000 if i % 50 == 1 else 100)
            number = stream.send_one(0, *_args(i, payload))
            if number:
                assert number == len(sent) + 1  # numbered as every record we wrote
                sent.append(i)
            else:
                refused += 1
    finally:
        a.shutdown(socket.SHUT_WR)
        thread.join(20)
        stream.close()
        b.close()
    assert not thread.is_alive()
    assert len(partial) >= 5 and refused >= 5, (partial, refused)
    records = _records(bytes(got))
    ids = []
    for rec in records:
        count, _, taken, granted = wire.RECORD.unpack_from(rec)[1:]
        assert count == 1 and (taken, granted) == (0, 0)
        frame = rec[wire.HEAD + 4 :]
        assert int.from_bytes(rec[wire.HEAD : wire.HEAD + 4], "little") == len(frame)
        msg = decode_frame(frame)
        assert msg.payload == bytes([msg.id % 256]) * (40_000 if msg.id % 50 == 1 else 100)
        ids.append(msg.id)
    assert ids == sent  # each whole, in order; a refused one never half-sent


def test_a_record_larger_than_the_scratch_is_left_to_the_usual_path():
    a, b = socket.socketpair()
    stream = Stream(a)
    try:
        assert stream.send_one(0, *_args(1, b"x" * _SCRATCH)) == 0
        assert stream.written == 0
        b.setblocking(False)
        try:
            leaked = b.recv(100)
        except BlockingIOError:
            leaked = b""
        assert leaked == b""
    finally:
        stream.close()
        b.close()


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
    timeout while it sits in the stash).

    Found in review of the uds bridge's C data path and its client (it failed
    before its fix)."""
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
