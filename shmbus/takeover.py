"""A coordinator taking over a bus whose coordinator was killed.

Killing the coordinator does not stop its agents: they keep talking over the
routes table they have mapped. A new coordinator for the bus (it holds the
bus's lock, so no other one lives) attaches the routes table and the stats
segment its predecessor left instead of making new ones, so agents and it
share them again; it rebuilds its registry from the table (each agent an
"orphan", with no connection, until it rejoins), frees the stats slots no
live agent holds, and goes on with the table's version and agent ids.

An orphan whose process is gone died while no coordinator ran: its inbox
goes to the DLQ ("recipient died") and its peers are told, as for any death.
A live orphan keeps its routes and is looked at every ORPHAN_CHECK seconds
until it sends ``rejoin`` (shmbus/agent.py does on its own) with the id, pid
and inbox the table has for it; its subscriptions are then its own list.

When the table or the stats segment is missing or unusable, the coordinator
starts a fresh bus (with a logged reason); agents of the old one are refused
(:class:`RejoinRefused`) and must connect again.

Only the coordinator imports this module.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgpack

from ._native import lib
from .control import inbox_name, pending_path, routes_name, stats_name, validate_bus_or_agent
from .errors import NotFound, RejoinRefused, ShmbusError
from .ring import LANES as _LANES
from .ring import Ring
from .routes import Table, validate_pattern
from .stats import StatsSegment

if TYPE_CHECKING:
    from .coordinator import Coordinator

log = logging.getLogger("shmbus.coordinator")

ORPHAN_CHECK = 0.5  # seconds between looks at agents that have not rejoined
_SLOTS: int = lib.SHMBUS_STATS_AGENT_SLOTS


def process_gone(pid: int) -> bool:
    """Has ``pid`` ended (gone, or a zombie nobody reaped yet)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # gone between the two looks
    return state in (b"Z", b"X")


def adopt(coord: Coordinator, agent_cls: Any) -> bool:
    """Give ``coord`` its table and stats segment: a killed predecessor's,
    with its agents, or new ones. True if it took a bus over."""
    found = _attach(coord.bus)
    if found is None:
        Table.unlink_name(routes_name(coord.bus))
        StatsSegment.unlink_name(stats_name(coord.bus))
        coord.table = Table.create(routes_name(coord.bus))
        coord.stats = StatsSegment.create(stats_name(coord.bus))
        # Freed slots go to the back: a sender's late add to a departed agent's
        # counters lands in a slot nobody reuses for as long as possible.
        coord._free_slots = collections.deque(range(1, _SLOTS))
        return False
    coord.table, coord.stats, (agents, subs, next_id, watch, dying) = found
    used = set()
    for name, (agent_id, inbox, pid, slot, transport) in agents.items():
        coord.agents[name] = agent_cls(name, agent_id, pid, inbox, None, transport=transport,
                                       slot=slot, active=True)  # fmt: skip
        if slot:
            used.add(slot)
    coord.subs = {p: {n for n in names if n in agents} for p, names in subs.items()}
    coord.subs = {p: n for p, n in coord.subs.items() if n}
    coord._next_id = max([next_id, *(a[0] + 1 for a in agents.values())])
    # A slot in use by no agent of the table: one that registered but never
    # became active. Free once its process is gone.
    open_slots = coord.stats.open_slots()
    coord._strays = {s: pid for s, (_, pid) in open_slots.items() if s not in used}
    coord._free_slots = collections.deque(
        s for s in range(1, _SLOTS) if s not in used and s not in open_slots
    )
    log.warning(
        "bus %s: taking over from a killed coordinator: %d agents, %d subscription patterns, "
        "routes version %d", coord.bus, len(agents), len(coord.subs), coord.table.version,
    )  # fmt: skip
    _resume(coord, agent_cls, watch, dying)
    for agent in list(coord.agents.values()):
        _look_at_orphan(coord, agent)
    coord._stray_inboxes_unchecked = True
    _drain_stray_inboxes(coord)
    return True


def _resume(coord: Coordinator, agent_cls: Any, watch: dict[str, list[int]],
            dying: dict[str, int]) -> None:  # fmt: skip
    """Go on with what a coordinator that handed the bus over left pending:
    the inboxes it watched for a dead writer's record, the deaths it had not
    confirmed yet (their peers are told, and every inbox watched, once sure)."""
    for name, tails in watch.items():
        agent = coord.agents.get(name)
        if agent is None:
            continue
        try:
            ring = Ring.attach(agent.inbox, lanes=True)
        except ShmbusError:
            continue
        if len(ring.lanes) != len(tails):
            ring.close()
            continue
        coord._watch[name] = (ring, tails)
    deadline = time.monotonic() + 5.0
    for name, pid in dying.items():
        if name not in coord.agents:
            coord._dying.append((agent_cls(name, 0, pid, inbox_name(coord.bus, name), None),
                                 deadline))  # fmt: skip


def _drain_stray_inboxes(coord: Coordinator) -> None:
    """Inboxes on no agent's entry: a killed coordinator took their agents off
    the routes but died before it drained them. What they hold goes to the
    DLQ. Not while an agent that registered but never became active may be
    alive: its inbox is on no entry either, and it removes it itself."""
    if not coord._stray_inboxes_unchecked or coord._strays:
        return
    coord._stray_inboxes_unchecked = False
    prefix = f"shmbus.{inbox_name(coord.bus, '')}"
    known = {a.inbox for a in coord.agents.values()}
    for entry in sorted(os.listdir("/dev/shm")):
        name = entry[len("shmbus.") :]
        if not entry.startswith(prefix) or "." in entry[len(prefix) :] or name in known:
            continue  # not an inbox's lane 0 (a lane, a bell), or a live agent's
        agent_name = entry[len(prefix) :]
        log.warning("inbox of %s was left undrained by a killed coordinator: draining it",
                    agent_name)  # fmt: skip
        agent = coord.agents[agent_name] = coord._agent_cls(agent_name, 0, 0, name, None)
        coord._forget_agent(agent, publish=False, reason="recipient left")


def _attach(bus: str) -> tuple[Table, StatsSegment, Any] | None:
    """The predecessor's table, stats segment and parsed routes; None (with
    the reason logged) if there are none or they are unusable."""
    try:
        table = Table.attach(routes_name(bus))
    except NotFound:
        return None  # no predecessor, or one that stopped cleanly
    except ShmbusError as e:
        log.warning("bus %s: the routes table left behind is unusable (%s): starting a fresh "
                    "bus; agents of the old one must connect again", bus, e)  # fmt: skip
        return None
    try:
        stats = StatsSegment.attach(stats_name(bus))
    except ShmbusError as e:
        table.close()
        log.warning("bus %s: the stats segment left behind is unusable (%s): starting a fresh "
                    "bus; agents of the old one must connect again", bus, e)  # fmt: skip
        return None
    try:
        _, routes = table.read()
        base = _parse(bus, routes)
    except (ShmbusError, ValueError, TypeError) as e:
        table.close()
        stats.close()
        log.warning("bus %s: the routes table left behind is corrupt (%s): starting a fresh "
                    "bus; agents of the old one must connect again", bus, e)  # fmt: skip
        return None
    try:
        pending = _parse_pending(_load_pending(bus), base[0])
    except (ValueError, TypeError) as e:
        log.warning("bus %s: what the last coordinator left pending is unusable (%s): a dead "
                    "writer's record it was watching may stay blocked", bus, e)  # fmt: skip
        pending = ({}, {})
    return table, stats, (*base, *pending)


def _parse(bus: str, routes: Any) -> tuple[dict[str, tuple[Any, ...]], dict[str, list[str]], int]:
    """Check what the table holds, field by field: it is another process's writing."""
    if routes is None:
        return {}, {}, 1  # created, never written
    if not isinstance(routes, dict):
        raise ValueError(f"a {type(routes).__name__}, not a map")
    agents, subs = routes.get("agents"), routes.get("subs")
    next_id = routes.get("next_id", 1)
    if not isinstance(agents, dict) or not isinstance(subs, dict) or type(next_id) is not int:
        raise ValueError("no agents and subs maps")
    out = {}
    for name, info in agents.items():
        if isinstance(info, list) and info and info[0] == 0:
            continue  # id 0: the coordinator's own inbox (its history's), not an agent
        validate_bus_or_agent(name, "agent")
        if not isinstance(info, list) or len(info) < 5:
            raise ValueError(f"agent {name!r}: {info!r}")
        agent_id, inbox, pid, slot, transport = info[:5]
        if not (
            type(agent_id) is int and 0 < agent_id < 1 << 23
            and inbox == inbox_name(bus, name)
            and type(pid) is int and 0 < pid < 1 << 31
            and type(slot) is int and 0 <= slot < _SLOTS
            and transport == "shm"
        ):  # fmt: skip
            raise ValueError(f"agent {name!r}: {info!r}")
        out[name] = (agent_id, inbox, pid, slot, transport)
    for pattern, names in subs.items():
        validate_pattern(pattern)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"subscribers of {pattern!r}: {names!r}")
    # Only agents' subscriptions: the coordinator's own make themselves again.
    subs = {p: [n for n in names if n in out] for p, names in subs.items()}
    return out, subs, next_id


def _load_pending(bus: str) -> Any:
    """The predecessor's pending file (Coordinator._save_pending), or None."""
    try:
        data = pending_path(bus).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgpack.unpackb(data, max_bin_len=0, max_str_len=1024, max_array_len=1 << 16,
                               max_map_len=1 << 16, strict_map_key=True)  # fmt: skip
    except Exception as e:  # its own file, but a torn or foreign one must not stop us
        log.warning("bus %s: what the last coordinator left pending is unreadable (%s): "
                    "a dead writer's record it was watching may stay blocked", bus, e)  # fmt: skip
        return None


def _parse_pending(pending: Any, agents: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """What the predecessor left pending (see _resume), checked; entries for
    inboxes that are gone meanwhile are dropped."""
    if pending is None:
        return {}, {}
    if not isinstance(pending, dict):
        raise ValueError("the pending state is not a map")
    watch, dying = pending.get("watch", {}), pending.get("dying", {})
    if not isinstance(watch, dict) or not isinstance(dying, dict):
        raise ValueError("watch and dying are not maps")
    for name, tails in watch.items():
        if not (
            isinstance(tails, list) and 0 < len(tails) <= _LANES
            and all(type(t) is int and 0 <= t < 1 << 64 for t in tails)
        ):  # fmt: skip
            raise ValueError(f"watch of {name!r}: {tails!r}")
    for name, pid in dying.items():
        validate_bus_or_agent(name, "agent")
        if type(pid) is not int or not 0 < pid < 1 << 31:
            raise ValueError(f"dying {name!r}: {pid!r}")
    return {n: t for n, t in watch.items() if n in agents}, dying


def _look_at_orphan(coord: Coordinator, agent: Any) -> None:
    if agent.transport == "uds":
        # Its traffic went through the killed coordinator's bridge: cut off.
        coord._died(agent, "was a uds agent: its bridge died with the coordinator")
        return
    if not os.path.exists(f"/dev/shm/shmbus.{agent.inbox}"):
        # It closed (which removes its inbox; a killed one leaves it) while
        # no coordinator ran: it left, whether its process lives on or not.
        log.warning("agent %s (pid %d) left while the bus had no coordinator", agent.name,
                    agent.pid)  # fmt: skip
        coord._forget_agent(agent)
    elif process_gone(agent.pid):
        coord._died(agent, "died while the bus had no coordinator")


def check_orphans(coord: Coordinator, now: float) -> None:
    """Adopted agents that have not rejoined yet have no connection to tell
    of their death: look at their processes now and then."""
    if now < coord._next_orphan_check:
        return
    coord._next_orphan_check = now + ORPHAN_CHECK
    for agent in [a for a in coord.agents.values() if a.conn is None]:
        _look_at_orphan(coord, agent)
    for slot, pid in list(coord._strays.items()):
        if process_gone(pid):
            del coord._strays[slot]
            coord.stats.close_agent(slot)
            coord._free_slots.append(slot)
    _drain_stray_inboxes(coord)


def rejoin(coord: Coordinator, conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """An agent of the bus we took over, back on a new connection."""
    if conn.agent is not None:
        raise ShmbusError(f"this connection is agent {conn.agent!r} already")
    name = validate_bus_or_agent(msg["name"], "agent")
    patterns = [validate_pattern(p) for p in msg.get("subs", [])]
    agent = coord.agents.get(name)
    if agent is None:
        why = "it found it dead or gone"
        if not coord.adopted:
            why = "it started a fresh bus: the routes table left behind was lost or unusable"
        raise RejoinRefused(
            f"the coordinator of bus {coord.bus!r} does not know agent {name!r} ({why}); "
            "close this agent and connect again"
        )
    if agent.conn is not None or (agent.id, agent.pid, agent.inbox) != (
        msg["id"], msg["pid"], msg["inbox"],
    ):  # fmt: skip
        raise RejoinRefused(
            f"agent {name!r} of bus {coord.bus!r} is another one now (id {agent.id}, pid "
            f"{agent.pid}); close this agent and connect again"
        )
    agent.conn = conn
    conn.agent = name
    for names in coord.subs.values():
        names.discard(name)
    for pattern in patterns:
        coord.subs.setdefault(pattern, set()).add(name)
    coord.subs = {p: n for p, n in coord.subs.items() if n}
    coord._publish()
    log.info("agent %s (pid %d) rejoined the bus", name, agent.pid)
    return {"ok": True, "version": coord.table.version}
