"""Serving a stand-in's app on loopback, shared by both stand-ins."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

SHUTDOWN_TIMEOUT_S = 1.0


@contextlib.asynccontextmanager
async def running(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0: any free port) and yield its base URL."""
    # handler_cancellation ends a blackholed call when its client gives up, so shutdown does not wait on it.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S, handler_cancellation=True
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_host, bound_port = runner.addresses[0][0], runner.addresses[0][1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        yield f"http://{shown}:{bound_port}"
    finally:
        await runner.cleanup()
