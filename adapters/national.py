"""Adapter for the National Public Service Portal (DVCQG): records and steps translated to its JSON calls.

A push sends, per dossier, the record (without its steps) when it changed since the last ack, then the
steps the portal has not acknowledged yet, in calls of at most 10. The ack is this adapter's own JSON:
``{"r": <digest of the record part>, "s": [acknowledged step keys]}``; both keys are natural (the same
after any restart), so a push after a lost answer only produces resends upstream.

Many dossiers share one ``DongBoHoSoMC`` call and steps of several dossiers share one
``CapNhatTienDoHoSoMC`` call, with at most :data:`MAX_IN_FLIGHT` calls at a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
import structlog

from adapters.base import FeedItem, FeedPage, Fetched, Outcome, Outgoing, PushResult, UpstreamError, feed_digest
from sync.record import bucket_of, digest, step_key_of

log = structlog.get_logger()

UPSTREAM = "national"
MAX_RECORDS_PER_CALL = 100
MAX_STEPS_PER_CALL = 10
MAX_IN_FLIGHT = 4
# The portal's answer to an expired session is not public: an unexpected failure on a session older than
# this is taken as a possibly expired one (DOMAIN.md), a younger one cannot have expired yet.
SUSPECT_SESSION_AGE_S = 5.0
# Looked up by probe(): any well-formed code the portal cannot hold does.
PROBE_CODE = "000.00.00.H00-000101-0000"
EXISTS_MARKER = "đã tồn tại"
NOT_FOUND_MARKER = "không tìm thấy"
# Codes per feed page when anti-entropy lists a unit's dossiers: the largest page the feed gives.
DIGEST_FEED_PAGE = 1000

T = TypeVar("T")


def _is_ok(error_code: object) -> bool:
    return str(error_code) == "0"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def ack_for(record: Mapping[str, Any]) -> bytes:
    """The ack this adapter keeps for a dossier the portal holds as ``record`` (a ``TraCuuHoSo`` answer)."""
    part = {k: v for k, v in record.items() if k != "QuaTrinhXuLy"}
    keys = sorted({step_key_of(s) for s in record.get("QuaTrinhXuLy") or [] if isinstance(s, dict)})
    return json.dumps({"r": digest(part), "s": keys}, separators=(",", ":")).encode()


def _decode_ack(ack: bytes | None) -> tuple[str | None, set[str]]:
    if not ack:
        return None, set()
    try:
        state = json.loads(ack)
        record = state.get("r")
        steps = state.get("s") or []
        return (record if isinstance(record, str) else None), {s for s in steps if isinstance(s, str)}
    except (ValueError, AttributeError, TypeError):
        # An ack this adapter cannot read only costs resends, which the portal counts and ignores.
        return None, set()


@dataclass
class _Dossier:
    """One dossier's progress through a push."""

    out: Outgoing
    record: dict[str, Any]
    record_digest: str
    steps: list[tuple[str, dict[str, Any]]]
    acked_record: str | None
    acked_steps: set[str]
    was_acked: bool
    failure: tuple[Outcome, str] | None = None
    retry: str = ""
    exists: bool = False
    sent_steps: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, out: Outgoing) -> _Dossier:
        record = {k: v for k, v in out.record.items() if k != "QuaTrinhXuLy"}
        steps: dict[str, dict[str, Any]] = {}
        for step in out.record.get("QuaTrinhXuLy") or []:
            steps.setdefault(step_key_of(step), dict(step))
        acked_record, acked_steps = _decode_ack(out.ack)
        return cls(
            out=out,
            record=record,
            record_digest=digest(record),
            steps=list(steps.items()),
            acked_record=acked_record,
            acked_steps=acked_steps & steps.keys(),
            was_acked=acked_record is not None,
        )

    @property
    def code(self) -> str:
        return self.out.code

    @property
    def open(self) -> bool:
        return self.failure is None and not self.retry

    @property
    def record_acked(self) -> bool:
        return self.acked_record == self.record_digest

    def pending_steps(self) -> list[tuple[str, dict[str, Any]]]:
        return [(k, s) for k, s in self.steps if k not in self.acked_steps]

    def fail(self, outcome: Outcome, detail: str) -> None:
        if self.failure is None:
            self.failure = (outcome, detail)

    def retry_later(self, detail: str) -> None:
        self.retry = self.retry or detail

    def ack(self) -> bytes | None:
        if self.acked_record is None and not self.acked_steps:
            return self.out.ack
        state = {"r": self.acked_record, "s": sorted(self.acked_steps)}
        return json.dumps(state, separators=(",", ":")).encode()

    def result(self) -> PushResult:
        if self.failure is not None:
            return PushResult(self.code, self.failure[0], self.ack(), self.failure[1])
        if self.retry:
            return PushResult(self.code, Outcome.RETRY, self.ack(), self.retry)
        if self.record_acked and all(k in self.acked_steps for k, _ in self.steps):
            return PushResult(self.code, Outcome.ACKED, self.ack())
        return PushResult(self.code, Outcome.RETRY, self.ack(), "not every part was acknowledged")


class NationalAdapter:
    """The national portal behind the :class:`adapters.base.Upstream` protocol."""

    name = UPSTREAM

    def __init__(
        self,
        url: str,
        *,
        username: str,
        password: str,
        dstcode: str,
        madonvi: str,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 10.0,
        batch_limit: int = MAX_RECORDS_PER_CALL,
    ) -> None:
        self._url = url.rstrip("/")
        self._username = username
        self._password = password
        self._dstcode = dstcode
        self._madonvi = madonvi
        self._http = session
        self._owns_http = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._batch_limit = max(1, min(batch_limit, MAX_RECORDS_PER_CALL))
        self._token: str | None = None
        self._issued_at = 0.0
        self._generation = 0
        self._login_lock = asyncio.Lock()
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._closed = False

    def reconfigure(self, *, url: str, username: str, password: str, dstcode: str, madonvi: str) -> None:
        """New address or credentials (a reload): calls in flight finish, the next call logs in with these."""
        self._url = url.rstrip("/")
        self._username, self._password = username, password
        self._dstcode, self._madonvi = dstcode, madonvi
        self._token = None

    # -- transport

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UpstreamError("adapter is closed", upstream=UPSTREAM, op="call", retriable=False)
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    async def _request(
        self,
        method: str,
        path: str,
        op: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One HTTP exchange; any failure of the call as a whole becomes an :class:`UpstreamError`."""
        http = self._client()
        try:
            async with (
                self._in_flight,
                http.request(
                    method, self._url + path, json=body, params=params, headers=headers, timeout=self._timeout
                ) as resp,
            ):
                if resp.status == 429:
                    raise UpstreamError(
                        f"{op}: throttled (429)",
                        upstream=UPSTREAM,
                        op=op,
                        retriable=True,
                        status=429,
                        retry_after=_retry_after(resp.headers.get("Retry-After")),
                    )
                if resp.status >= 400:
                    raise UpstreamError(
                        f"{op}: HTTP {resp.status}",
                        upstream=UPSTREAM,
                        op=op,
                        retriable=resp.status >= 500,
                        status=resp.status,
                    )
                try:
                    answer = await resp.json(content_type=None)
                except ValueError as exc:
                    raise UpstreamError(
                        f"{op}: answer is not JSON", upstream=UPSTREAM, op=op, retriable=True, status=resp.status
                    ) from exc
        except TimeoutError as exc:
            raise UpstreamError(f"{op}: timed out", upstream=UPSTREAM, op=op, retriable=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{op}: {exc!r}", upstream=UPSTREAM, op=op, retriable=True) from exc
        if not isinstance(answer, dict):
            raise UpstreamError(f"{op}: answer is not a JSON object", upstream=UPSTREAM, op=op, retriable=True)
        return answer

    async def _login(self) -> None:
        answer = await self._request(
            "POST",
            "/login",
            "login",
            body={"username": self._username, "password": self._password},
            headers={"dstcode": self._dstcode},
        )
        token = answer.get("session")
        if not _is_ok(answer.get("error_code")) or not isinstance(token, str) or not token:
            # Wrong credentials or unit code are configuration: trying again cannot help.
            raise UpstreamError(
                f"login refused: {answer.get('message', '')}", upstream=UPSTREAM, op="login", retriable=False
            )
        self._token = token
        self._issued_at = time.monotonic()
        self._generation += 1

    async def _session(self) -> tuple[str, int, float]:
        async with self._login_lock:
            if self._token is None:
                await self._login()
            assert self._token is not None
            return self._token, self._generation, self._issued_at

    async def _renew(self, generation: int) -> None:
        async with self._login_lock:
            # Several calls may find the same session expired; the first one renews it for all.
            if self._generation == generation:
                self._token = None
                log.info("national_session_renewing", upstream=UPSTREAM)
                await self._login()

    async def _call(
        self, service: str, fields: Mapping[str, Any], op: str, expected: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """A portal service call; a refused or suspect session is renewed once and the call retried."""
        for attempt in (1, 2):
            token, generation, issued_at = await self._session()
            old = time.monotonic() - issued_at >= SUSPECT_SESSION_AGE_S
            body = {"session": token, "madonvi": self._madonvi, "service": service, **fields}
            try:
                answer = await self._request("POST", "/integration", op, body=body)
            except UpstreamError as exc:
                # Throttling, unavailability and transport errors say nothing about the session.
                suspect = exc.status is not None and exc.status not in (429, 502, 503, 504)
                if attempt == 1 and old and suspect:
                    await self._renew(generation)
                    continue
                raise
            session_refused = str(answer.get("error_code")) == "-2"
            if attempt == 1 and (session_refused or (old and not expected(answer))):
                await self._renew(generation)
                continue
            if expected(answer):
                return answer
            code, message = answer.get("error_code"), answer.get("message", "")
            raise UpstreamError(
                f"{op}: portal answered {code}: {message}",
                upstream=UPSTREAM,
                op=op,
                # "-1" for a whole call means the portal refused what we sent; sending it again cannot help.
                retriable=str(code) != "-1",
            )
        raise AssertionError("unreachable")  # pragma: no cover

    # -- push

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        """Send the dossiers' changed records and unacknowledged steps; one result each."""
        if not batch:
            return []
        # One login up front: otherwise every concurrent call would wait out a dead portal's timeout in turn.
        await self._session()
        results: list[PushResult] = []
        for round_ in _rounds(batch):
            results.extend(await self._push_round(round_))
        return results

    async def _push_round(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        dossiers = [_Dossier.of(out) for out in batch]
        tracker = _Tracker()

        creates = [d for d in dossiers if not d.record_acked and not d.was_acked]
        updates = [d for d in dossiers if not d.record_acked and d.was_acked]
        await tracker.gather(
            *(self._send_records(c, updating=False) for c in _chunks(creates, self._batch_limit)),
            *(self._send_records(c, updating=True) for c in _chunks(updates, self._batch_limit)),
        )

        existing = [d for d in dossiers if d.exists and d.open]
        await tracker.gather(*(self._resolve_existing(d) for d in existing))
        same_citizen = [d for d in existing if d.exists and d.open]
        await tracker.gather(*(self._send_records(c, updating=True) for c in _chunks(same_citizen, self._batch_limit)))

        pending = [(d, key, step) for d in dossiers if d.open and d.record_acked for key, step in d.pending_steps()]
        await tracker.gather(*(self._send_steps(c) for c in _chunks(pending, MAX_STEPS_PER_CALL)))

        tracker.raise_if_nothing_got_through()
        results = [d.result() for d in dossiers]
        failed = [r for r in results if r.outcome is not Outcome.ACKED]
        log.info(
            "national_push",
            upstream=UPSTREAM,
            dossiers=len(results),
            acked=len(results) - len(failed),
            retry=sum(r.outcome is Outcome.RETRY for r in failed),
            invalid=sum(r.outcome is Outcome.INVALID for r in failed),
            collision=sum(r.outcome is Outcome.COLLISION for r in failed),
            calls=tracker.calls,
        )
        return results

    async def _send_records(self, chunk: Sequence[_Dossier], *, updating: bool) -> None:
        try:
            answer = await self._call(
                "DongBoHoSoMC",
                {"isUpdating": "True" if updating else "False", "data": [d.record for d in chunk]},
                "push_records",
                lambda a: isinstance(a.get("results"), list),
            )
        except UpstreamError as exc:
            for d in chunk:
                d.retry_later(str(exc))
            raise
        results = [r for r in answer["results"] if isinstance(r, dict)]
        by_code = {str(r.get("MaHoSo")): r for r in results}
        for index, d in enumerate(chunk):
            sent_code = str(d.record.get("MaHoSo"))
            result = by_code.get(sent_code)
            if result is None and index < len(results) and _missing(results[index].get("MaHoSo")):
                result = results[index]
            if result is None:
                d.retry_later("the portal gave no answer for this dossier")
                continue
            error_code, message = str(result.get("error_code")), str(result.get("message", ""))
            if _is_ok(error_code):
                d.acked_record = d.record_digest
                d.exists = False
            elif not updating and (error_code in ("3", "-3") or EXISTS_MARKER in message):
                d.exists = True
            elif error_code == "-1":
                d.fail(Outcome.INVALID, message)
            else:
                d.retry_later(f"{error_code}: {message}")

    async def _resolve_existing(self, d: _Dossier) -> None:
        """DESIGN.md's collision rule: the stored dossier is ours only if it is the same citizen's."""
        try:
            answer = await self._call(
                "TraCuuHoSo",
                {"mahoso": d.code},
                "lookup",
                lambda a: _is_ok(a.get("error_code")) or str(a.get("error_code")) == "-1",
            )
        except UpstreamError as exc:
            d.retry_later(str(exc))
            raise
        stored = answer.get("data")
        if not _is_ok(answer.get("error_code")) or not isinstance(stored, dict):
            d.retry_later("the portal said the dossier exists but could not find it")
            return
        differs = [
            name for name in ("NgayTiepNhan", "SoGiayToChuHoSo") if str(stored.get(name)) != str(d.record.get(name))
        ]
        if differs:
            # Another citizen's dossier holds this code: never overwrite it. The values stay out of the
            # detail because it is logged and shown, and the ID number is personal data.
            log.warning("national_code_collision", upstream=UPSTREAM, code=d.code, differs=differs)
            d.fail(
                Outcome.COLLISION,
                f"code {d.code} is held by another dossier on the portal ({', '.join(differs)} differ)",
            )
            d.exists = False

    async def _send_steps(self, chunk: Sequence[tuple[_Dossier, str, dict[str, Any]]]) -> None:
        try:
            answer = await self._call(
                "CapNhatTienDoHoSoMC",
                {"data": [step for _, _, step in chunk]},
                "push_steps",
                lambda a: isinstance(a.get("results"), list),
            )
        except UpstreamError as exc:
            for d, _, _ in chunk:
                d.retry_later(str(exc))
            raise
        results = answer["results"]
        if len(results) != len(chunk):
            for d, _, _ in chunk:
                d.retry_later("the portal answered a different number of steps than sent")
            return
        for (d, key, _), result in zip(chunk, results, strict=True):
            error_code = str(result.get("error_code")) if isinstance(result, dict) else ""
            message = str(result.get("message", "")) if isinstance(result, dict) else ""
            if _is_ok(error_code):
                d.acked_steps.add(key)
            elif error_code == "-1" and NOT_FOUND_MARKER in message.lower():
                # The portal lost the record we hold an ack for (a restore, say): send it again next time.
                d.acked_record = None
                d.retry_later(message)
            elif error_code == "-1":
                d.fail(Outcome.INVALID, message)
            else:
                d.retry_later(f"{error_code}: {message}")

    # -- the rest of the protocol

    async def probe(self) -> None:
        """Log in if needed and look up a code the portal cannot hold."""
        await self._call(
            "TraCuuHoSo",
            {"mahoso": PROBE_CODE},
            "probe",
            lambda a: _is_ok(a.get("error_code")) or str(a.get("error_code")) == "-1",
        )

    async def fetch(self, code: str, state_vector: bytes | None = None) -> Fetched | None:
        """The portal's record of one dossier (TraCuuHoSo), steps included; None when it has none."""
        answer = await self._call(
            "TraCuuHoSo",
            {"mahoso": code},
            "lookup",
            lambda a: _is_ok(a.get("error_code")) or str(a.get("error_code")) == "-1",
        )
        stored = answer.get("data")
        if not _is_ok(answer.get("error_code")) or not isinstance(stored, dict):
            return None
        return Fetched(code=code, digest=digest(stored), record=stored)

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        """The portal's change feed for ``unit`` after ``since``."""
        answer = await self._request(
            "GET", "/feed", "feed", params={"unit": unit, "since": str(since), "limit": str(limit)}
        )
        try:
            items = [FeedItem(str(i["code"]), int(i["seq"]), feed_digest(i)) for i in answer["items"]]
            return FeedPage(items=items, next=int(answer["next"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError("feed: malformed answer", upstream=UPSTREAM, op="feed", retriable=True) from exc

    async def digests(self, unit: str, bucket: int, buckets: int) -> dict[str, str]:
        """Digests of the unit's dossiers in one bucket, from the feed and one ``TraCuuHoSo`` per dossier.

        The portal has no digest API, so this is the costly path on purpose: every call walks the unit's
        whole feed from 0 (codes and sequence numbers only, a thousand a page) and then looks up, record
        and steps, every dossier that falls in the bucket, computing its digest here as the node does.
        The feed walk cannot start from a remembered position: a portal restored from a backup reuses
        sequence numbers, and missing exactly such losses is what anti-entropy is for. Buckets keep each
        call bounded: a round over ``buckets`` buckets looks each dossier up once, ``1/buckets`` of them
        per call, so the portal sees a trickle of lookups rather than a burst of the unit's whole
        history. The lookups share the adapter's ``MAX_IN_FLIGHT`` calls with pushes, so a large bucket
        slows pushes down for its duration: a unit with many dossiers wants more buckets, not a faster tick.
        """
        codes: dict[str, None] = {}
        since = 0
        while True:
            page = await self.feed(unit, since, DIGEST_FEED_PAGE)
            codes.update((i.code, None) for i in page.items if bucket_of(i.code, buckets) == bucket)
            if len(page.items) < DIGEST_FEED_PAGE or page.next <= since:
                break
            since = page.next
        looked_up = await asyncio.gather(*(self.fetch(code) for code in codes), return_exceptions=True)
        found: dict[str, str] = {}
        for code, outcome in zip(codes, looked_up, strict=True):
            if isinstance(outcome, BaseException):
                # A bucket is compared whole or not at all: a lookup that failed would read as a dossier the
                # portal lacks and send it again for nothing.
                raise outcome
            if outcome is not None:  # listed by the feed, then gone: the portal does not hold it now
                found[code] = outcome.digest
        return found

    async def close(self) -> None:
        """Forget the portal session and close the HTTP session if this adapter made it; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._token = None
        if self._owns_http and self._http is not None:
            await self._http.close()
        self._http = None


class _Tracker:
    """Runs a phase's calls together; a push raises only when none of its calls got through."""

    def __init__(self) -> None:
        self.calls = 0
        self.succeeded = 0
        self.first_error: UpstreamError | None = None

    async def gather(self, *calls: Awaitable[None]) -> None:
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        self.calls += len(outcomes)
        for outcome in outcomes:
            if isinstance(outcome, UpstreamError):
                self.first_error = self.first_error or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self.succeeded += 1

    def raise_if_nothing_got_through(self) -> None:
        # With part of the calls through, per-dossier RETRY keeps that progress; with none, the caller
        # needs the error itself (retriable, status, Retry-After) to back off and judge the portal's health.
        if self.succeeded == 0 and self.first_error is not None:
            raise self.first_error


def _rounds(batch: Sequence[Outgoing]) -> list[list[Outgoing]]:
    """Split ``batch`` so no code appears twice in a round: one call must not carry a dossier twice."""
    rounds: list[list[Outgoing]] = []
    seen: dict[str, int] = {}
    for out in batch:
        index = seen.get(out.code, 0)
        seen[out.code] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(out)
    return rounds


def _missing(value: object) -> bool:
    return value is None or value == ""
