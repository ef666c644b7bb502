"""Fault injection shared by both upstream stand-ins: ``POST /__faults`` and ``DELETE /__faults``.

A fault is a JSON object with a ``mode`` and its parameters, optionally limited to ``seconds``:

- ``{"mode": "down"}``: every call answers 503.
- ``{"mode": "error_rate", "rate": 0.3}``: that share of calls answers 500.
- ``{"mode": "latency", "ms": 200}``: every call waits that long first.
- ``{"mode": "blackhole"}``: calls are never answered (the client's timeout is what ends them).
- ``{"mode": "throttle", "retry_after_s": 1, "rate": 1.0}``: that share of calls answers 429 with
  ``Retry-After``.
- ``{"mode": "session_expiry", "after_s": 0}``: sessions and tokens older than ``after_s`` are refused
  as expired (the stand-in asks :meth:`Faults.session_expired`).
- ``{"mode": "partial", "rate": 0.3}``: that share of the records in a batch fails with a retriable
  per-record error (the stand-in asks :meth:`Faults.partial_failures`).
- ``{"mode": "flapping", "period_s": 2}``: down for a period, up for a period, and so on.
- ``{"mode": "clock_skew", "offset_s": -90}``: answers carry a ``Date`` header that far off the true time
  (negative: behind), as from a server whose clock is wrong.

Several faults can be active at once; each POST adds one (or a list under ``"faults"``). Paths that
start with ``/__`` (fault and inspection APIs) are never affected.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiohttp import web

MODES = (
    "down", "error_rate", "latency", "blackhole", "throttle", "session_expiry", "partial", "flapping", "clock_skew",
)
_BLACKHOLE_S = 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    mode: str
    params: dict[str, Any]
    started: float
    until: float | None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def number(self, name: str, default: float) -> float:
        return float(self.params.get(name, default))


def parse_fault(spec: Any, now: float) -> Fault:
    if not isinstance(spec, dict):
        raise FaultSpecError("a fault must be a JSON object with a 'mode'")
    mode = spec.get("mode")
    if mode not in MODES:
        raise FaultSpecError(f"mode must be one of {', '.join(MODES)}")
    params = {k: v for k, v in spec.items() if k not in {"mode", "seconds"}}
    for key, value in params.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise FaultSpecError(f"{key} must be a number")
        if value < 0 and key != "offset_s":  # a clock may be behind as well as ahead
            raise FaultSpecError(f"{key} must be a non-negative number")
    for key in ("rate",):
        if key in params and params[key] > 1:
            raise FaultSpecError("rate must be between 0 and 1")
    seconds = spec.get("seconds")
    if seconds is not None and (not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0):
        raise FaultSpecError("seconds must be a positive number")
    return Fault(mode, params, now, None if seconds is None else now + float(seconds))


@dataclass
class Faults:
    """The active faults of one stand-in."""

    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    faults: list[Fault] = field(default_factory=list)

    def add(self, spec: Any) -> Fault:
        fault = parse_fault(spec, self.clock())
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    def _active(self) -> list[Fault]:
        now = self.clock()
        self.faults = [f for f in self.faults if f.active(now)]
        return self.faults

    def _get(self, mode: str) -> Fault | None:
        return next((f for f in self._active() if f.mode == mode), None)

    def is_down(self) -> bool:
        if self._get("down") is not None:
            return True
        flap = self._get("flapping")
        if flap is not None:
            period = max(flap.number("period_s", 2.0), 0.001)
            return int((self.clock() - flap.started) / period) % 2 == 0
        return False

    def session_expired(self, issued_at: float) -> bool:
        """Whether a session or token issued at ``issued_at`` (this object's clock) counts as expired."""
        fault = self._get("session_expiry")
        return fault is not None and self.clock() - issued_at >= fault.number("after_s", 0.0)

    def partial_failures(self, n: int) -> set[int]:
        """Indexes of the records in a batch of ``n`` that must fail with a retriable error."""
        fault = self._get("partial")
        if fault is None:
            return set()
        rate = fault.number("rate", 0.3)
        return {i for i in range(n) if self.rng.random() < rate}

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [
            {"mode": f.mode, **f.params, "remaining_s": None if f.until is None else round(f.until - now, 3)}
            for f in self._active()
        ]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/__"):
            return await handler(request)
        latency = self._get("latency")
        if latency is not None:
            await asyncio.sleep(latency.number("ms", 100.0) / 1000)
        if self._get("blackhole") is not None:
            await asyncio.sleep(_BLACKHOLE_S)
        if self.is_down():
            return web.json_response({"error_code": "503", "message": "service unavailable"}, status=503)
        throttle = self._get("throttle")
        if throttle is not None and self.rng.random() < throttle.number("rate", 1.0):
            retry_after = throttle.number("retry_after_s", 1.0)
            return web.json_response(
                {"error_code": "429", "message": "too many requests"},
                status=429,
                headers={"Retry-After": f"{retry_after:g}"},
            )
        errors = self._get("error_rate")
        if errors is not None and self.rng.random() < errors.number("rate", 0.5):
            return web.json_response({"error_code": "500", "message": "internal error"}, status=500)
        response = await handler(request)
        skew = self._get("clock_skew")
        if skew is not None:
            # aiohttp only fills in Date when the handler left it out.
            response.headers["Date"] = formatdate(time.time() + skew.number("offset_s", 0.0), usegmt=True)
        return response

    async def _post(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        specs = body.get("faults") if isinstance(body, dict) and "faults" in body else [body]
        if not isinstance(specs, list):
            return web.json_response({"error": "faults must be a list"}, status=400)
        try:
            parsed = [parse_fault(s, self.clock()) for s in specs]
        except FaultSpecError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.faults.extend(parsed)
        return web.json_response({"faults": self.describe()})

    async def _delete(self, request: web.Request) -> web.Response:
        self.clear()
        return web.json_response({"faults": []})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response({"faults": self.describe()})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/__faults", self._post)
        app.router.add_delete("/__faults", self._delete)
        app.router.add_get("/__faults", self._get_faults)


@dataclass
class Stats:
    """What a stand-in counts: records received, resends, duplicates, rejected, requests by outcome."""

    received: int = 0
    resends: int = 0
    duplicates: int = 0
    rejected: int = 0
    steps_received: int = 0
    requests: dict[str, int] = field(default_factory=dict)

    def request(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "resends": self.resends,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "steps_received": self.steps_received,
            "requests": dict(self.requests),
        }
