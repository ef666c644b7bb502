"""Helpers shared by the operations tests (backup, bootstrap, reload, doctor, upgrade)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from node.app import Node
from node.config import Config, load_config, render_config
from tests.conftest import AGENCY, UNIT, valid_intake
from tests.upstreams import Upstreams

FAST = """
tick_s = 0.2
retry_base_s = 0.05
retry_cap_s = 0.5
pull_tick_s = 0.2
standby_pull_s = 0.5
pull_idle_max_s = 0.8
"""


def write_config(
    root: Path,
    ups: Upstreams | None = None,
    *,
    data_dir: Path | None = None,
    listen: str = "127.0.0.1:0",
    replace: dict[str, str] | None = None,
) -> Path:
    """A configuration file as ``wardsync init`` writes it, wired to the stand-ins, with fast loops."""
    text = render_config(
        unit=UNIT,
        agency_code=AGENCY,
        listen=listen,
        data_dir=str(data_dir or root / "data"),
        national_url=ups.national_url if ups else None,
        city_url=ups.city_url if ups else None,
    )
    text = text.replace("[replication]\n", "[replication]\n" + FAST, 1).replace("timeout_s = 10.0", "timeout_s = 2.0")
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = root / "wardsync.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # it holds the stand-ins' credentials
    return path


def load(path: Path) -> Config:
    return load_config(path, env={})


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``wardsync ARGS`` as the operator would, without WARDSYNC_* from the test's environment."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
        check=False,
    )


async def accept(session: aiohttp.ClientSession, base: str, n: int, tag: str = "d") -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        body = valid_intake(TrichYeuHoSo=f"Hồ sơ {tag}{i}", SoGiayToChuHoSo=f"0791900{i:05d}")
        async with session.post(f"{base}/api/v1/dossiers", json=body) as r:
            assert r.status == 201, await r.text()
            out.append(await r.json())
    return out


async def wait_synced(node: Node, *, within_s: float = 20.0) -> None:
    """Until every dossier of the node is acknowledged by every target with its current digest."""
    targets = list(node.replicators)
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        missing = []
        for t in targets:
            row = await node.store.fetchone(
                "SELECT count(*) FROM dossiers d LEFT JOIN replication r ON r.target = ? AND r.code = d.code"
                " WHERE r.acked_digest IS NULL OR r.acked_digest != d.digest",
                (t,),
            )
            if row[0]:
                missing.append((t, row[0]))
        if not missing:
            return
        assert asyncio.get_running_loop().time() < deadline, f"not synced: {missing}"
        await asyncio.sleep(0.05)


async def digests(node: Node) -> dict[str, str]:
    return {str(c): str(d) for c, d in await node.store.fetchall("SELECT code, digest FROM dossiers")}
