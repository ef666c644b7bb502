"""Anti-entropy: per target, compare digests one bucket at a time and repair what differs, both ways.

The replicator follows the journal and the puller follows the upstream's feed; neither can see a dossier
an upstream lost after acknowledging it (a restore from a backup, an operator's delete), a version an
upstream holds that the replication row knows nothing about, or a dossier the feed cursor ran past. This
is the slow check behind them. A unit's dossiers are split into ``buckets`` by
:func:`sync.record.bucket_of`; each step compares one bucket (the "page"), round robin, so one step costs
``1/buckets`` of the unit whatever the upstream's digest listing costs (for the portal, a lookup per
dossier).

Per code in the bucket:

- held here, not upstream: pushed again from scratch (:meth:`Replicator.requeue`, then the push loop
  is woken);
- held upstream, not here: pulled in (:meth:`Puller.pull_codes`). A portal record without any step
  is not created here (see :mod:`sync.puller`): it stays ``missing_local`` round after round, without
  a repair, until the portal has its steps or the city's Doc has come in. This is what brings back a
  dossier whose steps reached the portal without a new feed entry for this unit;
- held on both with different digests: pulled first, then pushed again. Pull first, because the push
  of the portal's record replaces its fields: pushing before pulling would overwrite an officer's edit
  on the portal that the feed has not brought here yet. Merging is idempotent, and a pull that changes
  the dossier journals the change, so the push carries the merged dossier.

A code whose push is already under way (a pending row, or a journal entry the target's cursor has not
passed) differs for a reason the replicator is dealing with, and a dead or parked one waits for a person
(the dead-letter API): both are left alone and counted as ``skipped``; the next round looks again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from adapters.base import Upstream
from failover.breaker import BreakerState
from node.clock import Clock, iso
from node.store import Store
from sync.puller import Puller
from sync.record import bucket_of
from sync.replicator import Replicator

log = structlog.get_logger()

_SQL_CHUNK = 500

__all__ = ["AntiEntropy", "bucket_of"]


class AntiEntropy:
    """Compares one target's digests with the node's, one bucket per :meth:`run_once`, and repairs."""

    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        replicator: Replicator,
        puller: Puller,
        *,
        unit: str,
        buckets: int = 16,
        wake: asyncio.Event | None = None,
        clock: Clock | None = None,
    ) -> None:
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self.store = store
        self.upstream = upstream
        self.target = upstream.name
        self.replicator = replicator
        self.puller = puller
        self.unit = unit
        self.buckets = buckets
        # The push loop's wake event: a requeued dossier should not wait for the push loop's next tick.
        self.wake = wake
        self.clock = clock or Clock()
        # In memory only: after a restart the round starts over at bucket 0, which costs at most one
        # round's worth of repeated checks and no missed bucket for long.
        self.next_bucket = 0
        self.rounds = 0
        self.checked = 0
        self.missing_remote = 0
        self.missing_local = 0
        self.different = 0
        self.skipped = 0
        self.repaired = 0
        self.last_run_at: str | None = None

    async def run_once(self) -> bool:
        """Check and repair the next bucket; always False, so the loop waits a tick before the next one.

        Not while the target's breaker is open or trying it again: the comparison would be refused or would
        take one of the breaker's few trial calls, and the bucket waits for the next tick instead.
        """
        breaker = getattr(self.upstream, "breaker", None)
        if breaker is not None and breaker.state is not BreakerState.CLOSED:
            return False
        await self.check_bucket(self.next_bucket)
        return False

    async def run_round(self) -> None:
        """Every bucket once, from the next one on: a whole comparison now (tests, operators' drills)."""
        for _ in range(self.buckets):
            await self.run_once()

    async def check_bucket(self, bucket: int) -> dict[str, list[str]]:
        """Compare one bucket and start its repairs; what was found, by kind (codes sorted)."""
        if not 0 <= bucket < self.buckets:
            raise ValueError(f"bucket must be in 0..{self.buckets - 1}")
        local = await self._local_digests(bucket)
        # Raises UpstreamError when the target cannot answer: the bucket is not advanced, so the loop's
        # backoff retries this same bucket instead of skipping it.
        remote = await self.upstream.digests(self.unit, bucket, self.buckets)
        missing_remote = sorted(local.keys() - remote.keys())
        missing_local = sorted(remote.keys() - local.keys())
        different = sorted(c for c in local.keys() & remote.keys() if local[c] != remote[c])
        busy = await self._busy(missing_remote + different)
        missing_remote = [c for c in missing_remote if c not in busy]
        different = [c for c in different if c not in busy]

        pulled = await self.puller.pull_codes(different + missing_local) if different or missing_local else []
        to_push = missing_remote + different
        if to_push:
            await self.replicator.requeue(to_push)
            if self.wake is not None:
                self.wake.set()

        repaired = set(to_push) | set(pulled)
        self.checked += len(local.keys() | remote.keys())
        self.missing_remote += len(missing_remote)
        self.missing_local += len(missing_local)
        self.different += len(different)
        self.skipped += len(busy)
        self.repaired += len(repaired)
        self.last_run_at = iso(self.clock.now())
        self.next_bucket = (bucket + 1) % self.buckets
        if self.next_bucket == 0:
            self.rounds += 1
        found = {
            "missing_remote": missing_remote,
            "missing_local": missing_local,
            "different": different,
            "skipped": sorted(busy),
        }
        emit = log.warning if missing_remote or missing_local or different else log.debug
        emit(
            "antientropy_bucket",
            target=self.target,
            bucket=bucket,
            buckets=self.buckets,
            checked=len(local.keys() | remote.keys()),
            **{kind: len(codes) for kind, codes in found.items()},
            repaired=len(repaired),
        )
        return found

    def stats(self) -> dict[str, Any]:
        """Cumulative counts since start, for the status endpoint.

        ``repaired`` counts the dossiers a repair was started for: pushed again (the push loop finishes
        it, and the next round checks it) or pulled in with a change to the node.
        """
        return {
            "buckets": self.buckets,
            "next_bucket": self.next_bucket,
            "rounds": self.rounds,
            "checked": self.checked,
            "missing_remote": self.missing_remote,
            "missing_local": self.missing_local,
            "different": self.different,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "last_run_at": self.last_run_at,
        }

    async def _local_digests(self, bucket: int) -> dict[str, str]:
        # The same selection the upstreams make for a unit: dossiers it received or is competent for.
        rows = await self.store.fetchall(
            "SELECT code, digest FROM dossiers WHERE receiving_unit = ? OR competent_unit = ?", (self.unit, self.unit)
        )
        return {str(code): str(d) for code, d in rows if bucket_of(str(code), self.buckets) == bucket}

    async def _busy(self, codes: list[str]) -> set[str]:
        """Codes the replicator is already pushing, or has given up on until a person retries them."""
        busy: set[str] = set()
        if not codes:
            return busy
        cursor = await self.replicator.cursor()
        for i in range(0, len(codes), _SQL_CHUNK):
            chunk = codes[i : i + _SQL_CHUNK]
            marks = ",".join("?" for _ in chunk)
            rows = await self.store.fetchall(
                f"SELECT code FROM replication WHERE target = ? AND code IN ({marks})"
                " AND state IN ('pending', 'dead', 'parked', 'held')"
                f" UNION SELECT code FROM journal WHERE seq > ? AND code IN ({marks})",
                [self.target, *chunk, cursor, *chunk],
            )
            busy.update(str(r[0]) for r in rows)
        return busy
