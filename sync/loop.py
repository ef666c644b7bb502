"""The one loop template for replicators, pullers and probes.

Wake on a tick or a notification, run one step, back off with full jitter to a cap on errors, count
consecutive errors, log a single "recovered" line when a streak ends, exit quietly on cancellation.
Tests call the step (``run_once``) directly instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import structlog

from adapters.base import UpstreamError

log = structlog.get_logger()


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """AWS-style full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    r = rng or random
    return r.uniform(0, min(cap_s, base_s * (2 ** min(attempt, 30))))


class Loop:
    """Runs ``step`` until stopped; ``step`` returns True when it has more work right away."""

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[bool]],
        *,
        wake: asyncio.Event | None = None,
        tick_s: float = 1.0,
        backoff_base_s: float = 0.2,
        backoff_cap_s: float = 30.0,
        linger_s: float = 0.0,
    ) -> None:
        self.name = name
        # After a notification, wait this long before the step, so that a burst of changes goes out as one.
        self.linger_s = linger_s
        self._step = step
        self.wake = wake or asyncio.Event()
        self.tick_s = tick_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.errors = 0
        self.last_error: str | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    async def _sleep(self, seconds: float) -> None:
        # asyncio.timeout, not wait_for: no task per sleep (a fleet of nodes sleeps thousands of times a second).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()
                if self.linger_s > 0 and not self._stop.is_set():
                    await asyncio.sleep(self.linger_s)

    async def run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()
            try:
                more = await self._step()
            except asyncio.CancelledError:
                return
            except Exception as exc:
                self.errors += 1
                self.last_error = str(exc) or type(exc).__name__
                delay = full_jitter(self.errors, self.backoff_base_s, self.backoff_cap_s)
                if isinstance(exc, UpstreamError) and exc.retry_after:
                    delay = max(delay, min(exc.retry_after, self.backoff_cap_s))
                if self.errors == 1 or self.errors % 20 == 0:
                    log.warning(
                        "loop_error",
                        loop=self.name,
                        errors=self.errors,
                        error=self.last_error,
                        retry_in_s=round(delay, 3),
                    )
                # Errors back off on the timer only: a notification must not turn a failing upstream
                # into a busy loop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                continue
            if self.errors:
                log.info("loop_recovered", loop=self.name, after_errors=self.errors)
                self.errors = 0
                self.last_error = None
            if not more:
                await self._sleep(self.tick_s)
