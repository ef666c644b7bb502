"""Active health probes: each target probed on a jittered interval, each probe with its own timeout.

The jitter (uniform in ±50 % of the interval) keeps 168 nodes from probing an upstream in step. A probe's
outcome reaches the target's breaker through :class:`failover.windows.GuardedUpstream`, like every push
and pull does.

A probe is only the fallback for a target nothing else is talking to. A target in good standing (its last
call succeeded) that answered any call within ``quiet_s`` is not probed: the node's pulls and pushes already
say it is well. A target in doubt (a call failed since its last success, or its breaker is half-open) is
probed on every slot in which nothing else succeeded, so a failure seen on a pull or a push is confirmed or
cleared within a few intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from adapters.base import UpstreamError
from failover.breaker import BreakerState
from failover.windows import GuardedUpstream


class Prober:
    """Probes every target; ``run_once`` probes each once, ``run`` loops until stopped."""

    def __init__(
        self,
        targets: list[GuardedUpstream],
        *,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
        quiet_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = targets
        self.interval_s = interval_s
        self.quiet_s = max(quiet_s, interval_s)
        self.timeout_s = timeout_s
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.probes = 0

    def stop(self) -> None:
        self._stop.set()

    async def probe(self, target: GuardedUpstream) -> bool:
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await target.probe()
        except TimeoutError:
            # The adapter did not give up by itself: count it as the hard failure it is.
            target.last_error = f"probe: no answer within {self.timeout_s:g} s"
            target.breaker.record_failure(target.last_error)
            return False
        except UpstreamError:
            return False
        return True

    async def run_once(self) -> dict[str, bool]:
        results = await asyncio.gather(*(self.probe(t) for t in self.targets))
        return {t.name: ok for t, ok in zip(self.targets, results, strict=True)}

    def due(self, target: GuardedUpstream, since: float) -> bool:
        """Whether ``target`` needs a probe now, its previous slot having started at ``since`` (wall clock).

        Not while its breaker is open: no call goes out then, and the breaker turns half-open by itself
        when its open time is up, after which the probe is one of its trial calls. Not when another call
        succeeded since the previous slot either: that already says the target is well, and 168 nodes must
        not add a steady probe load to an upstream they are talking to anyway. And for a target in good
        standing, not until ``quiet_s`` have passed without any call succeeding.
        """
        breaker = target.breaker
        if breaker.state is BreakerState.OPEN:
            return False
        if target.last_ok is None:
            return True
        if breaker.in_doubt:
            return target.last_ok < since
        return time.time() - target.last_ok >= self.quiet_s

    async def _run_target(self, target: GuardedUpstream) -> None:
        # Each target on its own schedule: a blackholed one must not delay probes of the other.
        since = 0.0
        while not self._stop.is_set():
            if self.due(target, since):
                await self.probe(target)
            since = time.time()
            delay = self.interval_s * self._rng.uniform(0.5, 1.5)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*(self._run_target(t) for t in self.targets))
