"""The fleet: an inventory of nodes (TOML) and the fleet dashboard that watches them all.

Inventory format, one ``[[unit]]`` table per node::

    [[unit]]
    unit = "26743"                       # 5-digit unit code from the registry
    url = "http://127.0.0.1:8080"        # the node's base URL
    token = "..."                        # bearer token, or instead:
    # token_env = "WARDSYNC_TOKEN_26743" # name of an environment variable holding it

An optional ``[portal]`` table is for live drills (``simulations/live.py``) and is not read here.
"""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from node.auth import requires
from node.clock import TZ
from node.dashboard import render, static
from node.registry import get_unit
from sync.loop import Loop

_KEYS = frozenset({"unit", "url", "token", "token_env"})


class InventoryError(ValueError):
    """An inventory that cannot be used; ``problems`` lists every bad entry, each with its index."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid fleet inventory {path}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class FleetNode:
    """One unit's node as the fleet sees it."""

    unit: str
    name: str
    url: str
    token: str

    def __repr__(self) -> str:
        # Never print a bearer token into a log or a traceback.
        return f"FleetNode(unit={self.unit!r}, name={self.name!r}, url={self.url!r}, token='***')"


def _check_url(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return f"url: {url!r} is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"url: {url!r} must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment:
        return f"url: {url!r} must be a base URL without query or fragment"
    return None


def parse_inventory(data: Mapping[str, Any], *, path: str | Path = "<inventory>",
                    env: Mapping[str, str] | None = None) -> list[FleetNode]:
    """The nodes of an already parsed inventory; raises ``InventoryError`` listing every problem."""
    environ = os.environ if env is None else env
    problems: list[str] = []
    for key in data:
        # [portal] names the national portal for live drills (simulations/live.py); the dashboard ignores it.
        if key not in ("unit", "portal"):
            problems.append(f"{key}: unknown top-level key (write one [[unit]] table per node)")
    entries = data.get("unit", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InventoryError(path, [*problems, "unit: must be an array of tables ([[unit]])"])
    if not entries:
        problems.append("no [[unit]] entries")
    nodes: list[FleetNode] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"unit[{i}]"
        bad: list[str] = [f"{k}: unknown key (known: {', '.join(sorted(_KEYS))})" for k in entry if k not in _KEYS]
        code = entry.get("unit")
        unit = get_unit(code) if isinstance(code, str) else None
        if code is None:
            bad.append("unit: required")
        elif unit is None:
            bad.append(f"unit: {code!r} is not one of Ho Chi Minh City's 168 commune-level units")
        elif code in seen:
            bad.append(f"unit: {code} is already listed at unit[{seen[code]}]")
        else:
            seen[code] = i
        url = entry.get("url")
        if url is None:
            bad.append("url: required")
        elif not isinstance(url, str):
            bad.append("url: must be a string")
        elif (msg := _check_url(url)) is not None:
            bad.append(msg)
        token, token_env = entry.get("token"), entry.get("token_env")
        if token is not None and token_env is not None:
            bad.append("token, token_env: give one of them, not both")
        elif token is None and token_env is None:
            bad.append("token: required (or token_env naming an environment variable that holds it)")
        elif token is not None and (not isinstance(token, str) or not token.strip()):
            bad.append("token: must be a non-empty string")
        elif token_env is not None:
            if not isinstance(token_env, str) or not token_env:
                bad.append("token_env: must be the name of an environment variable")
            elif not environ.get(token_env, "").strip():
                bad.append(f"token_env: environment variable {token_env} is not set or empty")
            else:
                token = environ[token_env].strip()
        if bad:
            problems += [f"{where} ({code}): {b}" if isinstance(code, str) else f"{where}: {b}" for b in bad]
            continue
        assert unit is not None and isinstance(url, str) and isinstance(token, str)
        nodes.append(FleetNode(unit=unit.code, name=unit.name, url=url.rstrip("/"), token=token.strip()))
    if problems:
        raise InventoryError(path, problems)
    return nodes


def load_inventory(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[FleetNode]:
    """Read a fleet inventory file; raises ``InventoryError`` (a ``ValueError``) listing every problem."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InventoryError(p, ["file not found"]) from exc
    except OSError as exc:
        raise InventoryError(p, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise InventoryError(p, ["not UTF-8 text"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InventoryError(p, [f"not valid TOML: {exc}"]) from exc
    return parse_inventory(data, path=p, env=env)


# -- the fleet dashboard ----------------------------------------------------------------------------------

FLEET_STATES: tuple[str, ...] = ("healthy", "degraded", "failover", "offline", "unreachable", "unauthorized", "unknown")
STATE_LABELS = {
    "healthy": "Ổn định · Healthy",
    "degraded": "Cần chú ý · Degraded",
    "failover": "Đang dùng dự phòng · On backup",
    "offline": "Mất thượng nguồn · Offline",
    "unreachable": "Không liên lạc được · Unreachable",
    "unauthorized": "Sai mã truy cập · Unauthorized",
    "unknown": "Chưa rõ · Unknown",
}
VIEW_ROLES = ("operator", "drill", "read-only")


def classify(status: Mapping[str, Any]) -> tuple[str, str]:
    """(state, reason) of a node from its ``/api/v1/status`` answer."""
    targets: Mapping[str, Any] = status.get("targets") or {}
    if status.get("offline"):
        return "offline", "không thượng nguồn nào liên lạc được · no upstream reachable"
    active = status.get("active_source")
    troubles = [
        f"{name}: {t.get('state')} (breaker {t.get('breaker')})"
        for name, t in targets.items()
        if t.get("state") != "healthy"
    ]
    # The national portal is the primary by design; reading from the city system means a failover happened.
    if active == "city" and "national" in targets:
        forced = " (forced by a drill)" if status.get("forced") else ""
        return "failover", f"active source: city{forced}; " + ("; ".join(troubles) or "national recovering")
    stuck = sum(int(t.get("dead") or 0) + int(t.get("parked") or 0) for t in targets.values())
    if troubles or stuck:
        return "degraded", "; ".join(troubles + ([f"{stuck} dead letter(s)"] if stuck else []))
    return "healthy", ""


@dataclass
class UnitView:
    """What the fleet dashboard last learned about one node."""

    node: FleetNode
    state: str = "unknown"
    reason: str = "not polled yet"
    status: dict[str, Any] | None = None
    polled_at: str | None = None

    def detail(self) -> str:
        if self.status is None:
            return self.reason
        targets = self.status.get("targets") or {}
        lag = sum(int(t.get("lag_records") or 0) for t in targets.values())
        active = self.status.get("active_source") or "—"
        return f"nguồn {active} · chờ {lag}" if targets else "không có thượng nguồn · no targets"

    def describe(self) -> dict[str, Any]:
        targets = (self.status or {}).get("targets") or {}
        return {
            "unit": self.node.unit,
            "name": self.node.name,
            "url": self.node.url,
            "state": self.state,
            "state_label": STATE_LABELS[self.state],
            "reason": self.reason,
            "detail": self.detail(),
            "active_source": (self.status or {}).get("active_source"),
            "lag_records": {n: t.get("lag_records") for n, t in targets.items()},
            "polled_at": self.polled_at,
        }


class FleetMonitor:
    """Polls every node's ``/api/v1/status`` with its token, server side, a bounded number at a time."""

    def __init__(
        self, inventory: list[FleetNode], *, poll_s: float = 5.0, timeout_s: float = 3.0, concurrency: int = 32
    ) -> None:
        self.views = {n.unit: UnitView(n) for n in inventory}
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._gate = asyncio.Semaphore(concurrency)
        self.polled_at: str | None = None
        self.rounds = 0
        self.http: aiohttp.ClientSession | None = None

    async def poll_once(self) -> bool:
        """Poll every node once; a ``Loop`` step."""
        if self.http is None:
            raise RuntimeError("the monitor has no HTTP session (start the app first)")
        http = self.http
        await asyncio.gather(*(self._poll(http, v) for v in self.views.values()))
        self.polled_at = _now()
        self.rounds += 1
        return False

    async def _poll(self, http: aiohttp.ClientSession, view: UnitView) -> None:
        async with self._gate:
            try:
                async with http.get(
                    f"{view.node.url}/api/v1/status",
                    headers={"Authorization": f"Bearer {view.node.token}", "Accept": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as r:
                    if r.status in (401, 403):
                        view.state, view.status = "unauthorized", None
                        view.reason = f"HTTP {r.status}: {await _error_message(r)}"
                    elif r.status != 200:
                        view.state, view.status = "unreachable", None
                        view.reason = f"HTTP {r.status}: {await _error_message(r)}"
                    else:
                        body = await r.json()
                        if not isinstance(body, dict):
                            raise ValueError("the status is not a JSON object")
                        view.status = body
                        view.state, view.reason = classify(body)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                view.state, view.status = "unreachable", None
                view.reason = str(exc) or type(exc).__name__
        view.polled_at = _now()

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(FLEET_STATES, 0)
        for v in self.views.values():
            counts[v.state] += 1
        return counts

    def describe(self) -> dict[str, Any]:
        return {
            "polled_at": self.polled_at,
            "counts": self.counts(),
            "units": [v.describe() for v in self.views.values()],
        }


async def _error_message(r: aiohttp.ClientResponse) -> str:
    try:
        body = await r.json(content_type=None)
        return str(body["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return r.reason or ""


def _now() -> str:
    return datetime.now(TZ).isoformat(timespec="seconds")


MONITOR: web.AppKey[FleetMonitor] = web.AppKey("fleet_monitor", FleetMonitor)


@requires(*VIEW_ROLES)
async def fleet_page(request: web.Request) -> web.Response:
    """All units at a glance, coloured by state; filter by name or state."""
    monitor = request.app[MONITOR]
    q = request.query.get("q", "")
    state = request.query.get("state", "")
    return render(
        "fleet.html",
        static_prefix="dashboard/static/",
        units=[v.describe() for v in monitor.views.values()],
        counts=monitor.counts(),
        states=FLEET_STATES,
        labels=STATE_LABELS,
        q=q,
        state=state if state in FLEET_STATES else "",
        polled_at=monitor.polled_at,
        poll_ms=int(min(monitor.poll_s, 5.0) * 1000),
    )


@requires(*VIEW_ROLES)
async def fleet_json(request: web.Request) -> web.Response:
    """The fleet's state as JSON (what the grid polls)."""
    return web.json_response(request.app[MONITOR].describe(), dumps=lambda o: json.dumps(o, ensure_ascii=False))


@requires(*VIEW_ROLES)
async def unit_page(request: web.Request) -> web.Response:
    """One unit: its state, targets and recent failover events as last polled, and a link to its dashboard."""
    view = request.app[MONITOR].views.get(request.match_info["unit"])
    if view is None:
        return render("fleet_unit.html", http_status=404, static_prefix="../dashboard/static/", view=None, unit=None)
    status = view.status or {}
    return render(
        "fleet_unit.html",
        static_prefix="../dashboard/static/",
        view=view,
        unit=view.describe(),
        targets=status.get("targets") or {},
        events=list(reversed(status.get("events") or []))[:20],
    )


def build_fleet_app(
    inventory: list[FleetNode], *, poll_s: float = 5.0, timeout_s: float = 3.0
) -> web.Application:
    """The fleet dashboard as an aiohttp app; it polls the nodes while it runs (start it with an AppRunner)."""
    app = web.Application()
    app[MONITOR] = FleetMonitor(inventory, poll_s=poll_s, timeout_s=timeout_s)
    app.cleanup_ctx.append(_polling)
    app.router.add_get("/", fleet_page)
    app.router.add_get("/api/fleet", fleet_json)
    app.router.add_get("/units/{unit}", unit_page)
    app.router.add_get("/dashboard/static/{name}", static)
    return app


async def _polling(app: web.Application) -> AsyncIterator[None]:
    monitor = app[MONITOR]
    async with aiohttp.ClientSession() as http:
        monitor.http = http
        loop = Loop("fleet-poll", monitor.poll_once, tick_s=monitor.poll_s)
        # aiohttp's own pattern for an app's background work: started on startup, awaited on cleanup.
        task = asyncio.get_running_loop().create_task(loop.run(), name="fleet-poll")
        try:
            yield
        finally:
            loop.stop()
            await task
            monitor.http = None


async def serve_fleet(
    inventory: list[FleetNode], host: str, port: int, stop: asyncio.Event, *, announce: Any = print,
    poll_s: float = 5.0,
) -> None:
    """Serve the fleet dashboard until ``stop`` is set."""
    runner = web.AppRunner(build_fleet_app(inventory, poll_s=poll_s), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        for addr in runner.addresses:
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            units = f"{len(inventory)} unit{'' if len(inventory) == 1 else 's'}"
            announce(f"fleet dashboard ({units}) listening on http://{shown}:{addr[1]}/")
        await stop.wait()
    finally:
        await runner.cleanup()
