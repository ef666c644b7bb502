"""Failover when the network itself fails: a TCP chaos proxy between the node and the primary.

Default failover settings throughout (probe interval, probe timeout, breaker thresholds) and the
adapters' default 10 s timeout, so the times measured are the ones a ward gets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from node.config import load_config
from simulations.chaos_proxy import ChaosProxy
from tests.conftest import AGENCY, UNIT, running_node
from tests.test_failover import _active, status, until
from tests.test_replication import post_workload, wait_converged
from tests.upstreams import Upstreams, running_upstreams, target_overrides


@contextlib.asynccontextmanager
async def through_proxy(tmp_path: Path) -> AsyncIterator[tuple[Any, str, aiohttp.ClientSession, Upstreams, ChaosProxy]]:
    async with running_upstreams(tmp_path) as ups:
        parts = urlsplit(ups.national_url)
        async with ChaosProxy(parts.hostname or "127.0.0.1", parts.port or 0) as proxy:
            overrides = target_overrides(ups, timeout_s=10.0)
            overrides["targets.national"]["url"] = proxy.url
            config = load_config(env={}, overrides={
                "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0",
                         "data_dir": str(tmp_path / "node")},
                **overrides,
                "failover": {"hold_s": 2.0},
            })
            async with running_node(config) as (node, url, s):
                yield node, url, s, ups, proxy


class TestNetworkFailures:
    """Refused and blackholed connections to the primary, as a real network delivers them."""

    async def test_refused_primary_switches_within_5_s(self, tmp_path: Path) -> None:
        async with through_proxy(tmp_path) as (node, url, s, ups, proxy):
            await post_workload(url, s, 3)
            await wait_converged(node, ups)
            await proxy.set_mode("refuse")
            took = await until(lambda: _active(s, url, "city"), 5, "switch after the primary refuses connections")
            assert took < 5
            await proxy.clear()
            await until(lambda: _active(s, url, "national"), 30, "failback after recovery")

    async def test_blackholed_primary_switches_within_15_s(self, tmp_path: Path) -> None:
        async with through_proxy(tmp_path) as (node, url, s, ups, proxy):
            await post_workload(url, s, 3)
            await wait_converged(node, ups)
            started = time.monotonic()
            await proxy.set_mode("blackhole")
            codes = await post_workload(url, s, 3)  # intake goes on while pushes hang
            await until(lambda: _active(s, url, "city"), 15, "switch after the primary goes silent")
            assert time.monotonic() - started < 15
            st = await status(s, url)
            assert st["targets"]["national"]["breaker"] in ("open", "half_open")
            await proxy.clear()
            await until(lambda: _active(s, url, "national"), 40, "failback after recovery")
            assert set(codes) <= set(await wait_converged(node, ups, within_s=40))

    async def test_reset_connections_are_hard_failures(self, tmp_path: Path) -> None:
        async with through_proxy(tmp_path) as (_node, url, s, _ups, proxy):
            await proxy.set_mode("reset")
            await until(lambda: _active(s, url, "city"), 5, "switch when every connection is reset")
            await proxy.clear()
