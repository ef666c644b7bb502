"""Shared helpers: a valid config, a node served on a real loopback socket, a valid intake body."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from node.app import Node
from node.auth import ROLES
from node.clock import Clock
from node.config import Config, load_config

UNIT = "26743"  # Phường Bến Thành
AGENCY = "000.00.17.H29"


ALL_ROLES = ",".join(ROLES)


def provision_token(config: Path, *, data_dir: Path | None = None, roles: str = ALL_ROLES) -> str:
    """A token for a node run as a process, made the way an operator makes one: ``wardsync token create``."""
    cmd = [sys.executable, "-m", "node", "token", "create", "--config", str(config), "--role", roles, "--name", "tests"]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=config.parent, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A valid config for UNIT/AGENCY with its store under ``tmp_path/data``; keywords override [node]."""
    node: dict[str, Any] = {
        "unit": UNIT,
        "agency_code": AGENCY,
        "listen": "127.0.0.1:0",
        "data_dir": str(tmp_path / "data"),
        **overrides,
    }
    # An empty environment: a WARDSYNC_* variable in the developer's shell must not leak into tests.
    return load_config(env={}, overrides={"node": node})


@contextlib.asynccontextmanager
async def running_node(
    config: Config, clock: Clock | None = None, *, connections: int = 100
) -> AsyncIterator[tuple[Node, str, aiohttp.ClientSession]]:
    """Start a node on ``config``, serve its app on 127.0.0.1, yield (node, base_url, session).

    The session carries a token holding every role; tests of access rules make their own tokens.
    """
    async with Node(config, clock=clock) as node:
        server = TestServer(node.app, host="127.0.0.1")
        await server.start_server()
        try:
            base_url = str(server.make_url("")).rstrip("/")
            connector = aiohttp.TCPConnector(limit=connections)
            token = await node.auth.create_token(ROLES, name="tests")
            headers = {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
                yield node, base_url, session
        finally:
            await server.close()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def node_server(config: Config) -> AsyncIterator[tuple[Node, str, aiohttp.ClientSession]]:
    async with running_node(config) as running:
        yield running


def valid_intake(**overrides: Any) -> dict[str, Any]:
    """A birth-registration dossier received at the desk from a citizen; keywords replace fields."""
    body: dict[str, Any] = {
        "MaTTHC": "1.001193",
        "TenTTHC": "Thủ tục đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": "Nguyễn Thị Lan",
        "SoGiayToChuHoSo": "079190001234",
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": "Đăng ký khai sinh cho con",
        "SoDienThoai": "0912345678",
        "NgayHenTra": "20300105170000",
    }
    body.update(overrides)
    return body


async def eventually(
    check: Callable[[], Awaitable[Any]], within_s: float = 30.0, what: str = "", every_s: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something true (returned), failing after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(every_s)
