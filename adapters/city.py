"""The city's administrative-procedure system: CRDT-native, so we send Y updates, not records.

Per dossier we send the update the city lacks (the diff of our state against the city's last
acknowledged state vector) and count the dossier acknowledged when the city's answer shows it holds at
least our state and materialises exactly our digest. The city's state vector is the ``ack`` we keep, so
a lost answer or a lost city-side Doc only costs a resend of the right diff, never a gap.

Wire protocol (see ``simulations/city_system.py`` for the stand-in): OAuth client-credentials token;
``POST /api/v1/sync`` with msgpack ``[[code, update], ...]`` answered by
``{"results": [[code, state_vector, digest, error], ...]}``; ``GET /api/v1/docs/{code}?sv=``;
``GET /feed`` (items ``{"code", "seq", "sv"?}``, ``sv`` the base64url state vector of the city's Doc, which
lets the puller skip the echoes of its own pushes); ``GET /api/v1/digests?unit=&bucket=&buckets=`` for anti-entropy.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import pycrdt
import structlog

from adapters.base import (
    FeedItem,
    FeedPage,
    Fetched,
    Outcome,
    Outgoing,
    PushResult,
    UpstreamError,
    feed_digest,
    feed_state_vector,
)
from sync.statevector import EMPTY_STATE_VECTOR, covers, decode_state_vector

log = structlog.get_logger()

NAME = "city"
MAX_CONCURRENT_REQUESTS = 4
# Refresh a token this long before the issuer says it expires (capped to a tenth of its lifetime), so a
# request never leaves with a token that dies on the way.
TOKEN_REFRESH_MARGIN_S = 30.0
# The feed of a unit no ward has: the cheapest authenticated call that still touches the city's store.
PROBE_UNIT = "00000"


@dataclass
class _Token:
    value: str
    refresh_at: float


@dataclass(frozen=True)
class _Prepared:
    outgoing: Outgoing
    ours: dict[int, int]
    update: bytes
    whole: bool  # the update is our full state, not a diff against an ack


class CityAdapter:
    """:class:`adapters.base.Upstream` for the city's CRDT-native one-stop platform."""

    name = NAME

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        client_secret: str,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 10.0,
        batch_limit: int = 500,
    ) -> None:
        if batch_limit < 1:
            raise ValueError("batch_limit must be at least 1")
        self.url = url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.batch_limit = batch_limit
        self._token: _Token | None = None
        # Concurrent requests that find the token stale wait for one fetch instead of each fetching one.
        self._token_lock = asyncio.Lock()
        self._closed = False

    def reconfigure(self, *, url: str, client_id: str, client_secret: str) -> None:
        """New address or credentials (a reload): calls in flight finish, the next call gets a new token."""
        self.url = url.rstrip("/")
        self._client_id, self._client_secret = client_id, client_secret
        self._token = None

    # -- Upstream ----------------------------------------------------------------------------------

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        """Send each Doc's missing diff; one result per dossier (see the contract in ``adapters.base``)."""
        results: list[PushResult] = []
        prepared: list[_Prepared] = []
        for o in batch:
            try:
                prepared.append(_prepare(o))
            except ValueError as exc:
                # Our own stored state does not decode: no upstream can ever take it.
                results.append(PushResult(o.code, Outcome.INVALID, o.ack, f"local state unreadable: {exc}"))
        chunks = [prepared[i : i + self.batch_limit] for i in range(0, len(prepared), self.batch_limit)]
        if not chunks:
            return results
        gate = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

        async def send(chunk: list[_Prepared]) -> list[PushResult] | UpstreamError:
            async with gate:
                try:
                    return await self._push_chunk(chunk)
                except UpstreamError as exc:
                    # Returned, not raised: one failed request must not cancel its siblings in flight.
                    return exc

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(send(chunk)) for chunk in chunks]
        answers = [t.result() for t in tasks]
        errors = [a for a in answers if isinstance(a, UpstreamError)]
        if len(errors) == len(answers):
            raise errors[0]
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, UpstreamError):
                # Other requests of this call got through, so the upstream is serving; these dossiers
                # simply go round again.
                results.extend(PushResult(p.outgoing.code, Outcome.RETRY, p.outgoing.ack, str(answer)) for p in chunk)
            else:
                results.extend(answer)
        return results

    async def probe(self) -> None:
        """An authenticated feed read of an empty unit; raises :class:`UpstreamError` when unwell."""
        await self._feed(PROBE_UNIT, 0, 1, op="probe")

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        """The city's change feed for ``unit`` after commit sequence ``since``."""
        return await self._feed(unit, since, limit, op="feed")

    async def fetch(self, code: str, state_vector: bytes | None) -> Fetched | None:
        """The update the caller lacks for one Doc (diff against ``state_vector``); None when unknown."""
        try:
            update, sv, dig = await self.fetch_diff(code, state_vector)
        except UpstreamError as exc:
            if exc.status == 404:
                return None
            raise
        return Fetched(code=code, digest=dig, update=update, state_vector=sv)

    async def fetch_diff(self, code: str, state_vector: bytes | None) -> tuple[bytes, bytes, str]:
        """``(update, state_vector, digest)``: what the city holds for ``code`` beyond ``state_vector``."""
        params = {} if state_vector is None else {"sv": base64.urlsafe_b64encode(state_vector).decode().rstrip("=")}
        body = await self._request("GET", f"/api/v1/docs/{quote(code, safe='')}", op="fetch", params=params)
        try:
            answer = msgpack.unpackb(body, raw=False)
            update, sv, digest = answer["update"], answer["state_vector"], answer["digest"]
            if not (isinstance(update, bytes) and isinstance(sv, bytes) and isinstance(digest, str)):
                raise TypeError("update, state_vector and digest have the wrong types")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise UpstreamError(f"malformed answer: {exc}", upstream=NAME, op="fetch", retriable=True) from exc
        return update, sv, digest

    async def digests(self, unit: str, bucket: int, buckets: int) -> dict[str, str]:
        """The city's own digests of the unit's dossiers in one bucket: one cheap call, whatever the bucket."""
        raw = await self._request(
            "GET",
            "/api/v1/digests",
            op="digests",
            params={"unit": unit, "bucket": str(bucket), "buckets": str(buckets)},
        )
        try:
            answer = json.loads(raw)["digests"]
            if not isinstance(answer, dict):
                raise TypeError("digests is not an object")
            return {str(code): str(d) for code, d in answer.items()}
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamError(f"malformed digests: {exc}", upstream=NAME, op="digests", retriable=True) from exc

    async def close(self) -> None:
        """Close the session if this adapter opened it; idempotent."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    # -- push internals ----------------------------------------------------------------------------

    async def _push_chunk(self, chunk: Sequence[_Prepared]) -> list[PushResult]:
        body = msgpack.packb([[p.outgoing.code, p.update] for p in chunk], use_bin_type=True)
        started = time.perf_counter()
        raw = await self._request(
            "POST", "/api/v1/sync", op="push", data=body, headers={"Content-Type": "application/msgpack"}
        )
        try:
            answers = _parse_results(msgpack.unpackb(raw, raw=False))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise UpstreamError(f"malformed answer: {exc}", upstream=NAME, op="push", retriable=True) from exc
        # Answers come in request order; matching them by code keeps us right should the city reorder,
        # and the queue per code keeps a code sent twice in one chunk paired in order.
        by_code: dict[str, list[tuple[bytes | None, str | None, str | None]]] = {}
        for code, sv, digest, error in answers:
            by_code.setdefault(code, []).append((sv, digest, error))
        results = [_judge(p, by_code.get(p.outgoing.code)) for p in chunk]
        log.debug(
            "city_push",
            docs=len(chunk),
            acked=sum(r.outcome is Outcome.ACKED for r in results),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return results

    # -- HTTP --------------------------------------------------------------------------------------

    async def _feed(self, unit: str, since: int, limit: int, *, op: str) -> FeedPage:
        raw = await self._request(
            "GET", "/feed", op=op, params={"unit": unit, "since": str(since), "limit": str(limit)}
        )
        try:
            answer = json.loads(raw)
            items = [
                FeedItem(str(i["code"]), int(i["seq"]), feed_digest(i), feed_state_vector(i)) for i in answer["items"]
            ]
            return FeedPage(items=items, next=int(answer["next"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamError(f"malformed feed: {exc}", upstream=NAME, op=op, retriable=True) from exc

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UpstreamError("adapter is closed", upstream=NAME, op="connect", retriable=False)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """The body of a 2xx answer; a 401 gets one fresh token and one retry; anything else raises."""
        refused: str | None = None
        for _ in range(2):
            token = await self._access_token(op, refused=refused)
            status, body, retry_after = await self._send(
                method,
                path,
                op=op,
                params=params,
                data=data,
                headers={**(headers or {}), "Authorization": f"Bearer {token}"},
            )
            if status < 300:
                return body
            if status != 401:
                _raise_for_status(status, body, op, retry_after)
            refused = token
        # A token the issuer handed out this instant was refused too: the city's auth is unwell, not our
        # request, so the call may pass later.
        raise UpstreamError("a fresh access token was refused", upstream=NAME, op=op, retriable=True, status=401)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        op: str,
        params: Mapping[str, str] | None = None,
        data: bytes | Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes, float | None]:
        try:
            async with self._http().request(
                method, self.url + path, params=params, data=data, headers=headers, timeout=self._timeout
            ) as resp:
                body = await resp.read()
                return resp.status, body, _retry_after(resp.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise UpstreamError(f"{op}: {method} {path} timed out", upstream=NAME, op=op, retriable=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{op}: {method} {path} failed: {exc!r}", upstream=NAME, op=op, retriable=True) from exc

    async def _access_token(self, op: str, *, refused: str | None = None) -> str:
        """A live token: the cached one unless it is due for refresh or was just ``refused``."""
        token = self._token
        if token is not None and token.value != refused and time.monotonic() < token.refresh_at:
            return token.value
        async with self._token_lock:
            # Whoever held the lock may have fetched a fresh one already.
            token = self._token
            if token is not None and token.value != refused and time.monotonic() < token.refresh_at:
                return token.value
            self._token = await self._fetch_token(op)
            return self._token.value

    async def _fetch_token(self, op: str) -> _Token:
        form = {"grant_type": "client_credentials", "client_id": self._client_id, "client_secret": self._client_secret}
        status, body, retry_after = await self._send("POST", "/oauth/token", op=op, data=form)
        if status >= 300:
            _raise_for_status(status, body, op, retry_after)
        try:
            answer = json.loads(body)
            value = str(answer["access_token"])
            ttl = float(answer.get("expires_in", 3600))
        except (ValueError, TypeError, KeyError) as exc:
            raise UpstreamError(f"malformed token answer: {exc}", upstream=NAME, op=op, retriable=True) from exc
        margin = min(TOKEN_REFRESH_MARGIN_S, ttl / 10)
        return _Token(value=value, refresh_at=time.monotonic() + ttl - margin)


def _prepare(o: Outgoing) -> _Prepared:
    ours = decode_state_vector(pycrdt.get_state(o.state))
    if o.ack is not None:
        try:
            if decode_state_vector(o.ack):
                return _Prepared(o, ours, pycrdt.get_update(o.state, o.ack), whole=False)
        except ValueError:
            pass  # an ack we cannot read is no reason to hold the dossier back: the full state is always right
    return _Prepared(o, ours, o.state, whole=True)


def _judge(p: _Prepared, answers: list[tuple[bytes | None, str | None, str | None]] | None) -> PushResult:
    o = p.outgoing
    if not answers:
        return PushResult(o.code, Outcome.RETRY, o.ack, "no answer for this dossier")
    sv, digest, error = answers.pop(0)
    if error is not None:
        if sv is None and not p.whole:
            # The city holds none of this dossier (it lost it), so it judged a fragment, not our dossier:
            # the full state goes next.
            detail = f"the city lacks the base of our diff: {error}"
            return PushResult(o.code, Outcome.RETRY, EMPTY_STATE_VECTOR, detail)
        # The city's own word on what it holds is the right base for the next diff.
        outcome = Outcome.RETRY if error.startswith("retry:") else Outcome.INVALID
        return PushResult(o.code, outcome, EMPTY_STATE_VECTOR if sv is None else sv, error)
    if sv is None:
        return PushResult(o.code, Outcome.RETRY, EMPTY_STATE_VECTOR, "the city answered without a state vector")
    try:
        theirs = decode_state_vector(sv)
    except ValueError as exc:
        return PushResult(o.code, Outcome.RETRY, o.ack, f"unreadable state vector from the city: {exc}")
    if not covers(theirs, p.ours):
        return PushResult(o.code, Outcome.RETRY, sv, "the city's state vector does not cover ours")
    if digest != o.digest:
        # The city holds all we have, yet another record: usually another replica's changes, which ours
        # will match only once the puller merges them here.
        return PushResult(o.code, Outcome.RETRY, sv, f"the city holds digest {digest}, we have {o.digest}")
    return PushResult(o.code, Outcome.ACKED, sv)


def _parse_results(body: Any) -> list[tuple[str, bytes | None, str | None, str | None]]:
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        raise ValueError("expected a map with a 'results' list")
    parsed: list[tuple[str, bytes | None, str | None, str | None]] = []
    for item in body["results"]:
        if not isinstance(item, list | tuple) or len(item) != 4:
            raise ValueError("each result must be [code, state_vector, digest, error]")
        code, sv, digest, error = item
        if (
            not isinstance(code, str)
            or not (sv is None or isinstance(sv, bytes))
            or not (digest is None or isinstance(digest, str))
            or not (error is None or isinstance(error, str))
        ):
            raise TypeError("a result has fields of the wrong types")
        parsed.append((code, sv, digest, error))
    return parsed


def _raise_for_status(status: int, body: bytes, op: str, retry_after: float | None) -> NoReturn:
    # 5xx and 429 say "not now"; any other 4xx says the request itself is wrong, so repeating it won't help.
    retriable = status >= 500 or status == 429
    raise UpstreamError(
        f"{op}: HTTP {status}: {_snippet(body)}",
        upstream=NAME,
        op=op,
        retriable=retriable,
        status=status,
        retry_after=retry_after if retriable else None,
    )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _snippet(body: bytes) -> str:
    return body[:200].decode("utf-8", "replace")
