"""Prometheus metrics of one node: ``GET /metrics`` in the text exposition format.

Each node has its own ``CollectorRegistry`` (never the process-global one): drills and tests run many
nodes in one process. Counters and histograms are incremented where things happen (intake, each push
call, each failover switch); gauges are read at scrape time from the node's live state by a custom
collector, after one async refresh of what only the store knows (lag, dead letters).

Names follow Prometheus conventions: a ``wardsync_`` prefix, base units (seconds, bytes) in the name,
``_total`` on counters.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from node import __version__
from node.auth import requires
from node.errors import ApiError
from node.store import StoreError

if TYPE_CHECKING:
    from node.app import Node

BREAKER_STATES = ("closed", "half_open", "open")
RECORD_OUTCOMES = ("acked", "retry", "invalid", "collision", "failed")
# Push calls carry up to batch_size dossiers over a WAN: from a few ms on loopback to the 10 s timeout.
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Intake is one group commit with an fsync: milliseconds, up to seconds on a struggling disk.
INTAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
INTAKE_ROUTE = "/api/v1/dossiers"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def direction(frm: str | None, to: str | None, primary: str) -> str:
    """``failover`` (away from the primary to a backup), ``failback`` (to the primary) or ``offline``."""
    if to is None:
        return "offline"
    return "failback" if to == primary else "failover"


@dataclass
class _Snapshot:
    """What the collector reports, refreshed from the store just before each scrape."""

    lag: dict[str, dict[str, Any]] = field(default_factory=dict)


class NodeMetrics:
    """The registry of one node and the instruments its components report to."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.failovers = Counter(
            "wardsync_failovers",
            "Switches of the active source, by direction (failover, failback, offline).",
            ["direction"],
            registry=self.registry,
        )
        self.push_requests = Counter(
            "wardsync_push_requests",
            "Push calls to an upstream, by target and outcome (ok: all acknowledged, partial, error).",
            ["target", "outcome"],
            registry=self.registry,
        )
        self.push_records = Counter(
            "wardsync_push_records",
            "Dossiers sent in push calls, by target and outcome (acked, retry, invalid, collision, failed).",
            ["target", "outcome"],
            registry=self.registry,
        )
        self.push_duration = Histogram(
            "wardsync_push_duration_seconds",
            "Duration of one push call to an upstream, retries included.",
            ["target"],
            buckets=PUSH_BUCKETS,
            registry=self.registry,
        )
        self.intake = Counter(
            "wardsync_intake",
            "Dossiers offered at POST /api/v1/dossiers, by outcome (accepted, rejected, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.intake_duration = Histogram(
            "wardsync_intake_duration_seconds",
            "Time from request to answer of POST /api/v1/dossiers.",
            buckets=INTAKE_BUCKETS,
            registry=self.registry,
        )
        self._node: Node | None = None
        self._snapshot = _Snapshot()

    def attach(self, node: Node) -> None:
        """Hook into a started node's replicators and controller; register the live-state collector once."""
        first = self._node is None
        self._node = node
        for rep in node.replicators.values():
            rep.on_batch = self.push_batch
            rep.journal_head = lambda: node.service.journal_head
        if node.controller is not None:
            primary = node.controller.primary
            node.controller.on_switch.append(lambda frm, to: self.failovers.labels(direction(frm, to, primary)).inc())
        for target in node.replicators:
            # Series exist from the start at 0, so rate() and alerts see the first increment.
            for outcome in ("ok", "partial", "error"):
                self.push_requests.labels(target, outcome)
            for outcome in RECORD_OUTCOMES:
                self.push_records.labels(target, outcome)
            self.push_duration.labels(target)
        for d in ("failover", "failback", "offline"):
            self.failovers.labels(d)
        for outcome in ("accepted", "rejected", "failed"):
            self.intake.labels(outcome)
        if first:
            self.registry.register(_LiveState(self))

    def push_batch(self, target: str, counts: dict[str, int], seconds: float, failed: bool) -> None:
        """One push call finished: count it and its records, observe its duration."""
        records = sum(counts.values())
        outcome = "error" if failed else ("ok" if counts.get("acked", 0) == records else "partial")
        self.push_requests.labels(target, outcome).inc()
        for name, n in counts.items():
            self.push_records.labels(target, name).inc(n)
        self.push_duration.labels(target).observe(seconds)

    async def refresh(self) -> None:
        """Read from the store what the collector needs; called by the scrape handler."""
        node = self._node
        if node is None:
            return
        head = node.service.journal_head
        self._snapshot = _Snapshot(lag={name: await rep.lag(head) for name, rep in node.replicators.items()})

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    """Gauges read at scrape time from the node's live state."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        # No description up front: the families depend on the node's targets, known only once it runs.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        node = self.metrics._node
        if node is None:
            return
        snap = self.metrics._snapshot
        info = GaugeMetricFamily("wardsync_node_info", "The node's unit and release.", labels=["unit", "version"])
        info.add_metric([node.config.node.unit, __version__], 1)
        yield info
        yield GaugeMetricFamily("wardsync_ready", "1 while the node accepts dossiers.", value=int(node.ready))
        yield GaugeMetricFamily(
            "wardsync_journal_head", "Sequence number of the newest journal entry.", value=node.service.journal_head
        )
        lag_records = GaugeMetricFamily(
            "wardsync_replication_lag_records",
            "Changes not yet acknowledged by the target: journal entries behind its cursor plus retries.",
            labels=["target"],
        )
        lag_seconds = GaugeMetricFamily(
            "wardsync_replication_lag_seconds",
            "Age of the oldest journal entry the target's cursor has not passed.",
            labels=["target"],
        )
        dead = GaugeMetricFamily(
            "wardsync_dead_letters",
            "Dossiers a target gave up on: dead (rejected, collision) or parked (failed too often).",
            labels=["target", "state"],
        )
        cursor = GaugeMetricFamily(
            "wardsync_replication_cursor", "Journal sequence number the target has passed.", labels=["target"]
        )
        last_ok = GaugeMetricFamily(
            "wardsync_push_last_success_timestamp_seconds",
            "Unix time of the last push call the target acknowledged (0: none since start).",
            labels=["target"],
        )
        for name, lag in snap.lag.items():
            lag_records.add_metric([name], lag["lag_records"])
            lag_seconds.add_metric([name], lag["lag_seconds"])
            dead.add_metric([name, "dead"], lag["dead"])
            dead.add_metric([name, "parked"], lag["parked"])
            cursor.add_metric([name], lag["cursor"])
            last_ok.add_metric([name], _epoch(lag["last_ok_at"]))
        yield from (lag_records, lag_seconds, dead, cursor, last_ok)
        breaker = GaugeMetricFamily(
            "wardsync_breaker_state", "1 for the breaker's current state, per target.", labels=["target", "state"]
        )
        for name, b in node.breakers.items():
            for state in BREAKER_STATES:
                breaker.add_metric([name, state], int(b.state.value == state))
        yield breaker
        active = GaugeMetricFamily(
            "wardsync_active_source", "1 for the upstream the node reads from now.", labels=["source"]
        )
        controller = node.controller
        for source in node.breakers:
            active.add_metric([source], int(controller is not None and controller.active == source))
        yield active
        yield GaugeMetricFamily(
            "wardsync_offline",
            "1 when no upstream is usable (intake goes on).",
            value=int(controller is not None and controller.active is None),
        )
        yield GaugeMetricFamily(
            "wardsync_failover_forced",
            "1 while a drill pins the active source.",
            value=int(controller is not None and controller.forced is not None),
        )
        # How far the node's hybrid clock runs ahead of its wall clock: stamps from a node or upstream
        # whose clock is ahead pull it forward (up to the HLC's bound), so a large value means skew.
        skew_ms = max(0, node.service.hlc.last.ms - node.clock.ms())
        yield GaugeMetricFamily(
            "wardsync_clock_skew_seconds",
            "How far the node's hybrid logical clock runs ahead of its wall clock.",
            value=skew_ms / 1000,
        )
        yield from _disk(node)


def _disk(node: Node) -> Iterator[Metric]:
    path = node.config.db_path
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    yield GaugeMetricFamily("wardsync_store_size_bytes", "Size of the store files (database, WAL).", value=size)
    try:
        usage = shutil.disk_usage(path.parent)
    except OSError:
        return
    yield GaugeMetricFamily(
        "wardsync_store_filesystem_avail_bytes", "Free bytes on the store's filesystem.", value=usage.free
    )
    yield GaugeMetricFamily(
        "wardsync_store_filesystem_size_bytes", "Size of the store's filesystem in bytes.", value=usage.total
    )


def _epoch(at: str | None) -> float:
    if not at:
        return 0.0
    from datetime import datetime

    return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics", NodeMetrics)


@requires("operator", "read-only")
async def metrics_handler(request: web.Request) -> web.Response:
    """The node's metrics in the Prometheus text format."""
    m = request.app[METRICS]
    await m.refresh()
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def intake_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every POST /api/v1/dossiers by outcome, whatever the handler answers."""
    if request.method != "POST" or request.path != INTAKE_ROUTE:
        return await handler(request)
    m = request.app[METRICS]
    started = time.perf_counter()
    outcome = "failed"
    try:
        response = await handler(request)
        outcome = _outcome(response.status)
        return response
    except ApiError as err:
        outcome = _outcome(err.status)
        raise
    except web.HTTPException as exc:
        outcome = _outcome(exc.status)
        raise
    except StoreError:
        outcome = "failed"
        raise
    finally:
        m.intake.labels(outcome).inc()
        m.intake_duration.observe(time.perf_counter() - started)


def _outcome(status: int) -> str:
    if status < 400:
        return "accepted"
    return "rejected" if status < 500 else "failed"


def add_routes(app: web.Application, metrics: NodeMetrics) -> None:
    """``GET /metrics`` and the intake instrumentation."""
    app[METRICS] = metrics
    app.middlewares.append(intake_middleware)
    app.router.add_get("/metrics", metrics_handler)
