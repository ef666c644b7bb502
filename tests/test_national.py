"""The national adapter against the portal stand-in, both real: loopback TCP and a SQLite file in tmp_path."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from adapters import national
from adapters.base import Outcome, Outgoing, PushResult, Upstream, UpstreamError
from simulations.faults import Faults
from simulations.national_portal import DEFAULT_PASSWORD, DEFAULT_USERNAME, build_app, serve
from sync import doc as ydoc
from tests.factories import AGENCY, OTHER_UNIT, UNIT, add_status, code, new_dossier, outgoing


class ScriptedRandom(random.Random):
    """Fault draws from a script, then never failing: decides exactly which call a fault hits."""

    def __init__(self, draws: list[float]) -> None:
        super().__init__(0)
        self._draws: Iterator[float] = iter(draws)

    def random(self) -> float:
        return next(self._draws, 0.999)


@dataclass
class Portal:
    url: str
    http: aiohttp.ClientSession

    async def stats(self) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/__inspect/stats") as resp:
            return dict(await resp.json())

    async def dossiers(self, unit: str | None = None) -> dict[str, dict[str, Any]]:
        params = {"unit": unit} if unit else {}
        async with self.http.get(f"{self.url}/__inspect/dossiers", params=params) as resp:
            return {d["code"]: d for d in await resp.json()}

    async def fault(self, **spec: Any) -> None:
        async with self.http.post(f"{self.url}/__faults", json=spec) as resp:
            assert resp.status == 200, await resp.text()

    async def clear_faults(self) -> None:
        async with self.http.delete(f"{self.url}/__faults") as resp:
            assert resp.status == 200

    async def lookup(self, mahoso: str) -> dict[str, Any]:
        async with self.http.post(
            f"{self.url}/login",
            json={"username": DEFAULT_USERNAME, "password": DEFAULT_PASSWORD},
            headers={"dstcode": AGENCY},
        ) as resp:
            session = (await resp.json())["session"]
        body = {"session": session, "madonvi": AGENCY, "service": "TraCuuHoSo", "mahoso": mahoso}
        async with self.http.post(f"{self.url}/integration", json=body) as resp:
            return dict(await resp.json())

    async def calls(self, outcome: str) -> int:
        return int((await self.stats())["requests"].get(outcome, 0))


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def portal_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def portal(tmp_path: Path, faults: Faults, portal_options: dict[str, Any]) -> AsyncIterator[Portal]:
    server = TestServer(build_app(tmp_path / "portal", faults=faults, **portal_options), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Portal(str(server.make_url("")).rstrip("/"), http)
    finally:
        await server.close()


def make_adapter(url: str, **options: Any) -> national.NationalAdapter:
    return national.NationalAdapter(
        url, username=DEFAULT_USERNAME, password=DEFAULT_PASSWORD, dstcode=AGENCY, madonvi=AGENCY, **options
    )


@pytest.fixture
async def adapter(portal: Portal) -> AsyncIterator[national.NationalAdapter]:
    a = make_adapter(portal.url)
    try:
        yield a
    finally:
        await a.close()


def one(results: list[PushResult]) -> PushResult:
    assert len(results) == 1
    return results[0]


class TestProtocol:
    async def test_implements_upstream_and_closes_twice(self, adapter: national.NationalAdapter) -> None:
        """The adapter is an Upstream named "national" and close() is idempotent."""
        assert isinstance(adapter, Upstream)
        assert adapter.name == "national"
        await adapter.probe()
        await adapter.close()
        await adapter.close()

    async def test_borrowed_http_session_stays_open(self, portal: Portal) -> None:
        """An HTTP session handed in belongs to the caller: close() leaves it open."""
        a = make_adapter(portal.url, session=portal.http)
        await a.probe()
        await a.close()
        assert not portal.http.closed

    async def test_empty_batch_sends_nothing(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """An empty push makes no call at all."""
        assert await adapter.push([]) == []
        assert (await portal.stats())["requests"] == {}


class TestSession:
    @pytest.mark.parametrize("portal_options", [{"session_ttl_s": 0.3}])
    async def test_expired_session_is_renewed(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """After the portal's session TTL the adapter logs in again and the push still succeeds."""
        assert one(await adapter.push([outgoing(new_dossier(code(1)))])).outcome is Outcome.ACKED
        await asyncio.sleep(0.4)
        assert one(await adapter.push([outgoing(new_dossier(code(2)))])).outcome is Outcome.ACKED
        assert await portal.calls("login:ok") == 2
        assert await portal.calls("integration:session_invalid") == 1

    async def test_session_expiry_fault_is_renewed(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """A session_expiry fault refuses the old session; one login later the push is ACKED."""
        assert one(await adapter.push([outgoing(new_dossier(code(1)))])).outcome is Outcome.ACKED
        await portal.fault(mode="session_expiry", after_s=0.2)
        await asyncio.sleep(0.3)
        assert one(await adapter.push([outgoing(new_dossier(code(2)))])).outcome is Outcome.ACKED
        assert await portal.calls("login:ok") == 2

    async def test_sessions_that_always_expire_fail_the_call(
        self, adapter: national.NationalAdapter, portal: Portal
    ) -> None:
        """When even a fresh session is refused, the push fails retriably after one renewal."""
        await portal.fault(mode="session_expiry", after_s=0)
        with pytest.raises(UpstreamError) as err:
            await adapter.push([outgoing(new_dossier(code(1)))])
        assert err.value.retriable
        assert await portal.calls("login:ok") == 2

    @pytest.mark.parametrize("faults", [Faults(rng=ScriptedRandom([0.0]))])
    async def test_unexpected_failure_on_old_session_renews(
        self, adapter: national.NationalAdapter, portal: Portal, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A 500 on a session older than the suspect age is taken as expiry: log in again, retry once."""
        monkeypatch.setattr(national, "SUSPECT_SESSION_AGE_S", 0.1)
        await adapter.probe()
        await asyncio.sleep(0.15)
        await portal.fault(mode="error_rate", rate=0.5)  # the script fails the next call only
        assert one(await adapter.push([outgoing(new_dossier(code(1)))])).outcome is Outcome.ACKED
        assert await portal.calls("login:ok") == 2

    @pytest.mark.parametrize("faults", [Faults(rng=ScriptedRandom([0.0]))])
    async def test_failure_on_young_session_is_not_retried(
        self, adapter: national.NationalAdapter, portal: Portal
    ) -> None:
        """A fresh session cannot have expired: a 500 on it is the call's failure."""
        await adapter.probe()
        await portal.fault(mode="error_rate", rate=0.5)
        with pytest.raises(UpstreamError) as err:
            await adapter.push([outgoing(new_dossier(code(1)))])
        assert (err.value.retriable, err.value.status) == (True, 500)
        assert await portal.calls("login:ok") == 1

    async def test_bad_credentials_are_not_retriable(self, portal: Portal) -> None:
        """A refused login is configuration, not a passing fault."""
        a = national.NationalAdapter(portal.url, username="wardsync", password="wrong", dstcode=AGENCY, madonvi=AGENCY)
        try:
            with pytest.raises(UpstreamError) as err:
                await a.probe()
        finally:
            await a.close()
        assert (err.value.retriable, err.value.op, err.value.upstream) == (False, "login", "national")


class TestPush:
    async def test_create_then_update(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """A new dossier is created; a new status re-sends the record as an update plus only the new step."""
        d = new_dossier(code(1))
        first = one(await adapter.push([outgoing(d)]))
        assert first.outcome is Outcome.ACKED and first.ack
        add_status(d, 4, "20261122100000")
        out = outgoing(d, first.ack)
        second = one(await adapter.push([out]))
        assert second.outcome is Outcome.ACKED and second.ack != first.ack
        stored = (await portal.lookup(code(1)))["data"]
        assert stored["TrangThaiHoSo"] == 4
        assert len(stored["QuaTrinhXuLy"]) == 2
        stats = await portal.stats()
        assert stats["steps_received"] == 2  # the first step was not sent again
        assert (stats["dossiers"], stats["steps"], stats["duplicates"], stats["resends"]) == (1, 2, 0, 0)
        assert (await portal.dossiers())[code(1)]["digest"] == out.digest

    async def test_acked_dossier_sends_nothing(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """Pushing a dossier whose ack covers its record and steps makes no call."""
        d = new_dossier(code(1), statuses=(2, 4))
        ack = one(await adapter.push([outgoing(d)])).ack
        before = await portal.stats()
        again = one(await adapter.push([outgoing(d, ack)]))
        assert again.outcome is Outcome.ACKED and again.ack == ack
        assert (await portal.stats())["requests"] == before["requests"]

    async def test_resend_after_lost_ack_is_a_resend(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """Pushing again without the ack (answer lost) counts resends and stores nothing twice."""
        d = new_dossier(code(1), statuses=(2, 4, 9))
        out = outgoing(d)
        assert one(await adapter.push([out])).outcome is Outcome.ACKED
        again = one(await adapter.push([out]))
        assert again.outcome is Outcome.ACKED
        stats = await portal.stats()
        assert stats["resends"] == 4  # the record, sent again as an update, and its three steps
        assert (stats["dossiers"], stats["steps"], stats["duplicates"]) == (1, 3, 0)
        assert (await portal.dossiers())[code(1)]["digest"] == out.digest

    async def test_steps_go_in_calls_of_ten(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """A dossier with 25 steps needs three step calls."""
        statuses = (2, *([4, 5] * 12)[:24])
        d = new_dossier(code(1), statuses=statuses)
        out = outgoing(d)
        assert len(out.record["QuaTrinhXuLy"]) == 25
        assert one(await adapter.push([out])).outcome is Outcome.ACKED
        assert await portal.calls("CapNhatTienDoHoSoMC:ok") == 3
        assert (await portal.stats())["steps"] == 25
        assert (await portal.dossiers())[code(1)]["digest"] == out.digest

    async def test_many_dossiers_few_calls(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """250 dossiers of one step each take 3 record calls and 25 step calls, and all converge."""
        batch = [outgoing(new_dossier(code(n))) for n in range(1, 251)]
        results = await adapter.push(batch)
        assert {r.outcome for r in results} == {Outcome.ACKED}
        assert sorted(r.code for r in results) == sorted(o.code for o in batch)
        assert await portal.calls("DongBoHoSoMC:ok") == 3
        assert await portal.calls("CapNhatTienDoHoSoMC:ok") == 25
        stored = await portal.dossiers()
        assert all(stored[o.code]["digest"] == o.digest for o in batch)

    async def test_digest_matches_node_for_a_full_record(
        self, adapter: national.NationalAdapter, portal: Portal
    ) -> None:
        """Documents, fees, boundary-free fields and derived dates give the same digest on the portal."""
        d = new_dossier(code(1), competent=OTHER_UNIT, statuses=(2, 4, 9, 10), NgayHenTra="20261130170000")

        def extras(x: Any) -> None:
            ydoc.add_document(x, {"TepDinhKemId": "f1", "TenTepDinhKem": "Tờ khai.pdf", "DuocSoHoa": 1})
            ydoc.add_fee(x, {"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 8000})

        ydoc.change(d, extras)
        out = outgoing(d)
        assert one(await adapter.push([out])).outcome is Outcome.ACKED
        stored = (await portal.dossiers())[code(1)]
        assert stored["digest"] == out.digest
        assert stored["status"] == 10

    async def test_same_code_twice_in_a_batch(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """Two versions of one dossier in one batch each get a result; the portal ends at the later one."""
        d = new_dossier(code(1))
        older = outgoing(d)
        add_status(d, 4, "20261122100000")
        newer = outgoing(d)
        results = await adapter.push([older, newer])
        assert [r.outcome for r in results] == [Outcome.ACKED, Outcome.ACKED]
        assert (await portal.dossiers())[code(1)]["digest"] == newer.digest


class TestCollision:
    async def test_other_citizens_dossier_is_never_overwritten(
        self, adapter: national.NationalAdapter, portal: Portal
    ) -> None:
        """The code is held by another citizen's dossier: COLLISION, and the stored record stays."""
        theirs = outgoing(new_dossier(code(1), SoGiayToChuHoSo="079000000001"))
        assert one(await adapter.push([theirs])).outcome is Outcome.ACKED
        ours = outgoing(new_dossier(code(1), SoGiayToChuHoSo="079000000002", ChuHoSo="Trần Văn Bảo"))
        result = one(await adapter.push([ours]))
        assert result.outcome is Outcome.COLLISION
        assert "SoGiayToChuHoSo" in result.detail and "079000000001" not in result.detail
        assert (await portal.dossiers())[code(1)]["digest"] == theirs.digest
        assert (await portal.lookup(code(1)))["data"]["SoGiayToChuHoSo"] == "079000000001"

    async def test_same_citizen_turns_into_update(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """The portal already holds our citizen's dossier (lost ack): the create becomes an update."""
        assert one(await adapter.push([outgoing(new_dossier(code(1)))])).outcome is Outcome.ACKED
        ours = outgoing(new_dossier(code(1), TrichYeuHoSo="Đăng ký khai sinh, bản sao", statuses=(2, 4)))
        result = one(await adapter.push([ours]))
        assert result.outcome is Outcome.ACKED
        assert (await portal.dossiers())[code(1)]["digest"] == ours.digest
        assert (await portal.stats())["duplicates"] == 0


class TestRejections:
    async def test_invalid_record(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """A record the portal refuses is INVALID with its reason; the rest of the batch is ACKED."""
        bad = outgoing(new_dossier(code(1), TrichYeuHoSo="x" * 1001))
        bad_date = outgoing(new_dossier(code(2), NgayTiepNhan="2026-11-22"))
        good = outgoing(new_dossier(code(3)))
        results = {r.code: r for r in await adapter.push([bad, bad_date, good])}
        assert results[code(1)].outcome is Outcome.INVALID and "TrichYeuHoSo" in results[code(1)].detail
        assert results[code(2)].outcome is Outcome.INVALID and "NgayTiepNhan" in results[code(2)].detail
        assert results[code(3)].outcome is Outcome.ACKED
        stats = await portal.stats()
        assert (stats["rejected"], stats["dossiers"]) == (2, 1)

    async def test_malformed_code_is_invalid(self, adapter: national.NationalAdapter) -> None:
        """A MaHoSo that is not agency-YYMMDD-NNNN is refused."""
        result = one(await adapter.push([outgoing(new_dossier(f"{AGENCY}-261322-0001"))]))
        assert result.outcome is Outcome.INVALID and "MaHoSo" in result.detail

    @pytest.mark.parametrize("faults", [Faults(rng=random.Random(7))])
    async def test_partial_failures_retry_then_ack(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """Per-record 500s are RETRY with the progress kept; the next push completes them."""
        batch = [outgoing(new_dossier(code(n), statuses=(2, 4))) for n in range(1, 21)]
        await portal.fault(mode="partial", rate=0.3)
        first = await adapter.push(batch)
        retry = [r for r in first if r.outcome is Outcome.RETRY]
        assert retry and len(retry) < len(batch)
        assert {r.outcome for r in first} <= {Outcome.ACKED, Outcome.RETRY}
        await portal.clear_faults()
        acks = {r.code: r.ack for r in first}
        second = await adapter.push([Outgoing(o.code, o.record, o.digest, o.state, acks[o.code]) for o in batch])
        assert {r.outcome for r in second} == {Outcome.ACKED}
        stats = await portal.stats()
        assert (stats["dossiers"], stats["steps"], stats["duplicates"]) == (20, 40, 0)
        stored = await portal.dossiers()
        assert all(stored[o.code]["digest"] == o.digest for o in batch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestWholeCallFailures:
    @pytest.mark.parametrize(
        ("spec", "status"),
        [({"mode": "down"}, 503), ({"mode": "error_rate", "rate": 1.0}, 500)],
    )
    async def test_unwell_portal_is_retriable(
        self, adapter: national.NationalAdapter, portal: Portal, spec: dict[str, Any], status: int
    ) -> None:
        """Down and failing portals raise a retriable, hard UpstreamError with the HTTP status."""
        await portal.fault(**spec)
        with pytest.raises(UpstreamError) as err:
            await adapter.push([outgoing(new_dossier(code(1)))])
        assert (err.value.retriable, err.value.status, err.value.hard, err.value.upstream) == (
            True,
            status,
            True,
            "national",
        )
        with pytest.raises(UpstreamError):
            await adapter.probe()
        await portal.clear_faults()
        assert one(await adapter.push([outgoing(new_dossier(code(1)))])).outcome is Outcome.ACKED

    async def test_throttle_carries_retry_after(self, adapter: national.NationalAdapter, portal: Portal) -> None:
        """A 429 is retriable, not hard, and carries Retry-After."""
        await portal.fault(mode="throttle", retry_after_s=2.5)
        with pytest.raises(UpstreamError) as err:
            await adapter.push([outgoing(new_dossier(code(1)))])
        assert (err.value.retriable, err.value.status, err.value.retry_after, err.value.hard) == (True, 429, 2.5, False)

    async def test_blackhole_times_out(self, portal: Portal) -> None:
        """An unanswered call ends at the adapter's timeout, retriable, with no status."""
        a = make_adapter(portal.url, timeout_s=0.3)
        await portal.fault(mode="blackhole")
        started = time.monotonic()
        try:
            with pytest.raises(UpstreamError) as err:
                await a.push([outgoing(new_dossier(code(1)))])
        finally:
            await a.close()
        assert time.monotonic() - started < 2
        assert (err.value.retriable, err.value.status, err.value.hard) == (True, None, True)

    async def test_blackhole_after_login_times_out(self, portal: Portal) -> None:
        """With a session already held, every concurrent call ends at the timeout and the push raises."""
        a = make_adapter(portal.url, timeout_s=0.3)
        try:
            await a.probe()
            await portal.fault(mode="blackhole")
            started = time.monotonic()
            with pytest.raises(UpstreamError) as err:
                await a.push([outgoing(new_dossier(code(n))) for n in range(1, 301)])
            assert time.monotonic() - started < 2
        finally:
            await a.close()
        assert (err.value.retriable, err.value.status) == (True, None)

    async def test_connection_refused(self) -> None:
        """Nothing listening: retriable, no status."""
        a = make_adapter(f"http://127.0.0.1:{_free_port()}", timeout_s=2)
        try:
            with pytest.raises(UpstreamError) as err:
                await a.push([outgoing(new_dossier(code(1)))])
        finally:
            await a.close()
        assert (err.value.retriable, err.value.status) == (True, None)

    async def test_client_error_is_not_retriable(self, portal: Portal) -> None:
        """A 4xx other than 429 says the request is wrong: not retriable."""
        a = make_adapter(portal.url + "/no-such-prefix")
        try:
            with pytest.raises(UpstreamError) as err:
                await a.probe()
        finally:
            await a.close()
        assert (err.value.retriable, err.value.status) == (False, 404)


class TestFeed:
    async def test_feed_lists_received_and_competent_units(
        self, adapter: national.NationalAdapter, portal: Portal
    ) -> None:
        """A unit's feed holds the dossiers it received or is competent for, by the portal's sequence."""
        mine = new_dossier(code(1))
        forwarded = new_dossier(code(2), unit=OTHER_UNIT, competent=UNIT)
        elsewhere = new_dossier(code(3), unit=OTHER_UNIT)
        first = {r.code: r.ack for r in await adapter.push([outgoing(x) for x in (mine, forwarded, elsewhere)])}

        page = await adapter.feed(UNIT, 0, 100)
        assert {i.code for i in page.items} == {code(1), code(2)}
        assert page.next == max(i.seq for i in page.items)
        assert {i.code for i in (await adapter.feed(OTHER_UNIT, 0, 100)).items} == {code(2), code(3)}
        assert (await adapter.feed(UNIT, page.next, 100)).items == []

        paged = await adapter.feed(UNIT, 0, 1)
        assert len(paged.items) == 1
        assert {i.code for i in (await adapter.feed(UNIT, paged.next, 1)).items} <= {code(1), code(2)}

        add_status(mine, 4, "20261122100000")
        assert one(await adapter.push([outgoing(mine, first[code(1)])])).outcome is Outcome.ACKED
        later = await adapter.feed(UNIT, page.next, 100)
        assert [i.code for i in later.items] == [code(1)]
        assert later.next > page.next


async def test_serve_announces_real_port(tmp_path: Path) -> None:
    """serve() on port 0 announces the bound port, answers there and stops on the event."""
    stop = asyncio.Event()
    lines: list[str] = []
    task = asyncio.create_task(serve("127.0.0.1", 0, tmp_path / "portal", stop, announce=lines.append))
    try:
        for _ in range(200):
            if lines:
                break
            await asyncio.sleep(0.01)
        assert lines and lines[0].startswith("national portal stand-in listening on http://127.0.0.1:")
        url = lines[0].rsplit(" ", 1)[1]
        assert not url.endswith(":0")
        a = make_adapter(url)
        try:
            await a.probe()
        finally:
            await a.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
