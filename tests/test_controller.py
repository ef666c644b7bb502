"""The active-source controller on a controlled clock, over a real store."""

from __future__ import annotations

from pathlib import Path

from failover.breaker import Breaker, BreakerSettings
from failover.controller import Controller
from node.store import Store


class Mono:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def make(tmp_path: Path, backlog: int = 0) -> tuple[Controller, dict[str, Breaker], Mono, Store]:
    mono = Mono()
    settings = BreakerSettings(consecutive_failures=1, open_base_s=1.0, jitter=0.0, close_after=1)
    breakers = {n: Breaker(n, settings, clock=mono) for n in ("national", "city")}
    store = Store(tmp_path / "s.sqlite3")
    await store.open()

    async def lag(_: str) -> int:
        return backlog

    c = Controller(store, breakers, hold_s=10.0, backlog=lag, monotonic=mono)
    await c.load()
    return c, breakers, mono, store


async def outage(c: Controller, breakers: dict[str, Breaker], mono: Mono) -> None:
    breakers["national"].record_failure("refused")
    await c.evaluate()
    assert c.active == "city"
    mono.t += 1.5  # open time over: half-open
    breakers["national"].record_success()  # trial succeeds: closed again


class TestHysteresis:
    """Failback waits for the hold time, longer after each recent switch away (flap damping)."""

    async def test_hold_then_failback(self, tmp_path: Path) -> None:
        c, breakers, mono, store = await make(tmp_path)
        try:
            await outage(c, breakers, mono)
            mono.t += 9.0
            await c.evaluate()
            assert c.active == "city"
            mono.t += 1.5
            await c.evaluate()
            assert c.active == "national"
        finally:
            await store.close()

    async def test_a_flapping_primary_waits_longer_each_time(self, tmp_path: Path) -> None:
        c, breakers, mono, store = await make(tmp_path)
        try:
            holds = []
            for _ in range(3):
                await outage(c, breakers, mono)
                holds.append(c.effective_hold())
                mono.t += c.effective_hold() + 0.1
                await c.evaluate()
                assert c.active == "national"
            assert holds == [10.0, 20.0, 40.0]
            mono.t += 10 * 10.0 + 1  # the flaps are forgotten after ten hold times
            assert c.effective_hold() == 10.0
        finally:
            await store.close()

    async def test_no_failback_with_a_backlog(self, tmp_path: Path) -> None:
        c, breakers, mono, store = await make(tmp_path, backlog=3)
        try:
            await outage(c, breakers, mono)
            mono.t += 60
            await c.evaluate()
            assert c.active == "city"
        finally:
            await store.close()

    async def test_both_down_is_offline_and_either_recovery_ends_it(self, tmp_path: Path) -> None:
        c, breakers, mono, store = await make(tmp_path)
        try:
            breakers["national"].record_failure()
            breakers["city"].record_failure()
            await c.evaluate()
            assert c.active is None
            mono.t += 1.5
            breakers["city"].record_success()
            await c.evaluate()
            assert c.active == "city"
            kinds = [(e["from"], e["to"]) for e in c.events]
            assert kinds == [(None, "city"), ("national", None)]
        finally:
            await store.close()
