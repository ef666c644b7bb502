"""Automatic failover between the national portal and the city system, and the drill controls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from node.app import Node
from node.config import load_config
from tests.conftest import AGENCY, UNIT, running_node, valid_intake
from tests.test_replication import post_workload, wait_converged
from tests.upstreams import Upstreams, running_upstreams, target_overrides

FAST = {"probe_interval_s": 0.2, "probe_timeout_s": 0.5, "open_base_s": 0.5, "open_cap_s": 2.0, "evaluate_s": 0.1}


def failover_config(tmp_path: Path, ups: Upstreams, **failover: Any) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    return load_config(
        env={},
        overrides={
            "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "node")},
            **overrides,
            "failover": {**FAST, "hold_s": 1.0, **failover},
        },
    )


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, **failover: Any) -> AsyncIterator[tuple[Node, str, aiohttp.ClientSession, Upstreams]]:
    async with (
        running_upstreams(tmp_path) as ups,
        running_node(failover_config(tmp_path, ups, **failover)) as (node, url, s),
    ):
        yield node, url, s, ups


async def status(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(f"{url}/api/v1/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def until(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    """Seconds until ``check`` holds; fails after ``within_s``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within_s:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


class TestSwitching:
    """The node notices on its own, switches, and comes back without flapping."""

    async def test_primary_down_switches_to_backup(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (_node, url, s, ups):
            assert (await status(s, url))["active_source"] == "national"
            await ups.fault("national", mode="down")
            took = await until(lambda: _active(s, url, "city"), 5, "switch to the city system")
            st = await status(s, url)
            assert st["targets"]["national"]["state"] == "down"
            assert st["targets"]["national"]["breaker"] == "open"
            assert st["targets"]["city"]["state"] == "healthy"
            switch = next(e for e in st["events"] if e["kind"] == "switch")
            assert (switch["from"], switch["to"]) == ("national", "city")
            assert "national is down" in switch["reason"]
            assert took < 5

    async def test_failback_waits_for_hold_time_and_drained_backlog(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, hold_s=1.5) as (node, url, s, ups):
            await ups.fault("national", mode="down")
            await until(lambda: _active(s, url, "city"), 5, "switch to the city system")
            # The portal answers probes again but refuses every record: healthy, with a backlog.
            await ups.clear("national")
            await ups.fault("national", mode="partial", rate=1.0)
            await post_workload(url, s, 5)
            healthy_at = time.monotonic() + await until(
                lambda: _breaker(s, url, "national", "closed"), 10, "national breaker closes"
            )
            await asyncio.sleep(2.5)
            st = await status(s, url)
            assert st["active_source"] == "city", "failed back with a backlog still on the primary"
            assert st["targets"]["national"]["lag_records"] > 0
            await ups.clear("national")
            await until(lambda: _active(s, url, "national"), 15, "failback once the backlog drained")
            assert time.monotonic() - healthy_at >= 1.5
            await wait_converged(node, ups)
            kinds = [(e["from"], e["to"]) for e in (await status(s, url))["events"] if e["kind"] == "switch"]
            assert kinds == [("city", "national"), ("national", "city")]

    async def test_intermittent_errors_cost_at_most_one_switch(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, hold_s=30.0) as (_node, url, s, ups):
            await ups.fault("national", mode="error_rate", rate=0.3)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                await post_workload(url, s, 1)
                await asyncio.sleep(0.2)
            st = await status(s, url)
            switches = [e for e in st["events"] if e["kind"] == "switch"]
            assert len(switches) <= 1, switches
            await ups.clear("national")

    async def test_both_down_is_offline_and_loses_nothing(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            for t in ("national", "city"):
                await ups.fault(t, mode="down")
            await until(lambda: _offline(s, url), 5, "offline")
            codes = await post_workload(url, s, 10)
            st = await status(s, url)
            assert st["active_source"] is None and st["offline"] is True
            # Open, or between two probes half-open with its trial calls still failing: never healthy.
            assert {st["targets"][t]["breaker"] for t in ("national", "city")} <= {"open", "half_open"}
            assert "healthy" not in {st["targets"][t]["state"] for t in ("national", "city")}
            for t in ("national", "city"):
                await ups.clear(t)
            await until(lambda: _active(s, url, "national"), 10, "back to the primary")
            assert set(await wait_converged(node, ups)) == set(codes)

    async def test_choice_survives_a_restart(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            config = failover_config(tmp_path, ups, hold_s=60.0)
            async with running_node(config) as (_node, url, s):
                await ups.fault("national", mode="down")
                await until(lambda: _active(s, url, "city"), 5, "switch")
            await ups.clear("national")
            async with running_node(config) as (_node, url, s):
                st = await status(s, url)
                assert st["active_source"] == "city"  # the hold time starts again; no instant failback
                assert any(e["kind"] == "switch" for e in st["events"])


class TestDrillControls:
    """Forced choices lapse by themselves; fault windows open and close in the node's own path."""

    async def test_forced_choice_lapses_after_ttl(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, hold_s=0.0) as (_node, url, s, _ups):
            async with s.post(f"{url}/api/v1/admin/failover", json={"primary": "city", "ttl_s": 1}) as r:
                assert r.status == 200
                body = await r.json()
            assert body["active_source"] == "city" and body["forced"]["source"] == "city"
            await until(lambda: _active(s, url, "national"), 5, "forced choice lapses")
            kinds = [e["kind"] for e in (await status(s, url))["events"]]
            assert "forced" in kinds and "forced_lapsed" in kinds

    async def test_auto_releases_a_forced_choice(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, hold_s=0.0) as (_node, url, s, _ups):
            async with s.post(f"{url}/api/v1/admin/failover", json={"primary": "city"}) as r:
                forced_until = (await r.json())["forced"]["until"]
            assert forced_until  # the default TTL: an hour
            async with s.post(f"{url}/api/v1/admin/failover", json={"primary": "auto"}) as r:
                assert (await r.json())["forced"] is None
            await until(lambda: _active(s, url, "national"), 5, "automatic again")

    async def test_local_fault_window_switches_and_closes_by_itself(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, hold_s=0.5) as (node, url, s, ups):
            async with s.post(
                f"{url}/api/v1/admin/faults", json={"target": "national", "mode": "down", "seconds": 2}
            ) as r:
                assert r.status == 201
                assert (await r.json())["windows"][0]["mode"] == "down"
            await until(lambda: _active(s, url, "city"), 5, "switch under a local fault window")
            # The window is inside the node: while it is open no call reaches the portal at all.
            before = sum((await ups.stats("national"))["requests"].values())
            codes = await post_workload(url, s, 3)
            await asyncio.sleep(0.5)
            assert sum((await ups.stats("national"))["requests"].values()) == before
            await until(lambda: _active(s, url, "national"), 15, "window closes, failback")
            assert set(codes) <= set(await wait_converged(node, ups))

    async def test_abort_closes_every_window(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (_node, url, s, _ups):
            for t in ("national", "city"):
                async with s.post(
                    f"{url}/api/v1/admin/faults", json={"target": t, "mode": "latency", "ms": 50, "seconds": 600}
                ) as r:
                    assert r.status == 201
            async with s.delete(f"{url}/api/v1/admin/faults") as r:
                assert (await r.json()) == {"closed": 2, "windows": []}

    async def test_bad_drill_requests_say_which_field(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (_node, url, s, _ups):
            cases = [
                ("failover", {"primary": "moon"}, "primary"),
                ("failover", {"primary": "city", "ttl_s": -1}, "ttl_s"),
                ("failover", {"primary": "city", "colour": 1}, "colour"),
                ("faults", {"target": "moon", "mode": "down", "seconds": 1}, "target"),
                ("faults", {"target": "city", "mode": "melt", "seconds": 1}, "mode"),
                ("faults", {"target": "city", "mode": "down"}, "seconds"),
                ("faults", {"target": "city", "mode": "down", "seconds": 10**9}, "seconds"),
                ("faults", {"target": "city", "mode": "latency", "seconds": 5}, "ms"),
                ("faults", {"target": "city", "mode": "error_rate", "seconds": 5, "rate": 3}, "rate"),
            ]
            for path, body, field in cases:
                async with s.post(f"{url}/api/v1/admin/{path}", json=body) as r:
                    assert r.status == 422, (body, await r.text())
                    assert field in (await r.json())["error"]["fields"], body
            async with s.post(
                f"{url}/api/v1/admin/faults", data="{", headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 400


async def _active(s: aiohttp.ClientSession, url: str, source: str) -> bool:
    return (await status(s, url))["active_source"] == source


async def _offline(s: aiohttp.ClientSession, url: str) -> bool:
    return bool((await status(s, url))["offline"])


async def _breaker(s: aiohttp.ClientSession, url: str, target: str, state: str) -> bool:
    return (await status(s, url))["targets"][target]["breaker"] == state


class TestIntakeNeverWaits:
    """Upstream state never affects intake."""

    async def test_intake_with_primary_blackholed_locally(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (_node, url, s, _ups):
            async with s.post(
                f"{url}/api/v1/admin/faults", json={"target": "national", "mode": "blackhole", "seconds": 30}
            ) as r:
                assert r.status == 201
            started = time.monotonic()
            for _ in range(5):
                async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                    assert r.status == 201
            assert time.monotonic() - started < 2
