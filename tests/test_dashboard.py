"""The node dashboard and its sign-in page, over real HTTP: cookies, CSRF, panels, history, look-up."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from node.app import Node
from node.auth import SESSION_COOKIE
from node.config import load_config
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake
from tests.upstreams import Upstreams, running_upstreams, target_overrides


def _csrf_field(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def sign_in(base: str, token: str, *, nxt: str = "/") -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    """A fresh browser-like session (no bearer header), signed in with ``token``; the caller closes it."""
    browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # unsafe: cookies for 127.0.0.1
    async with browser.get(f"{base}/login") as r:
        assert r.status == 200
        csrf = _csrf_field(await r.text())
    r = await browser.post(
        f"{base}/login", data={"token": token, "csrf": csrf, "next": nxt}, allow_redirects=False
    )
    await r.read()
    return browser, r


@contextlib.asynccontextmanager
async def signed_in(node: Node, base: str, *roles: str) -> AsyncIterator[aiohttp.ClientSession]:
    token = await node.auth.create_token(list(roles or ("operator",)), name="dashboard test")
    browser, r = await sign_in(base, token)
    try:
        assert r.status == 303, await r.text()
        yield browser
    finally:
        await browser.close()


def page_csrf(html: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]*)">', html)
    assert found
    return found.group(1)


class TestSignIn:
    """A token becomes an HttpOnly, SameSite=Strict session cookie; everything else is refused."""

    async def test_a_browser_without_a_session_is_sent_to_sign_in(self, tmp_path: Path) -> None:
        async with (
            running_node(make_config(tmp_path)) as (_node, base, _s),
            aiohttp.ClientSession() as anon,
        ):
            async with anon.get(f"{base}/", headers={"Accept": "text/html"}, allow_redirects=False) as r:
                assert r.status == 303
                assert r.headers["Location"].startswith("/login")
            async with anon.get(f"{base}/dashboard/panels", allow_redirects=False) as r:
                assert r.status == 401
            async with anon.get(f"{base}/login") as r:
                assert r.status == 200
                assert "Đăng nhập" in await r.text()
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                assert r.headers["X-Frame-Options"] == "DENY"

    async def test_sign_in_sets_a_strict_httponly_cookie_and_shows_the_dashboard(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _s):
            token = await node.auth.create_token(["read-only"], name="watcher")
            browser, r = await sign_in(base, token)
            try:
                assert r.status == 303 and r.headers["Location"] == "/"
                cookie = next(h for h in r.headers.getall("Set-Cookie") if h.startswith(SESSION_COOKIE + "="))
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
                assert "Secure" not in cookie  # served over plain HTTP here; Secure follows the request's scheme
                async with browser.get(f"{base}/") as page:
                    html = await page.text()
                    assert page.status == 200
                    assert "Phường Bến Thành" in html and "Trạng thái đồng bộ" in html and "Replication status" in html
                    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
                sid = browser.cookie_jar.filter_cookies(URL(base))[SESSION_COOKIE].value
                session = node.auth.session(sid)
                assert session is not None and page_csrf(html) == session.csrf
                assert token not in html
            finally:
                await browser.close()

    async def test_wrong_tokens_forged_forms_and_foreign_next_are_refused(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _s):
            browser, r = await sign_in(base, "wst_not-a-token")
            await browser.close()
            assert r.status == 401
            assert SESSION_COOKIE not in r.cookies
            clerk = await node.auth.create_token(["clerk"], name="desk")
            browser, r = await sign_in(base, clerk)
            await browser.close()
            assert r.status == 403 and SESSION_COOKIE not in r.cookies
            # A form posted from elsewhere has no login CSRF cookie to match.
            operator = await node.auth.create_token(["operator"], name="op")
            async with aiohttp.ClientSession() as other, other.post(
                f"{base}/login", data={"token": operator, "csrf": "x"}, allow_redirects=False
            ) as r2:
                assert r2.status == 403 and SESSION_COOKIE not in r2.cookies
            browser, r = await sign_in(base, operator, nxt="//evil.example/")
            await browser.close()
            assert r.status == 303 and r.headers["Location"] == "/"

    async def test_sign_out_needs_the_csrf_token_and_ends_the_session(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, _s), signed_in(node, base) as browser:
            async with browser.get(f"{base}/") as r:
                csrf = page_csrf(await r.text())
            async with browser.post(f"{base}/logout", data={}, allow_redirects=False) as r:
                assert r.status == 403
            async with browser.get(f"{base}/dashboard/panels") as r:
                assert r.status == 200
            async with browser.post(f"{base}/logout", data={"csrf": csrf}, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/login"
            async with browser.get(f"{base}/dashboard/panels", allow_redirects=False) as r:
                assert r.status == 401


def replicated_config(tmp_path: Path, ups: Upstreams, **replication: Any) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    overrides["replication"] = {**overrides["replication"], **replication}
    return load_config(
        env={},
        overrides={
            "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "n")},
            **overrides,
            "failover": {"probe_interval_s": 0.2, "probe_timeout_s": 0.5, "open_base_s": 0.5, "evaluate_s": 0.1},
        },
    )


async def until_text(browser: aiohttp.ClientSession, url: str, pattern: str, within_s: float) -> str:
    deadline = time.monotonic() + within_s
    while True:
        async with browser.get(url) as r:
            text = await r.text()
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in {url} within {within_s} s:\n{text}")
        await asyncio.sleep(0.1)


class TestPanels:
    """The live panels show what the node knows: target state, lag history, dead letters."""

    async def test_panels_follow_a_fault_and_the_history_fills(self, tmp_path: Path) -> None:
        async with (
            running_upstreams(tmp_path) as ups,
            running_node(replicated_config(tmp_path, ups)) as (node, base, s),
            signed_in(node, base) as browser,
        ):
            panels = f"{base}/dashboard/panels"
            await until_text(browser, panels, r'id="target-national" data-state="healthy" data-breaker="closed"', 5)
            await ups.fault("national", mode="down")
            async with s.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r:
                assert r.status == 201
            html = await until_text(browser, panels, r'id="target-national" data-state="down" data-breaker="open"', 10)
            assert 'id="target-city" data-state="healthy"' in html
            await until_text(browser, panels, r'id="active-source" data-source="city"', 5)
            await node.history.sample()
            await node.history.sample()
            async with browser.get(f"{base}/api/v1/status/history") as r:
                body = await r.json()
            assert body["interval_s"] == 10.0 and body["size"] == 360
            assert len(body["points"]) >= 2
            assert body["points"][-1]["targets"]["national"]["breaker"] == "open"
            assert body["points"][-1]["active_source"] == "city"
            async with browser.get(panels) as r:
                assert re.search(r'<figure class="spark" id="spark-national" data-points="[2-9]', await r.text())

    async def test_retry_from_a_browser_needs_the_csrf_token(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            await ups.fault("city", mode="partial", rate=1.0)
            async with (
                running_node(replicated_config(tmp_path, ups, max_attempts=2)) as (node, base, s),
                signed_in(node, base, "operator") as browser,
            ):
                async with s.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r:
                    code = (await r.json())["MaHoSo"]
                html = await until_text(browser, f"{base}/", rf'class="dead-letter" data-code="{re.escape(code)}"', 20)
                csrf = page_csrf(html)
                await ups.clear("city")
                retry = f"{base}/api/v1/dead-letters/city/{code}/retry"
                async with browser.post(retry) as r:
                    assert r.status == 403
                    assert (await r.json())["error"]["code"] == "csrf_failed"
                async with browser.post(retry, headers={"X-CSRF-Token": "wrong"}) as r:
                    assert r.status == 403
                async with s.get(f"{base}/api/v1/dead-letters") as r:
                    assert [i["code"] for i in (await r.json())["items"]] == [code]
                async with browser.post(retry, headers={"X-CSRF-Token": csrf}) as r:
                    assert r.status == 202, await r.text()


class TestLookup:
    """Look-up by dossier code shows the dossier, escaped, with the citizen ID masked."""

    async def test_lookup_shows_the_dossier(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, s), signed_in(node, base) as browser:
            async with s.post(
                f"{base}/api/v1/dossiers", json=valid_intake(TenTTHC="Đăng ký <b>khai sinh</b> & cấp bản sao")
            ) as r:
                assert r.status == 201, await r.text()
                code = (await r.json())["MaHoSo"]
            async with browser.get(f"{base}/dashboard/dossiers/{code}") as r:
                assert r.status == 200
                html = await r.text()
            assert code in html and "Nguyễn Thị Lan" in html and "Đã tiếp nhận" in html
            assert "Đăng ký &lt;b&gt;khai sinh&lt;/b&gt; &amp; cấp bản sao" in html
            assert "079190001234" not in html and "1234" in html
            async with browser.get(f"{base}/dashboard/dossiers/{AGENCY}-000101-9999") as r:
                assert r.status == 404
                assert "Không tìm thấy" in await r.text()


class TestStatic:
    """The CSS and JavaScript are public; nothing else is served from there."""

    async def test_static_files(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_node, base, _s), aiohttp.ClientSession() as anon:
            async with anon.get(f"{base}/dashboard/static/dashboard.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
                assert "X-CSRF-Token" in await r.text()
            async with anon.get(f"{base}/dashboard/static/..%2Fdashboard.py") as r:
                assert r.status == 404
