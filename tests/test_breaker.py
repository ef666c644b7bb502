"""The circuit breaker's state machine, on a controlled clock."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from failover.breaker import Breaker, BreakerSettings, BreakerState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw: float) -> tuple[Breaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    b = Breaker(
        "national",
        BreakerSettings(**kw),  # type: ignore[arg-type]
        clock=clock,
        rng=random.Random(1),
        on_change=lambda _n, old, new, _r: changes.append((old.value, new.value)),
    )
    return b, clock, changes


class TestTripping:
    """Hard failures open the breaker; successes in between keep it closed."""

    def test_consecutive_failures_open(self) -> None:
        b, _, changes = make(consecutive_failures=4)
        for _ in range(3):
            b.record_failure("refused")
        assert b.state is BreakerState.CLOSED
        b.record_failure("refused")
        assert b.state is BreakerState.OPEN
        assert changes == [("closed", "open")]
        assert "4 consecutive failures" in b.last_reason

    def test_a_success_resets_the_run(self) -> None:
        b, _, _ = make(consecutive_failures=4, min_calls=1000)
        for _ in range(10):
            b.record_failure()
            b.record_failure()
            b.record_failure()
            b.record_success()
        assert b.state is BreakerState.CLOSED

    def test_failure_rate_over_window_once_volume_reached(self) -> None:
        b, clock, _ = make(consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=30)
        for i in range(10):
            clock.now += 1
            if i % 2:
                b.record_failure()
            else:
                b.record_success()
        assert b.state is BreakerState.OPEN

    def test_old_calls_leave_the_window(self) -> None:
        b, clock, _ = make(consecutive_failures=100, failure_rate=0.5, min_calls=10, window_s=30)
        for i in range(9):  # 5 failures, 4 successes: under the volume that counts
            if i % 2:
                b.record_success()
            else:
                b.record_failure()
        clock.now += 31
        b.record_failure()  # with the old calls still in the window this would be 6 of 10
        assert b.state is BreakerState.CLOSED


class TestRecovery:
    """Open lasts a jittered, growing time; half-open trials decide."""

    def test_half_open_after_open_time_and_closes_after_successes(self) -> None:
        b, clock, changes = make(consecutive_failures=1, open_base_s=5, jitter=0.2, close_after=2)
        b.record_failure()
        assert b.state is BreakerState.OPEN
        clock.now += 3.9
        assert b.state is BreakerState.OPEN
        clock.now += 2.2
        assert b.state is BreakerState.HALF_OPEN
        assert b.allow() and b.allow() and b.allow() and not b.allow()
        b.record_success()
        assert b.state is BreakerState.HALF_OPEN
        b.record_success()
        assert b.state is BreakerState.CLOSED
        assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]

    def test_failed_trial_reopens_for_longer(self) -> None:
        b, clock, _ = make(consecutive_failures=1, open_base_s=5, jitter=0.0, open_cap_s=12)
        durations = []
        for _ in range(4):
            b.record_failure()
            assert b.state is BreakerState.OPEN
            durations.append(b.open_until - clock.now)
            clock.now = b.open_until
            assert b.state is BreakerState.HALF_OPEN
        assert durations == [5, 10, 12, 12]

    def test_open_time_is_jittered(self) -> None:
        opens = set()
        for seed in range(20):
            b = Breaker(
                "x",
                BreakerSettings(consecutive_failures=1, open_base_s=5, jitter=0.2),
                clock=lambda: 0.0,
                rng=random.Random(seed),
            )
            b.record_failure()
            opens.add(round(b.open_until, 3))
            assert 4.0 <= b.open_until <= 6.0
        assert len(opens) > 10


class TestInvariants:
    """Whatever the outcomes, the breaker only moves along its three legal edges."""

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["ok", "fail", "wait"]), st.floats(0, 20)), max_size=60))
    def test_legal_edges_only(self, events: list[tuple[str, float]]) -> None:
        b, clock, changes = make(consecutive_failures=3, open_base_s=2, min_calls=5)
        for kind, dt in events:
            if kind == "ok":
                b.record_success()
            elif kind == "fail":
                b.record_failure()
            else:
                clock.now += dt
            _ = b.state
        legal = {("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("half_open", "closed")}
        assert set(changes) <= legal
        for (_, to), (frm, _) in itertools.pairwise(changes):
            assert to == frm
