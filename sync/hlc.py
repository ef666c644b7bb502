"""Hybrid logical clock: physical milliseconds plus a counter, persisted by the store.

A stamp is a fixed-width string ``"{ms:015d}.{counter:05d}"`` so that string order is time order and a
stamp survives the round trip through a Y Map unchanged (a Y number would come back as a float).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

# A remote stamp further ahead than this is clamped: one node with a wrong clock must not drag every
# other node's stamps into the future.
DEFAULT_MAX_OFFSET_MS = 5 * 60 * 1000
_MAX_COUNTER = 99_999


@dataclass(frozen=True, order=True)
class Stamp:
    """One HLC reading."""

    ms: int
    counter: int

    def encode(self) -> str:
        return f"{self.ms:015d}.{self.counter:05d}"

    @classmethod
    def decode(cls, text: str) -> Stamp:
        ms, _, counter = text.partition(".")
        if not ms.isdigit() or not counter.isdigit():
            raise ValueError(f"not an HLC stamp: {text!r}")
        return cls(int(ms), int(counter))


ZERO = Stamp(0, 0)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HLC:
    """Monotonic hybrid logical clock for one writer."""

    def __init__(
        self,
        last: Stamp = ZERO,
        *,
        physical: Callable[[], int] = wall_ms,
        max_offset_ms: int = DEFAULT_MAX_OFFSET_MS,
    ) -> None:
        self._last = last
        self._physical = physical
        self.max_offset_ms = max_offset_ms

    @property
    def last(self) -> Stamp:
        return self._last

    def now(self) -> Stamp:
        """A stamp greater than every stamp issued or observed before."""
        pt = self._physical()
        last = self._last
        if pt > last.ms:
            nxt = Stamp(pt, 0)
        elif last.counter < _MAX_COUNTER:
            nxt = Stamp(last.ms, last.counter + 1)
        else:
            nxt = Stamp(last.ms + 1, 0)
        self._last = nxt
        return nxt

    def clamp(self, remote: Stamp) -> Stamp:
        """A remote stamp, or the local clock plus the bounded offset if it lies further ahead (logged)."""
        pt = self._physical()
        limit = pt + self.max_offset_ms
        if remote.ms > limit:
            log.warning("hlc_remote_clamped", remote=remote.encode(), offset_ms=remote.ms - pt)
            return Stamp(limit, 0)
        return remote

    def observe(self, remote: Stamp) -> Stamp:
        """Merge a remote stamp; one too far ahead of the local clock is clamped and logged."""
        remote = self.clamp(remote)
        if remote > self._last:
            self._last = remote
        return self.now()

    def reset(self, last: Stamp) -> None:
        self._last = last
