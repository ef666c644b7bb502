"""Fetching the files of documents a dossier lists but this node does not hold.

The competent unit of a boundary-free dossier learns of it through the upstreams; its TaiLieuNop names
each file's hash, size and download URL on the receiving unit's node. The fetcher follows the dossiers
that changed (by ``change_seq``, with a durable cursor), queues every listed file it lacks in
``document_fetches``, and downloads each one into a resumable partial file: after a broken link the next
try asks for the rest with ``Range``, and a file is moved into the blob store only when its sha256 matches.
A file that fails a whole round of tries waits, with backoff, and keeps what it has so far.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from node.clock import Clock, iso
from node.config import origin_of
from node.documents import CHUNK_BYTES, HASH_FIELD, SIZE_FIELD, URL_FIELD, BlobStore, PartialFile, TooLarge
from node.documents import stored_documents as _stored
from node.store import Store
from sync.loop import full_jitter

log = structlog.get_logger()

CURSOR_KEY = "documents_fetch_cursor"
CURSOR_SAVE_S = 60.0


@dataclass(frozen=True)
class FetchSettings:
    attempts: int = 8  # tries in a row that bring no new byte before a round ends; each try resumes
    wait_initial_s: float = 0.1
    wait_max_s: float = 5.0
    read_timeout_s: float = 30.0
    retry_base_s: float = 5.0  # between rounds for a file whose round failed, doubling to retry_cap_s
    retry_cap_s: float = 600.0
    batch: int = 200


class FetchError(Exception):
    """One try failed; ``retriable`` says whether another try in the same round may succeed."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def _retriable(exc: BaseException) -> bool:
    if isinstance(exc, FetchError):
        return exc.retriable
    return isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError)


def _document_link(url: str, code: str, sha: str) -> bool:
    """Whether ``url`` is a node's link to this very document (``.../api/v1/dossiers/{code}/documents/{sha}``).

    The fetcher sends its peer token with the request: a record that names some other address (altered by
    a peer or an upstream) must not make it hand the token to that address.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return False
    return parts.path.endswith(f"/api/v1/dossiers/{quote(code, safe='')}/documents/{sha}")


class _Progress:
    """Tenacity's stop and wait for one file: only tries that brought no new bytes count as failures.

    A link that breaks every few megabytes still delivers a large file, one resumed try after another,
    without waiting longer each time; a link that delivers nothing gives up after ``attempts`` tries.
    """

    def __init__(self, partial: PartialFile, settings: FetchSettings) -> None:
        self.partial = partial
        self.settings = settings
        self.size = partial.size
        self.stalls = 0

    def stalled(self, state: RetryCallState) -> bool:
        if self.partial.size > self.size:
            self.size, self.stalls = self.partial.size, 0
        else:
            self.stalls += 1
        return self.stalls >= self.settings.attempts

    def wait(self, state: RetryCallState) -> float:
        s = self.settings
        return random.uniform(0, min(s.wait_max_s, s.wait_initial_s * 2**self.stalls))


class Fetcher:
    """Downloads the document files this node lacks; ``run_once`` is one step of its loop."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        *,
        token: str = "",
        peers: tuple[str, ...] = (),
        clock: Clock | None = None,
        settings: FetchSettings | None = None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.token = token
        # Origins of the nodes this one fetches from ([node] peer_urls): the token goes to these only.
        self.peers = frozenset(o for o in map(origin_of, peers) if o is not None)
        self._untrusted: set[str] = set()  # origins already logged as refused
        self.clock = clock or Clock()
        self.settings = settings or FetchSettings()
        self._http: aiohttp.ClientSession | None = None
        self._cursor: int | None = None
        self._lock = asyncio.Lock()
        self._cursor_saved = float("-inf")
        # Counted since start: files stored, requests that resumed at an offset, bytes received, rounds
        # that failed, and the largest chunk read from a response (the transfer streams).
        self.stats = {"fetched": 0, "resumed": 0, "bytes": 0, "failed_rounds": 0, "largest_read": 0}

    def reconfigure(self, *, token: str, peers: tuple[str, ...]) -> None:
        """New peer token and peers (a reload); fetches in flight finish with what they started with."""
        self.token = token
        self.peers = frozenset(o for o in map(origin_of, peers) if o is not None)
        self._untrusted.clear()

    def trusts(self, url: str) -> bool:
        """Whether ``url`` lies on a configured peer: a record naming any other host never gets the token."""
        origin = origin_of(url)
        if origin is not None and origin in self.peers:
            return True
        if origin not in self._untrusted:
            self._untrusted.add(str(origin))
            log.warning(
                "document_link_untrusted",
                origin=origin,
                detail="not in [node] peer_urls: its documents are not fetched and the peer token is not sent there",
            )
        return False

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def run_once(self) -> bool:
        """Queue the files of dossiers changed since the cursor, then fetch those due; True if more waits."""
        # One pass at a time: two writers on one partial file would interleave their bytes.
        async with self._lock:
            return await self._run_once()

    async def _run_once(self) -> bool:
        more = await self._scan()
        now = self.clock.ms()
        rows = await self.store.fetchall(
            "SELECT sha256, code, url, size, attempts FROM document_fetches WHERE next_at <= ?"
            " ORDER BY next_at LIMIT ?",
            (now, self.settings.batch),
        )
        for sha, code, url, size, attempts in rows:
            await self._fetch_one(str(sha), str(code), str(url), int(size), int(attempts))
        return more

    async def pending(self) -> list[dict[str, Any]]:
        rows = await self.store.fetchall(
            "SELECT sha256, code, url, size, attempts, last_error, next_at FROM document_fetches ORDER BY next_at"
        )
        keys = ("sha256", "code", "url", "size", "attempts", "last_error", "next_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def _scan(self) -> bool:
        if self._cursor is None:
            self._cursor = int(await self.store.get_meta(CURSOR_KEY) or 0)
        # Only records that name a file hash are read in full: most changes are steps and fees. A sealed
        # record (a BLOB, encryption at rest) cannot be looked into here: it is read and opened.
        rows = await self.store.fetchall(
            f"SELECT code, change_seq, CASE WHEN typeof(record) = 'blob' OR instr(record, '\"{HASH_FIELD}\"') > 0"
            " THEN record END FROM dossiers WHERE change_seq > ? ORDER BY change_seq LIMIT ?",
            (self._cursor, self.settings.batch),
        )
        if not rows:
            return False
        wanted: dict[str, tuple[str, str, int, str]] = {}
        for code, _, record in rows:
            opened = self.store.sealer.record(str(code), record) if record is not None else None
            for d in _stored(json.loads(opened)) if opened else ():
                sha, url, size = d[HASH_FIELD], d.get(URL_FIELD), d.get(SIZE_FIELD)
                if not isinstance(url, str) or not _document_link(url, str(code), sha):
                    continue
                if not self.trusts(url):
                    continue
                if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
                    continue
                if sha not in wanted and not self.blobs.has(sha):
                    wanted[sha] = (str(code), url, int(size), iso(self.clock.now()))
        self._cursor = head = int(rows[-1][1])
        full = len(rows) == self.settings.batch
        queued = [(sha, *v) for sha, v in wanted.items()]
        now = time.monotonic()
        # The cursor is only a shortcut (a rescan queues nothing twice): it is kept with what it queued,
        # and otherwise now and then, so a busy desk does not pay a write per commit for it.
        if not queued and now - self._cursor_saved < CURSOR_SAVE_S:
            return full
        self._cursor_saved = now

        def write(conn: Any) -> None:
            conn.executemany(
                "INSERT INTO document_fetches (sha256, code, url, size, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (sha256) DO NOTHING",
                queued,
            )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (CURSOR_KEY, str(head)),
            )

        await self.store.write(write)
        if queued:
            log.info("documents_queued", files=len(queued))
        return full

    async def _fetch_one(self, sha: str, code: str, url: str, size: int, attempts: int) -> None:
        if self.blobs.has(sha):
            await self.store.write(lambda c: c.execute("DELETE FROM document_fetches WHERE sha256 = ?", (sha,)))
            return
        partial = await PartialFile.open(self.blobs.partial_path(f"{sha}.part"), size, resume=True)
        try:
            progress = _Progress(partial, self.settings)
            async for attempt in AsyncRetrying(
                stop=progress.stalled,
                wait=progress.wait,
                retry=retry_if_exception(_retriable),
                reraise=True,
            ):
                with attempt:
                    await self._get(url, partial, size)
            if partial.hexdigest() != sha:
                # A corrupt or stale file at the source, or a partial damaged by a crash: start over.
                partial.discard()
                raise FetchError(f"the file fetched from {url} does not match its sha256", retriable=False)
            await self.blobs.install(partial, sha)
        except Exception as exc:
            partial.close()
            await self._failed(sha, attempts + 1, str(exc) or type(exc).__name__)
            return
        await self.store.write(lambda c: c.execute("DELETE FROM document_fetches WHERE sha256 = ?", (sha,)))
        self.stats["fetched"] += 1
        log.info("document_fetched", code=code, sha256=sha, size=size)

    async def _failed(self, sha: str, attempts: int, error: str) -> None:
        self.stats["failed_rounds"] += 1
        # At least the base wait: full jitter alone may draw next to nothing, and a refused fetch would then
        # go straight out again in the next round.
        base_s = self.settings.retry_base_s
        delay_s = max(base_s, full_jitter(attempts, base_s, self.settings.retry_cap_s))
        next_at = self.clock.ms() + int(delay_s * 1000)
        await self.store.write(
            lambda c: c.execute(
                "UPDATE document_fetches SET attempts = ?, last_error = ?, next_at = ? WHERE sha256 = ?",
                (attempts, error[:500], next_at, sha),
            )
        )
        if attempts == 1 or attempts % 20 == 0:
            log.warning("document_fetch_failed", sha256=sha, attempts=attempts, error=error)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.settings.read_timeout_s)
            self._http = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._http

    async def _get(self, url: str, partial: PartialFile, size: int) -> None:
        """One request for what ``partial`` still lacks, streamed onto its end."""
        if partial.size >= size:
            return
        if not self.trusts(url):  # queued before [node] peer_urls changed
            raise FetchError(f"{url} is not on a node listed in [node] peer_urls", retriable=False)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        offset = partial.size
        if offset:
            headers["Range"] = f"bytes={offset}-"
        # No redirects: the token is for the node the link names, nobody it might send the fetch on to.
        async with self._session().get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status == 200 and offset:
                partial.restart()  # the server ignored the range: take the whole file again
            elif resp.status == 206:
                if not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                    raise FetchError(f"{url} answered another range than bytes={offset}-", retriable=True)
                self.stats["resumed"] += 1
            elif resp.status == 416:
                partial.restart()
                raise FetchError(f"{url} has fewer bytes than the partial file", retriable=True)
            elif resp.status != 200:
                # 5xx and 429 may pass; 401, 403 and 404 will not in this round.
                retriable = resp.status >= 500 or resp.status == 429
                raise FetchError(f"{url} answered HTTP {resp.status}", retriable=retriable)
            try:
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    partial.write(chunk)
                    self.stats["bytes"] += len(chunk)
                    self.stats["largest_read"] = max(self.stats["largest_read"], len(chunk))
            except TooLarge as exc:
                partial.restart()
                raise FetchError(f"{url} sent more than the {size} bytes the record lists", retriable=False) from exc
        if partial.size < size:
            raise FetchError(f"{url} ended after {partial.size} of {size} bytes", retriable=True)
