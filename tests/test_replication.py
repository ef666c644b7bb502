"""Every dossier reaches both upstream stand-ins, whatever fails on the way."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.national import NationalAdapter
from node.app import Node
from node.clock import Clock, local
from node.config import DEMO_PASSWORD, DEMO_USERNAME, Config, load_config
from tests import factories
from tests.conftest import AGENCY, UNIT, running_node, valid_intake
from tests.upstreams import Upstreams, running_upstreams, target_overrides

TARGETS = ("national", "city")


def replicated_config(tmp_path: Path, ups: Upstreams, **node: Any) -> Config:
    overrides: dict[str, Any] = {
        "node": {
            "unit": UNIT,
            "agency_code": AGENCY,
            "listen": "127.0.0.1:0",
            "data_dir": str(tmp_path / "node"),
            **node,
        },
        **target_overrides(ups, timeout_s=1.0),
    }
    return load_config(env={}, overrides=overrides)


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Node, str, aiohttp.ClientSession, Upstreams]]:
    async with running_upstreams(tmp_path) as ups, running_node(replicated_config(tmp_path, ups)) as (node, url, s):
        yield node, url, s, ups


async def node_digests(node: Node) -> dict[str, str]:
    return {r[0]: r[1] for r in await node.store.fetchall("SELECT code, digest FROM dossiers")}


async def wait_converged(node: Node, ups: Upstreams, within_s: float = 30.0) -> dict[str, str]:
    """Until both stand-ins hold exactly the node's digests for every dossier of the unit."""
    deadline = time.monotonic() + within_s
    while True:
        local_digests = await node_digests(node)
        remote = {t: await ups.dossiers(t, UNIT) for t in TARGETS}
        if all(remote[t] == local_digests for t in TARGETS):
            return local_digests
        if time.monotonic() > deadline:
            missing = {t: len(set(local_digests.items()) - set(remote[t].items())) for t in TARGETS}
            raise AssertionError(f"not converged after {within_s} s; differing per target: {missing}")
        await asyncio.sleep(0.2)


async def post_workload(url: str, s: aiohttp.ClientSession, n: int, *, start: int = 0) -> list[str]:
    """``n`` intakes, and for every other one the steps 2 → 4 → 9."""
    codes: list[str] = []
    for i in range(start, start + n):
        async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(ChuHoSo=f"Người dân {i}")) as r:
            assert r.status == 201, await r.text()
            code = (await r.json())["MaHoSo"]
            codes.append(code)
        if i % 2 == 0:
            for status in (4, 9):
                async with s.post(
                    f"{url}/api/v1/dossiers/{code}/steps", json={"TrangThai": status, "NguoiXuLy": "Trần Văn Cường"}
                ) as r:
                    assert r.status == 201, await r.text()
    return codes


async def no_duplicates(ups: Upstreams) -> None:
    for t in TARGETS:
        stats = await ups.stats(t)
        assert stats["duplicates"] == 0, (t, stats)


class TestHappyPath:
    """With both upstreams healthy, dossiers and their steps reach both with equal digests."""

    async def test_dossiers_and_steps_converge(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            codes = await post_workload(url, s, 30)
            digests = await wait_converged(node, ups)
            assert set(codes) == set(digests)
            await no_duplicates(ups)
            async with s.get(f"{url}/api/v1/dossiers/{codes[0]}") as r:
                body = await r.json()
            assert {t: body["replication"][t]["state"] for t in TARGETS} == {"national": "synced", "city": "synced"}
            assert body["replication"]["city"]["acked_digest"] == body["digest"]

    async def test_status_reports_both_targets(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            await post_workload(url, s, 3)
            await wait_converged(node, ups)
            async with s.get(f"{url}/api/v1/status") as r:
                status = await r.json()
            assert status["unit"] == UNIT
            assert status["active_source"] == "national"
            for t in TARGETS:
                assert status["targets"][t]["state"] == "healthy"
                assert status["targets"][t]["lag_records"] == 0
                assert status["targets"][t]["last_ok_at"] is not None


FAULTS: list[dict[str, Any]] = [
    {"mode": "down"},
    {"mode": "error_rate", "rate": 0.5},
    {"mode": "latency", "ms": 300},
    {"mode": "blackhole"},
    {"mode": "throttle", "retry_after_s": 0.2, "rate": 0.7},
    {"mode": "session_expiry", "after_s": 0},
    {"mode": "partial", "rate": 0.5},
    {"mode": "flapping", "period_s": 0.5},
]


class TestFaults:
    """Under every fault mode on either target, intake goes on and everything converges afterwards."""

    @pytest.mark.parametrize("target", TARGETS)
    @pytest.mark.parametrize("fault", FAULTS, ids=[f["mode"] for f in FAULTS])
    async def test_converges_after_fault(self, tmp_path: Path, target: str, fault: dict[str, Any]) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            await post_workload(url, s, 6)
            await ups.fault(target, **fault)
            await post_workload(url, s, 10, start=6)
            await asyncio.sleep(1.0)
            await post_workload(url, s, 4, start=16)
            await ups.clear(target)
            digests = await wait_converged(node, ups, within_s=40)
            assert len(digests) == 20
            await no_duplicates(ups)

    async def test_both_down_node_keeps_accepting(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            for t in TARGETS:
                await ups.fault(t, mode="down")
            codes = await post_workload(url, s, 12)
            await asyncio.sleep(0.5)
            for t in TARGETS:
                assert await ups.dossiers(t, UNIT) == {}
            async with s.get(f"{url}/api/v1/status") as r:
                status = await r.json()
            assert all(status["targets"][t]["lag_records"] > 0 for t in TARGETS)
            for t in TARGETS:
                await ups.clear(t)
            assert set(await wait_converged(node, ups)) == set(codes)


class TestCollision:
    """A code the portal holds for another citizen is dead-lettered, never overwritten."""

    async def test_collision_goes_to_dead_letters(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            day = local(Clock().now()).strftime("%y%m%d")
            taken = factories.code(1, day)
            other = factories.new_dossier(
                taken, unit=factories.OTHER_UNIT, SoGiayToChuHoSo="079000000001", ChuHoSo="Phạm Thị Khác"
            )
            adapter = NationalAdapter(
                ups.national_url, username=DEMO_USERNAME, password=DEMO_PASSWORD, dstcode=AGENCY, madonvi=AGENCY
            )
            try:
                [res] = await adapter.push([factories.outgoing(other)])
                assert res.outcome.value == "acked"
            finally:
                await adapter.close()
            before = (await ups.dossiers("national", factories.OTHER_UNIT))[taken]

            async with running_node(replicated_config(tmp_path, ups)) as (_node, url, s):
                [code] = await post_workload(url, s, 1, start=1)
                assert code == taken  # the other unit's dossier is not in this unit's feed
                deadline = time.monotonic() + 20
                while True:
                    async with s.get(f"{url}/api/v1/dead-letters") as r:
                        items = (await r.json())["items"]
                    if items or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert [(i["target"], i["code"], i["state"]) for i in items] == [("national", code, "dead")]
                assert "collision" in items[0]["reason"]
                # The city system has no such dossier: there the node's dossier is simply created.
                assert code in await ups.dossiers("city", UNIT)
            assert (await ups.dossiers("national", factories.OTHER_UNIT))[taken] == before


class TestSeeding:
    """A node starting on an empty store never re-mints a code the upstreams already hold for its unit."""

    async def test_counters_seeded_from_upstream(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            day = local(Clock().now()).strftime("%y%m%d")
            existing = factories.new_dossier(factories.code(7, day))
            adapter = NationalAdapter(
                ups.national_url, username=DEMO_USERNAME, password=DEMO_PASSWORD, dstcode=AGENCY, madonvi=AGENCY
            )
            try:
                await adapter.push([factories.outgoing(existing)])
            finally:
                await adapter.close()
            async with running_node(replicated_config(tmp_path, ups)) as (_node, url, s):
                [code] = await post_workload(url, s, 1, start=1)
            assert code == factories.code(8, day)


class TestDeadLetterRetry:
    """A parked dossier is listed, and a retry through the API sends it again."""

    async def test_parked_then_retried(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups:
            overrides = target_overrides(ups, timeout_s=1.0)
            overrides["replication"] = {**overrides["replication"], "max_attempts": 2}
            config = load_config(
                env={},
                overrides={
                    "node": {
                        "unit": UNIT,
                        "agency_code": AGENCY,
                        "listen": "127.0.0.1:0",
                        "data_dir": str(tmp_path / "node"),
                    },
                    **overrides,
                },
            )
            await ups.fault("city", mode="partial", rate=1.0)
            async with running_node(config) as (node, url, s):
                [code] = await post_workload(url, s, 1)
                deadline = time.monotonic() + 20
                items: list[dict[str, Any]] = []
                while not items and time.monotonic() < deadline:
                    async with s.get(f"{url}/api/v1/dead-letters", params={"target": "city"}) as r:
                        items = (await r.json())["items"]
                    await asyncio.sleep(0.1)
                assert [(i["code"], i["state"]) for i in items] == [(code, "parked")]
                await ups.clear("city")
                async with s.post(f"{url}/api/v1/dead-letters/city/{code}/retry") as r:
                    assert r.status == 202
                await wait_converged(node, ups)
                async with s.get(f"{url}/api/v1/dead-letters") as r:
                    assert (await r.json())["items"] == []


class TestJournalRetention:
    """Entries every target acknowledged are pruned; later changes still replicate from the dossier rows."""

    async def test_prune_then_keep_replicating(self, tmp_path: Path) -> None:
        from datetime import timedelta

        from sync import journal

        async with cluster(tmp_path) as (node, url, s, ups):
            codes = await post_workload(url, s, 8)
            await wait_converged(node, ups)
            before = await node.store.fetchone("SELECT count(*) FROM journal")
            pruned = await journal.prune(
                node.store, list(node.replicators), retention=timedelta(0), clock=Clock(timedelta(seconds=1))
            )
            after = await node.store.fetchone("SELECT count(*) FROM journal")
            assert before is not None and after is not None
            assert pruned == before[0] > 0 and after[0] == 0
            async with s.post(
                f"{url}/api/v1/dossiers/{codes[1]}/steps", json={"TrangThai": 4, "NguoiXuLy": "Trần Văn Cường"}
            ) as r:
                assert r.status == 201
            await wait_converged(node, ups)

    async def test_nothing_pruned_while_a_target_lags(self, tmp_path: Path) -> None:
        from datetime import timedelta

        from sync import journal

        async with cluster(tmp_path) as (node, url, s, ups):
            await ups.fault("city", mode="down")
            await post_workload(url, s, 4)
            await asyncio.sleep(0.5)
            before = await node.store.fetchone("SELECT count(*) FROM journal")
            await journal.prune(
                node.store, list(node.replicators), retention=timedelta(0), clock=Clock(timedelta(seconds=1))
            )
            after = await node.store.fetchone("SELECT count(*) FROM journal")
            assert before == after
            await ups.clear("city")
            await wait_converged(node, ups)
