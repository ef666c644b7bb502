"""One replicator per target: a durable cursor over the journal, batched pushes, per-dossier state.

A window of journal entries after the cursor is coalesced into the set of dossiers it touched; each is
pushed with its current state (so several changes of one dossier travel as one, in order by
construction). Every dossier's outcome is written to ``replication`` and the cursor moves past the
window in the same transaction, only after the upstream answered:

- ``synced``: the upstream acknowledged exactly the dossier's digest;
- ``pending``: a per-record retriable failure; retried from ``replication`` with backoff;
- ``parked``: failed retriably too often; ``dead``: rejected as invalid or a code collision.

None of them blocks the cursor. A dead or parked dossier is tried again when it changes, or on request.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base

from adapters.base import Outcome, Outgoing, PushResult, Upstream, UpstreamError
from failover.windows import GuardedUpstream
from node.clock import Clock, iso
from node.store import Store
from sync.merge import PORTAL_BASE_UPSERT

log = structlog.get_logger()

_SQL_CHUNK = 500
QUIET_RECHECK_S = 30.0


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retriable


class _JitterHonouringRetryAfter(wait_base):
    """Full-jitter exponential backoff that never waits less than the upstream's Retry-After."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s, self.cap_s = base_s, cap_s

    def __call__(self, retry_state: Any) -> float:
        delay = random.uniform(0, min(self.cap_s, self.base_s * 2 ** (retry_state.attempt_number - 1)))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, UpstreamError) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, self.cap_s))
        return delay


@dataclass(frozen=True)
class ReplicatorSettings:
    window: int = 2000  # journal entries read per step
    batch_size: int = 500  # dossiers per push call
    max_attempts: int = 8  # per-record retriable failures before a dossier is parked
    call_attempts: int = 3  # tries of one push call before the step fails and the loop backs off
    retry_base_s: float = 0.5
    retry_cap_s: float = 30.0
    # Keep the record each acknowledgement covered: the base of the portal's three-way merge.
    store_base: bool = False


class Replicator:
    """Pushes every change in the journal to one upstream."""

    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        *,
        clock: Clock | None = None,
        settings: ReplicatorSettings | None = None,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.target = upstream.name
        self.clock = clock or Clock()
        self.settings = settings or ReplicatorSettings()
        self.last_ok_at: str | None = None
        self.pushed = 0
        # Set by the node: the journal head (for the lag in the batch line) and a metrics observer
        # called once per push call with (target, outcome counts by record, seconds, the call failed).
        self.journal_head: Callable[[], int] | None = None
        self.on_batch: Callable[[str, dict[str, int], float, bool], None] | None = None
        # The cursor as last read or written: this replicator is its only writer while the node runs.
        self._cursor: int | None = None
        # While the journal has nothing past the cursor, no pending row is due before this (ms since the
        # epoch): a step then reads nothing. Reset by :meth:`poke` whenever rows are queued from outside.
        self._quiet_until_ms = 0

    async def cursor(self) -> int:
        if self._cursor is None:
            row = await self.store.fetchone("SELECT seq FROM cursors WHERE target = ?", (self.target,))
            self._cursor = int(row[0]) if row else 0
        return self._cursor

    def poke(self) -> None:
        """Rows were queued for this target outside the journal (a retry, a requeue, a released hold)."""
        self._quiet_until_ms = 0

    async def run_once(self) -> bool:
        """Push one window; True when more work is waiting."""
        if isinstance(self.upstream, GuardedUpstream) and self.upstream.refusing():
            # Its breaker is open: every push would be refused at once. Reading and preparing the backlog
            # for that, and logging each refusal, is the cost of a long outage on every node; the next tick
            # after the breaker turns half-open pushes (a trial call) and the backlog drains from there.
            return False
        cursor = await self.cursor()
        now_ms = int(time.time() * 1000)
        if self.journal_head is not None and self.journal_head() <= cursor and now_ms < self._quiet_until_ms:
            return False  # an idle tick: nothing new in the journal and no retry due
        entries = await self.store.fetchall(
            "SELECT seq, code, at FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, self.settings.window)
        )
        retry_rows = await self.store.fetchall(
            "SELECT code FROM replication WHERE target = ? AND state = 'pending' AND next_at <= ? LIMIT ?",
            (self.target, now_ms, self.settings.batch_size),
        )
        codes = list(dict.fromkeys([e[1] for e in entries] + [r[0] for r in retry_rows]))
        if not codes:
            row = await self.store.fetchone(
                "SELECT min(next_at) FROM replication WHERE target = ? AND state = 'pending'", (self.target,)
            )
            # Looked at again at least every QUIET_RECHECK_S whatever happens, as a safety net.
            due = now_ms + int(QUIET_RECHECK_S * 1000)
            self._quiet_until_ms = min(due, int(row[0])) if row is not None and row[0] is not None else due
            return False
        head = int(entries[-1][0]) if entries else cursor
        todo = await self._outgoing(codes)
        results: list[PushResult] = []
        beyond = max(0, self.journal_head() - head) if self.journal_head is not None else 0
        oldest = _age_s(entries[0][2], self.clock) if entries else 0.0
        for i in range(0, len(todo), self.settings.batch_size):
            chunk = todo[i : i + self.settings.batch_size]
            waiting = len(todo) - i - len(chunk) + beyond
            results.extend(await self._push(chunk, lag_records=waiting, lag_s=oldest))
        await self._record(todo, results, head)
        return len(entries) >= self.settings.window or len(retry_rows) >= self.settings.batch_size

    async def _outgoing(self, codes: Sequence[str]) -> list[Outgoing]:
        """The dossiers whose current digest the target has not acknowledged (and not given up on)."""
        out: list[Outgoing] = []
        settled: list[tuple[str, str]] = []
        for i in range(0, len(codes), _SQL_CHUNK):
            chunk = list(codes[i : i + _SQL_CHUNK])
            marks = ",".join("?" for _ in chunk)
            rows = await self.store.fetchall(
                f"SELECT d.code, d.state, d.record, d.digest, r.state, r.digest, r.acked_digest, r.ack"
                f" FROM dossiers d LEFT JOIN replication r ON r.target = ? AND r.code = d.code"
                f" WHERE d.code IN ({marks})",
                [self.target, *chunk],
            )
            for code, state, record, digest, rstate, rdigest, acked, ack in rows:
                if rstate == "held":
                    continue  # an imported dossier not yet looked up on the target (node/legacy.py)
                if acked == digest:
                    if rstate not in (None, "synced"):
                        # The dossier came back to content the target already acknowledged (an edit undoing a
                        # refused change): nothing to send, and the row must not stay pending or dead.
                        settled.append((code, digest))
                    continue
                if rstate in ("dead", "parked") and rdigest == digest:
                    continue  # given up on this exact content; a change or an explicit retry revives it
                out.append(
                    Outgoing(
                        code,
                        json.loads(self.store.sealer.record(code, record)),
                        digest,
                        self.store.sealer.state(code, state),
                        None if ack is None else bytes(ack),
                    )
                )
        if settled:
            await self._settle(settled)
        return out

    async def _settle(self, settled: list[tuple[str, str]]) -> None:
        at, target = iso(self.clock.now()), self.target

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE replication SET state = 'synced', digest = acked_digest, attempts = 0, last_error = NULL,"
                " next_at = 0, updated_at = ? WHERE target = ? AND code = ? AND acked_digest = ?",
                [(at, target, code, digest) for code, digest in settled],
            )

        await self.store.write(write, durable=False)

    async def _push(self, chunk: list[Outgoing], *, lag_records: int = 0, lag_s: float = 0.0) -> list[PushResult]:
        """One push call (retried); logs the one canonical line of the batch, whatever its outcome."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(_retriable),
            wait=_JitterHonouringRetryAfter(self.settings.retry_base_s, self.settings.retry_cap_s),
            stop=stop_after_attempt(self.settings.call_attempts),
            reraise=True,
        )
        started = time.perf_counter()
        try:
            async for attempt in retrying:
                with attempt:
                    results = await self.upstream.push(chunk)
        except UpstreamError as exc:
            self._batch_done(len(chunk), {"failed": len(chunk)}, started, lag_records, lag_s, str(exc))
            raise
        counts: dict[str, int] = {}
        for r in results:
            counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
        self._batch_done(len(chunk), counts, started, lag_records, lag_s, None)
        return results

    def _batch_done(
        self, records: int, counts: dict[str, int], started: float, lag_records: int, lag_s: float, error: str | None
    ) -> None:
        seconds = time.perf_counter() - started
        outcome = "error" if error else ("ok" if counts.get("acked", 0) == records else "partial")
        (log.warning if error else log.info)(
            "push_batch",
            target=self.target,
            records=records,
            outcome=outcome,
            **counts,
            duration_ms=round(seconds * 1000, 1),
            lag_records=lag_records,
            lag_s=round(lag_s, 3),
            **({"error": error} if error else {}),
        )
        if self.on_batch is not None:
            self.on_batch(self.target, counts, seconds, error is not None)

    async def _record(self, todo: list[Outgoing], results: list[PushResult], head: int) -> None:
        by_code = {o.code: o for o in todo}
        at = iso(self.clock.now())
        now_ms = int(time.time() * 1000)
        prev = await self._attempts([r.code for r in results if r.outcome is Outcome.RETRY])
        rows: list[tuple[Any, ...]] = []
        for r in results:
            o = by_code.get(r.code)
            if o is None:
                continue
            if r.outcome is Outcome.ACKED:
                rows.append((self.target, r.code, "synced", o.digest, o.digest, r.ack, 0, None, 0, at))
            elif r.outcome in (Outcome.INVALID, Outcome.COLLISION):
                log.error("dead_letter", target=self.target, code=r.code, reason=r.outcome.value, detail=r.detail)
                rows.append(
                    (
                        self.target,
                        r.code,
                        "dead",
                        o.digest,
                        None,
                        r.ack or o.ack,
                        0,
                        f"{r.outcome.value}: {r.detail}",
                        0,
                        at,
                    )
                )
            else:
                attempts = prev.get(r.code, 0) + 1
                parked = attempts >= self.settings.max_attempts
                if parked:
                    log.error("parked", target=self.target, code=r.code, attempts=attempts, detail=r.detail)
                delay_ms = int(min(self.settings.retry_cap_s, self.settings.retry_base_s * 2**attempts) * 1000)
                rows.append(
                    (
                        self.target,
                        r.code,
                        "parked" if parked else "pending",
                        o.digest,
                        None,
                        r.ack or o.ack,
                        attempts,
                        r.detail if r.detail.startswith("retry") else f"retry: {r.detail}",
                        now_ms + random.randint(0, delay_ms),
                        at,
                    )
                )
        target = self.target
        bases = (
            [
                (r.code, self.store.sealer.seal_base(r.code, json.dumps(by_code[r.code].record, ensure_ascii=False)))
                for r in results
                if r.outcome is Outcome.ACKED and r.code in by_code
            ]
            if self.settings.store_base
            else []
        )

        def write(conn: sqlite3.Connection) -> None:
            if bases:
                conn.executemany(
                    PORTAL_BASE_UPSERT,
                    bases,
                )
            if rows:
                conn.executemany(
                    "INSERT INTO replication (target, code, state, digest, acked_digest, ack, attempts, last_error,"
                    " next_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (target, code) DO UPDATE SET state = excluded.state, digest = excluded.digest,"
                    " acked_digest = coalesce(excluded.acked_digest, replication.acked_digest),"
                    " ack = excluded.ack, attempts = excluded.attempts, last_error = excluded.last_error,"
                    " next_at = excluded.next_at, updated_at = excluded.updated_at",
                    rows,
                )
            conn.execute(
                "INSERT INTO cursors (target, seq) VALUES (?, ?)"
                " ON CONFLICT (target) DO UPDATE SET seq = max(seq, excluded.seq)",
                (target, head),
            )

        # An acknowledgement lost to a power cut costs one push again, which the upstream takes as a resend.
        await self.store.write(write, durable=False)
        self._cursor = max(self._cursor or 0, head)
        if any(r.outcome is Outcome.RETRY for r in results):
            self.poke()
        if any(r.outcome is Outcome.ACKED for r in results):
            self.last_ok_at = at
        self.pushed += sum(1 for r in results if r.outcome is Outcome.ACKED)

    async def _attempts(self, codes: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(codes), _SQL_CHUNK):
            chunk = codes[i : i + _SQL_CHUNK]
            marks = ",".join("?" for _ in chunk)
            for code, attempts in await self.store.fetchall(
                f"SELECT code, attempts FROM replication WHERE target = ? AND code IN ({marks})", [self.target, *chunk]
            ):
                found[code] = int(attempts)
        return found

    async def retry(self, code: str) -> bool:
        """Put a dead or parked dossier back in the queue; False when it is neither."""
        target = self.target

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE replication SET state = 'pending', attempts = 0, next_at = 0, digest = NULL"
                " WHERE target = ? AND code = ? AND state IN ('dead', 'parked')",
                (target, code),
            )
            return cur.rowcount > 0

        done = bool(await self.store.write(write))
        self.poke()
        return done

    async def requeue(self, codes: Sequence[str], *, reason: str = "anti-entropy: the upstream differs") -> int:
        """Push these dossiers again from scratch, whatever their rows say; the number queued.

        For a dossier whose row claims the upstream holds it while the upstream says otherwise (it lost it,
        or holds another version). The acknowledged digest and the ack go too: the ack is the adapter's idea
        of what the upstream holds (the city's state vector, the portal's acknowledged steps), and it has
        just been proven wrong, so the next push must send the whole dossier, not a diff against it. Codes
        the node does not hold are left out: a row for them would stay pending with nothing to send.
        """
        target, at = self.target, iso(self.clock.now())
        unique = list(dict.fromkeys(codes))

        def write(conn: sqlite3.Connection) -> int:
            queued = 0
            for i in range(0, len(unique), _SQL_CHUNK):
                chunk = unique[i : i + _SQL_CHUNK]
                marks = ",".join("?" for _ in chunk)
                queued += conn.execute(
                    "INSERT INTO replication (target, code, state, digest, acked_digest, ack, attempts, last_error,"
                    " next_at, updated_at) SELECT ?, code, 'pending', NULL, NULL, NULL, 0, ?, 0, ? FROM dossiers"
                    f" WHERE code IN ({marks})"
                    " ON CONFLICT (target, code) DO UPDATE SET state = 'pending', digest = NULL, acked_digest = NULL,"
                    " ack = NULL, attempts = 0, last_error = excluded.last_error, next_at = 0,"
                    " updated_at = excluded.updated_at",
                    [target, reason, at, *chunk],
                ).rowcount
            return queued

        queued = int(await self.store.write(write)) if unique else 0
        self.poke()
        return queued

    async def lag(self, journal_head: int) -> dict[str, Any]:
        cursor = await self.cursor()
        # By state through the (target, state) index: the synced rows, nearly all of them, are not read.
        counts = dict(
            await self.store.fetchall(
                "SELECT state, count(*) FROM replication WHERE target = ?"
                " AND state IN ('pending', 'dead', 'parked', 'held') GROUP BY state",
                (self.target,),
            )
        )
        row = tuple(counts.get(k, 0) for k in ("pending", "dead", "parked", "held"))
        oldest = await self.store.fetchone("SELECT min(at) FROM journal WHERE seq > ?", (cursor,))
        lag_s = 0.0
        if oldest and oldest[0]:
            lag_s = max(
                0.0, self.clock.now().timestamp() - datetime.fromisoformat(oldest[0].replace("Z", "+00:00")).timestamp()
            )
        pending, dead, parked, held = (int(x or 0) for x in (row or (0, 0, 0, 0)))
        return {
            "cursor": cursor,
            # Held: imported dossiers waiting for the portal check (node/legacy.py) before their first push.
            "lag_records": max(0, journal_head - cursor) + pending + held,
            "lag_seconds": round(lag_s, 3),
            "pending": pending,
            "dead": dead,
            "parked": parked,
            "held": held,
            "last_ok_at": self.last_ok_at,
        }


def _age_s(at: str, clock: Clock) -> float:
    """Seconds since a journal entry's ``at`` (UTC ISO 8601)."""
    return max(0.0, clock.now().timestamp() - datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp())
