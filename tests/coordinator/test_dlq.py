"""The dead-letter queue: bounded, FIFO eviction counted, kept in a file that
survives a coordinator stopped by SIGTERM or killed by SIGKILL, a torn tail
cut off, control ops that address entries by id."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import shmbus
from shmbus.cli.dlq import Control
from shmbus.coordinator.dlq import FILE, MAGIC, DeadLetterQueue, _record
from shmbus.core.message import MessageType, decode_frame, encode_frame, pack_payload
from shmbus.core.paths import socket_path, state_dir
from shmbus.errors import CoordinatorRunning, UnknownRecipient
from tests.conftest import start_coordinator


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every bus of these tests keeps its state (the DLQ) in a temporary directory."""
    path = tmp_path / "state"
    monkeypatch.setenv("SHMBUS_STATE_DIR", str(path))
    return path


def frame(n: int, recipient: str = "nobody") -> bytes:
    return encode_frame(
        int(MessageType.DIRECT),
        sender=b"a",
        recipient=recipient.encode(),
        payload=pack_payload(n)[0],
    )


def fill(dlq: DeadLetterQueue, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        dlq.add(frame(n), f"reason {n}")


def payloads(dlq: DeadLetterQueue) -> list[int]:
    return [decode_frame(e["frame"]).payload for e in dlq.entries.values()]


# --------------------------------------------------------------- in process


def test_the_oldest_go_first_when_full_and_are_counted(tmp_path):
    dlq = DeadLetterQueue("b", 3, directory=tmp_path / "b")
    fill(dlq, 5)
    assert payloads(dlq) == [2, 3, 4] and list(dlq.entries) == [3, 4, 5]
    assert (dlq.evicted, dlq.total) == (2, 5)
    dlq.close()
    again = DeadLetterQueue("b", 3, directory=tmp_path / "b")
    assert payloads(again) == [2, 3, 4] and (again.evicted, again.total) == (2, 5)
    again.close()


def test_a_letter_sent_again_after_a_lost_reply_is_kept_once(tmp_path):
    """An agent whose dlq_add outlived the coordinator's reply sends it again
    to the next one with unless_recent: found among the last entries, not added."""
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    first = dlq.handle("dlq_add", {"frame": frame(1), "reason": "expired"})
    fill(dlq, 3, start=2)
    again = dlq.handle("dlq_add", {"frame": frame(1), "reason": "expired", "unless_recent": True})
    assert again["id"] == first["id"] and payloads(dlq) == [1, 2, 3, 4]
    other = dlq.handle(
        "dlq_add", {"frame": frame(1), "reason": "inbox full", "unless_recent": True}
    )
    assert other["id"] != first["id"] and payloads(dlq) == [1, 2, 3, 4, 1]
    dlq.handle("dlq_add", {"frame": frame(1), "reason": "expired"})  # a plain add always adds
    assert payloads(dlq) == [1, 2, 3, 4, 1, 1]
    dlq.close()


def test_a_smaller_bound_on_reload_keeps_the_newest_and_counts_the_rest(tmp_path):
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    fill(dlq, 6)
    dlq.close()
    smaller = DeadLetterQueue("b", 4, directory=tmp_path / "b")
    assert payloads(smaller) == [2, 3, 4, 5] and smaller.evicted == 2
    smaller.close()


def test_nothing_is_created_until_something_is_dead_lettered(tmp_path):
    dlq = DeadLetterQueue("b", 3, directory=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    fill(dlq, 1)
    assert (tmp_path / "b" / FILE).read_bytes().startswith(MAGIC)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "b" / FILE).stat().st_mode & 0o777 == 0o600
    dlq.close()


def test_a_memory_dlq_reads_writes_and_locks_nothing(tmp_path):
    keeper = DeadLetterQueue("b", 10, directory=tmp_path / "b")  # a file DLQ, with letters
    fill(keeper, 2)
    before = (tmp_path / "b" / FILE).read_bytes()
    dlq = DeadLetterQueue("b", 3, directory=tmp_path / "b", persist=False)  # no lock asked
    assert dlq.entries == {}  # the file's letters are not loaded
    fill(dlq, 5, start=10)
    assert dlq.remove([4]) == [4]
    assert payloads(dlq) == [12, 14] and (dlq.total, dlq.evicted) == (5, 2)
    assert dlq.handle("dlq_list", {})["store"] == "memory"
    assert dlq.purge() == 2 and dlq.entries == {}
    dlq.close()
    assert (tmp_path / "b" / FILE).read_bytes() == before  # left as it was
    assert keeper.handle("dlq_list", {})["store"] == "file"
    keeper.close()
    memory = DeadLetterQueue("m", 3, directory=tmp_path / "m", persist=False)
    fill(memory, 1)
    memory.close()
    assert not (tmp_path / "m").exists()


def test_ids_are_stable_and_never_given_twice(tmp_path):
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    fill(dlq, 4)
    assert dlq.remove([2, 9]) == [2]
    dlq.close()
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    assert list(dlq.entries) == [1, 3, 4] and payloads(dlq) == [0, 2, 3]
    assert dlq.purge() == 3 and not dlq.entries
    dlq.close()
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    assert not dlq.entries and dlq.total == 4
    assert dlq.add(frame(9), "again")["id"] == 5
    dlq.close()


def test_list_pages_forward_by_id_and_takes_ids(tmp_path):
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    fill(dlq, 6)
    assert [e["id"] for e in dlq.list(2)[0]] == [5, 6]  # the newest, oldest first
    page, more = dlq.list(4, after=1)
    assert [e["id"] for e in page] == [2, 3, 4, 5] and more
    assert dlq.list(4, after=5) == ([dlq.entries[6]], False)
    assert [e["id"] for e in dlq.list(10, ids=[4, 2, 99])[0]] == [4, 2]
    reply = dlq.handle("dlq_list", {"ids": [4, 99]})
    assert reply["missing"] == [99] and reply["size"] == 6 and reply["next_id"] == 7
    with pytest.raises(ValueError):
        dlq.handle("dlq_remove", {"ids": ["x"]})
    dlq.close()


def _torn_header(good: bytes, rec: bytes) -> bytes:
    return good + rec[:5]


def _torn_body(good: bytes, rec: bytes) -> bytes:
    return good + rec[: len(rec) - 3]


def _flipped_byte(good: bytes, rec: bytes) -> bytes:
    return good + rec[:-1] + bytes([rec[-1] ^ 0xFF])


def _huge_length(good: bytes, rec: bytes) -> bytes:
    return good + b"\xff\xff\xff\x7f" + rec[4:]


def _zeros(good: bytes, rec: bytes) -> bytes:  # a filesystem may show a crash's tail so
    return good + bytes(64)


@pytest.mark.parametrize("damage", [_torn_header, _torn_body, _flipped_byte, _huge_length, _zeros])
def test_a_torn_or_corrupt_tail_is_cut_off_logged_and_the_rest_kept(tmp_path, caplog, damage):
    path = tmp_path / "b" / FILE
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    fill(dlq, 3)
    dlq.close()
    good = path.read_bytes()
    rec = _record({"op": "add", "id": 4, "time": 1.0, "reason": "r", "frame": frame(3)})
    path.write_bytes(damage(good, rec))
    with caplog.at_level(logging.WARNING, logger="shmbus.coordinator.dlq"):
        dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    assert payloads(dlq) == [0, 1, 2]
    assert path.read_bytes() == good
    assert "cut off" in caplog.text and f"byte {len(good)}" in caplog.text
    dlq.add(frame(7), "after the cut")  # appends where the good part ends
    dlq.close()
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    assert payloads(dlq) == [0, 1, 2, 7] and list(dlq.entries)[-1] == 4
    dlq.close()


def test_a_file_that_is_not_a_dlq_is_set_aside(tmp_path, caplog):
    (tmp_path / "b").mkdir(mode=0o700)
    (tmp_path / "b" / FILE).write_bytes(b"something else entirely")
    with caplog.at_level(logging.ERROR, logger="shmbus.coordinator.dlq"):
        dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    assert not dlq.entries and "not a DLQ file" in caplog.text
    [aside] = (tmp_path / "b").glob(FILE + ".bad-*")
    assert aside.read_bytes() == b"something else entirely"
    fill(dlq, 1)
    dlq.close()
    assert len(DeadLetterQueue("b", 10, directory=tmp_path / "b").entries) == 1


def test_the_file_is_compacted_once_it_grows_well_past_the_bound(tmp_path):
    path = tmp_path / "b" / FILE
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b", compact_min=8192)
    sizes = []
    for n in range(400):
        dlq.add(frame(n), "x" * 100)
        sizes.append(path.stat().st_size)
    one = sizes[1] - sizes[0]
    assert max(sizes) < 8192 + 3 * 10 * one  # never far past twice the bound
    assert min(sizes[200:]) < 4 * 10 * one  # and shrunk back, more than once
    dlq.close()
    dlq = DeadLetterQueue("b", 10, directory=tmp_path / "b", compact_min=8192)
    assert payloads(dlq) == list(range(390, 400))
    assert (dlq.evicted, dlq.total, dlq.next_id) == (390, 400, 401)
    dlq.close()


def test_a_second_keeper_of_the_same_dlq_is_refused(tmp_path):
    first = DeadLetterQueue("b", 10, directory=tmp_path / "b")
    fill(first, 1)
    with pytest.raises(CoordinatorRunning, match="keeps its DLQ"):
        DeadLetterQueue("b", 10, directory=tmp_path / "b")
    first.close()
    DeadLetterQueue("b", 10, directory=tmp_path / "b").close()


def test_the_state_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHMBUS_STATE_DIR", str(tmp_path / "s"))
    assert state_dir("bus1") == tmp_path / "s" / "bus1"
    monkeypatch.delenv("SHMBUS_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state_dir("bus1") == tmp_path / "x" / "shmbus" / "bus1"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert state_dir("bus1") == Path.home() / ".local" / "state" / "shmbus" / "bus1"


# ------------------------------------------------------- across processes


def start(children, bus: str, *args: str) -> subprocess.Popen[bytes]:
    """A coordinator process for ``bus`` (with ``args``), once it listens."""
    return start_coordinator(children, bus, *args)


def stop(proc: subprocess.Popen[bytes], bus: str, how: signal.Signals) -> None:
    proc.send_signal(how)
    proc.wait(10)
    if how == signal.SIGKILL:  # what a killed coordinator leaves, the next one replaces
        socket_path(bus).unlink()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_dlq_survives_a_coordinator_restart(names, runtime, children, state, how):
    bus = names("bus")
    proc = start(children, bus, "--dlq-size", "3")
    with shmbus.connect(bus=bus, name="a") as agent:
        for n in range(5):
            with pytest.raises(UnknownRecipient):
                agent.send("nobody", {"n": n})
        before = agent.dlq()
    assert [d.message.payload["n"] for d in before] == [2, 3, 4]
    stop(proc, bus, how)
    assert (state / bus / FILE).exists()
    proc = start(children, bus, "--dlq-size", "3")
    with shmbus.connect(bus=bus, name="b") as agent:
        after = agent.dlq()
        assert after == before  # the same messages, reasons and times
        assert all(d.reason.startswith("no recipient") for d in after)
        s = agent.stats()
        assert (s.dlq, s.dlq_total, s.dlq_evicted) == (3, 5, 2)
        with pytest.raises(UnknownRecipient):
            agent.send("nobody", {"n": 5})
        assert [d.message.payload["n"] for d in agent.dlq()] == [3, 4, 5]
        assert agent.stats().dlq_evicted == 3
    stop(proc, bus, signal.SIGTERM)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_memory_dlq_leaves_no_file_and_a_restart_starts_empty(
    names, runtime, children, state, how
):
    bus = names("bus")
    proc = start(children, bus, "--dlq", "file")  # an old letter, in the file
    with shmbus.connect(bus=bus, name="a") as agent:
        with pytest.raises(UnknownRecipient):
            agent.send("nobody", {"n": "old"})
    stop(proc, bus, signal.SIGTERM)
    old = (state / bus / FILE).read_bytes()
    proc = start(children, bus, "--dlq", "memory")
    with shmbus.connect(bus=bus, name="a") as agent:
        assert agent.dlq() == []  # the file's letter is not loaded
        for n in range(3):
            with pytest.raises(UnknownRecipient):
                agent.send("nobody", {"n": n})
        assert [d.message.payload["n"] for d in agent.dlq()] == [0, 1, 2]
        assert agent.stats().dlq == 3
    listing = subprocess.run(
        [sys.executable, "-m", "shmbus", "dlq", "list", "--bus", bus],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0 and "kept in memory only" in listing.stdout, listing.stderr
    stop(proc, bus, how)
    assert (state / bus / FILE).read_bytes() == old  # nothing written
    assert sorted(p.name for p in (state / bus).iterdir()) == [FILE]
    proc = start(children, bus, "--dlq", "memory")
    with shmbus.connect(bus=bus, name="b") as agent:
        assert agent.dlq() == []  # the last coordinator's letters went with it
        assert agent.stats().dlq == 0
    stop(proc, bus, signal.SIGTERM)
    assert proc.returncode == 0


def test_a_memory_dlq_on_a_fresh_bus_creates_no_state_directory(names, runtime, children, state):
    bus = names("bus")
    proc = start(children, bus, "--dlq", "memory")
    with shmbus.connect(bus=bus, name="a") as agent:
        with pytest.raises(UnknownRecipient):
            agent.send("nobody", 1)
        assert len(agent.dlq()) == 1
    stop(proc, bus, signal.SIGTERM)
    assert not (state / bus).exists()


def test_the_dlq_store_is_checked(names, runtime):
    from shmbus.coordinator import Coordinator
    from shmbus.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="'file', 'memory'"):
        Coordinator(names("bus"), dlq="disk")
    bad = subprocess.run(
        [sys.executable, "-m", "shmbus", "coordinator", "--bus", names("bus"), "--dlq", "disk"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'disk'" in bad.stderr


def test_a_coordinator_killed_mid_record_loses_only_that_record(names, runtime, children, state):
    bus = names("bus")
    proc = start(children, bus)
    with Control(bus) as ctl:
        ids = [ctl.call("dlq_add", frame=frame(n), reason="r")["id"] for n in range(3)]
    stop(proc, bus, signal.SIGKILL)
    path = state / bus / FILE
    with path.open("ab") as f:  # what a write cut short by the kill leaves
        f.write(_record({"op": "add", "id": 4, "time": 0.0, "reason": "r", "frame": frame(3)})[:9])
    proc = start(children, bus)
    with Control(bus) as ctl:
        reply = ctl.call("dlq_list")
        assert [e["id"] for e in reply["entries"]] == ids == [1, 2, 3]
        assert ctl.call("dlq_add", frame=frame(4), reason="r")["id"] == 4
    stop(proc, bus, signal.SIGTERM)
    assert proc.returncode == 0


def test_control_ops_remove_and_purge_by_id(names, runtime, children):
    bus = names("bus")
    proc = start(children, bus)
    try:
        with Control(bus) as ctl:
            for n in range(5):
                ctl.call("dlq_add", frame=frame(n), reason=f"r{n}")
            reply = ctl.call("dlq_remove", ids=[2, 4, 42])
            assert (reply["removed"], reply["missing"]) == ([2, 4], [42])
            assert [e["id"] for e in ctl.call("dlq_list")["entries"]] == [1, 3, 5]
            assert ctl.call("dlq_purge", ids=[1])["purged"] == 1
            with shmbus.connect(bus=bus, name="a") as agent:
                assert [d.message.payload for d in agent.dlq()] == [2, 4]
                assert agent.stats().dlq == 2
                assert ctl.call("dlq_purge")["purged"] == 2
                assert agent.dlq() == [] and agent.stats().dlq == 0
            with pytest.raises(shmbus.ShmbusError, match="integers"):
                ctl.call("dlq_remove", ids="all")
    finally:
        stop(proc, bus, signal.SIGTERM)


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
    """Found in review: the dead letters an agent kept while no coordinator ran
    are handed over once each."""
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
