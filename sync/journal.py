"""Journal retention: entries every target has acknowledged are pruned once older than a window.

The dossier row's state is the source for any resend, so a pruned entry loses nothing; the window only
keeps recent history at hand for inspection.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from node.clock import Clock, iso
from node.store import Store


async def prune(store: Store, targets: Sequence[str], *, retention: timedelta, clock: Clock) -> int:
    """Delete journal entries at or below every target's cursor and older than ``retention``."""
    if not targets:
        return 0
    marks = ",".join("?" for _ in targets)
    row = await store.fetchone(f"SELECT count(*), min(seq) FROM cursors WHERE target IN ({marks})", list(targets))
    if row is None or row[0] < len(targets):
        return 0  # a target that has never pushed still needs everything
    floor = int(row[1])
    cutoff = iso(clock.now() - retention)
    return await store.write(
        lambda conn: int(conn.execute("DELETE FROM journal WHERE seq <= ? AND at < ?", (floor, cutoff)).rowcount)
    )
