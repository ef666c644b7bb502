"""Replication throughput: how fast a backlog of dossiers drains to the national portal and the city system.

    .venv/bin/python bench/replicate.py [--dossiers 20000] [--sample 1000] [--quick] [--json] [--profile]

A node (real store in a temporary directory) first accepts ``--dossiers`` dossiers while no target is
reachable, through its own ``DossierService`` with bodies validated by ``validate_intake``, a third of
them with one extra processing step (``bench/_replicate_node.py build``). The closed store is kept as a
template file and every measured run starts from a fresh copy of it, so every run drains the same
backlog. Building it is not measured.

Each run starts the stand-ins it needs, each in its own process (``.venv/bin/wardsync sim national|city
--listen 127.0.0.1:0 --data-dir D`` with a fresh data directory), then the node in its own process
(``bench/_replicate_node.py drain``), which opens the store copy with one ``Replicator`` per target and
reports, per target, the time from node start until the target's cursor reached the journal head and
every dossier is ``synced`` with exactly its current digest. Runs:

1. ``both``: both targets at once, default settings (``ReplicatorSettings()``: window 2000, batch 500;
   adapters as ``Node._build_upstreams`` makes them, one shared HTTP session, up to 4 requests in flight).
   Afterwards every dossier's digest on the node is compared with ``/__inspect/dossiers?unit=26743`` on
   each stand-in, and ``/__inspect/stats`` must report 0 duplicates.
2. ``unbatched``: both targets at once, ``batch_size=1``, adapter ``batch_limit=1`` and one request in
   flight, over the first ``--sample`` dossiers of the same backlog (its own template), bounded by
   ``--unbatched-limit`` seconds (a run cut short is rated by what the adapters got acknowledged).
3. ``national only`` and ``city only``: the full backlog to one target, default settings.

CPU seconds of the node, of each stand-in, and of everything else on the machine (from /proc/stat) are
reported per run, since the 2 cores are shared. ``--profile`` adds one more run of (1) with the node and
both stand-ins under cProfile and prints the top functions by own time. Every subprocess and temporary
directory is removed on exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import pstats
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
WARDSYNC = ROOT / ".venv" / "bin" / "wardsync"
NODE_HELPER = ROOT / "bench" / "_replicate_node.py"
UNIT = "26743"
DB_NAME = "wardsync.sqlite3"
TARGETS = ("national", "city")
GOAL_RATE = 1000.0  # dossiers/s per target while draining both
GOAL_RATIO = 5.0  # batched over unbatched, per target
CLK_TCK = os.sysconf("SC_CLK_TCK")

_live: set[subprocess.Popen[Any]] = set()


# -- processes -----------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a child still running when this process dies gets SIGTERM.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn(cmd: list[str], *, stdout: Any, stderr: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    _live.add(proc)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _live.discard(proc)


def stop_all() -> None:
    for proc in list(_live):
        stop(proc, timeout=5.0)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


class StandIn:
    """One upstream stand-in in its own process, on a free loopback port, over a fresh data directory."""

    def __init__(self, system: str, base: Path, *, profile: Path | None = None) -> None:
        self.system = system
        self.dir = base / f"{system}-data"
        self.out = base / f"{system}.out"
        self.err = base / f"{system}.err"
        self.profile = profile
        sim = ["sim", system, "--listen", "127.0.0.1:0", "--data-dir", str(self.dir)]
        if profile is None:
            cmd = [str(WARDSYNC), *sim]
        else:
            cmd = [str(PYTHON), "-m", "cProfile", "-o", str(profile), "-m", "node.cli", *sim]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = spawn(cmd, stdout=out, stderr=err)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out.read_text().splitlines():
                if "listening on http://" in line:
                    return line.split("listening on ", 1)[1].strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.system} stand-in did not start: {self.err.read_text()[-2000:]}")

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        stop(self.proc)


# -- the node ------------------------------------------------------------------------------------------
def build_templates(work: Path, sizes: list[int]) -> tuple[dict[int, Path], dict[str, Any]]:
    templates = {n: work / f"template-{n}.sqlite3" for n in sorted(set(sizes))}
    cmd = [str(PYTHON), str(NODE_HELPER), "build", "--data-dir", str(work / "build")]
    for n, path in templates.items():
        cmd += ["--snapshot", f"{n}:{path}"]
    log = work / "build.log"
    with log.open("w") as err:
        proc = spawn(cmd, stdout=subprocess.PIPE, stderr=err)
        out, _ = proc.communicate()
    _live.discard(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"building the backlog failed:\n{_tail(log)}")
    shutil.rmtree(work / "build", ignore_errors=True)
    return templates, json.loads(out.decode().strip().splitlines()[-1])


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def run_drain(
    name: str,
    work: Path,
    template: Path,
    targets: tuple[str, ...],
    *,
    unbatched: bool = False,
    time_limit: float,
    verify: bool = False,
    profile: bool = False,
) -> dict[str, Any]:
    base = work / name.replace(" ", "-")
    node_dir = base / "node"
    node_dir.mkdir(parents=True)
    shutil.copyfile(template, node_dir / DB_NAME)
    standins: dict[str, StandIn] = {}
    try:
        for t in targets:
            standins[t] = StandIn(t, base, profile=(base / f"{t}.prof") if profile else None)
        cmd = [str(PYTHON), str(NODE_HELPER), "drain", "--data-dir", str(node_dir), "--time-limit", str(time_limit)]
        for t, s in standins.items():
            cmd += [f"--{t}", s.url]
        if unbatched:
            cmd.append("--unbatched")
        if profile:
            cmd.append("--profile")
        cpu0 = {t: s.cpu_s() for t, s in standins.items()}
        busy0, load0 = machine_busy_s(), loadavg()
        log = base / "node.log"
        with log.open("w") as err:
            proc = spawn(cmd, stdout=subprocess.PIPE, stderr=err)
            try:
                out, _ = proc.communicate(timeout=time_limit + 60)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise RuntimeError(f"run {name}: node did not finish in time:\n{_tail(log)}") from None
        _live.discard(proc)
        busy = machine_busy_s() - busy0
        if proc.returncode != 0:
            raise RuntimeError(f"run {name}: node failed (exit {proc.returncode}):\n{_tail(log)}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["run"] = name
        result["unbatched"] = unbatched
        result["standin_cpu_s"] = {t: round(s.cpu_s() - cpu0[t], 3) for t, s in standins.items()}
        result["machine_busy_s"] = round(busy, 3)
        result["other_cpu_s"] = round(
            max(0.0, busy - result["process_cpu_s"] - sum(result["standin_cpu_s"].values())), 3
        )
        result["loadavg_before"] = load0
        if verify:
            result["verification"] = verify_targets(node_dir / DB_NAME, standins)
    finally:
        for s in standins.values():
            s.close()
    if profile:
        result["standin_profiles"] = {
            t: _pstats_text(base / f"{t}.prof", 15) for t in targets if (base / f"{t}.prof").exists()
        }
    shutil.rmtree(base, ignore_errors=True)
    return result


def _pstats_text(path: Path, top: int) -> str:
    buf = io.StringIO()
    pstats.Stats(str(path), stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def verify_targets(db: Path, standins: dict[str, StandIn]) -> dict[str, Any]:
    """Every node digest equals the stand-in's for the unit, and the stand-in stored nothing twice."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        local = dict(conn.execute("SELECT code, digest FROM dossiers").fetchall())
    out: dict[str, Any] = {"node_dossiers": len(local), "targets": {}}
    for t, s in standins.items():
        remote = {d["code"]: d["digest"] for d in s.get(f"/__inspect/dossiers?unit={UNIT}")}
        stats = s.get("/__inspect/stats")
        missing = sum(1 for c in local if c not in remote)
        differing = sum(1 for c, d in local.items() if c in remote and remote[c] != d)
        extra = sum(1 for c in remote if c not in local)
        out["targets"][t] = {
            "remote_dossiers": len(remote),
            "equal": sum(1 for c, d in local.items() if remote.get(c) == d),
            "missing": missing,
            "differing": differing,
            "extra": extra,
            "duplicates": stats.get("duplicates"),
            "resends": stats.get("resends"),
            "ok": missing == 0 and differing == 0 and extra == 0 and stats.get("duplicates") == 0,
        }
    out["ok"] = bool(out["targets"]) and all(v["ok"] for v in out["targets"].values())
    return out


# -- the report ----------------------------------------------------------------------------------------
def rows_of(result: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for t, r in result["targets"].items():
        bounded = not r["done"]
        # A run that finished counts the whole backlog; one cut short counts what got acknowledged.
        count = result["dossiers"] if r["done"] else r["acked_in_calls"]
        seconds = r["seconds"]
        yield {
            "run": result["run"],
            "target": t,
            "dossiers": count,
            "seconds": seconds,
            "rate": round(count / seconds, 1) if seconds else 0.0,
            "done": r["done"],
            "time_bounded": bounded,
            "push_calls": r["push_calls"],
            "in_push_s": r["in_push_s"],
            "node_cpu_s": result["cpu_s"],
            "standin_cpu_s": result["standin_cpu_s"].get(t),
            "other_cpu_s": result["other_cpu_s"],
            "pending": r["pending"],
            "dead": r["dead"],
            "parked": r["parked"],
        }


def evaluate(
    rows: list[dict[str, Any]], verification: dict[str, Any] | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    by = {(r["run"], r["target"]): r for r in rows}
    ratios: dict[str, float | None] = {}
    for t in TARGETS:
        b, u = by.get(("both", t)), by.get(("unbatched", t))
        ratios[t] = round(b["rate"] / u["rate"], 1) if b and u and u["rate"] else None
    goals: list[dict[str, Any]] = []
    for t in TARGETS:
        b = by.get(("both", t))
        rate = b["rate"] if b and b["done"] else None
        goals.append(
            {
                "goal": f"{t}: >= {GOAL_RATE:,.0f} dossiers/s while draining both",
                "value": rate,
                "met": rate is not None and rate >= GOAL_RATE,
            }
        )
    for t in TARGETS:
        ratio = ratios[t]
        goals.append(
            {
                "goal": f"{t}: batched >= {GOAL_RATIO:g}x unbatched",
                "value": ratio,
                "met": ratio is not None and ratio >= GOAL_RATIO,
            }
        )
    goals.append(
        {
            "goal": "both: every digest equal on each stand-in, 0 duplicates",
            "value": None,
            "met": bool(verification and verification["ok"]),
        }
    )
    return ratios, goals


def print_report(report: dict[str, Any]) -> None:
    b = report["backlog"]
    print(
        f"backlog: {b['dossiers']:,} dossiers ({b['extra_steps']:,} with an extra step), "
        f"journal head {report['journal_head']:,}; unbatched sample: first {report['sample']:,} dossiers; "
        f"built in {b['seconds']} s (not measured)"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average {report['loadavg_start']} at start")
    print()
    head = (
        "run",
        "target",
        "dossiers",
        "seconds",
        "dossiers/s",
        "push calls",
        "in push s",
        "node CPU s",
        "stand-in CPU s",
        "other CPU s",
    )
    table = [head]
    for r in report["rows"]:
        note = "" if r["done"] else " (time-bounded)"
        table.append(
            (
                r["run"],
                r["target"],
                f"{r['dossiers']:,}{note}",
                f"{r['seconds']:.2f}",
                f"{r['rate']:,.0f}",
                str(r["push_calls"]),
                f"{r['in_push_s']:.2f}",
                f"{r['node_cpu_s']:.2f}",
                f"{r['standin_cpu_s']:.2f}",
                f"{r['other_cpu_s']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("push calls / in push s: Replicator -> adapter push() calls and the wall time spent inside them;")
    print("node / stand-in / other CPU s: CPU seconds of the node process (shared by both targets in 'both' and")
    print("'unbatched'), of that target's stand-in, and of everything else on the machine during the run (other")
    print("jobs, and kernel work not charged to a process)")
    print()
    for t, ratio in report["ratios"].items():
        print(f"ratio batched/unbatched, {t}: {ratio if ratio is not None else 'n/a'}x")
    v = report.get("verification")
    if v is not None:
        print()
        print(f"check after 'both': node holds {v['node_dossiers']:,} dossiers")
        for t, c in v["targets"].items():
            print(
                f"  {t}: {c['equal']:,} digests equal, {c['missing']} missing, {c['differing']} differing, "
                f"{c['extra']} extra; duplicates {c['duplicates']}, resends {c['resends']} -> "
                f"{'OK' if c['ok'] else 'FAILED'}"
            )
    print()
    print("targets:")
    for g in report["goals"]:
        value = "" if g["value"] is None else f" (is {g['value']:,})"
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}{value}")
    print(f"all targets met: {'yes' if report['met'] else 'no'}")
    if report.get("profile"):
        print()
        print("profile of the node process during a drain of both targets (separate run, cProfile, event-loop thread):")
        print(report["profile"]["node"])
        for t, text in report["profile"].get("standins", {}).items():
            print(f"profile of the {t} stand-in during that run:")
            print(text)


# -- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dossiers", type=int, default=20000, help="backlog size (default 20000)")
    parser.add_argument("--sample", type=int, default=1000, help="dossiers for the unbatched run (default 1000)")
    parser.add_argument("--quick", action="store_true", help="3,000 dossiers and a 500-dossier unbatched sample")
    parser.add_argument("--run-limit", type=float, default=60.0, help="seconds per batched drain before giving up")
    parser.add_argument("--unbatched-limit", type=float, default=40.0, help="seconds for the unbatched run")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--profile", action="store_true", help="add a profiled drain of both targets")
    args = parser.parse_args(argv)
    if args.quick:
        args.dossiers, args.sample = 3000, 500
    args.sample = min(args.sample, args.dossiers)
    if args.dossiers < 1:
        parser.error("--dossiers must be at least 1")

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    work = Path(tempfile.mkdtemp(prefix="wardsync-replicate-"))
    started = time.monotonic()
    try:

        def say(message: str) -> None:
            # Progress goes to stderr with --json, so stdout is the JSON document alone.
            print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

        load_start = loadavg()
        say(f"building a backlog of {args.dossiers:,} dossiers ...")
        templates, backlog = build_templates(work, [args.sample, args.dossiers])
        full, sample = templates[args.dossiers], templates[args.sample]
        results: list[dict[str, Any]] = []
        plan: list[tuple[str, Path, tuple[str, ...], dict[str, Any]]] = [
            ("both", full, TARGETS, {"verify": True}),
            ("unbatched", sample, TARGETS, {"unbatched": True}),
            ("national only", full, ("national",), {}),
            ("city only", full, ("city",), {}),
        ]
        for name, template, targets, kw in plan:
            say(f"run {name} ...")
            limit = args.unbatched_limit if kw.get("unbatched") else args.run_limit
            results.append(run_drain(name, work, template, targets, time_limit=limit, **kw))
        profile: dict[str, Any] | None = None
        if args.profile:
            say("profiled run of both ...")
            prof = run_drain("profiled", work, full, TARGETS, time_limit=args.run_limit, profile=True)
            profile = {
                "node": prof.get("profile", ""),
                "node_cumulative": prof.get("profile_cumulative", ""),
                "standins": prof.get("standin_profiles", {}),
                "run": {k: v for k, v in prof.items() if not k.startswith(("profile", "standin_profiles"))},
            }
        rows = [row for r in results for row in rows_of(r)]
        verification = results[0].get("verification")
        ratios, goals = evaluate(rows, verification)
        report: dict[str, Any] = {
            "backlog": backlog,
            "journal_head": results[0]["journal_head"],
            "sample": args.sample,
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "rows": rows,
            "ratios": ratios,
            "verification": verification,
            "goals": goals,
            "met": all(g["met"] for g in goals),
            "runs": [{k: v for k, v in r.items() if k != "verification"} for r in results],
            "total_seconds": round(time.monotonic() - started, 1),
        }
        if profile is not None:
            report["profile"] = profile
        if args.json:
            print(json.dumps(report, ensure_ascii=False, indent=2))
        else:
            print()
            print_report(report)
            print(f"\ntotal wall time {report['total_seconds']} s")
        return 0
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
