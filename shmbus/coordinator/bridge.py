"""The coordinator's bridge: carries the traffic of agents on the uds transport.

A uds agent cannot map the bus's shared memory, so the coordinator makes its
inbox ring on its behalf, and this bridge moves its frames, with two threads
per agent so that neither a slow agent nor a full inbox ever stalls the
coordinator's control loop or another agent:

- *down*: reads the agent's inbox (highest lane first, as any reader) and
  writes the frames to its data socket, a block of them per record. A slow
  reader fills its socket, then its inbox: its senders feel backpressure as
  for any other agent.
- *up*: reads records from the data socket, checks every length and header
  field (the peer is untrusted), and writes each frame into its recipient's
  inbox lane (a publish: into every subscriber's, per the routes table),
  one ``write_many`` per run of frames to one lane. It counts in the stats
  segment on the agent's behalf, and dead-letters, with the reason, what it
  cannot deliver.

Both loops are C (csrc/shmbus_bridge.c), each run by a thread of ours inside
one call that never holds the GIL: a frame crosses the bridge without Python.
One more thread, the *hub*, reads every uds agent's socket and delivers what
needs no wait (a frame into an inbox with room, a run straight to a uds
recipient), so in a round trip no up thread needs waking; it hands anything
else to that agent's up thread. Python resolves routes from the routes table
when C asks for one, and turns what C could not deliver into dead letters.

A peer that sends a malformed or oversized record is disconnected with the
reason logged, and the coordinator then drops the agent as dead. DLQ entries
and such deaths are handed to the coordinator's loop (``pump``), the only
thread that touches its registry and DLQ.

The data socket is ``data.sock`` next to the control socket; a connection
opens with a hello naming the agent and the token its registration got.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any

from .._native import ffi, lib
from ..core.control import ControlError, Reader, encode
from ..core.message import HEADER, HEADER_SIZE, MessageType
from ..core.paths import data_socket_path, find_segments
from ..core.ring import Ring
from ..core.routes import Table, subscribers
from ..core.stats import StatsSegment
from ..errors import ShmbusError
from ..transport import wire

__all__ = ["Bridge", "data_path"]

log = logging.getLogger(__name__)

_SLICE = 0.1  # seconds: how often a waiting thread looks whether it must stop
# Nanoseconds the hub polls every uds socket after a record went through, before
# it sleeps; 0 by default. Its polling spares it a wake-up per record, but uds
# readers spin for their answers (as shm readers do), and a third spinner on a
# 2-CPU machine takes the CPU one of them needs: a round trip between uds
# agents took 70 us with the hub polling 100 us, 50 us with readers spinning.
# Worth setting where uds agents do not spin (spin=0).
try:
    _HUB_SPIN_NS = max(int(float(os.environ.get("SHMBUS_BRIDGE_SPIN_US", "0")) * 1000), 0)
except ValueError:
    log.warning("SHMBUS_BRIDGE_SPIN_US is not a number of microseconds: 0 it is")
    _HUB_SPIN_NS = 0
_HELLO_WAIT = 5.0
# Seconds a departed agent's last records may wait for room in full inboxes, in
# all (then to the DLQ): the coordinator's loop waits that long at most.
_DRAIN_WAIT = 2.0
_SOCKBUF = 4 << 20
_PUBLISH = int(MessageType.PUBLISH)
_ACK = int(MessageType.ACK)
_TYPE_AT = wire.TYPE_AT
_TYPE_MASK = sum(1 << int(t) for t in MessageType)  # the types a frame may have
_unpack = HEADER.unpack_from
assert lib.SHMBUS_LINK_PUBLISH == _PUBLISH, "csrc/shmbus_bridge.h disagrees with MessageType"


def data_path(bus: str) -> str:
    return str(data_socket_path(bus))


class BadPeer(Exception):
    """What a uds peer sent breaks the format: the connection goes."""


@dataclass
class _Expected:
    name: str
    id: int
    token: str
    inbox: str
    slot: int


class _Routes:
    """One thread's view of the routes table, and the inboxes it writes to."""

    def __init__(self, bus: str) -> None:
        self.table = Table.attach(find_segments(bus)[0])  # the coordinator's, made first
        self.version = -1
        self.agents: dict[str, list[Any]] = {}
        self.subs: dict[str, list[str]] = {}
        self.rings: dict[str, Ring] = {}

    def fresh(self) -> None:
        if self.table.version == self.version:
            return
        self.version, routes = self.table.read()
        routes = routes or {"agents": {}, "subs": {}}
        agents = routes["agents"]
        for name in [n for n in self.rings if agents.get(n) != self.agents.get(n)]:
            self.rings.pop(name).close()
        self.agents, self.subs = agents, routes["subs"]

    def ring(self, name: str) -> Ring | None:
        ring = self.rings.get(name)
        if ring is None and name in self.agents:
            try:
                ring = self.rings[name] = Ring.attach(self.agents[name][1], lanes=True)
            except ShmbusError:
                return None
        return ring

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.table.close()


class _Link:
    """One uds agent's two threads, each inside one C call that never holds
    the GIL (csrc/shmbus_bridge.h); they come back here only for what C
    cannot decide alone: a route to resolve, frames to dead-letter, the end."""

    def __init__(self, bridge: Bridge, who: _Expected, sock: socket.socket) -> None:
        self.bridge = bridge
        self.who = who
        self.sock = sock
        self.stop = threading.Event()  # the coordinator dropped the agent
        self.draining = False  # it is gone: what its socket holds is delivered, then the end
        self.lost: list[bytes] = []  # frames sent that it never took, for the DLQ
        stats = bridge.stats
        self.counters = stats.agent(who.slot)
        self.routes = _Routes(bridge.bus)
        try:
            self.inbox = Ring.attach(who.inbox, lanes=True)
        except ShmbusError as e:
            self.routes.close()
            raise BadPeer(f"the inbox of {who.name!r} is gone: {e}") from None
        name = who.name.encode()
        beat = stats.heartbeat(who.slot) or ffi.NULL
        c = lib.shmbus_link_new(
            sock.fileno(),
            name,
            len(name),
            who.id,
            _TYPE_MASK,
            self.counters,
            beat,
            self.routes.table._handle(),
            self.inbox._handle(),
        )
        if c == ffi.NULL:
            self.inbox.close()
            self.routes.close()
            raise BadPeer(f"no link for {who.name!r}")
        self.c = c
        if lib.shmbus_link_hub(c, bridge.hub) != lib.SHMBUS_OK:
            log.warning("uds agent %s: its socket is read by its own thread only", who.name)
        self.up = threading.Thread(
            target=self._up, name=f"shmbus-bridge-up-{who.name}", daemon=True
        )
        self.down = threading.Thread(
            target=self._down, name=f"shmbus-bridge-down-{who.name}", daemon=True
        )
        self.up.start()
        self.down.start()

    def _fail(self, reason: str) -> None:
        """The agent broke the protocol, or its socket broke: it is dead to the bus."""
        if not (self.stop.is_set() or self.draining):  # else it is off the bus already
            self.bridge.events.put(("kill", self.who.name, reason))
            self.bridge.wake()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _dead_letter(self, frame: bytes, reason: str) -> None:
        self.bridge.events.put(("dlq", self.who.name, frame, reason))
        self.bridge.wake()

    def _reason(self) -> str:
        return ffi.string(lib.shmbus_link_reason(self.c)).decode(errors="replace")

    # ---------------------------------------------------------- down

    def _down(self) -> None:
        """Inbox -> socket. Records stay in C until the agent counts them
        taken: what a dying agent never took goes to the DLQ, as what is
        left in its inbox does."""
        c = self.c
        rc = lib.shmbus_link_down(c)
        if rc == lib.SHMBUS_LINK_IOERR:
            self._fail(f"its data connection broke: {os.strerror(lib.shmbus_link_errno(c))}")
        elif rc == lib.SHMBUS_LINK_BAD:
            self._fail(self._reason())
        frames, lens, count = ffi.new("char **"), ffi.new("uint32_t **"), ffi.new("uint32_t *")
        for i in range(lib.shmbus_link_lost_count(c)):  # never taken: for the DLQ, in order
            lib.shmbus_link_lost(c, i, frames, lens, count)
            pos = 0
            for n in ffi.unpack(lens[0], count[0]):
                self.lost.append(ffi.buffer(frames[0] + pos, n)[:])
                pos += n

    # ------------------------------------------------------------ up

    def _up(self) -> None:
        """Socket -> inboxes."""
        try:
            self._up_loop()
        except Exception as e:  # a bug of ours: this agent is cut off, not the bridge
            log.exception("uds agent %s: the bridge's up thread failed", self.who.name)
            self._fail(f"the bridge failed on its records: {e!r}")

    def _up_loop(self) -> None:
        c = self.c
        where, size = ffi.new("char **"), ffi.new("uint32_t *")
        while True:
            rc = lib.shmbus_link_up(c)
            if rc == lib.SHMBUS_LINK_MISS:
                is_topic = lib.shmbus_link_miss(c, where, size)
                try:
                    name = ffi.buffer(where[0], size[0])[:].decode()
                except UnicodeDecodeError:
                    reason = "a frame whose recipient or topic is not UTF-8"
                    log.warning("uds agent %s disconnected: %s", self.who.name, reason)
                    self._fail(reason)
                    return
                self._install(bool(is_topic), name)
            elif rc == lib.SHMBUS_LINK_DEAD:
                self._undelivered()
            elif rc == lib.SHMBUS_LINK_EOF:
                return
            elif rc == lib.SHMBUS_LINK_BAD:
                reason = self._reason()
                log.warning("uds agent %s disconnected: %s", self.who.name, reason)
                self._fail(reason)
                return
            elif rc == lib.SHMBUS_LINK_IOERR:
                self._fail(f"its data connection broke: {os.strerror(lib.shmbus_link_errno(c))}")
                return
            else:  # stop
                return

    def _install(self, is_topic: bool, where: str) -> None:
        """Give C the route to ``where`` as the routes table has it now."""
        routes = self.routes
        routes.fresh()
        key = where.encode()
        topic_counters = self.bridge.stats.topic(key) if is_topic else ffi.NULL
        if is_topic:
            names = subscribers(routes.subs, where)  # C caches the route it makes
        else:
            names = [where] if where in routes.agents and not where.startswith(".") else []
        targets = [(n, r) for n in names if (r := routes.ring(n)) is not None]
        known = is_topic or bool(names)
        rc = lib.shmbus_link_route(
            self.c, is_topic, key, len(key), routes.version, known, topic_counters, len(targets)
        )
        if rc != lib.SHMBUS_OK:
            raise ShmbusError(f"route to {where!r}: error {rc}")
        for i, (n, ring) in enumerate(targets):
            info = routes.agents.get(n)
            slot = info[3] if info is not None and len(info) > 3 else 0
            counters = self.bridge.stats.agent(slot) if slot else ffi.NULL
            b = n.encode()
            lib.shmbus_link_route_target(
                self.c, i, ring._handle(), counters, b, len(b), n.startswith(".")
            )
            with self.bridge._lock:  # while it is in links, its link is not freed
                peer = self.bridge.links.get(n)
                if peer is not None and peer is not self and info and peer.who.inbox == info[1]:
                    lib.shmbus_link_route_peer(self.c, i, peer.c)

    def _undelivered(self) -> None:
        """Dead-letter, with the reason, what C could not deliver."""
        c = self.c
        acks: dict[str, int] = {}
        for i in range(lib.shmbus_link_dead_count(c)):
            d = lib.shmbus_link_dead(c, i)
            frame = ffi.buffer(d.frame, d.len)[:]
            name = ffi.buffer(d.name, d.name_len)[:].decode() if d.name_len else ""
            why = self._why(d, frame, name)
            if frame[_TYPE_AT] == _ACK:  # an shm sender would log it, not dead-letter it:
                acks[why] = acks.get(why, 0) + 1  # its sender resends, and the copy is acked again
                continue
            self._dead_letter(frame, why)
        for why, n in acks.items():
            log.info("uds agent %s could not ack %d messages: %s", self.who.name, n, why)

    def _why(self, d: Any, frame: bytes, name: str) -> str:
        fields = _unpack(frame)
        kind, (sl, rl, tl) = fields[2], fields[13:16]
        at = HEADER_SIZE + sl
        if d.why == lib.SHMBUS_DEAD_NOAGENT:
            recipient = frame[at : at + rl].decode()
            return f"no recipient: no agent named {recipient!r} on bus {self.bridge.bus!r}"
        if kind == _PUBLISH:
            who = f"subscriber {name!r} of {frame[at + rl : at + rl + tl].decode()!r}"
        else:
            who = repr(name)
        if d.why == lib.SHMBUS_DEAD_LEFT:
            return f"no recipient: {who} left the bus"
        if d.why == lib.SHMBUS_DEAD_TOOBIG:
            return f"too large for the inbox: {who} (a frame of {len(frame)} bytes)"
        if d.why == lib.SHMBUS_DEAD_FULL:
            policy, wait = wire.policy_of(d.policy | d.wait_ms << 2)
            waited = f" for {wait}s" if policy == "block" else ""
            if self.draining:
                waited = (
                    f" (its sender {self.who.name!r} had left: the bridge waited "
                    f"{_DRAIN_WAIT}s at most)"
                )
            return (
                f"inbox full{waited}: {who} ({d.used} of {d.capacity} bytes in use); "
                f"policy {policy!r}"
            )
        return f"the inbox of {who} failed: error {d.rc}"

    def drain(self, timeout: float) -> None:
        """The agent is off the bus: deliver what it wrote before it went.
        Its socket holds all of it (a dead writer writes no more), so this
        ends where those bytes end; full inboxes get ``timeout`` in all to
        make room (then to the DLQ)."""
        self.draining = True
        lib.shmbus_link_drain(self.c, int(timeout * 1e9))
        self.up.join(timeout + 3.0)  # and the time to route what fitted
        if self.up.is_alive():
            log.warning(
                "uds agent %s: its last records took over %.0fs to deliver; the rest is cut off",
                self.who.name,
                timeout,
            )

    def close(self) -> None:
        self.stop.set()
        lib.shmbus_link_stop(self.c)
        lib.shmbus_link_unhub(self.c)  # the hub never serves it again
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for t in (self.up, self.down):
            if t is not threading.current_thread():
                t.join(10)
        lib.shmbus_link_close(self.c)  # no other link sends to this socket from now on
        if not (self.up.is_alive() or self.down.is_alive()):
            lib.shmbus_link_free(self.c)  # else leaked: a thread may still be inside it
            self.inbox.close()
            self.routes.close()
        self.sock.close()


class Bridge:
    """Every uds agent's link; ``expect`` at registration, ``detach`` when it goes."""

    def __init__(self, bus: str, stats: StatsSegment) -> None:
        self.bus = bus
        self.stats = stats
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._expected: dict[str, _Expected] = {}
        self.links: dict[str, _Link] = {}
        self._stopping = threading.Event()
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        path = data_path(bus)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        os.chmod(path, 0o600)
        self._listener.listen(128)
        self._listener.settimeout(_SLICE * 2)
        # One thread reads every uds agent's socket and delivers what needs no
        # wait (csrc/shmbus_bridge.h: the hub), polling for _HUB_SPIN after each.
        hub = lib.shmbus_hub_new(_HUB_SPIN_NS)
        if hub == ffi.NULL:
            raise ShmbusError("no epoll for the bridge's hub")
        self.hub = hub
        self._hub = threading.Thread(
            target=lib.shmbus_hub_run, args=(hub,), name="shmbus-bridge-hub", daemon=True
        )
        self._hub.start()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="shmbus-bridge-accept", daemon=True
        )
        self._acceptor.start()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # ------------------------------------------- the coordinator's thread

    def expect(self, name: str, agent_id: int, inbox: str, slot: int) -> dict[str, Any]:
        """A uds agent registered: what its data connection needs."""
        token = secrets.token_hex(16)
        with self._lock:
            self._expected[name] = _Expected(name, agent_id, token, inbox, slot)
        return {"token": token, "data": data_path(self.bus)}

    def detach(self, name: str) -> list[bytes]:
        """The agent is off the bus: stop its threads before its inbox is
        drained. Returns the frames it was sent but never took, oldest first:
        they go to the DLQ ahead of what is left in the inbox."""
        with self._lock:
            self._expected.pop(name, None)
            link = self.links.pop(name, None)
        if link is None:
            return []
        # Its death reaches us by the control socket, maybe before the hub has
        # read all the data socket holds: what a send returned for is delivered.
        link.drain(_DRAIN_WAIT)
        link.close()
        return link.lost

    def pump(self, dead_letter: Any, kill: Any) -> None:
        """Hand the threads' events to the coordinator: dead letters, deaths."""
        with contextlib.suppress(BlockingIOError):
            while self.wake_r.recv(4096):
                pass
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "dlq":
                dead_letter(event[1], event[2], event[3])
            elif event[0] == "kill":
                kill(event[1], event[2])

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_path(self.bus))
        for name in list(self.links):
            self.detach(name)
        lib.shmbus_hub_stop(self.hub)
        self._hub.join(5)
        if not self._hub.is_alive():
            lib.shmbus_hub_free(self.hub)
        self.wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------- the accept thread

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._hello(sock)
            except (OSError, ControlError, BadPeer, KeyError, TypeError) as e:
                log.warning("refused a data connection: %s", e)
                sock.close()

    def _hello(self, sock: socket.socket) -> None:
        sock.settimeout(_HELLO_WAIT)  # a client that says nothing cannot hold the thread
        reader = Reader()
        msgs: list[dict[str, Any]] = []
        while not msgs:
            data = sock.recv(4096)
            if not data:
                raise BadPeer("closed before its hello")
            msgs = reader.feed(data)
        hello = msgs[0]
        name, token = hello["name"], hello["token"]
        with self._lock:
            who = self._expected.get(name) if isinstance(name, str) else None
            ok = (
                who is not None
                and isinstance(token, str)
                and secrets.compare_digest(token, who.token)
            )
        if not ok or who is None:
            sock.sendall(encode({"ok": False, "message": "no such registration"}))
            raise BadPeer(f"a hello for {name!r} with a wrong or stale token")
        sock.sendall(encode({"ok": True}))
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKBUF)
        sock.settimeout(_SLICE)
        with self._lock:  # still expected: not detached meanwhile
            if self._expected.get(name) is not who or self._stopping.is_set():
                raise BadPeer(f"{name!r} left before its data connection was up")
            del self._expected[name]
            self.links[name] = _Link(self, who, sock)
