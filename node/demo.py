"""``wardsync demo``: both upstream stand-ins and a node wired to them, on loopback.

Everything lives under one directory (``./data/demo`` by default) so a second run picks up where the
first stopped. A few sample dossiers are accepted at start and the counts on each side are printed until
Ctrl-C, so a newcomer sees dossiers reach both upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp

from node.auth import ROLES, Auth
from node.clock import Clock
from node.config import Config, load_config, render_config
from node.store import Store

DEMO_UNIT = "26743"
DEMO_AGENCY = "000.00.17.H29"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sample_intake(i: int) -> dict[str, Any]:
    return {
        "MaTTHC": "1.000656",
        "TenTTHC": "Đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": f"Nguyễn Văn Mẫu {i}",
        "SoGiayToChuHoSo": f"0791{i:08d}",
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": "Hồ sơ mẫu của bản chạy thử",
    }


async def _counts(http: aiohttp.ClientSession, node: str, national: str, city: str) -> str:
    async def n_upstream(url: str) -> str:
        try:
            async with http.get(f"{url}/__inspect/dossiers", params={"unit": DEMO_UNIT}) as r:
                return str(len(await r.json()))
        except (aiohttp.ClientError, ValueError):
            return "?"

    async with http.get(f"{node}/api/v1/changes", params={"limit": 1000}) as r:
        local = len((await r.json())["items"])
    return f"node {local} · national portal {await n_upstream(national)} · city system {await n_upstream(city)}"


async def _demo_token(config: Config) -> str:
    """A token holding every role, made before the node starts (the demo's user is every kind of user)."""
    async with Store(config.db_path) as store:
        return await Auth(store, Clock()).create_token(ROLES, name="demo")


async def run_demo(
    base: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    dossiers: int = 5,
    stop: asyncio.Event,
    announce: Any = print,
) -> None:
    from node.app import serve as serve_node
    from node.fleet import FleetNode, serve_fleet
    from node.registry import get_unit
    from simulations import city_system, national_portal

    base.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once at start, before anything is served
    ports_file = base / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    nport = ports.get("national") or free_port(host)
    cport = ports.get("city") or free_port(host)
    fport = ports.get("fleet") or free_port(host)
    ports_file.write_text(json.dumps({"national": nport, "city": cport, "fleet": fport}))
    national_url, city_url = f"http://{host}:{nport}", f"http://{host}:{cport}"
    cfg = base / "wardsync.toml"
    cfg.write_text(
        render_config(
            unit=DEMO_UNIT,
            agency_code=DEMO_AGENCY,
            listen=f"{host}:{port}",
            data_dir=str(base / "node"),
            national_url=national_url,
            city_url=city_url,
        )
    )
    cfg.chmod(0o600)  # it holds the stand-ins' credentials
    config = load_config(cfg)
    node_url = f"http://{host}:{port}"
    token = await _demo_token(config)
    (base / "token").write_text(token + "\n")
    (base / "token").chmod(0o600)
    auth = {"Authorization": f"Bearer {token}"}

    async with asyncio.TaskGroup() as tg:
        tg.create_task(national_portal.serve(host, nport, base / "national", stop, announce=announce))
        tg.create_task(city_system.serve(host, cport, base / "city", stop, announce=announce))
        await asyncio.sleep(0.5)
        tg.create_task(serve_node(config, stop=stop, announce=announce))
        unit = get_unit(DEMO_UNIT)
        demo_fleet = [FleetNode(DEMO_UNIT, unit.name if unit else DEMO_UNIT, node_url, token)]
        tg.create_task(serve_fleet(demo_fleet, host, fport, stop, announce=announce, poll_s=2.0))
        async with aiohttp.ClientSession(headers=auth) as http:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{node_url}/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            for i in range(dossiers):
                async with http.post(f"{node_url}/api/v1/dossiers", json=sample_intake(i)) as r:
                    body = await r.json()
                    announce(f"accepted {body.get('MaHoSo')} (HTTP {r.status})")
            announce("")
            announce(f"A token for every role (also in {base / 'token'}); the dashboard at {node_url}/ asks for it.")
            announce("Try it:")
            announce(f"  export WARDSYNC_TOKEN={token}")
            announce(f'  curl -s -H "Authorization: Bearer $WARDSYNC_TOKEN" {node_url}/api/v1/status')
            announce(f"  wardsync status --url {node_url}")
            announce(f'  curl -s -X POST {node_url}/api/v1/dossiers -H "Authorization: Bearer $WARDSYNC_TOKEN" \\')
            announce("       -H 'Content-Type: application/json' \\")
            announce(f"       -d '{json.dumps(sample_intake(99), ensure_ascii=False)}'")
            announce(
                f'  curl -s -X POST {national_url}/__faults -d \'{{"mode": "down", "seconds": 30}}\''
                "   # take the portal down for 30 s"
            )
            announce("Press Ctrl-C to stop.")
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError, KeyError, ValueError):
                    announce(await _counts(http, node_url, national_url, city_url))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=5)
