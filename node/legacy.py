"""Dossiers exported from the pre-merger units' systems, loaded into a node with their original codes.

Before 1 July 2025 the communes of Hồ Chí Minh City, Bình Dương and Bà Rịa-Vũng Tàu ran their own
one-stop systems. Their exports name the old units; the conversion table shipped as
``node/data/legacy_units_hcm_2025.csv`` (see ``scripts/build_legacy_units.py``) maps each old commune to
the new unit that succeeded it. A row is imported when its mapped receiving or competent unit is this
node's unit.

An imported dossier is written as one CRDT merge (origin ``legacy-import``) under a client id of this node
kept for imports, so it travels like any other change. Its steps keep their own times: each gets an HLC
stamp from its ThoiDiemXuLy, as a step pulled from the portal does.

The collision rule (DESIGN.md): the old systems may already have sent a dossier to the national portal,
and a create must never go out over it. So every imported dossier starts *held* for the portal (a
``replication`` row in state ``held``, which the replicator skips). :class:`LegacyCheck`, run by the node,
looks each held dossier up on the portal:

- the portal lacks it: released as it is, and pushed as a create;
- the portal holds it for the same citizen (same NgayTiepNhan and SoGiayToChuHoSo): the portal's copy is
  merged in first (its values win over the export's, nothing is deleted) and the dossier is released with
  an ack of what the portal holds, so only what the portal lacks goes out, as an update;
- the portal holds another citizen's dossier under that code: a dead letter (collision), never pushed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import structlog

from adapters.base import Upstream
from adapters.national import ack_for
from node.clock import Clock, iso
from node.domain.status import INITIAL, derive_status
from node.domain.validation import INTAKE_FIELDS, is_dvcqg_datetime, validate_intake, validate_step
from node.errors import ApiError
from node.registry import get_unit
from node.service import DossierService, Merge
from node.store import Store
from sync.hlc import HLC
from sync.merge import portal_update

log = structlog.get_logger()

CONVERSION_TABLE = Path(__file__).resolve().parent / "data" / "legacy_units_hcm_2025.csv"
ORIGIN = "legacy-import"
# The client id this node writes imports under (one writer per id: the import holds the data-directory lock).
WRITER = "legacy-import"
TARGET = "national"
# What the check merges from the portal goes under a client id of its own: the puller may merge the same
# dossier at the same time, and two writers computing updates from one state must never share an id.
CHECK_WRITER = "national:legacy-check"
HELD = "held"
HELD_NOTE = "legacy import: to be looked up on the portal before any push"
CHUNK = 256
NONE_HELD_RECHECK_S = 60.0

# Fields of the export that are not intake fields: the code, the receipt time, the old units, the history.
CODE_FIELD, RECEIVED_FIELD = "MaHoSo", "NgayTiepNhan"
RECEIVING_FIELD, COMPETENT_FIELD = "MaDonViTiepNhan", "MaDonViXuLy"
STATUS_FIELD, STEPS_FIELD = "TrangThaiHoSo", "QuaTrinhXuLy"
# Not a portal field: for an old commune split between new units, the one that handles this dossier now.
SUCCESSOR_FIELD = "MaDonViXuLyMoi"
# Derived from the steps on every replica: accepted in an export (checked as dates) and not stored.
DERIVED_FIELDS = ("NgayTra", "NgayKetThucXuLy")
LIST_FIELDS = ("TaiLieuNop", "DanhSachLePhi", STEPS_FIELD)
INTEGER_FIELDS = ("KenhThucHien", "LoaiDoiTuong", "HinhThuc", STATUS_FIELD, "TrangThai", "DuocSoHoa", "Gia",
                  "HinhThucThu", "LoaiPhiLePhi")
REQUIRED = (CODE_FIELD, RECEIVED_FIELD, RECEIVING_FIELD)
# Every field an export may carry; names starting with "_" are ignored (a rejects file's own columns).
ACCEPTED_FIELDS = frozenset(INTAKE_FIELDS | {CODE_FIELD, RECEIVED_FIELD, RECEIVING_FIELD, STATUS_FIELD}
                            | set(DERIVED_FIELDS) | {SUCCESSOR_FIELD})
# What the collision rule compares: the same code for the same citizen's dossier received at the same time.
SAME_DOSSIER = ("NgayTiepNhan", "SoGiayToChuHoSo")
DEFAULT_OFFICER = "Bộ phận Một cửa"
INTAKE_NOTE = "Tiếp nhận hồ sơ"

_CODE_RE = re.compile(r"(?P<agency>[0-9A-Z]+(?:\.[0-9A-Z]+)*)-(?P<day>[0-9]{6})-(?P<seq>[0-9]{4,5})")
_MAX_AGENCY = 35


class ImportFileError(Exception):
    """The file cannot be read as an export at all (not a row-level problem)."""


# -- the conversion table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Successor:
    """The new unit an old commune became part of (``also_to``: other new units that took a part of it)."""

    old_code: str
    old_name: str
    new_code: str
    new_name: str
    also_to: tuple[str, ...]


@cache
def conversion_table(path: Path = CONVERSION_TABLE) -> dict[str, Successor]:
    """Old 5-digit commune code -> its successor, from the shipped table."""
    table: dict[str, Successor] = {}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            table[row["old_code"]] = Successor(
                row["old_code"], row["old_name"], row["new_code"], row["new_name"], tuple(row["also_to"].split())
            )
    return table


def successor(old_code: str) -> Successor | None:
    """The new unit of an old commune code; None when the table does not know the code."""
    return conversion_table().get(old_code)


# -- reading an export ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One dossier of an export: its line (CSV, counting the header as 1) or index (JSON, from 1)."""

    line: int
    raw: dict[str, Any]

    @property
    def code(self) -> str:
        value = self.raw.get(CODE_FIELD)
        return value.strip() if isinstance(value, str) else ("" if value is None else str(value))


def format_of(path: Path, given: str | None = None) -> str:
    if given:
        return given
    return "json" if path.suffix.lower() in (".json", ".jsonl") else "csv"


def read_rows(path: Path, fmt: str) -> list[Row]:
    """The rows of an export; raises :class:`ImportFileError` when the file is not one."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheet programs put a BOM before the header
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportFileError(f"cannot read {path}: {exc}") from exc
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or CODE_FIELD not in reader.fieldnames:
            raise ImportFileError(f"{path}: the first line must name the columns, {CODE_FIELD} among them")
        rows = []
        for row in reader:
            if None in row:  # more cells than columns
                extra = row.pop(None)  # csv's key for surplus cells is None
                row["_surplus"] = extra
            rows.append(Row(reader.line_num, {k: v for k, v in row.items() if k is not None}))
        return rows
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ImportFileError(f"{path}: not JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # the portal's own envelope, as DongBoHoSoMC carries it
    if not isinstance(data, list):
        raise ImportFileError(f"{path}: a JSON export must be a list of dossier records")
    return [Row(i, item if isinstance(item, dict) else {"_not_an_object": item}) for i, item in enumerate(data, 1)]


def _cell(name: str, value: Any) -> Any:
    """A CSV cell or JSON value as the validators expect it: '' is missing, digit strings of integer fields
    are integers, list fields given as JSON text are lists."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if name in INTEGER_FIELDS and value.isascii() and value.isdigit():
            return int(value)
        if name in LIST_FIELDS:
            try:
                return json.loads(value)
            except ValueError:
                return _Bad("must be a JSON list (the column holds the list as JSON text)")
    if name in (RECEIVING_FIELD, COMPETENT_FIELD, SUCCESSOR_FIELD) and type(value) is int:
        return f"{value:05d}"
    if isinstance(value, list):
        return [{k: _cell(k, v) for k, v in item.items()} if isinstance(item, dict) else item for item in value]
    return value


@dataclass(frozen=True)
class _Bad:
    message: str


# -- checking a row ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A row that passed every check: the record to merge and its new units."""

    code: str
    record: dict[str, Any]
    receiving: str
    competent: str


def _code_problem(code: str) -> str | None:
    match = _CODE_RE.fullmatch(code)
    if match is None or len(match["agency"]) > _MAX_AGENCY:
        return "must be a dossier code {agency code}-{YYMMDD}-{NNNN}, e.g. 000.00.06.H56-231027-0361"
    try:
        datetime.strptime(match["day"], "%y%m%d")
    except ValueError:
        return "has a date part that is not a real date"
    return None


def _map_unit(name: str, value: Any, errors: dict[str, str]) -> Successor | None:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{5}", value):
        errors[name] = "must be the 5-digit code of a pre-July-2025 commune (the old unit)"
        return None
    found = successor(value)
    if found is None:
        errors[name] = f"unknown unit code {value}: not in the conversion table of old communes"
    return found


def check_row(row: Row, own_unit: str) -> tuple[Prepared | None, str]:
    """The record to import, or None and the reason the row is rejected."""
    raw = {k: _cell(k, v) for k, v in row.raw.items() if not (isinstance(k, str) and k.startswith("_"))}
    if "_not_an_object" in row.raw:
        return None, "must be a JSON object"
    if "_surplus" in row.raw:
        return None, "has more cells than the header has columns"
    errors: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, _Bad):
            errors[name] = value.message
        elif name not in ACCEPTED_FIELDS and name != STEPS_FIELD:
            errors[name] = "unknown field"
    for name in REQUIRED:
        if raw.get(name) is None:
            errors[name] = "required"
    code = raw.get(CODE_FIELD)
    if isinstance(code, str) and CODE_FIELD not in errors:
        problem = _code_problem(code)
        if problem:
            errors[CODE_FIELD] = problem
    elif code is not None and CODE_FIELD not in errors:
        errors[CODE_FIELD] = "must be a string"
    received = raw.get(RECEIVED_FIELD)
    if received is not None and not (isinstance(received, str) and is_dvcqg_datetime(received)):
        errors[RECEIVED_FIELD] = "must be a date-time yyyyMMddHHmmss, e.g. 20250612083000"
    for name in DERIVED_FIELDS:
        value = raw.get(name)
        if value is not None and not (isinstance(value, str) and is_dvcqg_datetime(value)):
            errors[name] = "must be a date-time yyyyMMddHHmmss"
    receiving = _map_unit(RECEIVING_FIELD, raw.get(RECEIVING_FIELD), errors) if RECEIVING_FIELD not in errors else None
    competent = receiving
    if raw.get(COMPETENT_FIELD) is not None:
        competent = _map_unit(COMPETENT_FIELD, raw.get(COMPETENT_FIELD), errors)
    handler = competent.new_code if competent else None
    received_by = receiving.new_code if receiving else None
    chosen = raw.get(SUCCESSOR_FIELD)
    if chosen is not None and competent is not None:
        allowed = (competent.new_code, *competent.also_to)
        if chosen in allowed:
            handler = chosen
            if raw.get(COMPETENT_FIELD) is None:
                received_by = chosen  # received and handled by the part of the old commune that went there
        else:
            errors[SUCCESSOR_FIELD] = (
                f"must be one of the new units old {competent.old_code} went to: {', '.join(allowed)}"
            )

    intake = {k: v for k, v in raw.items() if k in INTAKE_FIELDS and not isinstance(v, _Bad)}
    intake[COMPETENT_FIELD] = handler
    clean, intake_errors = validate_intake(intake, own_unit=own_unit)
    officer = clean.pop("NguoiTiepNhan", None)  # the officer of the intake step, not a record field
    for name, message in intake_errors.items():
        errors.setdefault(name, message)

    steps = _check_steps(raw, errors)
    if errors:
        return None, "; ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    assert received_by is not None and handler is not None and isinstance(code, str)
    if own_unit not in (received_by, handler):
        unit = get_unit(handler)
        return None, f"belongs to unit {handler}" + (f" ({unit.name})" if unit else "")
    if not steps:
        steps = [_intake_step(raw, code, officer)]
    record: dict[str, Any] = {
        **clean,
        CODE_FIELD: code,
        RECEIVED_FIELD: raw[RECEIVED_FIELD],
        RECEIVING_FIELD: received_by,
        COMPETENT_FIELD: handler,
        STEPS_FIELD: [{**s, CODE_FIELD: code} for s in steps],
    }
    return Prepared(code, record, received_by, handler), ""


def _intake_step(raw: Mapping[str, Any], code: str, officer: Any) -> dict[str, Any]:
    """The history of an export that gives none: accepted (or registered online) at its receipt time."""
    return {
        "NguoiXuLy": officer if isinstance(officer, str) and officer else DEFAULT_OFFICER,
        "ThoiDiemXuLy": raw[RECEIVED_FIELD],
        "NoiDungXuLy": INTAKE_NOTE,
        "TrangThai": raw.get(STATUS_FIELD) or 2,
    }


def _check_steps(raw: Mapping[str, Any], errors: dict[str, str]) -> list[dict[str, Any]]:
    """The export's processing steps, checked as the step route checks them, in time order."""
    status = raw.get(STATUS_FIELD)
    if status is not None and (type(status) is not int or not 1 <= status <= 10):
        errors[STATUS_FIELD] = "must be a status code from 1 to 10"
        return []
    given = raw.get(STEPS_FIELD)
    if given is None:
        if status is not None and status not in INITIAL:
            errors[STATUS_FIELD] = (
                f"status {status} needs the processing steps that led to it ({STEPS_FIELD}); without them only"
                f" {' or '.join(map(str, sorted(INITIAL)))} can be imported"
            )
        return []
    if not isinstance(given, list) or not given:
        errors[STEPS_FIELD] = "must be a non-empty list of processing steps"
        return []
    steps: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        path = f"{STEPS_FIELD}[{i}]"
        if isinstance(item, dict):
            item = dict(item)
            own = item.pop(CODE_FIELD, None)
            if own is not None and own != raw.get(CODE_FIELD):
                errors[f"{path}.{CODE_FIELD}"] = "names another dossier"
        clean, step_errors = validate_step(item)
        for name, message in step_errors.items():
            errors[f"{path}.{name}" if name != "$" else path] = message
        if not step_errors and "ThoiDiemXuLy" not in clean:
            errors[f"{path}.ThoiDiemXuLy"] = "required: an imported step keeps the time it happened"
        steps.append(clean)
    if any(k.startswith(STEPS_FIELD) for k in errors):
        return []
    steps.sort(key=lambda s: str(s["ThoiDiemXuLy"]))  # stable: same-second steps keep the export's order
    derived, skipped = derive_status(int(s["TrangThai"]) for s in steps)
    if skipped:
        errors[STEPS_FIELD] = (
            f"the step to status {steps[skipped[0]]['TrangThai']} at {steps[skipped[0]]['ThoiDiemXuLy']}"
            " is not a legal transition in time order"
        )
    elif status is not None and status != derived:
        errors[STATUS_FIELD] = f"{status} does not follow from the steps in {STEPS_FIELD} (they end in {derived})"
    return steps


# -- importing -----------------------------------------------------------------------------------------


@dataclass
class Rejected:
    line: int
    code: str
    reason: str
    raw: dict[str, Any]


@dataclass
class Summary:
    read: int = 0
    imported: int = 0
    present: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    dry_run: bool = False
    imported_codes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "imported": self.imported,
            "already_present": self.present,
            "rejected": len(self.rejected),
            "dry_run": self.dry_run,
        }


Progress = Callable[[int], None]


async def import_rows(
    store: Store,
    service: DossierService,
    rows: Sequence[Row],
    *,
    unit: str,
    clock: Clock,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Summary:
    """Check and import ``rows`` into the store behind ``service`` (whose writer must be running)."""
    summary = Summary(read=len(rows), dry_run=dry_run)
    writer_id = await service.client_id_for(WRITER) if not dry_run else 0
    seen: dict[str, int] = {}
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        ready: list[tuple[Row, Prepared]] = []
        for row in chunk:
            prepared, reason = check_row(row, unit)
            if prepared is None:
                summary.rejected.append(Rejected(row.line, row.code, reason, row.raw))
            elif prepared.code in seen:
                reason = f"duplicate row: {prepared.code} is already on line {seen[prepared.code]}"
                summary.rejected.append(Rejected(row.line, row.code, reason, row.raw))
            else:
                seen[prepared.code] = row.line
                ready.append((row, prepared))
        held = await _stored(store, [p.code for _, p in ready])
        fresh: list[tuple[Row, Prepared]] = []
        for row, p in ready:
            stored = held.get(p.code)
            if stored is None:
                fresh.append((row, p))
                continue
            differs = [n for n in SAME_DOSSIER if str(stored.get(n)) != str(p.record.get(n))]
            if differs:
                # The same code on another citizen's dossier: never merged into it.
                summary.rejected.append(
                    Rejected(row.line, p.code, f"code {p.code} is held by another dossier on this node"
                             f" ({', '.join(differs)} differ)", row.raw)
                )
            else:
                summary.present += 1
        if not dry_run and fresh:
            await _merge(store, service, fresh, writer_id, clock, summary)
        elif dry_run:
            summary.imported += len(fresh)
        if progress is not None:
            progress(len(chunk))
    if not dry_run and summary.imported_codes:
        # An export of an agency this node now mints for must not have its codes minted again.
        await service.seed_counters(summary.imported_codes)
    return summary


async def _stored(store: Store, codes: list[str]) -> dict[str, dict[str, Any]]:
    if not codes:
        return {}
    marks = ",".join("?" for _ in codes)
    rows = await store.fetchall(f"SELECT code, record FROM dossiers WHERE code IN ({marks})", codes)
    return {str(c): json.loads(store.sealer.record(str(c), r)) for c, r in rows}


async def _merge(
    store: Store,
    service: DossierService,
    fresh: list[tuple[Row, Prepared]],
    writer_id: int,
    clock: Clock,
    summary: Summary,
) -> None:
    # Held before the dossier exists: a crash in between leaves a mark on nothing (cleared by the check),
    # never a dossier that could go out as a create unchecked.
    at = iso(clock.now())
    marks = [(TARGET, p.code, HELD, HELD_NOTE, at) for _, p in fresh]
    await store.write(
        lambda c: c.executemany(
            "INSERT INTO replication (target, code, state, last_error, updated_at) VALUES (?,?,?,?,?)"
            " ON CONFLICT (target, code) DO NOTHING",
            marks,
        )
    )
    ops = [_operation(p, writer_id, service.hlc) for _, p in fresh]
    results = await asyncio.gather(*(service.merge(op) for op in ops), return_exceptions=True)
    failed: list[str] = []
    for (row, p), result in zip(fresh, results, strict=True):
        if isinstance(result, ApiError):
            failed.append(p.code)
            summary.rejected.append(Rejected(row.line, p.code, f"refused by the store: {result.message}", row.raw))
        elif isinstance(result, BaseException):
            raise result
        else:
            summary.imported += 1
            summary.imported_codes.append(p.code)
    if failed:
        await _unhold(store, failed)


def _operation(p: Prepared, writer_id: int, hlc: HLC) -> Merge:
    update = portal_update(p.code, None, None, None, p.record, client_id=writer_id, hlc=hlc)
    assert update is not None  # a new dossier always has fields and a step to write
    return Merge(p.code, update, ORIGIN)


async def _unhold(store: Store, codes: list[str]) -> None:
    rows = [(TARGET, c) for c in codes]
    await store.write(
        lambda c: c.executemany("DELETE FROM replication WHERE target = ? AND code = ? AND state = 'held'", rows)
    )


# -- the rejects file ----------------------------------------------------------------------------------


def write_rejects(path: Path, rejected: Iterable[Rejected], columns: Sequence[str]) -> None:
    """CSV (the export's own columns after ``_line`` and ``_reason``) or JSONL (``.jsonl``/``.json``)."""
    items = sorted(rejected, key=lambda r: r.line)
    # The rows carry citizens' ID and phone numbers: readable by the operator only, like the store.
    path.touch(mode=0o600)
    path.chmod(0o600)
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open("w", encoding="utf-8") as f:
            for r in items:
                f.write(json.dumps({"line": r.line, "MaHoSo": r.code, "reason": r.reason, "record": r.raw},
                                   ensure_ascii=False) + "\n")
        return
    names = list(dict.fromkeys([*columns, *(k for r in items for k in r.raw if not k.startswith("_"))]))
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["_line", "_reason", *names])
        for r in items:
            w.writerow([r.line, r.reason, *(_as_cell(r.raw.get(n)) for n in names)])


def _as_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# -- the portal check ----------------------------------------------------------------------------------


class LegacyCheck:
    """Looks up held imported dossiers on the portal and releases them per the collision rule."""

    def __init__(
        self,
        store: Store,
        service: DossierService,
        portal: Upstream,
        *,
        client_id: int,
        clock: Clock | None = None,
        wake: asyncio.Event | None = None,
        batch: int = 50,
    ) -> None:
        self.store = store
        self.service = service
        self.portal = portal
        self.client_id = client_id
        self.clock = clock or Clock()
        self.wake = wake
        # Told when held dossiers were released to the push queue (the portal's replicator looks again).
        self.on_release: Callable[[], None] | None = None
        self.batch = batch
        self.released = 0
        self.merged = 0
        self.collisions = 0
        self._none_until = 0.0

    async def held(self) -> int:
        row = await self.store.fetchone(
            "SELECT count(*) FROM replication WHERE target = ? AND state = ?", (TARGET, HELD)
        )
        return int(row[0]) if row else 0

    async def run_once(self) -> bool:
        """Check one batch of held dossiers; True when more are waiting.

        A lookup that fails (an :class:`adapters.base.UpstreamError`) leaves the whole batch held: the
        loop backs off and asks again.
        """
        # Holds are made only by an import, which needs the node stopped (it holds the data directory's lock):
        # once none is left, there is nothing to look for until the next start, bar a slow safety re-check.
        if time.monotonic() < self._none_until:
            return False
        if not await self.store.fetchone(
            "SELECT 1 FROM replication WHERE target = ? AND state = ? LIMIT 1", (TARGET, HELD)
        ):
            self._none_until = time.monotonic() + NONE_HELD_RECHECK_S
            return False
        batch = self.batch

        def claim(conn: sqlite3.Connection) -> list[Any]:
            # Read on the writer: the reader may still show a dossier this loop has just released.
            return conn.execute(
                "SELECT r.code, d.state, d.record FROM replication r LEFT JOIN dossiers d ON d.code = r.code"
                " WHERE r.target = ? AND r.state = ? ORDER BY r.code LIMIT ?",
                (TARGET, HELD, batch),
            ).fetchall()

        rows = await self.store.write(claim)
        if not rows:
            return False
        orphans = [str(code) for code, _, record in rows if record is None]
        if orphans:
            await _unhold(self.store, orphans)
        held = [(str(code), state, record) for code, state, record in rows if record is not None]
        # Looked up together (the adapter bounds the calls in flight); merged and released one by one.
        found = await asyncio.gather(*(self.portal.fetch(code, None) for code, _, _ in held))
        for (code, state, record), fetched in zip(held, found, strict=True):
            local = json.loads(self.store.sealer.record(code, record))
            remote = dict(fetched.record) if fetched is not None and fetched.record is not None else None
            await self._check(code, self.store.sealer.state(code, state), local, remote)
        if self.on_release is not None:
            self.on_release()
        if self.wake is not None:
            self.wake.set()
        return len(rows) >= self.batch

    async def _check(self, code: str, state: bytes, local: dict[str, Any], remote: dict[str, Any] | None) -> None:
        if remote is None:
            await self._release(code, None, None)
            return
        differs = [n for n in SAME_DOSSIER if str(remote.get(n)) != str(local.get(n))]
        if differs:
            detail = f"collision: code {code} is held by another dossier on the portal ({', '.join(differs)} differ)"
            log.error("dead_letter", target=TARGET, code=code, reason="collision", detail=detail)
            self.collisions += 1
            await self._release(code, None, detail)
            return
        # The units are this node's mapping of the old ones: the portal's (old) codes must not win them back.
        incoming = {k: v for k, v in remote.items() if k not in (RECEIVING_FIELD, COMPETENT_FIELD)}
        update = portal_update(
            code, state, local, None, incoming, client_id=self.client_id, hlc=self.service.hlc
        )
        result = await self.service.merge(Merge(code, update or b"", TARGET, base=remote))
        if result.status == 201:
            self.merged += 1
        await self._release(code, ack_for(remote), None)

    async def _release(self, code: str, ack: bytes | None, dead: str | None) -> None:
        at = iso(self.clock.now())
        state = "dead" if dead else "pending"

        def write(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE replication SET state = ?, digest = (SELECT digest FROM dossiers WHERE code = ?),"
                " acked_digest = NULL, ack = ?, attempts = 0, last_error = ?, next_at = 0, updated_at = ?"
                " WHERE target = ? AND code = ? AND state = ?",
                (state, code, ack, dead, at, TARGET, code, HELD),
            ).rowcount

        if not await self.store.write(write):
            log.warning("legacy_check_raced", target=TARGET, code=code)
            return
        if not dead:
            self.released += 1
        log.info("legacy_checked", target=TARGET, code=code, outcome=state, on_portal=ack is not None)
