"""The chaos proxy on loopback: a real aiohttp upstream, real sockets, keep-alive clients meeting each fault."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from simulations.chaos_proxy import ChaosProxy, ModeError, build_control_app, parse_mode, serve
from simulations.serving import running

pytestmark = pytest.mark.timeout(10)

PAYLOAD = bytes(range(256)) * 800  # 204,800 bytes
# What a request that dies on a connection-level fault may raise (ClientConnectorError is a ClientOSError).
CONNECTION_ERRORS = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


@dataclass
class Upstream:
    """A tiny aiohttp app standing in for a stand-in; ``hits`` counts the requests that reached it."""

    port: int = 0
    hits: int = 0


def upstream_app(state: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        state.hits += 1
        return web.Response(body=b"echo:" + await request.read())

    async def big(request: web.Request) -> web.Response:
        state.hits += 1
        return web.Response(body=PAYLOAD)

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/big", big)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    async with running(upstream_app(state)) as url:
        state.port = int(url.rsplit(":", 1)[1])
        yield state


@pytest.fixture
async def proxy(upstream: Upstream) -> AsyncIterator[ChaosProxy]:
    async with ChaosProxy("127.0.0.1", upstream.port) as p:
        yield p


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # aiohttp keeps connections alive by default: the pooled one is what each fault test aims at.
    async with aiohttp.ClientSession() as session:
        yield session


async def echo(http: aiohttp.ClientSession, proxy: ChaosProxy, body: bytes = b"hello", timeout_s: float = 2.0) -> bytes:
    # POST, because aiohttp retries an idempotent request once on a new connection when a pooled one fails,
    # which would hide what happened to the pooled connection.
    async with http.post(f"{proxy.url}/echo", data=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        assert r.status == 200
        return await r.read()


async def port_state(proxy: ChaosProxy) -> str:
    """``up`` if a TCP connection to the proxy opens, ``down`` if it is refused."""
    try:
        _, writer = await asyncio.open_connection(proxy.host, proxy.port)
    except (ConnectionRefusedError, ConnectionResetError):
        # A reset is a connection caught in the accept queue at the instant the port closed.
        return "down"
    writer.close()
    await writer.wait_closed()
    return "up"


async def eventually(check: Callable[[], bool], within_s: float = 2.0) -> None:
    """Wait until ``check()`` is true, for at most ``within_s``."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"not true within {within_s}s"
        await asyncio.sleep(0.01)


class TestPass:
    async def test_keep_alive_requests_share_one_connection(
        self, proxy: ChaosProxy, upstream: Upstream, http: aiohttp.ClientSession
    ) -> None:
        """Requests and answers go through intact, and a keep-alive client holds one connection."""
        for i in range(3):
            assert await echo(http, proxy, f"body {i}".encode()) == f"echo:body {i}".encode()
        stats = proxy.stats()
        assert stats["accepted"] == 1
        assert stats["live"] == 1
        assert stats["bytes_up"] > 0
        assert stats["bytes_down"] > 0
        assert upstream.hits == 3

    async def test_upstream_down_resets_the_client(self, http: aiohttp.ClientSession) -> None:
        """With nothing listening upstream, the accepted client connection is reset and counted."""
        state = Upstream()
        async with running(upstream_app(state)) as url:
            dead_port = int(url.rsplit(":", 1)[1])
        async with ChaosProxy("127.0.0.1", dead_port) as proxy:
            with pytest.raises(CONNECTION_ERRORS):
                await echo(http, proxy)
            assert proxy.stats()["upstream_failed"] == 1


class TestRefuse:
    async def test_refuses_fast_then_recovers_on_the_same_port(
        self, proxy: ChaosProxy, http: aiohttp.ClientSession
    ) -> None:
        """A refused port fails a request in well under a second, and clearing opens the same port again."""
        await echo(http, proxy)
        port = proxy.port
        await proxy.set_mode("refuse")
        started = time.monotonic()
        with pytest.raises(CONNECTION_ERRORS):
            await echo(http, proxy)
        assert time.monotonic() - started < 1.0
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(proxy.host, proxy.port)
        assert proxy.stats()["refused"] == 1  # the pooled connection, cut when refusal began

        await proxy.clear()
        assert proxy.port == port
        assert await echo(http, proxy) == b"echo:hello"


class TestReset:
    async def test_pooled_connection_is_reset_when_data_flows(
        self, proxy: ChaosProxy, upstream: Upstream, http: aiohttp.ClientSession
    ) -> None:
        """The next request on a pooled connection is met with a reset and never reaches the upstream."""
        await echo(http, proxy)
        await proxy.set_mode("reset")
        with pytest.raises(CONNECTION_ERRORS):
            await echo(http, proxy)
        stats = proxy.stats()
        assert stats["accepted"] == 1  # the pooled connection met the reset, not a new one
        assert stats["reset"] == 1
        assert upstream.hits == 1

        await proxy.clear()
        assert await echo(http, proxy) == b"echo:hello"

    async def test_new_connection_gets_a_real_rst(self, proxy: ChaosProxy) -> None:
        """A new connection is accepted, and its first bytes are answered with RST, not a clean close."""
        await proxy.set_mode("reset")
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionResetError):
                await reader.read(1024)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()
        assert proxy.stats()["reset"] == 1


class TestBlackhole:
    async def test_pooled_and_new_connections_hang(
        self, proxy: ChaosProxy, upstream: Upstream, http: aiohttp.ClientSession
    ) -> None:
        """Both a connection opened before and a new one go silent until the client's timeout ends the call."""
        await echo(http, proxy)
        await proxy.set_mode("blackhole")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await echo(http, proxy, timeout_s=0.5)
        assert 0.45 <= time.monotonic() - started < 1.5
        assert proxy.stats()["accepted"] == 1

        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(TimeoutError):
                await echo(fresh, proxy, timeout_s=0.5)
        stats = proxy.stats()
        assert stats["accepted"] == 2
        assert stats["bytes_dropped"] > 0
        assert upstream.hits == 1


class TestShaping:
    async def test_latency_delays_each_direction(self, proxy: ChaosProxy, http: aiohttp.ClientSession) -> None:
        """A request and its answer each wait at least the added latency."""
        await echo(http, proxy)
        await proxy.set_mode("latency", ms=150)
        started = time.monotonic()
        assert await echo(http, proxy) == b"echo:hello"
        assert time.monotonic() - started >= 2 * 0.150

    async def test_bandwidth_cap_paces_a_large_answer(self, proxy: ChaosProxy, http: aiohttp.ClientSession) -> None:
        """A 200 KB answer through a 400 KB/s cap takes about half a second and arrives intact."""
        rate = 400_000
        await proxy.set_mode("bandwidth", bytes_per_s=rate)
        started = time.monotonic()
        async with http.get(f"{proxy.url}/big") as r:
            body = await r.read()
        elapsed = time.monotonic() - started
        assert body == PAYLOAD
        expected = len(PAYLOAD) / rate
        assert 0.7 * expected <= elapsed <= 2.5 * expected


class TestHalfClose:
    async def test_request_is_forwarded_then_the_client_gets_eof(
        self, proxy: ChaosProxy, upstream: Upstream, http: aiohttp.ClientSession
    ) -> None:
        """The upstream gets the request, the client gets EOF instead of the answer."""
        await echo(http, proxy)
        await proxy.set_mode("half_close")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await echo(http, proxy)
        await eventually(lambda: upstream.hits == 2)
        assert proxy.stats()["accepted"] == 1


class TestFlap:
    async def test_refuse_and_pass_alternate(self, proxy: ChaosProxy) -> None:
        """With period_s the port is refused, then open, then refused again, starting refused."""
        await proxy.set_mode("flap", period_s=0.25)
        seen: list[str] = []
        deadline = time.monotonic() + 1.15
        while time.monotonic() < deadline:
            state = await port_state(proxy)
            if not seen or seen[-1] != state:
                seen.append(state)
            await asyncio.sleep(0.02)
        assert seen[:4] == ["down", "up", "down", "up"]

    async def test_blackhole_down_mode(self, proxy: ChaosProxy, http: aiohttp.ClientSession) -> None:
        """With down_mode blackhole, calls hang in the down half and go through in the up half."""
        await proxy.set_mode("flap", period_s=0.5, down_mode="blackhole")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await echo(http, proxy, timeout_s=0.25)
        await asyncio.sleep(0.6 - (time.monotonic() - started))
        assert proxy.status()["phase"] == "pass"
        assert await echo(http, proxy, timeout_s=0.3) == b"echo:hello"


class TestSeconds:
    async def test_mode_lapses_back_to_pass(self, proxy: ChaosProxy, http: aiohttp.ClientSession) -> None:
        """A refusal limited to 0.3 s opens the port again by itself."""
        await proxy.set_mode("refuse", seconds=0.3)
        started = time.monotonic()
        assert await port_state(proxy) == "down"
        while await port_state(proxy) == "down":
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(0.02)
        assert time.monotonic() - started >= 0.28
        assert proxy.status()["mode"] == "pass"
        assert await echo(http, proxy) == b"echo:hello"


class TestSpecs:
    @pytest.mark.parametrize(
        "spec",
        [
            {"mode": "nope"},
            {"mode": "latency", "bytes": 1},
            {"mode": "latency", "ms": -1},
            {"mode": "latency", "ms": True},
            {"mode": "bandwidth"},
            {"mode": "bandwidth", "bytes_per_s": 0},
            {"mode": "refuse", "ms": 10},
            {"mode": "flap", "down_mode": "reset"},
            {"mode": "flap", "period_s": 0},
            {"mode": "reset", "seconds": 0},
            ["refuse"],
        ],
    )
    def test_bad_specs_are_refused(self, spec: object) -> None:
        """Unknown modes, unknown or out-of-range parameters are errors, not silently ignored."""
        with pytest.raises(ModeError):
            parse_mode(spec, 0.0)

    def test_latency_and_bandwidth_combine_with_pass(self) -> None:
        """pass takes both shaping parameters at once."""
        mode = parse_mode({"mode": "pass", "ms": 20, "bytes_per_s": 1000}, 0.0)
        assert mode.shaping(1.0) == {"ms": 20, "bytes_per_s": 1000}
        assert mode.phase(1.0) == "pass"


class TestControl:
    async def test_round_trip(self, proxy: ChaosProxy, http: aiohttp.ClientSession) -> None:
        """POST sets a mode, GET shows it with the counters, a bad spec is a 400, DELETE goes back to pass."""
        await echo(http, proxy)
        async with running(build_control_app(proxy)) as control:
            async with http.post(f"{control}/mode", json={"mode": "latency", "ms": 50, "seconds": 30}) as r:
                assert r.status == 200
                assert (await r.json())["mode"] == "latency"
            async with http.get(f"{control}/mode") as r:
                shown = await r.json()
            assert shown["mode"] == "latency"
            assert shown["params"] == {"ms": 50}
            assert 0 < shown["remaining_s"] <= 30
            assert shown["stats"]["accepted"] == 1
            assert proxy.mode().name == "latency"

            async with http.post(f"{control}/mode", json={"mode": "latency", "bytes": 1}) as r:
                assert r.status == 400
                assert "bytes" in (await r.json())["error"]
            async with http.post(f"{control}/mode", data=b"not json") as r:
                assert r.status == 400
            assert proxy.mode().name == "latency"

            async with http.delete(f"{control}/mode") as r:
                assert r.status == 200
                assert (await r.json())["mode"] == "pass"
        assert proxy.mode().name == "pass"

    async def test_serve_announces_and_stops(self, upstream: Upstream, http: aiohttp.ClientSession) -> None:
        """serve() prints both addresses, proxies and takes modes, and returns once stop is set."""
        lines: list[str] = []
        stop = asyncio.Event()
        upstream_address = f"127.0.0.1:{upstream.port}"
        task = asyncio.create_task(serve("127.0.0.1:0", upstream_address, "127.0.0.1:0", stop, lines.append))
        try:
            await eventually(lambda: bool(lines))
            match = re.fullmatch(
                rf"chaos proxy listening on (http://127\.0\.0\.1:\d+) -> 127\.0\.0\.1:{upstream.port} "
                r"\(control (http://127\.0\.0\.1:\d+)\)",
                lines[0],
            )
            assert match, lines
            proxy_url, control_url = match.groups()
            async with http.post(f"{proxy_url}/echo", data=b"x") as r:
                assert await r.read() == b"echo:x"
            async with http.post(f"{control_url}/mode", json={"mode": "refuse"}) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectorError):
                async with aiohttp.ClientSession() as fresh, fresh.post(f"{proxy_url}/echo", data=b"x"):
                    pass
        finally:
            stop.set()
            async with asyncio.timeout(5):
                await task


class TestClose:
    async def test_close_cuts_connections_and_leaves_no_task(self, upstream: Upstream) -> None:
        """Closing cuts live connections, including a hanging call, awaits every task, and can be repeated."""
        before = asyncio.all_tasks()
        async with aiohttp.ClientSession() as http:
            proxy = ChaosProxy("127.0.0.1", upstream.port)
            async with proxy:
                await echo(http, proxy)
                await proxy.set_mode("flap", period_s=5, down_mode="blackhole")
                hanging = asyncio.create_task(echo(http, proxy, timeout_s=5))
                await eventually(lambda: proxy.stats()["bytes_dropped"] > 0)
                assert len(asyncio.all_tasks() - before) > 2  # watcher, connection, pumps, the call
            started = time.monotonic()
            with pytest.raises(CONNECTION_ERRORS):
                await hanging
            assert time.monotonic() - started < 1.0
            await proxy.close()
            assert proxy.stats()["live"] == 0
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(proxy.host, proxy.port)
        assert asyncio.all_tasks() - before == set()
