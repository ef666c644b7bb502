"""GET /metrics: Prometheus names and values from a running node, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from node import __version__
from node.auth import rule_of
from node.config import load_config
from node.metrics import direction, metrics_handler
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake
from tests.upstreams import running_upstreams, target_overrides

FAST = {"probe_interval_s": 0.2, "probe_timeout_s": 0.5, "open_base_s": 0.5, "open_cap_s": 2.0, "evaluate_s": 0.1}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, labels); the parser rejects malformed text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


async def scrape_until(
    session: aiohttp.ClientSession, url: str, ok: Callable[[Samples], bool], within_s: float = 20.0
) -> Samples:
    deadline = time.monotonic() + within_s
    while True:
        samples = await scrape(session, url)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.1)


def replicated(tmp_path: Path, ups: Any) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    return load_config(
        env={},
        overrides={
            "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "n")},
            **overrides,
            "failover": {**FAST, "hold_s": 0.5},
        },
    )


class TestMetrics:
    """The exposition covers intake, push, lag, breakers, the active source and failovers."""

    async def test_intake_push_and_lag(self, tmp_path: Path) -> None:
        """Three accepted and one rejected dossier; both targets drain to zero lag with ok push calls."""
        async with running_upstreams(tmp_path) as ups, running_node(replicated(tmp_path, ups)) as (node, url, s):
            for i in range(3):
                async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(ChuHoSo=f"Nguyễn Văn {i}")) as r:
                    assert r.status == 201
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(ChuHoSo="")) as r:
                assert r.status == 422

            def drained(m: Samples) -> bool:
                return all(
                    value(m, "wardsync_replication_lag_records", target=t) == 0
                    and value(m, "wardsync_replication_cursor", target=t) >= 3
                    for t in ("national", "city")
                )

            m = await scrape_until(s, url, drained)
            assert drained(m)
            assert value(m, "wardsync_journal_head") == node.service.journal_head >= 3
            assert value(m, "wardsync_intake_total", outcome="accepted") == 3
            assert value(m, "wardsync_intake_total", outcome="rejected") == 1
            assert value(m, "wardsync_intake_duration_seconds_count") == 4
            for t in ("national", "city"):
                assert value(m, "wardsync_push_requests_total", target=t, outcome="ok") >= 1
                assert value(m, "wardsync_push_records_total", target=t, outcome="acked") >= 3
                assert value(m, "wardsync_push_duration_seconds_count", target=t) >= 1
                assert value(m, "wardsync_replication_lag_seconds", target=t) == 0
                assert value(m, "wardsync_breaker_state", target=t, state="closed") == 1
                assert value(m, "wardsync_breaker_state", target=t, state="open") == 0
                assert value(m, "wardsync_dead_letters", target=t, state="dead") == 0
                assert value(m, "wardsync_push_last_success_timestamp_seconds", target=t) > 0
            assert value(m, "wardsync_active_source", source="national") == 1
            assert value(m, "wardsync_active_source", source="city") == 0
            assert value(m, "wardsync_offline") == 0
            assert value(m, "wardsync_ready") == 1
            assert value(m, "wardsync_store_size_bytes") > 0
            assert value(m, "wardsync_store_filesystem_avail_bytes") > 0
            assert value(m, "wardsync_node_info", unit=UNIT, version=__version__) == 1

    async def test_breaker_failover_and_failback(self, tmp_path: Path) -> None:
        """A forced switch counts a failover, releasing it a failback; a down target's breaker reads open."""
        async with running_upstreams(tmp_path) as ups, running_node(replicated(tmp_path, ups)) as (_node, url, s):
            async with s.post(f"{url}/api/v1/admin/failover", json={"primary": "city", "ttl_s": 60}) as r:
                assert r.status == 200
            m = await scrape(s, url)
            assert value(m, "wardsync_failovers_total", direction="failover") == 1
            assert value(m, "wardsync_failovers_total", direction="failback") == 0
            assert value(m, "wardsync_active_source", source="city") == 1
            assert value(m, "wardsync_failover_forced") == 1
            async with s.post(f"{url}/api/v1/admin/failover", json={"primary": "auto"}) as r:
                assert r.status == 200
            # Back to the primary after it has been healthy for hold_s with its backlog drained.
            m = await scrape_until(s, url, lambda m: value(m, "wardsync_active_source", source="national") == 1)
            assert value(m, "wardsync_failovers_total", direction="failback") == 1
            assert value(m, "wardsync_active_source", source="national") == 1

            await ups.fault("national", mode="down")
            m = await scrape_until(
                s, url, lambda m: value(m, "wardsync_breaker_state", target="national", state="open") == 1
            )
            assert value(m, "wardsync_breaker_state", target="national", state="open") == 1
            assert value(m, "wardsync_breaker_state", target="national", state="closed") == 0
            m = await scrape_until(s, url, lambda m: value(m, "wardsync_active_source", source="city") == 1)
            assert value(m, "wardsync_failovers_total", direction="failover") == 2

    async def test_failed_push_calls_are_counted(self, tmp_path: Path) -> None:
        """With the city system down, its push calls count as errors and the dossier stays in its lag."""
        async with running_upstreams(tmp_path) as ups:
            await ups.fault("city", mode="down")
            async with running_node(replicated(tmp_path, ups)) as (_node, url, s):
                async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                    assert r.status == 201
                m = await scrape_until(
                    s, url, lambda m: value(m, "wardsync_push_requests_total", target="city", outcome="error") >= 1
                )
                assert value(m, "wardsync_push_requests_total", target="city", outcome="error") >= 1
                assert value(m, "wardsync_push_records_total", target="city", outcome="failed") >= 1
                assert value(m, "wardsync_replication_lag_records", target="city") >= 1
                assert value(m, "wardsync_replication_lag_seconds", target="city") > 0


class TestIsolation:
    """Every node has its own registry: two nodes in one process never mix their numbers."""

    async def test_two_nodes_one_process(self, tmp_path: Path) -> None:
        async with (
            running_node(make_config(tmp_path / "a")) as (_a, url_a, sa),
            running_node(make_config(tmp_path / "b")) as (_b, url_b, sb),
        ):
            async with sa.post(f"{url_a}/api/v1/dossiers", json=valid_intake()) as r:
                assert r.status == 201
            a, b = await scrape(sa, url_a), await scrape(sb, url_b)
            assert value(a, "wardsync_intake_total", outcome="accepted") == 1
            assert value(b, "wardsync_intake_total", outcome="accepted") == 0
            assert value(a, "wardsync_journal_head") == 1
            assert value(b, "wardsync_journal_head") == 0


class TestAccess:
    """Operators and read-only monitors may scrape; the rule is on the handler."""

    def test_roles(self) -> None:
        assert rule_of(metrics_handler) == frozenset({"operator", "read-only"})

    def test_direction(self) -> None:
        assert direction("national", "city", "national") == "failover"
        assert direction("city", "national", "national") == "failback"
        assert direction(None, "national", "national") == "failback"
        assert direction("national", None, "national") == "offline"
        assert direction(None, "city", "national") == "failover"
