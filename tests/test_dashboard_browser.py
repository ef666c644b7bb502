"""The dashboards in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Real nodes, real upstream stand-ins and a real fleet dashboard on loopback; the browser signs in, watches a
fault injected into the national stand-in show up, retries a dead letter and filters the fleet grid. Every
test also checks that the page logged no console error (a CSP violation or a script error would).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright

from node.app import Node
from node.demo import free_port
from node.fleet import MONITOR, FleetNode, build_fleet_app
from tests.conftest import make_config, running_node, valid_intake
from tests.test_dashboard import replicated_config
from tests.upstreams import running_upstreams

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)

# In CI a missing browser is a failure, never a skip.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium on this machine"),
]

WAIT_MS = 15_000


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM or "/usr/bin/chromium", args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def watched_page(browser: Browser) -> AsyncIterator[tuple[Page, list[str]]]:
    """A page in a fresh context, with every console error and uncaught exception collected."""
    context = await browser.new_context()
    page = await context.new_page()
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            problems.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    try:
        yield page, problems
    finally:
        await context.close()


async def sign_in(page: Page, node: Node, base: str, *roles: str) -> None:
    token = await node.auth.create_token(list(roles or ("operator",)), name="browser test")
    await page.goto(f"{base}/")
    assert page.url.startswith(f"{base}/login")
    await page.fill("#token", token)
    await page.click("#sign-in")
    await page.wait_for_selector("#replication", timeout=WAIT_MS)
    assert page.url == f"{base}/"


class TestNodeDashboard:
    """The node dashboard, signed in through the sign-in page."""

    async def test_shows_the_national_breaker_open_and_the_switch_after_a_fault(self, tmp_path: Path) -> None:
        async with (
            running_upstreams(tmp_path) as ups,
            running_node(replicated_config(tmp_path, ups)) as (node, base, s),
            chromium() as browser,
            watched_page(browser) as (page, problems),
        ):
            await sign_in(page, node, base, "read-only")
            [cookie] = [c for c in await page.context.cookies() if c["name"] == "wardsync_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert await page.evaluate("document.cookie") == ""  # no script can read the session
            await page.wait_for_selector('#target-national[data-state="healthy"]', timeout=WAIT_MS)
            assert await page.get_attribute("#active-source", "data-source") == "national"
            await ups.fault("national", mode="down")
            async with s.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r:
                assert r.status == 201
            # No reload: the page's own polling brings the change in.
            await page.wait_for_selector('#target-national[data-state="down"][data-breaker="open"]', timeout=WAIT_MS)
            await page.wait_for_selector('#active-source[data-source="city"]', timeout=WAIT_MS)
            await page.wait_for_selector('#events tr.event[data-kind="switch"]', timeout=WAIT_MS)
            assert "Ngừng · Down" in await page.inner_text("#target-national")
            assert problems == []

    async def test_retry_works_with_the_csrf_token_and_a_post_without_it_is_refused(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            await ups.fault("city", mode="partial", rate=1.0)
            async with (
                running_node(replicated_config(tmp_path, ups, max_attempts=2)) as (node, base, s),
                chromium() as browser,
                watched_page(browser) as (page, problems),
            ):
                async with s.post(f"{base}/api/v1/dossiers", json=valid_intake()) as r:
                    code = (await r.json())["MaHoSo"]
                await sign_in(page, node, base, "operator")
                row = f'#dead-letters tr.dead-letter[data-code="{code}"][data-target="city"]'
                await page.wait_for_selector(row, timeout=WAIT_MS)
                await ups.clear("city")
                # The same request the button sends, without the CSRF header: refused.
                refused = await page.evaluate(
                    "async (url) => (await fetch(url, {method: 'POST', credentials: 'same-origin'})).status",
                    f"/api/v1/dead-letters/city/{code}/retry",
                )
                assert refused == 403
                await page.click(f"{row} button.retry")
                await page.wait_for_selector("#retry-result.ok", timeout=WAIT_MS)
                assert code in await page.inner_text("#retry-result")
                await page.wait_for_selector(row, state="detached", timeout=WAIT_MS)
                await page.wait_for_selector("#no-dead-letters", timeout=WAIT_MS)
                # The refused fetch logs a failed resource load; nothing else may.
                assert [p for p in problems if "403" not in p] == []

    async def test_lookup_by_code_shows_the_dossier(self, tmp_path: Path) -> None:
        async with (
            running_node(make_config(tmp_path)) as (node, base, s),
            chromium() as browser,
            watched_page(browser) as (page, problems),
        ):
            async with s.post(f"{base}/api/v1/dossiers", json=valid_intake(ChuHoSo="Trần Văn <Bình>")) as r:
                assert r.status == 201, await r.text()
                code = (await r.json())["MaHoSo"]
            await sign_in(page, node, base, "read-only")
            await page.fill("#lookup-code", code)
            await page.click("#lookup-form button[type=submit]")
            found = await page.wait_for_selector(f'.dossier[data-code="{code}"]', timeout=WAIT_MS)
            assert found is not None
            text = await found.inner_text()
            assert "Trần Văn <Bình>" in text and "Đã tiếp nhận" in text
            assert await page.locator(".dossier b, .dossier bình").count() == 0  # shown as text, not markup
            assert problems == []
            await page.fill("#lookup-code", code[:-4] + "9999")
            await page.click("#lookup-form button[type=submit]")
            await page.wait_for_selector("#lookup-missing", timeout=WAIT_MS)
            # The browser logs the 404 of the unknown code as a failed load; nothing else may appear.
            assert all("404" in p for p in problems), problems


class TestFleetDashboard:
    """The fleet grid: units coloured by state, live, filtered by name or state, a click through to a unit."""

    async def test_grid_follows_a_fault_filters_and_clicks_through(self, tmp_path: Path) -> None:
        async with (
            running_upstreams(tmp_path) as ups,
            running_node(replicated_config(tmp_path, ups)) as (node_a, url_a, _sa),
            running_node(make_config(tmp_path / "b", unit="26732", agency_code="000.00.99.H29")) as (node_b, url_b, _),
        ):
            inventory = [
                FleetNode("26743", "Phường Bến Thành", url_a, await node_a.auth.create_token(["read-only"])),
                FleetNode("26732", "Đặc khu Côn Đảo", url_b, await node_b.auth.create_token(["read-only"])),
                FleetNode("26734", "Phường Sài Gòn", f"http://127.0.0.1:{free_port()}", "wst_unused"),
            ]
            app = build_fleet_app(inventory, poll_s=0.5, timeout_s=1.0)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            try:
                base = str(server.make_url("")).rstrip("/")
                async with chromium() as browser, watched_page(browser) as (page, problems):
                    await page.goto(f"{base}/")
                    await page.wait_for_selector('#unit-26743[data-state="healthy"]', timeout=WAIT_MS)
                    await page.wait_for_selector('#unit-26734[data-state="unreachable"]', timeout=WAIT_MS)
                    assert await page.locator(".tile:visible").count() == 3

                    await ups.fault("national", mode="down")
                    await page.wait_for_selector('#unit-26743[data-state="failover"]', timeout=WAIT_MS)
                    assert "dự phòng" in await page.inner_text("#unit-26743")
                    assert app[MONITOR].views["26743"].state == "failover"

                    await page.fill("#filter-text", "con dao")  # without diacritics
                    assert await visible_units(page) == ["26732"]
                    await page.fill("#filter-text", "")
                    await page.select_option("#filter-state", "unreachable")
                    assert await visible_units(page) == ["26734"]
                    assert await page.inner_text("#shown") == "1"
                    assert re.search(r"state=unreachable", page.url)
                    await page.select_option("#filter-state", "")

                    await page.click("#unit-26743")
                    await page.wait_for_selector('#unit[data-state="failover"]', timeout=WAIT_MS)
                    assert page.url == f"{base}/units/26743"
                    assert await page.get_attribute(f'a[href="{url_a}/"]', "href") == f"{url_a}/"
                    assert problems == []
            finally:
                await server.close()


async def visible_units(page: Page) -> list[str]:
    try:
        return sorted(await page.eval_on_selector_all(".tile:not([hidden])", "els => els.map(e => e.dataset.unit)"))
    except Error as exc:  # pragma: no cover - a page that navigated away mid-call
        raise AssertionError(str(exc)) from exc
