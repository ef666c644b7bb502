"""Local fault windows and the guarded path to each upstream.

While a target's breaker is open, a call fails at once without going out (:class:`CircuitOpen`), and
while it is half-open only its few trial calls go out: a node does not keep sending pushes, pulls and
anti-entropy look-ups to an upstream it already knows is down (168 nodes would otherwise hammer a
recovering portal), and the breaker, not the callers' timeouts, decides when to try again.

A fault window (``POST /api/v1/admin/faults``) makes calls to one target fail the way an outage would,
inside this node only, so the DX Centre can drill a live fleet without touching the real upstreams. It
closes by itself when its time is up.

:class:`GuardedUpstream` is the one path every call to a target takes: it applies the open fault windows
and reports each outcome to the target's breaker (the passive health signal).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.base import FeedPage, Fetched, Outgoing, PushResult, Upstream, UpstreamError
from failover.breaker import Breaker, BreakerState

MODES = ("down", "blackhole", "latency", "error_rate")
MAX_WINDOW_S = 24 * 3600.0


class WindowSpecError(ValueError):
    """A fault window request that cannot be opened; ``field`` names what is wrong."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class Window:
    target: str
    mode: str
    until: float
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class FaultWindows:
    """Open fault windows per target (monotonic clock)."""

    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    windows: list[Window] = field(default_factory=list)

    def open(self, target: str, mode: str, seconds: float, **params: float) -> Window:
        if mode not in MODES:
            raise WindowSpecError("mode", f"must be one of {', '.join(MODES)}")
        if not 0 < seconds <= MAX_WINDOW_S:
            raise WindowSpecError("seconds", f"must be more than 0 and at most {MAX_WINDOW_S:g}")
        if mode == "latency" and not 0 < params.get("ms", 0) <= 120_000:
            raise WindowSpecError("ms", "latency needs ms between 1 and 120000")
        if mode == "error_rate" and not 0 < params.get("rate", 0) <= 1:
            raise WindowSpecError("rate", "error_rate needs rate in (0, 1]")
        window = Window(target, mode, self.clock() + seconds, dict(params))
        self.windows.append(window)
        return window

    def clear(self, target: str | None = None) -> int:
        before = len(self.windows)
        self.windows = [w for w in self.windows if target is not None and w.target != target]
        return before - len(self.windows)

    def active(self, target: str | None = None) -> list[Window]:
        now = self.clock()
        self.windows = [w for w in self.windows if w.until > now]
        return [w for w in self.windows if target is None or w.target == target]

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {"target": w.target, "mode": w.mode, "remaining_s": round(w.until - now, 3), **w.params}
            for w in self.active()
        ]

    async def apply(self, target: str, op: str, timeout_s: float) -> None:
        """Act out the open windows for one call: wait, or fail as the outage would."""
        for w in self.active(target):
            if w.mode == "latency":
                await asyncio.sleep(w.params["ms"] / 1000)
            elif w.mode == "down":
                raise UpstreamError(f"local fault window: {target} is down", upstream=target, op=op, retriable=True)
            elif w.mode == "blackhole":
                # A blackholed upstream answers nothing: the caller's timeout is what ends the call.
                await asyncio.sleep(min(timeout_s, max(0.0, w.until - self.clock())))
                raise UpstreamError(
                    f"local fault window: {target} timed out (blackhole)", upstream=target, op=op, retriable=True
                )
            elif w.mode == "error_rate" and self.rng.random() < w.params["rate"]:
                raise UpstreamError(
                    f"local fault window: {target} answered 500", upstream=target, op=op, retriable=True, status=500
                )


class CircuitOpen(UpstreamError):
    """A call refused here because the target's breaker is open (or half-open with its trials out)."""


class GuardedUpstream:
    """An upstream seen through its fault windows, reporting every outcome to its breaker."""

    def __init__(self, inner: Upstream, breaker: Breaker, windows: FaultWindows, *, timeout_s: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.breaker = breaker
        self.windows = windows
        self.timeout_s = timeout_s
        self.last_error: str | None = None
        self.last_ok: float | None = None
        self.refused = 0  # calls refused while the breaker was open

    def refusing(self) -> bool:
        """Whether calls are refused here right now (the breaker is open): a loop with work for this target
        has nothing to gain by preparing it until the breaker turns half-open."""
        return self.breaker.state is BreakerState.OPEN

    async def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        if not self.breaker.allow():
            self.refused += 1
            raise CircuitOpen(
                f"{op}: {self.name} breaker is {self.breaker.state.value} ({self.breaker.last_reason})",
                upstream=self.name,
                op=op,
                retriable=True,
            )
        try:
            await self.windows.apply(self.name, op, self.timeout_s)
            result = await fn()
        except UpstreamError as exc:
            self.last_error = str(exc) if str(exc).startswith(op) else f"{op}: {exc}"
            if exc.hard:
                self.breaker.record_failure(str(exc))
            else:
                self.breaker.release()
            raise
        except BaseException:
            # Cancelled or failed in a way that says nothing about the target: a trial it held is free again.
            self.breaker.release()
            raise
        self.breaker.record_success()
        self.last_ok = time.time()
        return result

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        results: list[PushResult] = await self._call("push", lambda: self.inner.push(batch))
        return results

    async def probe(self) -> None:
        await self._call("probe", self.inner.probe)

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        page: FeedPage = await self._call("feed", lambda: self.inner.feed(unit, since, limit))
        return page

    async def fetch(self, code: str, state_vector: bytes | None) -> Fetched | None:
        fetched: Fetched | None = await self._call("fetch", lambda: self.inner.fetch(code, state_vector))
        return fetched

    async def digests(self, unit: str, bucket: int, buckets: int) -> dict[str, str]:
        found: dict[str, str] = await self._call("digests", lambda: self.inner.digests(unit, bucket, buckets))
        return found

    async def close(self) -> None:
        await self.inner.close()
