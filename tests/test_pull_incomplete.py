"""A portal record that arrived without its steps does not create a dossier without a status on another node.

The receiving unit's push stores the record on the portal and then its steps in a second call; when that
second call fails, the portal holds a record with an empty ``QuaTrinhXuLy``. The competent unit pulls it
from its feed; built from that record alone its Doc would have no step, so no status, and the portal
would refuse every push of it ("TrangThaiHoSo: bắt buộc") while the city took it. It waits instead, and
comes in whole once the portal has the steps: through the feed (storing steps moves the dossier up the
portal's feed) or, when the feed cursor is past it for good, through anti-entropy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from adapters.base import Outgoing
from node.app import Node
from sync.antientropy import AntiEntropy
from sync.merge import lacks_steps
from sync.record import digest
from tests import factories
from tests.conftest import eventually, running_node
from tests.test_antientropy import skip_feed
from tests.test_boundary_free import B_AGENCY, B_UNIT, node_config
from tests.test_pull import portal
from tests.upstreams import Upstreams, running_upstreams

A_UNIT = factories.UNIT  # the receiving unit (agency factories.AGENCY); the node under test is B, competent

Running = tuple[Node, str, aiohttp.ClientSession]


@contextlib.asynccontextmanager
async def unit_b(tmp_path: Path) -> AsyncIterator[tuple[Running, Upstreams]]:
    async with running_upstreams(tmp_path) as ups, running_node(node_config(tmp_path, ups, B_UNIT, B_AGENCY)) as b:
        yield b, ups


def forwarded_dossier(n: int) -> Outgoing:
    """A boundary-free dossier A received and forwarded to B, as A's node pushes it (accepted: status 2)."""
    d = factories.new_dossier(factories.code(n), unit=A_UNIT, competent=B_UNIT, statuses=(2,), TrangThaiPhiDiaGioi=4)
    return factories.outgoing(d)


async def push_record_only(ups: Upstreams, full: Outgoing) -> bytes | None:
    """A's push stores the record on the portal; its steps call never gets through (the ack says so)."""
    record = {k: v for k, v in full.record.items() if k != "QuaTrinhXuLy"}
    adapter = portal(ups)
    try:
        [res] = await adapter.push([Outgoing(full.code, record, digest(record), full.state, ack=None)])
    finally:
        await adapter.close()
    assert res.outcome.value == "acked", res
    return res.ack


async def push_steps(ups: Upstreams, full: Outgoing, ack: bytes | None) -> None:
    """A's retry: the record is acknowledged already, so only the steps go out this time."""
    adapter = portal(ups)
    try:
        [res] = await adapter.push([Outgoing(full.code, full.record, full.digest, full.state, ack=ack)])
        stored = await adapter.fetch(full.code)
    finally:
        await adapter.close()
    assert res.outcome.value == "acked", res
    assert stored is not None and stored.record is not None and stored.record["QuaTrinhXuLy"]


async def portal_seq(ups: Upstreams, code: str) -> int:
    adapter = portal(ups)
    try:
        page = await adapter.feed(B_UNIT, 0, 1000)
    finally:
        await adapter.close()
    [seq] = [i.seq for i in page.items if i.code == code]
    return seq


async def pulled_past(node: Node, ups: Upstreams, code: str) -> None:
    """Until B's portal puller has committed its cursor past the dossier's current place in the feed."""
    seq = await portal_seq(ups, code)

    async def past() -> bool:
        return await node.pullers["national"].cursor() >= seq

    await eventually(past, what=f"B's portal puller reads past seq {seq}")


async def held(b: Running, code: str) -> dict[str, Any] | None:
    _, url, s = b
    async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
        return dict(await r.json()) if r.status == 200 else None


async def dead_letters(node: Node) -> int:
    row = await node.store.fetchone("SELECT count(*) FROM replication WHERE state = 'dead'")
    assert row is not None
    return int(row[0])


def incomplete_logs(logs: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "pull_incomplete" and e.get("code") == code]


class TestStepless:
    """A stepless portal record of a dossier B does not hold is left out, logged once, and taken once whole."""

    @pytest.mark.parametrize("city", ["lacks", "down"])
    async def test_waits_for_the_steps_then_comes_in_by_the_feed(self, tmp_path: Path, city: str) -> None:
        async with unit_b(tmp_path) as (b, ups):
            node = b[0]
            if city == "down":
                await ups.fault("city", mode="down")
            full = forwarded_dossier(301)
            with capture_logs() as logs:
                ack = await push_record_only(ups, full)
                await pulled_past(node, ups, full.code)
                # Pulled again, as anti-entropy would: still nothing created, still one log line.
                assert await node.pullers["national"].pull_codes([full.code]) == []

                assert await held(b, full.code) is None
                assert full.code not in await ups.dossiers("city", B_UNIT)
                [line] = incomplete_logs(logs, full.code)
                assert line["log_level"] == "info" and line["target"] == "national"

                await push_steps(ups, full, ack)

                async def whole() -> dict[str, Any] | None:
                    d = await held(b, full.code)
                    return d if d is not None and d.get("TrangThaiHoSo") == 2 else None

                body = await eventually(whole, what="B takes the dossier once the portal has its steps")
            assert body["TrangThaiPhiDiaGioi"] == 4 and [s["TrangThai"] for s in body["QuaTrinhXuLy"]] == [2]
            assert body["digest"] == full.digest  # the same record A pushed
            assert len(incomplete_logs(logs, full.code)) == 1
            if city == "down":
                await ups.clear("city")

            async def everywhere() -> bool:
                remote = [(await ups.dossiers(t, B_UNIT)).get(full.code) for t in ("national", "city")]
                return remote == [full.digest, full.digest]

            await eventually(everywhere, what="portal and city hold A's record")
            assert await dead_letters(node) == 0

    async def test_anti_entropy_brings_it_in_when_the_feed_is_past_it(self, tmp_path: Path) -> None:
        async with unit_b(tmp_path) as (b, ups):
            node = b[0]
            full = forwarded_dossier(302)
            ack = await push_record_only(ups, full)
            await pulled_past(node, ups, full.code)
            ae = AntiEntropy(
                node.store,
                node.guarded["national"],
                node.replicators["national"],
                node.pullers["national"],
                unit=B_UNIT,
                buckets=1,
            )

            found = await ae.check_bucket(0)
            assert found["missing_local"] == [full.code]
            assert await held(b, full.code) is None  # looked at again, still not created
            assert ae.repaired == 0

            await skip_feed(node, "national")  # the feed will never list it again for B
            await push_steps(ups, full, ack)
            assert await held(b, full.code) is None

            found = await ae.check_bucket(0)
            assert found["missing_local"] == [full.code] and ae.repaired == 1
            body = await held(b, full.code)  # pulled within the check, not later
            assert body is not None and body["TrangThaiHoSo"] == 2 and body["digest"] == full.digest
            assert (await ae.check_bucket(0)) == {
                "missing_remote": [],
                "missing_local": [],
                "different": [],
                "skipped": [],
            }
            assert await dead_letters(node) == 0


class TestLacksSteps:
    """What counts as a record without steps."""

    def test_empty_missing_or_malformed_steps_are_none(self) -> None:
        record = dict(forwarded_dossier(303).record)
        assert not lacks_steps(record)
        assert lacks_steps({**record, "QuaTrinhXuLy": []})
        assert lacks_steps({**record, "QuaTrinhXuLy": None})
        assert lacks_steps({**record, "QuaTrinhXuLy": ["not a step"]})
        assert lacks_steps({k: v for k, v in record.items() if k != "QuaTrinhXuLy"})
