"""Live drills: real nodes behind both stand-ins, driven only through their status and drill-control APIs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.app import Node
from node.config import DEMO_PASSWORD, DEMO_USERNAME, load_config
from node.fleet import load_inventory
from simulations.drill import load_scenario
from simulations.live import (
    LiveOptions,
    LiveScenarioError,
    abort,
    live_phases,
    load_live_inventory,
    main,
    run_live,
)
from simulations.report import write_report
from tests.conftest import running_node, valid_intake
from tests.opshelp import wait_synced
from tests.upstreams import Upstreams, running_upstreams, target_overrides

ROOT = Path(__file__).resolve().parent.parent
FLEET = (("26743", "000.00.17.H29"), ("25747", "000.20.00.H29"))
FAST_FAILOVER = {"probe_interval_s": 0.2, "probe_timeout_s": 1.0, "hold_s": 1.0, "evaluate_s": 0.1,
                 "window_s": 3.0, "open_base_s": 0.5, "open_cap_s": 2.0}

HOLD_OPEN = """
name = "hold-open"
description = "A slow national portal and the city forced, both for the whole simulated hour."

[drill]
hours = 1
minutes = 1

[[phase]]
at = 0
action = "fault"
target = "national"
mode = "latency"
ms = 20
for = "1h"
label = "national portal slow"

[[phase]]
at = 0
action = "force"
primary = "city"
for = "1h"
label = "city forced"
"""


@contextlib.asynccontextmanager
async def live_fleet(tmp_path: Path, *, max_attempts: int = 50) -> AsyncIterator[
        tuple[Upstreams, list[tuple[Node, str, aiohttp.ClientSession]], list[str]]]:
    """Both stand-ins, a node per FLEET unit, and a drill token (drill and read-only roles) for each."""
    async with running_upstreams(tmp_path / "ups") as ups, contextlib.AsyncExitStack() as stack:
        nodes = []
        tokens = []
        for unit, agency in FLEET:
            overrides = target_overrides(ups)
            overrides["targets.national"] |= {"dstcode": agency, "madonvi": agency}
            overrides["replication"] |= {"max_attempts": max_attempts}
            config = load_config(env={}, overrides={
                "node": {"unit": unit, "agency_code": agency, "listen": "127.0.0.1:0",
                         "data_dir": str(tmp_path / unit)},
                **overrides,
                "failover": FAST_FAILOVER,
            })
            running = await stack.enter_async_context(running_node(config))
            nodes.append(running)
            tokens.append(await running[0].auth.create_token(["drill", "read-only"], name="dx-centre drill"))
        yield ups, nodes, tokens


def write_inventory(path: Path, ups: Upstreams, nodes: list[Any], tokens: list[str], *, portal: bool = True,
                    extra: str = "") -> Path:
    text = "".join(f'[[unit]]\nunit = "{unit}"\nurl = "{url}"\ntoken = "{token}"\n\n'
                   for (unit, _), (_, url, _), token in zip(FLEET, nodes, tokens, strict=True))
    if portal:
        text += (f'[portal]\nurl = "{ups.national_url}"\nusername = "{DEMO_USERNAME}"\n'
                 f'password_env = "DRILL_PORTAL_PASSWORD"\ndstcode = "{FLEET[0][1]}"\n')
    path.write_text(text + extra, encoding="utf-8")
    return path


async def status(s: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with s.get(f"{url}/api/v1/status") as r:
        assert r.status == 200
        return dict(await r.json())


async def windows(s: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    async with s.get(f"{url}/api/v1/admin/faults") as r:
        assert r.status == 200
        return list((await r.json())["windows"])


async def stored_counts(ups: Upstreams, nodes: list[Any]) -> dict[str, int]:
    counts = {t: int((await ups.stats(t))["dossiers"]) for t in ("national", "city")}
    for node, _url, _s in nodes:
        row = await node.store.fetchone("SELECT count(*) FROM dossiers")
        counts[node.config.node.unit] = int(row[0])
    return counts


def test_scenarios_a_live_fleet_cannot_act_out_are_refused() -> None:
    with pytest.raises(LiveScenarioError) as crash:
        live_phases(load_scenario("node-crash"))
    assert "process kills" in str(crash.value)
    with pytest.raises(LiveScenarioError) as throttle:
        live_phases(load_scenario("throttling"))
    assert "'throttle'" in str(throttle.value) and "down, blackhole, latency, error_rate" in str(throttle.value)
    with pytest.raises(LiveScenarioError) as skew:
        live_phases(load_scenario("clock-skew"))
    assert "clocks" in str(skew.value)
    # What a node's own fault windows express is accepted, with the phase's length as the window's TTL.
    (ph,) = live_phases(load_scenario("partition"))
    assert (ph.action, ph.targets, ph.mode, ph.units, ph.duration) == ("fault", ["national", "city"], "down",
                                                                        "25%", 7200.0)
    slow = live_phases(load_scenario("slow-primary"))
    assert slow[0].params == {"ms": 1500.0}


def test_the_command_refuses_before_touching_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text('[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:9"\ntoken = "t"\n', encoding="utf-8")
    assert main(["run", "--fleet", str(inv), "--scenario", "node-crash"]) == 2
    assert "cannot run on a live fleet" in capsys.readouterr().err
    inv.write_text('[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:9"\ntoken = "t"\n[portal]\nurl = "x"\n',
                   encoding="utf-8")
    assert main(["abort", "--fleet", str(inv)]) == 2
    err = capsys.readouterr().err
    assert "portal.username: required" in err and "portal.password" in err


def test_one_inventory_serves_the_dashboard_and_live_drills(tmp_path: Path) -> None:
    inv = tmp_path / "fleet.toml"
    inv.write_text('[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:9"\ntoken = "t"\n\n[portal]\n'
                   'url = "http://127.0.0.1:10/"\nusername = "dx"\npassword_env = "P"\ndstcode = "000.00.17.H29"\n',
                   encoding="utf-8")
    assert [n.unit for n in load_inventory(inv)] == ["26743"]
    live = load_live_inventory(inv, env={"P": "secret"})
    assert live.portal is not None and live.portal.url == "http://127.0.0.1:10"
    assert (live.portal.password, live.portal.madonvi) == ("secret", "000.00.17.H29")
    assert "secret" not in repr(live.portal)


async def test_live_national_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRILL_PORTAL_PASSWORD", DEMO_PASSWORD)
    async with live_fleet(tmp_path) as (ups, nodes, tokens):
        for _node, url, s in nodes:
            for i in range(3):
                async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(ChuHoSo=f"Người dân {i}")) as r:
                    assert r.status == 201, await r.text()
        for node, _url, _s in nodes:
            await wait_synced(node)
        before = await stored_counts(ups, nodes)
        inv = write_inventory(tmp_path / "fleet.toml", ups, nodes, tokens)
        # The national outage of the scenario (90 min into an 8 h day, for 2 h) compressed into 12 s:
        # the fault windows open at 2.25 s and lapse at 5.25 s.
        opts = LiveOptions(inventory=inv, scenario=load_scenario("national-outage"), minutes=0.2, poll_s=0.2,
                           settle_s=30.0, timeout_s=3.0)
        seen_open: dict[str, int] = {}
        posted: list[str] = []

        async def watch() -> None:
            while True:
                for (unit, _), (_node, url, s) in zip(FLEET, nodes, strict=True):
                    seen_open[unit] = max(seen_open.get(unit, 0), len(await windows(s, url)))
                await asyncio.sleep(0.2)

        async def desks() -> None:
            """The fleet's own traffic while the drill runs: a dossier at each desk every 0.4 s for 4 s."""
            for i in range(10):
                for _node, url, s in nodes:
                    async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(ChuHoSo=f"Khách {i}")) as r:
                        assert r.status == 201, await r.text()
                        posted.append((await r.json())["MaHoSo"])
                await asyncio.sleep(0.4)

        watcher = asyncio.create_task(watch())
        traffic = asyncio.create_task(desks())
        started = time.monotonic()
        try:
            r = await run_live(opts)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        took = time.monotonic() - started
        await traffic

        # Each node had the national window open during the drill, and nothing is left open now.
        assert seen_open == {unit: 1 for unit, _ in FLEET}
        for _node, url, s in nodes:
            assert await windows(s, url) == []
            st = await status(s, url)
            assert st["forced"] is None and st["active_source"] == "national"
            assert any(e["kind"] == "switch" and e["to"] == "city" for e in st["events"])
        (phase,) = r["phases"]
        assert phase["kind"] == "fault" and phase["calls"] == 2 and phase["failed"] == []
        assert 1.5 < phase["at_s"] < 3.5 and phase["ttl_s"] == pytest.approx(3.0)

        c = r["checker"]
        (fo,) = c["failover"]["phases"]
        assert (fo["units"], fo["detected"], fo["switched"], fo["failed_back"]) == (2, 2, 2, 2)
        # Switch times come from the nodes' event logs; a breaker's opening is seen by polling, or taken from
        # the switch it caused when that came first.
        assert 0 < fo["switch_s"]["max"] < 3.0
        for unit, per in fo["per_unit"].items():
            assert 0 < per["detect_s"] <= per["switch_s"] + 0.05, (unit, per)
        assert set(c["lag"]) == {"national", "city"} and c["lag"]["national"]["seconds"]["n"] > 10
        # Dossiers taken at the desks during the outage waited for the national portal, then drained.
        assert c["lag"]["national"]["peak_backlog"] >= 2 and c["lag"]["national"]["drain_s"] is not None
        assert c["dead_letters"]["national"] == {"before": 0, "after": 0, "new": 0}
        sample = c["portal_sample"]
        assert sample["status"] == "checked"
        assert (sample["sampled"], sample["expected"], sample["found"], sample["missing"], sample["different"],
                sample["errors"]) == (10, 10, 10, 0, 0, 0)
        assert c["lost"] == 0 and c["converged"] is True and c["left_open"] == []
        assert r["invariants"] == {"dead_letters": True, "converged": True, "restored": True, "switched": True,
                                   "lost": True}
        assert r["ok"] is True and r["mode"] == "live fleet" and r["timings"]["drain_s"] >= 0
        active = [e for e in r["timeline"] if e["kind"] == "active"]
        assert {(e["unit"], e["to"]) for e in active} == {(u, t) for u, _ in FLEET for t in ("city", "national")}

        # The drill sent no dossier anywhere: what the upstreams and nodes gained is what the desks took.
        assert len(posted) == 20
        after = await stored_counts(ups, nodes)
        assert after == {k: v + (20 if k in ("national", "city") else 10) for k, v in before.items()}
        assert c["acknowledged"] == 20  # one journal entry per intake

        files = write_report(r, tmp_path / "report")
        md = files["md"].read_text(encoding="utf-8")
        assert "| mode | live fleet |" in md and "| national portal down: switched | 2/2 | ok |" in md
        assert "| portal sample (TraCuuHoSo) | 10 due, 10 found, 0 missing, 0 different" in md
        assert "VIOLATED" not in md
        assert took < 20, f"the live drill took {took:.1f} s"


async def test_the_checker_finds_a_record_the_portal_lost_and_new_parked_dossiers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRILL_PORTAL_PASSWORD", DEMO_PASSWORD)
    async with live_fleet(tmp_path, max_attempts=3) as (ups, nodes, tokens):
        (node_a, url_a, s_a), _b = nodes
        codes = []
        for i in range(3):
            async with s_a.post(f"{url_a}/api/v1/dossiers", json=valid_intake(ChuHoSo=f"Người dân {i}")) as r:
                assert r.status == 201, await r.text()
                codes.append((await r.json())["MaHoSo"])
        await wait_synced(node_a)
        # The portal loses the newest record (restored from an older backup, say); the node still holds its ack.
        db = sqlite3.connect(tmp_path / "ups" / "national" / "national_portal.sqlite3")
        with db:
            db.execute("DELETE FROM steps WHERE code = ?", (codes[-1],))
            assert db.execute("DELETE FROM dossiers WHERE code = ?", (codes[-1],)).rowcount == 1
        db.close()
        inv = write_inventory(tmp_path / "fleet.toml", ups, nodes, tokens)
        drill = asyncio.create_task(run_live(LiveOptions(
            inventory=inv, scenario=load_scenario("national-outage"), minutes=0.1, poll_s=0.2, settle_s=30.0)))
        await asyncio.sleep(0.3)
        # While the drill runs, the city system refuses every record: the node parks the dossier taken now.
        await ups.fault("city", mode="partial", rate=1.0)
        async with s_a.post(f"{url_a}/api/v1/dossiers", json=valid_intake(ChuHoSo="Khách cuối")) as r:
            assert r.status == 201, await r.text()
            parked = (await r.json())["MaHoSo"]
        r = await drill
        await ups.clear("city")
        c = r["checker"]
        assert (c["lost"], c["lost_checked"]) == (1, True)
        assert c["examples"]["lost"][0]["code"] == codes[-1]
        assert c["dead_letters"]["city"] == {"before": 0, "after": 1, "new": 1}
        assert c["new_dead_letters"] == 1 and c["examples"]["dead_letters"][0]["unit"] == FLEET[0][0]
        async with s_a.get(f"{url_a}/api/v1/dead-letters", params={"target": "city"}) as resp:
            assert parked in json.dumps(await resp.json())
        assert r["invariants"]["lost"] is False and r["invariants"]["dead_letters"] is False
        assert r["invariants"]["restored"] is True and r["ok"] is False
        md = write_report(r, tmp_path / "report")["md"].read_text(encoding="utf-8")
        assert "FAILED: an invariant is violated" in md
        assert "| new dead or parked dossiers | 1 | VIOLATED |" in md


async def test_a_live_drill_without_a_portal_skips_the_sample(tmp_path: Path) -> None:
    async with live_fleet(tmp_path) as (ups, nodes, tokens):
        inv = write_inventory(tmp_path / "fleet.toml", ups, nodes, tokens, portal=False)
        sc = load_scenario("city-outage")
        r = await run_live(LiveOptions(inventory=inv, scenario=sc, minutes=0.1, poll_s=0.2, settle_s=30.0))
        assert r["checker"]["portal_sample"]["status"] == "skipped"
        assert "lost" not in r["invariants"] and r["checker"]["lost_checked"] is False
        assert "no national portal" in r["checker"]["portal_sample"]["reason"]
        # A city outage is no failover: nobody leaves the national portal.
        assert r["checker"]["failover"]["phases"] == []
        assert not [e for e in r["timeline"] if e["kind"] == "active"]
        assert r["ok"] is True and r["fleet_healthy_at_start"] is True and r["errors"] == []
        for _node, url, s in nodes:
            assert await windows(s, url) == []

        # A unit the runner cannot reach fails the drill, without holding up the others' settling.
        gone = write_inventory(tmp_path / "gone.toml", ups, nodes, tokens, portal=False,
                               extra='[[unit]]\nunit = "25760"\nurl = "http://127.0.0.1:9"\ntoken = "t"\n')
        started = time.monotonic()
        r = await run_live(LiveOptions(inventory=gone, scenario=sc, minutes=0.1, poll_s=0.2, settle_s=30.0))
        assert time.monotonic() - started < 20
        (phase,) = r["phases"]
        assert phase["calls"] == 3 and [f.split(":")[:2] for f in phase["failed"]] == [["25760", " unreachable"]]
        assert r["fleet_healthy_at_start"] is False
        assert any(e.startswith("25760: unreachable at the start") for e in r["errors"])
        assert r["invariants"]["restored"] is False and r["invariants"]["converged"] is False and r["ok"] is False
        assert [x["unit"] for x in r["checker"]["left_open"]] == ["25760"]


async def until_held_open(nodes: list[Any], running: Any) -> None:
    """Until every node has a fault window open and a forced choice (``running()`` false: the drill ended)."""
    deadline = time.monotonic() + 20
    while True:
        states = [(await windows(s, url), (await status(s, url))["forced"]) for _n, url, s in nodes]
        if all(w and f for w, f in states):
            return
        assert running(), "the drill ended early"
        assert time.monotonic() < deadline, f"the drill did not open its windows: {states}"
        await asyncio.sleep(0.1)


async def test_an_interrupted_drill_ends_what_it_opened(tmp_path: Path) -> None:
    async with live_fleet(tmp_path) as (ups, nodes, tokens):
        inv = write_inventory(tmp_path / "fleet.toml", ups, nodes, tokens, portal=False)
        scenario = tmp_path / "hold-open.toml"
        scenario.write_text(HOLD_OPEN, encoding="utf-8")
        # Ctrl-C (SIGINT) cancels the drill's task, in asyncio.run and in wardsync drill alike.
        task = asyncio.create_task(run_live(LiveOptions(inventory=inv, scenario=load_scenario(str(scenario)),
                                                        poll_s=0.2)))
        await until_held_open(nodes, lambda: not task.done())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _node, url, s in nodes:
            assert await windows(s, url) == []
            st = await status(s, url)
            assert st["forced"] is None
            assert any(e["kind"] == "forced_released" for e in st["events"])


async def test_abort_ends_what_a_killed_drill_left_open(tmp_path: Path) -> None:
    """``wardsync drill --fleet`` killed with SIGKILL mid-drill, then ``wardsync drill abort --fleet``."""
    async with live_fleet(tmp_path) as (ups, nodes, tokens):
        inv = write_inventory(tmp_path / "fleet.toml", ups, nodes, tokens, portal=False)
        scenario = tmp_path / "hold-open.toml"
        scenario.write_text(HOLD_OPEN, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "drill", "--fleet", str(inv), "--scenario", str(scenario),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await until_held_open(nodes, lambda: proc.returncode is None)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # a runner that dies hard cleans nothing up
            await proc.wait()
        await asyncio.sleep(0.5)
        for _node, url, s in nodes:
            (w,) = await windows(s, url)
            assert w["mode"] == "latency" and 0 < w["remaining_s"] <= 60.0  # the phase's hour, compressed
            st = await status(s, url)
            assert st["forced"]["source"] == "city" and st["active_source"] == "city"

        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "drill", "abort", "--fleet", str(inv), cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await done.communicate()
        assert done.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        assert sorted(lines[:2]) == sorted(f"{u} {n}: ok, 1 fault window closed, source automatic"
                                           for u, n in (("26743", "Phường Bến Thành"), ("25747", "Phường Thủ Dầu Một")))
        assert lines[2] == "2/2 units restored"
        for _node, url, s in nodes:
            assert await windows(s, url) == []
            st = await status(s, url)
            assert st["forced"] is None
            assert any(e["kind"] == "forced_released" for e in st["events"])

        # A unit whose token the node refuses, and one whose node is gone: abort says so and exits 1.
        bad = write_inventory(tmp_path / "bad.toml", ups, nodes, tokens, portal=False, extra=(
            f'[[unit]]\nunit = "25750"\nurl = "{nodes[0][1]}"\ntoken = "wst_not-a-token"\n\n'
            '[[unit]]\nunit = "25760"\nurl = "http://127.0.0.1:9"\ntoken = "t"\n'))
        out = io.StringIO()
        assert await asyncio.to_thread(abort, bad, out=out) == 1
        text = out.getvalue()
        assert "25750 Phường Phú Lợi: FAILED: fault windows: HTTP 401" in text
        assert "25760 Phường Bình Dương: FAILED: fault windows: unreachable" in text
        assert "2/4 units restored, 2 FAILED" in text
