"""Reference servers for the intake benchmark.

    python bench/_servers.py trivial --port P
    python bench/_servers.py durable --port P --data-dir D

``trivial`` reads the JSON body and answers a small JSON 201: the ceiling of aiohttp on this machine.

``durable`` does what any durable intake must do and nothing more: one INSERT of the body per request
into a fresh SQLite file opened with the node's own pragmas (WAL, synchronous=FULL, ...), batched by the
node's own :class:`node.store.GroupCommit` (one ``BEGIN IMMEDIATE`` ... ``COMMIT`` and so one fsync per
batch, rows written with one ``executemany``), answering 201 only after the commit returned.

Both serve ``POST /api/v1/dossiers`` and ``GET /livez``; ``durable`` also ``GET /stats`` (batches and
items seen by its writer). Both stop cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web

from node.config import DEFAULT_MAX_BODY
from node.store import GroupCommit, StoreError
from node.store import _pragmas as node_pragmas

INTAKE_PATH = "/api/v1/dossiers"
_JSON = "application/json"


async def livez(request: web.Request) -> web.Response:
    return web.Response(text='{"status":"ok"}', content_type=_JSON)


def _app() -> web.Application:
    # Same body limit as the node, no access log (the node runs without one too).
    app = web.Application(client_max_size=DEFAULT_MAX_BODY)
    app.router.add_get("/livez", livez)
    return app


# -- trivial -------------------------------------------------------------------------------------------
def trivial_app() -> web.Application:
    async def intake(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"accepted": True, "fields": len(body)}, status=201)

    app = _app()
    app.router.add_post(INTAKE_PATH, intake)
    return app


# -- minimal durable -----------------------------------------------------------------------------------
class Durable:
    """One table, one writer connection, the node's group commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: aiosqlite.Connection | None = None
        self.writer: GroupCommit[tuple[str, str], None] = GroupCommit(self._process)
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await node_pragmas(conn)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS intake (id INTEGER PRIMARY KEY, body TEXT NOT NULL, received_at TEXT NOT NULL)"
        )
        self.conn = conn
        self._task = asyncio.create_task(self.writer.run(), name="writer")

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            await self._task
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def _process(self, rows: list[tuple[str, str]]) -> list[BaseException | None]:
        assert self.conn is not None
        await self.conn.execute("BEGIN IMMEDIATE")
        try:
            await self.conn.executemany("INSERT INTO intake (body, received_at) VALUES (?, ?)", rows)
            await self.conn.commit()
        except BaseException:
            await self.conn.rollback()
            raise
        return [None] * len(rows)


def durable_app(store: Durable) -> web.Application:
    async def intake(request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        if not isinstance(body, dict):
            return web.json_response({"error": "must be a JSON object"}, status=400)
        at = datetime.now(UTC).isoformat()
        try:
            await store.writer.submit((raw.decode(), at))
        except StoreError as exc:
            return web.json_response({"error": str(exc)}, status=503)
        return web.json_response({"accepted": True, "received_at": at}, status=201)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"batches": store.writer.batches, "items": store.writer.items})

    app = _app()
    app.router.add_post(INTAKE_PATH, intake)
    app.router.add_get("/stats", stats)
    return app


# -- running -------------------------------------------------------------------------------------------
async def serve(kind: str, host: str, port: int, data_dir: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    store: Durable | None = None
    if kind == "trivial":
        app = trivial_app()
    else:
        if data_dir is None:
            raise SystemExit("durable needs --data-dir")
        store = Durable(data_dir / "durable.sqlite3")
        await store.open()
        app = durable_app(store)

    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        print(f"{kind} listening on http://{host}:{port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        if store is not None:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["trivial", "durable"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path)
    args: Any = parser.parse_args(argv)
    asyncio.run(serve(args.kind, args.host, args.port, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
