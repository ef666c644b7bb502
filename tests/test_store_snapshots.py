"""Reads through the store's one reader connection see every commit acknowledged before they start.

SQLite keeps a connection's read snapshot while any of its statements is open. With background loops
reading beside request handlers, a read that shared a snapshot with another task's unfinished cursor
missed a commit made just before it: found by the torture tests, where an intake retried with its
Idempotency-Key right after its 201 minted a second dossier.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

from node.store import Store


class TestReadsSeeCommits:
    """A read started after a write returned sees that write, however many other reads are in flight."""

    async def test_read_after_write_beside_busy_readers(self, tmp_path: Path) -> None:
        store = Store(tmp_path / "wardsync.sqlite3")
        await store.open()
        try:
            def setup(conn: sqlite3.Connection) -> None:
                conn.execute("CREATE TABLE filler (n INTEGER)")
                conn.executemany("INSERT INTO filler VALUES (?)", [(i,) for i in range(5000)])
                conn.execute("CREATE TABLE probe (n INTEGER)")

            await store.write(setup)
            stop = asyncio.Event()

            async def scanner() -> int:
                scans = 0
                while not stop.is_set():
                    await store.fetchall("SELECT n FROM filler")
                    scans += 1
                return scans

            scanners = [asyncio.create_task(scanner()) for _ in range(4)]
            stale = []
            try:
                for i in range(1, 301):
                    await store.write(lambda c, i=i: c.execute("INSERT INTO probe VALUES (?)", (i,)))
                    seen = (await store.fetchone("SELECT count(*) FROM probe"))[0]
                    if seen != i:
                        stale.append((i, seen))
            finally:
                stop.set()
                scans = await asyncio.gather(*scanners)
            assert sum(scans) > 0, "the other readers never ran"
            assert not stale, f"{len(stale)} reads missed a write acknowledged before them, e.g. {stale[:3]}"
        finally:
            with contextlib.suppress(Exception):
                await store.close()
