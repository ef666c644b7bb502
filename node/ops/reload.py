"""SIGHUP: re-read the configuration and apply what can change under a running node.

Applied in place, with no loop restarted (queue positions are the store's cursors, so nothing is lost or
sent twice) and no request dropped: the upstreams' URLs and credentials (each adapter logs in again on
its next call; calls in flight finish on their old session), API tokens (``node.auth.reload()``) and the
node's own TLS certificate (loaded into the listener's context, so new connections get it). A file that
does not validate, changes the unit's identity, or names a certificate that does not load is refused
whole, the running configuration is kept, and ``config_reload_refused`` says why. Other changed settings
are reported as ``needs_restart``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import structlog

from node import tls
from node.config import Config, ConfigError

if TYPE_CHECKING:
    from node.app import Node

log = structlog.get_logger()

IDENTITY = ("unit", "agency_code", "data_dir")
CREDENTIALS = {
    "national": ("url", "username", "password", "dstcode", "madonvi"),
    "city": ("url", "client_id", "client_secret"),
}
TLS_FILES = ("tls_cert", "tls_key")
# [node] settings a reload applies at once: document fetches (token and peers) and the procedure catalogue,
# which is also read again on every reload (the city edits that file, not the configuration).
LIVE_NODE = ("peer_token", "peer_urls", "procedure_catalogue")


def _changed(old: Any, new: Any, prefix: str) -> list[str]:
    if old is None or new is None:
        return [] if old is new else [prefix]
    return [f"{prefix} {f.name}" for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def plan(old: Config, new: Config) -> tuple[list[str], list[str], list[str]]:
    """(refusals, settings applied live, settings that need a restart) for going from ``old`` to ``new``."""
    refusals = [
        f"[node] {key} changed from {getattr(old.node, key)!r} to {getattr(new.node, key)!r}: a running node's"
        " identity and store cannot change; restart it for that"
        for key in IDENTITY
        if getattr(old.node, key) != getattr(new.node, key)
    ]
    applied: list[str] = []
    restart: list[str] = []
    for key in _changed(old.node, new.node, "[node]"):
        name = key.split(" ", 1)[1]
        if name in TLS_FILES or name in LIVE_NODE:
            applied.append(key)
        elif name not in IDENTITY:
            restart.append(key)
    for section in ("log", "replication", "failover"):
        restart += _changed(getattr(old, section), getattr(new, section), f"[{section}]")
    for name in ("national", "city"):
        before, after = getattr(old, name), getattr(new, name)
        if (before is None) != (after is None):
            restart.append(f"[targets.{name}]")
            continue
        for key in _changed(before, after, f"[targets.{name}]"):
            (applied if key.split(" ", 1)[1] in CREDENTIALS[name] else restart).append(key)
    return refusals, applied, restart


async def reload(node: Node, load: Callable[[], Config], *, server_ssl: ssl.SSLContext | None = None) -> bool:
    """Re-read the configuration with ``load`` and apply it; False (and the old one kept) when refused."""
    try:
        new = load()
    except ConfigError as exc:
        log.error("config_reload_refused", reason="; ".join(exc.problems), kept=node.config.source)
        return False
    except (OSError, ValueError) as exc:
        log.error("config_reload_refused", reason=str(exc), kept=node.config.source)
        return False
    old = node.config
    refusals, applied, restart = plan(old, new)
    if new.node.tls_cert and (old.node.tls_cert, old.node.tls_key) != (new.node.tls_cert, new.node.tls_key):
        if server_ssl is None:
            restart.append("[node] tls_cert (the node was started without TLS)")
        else:
            try:
                tls.server_context(new)  # loads in a scratch context first: a bad pair must change nothing
            except (ssl.SSLError, OSError) as exc:
                refusals.append(f"[node] tls_cert/tls_key: cannot be loaded: {exc}")
    from node.desk.duedate import CatalogueError, Deadlines

    deadlines: Deadlines | None = None
    try:
        deadlines = Deadlines.load(new.node.procedure_catalogue or None)
    except CatalogueError as exc:
        refusals.append(f"[node] procedure_catalogue: {'; '.join(exc.problems)}")
    except (OSError, ValueError) as exc:
        refusals.append(f"[node] procedure_catalogue: cannot be read: {exc}")
    if refusals:
        log.error("config_reload_refused", reason="; ".join(refusals), kept=old.source)
        return False
    tls_reloaded = False
    if server_ssl is not None and new.node.tls_cert:
        # Same context object: the listener keeps it, new handshakes present the new certificate. Loaded
        # before anything else is applied, so that files changed since they were checked (a renewal caught
        # half-written) still refuse the whole file.
        try:
            server_ssl.load_cert_chain(new.node.tls_cert, new.node.tls_key)
        except (ssl.SSLError, OSError) as exc:
            with contextlib.suppress(ssl.SSLError, OSError):  # a failed load may leave half a pair behind
                server_ssl.load_cert_chain(old.node.tls_cert, old.node.tls_key)
            log.error("config_reload_refused", reason=f"[node] tls_cert/tls_key: cannot be loaded: {exc}",
                      kept=old.source)
            return False
        tls_reloaded = True
    _apply_credentials(node, new)
    _apply_node_settings(node, new, deadlines)
    await _call_reload(getattr(node, "auth", None))
    # Another module may offer a reload of its own (certificates, keyrings): called when present.
    await _call_reload(getattr(tls, "reload", None))
    node.config = replace(
        old,
        node=replace(
            old.node,
            tls_cert=new.node.tls_cert,
            tls_key=new.node.tls_key,
            **{k: getattr(new.node, k) for k in LIVE_NODE},
        ),
        national=_keep_restart_only(old.national, new.national, "national"),
        city=_keep_restart_only(old.city, new.city, "city"),
    )
    log.info("config_reloaded", source=new.source, applied=applied, needs_restart=restart,
             tls_reloaded=tls_reloaded, access_reloaded=hasattr(node, "auth"))
    return True


def _keep_restart_only(old: Any, new: Any, name: str) -> Any:
    if old is None or new is None:
        return old
    return replace(old, **{k: getattr(new, k) for k in CREDENTIALS[name]})


def _apply_node_settings(node: Node, new: Config, deadlines: Any) -> None:
    """Fetch token and peers, and the catalogue just read (due dates of later intakes, standings shown)."""
    from node.config import split_peer_urls
    from node.fetcher import Fetcher

    fetcher = getattr(node, "fetcher", None)
    if isinstance(fetcher, Fetcher):
        fetcher.reconfigure(token=new.node.peer_token, peers=tuple(split_peer_urls(new.node.peer_urls)))
    if deadlines is not None and hasattr(node, "deadlines"):
        node.deadlines = deadlines
        node.service.due_date = deadlines.intake_due_date


def _apply_credentials(node: Node, new: Config) -> None:
    from adapters.city import CityAdapter
    from adapters.national import NationalAdapter

    for up in node.upstreams:
        if isinstance(up, NationalAdapter) and (n := new.national) is not None:
            up.reconfigure(url=n.url, username=n.username, password=n.password, dstcode=n.dstcode, madonvi=n.madonvi)
        elif isinstance(up, CityAdapter) and (c := new.city) is not None:
            up.reconfigure(url=c.url, client_id=c.client_id, client_secret=c.client_secret)


async def _call_reload(target: Any) -> None:
    fn = target if callable(target) and not hasattr(target, "reload") else getattr(target, "reload", None)
    if fn is None:
        return
    result = fn()
    if inspect.isawaitable(result):
        await result


class EarlySighup:
    """Catches SIGHUP from the start of ``serve`` until :func:`on_sighup` takes over.

    SIGHUP's default action ends the process, and start-up can take a while (migrations; asking the
    upstreams for the codes they hold, up to ``seed_timeout_s`` each when they are unreachable). A
    ``systemctl reload`` in that window is remembered and applied as soon as the node serves.
    """

    def __init__(self) -> None:
        self.pending = False

    @classmethod
    def install(cls) -> EarlySighup:
        early = cls()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, early._remember)
        return early

    def _remember(self) -> None:
        self.pending = True
        log.info("config_reload_deferred", reason="the node is starting; the file is re-read once it serves")


def _while_stopping() -> None:
    log.info("config_reload_skipped", reason="the node is stopping")


@contextlib.asynccontextmanager
async def on_sighup(
    node: Node,
    load: Callable[[], Config] | None,
    *,
    server_ssl: ssl.SSLContext | None = None,
    early: EarlySighup | None = None,
) -> AsyncIterator[None]:
    """While the body runs, each SIGHUP reloads the configuration (one reload at a time, in order).

    With ``early``, a SIGHUP received during start-up is applied at once, and one received after the body
    (while the node drains and stops) is logged and ignored rather than ending the process.
    """
    if load is None:
        yield
        return
    loop = asyncio.get_running_loop()
    hup = asyncio.Event()

    async def reloads() -> None:
        while True:
            await hup.wait()
            hup.clear()
            try:
                await reload(node, load, server_ssl=server_ssl)
            except Exception as exc:  # a reload must never take the node down
                log.exception("config_reload_failed", error=str(exc))

    loop.add_signal_handler(signal.SIGHUP, hup.set)
    if early is not None and early.pending:
        hup.set()
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(reloads(), name="sighup")
            try:
                yield
            finally:
                task.cancel()
    finally:
        if early is not None:
            loop.add_signal_handler(signal.SIGHUP, _while_stopping)  # replaces ours; gone with the loop
        else:
            loop.remove_signal_handler(signal.SIGHUP)
