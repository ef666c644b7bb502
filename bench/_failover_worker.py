"""Many real nodes in one asyncio loop, reporting failover transitions, for ``bench/failover.py``.

    python bench/_failover_worker.py --spec SPEC.json

``SPEC.json`` lists the nodes (unit code, agency code, data directory), the two target URLs and the
``[failover]`` overrides. Each node is a real :class:`node.app.Node` (its own SQLite store, its own HTTP
client session, probes, breakers and controller), without its HTTP server. The worker writes JSON lines
to stdout, timestamps in ``time.monotonic()`` seconds (CLOCK_MONOTONIC, the same clock in every process of
the machine), and reads commands from stdin:

- out ``{"type": "ready", ...}`` once every node runs; ``{"type": "breaker", ...}`` for every breaker
  transition (time: the breaker's own ``changed_at``); ``{"type": "active", ...}`` when a node's
  ``controller.active`` changes (polled every ``poll_s``); ``{"type": "status", ...}`` every
  ``status_s`` (each node's active source and breaker states, probe count, event-loop lag samples);
  ``{"type": "describe", ...}`` on request; ``{"type": "final", ...}`` after every node closed.
- in ``describe TAG UNIT,UNIT,...`` and ``stop`` (end of stdin also stops).

Logs (structlog, level warning) go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

LAG_TICK_S = 0.05
START_CONCURRENCY = 12


class Out:
    """The protocol stream: the real stdout, one JSON object per line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def send(self, msg: dict[str, Any]) -> None:
        self._stream.write(json.dumps(msg, separators=(",", ":")) + "\n")
        self._stream.flush()


def node_config(spec: dict[str, Any], n: dict[str, str]) -> Config:
    agency = n["agency"]
    return load_config(
        env={},
        overrides={
            "node": {"unit": n["unit"], "agency_code": agency, "listen": "127.0.0.1:0", "data_dir": n["data_dir"]},
            "targets.national": {
                "url": spec["national_url"],
                "username": DEMO_USERNAME,
                "password": DEMO_PASSWORD,
                "dstcode": agency,
                "madonvi": agency,
            },
            "targets.city": {
                "url": spec["city_url"],
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
            },
            "failover": spec["failover"],
        },
    )


class Worker:
    def __init__(self, spec: dict[str, Any], out: Out) -> None:
        self.spec = spec
        self.out = out
        self.nodes: dict[str, Node] = {}
        self.last_active: dict[str, str | None] = {}
        self.stop = asyncio.Event()
        self.lags: list[float] = []
        self.start_failures: list[dict[str, str]] = []
        self.owned = {n["unit"] for n in spec["nodes"]}

    # -- nodes
    async def run_node(self, n: dict[str, str], started: asyncio.Future[None], sem: asyncio.Semaphore) -> None:
        unit = n["unit"]
        try:
            async with sem:
                node = Node(node_config(self.spec, n))
                await node.__aenter__()
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
        poll_s = float(self.spec["poll_s"])
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
        status_s = float(self.spec["status_s"])
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
                "startup_s": round(time.monotonic() - t0, 3),
                "units": sorted(self.nodes),
                "failed": self.start_failures,
                "active": {u: n.controller.active if n.controller else None for u, n in self.nodes.items()},
            }
        )
        helpers = [
            asyncio.create_task(self.poll_active()),
            asyncio.create_task(self.measure_lag()),
            asyncio.create_task(self.report_status()),
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
    configure("warning", "json", stream=sys.stderr)
    asyncio.run(Worker(spec, out).run())
    # The stdin reader thread may still be blocked in readline; do not wait for it.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
