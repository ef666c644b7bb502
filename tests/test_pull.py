"""Inbound changes: what officers do on the portal or the city system reaches the node and converges."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pycrdt

from adapters.base import Outgoing
from adapters.city import CityAdapter
from adapters.national import NationalAdapter
from node.clock import Clock, dvcqg
from node.config import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_PASSWORD, DEMO_USERNAME
from sync import doc as ydoc
from sync.hlc import HLC
from sync.merge import portal_operations
from sync.record import digest, materialise
from tests import factories
from tests.conftest import AGENCY
from tests.test_failover import cluster
from tests.test_replication import post_workload, wait_converged
from tests.upstreams import Upstreams

OFFICER_CLIENT = 777_000_111


def portal(ups: Upstreams) -> NationalAdapter:
    return NationalAdapter(ups.national_url, username=DEMO_USERNAME, password=DEMO_PASSWORD, dstcode=AGENCY,
                           madonvi=AGENCY, timeout_s=2.0)


def city(ups: Upstreams) -> CityAdapter:
    return CityAdapter(ups.city_url, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET, timeout_s=2.0)


async def wait_for(check: Any, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.1)


class TestFromTheCitySystem:
    """An officer's step written at the city system merges into the node's Doc."""

    async def test_city_officer_step_reaches_node_and_portal(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            [code] = await post_workload(url, s, 1, start=1)
            await wait_converged(node, ups)
            adapter = city(ups)
            try:
                fetched = await adapter.fetch(code, None)
                assert fetched is not None and fetched.update is not None
                officer = ydoc.load_doc(code, fetched.update, OFFICER_CLIENT)
                factories.add_status(officer, 4, "20261122103000")
                record, _ = materialise(officer)
                [res] = await adapter.push([Outgoing(code, record, digest(record), officer.get_update(),
                                                     ack=fetched.state_vector)])
                assert res.outcome.value == "acked"
            finally:
                await adapter.close()

            async def node_has_it() -> bool:
                async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                    return (await r.json())["TrangThaiHoSo"] == 4

            await wait_for(node_has_it)
            digests = await wait_converged(node, ups)
            assert digests[code] == digest(record)


class TestFromThePortal:
    """The portal's record is merged three-way: only what the portal changed, never backwards."""

    async def test_portal_officer_edit_and_step_merge(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            [code] = await post_workload(url, s, 1, start=1)
            await wait_converged(node, ups)
            adapter = portal(ups)
            try:
                stored = await adapter.fetch(code)
                assert stored is not None and stored.record is not None
                record = dict(stored.record)
                record["NgayHenTra"] = "20261205170000"
                # Processed on the portal a minute after the desk accepted it: it sorts after the intake.
                later = dvcqg(Clock().now() + timedelta(minutes=1))
                officer_step = factories.step(code, 4, later, officer="Cán bộ Cổng")
                record["QuaTrinhXuLy"] = [*record["QuaTrinhXuLy"], officer_step]
                [res] = await adapter.push([Outgoing(code, record, digest(record), b"")])
                assert res.outcome.value == "acked"
            finally:
                await adapter.close()

            async def node_has_it() -> bool:
                async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                    body = await r.json()
                return bool(body.get("NgayHenTra") == "20261205170000" and body["TrangThaiHoSo"] == 4)

            await wait_for(node_has_it)
            digests = await wait_converged(node, ups)
            assert code in digests

    async def test_online_dossier_from_the_portal_is_created_with_its_code(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            online_code = f"{AGENCY}-261121-0042"
            online = factories.new_dossier(online_code, statuses=(1,), KenhThucHien=2)
            adapter = portal(ups)
            try:
                [res] = await adapter.push([factories.outgoing(online)])
                assert res.outcome.value == "acked"
            finally:
                await adapter.close()

            async def node_has_it() -> bool:
                async with s.get(f"{url}/api/v1/dossiers/{online_code}") as r:
                    return r.status == 200

            await wait_for(node_has_it)
            async with s.get(f"{url}/api/v1/dossiers/{online_code}") as r:
                body = await r.json()
            assert body["TrangThaiHoSo"] == 1 and body["KenhThucHien"] == 2
            await wait_converged(node, ups)

    async def test_echoes_of_own_pushes_change_nothing(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            await post_workload(url, s, 4)
            await wait_converged(node, ups)
            for puller in node.pullers.values():
                while await puller.run_once():
                    pass
            head = node.service.journal_head
            for puller in node.pullers.values():
                assert await puller.cursor() > 0
            await asyncio.sleep(1.5)
            assert node.service.journal_head == head


class TestThreeWayRules:
    """The portal merge's rules, on plain records."""

    def local(self, **extra: Any) -> dict[str, Any]:
        d = factories.new_dossier(factories.code(1), statuses=(2, 4))
        record, _ = materialise(d)
        record.update(extra)
        return record

    def test_equal_values_and_untouched_base_values_are_ignored(self) -> None:
        local = self.local(Email="moi@example.vn")
        base = {**local, "Email": "cu@example.vn"}
        remote = {**base}
        fields, steps, docs, fees = portal_operations(local, base, remote)
        assert (fields, steps, docs, fees) == ({}, [], [], [])

    def test_a_portal_change_since_the_base_is_taken(self) -> None:
        local = self.local()
        remote = {**local, "NgayHenTra": "20261201170000"}
        fields, *_ = portal_operations(local, local, remote)
        assert fields == {"NgayHenTra": "20261201170000"}

    def test_forwarding_state_never_moves_back_and_status_is_never_written(self) -> None:
        local = self.local(TrangThaiPhiDiaGioi=2)
        remote = {**local, "TrangThaiPhiDiaGioi": 4, "TrangThaiHoSo": 9}
        fields, *_ = portal_operations(local, None, remote)
        assert fields == {}
        fields, *_ = portal_operations(local, None, {**local, "TrangThaiPhiDiaGioi": 3})
        assert fields == {"TrangThaiPhiDiaGioi": 3}

    def test_the_portal_never_deletes(self) -> None:
        local = self.local(Email="a@example.vn")
        remote = {k: v for k, v in local.items() if k != "Email"}
        remote["QuaTrinhXuLy"] = []
        assert portal_operations(local, local, remote) == ({}, [], [], [])

    def test_new_portal_steps_get_stamps_from_their_time(self) -> None:
        from sync.merge import portal_update

        local = self.local()
        code = local["MaHoSo"]
        d = factories.new_dossier(code, statuses=(2, 4))
        when = Clock().now().replace(microsecond=0) + timedelta(minutes=1)  # after the steps above, within the offset
        new_step = factories.step(code, 9, dvcqg(when))
        remote = {**local, "QuaTrinhXuLy": [*local["QuaTrinhXuLy"], new_step]}
        update = portal_update(code, d.get_update(), local, local, remote, client_id=99, hlc=HLC())
        assert update is not None
        d.apply_update(update)
        steps = ydoc.steps_map(d).to_py() or {}
        stamps = [v["hlc"] for v in steps.values() if v["TrangThai"] == 9]
        assert stamps == [f"{int(when.timestamp() * 1000):015d}.00000"]
        assert materialise(d)[0]["TrangThaiHoSo"] == 9
        far = factories.step(code, 10, dvcqg(when + timedelta(days=2)))
        clamped = portal_update(code, d.get_update(), materialise(d)[0], None,
                                {**local, "QuaTrinhXuLy": [*remote["QuaTrinhXuLy"], far]}, client_id=99, hlc=HLC())
        assert clamped is not None
        d.apply_update(clamped)
        [far_stamp] = [v["hlc"] for v in (ydoc.steps_map(d).to_py() or {}).values() if v["TrangThai"] == 10]
        assert int(far_stamp.split(".")[0]) < (when + timedelta(minutes=10)).timestamp() * 1000  # clamped
        assert pycrdt.get_state(update)
