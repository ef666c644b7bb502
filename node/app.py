"""Composition root: builds a node from its configuration.

Start in dependency order (store, dossier service and its writer loop, HTTP app), stop in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from adapters.base import Upstream, UpstreamError
from failover.breaker import Breaker, BreakerSettings, BreakerState
from failover.controller import Controller
from failover.health import Prober
from failover.windows import FaultWindows, GuardedUpstream
from node import api, crypto, dashboard, metrics, receipts, tls
from node.auth import AUTH, Auth, auth_middleware
from node.clock import Clock
from node.config import Config, split_peer_urls
from node.desk import routes as desk_routes
from node.desk.duedate import Deadlines
from node.documents import add_routes as add_document_routes
from node.documents import blob_store
from node.fetcher import Fetcher
from node.legacy import CHECK_WRITER, LegacyCheck
from node.logs import register_secrets
from node.receipt import add_routes as add_receipt_routes
from node.registry import get_unit
from node.secretfile import secret_values
from node.service import DossierService
from node.store import Store
from sync import journal
from sync.antientropy import AntiEntropy
from sync.loop import Loop
from sync.puller import Puller
from sync.replicator import Replicator, ReplicatorSettings

log = structlog.get_logger()


class Node:
    """One unit's node: ``async with Node(config) as node`` gives a running node and ``node.app``."""

    def __init__(self, config: Config, *, clock: Clock | None = None, upstreams: list[Upstream] | None = None) -> None:
        self.config = config
        register_secrets(*secret_values(config))  # the credentials never reach a log, whatever the message
        self.clock = clock or Clock()
        self.store = Store(
            config.db_path, sealer=crypto.sealer_for(config.node.key_file), cache_kib=config.node.sqlite_cache_kib
        )
        self.resealer: crypto.Resealer | None = None
        self.auth = Auth(self.store, self.clock)
        self.deadlines = Deadlines.load(config.node.procedure_catalogue)
        self.service = DossierService(
            self.store,
            unit=config.node.unit,
            agency=config.node.agency_code,
            clock=self.clock,
            due_date=self.deadlines.intake_due_date,
        )
        self.fetcher = Fetcher(
            self.store,
            blob_store(config),
            token=config.node.peer_token,
            peers=tuple(split_peer_urls(config.node.peer_urls)),
            clock=self.clock,
        )
        self._given_upstreams = upstreams
        self.upstreams: list[Upstream] = []
        self.replicators: dict[str, Replicator] = {}
        self.loops: dict[str, Loop] = {}
        self.windows = FaultWindows()
        self.guarded: dict[str, GuardedUpstream] = {}
        self.breakers: dict[str, Breaker] = {}
        self.controller: Controller | None = None
        self.pullers: dict[str, Puller] = {}
        self.antientropy: dict[str, AntiEntropy] = {}
        self._last_pull: dict[str, float] = {}
        self.prober: Prober | None = None
        self.legacy_check: LegacyCheck | None = None
        self._sessions: list[aiohttp.ClientSession] = []  # one per target: each has its own TLS trust
        self.receipt_key: receipts.ReceiptKey | None = None
        self.metrics = metrics.NodeMetrics()
        self.history = dashboard.StatusHistory(self)
        self.app = build_app(self)
        self._tasks: asyncio.TaskGroup | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def ready(self) -> bool:
        return (
            not self._stopping and self.store.is_open and self._writer_task is not None and not self._writer_task.done()
        )

    async def __aenter__(self) -> Node:
        structlog.contextvars.bind_contextvars(unit=self.config.node.unit)
        await self.store.open()
        try:
            await crypto.bind(self.store)
            self.receipt_key = receipts.load_or_create(receipts.key_dir_of(self.config))
            await self.service.load()
            self.upstreams = self._given_upstreams if self._given_upstreams is not None else self._build_upstreams()
            rc = self.config.replication
            settings = ReplicatorSettings(
                batch_size=rc.batch_size,
                max_attempts=rc.max_attempts,
                retry_base_s=rc.retry_base_s,
                retry_cap_s=rc.retry_cap_s,
            )
            fo = self.config.failover
            breaker_settings = BreakerSettings(
                consecutive_failures=fo.consecutive_failures,
                failure_rate=fo.failure_rate,
                window_s=fo.window_s,
                min_calls=fo.min_calls,
                open_base_s=fo.open_base_s,
                open_cap_s=fo.open_cap_s,
            )
            for upstream in self.upstreams:
                breaker = Breaker(upstream.name, breaker_settings, on_change=self._breaker_changed)
                guarded = GuardedUpstream(upstream, breaker, self.windows, timeout_s=self._timeout_of(upstream.name))
                self.breakers[upstream.name], self.guarded[upstream.name] = breaker, guarded
                rep = Replicator(
                    self.store,
                    guarded,
                    clock=self.clock,
                    settings=replace(settings, store_base=upstream.name == "national"),
                )
                loop = Loop(
                    f"push:{upstream.name}",
                    rep.run_once,
                    tick_s=rc.tick_s,
                    backoff_base_s=rc.retry_base_s,
                    backoff_cap_s=rc.retry_cap_s,
                    linger_s=rc.push_linger_s,
                )
                self.service.listeners.append(loop.wake)
                self.replicators[upstream.name], self.loops[upstream.name] = rep, loop
            for name, guarded in self.guarded.items():
                portal_cid = await self.service.client_id_for(name) if name == "national" else None
                self.pullers[name] = Puller(
                    self.store,
                    self.service,
                    guarded,
                    unit=self.config.node.unit,
                    portal_client_id=portal_cid,
                )
                self.antientropy[name] = AntiEntropy(
                    self.store,
                    guarded,
                    self.replicators[name],
                    self.pullers[name],
                    unit=self.config.node.unit,
                    buckets=rc.antientropy_buckets,
                    wake=self.loops[name].wake,
                    clock=self.clock,
                )
            if self.breakers:
                backup = "city" if fo.primary == "national" else "national"
                self.controller = Controller(
                    self.store,
                    self.breakers,
                    primary=fo.primary,
                    backup=backup,
                    hold_s=fo.hold_s,
                    backlog=self._backlog,
                    clock=self.clock,
                )
                await self.controller.load()
                self.prober = Prober(
                    list(self.guarded.values()),
                    interval_s=fo.probe_interval_s,
                    timeout_s=fo.probe_timeout_s,
                    quiet_s=fo.probe_quiet_s,
                )
            await self._seed_counters()
            self.metrics.attach(self)
            self._tasks = asyncio.TaskGroup()
            await self._tasks.__aenter__()
            self._writer_task = self._tasks.create_task(self.service.writer.run(), name="writer")
            for name, loop in self.loops.items():
                self._tasks.create_task(loop.run(), name=f"push:{name}")
            if self.replicators:
                self.loops["prune"] = Loop("prune", self._prune, tick_s=rc.prune_tick_s, backoff_cap_s=600.0)
                self._tasks.create_task(self.loops["prune"].run(), name="prune")
            if self.store.sealer.enabled:  # seals a clear store and re-seals after a key rotation, in the background
                self.resealer = crypto.Resealer(self.store)
                self.loops["reseal"] = Loop("reseal", self.resealer.run_once, tick_s=5.0)
                self._tasks.create_task(self.loops["reseal"].run(), name="reseal")
            for name in self.pullers:
                self.loops[f"pull:{name}"] = Loop(
                    f"pull:{name}",
                    self._pull_step(name),
                    tick_s=rc.pull_tick_s,
                    backoff_base_s=rc.retry_base_s,
                    backoff_cap_s=rc.retry_cap_s,
                )
                self._tasks.create_task(self.loops[f"pull:{name}"].run(), name=f"pull:{name}")
            if "national" in self.guarded:
                # Imported dossiers are looked up on the portal before their first push there (node/legacy.py).
                self.legacy_check = LegacyCheck(
                    self.store,
                    self.service,
                    self.guarded["national"],
                    client_id=await self.service.client_id_for(CHECK_WRITER),
                    clock=self.clock,
                    wake=self.loops["national"].wake,
                )
                self.legacy_check.on_release = self.replicators["national"].poke
                self.loops["legacy"] = Loop(
                    "legacy",
                    self.legacy_check.run_once,
                    tick_s=rc.tick_s,
                    backoff_base_s=rc.retry_base_s,
                    backoff_cap_s=rc.retry_cap_s,
                )
                self._tasks.create_task(self.loops["legacy"].run(), name="legacy")
            for name, ae in self.antientropy.items():
                # Slow on purpose: one bucket per tick, so a whole comparison takes buckets x tick.
                self.loops[f"antientropy:{name}"] = Loop(
                    f"antientropy:{name}",
                    ae.run_once,
                    tick_s=rc.antientropy_tick_s,
                    backoff_base_s=rc.retry_base_s,
                    backoff_cap_s=max(rc.retry_cap_s, rc.antientropy_tick_s),
                )
                self._tasks.create_task(self.loops[f"antientropy:{name}"].run(), name=f"antientropy:{name}")
            if self.controller is not None and self.prober is not None:
                self.loops["failover"] = Loop("failover", self._evaluate, tick_s=self.config.failover.evaluate_s)
                self._tasks.create_task(self.loops["failover"].run(), name="failover")
                self._tasks.create_task(self.prober.run(), name="probes")
            # Files of documents listed by dossiers this node holds but stored elsewhere (boundary-free).
            self.loops["documents"] = Loop("documents", self.fetcher.run_once, tick_s=2.0, backoff_cap_s=60.0)
            self._tasks.create_task(self.loops["documents"].run(), name="documents")
            if self.replicators:
                self.loops["history"] = Loop("history", self.history.sample, tick_s=self.history.interval_s)
                self._tasks.create_task(self.loops["history"].run(), name="history")
        except BaseException:
            await self._close_upstreams()
            await self.store.close()
            raise
        unit = get_unit(self.config.node.unit)
        log.info(
            "node_started",
            unit_name=unit.name if unit else None,
            store=str(self.config.db_path),
            client_id=self.service.client_id,
            journal_head=self.service.journal_head,
        )
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _build_upstreams(self) -> list[Upstream]:
        """The adapters the configuration names, each with its own connection pool and TLS trust."""
        if self.config.national is None and self.config.city is None:
            return []
        from adapters.city import CityAdapter
        from adapters.national import NationalAdapter

        tls.warn_unverified(self.config)
        ups: list[Upstream] = []
        if (n := self.config.national) is not None:
            ups.append(
                NationalAdapter(
                    n.url,
                    username=n.username,
                    password=n.password,
                    dstcode=n.dstcode,
                    madonvi=n.madonvi,
                    session=self._session_for(n),
                    timeout_s=n.timeout_s,
                )
            )
        if (c := self.config.city) is not None:
            ups.append(
                CityAdapter(
                    c.url,
                    client_id=c.client_id,
                    client_secret=c.client_secret,
                    session=self._session_for(c),
                    timeout_s=c.timeout_s,
                )
            )
        return ups

    async def _seed_counters(self) -> None:
        """On an empty store, start the day counters past every code the upstreams hold for this unit."""
        row = await self.store.fetchone("SELECT (SELECT count(*) FROM dossiers) + (SELECT count(*) FROM day_counters)")
        # A restored or rebuilt store whose upstreams could not all be asked is marked to ask again here.
        pending = await self.store.get_meta("seed_counters") == "pending"
        if not self.upstreams or (row is not None and row[0] and not pending):
            return
        codes: list[str] = []
        reached = 0
        for upstream in self.upstreams:
            try:
                async with asyncio.timeout(self.config.replication.seed_timeout_s):
                    since = 0
                    while True:
                        page = await upstream.feed(self.config.node.unit, since, 1000)
                        codes += [item.code for item in page.items]
                        if not page.items or page.next <= since:
                            break
                        since = page.next
                reached += 1
            except (UpstreamError, TimeoutError) as exc:
                log.warning("seed_counters_unreachable", target=upstream.name, error=str(exc) or "timeout")
        seeded = await self.service.seed_counters(codes)
        if pending and reached == len(self.upstreams):
            await self.store.write(lambda c: c.execute("DELETE FROM meta WHERE key = 'seed_counters'"))
        if seeded:
            log.info("seed_counters", days=seeded)

    def _pull_step(self, name: str) -> Any:
        rc = self.config.replication
        empty = 0  # pages in a row that brought nothing

        async def step() -> bool:
            # The active source every tick, slower while its feed stays empty; the standby slowly, so a switch
            # never starts from a cold cursor.
            nonlocal empty
            if self.guarded[name].refusing():
                return False  # its breaker is open: the feed read would be refused at once
            active = self.controller.active if self.controller is not None else name
            now = time.monotonic()
            if name != active:
                every = rc.standby_pull_s
            else:
                every = min(rc.pull_idle_max_s, rc.pull_tick_s * 2 ** min(empty, 16)) if empty else 0.0
            if now - self._last_pull.get(name, 0.0) < every:
                return False
            self._last_pull[name] = now
            puller = self.pullers[name]
            more = await puller.run_once()
            empty = 0 if puller.last_page else empty + 1
            return more

        return step

    def _timeout_of(self, name: str) -> float:
        target = self.config.national if name == "national" else self.config.city
        return target.timeout_s if target is not None else 10.0

    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState, reason: str) -> None:
        log.warning("breaker_changed", target=name, old=old.value, new=new.value, reason=reason)
        loop = self.loops.get("failover")
        if loop is not None:
            loop.wake.set()

    async def _backlog(self, name: str) -> int:
        lag = await self.replicators[name].lag(self.service.journal_head)
        return int(lag["lag_records"])

    async def _evaluate(self) -> bool:
        if self.controller is not None:
            await self.controller.evaluate()
        return False

    async def _prune(self) -> bool:
        retention = timedelta(hours=self.config.replication.journal_retention_h)
        pruned = await journal.prune(self.store, list(self.replicators), retention=retention, clock=self.clock)
        if pruned:
            log.info("journal_pruned", entries=pruned)
        return False

    async def _close_upstreams(self) -> None:
        for upstream in self.upstreams:
            try:
                await upstream.close()
            except Exception as exc:
                log.warning("upstream_close_failed", target=upstream.name, error=str(exc))
        sessions, self._sessions = self._sessions, []
        for session in sessions:
            await session.close()

    def _session_for(self, target: Any) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls.client_context(target)))
        self._sessions.append(session)
        return session

    async def close(self) -> None:
        """Drain the writer, then close the store; idempotent; re-raises the first error."""
        if self._stopping and self._tasks is None:
            return
        self._stopping = True
        first: BaseException | None = None
        for loop in self.loops.values():
            loop.stop()
        if self.prober is not None:
            self.prober.stop()
        self.service.writer.close()
        if self._tasks is not None:
            tasks, self._tasks = self._tasks, None
            try:
                await tasks.__aexit__(None, None, None)
            except BaseException as exc:
                first = exc
        await self.fetcher.close()
        await self._close_upstreams()
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
        middlewares=[api.error_middleware, auth_middleware],
        handler_args={"max_field_size": 8190},
    )
    app[api.SERVICE] = node.service
    app[api.STORE] = node.store
    app[api.UNIT] = node.config.node.unit
    app[api.READY] = lambda: node.ready
    app[api.NODE] = node
    app[AUTH] = node.auth
    desk_routes.add_routes(app)  # before api's routes: /api/v1/dossiers/search must win over /{code}
    api.add_routes(app)
    add_document_routes(app)
    add_receipt_routes(app)
    receipts.add_routes(app)
    metrics.add_routes(app, node.metrics)
    dashboard.add_routes(app)
    return app


async def serve(
    config: Config,
    *,
    stop: asyncio.Event,
    announce: Any = print,
    clock: Clock | None = None,
    reload_config: Any = None,
) -> None:
    """Run a node until ``stop`` is set; then stop accepting, finish in-flight requests, close the store.

    The data directory is locked while it runs (``restore`` and ``bootstrap`` refuse a locked one); with
    ``reload_config`` (a function re-reading the configuration), SIGHUP reloads credentials, tokens and TLS.
    """
    from node.ops import lock

    with lock.hold(config.data_path, "serve"):
        await _serve(config, stop=stop, announce=announce, clock=clock, reload_config=reload_config)


async def _serve(
    config: Config, *, stop: asyncio.Event, announce: Any, clock: Clock | None, reload_config: Any
) -> None:
    from node.ops.reload import EarlySighup, on_sighup

    # From here on a SIGHUP is caught: its default action would end a node that is still starting.
    early = EarlySighup.install() if reload_config is not None else None
    async with Node(config, clock=clock) as node:
        runner = web.AppRunner(
            node.app, handle_signals=False, access_log=None, shutdown_timeout=config.node.shutdown_timeout_s
        )
        await runner.setup()
        try:
            ssl_context = tls.server_context(config)
            site = web.TCPSite(
                runner, config.listen_host, config.listen_port, reuse_address=True, ssl_context=ssl_context
            )
            await site.start()
            for addr in runner.addresses:
                host, port = addr[0], addr[1]
                shown = f"[{host}]" if ":" in host else host
                scheme = "https" if ssl_context is not None else "http"
                announce(f"wardsync node {config.node.unit} listening on {scheme}://{shown}:{port}")
            log.info("listening", addresses=[f"{a[0]}:{a[1]}" for a in runner.addresses])
            async with on_sighup(node, reload_config, server_ssl=ssl_context, early=early):
                await stop.wait()
            log.info("stopping")
            node._stopping = True
        finally:
            with contextlib.suppress(Exception):
                await runner.cleanup()
