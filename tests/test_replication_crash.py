"""SIGKILL of a real node process between sending to the upstreams and recording their answers."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from node.config import render_config
from tests.conftest import AGENCY, UNIT, provision_token, valid_intake
from tests.upstreams import Upstreams, running_upstreams

TARGETS = ("national", "city")
CYCLES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDSYNC_")}
    # Short backoff so recovery after the restart is quick.
    env.update(
        WARDSYNC_REPLICATION_RETRY_BASE_S="0.05",
        WARDSYNC_REPLICATION_RETRY_CAP_S="0.5",
        WARDSYNC_REPLICATION_TICK_S="0.2",
        WARDSYNC_LOG_LEVEL="warning",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _ready(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            async with http.get(f"{url}/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("node did not become ready")


async def _node_digests(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    cursor = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        async with http.get(f"{url}/api/v1/dossiers", params=params) as r:
            page = await r.json()
        out.update({d["MaHoSo"]: d["digest"] for d in page["items"]})
        cursor = page["next_cursor"]
        if not cursor:
            return out


async def _converged(http: aiohttp.ClientSession, url: str, ups: Upstreams, within_s: float = 40) -> dict[str, str]:
    deadline = time.monotonic() + within_s
    while True:
        local = await _node_digests(http, url)
        remote = {t: await ups.dossiers(t, UNIT) for t in TARGETS}
        if all(remote[t] == local for t in TARGETS):
            return local
        assert time.monotonic() < deadline, "both upstreams never converged with the node"
        await asyncio.sleep(0.25)


class TestKillDuringPush:
    """Killed while pushes are in flight, a restarted node loses nothing and stores nothing twice upstream."""

    async def test_sigkill_between_send_and_ack(self, tmp_path: Path) -> None:
        rng = random.Random(26743)
        async with running_upstreams(tmp_path) as ups:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            config = tmp_path / "wardsync.toml"
            config.write_text(
                render_config(
                    unit=UNIT,
                    agency_code=AGENCY,
                    listen=f"127.0.0.1:{port}",
                    data_dir=str(tmp_path / "node"),
                    national_url=ups.national_url,
                    city_url=ups.city_url,
                )
            )
            config.chmod(0o600)  # it holds the stand-ins' credentials
            acknowledged: dict[str, str] = {}
            headers = {"Authorization": f"Bearer {provision_token(config)}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                for cycle in range(CYCLES):
                    proc = _start(config)
                    try:
                        await _ready(http, url)
                        # Slow upstreams keep pushes in flight when the kill comes.
                        for t in TARGETS:
                            await ups.fault(t, mode="latency", ms=rng.randint(150, 400))
                        for i in range(25):
                            body = valid_intake(ChuHoSo=f"Người dân {cycle}-{i}")
                            async with http.post(f"{url}/api/v1/dossiers", json=body) as r:
                                assert r.status == 201
                                d = await r.json()
                            code = d["MaHoSo"]
                            async with http.post(
                                f"{url}/api/v1/dossiers/{code}/steps", json={"TrangThai": 4, "NguoiXuLy": "Lê Văn Tâm"}
                            ) as r:
                                assert r.status == 201
                                acknowledged[code] = (await r.json())["digest"]
                        await asyncio.sleep(rng.uniform(0.3, 0.9))
                    finally:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=10)
                    for t in TARGETS:
                        await ups.clear(t)

                proc = _start(config)
                try:
                    await _ready(http, url)
                    final = await _converged(http, url, ups)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=15)
            assert final == acknowledged
            for t in TARGETS:
                stats = await ups.stats(t)
                assert stats["duplicates"] == 0, (t, stats)
