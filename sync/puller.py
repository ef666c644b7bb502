"""Inbound changes: one puller per upstream follows that upstream's feed for this unit.

From the city system it fetches, per changed dossier, the diff against the node's own state vector (so
echoes of its own pushes are empty). From the portal it fetches the record and merges it by a three-way
diff against the last record acknowledged by or pulled from the portal (:mod:`sync.merge`). The feed
cursor is committed after the merges of a page, so a crash re-reads at most a page, and merging twice
changes nothing.

Most of a busy unit's feed is the echo of its own pushes, and looking each of them up would cost the
upstream a read and the node a merge per change for nothing. A portal feed item that gives the digest of
the record as the portal holds it is looked up only when the node holds another digest; a city feed item
that gives the state vector of the city's Doc only when the node's own does not cover it (see
:meth:`Puller._changed` for why the city needs the stronger test). A page of nothing but echoes moves the
cursor in memory, stored at most every few seconds.

A dossier first seen on the portal already has a Doc somewhere: the one its receiving unit created. Given a
``doc_source`` (the city system), the portal's puller takes that Doc first and merges the portal's record
into it, so the node does not start a second, independent copy of every field under its portal writer.
The node does not pass one yet: with it, the boundary-free test with the city down (forward, take over,
return while the city is unreachable) intermittently converged on a stale forwarding state, a cause not
found yet (see docs/merging.md for a likely lead). Without a ``doc_source`` the dossier is created from the
portal's record, as before.

Not from a record without any step, though (:func:`sync.merge.lacks_steps`: the receiving unit's push
stored the record and its steps call failed): that Doc would have no status. Such a dossier is left out,
logged once at info as ``pull_incomplete``, and comes in later whole: from the city's Doc (its puller),
from the portal's feed (storing the steps moves the dossier up the feed, past the cursor that skipped it),
or from anti-entropy, which finds it missing here on every round and pulls it again.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pycrdt
import structlog

from adapters.base import FeedItem, Fetched, Upstream, UpstreamError
from failover.breaker import BreakerState
from failover.windows import GuardedUpstream
from node.errors import ApiError
from node.service import DossierService, Merge
from node.store import Store
from sync import doc as ydoc
from sync.merge import lacks_steps, portal_update
from sync.record import materialise
from sync.statevector import covers, decode_state_vector
from sync.yupdate import Refused, decode_update

log = structlog.get_logger()

# A cursor moved only past echoes is stored at most this often (see Puller._advance).
CURSOR_FLUSH_S = 5.0


class Puller:
    """Pulls one upstream's changes for one unit into the node."""

    def __init__(
        self,
        store: Store,
        service: DossierService,
        upstream: Upstream,
        *,
        unit: str,
        portal_client_id: int | None = None,
        doc_source: Upstream | None = None,
        page_size: int = 200,
        concurrency: int = 8,
    ) -> None:
        self.store = store
        self.service = service
        self.upstream = upstream
        self.target = upstream.name
        self.unit = unit
        self.portal_client_id = portal_client_id
        # Where the portal's puller takes the Doc of a dossier it has not held yet (the city system).
        self.doc_source = doc_source
        self.page_size = page_size
        self._sem = asyncio.Semaphore(concurrency)
        self.pulled = 0
        self.echoes = 0  # feed items skipped: the node already held the digest the upstream gave
        self.last_page = 0  # items on the last feed page read
        self._stored: int | None = None  # the cursor as stored (read once, then kept up to date here)
        self._stored_at = 0.0
        self._unstored = 0  # past pages of echoes only, not stored yet
        self.merged = 0
        self.refused = 0
        # Codes left out for a stepless portal record, each logged once; a code leaves when it comes in.
        self.incomplete: set[str] = set()

    async def cursor(self) -> int:
        """Where the next page starts: the stored cursor, or past a page of echoes not stored yet."""
        if self._stored is None:
            row = await self.store.fetchone("SELECT seq FROM pull_cursors WHERE target = ?", (self.target,))
            self._stored = int(row[0]) if row else 0
        return max(self._stored, self._unstored)

    def reload_cursor(self) -> None:
        """Read the cursor from the store again at the next step (it was changed there, not through here)."""
        self._stored, self._unstored = None, 0

    async def run_once(self) -> bool:
        """Pull one page of the feed; True when more is waiting."""
        since = await self.cursor()
        page = await self.upstream.feed(self.unit, since, self.page_size)
        self.last_page = len(page.items)
        latest: dict[str, FeedItem] = {}
        for entry in page.items:
            latest.pop(entry.code, None)
            latest[entry.code] = entry
        codes = await self._changed(latest)
        self.echoes += len(latest) - len(codes)
        fetched = await asyncio.gather(*(self._fetch(code) for code in codes))
        for code, item in zip(codes, fetched, strict=True):
            if item is not None:
                await self._merge(code, item)
        if page.next > since:
            await self._advance(page.next, merged=bool(codes))
        self.pulled += len(codes)
        return len(page.items) >= self.page_size

    async def _changed(self, latest: dict[str, FeedItem]) -> list[str]:
        """The codes of a page worth fetching: all but the echoes of this node's own pushes.

        From the portal, an echo is an item whose digest this node already holds: the portal keeps only the
        record, so an equal record means nothing to merge. From the city system, an echo is an item whose
        state vector this node's own covers: then the node holds every operation of the city's Doc and the
        diff would be empty. An equal record is not enough there: the city's Doc is a CRDT, and operations
        this node lacked but skipped because the record looked the same decide how later concurrent writes
        resolve (a forwarding state taken back over a newer one was seen when they were). An item that
        gives neither is always fetched.
        """
        if self.portal_client_id is None:
            given = [code for code, item in latest.items() if item.state_vector is not None]
            if not given:
                return list(latest)
            held_svs = await self._held_state_vectors(given)
            return [code for code, item in latest.items() if not self._covered(item, held_svs.get(code))]
        given = [code for code, item in latest.items() if item.digest is not None]
        held: dict[str, str] = {}
        if given:
            marks = ",".join("?" for _ in given)
            held = dict(await self.store.fetchall(f"SELECT code, digest FROM dossiers WHERE code IN ({marks})", given))
        return [code for code, item in latest.items() if item.digest is None or held.get(code) != item.digest]

    async def _held_state_vectors(self, codes: list[str]) -> dict[str, dict[int, int]]:
        """``{code: {client: clock}}`` of the Docs this node has stored, for those of ``codes`` it holds."""
        marks = ",".join("?" for _ in codes)
        rows = await self.store.fetchall(f"SELECT code, state FROM dossiers WHERE code IN ({marks})", codes)
        sealer = self.store.sealer
        return {
            str(code): decode_state_vector(pycrdt.get_state(sealer.state(str(code), state))) for code, state in rows
        }

    @staticmethod
    def _covered(item: FeedItem, held: dict[int, int] | None) -> bool:
        if held is None or item.state_vector is None:
            return False
        try:
            theirs = decode_state_vector(item.state_vector)
        except ValueError:
            return False  # not a state vector: fetch the item as if the feed had not given one
        return covers(held, theirs)

    async def _advance(self, seq: int, *, merged: bool) -> None:
        """Move the cursor past a page. A page that brought nothing in (only echoes of this node's own pushes)
        moves it in memory and on disk at most every ``CURSOR_FLUSH_S``: a restart reads such a page again,
        which costs one feed call and changes nothing."""
        now = time.monotonic()
        if not merged and now - self._stored_at < CURSOR_FLUSH_S:
            self._unstored = max(self._unstored, seq)
            return
        await self.service.merge(Merge("", b"", self.target, cursor=(self.target, seq), durable=False))
        self._stored_at = now
        if self._stored is not None:  # else read from the store next time: it may have been moved there
            self._stored = max(self._stored, seq)

    async def pull_codes(self, codes: list[str]) -> list[str]:
        """Fetch and merge these dossiers now, outside the feed; the codes whose merge changed the node.

        Anti-entropy's way in for what the feed never showed (a cursor that ran past it) or what differs
        anyway. The feed cursor stays where it is: these codes say nothing about the rest of the feed.
        """
        unique = list(dict.fromkeys(codes))
        fetched = await asyncio.gather(*(self._fetch(code) for code in unique))
        changed: list[str] = []
        for code, item in zip(unique, fetched, strict=True):
            if item is not None:
                before = self.merged
                await self._merge(code, item)
                if self.merged > before:
                    changed.append(code)
        self.pulled += len(unique)
        return changed

    async def _fetch(self, code: str) -> Fetched | None:
        async with self._sem:
            row = await self.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            sv = pycrdt.get_state(self.store.sealer.state(code, row[0])) if row is not None else None
            return await self.upstream.fetch(code, sv)

    async def _merge(self, code: str, fetched: Fetched) -> None:
        if fetched.update is not None:
            op = Merge(code, fetched.update, self.target, durable=False)
        elif fetched.record is not None:
            portal_op = await self._portal_merge(code, fetched.record)
            if portal_op is None:
                if code not in self.incomplete:
                    self.incomplete.add(code)
                    log.info("pull_incomplete", target=self.target, code=code)
                return
            op = portal_op
        else:
            return
        try:
            result = await self.service.merge(op)
        except ApiError as exc:
            # An upstream's copy that is not a valid dossier must not stop the feed; it is logged for people.
            self.refused += 1
            log.error("pull_refused", target=self.target, code=code, reason=exc.message)
            return
        if result.status == 201:
            self.merged += 1
        self.incomplete.discard(code)

    async def _portal_merge(self, code: str, remote: Any) -> Merge | None:
        """The merge of the portal's record; None when it would start a Doc without a step (left for later).

        Nothing is written then, not even the base: a base without the dossier would make the later
        three-way merge read every field as one the portal never changed.
        """
        row = await self.store.fetchone("SELECT state, record FROM dossiers WHERE code = ?", (code,))
        base_row = await self.store.fetchone("SELECT record FROM portal_base WHERE code = ?", (code,))
        sealer = self.store.sealer
        state, local = (sealer.state(code, row[0]), json.loads(sealer.record(code, row[1]))) if row else (None, None)
        base = json.loads(sealer.base(code, base_row[0])) if base_row is not None else None
        assert self.portal_client_id is not None
        existing = await self._existing_doc(code) if state is None else None
        if existing is not None:
            state, local = existing
        elif state is None and lacks_steps(remote):
            return None
        update = portal_update(code, state, local, base, remote, client_id=self.portal_client_id, hlc=self.service.hlc)
        if existing is not None:
            update = pycrdt.merge_updates(existing[0], update) if update else existing[0]
        return Merge(code, update or b"", self.target, base=dict(remote), durable=False)

    async def _existing_doc(self, code: str) -> tuple[bytes, dict[str, Any]] | None:
        """The city system's Doc of a dossier this node has not held yet, and its record; None when the city
        does not hold it, cannot be reached, or holds something that is not this dossier."""
        if self.doc_source is None:
            return None
        if isinstance(self.doc_source, GuardedUpstream) and self.doc_source.breaker.state is not BreakerState.CLOSED:
            return None  # not while the city is failing: each new dossier would wait for its timeout
        try:
            fetched = await self.doc_source.fetch(code, None)
        except UpstreamError as exc:
            log.info("pull_doc_unavailable", target=self.target, source=self.doc_source.name, code=code, error=str(exc))
            return None
        if fetched is None or not fetched.update:
            return None
        try:
            decode_update(fetched.update)
            doc = ydoc.load_doc(code, fetched.update, self.portal_client_id or 0)
            record = materialise(doc)[0]
        except Exception as exc:  # pycrdt reports a malformed update with various exception types
            reason = exc.message if isinstance(exc, Refused) else str(exc)
            log.warning("pull_doc_refused", target=self.target, source=self.doc_source.name, code=code, reason=reason)
            return None
        if record.get("MaHoSo") != code:
            return None
        return fetched.update, record
