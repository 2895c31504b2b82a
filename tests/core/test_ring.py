"""The Ring contract: create/attach, limits, full and empty rings, claims, views, errors."""

from __future__ import annotations

import os
import signal
import stat
import time

import numpy as np
import pytest

import shmbus
from shmbus import Ring

SHM = "/dev/shm"


@pytest.fixture
def pair(ring_name):
    """A reader that owns the ring and a writer attached to it."""
    reader = Ring.create(ring_name, 1 << 16)
    writer = Ring.attach(ring_name)
    try:
        yield reader, writer
    finally:
        writer.close()
        reader.close()
        reader.unlink()


# ------------------------------------------------------------ lifecycle


def test_create_attach_share_frames_and_properties(pair, ring_name):
    reader, writer = pair
    assert reader.shm_name == f"/shmbus.{ring_name}"
    assert reader.capacity == writer.capacity == 1 << 16
    assert reader.max_frame == writer.max_frame == (1 << 16) // 8 - 8
    writer.write(b"hello")
    assert reader.read(1) == b"hello"


def test_segment_is_private_to_the_user_and_has_no_semaphore(pair, ring_name):
    assert stat.S_IMODE(os.stat(f"{SHM}/shmbus.{ring_name}").st_mode) == 0o600
    # The doorbell is a futex word in the header: no file anyone could overwrite.
    assert not [n for n in os.listdir(SHM) if n.startswith("sem.") and ring_name in n]


def test_a_segment_others_may_open_is_refused(ring_name):
    with Ring.create(ring_name, 4096):
        os.chmod(f"{SHM}/shmbus.{ring_name}", 0o666)
        with pytest.raises(shmbus.ForeignObject, match="another user or is open to others"):
            Ring.attach(ring_name)
        os.chmod(f"{SHM}/shmbus.{ring_name}", 0o600)
        Ring.attach(ring_name).close()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a segment to another user needs root")
def test_a_segment_of_another_user_is_refused(ring_name):
    from shmbus.core.routes import Table

    with Ring.create(ring_name, 4096):
        os.chown(f"{SHM}/shmbus.{ring_name}", 65534, 65534)  # nobody's, still mode 0600
        with pytest.raises(shmbus.ForeignObject):
            Ring.attach(ring_name)
    with Table.create(ring_name):
        os.chown(f"{SHM}/shmbus.{ring_name}", 65534, 65534)
        with pytest.raises(shmbus.ForeignObject):
            Table.attach(ring_name)


def test_a_symlink_in_dev_shm_is_never_followed(ring_name, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(1024 + 4096))
    os.symlink(target, f"{SHM}/shmbus.{ring_name}")
    try:
        with pytest.raises(shmbus.ShmbusError):
            Ring.attach(ring_name)
        with pytest.raises(shmbus.ShmbusError):
            Ring.create(ring_name, 4096)  # not created through it either
        assert target.read_bytes() == bytes(1024 + 4096)
    finally:
        os.unlink(f"{SHM}/shmbus.{ring_name}")


def test_context_manager_of_the_creator_unlinks(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        assert os.path.exists(f"{SHM}/shmbus.{ring_name}")
        with Ring.attach(ring_name) as other:
            other.write(b"x")
        assert os.path.exists(f"{SHM}/shmbus.{ring_name}")  # an attacher leaves it
        assert ring.read(0) == b"x"
    assert not os.path.exists(f"{SHM}/shmbus.{ring_name}")
    assert not os.path.exists(f"{SHM}/sem.shmbus.{ring_name}.bell")
    assert ring.closed


@pytest.mark.parametrize(
    "bad", ["", ".hidden", "-dash", "a/b", "sp ace", "a" * 201, "é", None, 42, "x\0y"]
)
def test_invalid_names_are_refused(bad):
    with pytest.raises(shmbus.InvalidName) as info:
        Ring.create(bad, 4096)
    assert isinstance(info.value, ValueError)
    with pytest.raises(shmbus.InvalidName):
        Ring.attach(bad)


def test_attach_to_a_missing_name_raises_not_found(ring_name):
    with pytest.raises(shmbus.NotFound) as info:
        Ring.attach(ring_name)
    assert isinstance(info.value, FileNotFoundError)
    assert ring_name in str(info.value)


def test_create_twice_raises_already_exists(ring_name):
    with Ring.create(ring_name, 4096):
        with pytest.raises(shmbus.AlreadyExists) as info:
            Ring.create(ring_name, 4096)
        assert isinstance(info.value, FileExistsError)


def test_attach_to_something_that_is_not_a_ring_is_a_clear_error(ring_name):
    path = f"{SHM}/shmbus.{ring_name}"
    for content in (b"", b"\0" * 100, b"\0" * (1024 + 4096), os.urandom(1024 + 8192)):
        with open(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600), "wb") as f:
            f.write(content)
        try:
            with pytest.raises(shmbus.BadSegment):
                Ring.attach(ring_name)
        finally:
            os.unlink(path)


@pytest.mark.parametrize("capacity", [0, 1000, 3000, 2048, 1 << 31, "4096", 4096.0])
def test_bad_capacity_is_refused(ring_name, capacity):
    with pytest.raises(ValueError, match="power of two"):
        Ring.create(ring_name, capacity)


def test_max_frame_is_bounded_by_half_the_ring(ring_name):
    with pytest.raises(ValueError, match="max_frame"):
        Ring.create(ring_name, 4096, max_frame=4096)
    with Ring.create(ring_name, 4096, max_frame=2040) as ring:
        ring.write(b"z" * 2040)
        assert ring.read(0) == b"z" * 2040


def test_closed_ring_raises_closed_and_close_is_idempotent(ring_name):
    ring = Ring.create(ring_name, 4096)
    ring.close()
    ring.close()
    for call in (
        lambda: ring.write(b"x"),
        lambda: ring.try_write(b"x"),
        lambda: ring.write_many([b"x"]),
        lambda: ring.read(0),
        lambda: ring.try_read(),
        lambda: ring.read_many(3, 0),
        lambda: ring.claim(1),
        lambda: ring.read_view(0),
        lambda: ring.unblock(),
        lambda: ring.used,
    ):
        with pytest.raises(shmbus.Closed):
            call()
    ring.unlink()


def test_close_refuses_while_a_claim_is_open(pair):
    reader, writer = pair
    with writer.claim(4) as buf:
        with pytest.raises(BufferError):
            writer.close()
        buf[:] = b"abcd"
    assert reader.read(0) == b"abcd"


# --------------------------------------------------------------- limits


def test_oversized_frame_raises_with_size_and_limit(pair):
    reader, writer = pair
    size = writer.max_frame + 1
    for call in (
        lambda: writer.write(b"x" * size),
        lambda: writer.try_write(b"x" * size),
        lambda: writer.claim(size),
    ):
        with pytest.raises(shmbus.MessageTooLarge) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert str(size) in str(info.value) and str(writer.max_frame) in str(info.value)
        assert info.value.size == size and info.value.limit == writer.max_frame
    assert reader.used == 0


def test_write_many_with_one_oversized_frame_writes_nothing(pair):
    reader, writer = pair
    with pytest.raises(shmbus.MessageTooLarge):
        writer.write_many([b"ok", b"x" * (writer.max_frame + 1), b"ok"])
    assert reader.try_read() is None


def test_full_ring_refuses_then_accepts_after_a_read(pair):
    reader, writer = pair
    frame = b"f" * 100
    count = 0
    while writer.try_write(frame):
        count += 1
    assert count == (1 << 16) // 112  # 8-byte header, 8-byte alignment
    with pytest.raises(shmbus.RingFull) as info:
        writer.write(frame, timeout=0.02)
    assert reader.name in str(info.value) and "full" in str(info.value)
    assert writer.write_many([frame] * 3, timeout=0) == 0
    assert reader.read(0) == frame
    assert writer.try_write(frame)
    assert len(reader.read_many(10_000, 0)) == count


def test_write_many_returns_how_many_fit_and_keeps_order(pair):
    reader, writer = pair
    frames = [i.to_bytes(4, "little") * 250 for i in range(100)]  # 1.5 rings
    written = writer.write_many(frames, timeout=0)
    assert 0 < written < len(frames)
    got = reader.read_many(1000, 0)
    assert got == frames[:written]
    assert writer.write_many(frames[written:], timeout=0) == len(frames) - written


def test_empty_ring_read_times_out(pair):
    reader, _ = pair
    t0 = time.monotonic()
    with pytest.raises(shmbus.ReadTimeout) as info:
        reader.read(timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 >= 0.05
    assert reader.read_many(10, timeout=0.01) == []
    assert reader.read_many(0, timeout=None) == []
    assert reader.try_read() is None
    with pytest.raises(TimeoutError):
        reader.read_view(timeout=0.01)


# ----------------------------------------------------------- frame kinds


def test_empty_and_max_size_frames_round_trip(pair):
    reader, writer = pair
    big = os.urandom(writer.max_frame)
    writer.write(b"")
    writer.write(big)
    writer.write_many([b"", b"a", b""])
    assert reader.read_many(10, 0) == [b"", big, b"", b"a", b""]


def test_bytes_like_frames_are_accepted(pair):
    reader, writer = pair
    arr = np.arange(10, dtype=np.float64)
    writer.write(bytearray(b"ba"))
    writer.write(memoryview(b"mv"))
    writer.write(arr)
    writer.write_many([bytearray(b"x"), memoryview(arr), b"y"])
    assert reader.read(0) == b"ba"
    assert reader.read(0) == b"mv"
    assert reader.read(0) == arr.tobytes()
    assert reader.read_many(10, 0) == [b"x", arr.tobytes(), b"y"]


def test_frames_stay_in_order_across_many_wraps(ring_name):
    with Ring.create(ring_name, 4096) as ring:
        rng = np.random.default_rng(1)
        expected = []
        for _ in range(300):
            batch = [os.urandom(int(n)) for n in rng.integers(0, 300, size=int(rng.integers(1, 9)))]
            assert ring.write_many(batch, timeout=0) == len(batch)
            expected.extend(batch)
            got = ring.read_many(int(rng.integers(1, 12)), 0)
            assert got == expected[: len(got)]
            del expected[: len(got)]
        assert ring.read_many(1000, 0) == expected


def test_claim_commits_on_exit_and_aborts_on_exception(pair):
    reader, writer = pair
    with writer.claim(5) as buf:
        assert isinstance(buf, memoryview) and len(buf) == 5
        buf[:] = b"first"
    with pytest.raises(RuntimeError):
        with writer.claim(6) as buf:
            buf[:3] = b"bad"
            raise RuntimeError("abort me")
    writer.write(b"after")
    assert reader.read_many(10, 0) == [b"first", b"after"]
    with pytest.raises(ValueError):
        buf[0]  # the view is released when the block ends


def test_reader_waits_for_an_open_claim_in_order(pair):
    reader, writer = pair
    claim = writer.claim(3)
    view = claim.__enter__()
    writer.write(b"behind")
    assert reader.read_many(10, 0) == []  # the claim holds the line
    view[:] = b"abc"
    claim.__exit__(None, None, None)
    assert reader.read_many(10, 0) == [b"abc", b"behind"]


def test_numpy_array_written_in_place_through_a_claim(pair):
    reader, writer = pair
    with writer.claim(8 * 16) as buf:
        np.frombuffer(buf, dtype=np.int64)[:] = np.arange(16)
    assert np.array_equal(np.frombuffer(reader.read(0), dtype=np.int64), np.arange(16))


def test_read_view_is_zero_copy_and_consumes_on_exit(pair):
    reader, writer = pair
    writer.write_many([b"one", b"two"])
    with reader.read_view(0) as view:
        assert bytes(view) == b"one"
        assert reader.used > 0
    assert reader.read(0) == b"two"
    assert reader.used == 0
    with pytest.raises(ValueError):
        view[0]


def test_correlation_ids_are_unique_across_attachments(pair):
    reader, writer = pair
    ids = [reader.next_correlation_id() for _ in range(50)]
    ids += [writer.next_correlation_id() for _ in range(50)]
    assert len(set(ids)) == 100 and min(ids) >= 1


def test_used_and_heartbeat_follow_the_reader(pair):
    reader, writer = pair
    assert reader.used == 0
    writer.write(b"x" * 10)
    assert writer.used == 24
    before = reader.heartbeat
    time.sleep(0.02)
    reader.read(0)
    assert reader.used == 0
    assert reader.heartbeat > before


# ----------------------------------------------------- across processes


def _write_later(name: str, delay: float, frame: bytes) -> None:
    time.sleep(delay)
    with Ring.attach(name) as ring:
        ring.write(frame)


def _drain_later(name: str, delay: float, count: int) -> None:
    time.sleep(delay)
    ring = Ring.attach(name)
    try:
        got = 0
        while got < count:
            got += len(ring.read_many(count, timeout=10))
    finally:
        ring.close()


@pytest.mark.parametrize("spin_ns", [0, 50_000])
def test_a_sleeping_reader_is_woken_by_another_process(ring_name, children, spin_ns):
    with Ring.create(ring_name, 4096) as reader:
        reader.spin_ns = spin_ns
        children.start(_write_later, ring_name, 0.2, b"wake up")
        assert reader.read(timeout=10) == b"wake up"
        children.join_all(10)


def test_a_blocked_writer_resumes_when_another_process_reads(ring_name, children):
    ring = Ring.create(ring_name, 4096)
    try:
        frames = [b"q" * 100] * 200  # several rings' worth
        children.start(_drain_later, ring_name, 0.1, len(frames))
        assert ring.write_many(frames, timeout=10) == len(frames)
        children.join_all(10)
    finally:
        ring.close()
        ring.unlink()


def test_signal_handlers_run_during_a_blocking_read(pair):
    reader, _ = pair
    calls = []
    old = signal.signal(signal.SIGALRM, lambda *a: calls.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
    try:
        with pytest.raises(shmbus.ReadTimeout):
            reader.read(timeout=0.2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(calls) >= 2  # the wait was interrupted and went on


def test_an_exception_from_a_signal_handler_ends_a_blocking_read(pair):
    reader, _ = pair

    def boom(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            reader.read(timeout=None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t0 < 5


def test_frames_larger_than_the_scratch_buffer_come_out_whole_and_in_order(ring_name):
    with Ring.create(ring_name, 1 << 22, max_frame=1 << 20) as ring:
        big = [os.urandom(n) for n in (300_000, 1 << 20, 262_145)]
        small = [b"s1", b"s2", b"s3"]
        ring.write_many([small[0], big[0], small[1], big[1], big[2], small[2]])
        assert ring.read(0) == small[0]
        assert ring.read(0) == big[0]
        assert ring.read_many(10, 0) == [small[1]]  # stops before the large frame
        assert ring.read_many(10, 0) == [big[1]]  # which comes alone
        assert ring.try_read() == big[2]
        assert ring.read_many(10, 0) == [small[2]]
        assert ring.used == 0


def test_views_kept_past_their_block_and_close_stay_valid_memory(ring_name):
    ring = Ring.create(ring_name, 4096)
    writer = Ring.attach(ring_name)
    with writer.claim(5) as buf:
        buf[:] = b"hello"
        kept = buf[:]
        arr = np.frombuffer(buf, dtype=np.uint8)
    with ring.read_view(0) as view:
        seen = view[:]
    writer.close()
    ring.close()
    ring.unlink()
    # The mapping lives as long as these do: touching them must not crash.
    kept[:] = b"XXXXX"
    assert len(bytes(seen)) == 5 and int(arr.sum()) >= 0
