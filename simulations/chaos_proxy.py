"""A TCP proxy in front of a stand-in that injects faults at the socket level.

:mod:`simulations.faults` fails calls with HTTP answers; a real network fails connections instead: a port
that refuses, a reset in the middle of a keep-alive session, bytes that vanish. This proxy sits between a
client and a stand-in and does that to the bytes, so pooled connections meet failures the way a real
network delivers them. One mode is in force at a time, set with :meth:`ChaosProxy.set_mode` or over HTTP
(``POST /mode`` on the control port, see :func:`build_control_app`):

- ``{"mode": "pass"}`` (default): bytes flow both ways; ``ms``, ``jitter_ms`` and ``bytes_per_s`` may
  shape them, as in the next two modes.
- ``{"mode": "latency", "ms": 100, "jitter_ms": 0}``: each chunk waits ``ms`` (± ``jitter_ms``) before it
  is forwarded, in both directions; chunks keep their order.
- ``{"mode": "bandwidth", "bytes_per_s": N}``: each direction of each connection is paced to that rate.
- ``{"mode": "refuse"}``: the port is closed, so connecting fails with ECONNREFUSED; live connections are
  reset. The same port is opened again when the mode ends.
- ``{"mode": "reset"}``: any connection, live or new, is reset (RST) as soon as a byte flows.
- ``{"mode": "blackhole"}``: connections are accepted, bytes are read and dropped, nothing comes back.
- ``{"mode": "half_close"}``: the request is forwarded, then the client gets EOF instead of the response.
- ``{"mode": "cut", "after_bytes": N}``: each connection is reset once N bytes have gone to the client, so a
  long download breaks part-way, again on every new connection.
- ``{"mode": "flap", "period_s": 1, "down_mode": "refuse"}``: down (``refuse`` or ``blackhole``) for a
  period, up for a period, and so on, starting down.

Any mode takes ``seconds``, after which it lapses back to ``pass``. ``GET /mode`` shows the mode and the
counters, ``DELETE /mode`` goes back to ``pass``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from simulations.serving import running

MODES = ("pass", "latency", "bandwidth", "refuse", "reset", "blackhole", "half_close", "flap", "cut")
DOWN_MODES = ("refuse", "blackhole")
_SHAPED = ("pass", "latency", "bandwidth")
_SHAPING = frozenset({"ms", "jitter_ms", "bytes_per_s"})
_PARAMS: dict[str, frozenset[str]] = {
    **dict.fromkeys(_SHAPED, _SHAPING),
    **dict.fromkeys(("refuse", "reset", "blackhole", "half_close"), frozenset()),
    "flap": frozenset({"period_s", "down_mode"}),
    "cut": frozenset({"after_bytes"}),
}
DEFAULT_LATENCY_MS = 100.0  # the same default as the stand-ins' HTTP latency fault
DEFAULT_PERIOD_S = 1.0

CHUNK_BYTES = 64 * 1024
# A capped direction writes slices worth this long at its rate, so a transfer streams instead of bursting.
_PACE_SLICE_S = 0.02
# How soon to try again when the port could not be opened again after a refusal (someone else took it).
_REOPEN_RETRY_S = 0.1
# Waking a hair after a flap edge, not on it, keeps float rounding from reading the old half.
_EDGE_SLACK_S = 0.001
# SO_LINGER on with a zero timeout: close() sends RST and discards unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)


class ModeError(ValueError):
    """A mode spec that cannot be used; the message says why."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Mode:
    """A mode as set: its name and parameters, when it began and when it lapses (clock seconds)."""

    name: str = "pass"
    params: Mapping[str, Any] = field(default_factory=dict)
    started: float = 0.0
    until: float | None = None

    def number(self, key: str, default: float) -> float:
        return float(self.params.get(key, default))

    def lapsed(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def phase(self, now: float) -> str:
        """The behaviour in force at ``now``: ``pass`` once lapsed, a flap's current half."""
        if self.lapsed(now):
            return "pass"
        if self.name == "flap":
            period = self.number("period_s", DEFAULT_PERIOD_S)
            if int((now - self.started) / period) % 2 == 0:
                return str(self.params.get("down_mode", "refuse"))
            return "pass"
        return self.name

    def next_change(self, now: float) -> float | None:
        """When :meth:`phase` next changes by itself (a lapse or a flap edge), if ever."""
        edges: list[float] = []
        if self.until is not None and now < self.until:
            edges.append(self.until)
        if self.name == "flap":
            period = self.number("period_s", DEFAULT_PERIOD_S)
            edges.append(self.started + (int((now - self.started) / period) + 1) * period)
        return min(edges, default=None)

    def shaping(self, now: float) -> Mapping[str, Any]:
        """The latency and bandwidth parameters in force at ``now``."""
        return self.params if self.name in _SHAPED and not self.lapsed(now) else {}

    def describe(self, now: float) -> dict[str, Any]:
        if self.lapsed(now):
            return {"mode": "pass", "params": {}, "phase": "pass", "remaining_s": None}
        return {
            "mode": self.name,
            "params": dict(self.params),
            "phase": self.phase(now),
            "remaining_s": None if self.until is None else round(self.until - now, 3),
        }


def parse_mode(spec: Any, now: float) -> Mode:
    """A :class:`Mode` from a spec such as ``{"mode": "latency", "ms": 200, "seconds": 5}``."""
    if not isinstance(spec, Mapping):
        raise ModeError("a mode must be a JSON object with a 'mode'")
    name = spec.get("mode")
    if name not in MODES:
        raise ModeError(f"mode must be one of {', '.join(MODES)}")
    params = {k: v for k, v in spec.items() if k not in {"mode", "seconds"}}
    unknown = sorted(set(params) - _PARAMS[name])
    if unknown:
        raise ModeError(f"{name} takes no {', '.join(unknown)}")
    for key, value in params.items():
        if key == "down_mode":
            if value not in DOWN_MODES:
                raise ModeError(f"down_mode must be one of {', '.join(DOWN_MODES)}")
        elif not _is_number(value) or value < 0:
            raise ModeError(f"{key} must be a non-negative number")
    for key in ("bytes_per_s", "period_s"):
        if key in params and params[key] == 0:
            raise ModeError(f"{key} must be positive")
    if name == "bandwidth" and "bytes_per_s" not in params:
        raise ModeError("bandwidth needs bytes_per_s")
    if name == "cut" and not params.get("after_bytes"):
        raise ModeError("cut needs after_bytes, a positive number")
    if name == "latency":
        params.setdefault("ms", DEFAULT_LATENCY_MS)
    seconds = spec.get("seconds")
    if seconds is not None and (not _is_number(seconds) or seconds <= 0):
        raise ModeError("seconds must be a positive number")
    return Mode(name, params, now, None if seconds is None else now + float(seconds))


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host is 127.0.0.1) as ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Counters:
    """What the proxy has counted since it started.

    ``refused`` counts connections cut because a refusal began while they were open, or accepted in the
    instant before the port closed; attempts made while the port is closed are refused by the kernel and
    are not seen. ``bytes_up`` and ``bytes_down`` are forwarded bytes (client to upstream and back);
    ``bytes_dropped`` were read and thrown away.
    """

    accepted: int = 0
    refused: int = 0
    reset: int = 0
    upstream_failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_dropped: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with RST rather than FIN, as a reset on the path would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Already closed sockets raise EBADF here; they need no reset.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Link:
    """One client connection and the proxy's connection to the upstream for it."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.cut = False
        # Set once the proxy has sent EOF to the client: nothing more may go that way.
        self.client_eof = False
        self.bytes_down = 0

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def reset(self) -> None:
        self.cut = True
        for writer in self.writers():
            _rst(writer)

    def abort(self) -> None:
        for writer in self.writers():
            writer.transport.abort()

    def finish(self) -> None:
        if self.cut:
            # Resets again, for an upstream connection that opened after the cut.
            self.reset()
            return
        # A graceful close flushes what drain() left buffered, so the tail of a response is not lost.
        for writer in self.writers():
            writer.close()


class ChaosProxy:
    """A fault-injecting TCP proxy in front of ``upstream_host:upstream_port``; ``listen_port`` 0 picks one."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listen_host = listen_host
        self._port = listen_port
        self._clock = clock
        self._rng = rng or random.Random()
        self._mode = Mode(started=clock())
        self.counters = Counters()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._changed = asyncio.Event()
        # Mode changes and the watcher both open and close the listener; one at a time.
        self._listener_lock = asyncio.Lock()
        self._started = False
        self._closed = False

    @property
    def host(self) -> str:
        return self._listen_host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{_join(self._listen_host, self._port)}"

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen, then apply the mode (a mode set before start may close the port again at once)."""
        if self._started:
            raise RuntimeError("the proxy has already been started")
        self._started = True
        # Bound once whatever the mode, so that port 0 becomes a port that refusals close and reopen.
        self._server = await self._listen()
        await self._sync_listener()
        self._spawn(self._watch())

    async def close(self) -> None:
        """Stop listening, cut every live connection, wait for every task; re-raise the first failure."""
        if self._closed:
            return
        self._closed = True
        # Taking the lock waits out a reopening in flight, whose server would otherwise be left listening.
        async with self._listener_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # No server.wait_closed(): from Python 3.12 it waits on every connection the server ever accepted,
        # a gracefully closing one held by a silent client included; the port is already closed above.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._errors:
            raise self._errors[0]

    async def set_mode(self, mode: str, /, **params: Any) -> Mode:
        """Put ``mode`` in force with its ``params`` (and ``seconds``); in force when this returns."""
        return await self.apply({"mode": mode, **params})

    async def apply(self, spec: Any) -> Mode:
        """Put a mode spec such as ``{"mode": "latency", "ms": 200}`` in force; see :func:`parse_mode`."""
        if self._closed:
            raise RuntimeError("the proxy is closed")
        mode = parse_mode(spec, self._clock())
        self._mode = mode
        # The watcher recomputes when the new mode next changes by itself.
        self._changed.set()
        await self._sync_listener()
        return mode

    async def clear(self) -> None:
        """Back to ``pass``, with the port open again when this returns."""
        await self.apply({"mode": "pass"})

    def mode(self) -> Mode:
        return self._mode

    def stats(self) -> dict[str, int]:
        return {**asdict(self.counters), "live": len(self._links)}

    def status(self) -> dict[str, Any]:
        """The mode in force and the counters, as ``GET /mode`` shows them."""
        return {**self._mode.describe(self._clock()), "stats": self.stats()}

    def _phase(self) -> str:
        return self._mode.phase(self._clock())

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._accept, self._listen_host, self._port, reuse_address=True)
        self._port = int(server.sockets[0].getsockname()[1])
        return server

    async def _sync_listener(self) -> None:
        """Close the port while the phase is ``refuse``, open it otherwise."""
        async with self._listener_lock:
            if not self._started or self._closed:
                return
            refusing = self._phase() == "refuse"
            if refusing and self._server is not None:
                # Closing the listening socket is what makes the kernel answer RST to a SYN: a real refusal.
                self._server.close()
                self._server = None
                for link in list(self._links):
                    self._cut(link, "refused")
            elif not refusing and self._server is None:
                self._server = await self._listen()

    async def _watch(self) -> None:
        """Carry out the changes a mode makes by itself (a lapse, a flap edge) when they fall due."""
        while True:
            wait: float | None = None
            try:
                await self._sync_listener()
            except OSError:
                # The port was taken while it was closed: keep trying rather than give up the proxy.
                wait = _REOPEN_RETRY_S
            self._changed.clear()
            now = self._clock()
            due = self._mode.next_change(now)
            if due is not None:
                until_due = max(0.0, due - now) + _EDGE_SLACK_S
                wait = until_due if wait is None else min(wait, until_due)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Connections arrive through start_server's callback and live as long as their clients keep them,
        # so they cannot sit in one TaskGroup scope; they are tracked here, and close() cancels and awaits
        # them and re-raises the first failure.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._errors.append(exc)

    def _cut(self, link: _Link, why: str) -> None:
        if link.cut:
            return
        link.reset()
        if why == "refused":
            self.counters.refused += 1
        else:
            self.counters.reset += 1

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            # Accepted in the instant before close() closed the port.
            writer.transport.abort()
            return
        self._spawn(self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self._phase() == "refuse":
                # Accepted just before the port closed: turned away as the closed port would have.
                self._cut(link, "refused")
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            except OSError:
                # The client's connection is already accepted and cannot be refused; a reset is the nearest.
                self.counters.upstream_failed += 1
                link.reset()
                return
            if link.cut:
                return
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(link, reader, link.upstream, up=True))
                tg.create_task(self._pump(link, up_reader, writer, up=False))
        except asyncio.CancelledError:
            link.abort()
            raise
        finally:
            self._links.discard(link)
            link.finish()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """Forward one direction of ``link`` chunk by chunk, doing to each what the phase says."""
        next_free = 0.0
        while True:
            try:
                data = await reader.read(CHUNK_BYTES)
            except OSError:
                # A reset from one end goes on as a reset to the other, as it would along a real path.
                link.reset()
                return
            now = self._clock()
            phase = self._mode.phase(now)
            if not data:
                # EOF goes on like data, except where nothing may be sent any more.
                if not (link.cut or phase == "blackhole" or (not up and link.client_eof)):
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            if phase in ("refuse", "reset"):
                self._cut(link, "refused" if phase == "refuse" else "reset")
                return
            if phase == "blackhole" or link.cut or (not up and link.client_eof):
                self.counters.bytes_dropped += len(data)
                continue
            cut_here = False
            if phase == "cut" and not up:
                room = max(0, int(self._mode.number("after_bytes", 0)) - link.bytes_down)
                cut_here = len(data) >= room
                data = data[:room]
            try:
                next_free = await self._forward(writer, data, self._mode.shaping(now), next_free)
            except OSError:
                link.reset()
                return
            if up:
                self.counters.bytes_up += len(data)
            else:
                self.counters.bytes_down += len(data)
                link.bytes_down += len(data)
            if cut_here:
                self._cut(link, "reset")
                return
            if phase == "half_close" and up:
                link.client_eof = True
                with contextlib.suppress(OSError):
                    link.client.write_eof()

    async def _forward(
        self, writer: asyncio.StreamWriter, data: bytes, shaping: Mapping[str, Any], next_free: float
    ) -> float:
        """Write ``data`` after its latency, paced to the bandwidth cap; return when the cap next allows more."""
        ms = float(shaping.get("ms", 0.0))
        jitter = float(shaping.get("jitter_ms", 0.0))
        if ms or jitter:
            await asyncio.sleep(max(0.0, ms + self._rng.uniform(-jitter, jitter)) / 1000)
        rate = float(shaping.get("bytes_per_s", 0.0))
        if not rate:
            writer.write(data)
            await writer.drain()
            return next_free
        step = max(1, int(rate * _PACE_SLICE_S))
        for start in range(0, len(data), step):
            piece = data[start : start + step]
            now = self._clock()
            # An idle direction earns no credit: a burst after a pause is paced like any other.
            send_at = max(now, next_free)
            if send_at > now:
                await asyncio.sleep(send_at - now)
            writer.write(piece)
            await writer.drain()
            next_free = send_at + len(piece) / rate
        return next_free


PROXY_KEY = web.AppKey("chaos_proxy", ChaosProxy)


async def _get_mode(request: web.Request) -> web.Response:
    return web.json_response(request.app[PROXY_KEY].status())


async def _post_mode(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    try:
        spec = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    try:
        await proxy.apply(spec)
    except ModeError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(proxy.status())


async def _delete_mode(request: web.Request) -> web.Response:
    proxy = request.app[PROXY_KEY]
    await proxy.clear()
    return web.json_response(proxy.status())


def build_control_app(proxy: ChaosProxy) -> web.Application:
    """The control API: ``GET``, ``POST`` (a mode spec) and ``DELETE`` on ``/mode``."""
    app = web.Application()
    app[PROXY_KEY] = proxy
    app.router.add_get("/mode", _get_mode)
    app.router.add_post("/mode", _post_mode)
    app.router.add_delete("/mode", _delete_mode)
    return app


async def serve(
    listen: str,
    upstream: str,
    control: str,
    stop: asyncio.Event,
    announce: Callable[[str], object] = print,
) -> None:
    """Run a proxy and its control API until ``stop`` is set; addresses are ``HOST:PORT``, port 0 picks one."""
    listen_host, listen_port = split_address(listen)
    upstream_host, upstream_port = split_address(upstream)
    control_host, control_port = split_address(control)
    async with (
        ChaosProxy(upstream_host, upstream_port, listen_host=listen_host, listen_port=listen_port) as proxy,
        running(build_control_app(proxy), control_host, control_port) as control_url,
    ):
        announce(
            f"chaos proxy listening on {proxy.url} -> {_join(upstream_host, upstream_port)} (control {control_url})"
        )
        await stop.wait()
