"""Failover of the whole fleet: 168 real nodes against the stand-ins while the primary fails.

    .venv/bin/python bench/failover.py [--nodes 168] [--workers 2] [--quick] [--json] [--hold-s 10]
        [--fault-via auto|proxy|standin] [--phases refused,blackhole,flapping] [--flap-period 2] [--flap-s 30]
        [--time-limit 280]

Set-up: the national stand-in and the city stand-in, each its own process (``wardsync sim national|city``),
and the chaos proxy (``wardsync proxy``) in front of the national one, if it starts and refuses, blackholes
and forwards as documented (``--fault-via auto``); otherwise the stand-in's own HTTP fault API is used
(503 answers instead of refused connections) and the report says so. One real :class:`node.app.Node` per
registry unit (the first ``--nodes`` of ``node.registry.units()``, with distinct synthetic agency codes
``000.NN.NN.H29``), each with its own SQLite store in a temporary directory, spread over ``--workers``
processes (``simulations/fleet.py``), each running its nodes in one asyncio loop without their HTTP
servers. Workers report every breaker transition (its exact ``changed_at``) and every change of
``controller.active`` (polled every 20 ms) as JSON lines on a pipe; ``time.monotonic`` is one clock for
every process of the machine.

Settings: ``FailoverSection`` defaults except ``hold_s`` (``--hold-s``, default 10 instead of 60, so the
run ends in time); target timeouts and ``ReplicationSection`` at their defaults, so the nodes' pull loops
(active source every ``pull_tick_s``, the standby every ``standby_pull_s``) run too and their calls count
for the breakers like probes do. No dossiers are written, so a failback never waits for a backlog.

Phases, each timed from the moment the fault was requested:

1. healthy: every node on national with both breakers closed and a successful probe of each target;
2. refused: the proxy closes its port (ECONNREFUSED; live connections reset). Per node: detect (first
   transition of the national breaker to open), switch (active becomes city), and after the fault is
   cleared, failback (active national again). The fault is held until every node switched, at least
   ``REFUSE_MIN_FAULT_S``;
3. blackholed: the proxy accepts and never answers; same measurements, held at least
   ``BLACKHOLE_MIN_FAULT_S``;
4. flapping: the proxy refuses for ``--flap-period`` s, passes for as long, for ``--flap-s`` s; switches
   per node during it (and away from national: the hysteresis promises at most one per outage) and after.

Targets printed for comparison: refused -> switch within 5 s, blackholed -> within 15 s
(tests/test_failover_network.py, default settings), flapping -> at most one switch per outage
(failover/controller.py). Nodes that miss a target get their timeline printed. CPU per process and for the
machine, worker event-loop lag, probe rate, and peak RSS of the process tree (this process and every
descendant, sampled every 0.25 s; PSS too) are reported. Every child process and the temporary directory
are removed on exit, also on Ctrl-C or SIGTERM (children also get SIGTERM if this process is killed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from failover.breaker import BreakerSettings
from node.config import CityTarget, FailoverSection, NationalTarget, ReplicationSection
from node.registry import units
from simulations.fleet import (
    ROOT,
    Proxy,
    StandIn,
    WorkerProc,
    http,
    loadavg,
    machine_busy_s,
    proc_cpu_s,
    pss_kb,
    status_kb,
    stop_all,
    tail,
    tree,
)

POLL_S = 0.02
STATUS_S = 0.5

# Targets, as the brief for this bench states them from the failover tests.
TARGET_REFUSED_S = 5.0
TARGET_BLACKHOLE_S = 15.0
TARGET_FLAP_SWITCHES = 1

PHASES = ("refused", "blackhole", "flapping")
REFUSE_MIN_FAULT_S = 10.0
REFUSE_SWITCH_TIMEOUT_S = 30.0
BLACKHOLE_MIN_FAULT_S = 20.0
BLACKHOLE_SWITCH_TIMEOUT_S = 45.0
FAILBACK_TIMEOUT_S = 50.0  # plus hold_s
HEALTHY_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 120.0
CLEANUP_RESERVE_S = 20.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ----------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def dist(values: list[float], digits: int = 2) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(values)}
    for name, q in (("p50", 50), ("p99", 99), ("max", 100)):
        v = pct(values, q)
        out[name] = None if v is None else round(v, digits)
    return out


def reason_kind(reason: str) -> str:
    """A breaker's trip reason without its numbers and details, so that reasons can be counted."""
    head = reason.split("; open for", 1)[0]
    if "last: " in head:
        first, last = head.split("last: ", 1)
        head = first + "last: " + last.split("(", 1)[0]
    head = re.sub(r"http://\S+", "URL", head)
    head = re.sub(r"\d+(\.\d+)?", "N", head)
    return head[:120]


def timeline(unit: str, bev: list[dict[str, Any]], aev: list[dict[str, Any]], t0: float, t_rec: float) -> list[str]:
    """One node's breaker transitions and source switches, in seconds from the fault's start."""
    rows: list[tuple[float, str]] = []
    for e in bev:
        if e["unit"] == unit:
            rows.append((e["t"], f"{e['target']} breaker {e['old']} -> {e['new']}: {e['reason'][:110]}"))
    for e in aev:
        if e["unit"] == unit:
            rows.append((e["t"], f"ACTIVE {e['from']} -> {e['to']}"))
    rows.append((t_rec, "(fault cleared)"))
    return [f"{t - t0:+7.2f} s  {what}" for t, what in sorted(rows)]


def code_state() -> dict[str, Any]:
    """The commit the nodes ran and the files changed since, since the working tree may be in flux."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    mine = re.compile(r"bench/(_?failover)")
    changed = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if line[3:].endswith(".py") and not mine.match(line[3:])
    ]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted_py": sorted(changed)}


# -- the fleet -----------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """What the workers reported, shared between their reader threads and the main thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict[str, str | None] = field(default_factory=dict)
    status: dict[str, list[Any]] = field(default_factory=dict)
    breaker_events: list[dict[str, Any]] = field(default_factory=list)
    active_events: list[dict[str, Any]] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)  # (t, lag ms)
    probes: dict[int, tuple[float, int]] = field(default_factory=dict)  # worker -> (t, probes)
    probe_log: list[tuple[float, int, int]] = field(default_factory=list)  # (t, worker, probes)
    ready: dict[int, dict[str, Any]] = field(default_factory=dict)
    final: dict[int, dict[str, Any]] = field(default_factory=dict)
    describes: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def on_message(self, worker: int, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        with self.lock:
            if kind == "breaker":
                self.breaker_events.append(msg)
            elif kind == "active":
                self.active_events.append(msg)
                self.active[msg["unit"]] = msg["to"]
            elif kind == "status":
                self.status.update(msg["nodes"])
                t = msg["t"]
                self.lags.extend((t, x) for x in msg["lag_ms"])
                self.probes[worker] = (t, msg["probes"])
                self.probe_log.append((t, worker, msg["probes"]))
            elif kind == "ready":
                self.ready[worker] = msg
                for u, a in msg["active"].items():
                    self.active.setdefault(u, a)
            elif kind == "final":
                self.final[worker] = msg
            elif kind == "describe":
                self.describes.setdefault(msg["tag"], {}).update(msg["nodes"])

    def units(self) -> list[str]:
        with self.lock:
            return sorted(self.active)

    def all_active(self, source: str) -> bool:
        with self.lock:
            return bool(self.active) and all(a == source for a in self.active.values())

    def healthy(self) -> bool:
        with self.lock:
            if not self.active or set(self.status) != set(self.active):
                return False
            return all(
                self.active[u] == "national" and s[1] == "closed" and s[2] == "closed" and s[3] and s[4]
                for u, s in self.status.items()
            )

    def count_active(self, source: str | None) -> int:
        with self.lock:
            return sum(1 for a in self.active.values() if a == source)

    def switched_since(self, t0: float, to: str) -> set[str]:
        with self.lock:
            return {e["unit"] for e in self.active_events if e["t"] >= t0 and e["to"] == to}

    def probes_total(self) -> int:
        with self.lock:
            return sum(p for _, p in self.probes.values())

    def probe_rate(self, t0: float, t1: float) -> float | None:
        """Probes per second of the whole fleet between t0 and t1, from the status reports."""
        with self.lock:
            rates = []
            for w in self.probes:
                pts = [(t, p) for t, ww, p in self.probe_log if ww == w and t0 <= t <= t1]
                if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
                    rates.append((pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))
            return round(sum(rates), 1) if rates else None

    def lag_ms(self, t0: float, t1: float) -> dict[str, Any]:
        with self.lock:
            return dist([x for t, x in self.lags if t0 <= t <= t1], 1)


# -- faults --------------------------------------------------------------------------------------------
class Faults:
    """Makes the national portal fail, through the chaos proxy or through the stand-in's own fault API."""

    def __init__(self, via: str, national: StandIn, proxy: Proxy | None) -> None:
        self.via = via
        self.national = national
        self.proxy = proxy

    def describe(self, kind: str, **p: Any) -> str:
        if self.via == "proxy":
            return {
                "refused": "chaos proxy 'refuse': listening port closed (ECONNREFUSED), live connections reset",
                "blackhole": "chaos proxy 'blackhole': connections accepted, bytes dropped, nothing comes back",
                "flapping": f"chaos proxy 'flap', down_mode refuse, period {p.get('period_s')} s, "
                f"for {p.get('seconds')} s",
            }[kind]
        return {
            "refused": "stand-in fault 'down': every call answers HTTP 503 (not a refused connection)",
            "blackhole": "stand-in fault 'blackhole': requests accepted, never answered",
            "flapping": f"stand-in fault 'flapping' (503 / normal), period {p.get('period_s')} s, "
            f"for {p.get('seconds')} s",
        }[kind]

    def start(self, kind: str, **p: Any) -> None:
        if self.via == "proxy":
            assert self.proxy is not None
            spec = {"refused": {"mode": "refuse"}, "blackhole": {"mode": "blackhole"}}.get(kind) or {
                "mode": "flap",
                "down_mode": "refuse",
                **p,
            }
            self.proxy.set(spec)
        else:
            spec = {"refused": {"mode": "down"}, "blackhole": {"mode": "blackhole"}}.get(kind) or {
                "mode": "flapping",
                **p,
            }
            http("POST", f"{self.national.url}/__faults", spec)

    def clear(self) -> None:
        if self.via == "proxy":
            assert self.proxy is not None
            self.proxy.clear()
        else:
            http("DELETE", f"{self.national.url}/__faults")


def proxy_works(proxy: Proxy) -> str | None:
    """None if the proxy forwards, refuses and blackholes as documented; else what went wrong."""
    import socket
    import urllib.error
    import urllib.request

    host, port = proxy.url.split("://", 1)[1].rsplit(":", 1)
    try:
        with urllib.request.urlopen(f"{proxy.url}/feed?unit=00000&since=0&limit=1", timeout=5) as r:
            if r.status != 200:
                return f"pass: HTTP {r.status}"
        proxy.set({"mode": "refuse"})
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return "refuse: a connection was accepted"
        except ConnectionRefusedError:
            pass
        proxy.set({"mode": "blackhole"})
        try:
            urllib.request.urlopen(f"{proxy.url}/feed?unit=00000&since=0&limit=1", timeout=1).close()
            return "blackhole: a request was answered"
        except TimeoutError:
            pass
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, TimeoutError):
                return f"blackhole: {exc!r} instead of a timeout"
        proxy.clear()
        with urllib.request.urlopen(f"{proxy.url}/feed?unit=00000&since=0&limit=1", timeout=5) as r:
            if r.status != 200:
                return f"pass after clear: HTTP {r.status}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the bench -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.deadline: float = self.t_start + float(args.time_limit)
        self.fleet = Fleet()
        self.work = Path(tempfile.mkdtemp(prefix="wardsync-failover-"))
        self.national: StandIn | None = None
        self.city: StandIn | None = None
        self.proxy: Proxy | None = None
        self.workers: list[WorkerProc] = []
        self.faults: Faults | None = None
        self.rss_peak_kb = 0
        self.rss_peak_at = ""
        self.pss_peak_kb = 0
        self.phase_name = "setup"
        self.hwm: dict[str, int] = {}
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self.report: dict[str, Any] = {"phases": []}

    # -- plumbing
    def remaining(self) -> float:
        return self.deadline - CLEANUP_RESERVE_S - time.monotonic()

    def wait(self, pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
        end = time.monotonic() + max(0.0, min(timeout, self.remaining()))
        while True:
            if pred():
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(step)

    def sleep_until(self, t: float) -> None:
        end = min(t, time.monotonic() + max(0.0, self.remaining()))
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def pids(self) -> dict[str, int]:
        out = {"bench": os.getpid()}
        if self.national:
            out["national stand-in"] = self.national.pid
        if self.city:
            out["city stand-in"] = self.city.pid
        if self.proxy:
            out["chaos proxy"] = self.proxy.pid
        for w in self.workers:
            out[f"worker {w.index}"] = w.pid
        return out

    def cpu(self) -> dict[str, float]:
        out = {name: proc_cpu_s(pid) for name, pid in self.pids().items()}
        out["machine"] = machine_busy_s()
        return out

    def _sample(self) -> None:
        n = 0
        while not self._sampling.wait(0.25):
            pids = tree(os.getpid())
            rss = sum(status_kb(p, "VmRSS") for p in pids)
            if rss > self.rss_peak_kb:
                self.rss_peak_kb, self.rss_peak_at = rss, self.phase_name
            if n % 4 == 0:
                self.pss_peak_kb = max(self.pss_peak_kb, sum(pss_kb(p) for p in pids))
            for name, pid in self.pids().items():
                hwm = status_kb(pid, "VmHWM")
                if hwm:
                    self.hwm[name] = max(self.hwm.get(name, 0), hwm)
            n += 1

    # -- set-up
    def start(self) -> None:
        a = self.args
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        log(f"work dir {self.work}")
        self.national = StandIn("national", self.work)
        self.city = StandIn("city", self.work)
        log(f"national stand-in {self.national.url}, city stand-in {self.city.url}")
        via, why = a.fault_via, ""
        if via in ("auto", "proxy"):
            try:
                import simulations.chaos_proxy  # noqa: F401

                self.proxy = Proxy(self.national.url, self.work)
                problem = proxy_works(self.proxy)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                via = "proxy"
            elif via == "proxy":
                raise RuntimeError(f"the chaos proxy does not work: {problem}")
            else:
                why = f"chaos proxy unusable ({problem}); using the stand-in's fault API"
                log(why)
                if self.proxy is not None:
                    self.proxy.close()
                    self.proxy = None
                via = "standin"
        self.faults = Faults(via, self.national, self.proxy)
        national_url = self.proxy.url if self.proxy is not None else self.national.url
        log(f"faults via {via}" + (f" (proxy {self.proxy.url} -> {self.national.url})" if self.proxy else ""))

        fo_overrides = {"hold_s": a.hold_s}
        all_units = units()[: a.nodes]
        nodes = [
            {
                "unit": u.code,
                # Synthetic but valid and distinct agency codes (Decision 20/2020 shape, HCMC's H29).
                "agency": f"000.{20 + i // 100:02d}.{i % 100:02d}.H29",
                "data_dir": str(self.work / "nodes" / u.code),
            }
            for i, u in enumerate(all_units)
        ]
        n_workers = max(1, min(a.workers, len(nodes)))
        for w in range(n_workers):
            spec = {
                "nodes": nodes[w::n_workers],
                "national_url": national_url,
                "city_url": self.city.url,
                "failover": fo_overrides,
                "poll_s": POLL_S,
                "status_s": STATUS_S,
            }
            path = self.work / f"worker-{w}.json"
            path.write_text(json.dumps(spec))
            self.workers.append(
                WorkerProc(w, path, self.work / f"worker-{w}.log", self.fleet.on_message, self.fleet.errors.append)
            )
        t0 = time.monotonic()
        ok = self.wait(
            lambda: len(self.fleet.ready) == n_workers or any(w.proc.poll() is not None for w in self.workers),
            STARTUP_TIMEOUT_S,
        )
        dead = [w for w in self.workers if w.proc.poll() is not None]
        if not ok or dead:
            logs = "\n".join(f"worker {w.index}:\n{tail(w.log_path)}" for w in self.workers)
            raise RuntimeError(f"workers did not start (ready {len(self.fleet.ready)}/{n_workers}):\n{logs}")
        failed = [f for r in self.fleet.ready.values() for f in r["failed"]]
        startup = round(time.monotonic() - t0, 2)
        log(f"{len(self.fleet.units())} nodes running in {n_workers} workers after {startup} s; {len(failed)} failed")

        fo = FailoverSection(hold_s=a.hold_s)
        self.report.update(
            {
                "nodes": len(nodes),
                "nodes_started": len(self.fleet.units()),
                "start_failures": failed,
                "workers": n_workers,
                "startup_s": startup,
                "cpus": os.cpu_count(),
                "loadavg_start": loadavg(),
                "code": code_state(),
                "fault_via": via,
                "fault_via_note": why,
                "settings": {
                    "failover": asdict(fo),
                    "failover_changed_from_default": {"hold_s": [FailoverSection().hold_s, a.hold_s]},
                    "breaker_fixed": {
                        k: v
                        for k, v in asdict(BreakerSettings()).items()
                        if k in ("jitter", "half_open_trials", "close_after")
                    },
                    "national_timeout_s": NationalTarget().timeout_s,
                    "city_timeout_s": CityTarget().timeout_s,
                    "replication": asdict(ReplicationSection()),
                    "observation": {"active_poll_s": POLL_S, "breaker_times": "exact (breaker.changed_at)"},
                },
            }
        )

    # -- phases
    def phase_healthy(self) -> None:
        self.phase_name = "healthy"
        t0 = time.monotonic()
        cpu0 = self.cpu()
        ok = self.wait(self.fleet.healthy, HEALTHY_TIMEOUT_S)
        t1 = time.monotonic()
        self.sleep_until(t1 + 3.0)  # a few seconds of steady state, for the probe rate and CPU
        t2 = time.monotonic()
        cpu1 = self.cpu()
        n = len(self.fleet.units())
        self.report["phases"].append(
            {
                "phase": "healthy",
                "all_national": ok,
                "on_national": self.fleet.count_active("national"),
                "total": n,
                "time_to_all_healthy_s": round(t1 - t0, 2),
                "steady": self.steady(t0, t2, cpu0, cpu1),
            }
        )
        log(f"healthy: {self.fleet.count_active('national')}/{n} on national after {t1 - t0:.1f} s")

    def steady(self, t0: float, t1: float, cpu0: dict[str, float], cpu1: dict[str, float]) -> dict[str, Any]:
        wall = max(1e-9, t1 - t0)
        procs = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1 if k != "machine"}
        busy = cpu1["machine"] - cpu0["machine"]
        ours = sum(procs.values())
        return {
            "wall_s": round(wall, 1),
            "machine_busy_pct_of_all_cpus": round(100 * busy / wall / (os.cpu_count() or 1), 1),
            "bench_tree_cpu_pct_of_one_cpu": round(100 * ours / wall, 1),
            "other_cpu_pct_of_one_cpu": round(100 * max(0.0, busy - ours) / wall, 1),
            "cpu_s": procs,
            "probes_per_s": self.fleet.probe_rate(t0, t1),
            "loop_lag_ms": self.fleet.lag_ms(t0, t1),
        }

    def ensure_baseline(self) -> bool:
        return self.wait(self.fleet.healthy, 30.0)

    def outage(self, kind: str, min_fault_s: float, switch_timeout_s: float, target_s: float) -> None:
        assert self.faults is not None
        self.phase_name = kind
        baseline = self.ensure_baseline()
        all_units = self.fleet.units()
        cpu0 = self.cpu()
        t0 = time.monotonic()
        self.faults.start(kind)
        t_applied = time.monotonic()
        log(f"{kind}: fault in force ({t_applied - t0:.3f} s to apply)")
        self.wait(lambda: len(self.fleet.switched_since(t0, "city")) >= len(all_units), switch_timeout_s)
        t_switched = time.monotonic()
        self.sleep_until(t0 + min_fault_s)
        not_switched = sorted(set(all_units) - self.fleet.switched_since(t0, "city"))
        self.describe(f"{kind}-fault", not_switched)
        t_rec = time.monotonic()
        self.faults.clear()
        log(
            f"{kind}: {len(all_units) - len(not_switched)}/{len(all_units)} switched "
            f"(waited {t_switched - t0:.1f} s); cleared after {t_rec - t0:.1f} s"
        )
        self.phase_name = f"{kind} recovery"
        back = self.wait(lambda: self.fleet.all_active("national"), FAILBACK_TIMEOUT_S + self.args.hold_s)
        t_end = time.monotonic()
        not_back = [u for u in all_units if self.fleet.active.get(u) != "national"]
        self.describe(f"{kind}-recovery", not_back)
        cpu1 = self.cpu()
        log(f"{kind}: back on national {len(all_units) - len(not_back)}/{len(all_units)} after {t_end - t_rec:.1f} s")
        self.report["phases"].append(
            self.measure(kind, all_units, t0, t_rec, t_end, cpu0, cpu1, baseline, back, target_s)
            | {
                "fault": self.faults.describe(kind),
                "fault_held_s": round(t_rec - t0, 2),
                "fault_apply_s": round(t_applied - t0, 3),
            }
        )

    def flapping(self) -> None:
        assert self.faults is not None
        a = self.args
        self.phase_name = "flapping"
        baseline = self.ensure_baseline()
        all_units = self.fleet.units()
        cpu0 = self.cpu()
        t0 = time.monotonic()
        params = {"period_s": a.flap_period, "seconds": a.flap_s}
        self.faults.start("flapping", **params)
        log(f"flapping: period {a.flap_period} s for {a.flap_s} s")
        self.sleep_until(t0 + a.flap_s)
        t_rec = time.monotonic()
        self.faults.clear()
        self.phase_name = "flapping recovery"
        back = self.wait(lambda: self.fleet.all_active("national"), FAILBACK_TIMEOUT_S + self.args.hold_s)
        t_end = time.monotonic()
        not_back = [u for u in all_units if self.fleet.active.get(u) != "national"]
        self.describe("flapping-recovery", not_back)
        cpu1 = self.cpu()
        m = self.measure("flapping", all_units, t0, t_rec, t_end, cpu0, cpu1, baseline, back, None)
        m |= {"fault": self.faults.describe("flapping", **params), "fault_held_s": round(t_rec - t0, 2)}
        self.report["phases"].append(m)
        log(f"flapping: switches during {m['switches_during_fault']}; back on national {m['failed_back']}")

    def describe(self, tag: str, unit_list: list[str]) -> None:
        if not unit_list:
            return
        for w in self.workers:
            w.send(f"describe {tag} {','.join(unit_list)}")
        self.wait(lambda: set(self.fleet.describes.get(tag, {})) >= set(unit_list), 5.0)

    def measure(
        self,
        kind: str,
        all_units: list[str],
        t0: float,
        t_rec: float,
        t_end: float,
        cpu0: dict[str, float],
        cpu1: dict[str, float],
        baseline: bool,
        back: bool,
        target_s: float | None,
    ) -> dict[str, Any]:
        f = self.fleet
        with f.lock:
            bev = [e for e in f.breaker_events if t0 <= e["t"] <= t_end]
            aev = [e for e in f.active_events if t0 <= e["t"] <= t_end]
        detect: dict[str, float] = {}
        opens_during: Counter[str] = Counter()
        trip_reasons: Counter[str] = Counter()
        for e in sorted(bev, key=lambda e: e["t"]):
            if e["target"] != "national" or e["new"] != "open" or e["t"] > t_rec:
                continue
            opens_during[e["unit"]] += 1
            if e["unit"] not in detect:
                detect[e["unit"]] = e["t"] - t0
                trip_reasons[reason_kind(e["reason"])] += 1
        closed_after: dict[str, float] = {}
        for e in sorted(bev, key=lambda e: e["t"]):
            if e["target"] == "national" and e["new"] == "closed" and e["t"] >= t_rec and e["unit"] not in closed_after:
                closed_after[e["unit"]] = e["t"] - t_rec
        city_trouble = sorted({e["unit"] for e in bev if e["target"] == "city" and e["new"] == "open"})
        switch: dict[str, float] = {}
        failback: dict[str, float] = {}
        during: Counter[str] = Counter()
        away_during: Counter[str] = Counter()
        after: Counter[str] = Counter()
        offline: set[str] = set()
        for e in sorted(aev, key=lambda e: e["t"]):
            u = e["unit"]
            if e["to"] is None:
                offline.add(u)
            if e["t"] < t_rec:
                during[u] += 1
                if e["from"] == "national":
                    away_during[u] += 1
                if e["to"] == "city" and u not in switch:
                    switch[u] = e["t"] - t0
            else:
                after[u] += 1
                if e["to"] == "national" and u not in failback:
                    failback[u] = e["t"] - t_rec
        per_node_during = [float(during.get(u, 0)) for u in all_units]
        per_node_away = [float(away_during.get(u, 0)) for u in all_units]
        per_node_opens = [float(opens_during.get(u, 0)) for u in all_units]
        n = len(all_units)
        out: dict[str, Any] = {
            "phase": kind,
            "total": n,
            "baseline_healthy": baseline,
            "detect_s": dist(list(detect.values())),
            "switch_s": dist(list(switch.values())),
            "switch_minus_detect_s": dist(
                [switch[u] - detect[u] for u in switch if u in detect and switch[u] >= detect[u]], 3
            ),
            "detected": len(detect),
            "switched": len(switch),
            "failback_s": dist(list(failback.values())),
            "national_closed_after_clear_s": dist(list(closed_after.values())),
            "failed_back": f"{sum(1 for u in all_units if f.active.get(u) == 'national')}/{n}",
            "all_back": back,
            "recovery_wait_s": round(t_end - t_rec, 2),
            "switches_during_fault": {
                "per_node_p50": pct(per_node_during, 50),
                "per_node_max": pct(per_node_during, 100),
                "total": int(sum(per_node_during)),
                "away_from_national_max": pct(per_node_away, 100),
                "nodes_over_one_away": sum(1 for x in per_node_away if x > TARGET_FLAP_SWITCHES),
            },
            "switches_after_recovery_total": int(sum(after.values())),
            "national_breaker_opens_per_node": {
                "p50": pct(per_node_opens, 50),
                "max": pct(per_node_opens, 100),
                "total": int(sum(per_node_opens)),
            },
            "trip_reasons": dict(trip_reasons.most_common(4)),
            "went_offline": sorted(offline),
            "city_breaker_opened": city_trouble,
            "never_switched": {u: f.describes.get(f"{kind}-fault", {}).get(u) for u in all_units if u not in switch}
            if kind != "flapping"
            else {},
            "not_back": {
                u: f.describes.get(f"{kind}-recovery", {}).get(u) for u in all_units if f.active.get(u) != "national"
            },
            "steady": self.steady(t0, t_end, cpu0, cpu1),
        }
        # Timelines of the nodes that missed a target, as evidence of why.
        odd = [u for u in all_units if u not in switch or away_during.get(u, 0) > TARGET_FLAP_SWITCHES]
        odd += [u for u in all_units if f.active.get(u) != "national" and u not in odd]
        out["timelines"] = {u: timeline(u, bev, aev, t0, t_rec) for u in odd[:10]}
        if target_s is not None:
            mx = out["switch_s"]["max"]
            out["target"] = {
                "switch_within_s": target_s,
                "met": len(switch) == n and mx is not None and mx <= target_s,
                "within_target": sum(1 for v in switch.values() if v <= target_s),
            }
        else:
            out["target"] = {
                "max_switches_away_per_outage": TARGET_FLAP_SWITCHES,
                "met": out["switches_during_fault"]["nodes_over_one_away"] == 0,
            }
        return out

    # -- tear-down
    def close(self) -> None:
        self.phase_name = "teardown"
        t = time.monotonic()
        closers = [threading.Thread(target=w.close, daemon=True) for w in self.workers]
        for c in closers:
            c.start()
        for c in closers:
            c.join(30.0)
        finals = {w: f for w, f in self.fleet.final.items()}
        for s in (self.proxy, self.national, self.city):
            if s is not None:
                s.close()
        self._sampling.set()
        stop_all()
        self.report["teardown_s"] = round(time.monotonic() - t, 2)
        self.report["worker_close"] = {
            str(w): {"close_s": f.get("close_s"), "errors": f.get("close_errors")} for w, f in finals.items()
        }
        self.report["memory"] = {
            "peak_tree_rss_mb": round(self.rss_peak_kb / 1024, 1),
            "peak_tree_rss_phase": self.rss_peak_at,
            "peak_tree_pss_mb": round(self.pss_peak_kb / 1024, 1),
            "per_process_peak_rss_mb": {k: round(v / 1024, 1) for k, v in sorted(self.hwm.items())},
        }

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


# -- report --------------------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            indent
            + "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
        if i == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return lines


def print_report(r: dict[str, Any]) -> None:
    s = r["settings"]
    fo = s["failover"]
    print(
        f"wardsync failover bench: {r['nodes_started']}/{r['nodes']} nodes in {r['workers']} worker processes, "
        f"{r['cpus']} CPUs, load average {r['loadavg_start']} at start; nodes up in {r['startup_s']} s"
    )
    code = r.get("code", {})
    if code:
        dirty = code["uncommitted_py"]
        print(
            f"code: commit {code['commit']}"
            + (f" + uncommitted changes in {len(dirty)} .py files: {', '.join(dirty)}" if dirty else " (clean)")
        )
    print(f"faults via: {r['fault_via']}" + (f"  ({r['fault_via_note']})" if r["fault_via_note"] else ""))
    print(
        "settings: [failover] defaults except hold_s = "
        f"{fo['hold_s']:g} (default {s['failover_changed_from_default']['hold_s'][0]:g}): "
        + ", ".join(f"{k}={v}" for k, v in fo.items() if k != "hold_s")
    )
    print(
        f"          breaker jitter ±{s['breaker_fixed']['jitter'] * 100:g} %, "
        f"{s['breaker_fixed']['half_open_trials']} half-open trials, closes after {s['breaker_fixed']['close_after']}; "
        f"target timeout_s {s['national_timeout_s']:g} (default); replication defaults; no dossiers written"
    )
    print(
        "measured: detect = fault requested -> first national breaker transition to open (exact); "
        f"switch = -> controller.active == 'city' (polled every {s['observation']['active_poll_s'] * 1000:g} ms); "
        "failback = fault cleared -> active == 'national'"
    )
    if r["start_failures"]:
        print(f"nodes that failed to start: {r['start_failures']}")
    for p in r["phases"]:
        print()
        st = p.get("steady", {})
        if p["phase"] == "healthy":
            print(
                f"phase 1 - healthy: {p['on_national']}/{p['total']} nodes on national, both breakers closed, "
                f"after {p['time_to_all_healthy_s']} s"
            )
        else:
            num = {"refused": 2, "blackhole": 3, "flapping": 4}[p["phase"]]
            title = {
                "refused": "primary down hard (refused)",
                "blackhole": "primary blackholed",
                "flapping": "primary flapping",
            }[p["phase"]]
            print(
                f"phase {num} - {title}: {p['fault']}; fault held {p['fault_held_s']} s"
                + ("" if p["baseline_healthy"] else "  [fleet was NOT all healthy at the start]")
            )
            rows: list[tuple[str, ...]] = [("", "p50", "p99", "max", "n")]
            for key, label in (
                ("detect_s", "detect (s)"),
                ("switch_s", "switch (s)"),
                ("switch_minus_detect_s", "switch - detect (s)"),
                ("national_closed_after_clear_s", "breaker closed (s after clear)"),
                ("failback_s", "failback (s)"),
            ):
                d = p[key]
                digits = 3 if key == "switch_minus_detect_s" else 2
                rows.append((label, fmt(d["p50"], digits), fmt(d["p99"], digits), fmt(d["max"], digits), str(d["n"])))
            for line in table(rows):
                print(line)
            sw = p["switches_during_fault"]
            print(
                f"  nodes switched to city: {p['switched']}/{p['total']}; back on national: {p['failed_back']} "
                f"(waited {p['recovery_wait_s']} s after clearing)"
            )
            print(
                f"  switches per node during the fault: p50 {fmt(sw['per_node_p50'], 0)}, "
                f"max {fmt(sw['per_node_max'], 0)}, "
                f"total {sw['total']}; away from national per node max {fmt(sw['away_from_national_max'], 0)}; "
                f"switches after clearing: {p['switches_after_recovery_total']}"
            )
            op = p["national_breaker_opens_per_node"]
            print(
                f"  national breaker openings per node during the fault: p50 {fmt(op['p50'], 0)}, "
                f"max {fmt(op['max'], 0)}, "
                f"total {op['total']}"
            )
            if p["trip_reasons"]:
                print("  first trip reasons: " + "; ".join(f"{n} x '{k}'" for k, n in p["trip_reasons"].items()))
            t = p["target"]
            if "switch_within_s" in t:
                print(
                    f"  target: switch within {t['switch_within_s']:g} s -> {t['within_target']}/{p['total']} within, "
                    f"max {fmt(p['switch_s']['max'])} s: {'MET' if t['met'] else 'NOT MET'}"
                )
            else:
                print(
                    f"  target: at most {t['max_switches_away_per_outage']} switch away from national "
                    "per node per outage -> "
                    f"{sw['nodes_over_one_away']} nodes over: {'MET' if t['met'] else 'NOT MET'}"
                )
            if p["went_offline"]:
                print(f"  nodes that went offline (no healthy source): {len(p['went_offline'])}")
            if p["city_breaker_opened"]:
                print(f"  city breaker opened on {len(p['city_breaker_opened'])} nodes: {p['city_breaker_opened'][:8]}")
            for u, lines in list(p.get("timelines", {}).items())[:3]:
                print(f"  timeline of {u} (from the fault's start):")
                for line in lines[:40]:
                    print(f"    {line}")
            for label, key in (("never switched", "never_switched"), ("not back on national", "not_back")):
                if p[key]:
                    print(f"  {label}: {len(p[key])}")
                    for u, d in list(p[key].items())[:5]:
                        print(f"    {u}: {json.dumps(d, ensure_ascii=False)[:400]}")
        if st:
            lag = st["loop_lag_ms"]
            print(
                f"  machine busy {st['machine_busy_pct_of_all_cpus']} % of all CPUs over {st['wall_s']} s "
                f"(bench processes {st['bench_tree_cpu_pct_of_one_cpu']} % of one CPU, others "
                f"{st['other_cpu_pct_of_one_cpu']} %); probes {fmt(st['probes_per_s'], 0)}/s; "
                f"worker event-loop lag p50 {fmt(lag['p50'], 1)} / p99 {fmt(lag['p99'], 1)} / "
                f"max {fmt(lag['max'], 1)} ms"
            )
            print("  CPU s: " + ", ".join(f"{k} {v}" for k, v in st["cpu_s"].items()))
    print()
    print("summary")
    rows = [
        (
            "phase",
            "detect p50/p99/max s",
            "switch p50/p99/max s",
            "switched",
            "failback p50/p99/max s",
            "switches/node p50/max (total)",
            "target",
            "met",
        )
    ]
    for p in r["phases"]:
        if p["phase"] == "healthy":
            continue
        d, s_, fb, sw = p["detect_s"], p["switch_s"], p["failback_s"], p["switches_during_fault"]
        t = p["target"]
        rows.append(
            (
                p["phase"],
                f"{fmt(d['p50'])}/{fmt(d['p99'])}/{fmt(d['max'])}",
                f"{fmt(s_['p50'])}/{fmt(s_['p99'])}/{fmt(s_['max'])}",
                f"{p['switched']}/{p['total']}",
                f"{fmt(fb['p50'])}/{fmt(fb['p99'])}/{fmt(fb['max'])}",
                f"{fmt(sw['per_node_p50'], 0)}/{fmt(sw['per_node_max'], 0)} ({sw['total']})",
                f"switch <= {t['switch_within_s']:g} s" if "switch_within_s" in t else "<= 1 switch away per outage",
                "yes" if t["met"] else "NO",
            )
        )
    for line in table(rows, indent=""):
        print(line)
    m = r.get("memory", {})
    if m:
        print()
        print(
            f"peak RSS of the process tree: {m['peak_tree_rss_mb']} MB (sum of RSS, sampled every 0.25 s, "
            f"during '{m['peak_tree_rss_phase']}'); peak PSS {m['peak_tree_pss_mb']} MB"
        )
        print(
            "per-process peak RSS (VmHWM) MB: " + ", ".join(f"{k} {v}" for k, v in m["per_process_peak_rss_mb"].items())
        )
    if r.get("skipped"):
        print(f"skipped for the time limit: {', '.join(r['skipped'])}")
    print(f"total run {r['total_s']} s (teardown {r.get('teardown_s')} s)")


# -- main ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=None, help="nodes (default 168, --quick 24)")
    p.add_argument("--workers", type=int, default=2, help="worker processes running the nodes")
    p.add_argument("--quick", action="store_true", help="24 nodes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--hold-s", type=float, default=10.0, help="[failover] hold_s (default setting: 60)")
    p.add_argument("--flap-period", type=float, default=2.0)
    p.add_argument("--flap-s", type=float, default=30.0)
    p.add_argument("--fault-via", choices=("auto", "proxy", "standin"), default="auto")
    p.add_argument("--time-limit", type=float, default=280.0, help="whole run, seconds")
    p.add_argument(
        "--phases", default=",".join(PHASES), help=f"fault phases to run, comma-separated (default {','.join(PHASES)})"
    )
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        p.error(f"--phases takes some of {', '.join(PHASES)}")
    if args.nodes is None:
        args.nodes = 24 if args.quick else len(units())
    if not 1 <= args.nodes <= len(units()):
        p.error(f"--nodes must be between 1 and {len(units())}")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Explicit for SIGINT too: a bench started in the background of a script inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    bench = Bench(args)
    code = 0
    try:
        bench.start()
        bench.phase_healthy()
        if bench.fleet.healthy():
            for phase in PHASES:
                if phase not in args.phases:
                    continue
                if bench.remaining() < 30:
                    log(f"{phase}: skipped, the time limit is near")
                    bench.report.setdefault("skipped", []).append(phase)
                elif phase == "refused":
                    bench.outage("refused", REFUSE_MIN_FAULT_S, REFUSE_SWITCH_TIMEOUT_S, TARGET_REFUSED_S)
                elif phase == "blackhole":
                    bench.outage("blackhole", BLACKHOLE_MIN_FAULT_S, BLACKHOLE_SWITCH_TIMEOUT_S, TARGET_BLACKHOLE_S)
                else:
                    bench.flapping()
        else:
            log("the fleet never got healthy; skipping the fault phases")
            code = 1
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except Exception as exc:
        log(f"failed: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        # A second Ctrl-C must not leave processes or files behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            bench.close()
        finally:
            bench.remove()
    bench.report["total_s"] = round(time.monotonic() - bench.t_start, 1)
    bench.report["fleet_errors"] = bench.fleet.errors[:10]
    if code == 130:
        return code
    if args.json:
        print(json.dumps(bench.report, indent=2, ensure_ascii=False))
    elif "settings" in bench.report:
        print_report(bench.report)
    return code


if __name__ == "__main__":
    sys.exit(main())
