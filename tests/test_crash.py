"""Process-level durability tests: SIGKILL under load, graceful SIGTERM, and start-up refusal.

Each test runs real ``wardsync serve`` processes on 127.0.0.1 against a data directory in ``tmp_path``.
Set WARDSYNC_CRASH_SEED to replay a run's kill timings and WARDSYNC_CRASH_CYCLES for more kill/restart
cycles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.domain.validation import validate_intake
from tests.conftest import provision_token

HOST = "127.0.0.1"
UNIT = "26743"
AGENCY = "000.00.17.H29"
SEED = int(os.environ.get("WARDSYNC_CRASH_SEED", "26743"))
CYCLES = int(os.environ.get("WARDSYNC_CRASH_CYCLES", "3"))
WORKERS = 16
MAX_REQUESTS_PER_WORKER = 5000
LOAD_DEADLINE_S = 10.0
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
DOSSIERS = "/api/v1/dossiers"

# Errors a client sees when the node is gone or goes away mid-request.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


def wardsync_cmd() -> list[str]:
    """The console script next to the running interpreter, else the module entry point."""
    script = Path(sys.executable).with_name("wardsync")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node"]


def child_env() -> dict[str, str]:
    """The environment without WARDSYNC_* overrides, so only the file and flags configure the node."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def intake_body(key: str) -> dict[str, Any]:
    """A valid intake whose summary names its Idempotency-Key, so a stored dossier can be traced back."""
    digits = f"{zlib.crc32(key.encode()) % 10**9:09d}"
    return {
        "MaTTHC": "1.000656",
        "TenTTHC": "Đăng ký khai sinh",
        "MaLinhVuc": "1.000656.000.00.00.H29",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": "Nguyễn Thị Minh Khai",
        "SoGiayToChuHoSo": "079" + digits,
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": f"Đăng ký khai sinh cho con [{key}]",
        "SoDienThoai": "0909123456",
    }


def split_code(code: str) -> tuple[str, int]:
    """``{agency}-{yyMMdd}-{nnnn}`` -> (day, sequence number)."""
    agency, day, n = code.rsplit("-", 2)
    assert agency == AGENCY, code
    return day, int(n)


def integrity_check(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


# --- node processes ----------------------------------------------------------------------------


@dataclass
class NodeProc:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def logs(self) -> str:
        out = self.stdout.read_text(errors="replace") if self.stdout.exists() else ""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-4000:]}"


class Launcher:
    """Starts nodes for one test and guarantees every one is dead when the test ends."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "wardsync.toml"
        self.data_dir = root / "data"
        self.db = self.data_dir / "wardsync.sqlite3"
        self.procs: list[NodeProc] = []
        self.headers: dict[str, str] = {}

    def init_config(self) -> None:
        done = subprocess.run(
            [*wardsync_cmd(), "init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(self.config)],
            capture_output=True, text=True, timeout=30, env=child_env(), cwd=self.root, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert self.config.exists()

    def spawn(self, port: int) -> NodeProc:
        n = len(self.procs)
        stdout, stderr = self.root / f"node{n}.out", self.root / f"node{n}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                [*wardsync_cmd(), "serve", "--config", str(self.config), "--listen", f"{HOST}:{port}",
                 "--data-dir", str(self.data_dir)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(), cwd=self.root,
            )
        node = NodeProc(proc, port, stdout, stderr)
        self.procs.append(node)
        return node

    async def start(self, port: int) -> NodeProc:
        """Spawn a node and wait for its "listening on" line and a ready /readyz."""
        if not self.headers:
            token = provision_token(self.config, data_dir=self.data_dir)
            self.headers["Authorization"] = f"Bearer {token}"
        node = self.spawn(port)
        banner = f"wardsync node {UNIT} listening on http://{HOST}:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while banner not in node.stdout.read_text(errors="replace"):
            if node.proc.poll() is not None:
                pytest.fail(f"node exited with {node.proc.returncode} before listening\n{node.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"node did not announce itself within {START_TIMEOUT_S}s\n{node.logs()}")
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session, session.get(f"{node.base}/readyz") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["unit"] == UNIT
        return node

    async def wait_exit(self, node: NodeProc, within_s: float = STOP_TIMEOUT_S) -> int:
        deadline = time.monotonic() + within_s
        while node.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"node still running {within_s}s after the signal\n{node.logs()}")
            await asyncio.sleep(0.01)
        return node.proc.returncode

    def kill_all(self) -> None:
        for node in self.procs:
            if node.proc.poll() is None:
                node.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        launcher.init_config()
        yield launcher
    finally:
        launcher.kill_all()


# --- client load -------------------------------------------------------------------------------


@dataclass
class Ack:
    key: str
    code: str
    digest: str
    record: dict[str, Any]


@dataclass
class Load:
    """WORKERS desks posting intakes in a loop, each request with its own Idempotency-Key."""

    base: str
    tag: str
    headers: dict[str, str]
    acked: dict[str, Ack] = field(default_factory=dict)
    unanswered: dict[str, dict[str, Any]] = field(default_factory=dict)
    other: list[tuple[str, int, str]] = field(default_factory=list)
    inflight: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, session: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(LOAD_DEADLINE_S + 5):
            await asyncio.gather(*(self._worker(session, w) for w in range(WORKERS)))

    async def _worker(self, session: aiohttp.ClientSession, w: int) -> None:
        deadline = time.monotonic() + LOAD_DEADLINE_S
        for n in range(MAX_REQUESTS_PER_WORKER):
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            key = f"{self.tag}-w{w:02d}-{n:05d}"
            body = intake_body(key)
            self.inflight += 1
            try:
                async with session.post(f"{self.base}{DOSSIERS}", json=body,
                                        headers={"Idempotency-Key": key}) as resp:
                    status, text = resp.status, await resp.text()
            except CONNECTION_ERRORS:
                # No answer: it may or may not have been committed. The node is gone; this desk stops.
                self.unanswered[key] = body
                return
            finally:
                self.inflight -= 1
            if status != 201:
                self.other.append((key, status, text[:300]))
                return
            record = json.loads(text)
            self.acked[key] = Ack(key, record["MaHoSo"], record["digest"], record)


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[None]:
    """Run ``load`` in the background for the body of the ``async with``; then stop it and wait for it."""
    connector = aiohttp.TCPConnector(limit=WORKERS * 2)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10), headers=load.headers
    ) as session:
        task = asyncio.create_task(load.run(session))
        try:
            yield
        except BaseException:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise
        load.stop.set()
        await task


async def all_changes(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    since = 0
    for _ in range(10_000):
        async with session.get(f"{base}/api/v1/changes", params={"since": since, "limit": 1000}) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        if not page["items"]:
            return items
        items.extend(page["items"])
        since = page["next"]
    pytest.fail("the change feed did not end")


async def get_dossier(session: aiohttp.ClientSession, base: str, code: str) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{base}{DOSSIERS}/{code}") as resp:
        return resp.status, await resp.json()


async def get_many(session: aiohttp.ClientSession, base: str, codes: list[str]) -> dict[str, tuple[int, Any]]:
    sem = asyncio.Semaphore(WORKERS)

    async def one(code: str) -> tuple[str, tuple[int, Any]]:
        async with sem:
            return code, await get_dossier(session, base, code)

    return dict(await asyncio.gather(*(one(c) for c in codes)))


async def post_intake(session: aiohttp.ClientSession, base: str, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(f"{base}{DOSSIERS}", json=body, headers={"Idempotency-Key": key}) as resp:
        return resp.status, await resp.json()


def assert_same_dossier(got: dict[str, Any], ack: Ack) -> None:
    """GET returns the acknowledged record (it may add node-side state such as replication)."""
    assert got["digest"] == ack.digest, ack.code
    assert {k: got.get(k) for k in ack.record} == ack.record, ack.code


def assert_gapless(codes: set[str]) -> dict[str, int]:
    """Codes of each day are 1..N without gaps; returns the last number of each day."""
    by_day: dict[str, list[int]] = {}
    for code in codes:
        day, n = split_code(code)
        by_day.setdefault(day, []).append(n)
    for day, ns in by_day.items():
        assert sorted(ns) == list(range(1, len(ns) + 1)), f"day {day}: sequence has gaps or repeats"
    return {day: len(ns) for day, ns in by_day.items()}


# --- tests -------------------------------------------------------------------------------------


class TestCrashUnderLoad:
    """SIGKILL during concurrent intakes loses no acknowledged dossier and duplicates none."""

    @pytest.mark.timeout(max(60, 20 * CYCLES))
    async def test_kill_restart_cycles(self, launcher: Launcher) -> None:
        started = time.monotonic()
        assert validate_intake(intake_body("probe"), own_unit=UNIT)[1] == {}
        rng = random.Random(SEED)
        port = free_port()
        acked: dict[str, Ack] = {}  # every key ever answered 201, across cycles (incl. retries)
        seen_codes: set[str] = set()  # every code a client has ever been given
        node = await launcher.start(port)

        for cycle in range(CYCLES):
            delay = rng.uniform(0.3, 1.0)
            load = Load(node.base, f"s{SEED}-c{cycle}", launcher.headers)
            async with running(load):
                await asyncio.sleep(delay)
                inflight = load.inflight
                node.proc.send_signal(signal.SIGKILL)
                await launcher.wait_exit(node)
            print(f"cycle {cycle}: killed after {delay:.3f}s with {inflight} in flight; "
                  f"{len(load.acked)} acknowledged, {len(load.unanswered)} unanswered")
            assert node.proc.returncode == -signal.SIGKILL
            assert inflight > 0, "the kill must land while requests are in flight"
            assert load.acked, "no intake was acknowledged before the kill"
            assert not load.other, f"unexpected answers: {load.other[:5]}"
            codes_this_cycle = [a.code for a in load.acked.values()]
            assert len(set(codes_this_cycle)) == len(codes_this_cycle), "one code given to two intakes"
            assert not seen_codes & set(codes_this_cycle), "a code given out before was given again"
            acked.update(load.acked)
            seen_codes.update(codes_this_cycle)

            node = await launcher.start(port)
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout, headers=launcher.headers) as session:
                # Every acknowledged dossier survived with its digest; nothing appears twice in the feed.
                changes = await all_changes(session, node.base)
                feed_codes = [c["code"] for c in changes]
                assert len(feed_codes) == len(set(feed_codes)), "a code appears twice in /api/v1/changes"
                seqs = [c["seq"] for c in changes]
                assert seqs == sorted(set(seqs)), "change sequence numbers are not strictly increasing"
                feed = {c["code"]: c for c in changes}
                lost = [a.code for a in acked.values() if a.code not in feed]
                assert not lost, f"{len(lost)} acknowledged dossiers lost, e.g. {lost[:5]}"
                assert all(feed[a.code]["digest"] == a.digest for a in acked.values())
                fetched = await get_many(session, node.base, codes_this_cycle)
                for ack in load.acked.values():
                    status, got = fetched[ack.code]
                    assert status == 200, got
                    assert_same_dossier(got, ack)
                assert integrity_check(launcher.db) == "ok"

                # Every stored dossier came from an acknowledged or an unanswered request of this run.
                stored = set(feed)
                last = assert_gapless(stored)
                orphans = stored - {a.code for a in acked.values()}
                assert len(orphans) <= len(load.unanswered), "more unacknowledged dossiers than lost answers"

                # New intakes continue the day's sequence and reuse no code.
                fresh: list[str] = []
                for i in range(3):
                    key = f"s{SEED}-c{cycle}-fresh{i}"
                    status, got = await post_intake(session, node.base, key, intake_body(key))
                    assert status == 201, got
                    code = got["MaHoSo"]
                    day, n = split_code(code)
                    assert n == last.get(day, 0) + 1, f"{code} does not continue the day's sequence {last}"
                    last[day] = n
                    assert code not in stored and code not in seen_codes
                    fresh.append(code)
                    acked[key] = Ack(key, code, got["digest"], got)
                seen_codes.update(fresh)

                # Unanswered requests retried with their key: the pre-crash dossier or exactly one new one.
                retried: dict[str, str] = {}
                for key, body in load.unanswered.items():
                    status, got = await post_intake(session, node.base, key, body)
                    assert status == 201, got
                    code = got["MaHoSo"]
                    assert f"[{key}]" in got["TrichYeuHoSo"]
                    if code in stored:
                        assert code in orphans, f"retry of {key} returned another request's dossier {code}"
                        assert feed[code]["digest"] == got["digest"]
                    else:
                        assert code not in seen_codes, f"retry of {key} reused code {code}"
                    retried[key] = code
                    acked[key] = Ack(key, code, got["digest"], got)
                    again_status, again = await post_intake(session, node.base, key, body)
                    assert (again_status, again) == (201, got), "a second retry did not replay the first"
                retry_codes = list(retried.values())
                assert len(retry_codes) == len(set(retry_codes)), "two retried keys share one dossier"
                assert orphans <= set(retry_codes), f"dossiers no request owns: {sorted(orphans - set(retry_codes))}"
                seen_codes.update(retry_codes)
                print(f"cycle {cycle}: {len(orphans)} committed without an answer, "
                      f"{len(set(retry_codes) - stored)} created by retries")

                after = {c["code"] for c in await all_changes(session, node.base)}
                new_by_retry = set(retry_codes) - stored
                assert after == stored | set(fresh) | new_by_retry, "retries created extra dossiers"
                assert_gapless(after)

        node.proc.send_signal(signal.SIGTERM)
        assert await launcher.wait_exit(node) == 0, node.logs()
        assert integrity_check(launcher.db) == "ok"
        elapsed = time.monotonic() - started
        print(f"{CYCLES} cycles, {len(acked)} dossiers acknowledged in {elapsed:.1f}s (seed {SEED})")


class TestGracefulStop:
    """SIGTERM with requests in flight: answered requests are stored, exit 0, later requests are refused."""

    @pytest.mark.timeout(60)
    async def test_sigterm_under_load(self, launcher: Launcher) -> None:
        rng = random.Random(SEED + 1)
        port = free_port()
        node = await launcher.start(port)
        load = Load(node.base, f"g{SEED}", launcher.headers)
        async with running(load):
            await asyncio.sleep(rng.uniform(0.3, 0.6))
            inflight = load.inflight
            signalled = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            code = await launcher.wait_exit(node)
            took = time.monotonic() - signalled
            # Keep the desks posting for a moment after the exit: those requests must be refused.
            await asyncio.sleep(0.05)
        print(f"SIGTERM with {inflight} in flight; exit {code} after {took:.2f}s; "
              f"{len(load.acked)} acknowledged, {len(load.unanswered)} unanswered")
        assert inflight > 0
        assert code == 0, node.logs()
        assert took < STOP_TIMEOUT_S
        assert load.acked
        assert not load.other, f"answers other than 201 during the stop: {load.other[:5]}"
        stderr = node.stderr.read_text()
        assert '"event": "stopping"' in stderr and '"event": "node_stopped"' in stderr
        assert "Traceback" not in stderr, stderr[-3000:]
        wal = launcher.db.with_name(launcher.db.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "the WAL was not checkpointed on a clean stop"
        assert integrity_check(launcher.db) == "ok"

        # After the stop, new requests fail to connect instead of getting an error status.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), headers=launcher.headers) as session:
            for i in range(3):
                key = f"g{SEED}-after{i}"
                with pytest.raises(aiohttp.ClientConnectionError):
                    await post_intake(session, node.base, key, intake_body(key))

        node = await launcher.start(port)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=launcher.headers) as session:
            stored = {c["code"]: c for c in await all_changes(session, node.base)}
            fetched = await get_many(session, node.base, [a.code for a in load.acked.values()])
            for ack in load.acked.values():
                status, got = fetched[ack.code]
                assert status == 200, got
                assert_same_dossier(got, ack)
            # In-flight requests were finished and answered, so nothing was stored without a 201.
            assert set(stored) == {a.code for a in load.acked.values()}
            assert_gapless(set(stored))
            # Requests that got no answer were never committed: a retry creates each one exactly once.
            for key, body in load.unanswered.items():
                status, got = await post_intake(session, node.base, key, body)
                assert status == 201, got
                assert got["MaHoSo"] not in stored
        node.proc.send_signal(signal.SIGTERM)
        assert await launcher.wait_exit(node) == 0, node.logs()


class TestStartupRefusal:
    """An invalid configuration stops ``wardsync serve`` with status 2 and every problem on stderr."""

    CASES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
        (
            "bad-values",
            '[node]\nunit = "99999"\nagency_code = "not a code"\nmax_body_bytes = 10\ncolour = "blue"\n'
            '[log]\nlevel = "loud"\n',
            ("[node] unit: '99999'", "[node] agency_code: 'not a code'", "[node] max_body_bytes",
             "[node] colour: unknown setting", "[log] level: 'loud'"),
        ),
        ("missing-required", "[node]\n", ("[node] unit: required", "[node] agency_code: required")),
        ("not-toml", "[node\nunit = 26743\n", ("not valid TOML",)),
        (
            "unknown-section",
            f'[node]\nunit = "{UNIT}"\nagency_code = "{AGENCY}"\n[nodes]\n',
            ("[nodes]: unknown section",),
        ),
    )

    @pytest.mark.parametrize(("name", "text", "expected"), CASES, ids=[c[0] for c in CASES])
    def test_invalid_config_exits_2(self, tmp_path: Path, name: str, text: str, expected: tuple[str, ...]) -> None:
        config, data_dir = tmp_path / f"{name}.toml", tmp_path / "data"
        config.write_text(text, encoding="utf-8")
        done = subprocess.run(
            [*wardsync_cmd(), "serve", "--config", str(config), "--listen", f"{HOST}:{free_port()}",
             "--data-dir", str(data_dir)],
            capture_output=True, text=True, timeout=30, env=child_env(), cwd=tmp_path, check=False,
        )
        assert done.returncode == 2, (done.returncode, done.stderr)
        assert "listening on" not in done.stdout
        assert done.stderr.startswith("wardsync serve:")
        for problem in expected:
            assert problem in done.stderr, f"{problem!r} missing from:\n{done.stderr}"
        assert "Traceback" not in done.stderr
        assert not data_dir.exists(), "a refused start must not create the store"

    def test_missing_config_file(self, tmp_path: Path) -> None:
        done = subprocess.run(
            [*wardsync_cmd(), "serve", "--config", str(tmp_path / "absent.toml"), "--listen", f"{HOST}:{free_port()}"],
            capture_output=True, text=True, timeout=30, env=child_env(), cwd=tmp_path, check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "file not found" in done.stderr and "wardsync init" in done.stderr

    def test_bad_listen_flag(self, launcher: Launcher) -> None:
        done = subprocess.run(
            [*wardsync_cmd(), "serve", "--config", str(launcher.config), "--listen", "127.0.0.1:http",
             "--data-dir", str(launcher.data_dir)],
            capture_output=True, text=True, timeout=30, env=child_env(), cwd=launcher.root, check=False,
        )
        assert done.returncode == 2, done.stderr
        assert "HOST:PORT" in done.stderr
        assert not launcher.data_dir.exists()
