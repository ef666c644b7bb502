"""Rebuilding a lost node: SIGKILL under load, the data directory deleted, ``wardsync bootstrap`` from either
upstream, then ``wardsync merge-store`` when the old disk comes back.

The node runs as a real process (``wardsync serve``) against both stand-ins on loopback; the commands run
as the operator runs them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.ops.recover import RESERVE_MIN, sequence_gaps
from tests.conftest import AGENCY, UNIT, make_config, provision_token, running_node, valid_intake
from tests.opshelp import accept, cli, load, wait_synced, write_config
from tests.upstreams import Upstreams, running_upstreams

TARGETS = ("national", "city")
STEP = {"TrangThai": 4, "NguoiXuLy": "Lê Văn Tám", "NoiDungXuLy": "Thụ lý"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)], env=env, stdout=out, stderr=out
        )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


@asynccontextmanager
async def serving(
    config: Path, url: str, http: aiohttp.ClientSession, log: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``wardsync serve`` as a process, ready; stopped with SIGTERM on exit unless the test killed it."""
    proc = await asyncio.to_thread(_spawn, config, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"node exited with {proc.returncode}:\n{await asyncio.to_thread(_tail, log)}"
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, "node did not become ready"
            await asyncio.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 20)


async def node_digests(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    out: dict[str, str] = {}
    cursor = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        async with http.get(f"{url}/api/v1/dossiers", params=params) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        out.update({d["MaHoSo"]: d["digest"] for d in page["items"]})
        cursor = page["next_cursor"]
        if not cursor:
            return out


async def intake(http: aiohttp.ClientSession, url: str, tag: str) -> tuple[str, str]:
    body = valid_intake(ChuHoSo=f"Người dân {tag}", TrichYeuHoSo=f"Hồ sơ {tag}")
    async with http.post(f"{url}/api/v1/dossiers", json=body) as r:
        assert r.status == 201, await r.text()
        d = await r.json()
    return str(d["MaHoSo"]), str(d["digest"])


async def add_step(http: aiohttp.ClientSession, url: str, code: str, n: int) -> str:
    """Record the step taking a received dossier into processing (status 2 to 4)."""
    step = {**STEP, "ThoiDiemXuLy": f"2030010{n % 9 + 1}080000"}
    async with http.post(f"{url}/api/v1/dossiers/{code}/steps", json=step) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["digest"])


async def upstreams_hold(ups: Upstreams, want: dict[str, str], within_s: float = 40) -> None:
    """Until both upstreams hold exactly ``want`` for the unit (code → digest)."""
    deadline = time.monotonic() + within_s
    while True:
        held = {t: await ups.dossiers(t, UNIT) for t in TARGETS}
        if all(held[t] == want for t in TARGETS):
            return
        if time.monotonic() > deadline:
            diff = {t: sorted(set(held[t].items()) ^ set(want.items()))[:6] for t in TARGETS}
            raise AssertionError(f"the upstreams never came to hold what was expected: {diff}")
        await asyncio.sleep(0.2)


async def parked_everywhere(http: aiohttp.ClientSession, url: str, code: str, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while True:
        async with http.get(f"{url}/api/v1/dead-letters") as r:
            items = (await r.json())["items"]
        if {i["target"] for i in items if i["code"] == code and i["state"] == "parked"} == set(TARGETS):
            return
        assert time.monotonic() < deadline, f"{code} was never parked for both targets: {items}"
        await asyncio.sleep(0.1)


async def stats(ups: Upstreams) -> dict[str, dict[str, Any]]:
    return {t: await ups.stats(t) for t in TARGETS}


def seq_of(code: str) -> tuple[str, int]:
    day, n = code.rsplit("-", 2)[1:]
    return day, int(n)


class TestRebuildALostNode:
    @pytest.mark.parametrize("source", ["city", "national"])
    async def test_sigkill_delete_bootstrap_then_merge_the_old_disk(self, tmp_path: Path, source: str) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            # Two retriable failures park a dossier: that is how one code ends up missing in the middle.
            path = write_config(
                tmp_path, ups, listen=f"127.0.0.1:{port}", replace={"max_attempts = 8": "max_attempts = 2"}
            )
            data = tmp_path / "data"
            log = tmp_path / "node.log"
            acked: dict[str, str] = {}  # every dossier the node acknowledged, with its latest digest
            headers = {"Authorization": f"Bearer {provision_token(path)}"}
            async with aiohttp.ClientSession(headers=headers) as http:
                async with serving(path, url, http, log) as proc:
                    # Load: four desks taking dossiers and recording steps while the node replicates.
                    async def desk(w: int) -> None:
                        for i in range(10):
                            code, digest = await intake(http, url, f"{w}-{i}")
                            acked[code] = digest
                            if i % 2 == 0:
                                acked[code] = await add_step(http, url, code, i)

                    async with asyncio.TaskGroup() as tg:
                        for w in range(4):
                            tg.create_task(desk(w))
                    await upstreams_hold(ups, acked)

                    # A dossier both upstreams fail to store until it is parked: a gap below later codes.
                    for t in TARGETS:
                        await ups.fault(t, mode="partial", rate=1.0)
                    gap, acked_gap = await intake(http, url, "gap")
                    await parked_everywhere(http, url, gap)
                    for t in TARGETS:
                        await ups.clear(t)
                    later = [await intake(http, url, f"later-{i}") for i in range(3)]
                    held = {**acked, **dict(later)}  # what the upstreams hold at the crash
                    await upstreams_hold(ups, held)
                    acked.update(later)
                    acked[gap] = acked_gap

                    # Both upstreams unreachable: what the desk takes now never leaves the node.
                    for t in TARGETS:
                        await ups.fault(t, mode="down")
                    lost = [await intake(http, url, f"lost-{i}") for i in range(2)]
                    acked.update(lost)
                    stepped = later[0][0]  # a step recorded on a dossier the upstreams hold, also never pushed
                    acked[stepped] = await add_step(http, url, stepped, 7)
                    assert await node_digests(http, url) == acked

                    proc.send_signal(signal.SIGKILL)  # the disk dies with the server
                    await asyncio.to_thread(proc.wait, 10)
                for t in TARGETS:
                    await ups.clear(t)
                old = tmp_path / "old-disk"
                shutil.copytree(data, old)  # the disk as it was, in case it comes back
                shutil.rmtree(data)
                before = await stats(ups)

                # Rebuild from one upstream; the other fills in.
                done = await asyncio.to_thread(cli, "bootstrap", "--config", str(path), "--from", source, "--json",
                                               cwd=tmp_path)
                assert done.returncode == 0, done.stderr
                report = json.loads(done.stdout)
                assert report["complete"] and report["source"] == source
                assert report["dossiers"] == len(held)
                by_target = {s["target"]: s for s in report["sources"]}
                assert by_target[source]["created"] == len(held) and by_target[source]["refused"] == 0
                assert by_target[source]["in_sync"] == len(held)  # all recorded as held: none pushed again
                assert report["gaps"] == [gap] and report["gap_count"] == 1  # the parked dossier, by its code
                assert report["last_code"] == max(code for code, _ in later)
                assert all(seq_of(code) > seq_of(report["last_code"]) for code, _ in lost)  # unknown upstream
                reserved = report["reserved"]
                assert reserved["count"] >= RESERVE_MIN
                assert reserved["first"] <= min(c for c, _ in lost) and max(c for c, _ in lost) <= reserved["last"]

                # Tokens lived in the lost store: the operator issues the desks new ones.
                http.headers["Authorization"] = f"Bearer {await asyncio.to_thread(provision_token, path)}"
                async with serving(path, url, http, log):
                    # Every dossier an upstream held is back, as it held it (steps included).
                    assert await node_digests(http, url) == held
                    new_code, new_digest = await intake(http, url, "after")
                    assert new_code not in acked
                    assert seq_of(new_code) > max(seq_of(c) for c in acked)  # past every used code, lost ones too
                    await upstreams_hold(ups, {**held, new_code: new_digest})
                    await asyncio.sleep(1.0)  # a few push and pull ticks: nothing else may travel
                    after = await stats(ups)
                    assert await node_digests(http, url) == {**held, new_code: new_digest}
                for t in TARGETS:
                    # Only the new dossier was sent: nothing the upstreams held went again, as a create or otherwise.
                    assert after[t]["received"] - before[t]["received"] == 1, (t, before[t], after[t])
                    assert after[t]["resends"] == before[t]["resends"]
                    assert after[t]["duplicates"] == 0 and after[t]["rejected"] == 0
                portal_requests = after["national"]["requests"]
                assert portal_requests.get("DongBoHoSoMC:partial", 0) == before["national"]["requests"].get(
                    "DongBoHoSoMC:partial", 0
                )

                # The old disk comes back: its dossiers merge in and reach the upstreams.
                done = await asyncio.to_thread(cli, "merge-store", "--config", str(path), str(old), "--json",
                                               cwd=tmp_path)
                assert done.returncode == 0, done.stderr
                merged = json.loads(done.stdout)
                assert merged["created"] == sorted([gap, *(c for c, _ in lost)])
                assert merged["found_again"] == merged["created"]
                assert merged["changed"] == [stepped] and merged["collisions"] == [] and merged["refused"] == []
                async with serving(path, url, http, log):
                    final = {**acked, new_code: new_digest}
                    assert await node_digests(http, url) == final
                    await upstreams_hold(ups, final)
                end = await stats(ups)
                assert all(end[t]["duplicates"] == 0 for t in TARGETS)


class TestBootstrapReport:
    async def test_text_report_names_the_reserved_codes_and_the_old_disk(self, tmp_path: Path) -> None:
        """Without --json the operator reads what came back, what may be lost, and what to do next."""
        async with running_upstreams(tmp_path / "ups") as ups:
            path = write_config(tmp_path, ups)
            config = load(path)
            async with running_node(config) as (node, base, session):
                made = await accept(session, base, 3)
                await wait_synced(node)
            shutil.rmtree(config.data_path)
            done = await asyncio.to_thread(cli, "bootstrap", "--config", str(path), "--from", "national", cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            out = done.stdout
            last = max(d["MaHoSo"] for d in made)
            assert f"rebuilt {config.db_path} from the national upstream" in out
            assert "national: lists 3 dossiers; 3 recovered" in out and "3 match it (never pushed again)" in out
            assert f"last code any upstream holds: {last}" in out
            assert "wardsync merge-store OLD_DIR" in out
            day, n = seq_of(last)
            assert f"{AGENCY}-{day}-{n + 1:04d}" in out  # the first code left unused

            # A store is there now: bootstrap refuses to overwrite it without --force.
            again = await asyncio.to_thread(cli, "bootstrap", "--config", str(path), "--from", "city", cwd=tmp_path)
            assert again.returncode == 1 and "--force" in again.stderr

    async def test_unreachable_source_keeps_nothing(self, tmp_path: Path) -> None:
        """A rebuild whose upstream cannot be read fails and leaves no half store for the node to serve."""
        async with running_upstreams(tmp_path / "ups") as ups:
            path = write_config(tmp_path, ups)
            await ups.fault("city", mode="down")
            done = await asyncio.to_thread(cli, "bootstrap", "--config", str(path), "--from", "city", cwd=tmp_path)
            assert done.returncode == 1
            assert "the city upstream could not be read" in done.stderr and "nothing was kept" in done.stderr
            assert not (tmp_path / "data" / "wardsync.sqlite3").exists()


class TestSequenceGaps:
    def test_gaps_inside_each_day_and_the_last_code(self) -> None:
        codes = [f"{AGENCY}-250701-0001", f"{AGENCY}-250701-0004", f"{AGENCY}-250702-0002", "other-250703-0009"]
        gaps, last = sequence_gaps(codes, AGENCY)
        assert gaps == [f"{AGENCY}-250701-0002", f"{AGENCY}-250701-0003", f"{AGENCY}-250702-0001"]
        assert last == f"{AGENCY}-250702-0002"


class TestMergeStoreCollision:
    async def test_same_code_on_another_citizens_dossier_is_not_merged(self, tmp_path: Path) -> None:
        """Two stores that minted one code for different citizens: merge-store refuses to mix them."""
        path = write_config(tmp_path)
        config = load(path)
        other = make_config(tmp_path / "other")
        async with running_node(config) as (_, base, session):
            body = valid_intake(ChuHoSo="Trần Văn Minh", SoGiayToChuHoSo="079190009999")
            async with session.post(f"{base}/api/v1/dossiers", json=body) as r:
                mine = await r.json()
            async with session.get(f"{base}/api/v1/dossiers/{mine['MaHoSo']}") as r:
                mine_record = await r.json()
        async with running_node(other) as (_, base, session):
            theirs = await accept(session, base, 2, "theirs")  # the same first code, then one more
        assert theirs[0]["MaHoSo"] == mine["MaHoSo"]
        done = await asyncio.to_thread(cli, "merge-store", "--config", str(path), str(other.data_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"not merged, another dossier holds the code here: {mine['MaHoSo']}" in done.stdout
        assert f"new: {theirs[1]['MaHoSo']}" in done.stdout
        async with running_node(config) as (_, base, session):
            async with session.get(f"{base}/api/v1/dossiers/{mine['MaHoSo']}") as r:
                assert await r.json() == mine_record  # left exactly as it was
            async with session.get(f"{base}/api/v1/dossiers/{theirs[1]['MaHoSo']}") as r:
                assert (await r.json())["digest"] == theirs[1]["digest"]
