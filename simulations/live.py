"""Failover drills on a real fleet: a scenario's faults played on live nodes through their drill controls.

``wardsync drill --fleet FILE`` reads a fleet inventory (node/fleet.py: one ``[[unit]]`` table per node
with its URL and token) and a scenario (``simulations/scenarios/*.toml``), then acts out the scenario's
phases on the listed nodes through ``/api/v1/admin/faults`` (fault windows in each node's own path to an
upstream) and ``/api/v1/admin/failover`` (a forced choice of source) only. Every window and every forced
choice is opened with a TTL equal to its phase's length, so a runner that dies mid-drill leaves nothing
behind for longer than the scenario meant to hold it; ``wardsync drill abort --fleet FILE`` ends all of
them at once anyway. The drill never sends a dossier: live traffic is the load.

Phases that a node cannot act out by itself are refused before anything is touched: process kills,
clock skew, and upstream misbehaviour other than the node's fault-window modes (down, blackhole,
latency, error_rate), such as throttling, session expiry or flapping; so is a scenario with no fault or
forced-failover phase at all (it exercises the synthetic load only).

While the drill runs, every node's ``/api/v1/status`` is polled: breaker and active-source changes make
the failover timeline (switch times come from the node's own event log), and lag and backlog samples
feed the same figures the simulated drill reports. The checker then compares each node's dead and
parked dossiers before and after, waits for every node to drain and return to its primary, and, when the
inventory names the national portal, looks up a sample of each unit's recent codes there with
``TraCuuHoSo`` and compares digests (codes come from ``/api/v1/changes``, which needs a token holding the
``read-only`` or ``operator`` role as well as ``drill``). The result has the simulated drill's shape, so
:func:`simulations.report.write_report` writes the same report.

The inventory may carry the portal in a ``[portal]`` table::

    [portal]
    url = "https://dichvucong.gov.vn/api"   # base URL of the national portal's integration API
    username = "dxcentre"
    password_env = "WARDSYNC_PORTAL_PASSWORD" # or password = "..."
    dstcode = "000.00.17.H29"
    madonvi = "000.00.17.H29"                 # optional, defaults to dstcode
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from adapters.base import UpstreamError
from adapters.national import NationalAdapter
from failover.windows import MAX_WINDOW_S
from failover.windows import MODES as WINDOW_MODES
from node import __version__
from node.fleet import FleetNode, InventoryError, parse_inventory
from simulations.checker import Snapshot, failover_figures, lag_figures

if TYPE_CHECKING:  # the simulated drill (and the node it starts) is imported only when a drill runs: abort stays quick
    from simulations.drill import Phase, Scenario

TARGETS = ("national", "city")
MAX_FORCE_S = 7 * 24 * 3600.0
EXIT_CONFIG = 2
_PORTAL_KEYS = frozenset({"url", "username", "password", "password_env", "dstcode", "madonvi"})


class LiveScenarioError(ValueError):
    """A scenario a live fleet cannot act out; ``problems`` names every phase refused and why."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"scenario {name} cannot run on a live fleet:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class PortalAccess:
    """The national portal, for the checker's ``TraCuuHoSo`` sample."""

    url: str
    username: str
    password: str
    dstcode: str
    madonvi: str

    def __repr__(self) -> str:
        return f"PortalAccess(url={self.url!r}, username={self.username!r}, password='***')"


@dataclass(frozen=True)
class Inventory:
    nodes: list[FleetNode]
    portal: PortalAccess | None


def parse_live_inventory(data: Mapping[str, Any], *, path: str | Path = "<inventory>",
                         env: Mapping[str, str] | None = None) -> Inventory:
    """The fleet inventory with its optional ``[portal]`` table; ``InventoryError`` lists every problem."""
    environ = os.environ if env is None else env
    rest = {k: v for k, v in data.items() if k != "portal"}
    problems: list[str] = []
    try:
        nodes = parse_inventory(rest, path=path, env=environ)
    except InventoryError as exc:
        problems += exc.problems
        nodes = []
    portal = None
    raw = data.get("portal")
    if raw is not None:
        if not isinstance(raw, dict):
            problems.append("portal: must be a table ([portal])")
        else:
            bad = [f"portal.{k}: unknown key (known: {', '.join(sorted(_PORTAL_KEYS))})" for k in raw
                   if k not in _PORTAL_KEYS]
            values: dict[str, str] = {}
            for key in ("url", "username", "dstcode"):
                v = raw.get(key)
                if not isinstance(v, str) or not v.strip():
                    bad.append(f"portal.{key}: required, a non-empty string")
                else:
                    values[key] = v.strip()
            madonvi = raw.get("madonvi", values.get("dstcode", ""))
            if not isinstance(madonvi, str):
                bad.append("portal.madonvi: must be a string")
                madonvi = ""
            password, password_env = raw.get("password"), raw.get("password_env")
            if (password is None) == (password_env is None):
                bad.append("portal.password: give password or password_env (one of them)")
            elif password_env is not None:
                if not isinstance(password_env, str) or not environ.get(password_env):
                    bad.append(f"portal.password_env: environment variable {password_env} is not set or empty")
                else:
                    password = environ[password_env]
            elif not isinstance(password, str) or not password:
                bad.append("portal.password: must be a non-empty string")
            url = values.get("url", "")
            if url and not url.startswith(("http://", "https://")):
                bad.append(f"portal.url: {url!r} must be an http:// or https:// URL")
            problems += bad
            if not bad:
                assert isinstance(password, str)
                portal = PortalAccess(url.rstrip("/"), values["username"], password, values["dstcode"],
                                      madonvi or values["dstcode"])
    if problems:
        raise InventoryError(path, problems)
    return Inventory(nodes, portal)


def load_live_inventory(path: str | Path, *, env: Mapping[str, str] | None = None) -> Inventory:
    """Read an inventory file for a live drill (``[[unit]]`` tables and an optional ``[portal]``)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InventoryError(p, ["file not found"]) from exc
    except OSError as exc:
        raise InventoryError(p, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise InventoryError(p, ["not UTF-8 text"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(p, [f"not valid TOML: {exc}"]) from exc
    return parse_live_inventory(data, path=p, env=env)


# -- what of a scenario a live fleet can act out -------------------------------------------------------
@dataclass
class LivePhase:
    """One phase as live nodes act it out; times in simulated seconds like the scenario's."""

    at: float
    action: str  # fault, clear or force
    targets: list[str]
    label: str
    units: Any = "all"
    mode: str = ""
    params: dict[str, float] = field(default_factory=dict)
    duration: float | None = None
    primary: str = "auto"


def live_phases(sc: Scenario) -> list[LivePhase]:
    """The scenario's phases as fault windows and forced choices; ``LiveScenarioError`` for what cannot be."""
    problems: list[str] = []
    out: list[LivePhase] = []
    for i, ph in enumerate(sc.phases):
        where = f"phase[{i}] ({ph.label})"
        targets = list(TARGETS) if ph.target == "both" else [ph.target]
        if ph.action == "kill":
            problems.append(f"{where}: kill needs process kills (SIGKILL of a worker); a live drill only opens "
                            "fault windows and forces failover")
        elif ph.action == "skew":
            problems.append(f"{where}: skew needs control of the nodes' clocks; a live drill only opens fault "
                            "windows and forces failover")
        elif ph.action == "fault":
            if ph.mode not in WINDOW_MODES:
                problems.append(
                    f"{where}: fault mode {ph.mode!r} (via {ph.via}) needs the upstream or a proxy in front of it "
                    f"to misbehave; a node's fault windows offer {', '.join(WINDOW_MODES)}"
                )
                continue
            params = _window_params(ph)
            if ph.mode == "latency" and "ms" not in params:
                problems.append(f"{where}: latency needs ms")
                continue
            if ph.mode == "error_rate" and "rate" not in params:
                problems.append(f"{where}: error_rate needs rate")
                continue
            out.append(LivePhase(ph.at, "fault", targets, ph.label, ph.units, ph.mode, params, ph.duration))
        elif ph.action == "clear":
            out.append(LivePhase(ph.at, "clear", targets, ph.label, ph.units))
        elif ph.action == "force":
            out.append(LivePhase(ph.at, "force", [], ph.label, ph.units, duration=ph.duration, primary=ph.primary))
        else:  # pragma: no cover - parse_scenario admits no other action
            problems.append(f"{where}: unknown action {ph.action!r}")
    if not problems and not any(p.action in ("fault", "force") for p in out):
        problems.append("no fault or forced-failover phase: the scenario exercises the synthetic load only, "
                        "which a live drill never sends")
    if problems:
        raise LiveScenarioError(sc.name, problems)
    return out


def _window_params(ph: Phase) -> dict[str, float]:
    wanted = {"latency": ("ms",), "error_rate": ("rate",)}.get(ph.mode, ())
    return {k: float(v) for k, v in ph.params.items() if k in wanted and isinstance(v, int | float)}


# -- the drill -----------------------------------------------------------------------------------------
@dataclass
class LiveOptions:
    inventory: Path
    scenario: Scenario
    minutes: float | None = None  # real minutes for the scenario's simulated day (default: the scenario's)
    seed: int = 1  # chooses a share of units ("25%")
    poll_s: float = 1.0
    timeout_s: float = 5.0
    settle_s: float = 300.0  # after the last phase: how long to wait for every node to drain and fail back
    sample: int = 5  # recent codes per unit looked up on the portal
    concurrency: int = 32
    env: Mapping[str, str] | None = None


@dataclass
class NodeView:
    """What the drill last saw of one node."""

    node: FleetNode
    status: dict[str, Any] | None = None
    error: str | None = None
    breakers: dict[str, str] = field(default_factory=dict)
    active: str | None = None
    seen_events: set[tuple[Any, ...]] = field(default_factory=set)
    polls: int = 0
    failures: int = 0


class LiveDrill:
    """One drill on a live fleet: baseline, phases, settling, the check."""

    def __init__(self, opts: LiveOptions, inventory: Inventory) -> None:
        self.o = opts
        self.sc = opts.scenario
        self.phases = live_phases(self.sc)
        self.inventory = inventory
        self.views = {n.unit: NodeView(n) for n in inventory.nodes}
        minutes = opts.minutes if opts.minutes is not None else self.sc.minutes
        if not minutes > 0:
            raise ValueError(f"minutes: must be positive, not {minutes!r}")
        self.factor = self.sc.day_s / (minutes * 60)
        self.rng = random.Random(opts.seed ^ 0x11E)
        self._gate = asyncio.Semaphore(max(1, opts.concurrency))
        self.t0 = 0.0
        self.wall0 = 0.0
        self.t_end = 0.0
        self.now_phase = "baseline"
        self.timeline: list[dict[str, Any]] = []
        self.lag: list[list[Any]] = []
        self.phase_log: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.baseline: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}
        self.opened: dict[str, set[str]] = {}  # unit -> targets the drill opened windows on
        self.forced: set[str] = set()  # units the drill forced
        self.finished = False

    # -- HTTP
    async def call(self, http: aiohttp.ClientSession, node: FleetNode, method: str, path: str,
                   body: Any = None) -> tuple[int, Any]:
        """(HTTP status, JSON body) of one call to a node; status 0 when it could not be reached."""
        async with self._gate:
            try:
                async with http.request(
                    method, node.url + path, json=body,
                    headers={"Authorization": f"Bearer {node.token}", "Accept": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self.o.timeout_s),
                ) as r:
                    try:
                        answer = await r.json(content_type=None)
                    except ValueError:
                        answer = None
                    return r.status, answer
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return 0, {"error": {"message": str(exc) or type(exc).__name__}}

    # -- polling
    async def poll_once(self, http: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._poll(http, v) for v in self.views.values()))

    async def _poll(self, http: aiohttp.ClientSession, view: NodeView) -> None:
        status, body = await self.call(http, view.node, "GET", "/api/v1/status")
        now = time.monotonic()
        view.polls += 1
        if status != 200 or not isinstance(body, dict):
            view.failures += 1
            view.error = _describe_failure(status, body)
            return
        try:
            self._observe(view, body, now)
        except (AttributeError, TypeError, ValueError) as exc:  # a status this runner cannot read
            view.failures += 1
            view.error = f"malformed status: {exc!r}"[:200]

    def _observe(self, view: NodeView, body: dict[str, Any], now: float) -> None:
        unit = view.node.unit
        # Switches as the node recorded them (its own clock), newest first in the status.
        fresh = []
        for e in body.get("events") or []:
            key = (e.get("at"), e.get("kind"), e.get("from"), e.get("to"))
            if key not in view.seen_events:
                view.seen_events.add(key)
                fresh.append(e)
        switches = [(self._event_time(e.get("at"), now), e) for e in reversed(fresh) if e.get("kind") == "switch"]
        for name, t in (body.get("targets") or {}).items():
            self.lag.append([now, unit, name, int(t.get("lag_records") or 0), float(t.get("lag_seconds") or 0.0)])
            state = str(t.get("breaker"))
            old = view.breakers.get(name, state)
            if old == "closed" and state in ("open", "half_open"):
                # The breaker opened since the last poll (half-open comes only after open). A switch away from
                # this target since then was its doing, so the breaker opened no later than that switch.
                caused = [ts for ts, e in switches if e.get("from") == name and str(e.get("reason", "")).startswith(
                    f"primary {name} is down")]
                self.timeline.append({"t": min([now, *caused]), "unit": unit, "kind": "breaker", "target": name,
                                      "new": "open"})
            if old != state and not (old == "closed" and state == "open"):
                self.timeline.append({"t": now, "unit": unit, "kind": "breaker", "target": name, "new": state})
            view.breakers[name] = state
        for ts, e in switches:
            self.timeline.append({"t": ts, "unit": unit, "kind": "active", "from": e.get("from"), "to": e.get("to"),
                                  "reason": str(e.get("reason", ""))[:160]})
        active = body.get("active_source")
        if active != view.active and not switches and view.polls > 1:
            # A switch the event log no longer shows (more events than it keeps): the poll's time will do.
            self.timeline.append({"t": now, "unit": unit, "kind": "active", "from": view.active, "to": active})
        view.active = active
        view.status, view.error = body, None

    def _event_time(self, at: Any, now: float) -> float:
        """A node's wall-clock event time on this runner's monotonic clock, never later than it was seen."""
        try:
            epoch = datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return now
        return min(now, self.t0 + (epoch - self.wall0))

    async def polling(self, http: aiohttp.ClientSession, stop: asyncio.Event,
                      progress: Callable[[LiveDrill], None] | None) -> None:
        while not stop.is_set():
            await self.poll_once(http)
            if progress:
                progress(self)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.o.poll_s)

    # -- phases
    def select(self, sel: Any) -> list[str]:
        codes = list(self.views)
        if sel == "all":
            return codes
        if isinstance(sel, list):
            missing = [c for c in sel if c not in self.views]
            if missing:
                self.errors.append(f"units not in the inventory, skipped: {', '.join(missing)}")
            return [c for c in sel if c in self.views]
        share = float(str(sel).rstrip("%")) / 100
        return sorted(self.rng.sample(codes, max(1, round(len(codes) * share))))

    def day_end(self) -> float:
        """Real seconds from the start to the end of the last phase (an open-ended fault runs to the day's end)."""
        ends = [0.0]
        for ph in self.phases:
            if ph.action == "fault" and ph.duration is None:
                ends.append(self.sc.day_s)
            else:
                ends.append(ph.at + (ph.duration or 0.0))
        return max(ends) / self.factor

    async def run_phase(self, http: aiohttp.ClientSession, ph: LivePhase) -> None:
        now = time.monotonic()
        chosen = self.select(ph.units)
        entry: dict[str, Any] = {"t": now, "kind": ph.action, "target": "both" if len(ph.targets) == 2 else
                                 (ph.targets[0] if ph.targets else ""), "label": ph.label, "at_sim_s": ph.at,
                                 "units": chosen, "until": None}
        calls: list[tuple[str, str, str, Any]] = []
        if ph.action == "fault":
            end = ph.at + ph.duration if ph.duration is not None else self.sc.day_s
            ttl = min(MAX_WINDOW_S, max(0.001, (end - ph.at) / self.factor))
            entry["until"] = now + ttl
            entry["ttl_s"] = round(ttl, 3)
            for u in chosen:
                for tg in ph.targets:
                    calls.append((u, "POST", "/api/v1/admin/faults",
                                  {"target": tg, "mode": ph.mode, "seconds": round(ttl, 3), **ph.params}))
                    self.opened.setdefault(u, set()).add(tg)
        elif ph.action == "clear":
            for u in chosen:
                for tg in ph.targets:
                    calls.append((u, "DELETE", f"/api/v1/admin/faults?target={tg}", None))
            for e in self.phase_log:
                if e["kind"] == "fault" and set(e["units"]) & set(chosen) and (e["until"] or 0) > now and (
                        e["target"] in (*ph.targets, "both")):
                    e["until"] = now
        else:  # force
            ttl = min(MAX_FORCE_S, max(0.001, (ph.duration or 3600.0) / self.factor))
            entry["ttl_s"] = round(ttl, 3)
            entry["target"] = ph.primary
            if ph.primary != "auto":
                entry["until"] = now + ttl
            for u in chosen:
                calls.append((u, "POST", "/api/v1/admin/failover", {"primary": ph.primary, "ttl_s": round(ttl, 3)}))
                if ph.primary != "auto":
                    self.forced.add(u)
                else:
                    self.forced.discard(u)
        answers = await asyncio.gather(*(self.call(http, self.views[u].node, m, p, b) for u, m, p, b in calls))
        failed = [f"{u}: {_describe_failure(s, a)}" for (u, _m, _p, _b), (s, a) in zip(calls, answers, strict=True)
                  if not 200 <= s < 300]
        entry["calls"] = len(calls)
        entry["failed"] = failed
        self.errors += [f"{ph.label}: {f}" for f in failed]
        self.phase_log.append(entry)

    async def cleanup(self, http: aiohttp.ClientSession) -> list[str]:
        """End what this drill opened: its fault windows and its forced choices; the failures, if any."""
        calls: list[tuple[str, str, str, Any]] = []
        for u, targets in self.opened.items():
            for tg in sorted(targets):
                calls.append((u, "DELETE", f"/api/v1/admin/faults?target={tg}", None))
        for u in sorted(self.forced):
            calls.append((u, "POST", "/api/v1/admin/failover", {"primary": "auto"}))
        answers = await asyncio.gather(*(self.call(http, self.views[u].node, m, p, b) for u, m, p, b in calls))
        self.opened.clear()
        self.forced.clear()
        return [f"{u} {m} {p}: {_describe_failure(s, a)}" for (u, m, p, _b), (s, a) in zip(calls, answers, strict=True)
                if not 200 <= s < 300]

    def settled(self) -> bool:
        """Every node reachable at the start is reachable, back on its primary, unforced, without backlog."""
        for v in (self.views[u] for u in self.baseline):
            st = v.status
            if v.error is not None or st is None:
                return False
            if st.get("forced") or st.get("active_source") != st.get("primary"):
                return False
            if any(int(t.get("lag_records") or 0) for t in (st.get("targets") or {}).values()):
                return False
            if any(t.get("fault_windows") for t in (st.get("targets") or {}).values()):
                return False
        return True

    # -- the run
    async def run(self, progress: Callable[[LiveDrill], None] | None = None) -> dict[str, Any]:
        t_start = time.monotonic()
        async with aiohttp.ClientSession() as http:
            self.t0, self.wall0 = time.monotonic(), time.time()
            await self.poll_once(http)
            for u, v in self.views.items():
                if v.status is not None:
                    self.baseline[u] = v.status
                    v.active = v.status.get("active_source")
                else:
                    self.errors.append(f"{u}: unreachable at the start: {v.error}")
            self.lag.clear()
            self.timeline.clear()
            unwell = [u for u, st in self.baseline.items() if not _healthy(st)]
            if unwell:
                self.errors.append(f"not on their primary with closed breakers and no drill open at the start: "
                                   f"{', '.join(unwell)}")
            healthy = len(self.baseline) == len(self.views) and not unwell
            self.timings["startup_s"] = round(time.monotonic() - t_start, 2)
            stop = asyncio.Event()
            poller = asyncio.create_task(self.polling(http, stop, progress))
            settled_at: float | None = None
            try:
                self.t0, self.wall0 = time.monotonic(), time.time()
                for ph in self.phases:
                    delay = self.t0 + ph.at / self.factor - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    self.now_phase = ph.label
                    await self.run_phase(http, ph)
                delay = self.t0 + self.day_end() - time.monotonic()
                if delay > 0:
                    self.now_phase = "holding"
                    await asyncio.sleep(delay)
                self.t_end = time.monotonic()
                self.now_phase = "settling"
                self.errors += await self.cleanup(http)
                settled_at = await self.settle(http)
                self.finished = True
            finally:
                stop.set()
                if not self.finished:
                    # Interrupted: end what this drill opened before giving up (the TTLs cover a hard crash).
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.cleanup(http))
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            self.now_phase = "check"
            self.timings["day_s"] = round(self.t_end - self.t0, 2)
            self.timings["drain_s"] = -1.0 if settled_at is None else round(settled_at - self.t_end, 2)
            final = {u: v.status for u, v in self.views.items() if v.status is not None}
            sample = await self.portal_sample(http, final)
        figures = self.check(final, sample)
        self.timings["total_s"] = round(time.monotonic() - t_start, 2)
        return self.result(figures, healthy)

    async def settle(self, http: aiohttp.ClientSession) -> float | None:
        """Until the fleet is back to normal (see :meth:`settled`); None if ``settle_s`` ran out first."""
        end = time.monotonic() + self.o.settle_s
        while time.monotonic() < end:
            await self.poll_once(http)
            if self.settled():
                return time.monotonic()
            await asyncio.sleep(min(self.o.poll_s, max(0.0, end - time.monotonic())))
        return None

    # -- the portal sample
    async def portal_sample(self, http: aiohttp.ClientSession, final: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A few recent codes per unit looked up on the national portal (``TraCuuHoSo``), digests compared."""
        out: dict[str, Any] = {"status": "skipped", "reason": "", "sampled": 0, "expected": 0, "found": 0,
                               "missing": 0, "different": 0, "not_due": 0, "errors": 0, "units_skipped": 0,
                               "per_unit": {}}
        portal = self.inventory.portal
        if portal is None:
            out["reason"] = "the inventory names no national portal ([portal])"
            return out
        if self.o.sample <= 0:
            out["reason"] = "sampling turned off"
            return out
        adapter = NationalAdapter(portal.url, username=portal.username, password=portal.password,
                                  dstcode=portal.dstcode, madonvi=portal.madonvi, timeout_s=self.o.timeout_s)
        try:
            results = await asyncio.gather(*(self._sample_unit(http, adapter, u, st) for u, st in final.items()))
        finally:
            await adapter.close()
        out["status"] = "checked"
        examples: list[dict[str, Any]] = []
        for unit, per in zip(final, results, strict=True):
            out["per_unit"][unit] = {k: v for k, v in per.items() if k != "examples"}
            if per.get("skipped"):
                out["units_skipped"] += 1
                continue
            for k in ("sampled", "expected", "found", "missing", "different", "not_due", "errors"):
                out[k] += per[k]
            examples += per["examples"]
        out["examples"] = examples[:10]
        return out

    async def _sample_unit(self, http: aiohttp.ClientSession, adapter: NationalAdapter, unit: str,
                           st: dict[str, Any]) -> dict[str, Any]:
        per: dict[str, Any] = {"sampled": 0, "expected": 0, "found": 0, "missing": 0, "different": 0,
                               "not_due": 0, "errors": 0, "examples": []}
        head = int(st.get("journal_head") or 0)
        n = self.o.sample
        status, body = await self.call(http, self.views[unit].node, "GET",
                                       f"/api/v1/changes?since={max(0, head - 4 * n)}&limit={4 * n}")
        if status != 200 or not isinstance(body, dict):
            return {"skipped": f"cannot list recent codes: {_describe_failure(status, body)}"}
        items = [i for i in body.get("items") or [] if isinstance(i, dict) and "code" in i][-n:]
        nat = (st.get("targets") or {}).get("national") or {}
        cursor = int(nat.get("cursor") or 0)
        stuck = int(nat.get("pending") or 0) + int(nat.get("dead") or 0) + int(nat.get("parked") or 0)
        for item in items:
            code, seq, local = str(item["code"]), int(item.get("seq") or 0), str(item.get("digest") or "")
            per["sampled"] += 1
            if seq > cursor or stuck:
                per["not_due"] += 1  # the node has not had it acknowledged by the portal yet
                continue
            try:
                fetched = await adapter.fetch(code)
            except UpstreamError as exc:
                per["errors"] += 1
                per["examples"].append({"unit": unit, "code": code, "what": f"lookup failed: {exc}"})
                continue
            per["expected"] += 1
            if fetched is None:
                per["missing"] += 1
                per["examples"].append({"unit": unit, "code": code, "what": "acknowledged by the node's national "
                                        "target, but the portal does not hold it"})
            elif fetched.digest != local:
                per["found"] += 1
                per["different"] += 1
                per["examples"].append({"unit": unit, "code": code, "what": "digest differs",
                                        "node": local, "portal": fetched.digest})
            else:
                per["found"] += 1
        return per

    # -- the check
    def snapshot(self) -> Snapshot:
        return Snapshot(timeline=list(self.timeline), phases=list(self.phase_log), lag=list(self.lag), t0=self.t0,
                        t_end=self.t_end, nodes={u: {} for u in self.views})

    def check(self, final: dict[str, dict[str, Any]], sample: dict[str, Any]) -> dict[str, Any]:
        dead: dict[str, dict[str, int]] = {}
        new_dead: list[dict[str, Any]] = []
        for target in TARGETS:
            before = after = new = 0
            for u, st in final.items():
                b = _stuck(self.baseline.get(u), target)
                a = _stuck(st, target)
                if b is None or a is None:
                    continue
                before, after = before + b, after + a
                if a > b:  # counted per unit: one unit's retried dead letters must not hide another's new ones
                    new += a - b
                    new_dead.append({"unit": u, "target": target, "before": b, "after": a})
            dead[target] = {"before": before, "after": after, "new": new}
        # Lost: a code the node's national target acknowledged that the portal does not hold.
        lost = int(sample.get("missing", 0))
        left_open = []
        for u, v in self.views.items():
            st = v.status or {}
            windows = [w for t in (st.get("targets") or {}).values() for w in t.get("fault_windows") or []]
            if v.error is not None or windows or st.get("forced"):
                left_open.append({"unit": u, "unreachable": v.error, "windows": windows, "forced": st.get("forced")})
        not_back = [u for u, st in final.items() if st.get("active_source") != st.get("primary")]
        backlog = {u: {n: t.get("lag_records") for n, t in (st.get("targets") or {}).items()}
                   for u, st in final.items()
                   if any(int(t.get("lag_records") or 0) for t in (st.get("targets") or {}).values())}
        converged = (len(final) == len(self.views) and not not_back and not backlog
                     and int(sample.get("different", 0)) == 0)
        journaled = sum(max(0, int(st.get("journal_head") or 0) - int(self.baseline[u].get("journal_head") or 0))
                        for u, st in final.items() if u in self.baseline)
        snap = self.snapshot()
        figures: dict[str, Any] = {
            "mode": "live",
            # The drill sends nothing: the fleet's own traffic is what it journaled while the drill ran.
            "acknowledged": journaled,
            "acknowledged_steps": None,
            "attempted": 0,
            "lost": lost,
            "lost_checked": sample.get("status") == "checked" and int(sample.get("expected", 0)) > 0,
            "lost_dossiers": lost,
            "lost_steps": None,
            "duplicated": None,  # not observable through the status and drill APIs
            "unexpected": None,
            "in_doubt": None,
            "converged": converged,
            "diverged": int(sample.get("different", 0)),
            "dead_letters": dead,
            "new_dead_letters": sum(d["new"] for d in dead.values()),
            "portal_sample": sample,
            "not_back_on_primary": not_back,
            "backlog_at_end": backlog,
            "left_open": left_open,
            "unreachable_polls": {u: v.failures for u, v in self.views.items() if v.failures},
            "examples": {
                "lost": [e for e in sample.get("examples", []) if "portal does not" in e["what"]][:5],
                "dead_letters": new_dead[:5],
                "duplicated": [],
                "unexpected": [],
                "diverged": [e for e in sample.get("examples", []) if e["what"] == "digest differs"][:5],
                "left_open": left_open[:5],
            },
            "failover": failover_figures(snap),
            "lag": lag_figures(snap),
        }
        figures["ok"] = lost == 0 and converged and not left_open and figures["new_dead_letters"] == 0
        return figures

    def result(self, figures: dict[str, Any], healthy: bool) -> dict[str, Any]:
        invariants = {
            "dead_letters": figures["new_dead_letters"] == 0,
            "converged": bool(figures["converged"]),
            "restored": not figures["left_open"],
        }
        if figures["lost_checked"]:  # without a portal sample nothing says whether anything was lost
            invariants["lost"] = figures["lost"] == 0
        if self.sc.expect_switch:
            phases = figures["failover"]["phases"]
            invariants["switched"] = bool(phases) and all(p["switched"] == p["units"] for p in phases)
        return {
            "scenario": self.sc.name,
            "description": self.sc.description,
            "scenario_toml": self.sc.text,
            "seed": self.o.seed,
            "version": __version__,
            "commit": _git_commit(),
            "mode": "live fleet",
            "inventory": str(self.o.inventory),
            "nodes": len(self.views),
            "units": list(self.views),
            "factor": round(self.factor, 2),
            "simulated_hours": self.sc.hours,
            "settings": {"poll_s": self.o.poll_s, "timeout_s": self.o.timeout_s, "settle_s": self.o.settle_s,
                         "sample": self.o.sample, "minutes": round(self.sc.day_s / self.factor / 60, 3)},
            "workload": {"live changes journaled": figures["acknowledged"]},
            "fleet_healthy_at_start": healthy,
            "timings": self.timings,
            "phases": [{k: v for k, v in p.items() if k not in ("t", "until")}
                       | {"at_s": round(p["t"] - self.t0, 2),
                          "until_s": None if p.get("until") is None else round(p["until"] - self.t0, 2)}
                       for p in self.phase_log],
            "timeline": [{**e, "t": round(e["t"] - self.t0, 3)} for e in sorted(self.timeline, key=lambda e: e["t"])],
            "checker": figures,
            "invariants": invariants,
            "ok": all(invariants.values()),
            "summary_head": summary_head(figures, invariants),
            "errors": self.errors[:20],
        }


def summary_head(c: dict[str, Any], inv: dict[str, bool]) -> list[tuple[str, str, str]]:
    """The first rows of the report's summary table for a live drill: what its checker measures."""

    def verdict(key: str) -> str:
        return "" if key not in inv else "ok" if inv[key] else "VIOLATED"

    ps = c["portal_sample"]
    if ps["status"] == "checked":
        sample = (f"{ps['expected']} due, {ps['found']} found, {ps['missing']} missing, {ps['different']} different"
                  f" ({ps['not_due']} not yet due, {ps['errors']} lookups failed, {ps['units_skipped']} units skipped)")
    else:
        sample = f"skipped: {ps['reason']}"
    rows = [
        ("live changes journaled during the drill", str(c["acknowledged"]), ""),
        ("new dead or parked dossiers", str(c["new_dead_letters"]), verdict("dead_letters")),
    ]
    for target, d in c["dead_letters"].items():
        rows.append((f"dead and parked for {target}: before / after", f"{d['before']} / {d['after']}", ""))
    rows += [
        ("portal sample (TraCuuHoSo)", sample, ""),
        ("lost (acknowledged by a node's national target, missing on the portal)",
         str(c["lost"]) if c["lost_checked"] else "not checked", verdict("lost")),
        ("converged (drained, back on the primary, sampled digests equal)", str(c["converged"]),
         verdict("converged")),
        ("restored (no fault window or forced choice left, every node reachable)", str(not c["left_open"]),
         verdict("restored")),
        ("duplicated / unexpected", "not observable through the nodes' APIs", ""),
    ]
    return rows


def _git_commit() -> str | None:
    from simulations.drill import git_commit

    return git_commit()


def _healthy(st: Mapping[str, Any]) -> bool:
    targets = st.get("targets") or {}
    return (st.get("active_source") == st.get("primary") and not st.get("forced")
            and all(t.get("breaker") == "closed" and not t.get("fault_windows") for t in targets.values()))


def _stuck(st: Mapping[str, Any] | None, target: str) -> int | None:
    t = ((st or {}).get("targets") or {}).get(target)
    if t is None:
        return None
    return int(t.get("dead") or 0) + int(t.get("parked") or 0)


def _describe_failure(status: int, body: Any) -> str:
    message = ""
    if isinstance(body, dict):
        err = body.get("error")
        message = str(err.get("message", "")) if isinstance(err, dict) else ""
    prefix = "unreachable" if status == 0 else f"HTTP {status}"
    return f"{prefix}: {message[:200]}" if message else prefix


async def run_live(opts: LiveOptions, progress: Callable[[LiveDrill], None] | None = None) -> dict[str, Any]:
    """Run the scenario on the inventory's live nodes; the result has the simulated drill's report shape.

    Raises ``InventoryError`` or ``LiveScenarioError`` (both ``ValueError``) before touching any node.
    """
    inventory = load_live_inventory(opts.inventory, env=opts.env)
    return await LiveDrill(opts, inventory).run(progress)


# -- abort ---------------------------------------------------------------------------------------------
@dataclass
class AbortResult:
    unit: str
    name: str
    ok: bool
    closed: int | None = None
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = f"{self.unit} {self.name}: "
        if self.ok:
            n = self.closed or 0
            return what + f"ok, {n} fault window{'' if n == 1 else 's'} closed, source automatic"
        return what + "FAILED: " + "; ".join(self.problems)


async def abort_fleet(nodes: Sequence[FleetNode], *, timeout_s: float = 10.0,
                      concurrency: int = 64) -> list[AbortResult]:
    """Close every fault window and release every forced choice on every node, all nodes at once."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def call(http: aiohttp.ClientSession, node: FleetNode, method: str, path: str,
                   body: Any = None) -> tuple[int, Any]:
        async with gate:
            try:
                async with http.request(method, node.url + path, json=body,
                                        headers={"Authorization": f"Bearer {node.token}"},
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                    try:
                        return r.status, await r.json(content_type=None)
                    except ValueError:
                        return r.status, None
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                return 0, {"error": {"message": str(exc) or type(exc).__name__}}

    async def one(http: aiohttp.ClientSession, node: FleetNode) -> AbortResult:
        (ws, wbody), (fs, fbody) = await asyncio.gather(
            call(http, node, "DELETE", "/api/v1/admin/faults"),
            call(http, node, "POST", "/api/v1/admin/failover", {"primary": "auto"}),
        )
        res = AbortResult(node.unit, node.name, ok=True)
        if ws == 200 and isinstance(wbody, dict):
            res.closed = int(wbody.get("closed") or 0)
        else:
            res.ok = False
            res.problems.append(f"fault windows: {_describe_failure(ws, wbody)}")
        no_targets = fs == 409 and isinstance(fbody, dict) and (fbody.get("error") or {}).get("code") == "no_targets"
        if fs != 200 and not no_targets:
            res.ok = False
            res.problems.append(f"forced failover: {_describe_failure(fs, fbody)}")
        elif fs == 200 and isinstance(fbody, dict) and fbody.get("forced"):
            res.ok = False
            res.problems.append(f"forced failover: still forced ({fbody['forced']})")
        return res

    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(one(http, n) for n in nodes)))


def abort(inventory_path: Path, *, out: Any = None, env: Mapping[str, str] | None = None) -> int:
    """``wardsync drill abort --fleet FILE``: 0 when every node confirmed, 1 otherwise, 2 for a bad inventory."""
    stream = out or sys.stdout
    try:
        inventory = load_live_inventory(inventory_path, env=env)
    except InventoryError as exc:
        print(f"wardsync drill abort: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    results = asyncio.run(abort_fleet(inventory.nodes))
    for r in results:
        print(r.line(), file=stream)
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed}/{len(results)} units restored" + (f", {failed} FAILED" if failed else ""),
          file=stream)
    return 0 if failed == 0 else 1


# -- a command line of its own (``wardsync drill --fleet`` calls the same functions) ------------------
def summary_line(r: dict[str, Any]) -> str:
    c = r["checker"]
    parts = [f"{'PASSED' if r['ok'] else 'FAILED'} {r['scenario']} on {r['nodes']} live units",
             f"lost {c['lost'] if c['lost_checked'] else 'not checked'}",
             f"new dead letters {c['new_dead_letters']}", f"converged {c['converged']}",
             f"restored {r['invariants']['restored']}"]
    for p in c["failover"]["phases"]:
        parts.append(f"{p['label']}: switched {p['switched']}/{p['units']}, switch p50 {p['switch_s']['p50']} s")
    ps = c["portal_sample"]
    parts.append(f"portal sample {ps['status']}" + (f" ({ps['expected']} expected, {ps['missing']} missing, "
                                                     f"{ps['different']} different)" if ps["status"] == "checked"
                                                     else f": {ps['reason']}"))
    return "; ".join(parts)


def run_command(fleet: Path, scenario: str, *, minutes: float | None = None, seed: int = 1,
                report: Path | None = None, as_json: bool = False, settle_s: float = 300.0,
                poll_s: float = 1.0, sample: int = 5) -> int:
    """Run a live drill as a command: 0 when every invariant holds, 1 otherwise, 2 for bad input."""
    from simulations.drill import ScenarioError, load_scenario

    try:
        sc = load_scenario(scenario)
        opts = LiveOptions(inventory=fleet, scenario=sc, minutes=minutes, seed=seed, settle_s=settle_s,
                           poll_s=poll_s, sample=sample)
        inventory = load_live_inventory(fleet)
        drill = LiveDrill(opts, inventory)
    except (ScenarioError, InventoryError, LiveScenarioError) as exc:
        print(f"wardsync drill: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def progress(d: LiveDrill) -> None:
        if as_json:
            return
        up = sum(v.error is None and v.status is not None for v in d.views.values())
        on_backup = sum(v.active not in (None, (v.status or {}).get("primary")) for v in d.views.values())
        print(f"\r{time.monotonic() - d.t0:7.1f} s  {d.now_phase[:40]:<40}  reachable {up}/{len(d.views)}"
              f"  off primary {on_backup}", end="", file=sys.stderr, flush=True)

    r = asyncio.run(drill.run(progress))
    if not as_json:
        print(file=sys.stderr)
    if report is not None:
        from simulations.report import write_report

        files = write_report(r, report)
        if not as_json:
            print(f"report: {files['html']}")
    print(json.dumps(r["checker"], ensure_ascii=False) if as_json else summary_line(r))
    return 0 if r["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.live", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a scenario on the inventory's live nodes")
    run.add_argument("--fleet", type=Path, required=True)
    run.add_argument("--scenario", required=True)
    run.add_argument("--minutes", type=float, default=None)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--report", type=Path, default=None)
    run.add_argument("--json", action="store_true")
    run.add_argument("--settle", type=float, default=300.0)
    run.add_argument("--poll", type=float, default=1.0)
    run.add_argument("--sample", type=int, default=5)
    ab = sub.add_parser("abort", help="end every fault window and forced choice on every node")
    ab.add_argument("--fleet", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "abort":
        return abort(args.fleet)
    return run_command(args.fleet, args.scenario, minutes=args.minutes, seed=args.seed, report=args.report,
                       as_json=args.json, settle_s=args.settle, poll_s=args.poll, sample=args.sample)


if __name__ == "__main__":
    raise SystemExit(main())
