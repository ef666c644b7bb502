"""Access rules: tokens with roles on every route but the probes, sessions for browsers, failed-attempt limits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.auth import AUTH, PUBLIC, SESSION_COOKIE, rule_of
from node.config import render_config
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake

ROUTE_ROLES: list[tuple[str, str, set[str]]] = [
    ("POST", "/api/v1/dossiers", {"clerk"}),
    ("GET", "/api/v1/dossiers", {"clerk", "operator", "read-only"}),
    ("GET", "/api/v1/status", {"clerk", "operator", "drill", "peer", "read-only"}),
    ("GET", "/api/v1/dead-letters", {"operator", "read-only"}),
    ("POST", "/api/v1/admin/failover", {"drill"}),
    ("DELETE", "/api/v1/admin/faults", {"drill"}),
]


async def _call(session: aiohttp.ClientSession, method: str, url: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    intake = method == "POST" and url.endswith("/api/v1/dossiers")
    body: dict[str, Any] = valid_intake() if intake else {}
    async with session.request(method, url, headers=headers, json=body if method != "GET" else None) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else text


class TestEveryRouteHasARule:
    async def test_no_route_is_left_without_an_access_rule(self, tmp_path: Path) -> None:
        """Each handler the node serves is public or names its roles; a forgotten marker would fail closed."""
        async with running_node(make_config(tmp_path)) as (node, _base, _session):
            missing = []
            publics = []
            for route in node.app.router.routes():
                rule = rule_of(route.handler)
                if rule is None:
                    missing.append(f"{route.method} {route.resource.canonical if route.resource else '?'}")
                elif rule == PUBLIC:
                    publics.append(route.resource.canonical if route.resource else "?")
            assert not missing, missing
            assert {"/livez", "/readyz"} <= set(publics)
            # Beyond the probes, only the sign-in page and the dashboards' static assets are open.
            assert set(publics) <= {"/livez", "/readyz", "/login", "/logout", "/dashboard/static/{name}"}, publics


class TestTokens:
    async def test_missing_token_is_401_with_a_clear_envelope(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_node, base, _session), aiohttp.ClientSession() as anon:
            async with anon.get(f"{base}/api/v1/status") as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                body = await resp.json()
            assert body["error"]["code"] == "unauthenticated"
            assert "Authorization: Bearer" in body["error"]["message"]
            async with anon.get(f"{base}/livez") as resp:
                assert resp.status == 200
            async with anon.get(f"{base}/readyz") as resp:
                assert resp.status == 200

    async def test_wrong_or_malformed_token_is_401(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_node, base, _session), aiohttp.ClientSession() as anon:
            for header in ("Bearer wst_not-a-real-token", "Basic dXNlcjpwYXNz", "Bearer "):
                async with anon.get(f"{base}/api/v1/status", headers={"Authorization": header}) as resp:
                    assert resp.status == 401, header
                    assert (await resp.json())["error"]["code"] in ("invalid_token", "invalid_authorization")

    @pytest.mark.parametrize(("method", "path", "allowed"), ROUTE_ROLES)
    async def test_each_role_reaches_only_its_routes(
        self, tmp_path: Path, method: str, path: str, allowed: set[str]
    ) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _session), aiohttp.ClientSession() as anon:
            for role in ("clerk", "operator", "drill", "peer", "read-only"):
                token = await node.auth.create_token([role])
                status, body = await _call(anon, method, f"{base}{path}", token)
                if role in allowed:
                    assert status not in (401, 403), (role, method, path, body)
                else:
                    assert status == 403, (role, method, path, status, body)
                    assert body["error"]["code"] == "forbidden"
                    assert role in body["error"]["message"]

    async def test_a_revoked_token_stops_working(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _session), aiohttp.ClientSession() as anon:
            token = await node.auth.create_token(["operator"], name="night shift")
            headers = {"Authorization": f"Bearer {token}"}
            async with anon.get(f"{base}/api/v1/status", headers=headers) as resp:
                assert resp.status == 200
            (info,) = [t for t in await node.auth.list_tokens() if t.name == "night shift"]
            assert await node.auth.revoke(info.id)
            async with anon.get(f"{base}/api/v1/status", headers=headers) as resp:
                assert resp.status == 401

    async def test_the_store_holds_only_hashes(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        async with running_node(config) as (node, _base, _session):
            token = await node.auth.create_token(["clerk"])
        raw = b"".join(p.read_bytes() for p in config.db_path.parent.glob("wardsync.sqlite3*"))
        assert token.encode() not in raw
        with sqlite3.connect(config.db_path) as db:
            hashes = [r[0] for r in db.execute("SELECT hash FROM tokens")]
        assert all(len(h) == 64 for h in hashes)


class TestFailedAttempts:
    async def test_repeated_failures_are_limited_and_logged_without_the_token(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _session), aiohttp.ClientSession() as anon:
            node.auth.max_failures = 3
            guesses = [f"wst_guess-number-{i}" for i in range(5)]
            statuses = []
            for guess in guesses:
                async with anon.get(f"{base}/api/v1/status", headers={"Authorization": f"Bearer {guess}"}) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert int(resp.headers["Retry-After"]) >= 1
                        assert (await resp.json())["error"]["code"] == "too_many_failed_attempts"
            assert statuses == [401, 401, 401, 429, 429]
            # Even a good token waits out the block from the same address.
            good = await node.auth.create_token(["operator"])
            async with anon.get(f"{base}/api/v1/status", headers={"Authorization": f"Bearer {good}"}) as resp:
                assert resp.status == 429
        out = capsys.readouterr()
        logs = out.out + out.err
        assert "auth_failed" in logs
        assert not any(g in logs for g in guesses)


class TestBrowserSessions:
    async def test_cookie_session_needs_csrf_for_changes(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _session):
            auth = node.app[AUTH]
            principal = await auth.verify(await auth.create_token(["operator", "drill"]))
            assert principal is not None
            session = auth.open_session(principal)
            cookies = {SESSION_COOKIE: session.id}
            async with aiohttp.ClientSession(cookies=cookies) as browser:
                async with browser.get(f"{base}/api/v1/status") as resp:
                    assert resp.status == 200
                async with browser.delete(f"{base}/api/v1/admin/faults") as resp:
                    assert resp.status == 403
                    assert (await resp.json())["error"]["code"] == "csrf_failed"
                async with browser.delete(
                    f"{base}/api/v1/admin/faults", headers={"X-CSRF-Token": "forged"}
                ) as resp:
                    assert resp.status == 403
                async with browser.delete(
                    f"{base}/api/v1/admin/faults", headers={"X-CSRF-Token": session.csrf}
                ) as resp:
                    assert resp.status == 200
            auth.close_session(session.id)
            async with aiohttp.ClientSession(cookies=cookies) as browser, browser.get(f"{base}/api/v1/status") as resp:
                assert resp.status == 401


class TestTokenCommand:
    def test_create_prints_a_token_that_the_node_accepts(self, tmp_path: Path) -> None:
        config = tmp_path / "wardsync.toml"
        config.write_text(
            render_config(unit=UNIT, agency_code=AGENCY, listen="127.0.0.1:0", data_dir=str(tmp_path / "data")),
            encoding="utf-8",
        )
        config.chmod(0o600)
        cmd = [sys.executable, "-m", "node", "token"]
        done = subprocess.run(
            [*cmd, "create", "--config", str(config), "--role", "clerk,operator", "--name", "desk 1"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert token.startswith("wst_") and "\n" not in token
        bad = subprocess.run(
            [*cmd, "create", "--config", str(config), "--role", "admin"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert bad.returncode == 2 and "admin" in bad.stderr
        listed = subprocess.run(
            [*cmd, "list", "--config", str(config), "--json"], capture_output=True, text=True, timeout=60, check=False
        )
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)
        assert entry["name"] == "desk 1" and entry["roles"] == ["clerk", "operator"]
        assert token not in listed.stdout


    async def test_one_token_registered_on_two_nodes(self, tmp_path: Path) -> None:
        """``token add`` registers a token made elsewhere: one peer token opens both units' nodes."""
        shared = "wst_" + "k7" * 20
        await asyncio.to_thread(_register_everywhere, tmp_path, shared)
        for unit in ("a", "b"):
            config = make_config(tmp_path / unit)
            async with running_node(config) as (_, base, _session), aiohttp.ClientSession() as http:
                for token, expected in ((shared, 200), ("wst_" + "x7" * 20, 401)):
                    headers = {"Authorization": f"Bearer {token}"}
                    async with http.get(f"{base}/api/v1/status", headers=headers) as resp:
                        assert resp.status == expected
                async with http.post(
                    f"{base}/api/v1/dossiers", json=valid_intake(), headers={"Authorization": f"Bearer {shared}"}
                ) as resp:
                    assert resp.status == 403  # a peer token is not a clerk's


def _token_add(config: Path, token: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "token", "add", "--config", str(config), "--role", "peer"],
        input=token + "\n", capture_output=True, text=True, timeout=60, check=False,
    )


def _register_everywhere(tmp_path: Path, shared: str) -> None:
    configs = []
    for unit in ("a", "b"):
        config = tmp_path / f"{unit}.toml"
        config.write_text(
            render_config(unit=UNIT, agency_code=AGENCY, listen="127.0.0.1:0", data_dir=str(tmp_path / unit / "data")),
            encoding="utf-8",
        )
        config.chmod(0o600)
        added = _token_add(config, shared)
        assert added.returncode == 0, added.stderr
        assert shared not in added.stdout + added.stderr  # never echoed
        configs.append(config)
    again = _token_add(configs[0], shared)
    assert again.returncode == 1 and "already registered" in again.stderr
    short = _token_add(configs[0], "wst_short")
    assert short.returncode == 1 and "at least 32" in short.stderr


def test_handlers_are_marked_on_the_function() -> None:
    """The marker lives on the handler, so a route added anywhere carries its rule with it."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    assert rule_of(handler) is None
