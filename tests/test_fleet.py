"""The fleet inventory and the fleet dashboard."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from node.cli import main
from node.demo import free_port
from node.fleet import MONITOR, FleetMonitor, FleetNode, InventoryError, build_fleet_app, classify, load_inventory
from tests.conftest import make_config, running_node


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestInventory:
    """The inventory file: one [[unit]] per node, every bad entry reported with its index."""

    def test_reads_tokens_inline_and_from_the_environment(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8080/"\ntoken = "abc"\n'
            '[[unit]]\nunit = "26732"\nurl = "https://node.example:8443"\ntoken_env = "TOK_26732"\n',
        )
        nodes = load_inventory(path, env={"TOK_26732": "  xyz\n"})
        assert nodes == [
            FleetNode("26743", "Phường Bến Thành", "http://127.0.0.1:8080", "abc"),
            FleetNode("26732", "Đặc khu Côn Đảo", "https://node.example:8443", "xyz"),
        ]
        assert "abc" not in repr(nodes[0])

    def test_lists_every_bad_entry_with_its_index(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8080"\ntoken = "a"\n'
            '[[unit]]\nunit = "26734"\nurl = "ftp://x"\ntoken = "b"\n'
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8081"\ntoken_env = "MISSING_VAR"\ncolour = 1\n'
            '[[unit]]\nurl = "http://127.0.0.1:8082"\ntoken = "c"\ntoken_env = "X"\n',
        )
        with pytest.raises(InventoryError) as info:
            load_inventory(path, env={})
        problems = info.value.problems
        assert isinstance(info.value, ValueError)
        assert any(p.startswith("unit[1] (26734): unit:") for p in problems)
        assert any(p.startswith("unit[1] (26734): url:") for p in problems)
        assert any(p.startswith("unit[2] (26743): unit: 26743 is already listed at unit[0]") for p in problems)
        assert any(p.startswith("unit[2] (26743): token_env:") and "MISSING_VAR" in p for p in problems)
        assert any(p.startswith("unit[2] (26743): colour: unknown key") for p in problems)
        assert any(p.startswith("unit[3]: unit: required") for p in problems)
        assert any(p.startswith("unit[3]: token, token_env:") for p in problems)
        assert not any(p.startswith("unit[0]") for p in problems)
        assert "unit[1]" in str(info.value)

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "no [[unit]] entries"),
            ("unit = 3\n", "array of tables"),
            ("[[unit]\n", "not valid TOML"),
            ('[fleet]\nx = 1\n[[unit]]\nunit = "26743"\nurl = "http://a"\ntoken = "t"\n', "fleet: unknown top-level"),
        ],
    )
    def test_refuses_a_malformed_file(self, tmp_path: Path, text: str, fragment: str) -> None:
        with pytest.raises(InventoryError, match=None) as info:
            load_inventory(write(tmp_path, text), env={})
        assert any(fragment in p for p in info.value.problems), info.value.problems

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InventoryError, match="file not found"):
            load_inventory(tmp_path / "nope.toml")


class TestClassify:
    """A node's state on the grid follows from its status answer."""

    def test_states(self) -> None:
        healthy = {"state": "healthy", "breaker": "closed", "dead": 0, "parked": 0}
        down = {"state": "down", "breaker": "open", "dead": 0, "parked": 0}
        both = {"national": healthy, "city": healthy}
        assert classify({"active_source": "national", "offline": False, "targets": both}) == ("healthy", "")
        assert classify({"active_source": None, "offline": False, "targets": {}})[0] == "healthy"
        assert classify({"active_source": None, "offline": True, "targets": {"national": down, "city": down}})[
            0
        ] == "offline"
        state, reason = classify({"active_source": "city", "targets": {"national": down, "city": healthy}})
        assert state == "failover" and "national: down (breaker open)" in reason
        state, reason = classify({"active_source": "national", "targets": {"national": down, "city": healthy}})
        assert state == "degraded"
        stuck = {**healthy, "parked": 2}
        assert classify({"active_source": "national", "targets": {"national": healthy, "city": stuck}}) == (
            "degraded",
            "2 dead letter(s)",
        )


@contextlib.asynccontextmanager
async def fleet_server(inventory: list[FleetNode]) -> AsyncIterator[tuple[FleetMonitor, str, aiohttp.ClientSession]]:
    app = build_fleet_app(inventory, poll_s=3600.0, timeout_s=1.0)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as browser:
            yield app[MONITOR], str(server.make_url("")).rstrip("/"), browser
    finally:
        await server.close()


class TestFleetDashboard:
    """The grid polls every node with its own token, server side, and shows each unit's state."""

    async def test_grid_shows_each_unit_in_its_state(self, tmp_path: Path) -> None:
        async with (
            running_node(make_config(tmp_path / "a")) as (node_a, url_a, _sa),
            running_node(make_config(tmp_path / "b", unit="26732", agency_code="000.00.99.H29")) as (_nb, url_b, _sb),
        ):
            token_a = await node_a.auth.create_token(["read-only"], name="fleet")
            inventory = [
                FleetNode("26743", "Phường Bến Thành", url_a, token_a),
                FleetNode("26732", "Đặc khu Côn Đảo", url_b, "wst_wrong"),
                FleetNode("26734", "Phường Sài Gòn", f"http://127.0.0.1:{free_port()}", "wst_x"),
            ]
            async with fleet_server(inventory) as (monitor, base, browser):
                await monitor.poll_once()
                async with browser.get(f"{base}/api/fleet") as r:
                    body = await r.json()
                states = {u["unit"]: u["state"] for u in body["units"]}
                assert states == {"26743": "healthy", "26732": "unauthorized", "26734": "unreachable"}
                assert body["counts"]["healthy"] == 1 and body["counts"]["unreachable"] == 1
                async with browser.get(f"{base}/") as r:
                    html = await r.text()
                    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                for code, state in states.items():
                    assert re.search(rf'class="tile state-{state}" id="unit-{code}" href="units/{code}"', html)
                assert "Phường Bến Thành" in html and "Đặc khu Côn Đảo" in html
                async with browser.get(f"{base}/units/26743") as r:
                    detail = await r.text()
                    assert r.status == 200
                assert f'href="{url_a}/"' in detail and "Ổn định · Healthy" in detail
                async with browser.get(f"{base}/units/99999") as r:
                    assert r.status == 404
                async with browser.get(f"{base}/?q=%3Cscript%3E&state=bogus") as r:
                    page = await r.text()
                    assert "<script>" not in page and "&lt;script&gt;" in page
                for text in (html, detail, json.dumps(body)):
                    assert token_a not in text and "wst_wrong" not in text


class TestCommand:
    """wardsync fleet-dashboard refuses a bad inventory with exit status 2, listing each problem."""

    def test_bad_inventory(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        path = write(tmp_path, '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:1"\n')
        assert main(["fleet-dashboard", "--fleet", str(path)]) == 2
        err = capsys.readouterr().err
        assert "unit[0] (26743): token: required" in err
