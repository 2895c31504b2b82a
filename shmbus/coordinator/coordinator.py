"""The coordinator: the control plane of one bus (``shmbus coordinator --bus NAME``).

It owns the bus's runtime directory, its control socket and the routes table,
keeps the registry of agents and their subscriptions, and learns of an
agent's death at once from its closed control connection. It is never on the
path of a message: agents write straight into each other's inboxes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import socket
import time
from typing import Any

import msgpack

from ..core.control import ControlError, encode
from ..core.creds import check_peer
from ..core.message import FLAG_ACK, NOT_MESSAGES, MessageType, encode_frame
from ..core.paths import (
    PREFIX,
    SHM,
    find_own,
    history_name,
    inbox_name,
    lock_path,
    make_runtime_dir,
    pending_path,
    runtime_dir,
    socket_path,
    validate_bus_or_agent,
)
from ..core.process import process_gone as _process_gone
from ..core.ring import LANES, Ring
from ..core.routes import check_keep, validate_pattern
from ..core.stats import (
    BYTES_RECEIVED,
    BYTES_SENT,
    DEAD_LETTERED,
    DELIVERED,
    DELIVERED_BYTES,
    DLQ_EVICTED,
    DLQ_SIZE,
    DLQ_TOTAL,
    DROPPED,
    FAILED,
    RECEIVED,
    SENT,
    inbox_fill,
)
from ..errors import CoordinatorRunning, ForeignObject, InvalidArgument, ShmbusError
from ..transport.peer import peer_path
from . import takeover
from .bridge import Bridge
from .dlq import MAX_FRAME as DLQ_MAX_FRAME
from .dlq import OPS as DLQ_OPS
from .dlq import DeadLetterQueue
from .history import HISTORY, History
from .history import OPS as HISTORY_OPS
from .registry import AgentEntry, Conn, Registry

log = logging.getLogger(__name__)

DLQ_STORES = ("file", "memory")  # where the dead letters live: Coordinator(dlq=...)


class Coordinator:
    """One bus's control plane. ``serve()`` runs it until ``stop()``."""

    def __init__(
        self,
        bus: str,
        *,
        dlq_size: int = 10_000,
        heartbeat_timeout: float = 5.0,
        history: dict[str, int] | None = None,
        dlq: str = "file",
    ) -> None:
        """``dlq``: "file" keeps the dead letters in the bus's state directory,
        where a restarted coordinator finds them again; "memory" keeps them for
        this coordinator's life only, and reads and writes no file."""
        self.bus = validate_bus_or_agent(bus, "bus")
        if dlq not in DLQ_STORES:
            raise InvalidArgument(
                f"dlq must be one of {', '.join(map(repr, DLQ_STORES))}, got {dlq!r}"
            )
        history = dict(check_keep(p, n, stop=False) for p, n in (history or {}).items())
        make_runtime_dir(bus)
        self._lock_fd = os.open(lock_path(bus), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # The lock is the proof of life: held while we run, released by
            # the kernel when we die however we die.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise CoordinatorRunning(
                f"a coordinator already runs for bus {bus!r} (pid {other or '?'}); "
                "connect to it, or stop it first"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        # A killed predecessor's socket: gone at once, so that the socket's
        # presence with our pid in the lock means we listen (Runner waits so).
        with contextlib.suppress(FileNotFoundError):
            socket_path(bus).unlink()
        # Reloaded from the bus's state directory (shmbus/coordinator/dlq.py): before the
        # shared memory, so a refusal leaves nothing behind.
        try:
            self.dlq = DeadLetterQueue(bus, dlq_size, persist=dlq == "file")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.reg = Registry(self.bus)
        self._stopping = False
        self._sel = selectors.DefaultSelector()
        self.parent = 0  # a pid: stop when it is no longer our parent (--exit-with-parent)
        self.heartbeat_timeout = heartbeat_timeout
        self._next_beat_check = 0.0
        self.history: History | None = None  # made when a pattern is first kept
        self.bridge: Bridge | None = None  # made once the stats segment is ours
        # A killed coordinator of this bus left its routes and stats behind,
        # and its agents live on with them mapped: take them over. We hold
        # the lock, so nobody else owns them.
        try:
            takeover.adopt(self.reg, self)
            self._hold_routes()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._keep_history(history)
        if self.history is None:
            old = find_own(bus, "history")  # a killed predecessor's, unused now
            if old is not None:
                Ring.unlink_name(old)
        self._dlq_stats()
        self.publish()
        self.bridge = Bridge(bus, self.reg.stats)  # carries the uds agents' traffic, in its threads
        self._sel.register(self.bridge.wake_r, selectors.EVENT_READ, self.bridge)
        # Bound and listening under a side name, then renamed into place: a
        # client that finds the socket can always connect (between bind and
        # listen it would be refused), and a killed predecessor's is replaced.
        path = socket_path(bus)
        side = path.with_name("bind.sock")  # no longer than the real name: fits sun_path
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(side))
        os.chmod(side, 0o600)
        self._listener.listen(128)
        os.replace(side, path)
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ)

    # ------------------------------------------------------------- loop

    def serve(self) -> None:
        while not self._stopping:
            if self.parent and os.getppid() != self.parent:
                log.warning(
                    "bus %s: the process that started it (pid %d) is gone: stopping",
                    self.bus,
                    self.parent,
                )
                break
            busy = self.reg.watch or self.reg.dying or self.reg.strays or self._orphans()
            for key, _ in self._sel.select(
                timeout=0.02 if self.reg.dying else 0.1 if busy else 0.2
            ):
                if key.fileobj is self._listener:
                    self._accept()
                elif key.data is self.bridge:
                    self.bridge.pump(self._bridge_dead_letter, self._bridge_kill)
                else:
                    self._readable(key.data)
            self.dlq.tick()  # its file's fdatasync, at most once a second
            if self.reg.dying:
                self._confirm_deaths()
            self._check_heartbeats(time.monotonic())
            takeover.check_orphans(self.reg, self, time.monotonic())
            if self.reg.watch:
                self._unblock_watched()

    # ---------------------------------------------------------- deaths

    def _confirm_deaths(self) -> None:
        now = time.monotonic()
        still = []
        for agent, deadline in self.reg.dying:
            # A uds agent's writes went through the bridge, joined already; its
            # pid may be another namespace's.
            if agent.transport == "uds" or _process_gone(agent.pid):
                self._tell("peer_died", agent)
                self._watch_after_death(agent)
            elif now < deadline:
                still.append((agent, deadline))
            else:
                log.warning(
                    "agent %s closed its connection, but pid %d lives on: its writes may "
                    "resume, so no inbox is unblocked",
                    agent.name,
                    agent.pid,
                )
        if len(still) != len(self.reg.dying):
            self.reg.dying = still
            self._save_pending()

    def _orphans(self) -> bool:
        return any(a.conn is None for a in self.reg.agents.values())

    def died(self, agent: AgentEntry, why: str) -> None:
        """``agent``, with no connection, is certainly dead: as if its
        connection had closed and its process were gone."""
        log.warning("agent %s (pid %d) %s", agent.name, agent.pid, why)
        self.forget_agent(agent, reason="recipient died")
        self._tell("peer_died", agent)
        self._watch_after_death(agent)

    def _tell(self, event: str, about: AgentEntry) -> None:
        """A CONTROL message from nobody (the coordinator) in every other
        inbox; agents act on it themselves (Agent.on_peer_death/on_peer_hung),
        and the routes table stays the authority if one is missed."""
        frame = encode_frame(
            int(MessageType.CONTROL),
            sender=b"",
            payload=msgpack.packb({"event": event, "agent": about.name, "pid": about.pid}),
            timestamp_ns=time.time_ns(),
        )
        for agent in self.reg.agents.values():
            if agent is about:
                continue
            try:
                # The top lane: a reader behind on its backlog still hears at once.
                with Ring.attach(agent.inbox, lanes=True) as ring:
                    if not ring.lanes[-1].try_write(frame):
                        log.warning(
                            "inbox of %s full: not told %s of %s", agent.name, event, about.name
                        )
            except ShmbusError as e:
                log.warning("could not tell %s %s of %s: %s", agent.name, event, about.name, e)

    def _check_heartbeats(self, now: float) -> None:
        """An agent whose beats stopped for heartbeat_timeout is hung (stopped,
        or wedged in C with the GIL held): its peers are told, and told again
        when it beats again. Its death, if it comes, is noticed as ever."""
        if now < self._next_beat_check:
            return
        self._next_beat_check = now + 0.5
        now_ns = time.monotonic_ns()
        for agent in list(self.reg.agents.values()):
            if not agent.active or not agent.slot:
                continue
            beat = self.reg.stats.heartbeat(agent.slot)[0]
            if not beat:
                continue  # an agent of an older shmbus, or not started beating yet
            late = (now_ns - beat) / 1e9 > self.heartbeat_timeout
            if late != agent.hung:
                agent.hung = late
                log.warning(
                    "agent %s (pid %d) %s",
                    agent.name,
                    agent.pid,
                    "stopped beating: hung" if late else "beats again",
                )
                self._tell("peer_hung" if late else "peer_resumed", agent)

    def _watch_after_death(self, dead: AgentEntry) -> None:
        """A writer that died may have left a record half-written in any
        inbox lane, below that lane's tail now: watch each until its reader has
        passed that tail, unblocking the reader if it stops at such a record."""
        inboxes = [(a.name, a.inbox) for a in self.reg.agents.values()]
        if self.history is not None:  # publishers write to it too
            inboxes.append((HISTORY, self.history.inbox))
        for name, inbox in inboxes:
            if name in self.reg.watch:
                ring, _ = self.reg.watch.pop(name)
                ring.close()
            try:
                ring = Ring.attach(inbox, lanes=True)
            except ShmbusError:
                continue
            self.reg.watch[name] = (ring, [lane.positions[1] for lane in ring.lanes])
        self._save_pending()

    def _unblock_watched(self) -> None:
        for name, (ring, tails_at_death) in list(self.reg.watch.items()):
            done = name not in self.reg.agents and name != HISTORY
            if not done:
                try:
                    done = True
                    for lane, tail_at_death in zip(ring.lanes, tails_at_death, strict=True):
                        if lane.unblock(grace=0.1):
                            log.warning(
                                "unblocked the inbox of %s (%s): a dead writer's record",
                                name,
                                lane.name,
                            )
                        done = _passed(lane.positions[0], tail_at_death) and done
                except ShmbusError as e:
                    log.error("inbox of %s: %s", name, e)
                    done = True
            if done:
                self.reg.watch.pop(name)
                ring.close()
                self._save_pending()

    def _hold_routes(self) -> None:
        """Lock the routes table's file while we run: the proof of life that
        root's ``shmbus cleanup --all-users`` can see for any user's bus
        (our runtime dir, where the coordinator lock is, it cannot find)."""
        self._routes_fd = os.open(
            SHM / f"{PREFIX}{self.reg.table.name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        fcntl.flock(self._routes_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def stop(self) -> None:
        self._stopping = True

    def close(self, *, hand_over: bool = False) -> None:
        """Close every connection and remove the bus's socket, table and lock.

        With ``hand_over`` and agents still on the bus, leave the bus to the
        next coordinator instead (``shmbus coordinator`` on SIGHUP, and
        ``runner.coordinator.restart()``): the routes, stats, inboxes and
        history stay; the agents keep talking and rejoin the successor."""
        if hand_over:
            # uds agents cannot rejoin: their messages went through our bridge,
            # which stops with us. They leave as if they had died.
            for agent in [a for a in self.reg.agents.values() if a.transport == "uds"]:
                self.forget_agent(
                    agent, reason="recipient died: its bridge stopped with the coordinator"
                )
        keep = hand_over and bool(self.reg.agents)  # else nobody is left to hand the bus to
        if keep:
            # What the successor must finish, else nobody would: deaths not yet
            # certain, and inboxes a dead writer may still block (with each
            # lane's tail at the death), which only a coordinator unblocks.
            self._save_pending()
        for agent in list(self.reg.agents.values()):
            if keep:
                if agent.conn is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(agent.conn.sock)
                    agent.conn.sock.close()  # its agent rejoins whoever comes next
            elif agent.conn is None:
                self.forget_agent(agent, publish=False)
            else:
                self._drop(agent.conn, closing=True)
        for ring, _ in self.reg.watch.values():
            ring.close()
        self.reg.watch.clear()
        if self.history is not None:
            self.history.close(unlink=not keep)
        if self.bridge is not None:
            self.bridge.close()
        self._sel.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.bus).unlink()
        self.reg.table.close()
        self.reg.stats.close()
        self.dlq.close()
        os.close(self._routes_fd)
        if keep:
            os.close(self._lock_fd)  # the lock goes with it: a successor may start
            log.warning(
                "handed bus %s over with %d agents on it: the next coordinator takes it over",
                self.bus,
                len(self.reg.agents),
            )
            return
        self.reg.table.unlink()
        self.reg.stats.unlink()
        with contextlib.suppress(FileNotFoundError):
            pending_path(self.bus).unlink()
        with contextlib.suppress(FileNotFoundError):
            lock_path(self.bus).unlink()
        os.close(self._lock_fd)
        with contextlib.suppress(OSError):  # left alone if anything else is in it
            runtime_dir(self.bus).rmdir()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            check_peer(sock, "a process dialling the control socket")
        except (ForeignObject, OSError) as e:  # the dir is 0700: only root gets here
            log.warning("bus %s: %s", self.bus, e)
            sock.close()
            return
        # Replies are small; an agent that stops reading them for a second
        # is treated as dead rather than allowed to stall the bus.
        sock.settimeout(1.0)
        conn = Conn(sock)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
            msgs = conn.reader.feed(data) if data else None
        except (OSError, ControlError) as e:
            log.warning("dropping a control connection: %s", e)
            msgs = None
        if msgs is None:
            self._drop(conn)
            return
        for msg in msgs:
            try:
                reply = self._handle(conn, msg)
            except ShmbusError as e:
                reply = {"ok": False, "error": type(e).__name__, "message": str(e)}
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                reply = {"ok": False, "error": "BadRequest", "message": f"{type(e).__name__}: {e}"}
            leaving = msg.get("op") == "unregister" and conn.agent is not None
            if leaving:
                # Off the routes before the agent hears back: once its close()
                # returns, no peer's next send can reach the old inbox.
                self._forget(conn)
            try:
                conn.sock.sendall(encode(reply))
            except OSError:
                leaving = True
            if leaving:
                self._drop(conn)
                return

    # ------------------------------------------------------------ state

    def _routes(self) -> dict[str, Any]:
        agents = {
            a.name: [a.id, a.inbox, a.pid, a.slot, a.transport]
            for a in self.reg.agents.values()
            if a.active
        }
        routes: dict[str, Any] = {"agents": agents}
        if self.history is not None:
            # A subscriber like the others for publishers (id 0: no direct
            # sends); agents hide it, and refuse to send to it.
            agents[HISTORY] = [0, self.history.inbox, os.getpid(), self.history.slot, "shm"]
            routes["history"] = self.history.patterns()
        routes["subs"] = {p: sorted(names) for p, names in self.reg.subs.items() if names}
        routes["next_id"] = self.reg.next_id  # for a coordinator that takes over: never reused
        return routes

    def publish(self) -> None:
        self.reg.table.write(self._routes())

    def _save_pending(self) -> None:
        """What a successor must finish if we go now, however we go: deaths
        not yet certain, and inboxes a dead writer may still block (each
        lane's tail at the death), which only a coordinator unblocks. A file
        beside the socket, replaced whole on every change (deaths are rare);
        takeover.adopt reads it back."""
        path = pending_path(self.bus)
        if not self.reg.watch and not self.reg.dying:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        state = {
            "watch": {n: tails for n, (_, tails) in self.reg.watch.items()},
            "dying": {a.name: a.pid for a, _ in self.reg.dying},
        }
        side = path.with_name("pending.new")
        side.write_bytes(msgpack.packb(state))
        os.replace(side, path)

    def _bridge_dead_letter(self, sender: str, frame: bytes, reason: str) -> None:
        """What the bridge could not deliver for a uds agent (or to one)."""
        self.dlq.add(frame, reason)
        self._dlq_stats()
        agent = self.reg.agents.get(sender)
        if agent is not None and agent.slot:
            self.reg.stats.add(self.reg.stats.agent(agent.slot), DEAD_LETTERED)

    def _bridge_dead_letters(self) -> None:
        """Take in the bridge's dead letters now; its kills wait for the loop's
        pump (a drop in the middle of a departure or a request could pull an
        agent or a connection from under it)."""
        if self.bridge is None:
            return
        kills: list[tuple[str, str]] = []
        self.bridge.pump(self._bridge_dead_letter, lambda *kill: kills.append(kill))
        for name, reason in kills:
            self.bridge.events.put(("kill", name, reason))
        if kills:
            self.bridge.wake()

    def _bridge_kill(self, name: str, reason: str) -> None:
        """A uds agent broke its data connection's protocol, or lost it: dead."""
        agent = self.reg.agents.get(name)
        if agent is not None and agent.transport == "uds" and agent.conn is not None:
            log.warning("agent %s (uds) is dropped: %s", name, reason)
            self._drop(agent.conn)

    def _keep_history(self, patterns: dict[str, int]) -> None:
        """Keep the last N messages published on each pattern (0: stop)."""
        if self.history is None:
            if not any(patterns.values()):
                return
            # A stats slot, so what publishers copy to it and what it reads
            # add up in the totals like any subscriber's (snapshots hide it).
            slot = self.reg.free_slots.popleft() if self.reg.free_slots else 0
            if slot:
                self.reg.stats.open_agent(slot, 0, os.getpid(), HISTORY)
            # A killed predecessor's, if any: its agents' routes may lead there.
            name = find_own(self.bus, "history") or history_name(self.bus)
            self.history = History(name, self.reg.stats.agent(slot), slot)
        self.history.keep(patterns)
        for pattern, n in patterns.items():
            if n:
                self.reg.subs.setdefault(pattern, set()).add(HISTORY)
            else:
                self.reg.subs.get(pattern, set()).discard(HISTORY)
        self.publish()

    def _drop(self, conn: Conn, *, closing: bool = False) -> None:
        """A connection ended: if it was an agent's, the agent is gone.
        (``closing``: we are, and close every connection ourselves.)"""
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()
        dead = self.reg.agents.get(conn.agent) if conn.agent else None
        # Not `self._stopping`: a stop signal that lands during the drain
        # below must not lose a death a hand-over passes on.
        if dead is not None and not closing:
            # Its socket closes while the process exits: its death is certain
            # only once the process is gone (or a zombie), a moment later.
            # Noted (and saved) before the routes move: killed in between, we
            # would leave a successor no trace of it.
            self.reg.dying.append((dead, time.monotonic() + 5.0))
            self._save_pending()
        self._forget(conn, publish=not closing, reason="recipient died")

    def _forget(self, conn: Conn, *, publish: bool = True, reason: str = "recipient left") -> None:
        """Take the connection's agent off the bus: routes, subscriptions, inbox, stats slot."""
        name, conn.agent = conn.agent, None
        agent = self.reg.agents.get(name) if name else None
        if agent is not None:
            self.forget_agent(agent, publish=publish, reason=reason)

    def forget_agent(
        self, agent: AgentEntry, *, publish: bool = True, reason: str = "recipient left"
    ) -> None:
        name = agent.name
        if self.reg.agents.get(name) is not agent:
            return
        del self.reg.agents[name]
        if agent.conn is not None:
            agent.conn.agent = None
        for names in self.reg.subs.values():
            names.discard(name)
        self.reg.subs = {p: n for p, n in self.reg.subs.items() if n}
        if publish:
            self.publish()  # first: peers check the version before every send
        # What its inbox still holds goes to the DLQ, then the inbox goes (a uds
        # agent's bridge stops first: what it sent that was never taken goes first).
        taken: list[bytes] = []
        if self.bridge is not None:
            taken = self.bridge.detach(name)
            self._bridge_dead_letters()  # its last records' are in before anyone asks
        moved = self._drain(agent, reason, taken)
        if moved:
            log.warning("agent %s left %d unread messages: in the DLQ", name, moved)
        Ring.unlink_name(agent.inbox)
        if agent.transport == "uds":  # its listener, if it died and left it
            with contextlib.suppress(OSError):
                peer_path(self.bus, agent.id).unlink()
        if agent.slot:
            self.reg.stats.close_agent(agent.slot)  # folded into the departed totals
            self.reg.free_slots.append(agent.slot)
        log.info("agent %s (pid %d) left the bus", name, agent.pid)

    def _dlq_stats(self) -> None:
        self.reg.stats.set_bus(DLQ_SIZE, len(self.dlq.entries))
        self.reg.stats.set_bus(DLQ_TOTAL, self.dlq.total)
        self.reg.stats.set_bus(DLQ_EVICTED, self.dlq.evicted)

    def _drain(self, agent: AgentEntry, reason: str, taken: list[bytes] | None = None) -> int:
        """Move what is left in a departed agent's inbox to the DLQ (after
        ``taken``, frames read from it already); how many."""
        moved = 0
        for frame in taken or ():
            if len(frame) > 3 and frame[3] in NOT_MESSAGES:
                continue  # a notice or ACK the bridge held for it: nobody's message
            if len(frame) <= DLQ_MAX_FRAME:
                self.dlq.add(frame, f"{reason}: {agent.name!r} (pid {agent.pid})")
                moved += 1
        try:
            ring = Ring.attach(agent.inbox, lanes=True)  # read highest lane first
        except ShmbusError:
            if moved:
                self._dlq_stats()
            return moved  # it never made one, or it is gone already
        with ring:
            # Sealed first: a send that passed its routes check just before the
            # routes moved, or that waits on this full inbox, cannot land after
            # the drain; it fails (and the sender dead-letters or raises).
            ring.seal()
            tails = [lane.positions[1] for lane in ring.lanes]
            patience = time.monotonic() + 0.2
            unblocked = False
            while True:
                try:
                    frames = ring.read_many(256, 0)
                except ShmbusError as e:  # a corrupt inbox: what is left is lost, say so
                    log.error("inbox of %s unreadable after %d frames: %s", agent.name, moved, e)
                    break
                if not frames:
                    behind = [
                        lane
                        for lane, tail in zip(ring.lanes, tails, strict=True)
                        if not _passed(lane.positions[0], tail)
                    ]
                    if not behind:
                        break  # everything reserved before the seal is read
                    # A writer reserved before the seal and is a moment from its
                    # commit, or died on the way (then its record is skipped).
                    if time.monotonic() < patience:
                        time.sleep(0.001)
                    elif not unblocked:
                        unblocked = True
                        patience = time.monotonic() + 0.5
                        try:
                            for lane in behind:
                                lane.unblock(grace=0.05)
                        except ShmbusError as e:  # corrupt, as read_many's above
                            log.error(
                                "inbox of %s unreadable after %d frames: %s", agent.name, moved, e
                            )
                            break
                    else:
                        log.error(
                            "inbox of %s: a writer never finished its record; its message is lost",
                            agent.name,
                        )
                        break
                    continue
                for frame in frames:
                    if len(frame) > 3 and frame[3] in NOT_MESSAGES:
                        continue  # the bus's own traffic to it: nobody's message
                    if len(frame) > DLQ_MAX_FRAME:
                        log.error(
                            "agent %s left a %d-byte message: too big for the DLQ",
                            agent.name,
                            len(frame),
                        )
                        continue
                    # An acked message's sender resends it while it has attempts
                    # left (a namesake that comes back may get it): say so.
                    acked = len(frame) > 5 and frame[5] & FLAG_ACK
                    self.dlq.add(
                        frame,
                        f"{reason}: {agent.name!r} (pid {agent.pid})"
                        + ("; its sender resends it" if acked else ""),
                    )
                    moved += 1
        if moved:
            self._dlq_stats()
        return moved

    def _agent_of(self, conn: Conn) -> AgentEntry:
        if conn.agent is None:
            raise ShmbusError("register first: this connection has no agent")
        return self.reg.agents[conn.agent]

    def _handle(self, conn: Conn, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "register":
            return self._register(conn, msg)
        if op == "rejoin":
            return takeover.rejoin(self.reg, self, conn, msg)
        if op == "activate":
            self._agent_of(conn).active = True
            self.publish()
            return {"ok": True, "version": self.reg.table.version}
        if op in ("subscribe", "unsubscribe"):
            agent = self._agent_of(conn)
            pattern = validate_pattern(msg["pattern"])
            if op == "subscribe":
                self.reg.subs.setdefault(pattern, set()).add(agent.name)
            else:
                self.reg.subs.get(pattern, set()).discard(agent.name)
            self.publish()
            return {"ok": True, "version": self.reg.table.version}
        if op in DLQ_OPS or op in HISTORY_OPS or op == "stats":
            self._bridge_dead_letters()  # what a uds agent's sync waited for is in
        if op in DLQ_OPS:
            reply = self.dlq.handle(op, msg)
            self._dlq_stats()
            if op == "dlq_add" and conn.agent is not None and self.reg.agents[conn.agent].slot:
                self.reg.stats.add(
                    self.reg.stats.agent(self.reg.agents[conn.agent].slot), DEAD_LETTERED
                )
            return reply
        if op in HISTORY_OPS:
            if op == "keep_history":
                self._keep_history(dict([check_keep(msg["pattern"], msg["n"])]))
                return {"ok": True, "version": self.reg.table.version}
            if self.history is None:
                return {"ok": True, "frames": [], "next": None, "end": 0}
            return self.history.page(msg)
        if op in ("ping", "unregister"):
            return {"ok": True}
        if op == "count":
            self._count(self._agent_of(conn), msg)
            return {"ok": True}
        if op == "routes":  # for uds agents, who cannot map the routes table
            return {"ok": True, "version": self.reg.table.version, **self._routes()}
        if op == "stats":
            snapshot = self.reg.stats.snapshot(self.bus, inbox_fill(self._routes()["agents"]))
            return {"ok": True, "stats": snapshot.as_dict()}
        return {"ok": False, "error": "BadRequest", "message": f"unknown op {op!r}"}

    def _count(self, agent: AgentEntry, msg: dict[str, Any]) -> None:
        """A uds agent's counts of what went over its direct links (the bridge
        never saw it): sent by it and delivered to each peer, and received."""

        def amount(v: Any) -> int:
            if type(v) is not int or not 0 <= v < 1 << 48:
                raise ValueError(f"a count must be a number from 0 to 2**48, got {v!r}")
            return v

        sent = [(amount(i), amount(n), amount(b)) for i, n, b in msg.get("sent", [])]
        received = [amount(v) for v in msg.get("received", [0, 0])]
        if len(received) != 2:
            raise ValueError("received: [messages, bytes]")
        own = self.reg.stats.agent(agent.slot) if agent.slot else None
        by_id = {a.id: a for a in self.reg.agents.values()}
        for peer_id, n, nbytes in sent:
            if own is not None:
                self.reg.stats.add(own, SENT, n)
                self.reg.stats.add(own, BYTES_SENT, nbytes)
            peer = by_id.get(peer_id)
            if peer is not None and peer.slot:
                counters = self.reg.stats.agent(peer.slot)
                self.reg.stats.add(counters, DELIVERED, n)
                self.reg.stats.add(counters, DELIVERED_BYTES, nbytes)
        if own is not None:
            self.reg.stats.add(own, RECEIVED, received[0])
            self.reg.stats.add(own, BYTES_RECEIVED, received[1])
            self.reg.stats.add(own, FAILED, amount(msg.get("failed", 0)))
            self.reg.stats.add(own, DROPPED, amount(msg.get("dropped", 0)))

    def _register(self, conn: Conn, msg: dict[str, Any]) -> dict[str, Any]:
        if conn.agent is not None:
            raise ShmbusError(f"this connection is agent {conn.agent!r} already")
        name = validate_bus_or_agent(msg["name"], "agent")
        other = self.reg.agents.get(name)
        if other is not None and other.conn is None and _process_gone(other.pid):
            self.died(other, "died while no coordinator ran")  # a namesake restarted
        if name in self.reg.agents:
            other = self.reg.agents[name]
            return {
                "ok": False,
                "error": "NameTaken",
                "message": f"agent name {name!r} is taken on bus {self.bus!r} by the live "
                f"agent with pid {other.pid}; choose another name",
            }
        inbox = inbox_name(self.bus, name)  # a new one: nobody could have made it first
        transport = msg.get("transport", "shm")
        if transport not in ("shm", "uds"):
            raise ValueError(f"unknown transport {transport!r}")
        pid = msg["pid"]
        if type(pid) is not int or not 0 < pid < 1 << 31:
            raise ValueError(f"pid must be a process id, got {pid!r}")
        if self.reg.next_id >= 1 << 23:  # message ids hold 23 bits of agent id
            raise ShmbusError(f"bus {self.bus!r} has run out of agent ids; restart it")
        agent = AgentEntry(name, self.reg.next_id, pid, inbox, conn, transport=transport)
        self.reg.next_id += 1
        if self.reg.free_slots:
            self.reg.stats.open_agent(self.reg.free_slots[0], agent.id, agent.pid, name)
            agent.slot = self.reg.free_slots.popleft()
        else:
            log.warning("no stats slot left for agent %s: it is not counted", name)
        reply = {
            "ok": True,
            "id": agent.id,
            "inbox": inbox,
            "slot": agent.slot,
            "stats": self.reg.stats.name,
            "routes": self.reg.table.name,
        }
        if transport == "uds":  # it cannot map shared memory: its inbox is made here
            try:
                Ring.create(inbox, msg.get("inbox_capacity", 1 << 22), lanes=LANES).close()
            except BaseException:
                if agent.slot:
                    self.reg.stats.close_agent(agent.slot)
                    self.reg.free_slots.append(agent.slot)
                raise
            assert self.bridge is not None  # made before the first registration
            reply.update(self.bridge.expect(name, agent.id, inbox, agent.slot))
        self.reg.agents[name] = agent
        conn.agent = name
        return reply


def _passed(head: int, tail: int) -> bool:
    """Has a reader's free-running head reached ``tail``?"""
    return (head - tail) % (1 << 64) < 1 << 63
