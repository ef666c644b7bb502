"""Both upstream stand-ins as real servers on loopback, for tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from simulations import city_system, national_portal


@dataclass
class Upstreams:
    national_url: str
    city_url: str
    http: aiohttp.ClientSession

    def url(self, target: str) -> str:
        return self.national_url if target == "national" else self.city_url

    async def fault(self, target: str, **spec: Any) -> None:
        async with self.http.post(f"{self.url(target)}/__faults", json=spec) as r:
            assert r.status == 200, await r.text()

    async def clear(self, target: str) -> None:
        async with self.http.delete(f"{self.url(target)}/__faults") as r:
            assert r.status == 200

    async def dossiers(self, target: str, unit: str) -> dict[str, str]:
        async with self.http.get(f"{self.url(target)}/__inspect/dossiers", params={"unit": unit}) as r:
            return {d["code"]: d["digest"] for d in await r.json()}

    async def stats(self, target: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url(target)}/__inspect/stats") as r:
            return dict(await r.json())


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running_upstreams(base: Path) -> AsyncIterator[Upstreams]:
    nat_runner, nat_url = await _start(national_portal.build_app(base / "national"))
    city_runner, city_url = await _start(city_system.build_app(base / "city"))
    try:
        async with aiohttp.ClientSession() as http:
            yield Upstreams(nat_url, city_url, http)
    finally:
        await nat_runner.cleanup()
        await city_runner.cleanup()


def target_overrides(ups: Upstreams, *, timeout_s: float = 2.0) -> dict[str, dict[str, Any]]:
    """Config overrides wiring a node to both stand-ins with their default credentials."""
    from node.config import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_PASSWORD, DEMO_USERNAME

    return {
        "targets.national": {
            "url": ups.national_url,
            "username": DEMO_USERNAME,
            "password": DEMO_PASSWORD,
            "dstcode": "000.00.17.H29",
            "madonvi": "000.00.17.H29",
            "timeout_s": timeout_s,
        },
        "targets.city": {
            "url": ups.city_url,
            "client_id": DEMO_CLIENT_ID,
            "client_secret": DEMO_CLIENT_SECRET,
            "timeout_s": timeout_s,
        },
        "replication": {"tick_s": 0.2, "retry_base_s": 0.05, "retry_cap_s": 0.5, "max_attempts": 50,
                        "pull_tick_s": 0.2, "standby_pull_s": 0.5, "pull_idle_max_s": 0.8},
    }
