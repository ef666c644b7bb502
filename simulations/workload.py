"""A working day at the fleet's desks: a seeded plan of dossiers and their processing, and the driver that plays it.

Calibrated from the city's figures (DOMAIN.md): about 31,000 dossiers on an ordinary working day for the
168 units (about 190 per unit), several times that at peaks; larger units are busier (urban wards more
than communes, the island special zone least). Each dossier follows a procedure from a small catalogue
(birth, marriage and death registration, certifications, marital status), arrives at the desk (channel 1)
or by post (3), or online through the national portal (2, a share of the day), and may be boundary-free
(received at one unit for another). Its processing unfolds over the simulated day: accepted at intake,
in processing, supplement requests, fees (recorded, and a wait for payment), withdrawals, processed and
returned; whatever falls after the end of the day is left for another day.

The plan is a pure function of the seed, the units and the day's volume, so a drill can be run again
exactly. Time is compressed: simulated seconds divided by ``factor`` are real seconds.

:class:`Driver` plays a plan against running nodes over HTTP, as the desks would: every write carries an
``Idempotency-Key`` and is retried with the same key after a connection failure or a 5xx, within a bounded
number of attempts. What each node acknowledged (201 for a dossier, 200/201 for a step or fee) is
recorded; that set is what the checker holds the fleet to. An action that must wait for a dossier to reach
its node through an upstream (a take-over or a step at the competent unit before the forwarded dossier
arrived) goes back in the queue for later instead of holding one of the desks' connections while it waits,
as an officer serves the next citizen meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from node.clock import dvcqg
from node.config import DEMO_PASSWORD, DEMO_USERNAME
from node.registry import Unit

DAY_HOURS = 8.0
ORDINARY_DAY = 31_000  # dossiers a working day for the whole city (DOMAIN.md)
PEAK_DAY = 50_000
ONLINE_AGENCY = "000.00.00.H29"  # codes the online channel mints; no unit's node mints under it
DRILL_TAG = "drill"


@dataclass(frozen=True)
class Procedure:
    code: str
    name: str
    field_code: str
    field_name: str
    weight: float
    fee_vnd: int  # 0: free of charge
    same_day: bool  # certifications are processed and returned within the day


CATALOGUE: tuple[Procedure, ...] = (
    Procedure("2.000908", "Chứng thực bản sao từ bản chính", "CT", "Chứng thực", 34, 2_000, True),
    Procedure("2.001035", "Chứng thực chữ ký", "CT", "Chứng thực", 10, 10_000, True),
    Procedure("1.001193", "Thủ tục đăng ký khai sinh", "HT", "Hộ tịch", 22, 0, False),
    Procedure("1.000656", "Thủ tục đăng ký kết hôn", "HT", "Hộ tịch", 8, 0, False),
    Procedure("1.001022", "Thủ tục đăng ký khai tử", "HT", "Hộ tịch", 5, 0, False),
    Procedure("1.004873", "Thủ tục cấp giấy xác nhận tình trạng hôn nhân", "HT", "Hộ tịch", 9, 0, False),
    Procedure("1.001612", "Thủ tục đăng ký hoạt động hộ kinh doanh", "KD", "Kinh doanh", 7, 100_000, False),
    Procedure("1.003583", "Thủ tục xác nhận hợp đồng, giao dịch", "DD", "Đất đai", 5, 50_000, False),
)

OFFICERS = ("Nguyễn Thị Mai", "Trần Văn Hùng", "Lê Thị Bình", "Phạm Minh Tuấn", "Võ Thị Hạnh", "Đặng Quốc Bảo")
SURNAMES = ("Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ")
GIVEN = ("An", "Bình", "Chi", "Dũng", "Giang", "Hà", "Khang", "Lan", "Minh", "Ngọc", "Phúc", "Quân", "Thảo", "Vy")


@dataclass(frozen=True)
class Mix:
    """Shares of the day's dossiers; each is a probability per dossier."""

    online: float = 0.15
    post: float = 0.04
    boundary_free: float = 0.06
    supplement: float = 0.07
    fee_wait: float = 0.05
    withdrawn: float = 0.02


@dataclass
class Action:
    at: float  # simulated seconds from the start of the day
    kind: str  # intake, online, step, fee, forward, take-over
    dossier: int
    status: int = 0
    note: str = ""
    by: str = ""  # unit whose node performs it


@dataclass
class DossierPlan:
    id: int
    unit: str  # receiving unit
    competent: str
    channel: int
    procedure: Procedure
    at: float
    body: dict[str, Any]
    actions: list[Action] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return drill_tag(self.id)


@dataclass
class Plan:
    seed: int
    units: list[str]
    day_s: float
    dossiers: list[DossierPlan]

    def counts(self) -> dict[str, int]:
        steps = sum(1 for d in self.dossiers for a in d.actions if a.kind == "step")
        return {
            "dossiers": len(self.dossiers),
            "online": sum(1 for d in self.dossiers if d.channel == 2),
            "boundary_free": sum(1 for d in self.dossiers if d.competent != d.unit),
            "steps": steps,
            "fees": sum(1 for d in self.dossiers for a in d.actions if a.kind == "fee"),
            "withdrawn": sum(1 for d in self.dossiers for a in d.actions if a.kind == "step" and a.status == 7),
        }


def drill_tag(dossier_id: int) -> str:
    return f"{DRILL_TAG}:{dossier_id}"


def tag_of(record: dict[str, Any]) -> str | None:
    """The drill tag a dossier carries in ThongTinKhac, None for a dossier the drill did not submit."""
    value = record.get("ThongTinKhac")
    if isinstance(value, str) and value.startswith(DRILL_TAG + ":"):
        return value
    return None


def unit_weights(units: list[Unit], rng: random.Random) -> dict[str, float]:
    """Relative busyness: urban wards busier than communes, the special zone least, lognormal spread."""
    base = {"phường": 1.25, "xã": 0.65, "đặc khu": 0.2}
    return {u.code: base.get(u.kind, 1.0) * rng.lognormvariate(0.0, 0.45) for u in units}


def _arrival_time(rng: random.Random, day_s: float) -> float:
    """Desk hours with a morning and an afternoon peak."""
    centre = 0.22 if rng.random() < 0.58 else 0.72
    return min(day_s * 0.995, max(0.0, rng.gauss(centre, 0.12) * day_s))


def make_plan(
    units: list[Unit],
    *,
    seed: int,
    dossiers: int,
    day_s: float = DAY_HOURS * 3600,
    mix: Mix | None = None,
    all_units: list[Unit] | None = None,
) -> Plan:
    """The day's dossiers for ``units`` (``dossiers`` in all, split by unit weight), as a seeded plan."""
    mix = mix or Mix()
    rng = random.Random(seed)
    weights = unit_weights(all_units or units, random.Random(seed ^ 0x5EED))
    mine = {u.code: weights[u.code] for u in units}
    total_w = sum(mine.values())
    codes = sorted(mine)
    procs = list(CATALOGUE)
    pw = [p.weight for p in procs]
    plans: list[DossierPlan] = []
    for i in range(dossiers):
        unit = rng.choices(codes, weights=[mine[c] / total_w for c in codes])[0]
        proc = rng.choices(procs, weights=pw)[0]
        at = _arrival_time(rng, day_s)
        r = rng.random()
        channel = 2 if r < mix.online else 3 if r < mix.online + mix.post else 1
        competent = unit
        if channel != 2 and len(codes) > 1 and rng.random() < mix.boundary_free:
            competent = rng.choice([c for c in codes if c != unit])
        name = f"{rng.choice(SURNAMES)} {rng.choice(['Văn', 'Thị', 'Minh', 'Ngọc'])} {rng.choice(GIVEN)}"
        body: dict[str, Any] = {
            "MaTTHC": proc.code,
            "TenTTHC": proc.name,
            "MaLinhVuc": proc.field_code,
            "TenLinhVuc": proc.field_name,
            "KenhThucHien": channel,
            "ChuHoSo": name,
            "SoGiayToChuHoSo": f"079{rng.randrange(10**9):09d}",
            "LoaiDoiTuong": 1,
            "TrichYeuHoSo": f"{proc.name} cho {name}",
            "ThongTinKhac": drill_tag(i),
        }
        if competent != unit:
            body["MaDonViXuLy"] = competent
        d = DossierPlan(i, unit, competent, channel, proc, at, body)
        d.actions = _script(d, rng, mix, day_s)
        plans.append(d)
    plans.sort(key=lambda d: (d.at, d.id))
    return Plan(seed, codes, day_s, plans)


def _script(d: DossierPlan, rng: random.Random, mix: Mix, day_s: float) -> list[Action]:
    """What happens to a dossier over the day, in order; actions after the day's end are dropped."""
    minute = 60.0
    out: list[Action] = []
    t = d.at
    who = d.unit
    if d.channel == 2:
        out.append(Action(t, "online", d.id))
        t += rng.uniform(10, 90) * minute  # the unit reviews the online submission
        out.append(Action(t, "step", d.id, 2, "Tiếp nhận hồ sơ trực tuyến", who))
    else:
        out.append(Action(t, "intake", d.id, by=who))
    if d.procedure.fee_vnd:
        t += rng.uniform(1, 5) * minute
        out.append(Action(t, "fee", d.id, by=who))
    if d.competent != d.unit:
        t += rng.uniform(2, 15) * minute
        out.append(Action(t, "forward", d.id, by=d.unit))
        t += rng.uniform(10, 45) * minute
        who = d.competent
        out.append(Action(t, "take-over", d.id, by=who))
    t += rng.uniform(5, 40) * minute
    if rng.random() < mix.withdrawn:
        out.append(Action(t, "step", d.id, 7, "Công dân rút hồ sơ", who))
        return [a for a in out if a.at < day_s]
    out.append(Action(t, "step", d.id, 4, "Chuyển thụ lý hồ sơ", who))
    if rng.random() < mix.supplement:
        t += rng.uniform(20, 90) * minute
        out.append(Action(t, "step", d.id, 5, "Yêu cầu bổ sung hồ sơ", who))
        t += rng.uniform(30, 180) * minute
        out.append(Action(t, "step", d.id, 4, "Đã nhận hồ sơ bổ sung", who))
    elif rng.random() < mix.fee_wait:
        t += rng.uniform(10, 60) * minute
        out.append(Action(t, "step", d.id, 6, "Chờ nộp phí, lệ phí", who))
        t += rng.uniform(10, 120) * minute
        out.append(Action(t, "step", d.id, 4, "Đã nộp phí, lệ phí", who))
    t += rng.uniform(10, 60 if d.procedure.same_day else 300) * minute
    out.append(Action(t, "step", d.id, 9, "Đã giải quyết xong", who))
    t += rng.uniform(5, 90) * minute
    out.append(Action(t, "step", d.id, 10, "Đã trả kết quả", who))
    for i, a in enumerate(out):
        # A unique suffix: each step's key (and so its identity in every replica) is the drill's own.
        if a.kind == "step":
            a.note = f"{a.note} [{d.tag}.{i}]"
    return [a for a in out if a.at < day_s]


# -- playing a plan ---------------------------------------------------------------------------------
@dataclass
class Acks:
    """What the fleet acknowledged, as the desks saw it."""

    attempted: set[int] = field(default_factory=set)  # dossier ids whose intake was sent at least once
    dossiers: dict[int, str] = field(default_factory=dict)  # id -> code, acknowledged
    steps: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # id -> [(status, note)] acked
    fees: dict[int, list[str]] = field(default_factory=dict)  # id -> fee codes acked
    refused: dict[str, int] = field(default_factory=dict)  # "kind:status" -> count (4xx answers)
    gave_up: dict[str, int] = field(default_factory=dict)  # kind -> writes never acknowledged
    latencies_ms: list[float] = field(default_factory=list)
    online_codes: dict[int, str] = field(default_factory=dict)  # id -> code sent to the portal, acked or not

    def count(self, bucket: dict[str, int], key: str) -> None:
        bucket[key] = bucket.get(key, 0) + 1


@dataclass
class Target:
    """Where the driver finds a unit's node right now (a restarted worker serves on new ports)."""

    url: str
    token: str | None = None


class Driver:
    """Plays a plan against the nodes (and the portal for online submissions), with bounded retries."""

    def __init__(
        self,
        plan: Plan,
        *,
        factor: float,
        nodes: Callable[[str], Target | None],
        portal_url: str | None,
        concurrency: int = 64,
        attempts: int = 40,
        retry_cap_s: float = 2.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.plan = plan
        self.factor = factor
        self.nodes = nodes
        self.portal_url = portal_url
        self.concurrency = concurrency
        self.attempts = attempts
        self.retry_cap_s = retry_cap_s
        self.timeout_s = timeout_s
        self.acks = Acks()
        self.by_id = {d.id: d for d in plan.dossiers}
        self.done = 0
        self.total = sum(len(d.actions) for d in plan.dossiers)
        self._portal_session: str | None = None
        self._online_seq = 0
        self.t0 = 0.0
        self.inflight = 0
        self._later: dict[tuple[int, int], int] = {}  # (dossier, action) -> times put back to wait

    def sim_now(self) -> float:
        return (time.monotonic() - self.t0) * self.factor

    async def run(self, t0: float, stop: asyncio.Event | None = None) -> None:
        """Play every action at its time (real = simulated / factor from ``t0``), then return."""
        self.t0 = t0
        heap: list[tuple[float, int, int]] = []  # (at, dossier id, action index)
        for d in self.plan.dossiers:
            if d.actions:
                heapq.heappush(heap, (d.actions[0].at, d.id, 0))
        sem = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency * 2, limit_per_host=8)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http, asyncio.TaskGroup() as tg:
            pending: set[asyncio.Task[None]] = set()
            while heap:
                if stop is not None and stop.is_set():
                    break
                at, did, idx = heap[0]
                wait = t0 + at / self.factor - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(min(wait, 0.2))
                    continue
                heapq.heappop(heap)
                await sem.acquire()
                task = tg.create_task(self._play(http, sem, heap, did, idx))
                pending.add(task)
                task.add_done_callback(pending.discard)
                # The heap gets the next action of a dossier once this one is acknowledged.
                while not heap and pending:
                    await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)

    async def _play(
        self,
        http: aiohttp.ClientSession,
        sem: asyncio.Semaphore,
        heap: list[tuple[float, int, int]],
        did: int,
        idx: int,
    ) -> None:
        self.inflight += 1
        try:
            ok = await self._do(http, self.by_id[did], idx)
        finally:
            self.inflight -= 1
            sem.release()
        d = self.by_id[did]
        if ok is None:  # not on its node yet: again later, without holding a desk meanwhile
            n = self._later.get((did, idx), 0) + 1
            if n < self.attempts:
                self._later[(did, idx)] = n
                delay = random.uniform(0.5, 1.0) * min(self.retry_cap_s, 0.05 * 2**n)
                heapq.heappush(heap, (self.sim_now() + delay * self.factor, did, idx))
                return
            self._later.pop((did, idx), None)
            self.acks.count(self.acks.gave_up, d.actions[idx].kind)
            ok = False
        self._later.pop((did, idx), None)
        self.done += 1
        if ok and idx + 1 < len(d.actions):
            nxt = d.actions[idx + 1]
            heapq.heappush(heap, (max(nxt.at, self.sim_now()), did, idx + 1))
        else:
            self.done += len(d.actions) - idx - 1

    async def _do(self, http: aiohttp.ClientSession, d: DossierPlan, idx: int) -> bool | None:
        """Play one action: True when acknowledged, False when refused or given up, None to try again later."""
        a = d.actions[idx]
        key = f"{d.tag}.{idx}"
        if a.kind == "online":
            return await self._online(http, d)
        code = self.acks.dossiers.get(d.id)
        if a.kind == "intake":
            self.acks.attempted.add(d.id)
            # Fixed at the first attempt, so that every retry sends the same body under the same key.
            d.body.setdefault("NgayHenTra", dvcqg(datetime.now(UTC) + timedelta(days=5)))
            status, body = await self._write(http, a.by, "/api/v1/dossiers", d.body, key, "intake")
            if status == 201 and isinstance(body, dict):
                self.acks.dossiers[d.id] = str(body["MaHoSo"])
                return True
            return False
        if code is None:
            return False
        path = f"/api/v1/dossiers/{code}"
        if a.kind == "fee":
            fee = {"TenPhiLePhi": f"Lệ phí {d.procedure.name}"[:250], "MaPhiLePhi": "LP01",
                   "Gia": d.procedure.fee_vnd, "HinhThucThu": 1, "LoaiPhiLePhi": 2}
            status, _ = await self._write(http, a.by, path + "/fees", fee, key, "fee")
            if status in (200, 201):
                self.acks.fees.setdefault(d.id, []).append("LP01")
            return status in (200, 201)
        if a.kind in ("forward", "take-over"):
            # The competent unit can take over only once the dossier reached its node (through an upstream).
            later = (404, 409) if a.kind == "take-over" else ()
            status, _ = await self._write(http, a.by, f"{path}/{a.kind}", {}, key, a.kind, later=later)
            return None if status in later else status in (200, 201)
        step = {"TrangThai": a.status, "NguoiXuLy": OFFICERS[(d.id + idx) % len(OFFICERS)], "NoiDungXuLy": a.note,
                "PhongBanXuLy": "Bộ phận Một cửa"}
        # 404: a step at the competent unit before the dossier reached its node; it comes through an upstream.
        status, _ = await self._write(http, a.by, path + "/steps", step, key, "step", later=(404,))
        if status == 404:
            return None
        if status in (200, 201):
            self.acks.steps.setdefault(d.id, []).append((a.status, a.note))
            return True
        return False

    async def _write(
        self,
        http: aiohttp.ClientSession,
        unit: str,
        path: str,
        body: dict[str, Any],
        key: str,
        kind: str,
        *,
        later: tuple[int, ...] = (),
    ) -> tuple[int, Any]:
        """POST with an Idempotency-Key, retried with the same key; (status, body), status 0 if never answered.

        A status in ``later`` is returned as it is, for the caller to put the action back in the queue."""
        delay = 0.05
        for _ in range(self.attempts):
            target = self.nodes(unit)
            status = 0
            if target is not None:
                headers = {"Idempotency-Key": key}
                if target.token:
                    headers["Authorization"] = f"Bearer {target.token}"
                t = time.monotonic()
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with http.post(target.url + path, json=body, headers=headers) as r:
                        status = r.status
                        answer = await r.json(content_type=None) if r.status < 300 else await r.text()
                        if status < 300:
                            self.acks.latencies_ms.append((time.monotonic() - t) * 1000)
                            return status, answer
                if status in later:
                    return status, None
                if 400 <= status < 500:
                    self.acks.count(self.acks.refused, f"{kind}:{status}")
                    return status, None
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(self.retry_cap_s, delay * 2)
        self.acks.count(self.acks.gave_up, kind)
        return 0, None

    # -- online submissions, through the national portal
    async def _portal(self, http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any] | None:
        assert self.portal_url is not None
        for _ in range(2):
            if self._portal_session is None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                    async with http.post(
                        f"{self.portal_url}/login",
                        json={"username": DEMO_USERNAME, "password": DEMO_PASSWORD},
                        headers={"dstcode": ONLINE_AGENCY},
                    ) as r:
                        answer = await r.json(content_type=None)
                        self._portal_session = answer.get("session") if isinstance(answer, dict) else None
                if self._portal_session is None:
                    return None
            call = {"session": self._portal_session, "madonvi": ONLINE_AGENCY, **body}
            try:
                async with http.post(f"{self.portal_url}/integration", json=call) as r:
                    answer = await r.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
                return None
            if isinstance(answer, dict) and str(answer.get("error_code")) == "-2":
                self._portal_session = None  # expired: log in again once
                continue
            return answer if isinstance(answer, dict) else None
        return None

    async def _online(self, http: aiohttp.ClientSession, d: DossierPlan) -> bool:
        """A citizen's online submission lands on the portal; the unit's node pulls it from there."""
        if self.portal_url is None:
            return False
        self.acks.attempted.add(d.id)
        now = datetime.now(UTC)
        self._online_seq += 1
        code = f"{ONLINE_AGENCY}-{dvcqg(now)[2:8]}-{d.id % 100_000:05d}"
        self.acks.online_codes[d.id] = code
        received = dvcqg(now)
        record = {
            **{k: v for k, v in d.body.items() if k != "MaDonViXuLy"},
            "MaHoSo": code,
            "NgayTiepNhan": received,
            "NgayHenTra": dvcqg(now + timedelta(days=5)),
            "TrangThaiHoSo": 1,
            "MaDonViTiepNhan": d.unit,
            "MaDonViXuLy": d.unit,
            "HinhThuc": 0,
        }
        step = {"MaHoSo": code, "NguoiXuLy": "Cổng DVC quốc gia", "ThoiDiemXuLy": received, "TrangThai": 1,
                "NoiDungXuLy": f"Nộp hồ sơ trực tuyến [{d.tag}.0]"}
        delay = 0.1
        for _ in range(self.attempts):
            rec = await self._portal(http, {"service": "DongBoHoSoMC", "isUpdating": "False", "data": [record]})
            ok_rec = rec is not None and _item_ok(rec)
            if not ok_rec and rec is not None and "tồn tại" in str(rec):
                ok_rec = True  # an earlier attempt stored it
            if ok_rec:
                st = await self._portal(http, {"service": "CapNhatTienDoHoSoMC", "data": [step]})
                if st is not None and _item_ok(st):
                    self.acks.dossiers[d.id] = code
                    self.acks.steps.setdefault(d.id, []).append((1, str(step["NoiDungXuLy"])))
                    return True
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(self.retry_cap_s, delay * 2)
        self.acks.count(self.acks.gave_up, "online")
        return False


def _item_ok(answer: dict[str, Any]) -> bool:
    results = answer.get("results")
    if isinstance(results, list) and results:
        return all(str(r.get("error_code")) == "0" for r in results if isinstance(r, dict))
    return str(answer.get("error_code")) == "0"


def dossiers_for(units: list[Unit], per_day: int, all_units: list[Unit], seed: int) -> int:
    """The share of a city-wide day's volume that falls on ``units`` (by unit weight)."""
    weights = unit_weights(all_units, random.Random(seed ^ 0x5EED))
    share = sum(weights[u.code] for u in units) / sum(weights.values())
    return max(1, math.ceil(per_day * share))
