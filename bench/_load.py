"""Closed-loop load generator for ``POST /api/v1/dossiers``, run as its own process.

    python bench/_load.py --url http://127.0.0.1:P/api/v1/dossiers [--clients 32] [--warmup 3] [--seconds 10]

``--clients`` tasks share one aiohttp ClientSession (keep-alive, one connection each) and post a valid
intake body, varied per request, back to back: the next request leaves as soon as the answer arrived.
Requests that complete during the warm-up are not counted; throughput and latency are taken over the
requests that *complete* inside the measurement window. No request is started after the window closes
and each has a timeout, so the run is bounded by ``warmup + seconds + timeout``.

Protocol on stdout, one line each: ``MARK start`` and ``MARK end`` when the measurement window opens and
closes (so a parent can sample the server's CPU over exactly that window), then one JSON object with the
result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

BASE_BODY: dict[str, Any] = {
    "MaTTHC": "1.000656",
    "TenTTHC": "Đăng ký khai sinh",
    "MaLinhVuc": "HT",
    "TenLinhVuc": "Hộ tịch",
    "KenhThucHien": 1,
    "ChuHoSo": "Nguyễn Văn An",
    "SoGiayToChuHoSo": "079190000001",
    "LoaiDoiTuong": 1,
    "TrichYeuHoSo": "Đăng ký khai sinh cho con",
    "SoDienThoai": "0901234567",
    "Email": "an.nguyen@example.com",
    "TaiLieuNop": [{"TepDinhKemId": "tk-0", "TenTepDinhKem": "Tờ khai đăng ký khai sinh.pdf"}],
    "DanhSachLePhi": [{"TenPhiLePhi": "Lệ phí đăng ký khai sinh", "MaPhiLePhi": "LP-KS", "Gia": 8000}],
}


def make_body(client: int, n: int) -> bytes:
    """A valid intake body; citizen ID, summary and document id differ on every request."""
    body = dict(BASE_BODY)
    body["SoGiayToChuHoSo"] = f"079{client % 1000:03d}{n % 1_000_000:06d}"
    body["TrichYeuHoSo"] = f"Đăng ký khai sinh cho con, quầy {client}, lượt {n}"
    body["TaiLieuNop"] = [{"TepDinhKemId": f"tk-{client}-{n}", "TenTepDinhKem": "Tờ khai đăng ký khai sinh.pdf"}]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run(
    url: str, *, clients: int, warmup: float, seconds: float, request_timeout: float, idempotency: bool,
    token: str | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    accepted_total = 0
    sent_total = 0
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    prefix = f"bench-{os.getpid()}-{time.time_ns()}"

    t0 = time.perf_counter()
    m_start, m_end = t0 + warmup, t0 + warmup + seconds
    cpu: dict[str, float] = {}

    async def marks() -> None:
        await asyncio.sleep(max(0.0, m_start - time.perf_counter()))
        cpu["start"] = _cpu_s()
        print("MARK start", flush=True)
        await asyncio.sleep(max(0.0, m_end - time.perf_counter()))
        cpu["end"] = _cpu_s()
        print("MARK end", flush=True)

    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def worker(cid: int) -> None:
            nonlocal accepted_total, sent_total
            n = 0
            while time.perf_counter() < m_end:
                data = make_body(cid, n)
                h = {**headers, "Idempotency-Key": f"{prefix}-{cid}-{n}"} if idempotency else headers
                n += 1
                sent_total += 1
                status: int | None = None
                start = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=h) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    errors[type(exc).__name__] += 1
                end = time.perf_counter()
                if status == 201:
                    accepted_total += 1
                if m_start <= end <= m_end:
                    statuses[str(status)] += 1
                    if status == 201:
                        latencies.append(end - start)
                elif status is None:
                    await asyncio.sleep(0.05)  # a dead server must not turn this loop into a spin

        mark_task = asyncio.create_task(marks())
        tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=warmup + seconds + request_timeout + 2)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if not mark_task.done():
            mark_task.cancel()
        await asyncio.gather(mark_task, return_exceptions=True)

    latencies.sort()
    count = len(latencies)
    cpu_s = cpu.get("end", _cpu_s()) - cpu.get("start", 0.0)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "url": url,
        "clients": clients,
        "warmup_s": warmup,
        "seconds": seconds,
        "idempotency": idempotency,
        "requests": count,
        "accepts_per_s": round(count / seconds, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(latencies[-1] if latencies else None),
        "mean_ms": ms(sum(latencies) / count if count else None),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "sent_total": sent_total,
        "accepted_total": accepted_total,
        "loadgen_cpu_pct": round(100 * cpu_s / seconds, 1),
        "pending_cancelled": len(pending),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    parser.add_argument("--idempotency", action="store_true", help="send a fresh Idempotency-Key per request")
    parser.add_argument("--token", default=os.environ.get("WARDSYNC_TOKEN"), help="bearer token (a clerk's)")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(args.url, clients=args.clients, warmup=args.warmup, seconds=args.seconds, request_timeout=args.timeout,
            idempotency=args.idempotency, token=args.token)
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
