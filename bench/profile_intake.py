"""Where the node's intake time goes.

    .venv/bin/python bench/profile_intake.py [--seconds 5] [--warmup 2] [--clients 32] [--top 25] [--out F.prof]
    .venv/bin/python bench/profile_intake.py --breakdown

Runs a node in this process (``node.app.Node`` served by an aiohttp ``AppRunner`` set up as
``node.app.serve`` does; config from ``wardsync init --unit 26743 --agency-code 000.00.17.H29``, fresh
data dir in a temporary directory) and drives it with the benchmark's load generator (``bench/_load.py``,
a separate process).

Default: cProfile is switched on for exactly the measurement window and the top functions are printed by
cumulative and by total (own) time. cProfile sees only the event-loop thread, which is where the node
does all of its Python work (HTTP, validation, the Doc, JSON, the group-commit batch); the SQLite calls
run in aiosqlite's worker threads and show up here only as the loop waiting for their results. The CPU
time of each kind of thread over the window is printed too, so the two can be told apart.

``--breakdown``: no profiler (so no profiler overhead); instead selected functions of the request path
are wrapped with timers and their time per call and per accepted request is printed, together with the
group-commit batch sizes and the number of SQLite round trips per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import io
import json
import os
import pstats
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
UNIT = "26743"
AGENCY = "000.00.17.H29"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_ticks() -> dict[int, int]:
    ticks: dict[int, int] = {}
    pid = os.getpid()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


# -- timers for --breakdown ----------------------------------------------------------------------------
class Timers:
    def __init__(self) -> None:
        self.active = False
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.kind: dict[str, str] = {}
        self._gc_start = 0.0
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if not self.active:
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            label = f"garbage collection gen {info.get('generation')}"
            self.kind.setdefault(label, "pause")
            self.seconds[label] += time.perf_counter() - self._gc_start
            self.calls[label] += 1

    def wrap_sync(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        self.kind[label] = "cpu"

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            if not self.active:
                return fn(*a, **kw)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(owner, attr, wrapper)

    def wrap_async(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)
        self.kind[label] = "wall"

        @functools.wraps(fn)
        async def wrapper(*a: Any, **kw: Any) -> Any:
            if not self.active:
                return await fn(*a, **kw)
            t = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(owner, attr, wrapper)


def install_timers(timers: Timers) -> None:
    """Wrap the request path; must run before the Node (and so its routes) is built."""
    import aiosqlite.core

    from node import api, service
    from sync import doc as ydoc

    timers.wrap_async(api, "create_dossier", "handler create_dossier (wall)")
    timers.wrap_async(api, "read_json", "  read_json: body + json.loads + depth (wall)")
    timers.wrap_sync(api, "validate_intake", "  validate_intake")
    timers.wrap_async(service.DossierService, "_process", "batch _process (wall)")
    timers.wrap_sync(service.DossierService, "_apply_intake", "  _apply_intake (per op)")
    timers.wrap_sync(ydoc, "new_doc", "    ydoc.new_doc")
    timers.wrap_sync(ydoc, "change", "    ydoc.change (Y transaction + update)")
    timers.wrap_sync(service, "materialise", "    materialise")
    timers.wrap_sync(service, "_digest", "    digest (canonical json + sha256)")
    timers.wrap_sync(service, "_dumps", "    _dumps (record/conflicts json)")
    timers.wrap_async(service.DossierService, "_commit", "  _commit (wall, incl. fsync)")
    timers.wrap_async(aiosqlite.core.Connection, "_execute", "    aiosqlite round trips (wall)")
    timers.wrap_async(aiosqlite.core.Connection, "commit", "    aiosqlite commit (wall)")


# -- running -------------------------------------------------------------------------------------------
async def drive(args: argparse.Namespace, tmp: Path, profiler: cProfile.Profile | None, timers: Timers | None
                ) -> dict[str, Any]:
    from aiohttp import web

    from node.app import Node
    from node.cli import main as cli_main
    from node.config import load_config
    from node.logs import configure

    port = free_port()
    toml = tmp / "wardsync.toml"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main(["init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(toml),
                       "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp / "data")])
    if rc != 0:
        raise RuntimeError("wardsync init failed")
    config = load_config(toml)
    configure(config.log.level, config.log.format)

    out: dict[str, Any] = {}
    async with Node(config) as node:
        runner = web.AppRunner(node.app, handle_signals=False, access_log=None,
                               shutdown_timeout=config.node.shutdown_timeout_s)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True).start()
            load = await asyncio.create_subprocess_exec(
                sys.executable, str(BENCH / "_load.py"), "--url", f"http://127.0.0.1:{port}/api/v1/dossiers",
                "--clients", str(args.clients), "--warmup", str(args.warmup), "--seconds", str(args.seconds),
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
            )
            writer = node.service.writer
            try:
                assert load.stdout is not None
                async with asyncio.timeout(args.warmup + args.seconds + 30):
                    while line := (await load.stdout.readline()).decode().strip():
                        if line == "MARK start":
                            out["ticks0"], out["t0"] = thread_ticks(), time.perf_counter()
                            out["batches0"], out["items0"] = writer.batches, writer.items
                            if profiler is not None:
                                profiler.enable()
                            if timers is not None:
                                timers.active = True
                        elif line == "MARK end":
                            if profiler is not None:
                                profiler.disable()
                            if timers is not None:
                                timers.active = False
                            out["ticks1"], out["t1"] = thread_ticks(), time.perf_counter()
                            out["batches1"], out["items1"] = writer.batches, writer.items
                        elif line.startswith("{"):
                            out["load"] = json.loads(line)
                    await load.wait()
            finally:
                if load.returncode is None:
                    load.kill()
                    await load.wait()
        finally:
            await runner.cleanup()
    return out


def report_common(out: dict[str, Any]) -> None:
    load = out.get("load") or {}
    print(f"load: {load.get('requests')} accepted in {load.get('seconds')} s = {load.get('accepts_per_s')}/s, "
          f"p50 {load.get('p50_ms')} ms, p99 {load.get('p99_ms')} ms, statuses {load.get('statuses')}, "
          f"errors {load.get('errors')}")
    if "ticks1" in out:
        window = out["t1"] - out["t0"]
        pid = os.getpid()
        delta = {tid: out["ticks1"][tid] - out["ticks0"].get(tid, 0) for tid in out["ticks1"]}
        loop = delta.get(pid, 0) / CLK_TCK / window * 100
        other = sum(v for tid, v in delta.items() if tid != pid) / CLK_TCK / window * 100
        batches = out["batches1"] - out["batches0"]
        items = out["items1"] - out["items0"]
        print(f"node CPU over the window: event-loop thread {loop:.0f}%, other threads (SQLite workers) {other:.0f}% "
              f"of one core")
        print(f"group commit: {batches} batches, {items} ops, {items / max(1, batches):.1f} ops per batch, "
              f"{batches / window:.0f} batches/s")
        out["window"], out["batches"], out["items"] = window, batches, items


def report_breakdown(out: dict[str, Any], timers: Timers) -> None:
    n = max(1, (out.get("load") or {}).get("requests") or out.get("items", 1))
    window = out.get("window", 1.0)
    print()
    print("time per call and per accepted request over the measured window "
          "(cpu = on the event loop; wall = includes waiting; pause = collector pauses)")
    print(f"{'':<48} {'calls':>8} {'us/call':>9} {'us/req':>8} {'% window':>9}")
    for label in timers.kind:
        calls, secs = timers.calls.get(label, 0), timers.seconds.get(label, 0.0)
        if not calls:
            continue
        print(f"{label:<48} {calls:>8} {1e6 * secs / calls:>9.0f} {1e6 * secs / n:>8.0f} "
              f"{100 * secs / window:>8.0f}%  {timers.kind[label]}")
    batches = max(1, out.get("batches", 1))
    hops = timers.calls.get("    aiosqlite round trips (wall)", 0)
    print(f"aiosqlite round trips per batch: {hops / batches:.1f}")


def report_profile(profiler: cProfile.Profile, top: int, dump: str | None) -> None:
    if dump:
        profiler.dump_stats(dump)
        print(f"profile written to {dump} (open with: python -m pstats {dump})")
    for key, title in (("cumulative", "cumulative time"), ("tottime", "total (own) time")):
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.strip_dirs().sort_stats(key).print_stats(top)
        text = buf.getvalue()
        # Drop pstats' preamble up to the column header.
        text = text[text.find("   ncalls"):] if "   ncalls" in text else text
        print()
        print(f"== top {top} by {title} (event-loop thread, measurement window only) ==")
        print(text.rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="profiled seconds (default 5)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, not profiled (default 2)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", help="also write the raw profile to this file")
    parser.add_argument("--breakdown", action="store_true", help="timers on the request path instead of cProfile")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    profiler = None if args.breakdown else cProfile.Profile()
    timers = Timers() if args.breakdown else None
    if timers is not None:
        install_timers(timers)
    with tempfile.TemporaryDirectory(prefix="wardsync-profile-") as tmp:
        out = asyncio.run(drive(args, Path(tmp), profiler, timers))
    mode = "timers, no profiler" if args.breakdown else "under cProfile (slower than unprofiled)"
    print(f"node {UNIT} in-process, {args.clients} clients, "
          f"{args.warmup:g} s warm-up + {args.seconds:g} s measured, {mode}")
    report_common(out)
    if timers is not None:
        report_breakdown(out, timers)
    if profiler is not None:
        report_profile(profiler, args.top, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
