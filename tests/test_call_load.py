"""What a node sends its upstreams when it has nothing new to tell them, and while one of them is down.

168 nodes talk to the same two upstreams: a call that carries nothing (a probe of a target the node just
reached anyway, a push to a target known to be down, a look-up of the echo of the node's own push) is
load the whole city pays for.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from pathlib import Path

import pycrdt
import pytest
from pycrdt import Map

from adapters.base import FeedPage, Fetched, Outgoing, PushResult, UpstreamError, feed_state_vector
from failover.breaker import BreakerState
from failover.health import Prober
from failover.windows import CircuitOpen, FaultWindows, GuardedUpstream
from node.store import Store
from sync import doc as ydoc
from sync.puller import Puller
from sync.record import FIELDS, digest, materialise
from sync.statevector import covers, decode_state_vector
from tests.conftest import UNIT, eventually
from tests.test_antientropy import push_elsewhere
from tests.test_breaker import make
from tests.test_failover import cluster, until
from tests.test_pull import city
from tests.test_replication import post_workload, wait_converged


class Scripted:
    """An upstream at the process boundary: answers each call as scripted and counts what reached it."""

    name = "national"

    def __init__(self) -> None:
        self.calls = 0
        self.answer: UpstreamError | None = None

    async def _call(self) -> None:
        self.calls += 1
        if self.answer is not None:
            raise self.answer

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        await self._call()
        return []

    async def probe(self) -> None:
        await self._call()

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        await self._call()
        return FeedPage()

    async def fetch(self, code: str, state_vector: bytes | None) -> Fetched | None:
        await self._call()
        return None

    async def digests(self, unit: str, bucket: int, buckets: int) -> dict[str, str]:
        await self._call()
        return {}

    async def close(self) -> None:
        return None


DOWN = UpstreamError("connection refused", upstream="national", op="call", retriable=True)
REFUSED_400 = UpstreamError("HTTP 400", upstream="national", op="call", retriable=False, status=400)


def guarded(**settings: float) -> tuple[GuardedUpstream, Scripted, object]:
    breaker, clock, _ = make(**settings)
    inner = Scripted()
    return GuardedUpstream(inner, breaker, FaultWindows(), timeout_s=1.0), inner, clock


class TestOpenBreaker:
    """While a target's breaker is open nothing goes out to it; half-open lets a few trial calls through."""

    async def test_open_breaker_refuses_without_calling(self) -> None:
        g, inner, clock = guarded(consecutive_failures=2, open_base_s=60.0)
        inner.answer = DOWN
        for _ in range(2):
            with pytest.raises(UpstreamError):
                await g.push([])
        assert g.breaker.state is BreakerState.OPEN and inner.calls == 2
        for call in (lambda: g.push([]), g.probe, lambda: g.feed("26743", 0, 10), lambda: g.fetch("x", None)):
            with pytest.raises(CircuitOpen) as refused:
                await call()
            assert refused.value.retriable
        assert inner.calls == 2 and g.refused == 4  # none of them reached the upstream
        assert g.breaker.state is BreakerState.OPEN  # and a refusal is not one more failure

        clock.now += 80  # type: ignore[attr-defined]
        inner.answer = None
        await g.probe()  # a trial call
        await g.push([])
        assert g.breaker.state is BreakerState.CLOSED and inner.calls == 4

    async def test_half_open_allows_only_its_trials(self) -> None:
        g, inner, clock = guarded(consecutive_failures=1, open_base_s=10.0, half_open_trials=2, close_after=3)
        inner.answer = DOWN
        with pytest.raises(UpstreamError):
            await g.probe()
        clock.now += 20  # type: ignore[attr-defined]
        inner.answer = None
        await g.probe()
        await g.probe()
        assert g.breaker.state is BreakerState.HALF_OPEN  # two successes, three needed
        with pytest.raises(CircuitOpen):
            await g.probe()  # the trials are used up
        assert inner.calls == 3

    async def test_an_answer_without_verdict_gives_the_trial_back(self) -> None:
        g, inner, clock = guarded(consecutive_failures=1, open_base_s=10.0, half_open_trials=1, close_after=1)
        inner.answer = DOWN
        with pytest.raises(UpstreamError):
            await g.push([])
        clock.now += 20  # type: ignore[attr-defined]
        inner.answer = REFUSED_400  # the upstream answered, but about what was sent, not its health
        with pytest.raises(UpstreamError) as refused:
            await g.push([])
        assert not isinstance(refused.value, CircuitOpen)
        inner.answer = None
        await g.probe()  # the trial is free again: without that the breaker would never close
        assert g.breaker.state is BreakerState.CLOSED and inner.calls == 3


class TestProbes:
    """A probe goes out only when nothing else told the node how the target is."""

    def test_due(self) -> None:
        g, _inner, _ = guarded(consecutive_failures=2, open_base_s=60.0)
        prober = Prober([g], interval_s=1.0, quiet_s=5.0)
        slot = time.time()
        assert prober.due(g, slot)  # never reached
        g.last_ok = slot + 0.1
        assert not prober.due(g, slot)  # a call succeeded since the last slot
        assert not prober.due(g, slot + 0.2)  # nothing since, but in good standing and heard from lately
        g.last_ok = time.time() - 5.5
        assert prober.due(g, time.time())  # in good standing, quiet for longer than quiet_s
        g.last_ok = time.time()
        g.breaker.record_failure("reset")
        assert g.breaker.in_doubt and g.breaker.state is BreakerState.CLOSED
        assert prober.due(g, time.time() + 0.01)  # in doubt: every slot without a success since
        g.breaker.record_failure("down")
        assert g.breaker.state is BreakerState.OPEN
        g.last_ok = None
        assert not prober.due(g, slot)  # open: its own timer decides when to try again

    def test_quiet_is_never_shorter_than_the_interval(self) -> None:
        g, _inner, _ = guarded()
        assert Prober([g], interval_s=2.0, quiet_s=0.5).quiet_s == 2.0

    async def test_busy_target_is_not_probed(self) -> None:
        g, _inner, _ = guarded()
        prober = Prober([g], interval_s=0.05)
        task = asyncio.create_task(prober.run())
        try:
            for _ in range(20):  # the node talks to the target all the time
                await g.push([])
                await asyncio.sleep(0.01)
        finally:
            prober.stop()
            await task
        assert prober.probes <= 1  # the first slot, before any other call


class TestEcho:
    """The echo of the node's own push on the portal's feed is recognised by its digest and not looked up."""

    async def test_echo_is_not_fetched(self, tmp_path: Path) -> None:
        target = "national"
        async with cluster(tmp_path) as (node, url, s, ups):
            await post_workload(url, s, 3)
            await wait_converged(node, ups)
            puller = node.pullers[target]

            async def echoed() -> bool:
                return puller.echoes >= 3

            await eventually(echoed, what="the feed's echoes recognised")
            # Every dossier's own push came back on the feed and was recognised without a fetch. (A feed read
            # between the portal's record call and its steps call may still fetch one: that one differs.)
            assert puller.echoes >= 3
            assert puller.pulled < puller.echoes


class TestBookkeepingCommits:
    """A commit that skips its fsync leaves the writer at synchronous=FULL for the next one."""

    async def test_light_commit_restores_full(self, tmp_path: Path) -> None:
        async with Store(tmp_path / "s.sqlite3") as store:
            await store.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('a', '1')"), durable=False)
            assert await store.on_writer(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2

            def boom(c: object) -> None:
                raise RuntimeError("fails inside")

            with pytest.raises(RuntimeError):
                await store.write(boom, durable=False)
            assert await store.on_writer(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
            assert await store.get_meta("a") == "1"


OTHER_CLIENT = 777_000_444


class TestCityEcho:
    """A city feed item is skipped only when the node's state vector covers the city's Doc; an equal record
    with operations the node lacks is still fetched."""

    async def test_covered_items_skipped_equal_record_fetched(self, tmp_path: Path) -> None:
        async with cluster(tmp_path) as (node, url, s, ups):
            codes = await post_workload(url, s, 3)
            await wait_converged(node, ups)
            puller = Puller(node.store, node.service, node.guarded["city"].inner, unit=UNIT)
            while await puller.run_once():
                pass
            assert (puller.echoes, puller.pulled) == (3, 0)

            # Another writer sets a field to the value it already holds: the record and its digest stay the
            # same, the Doc's history does not.
            code = codes[0]
            adapter = city(ups)
            try:
                fetched = await adapter.fetch(code, None)
                assert fetched is not None and fetched.update is not None
                other = ydoc.load_doc(code, fetched.update, OTHER_CLIENT)
                fields = other.get(FIELDS, type=Map)
                with other.transaction():
                    fields["NgayHenTra"] = fields["NgayHenTra"]
                record, _ = materialise(other)
                assert digest(record) == fetched.digest
                await push_elsewhere(
                    ups, "city", Outgoing(code, record, digest(record), other.get_update(), fetched.state_vector)
                )
                city_sv = decode_state_vector(other.get_state())
            finally:
                await adapter.close()

            puller.reload_cursor()
            while await puller.run_once():
                pass
            assert puller.pulled == 1  # the one item the node's state vector did not cover
            row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            assert row is not None
            held = decode_state_vector(pycrdt.get_state(node.store.sealer.state(code, row[0])))
            assert covers(held, city_sv)

    def test_feed_state_vector_parsing(self) -> None:
        assert feed_state_vector({"sv": "AQKDAQ"}) == base64.urlsafe_b64decode("AQKDAQ==")
        for bad in ({}, {"sv": ""}, {"sv": 7}, {"sv": "!!!"}):
            assert feed_state_vector(bad) is None


class TestOpenBreakerQuiet:
    """While a target's breaker is open, the node neither prepares pushes for it nor reads its feed: nothing
    is even refused, however much the desks write meanwhile."""

    async def test_nothing_prepared_or_refused_while_open(self, tmp_path: Path) -> None:
        async with cluster(tmp_path, open_base_s=60.0, open_cap_s=60.0) as (node, url, s, ups):
            g = node.guarded["national"]
            await ups.fault("national", mode="down")

            async def is_open() -> bool:
                return g.breaker.state is BreakerState.OPEN

            await until(is_open, 10, "the national breaker opens")
            await asyncio.sleep(0.3)  # a push or pull step that started before it opened has ended
            refused = g.refused
            await post_workload(url, s, 5, start=1)
            await asyncio.sleep(1.5)  # several replicator and pull ticks
            assert g.breaker.state is BreakerState.OPEN
            assert g.refused == refused
            lag = await node.replicators["national"].lag(node.service.journal_head)
            assert lag["lag_records"] >= 5  # waiting, not lost: it goes out once the breaker half-opens
