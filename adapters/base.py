"""The ``Upstream`` protocol every target adapter implements, and its contract.

Contract (checked by one shared test suite against each adapter and its stand-in):

1. ``push`` is idempotent for the same key: pushing a dossier whose acknowledged state already covers
   its digest sends nothing new; pushing it again after a lost answer stores nothing twice upstream
   (records are keyed by code and digest, steps by step key).
2. ``push`` answers one :class:`PushResult` per dossier given, in any order, and never raises for a
   problem with one dossier: a record the upstream rejects as invalid is ``INVALID``; a code that
   belongs to another citizen's dossier upstream is ``COLLISION``; a per-record failure that may pass
   later is ``RETRY``. It raises :class:`UpstreamError` only when the call as a whole failed, with
   ``retriable`` saying whether trying again may help.
3. ``ACKED`` means the upstream durably holds the record with exactly ``digest``; ``ack`` is the
   adapter's own opaque state to pass back on the next push of that dossier (for example the portal's
   already-sent step keys, or the city system's last acknowledged state vector).
4. Sessions and tokens are the adapter's business: an expired one is renewed transparently.
5. ``close`` is idempotent.
6. ``digests`` lists every dossier the upstream holds for the unit (received or competent) whose
   :func:`sync.record.bucket_of` is the bucket asked for, with the :func:`sync.record.digest` of the record
   as the upstream holds it, so equal digests mean equal records; a dossier it lacks is simply absent.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class UpstreamError(Exception):
    """A call to an upstream failed as a whole; loops look at ``retriable``, never at the message."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        op: str,
        retriable: bool,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.upstream = upstream
        self.op = op
        self.retriable = retriable
        self.status = status
        self.retry_after = retry_after

    @property
    def hard(self) -> bool:
        """A failure that says the upstream is unwell (connection, timeout, 5xx), not that we sent junk."""
        return self.retriable and (self.status is None or self.status >= 500)


class Outcome(enum.StrEnum):
    ACKED = "acked"
    INVALID = "invalid"
    COLLISION = "collision"
    RETRY = "retry"


@dataclass(frozen=True)
class Outgoing:
    """One dossier to push: its DVCQG record, digest and full Y state, plus what the target acked last."""

    code: str
    record: Mapping[str, Any]
    digest: str
    state: bytes
    ack: bytes | None = None


@dataclass(frozen=True)
class PushResult:
    code: str
    outcome: Outcome
    ack: bytes | None = None
    detail: str = ""


@dataclass(frozen=True)
class FeedItem:
    code: str
    seq: int
    # The digest of the record as the upstream holds it after this change, when its feed gives one: a
    # puller that already holds that digest has nothing to fetch (the echo of its own push).
    digest: str | None = None
    # The state vector of the upstream's Doc after this change, when a CRDT-native feed gives one: a puller
    # whose own state vector covers it holds every operation the upstream has (the diff would be empty).
    state_vector: bytes | None = None


def feed_digest(item: Mapping[str, Any]) -> str | None:
    """The optional ``digest`` of one item of a feed answer; None when absent or not a digest."""
    value = item.get("digest")
    return value if isinstance(value, str) and value else None


def feed_state_vector(item: Mapping[str, Any]) -> bytes | None:
    """The optional ``sv`` (base64url, padding optional) of one item of a feed answer; None when absent or
    not valid base64url: the item is then fetched like one without it."""
    value = item.get("sv")
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        return None


@dataclass(frozen=True)
class FeedPage:
    items: list[FeedItem] = field(default_factory=list)
    next: int = 0


@dataclass(frozen=True)
class Fetched:
    """One dossier as an upstream holds it: a Y update (CRDT-native upstreams) or a DVCQG record."""

    code: str
    digest: str
    update: bytes | None = None
    state_vector: bytes | None = None
    record: Mapping[str, Any] | None = None


@runtime_checkable
class Upstream(Protocol):
    """One upstream system (the national portal or the city system)."""

    name: str

    async def push(self, batch: Sequence[Outgoing]) -> list[PushResult]:
        """Send the dossiers; one result each (see the module's contract)."""
        ...

    async def probe(self) -> None:
        """A cheap call that raises :class:`UpstreamError` when the upstream cannot serve."""
        ...

    async def feed(self, unit: str, since: int, limit: int) -> FeedPage:
        """The upstream's change feed for a unit, by the upstream's own commit sequence."""
        ...

    async def fetch(self, code: str, state_vector: bytes | None) -> Fetched | None:
        """The dossier as the upstream holds it (a diff against ``state_vector`` where it can); None if unknown."""
        ...

    async def digests(self, unit: str, bucket: int, buckets: int) -> dict[str, str]:
        """``{code: digest}`` of the unit's dossiers (received or competent) in one bucket of ``buckets``."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...
