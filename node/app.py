"""Composition root: builds a node from its configuration.

Start in dependency order (store, dossier service and its writer loop, HTTP app), stop in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from aiohttp import web

from node import api
from node.clock import Clock
from node.config import Config
from node.registry import get_unit
from node.service import DossierService
from node.store import Store

log = structlog.get_logger()


class Node:
    """One unit's node: ``async with Node(config) as node`` gives a running node and ``node.app``."""

    def __init__(self, config: Config, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or Clock()
        self.store = Store(config.db_path)
        self.service = DossierService(
            self.store, unit=config.node.unit, agency=config.node.agency_code, clock=self.clock
        )
        self.app = build_app(self)
        self._tasks: asyncio.TaskGroup | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def ready(self) -> bool:
        return (
            not self._stopping
            and self.store.is_open
            and self._writer_task is not None
            and not self._writer_task.done()
        )

    async def __aenter__(self) -> Node:
        structlog.contextvars.bind_contextvars(unit=self.config.node.unit)
        await self.store.open()
        try:
            await self.service.load()
            self._tasks = asyncio.TaskGroup()
            await self._tasks.__aenter__()
            self._writer_task = self._tasks.create_task(self.service.writer.run(), name="writer")
        except BaseException:
            await self.store.close()
            raise
        unit = get_unit(self.config.node.unit)
        log.info("node_started", unit_name=unit.name if unit else None, store=str(self.config.db_path),
                 client_id=self.service.client_id, journal_head=self.service.journal_head)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Drain the writer, then close the store; idempotent; re-raises the first error."""
        if self._stopping and self._tasks is None:
            return
        self._stopping = True
        first: BaseException | None = None
        self.service.writer.close()
        if self._tasks is not None:
            tasks, self._tasks = self._tasks, None
            try:
                await tasks.__aexit__(None, None, None)
            except BaseException as exc:
                first = exc
        try:
            await self.store.close()
        except BaseException as exc:
            first = first or exc
        log.info("node_stopped")
        if first is not None:
            raise first


def build_app(node: Node) -> web.Application:
    app = web.Application(
        client_max_size=node.config.node.max_body_bytes,
        middlewares=[api.error_middleware],
        handler_args={"max_field_size": 8190},
    )
    app[api.SERVICE] = node.service
    app[api.STORE] = node.store
    app[api.UNIT] = node.config.node.unit
    app[api.READY] = lambda: node.ready
    api.add_routes(app)
    return app


async def serve(config: Config, *, stop: asyncio.Event, announce: Any = print, clock: Clock | None = None) -> None:
    """Run a node until ``stop`` is set; then stop accepting, finish in-flight requests, close the store."""
    async with Node(config, clock=clock) as node:
        runner = web.AppRunner(node.app, handle_signals=False, access_log=None,
                               shutdown_timeout=config.node.shutdown_timeout_s)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.listen_host, config.listen_port, reuse_address=True)
            await site.start()
            for addr in runner.addresses:
                host, port = addr[0], addr[1]
                shown = f"[{host}]" if ":" in host else host
                announce(f"wardsync node {config.node.unit} listening on http://{shown}:{port}")
            log.info("listening", addresses=[f"{a[0]}:{a[1]}" for a in runner.addresses])
            await stop.wait()
            log.info("stopping")
            node._stopping = True
        finally:
            with contextlib.suppress(Exception):
                await runner.cleanup()
