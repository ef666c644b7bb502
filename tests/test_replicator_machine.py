"""Hypothesis state machine over the journal, cursors, dead letters and parking.

The store, the dossier service and the replicator are the real ones on a real SQLite file. The upstream
is the process boundary, so here it is a scripted stand-in whose every answer the machine chooses: acks,
rejections, per-record failures, whole-call failures, answers lost after the upstream stored the record,
and crashes of the node between any two steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from adapters.base import FeedPage, Outcome, Outgoing, PushResult, UpstreamError
from node.clock import Clock
from node.domain.validation import validate_intake
from node.errors import ApiError
from node.service import DossierService
from node.store import Store
from sync.replicator import Replicator, ReplicatorSettings
from tests.conftest import AGENCY, UNIT, valid_intake

MAX_ATTEMPTS = 3


class ScriptedUpstream:
    """An upstream whose next answer per dossier is set by the test."""

    name = "scripted"

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}  # code -> digest held upstream
        self.store_count: dict[str, int] = {}
        self.rejects: set[str] = set()  # codes answered INVALID (while their content is unchanged)
        self.ever_rejected: set[str] = set()
        self.flaky: set[str] = set()  # codes answered RETRY
        self.mode = "ok"  # ok | fail_call | lose_answer

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        if self.mode == "fail_call":
            raise UpstreamError("down", upstream=self.name, op="push", retriable=True, status=503)
        results = []
        for o in batch:
            if o.code in self.rejects:
                self.ever_rejected.add(o.code)
                results.append(PushResult(o.code, Outcome.INVALID, detail="rejected"))
            elif o.code in self.flaky:
                results.append(PushResult(o.code, Outcome.RETRY, detail="try later"))
            else:
                if self.stored.get(o.code) != o.digest:
                    self.store_count[o.code] = self.store_count.get(o.code, 0) + (o.code not in self.stored)
                    self.stored[o.code] = o.digest
                results.append(PushResult(o.code, Outcome.ACKED, ack=o.digest.encode()))
        if self.mode == "lose_answer":
            raise UpstreamError(
                "connection reset after the upstream committed", upstream=self.name, op="push", retriable=True
            )
        return results

    async def probe(self) -> None:
        return None

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        return FeedPage()

    async def close(self) -> None:
        return None


@settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="wardsync-machine-"))
        self.upstream = ScriptedUpstream()
        self.codes: list[str] = []
        self.last_cursor = 0
        self._open()

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def _open(self) -> None:
        self.store = Store(self.dir / "node.sqlite3")
        self._run(self.store.open())
        self.service = DossierService(self.store, unit=UNIT, agency=AGENCY, clock=Clock())
        self._run(self.service.load())
        self.writer = self.loop.create_task(self.service.writer.run())
        self.rep = Replicator(
            self.store,
            self.upstream,
            settings=ReplicatorSettings(
                batch_size=7, window=11, max_attempts=MAX_ATTEMPTS, call_attempts=1, retry_base_s=0, retry_cap_s=0
            ),
        )

    def _close(self) -> None:
        self.service.writer.close()
        self._run(self.writer)
        self._run(self.store.close())

    def teardown(self) -> None:
        self._close()
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(n=st.integers(1, 5))
    def intake(self, n: int) -> None:
        for _ in range(n):
            clean, errors = validate_intake(valid_intake(), own_unit=UNIT)
            assert not errors
            result = self._run(self.service.intake(clean))
            assert result.status == 201
            self.codes.append(result.body.split('"MaHoSo":"')[1].split('"')[0])

    @precondition(lambda self: self.codes)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        code = data.draw(st.sampled_from(self.codes))
        status = data.draw(st.sampled_from([4, 7, 9]))
        with contextlib.suppress(ApiError):  # an illegal transition is refused; nothing to replicate
            self._run(self.service.add_step(code, {"TrangThai": status, "NguoiXuLy": "Cán bộ"}))

    @precondition(lambda self: self.codes)
    @rule(data=st.data(), kind=st.sampled_from(["reject", "flaky", "heal"]))
    def script(self, data: st.DataObject, kind: str) -> None:
        code = data.draw(st.sampled_from(self.codes))
        self.upstream.rejects.discard(code)
        self.upstream.flaky.discard(code)
        if kind == "reject":
            self.upstream.rejects.add(code)
        elif kind == "flaky":
            self.upstream.flaky.add(code)

    @rule(mode=st.sampled_from(["ok", "ok", "fail_call", "lose_answer"]))
    def push(self, mode: str) -> None:
        self.upstream.mode = mode
        try:
            self._run(self.rep.run_once())
        except UpstreamError:
            assert mode != "ok"
        self._run(self._make_pending_due())

    async def _make_pending_due(self) -> None:
        # Backoff is time; the machine makes every pending retry due at once instead of sleeping.
        await self.store.write(lambda conn: conn.execute("UPDATE replication SET next_at = 0"))

    @rule()
    def crash(self) -> None:
        """The node process dies and restarts: only what the store holds survives."""
        self._close()
        self._open()

    @invariant()
    def cursor_is_monotonic_and_bounded(self) -> None:
        cursor = self._run(self.rep.cursor())
        assert self.last_cursor <= cursor <= self.service.journal_head
        self.last_cursor = cursor

    @invariant()
    def nothing_acknowledged_is_lost_or_doubled(self) -> None:
        rows = self._run(self.store.fetchall("SELECT code FROM dossiers"))
        assert sorted(r[0] for r in rows) == sorted(self.codes)
        assert all(n == 1 for n in self.upstream.store_count.values())

    @invariant()
    def synced_means_upstream_holds_that_digest(self) -> None:
        rows = self._run(
            self.store.fetchall(
                "SELECT r.code, r.acked_digest FROM replication r WHERE r.state = 'synced' AND r.target = 'scripted'"
            )
        )
        for code, acked in rows:
            # The upstream may hold a newer digest (answer lost after it stored), never an unacked older one.
            assert code in self.upstream.stored
            assert acked is not None

    def drain(self) -> dict[str, str]:
        self.upstream.mode = "ok"
        self.upstream.flaky.clear()
        for _ in range(200):
            more = self._run(self.rep.run_once())
            self._run(self._make_pending_due())
            pending = self._run(self.store.fetchone("SELECT count(*) FROM replication WHERE state = 'pending'"))
            if (
                not more
                and pending is not None
                and pending[0] == 0
                and self._run(self.rep.cursor()) == self.service.journal_head
            ):
                break
        return {r[0]: r[1] for r in self._run(self.store.fetchall("SELECT code, digest FROM dossiers"))}

    @rule()
    def drain_then_check(self) -> None:
        """Once the upstream heals, every dossier not rejected nor parked is held upstream with its digest."""
        local = self.drain()
        states = {
            r[0]: r[1]
            for r in self._run(self.store.fetchall("SELECT code, state FROM replication WHERE target = 'scripted'"))
        }
        for code, digest in local.items():
            state = states.get(code)
            if state == "dead":
                # Dead stays dead for the same content until a change or an operator's retry.
                assert code in self.upstream.ever_rejected
            elif state == "parked":
                continue  # listed for an operator; retried on request or on its next change
            else:
                assert self.upstream.stored.get(code) == digest, (code, state)
                assert state == "synced"


TestReplicationMachine = ReplicationMachine.TestCase


@pytest.mark.slow
class TestReplicationMachineLong(ReplicationMachine.TestCase):  # type: ignore[misc,valid-type]
    """The same machine, many more and longer runs (``-m slow``)."""

    settings = settings(max_examples=400, stateful_step_count=60, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
