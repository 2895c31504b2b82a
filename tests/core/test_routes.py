"""The routes table (a seqlock blob in shared memory) and topic patterns."""

from __future__ import annotations

import os
import time
import zlib

import pytest

import shmbus
from shmbus.core.routes import Table, match, validate_pattern, validate_topic

# ------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "pattern,topic,expected",
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.y.c", False),
        ("a.*", "a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a.b", True),
        ("*.b.>", "x.b.y", True),
        ("*.b.>", "x.b", False),
        ("events.*", "events.start", True),
        ("events.*", "other.start", False),
    ],
)
def test_topic_patterns(pattern, topic, expected):
    assert match(validate_pattern(pattern), validate_topic(topic)) is expected


@pytest.mark.parametrize(
    "bad", ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "é", None, "x" * 1025]
)
def test_bad_topics_are_refused(bad):
    with pytest.raises(shmbus.InvalidName):
        validate_topic(bad)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a.b*", "a..*", "> .a", None])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(shmbus.InvalidName):
        validate_pattern(bad)


# ---------------------------------------------------------------- table


def test_table_versions_move_once_per_write_and_readers_see_the_latest(names):
    name = names("routes")
    with Table.create(name, 1 << 16) as table:
        reader = Table.attach(name)
        try:
            assert reader.read() == (0, None)
            assert table.write({"agents": {"a": 1}}) == 1 == reader.version
            assert table.write({"agents": {"a": 1, "b": 2}}) == 2 == reader.version
            assert reader.read() == (2, {"agents": {"a": 1, "b": 2}})
        finally:
            reader.close()
    assert not os.path.exists(f"/dev/shm/shmbus.{name}")


def test_table_grows_the_readers_buffer_and_refuses_what_does_not_fit(names):
    with Table.create(names("routes"), 1 << 16) as table:
        big = {"x": "y" * 30_000}
        table.write(big)
        assert table.read() == (1, big)
        with pytest.raises(shmbus.MessageTooLarge, match="65536"):
            table.write({"x": "y" * 70_000})
        assert table.read() == (1, big)  # a refused write changes nothing


def test_table_attach_errors(names):
    with pytest.raises(shmbus.NotFound):
        Table.attach(names("none"))
    name = names("ring")
    with shmbus.Ring.create(name, 4096):
        with pytest.raises(shmbus.BadSegment):
            Table.attach(name)


def test_corrupt_table_length_is_an_error_not_a_crash(names):
    name = names("routes")
    with Table.create(name, 4096) as table:
        table.write([1, 2, 3])
        with open(f"/dev/shm/shmbus.{name}", "r+b") as f:
            f.seek(136)  # the length word: the test knows the layout on purpose
            f.write((1 << 40).to_bytes(8, "little"))
        with pytest.raises(shmbus.CorruptFrame):
            table.read()
        with open(f"/dev/shm/shmbus.{name}", "r+b") as f:
            f.seek(136)
            f.write((3).to_bytes(8, "little"))
            f.seek(256)
            f.write(b"\xc1\xc1\xc1")
        with pytest.raises(shmbus.CorruptFrame, match="msgpack"):
            table.read()


def _write_forever(name: str, seconds: float) -> None:
    table = Table.attach(name)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        body = os.urandom(n % 3000)
        table.write({"n": n, "body": body, "crc": zlib.crc32(body)})
    table.close()


def test_readers_never_see_a_torn_write(names, children):
    name = names("routes")
    with Table.create(name, 1 << 16) as table:
        children.start(_write_forever, name, 1.5)
        seen = 0
        last = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (seen < 2000 or children.procs[0].is_alive()):
            version, value = table.read()
            if value is None:
                continue
            assert zlib.crc32(value["body"]) == value["crc"]
            assert version >= last
            last = version
            seen += 1
        children.join_all(10)
        assert seen >= 2000
