"""The node side of the replication benchmark, run as its own process by ``bench/replicate.py``.

    python bench/_replicate_node.py build --data-dir D --snapshot 1000:T1 --snapshot 20000:T2
    python bench/_replicate_node.py drain --data-dir D [--national URL] [--city URL] [--unbatched]
                                          [--time-limit S] [--profile]

``build`` accepts dossiers through the node's own ``DossierService`` (bodies validated by
``validate_intake``, one extra processing step for every third dossier) while the node has no target
reachable, and after the K-th dossier copies the closed store to the snapshot file given for K. The
snapshots therefore share their first dossiers: the small one is a prefix of the big one.

``drain`` opens a node over the store in ``--data-dir`` (a copy of a snapshot) with one replicator per
given target and waits until every target's cursor reached the journal head and every dossier is
``synced`` with exactly its current digest there. With ``--unbatched`` the replicator pushes one dossier
per call (``ReplicatorSettings(batch_size=1)``), the adapters send one record per request
(``batch_limit=1``) and have at most one request in flight. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# First, even when an editable install already lists it: this script's own directory is on the path too, and
# its bench modules (failover.py) must not stand in for the packages of the same name.
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

import adapters.city as city_mod  # noqa: E402
import adapters.national as national_mod  # noqa: E402
from adapters.base import Outcome, Outgoing, PushResult, Upstream  # noqa: E402
from node.app import Node  # noqa: E402
from node.config import (  # noqa: E402
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    DEMO_PASSWORD,
    DEMO_USERNAME,
    Config,
    load_config,
)
from node.domain.validation import validate_intake, validate_step  # noqa: E402
from node.logs import configure  # noqa: E402

UNIT = "26743"  # Phường Bến Thành
AGENCY = "000.00.17.H29"
DB_NAME = "wardsync.sqlite3"
POLL_S = 0.02
CHUNK = 512  # intakes submitted together while building: one group-commit batch

BASE_BODY: dict[str, Any] = {
    "MaTTHC": "1.001193",
    "TenTTHC": "Thủ tục đăng ký khai sinh",
    "MaLinhVuc": "HT",
    "TenLinhVuc": "Hộ tịch",
    "KenhThucHien": 1,
    "ChuHoSo": "Nguyễn Thị Lan",
    "SoGiayToChuHoSo": "079190001234",
    "LoaiDoiTuong": 1,
    "TrichYeuHoSo": "Đăng ký khai sinh cho con",
    "SoDienThoai": "0912345678",
    "Email": "lan.nguyen@example.com",
    "NgayHenTra": "20300105170000",
    "TaiLieuNop": [{"TepDinhKemId": "tk-0", "TenTepDinhKem": "Tờ khai đăng ký khai sinh.pdf"}],
    "DanhSachLePhi": [{"TenPhiLePhi": "Lệ phí đăng ký khai sinh", "MaPhiLePhi": "LP-KS", "Gia": 8000}],
}
STEP_BODY: dict[str, Any] = {"TrangThai": 4, "NguoiXuLy": "Trần Văn Cường", "NoiDungXuLy": "Chuyển xử lý"}


def node_config(data_dir: Path, batch_size: int | None = None) -> Config:
    overrides: dict[str, Any] = {
        "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(data_dir)},
    }
    if batch_size is not None:
        overrides["replication"] = {"batch_size": batch_size}
    # An empty environment: a WARDSYNC_* variable in the caller's shell must not change the benchmark.
    return load_config(env={}, overrides=overrides)


# -- build ---------------------------------------------------------------------------------------------
def intake_body(i: int) -> dict[str, Any]:
    body = dict(BASE_BODY)
    body["ChuHoSo"] = f"Người dân {i}"
    body["SoGiayToChuHoSo"] = f"079{i % 1_000_000_000:09d}"
    body["TrichYeuHoSo"] = f"Đăng ký khai sinh cho con, hồ sơ {i}"
    body["TaiLieuNop"] = [{"TepDinhKemId": f"tk-{i}", "TenTepDinhKem": "Tờ khai đăng ký khai sinh.pdf"}]
    clean, errors = validate_intake(body, own_unit=UNIT)
    if errors:
        raise SystemExit(f"intake body {i} is invalid: {errors}")
    return clean


async def build(data_dir: Path, snapshots: list[tuple[int, Path]], step_every: int) -> dict[str, Any]:
    step_clean, errors = validate_step(STEP_BODY)
    if errors:
        raise SystemExit(f"step body is invalid: {errors}")
    started = time.perf_counter()
    done = steps = 0
    for count, target in sorted(snapshots):
        # No targets: a node whose upstreams are all unreachable journals exactly the same, and pushes nothing.
        async with Node(node_config(data_dir), upstreams=[]) as node:
            while done < count:
                n = min(CHUNK, count - done)
                results = await asyncio.gather(*(node.service.intake(intake_body(i)) for i in range(done, done + n)))
                codes = [json.loads(r.body)["MaHoSo"] for r in results if r.status == 201]
                if len(codes) != n:
                    raise SystemExit(f"intake failed: {[r for r in results if r.status != 201][:3]}")
                stepped = [c for j, c in enumerate(codes) if (done + j) % step_every == 0]
                answers = await asyncio.gather(*(node.service.add_step(c, step_clean) for c in stepped))
                if any(a.status != 201 for a in answers):
                    raise SystemExit(f"step failed: {[a for a in answers if a.status != 201][:3]}")
                steps += len(stepped)
                done += n
        # Closed: the WAL is folded back, so the one file is the whole store.
        shutil.copyfile(data_dir / DB_NAME, target)
    return {"dossiers": done, "extra_steps": steps, "seconds": round(time.perf_counter() - started, 3)}


# -- drain ---------------------------------------------------------------------------------------------
class Counter:
    """Counts what one adapter's push calls acknowledged, as the answers arrive."""

    def __init__(self, upstream: Upstream) -> None:
        self.acked = 0
        self.calls = 0
        self.push_s = 0.0  # wall time spent inside push calls: the rest of a drain is the replicator's own
        self.first_at: float | None = None
        inner = upstream.push

        async def push(batch: Sequence[Outgoing]) -> list[PushResult]:
            t0 = time.perf_counter()
            if self.first_at is None:
                self.first_at = t0
            results = await inner(batch)
            self.push_s += time.perf_counter() - t0
            self.calls += 1
            self.acked += sum(1 for r in results if r.outcome is Outcome.ACKED)
            return results

        upstream.push = push  # type: ignore[method-assign]  # counting wrapper, same behaviour


def make_upstreams(
    http: aiohttp.ClientSession, national: str | None, city: str | None, unbatched: bool
) -> list[Upstream]:
    """The adapters exactly as ``Node._build_upstreams`` makes them, unless ``unbatched``."""
    ups: list[Upstream] = []
    if national:
        kw: dict[str, Any] = {"batch_limit": 1} if unbatched else {}
        ups.append(
            national_mod.NationalAdapter(
                national,
                username=DEMO_USERNAME,
                password=DEMO_PASSWORD,
                dstcode=AGENCY,
                madonvi=AGENCY,
                session=http,
                timeout_s=10.0,
                **kw,
            )
        )
    if city:
        kw = {"batch_limit": 1} if unbatched else {}
        ups.append(
            city_mod.CityAdapter(
                city, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET, session=http, timeout_s=10.0, **kw
            )
        )
    if unbatched:
        # Neither adapter takes its concurrency as a parameter: the national one sizes a per-instance
        # semaphore from MAX_IN_FLIGHT in __init__, the city one reads MAX_CONCURRENT_REQUESTS per push.
        city_mod.MAX_CONCURRENT_REQUESTS = 1
        for up in ups:
            if isinstance(up, national_mod.NationalAdapter):
                up._in_flight = asyncio.Semaphore(1)
    return ups


async def synced(node: Node, target: str) -> int:
    row = await node.store.fetchone(
        "SELECT count(*) FROM replication r JOIN dossiers d ON d.code = r.code"
        " WHERE r.target = ? AND r.state = 'synced' AND r.acked_digest = d.digest",
        (target,),
    )
    return int(row[0]) if row else 0


async def drain(args: argparse.Namespace) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    config = node_config(data_dir, batch_size=1 if args.unbatched else None)
    profiler = cProfile.Profile() if args.profile else None
    http = aiohttp.ClientSession()
    ups = make_upstreams(http, args.national, args.city, args.unbatched)
    counters = {u.name: Counter(u) for u in ups}
    out: dict[str, Any] = {"targets": {}, "settings": {}}
    ru0, thread0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    try:
        async with Node(config, upstreams=ups) as node:
            head = node.service.journal_head
            row = await node.store.fetchone("SELECT count(*) FROM dossiers")
            dossiers = int(row[0]) if row else 0
            out.update(journal_head=head, dossiers=dossiers)
            for name, rep in node.replicators.items():
                s = rep.settings
                out["settings"][name] = {"window": s.window, "batch_size": s.batch_size}
            done: dict[str, float] = {}
            deadline = started + args.time_limit
            while len(done) < len(ups) and time.perf_counter() < deadline:
                await asyncio.sleep(POLL_S)
                for name, rep in node.replicators.items():
                    # The in-memory count gates the store queries, so watching costs the node next to nothing.
                    if name in done or counters[name].acked < dossiers or await rep.cursor() < head:
                        continue
                    if await synced(node, name) >= dossiers:
                        done[name] = time.perf_counter() - started
            elapsed = time.perf_counter() - started
            if profiler is not None:
                profiler.disable()
            if len(done) < len(ups):
                # Time is up: stop the pushes in flight rather than let the node finish the window on close.
                for task in asyncio.all_tasks():
                    if task.get_name().startswith("push:"):
                        task.cancel()
            for name, rep in node.replicators.items():
                c = counters[name]
                lag = await rep.lag(head)
                out["targets"][name] = {
                    "done": name in done,
                    "seconds": round(done.get(name, elapsed), 3),
                    "synced": await synced(node, name),
                    "acked_in_calls": c.acked,
                    "push_calls": c.calls,
                    "in_push_s": round(c.push_s, 3),
                    "first_push_s": None if c.first_at is None else round(c.first_at - started, 3),
                    "cursor": lag["cursor"],
                    "pending": lag["pending"],
                    "dead": lag["dead"],
                    "parked": lag["parked"],
                    "loop_errors": node.loops[name].errors,
                    "last_error": node.loops[name].last_error,
                }
            out["elapsed_s"] = round(elapsed, 3)
    finally:
        if profiler is not None:
            profiler.disable()
        for up in ups:
            await up.close()
        await http.close()
    ru1, thread1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out["cpu_s"] = round(cpu, 3)
    # The whole process, start-up (imports, store open) included: what the machine spent on the node.
    out["process_cpu_s"] = round(ru1.ru_utime + ru1.ru_stime, 3)
    out["loop_thread_cpu_s"] = round(thread1 - thread0, 3)
    out["other_threads_cpu_s"] = round(cpu - (thread1 - thread0), 3)
    if profiler is not None:
        for key, order in (("profile", "tottime"), ("profile_cumulative", "cumulative")):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(order).print_stats(args.profile_top)
            out[key] = buf.getvalue()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--snapshot", action="append", required=True, help="COUNT:FILE")
    p.add_argument("--step-every", type=int, default=3)
    p = sub.add_parser("drain")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--national")
    p.add_argument("--city")
    p.add_argument("--unbatched", action="store_true")
    p.add_argument("--time-limit", type=float, default=120.0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # Logged as a deployed node logs (JSON lines); the parent sends them to a file.
    configure(getattr(args, "log_level", "info"), "json", stream=sys.stderr)
    if args.command == "build":
        snaps = []
        for spec in args.snapshot:
            count, _, path = spec.partition(":")
            snaps.append((int(count), Path(path)))
        result = asyncio.run(build(Path(args.data_dir), snaps, args.step_every))
    else:
        result = asyncio.run(drain(args))
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
