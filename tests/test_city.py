"""The city adapter against the city system stand-in: a real server on loopback, real SQLite in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import pycrdt
import pytest
from aiohttp import web
from pycrdt import Map

from adapters.base import Outcome, Outgoing, PushResult, Upstream, UpstreamError
from adapters.city import CityAdapter
from simulations.city_system import (
    CITY,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    build_app,
    running,
    serve,
)
from simulations.faults import Faults
from sync import doc as ydoc
from sync.record import DOCUMENTS, digest, record_from_doc
from sync.statevector import EMPTY_STATE_VECTOR, decode_state_vector
from tests import factories as f

pytestmark = pytest.mark.timeout(30)


@dataclass
class City:
    """A running stand-in: its base URL, app and a plain HTTP session for the fault and inspection APIs."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession

    async def fault(self, **spec: Any) -> None:
        async with self.http.post(f"{self.url}/__faults", json=spec) as resp:
            assert resp.status == 200, await resp.text()

    async def clear_faults(self) -> None:
        async with self.http.delete(f"{self.url}/__faults") as resp:
            assert resp.status == 200

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/__inspect/stats") as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def dossiers(self, unit: str | None = None) -> dict[str, dict[str, Any]]:
        params = {"unit": unit} if unit else {}
        async with self.http.get(f"{self.url}/__inspect/dossiers", params=params) as resp:
            return {d["code"]: d for d in await resp.json()}

    async def token(self) -> str:
        form = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET}
        async with self.http.post(f"{self.url}/oauth/token", data=form) as resp:
            assert resp.status == 200
            return str((await resp.json())["access_token"])

    async def raw_sync(self, items: list[list[Any]]) -> list[list[Any]]:
        headers = {"Authorization": f"Bearer {await self.token()}", "Content-Type": "application/msgpack"}
        async with self.http.post(f"{self.url}/api/v1/sync", data=msgpack.packb(items), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            results: list[list[Any]] = msgpack.unpackb(await resp.read())["results"]
            return results


@contextlib.asynccontextmanager
async def city_system(data_dir: Path, **options: Any) -> AsyncIterator[City]:
    app = build_app(data_dir, **options)
    async with running(app) as url, aiohttp.ClientSession() as http:
        yield City(url, app, http)


@contextlib.asynccontextmanager
async def city_adapter(url: str, **options: Any) -> AsyncIterator[CityAdapter]:
    adapter = CityAdapter(
        url,
        client_id=options.pop("client_id", DEFAULT_CLIENT_ID),
        client_secret=options.pop("client_secret", DEFAULT_CLIENT_SECRET),
        **{"timeout_s": 3.0, **options},
    )
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest.fixture
async def city(tmp_path: Path) -> AsyncIterator[City]:
    # A seeded generator: which records a "partial" or "error_rate" fault hits is the same every run.
    async with city_system(tmp_path / "city", faults=Faults(rng=random.Random(7))) as running_city:
        yield running_city


@pytest.fixture
async def adapter(city: City) -> AsyncIterator[CityAdapter]:
    async with city_adapter(city.url) as a:
        yield a


def by_code(results: list[PushResult]) -> dict[str, PushResult]:
    return {r.code: r for r in results}


def sv_of(o: Outgoing) -> dict[int, int]:
    return decode_state_vector(pycrdt.get_state(o.state))


async def push_acked(adapter: CityAdapter, docs: list[pycrdt.Doc[Any]]) -> dict[str, PushResult]:
    results = by_code(await adapter.push([f.outgoing(d) for d in docs]))
    assert {r.outcome for r in results.values()} == {Outcome.ACKED}, results
    return results


class TestTokens:
    async def test_adapter_is_an_upstream(self, adapter: CityAdapter) -> None:
        """The adapter satisfies the Upstream protocol under the name "city"."""
        assert isinstance(adapter, Upstream)
        assert adapter.name == "city"

    async def test_expired_token_is_renewed_once_and_the_call_retried(self, city: City, adapter: CityAdapter) -> None:
        """A token refused as expired is replaced and the push still succeeds."""
        d = f.new_dossier(f.code(1))
        await push_acked(adapter, [d])
        await city.fault(mode="session_expiry", after_s=0.2)
        await asyncio.sleep(0.3)

        f.add_status(d, 4, "20261122100000")
        o = f.outgoing(d)
        [result] = await adapter.push([o])

        assert result.outcome is Outcome.ACKED
        stats = await city.stats()
        assert stats["tokens_issued"] == 2
        assert stats["requests"]["unauthorized"] == 1
        assert (await city.dossiers())[o.code]["digest"] == o.digest

    async def test_token_is_refreshed_before_it_expires(self, tmp_path: Path) -> None:
        """A token near its end of life is replaced before use, so the city never refuses one."""
        async with city_system(tmp_path / "city", token_ttl_s=0.5) as c, city_adapter(c.url) as a:
            await a.probe()
            await asyncio.sleep(0.5)
            await a.probe()
            stats = await c.stats()
        assert stats["tokens_issued"] == 2
        assert "unauthorized" not in stats["requests"]

    async def test_wrong_credentials_are_not_retriable(self, city: City) -> None:
        """invalid_client is a configuration error: retrying cannot help."""
        async with city_adapter(city.url, client_secret="wrong") as a:
            with pytest.raises(UpstreamError) as err:
                await a.probe()
        e = err.value
        assert (e.retriable, e.status, e.upstream, e.op) == (False, 401, "city", "probe")

    async def test_api_refuses_missing_token_and_accepts_json_token_request(self, city: City) -> None:
        """Every API call needs a Bearer token; the token endpoint also takes a JSON body."""
        async with city.http.get(f"{city.url}/feed", params={"unit": f.UNIT}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_token"
        body = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET}
        async with city.http.post(f"{city.url}/oauth/token", json=body) as resp:
            token = await resp.json()
        assert token["token_type"] == "Bearer" and token["expires_in"] == 3600
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        async with city.http.get(f"{city.url}/feed", params={"unit": f.UNIT}, headers=headers) as resp:
            assert resp.status == 200


class TestPush:
    async def test_new_docs_are_acked_with_the_citys_state_vector(self, city: City, adapter: CityAdapter) -> None:
        """A new Doc is sent whole and acked with a state vector equal to ours; the city holds our digest."""
        docs = [f.new_dossier(f.code(n)) for n in range(1, 4)]
        outgoing = {o.code: o for o in map(f.outgoing, docs)}

        results = await push_acked(adapter, docs)

        held = await city.dossiers(f.UNIT)
        for code, o in outgoing.items():
            ack = results[code].ack
            assert ack is not None and decode_state_vector(ack) == sv_of(o)
            assert held[code]["digest"] == o.digest
            assert held[code]["status"] == 2
        stats = await city.stats()
        assert (stats["received"], stats["resends"], stats["duplicates"], stats["dossiers"]) == (3, 0, 0, 3)
        assert stats["update_bytes"] == sum(len(o.state) for o in outgoing.values())

    async def test_push_with_the_ack_sends_an_empty_diff_and_changes_nothing(
        self, city: City, adapter: CityAdapter
    ) -> None:
        """Pushing again with the ack sends nothing new: a resend, no new commit, still acked."""
        d = f.new_dossier(f.code(1))
        first = (await push_acked(adapter, [d]))[f.code(1)]
        before, held = await city.stats(), await city.dossiers()

        o = f.outgoing(d, ack=first.ack)
        assert first.ack is not None and pycrdt.get_update(o.state, first.ack) == b"\x00\x00"
        [again] = await adapter.push([o])

        assert again.outcome is Outcome.ACKED and again.ack == first.ack
        after = await city.stats()
        assert after["resends"] == before["resends"] + 1
        assert after["received"] == before["received"] + 1
        assert after["update_bytes"] == before["update_bytes"] + len(b"\x00\x00")
        assert after["seq"] == before["seq"]
        assert await city.dossiers() == held

    async def test_a_new_step_sends_only_the_diff(self, city: City, adapter: CityAdapter) -> None:
        """After an ack only the new step travels, and the city then materialises our new digest."""
        d = f.new_dossier(f.code(1))
        first = (await push_acked(adapter, [d]))[f.code(1)]
        old_state = d.get_update()
        f.add_status(d, 4, "20261122100000")
        o = f.outgoing(d, ack=first.ack)
        assert first.ack is not None
        diff = pycrdt.get_update(o.state, first.ack)
        # What goes out is the step alone: no field travels again, and it completes the city's old copy.
        assert b"ChuHoSo" not in diff and "Chuyển trạng thái 4".encode() in diff
        behind = ydoc.load_doc(o.code, old_state, client_id=99)
        behind.apply_update(diff)
        assert digest(record_from_doc(behind)) == o.digest
        before = await city.stats()

        [result] = await adapter.push([o])

        assert result.outcome is Outcome.ACKED
        assert result.ack is not None and decode_state_vector(result.ack) == sv_of(o)
        held = (await city.dossiers())[o.code]
        assert (held["digest"], held["status"]) == (o.digest, 4)
        after = await city.stats()
        assert after["update_bytes"] == before["update_bytes"] + len(diff)
        assert after["steps_received"] == before["steps_received"] + 1
        assert after["steps"] == 2 and after["duplicates"] == 0

    async def test_corrupt_update_is_rejected_and_the_stored_doc_untouched(
        self, city: City, adapter: CityAdapter
    ) -> None:
        """Random bytes for a stored Doc are refused for that Doc only; what the city holds does not move."""
        good, other = f.new_dossier(f.code(1)), f.new_dossier(f.code(2))
        await push_acked(adapter, [good])
        held_before = await city.dossiers()
        stored_before = await adapter.fetch_diff(f.code(1), None)
        junk = random.Random(3).randbytes(64)

        results = await city.raw_sync([[f.code(1), junk], [f.code(2), other.get_update()]])

        assert results[0][3].startswith("invalid: corrupt update")
        assert results[0][1] == stored_before[1]
        assert results[1][3] is None
        held_after = await city.dossiers()
        assert held_after[f.code(1)] == held_before[f.code(1)]
        assert await adapter.fetch_diff(f.code(1), None) == stored_before
        assert (await city.stats())["rejected"] == 1

    async def test_doc_without_a_legal_step_is_stored(self, city: City, adapter: CityAdapter) -> None:
        """The city does not judge status histories: a Doc whose steps have not arrived yet is held as it is."""
        o = f.outgoing(f.new_dossier(f.code(1), statuses=()))
        [result] = await adapter.push([o])
        assert result.outcome is Outcome.ACKED
        held = (await city.dossiers())[o.code]
        assert (held["status"], held["digest"]) == (None, o.digest)

    async def test_unreadable_local_state_is_invalid_without_a_call(self, city: City, adapter: CityAdapter) -> None:
        """A state that does not decode can never be taken by anyone: INVALID, nothing sent."""
        o = f.outgoing(f.new_dossier(f.code(1)))
        [result] = await adapter.push([replace(o, state=random.Random(5).randbytes(64))])
        assert result.outcome is Outcome.INVALID
        assert (await city.stats())["received"] == 0

    async def test_doc_the_city_refuses_is_invalid(self, city: City, adapter: CityAdapter) -> None:
        """A Doc whose MaHoSo is another code is INVALID and not stored; its batch-mates are acked."""
        wrong = replace(f.outgoing(f.new_dossier(f.code(1))), code=f.code(9))
        right = f.outgoing(f.new_dossier(f.code(2)))

        results = by_code(await adapter.push([wrong, right]))

        assert results[f.code(9)].outcome is Outcome.INVALID
        assert "MaHoSo" in results[f.code(9)].detail
        assert results[f.code(2)].outcome is Outcome.ACKED
        assert set(await city.dossiers()) == {f.code(2)}

    async def test_partial_failure_is_retry_then_acked(self, city: City, adapter: CityAdapter) -> None:
        """Records failing retriably come back RETRY, are not stored, and pass on the next push."""
        docs = [f.new_dossier(f.code(n)) for n in range(1, 5)]
        await city.fault(mode="partial", rate=1.0)

        first = await adapter.push([f.outgoing(d) for d in docs])

        assert {r.outcome for r in first} == {Outcome.RETRY}
        assert all(r.detail.startswith("retry:") and r.ack == EMPTY_STATE_VECTOR for r in first)
        assert await city.dossiers() == {}

        await city.clear_faults()
        acks = by_code(first)
        again = await adapter.push([f.outgoing(d, ack=acks[str(d.guid)].ack) for d in docs])
        assert {r.outcome for r in again} == {Outcome.ACKED}
        stats = await city.stats()
        assert (stats["dossiers"], stats["duplicates"]) == (4, 0)

    async def test_some_records_failing_leave_the_rest_acked(self, city: City, adapter: CityAdapter) -> None:
        """Under a partial fault each record is judged on its own, and retrying converges."""
        docs = {str(d.guid): d for d in (f.new_dossier(f.code(n)) for n in range(1, 11))}
        await city.fault(mode="partial", rate=0.5)
        results = by_code(await adapter.push([f.outgoing(d) for d in docs.values()]))
        outcomes = [r.outcome for r in results.values()]
        assert Outcome.RETRY in outcomes and Outcome.ACKED in outcomes
        held = await city.dossiers()
        assert set(held) == {c for c, r in results.items() if r.outcome is Outcome.ACKED}

        await city.clear_faults()
        retry = [f.outgoing(docs[c], ack=r.ack) for c, r in results.items() if r.outcome is Outcome.RETRY]
        assert {r.outcome for r in await adapter.push(retry)} == {Outcome.ACKED}
        assert len(await city.dossiers()) == 10

    async def test_large_batches_are_split(self, city: City) -> None:
        """A batch over batch_limit goes out in several requests and every Doc is acked."""
        docs = [f.new_dossier(f.code(n)) for n in range(1, 8)]
        async with city_adapter(city.url, batch_limit=2) as a:
            results = await a.push([f.outgoing(d) for d in docs])
        assert len(results) == 7 and {r.outcome for r in results} == {Outcome.ACKED}
        stats = await city.stats()
        assert stats["requests"]["ok"] == 1 + 4  # one token, four sync requests

    @pytest.mark.parametrize("changed_since", [False, True])
    async def test_city_that_lost_the_doc_gets_it_whole_again(
        self, tmp_path: Path, city: City, changed_since: bool
    ) -> None:
        """An ack from a city that since lost the Doc yields RETRY with an empty ack, then the full state is acked."""
        d = f.new_dossier(f.code(1))
        async with city_adapter(city.url) as a:
            ack = (await push_acked(a, [d]))[f.code(1)].ack
        if changed_since:
            # Another writer's step merged here since: the diff is a lone step that integrates on its own,
            # a fragment the city must not mistake for the dossier.
            other = ydoc.load_doc(f.code(1), d.get_update(), client_id=777)
            d.apply_update(f.add_status(other, 4, "20261122100000"))
        async with city_system(tmp_path / "empty-city") as fresh, city_adapter(fresh.url) as a:
            [lost] = await a.push([f.outgoing(d, ack=ack)])
            assert (lost.outcome, lost.ack) == (Outcome.RETRY, EMPTY_STATE_VECTOR)
            assert await fresh.dossiers() == {}
            [result] = await a.push([f.outgoing(d, ack=lost.ack)])
            assert result.outcome is Outcome.ACKED
            assert (await fresh.dossiers())[f.code(1)]["digest"] == f.outgoing(d).digest

    async def test_stale_ack_is_corrected_by_the_citys_state_vector(self, city: City, adapter: CityAdapter) -> None:
        """If the city holds less than the ack claims, RETRY carries its real state vector and the diff follows."""
        d = f.new_dossier(f.code(1))
        await push_acked(adapter, [d])
        f.add_status(d, 4, "20261122100000")
        claimed = d.get_state()  # as if the city had acked the new step, which it never received

        [stale] = await adapter.push([f.outgoing(d, ack=claimed)])
        assert stale.outcome is Outcome.RETRY and stale.ack is not None
        assert decode_state_vector(stale.ack) != decode_state_vector(claimed)

        [result] = await adapter.push([f.outgoing(d, ack=stale.ack)])
        assert result.outcome is Outcome.ACKED
        assert (await city.dossiers())[f.code(1)]["digest"] == f.outgoing(d).digest

    async def test_equal_digest_is_not_enough_without_our_whole_state(
        self, city: City, adapter: CityAdapter
    ) -> None:
        """Operations that leave the record as it was must still reach the city before the Doc counts as acked."""
        d = f.new_dossier(f.code(1))
        await push_acked(adapter, [d])
        attachment = {"TepDinhKemId": "t1", "TenTepDinhKem": "to-khai.pdf", "MaThanhPhanHoSo": "TP1", "DuocSoHoa": 0}

        def attach(x: pycrdt.Doc[Any]) -> None:
            ydoc.add_document(x, attachment)

        def detach(x: pycrdt.Doc[Any]) -> None:
            del x.get(DOCUMENTS, type=Map)["t1"]

        ydoc.change(d, attach)
        ydoc.change(d, detach)
        o = f.outgoing(d, ack=d.get_state())  # an ack claiming what the city never received

        [result] = await adapter.push([o])

        assert (await city.dossiers())[o.code]["digest"] == o.digest  # same record, yet not the same Doc
        assert result.outcome is Outcome.RETRY and result.ack is not None
        [again] = await adapter.push([f.outgoing(d, ack=result.ack)])
        assert again.outcome is Outcome.ACKED
        assert again.ack is not None and decode_state_vector(again.ack) == sv_of(o)

    async def test_city_holding_more_than_us_is_retry(self, city: City, adapter: CityAdapter) -> None:
        """When the city has another replica's change our digest is not what it holds: RETRY until we merge."""
        d = f.new_dossier(f.code(1))
        first = (await push_acked(adapter, [d]))[f.code(1)]
        other = ydoc.load_doc(f.code(1), d.get_update(), client_id=777)
        f.add_status(other, 4, "20261122100000")
        await push_acked(adapter, [other])

        [result] = await adapter.push([f.outgoing(d, ack=first.ack)])

        assert result.outcome is Outcome.RETRY
        assert result.ack is not None and decode_state_vector(result.ack) == decode_state_vector(other.get_state())


class TestWholeCallFailures:
    @pytest.mark.parametrize(
        ("spec", "status", "retry_after"),
        [
            ({"mode": "down"}, 503, None),
            ({"mode": "error_rate", "rate": 1.0}, 500, None),
            ({"mode": "throttle", "retry_after_s": 2}, 429, 2.0),
        ],
    )
    async def test_http_failures_raise_retriable(
        self, city: City, adapter: CityAdapter, spec: dict[str, Any], status: int, retry_after: float | None
    ) -> None:
        """503, 500 and 429 fail the call as a whole, retriably, with status and Retry-After."""
        await adapter.probe()
        await city.fault(**spec)
        with pytest.raises(UpstreamError) as err:
            await adapter.push([f.outgoing(f.new_dossier(f.code(1)))])
        e = err.value
        assert (e.retriable, e.status, e.retry_after, e.upstream, e.op) == (True, status, retry_after, "city", "push")
        assert e.hard is (status >= 500)

    async def test_failure_at_token_fetch_is_retriable(self, city: City, adapter: CityAdapter) -> None:
        """A down city fails the token request too, and that is as retriable as any 503."""
        await city.fault(mode="down")
        with pytest.raises(UpstreamError) as err:
            await adapter.feed(f.UNIT, 0, 10)
        assert (err.value.retriable, err.value.status, err.value.op) == (True, 503, "feed")

    async def test_blackhole_times_out(self, city: City) -> None:
        """A city that never answers ends at the client timeout, retriably and as a hard failure."""
        async with city_adapter(city.url, timeout_s=0.3) as a:
            await a.probe()
            await city.fault(mode="blackhole")
            with pytest.raises(UpstreamError) as err:
                await a.push([f.outgoing(f.new_dossier(f.code(1)))])
        assert (err.value.retriable, err.value.status, err.value.hard) == (True, None, True)

    async def test_connection_refused(self) -> None:
        """Nothing listening is a retriable, hard failure."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        async with city_adapter(f"http://127.0.0.1:{port}") as a:
            with pytest.raises(UpstreamError) as err:
                await a.probe()
        assert (err.value.retriable, err.value.status, err.value.hard, err.value.op) == (True, None, True, "probe")

    async def test_some_requests_failing_turn_into_retry(self, city: City) -> None:
        """When only some requests of a push fail, their dossiers are RETRY and the rest are acked."""
        docs = [f.new_dossier(f.code(n)) for n in range(1, 9)]
        async with city_adapter(city.url, batch_limit=1) as a:
            await a.probe()
            await city.fault(mode="error_rate", rate=0.5)
            results = await a.push([f.outgoing(d) for d in docs])
        outcomes = [r.outcome for r in results]
        assert len(results) == 8 and Outcome.ACKED in outcomes and Outcome.RETRY in outcomes
        assert all("HTTP 500" in r.detail for r in results if r.outcome is Outcome.RETRY)
        held = await city.dossiers()
        assert set(held) == {r.code for r in results if r.outcome is Outcome.ACKED}

    async def test_close_is_idempotent_and_final(self, city: City) -> None:
        """close() twice is fine; a closed adapter refuses calls without retrying."""
        a = CityAdapter(city.url, client_id=DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET)
        await a.probe()
        await a.close()
        await a.close()
        with pytest.raises(UpstreamError) as err:
            await a.probe()
        assert err.value.retriable is False


class TestPull:
    async def test_fetch_diff_round_trip_rebuilds_the_record(self, city: City, adapter: CityAdapter) -> None:
        """The full state from the city rebuilds our record; a diff against our state is empty."""
        d = f.new_dossier(f.code(1), statuses=(2, 4))
        o = f.outgoing(d)
        await push_acked(adapter, [d])

        update, sv, city_digest = await adapter.fetch_diff(f.code(1), None)
        rebuilt = ydoc.load_doc(f.code(1), update, client_id=99)
        assert record_from_doc(rebuilt) == o.record
        assert digest(record_from_doc(rebuilt)) == city_digest == o.digest
        assert decode_state_vector(sv) == sv_of(o)

        empty, _, _ = await adapter.fetch_diff(f.code(1), d.get_state())
        assert empty == b"\x00\x00"

    async def test_fetch_diff_brings_only_what_is_missing(self, city: City, adapter: CityAdapter) -> None:
        """Against an older state vector the city sends just the newer step, which completes the old Doc."""
        d = f.new_dossier(f.code(1))
        old_state, old_sv = d.get_update(), d.get_state()
        f.add_status(d, 4, "20261122100000")
        await push_acked(adapter, [d])

        update, _, city_digest = await adapter.fetch_diff(f.code(1), old_sv)

        assert len(update) < len(d.get_update())
        behind = ydoc.load_doc(f.code(1), old_state, client_id=99)
        behind.apply_update(update)
        assert digest(record_from_doc(behind)) == city_digest == f.outgoing(d).digest

    async def test_fetch_unknown_is_not_retriable(self, adapter: CityAdapter) -> None:
        """A code the city never saw is a 404."""
        with pytest.raises(UpstreamError) as err:
            await adapter.fetch_diff(f.code(404), None)
        assert (err.value.status, err.value.retriable, err.value.op) == (404, False, "fetch")

    async def test_feed_by_receiving_and_by_competent_unit(self, city: City, adapter: CityAdapter) -> None:
        """A unit's feed lists what it received and what it is competent for, each once at its latest seq."""
        here = f.new_dossier(f.code(1))
        forwarded = f.new_dossier(f.code(2), competent=f.OTHER_UNIT)
        elsewhere = f.new_dossier("000.00.18.H29-261122-0001", unit=f.OTHER_UNIT)
        await push_acked(adapter, [here, forwarded, elsewhere])

        mine = await adapter.feed(f.UNIT, 0, 100)
        theirs = await adapter.feed(f.OTHER_UNIT, 0, 100)
        assert [i.code for i in mine.items] == [f.code(1), f.code(2)]
        assert {i.code for i in theirs.items} == {f.code(2), "000.00.18.H29-261122-0001"}

        f.add_status(forwarded, 4, "20261122100000")
        await push_acked(adapter, [forwarded])
        later = await adapter.feed(f.OTHER_UNIT, theirs.next, 100)
        assert [i.code for i in later.items] == [f.code(2)]
        assert later.next > theirs.next
        again = await adapter.feed(f.UNIT, 0, 100)
        assert [i.code for i in again.items] == [f.code(1), f.code(2)]  # listed once, at its new seq

    async def test_feed_pages(self, adapter: CityAdapter) -> None:
        """Paging with next walks every dossier exactly once and ends on an empty page."""
        await push_acked(adapter, [f.new_dossier(f.code(n)) for n in range(1, 6)])
        seen: list[str] = []
        since = 0
        while True:
            page = await adapter.feed(f.UNIT, since, 2)
            if not page.items:
                break
            seen += [i.code for i in page.items]
            since = page.next
        assert seen == [f.code(n) for n in range(1, 6)]
        assert page.next == since


class TestStandIn:
    async def test_restart_keeps_docs_and_sequence(self, tmp_path: Path) -> None:
        """The stand-in's store survives a restart: same digests, and its sequence keeps counting up."""
        data = tmp_path / "city"
        d = f.new_dossier(f.code(1))
        async with city_system(data) as c, city_adapter(c.url) as a:
            await push_acked(a, [d])
            first = await a.feed(f.UNIT, 0, 10)
        f.add_status(d, 4, "20261122100000")
        async with city_system(data) as c, city_adapter(c.url) as a:
            assert (await c.dossiers())[f.code(1)]["status"] == 2
            await push_acked(a, [d])
            second = await a.feed(f.UNIT, 0, 10)
            assert (await c.dossiers())[f.code(1)]["digest"] == f.outgoing(d).digest
        assert second.next > first.next

    async def test_serve_announces_the_real_port(self, tmp_path: Path) -> None:
        """serve() on port 0 prints the port it got and stops when asked."""
        lines: list[str] = []
        stop, announced = asyncio.Event(), asyncio.Event()

        def announce(line: str) -> None:
            lines.append(line)
            announced.set()

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(serve("127.0.0.1", 0, tmp_path / "city", stop, announce))
            await announced.wait()
            url = lines[0].rsplit(" ", 1)[1]
            assert lines[0].startswith("city system stand-in listening on http://127.0.0.1:")
            async with city_adapter(url) as a:
                await a.probe()
            stop.set()
        assert task.done()

    async def test_inspect_counts_requests_by_outcome(self, city: City, adapter: CityAdapter) -> None:
        """Every answer is counted by outcome, injected faults included."""
        await adapter.probe()
        await city.fault(mode="down", seconds=0.2)
        with pytest.raises(UpstreamError):
            await adapter.probe()
        await asyncio.sleep(0.25)
        await adapter.probe()
        requests = (await city.stats())["requests"]
        assert requests == {"ok": 3, "unavailable": 1}
        assert city.app[CITY].stats.requests == requests
