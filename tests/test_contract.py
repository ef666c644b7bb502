"""One contract suite for every Upstream adapter, each against its own stand-in (adapters/base.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.base import Outcome, Upstream, UpstreamError
from adapters.city import CityAdapter
from adapters.national import NationalAdapter
from node.config import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_PASSWORD, DEMO_USERNAME
from tests import factories
from tests.upstreams import Upstreams, running_upstreams

TARGETS = ("national", "city")


def make_adapter(target: str, ups: Upstreams) -> Upstream:
    if target == "national":
        return NationalAdapter(
            ups.national_url,
            username=DEMO_USERNAME,
            password=DEMO_PASSWORD,
            dstcode=factories.AGENCY,
            madonvi=factories.AGENCY,
            timeout_s=1.0,
        )
    return CityAdapter(ups.city_url, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET, timeout_s=1.0)


@contextlib.asynccontextmanager
async def adapter_for(target: str, tmp_path: Path) -> AsyncIterator[tuple[Upstream, Upstreams]]:
    async with running_upstreams(tmp_path) as ups:
        adapter = make_adapter(target, ups)
        try:
            yield adapter, ups
        finally:
            await adapter.close()


@pytest.mark.parametrize("target", TARGETS)
class TestUpstreamContract:
    """What every adapter promises the replicator."""

    async def test_is_an_upstream_named_after_its_target(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, _):
            assert isinstance(adapter, Upstream)
            assert adapter.name == target

    async def test_acked_means_upstream_holds_the_digest(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            docs = [factories.new_dossier(factories.code(i), statuses=(2, 4)) for i in range(1, 13)]
            results = await adapter.push([factories.outgoing(d) for d in docs])
            assert {r.outcome for r in results} == {Outcome.ACKED}
            assert len(results) == 12
            held = await ups.dossiers(target, factories.UNIT)
            assert held == {str(d.guid): factories.outgoing(d).digest for d in docs}

    async def test_push_is_idempotent_for_the_same_key(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            d = factories.new_dossier(factories.code(1), statuses=(2, 4, 9))
            [first] = await adapter.push([factories.outgoing(d)])
            # The answer is lost: the same dossier is pushed again without the ack.
            [again] = await adapter.push([factories.outgoing(d)])
            [with_ack] = await adapter.push([factories.outgoing(d, ack=again.ack)])
            assert first.outcome == again.outcome == with_ack.outcome == Outcome.ACKED
            stats = await ups.stats(target)
            assert stats["duplicates"] == 0
            assert stats["dossiers"] == 1
            assert stats["steps"] == 3

    async def test_a_change_after_ack_reaches_the_upstream(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            d = factories.new_dossier(factories.code(1), statuses=(2,))
            [first] = await adapter.push([factories.outgoing(d)])
            factories.add_status(d, 4, "20261122100000")
            out = factories.outgoing(d, ack=first.ack)
            [second] = await adapter.push([out])
            assert second.outcome is Outcome.ACKED
            assert (await ups.dossiers(target, factories.UNIT))[out.code] == out.digest

    async def test_invalid_record_is_reported_not_raised(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            good = factories.new_dossier(factories.code(1))
            bad = factories.new_dossier(factories.code(2), ChuHoSo="")
            results = {
                r.code: r.outcome for r in await adapter.push([factories.outgoing(good), factories.outgoing(bad)])
            }
            assert results == {str(good.guid): Outcome.ACKED, str(bad.guid): Outcome.INVALID}
            assert set(await ups.dossiers(target, factories.UNIT)) == {str(good.guid)}

    async def test_an_unreachable_upstream_raises_a_retriable_hard_error(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, ups):
            await ups.fault(target, mode="down")
            d = factories.new_dossier(factories.code(1))
            with pytest.raises(UpstreamError) as info:
                await adapter.push([factories.outgoing(d)])
            assert info.value.retriable and info.value.hard and info.value.upstream == target
            with pytest.raises(UpstreamError):
                await adapter.probe()
            await ups.clear(target)
            await adapter.probe()

    async def test_feed_lists_the_units_dossiers(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, _):
            mine = factories.new_dossier(factories.code(1))
            theirs = factories.new_dossier(factories.code(2), unit=factories.OTHER_UNIT)
            await adapter.push([factories.outgoing(mine), factories.outgoing(theirs)])
            page = await adapter.feed(factories.UNIT, 0, 100)
            assert [i.code for i in page.items] == [str(mine.guid)]
            assert page.next >= page.items[0].seq
            assert (await adapter.feed(factories.UNIT, page.next, 100)).items == []

    async def test_close_is_idempotent(self, target: str, tmp_path: Path) -> None:
        async with adapter_for(target, tmp_path) as (adapter, _):
            await adapter.close()
            await adapter.close()
