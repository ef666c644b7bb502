"""The node's SQLite store: one writer connection, a reader connection, migrations, group commit.

Every write goes through the single writer connection with ``BEGIN IMMEDIATE``; concurrent requests are
batched into one transaction and one fsync by :class:`GroupCommit`. WAL with ``synchronous=FULL`` makes a
commit durable when it returns, so a 201 sent after it survives a power cut.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite
import structlog

from node.crypto import Sealer
from node.migrations import LATEST, MIGRATIONS

log = structlog.get_logger()

T = TypeVar("T")
R = TypeVar("R")

BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The store could not complete a write; nothing of the failed transaction was kept."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class SchemaTooNew(Exception):
    """The store was written by a newer release; running an older one over it would lose data."""


def _pragma_list(cache_kib: int | None = None) -> list[str]:
    """The settings of every connection to a store: the reader's, the writer's and the migrations'."""
    pragmas = ["journal_mode=WAL", "synchronous=FULL", f"busy_timeout={BUSY_TIMEOUT_MS}", "foreign_keys=ON"]
    if cache_kib is not None:
        pragmas.append(f"cache_size=-{int(cache_kib)}")
    return pragmas


async def _pragmas(conn: aiosqlite.Connection, cache_kib: int | None = None) -> None:
    for pragma in _pragma_list(cache_kib):
        await conn.execute(f"PRAGMA {pragma}")


async def migrate(conn: aiosqlite.Connection, target: int = LATEST) -> int:
    """Bring the schema forward to ``target``; returns the version the store was at."""
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    current = int(row[0]) if row else 0
    if current > LATEST:
        raise SchemaTooNew(
            f"the store is at schema version {current} but this release knows only up to {LATEST}; "
            "downgrading would lose data: run the newer release or restore a backup"
        )
    for version, sql in MIGRATIONS:
        if current < version <= target:
            statements = [s.strip() for s in sql.split(";") if s.strip()]
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version={version}")
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise
            log.info("store_migrated", version=version)
    return current


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable: fsync the directory itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def classify(exc: BaseException) -> StoreError:
    """Turn an SQLite failure into a StoreError that says whether the disk is full."""
    full = isinstance(exc, sqlite3.OperationalError) and (
        "full" in str(exc).lower() or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    )
    msg = (
        "the disk holding the store is full; nothing of this request was written: free space, then send it again"
        if full
        else f"store write failed: {exc}"
    )
    return StoreError(msg, disk_full=full)


class Store:
    """The SQLite database of one node.

    Writes run on one dedicated thread with its own connection: :meth:`write` hands a whole transaction
    (``BEGIN IMMEDIATE`` … ``COMMIT``) to that thread as one call, so a batch costs one thread hop
    however many statements it has. Reads go through an aiosqlite connection; WAL lets them run
    beside the writer and see every committed transaction.
    """

    def __init__(self, path: Path, sealer: Sealer | None = None, *, cache_kib: int | None = None) -> None:
        self.path = path
        # Page cache per connection in KiB ([node] sqlite_cache_kib); None: SQLite's default.
        self.cache_kib = cache_kib
        # The one codec for dossier contents at rest: sealed under a keyring, or clear without one.
        self.sealer = sealer or Sealer()
        self._conn: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        # One transaction at a time on the writer, in the order they were asked for.
        self._write_lock = asyncio.Lock()
        # One statement at a time on the reader: SQLite keeps a connection's read snapshot while any of its
        # statements is open, so a read started beside another task's unfinished cursor would see the store as
        # of that cursor's start and miss commits acknowledged since (an Idempotency-Key retried right after
        # its 201 then minted a second dossier).
        self._read_lock = asyncio.Lock()

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        # A data directory the node makes itself is its own (citizens' data); an existing one keeps its mode.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Migrations run once, before anything else touches the file.
        async with aiosqlite.connect(self.path, isolation_level=None) as conn:
            await _pragmas(conn)
            await migrate(conn)
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect_writer)
            reader = await aiosqlite.connect(self.path, isolation_level=None)
            await _pragmas(reader, self.cache_kib)
        except BaseException:
            executor.shutdown(wait=True)
            raise
        self._executor, self._reader = executor, reader

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in _pragma_list(self.cache_kib):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    async def close(self) -> None:
        """Close both connections; safe to call twice; re-raises the first error after trying both."""
        first: BaseException | None = None
        conn, executor, self._conn, self._executor = self._conn, self._executor, None, None
        if conn is not None and executor is not None:
            try:
                async with self._write_lock:
                    await asyncio.get_running_loop().run_in_executor(executor, self._close_writer, conn)
            except BaseException as exc:
                first = exc
            executor.shutdown(wait=True)
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                await reader.close()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    @staticmethod
    def _close_writer(conn: sqlite3.Connection) -> None:
        # Fold the WAL back so a copied data directory is one self-contained file.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StoreError("store is closed")
        return self._reader

    async def write(self, fn: Callable[[sqlite3.Connection], R], *, durable: bool = True) -> R:
        """Run ``fn`` inside one ``BEGIN IMMEDIATE`` transaction on the writer thread; one hop.

        Commits when ``fn`` returns, rolls back when it raises. ``fn`` runs on another thread: it must
        only touch the connection and the data it was given.

        ``durable=False`` is for bookkeeping the node redoes by itself after a power cut (what an upstream
        acknowledged, how far a feed was read): the commit skips its fsync (``synchronous=NORMAL``). The WAL
        keeps commits in order, so such a transaction is lost only together with every later one, and the
        next durable commit makes it durable too; what a desk or a peer was told always waits for its fsync.
        """
        return await self._on_writer(self._transaction if durable else self._light_transaction, fn)

    async def on_writer(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        """Run ``fn`` on the writer connection outside a transaction (pragmas, checkpoints)."""
        return await self._on_writer(fn)

    async def _on_writer(self, fn: Callable[..., R], *args: Any) -> R:
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise StoreError("store is closed")
        async with self._write_lock:
            future = asyncio.get_running_loop().run_in_executor(executor, fn, conn, *args)
            # The thread finishes a transaction it has started even if the caller is cancelled; waiting
            # for it keeps the lock held until the connection is free again.
            return await asyncio.shield(future)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], R]) -> R:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return result

    # Each read is one hop to the reader's thread (execute and fetch together), not three (execute, fetch,
    # close): a fleet's worth of nodes in one process makes tens of thousands of reads a second.
    @staticmethod
    def _light_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], R]) -> R:
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            return Store._transaction(conn, fn)
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._read_lock:
            return list(await self.reader.execute_fetchall(sql, params))

    async def get_meta(self, key: str) -> str | None:
        row = await self.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def integrity_check(self) -> str:
        row = await self.fetchone("PRAGMA integrity_check")
        return str(row[0]) if row else "no answer"


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit(Generic[T, R]):
    """Collects concurrent write requests and hands them to ``process`` as one batch.

    ``process`` receives the items and returns one result per item (or raises, failing all of them). While
    a batch is being committed new requests queue up, so under load each transaction and fsync carries
    many requests and an idle node still commits a lone request at once.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[list[R | BaseException]]],
        *,
        max_batch: int = 512,
    ) -> None:
        self._process = process
        self._max_batch = max_batch
        self._queue: list[_Pending[T, R]] = []
        self._wake = asyncio.Event()
        self._closed = False
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        if self._closed:
            raise StoreError("the store is shutting down")
        pending: _Pending[T, R] = _Pending(item)
        self._queue.append(pending)
        self._wake.set()
        return await pending.future

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def run(self) -> None:
        """The writer loop; returns once closed and drained."""
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            await self.run_batch(batch)

    async def run_batch(self, batch: list[_Pending[T, R]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._process([p.item for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(StoreError("the store is shutting down"))
            raise
        except Exception as exc:
            log.error("group_commit_failed", error=str(exc), size=len(batch))
            err = exc if isinstance(exc, StoreError) else classify(exc)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
