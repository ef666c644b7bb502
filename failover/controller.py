"""The active-source choice: which upstream the node reads from (pulls and look-ups).

- The primary while it is healthy (its breaker closed).
- The backup when the primary's breaker opens, if the backup is healthy.
- Back to the primary only after it has been healthy for ``hold_s`` and its push backlog has drained
  (hysteresis: a flapping primary costs at most one switch per outage).
- ``None`` ("offline") with both down; intake goes on regardless and pushing to both never stops.
- A forced choice (drills) wins until its TTL lapses, so a forgotten drill never pins a unit.

Every switch and its reason is persisted (``failover_events``) and the choice survives a restart.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from failover.breaker import Breaker, BreakerState
from node.clock import Clock, iso
from node.store import Store

log = structlog.get_logger()

AUTO = "auto"
DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 24 * 3600.0
RECENT_EVENTS = 50
# How long, in hold times, a switch away from the primary counts towards damping the next failback.
FLAP_MEMORY_HOLDS = 10


@dataclass(frozen=True)
class Forced:
    source: str
    until: float  # wall-clock epoch seconds, so it survives a restart


class Controller:
    """Chooses and records the active source."""

    def __init__(
        self,
        store: Store,
        breakers: dict[str, Breaker],
        *,
        primary: str = "national",
        backup: str = "city",
        hold_s: float = 60.0,
        backlog: Callable[[str], Awaitable[int]],
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.breakers = breakers
        self.primary = primary if primary in breakers else next(iter(breakers), primary)
        self.backup = backup if backup in breakers and backup != self.primary else None
        self.hold_s = hold_s
        self._backlog = backlog
        self.clock = clock or Clock()
        self._mono = monotonic
        self.active: str | None = self.primary if breakers else None
        self.forced: Forced | None = None
        self.events: list[dict[str, Any]] = []
        self.switches = 0
        self._switched_away: list[float] = []
        # Called with (from, to) after every switch (metrics count failovers by direction).
        self.on_switch: list[Callable[[str | None, str | None], None]] = []

    async def load(self) -> None:
        row = await self.store.fetchone("SELECT value FROM meta WHERE key = 'failover'")
        if row is not None:
            saved = json.loads(row[0])
            if saved.get("active") in (*self.breakers, None):
                self.active = saved.get("active")
            forced = saved.get("forced")
            if forced and forced.get("source") in self.breakers:
                self.forced = Forced(forced["source"], float(forced["until"]))
        rows = await self.store.fetchall(
            "SELECT at, kind, from_source, to_source, reason FROM failover_events ORDER BY id DESC LIMIT ?",
            (RECENT_EVENTS,),
        )
        self.events = [_event(*r) for r in rows]

    def healthy(self, name: str | None) -> bool:
        return name is not None and name in self.breakers and self.breakers[name].state is BreakerState.CLOSED

    def healthy_for(self, name: str) -> float:
        b = self.breakers[name]
        return self._mono() - b.changed_at if b.state is BreakerState.CLOSED else 0.0

    async def evaluate(self) -> str | None:
        """Decide the active source now; record a switch if it changes."""
        now = self.clock.now().timestamp()
        if self.forced is not None and now >= self.forced.until:
            lapsed, self.forced = self.forced, None
            await self._record(
                "forced_lapsed", self.active, self.active, f"forced choice of {lapsed.source} lapsed; automatic again"
            )
        if self.forced is not None:
            if self.active != self.forced.source:
                await self._switch(self.forced.source, f"forced by a drill until {iso_epoch(self.forced.until)}")
            return self.active
        p, b = self.primary, self.backup
        if self.active == p:
            if not self.healthy(p):
                if b is not None and self.healthy(b):
                    await self._switch(b, f"primary {p} is down: {self.breakers[p].last_reason}")
                elif self.breakers[p].state is BreakerState.OPEN:
                    await self._switch(None, f"{p} is down and no backup is healthy: offline, intake continues")
        elif self.active == b and b is not None:
            if self.healthy(p) and self.healthy_for(p) >= self.effective_hold():
                backlog = await self._backlog(p)
                if backlog == 0:
                    await self._switch(
                        p, f"primary {p} healthy for {self.healthy_for(p):.0f} s and its backlog drained"
                    )
            elif not self.healthy(b) and self.breakers[b].state is BreakerState.OPEN:
                await self._switch(
                    p if self.healthy(p) else None,
                    f"backup {b} is down" + ("" if self.healthy(p) else "; offline, intake continues"),
                )
        elif self.healthy(p):
            await self._switch(p, f"primary {p} is reachable again")
        elif b is not None and self.healthy(b):
            await self._switch(b, f"backup {b} is reachable, primary {p} is not")
        return self.active

    def effective_hold(self) -> float:
        """The hold time, doubled for every further switch away from the primary in the recent past.

        A primary that flaps can look healthy for longer than ``hold_s`` between two outages; damping the
        failback the way route-flap damping does keeps such a primary from costing a switch per flap.
        """
        horizon = self._mono() - FLAP_MEMORY_HOLDS * max(self.hold_s, 1.0)
        recent = sum(1 for t in self._switched_away if t >= horizon)
        return float(self.hold_s * 2 ** max(0, min(recent - 1, 6)))

    async def force(self, choice: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Pin the active source for ``ttl_s`` seconds, or release a pin with ``"auto"``."""
        if choice == AUTO:
            if self.forced is not None:
                self.forced = None
                await self._record("forced_released", self.active, self.active, "forced choice released: automatic")
            await self.evaluate()
            return
        self.forced = Forced(choice, self.clock.now().timestamp() + ttl_s)
        await self._record("forced", self.active, choice, f"drill forces {choice} for {ttl_s:g} s")
        await self.evaluate()

    async def _switch(self, to: str | None, reason: str) -> None:
        frm, self.active = self.active, to
        if frm == self.primary and to != self.primary:
            self._switched_away.append(self._mono())
        self.switches += 1
        log.warning("failover_switch", from_source=frm, to_source=to, reason=reason)
        await self._record("switch", frm, to, reason)
        for hook in self.on_switch:
            hook(frm, to)

    async def _record(self, kind: str, frm: str | None, to: str | None, reason: str) -> None:
        at = iso(self.clock.now())
        state = json.dumps(
            {
                "active": self.active,
                "forced": None if self.forced is None else {"source": self.forced.source, "until": self.forced.until},
            }
        )

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO failover_events (at, kind, from_source, to_source, reason) VALUES (?,?,?,?,?)",
                (at, kind, frm, to, reason),
            )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('failover', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (state,),
            )

        # Shown before the write returns, like the active source it explains: a status read in between must
        # not show a switched source without its switch.
        self.events.insert(0, _event(at, kind, frm, to, reason))
        del self.events[RECENT_EVENTS:]
        await self.store.write(write)

    def describe(self) -> dict[str, Any]:
        return {
            "active_source": self.active,
            "primary": self.primary,
            "backup": self.backup,
            "forced": None
            if self.forced is None
            else {"source": self.forced.source, "until": iso_epoch(self.forced.until)},
            "hold_s": self.hold_s,
            "effective_hold_s": self.effective_hold(),
        }


def _event(at: str, kind: str, frm: str | None, to: str | None, reason: str) -> dict[str, Any]:
    return {"at": at, "kind": kind, "from": frm, "to": to, "reason": reason}


def iso_epoch(ts: float) -> str:
    return iso(datetime.fromtimestamp(ts, UTC))
