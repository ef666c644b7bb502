"""SIGHUP on a real ``wardsync serve`` process: credentials, tokens and the TLS certificate change live.

Each test runs the node as its own process against the upstream stand-ins on loopback, edits its
configuration file as an operator would, sends SIGHUP and watches the node's JSON log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.config import DEMO_CLIENT_SECRET, DEMO_PASSWORD
from node.ops import lock
from tests.conftest import UNIT, provision_token, valid_intake
from tests.opshelp import cli, write_config
from tests.upstreams import Upstreams, running_upstreams

START_TIMEOUT_S = 30.0
NEW_PASSWORD = "rotated-portal-password-2"
NEW_SECRET = "rotated-city-secret-2"


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}


@dataclass
class Served:
    """A ``wardsync serve`` process, its address and its log lines (JSON, one per line, on stderr)."""

    proc: subprocess.Popen[bytes]
    base: str
    out: Path
    err: Path
    headers: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.err.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def logs(self) -> str:
        return f"--- stdout ---\n{self.out.read_text(errors='replace')[-2000:]}\n" \
               f"--- stderr ---\n{self.err.read_text(errors='replace')[-6000:]}"

    def hup(self) -> int:
        """Send SIGHUP; returns how many log lines there were before it, for :meth:`wait_event`."""
        seen = len(self.events())
        self.proc.send_signal(signal.SIGHUP)
        return seen

    async def wait_event(self, name: str, after: int, within_s: float = 20.0) -> dict[str, Any]:
        """The first log line ``name`` among the lines after index ``after``."""
        deadline = time.monotonic() + within_s
        while True:
            for e in self.events()[after:]:
                if e.get("event") == name:
                    return e
            assert self.proc.poll() is None, f"the node exited\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {name} log line within {within_s}s\n{self.logs()}"
            await asyncio.sleep(0.05)


def spawn(config: Path, out: Path, err: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as o, err.open("wb") as e:
        return subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=child_env(), cwd=config.parent,
        )


@contextlib.asynccontextmanager
async def serving(
    config: Path, *, token: bool = True, while_starting: Callable[[Served], Awaitable[None]] | None = None
) -> AsyncIterator[Served]:
    """Run ``wardsync serve --config CONFIG`` until the body ends; SIGTERM, then SIGKILL if it lingers.

    ``while_starting`` is awaited once the process is spawned, before waiting for it to listen.
    """
    headers = {}
    if token:
        tok = await asyncio.to_thread(provision_token, config)
        headers["Authorization"] = f"Bearer {tok}"
    out, err = config.parent / "node.out", config.parent / "node.err"
    proc = spawn(config, out, err)
    try:
        if while_starting is not None:
            await while_starting(Served(proc, "", out, err, headers))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (m := re.search(r"listening on (\S+)", out.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"node did not start (exit {proc.poll()})\n{err.read_text(errors='replace')[-4000:]}")
            await asyncio.sleep(0.05)
        served = Served(proc, m.group(1), out, err, headers)
        yield served
        assert proc.poll() in (None, 0), f"the node exited during the test\n{served.logs()}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 15)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def until(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {within_s}s"
        await asyncio.sleep(0.02)


def rewrite(config: Path, old: str, new: str) -> None:
    text = config.read_text(encoding="utf-8")
    assert old in text, old
    config.write_text(text.replace(old, new), encoding="utf-8")


def cursors(db: Path) -> dict[str, int]:
    """The replication cursors (queue positions) as the node committed them, read beside it."""
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as conn:
        return {str(t): int(s) for t, s in conn.execute("SELECT target, seq FROM cursors")}


async def post_intake(session: aiohttp.ClientSession, base: str, tag: str) -> str:
    body = valid_intake(TrichYeuHoSo=f"Hồ sơ {tag}")
    async with session.post(f"{base}/api/v1/dossiers", json=body) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["MaHoSo"])


async def held(ups: Upstreams, target: str) -> set[str]:
    return set(await ups.dossiers(target, UNIT))


async def wait_held(ups: Upstreams, codes: set[str], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        missing = {t: sorted(codes - await held(ups, t)) for t in ("national", "city")}
        if not any(missing.values()):
            return
        shown = {t: f"{len(m)} of {len(codes)}, e.g. {m[:3]}" for t, m in missing.items()}
        assert time.monotonic() < deadline, f"not pushed: {shown}"
        await asyncio.sleep(0.1)


class TestCredentials:
    """A rotated upstream password: pushes fail, the file is edited, SIGHUP, pushes resume in the same process."""

    async def test_rotate_edit_hup_resume_without_dropping_anything(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups)
            async with serving(config) as node, aiohttp.ClientSession(headers=node.headers) as s:
                db = tmp_path / "data" / "wardsync.sqlite3"
                first = {await post_intake(s, node.base, f"before {i}") for i in range(3)}
                await wait_held(ups, first)
                positions = [cursors(db)]

                # The upstreams' operators rotate the credentials: every open session ends.
                async with ups.http.post(f"{ups.national_url}/__credentials", json={"password": NEW_PASSWORD}) as r:
                    assert r.status == 200
                async with ups.http.post(f"{ups.city_url}/__credentials", json={"client_secret": NEW_SECRET}) as r:
                    assert r.status == 200
                stuck = {await post_intake(s, node.base, f"stuck {i}") for i in range(3)}
                deadline = time.monotonic() + 15
                while True:  # both targets report the refused login
                    async with s.get(f"{node.base}/api/v1/status") as r:
                        status = await r.json()
                    errors = {t: status["targets"][t]["last_error"] for t in ("national", "city")}
                    if all(errors.values()):
                        break
                    assert time.monotonic() < deadline, errors
                    await asyncio.sleep(0.1)
                assert not stuck & (await held(ups, "national") | await held(ups, "city"))
                positions.append(cursors(db))

                # A stream of intakes across the reload, on keep-alive connections that are counted.
                opened = 0

                async def on_connect(*_: Any) -> None:
                    nonlocal opened
                    opened += 1

                trace = aiohttp.TraceConfig()
                trace.on_connection_create_end.append(on_connect)
                stop = asyncio.Event()
                streamed: list[str] = []
                failures: list[str] = []

                async def desk(stream: aiohttp.ClientSession, w: int) -> None:
                    n = 0
                    while not stop.is_set():
                        try:
                            streamed.append(await post_intake(stream, node.base, f"stream {w}-{n}"))
                        except (AssertionError, aiohttp.ClientError) as exc:
                            failures.append(repr(exc))
                            return
                        n += 1

                # One request is in flight across the reload: half of its body before SIGHUP, half after.
                body = json.dumps(valid_intake(TrichYeuHoSo="Hồ sơ slow")).encode()
                half_sent, reloaded = asyncio.Event(), asyncio.Event()

                async def slow_body() -> AsyncGenerator[bytes, None]:
                    yield body[: len(body) // 2]
                    half_sent.set()
                    await reloaded.wait()
                    yield body[len(body) // 2 :]

                async def slow(stream: aiohttp.ClientSession) -> tuple[int, str]:
                    async with stream.post(f"{node.base}/api/v1/dossiers", data=slow_body(),
                                           headers={"Content-Type": "application/json"}) as r:
                        return r.status, await r.text()

                connector = aiohttp.TCPConnector(limit=5)
                async with aiohttp.ClientSession(connector=connector, headers=node.headers,
                                                 trace_configs=[trace]) as stream:
                    desks = [asyncio.create_task(desk(stream, w)) for w in range(4)]
                    slow_task = asyncio.create_task(slow(stream))
                    await half_sent.wait()
                    await until(lambda: len(streamed) >= 10 or bool(failures))
                    rewrite(config, f'password = "{DEMO_PASSWORD}"', f'password = "{NEW_PASSWORD}"')
                    rewrite(config, f'client_secret = "{DEMO_CLIENT_SECRET}"', f'client_secret = "{NEW_SECRET}"')
                    before = len(streamed)
                    mark = node.hup()
                    done = await node.wait_event("config_reloaded", mark)
                    at_reload = len(streamed)
                    reloaded.set()
                    await until(lambda: len(streamed) >= at_reload + 10 or bool(failures))  # desks carry on
                    stop.set()
                    await asyncio.gather(*desks)
                    slow_status, slow_text = await slow_task
                assert failures == []
                assert slow_status == 201, slow_text
                assert before >= 10 and len(streamed) >= at_reload + 10, (before, at_reload, len(streamed))
                assert opened == 5, f"{opened} connections opened for 5 clients: some were dropped"
                assert sorted(done["applied"]) == ["[targets.city] client_secret", "[targets.national] password"]
                assert done["needs_restart"] == []

                everything = first | stuck | set(streamed) | {json.loads(slow_text)["MaHoSo"]}
                await wait_held(ups, everything)
                positions.append(cursors(db))
                for t in ("national", "city"):
                    seq = [p.get(t, 0) for p in positions]
                    assert seq == sorted(seq) and seq[-1] > seq[0], (t, seq)
                    stats = await ups.stats(t)
                    assert stats["resends"] == 0, (t, stats)
                    assert stats["duplicates"] == 0, (t, stats)
                assert "config_reload_refused" not in {e.get("event") for e in node.events()}
                assert NEW_PASSWORD not in node.err.read_text() and NEW_SECRET not in node.err.read_text()


class TestBadConfig:
    """A new file that does not load or validate is refused whole; the old configuration keeps serving."""

    async def test_invalid_toml_bad_value_and_identity_change_are_refused(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups)
            good = config.read_text(encoding="utf-8")
            async with serving(config) as node, aiohttp.ClientSession(headers=node.headers) as s:
                await wait_held(ups, {await post_intake(s, node.base, "start")})

                config.write_text(good.replace("[replication]\n", "[replication\n", 1), encoding="utf-8")
                refused = await node.wait_event("config_reload_refused", node.hup())
                assert refused["level"] == "error"
                assert "not valid TOML" in refused["reason"] and "line 25" in refused["reason"]
                assert refused["kept"] == str(config)
                await wait_held(ups, {await post_intake(s, node.base, "after invalid toml")})

                # A new password next to a bad value: nothing of the file is taken, not even the password.
                config.write_text(
                    good.replace(f'password = "{DEMO_PASSWORD}"', f'password = "{NEW_PASSWORD}"')
                    .replace("timeout_s = 2.0", "timeout_s = -1", 1),
                    encoding="utf-8",
                )
                refused = await node.wait_event("config_reload_refused", node.hup())
                assert "[targets.national] timeout_s: must be positive" in refused["reason"], refused
                await wait_held(ups, {await post_intake(s, node.base, "after bad value")})

                config.write_text(good.replace('unit = "26743"', 'unit = "25747"'), encoding="utf-8")
                refused = await node.wait_event("config_reload_refused", node.hup())
                assert "[node] unit changed from '26743' to '25747'" in refused["reason"], refused
                async with s.get(f"{node.base}/readyz") as r:
                    assert r.status == 200 and (await r.json())["unit"] == UNIT

                # The good file again, with a change only a restart applies: accepted, and said so.
                config.write_text(good.replace('level = "info"', 'level = "debug"'), encoding="utf-8")
                done = await node.wait_event("config_reloaded", node.hup())
                assert done["applied"] == [] and done["needs_restart"] == ["[log] level"]
                await wait_held(ups, {await post_intake(s, node.base, "after good file")})
                assert sum(e.get("event") == "config_reload_refused" for e in node.events()) == 3
                assert NEW_PASSWORD not in node.err.read_text()


class TestTokens:
    """A token revoked or created with ``wardsync token`` beside the running node counts after SIGHUP."""

    async def test_revoked_token_refused_and_new_token_accepted_after_hup(self, tmp_path: Path) -> None:
        config = write_config(tmp_path)
        async with serving(config) as node:
            async with aiohttp.ClientSession(headers=node.headers) as s, s.get(f"{node.base}/api/v1/status") as r:
                assert r.status == 200  # the node now holds this token in its cache
            listed = await asyncio.to_thread(cli, "token", "list", "--config", str(config), "--json", cwd=tmp_path)
            assert listed.returncode == 0, listed.stderr
            (old,) = json.loads(listed.stdout)
            revoked = await asyncio.to_thread(cli, "token", "revoke", "--config", str(config), str(old["id"]),
                                              cwd=tmp_path)
            assert revoked.returncode == 0, revoked.stderr
            created = await asyncio.to_thread(cli, "token", "create", "--config", str(config), "--role", "clerk",
                                              cwd=tmp_path)
            assert created.returncode == 0, created.stderr
            new = created.stdout.strip()

            mark = node.hup()
            done = await node.wait_event("config_reloaded", mark)
            # The field's name must not look like a secret's, or the log would hide it.
            assert done["access_reloaded"] is True
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{node.base}/api/v1/status", headers=node.headers) as r:
                    assert r.status == 401, await r.text()
                async with s.get(f"{node.base}/api/v1/status", headers={"Authorization": f"Bearer {new}"}) as r:
                    assert r.status == 200, await r.text()
                async with s.post(f"{node.base}/api/v1/dossiers", json=valid_intake(),
                                  headers={"Authorization": f"Bearer {new}"}) as r:
                    assert r.status == 201, await r.text()
            await node.wait_event("tokens_reloaded", mark)


# --- TLS ---------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path

    @classmethod
    def make(cls, where: Path) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(_name("reload test CA")).issuer_name(_name("reload test CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        where.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, where)

    def issue(self, cert_path: Path, key_path: Path, *, key: ec.EllipticCurvePrivateKey | None = None) -> int:
        """A server certificate for 127.0.0.1 written to the two files; returns its serial number."""
        own = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(self.cert.subject)
            .public_key(own.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        written = key or own  # another key than the certificate's: a broken pair, for the refusal test
        key_path.write_bytes(written.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        key_path.chmod(0o600)
        return int(serial)


async def peer_serial(base: str, ca: Path) -> int:
    """The serial number of the certificate the node presents on a new TLS connection."""
    host, port = base.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca)
    _, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return int(x509.load_der_x509_certificate(der).serial_number)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


class TestTls:
    """A renewed certificate is presented to new connections after SIGHUP; open ones carry on."""

    async def test_new_certificate_served_after_hup_and_a_broken_pair_refused(self, tmp_path: Path) -> None:
        tls_dir = tmp_path / "tls"
        tls_dir.mkdir()
        ca = Ca.make(tls_dir / "ca.pem")
        cert, key = tls_dir / "node.pem", tls_dir / "node-key.pem"
        first = ca.issue(cert, key)
        config = write_config(tmp_path, replace={
            "shutdown_timeout_s = 30.0": f'shutdown_timeout_s = 30.0\ntls_cert = "{cert}"\ntls_key = "{key}"',
        })
        async with serving(config) as node:
            assert node.base.startswith("https://")
            assert await peer_serial(node.base, ca.pem) == first

            opened = 0

            async def on_connect(*_: Any) -> None:
                nonlocal opened
                opened += 1

            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(on_connect)
            connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca.pem), limit=1)
            async with aiohttp.ClientSession(connector=connector, headers=node.headers,
                                             trace_configs=[trace]) as s:
                await post_intake(s, node.base, "before renewal")

                # Renewed in place, as certbot and most renewals do: same paths, new files.
                second = ca.issue(cert, key)
                mark = node.hup()
                done = await node.wait_event("config_reloaded", mark)
                assert done["tls_reloaded"] is True
                assert await peer_serial(node.base, ca.pem) == second
                await post_intake(s, node.base, "after renewal")  # on the connection opened before it
                assert opened == 1

                # New paths in the file.
                cert3, key3 = tls_dir / "node3.pem", tls_dir / "node3-key.pem"
                third = ca.issue(cert3, key3)
                rewrite(config, f'tls_cert = "{cert}"\ntls_key = "{key}"', f'tls_cert = "{cert3}"\ntls_key = "{key3}"')
                await node.wait_event("config_reloaded", node.hup())
                assert await peer_serial(node.base, ca.pem) == third

                # A certificate written next to the wrong key, at the same paths: refused, the old one stays.
                ca.issue(cert3, key3, key=ec.generate_private_key(ec.SECP256R1()))
                refused = await node.wait_event("config_reload_refused", node.hup())
                assert "tls_cert/tls_key: cannot be loaded" in refused["reason"], refused
                assert await peer_serial(node.base, ca.pem) == third
                await post_intake(s, node.base, "after a broken pair")


class TestStartAndStop:
    """SIGHUP while the node starts or stops does not end it; one received while starting is applied once it serves."""

    async def test_hup_while_starting_is_deferred_and_while_stopping_ignored(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            config = write_config(tmp_path, ups, replace={
                "pull_tick_s = 0.2\n": "pull_tick_s = 0.2\nseed_timeout_s = 2.0\n",
                "shutdown_timeout_s = 30.0": "shutdown_timeout_s = 3.0",
            })
            # On an empty store the node asks the upstreams for the codes they hold before it listens; with
            # both unreachable that holds its start for seed_timeout_s each.
            await ups.fault("national", mode="blackhole")
            await ups.fault("city", mode="blackhole")
            sent_while_starting: list[bool] = []

            async def hup_while_starting(node: Served) -> None:
                deadline = time.monotonic() + START_TIMEOUT_S
                while lock.holder(tmp_path / "data") is None:  # serve() runs
                    assert node.proc.poll() is None and time.monotonic() < deadline, node.logs()
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.0)  # well inside the 4 s of asking the upstreams
                rewrite(config, 'level = "info"', 'level = "debug"')
                node.proc.send_signal(signal.SIGHUP)
                sent_while_starting.append("listening on" not in node.out.read_text())
                await ups.clear("national")
                await ups.clear("city")

            async with serving(config, while_starting=hup_while_starting) as node:
                assert sent_while_starting == [True], "the signal was not sent during start-up"
                names = [e.get("event") for e in node.events()]
                assert "config_reload_deferred" in names, node.logs()
                done = await node.wait_event("config_reloaded", names.index("listening"))
                assert done["needs_restart"] == ["[log] level"]

                # A request still in flight when SIGTERM comes keeps the node stopping (for up to
                # shutdown_timeout_s); a SIGHUP then must not end it (SIGHUP's default action) nor reload.
                async def endless_body() -> AsyncGenerator[bytes, None]:
                    yield b'{"TrichYeuHoSo": '
                    await asyncio.sleep(3600)

                async with aiohttp.ClientSession(headers=node.headers) as s:
                    async def post() -> None:
                        async with s.post(f"{node.base}/api/v1/dossiers", data=endless_body(),
                                          headers={"Content-Type": "application/json"}) as r:
                            await r.read()

                    task = asyncio.create_task(post())
                    await asyncio.sleep(0.3)
                    mark = len(node.events())
                    node.proc.send_signal(signal.SIGTERM)
                    await node.wait_event("stopping", mark)
                    node.proc.send_signal(signal.SIGHUP)
                    await node.wait_event("config_reload_skipped", mark)
                    assert await asyncio.wait_for(asyncio.to_thread(node.proc.wait), 20) == 0, node.logs()
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await task
                assert [e.get("event") for e in node.events()].count("config_reloaded") == 1


def test_serve_ignores_sighup_before_the_event_loop_takes_it(tmp_path: Path) -> None:
    """From the first thing ``serve`` does, a SIGHUP no longer ends the process (its default action)."""
    from node.cli import build_parser

    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "missing.toml")])
    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert args.func(args) != 0  # stops at the missing file, after the signal was set aside
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
