"""``wardsync status``: the table, ``--json`` as the API answers it plus a health, and the exit codes."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.auth import ROLES
from node.cli import main
from node.commands.status import assess
from node.config import load_config
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake
from tests.upstreams import running_upstreams, target_overrides

FAST = {"probe_interval_s": 0.2, "probe_timeout_s": 0.5, "open_base_s": 5.0, "open_cap_s": 10.0, "evaluate_s": 0.1}


def replicated(tmp_path: Path, ups: Any) -> Any:
    return load_config(
        env={},
        overrides={
            "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "n")},
            **target_overrides(ups, timeout_s=1.0),
            "failover": {**FAST, "hold_s": 60.0},
        },
    )


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``wardsync ARGV`` in a thread (the node under test keeps serving on this loop)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def api_status(session: Any, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/api/v1/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def wait_status(session: Any, url: str, ok: Callable[[dict[str, Any]], bool], within_s: float = 20.0) -> None:
    """Poll the node's status until ``ok`` (bounded: the test's asserts then say what was missed)."""
    for _ in range(int(within_s / 0.1)):
        if ok(await api_status(session, url)):
            return
        await asyncio.sleep(0.1)


def printed_json(out: str) -> dict[str, Any]:
    """The JSON document the command printed (the in-process node's log lines share standard output)."""
    start = out.index("\n{\n") + 1 if not out.startswith("{") else 0
    return dict(json.loads(out[start:]))


class TestStatusCommand:
    """Against a real node with both upstream stand-ins."""

    async def test_json_matches_the_api_and_healthy_exits_0(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        async with running_upstreams(tmp_path) as ups, running_node(replicated(tmp_path, ups)) as (node, url, s):
            token = await node.auth.create_token(["read-only"], name="monitor")
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                assert r.status == 201
            await wait_status(
                s, url, lambda st: all(t["lag_records"] == 0 and t["last_ok_at"] for t in st["targets"].values())
            )
            api = await api_status(s, url)
            code, out, _ = await run_cli(capsys, "status", "--url", url, "--token", token, "--json")
            printed = printed_json(out)
            assert printed.pop("health") == "healthy"
            assert printed == api
            assert code == 0

            code, out, _ = await run_cli(capsys, "status", "--url", url, "--token", token)
            assert code == 0
            for word in ("national", "city", "active source: national", "healthy", "dead letters: 0"):
                assert word in out

    async def test_degraded_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The city system down: a degraded target, exit 1, the reason printed; the token comes from the env."""
        async with running_upstreams(tmp_path) as ups, running_node(replicated(tmp_path, ups)) as (node, url, s):
            monkeypatch.setenv("WARDSYNC_TOKEN", await node.auth.create_token(["operator"], name="ops"))
            await ups.fault("city", mode="down")
            await wait_status(s, url, lambda st: st["targets"]["city"]["state"] != "healthy")
            code, out, _ = await run_cli(capsys, "status", "--url", url, "--json")
            assert printed_json(out)["health"] == "degraded"
            assert code == 1
            code, out, _ = await run_cli(capsys, "status", "--url", url)
            assert code == 1
            assert "city is" in out

    async def test_both_upstreams_down_is_offline(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        async with running_upstreams(tmp_path) as ups, running_node(replicated(tmp_path, ups)) as (node, url, s):
            token = await node.auth.create_token(ROLES, name="ops")
            await ups.fault("city", mode="down")
            await ups.fault("national", mode="down")
            await wait_status(s, url, lambda st: bool(st["offline"]))
            code, out, _ = await run_cli(capsys, "status", "--url", url, "--token", token, "--json")
            assert (printed_json(out)["health"], code) == ("offline", 2)

    async def test_refused_token_exits_3(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        async with running_node(make_config(tmp_path)) as (_node, url, _s):
            code, _, err = await run_cli(capsys, "status", "--url", url, "--token", "not-a-token")
            assert code == 3
            assert "refused the token" in err


class TestUnreachable:
    """A node that does not answer is offline for monitoring (exit 2), with a clear message."""

    def test_subprocess_exit_2(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, never listening: connections are refused
            proc = subprocess.run(
                [sys.executable, "-m", "node", "status", "--url", f"http://127.0.0.1:{port}", "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert proc.returncode == 2
        assert json.loads(proc.stdout) == {
            "health": "offline",
            "error": f"cannot reach the node at http://127.0.0.1:{port}: [Errno 111] Connection refused",
        }


class TestAssess:
    """How a status becomes a health."""

    def test_rules(self) -> None:
        ok = {"state": "healthy", "breaker": "closed", "lag_seconds": 0.0, "lag_records": 0, "dead": 0, "parked": 0}
        base = {"offline": False, "active_source": "national", "primary": "national"}
        assert assess({**base, "targets": {"national": ok, "city": ok}})[0] == "healthy"
        assert assess({**base, "targets": {}})[0] == "healthy"
        assert assess({**base, "targets": {"national": {**ok, "parked": 1}}})[0] == "degraded"
        assert assess({**base, "targets": {"national": {**ok, "lag_seconds": 301.0}}})[0] == "degraded"
        assert assess({**base, "targets": {"national": {**ok, "lag_seconds": 30.0}}}, max_lag_s=10)[0] == "degraded"
        assert assess({**base, "active_source": "city", "targets": {"national": ok, "city": ok}})[0] == "degraded"
        assert assess({**base, "offline": True, "active_source": None, "targets": {"city": ok}})[0] == "offline"
