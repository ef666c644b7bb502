"""A circuit breaker per target: closed, open, half-open.

Defaults and where they come from:

- ``consecutive_failures = 4``: Envoy's outlier detection ejects a host after 5 consecutive 5xx
  (``consecutive_5xx``). A ward node calls each target about once a second (pulls, and probes when
  nothing else went out), so 4 hard failures in a row is 2 to 4 s of evidence for a refused
  connection and, with a 2 s probe timeout, about 10 s for a blackhole;
  a primary failing 30 % of calls at random reaches 4 in a row rarely (0.8 % of runs of four).
- ``failure_rate = 0.5`` over ``window_s = 30`` once ``min_calls = 10`` calls were seen: resilience4j's
  ``failureRateThreshold`` is 50 % by default, with ``minimumNumberOfCalls`` 100 on a busy service;
  a ward makes tens of calls a minute, so 10 is the volume that still means something here.
- ``open_base_s = 5`` doubling per consecutive opening up to ``open_cap_s = 300``, with ±20 % jitter:
  Envoy's ``base_ejection_time`` (30 s) multiplied by the number of ejections, capped by
  ``max_ejection_time`` (300 s); a shorter base because a ward wants to notice recovery quickly, and
  jitter so 168 nodes do not retry a recovering upstream in step.
- ``half_open_trials = 3``, closing after ``close_after = 2`` successes: HAProxy's ``rise 2`` (two good
  checks before a server is back) and resilience4j's ``permittedNumberOfCallsInHalfOpenState`` (a few
  trial calls; any failure opens again).

Only hard failures count (connection refused or reset, timeouts, 5xx): a 4xx means we sent something the
upstream did not accept, not that it is unwell.
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerSettings:
    consecutive_failures: int = 4
    failure_rate: float = 0.5
    window_s: float = 30.0
    min_calls: int = 10
    open_base_s: float = 5.0
    open_cap_s: float = 300.0
    jitter: float = 0.2
    half_open_trials: int = 3
    close_after: int = 2

    def scaled(self, factor: float) -> BreakerSettings:
        """The same breaker with every duration multiplied by ``factor`` (compressed-time drills)."""
        return BreakerSettings(
            self.consecutive_failures,
            self.failure_rate,
            self.window_s * factor,
            self.min_calls,
            self.open_base_s * factor,
            self.open_cap_s * factor,
            self.jitter,
            self.half_open_trials,
            self.close_after,
        )


Listener = Callable[[str, BreakerState, BreakerState, str], None]


class Breaker:
    """Decides from call outcomes whether a target is fit to serve."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_change: Listener | None = None,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()
        self._openings = 0
        self._open_until = 0.0
        self._trials = 0
        self._trial_successes = 0
        self.changed_at = clock()
        self.last_reason = ""

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._set(BreakerState.HALF_OPEN, "open time elapsed: trial calls allowed")
        return self._state

    @property
    def open_until(self) -> float:
        return self._open_until

    def allow(self) -> bool:
        """Whether a call may go out now (every call while closed, a few trials while half-open)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._trials < self.settings.half_open_trials:
            self._trials += 1
            return True
        return False

    def release(self) -> None:
        """Give back a trial that ended without a verdict (an answer that says nothing about health)."""
        if self._state is BreakerState.HALF_OPEN and self._trials > 0:
            self._trials -= 1

    @property
    def in_doubt(self) -> bool:
        """A call failed since the last success, or the breaker is trying the target again (half-open)."""
        return self._consecutive > 0 or self.state is BreakerState.HALF_OPEN

    def record_success(self) -> None:
        self._consecutive = 0
        self._note(ok=True)
        if self.state is BreakerState.HALF_OPEN:
            self._trial_successes += 1
            if self._trial_successes >= self.settings.close_after:
                self._openings = 0
                self._set(BreakerState.CLOSED, f"{self._trial_successes} trial calls succeeded")

    def record_failure(self, reason: str = "") -> None:
        self._consecutive += 1
        self._note(ok=False)
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._trip(f"trial call failed: {reason}" if reason else "trial call failed")
        elif state is BreakerState.CLOSED:
            if self._consecutive >= self.settings.consecutive_failures:
                self._trip(f"{self._consecutive} consecutive failures" + (f", last: {reason}" if reason else ""))
            else:
                calls = len(self._window)
                failed = sum(1 for _, ok in self._window if not ok)
                if calls >= self.settings.min_calls and failed / calls >= self.settings.failure_rate:
                    self._trip(f"{failed} of {calls} calls failed in {self.settings.window_s:g} s")

    def _note(self, *, ok: bool) -> None:
        now = self._clock()
        self._window.append((now, ok))
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] < horizon:
            self._window.popleft()

    def _trip(self, reason: str) -> None:
        self._openings += 1
        s = self.settings
        base = min(s.open_cap_s, s.open_base_s * 2 ** (self._openings - 1))
        duration = base * self._rng.uniform(1 - s.jitter, 1 + s.jitter)
        self._open_until = self._clock() + duration
        self._window.clear()
        self._set(BreakerState.OPEN, f"{reason}; open for {duration:.1f} s")

    def _set(self, new: BreakerState, reason: str) -> None:
        old, self._state = self._state, new
        self._trials = 0
        self._trial_successes = 0
        self.changed_at = self._clock()
        self.last_reason = reason
        if old is not new and self._on_change is not None:
            self._on_change(self.name, old, new, reason)
