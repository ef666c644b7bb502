"""The whole fleet through a national outage over one simulated peak day: wall time, memory, invariants.

    .venv/bin/python bench/drill.py [--nodes 168] [--dossiers 50000] [--minutes 4] [--workers 2]
        [--scenario national-outage] [--baseline-share 8] [--day-limit-s 480] [--drain-s 120]
        [--report DIR] [--json] [--check]

The drill of ``wardsync drill`` (``simulations/drill.py``): both stand-ins in their own processes, the first
``--nodes`` units of the registry as real nodes with their own stores and tokens, spread over ``--workers``
processes, and a seeded peak day of ``--dossiers`` dossiers with their processing steps, fees, forwarding
of boundary-free dossiers and online submissions, played by the desks' driver over HTTP in ``--minutes``
real minutes (the scenario's 8 simulated hours; the nodes' timers scaled by the same factor) while the
scenario's faults happen (by default the national portal is down for two hours of the morning peak). Then
every fault is cleared, the backlog drains (at most ``--drain-s``), every worker stops cleanly and the
checker compares what the desks were told with every store and both upstreams.

Measured: wall time of the whole run (start-up, day, drain, check), how late the day ran against its plan,
actions (intakes, steps, fees, forwards, online submissions) per second, the desks' latency, and the peak
memory of the whole process tree (this process and every descendant: the sum of their RSS, sampled every
0.25 s from ``/proc``). If the desks cannot play the plan within ``--day-limit-s`` real seconds they stop
there; what they did not send is reported, and the run misses its target.

Baseline, measured in the same run first: the same day and compression without any fault on a fleet
``--baseline-share`` times smaller with as many times fewer dossiers (so the same load per node); printed as
ratios: actions per second (ideal: the share), wall time, memory per node and CPU per action (every process's
CPU over the run per action played; ideal x1) of the full drill against it.
``--baseline-share 0`` skips it. Targets: the full drill under 300 s and 3 GiB on a 2-core machine, every
invariant holding and the whole plan played. ``--check`` exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.registry import units
from simulations.drill import Options, Scenario, load_scenario, parse_scenario, run_drill
from simulations.fleet import loadavg, machine_busy_s
from simulations.workload import PEAK_DAY

TARGET_WALL_S = 300.0
TARGET_RSS_MB = 3 * 1024.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fault_free(sc: Scenario) -> Scenario:
    """The scenario's day and compression without any phase: the baseline's drill."""
    text = (
        f'name = "{sc.name}-no-fault"\ndescription = "{sc.name} without its faults (baseline)"\n'
        f"[drill]\nhours = {sc.hours}\nminutes = {sc.minutes}\n"
    )
    return parse_scenario(text, "baseline")


async def _run(opts: Options, label: str) -> dict[str, Any]:
    last = [0.0]

    def progress(d: Any) -> None:
        if time.monotonic() - last[0] < 15 or d.driver is None:
            return
        last[0] = time.monotonic()
        backlog = sum(int(v[0]) for per in d.latest_lag.values() for v in per.values())
        on_city = sum(a == "city" for a in d.active.values())
        log(
            f"{label}: {d.now_phase}: {d.driver.done}/{d.driver.total} actions, {d.driver.inflight} in flight, "
            f"{on_city} nodes on city, backlog {backlog}, tree RSS peak {d.memory.peak_kb // 1024} MB"
        )

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await run_drill(opts, progress)


def measure(opts: Options, label: str) -> dict[str, Any]:
    """One drill, with the machine's CPU use around it; the drill's result plus the bench's figures."""
    log(
        f"{label}: {opts.nodes} nodes on {opts.workers} workers, {opts.dossiers} dossiers, "
        f"{opts.scenario.hours:g} simulated hours in {opts.minutes:g} real minutes"
    )
    t, busy0 = time.monotonic(), machine_busy_s()
    r = asyncio.run(_run(opts, label))
    wall = time.monotonic() - t
    d = r["driver"]
    planned_day_s = (opts.minutes or opts.scenario.minutes) * 60
    day_s = r["timings"]["day_s"]
    out = {
        "label": label,
        "scenario": r["scenario"],
        "nodes": r["nodes"],
        "workers": r["workers"],
        "dossiers_planned": r["workload"]["dossiers"],
        "workload": r["workload"],
        "wall_s": round(wall, 1),
        "timings": r["timings"],
        "planned_day_s": round(planned_day_s, 1),
        "day_overrun": round(day_s / planned_day_s, 2),
        "actions_planned": d["actions_planned"],
        "actions_done": d["actions_done"],
        "stopped_early": d["stopped_early"],
        "actions_per_s": round(d["actions_done"] / day_s, 1) if day_s else None,
        "latency_ms": d["latency_ms"],
        "gave_up": d["gave_up"],
        "acknowledged": r["checker"]["acknowledged"],
        "acknowledged_steps": r["checker"]["acknowledged_steps"],
        "invariants": r["invariants"],
        "ok": r["ok"],
        "lost": r["checker"]["lost"],
        "duplicated": r["checker"]["duplicated"],
        "unexpected": r["checker"]["unexpected"],
        "converged": r["checker"]["converged"],
        "in_doubt": r["checker"]["in_doubt"],
        "failover": [
            {k: p[k] for k in ("label", "units", "switched", "failed_back", "detect_s", "switch_s")}
            for p in r["checker"]["failover"]["phases"]
        ],
        "peak_tree_rss_mb": r["peak_tree_rss_mb"],
        "rss_mb_per_node": round(r["peak_tree_rss_mb"] / max(1, r["nodes"]), 2),
        "machine_cpu_pct_of_one": round((machine_busy_s() - busy0) / wall * 100),
        # Every process's CPU over the whole run (start-up and drain included) per action played: what the day
        # costs the machine, comparable between runs that played different shares of their plan.
        "cpu_ms_per_action": round((machine_busy_s() - busy0) * 1000 / d["actions_done"], 2)
        if d["actions_done"]
        else None,
        "loadavg_after": loadavg(),
        "errors": r["errors"][:5],
    }
    log(
        f"{label}: {'ok' if out['ok'] else 'INVARIANT VIOLATED'}; wall {out['wall_s']} s, "
        f"{out['actions_done']}/{out['actions_planned']} actions, peak RSS {out['peak_tree_rss_mb']} MB"
    )
    out["_result"] = r
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_report(rep: dict[str, Any]) -> None:
    full, base = rep["full"], rep.get("baseline")
    print(f"drill bench: {full['scenario']} on {full['nodes']} nodes ({full['workers']} workers)")
    for m in filter(None, (base, full)):
        lat = m["latency_ms"]
        print()
        print(f"{m['label']}: {m['scenario']}, {m['nodes']} nodes, {m['dossiers_planned']} dossiers planned")
        t = m["timings"]
        print(
            f"  wall {m['wall_s']} s (start-up {fmt(t.get('startup_s'))}, day {fmt(t.get('day_s'))} of "
            f"{m['planned_day_s']} planned = x{m['day_overrun']}, drain {fmt(t.get('drain_s'))}, "
            f"total {fmt(t.get('total_s'))})"
        )
        print(
            f"  actions {m['actions_done']}/{m['actions_planned']}"
            + (" (the desks stopped at the time limit)" if m["stopped_early"] else "")
            + f", {fmt(m['actions_per_s'], 1)}/s; desk latency p50/p99/max "
            f"{fmt(lat['p50'], 0)}/{fmt(lat['p99'], 0)}/{fmt(lat['max'], 0)} ms; gave up {m['gave_up'] or 0}"
        )
        print(
            f"  acknowledged {m['acknowledged']} dossiers, {m['acknowledged_steps']} steps; lost {m['lost']}, "
            f"duplicated {m['duplicated']}, unexpected {m['unexpected']}, converged {m['converged']}, "
            f"in doubt {m['in_doubt']}: {'every invariant holds' if m['ok'] else 'VIOLATED ' + str(m['invariants'])}"
        )
        for p in m["failover"]:
            print(
                f"  {p['label']}: switched {p['switched']}/{p['units']}, failed back {p['failed_back']}, "
                f"detect p50/p99 {fmt(p['detect_s']['p50'])}/{fmt(p['detect_s']['p99'])} s, "
                f"switch p50/p99 {fmt(p['switch_s']['p50'])}/{fmt(p['switch_s']['p99'])} s"
            )
        print(
            f"  peak RSS of the process tree {m['peak_tree_rss_mb']} MB ({m['rss_mb_per_node']} MB per node); "
            f"machine CPU {m['machine_cpu_pct_of_one']} % of one CPU (all processes), load {m['loadavg_after']}, "
            f"{fmt(m['cpu_ms_per_action'])} ms of CPU per action"
        )
    if rep.get("ratios"):
        r = rep["ratios"]
        print()
        print(
            f"against the baseline (x{rep['share']} fewer nodes and dossiers, no fault): actions/s "
            f"x{fmt(r['actions_per_s'])} (ideal x{rep['share']}), wall time x{fmt(r['wall'])}, "
            f"memory per node x{fmt(r['rss_per_node'])}, CPU per action x{fmt(r['cpu_per_action'])} (ideal x1)"
            + (
                f"; each node beyond the baseline's adds {rep['marginal_mb_per_node']} MB"
                if "marginal_mb_per_node" in rep
                else ""
            )
        )
    print()
    print("targets")
    for name, (value, target, met) in rep["targets"].items():
        print(f"  {name:<22} {value:<14} {target:<18} {'yes' if met else 'NO'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="national-outage")
    p.add_argument("--nodes", type=int, default=len(units()))
    p.add_argument("--dossiers", type=int, default=PEAK_DAY, help=f"dossiers in the day (default {PEAK_DAY})")
    p.add_argument("--minutes", type=float, default=None, help="real minutes for the day (default: the scenario's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--baseline-share", type=int, default=8, help="baseline fleet this many times smaller; 0: none")
    p.add_argument(
        "--day-limit-s", type=float, default=None, help="real seconds the desks may take (default: twice the day)"
    )
    p.add_argument("--drain-s", type=float, default=120.0)
    p.add_argument("--report", type=Path, default=None, help="write the full drill's report there too")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= len(units()):
        p.error(f"--nodes must be between 1 and {len(units())}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sc = load_scenario(args.scenario)
    minutes = args.minutes if args.minutes is not None else sc.minutes
    limit = args.day_limit_s if args.day_limit_s is not None else 2 * minutes * 60
    common = {"seed": args.seed, "minutes": minutes, "drain_s": args.drain_s, "day_limit_s": limit}
    rep: dict[str, Any] = {"share": args.baseline_share}
    try:
        if args.baseline_share > 0:
            n = max(1, math.ceil(args.nodes / args.baseline_share))
            rep["baseline"] = measure(
                Options(
                    fault_free(sc),
                    nodes=n,
                    workers=max(1, min(args.workers, n)),
                    dossiers=max(1, round(args.dossiers / args.baseline_share)),
                    **common,
                ),
                "baseline",
            )
        rep["full"] = measure(
            Options(sc, nodes=args.nodes, workers=args.workers, dossiers=args.dossiers, **common), "full drill"
        )
    except (asyncio.CancelledError, KeyboardInterrupt):
        log("interrupted; every process of the drill was stopped")
        return 130
    full, base = rep["full"], rep.get("baseline")
    if args.report is not None:
        from simulations.report import write_report

        files = write_report(full["_result"], args.report, base["_result"] if base else None)
        log(f"report: {files['html']}")
    for m in filter(None, (full, base)):
        m.pop("_result")
    if base:
        rep["ratios"] = {
            "actions_per_s": full["actions_per_s"] / base["actions_per_s"] if base["actions_per_s"] else None,
            "wall": full["wall_s"] / base["wall_s"],
            "rss_per_node": full["rss_mb_per_node"] / base["rss_mb_per_node"],
            "cpu_per_action": full["cpu_ms_per_action"] / base["cpu_ms_per_action"]
            if full["cpu_ms_per_action"] and base["cpu_ms_per_action"]
            else None,
        }
        if full["nodes"] > base["nodes"]:
            # What one more node costs, without the fixed part (this process, the stand-ins, the interpreters).
            rep["marginal_mb_per_node"] = round(
                (full["peak_tree_rss_mb"] - base["peak_tree_rss_mb"]) / (full["nodes"] - base["nodes"]), 2
            )
    rep["targets"] = {
        "wall time": (f"{full['wall_s']} s", f"< {TARGET_WALL_S:g} s", full["wall_s"] < TARGET_WALL_S),
        "peak memory": (
            f"{full['peak_tree_rss_mb']} MB",
            f"< {TARGET_RSS_MB:g} MB",
            full["peak_tree_rss_mb"] < TARGET_RSS_MB,
        ),
        "invariants": ("hold" if full["ok"] else "VIOLATED", "all hold", bool(full["ok"])),
        "whole plan played": (
            f"{full['actions_done']}/{full['actions_planned']}",
            "all actions",
            not full["stopped_early"],
        ),
    }
    if args.json:
        print(json.dumps(rep, indent=2, ensure_ascii=False, default=str))
    else:
        print_report(rep)
    missed = [k for k, (_v, _t, met) in rep["targets"].items() if not met]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
