"""Failover drills: a fleet of real nodes, a working day of dossiers, a scenario's faults, then the checker.

A scenario is a TOML file (``simulations/scenarios/NAME.toml``) of phases at offsets in simulated time::

    name = "national-outage"
    description = "The national portal is down for two hours in the morning peak."
    [drill]                 # optional defaults
    hours = 8               # simulated day
    minutes = 4             # real minutes it takes
    dossiers_per_day = 31000
    via = "standin"         # how upstream faults reach the fleet: standin (HTTP faults) or proxy (TCP)
    [expect]
    switch = true           # every node in a fault's scope must switch to the backup
    [[phase]]
    at = "2h"               # 90s, 30m, 2h or plain simulated seconds
    action = "fault"        # fault, clear, kill, skew, force
    target = "national"     # national, city or both
    mode = "down"           # per via: the stand-ins' fault modes, the proxy's modes, or a node's fault windows
    for = "2h"              # optional: the fault lapses by itself
    units = "all"           # all, a list of unit codes, or a share such as "25%" (chosen by the seed)

``via = "node"`` opens fault windows in the selected nodes' own paths (``/api/v1/admin/faults``), the way
a subset of units is cut off; ``kill`` SIGKILLs worker ``worker`` and restarts it ``restart_after`` later on
the same data; ``skew`` shifts the selected nodes' clocks by ``offset`` (wall-clock, not compressed);
``force`` pins the active source (``primary``) with a TTL ``for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from failover import windows as node_windows
from node import __version__
from node.registry import Unit, units
from simulations import chaos_proxy, faults
from simulations.checker import Snapshot, check, read_node_store
from simulations.fleet import (
    ROOT,
    Proxy,
    StandIn,
    TreeMemory,
    WorkerProc,
    agency_code,
    stop_all,
)
from simulations.workload import ORDINARY_DAY, Driver, Plan, Target, dossiers_for, make_plan

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
ACTIONS = ("fault", "clear", "kill", "skew", "force")
VIAS = ("standin", "proxy", "node")
TARGET_NAMES = ("national", "city", "both")
MODES: dict[str, tuple[str, ...]] = {
    "standin": faults.MODES,
    "proxy": chaos_proxy.MODES,
    "node": node_windows.MODES,
}
_PHASE_KEYS = {"at", "action", "target", "via", "mode", "for", "units", "worker", "restart_after", "offset",
               "primary", "label", "rate", "ms", "retry_after_s", "after_s", "period_s", "down_mode", "jitter_ms"}
_PARAMS = ("rate", "ms", "retry_after_s", "after_s", "period_s", "down_mode", "jitter_ms")
_DURATION = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*(h|m|min|s)?\s*$")


class ScenarioError(ValueError):
    """A scenario that cannot be run; ``problems`` lists every one found."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid scenario {where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Phase:
    at: float  # simulated seconds
    action: str
    target: str = "national"
    via: str = "standin"
    mode: str = ""
    duration: float | None = None  # simulated seconds
    units: Any = "all"
    worker: int = 0
    restart_after: float | None = None
    offset: float = 0.0  # real seconds (clock skew)
    primary: str = "auto"
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass
class Scenario:
    name: str
    description: str
    text: str
    phases: list[Phase]
    hours: float = 8.0
    minutes: float = 4.0
    dossiers_per_day: int = ORDINARY_DAY
    via: str = "standin"
    expect_switch: bool = False

    @property
    def day_s(self) -> float:
        return self.hours * 3600

    def needs_proxy(self) -> bool:
        return any(p.via == "proxy" for p in self.phases)


def parse_duration(value: Any) -> float:
    """Seconds from 90, "90s", "30m", "2h" (``ValueError`` otherwise)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        n, unit = float(m.group(1)), m.group(2) or "s"
        return n * {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}[unit]
    raise ValueError(f"{value!r} is not a duration (such as 90s, 30m, 2h or a number of seconds)")


def parse_scenario(text: str, where: str = "<scenario>") -> Scenario:
    """A validated scenario from TOML text; ``ScenarioError`` lists every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(where, [f"not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    for key in raw:
        if key not in {"name", "description", "drill", "expect", "phase"}:
            problems.append(f"{key}: unknown key (known: name, description, drill, expect, phase)")
    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        problems.append("name: required, lower-case letters, digits and dashes")
    drill = raw.get("drill", {})
    sc = Scenario(str(name), str(raw.get("description", "")), text, [])
    for key, value in drill.items() if isinstance(drill, dict) else ():
        if key in ("hours", "minutes"):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                problems.append(f"drill.{key}: must be a positive number")
            else:
                setattr(sc, key, float(value))
        elif key == "dossiers_per_day":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append("drill.dossiers_per_day: must be a positive integer")
            else:
                sc.dossiers_per_day = value
        elif key == "via":
            if value not in ("standin", "proxy"):
                problems.append("drill.via: must be standin or proxy")
            else:
                sc.via = value
        else:
            problems.append(f"drill.{key}: unknown setting (known: hours, minutes, dossiers_per_day, via)")
    expect = raw.get("expect", {})
    for key, value in expect.items() if isinstance(expect, dict) else ():
        if key == "switch" and isinstance(value, bool):
            sc.expect_switch = value
        else:
            problems.append(f"expect.{key}: unknown or not a boolean (known: switch)")
    phases = raw.get("phase", [])
    if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
        problems.append("phase: must be an array of tables ([[phase]])")
        phases = []
    for i, p in enumerate(phases):
        problems += [f"phase[{i}]: {m}" for m in _parse_phase(p, sc)]
    if problems:
        raise ScenarioError(where, problems)
    sc.phases.sort(key=lambda p: p.at)
    return sc


def _parse_phase(p: dict[str, Any], sc: Scenario) -> list[str]:
    bad = [f"{k}: unknown key" for k in p if k not in _PHASE_KEYS]
    action = p.get("action")
    if action not in ACTIONS:
        return [*bad, f"action: {action!r} is not one of {', '.join(ACTIONS)}"]
    ph = Phase(at=0.0, action=str(action), label=str(p.get("label", "")))
    try:
        ph.at = parse_duration(p.get("at"))
        if not 0 <= ph.at <= sc.day_s:
            bad.append(f"at: {p.get('at')!r} is outside the simulated day (0 to {sc.hours:g}h)")
    except ValueError as exc:
        bad.append(f"at: {exc}" if "at" in p else "at: required (an offset such as 2h)")
    for key, attr in (("for", "duration"), ("restart_after", "restart_after")):
        if key in p:
            try:
                v = parse_duration(p[key])
                if v <= 0:
                    raise ValueError(f"{p[key]!r} must be positive")
                setattr(ph, attr, v)
            except ValueError as exc:
                bad.append(f"{key}: {exc}")
    target = p.get("target", "national")
    if action in ("fault", "clear") and target not in TARGET_NAMES:
        bad.append(f"target: {target!r} is not one of {', '.join(TARGET_NAMES)}")
    ph.target = str(target)
    units_sel = p.get("units", "all")
    if not (
        units_sel == "all"
        or (isinstance(units_sel, str) and re.fullmatch(r"\d{1,3}(\.\d+)?%", units_sel))
        or (isinstance(units_sel, list) and all(isinstance(u, str) and len(u) == 5 for u in units_sel))
    ):
        bad.append(f"units: {units_sel!r} must be \"all\", a share such as \"25%\" or a list of unit codes")
    ph.units = units_sel
    via = p.get("via", "node" if units_sel != "all" and action == "fault" else sc.via)
    if via not in VIAS:
        bad.append(f"via: {via!r} is not one of {', '.join(VIAS)}")
    ph.via = str(via)
    if action == "fault":
        mode = p.get("mode")
        allowed = MODES.get(ph.via, ())
        if mode not in allowed:
            bad.append(f"mode: {mode!r} is not a {ph.via} fault mode ({', '.join(allowed)})")
        ph.mode = str(mode)
        if ph.via != "node" and units_sel != "all":
            bad.append(f"units: a {ph.via} fault reaches every unit; use via = \"node\" for a subset")
    ph.params = {k: p[k] for k in _PARAMS if k in p}
    if action == "kill":
        w = p.get("worker", 0)
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            bad.append("worker: must be a worker index (0, 1, ...)")
        else:
            ph.worker = w
    if action == "skew":
        try:
            ph.offset = parse_duration(p.get("offset"))
        except ValueError as exc:
            bad.append(f"offset: {exc}")
    if action == "force":
        primary = p.get("primary")
        if primary not in ("national", "city", "auto"):
            bad.append("primary: must be national, city or auto")
        ph.primary = str(primary)
    if not ph.label:
        ph.label = f"{ph.action} {ph.target if ph.action in ('fault', 'clear') else ''} {ph.mode}".strip()
    sc.phases.append(ph)
    return bad


def scenario_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        return p
    return SCENARIOS / f"{name}.toml"


def load_scenario(name: str) -> Scenario:
    path = scenario_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        known = ", ".join(s for s, _ in list_scenarios())
        raise ScenarioError(name, [f"no such scenario ({exc.strerror}); known: {known}"]) from exc
    return parse_scenario(text, str(path.name))


def list_scenarios() -> list[tuple[str, str]]:
    out = []
    for path in sorted(SCENARIOS.glob("*.toml")):
        try:
            sc = parse_scenario(path.read_text(encoding="utf-8"), path.name)
            out.append((sc.name, sc.description))
        except ScenarioError as exc:
            out.append((path.stem, f"INVALID: {exc.problems[0]}"))
    return out


# -- timers --------------------------------------------------------------------------------------------
def scaled_settings(factor: float, nodes: int) -> dict[str, dict[str, float]]:
    """The nodes' timers divided by the time-compression factor, with floors real networks and CPUs need."""

    def s(default: float, floor: float) -> float:
        return round(max(floor, default / factor), 3)

    # A big fleet polls and probes its upstreams no faster than a production node does (every second): 168
    # nodes x 2 targets is already hundreds of calls a second, which the fleet's two cores must also serve.
    poll_floor = 1.0 if nodes > 40 else 0.25
    # Anti-entropy costs a look-up per dossier on the portal whatever the compression: it is the slow safety
    # net, not scaled down with the day. A floor growing with the fleet keeps the fleet's whole look-up rate
    # about what a dozen nodes make, so it does not crowd out the day's own traffic.
    antientropy_floor = max(2.0, nodes / 8)
    return {
        "failover": {
            "probe_interval_s": s(1.0, poll_floor),
            # As in production, five intervals: a target that answered a pull or a push lately is not probed.
            "probe_quiet_s": s(5.0, 5 * poll_floor),
            "probe_timeout_s": s(2.0, 1.0),
            "hold_s": s(60.0, 3.0),
            "evaluate_s": s(0.25, 0.25 if nodes > 40 else 0.1),
            "window_s": s(30.0, 3.0),
            "open_base_s": s(5.0, 0.5),
            "open_cap_s": s(300.0, 5.0),
        },
        "replication": {
            "tick_s": s(1.0, poll_floor),
            # A busy fleet's nodes each see a few changes a second: waiting a little lets them share a push.
            "push_linger_s": 0.25 if nodes > 40 else 0.05,
            "pull_tick_s": s(1.0, poll_floor),
            "standby_pull_s": s(30.0, 2.0),
            "pull_idle_max_s": s(5.0, 2.0),
            "antientropy_tick_s": s(60.0, antientropy_floor),
            "retry_base_s": s(0.5, 0.05),
            "retry_cap_s": s(30.0, 1.0),
            "max_attempts": 1000,
            "seed_timeout_s": 2.0,
        },
        "timeouts": {"timeout_s": s(10.0, 2.0)},
        # Dozens of nodes share each worker process: a smaller SQLite page cache per connection keeps a full
        # peak day of a big fleet within its memory (two connections per node; SQLite's default is 2 MB).
        "node": {"sqlite_cache_kib": 512 if nodes > 40 else 2000},
    }


# -- the drill -----------------------------------------------------------------------------------------
@dataclass
class Options:
    scenario: Scenario
    nodes: int = 168
    seed: int = 1
    workers: int = 2
    minutes: float | None = None  # real minutes for the simulated day (default: the scenario's)
    dossiers: int | None = None  # total for the drill (default: the scenario's daily volume, by unit share)
    drain_s: float = 120.0
    work_dir: Path | None = None
    keep: bool = False
    progress: bool = True
    # Real seconds after the start of the day when the desks stop sending (what was not played by then is
    # reported as such); None: the whole plan is played, however long that takes.
    day_limit_s: float | None = None


class Drill:
    """One drill run: set-up, the day, the drain, the check."""

    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.sc = opts.scenario
        self.all_units: list[Unit] = list(units())
        self.units = self.all_units[: opts.nodes]
        minutes = opts.minutes if opts.minutes is not None else self.sc.minutes
        self.factor = self.sc.day_s / (minutes * 60)
        total = opts.dossiers or dossiers_for(self.units, self.sc.dossiers_per_day, self.all_units, opts.seed)
        self.plan: Plan = make_plan(self.units, seed=opts.seed, dossiers=total, day_s=self.sc.day_s,
                                    all_units=self.all_units)
        self.settings = scaled_settings(self.factor, len(self.units))
        self.rng = random.Random(opts.seed ^ 0xD1)
        self.work = opts.work_dir or Path(tempfile.mkdtemp(prefix="wardsync-drill-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.national: StandIn | None = None
        self.city: StandIn | None = None
        self.proxies: dict[str, Proxy] = {}
        self.workers: list[WorkerProc] = []
        self.spec_paths: list[Path] = []
        self.targets: dict[str, Target | None] = {}
        self.unit_worker: dict[str, int] = {}
        self.ready: dict[int, dict[str, Any]] = {}
        self.active: dict[str, str | None] = {}
        self.breakers: dict[str, tuple[str, str]] = {}
        self.timeline: list[dict[str, Any]] = []
        self.lag: list[list[Any]] = []
        self.latest_lag: dict[str, dict[str, list[float]]] = {}
        self.phase_log: list[dict[str, Any]] = []
        self.skews: dict[str, float] = {}
        self.errors: list[str] = []
        self.memory = TreeMemory()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.driver: Driver | None = None
        self.t0 = 0.0
        self.t_end = 0.0
        self.now_phase = "setup"
        self.timings: dict[str, float] = {}
        self.stopped_early = False

    # -- messages from the workers (called on their reader threads)
    def _on_message(self, worker: int, msg: dict[str, Any]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._handle, worker, msg)

    def _handle(self, worker: int, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.ready[worker] = msg
            for unit, url in msg.get("urls", {}).items():
                self.targets[unit] = Target(url, msg.get("tokens", {}).get(unit))
            for unit, a in msg.get("active", {}).items():
                self.active[unit] = a
            self.errors += [f"{f['unit']}: {f['error']}" for f in msg.get("failed", [])]
        elif kind == "breaker":
            self.timeline.append({"t": msg["t"], "unit": msg["unit"], "kind": "breaker", "target": msg["target"],
                                  "new": msg["new"], "reason": msg.get("reason", "")[:160]})
        elif kind == "active":
            self.active[msg["unit"]] = msg["to"]
            self.timeline.append({"t": msg["t"], "unit": msg["unit"], "kind": "active", "to": msg["to"],
                                  "from": msg["from"]})
        elif kind == "status":
            for unit, st in msg["nodes"].items():
                self.active[unit] = st[0]
                self.breakers[unit] = (st[1], st[2])
        elif kind == "lag":
            for unit, per in msg["nodes"].items():
                self.latest_lag[unit] = per
                for target, (records, seconds) in per.items():
                    self.lag.append([msg["t"], unit, target, records, seconds])

    def node(self, unit: str) -> Target | None:
        return self.targets.get(unit)

    # -- set-up
    def start(self) -> None:
        self.memory.start()
        t = time.monotonic()
        self.national = StandIn("national", self.work)
        self.city = StandIn("city", self.work)
        urls = {"national": self.national.url, "city": self.city.url}
        if self.sc.needs_proxy():
            for name in ("national", "city"):
                self.proxies[name] = Proxy(urls[name], self.work, name=f"proxy-{name}")
                urls[name] = self.proxies[name].url
        n_workers = max(1, min(self.o.workers, len(self.units)))
        nodes = [
            {"unit": u.code, "agency": agency_code(i), "data_dir": str(self.work / "nodes" / u.code)}
            for i, u in enumerate(self.units)
        ]
        timeout = self.settings["timeouts"]
        for w in range(n_workers):
            mine = nodes[w::n_workers]
            for n in mine:
                self.unit_worker[n["unit"]] = w
            spec = {
                "nodes": mine,
                "national_url": urls["national"],
                "city_url": urls["city"],
                "national": timeout,
                "city": timeout,
                "failover": self.settings["failover"],
                "replication": self.settings["replication"],
                "node": self.settings["node"],
                "serve": True,
                "poll_s": 0.05,
                "status_s": 0.5,
                "lag_s": max(0.5, min(2.0, 0.01 * len(self.units))),
                "skew_s": {},
            }
            path = self.work / f"worker-{w}.json"
            path.write_text(json.dumps(spec))
            self.spec_paths.append(path)
            self.workers.append(self._spawn(w))
        self.timings["standins_s"] = round(time.monotonic() - t, 2)

    def _spawn(self, w: int) -> WorkerProc:
        return WorkerProc(w, self.spec_paths[w], self.work / f"worker-{w}.log", self._on_message, self.errors.append)

    async def wait(self, pred: Callable[[], bool], within_s: float, step: float = 0.1) -> bool:
        end = time.monotonic() + within_s
        while not pred():
            if time.monotonic() >= end:
                return False
            if any(not w.alive() for w in self.workers) and self.now_phase == "setup":
                return False
            await asyncio.sleep(step)
        return True

    def healthy(self) -> bool:
        primary = "national"
        return len(self.active) == len(self.units) and all(
            a == primary and self.breakers.get(u, ("", ""))[0] == "closed" for u, a in self.active.items()
        )

    # -- phases
    def _select(self, sel: Any) -> list[str]:
        codes = [u.code for u in self.units]
        if sel == "all":
            return codes
        if isinstance(sel, list):
            return [c for c in sel if c in codes]
        share = float(str(sel).rstrip("%")) / 100
        return sorted(self.rng.sample(codes, max(1, round(len(codes) * share))))

    async def _node_call(self, http: aiohttp.ClientSession, unit: str, method: str, path: str,
                         body: Any = None) -> bool:
        t = self.targets.get(unit)
        if t is None:
            return False
        headers = {"Authorization": f"Bearer {t.token}"} if t.token else {}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with http.request(method, t.url + path, json=body, headers=headers) as r:
                return r.status < 300
        return False

    async def _upstream_fault(self, http: aiohttp.ClientSession, target: str, spec: dict[str, Any] | None,
                              via: str) -> None:
        assert self.national is not None and self.city is not None
        if via == "proxy":
            proxy = self.proxies[target]
            await asyncio.to_thread(proxy.set if spec else (lambda _s: proxy.clear()), spec or {})
            return
        url = (self.national if target == "national" else self.city).url + "/__faults"
        async with (http.post(url, json=spec) if spec else http.delete(url)) as r:
            if r.status != 200:
                self.errors.append(f"fault on {target}: HTTP {r.status} {await r.text()}")

    async def run_phase(self, http: aiohttp.ClientSession, ph: Phase) -> None:
        now = time.monotonic()
        real = None if ph.duration is None else ph.duration / self.factor
        entry: dict[str, Any] = {"t": now, "kind": ph.action, "target": ph.target, "label": ph.label,
                                 "at_sim_s": ph.at, "units": None, "until": None if real is None else now + real}
        targets = ["national", "city"] if ph.target == "both" else [ph.target]
        if ph.action == "fault":
            if ph.via == "node":
                chosen = self._select(ph.units)
                entry["units"] = chosen
                secs = real if real is not None else self.sc.day_s / self.factor
                body_base = {"mode": ph.mode, "seconds": round(secs, 3),
                             **{k: v for k, v in ph.params.items() if k in ("ms", "rate")}}
                await asyncio.gather(*(
                    self._node_call(http, u, "POST", "/api/v1/admin/faults", {"target": tg, **body_base})
                    for u in chosen for tg in targets
                ))
            else:
                spec: dict[str, Any] = {"mode": ph.mode, **ph.params}
                if real is not None:
                    spec["seconds"] = round(real, 3)
                for tg in targets:
                    await self._upstream_fault(http, tg, spec, ph.via)
        elif ph.action == "clear":
            entry["until"] = None
            for tg in targets:
                if ph.via == "node":
                    await asyncio.gather(*(self._node_call(http, u, "DELETE", f"/api/v1/admin/faults?target={tg}")
                                           for u in self._select(ph.units)))
                else:
                    await self._upstream_fault(http, tg, None, ph.via)
            for e in self.phase_log:
                if e["kind"] == "fault" and e["target"] == ph.target and (e["until"] is None or e["until"] > now):
                    e["until"] = now
        elif ph.action == "kill":
            w = ph.worker % len(self.workers)
            entry["units"] = [u for u, k in self.unit_worker.items() if k == w]
            entry["label"] = ph.label or f"SIGKILL worker {w}"
            for u in entry["units"]:
                self.targets[u] = None
            self.ready.pop(w, None)
            await asyncio.to_thread(self.workers[w].kill)
            delay = (ph.restart_after or 600.0) / self.factor
            entry["until"] = now + delay
            asyncio.get_running_loop().call_later(delay, lambda: self._restart(w))
        elif ph.action == "skew":
            chosen = self._select(ph.units)
            entry["units"] = chosen
            for u in chosen:
                self.skews[u] = ph.offset
            self._write_skews()
            for w, proc in enumerate(self.workers):
                mine = [u for u in chosen if self.unit_worker[u] == w]
                if mine:
                    proc.send(f"skew {ph.offset} {','.join(mine)}")
        elif ph.action == "force":
            ttl = round((ph.duration or 3600.0) / self.factor, 3)
            chosen = self._select(ph.units)
            entry["units"] = chosen
            await asyncio.gather(*(self._node_call(http, u, "POST", "/api/v1/admin/failover",
                                                   {"primary": ph.primary, "ttl_s": ttl}) for u in chosen))
        self.phase_log.append(entry)

    def _write_skews(self) -> None:
        for path in self.spec_paths:
            spec = json.loads(path.read_text())
            spec["skew_s"] = {n["unit"]: self.skews[n["unit"]] for n in spec["nodes"] if n["unit"] in self.skews}
            path.write_text(json.dumps(spec))

    def _restart(self, w: int) -> None:
        if self.workers[w].alive():
            return
        self.workers[w] = self._spawn(w)
        self.phase_log.append({"t": time.monotonic(), "kind": "restart", "target": "", "units": None,
                               "label": f"worker {w} restarted", "until": None})

    async def clear_everything(self, http: aiohttp.ClientSession) -> None:
        """End every fault the scenario may have left open, so the fleet can drain."""
        for tg in ("national", "city"):
            await self._upstream_fault(http, tg, None, "standin")
            if tg in self.proxies:
                await self._upstream_fault(http, tg, None, "proxy")
        await asyncio.gather(*(self._node_call(http, u, "DELETE", "/api/v1/admin/faults") for u in self.targets))
        if any(p.action == "force" for p in self.sc.phases):
            await asyncio.gather(*(self._node_call(http, u, "POST", "/api/v1/admin/failover",
                                                   {"primary": "auto"}) for u in self.targets))
        for w, proc in enumerate(self.workers):
            if not proc.alive():
                self._restart(w)

    # -- the run
    async def run(self, progress: Callable[[Drill], None] | None = None) -> dict[str, Any]:
        self.loop = asyncio.get_running_loop()
        t_start = time.monotonic()
        await asyncio.to_thread(self.start)
        n_workers = len(self.workers)
        ok = await self.wait(lambda: len(self.ready) == n_workers, 180.0)
        if not ok:
            raise RuntimeError("the fleet did not start:\n" + "\n".join(self.errors[:10]))
        self.timings["startup_s"] = round(time.monotonic() - t_start, 2)
        healthy = await self.wait(self.healthy, 60.0)
        self.timings["healthy_s"] = round(time.monotonic() - t_start, 2)
        self.now_phase = "day"
        assert self.national is not None
        self.driver = Driver(self.plan, factor=self.factor, nodes=self.node, portal_url=self.national.url,
                             concurrency=min(256, 16 + 2 * len(self.units)))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            self.t0 = time.monotonic()
            stop_desks = asyncio.Event()
            if self.o.day_limit_s is not None:
                asyncio.get_running_loop().call_later(self.o.day_limit_s, stop_desks.set)
            day_task = asyncio.create_task(self.driver.run(self.t0, stop_desks))
            for ph in self.sc.phases:
                while (wait := self.t0 + ph.at / self.factor - time.monotonic()) > 0:
                    if day_task.done() and stop_desks.is_set():
                        break
                    if progress:
                        progress(self)
                    await asyncio.sleep(min(wait, 0.25))
                if day_task.done() and stop_desks.is_set():
                    break  # the desks stopped at the time limit: the rest of the scenario is not played
                self.now_phase = ph.label
                await self.run_phase(http, ph)
            while not day_task.done():
                if progress:
                    progress(self)
                await asyncio.wait({day_task}, timeout=0.25)
            await day_task
            self.stopped_early = stop_desks.is_set()
            self.t_end = time.monotonic()
            self.now_phase = "drain"
            await self.clear_everything(http)
            await self.wait(lambda: len(self.ready) == n_workers, 120.0)
            converged_at = await self.drain(http, progress)
        self.timings["day_s"] = round(self.t_end - self.t0, 2)
        self.timings["drain_s"] = -1.0 if converged_at is None else round(converged_at - self.t_end, 2)
        self.now_phase = "check"
        snapshot = await self.gather_final(http=None)
        result = check(snapshot)
        self.timings["total_s"] = round(time.monotonic() - t_start, 2)
        return self.result(result, snapshot, healthy)

    def _drained(self) -> bool:
        return len(self.latest_lag) >= len(self.units) and all(
            all(v[0] == 0 for v in per.values()) and len(per) == 2 for per in self.latest_lag.values()
        )

    def _on_primary(self) -> bool:
        return len(self.active) >= len(self.units) and all(a == "national" for a in self.active.values())

    async def drain(self, http: aiohttp.ClientSession, progress: Callable[[Drill], None] | None) -> float | None:
        """Until every node's backlog is empty and every replica agrees; None if the drain period ran out."""
        end = time.monotonic() + self.o.drain_s
        while time.monotonic() < end:
            if progress:
                progress(self)
            # Drained means the backlog is empty, every node is back on its primary, every acknowledged dossier
            # reached its units' nodes, their copies agree and both upstreams hold as many dossiers. The full
            # check (every digest of both upstreams) comes after the workers stop: listing tens of thousands
            # of dossiers holds a stand-in up for seconds, long enough to trip every node's breaker.
            if (
                self._drained()
                and self._on_primary()
                and self.driver is not None
                and self.driver.inflight == 0
                and await asyncio.to_thread(self._nodes_settled)
                and await self._upstreams_level(http)
            ):
                return time.monotonic()
            await asyncio.sleep(1.0)
        return None

    def _nodes_settled(self) -> bool:
        """Every acknowledged dossier on its receiving and competent units' nodes, one digest per code."""
        assert self.driver is not None
        nodes = self._read_stores()
        by_id = self.driver.by_id
        for did, code in list(self.driver.acks.dossiers.items()):
            d = by_id[did]
            if any(code not in nodes.get(u, {}) for u in {d.unit, d.competent}):
                return False
        digests: dict[str, str] = {}
        for held in nodes.values():
            for code, rec in held.items():
                if digests.setdefault(code, rec["digest"]) != rec["digest"]:
                    return False
        return True

    async def _upstreams_level(self, http: aiohttp.ClientSession) -> bool:
        """Both upstreams hold at least as many dossiers as were acknowledged (cheap counts; the portal may also
        hold online submissions whose answer never came, which no node takes in)."""
        assert self.national is not None and self.city is not None and self.driver is not None
        counts = []
        try:
            for s in (self.national, self.city):
                async with http.get(f"{s.url}/__inspect/stats") as r:
                    counts.append(int((await r.json()).get("dossiers", -1)))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return min(counts) >= len(self.driver.acks.dossiers)

    async def upstream_view(self, http: aiohttp.ClientSession | None) -> tuple[dict[str, dict[str, str]],
                                                                              dict[str, int]]:
        assert self.national is not None and self.city is not None
        views: dict[str, dict[str, str]] = {}
        dups: dict[str, int] = {}
        own = http is None
        session = http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        try:
            for name, s in (("national", self.national), ("city", self.city)):
                async with session.get(f"{s.url}/__inspect/dossiers") as r:
                    views[name] = {d["code"]: d["digest"] for d in await r.json()}
                async with session.get(f"{s.url}/__inspect/stats") as r:
                    dups[name] = int((await r.json()).get("duplicates", 0))
        finally:
            if own:
                await session.close()
        return views, dups

    async def gather(self, http: aiohttp.ClientSession | None) -> Snapshot:
        views, dups = await self.upstream_view(http)
        nodes = await asyncio.to_thread(self._read_stores)
        assert self.driver is not None
        acks = self.driver.acks
        by_id = self.driver.by_id
        return Snapshot(
            attempted={str(i): {"unit": by_id[i].unit, "competent": by_id[i].competent}
                       | ({"code": acks.online_codes[i]} if i in acks.online_codes else {}) for i in acks.attempted},
            acked={str(i): c for i, c in acks.dossiers.items()},
            acked_steps={str(i): [list(x) for x in v] for i, v in acks.steps.items()},
            nodes=nodes,
            upstreams=views,
            upstream_duplicates=dups,
            timeline=list(self.timeline),
            phases=list(self.phase_log),
            lag=list(self.lag),
            t0=self.t0,
            t_end=self.t_end,
        )

    def _read_stores(self) -> dict[str, dict[str, dict[str, Any]]]:
        out = {}
        for u in self.units:
            db = self.work / "nodes" / u.code / "wardsync.sqlite3"
            if db.exists():
                out[u.code] = read_node_store(db)
        return out

    async def gather_final(self, http: aiohttp.ClientSession | None) -> Snapshot:
        """Stop the workers cleanly, then read every store and both stand-ins."""
        for w in self.workers:
            await asyncio.to_thread(w.close)
        return await self.gather(http)

    def result(self, figures: dict[str, Any], snapshot: Snapshot, healthy: bool) -> dict[str, Any]:
        invariants = {
            "lost": figures["lost"] == 0,
            "duplicated": figures["duplicated"] == 0,
            "unexpected": figures["unexpected"] == 0,
            "converged": bool(figures["converged"]),
        }
        if self.sc.expect_switch:
            phases = figures["failover"]["phases"]
            invariants["switched"] = bool(phases) and all(p["switched"] == p["units"] for p in phases)
        assert self.driver is not None
        acks = self.driver.acks
        return {
            "scenario": self.sc.name,
            "description": self.sc.description,
            "scenario_toml": self.sc.text,
            "seed": self.o.seed,
            "version": __version__,
            "commit": git_commit(),
            "nodes": len(self.units),
            "workers": len(self.workers),
            "factor": round(self.factor, 2),
            "simulated_hours": self.sc.hours,
            "settings": self.settings,
            "workload": self.plan.counts(),
            "driver": {"refused": acks.refused, "gave_up": acks.gave_up,
                       "latency_ms": _lat(acks.latencies_ms), "actions_planned": self.driver.total,
                       "actions_done": self.driver.done, "stopped_early": self.stopped_early,
                       "day_limit_s": self.o.day_limit_s},
            "fleet_healthy_at_start": healthy,
            "timings": self.timings,
            "phases": [{k: v for k, v in p.items() if k not in ("t", "until")}
                       | {"at_s": round(p["t"] - self.t0, 2),
                          "until_s": None if p.get("until") is None else round(p["until"] - self.t0, 2)}
                       for p in self.phase_log],
            "timeline": [{**e, "t": round(e["t"] - self.t0, 3)} for e in self.timeline],
            "checker": figures,
            "invariants": invariants,
            "ok": all(invariants.values()),
            "errors": self.errors[:20],
            "peak_tree_rss_mb": round(self.memory.peak_kb / 1024, 1),
        }

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.close(timeout=10.0)
        for p in (*self.proxies.values(), self.national, self.city):
            if p is not None:
                with contextlib.suppress(Exception):
                    p.close()
        stop_all()
        self.memory.stop()
        if not self.o.keep and self.o.work_dir is None:
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)


def _lat(values: list[float]) -> dict[str, Any]:
    from simulations.checker import dist

    return dist(values, 1)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


async def run_drill(opts: Options, progress: Callable[[Drill], None] | None = None) -> dict[str, Any]:
    drill = Drill(opts)
    try:
        return await drill.run(progress)
    finally:
        await asyncio.to_thread(drill.close)
