"""Torture: SIGKILL of a real node process at random points of intake, replication and journal pruning.

One node process (``python -m node serve``) replicates to both upstream stand-ins on loopback. Each
iteration picks a phase with a seeded RNG and kills the node part-way through it:

- ``intake``: desks post new dossiers concurrently, each request with its own Idempotency-Key;
- ``replication``: the stand-ins answer slowly, so pushes are in flight, while steps are being added;
- ``prune``: the journal is pruned every few tens of milliseconds (retention 0) while steps churn;
- ``reseal``: the keyring that encrypts the store at rest is rotated and the node is killed while it
  re-encrypts older rows in the background (some values under the new key, some still under the old).

After each kill, before the restart: ``PRAGMA integrity_check`` is ok and ``wardsync audit verify`` passes
on the crashed store. After the restart: every dossier a client saw acknowledged (201) is there with the
acknowledged digest (or, when a later write got no answer, with every acknowledged step), requests that
got no answer retried with their key create at most one dossier, and the stand-ins hold one record per
code with no duplicates. At the end both stand-ins converge on the node's digests.

WARDSYNC_TORTURE_SEED replays a run; WARDSYNC_TORTURE_ITERATIONS sets the slow run's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.crypto import count_key_usage
from tests.conftest import UNIT, provision_token, valid_intake
from tests.opshelp import write_config
from tests.upstreams import Upstreams, running_upstreams

SEED = int(os.environ.get("WARDSYNC_TORTURE_SEED", "8026743"))
SLOW_ITERATIONS = int(os.environ.get("WARDSYNC_TORTURE_ITERATIONS", "50"))
PHASES = ("intake", "replication", "prune", "reseal")
QUICK_ITERATIONS = len(PHASES)  # each phase once
TARGETS = ("national", "city")
HOST = "127.0.0.1"
DOSSIERS = "/api/v1/dossiers"
WORKERS = 6
START_TIMEOUT_S = 20.0
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)

# Fast loops, and a journal pruned all the time: every entry all targets acknowledged goes at once.
TORTURE_REPLICATION = "[replication]\nprune_tick_s = 0.05\njournal_retention_h = 0.0\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}


def integrity_check(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def wardsync(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=child_env(), cwd=config.parent, check=False,
    )


def audit_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return wardsync("audit", "verify", config=config)


def key_mix(db: Path, active: int) -> tuple[int, int]:
    """(values sealed under keys older than ``active``, values under ``active``), from a read-only look."""
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
        usage = count_key_usage(conn)
    older = sum(n for counts in usage.values() for kid, n in counts.items() if kid not in (0, active))
    return older, sum(counts.get(active, 0) for counts in usage.values())


def older_keys(db: Path, active: int) -> int:
    return key_mix(db, active)[0]


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    stderr: Path

    def log_events(self, event: str) -> int:
        """How many JSON log lines of this process name ``event``."""
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return text.count(f'"event": "{event}"')

    def tail(self) -> str:
        text = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return text[-3000:]


class Runner:
    """One node's configuration and data; starts it as a process and guarantees every process is dead."""

    def __init__(self, root: Path, ups: Upstreams) -> None:
        self.root = root
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        # Encrypted at rest, as `wardsync init` sets a node up, with the keyring outside the data directory.
        self.key_file = root / "keys" / "wardsync.key"
        self.config = write_config(
            root, ups, listen=f"{HOST}:{self.port}",
            replace={"[replication]\n": TORTURE_REPLICATION, "[node]\n": f'[node]\nkey_file = "{self.key_file}"\n'},
        )
        created = wardsync("key", "create", config=self.config)
        assert created.returncode == 0, created.stderr
        self.active_key = 1
        self.db = root / "data" / "wardsync.sqlite3"
        self.headers = {"Authorization": f"Bearer {provision_token(self.config)}"}
        self.procs: list[Proc] = []

    def rotate_key(self) -> None:
        rotated = wardsync("key", "rotate", config=self.config)
        assert rotated.returncode == 0, rotated.stderr
        found = re.search(r"key (\d+) is now active", rotated.stdout)
        assert found, rotated.stdout
        self.active_key = int(found.group(1))

    def spawn(self) -> Proc:
        stderr = self.root / f"node{len(self.procs)}.err"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=child_env(), cwd=self.root,
            )
        node = Proc(proc, stderr)
        self.procs.append(node)
        return node

    async def start(self, http: aiohttp.ClientSession) -> Proc:
        """Start a node process and wait until its /readyz answers 200."""
        node = self.spawn()
        proc = node.proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"node exited with {proc.returncode} at start\n{node.tail()}")
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return node
            if time.monotonic() > deadline:
                pytest.fail(f"node not ready within {START_TIMEOUT_S}s\n{node.tail()}")
            await asyncio.sleep(0.05)

    def kill_all(self) -> None:
        for node in self.procs:
            if node.proc.poll() is None:
                node.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def torture_node(tmp_path: Path) -> AsyncIterator[tuple[Runner, Upstreams]]:
    async with running_upstreams(tmp_path) as ups:
        runner = Runner(tmp_path, ups)
        try:
            yield runner, ups
        finally:
            runner.kill_all()


# --- what the clients saw ------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every answer the clients got, across all iterations."""

    digests: dict[str, str] = field(default_factory=dict)  # code -> last acknowledged digest
    steps: dict[str, int] = field(default_factory=dict)  # code -> steps acknowledged
    keys: dict[str, str] = field(default_factory=dict)  # intake Idempotency-Key -> code
    unanswered_intakes: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> body
    unsure: set[str] = field(default_factory=set)  # codes with a write that got no answer
    unexpected: list[tuple[str, int, str]] = field(default_factory=list)

    def acked(self, record: dict[str, Any]) -> None:
        code = str(record["MaHoSo"])
        self.digests[code] = str(record["digest"])
        self.steps[code] = len(record.get("QuaTrinhXuLy") or [])
        # A write acknowledged after an unanswered one settles it: its digest covers whatever that one did.
        self.unsure.discard(code)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str) -> tuple[int, str]:
    async with http.post(url, json=body, headers={"Idempotency-Key": key}) as r:
        return r.status, await r.text()


async def intake_desk(http: aiohttp.ClientSession, base: str, ledger: Ledger, tag: str, stop: asyncio.Event) -> int:
    """Posts new dossiers until stopped or the node is gone; returns how many were acknowledged."""
    n = 0
    while not stop.is_set():
        key = f"{tag}-{n}"
        citizen_id = f"079{zlib.crc32(key.encode()) % 10**9:09d}"
        body = valid_intake(TrichYeuHoSo=f"Đăng ký khai sinh [{key}]", SoGiayToChuHoSo=citizen_id)
        try:
            status, text = await post(http, f"{base}{DOSSIERS}", body, key)
        except CONNECTION_ERRORS:
            ledger.unanswered_intakes[key] = body
            return n
        if status != 201:
            ledger.unexpected.append((key, status, text[:300]))
            return n
        record = json.loads(text)
        ledger.acked(record)
        ledger.keys[key] = str(record["MaHoSo"])
        n += 1
    return n


def next_status(current: int | None) -> int:
    """A legal next status that keeps a dossier churning: 4 (in processing) and 5 (supplement) alternate."""
    return 5 if current == 4 else 4


async def step_clerk(
    http: aiohttp.ClientSession, base: str, ledger: Ledger, codes: list[str], rng: random.Random, tag: str,
    stop: asyncio.Event,
) -> int:
    """Adds steps to existing dossiers until stopped or the node is gone; returns how many were acknowledged."""
    n = 0
    current: dict[str, int | None] = {}
    while not stop.is_set() and codes:
        code = rng.choice(codes)
        if code not in current:
            try:
                async with http.get(f"{base}{DOSSIERS}/{code}") as r:
                    got = await r.json()
            except CONNECTION_ERRORS:
                return n
            current[code] = got.get("TrangThaiHoSo")
        status = next_status(current[code])
        key = f"{tag}-{n}"
        # A note naming the key: two steps to one status by one officer in one second are distinct steps.
        step = {"TrangThai": status, "NguoiXuLy": "Lê Văn Tâm", "NoiDungXuLy": f"Bước {key}"}
        try:
            code_status, text = await post(http, f"{base}{DOSSIERS}/{code}/steps", step, key)
        except CONNECTION_ERRORS:
            ledger.unsure.add(code)
            return n
        if code_status != 201:
            ledger.unexpected.append((key, code_status, text[:300]))
            return n
        ledger.acked(json.loads(text))
        current[code] = status
        n += 1
    return n


# --- checks --------------------------------------------------------------------------------------


async def node_dossiers(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        async with http.get(f"{base}{DOSSIERS}", params=params) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        for d in page["items"]:
            assert d["MaHoSo"] not in out, f"{d['MaHoSo']} listed twice"
            out[d["MaHoSo"]] = d
        cursor = page["next_cursor"]
        if not cursor:
            return out


async def upstream_records(ups: Upstreams, target: str) -> list[dict[str, Any]]:
    async with ups.http.get(f"{ups.url(target)}/__inspect/dossiers", params={"unit": UNIT}) as r:
        assert r.status == 200
        return list(await r.json())


async def assert_no_duplicates_upstream(ups: Upstreams, local: dict[str, dict[str, Any]]) -> None:
    """One record per code at each stand-in, none stored twice, and nothing the node does not hold."""
    for t in TARGETS:
        stats = await ups.stats(t)
        assert stats["duplicates"] == 0, (t, stats)
        codes = [d["code"] for d in await upstream_records(ups, t)]
        assert len(codes) == len(set(codes)), f"{t} holds a code twice"
        assert set(codes) <= set(local), f"{t} holds dossiers the node does not: {sorted(set(codes) - set(local))[:5]}"


async def converged(http: aiohttp.ClientSession, base: str, ups: Upstreams, within_s: float = 40) -> dict[str, str]:
    deadline = time.monotonic() + within_s
    while True:
        local = {c: str(d["digest"]) for c, d in (await node_dossiers(http, base)).items()}
        remote = {t: await ups.dossiers(t, UNIT) for t in TARGETS}
        if all(remote[t] == local for t in TARGETS):
            return local
        if time.monotonic() > deadline:
            differing = {t: sorted(c for c in set(local) | set(remote[t]) if local.get(c) != remote[t].get(c))
                         for t in TARGETS}
            sample = next((codes[0] for codes in differing.values() if codes), None)
            async with http.get(f"{base}{DOSSIERS}/{sample}") as r:
                replication = (await r.json()).get("replication")
            async with http.get(f"{base}/api/v1/dead-letters") as r:
                dead = await r.text()
            pytest.fail(f"the stand-ins never converged with the node: {({t: len(c) for t, c in differing.items()})}"
                        f" differ, e.g. {sample}: {replication}; dead letters: {dead[:1000]}")
        await asyncio.sleep(0.2)


def assert_acknowledged(ledger: Ledger, local: dict[str, dict[str, Any]]) -> None:
    """Every acknowledged dossier is there; its digest is the acknowledged one unless a later write went unanswered."""
    lost = sorted(set(ledger.digests) - set(local))
    assert not lost, f"{len(lost)} acknowledged dossiers lost, e.g. {lost[:5]}"
    for code, digest in ledger.digests.items():
        got = local[code]
        if code in ledger.unsure:
            # A step that got no answer may or may not be there; every acknowledged one must be.
            assert len(got.get("QuaTrinhXuLy") or []) >= ledger.steps[code], code
        else:
            assert got["digest"] == digest, f"{code}: digest {got['digest']} is not the acknowledged {digest}"


async def retry_unanswered(http: aiohttp.ClientSession, base: str, ledger: Ledger, before: set[str]) -> int:
    """Retry each intake that got no answer with its key: one dossier per key, and a second retry replays it."""
    created = 0
    for key, body in list(ledger.unanswered_intakes.items()):
        status, text = await post(http, f"{base}{DOSSIERS}", body, key)
        assert status == 201, text
        record = json.loads(text)
        code = str(record["MaHoSo"])
        assert f"[{key}]" in record["TrichYeuHoSo"], f"retry of {key} answered with another request's dossier"
        assert code not in ledger.digests, f"retry of {key} returned {code}, acknowledged to another request"
        created += code not in before
        again = await post(http, f"{base}{DOSSIERS}", body, key)
        assert again == (status, text), f"a second retry of {key} did not replay the first answer:\n{text}\n{again}"
        ledger.acked(record)
        ledger.keys[key] = code
        del ledger.unanswered_intakes[key]
    codes = list(ledger.keys.values())
    assert len(codes) == len(set(codes)), "two Idempotency-Keys share one dossier"
    return created


# --- the iterations ------------------------------------------------------------------------------


@dataclass
class Iteration:
    n: int
    phase: str
    delay_s: float
    acked: int = 0
    pruned: int = 0
    mid_reseal: bool = False
    notes: str = ""


async def iteration(
    http: aiohttp.ClientSession, runner: Runner, ups: Upstreams, ledger: Ledger, rng: random.Random, n: int,
    phase: str,
) -> Iteration:
    """Load the running node in ``phase``, SIGKILL it after a random delay, check the crashed store."""
    it = Iteration(n, phase, 0.0)
    node = runner.procs[-1]
    codes = sorted(ledger.digests)
    if phase == "replication":
        for t in TARGETS:
            await ups.fault(t, mode="latency", ms=rng.randint(100, 400))
    if phase == "prune" or not codes:
        # Let everything reach both stand-ins first, so the journal holds entries ready to be pruned.
        t0 = time.monotonic()
        await converged(http, runner.base, ups)
        it.notes += f"converged in {time.monotonic() - t0:.2f}s, "
    stop = asyncio.Event()
    tag = f"s{SEED}-i{n}"
    if phase == "intake" or not codes:
        workers = [intake_desk(http, runner.base, ledger, f"{tag}-w{w}", stop) for w in range(WORKERS)]
    else:
        workers = [
            # Each clerk has its own dossiers, so two never race for one status transition.
            step_clerk(http, runner.base, ledger, codes[w :: WORKERS // 2], random.Random(rng.random()),
                       f"{tag}-w{w}", stop)
            for w in range(WORKERS // 2)
        ]
        workers.append(intake_desk(http, runner.base, ledger, f"{tag}-w9", stop))
    unanswered_before = len(ledger.unanswered_intakes) + len(ledger.unsure)
    tasks = [asyncio.create_task(w) for w in workers]
    if phase == "reseal":
        # The running node notices the new key at its re-encryption loop's next tick (within 5 s); the kill
        # comes as soon as some values are seen under the new key while others are still under the old one.
        await asyncio.to_thread(runner.rotate_key)
        t0 = time.monotonic()
        for _ in range(5000):
            older, newer = await asyncio.to_thread(key_mix, runner.db, runner.active_key)
            if newer:
                break
            await asyncio.sleep(0.002)
        it.notes += f"re-encryption seen after {time.monotonic() - t0:.2f}s with {older} values left, "
        it.delay_s = rng.uniform(0.0, 0.005)
    else:
        it.delay_s = rng.uniform(0.2, 1.2)
    await asyncio.sleep(it.delay_s)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(timeout=10)
    stop.set()
    it.acked = sum(await asyncio.gather(*tasks))
    it.pruned = node.log_events("journal_pruned")
    assert node.proc.returncode == -signal.SIGKILL
    assert not ledger.unexpected, f"answers other than 201: {ledger.unexpected[:5]}"
    if phase == "prune":
        assert it.pruned > 0, f"the journal was never pruned before the kill\n{node.tail()}"
    if phase == "intake":
        assert len(ledger.unanswered_intakes) + len(ledger.unsure) > unanswered_before, "no request was in flight"
    if phase == "replication":
        remote = {t: await ups.dossiers(t, UNIT) for t in TARGETS}
        assert any(remote[t] != ledger.digests for t in TARGETS), "replication had finished before the kill"
    if phase == "reseal":
        it.mid_reseal = older_keys(runner.db, runner.active_key) > 0
    for t in TARGETS:
        await ups.clear(t)

    # The crashed store, before anything opens it for writing.
    t0 = time.monotonic()
    assert integrity_check(runner.db) == "ok"
    verified = audit_verify(runner.config)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith("audit log ok")
    it.notes += f"store checks {time.monotonic() - t0:.2f}s"
    return it


async def check_after_restart(http: aiohttp.ClientSession, runner: Runner, ups: Upstreams, ledger: Ledger) -> None:
    """On the restarted node: acknowledged writes are there, unanswered intakes retry once, nothing twice upstream."""
    before = await node_dossiers(http, runner.base)
    assert_acknowledged(ledger, before)
    await retry_unanswered(http, runner.base, ledger, set(before))
    local = await node_dossiers(http, runner.base)
    # Every stored dossier belongs to an Idempotency-Key a client sent.
    orphans = set(local) - set(ledger.keys.values())
    assert not orphans, f"dossiers no request owns: {sorted(orphans)[:5]}"
    await assert_no_duplicates_upstream(ups, local)


async def torture(tmp_path: Path, iterations: int) -> list[Iteration]:
    """Run ``iterations`` kill/restart cycles; the first len(PHASES) cover every phase once, in seeded order."""
    rng = random.Random(SEED)
    order = rng.sample(PHASES, len(PHASES))
    order += [rng.choice(PHASES) for _ in range(iterations - len(order))]
    ledger = Ledger()
    done: list[Iteration] = []
    timeout = aiohttp.ClientTimeout(total=15)
    async with torture_node(tmp_path) as (runner, ups), aiohttp.ClientSession(
        headers=runner.headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=WORKERS * 2)
    ) as http:
        await runner.start(http)
        for n in range(iterations):
            it = await iteration(http, runner, ups, ledger, rng, n, order[n])
            t0 = time.monotonic()
            await runner.start(http)
            it.notes += f", restart {time.monotonic() - t0:.2f}s"
            t0 = time.monotonic()
            await check_after_restart(http, runner, ups, ledger)
            it.notes += f", checks after restart {time.monotonic() - t0:.2f}s"
            done.append(it)
            print(f"iteration {n}: {it.phase}, killed after {it.delay_s:.2f}s, {it.acked} writes acknowledged, "
                  f"{it.pruned} prunes logged{', mid re-encryption' * it.mid_reseal} ({it.notes})")
        # Last life: both stand-ins end with exactly the node's dossiers and digests, none stored twice.
        final = await converged(http, runner.base, ups)
        assert set(final) == set(ledger.digests)
        assert_acknowledged(ledger, await node_dossiers(http, runner.base))
        await assert_no_duplicates_upstream(ups, await node_dossiers(http, runner.base))
        for t in TARGETS:
            assert len(await upstream_records(ups, t)) == len(final)
        assert ledger.steps, "no write was acknowledged in the whole run"
        # The re-encryption interrupted by the kills resumes and finishes: no value is left under an old key.
        deadline = time.monotonic() + 30
        while older_keys(runner.db, runner.active_key):
            assert time.monotonic() < deadline, "re-encryption never finished after the restarts"
            await asyncio.sleep(0.2)
        last = runner.procs[-1]
        last.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(last.proc.wait, 60) == 0, last.tail()
        assert integrity_check(runner.db) == "ok"
    return done


class TestTorture:
    """SIGKILL at random points of intake, replication and pruning loses and duplicates nothing."""

    @pytest.mark.timeout(240)  # about 15 s on a quiet machine; shared CI machines are not quiet
    async def test_a_few_kills(self, tmp_path: Path) -> None:
        started = time.monotonic()
        done = await torture(tmp_path, QUICK_ITERATIONS)
        assert len(done) == QUICK_ITERATIONS
        print(f"{QUICK_ITERATIONS} iterations in {time.monotonic() - started:.1f}s (seed {SEED})")

    @pytest.mark.slow
    @pytest.mark.timeout(max(600, 30 * SLOW_ITERATIONS))
    async def test_many_kills(self, tmp_path: Path) -> None:
        started = time.monotonic()
        done = await torture(tmp_path, SLOW_ITERATIONS)
        phases = {p: sum(1 for it in done if it.phase == p) for p in PHASES}
        assert all(phases.values()), f"a phase was never exercised: {phases}"
        assert any(it.mid_reseal for it in done), "no kill landed while older rows were being re-encrypted"
        print(f"{SLOW_ITERATIONS} iterations {phases} in {time.monotonic() - started:.1f}s (seed {SEED})")

