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
until it sends ``rejoin`` (shmbus/agent/agent.py does on its own) with the id, pid
and inbox the table has for it; its subscriptions are then its own list.

When the table or the stats segment is missing or unusable, the coordinator
starts a fresh bus (with a logged reason); agents of the old one are refused
(:class:`RejoinRefused`) and must connect again.

Only the coordinator imports this module.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import msgpack

from ..core.paths import (
    PREFIX,
    SHM,
    bus_prefix,
    find_inbox,
    find_segments,
    inbox_name,
    is_inbox_of,
    own_entry,
    pending_path,
    routes_name,
    stats_name,
    validate_bus_or_agent,
)
from ..core.process import process_gone
from ..core.ring import LANES as _LANES
from ..core.ring import Ring
from ..core.routes import Table, validate_pattern
from ..core.stats import AGENT_SLOTS, StatsSegment
from ..errors import InvalidName, NotFound, RejoinRefused, ShmbusError
from .registry import AgentEntry, Host, Registry

log = logging.getLogger(__name__)

ORPHAN_CHECK = 0.5  # seconds between looks at agents that have not rejoined
_SLOTS = AGENT_SLOTS


def adopt(reg: Registry, host: Host) -> None:
    """Give the registry its table and stats segment: a killed predecessor's,
    with its agents (``adopted`` True), or new ones."""
    found = _attach(reg.bus)
    if found is None:
        for kind in ("routes", "stats"):  # a predecessor's, unusable: not adopted
            for entry in SHM.glob(f"{PREFIX}{bus_prefix(reg.bus)}{kind}.*"):
                if own_entry(entry):
                    entry.unlink(missing_ok=True)
        reg.table = Table.create(routes_name(reg.bus))
        reg.stats = StatsSegment.create(stats_name(reg.bus))
        # Freed slots go to the back: a sender's late add to a departed agent's
        # counters lands in a slot nobody reuses for as long as possible.
        reg.free_slots = collections.deque(range(1, _SLOTS))
        return
    reg.table, reg.stats, (agents, subs, next_id, watch, dying) = found
    used = set()
    for name, (agent_id, inbox, pid, slot, transport) in agents.items():
        reg.agents[name] = AgentEntry(
            name, agent_id, pid, inbox, None, transport=transport, slot=slot, active=True
        )
        if slot:
            used.add(slot)
    reg.subs = {p: {n for n in names if n in agents} for p, names in subs.items()}
    reg.subs = {p: n for p, n in reg.subs.items() if n}
    reg.next_id = max([next_id, *(a[0] + 1 for a in agents.values())])
    # A slot in use by no agent of the table: one that registered but never
    # became active. Free once its process is gone.
    open_slots = reg.stats.open_slots()
    reg.strays = {s: pid for s, (_, pid) in open_slots.items() if s not in used}
    reg.free_slots = collections.deque(
        s for s in range(1, _SLOTS) if s not in used and s not in open_slots
    )
    log.warning(
        "bus %s: taking over from a killed coordinator: %d agents, %d subscription patterns, "
        "routes version %d",
        reg.bus,
        len(agents),
        len(reg.subs),
        reg.table.version,
    )
    reg.adopted = True
    _resume(reg, watch, dying)
    for agent in list(reg.agents.values()):
        _look_at_orphan(reg, host, agent)
    reg.stray_inboxes_unchecked = True
    _drain_stray_inboxes(reg, host)


def _resume(reg: Registry, watch: dict[str, list[int]], dying: dict[str, int]) -> None:
    """Go on with what a coordinator that handed the bus over left pending:
    the inboxes it watched for a dead writer's record, the deaths it had not
    confirmed yet (their peers are told, and every inbox watched, once sure)."""
    for name, tails in watch.items():
        agent = reg.agents.get(name)
        if agent is None:
            continue
        try:
            ring = Ring.attach(agent.inbox, lanes=True)
        except ShmbusError:
            continue
        if len(ring.lanes) != len(tails):
            ring.close()
            continue
        reg.watch[name] = (ring, tails)
    deadline = time.monotonic() + 5.0
    for name, pid in dying.items():
        if name not in reg.agents:
            # No inbox left: a name none has, so the death is still told.
            inbox = find_inbox(reg.bus, name) or inbox_name(reg.bus, name)
            reg.dying.append((AgentEntry(name, 0, pid, inbox, None), deadline))


def _drain_stray_inboxes(reg: Registry, host: Host) -> None:
    """Inboxes on no agent's entry: a killed coordinator took their agents off
    the routes but died before it drained them. What they hold goes to the
    DLQ. Not while an agent that registered but never became active may be
    alive: its inbox is on no entry either, and it removes it itself."""
    if not reg.stray_inboxes_unchecked or reg.strays:
        return
    reg.stray_inboxes_unchecked = False
    prefix = f"{bus_prefix(reg.bus)}inbox."
    known = {a.inbox for a in reg.agents.values()}
    for entry in sorted(SHM.iterdir()):
        name = entry.name.removeprefix(PREFIX)
        agent_name = name.removeprefix(prefix).partition(".")[0]
        if not name.startswith(prefix) or name in known:
            continue
        try:
            mine = is_inbox_of(name, reg.bus, agent_name) and own_entry(entry)
        except InvalidName:
            mine = False
        if not mine:
            continue  # not an inbox's lane 0 (a lane), or not ours
        log.warning(
            "inbox of %s was left undrained by a killed coordinator: draining it", agent_name
        )
        agent = reg.agents[agent_name] = AgentEntry(agent_name, 0, 0, name, None)
        host.forget_agent(agent, publish=False, reason="recipient left")


def _attach(bus: str) -> tuple[Table, StatsSegment, Any] | None:
    """The predecessor's table, stats segment and parsed routes; None (with
    the reason logged) if there are none or they are unusable."""
    try:
        routes, stats_seg = find_segments(bus)
        table = Table.attach(routes)
    except NotFound:
        return None  # no predecessor, or one that stopped cleanly
    except ShmbusError as e:
        log.warning(
            "bus %s: the routes table left behind is unusable (%s): starting a fresh "
            "bus; agents of the old one must connect again",
            bus,
            e,
        )
        return None
    try:
        stats = StatsSegment.attach(stats_seg)
    except ShmbusError as e:
        table.close()
        log.warning(
            "bus %s: the stats segment left behind is unusable (%s): starting a fresh "
            "bus; agents of the old one must connect again",
            bus,
            e,
        )
        return None
    try:
        _, routes = table.read()
        base = _parse(bus, routes)
    except (ShmbusError, ValueError, TypeError) as e:
        table.close()
        stats.close()
        log.warning(
            "bus %s: the routes table left behind is corrupt (%s): starting a fresh "
            "bus; agents of the old one must connect again",
            bus,
            e,
        )
        return None
    try:
        pending = _parse_pending(_load_pending(bus), base[0])
    except (ValueError, TypeError) as e:
        log.warning(
            "bus %s: what the last coordinator left pending is unusable (%s): a dead "
            "writer's record it was watching may stay blocked",
            bus,
            e,
        )
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
            type(agent_id) is int
            and 0 < agent_id < 1 << 23
            and isinstance(inbox, str)
            and is_inbox_of(inbox, bus, name)
            and type(pid) is int
            and 0 < pid < 1 << 31
            and type(slot) is int
            and 0 <= slot < _SLOTS
            and transport in ("shm", "uds")  # a uds agent's entry is taken over too
        ):
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
        return msgpack.unpackb(
            data,
            max_bin_len=0,
            max_str_len=1024,
            max_array_len=1 << 16,
            max_map_len=1 << 16,
            strict_map_key=True,
        )
    except Exception as e:  # its own file, but a torn or foreign one must not stop us
        log.warning(
            "bus %s: what the last coordinator left pending is unreadable (%s): "
            "a dead writer's record it was watching may stay blocked",
            bus,
            e,
        )
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
            isinstance(tails, list)
            and 0 < len(tails) <= _LANES
            and all(type(t) is int and 0 <= t < 1 << 64 for t in tails)
        ):
            raise ValueError(f"watch of {name!r}: {tails!r}")
    for name, pid in dying.items():
        validate_bus_or_agent(name, "agent")
        if type(pid) is not int or not 0 < pid < 1 << 31:
            raise ValueError(f"dying {name!r}: {pid!r}")
    return {n: t for n, t in watch.items() if n in agents}, dying


def _look_at_orphan(reg: Registry, host: Host, agent: AgentEntry) -> None:
    if agent.transport == "uds":
        # Its traffic went through the killed coordinator's bridge: cut off.
        host.died(agent, "was a uds agent: its bridge died with the coordinator")
        return
    if not own_entry(SHM / f"{PREFIX}{agent.inbox}"):
        # It closed (which removes its inbox; a killed one leaves it) while
        # no coordinator ran: it left, whether its process lives on or not.
        log.warning(
            "agent %s (pid %d) left while the bus had no coordinator", agent.name, agent.pid
        )
        host.forget_agent(agent)
    elif process_gone(agent.pid):
        host.died(agent, "died while the bus had no coordinator")


def check_orphans(reg: Registry, host: Host, now: float) -> None:
    """Adopted agents that have not rejoined yet have no connection to tell
    of their death: look at their processes now and then."""
    if now < reg.next_orphan_check:
        return
    reg.next_orphan_check = now + ORPHAN_CHECK
    for agent in [a for a in reg.agents.values() if a.conn is None]:
        _look_at_orphan(reg, host, agent)
    for slot, pid in list(reg.strays.items()):
        if process_gone(pid):
            del reg.strays[slot]
            reg.stats.close_agent(slot)
            reg.free_slots.append(slot)
    _drain_stray_inboxes(reg, host)


def rejoin(reg: Registry, host: Host, conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """An agent of the bus we took over, back on a new connection."""
    if conn.agent is not None:
        raise ShmbusError(f"this connection is agent {conn.agent!r} already")
    name = validate_bus_or_agent(msg["name"], "agent")
    patterns = [validate_pattern(p) for p in msg.get("subs", [])]
    agent = reg.agents.get(name)
    if agent is None:
        why = "it found it dead or gone"
        if not reg.adopted:
            why = "it started a fresh bus: the routes table left behind was lost or unusable"
        raise RejoinRefused(
            f"the coordinator of bus {reg.bus!r} does not know agent {name!r} ({why}); "
            "close this agent and connect again"
        )
    if agent.conn is not None or (agent.id, agent.pid, agent.inbox) != (
        msg["id"],
        msg["pid"],
        msg["inbox"],
    ):
        raise RejoinRefused(
            f"agent {name!r} of bus {reg.bus!r} is another one now (id {agent.id}, pid "
            f"{agent.pid}); close this agent and connect again"
        )
    agent.conn = conn
    conn.agent = name
    for names in reg.subs.values():
        names.discard(name)
    for pattern in patterns:
        reg.subs.setdefault(pattern, set()).add(name)
    reg.subs = {p: n for p, n in reg.subs.items() if n}
    host.publish()
    log.info("agent %s (pid %d) rejoined the bus", name, agent.pid)
    return {"ok": True, "version": reg.table.version}
