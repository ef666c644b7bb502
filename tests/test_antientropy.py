"""Anti-entropy finds what replication and pulling missed, in either direction, and repairs it."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.base import Outgoing, Upstream, UpstreamError
from node.app import Node
from node.clock import Clock, dvcqg
from simulations import city_system, national_portal
from sync import doc as ydoc
from sync.antientropy import AntiEntropy
from sync.puller import Puller
from sync.record import bucket_of, digest, materialise
from tests import factories
from tests.conftest import UNIT
from tests.test_contract import adapter_for
from tests.test_pull import city, portal
from tests.test_replication import TARGETS, cluster, no_duplicates, node_digests, post_workload, wait_converged
from tests.upstreams import Upstreams

BUCKETS = 4
OFFICER_CLIENT = 777_000_333


def anti_entropy(node: Node, target: str, buckets: int = BUCKETS) -> AntiEntropy:
    """Wired as the node wires it, through the guarded path so fault windows and the breaker apply."""
    return AntiEntropy(
        node.store,
        node.guarded[target],
        node.replicators[target],
        node.pullers[target],
        unit=UNIT,
        buckets=buckets,
        wake=node.loops[target].wake,
    )


def lose(tmp_path: Path, target: str, code: str) -> None:
    """The upstream loses a dossier it acknowledged (a restore from an older backup, an operator's delete)."""
    tables: tuple[str, ...]
    if target == "city":
        path, tables = tmp_path / "city" / city_system.DB_NAME, ("dossiers",)
    else:
        path, tables = tmp_path / "national" / national_portal.DB_FILE, ("dossiers", "steps", "seen_records")
    conn = sqlite3.connect(path)
    try:
        with conn:
            for table in tables:
                conn.execute(f"DELETE FROM {table} WHERE code = ?", (code,))
    finally:
        conn.close()


async def skip_feed(node: Node, target: str) -> None:
    """Move the node's pull cursor for ``target`` past anything the upstream will list: the feed misses it."""
    await node.store.write(
        lambda conn: conn.execute(
            "INSERT INTO pull_cursors (target, seq) VALUES (?, ?)"
            " ON CONFLICT (target) DO UPDATE SET seq = excluded.seq",
            (target, 10**12),
        )
    )
    node.pullers[target].reload_cursor()
    await asyncio.sleep(0.6)  # a pull step that read the old cursor has finished by now


async def settled(node: Node, target: str, within_s: float = 20.0) -> None:
    """Until the target's replicator has gone past every journal entry and has nothing pending."""
    deadline = time.monotonic() + within_s
    rep = node.replicators[target]
    while True:
        row = await node.store.fetchone(
            "SELECT count(*) FROM replication WHERE target = ? AND state = 'pending'", (target,)
        )
        if await rep.cursor() >= node.service.journal_head and row is not None and row[0] == 0:
            return
        assert time.monotonic() < deadline, f"{target} never settled"
        await asyncio.sleep(0.05)


async def record_of(s: aiohttp.ClientSession, url: str, code: str) -> dict[str, Any] | None:
    async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
        return None if r.status == 404 else dict(await r.json())


async def add_step(s: aiohttp.ClientSession, url: str, code: str, status: int) -> None:
    async with s.post(
        f"{url}/api/v1/dossiers/{code}/steps", json={"TrangThai": status, "NguoiXuLy": "Trần Văn Cường"}
    ) as r:
        assert r.status == 201, await r.text()


async def push_elsewhere(ups: Upstreams, target: str, out: Outgoing) -> None:
    """Another writer (an officer, an online channel) stores a dossier on one upstream only."""
    adapter: Upstream = city(ups) if target == "city" else portal(ups)
    try:
        [res] = await adapter.push([out])
        assert res.outcome.value == "acked", res
    finally:
        await adapter.close()


class TestBuckets:
    """The node and both upstreams split a unit's dossiers the same way, into disjoint buckets."""

    def test_bucket_is_the_documented_hash(self) -> None:
        code = factories.code(17)
        assert bucket_of(code, 16) == int(hashlib.sha256(code.encode()).hexdigest()[:8], 16) % 16
        assert bucket_of(code, 1) == 0
        with pytest.raises(ValueError):
            bucket_of(code, 0)

    @pytest.mark.parametrize("target", TARGETS)
    async def test_buckets_partition_what_the_upstream_holds(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            docs = [factories.new_dossier(factories.code(i), statuses=(2, 4)) for i in range(1, 21)]
            docs.append(factories.new_dossier(factories.code(99), unit=factories.OTHER_UNIT))
            await adapter.push([factories.outgoing(d) for d in docs])
            pages = [await adapter.digests(UNIT, b, BUCKETS) for b in range(BUCKETS)]
            assert sum(len(p) for p in pages) == 20  # disjoint, and the other unit's dossier is in none
            assert {c: d for p in pages for c, d in p.items()} == await ups.dossiers(target, UNIT)
            for b, page in enumerate(pages):
                assert all(bucket_of(c, BUCKETS) == b for c in page)
            assert sum(1 for p in pages if p) > 1  # twenty codes do not all hash to one bucket


class TestLostUpstream:
    """A dossier an upstream acknowledged and then lost is pushed again, whole."""

    @pytest.mark.parametrize("target", TARGETS)
    async def test_lost_dossier_is_pushed_again(self, target: str, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            codes = await post_workload(url, s, 6)
            await wait_converged(node, ups)
            lost = codes[0]  # one with steps 2 → 4 → 9: they must all come back
            lose(tmp_path, target, lost)
            assert lost not in await ups.dossiers(target, UNIT)

            ae = anti_entropy(node, target)
            await ae.run_round()

            assert ae.stats() | {"last_run_at": None} == {
                "buckets": BUCKETS,
                "next_bucket": 0,
                "rounds": 1,
                "checked": 6,
                "missing_remote": 1,
                "missing_local": 0,
                "different": 0,
                "skipped": 0,
                "repaired": 1,
                "last_run_at": None,
            }
            digests = await wait_converged(node, ups)
            assert (await ups.dossiers(target, UNIT))[lost] == digests[lost]
            await no_duplicates(ups)


class TestOnlyUpstream:
    """A dossier the feed never brought (the cursor ran past it) is pulled in, then reaches the other target."""

    @pytest.mark.parametrize("target", TARGETS)
    async def test_dossier_only_upstream_is_pulled(self, target: str, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            await post_workload(url, s, 2)
            await wait_converged(node, ups)
            await skip_feed(node, target)
            online = factories.new_dossier(
                factories.code(4242), client_id=OFFICER_CLIENT, statuses=(1,), KenhThucHien=2
            )
            out = factories.outgoing(online)
            await push_elsewhere(ups, target, out)
            await asyncio.sleep(0.5)
            assert await record_of(s, url, out.code) is None  # the feed did miss it

            ae = anti_entropy(node, target)
            await ae.run_round()

            body = await record_of(s, url, out.code)  # pulled within the round, not later
            assert body is not None and body["KenhThucHien"] == 2
            assert (ae.missing_local, ae.missing_remote, ae.different, ae.repaired) == (1, 0, 0, 1)
            assert ae.checked == 3
            digests = await wait_converged(node, ups)
            assert digests[out.code] == body["digest"]
            await no_duplicates(ups)


class TestDifferent:
    """Where node and upstream hold different versions, the newer content wins on both, whichever side had it."""

    @pytest.mark.parametrize("target", TARGETS)
    async def test_upstream_behind_while_the_row_claims_synced(self, target: str, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            [code] = await post_workload(url, s, 1, start=1)
            before = await wait_converged(node, ups)
            # The change never reaches the target, yet its row claims the target acknowledged it.
            node.windows.open(target, "down", 60)
            await add_step(s, url, code, 4)
            current = (await node_digests(node))[code]
            await node.store.write(
                lambda conn: conn.execute(
                    "UPDATE replication SET state = 'synced', digest = ?, acked_digest = ?"
                    " WHERE target = ? AND code = ?",
                    (current, current, target, code),
                )
            )
            # A push that read the row before it was forged may still be retrying; one that read it after
            # moves the cursor to the head without sending anything, and only then may the target return.
            await settled(node, target)
            node.windows.clear(target)
            await asyncio.sleep(0.3)
            assert (await ups.dossiers(target, UNIT))[code] == before[code] != current

            ae = anti_entropy(node, target)
            await ae.run_round()

            assert (ae.different, ae.missing_local, ae.missing_remote, ae.repaired) == (1, 0, 0, 1)
            digests = await wait_converged(node, ups)
            assert digests[code] == current  # the upstream's older copy did not pull the node back
            await no_duplicates(ups)

    @pytest.mark.parametrize("target", TARGETS)
    async def test_upstream_ahead_is_pulled_before_pushing(self, target: str, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            [code] = await post_workload(url, s, 1, start=1)
            await wait_converged(node, ups)
            await skip_feed(node, target)
            # An officer processes the dossier on the upstream; the feed does not bring it.
            later = dvcqg(Clock().now() + timedelta(minutes=1))
            if target == "city":
                adapter = city(ups)
                try:
                    fetched = await adapter.fetch(code, None)
                    assert fetched is not None and fetched.update is not None
                    officer = ydoc.load_doc(code, fetched.update, OFFICER_CLIENT)
                    factories.add_status(officer, 4, later)
                    record, _ = materialise(officer)
                    await push_elsewhere(
                        ups, target, Outgoing(code, record, digest(record), officer.get_update(), fetched.state_vector)
                    )
                finally:
                    await adapter.close()
            else:
                national = portal(ups)
                try:
                    stored = await national.fetch(code)
                    assert stored is not None and stored.record is not None
                    record = dict(stored.record)
                finally:
                    await national.close()
                # A field edit matters most here: pushing the node's record first would overwrite it.
                record["NgayHenTra"] = "20301231170000"
                record["QuaTrinhXuLy"] = [*record["QuaTrinhXuLy"], factories.step(code, 4, later, officer="Cán bộ")]
                await push_elsewhere(ups, target, Outgoing(code, record, digest(record), b""))
            await asyncio.sleep(0.5)
            stale = await record_of(s, url, code)
            assert stale is not None and stale["TrangThaiHoSo"] != 4

            ae = anti_entropy(node, target)
            await ae.run_round()

            body = await record_of(s, url, code)
            assert body is not None and body["TrangThaiHoSo"] == 4
            assert (ae.different, ae.missing_local, ae.missing_remote, ae.repaired) == (1, 0, 0, 1)
            digests = await wait_converged(node, ups)
            if target == "national":
                national_now = await ups.dossiers("national", UNIT)
                assert national_now[code] == digests[code]
                assert body["NgayHenTra"] == "20301231170000"
            await no_duplicates(ups)


class TestCounts:
    """Counts add up per kind, over rounds; what is on its way or dead-lettered is left alone."""

    async def test_counts_and_what_is_left_alone(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            codes = await post_workload(url, s, 8)
            await wait_converged(node, ups)
            # Past the node's fault windows: the node's own pushes to the city can be held back below
            # while this one still compares and pulls, so "on its way" stays on its way for the round.
            inner = node.guarded["city"].inner
            ae = AntiEntropy(
                node.store,
                inner,
                node.replicators["city"],
                Puller(node.store, node.service, inner, unit=UNIT),
                unit=UNIT,
                buckets=BUCKETS,
                wake=node.loops["city"].wake,
            )

            await ae.run_round()  # converged: everything checked, nothing to do
            assert ae.stats() | {"last_run_at": None} == {
                "buckets": BUCKETS,
                "next_bucket": 0,
                "rounds": 1,
                "checked": 8,
                "missing_remote": 0,
                "missing_local": 0,
                "different": 0,
                "skipped": 0,
                "repaired": 0,
                "last_run_at": None,
            }
            assert ae.last_run_at is not None

            lost, dead, in_flight = codes[1], codes[3], codes[5]
            await skip_feed(node, "city")
            extra = factories.new_dossier(
                factories.code(4243), client_id=OFFICER_CLIENT, statuses=(1,), KenhThucHien=2
            )
            await push_elsewhere(ups, "city", factories.outgoing(extra))
            lose(tmp_path, "city", lost)
            # Lost too, but dead-lettered for the city: a person decides, not anti-entropy.
            lose(tmp_path, "city", dead)
            await node.store.write(
                lambda conn: conn.execute(
                    "UPDATE replication SET state = 'dead', last_error = 'invalid: test'"
                    " WHERE target = 'city' AND code = ?",
                    (dead,),
                )
            )
            # A change on its way: the city is down for the node, so its journal entry waits past the cursor.
            node.windows.open("city", "down", 60)
            await add_step(s, url, in_flight, 4)
            guarded = anti_entropy(node, "city")
            with pytest.raises(UpstreamError):
                await guarded.run_once()
            assert guarded.next_bucket == 0  # a bucket that could not be compared is tried again, not skipped

            await ae.run_round()

            assert (ae.missing_remote, ae.missing_local, ae.different, ae.skipped) == (1, 1, 0, 2)
            assert ae.repaired == 2
            assert ae.checked == 8 + 9  # this round: the node's eight and the one only the city held
            assert ae.rounds == 2
            assert await record_of(s, url, factories.outgoing(extra).code) is not None
            node.windows.clear("city")
            row = await node.store.fetchone(
                "SELECT state FROM replication WHERE target = 'city' AND code = ?", (dead,)
            )
            assert row is not None and row[0] == "dead"

            async def repaired() -> bool:
                held = await ups.dossiers("city", UNIT)
                mine = await node_digests(node)
                return all(held.get(c) == mine[c] for c in mine if c != dead)

            deadline = time.monotonic() + 20
            while not await repaired():
                assert time.monotonic() < deadline, "never repaired"
                await asyncio.sleep(0.1)
            assert dead not in await ups.dossiers("city", UNIT)


class TestInTheNode:
    """The node runs anti-entropy by itself and reports its counts in the status."""

    async def test_node_repairs_on_its_own(self, tmp_path: Path) -> None:
        from node.config import load_config
        from tests.conftest import AGENCY, running_node
        from tests.upstreams import running_upstreams, target_overrides

        async with running_upstreams(tmp_path) as ups:
            overrides = target_overrides(ups, timeout_s=1.0)
            overrides["replication"] = {**overrides["replication"], "antientropy_tick_s": 0.2,
                                        "antientropy_buckets": 2}
            config = load_config(env={}, overrides={
                "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0",
                         "data_dir": str(tmp_path / "node")}, **overrides})
            async with running_node(config) as (node, url, s):
                [code] = await post_workload(url, s, 1)
                await wait_converged(node, ups)
                lose(tmp_path, "city", code)
                assert code not in await ups.dossiers("city", UNIT)
                await wait_converged(node, ups)
                async with s.get(f"{url}/api/v1/status") as r:
                    ae = (await r.json())["targets"]["city"]["antientropy"]
                assert ae["missing_remote"] >= 1 and ae["repaired"] >= 1 and ae["checked"] >= 1
