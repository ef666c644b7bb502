"""Many real nodes on one machine: worker processes that each run a share of the fleet in one event loop.

A process per node does not fit (about 40 MiB each), so nodes share worker processes; killing a worker
(SIGKILL) takes all its nodes down at once, like a power cut in a server room, and a restart brings them
back on the same data directories. Used by ``bench/failover.py`` and by the drills (``simulations/drill.py``).

    python -m simulations.fleet --spec SPEC.json

``SPEC.json`` lists the nodes (unit, agency code, data directory), the two target URLs, ``[failover]`` and
``[replication]`` overrides and what to observe. Each node is a real :class:`node.app.Node` with its own
SQLite store; with ``"serve": true`` each also serves its HTTP API on a loopback port. The worker writes JSON
lines to stdout (times in ``time.monotonic()`` seconds, one clock for every process of the machine) and
reads commands from stdin:

- out: ``ready`` once every node runs (with each node's URL and a drill token when serving), ``breaker`` for
  every breaker transition, ``active`` when a node's active source changes, ``status`` every ``status_s``
  (per node: active source, breaker states, whether each target answered, switches; probe count; event-loop
  lag), ``lag`` every ``lag_s`` when set (per node and target: records and seconds behind, as
  ``/api/v1/status`` reports them), ``describe`` on request, ``final`` after every node closed.
- in: ``describe TAG UNIT,...``, ``skew SECONDS UNIT,...`` (shift those nodes' clocks) and ``stop``.

The module also holds the process plumbing the fleet's drivers share: spawning and stopping children,
the stand-ins and the chaos proxy as processes, CPU and memory of the process tree from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from failover.breaker import Breaker, BreakerState
from node.app import Node
from node.config import (
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_PASSWORD,
    DEMO_USERNAME,
    Config,
    load_config,
)
from node.logs import configure

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
# ``python -m node``: the wardsync command, also where no console script is on the PATH.
WARDSYNC = [str(PYTHON), "-m", "node"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

LAG_TICK_S = 0.05
START_CONCURRENCY = 12
DRILL_ROLES = ("clerk", "operator", "drill")

_live: set[subprocess.Popen[Any]] = set()


# -- processes ---------------------------------------------------------------------------------------
def _child_setup() -> None:
    # PR_SET_PDEATHSIG: a child still running when its parent dies gets SIGTERM.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def spawn(cmd: list[str], *, stdout: Any, stderr: Any, stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[Any]:
    """A child in its own session (a Ctrl-C reaches the driver only, which then stops everything in order)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=stdout, stderr=stderr, stdin=stdin, start_new_session=True, preexec_fn=_child_setup
    )
    _live.add(proc)
    return proc


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    _live.discard(proc)


def stop_all(timeout: float = 5.0) -> None:
    """Stop every child this module spawned that is still running."""
    procs = list(_live)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        _live.discard(proc)


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_line(out: Path, proc: subprocess.Popen[Any], marker: str, err: Path, timeout: float = 30.0) -> str:
    """The first line of ``out`` holding ``marker``, once the process printed it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            for line in out.read_text().splitlines():
                if marker in line:
                    return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not start:\n{tail(err)}")


def http(method: str, url: str, body: Any = None, timeout: float = 10.0, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


class StandIn:
    """``wardsync sim national|city`` in its own process, on a loopback port (0: a free one)."""

    def __init__(self, system: str, base: Path, port: int = 0) -> None:
        self.system = system
        self.dir = base / f"{system}-data"
        self.out = base / f"{system}.out"
        self.err = base / f"{system}.err"
        cmd = [*WARDSYNC, "sim", system, "--listen", f"127.0.0.1:{port}", "--data-dir", str(self.dir)]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = spawn(cmd, stdout=out, stderr=err)
        line = wait_line(self.out, self.proc, "listening on http://", self.err)
        self.url = line.split("listening on ", 1)[1].strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        stop(self.proc)


class Proxy:
    """``wardsync proxy`` (the chaos proxy) in its own process, in front of ``upstream``."""

    def __init__(self, upstream_url: str, base: Path, name: str = "proxy") -> None:
        hostport = upstream_url.split("://", 1)[1].rstrip("/")
        self.out = base / f"{name}.out"
        self.err = base / f"{name}.err"
        cmd = [*WARDSYNC, "proxy", "--upstream", hostport]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = spawn(cmd, stdout=out, stderr=err)
        line = wait_line(self.out, self.proc, "chaos proxy listening on", self.err)
        # "chaos proxy listening on http://H:P -> H:P (control http://H:P)"
        self.url = line.split("listening on ", 1)[1].split(" ", 1)[0]
        self.control = line.rsplit("(control ", 1)[1].rstrip(")").strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def set(self, spec: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = http("POST", f"{self.control}/mode", spec)
        return answer

    def clear(self) -> dict[str, Any]:
        answer: dict[str, Any] = http("DELETE", f"{self.control}/mode")
        return answer

    def close(self) -> None:
        stop(self.proc)


class WorkerProc:
    """One worker process of the fleet; every JSON line it prints goes to ``on_message(index, msg)``."""

    def __init__(
        self,
        index: int,
        spec_path: Path,
        log_path: Path,
        on_message: Callable[[int, dict[str, Any]], None],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.index = index
        self.log_path = log_path
        self.on_message = on_message
        self.on_error = on_error
        with log_path.open("a") as err:
            self.proc = spawn(
                [str(PYTHON), "-m", "simulations.fleet", "--spec", str(spec_path)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.PIPE,
            )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                if self.on_error is not None:
                    self.on_error(f"worker {self.index}: not JSON: {raw[:200]!r}")
                continue
            self.on_message(self.index, msg)

    def send(self, line: str) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.proc.stdin.write((line + "\n").encode())
                self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, like a power cut."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        _live.discard(self.proc)
        self.thread.join(2.0)

    def close(self, timeout: float = 20.0) -> None:
        self.send("stop")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc, timeout=5.0)
        stop(self.proc)
        self.thread.join(2.0)


# -- measuring ---------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def tree(root: int) -> list[int]:
    """``root`` and every process descending from it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def status_kb(pid: int, key: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), 0 if the process is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


class TreeMemory:
    """Peak RSS of a process tree, sampled by a thread every ``every_s``."""

    def __init__(self, root: int | None = None, every_s: float = 0.25) -> None:
        self.root = os.getpid() if root is None else root
        self.every_s = every_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeMemory:
        self._thread.start()
        return self

    def sample(self) -> int:
        rss = sum(status_kb(p, "VmRSS") for p in tree(self.root))
        self.peak_kb = max(self.peak_kb, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


# -- node configuration ------------------------------------------------------------------------------
def agency_code(index: int) -> str:
    """Synthetic but valid and distinct agency codes (Decision 20/2020 shape, HCMC's H29)."""
    return f"000.{20 + index // 100:02d}.{index % 100:02d}.H29"


def node_config(spec: dict[str, Any], n: dict[str, str]) -> Config:
    agency = n["agency"]
    return load_config(
        env={},
        overrides={
            "node": {
                **spec.get("node", {}),
                "unit": n["unit"],
                "agency_code": agency,
                "listen": "127.0.0.1:0",
                "data_dir": n["data_dir"],
            },
            "targets.national": {
                "url": spec["national_url"],
                "username": DEMO_USERNAME,
                "password": DEMO_PASSWORD,
                "dstcode": agency,
                "madonvi": agency,
                **spec.get("national", {}),
            },
            "targets.city": {
                "url": spec["city_url"],
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
                **spec.get("city", {}),
            },
            "failover": spec.get("failover", {}),
            "replication": spec.get("replication", {}),
        },
    )


# -- the worker --------------------------------------------------------------------------------------
class Out:
    """The protocol stream: the real stdout, one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, msg: dict[str, Any]) -> None:
        self._stream.write(json.dumps(msg, separators=(",", ":")) + "\n")
        self._stream.flush()


class FleetWorker:
    """Runs a share of the fleet in one event loop and reports what happens to it."""

    def __init__(self, spec: dict[str, Any], out: Out) -> None:
        self.spec = spec
        self.out = out
        self.nodes: dict[str, Node] = {}
        self.urls: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.last_active: dict[str, str | None] = {}
        self.stop = asyncio.Event()
        self.lags: list[float] = []
        self.start_failures: list[dict[str, str]] = []
        self.owned = {n["unit"] for n in spec["nodes"]}

    # -- nodes
    async def run_node(self, n: dict[str, str], started: asyncio.Future[None], sem: asyncio.Semaphore) -> None:
        unit = n["unit"]
        runner: web.AppRunner | None = None
        try:
            async with sem:
                node = Node(node_config(self.spec, n))
                skew = float(self.spec.get("skew_s", {}).get(unit, 0.0))
                if skew:
                    node.clock.offset = timedelta(seconds=skew)
                await node.__aenter__()
                if self.spec.get("serve"):
                    runner = web.AppRunner(node.app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
                    await runner.setup()
                    site = web.TCPSite(runner, "127.0.0.1", 0)
                    await site.start()
                    self.urls[unit] = f"http://127.0.0.1:{runner.addresses[0][1]}"
                    auth = getattr(node, "auth", None)
                    if auth is not None:
                        self.tokens[unit] = await auth.create_token(list(DRILL_ROLES), name="drill")
        except Exception as exc:
            self.start_failures.append({"unit": unit, "error": f"{type(exc).__name__}: {exc}"})
            started.set_result(None)
            return
        try:
            self.instrument(unit, node)
            self.nodes[unit] = node
            started.set_result(None)
            await self.stop.wait()
        finally:
            if runner is not None:
                await runner.cleanup()
            await node.close()

    def instrument(self, unit: str, node: Node) -> None:
        # Breakers have one listener (the node's); chain ours after it to see every transition exactly.
        for breaker in node.breakers.values():
            inner = breaker._on_change

            def hook(
                name: str, old: BreakerState, new: BreakerState, reason: str, inner: Any = inner, b: Breaker = breaker
            ) -> None:
                self.out.send(
                    {
                        "type": "breaker",
                        "unit": unit,
                        "target": name,
                        "old": old.value,
                        "new": new.value,
                        "t": b.changed_at,
                        "reason": reason,
                    }
                )
                if inner is not None:
                    inner(name, old, new, reason)

            breaker._on_change = hook
        assert node.controller is not None
        self.last_active[unit] = node.controller.active

    # -- observation
    async def poll_active(self) -> None:
        poll_s = float(self.spec.get("poll_s", 0.05))
        while not self.stop.is_set():
            now = time.monotonic()
            for unit, node in list(self.nodes.items()):
                c = node.controller
                if c is None:
                    continue
                active = c.active
                if active != self.last_active.get(unit):
                    ev = c.events[0] if c.events else {}
                    self.out.send(
                        {
                            "type": "active",
                            "unit": unit,
                            "from": self.last_active.get(unit),
                            "to": active,
                            "t": now,
                            "switches": c.switches,
                            "reason": ev.get("reason", "") if ev.get("kind") == "switch" else "",
                        }
                    )
                    self.last_active[unit] = active
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), poll_s)

    async def measure_lag(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append(time.monotonic() - t - LAG_TICK_S)

    async def report_status(self) -> None:
        status_s = float(self.spec.get("status_s", 0.5))
        while not self.stop.is_set():
            nodes = {}
            probes = 0
            for unit, node in list(self.nodes.items()):
                c = node.controller
                nat, city = node.breakers.get("national"), node.breakers.get("city")
                gn, gc = node.guarded.get("national"), node.guarded.get("city")
                nodes[unit] = [
                    None if c is None else c.active,
                    None if nat is None else nat.state.value,
                    None if city is None else city.state.value,
                    bool(gn is not None and gn.last_ok is not None),
                    bool(gc is not None and gc.last_ok is not None),
                    0 if c is None else c.switches,
                ]
                probes += node.prober.probes if node.prober is not None else 0
            lags, self.lags = self.lags, []
            self.out.send(
                {
                    "type": "status",
                    "t": time.monotonic(),
                    "nodes": nodes,
                    "probes": probes,
                    "lag_ms": [round(x * 1000, 1) for x in lags],
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), status_s)

    async def report_replication(self) -> None:
        """Each node's replication lag per target, the figures ``/api/v1/status`` shows."""
        lag_s = float(self.spec.get("lag_s") or 0)
        if lag_s <= 0:
            return

        async def one(node: Node, name: str, rep: Any) -> tuple[str, list[float]] | None:
            with contextlib.suppress(Exception):
                lag = await rep.lag(node.service.journal_head)
                return name, [float(lag["lag_records"]), float(lag["lag_seconds"])]
            return None

        while not self.stop.is_set():
            nodes: dict[str, dict[str, list[float]]] = {}
            # All at once: one after the other, a busy event loop takes minutes to go round a large fleet.
            running = list(self.nodes.items())
            answers = await asyncio.gather(
                *(asyncio.gather(*(one(node, name, rep) for name, rep in node.replicators.items()))
                  for _unit, node in running)
            )
            for (unit, _node), per in zip(running, answers, strict=True):
                nodes[unit] = dict(x for x in per if x is not None)
            self.out.send({"type": "lag", "t": time.monotonic(), "nodes": nodes})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), lag_s)

    def describe(self, tag: str, units: list[str]) -> None:
        now = time.monotonic()
        found: dict[str, Any] = {}
        for unit in units:
            node = self.nodes.get(unit)
            if node is None:
                if unit in self.owned:
                    found[unit] = {"running": False}
                continue
            c = node.controller
            found[unit] = {
                "running": True,
                "active": None if c is None else c.active,
                "switches": None if c is None else c.switches,
                "breakers": {
                    name: {
                        "state": b.state.value,
                        "last_reason": b.last_reason,
                        "open_for_s": round(max(0.0, b.open_until - now), 2),
                        "since_s": round(now - b.changed_at, 2),
                    }
                    for name, b in node.breakers.items()
                },
                "last_error": {name: g.last_error for name, g in node.guarded.items()},
                "events": [] if c is None else c.events[:4],
            }
        self.out.send({"type": "describe", "tag": tag, "t": now, "nodes": found})

    def command(self, line: str | None) -> None:
        """One line from stdin (None: stdin closed)."""
        parts = (line or "").split()
        if line is None or (parts and parts[0] == "stop"):
            self.stop.set()
        elif parts and parts[0] == "describe" and len(parts) >= 2:
            self.describe(parts[1], parts[2].split(",") if len(parts) > 2 and parts[2] else [])
        elif parts and parts[0] == "skew" and len(parts) == 3:
            for unit in parts[2].split(","):
                if unit in self.nodes:
                    self.nodes[unit].clock.offset = timedelta(seconds=float(parts[1]))

    def read_commands(self, loop: asyncio.AbstractEventLoop) -> None:
        # A daemon thread, so that a blocked read never holds up the exit.
        with contextlib.suppress(RuntimeError):  # the loop closed first
            for line in sys.stdin:
                loop.call_soon_threadsafe(self.command, line)
            loop.call_soon_threadsafe(self.command, None)

    # -- main
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        threading.Thread(target=self.read_commands, args=(loop,), daemon=True).start()
        sem = asyncio.Semaphore(START_CONCURRENCY)
        t0 = time.monotonic()
        started = [loop.create_future() for _ in self.spec["nodes"]]
        node_tasks = [
            asyncio.create_task(self.run_node(n, f, sem), name=f"node:{n['unit']}")
            for n, f in zip(self.spec["nodes"], started, strict=True)
        ]
        await asyncio.gather(*started)
        self.out.send(
            {
                "type": "ready",
                "t": time.monotonic(),
                "pid": os.getpid(),
                "startup_s": round(time.monotonic() - t0, 3),
                "units": sorted(self.nodes),
                "failed": self.start_failures,
                "active": {u: n.controller.active if n.controller else None for u, n in self.nodes.items()},
                "urls": self.urls,
                "tokens": self.tokens,
            }
        )
        helpers = [
            asyncio.create_task(self.poll_active()),
            asyncio.create_task(self.measure_lag()),
            asyncio.create_task(self.report_status()),
            asyncio.create_task(self.report_replication()),
        ]
        await self.stop.wait()
        t_stop = time.monotonic()
        for h in helpers:
            h.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        results = await asyncio.gather(*node_tasks, return_exceptions=True)
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.out.send(
            {
                "type": "final",
                "t": time.monotonic(),
                "close_s": round(time.monotonic() - t_stop, 3),
                "close_errors": errors[:5],
                "maxrss_kb": ru.ru_maxrss,
            }
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    # The protocol keeps the real stdout; anything else printing to stdout lands in the log instead.
    out = Out(os.fdopen(os.dup(1), "w", buffering=1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    configure(str(spec.get("log_level", "warning")), "json", stream=sys.stderr)
    asyncio.run(FleetWorker(spec, out).run())
    # The stdin reader thread may still be blocked in readline; do not wait for it.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
