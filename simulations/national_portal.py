"""Stand-in for the National Public Service Portal (DVCQG): a real aiohttp server over its own SQLite file.

The wire protocol follows what open-source clients of the portal show (see DOMAIN.md); answers are HTTP
200 with an ``error_code`` in the body, like the portal's:

- ``POST /login`` ``{username, password}`` with a ``dstcode`` header → ``{"error_code": 0, "session",
  "expires_in"}``; bad credentials or no ``dstcode`` → ``{"error_code": "-1", "message"}``.
- ``POST /integration`` ``{session, madonvi, service, ...}``; an unknown or expired session answers
  ``"-2"``. Services: ``DongBoHoSoMC`` (records, ``isUpdating`` "True"/"False", 1..100 per call),
  ``CapNhatTienDoHoSoMC`` (processing steps, 1..10 per call), ``TraCuuHoSo`` (one record with its steps).
- ``GET /feed?unit=CODE&since=SEQ&limit=N`` → ``{"items": [{"code", "seq", "digest"}], "next": SEQ}``.
  The feed needs no session: it carries only codes, sequence numbers and the digest of each record as
  stored (:func:`sync.record.digest`, so a node can tell the echo of its own push without a look-up),
  and reading a dossier still takes one.
- ``/__faults`` (see :mod:`simulations.faults`), ``GET /__inspect/dossiers?unit=CODE`` and
  ``GET /__inspect/stats`` for drills and tests; ``POST /__credentials`` ``{username?, password?}``
  rotates the login and ends every open session, as a password change on the portal does.

Records are validated as the portal would, one by one; status transitions are not judged across calls,
because a merged history may legitimately arrive in another order. Idempotency is by (code, record
digest) for records and by step key for steps: a key seen again is counted as a resend and stores
nothing twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import json
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from simulations.faults import Faults, Stats
from simulations.serving import running
from sync.record import digest, step_key_of

DEFAULT_USERNAME = "wardsync"
DEFAULT_PASSWORD = "wardsync-demo"
DB_FILE = "national_portal.sqlite3"

MAX_RECORDS_PER_CALL = 100
MAX_STEPS_PER_CALL = 10
MAX_FEED_LIMIT = 1000
# Whole batches of 100 records with their documents and fees are well above aiohttp's 1 MiB default.
MAX_BODY_BYTES = 16 * 1024 * 1024

OK = 0
MSG_OK = "Thành công"
MSG_SESSION = "Phiên làm việc không hợp lệ hoặc đã hết hạn"
MSG_RETRY = "Lỗi hệ thống, thử lại sau"

T = TypeVar("T")


# --- validation, as the portal does it ---------------------------------------------------------

_DIGITS14 = re.compile(r"[0-9]{14}")
_CODE_RE = re.compile(r"(?P<agency>[0-9A-Z]+(?:\.[0-9A-Z]+)*)-(?P<day>[0-9]{6})-(?P<seq>[0-9]{4,5})")
_MAX_AGENCY = 35

_REQUIRED = ("MaHoSo", "MaTTHC", "ChuHoSo", "SoGiayToChuHoSo", "KenhThucHien", "NgayTiepNhan", "TrangThaiHoSo")
_STRINGS = {
    "MaTTHC": 50,
    "TenTTHC": 500,
    "MaLinhVuc": 50,
    "TenLinhVuc": 500,
    "ChuHoSo": 250,
    "SoGiayToChuHoSo": 50,
    "TrichYeuHoSo": 1000,
    "Email": 100,
    "SoDienThoai": 20,
    "ThongTinKhac": 2000,
    "DonViXuLy": 250,
    "NguoiTiepNhan": 50,
    "MaDonViTiepNhan": 35,
    "MaDonViXuLy": 35,
}
_INTEGERS = {
    "KenhThucHien": (1, 3),
    "LoaiDoiTuong": (1, 4),
    "TrangThaiHoSo": (1, 10),
    "HinhThuc": (0, 1),
    "TrangThaiPhiDiaGioi": (1, 4),
}
_DATES = ("NgayTiepNhan", "NgayHenTra", "NgayTra", "NgayKetThucXuLy")

_STEP_REQUIRED = ("MaHoSo", "NguoiXuLy", "ThoiDiemXuLy", "TrangThai")
_STEP_STRINGS = {"NguoiXuLy": 50, "ChucDanh": 100, "PhongBanXuLy": 250, "NoiDungXuLy": 2000}
_STEP_DATES = ("ThoiDiemXuLy", "NgayBatDau", "NgayKetThucTheoQuyDinh")


def _is_datetime(value: object) -> bool:
    return isinstance(value, str) and _DIGITS14.fullmatch(value) is not None and _real_datetime(value)


@functools.lru_cache(maxsize=65536)
def _real_datetime(value: str) -> bool:
    # Dates repeat heavily within a batch (one receipt second, one processing day): parse each once.
    try:
        datetime.strptime(value, "%Y%m%d%H%M%S")
    except ValueError:
        return False
    return True


def _is_int(value: object, low: int, high: int) -> bool:
    # bool is an int subclass; the portal's JSON has no booleans in these fields.
    return type(value) is int and low <= value <= high


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_code(value: object) -> str | None:
    """Why ``value`` is not a dossier code agency-YYMMDD-NNNN(N), or None when it is one."""
    if not isinstance(value, str):
        return "MaHoSo phải là chuỗi"
    match = _CODE_RE.fullmatch(value)
    if match is None or len(match["agency"]) > _MAX_AGENCY:
        return "MaHoSo sai định dạng {mã đơn vị}-{yyMMdd}-{số thứ tự}"
    try:
        datetime.strptime(match["day"], "%y%m%d")
    except ValueError:
        return "MaHoSo có ngày không hợp lệ"
    return None


def check_record(record: Mapping[str, Any]) -> list[str]:
    """Reasons the portal refuses ``record``; empty when it is acceptable."""
    problems = [f"{name}: bắt buộc" for name in _REQUIRED if _missing(record.get(name))]
    if not _missing(record.get("MaHoSo")):
        reason = check_code(record["MaHoSo"])
        if reason:
            problems.append(reason)
    for name, limit in _STRINGS.items():
        value = record.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            problems.append(f"{name}: chuỗi tối đa {limit} ký tự")
    for name, (low, high) in _INTEGERS.items():
        value = record.get(name)
        if value is not None and not _is_int(value, low, high):
            problems.append(f"{name}: số nguyên từ {low} đến {high}")
    problems.extend(
        f"{name}: định dạng yyyyMMddHHmmss"
        for name in _DATES
        if record.get(name) is not None and not _is_datetime(record[name])
    )
    problems.extend(_check_documents(record.get("TaiLieuNop")))
    problems.extend(_check_fees(record.get("DanhSachLePhi")))
    return problems


def _check_documents(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(d, dict) for d in value):
        return ["TaiLieuNop: danh sách đối tượng"]
    return [
        f"TaiLieuNop[{i}]: TepDinhKemId và TenTepDinhKem bắt buộc"
        for i, d in enumerate(value)
        if _missing(d.get("TepDinhKemId")) or _missing(d.get("TenTepDinhKem"))
    ]


def _check_fees(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(f, dict) for f in value):
        return ["DanhSachLePhi: danh sách đối tượng"]
    return [
        f"DanhSachLePhi[{i}]: Gia phải là số nguyên không âm"
        for i, f in enumerate(value)
        if type(f.get("Gia")) is not int or f["Gia"] < 0
    ]


def check_step(step: Mapping[str, Any]) -> list[str]:
    """Reasons the portal refuses a processing step (QuaTrinhXuLy item); empty when acceptable."""
    problems = [f"{name}: bắt buộc" for name in _STEP_REQUIRED if _missing(step.get(name))]
    if not _missing(step.get("MaHoSo")):
        reason = check_code(step["MaHoSo"])
        if reason:
            problems.append(reason)
    for name, limit in _STEP_STRINGS.items():
        value = step.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            problems.append(f"{name}: chuỗi tối đa {limit} ký tự")
    if step.get("TrangThai") is not None and not _is_int(step["TrangThai"], 1, 10):
        problems.append("TrangThai: số nguyên từ 1 đến 10")
    problems.extend(
        f"{name}: định dạng yyyyMMddHHmmss"
        for name in _STEP_DATES
        if step.get(name) is not None and not _is_datetime(step[name])
    )
    return problems


# --- storage ------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dossiers (
    code TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    record_digest TEXT NOT NULL,
    digest TEXT NOT NULL,
    received_unit TEXT,
    competent_unit TEXT,
    status INTEGER,
    seq INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dossiers_received ON dossiers (received_unit, seq);
CREATE INDEX IF NOT EXISTS dossiers_competent ON dossiers (competent_unit, seq);
CREATE TABLE IF NOT EXISTS steps (
    key TEXT PRIMARY KEY,
    code TEXT NOT NULL,
    step TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_code ON steps (code, seq);
CREATE TABLE IF NOT EXISTS seen_records (
    code TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (code, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('seq', 0);
"""

Answer = tuple[str | int, str]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PortalDb:
    """The stand-in's SQLite file; every method runs on the one database thread, writes in one transaction."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL survives a crash of this process, which is all a stand-in has to survive.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def _write(self, fn: Callable[[set[str]], T]) -> T:
        """Run ``fn`` in one transaction; each dossier it reports as touched gets a new seq and digest."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            touched: set[str] = set()
            result = fn(touched)
            if touched:
                (seq,) = self.conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
                now = _now()
                for code in sorted(touched):
                    seq += 1
                    self._refresh(code, seq, now)
                self.conn.execute("UPDATE meta SET value = ? WHERE name = 'seq'", (seq,))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return result

    def _refresh(self, code: str, seq: int, now: str) -> None:
        # The digest is only read by inspection: it is computed there, once, not on every write.
        self.conn.execute("UPDATE dossiers SET digest = '', seq = ?, updated_at = ? WHERE code = ?", (seq, now, code))

    def _full_record(self, code: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT record FROM dossiers WHERE code = ?", (code,)).fetchone()
        if row is None:
            return None
        record: dict[str, Any] = json.loads(row[0])
        steps = self.conn.execute("SELECT step FROM steps WHERE code = ? ORDER BY seq, key", (code,)).fetchall()
        record["QuaTrinhXuLy"] = [json.loads(s) for (s,) in steps]
        return record

    def put_records(self, records: list[tuple[str, dict[str, Any], str]], updating: bool) -> tuple[list[Answer], int]:
        """Store (code, record, record digest) items; answers per item and the number of resends."""

        def apply(touched: set[str]) -> tuple[list[Answer], int]:
            answers: list[Answer] = []
            resends = 0
            for code, record, record_digest in records:
                row = self.conn.execute("SELECT record_digest FROM dossiers WHERE code = ?", (code,)).fetchone()
                if row is not None and not updating:
                    answers.append(("3", f"Hồ sơ {code} đã tồn tại"))
                    continue
                seen = self.conn.execute(
                    "SELECT 1 FROM seen_records WHERE code = ? AND digest = ?", (code, record_digest)
                ).fetchone()
                if seen is not None:
                    resends += 1
                if row is not None and row[0] == record_digest:
                    answers.append((OK, "Hồ sơ không thay đổi"))
                    continue
                # A digest seen before but not the stored one is the node going back to an earlier value:
                # the node pushes each dossier's latest state in order, so the latest write is the truth.
                self.conn.execute(
                    "INSERT INTO dossiers (code, record, record_digest, digest, received_unit, competent_unit,"
                    " status, seq, updated_at) VALUES (?, ?, ?, '', ?, ?, ?, 0, '')"
                    " ON CONFLICT (code) DO UPDATE SET record = excluded.record,"
                    " record_digest = excluded.record_digest, received_unit = excluded.received_unit,"
                    " competent_unit = excluded.competent_unit, status = excluded.status",
                    (
                        code,
                        _dumps(record),
                        record_digest,
                        record.get("MaDonViTiepNhan"),
                        record.get("MaDonViXuLy"),
                        record.get("TrangThaiHoSo"),
                    ),
                )
                self.conn.execute(
                    "INSERT OR IGNORE INTO seen_records (code, digest) VALUES (?, ?)", (code, record_digest)
                )
                touched.add(code)
                answers.append((OK, "Cập nhật hồ sơ thành công" if row is not None else "Tạo hồ sơ thành công"))
            return answers, resends

        return self._write(apply)

    def put_steps(self, steps: list[tuple[str, str, dict[str, Any]]]) -> tuple[list[Answer], int]:
        """Store (code, step key, step) items once per key; answers per item and the number of resends."""

        def apply(touched: set[str]) -> tuple[list[Answer], int]:
            answers: list[Answer] = []
            resends = 0
            for code, key, step in steps:
                if self.conn.execute("SELECT 1 FROM dossiers WHERE code = ?", (code,)).fetchone() is None:
                    answers.append(("-1", f"Mã hồ sơ {code} không tìm thấy"))
                    continue
                inserted = self.conn.execute(
                    "INSERT OR IGNORE INTO steps (key, code, step, seq)"
                    " VALUES (?, ?, ?, (SELECT coalesce(max(seq), 0) + 1 FROM steps WHERE code = ?))",
                    (key, code, _dumps(step), code),
                ).rowcount
                if inserted:
                    touched.add(code)
                    answers.append((OK, "Cập nhật tiến độ thành công"))
                else:
                    resends += 1
                    answers.append((OK, "Tiến độ đã được ghi nhận"))
            return answers, resends

        return self._write(apply)

    def lookup(self, code: str) -> dict[str, Any] | None:
        return self._full_record(code)

    def feed(self, unit: str, since: int, limit: int) -> list[tuple[str, int, str]]:
        """(code, seq, digest) of the unit's dossiers changed after ``since``; digests computed once, here."""
        rows = self.conn.execute(
            "SELECT code, seq, digest FROM dossiers WHERE (received_unit = ?1 OR competent_unit = ?1) AND seq > ?2"
            " ORDER BY seq LIMIT ?3",
            (unit, since, limit),
        ).fetchall()
        out, computed = [], []
        for code, seq, d in rows:
            if not d:
                full = self._full_record(code)
                d = digest(full) if full is not None else ""
                computed.append((d, code))
            out.append((str(code), int(seq), str(d)))
        if computed:
            self._write(
                lambda _: self.conn.executemany(
                    "UPDATE dossiers SET digest = ? WHERE code = ? AND digest = ''", computed
                )
            )
        return out

    def inspect(self, unit: str | None) -> list[dict[str, Any]]:
        sql = "SELECT code, digest, status, updated_at FROM dossiers"
        params: tuple[str, ...] = ()
        if unit is not None:
            sql += " WHERE received_unit = ?1 OR competent_unit = ?1"
            params = (unit,)
        rows = self.conn.execute(sql + " ORDER BY code", params).fetchall()
        out, computed = [], []
        for c, d, s, u in rows:
            if not d:
                full = self._full_record(c)
                d = digest(full) if full is not None else ""
                computed.append((d, c))
            out.append({"code": c, "digest": d, "status": s, "updated_at": u})
        if computed:
            self._write(
                lambda _: self.conn.executemany(
                    "UPDATE dossiers SET digest = ? WHERE code = ? AND digest = ''", computed
                )
            )
        return out

    def counts(self) -> dict[str, int]:
        """Stored dossiers and steps, and how many are stored more than once (the keys make that zero)."""
        dossiers, distinct_codes = self.conn.execute("SELECT count(*), count(DISTINCT code) FROM dossiers").fetchone()
        steps, distinct_keys = self.conn.execute("SELECT count(*), count(DISTINCT key) FROM steps").fetchone()
        # The key is a hash: also compare the step contents it stands for, in case two keys hold one step.
        (distinct_contents,) = self.conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT code, json_extract(step, '$.ThoiDiemXuLy'),"
            " json_extract(step, '$.TrangThai'), json_extract(step, '$.NguoiXuLy'),"
            " coalesce(json_extract(step, '$.NoiDungXuLy'), '') FROM steps)"
        ).fetchone()
        return {
            "dossiers": int(dossiers),
            "steps": int(steps),
            "duplicates": int(dossiers - distinct_codes) + int(steps - distinct_keys) + int(steps - distinct_contents),
        }


# --- the server ---------------------------------------------------------------------------------


@dataclass
class _Session:
    username: str
    dstcode: str
    issued_at: float


@dataclass
class NationalPortal:
    """One stand-in's state: database thread, sessions, faults and counters."""

    data_dir: Path
    username: str
    password: str
    session_ttl_s: float
    faults: Faults
    stats: Stats = field(default_factory=Stats)
    sessions: dict[str, _Session] = field(default_factory=dict)
    _db: PortalDb | None = None
    _executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the portal's database is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def db(self) -> PortalDb:
        if self._db is None:
            raise RuntimeError("the portal's database is not open")
        return self._db

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        # One thread owns the connection: writes are serialised and each request is one thread hop.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="national-portal")
        try:
            self._db = await self._run(PortalDb, self.data_dir / DB_FILE)
            yield
        finally:
            try:
                if self._db is not None:
                    await self._run(self._db.close)
            finally:
                self._db = None
                self._executor.shutdown(wait=True)
                self._executor = None

    # -- auth

    async def login(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body is None:
            self.stats.request("login:bad_request")
            return _error("-1", "Dữ liệu gửi lên không phải JSON", status=400)
        dstcode = request.headers.get("dstcode", "").strip()
        username, password = body.get("username"), body.get("password")
        valid = (
            isinstance(username, str)
            and isinstance(password, str)
            and hmac.compare_digest(username.encode(), self.username.encode())
            and hmac.compare_digest(password.encode(), self.password.encode())
        )
        if not dstcode or not valid:
            self.stats.request("login:refused")
            return _error("-1", "Thiếu mã đơn vị (dstcode)" if not dstcode else "Sai tên đăng nhập hoặc mật khẩu")
        token = secrets.token_urlsafe(24)
        self.sessions[token] = _Session(str(username), dstcode, self.faults.clock())
        self.stats.request("login:ok")
        return web.json_response({"error_code": OK, "session": token, "expires_in": self.session_ttl_s})

    def _session_valid(self, token: object) -> bool:
        if not isinstance(token, str):
            return False
        session = self.sessions.get(token)
        if session is None:
            return False
        expired = self.faults.clock() - session.issued_at > self.session_ttl_s
        if expired or self.faults.session_expired(session.issued_at):
            # An expired session never comes back, also when a session_expiry fault is lifted.
            del self.sessions[token]
            return False
        return True

    # -- integration

    async def integration(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if body is None:
            self.stats.request("integration:bad_request")
            return _error("-1", "Dữ liệu gửi lên không phải JSON", status=400)
        if not self._session_valid(body.get("session")):
            self.stats.request("integration:session_invalid")
            return _error("-2", MSG_SESSION)
        service = body.get("service")
        if _missing(body.get("madonvi")):
            self.stats.request(f"{service}:refused")
            return _error("-1", "madonvi: bắt buộc")
        if service == "DongBoHoSoMC":
            return await self._sync_records(body)
        if service == "CapNhatTienDoHoSoMC":
            return await self._sync_steps(body)
        if service == "TraCuuHoSo":
            return await self._lookup(body)
        self.stats.request("integration:unknown_service")
        return _error("-1", f"Dịch vụ không hợp lệ: {service}")

    async def _sync_records(self, body: Mapping[str, Any]) -> web.Response:
        service = "DongBoHoSoMC"
        updating = body.get("isUpdating")
        data = body.get("data")
        if updating not in ("True", "False"):
            self.stats.request(f"{service}:refused")
            return _error("-1", 'isUpdating phải là "True" hoặc "False"')
        if not isinstance(data, list) or not 1 <= len(data) <= MAX_RECORDS_PER_CALL:
            self.stats.request(f"{service}:refused")
            return _error("-1", f"data phải là danh sách từ 1 đến {MAX_RECORDS_PER_CALL} hồ sơ")
        failing = self.faults.partial_failures(len(data))
        results: list[dict[str, Any] | None] = [None] * len(data)
        to_store: list[tuple[int, str, dict[str, Any], str]] = []
        for index, item in enumerate(data):
            code = item.get("MaHoSo") if isinstance(item, dict) else None
            if index in failing:
                results[index] = _result(code, "500", MSG_RETRY)
                continue
            if not isinstance(item, dict):
                self.stats.rejected += 1
                results[index] = _result(None, "-1", "Hồ sơ phải là đối tượng JSON")
                continue
            # Steps travel by CapNhatTienDoHoSoMC; a copy inside the record is not part of it.
            record = {k: v for k, v in item.items() if k != "QuaTrinhXuLy"}
            problems = check_record(record)
            if problems:
                self.stats.rejected += 1
                results[index] = _result(code, "-1", "Dữ liệu không hợp lệ: " + "; ".join(problems))
                continue
            to_store.append((index, str(code), record, digest(record)))
        self.stats.received += len(data)
        if to_store:
            answers, resends = await self._run(
                self.db.put_records, [(c, r, d) for _, c, r, d in to_store], updating == "True"
            )
            self.stats.resends += resends
            for (index, code, _, _), (error_code, message) in zip(to_store, answers, strict=True):
                results[index] = _result(code, error_code, message)
        return self._batch_answer(service, [r for r in results if r is not None])

    async def _sync_steps(self, body: Mapping[str, Any]) -> web.Response:
        service = "CapNhatTienDoHoSoMC"
        data = body.get("data")
        if not isinstance(data, list) or not 1 <= len(data) <= MAX_STEPS_PER_CALL:
            self.stats.request(f"{service}:refused")
            return _error("-1", f"data phải là danh sách từ 1 đến {MAX_STEPS_PER_CALL} bước xử lý")
        failing = self.faults.partial_failures(len(data))
        results: list[dict[str, Any] | None] = [None] * len(data)
        to_store: list[tuple[int, str, str, dict[str, Any]]] = []
        for index, item in enumerate(data):
            code = item.get("MaHoSo") if isinstance(item, dict) else None
            if index in failing:
                results[index] = _result(code, "500", MSG_RETRY)
                continue
            problems = check_step(item) if isinstance(item, dict) else ["bước xử lý phải là đối tượng JSON"]
            if problems or not isinstance(item, dict):
                self.stats.rejected += 1
                results[index] = _result(code, "-1", "Dữ liệu không hợp lệ: " + "; ".join(problems))
                continue
            to_store.append((index, str(code), step_key_of(item), dict(item)))
        self.stats.steps_received += len(data)
        if to_store:
            answers, resends = await self._run(self.db.put_steps, [(c, k, s) for _, c, k, s in to_store])
            self.stats.resends += resends
            for (index, code, _, _), (error_code, message) in zip(to_store, answers, strict=True):
                results[index] = _result(code, error_code, message)
        return self._batch_answer(service, [r for r in results if r is not None])

    def _batch_answer(self, service: str, results: list[dict[str, Any]]) -> web.Response:
        failed = sum(1 for r in results if r["error_code"] != OK)
        self.stats.request(f"{service}:{'ok' if not failed else 'partial'}")
        return web.json_response(
            {
                "error_code": OK if not failed else "1",
                "message": MSG_OK if not failed else f"{failed}/{len(results)} mục không thành công",
                "results": results,
            }
        )

    async def _lookup(self, body: Mapping[str, Any]) -> web.Response:
        code = body.get("mahoso")
        record = await self._run(self.db.lookup, code) if isinstance(code, str) else None
        if record is None:
            self.stats.request("TraCuuHoSo:not_found")
            return _error("-1", f"Mã hồ sơ {code} không tìm thấy")
        self.stats.request("TraCuuHoSo:ok")
        return web.json_response({"error_code": OK, "message": MSG_OK, "data": record})

    # -- feed and inspection

    async def feed(self, request: web.Request) -> web.Response:
        unit = request.query.get("unit", "").strip()
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            since = limit = -1
        if not unit or since < 0 or not 1 <= limit <= MAX_FEED_LIMIT:
            self.stats.request("feed:bad_request")
            return web.json_response(
                {"error": f"unit is required, since >= 0, 1 <= limit <= {MAX_FEED_LIMIT}"}, status=400
            )
        rows = await self._run(self.db.feed, unit, since, limit)
        self.stats.request("feed:ok")
        return web.json_response(
            {"items": [{"code": c, "seq": s, "digest": d} for c, s, d in rows], "next": rows[-1][1] if rows else since}
        )

    async def inspect_dossiers(self, request: web.Request) -> web.Response:
        unit = request.query.get("unit") or None
        return web.json_response(await self._run(self.db.inspect, unit))

    async def rotate_credentials(self, request: web.Request) -> web.Response:
        body = await _json_body(request) or {}
        self.username = str(body.get("username", self.username))
        self.password = str(body.get("password", self.password))
        self.sessions.clear()
        return web.json_response({"username": self.username, "sessions": 0})

    async def inspect_stats(self, request: web.Request) -> web.Response:
        counts = await self._run(self.db.counts)
        # Reported honestly from the stored rows rather than assumed from the primary keys.
        self.stats.duplicates = max(self.stats.duplicates, counts["duplicates"])
        return web.json_response({**self.stats.as_dict(), "dossiers": counts["dossiers"], "steps": counts["steps"]})


def _result(code: object, error_code: str | int, message: str) -> dict[str, Any]:
    return {"MaHoSo": code, "error_code": error_code, "message": message}


def _error(error_code: str, message: str, *, status: int = 200) -> web.Response:
    return web.json_response({"error_code": error_code, "message": message}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


PORTAL_KEY = web.AppKey("national_portal", NationalPortal)


def build_app(
    data_dir: Path,
    *,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    session_ttl_s: float = 1800.0,
    faults: Faults | None = None,
) -> web.Application:
    """The stand-in's app; its SQLite file lives in ``data_dir`` and opens with the app."""
    portal = NationalPortal(Path(data_dir), username, password, session_ttl_s, faults or Faults())
    app = web.Application(middlewares=[portal.faults.middleware], client_max_size=MAX_BODY_BYTES)
    app[PORTAL_KEY] = portal
    app.cleanup_ctx.append(portal.lifecycle)
    app.router.add_post("/login", portal.login)
    app.router.add_post("/integration", portal.integration)
    app.router.add_get("/feed", portal.feed)
    app.router.add_get("/__inspect/dossiers", portal.inspect_dossiers)
    app.router.add_get("/__inspect/stats", portal.inspect_stats)
    app.router.add_post("/__credentials", portal.rotate_credentials)
    portal.faults.add_routes(app)
    return app


async def serve(
    host: str,
    port: int,
    data_dir: Path,
    stop: asyncio.Event,
    announce: Callable[[str], object] = print,
    **options: Any,
) -> None:
    """Serve the stand-in until ``stop`` is set; ``port`` 0 picks a free port, announced once listening."""
    async with running(build_app(data_dir, **options), host, port) as url:
        announce(f"national portal stand-in listening on {url}")
        await stop.wait()
