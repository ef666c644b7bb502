"""Dossier writes: intake, steps and fees, committed through one group-commit writer.

Every committed change writes the dossier row (Doc state, materialised record, digest), the Y update in
the journal, the day counter and the idempotency record in one SQLite transaction. In-memory state that
mirrors the store (day counters, journal head, HLC, cached Docs) is only trusted after a commit: when a
transaction fails it is reloaded or dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from pycrdt import Doc

from node import audit
from node.clock import Clock, dvcqg, iso, local
from node.crypto import Sealer
from node.desk import search
from node.domain.status import allowed_next, is_legal
from node.domain.validation import validate_edit
from node.errors import ApiError, validation_error
from node.store import GroupCommit, Store
from sync import doc as ydoc
from sync.hlc import HLC, Stamp
from sync.merge import PORTAL_BASE_UPSERT
from sync.record import HLC_FIELD, build_record, materialise, normalise, step_key_of
from sync.record import digest as _digest
from sync.yupdate import Refused, decode_update

log = structlog.get_logger()

DEFAULT_OFFICER = "Bộ phận Một cửa"
DEFAULT_DEPARTMENT = "Bộ phận Tiếp nhận và Trả kết quả"
INTAKE_NOTE = "Tiếp nhận hồ sơ"
DOC_CACHE_SIZE = 512
_MAX_CLIENT_ID = 2**53 - 1


@dataclass(frozen=True)
class IdemKey:
    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class Result:
    status: int
    body: str


@dataclass
class Intake:
    clean: dict[str, Any]
    idem: IdemKey | None = None


@dataclass
class AddStep:
    code: str
    clean: dict[str, Any]
    idem: IdemKey | None = None


@dataclass
class AddFee:
    code: str
    clean: dict[str, Any]
    idem: IdemKey | None = None


@dataclass
class AddDocument:
    """Record a submitted document (TaiLieuNop item) whose file is already stored by content hash."""

    code: str
    clean: dict[str, Any]
    idem: IdemKey | None = None


@dataclass
class SetForwarding:
    """Move a boundary-free dossier along 1 received → 4 forwarded → 2 taken over (→ 3 on return)."""

    code: str
    action: str  # "forward" (receiving unit) or "take-over" (competent unit)
    idem: IdemKey | None = None


# action: (state it sets, field naming the unit allowed to do it, who that is)
FORWARDING_STEPS = {
    "forward": (4, "MaDonViTiepNhan", "receiving"),
    "take-over": (2, "MaDonViXuLy", "competent"),
}
FORWARDING_FROM = {"forward": 1, "take-over": 4}


@dataclass
class Merge:
    """Apply a Y update that came from elsewhere (an upstream or a peer), optionally with a pull cursor."""

    code: str
    update: bytes
    origin: str
    cursor: tuple[str, int] | None = None
    base: dict[str, Any] | None = None  # the portal record this merge was computed against, kept as base
    idem: IdemKey | None = None
    # False for what the node pulls again by itself if a power cut loses it (an upstream's change with the
    # feed cursor behind it): its commit need not wait for an fsync (see Store.write).
    durable: bool = True


@dataclass
class Edit:
    """Correct editable fields, only while the dossier's digest is one of ``if_match`` (what the clerk saw)."""

    code: str
    body: Any  # validated in the writer, against the record it changes
    if_match: tuple[str, ...]
    idem: IdemKey | None = None


Op = Intake | AddStep | AddFee | Merge | SetForwarding | AddDocument | Edit


@dataclass
class _Entry:
    doc: Doc[Any]
    record: dict[str, Any]


@dataclass
class _Batch:
    inserts: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    updates: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    journal: list[tuple[int, str, bytes, str]] = field(default_factory=list)
    idem: list[tuple[str, str, str, int, str, str]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    cursors: dict[str, int] = field(default_factory=dict)
    minted: bool = False
    bases: dict[str, str] = field(default_factory=dict)
    audited: list[audit.Change] = field(default_factory=list)


def request_hash(body: object) -> str:
    raw = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(raw.encode()).hexdigest()


def response_body(record_json: str, digest: str, **extra: Any) -> str:
    # The stored record is already JSON: splice the digest in rather than decode and re-encode it.
    tail = "".join(f",{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}" for k, v in extra.items())
    return f'{record_json[:-1]},"digest":"{digest}"{tail}}}'


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class DossierService:
    """Writes dossiers; one instance per node, owning the store's writer connection."""

    def __init__(
        self,
        store: Store,
        *,
        unit: str,
        agency: str,
        clock: Clock,
        max_batch: int = 512,
        due_date: Callable[[str, datetime], str] | None = None,
    ) -> None:
        self.store = store
        # NgayHenTra for an intake that left it out: (procedure code, receipt time) -> yyyyMMddHHmmss.
        self.due_date = due_date
        self.unit = unit
        self.agency = agency
        self.clock = clock
        self.client_id = 0
        self.hlc = HLC(physical=clock.ms)
        self.writer: GroupCommit[Op, Result] = GroupCommit(self._process, max_batch=max_batch)
        self._counters: dict[tuple[str, str], int] = {}
        self._journal_head = 0
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        # Set after every commit that wrote to the journal: replicators wake on it instead of polling.
        self.listeners: list[asyncio.Event] = []

    # -- start-up -----------------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the node identity, HLC and journal head; mint a client id on a new store."""
        cid = await self.store.get_meta("client_id")
        if cid is None:
            # 53 bits: a Y client id must survive a round trip through a JavaScript number.
            new_id = secrets.randbelow(_MAX_CLIENT_ID - 1) + 1
            await self.store.write(
                lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('client_id', ?)", (str(new_id),))
            )
            cid = str(new_id)
        self.client_id = int(cid)
        await self._reload()

    async def _reload(self) -> None:
        hlc = await self.store.get_meta("hlc")
        self.hlc.reset(Stamp.decode(hlc) if hlc else Stamp(0, 0))
        row = await self.store.fetchone(
            "SELECT max(coalesce((SELECT max(seq) FROM journal), 0),"
            " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0))"
        )
        self._journal_head = int(row[0]) if row else 0
        self._counters.clear()

    async def client_id_for(self, writer: str) -> int:
        """This node's own client id for what it writes on behalf of ``writer`` (an upstream); persisted."""
        key = f"client_id:{writer}"
        cid = await self.store.get_meta(key)
        if cid is None:
            new_id = secrets.randbelow(_MAX_CLIENT_ID - 1) + 1
            while new_id == self.client_id:
                new_id = secrets.randbelow(_MAX_CLIENT_ID - 1) + 1
            row = (key, str(new_id))
            await self.store.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES (?, ?)", row))
            cid = str(new_id)
        return int(cid)

    @property
    def journal_head(self) -> int:
        return self._journal_head

    async def seed_counters(self, codes: list[str]) -> dict[str, int]:
        """Raise the day counters past every code of this agency that an upstream already holds.

        A node starting on an empty store (a new or rebuilt server) must not mint a code that the
        upstreams already hold for another dossier.
        """
        prefix = f"{self.agency}-"
        highest: dict[str, int] = {}
        for code in codes:
            if not code.startswith(prefix):
                continue
            day, _, seq = code[len(prefix) :].partition("-")
            if len(day) == 6 and day.isdigit() and seq.isdigit():
                highest[day] = max(highest.get(day, 0), int(seq))
        if highest:
            rows = [(self.agency, day, n) for day, n in highest.items()]
            await self.store.write(
                lambda c: c.executemany(
                    "INSERT INTO day_counters (agency, day, last) VALUES (?, ?, ?)"
                    " ON CONFLICT (agency, day) DO UPDATE SET last = max(last, excluded.last)",
                    rows,
                )
            )
            self._counters.clear()
        return highest

    # -- public operations --------------------------------------------------------------------------
    async def intake(self, clean: dict[str, Any], idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(Intake(clean, idem))

    async def add_step(self, code: str, clean: dict[str, Any], idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(AddStep(code, clean, idem))

    async def add_fee(self, code: str, clean: dict[str, Any], idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(AddFee(code, clean, idem))

    async def add_document(self, code: str, clean: dict[str, Any], idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(AddDocument(code, clean, idem))

    async def edit(self, code: str, body: Any, if_match: tuple[str, ...], idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(Edit(code, body, if_match, idem))

    async def forwarding(self, code: str, action: str, idem: IdemKey | None = None) -> Result:
        return await self.writer.submit(SetForwarding(code, action, idem))

    async def merge(self, op: Merge) -> Result:
        """Apply a remote Y update (200 unchanged, 201 changed or created); 422 when it is not a dossier."""
        return await self.writer.submit(op)

    # -- the batch ----------------------------------------------------------------------------------
    async def _process(self, ops: list[Op]) -> list[Result | BaseException]:
        results: list[Result | BaseException | None] = [None] * len(ops)
        followers = await self._check_idempotency(ops, results)
        now = self.clock.now()
        day = local(now).strftime("%y%m%d")
        await self._prepare(ops, results, day)

        batch = _Batch()
        saved = (dict(self._counters), self._journal_head, self.hlc.last)
        for i, op in enumerate(ops):
            if results[i] is not None:
                continue
            try:
                results[i] = self._apply(op, batch, now, day)
            except ApiError as exc:
                results[i] = exc
        if batch.journal or batch.idem or batch.cursors or batch.bases:
            durable = any(not isinstance(op, Merge) or op.durable for op in ops)
            try:
                await self._commit(batch, day, durable=durable)
            except BaseException:
                # Nothing of this batch is in the store: forget what memory learned from it.
                self._counters, self._journal_head = saved[0], saved[1]
                self.hlc.reset(saved[2])
                for code in batch.touched:
                    self._cache.pop(code, None)
                raise
            if batch.journal:
                for event in self.listeners:
                    event.set()
        for i, leader in followers.items():
            results[i] = self._follow(ops[i], ops[leader], results[leader])
        return [r if r is not None else ApiError(500, "internal", "no result") for r in results]

    async def _check_idempotency(self, ops: list[Op], results: list[Result | BaseException | None]) -> dict[int, int]:
        keyed = [(i, op.idem) for i, op in enumerate(ops) if op.idem is not None]
        if not keyed:
            return {}
        marks = ",".join("(?, ?)" for _ in keyed)
        params: list[str] = []
        for _, k in keyed:
            params += [k.scope, k.key]
        rows = await self.store.fetchall(
            f"SELECT scope, key, request_hash, status, body FROM idempotency WHERE (scope, key) IN (VALUES {marks})",
            params,
        )
        stored = {(r[0], r[1]): (r[2], int(r[3]), self.store.sealer.idem_body(r[0], r[1], r[4])) for r in rows}
        leaders: dict[tuple[str, str], int] = {}
        followers: dict[int, int] = {}
        for i, k in keyed:
            prev = stored.get((k.scope, k.key))
            if prev is not None:
                results[i] = Result(prev[1], prev[2]) if prev[0] == k.request_hash else _idem_mismatch(k)
            elif (k.scope, k.key) in leaders:
                followers[i] = leaders[(k.scope, k.key)]
                results[i] = _PENDING
            else:
                leaders[(k.scope, k.key)] = i
        return followers

    def _follow(self, op: Op, leader: Op, leader_result: Result | BaseException | None) -> Result | BaseException:
        assert op.idem is not None and leader.idem is not None
        if op.idem.request_hash != leader.idem.request_hash:
            return _idem_mismatch(op.idem)
        return leader_result if leader_result is not None else ApiError(500, "internal", "no result")

    async def _prepare(self, ops: list[Op], results: list[Result | BaseException | None], day: str) -> None:
        """Load what the batch needs in at most two reads: the day counter and uncached Docs."""
        if any(isinstance(op, Intake) and results[i] is None for i, op in enumerate(ops)):
            key = (self.agency, day)
            if key not in self._counters:
                row = await self.store.fetchone("SELECT last FROM day_counters WHERE agency = ? AND day = ?", key)
                self._counters[key] = int(row[0]) if row else 0
        wanted = {
            op.code
            for i, op in enumerate(ops)
            if not isinstance(op, Intake) and results[i] is None and op.code not in self._cache
        }
        if wanted:
            marks = ",".join("?" for _ in wanted)
            rows = await self.store.fetchall(
                f"SELECT code, state, record FROM dossiers WHERE code IN ({marks})", list(wanted)
            )
            for code, state, record in rows:
                state, record = self.store.sealer.state(code, state), self.store.sealer.record(code, record)
                self._remember(code, _Entry(ydoc.load_doc(code, bytes(state), self.client_id), json.loads(record)))

    def _remember(self, code: str, entry: _Entry) -> None:
        self._cache[code] = entry
        self._cache.move_to_end(code)
        while len(self._cache) > DOC_CACHE_SIZE:
            self._cache.popitem(last=False)

    def _apply(self, op: Op, batch: _Batch, now: Any, day: str) -> Result:
        start = len(batch.journal)
        if isinstance(op, Intake):
            result = self._apply_intake(op, batch, now, day)
        elif isinstance(op, AddStep):
            result = self._apply_step(op, batch, now)
        elif isinstance(op, Merge):
            result = self._apply_merge(op, batch, now)
        elif isinstance(op, SetForwarding):
            result = self._apply_forwarding(op, batch, now)
        elif isinstance(op, AddDocument):
            result = self._apply_document(op, batch, now)
        elif isinstance(op, Edit):
            result = self._apply_edit(op, batch, now)
        else:
            result = self._apply_fee(op, batch, now)
        batch.audited += audit.collect(audit.kind_of(op), batch.journal[start:], batch.inserts, batch.updates)
        if op.idem is not None and result.status < 300:
            batch.idem.append((op.idem.scope, op.idem.key, op.idem.request_hash, result.status, result.body, iso(now)))
        return result

    def _mint(self, day: str) -> str:
        key = (self.agency, day)
        n = self._counters[key] + 1
        self._counters[key] = n
        # Four digits per Circular 01/2018; past 9,999 in a day the sequence simply grows a fifth digit.
        return f"{self.agency}-{day}-{n:04d}"

    def _apply_intake(self, op: Intake, batch: _Batch, now: Any, day: str) -> Result:
        clean = dict(op.clean)
        if clean.get("NgayHenTra") is None and self.due_date is not None:
            # Before minting: an intake refused for want of a due date must not use up a code.
            clean["NgayHenTra"] = self.due_date(str(clean["MaTTHC"]), now)
        code = self._mint(day)
        batch.minted = True
        received = dvcqg(now)
        documents = clean.pop("TaiLieuNop", None) or []
        fees = clean.pop("DanhSachLePhi", None) or []
        officer = clean.pop("NguoiTiepNhan", None) or DEFAULT_OFFICER
        competent = clean.get("MaDonViXuLy") or self.unit
        fields = {
            **clean,
            "MaHoSo": code,
            "NgayTiepNhan": received,
            "MaDonViTiepNhan": self.unit,
            "MaDonViXuLy": competent,
        }
        if competent != self.unit:
            fields["TrangThaiPhiDiaGioi"] = 1  # received here, to be forwarded to the competent unit
        step = {
            "MaHoSo": code,
            "NguoiXuLy": officer,
            "ThoiDiemXuLy": received,
            "PhongBanXuLy": DEFAULT_DEPARTMENT,
            "NoiDungXuLy": INTAKE_NOTE,
            "TrangThai": 2,
        }
        stamp = self.hlc.now().encode()
        step_value = {**step, HLC_FIELD: stamp}
        key = step_key_of(step)
        docs = {str(d["TepDinhKemId"]): d for d in documents}
        fee_map = {str(f["MaPhiLePhi"]): f for f in fees}
        doc, update = ydoc.create(code, self.client_id, fields, {key: step_value}, docs, fee_map)
        # The record is built from the values just written rather than read back from the Doc: the same
        # function materialise() uses, on the same values (tests check the two agree).
        record, conflicts = build_record(
            {k: v for k, v in fields.items() if v is not None}, [(key, step_value)], docs, fee_map
        )
        record_json, digest = _dumps(record), _digest(record)
        at = iso(now)
        seq = self._next_seq()
        batch.journal.append((seq, code, update, at))
        # A new Doc's first update is its whole state.
        batch.inserts[code] = (
            code,
            self.unit,
            competent,
            record["TrangThaiHoSo"],
            update,
            record_json,
            digest,
            _dumps(conflicts),
            at,
            at,
            seq,
        )
        batch.touched.add(code)
        self._remember(code, _Entry(doc, record))
        return Result(201, response_body(record_json, digest))

    def _entry(self, code: str) -> _Entry:
        entry = self._cache.get(code)
        if entry is None:
            raise ApiError(404, "not_found", f"no dossier with code {code!r}")
        return entry

    def _commit_change(self, code: str, entry: _Entry, update: bytes, batch: _Batch, now: Any) -> Result:
        record, conflicts = materialise(entry.doc)
        entry.record = record
        record_json, digest = _dumps(record), _digest(record)
        at = iso(now)
        seq = self._next_seq()
        batch.journal.append((seq, code, update, at))
        row = (
            record["TrangThaiHoSo"],
            entry.doc.get_update(),
            record_json,
            digest,
            _dumps(conflicts),
            at,
            seq,
            record.get("MaDonViXuLy") or self.unit,
        )
        if code in batch.inserts:
            ins = batch.inserts[code]
            batch.inserts[code] = (*ins[:3], row[0], row[1], row[2], row[3], row[4], ins[8], at, seq)
        else:
            batch.updates[code] = (*row, code)
        batch.touched.add(code)
        self._cache.move_to_end(code)
        return Result(201, response_body(record_json, digest))

    def _apply_merge(self, op: Merge, batch: _Batch, now: Any) -> Result:
        if op.cursor is not None:
            target, seq = op.cursor
            batch.cursors[target] = max(seq, batch.cursors.get(target, 0))
        if op.base is not None:
            batch.bases[op.code] = _dumps(op.base)
        if not op.update:
            return Result(200, "{}")  # only a cursor (and maybe a base) to record
        try:
            # Read the update's shape before yrs does: a deeply nested value would crash the process.
            decode_update(op.update)
        except Refused as exc:
            raise ApiError(400, "corrupt_update", f"the update for {op.code} is refused: {exc.message}") from exc
        entry = self._cache.get(op.code)
        if entry is None:
            return self._merge_new(op, batch, now)
        before = entry.doc.get_state()
        try:
            entry.doc.apply_update(op.update)
        except Exception as exc:
            # pycrdt reports a malformed update with various exception types; none of them may reach the loop.
            self._cache.pop(op.code, None)  # the Doc may be half-applied: reload it from the store
            raise ApiError(400, "corrupt_update", f"the update for {op.code} cannot be applied: {exc}") from exc
        if entry.doc.get_state() == before:
            return self._current(entry, 200)
        self._observe_stamps(entry.doc)
        return self._commit_change(op.code, entry, entry.doc.get_update(before), batch, now)

    def _observe_stamps(self, doc: Doc[Any]) -> None:
        # Later local steps must sort after what arrived; a stamp far ahead is clamped by the HLC itself.
        stamps = [v.get(HLC_FIELD) for v in ydoc.steps_map(doc).values() if isinstance(v, dict)]
        latest = max((s for s in stamps if isinstance(s, str)), default=None)
        if latest is not None:
            with contextlib.suppress(ValueError):
                self.hlc.observe(Stamp.decode(latest))

    def _merge_new(self, op: Merge, batch: _Batch, now: Any) -> Result:
        """A dossier this node has not held yet (received elsewhere, or online through an upstream)."""
        doc = ydoc.new_doc(op.code, self.client_id)
        try:
            doc.apply_update(op.update)
        except Exception as exc:
            raise ApiError(400, "corrupt_update", f"the update for {op.code} cannot be applied: {exc}") from exc
        record, conflicts = materialise(doc)
        self._observe_stamps(doc)
        if record.get("MaHoSo") != op.code:
            raise ApiError(422, "not_a_dossier", f"the update does not hold dossier {op.code} (MaHoSo differs)")
        update = doc.get_update()
        record_json, digest = _dumps(record), _digest(record)
        at = iso(now)
        seq = self._next_seq()
        batch.journal.append((seq, op.code, update, at))
        receiving = str(record.get("MaDonViTiepNhan") or "")
        competent = str(record.get("MaDonViXuLy") or receiving)
        batch.inserts[op.code] = (
            op.code,
            receiving,
            competent,
            record["TrangThaiHoSo"],
            update,
            record_json,
            digest,
            _dumps(conflicts),
            at,
            at,
            seq,
        )
        batch.touched.add(op.code)
        self._remember(op.code, _Entry(doc, record))
        return Result(201, response_body(record_json, digest))

    def _apply_step(self, op: AddStep, batch: _Batch, now: Any) -> Result:
        entry = self._entry(op.code)
        step = {**op.clean, "MaHoSo": op.code}
        step.setdefault("ThoiDiemXuLy", dvcqg(now))
        if step_key_of(step) in ydoc.steps_map(entry.doc):
            return self._current(entry, 200)
        current = entry.record.get("TrangThaiHoSo")
        status = int(step["TrangThai"])
        if not is_legal(current, status):
            allowed = sorted(allowed_next(current))
            raise ApiError(
                409,
                "illegal_transition",
                f"a dossier in status {current} cannot move to status {status}"
                + (f"; allowed next: {', '.join(map(str, allowed))}" if allowed else "; the status is final"),
                fields={"TrangThai": f"must be one of {allowed}" if allowed else "the dossier's status is final"},
                extra={"current": current, "allowed": allowed},
            )
        stamp = self.hlc.now().encode()
        # Returning the result of a boundary-free dossier also ends its forwarding (state 3, returned).
        returned = status == 10 and entry.record.get("TrangThaiPhiDiaGioi") in (2, 4)

        def write(d: Doc[Any]) -> None:
            ydoc.add_step(d, step, stamp)
            if returned:
                ydoc.put_fields(d, {"TrangThaiPhiDiaGioi": 3})

        update = ydoc.change(entry.doc, write)
        return self._commit_change(op.code, entry, update, batch, now)

    def _apply_forwarding(self, op: SetForwarding, batch: _Batch, now: Any) -> Result:
        entry = self._entry(op.code)
        record = entry.record
        current = record.get("TrangThaiPhiDiaGioi")
        if current is None:
            raise ApiError(
                409,
                "not_boundary_free",
                f"{op.code} is handled by the unit that received it; there is nothing to forward",
            )
        wanted, actor_field, actor = FORWARDING_STEPS[op.action]
        if current == wanted:
            return self._current(entry, 200)
        expected = FORWARDING_FROM[op.action]
        if current != expected:
            raise ApiError(
                409,
                "illegal_forwarding",
                f"forwarding state is {current}; {op.action} needs state {expected}",
                extra={"current": current},
            )
        if record.get(actor_field) != self.unit:
            raise ApiError(
                403,
                "wrong_unit",
                f"only the {actor} unit ({record.get(actor_field)}) can {op.action}"
                f" {op.code}; this node is unit {self.unit}",
            )
        update = ydoc.change(entry.doc, lambda d: ydoc.put_fields(d, {"TrangThaiPhiDiaGioi": wanted}))
        return self._commit_change(op.code, entry, update, batch, now)

    def _apply_document(self, op: AddDocument, batch: _Batch, now: Any) -> Result:
        # The download URL follows the node's configuration; the same file with the same metadata is the
        # same document even after the URL changed.
        return self._append_once(
            op, batch, now, what="document", key_field="TepDinhKemId", get=ydoc.get_document,
            add=ydoc.add_document, ignore=frozenset({"DuongDanTaiTepTin"}),
        )  # fmt: skip

    def _apply_edit(self, op: Edit, batch: _Batch, now: Any) -> Result:
        entry = self._entry(op.code)
        current = _digest(entry.record)
        if current not in op.if_match:
            raise ApiError(
                412,
                "precondition_failed",
                f"{op.code} changed since the clerk read it; the current record and its digest are in 'record'",
                fields={"If-Match": f'the current digest is "{current}"'},
                extra={"record": json.loads(response_body(_dumps(entry.record), current))},
                headers={"ETag": f'"{current}"'},
            )
        clean, errors = validate_edit(op.body, current=entry.record)
        if errors:
            raise validation_error(errors)
        changes = {k: v for k, v in clean.items() if entry.record.get(k) != v}
        if not changes:
            return self._current(entry, 200)
        update = ydoc.change(entry.doc, lambda d: ydoc.put_fields(d, changes))
        return self._commit_change(op.code, entry, update, batch, now)

    def _apply_fee(self, op: AddFee, batch: _Batch, now: Any) -> Result:
        return self._append_once(op, batch, now, what="fee", key_field="MaPhiLePhi", get=ydoc.get_fee, add=ydoc.add_fee)

    def _append_once(
        self,
        op: AddFee | AddDocument,
        batch: _Batch,
        now: Any,
        *,
        what: str,
        key_field: str,
        get: Callable[[Doc[Any], str], Any],
        add: Callable[[Doc[Any], dict[str, Any]], object],
        ignore: frozenset[str] = frozenset(),
    ) -> Result:
        """Record an append-only item (a fee, a document) once: the same values again answer 200, others 409."""
        entry = self._entry(op.code)
        key = str(op.clean[key_field])
        existing = get(entry.doc, key)
        if existing is not None:
            if {k: v for k, v in normalise(existing).items() if k not in ignore} == {
                k: v for k, v in op.clean.items() if k not in ignore
            }:
                return self._current(entry, 200)
            raise ApiError(
                409,
                f"{what}_exists",
                f"{what} {key!r} is already recorded with different values; {what}s are append-only",
                fields={key_field: "already recorded on this dossier"},
            )

        def write(d: Doc[Any]) -> None:
            add(d, op.clean)

        update = ydoc.change(entry.doc, write)
        return self._commit_change(op.code, entry, update, batch, now)

    def _current(self, entry: _Entry, status: int) -> Result:
        return Result(status, response_body(_dumps(entry.record), _digest(entry.record)))

    def _next_seq(self) -> int:
        self._journal_head += 1
        return self._journal_head

    async def _commit(self, batch: _Batch, day: str, *, durable: bool = True) -> None:
        key = (self.agency, day)
        counter = (*key, self._counters[key]) if batch.minted else None
        hlc = self.hlc.last.encode()
        await self.store.write(lambda conn: _write_batch(conn, batch, counter, hlc, self.store.sealer), durable=durable)


def _write_batch(
    conn: sqlite3.Connection,
    batch: _Batch,
    counter: tuple[str, str, int] | None,
    hlc: str,
    sealer: Sealer | None = None,
) -> None:
    """Every statement of one group commit; runs on the store's writer thread inside its transaction."""
    clear, batch = batch, sealer.seal_batch(batch) if sealer is not None else batch  # contents sealed at rest
    if batch.inserts:
        conn.executemany(
            "INSERT INTO dossiers (code, receiving_unit, competent_unit, status, state, record, digest,"
            " conflicts, created_at, updated_at, change_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            list(batch.inserts.values()),
        )
    if batch.updates:
        conn.executemany(
            "UPDATE dossiers SET status = ?, state = ?, record = ?, digest = ?, conflicts = ?,"
            " updated_at = ?, change_seq = ?, competent_unit = ? WHERE code = ?",
            list(batch.updates.values()),
        )
    if batch.inserts or batch.updates:
        # The search index changes in the same transaction as the records it indexes.
        search.index(
            conn,
            [(row[0], row[5]) for row in clear.inserts.values()] + [(row[8], row[2]) for row in clear.updates.values()],
            sealer.keyed_hash if sealer is not None and sealer.enabled else None,
        )
    if batch.journal:
        conn.executemany('INSERT INTO journal (seq, code, "update", at) VALUES (?,?,?,?)', batch.journal)
    if counter is not None:
        conn.execute(
            "INSERT INTO day_counters (agency, day, last) VALUES (?, ?, ?)"
            " ON CONFLICT (agency, day) DO UPDATE SET last = excluded.last",
            counter,
        )
    if batch.idem:
        conn.executemany(
            "INSERT OR IGNORE INTO idempotency (scope, key, request_hash, status, body, created_at)"
            " VALUES (?,?,?,?,?,?)",
            batch.idem,
        )
    if batch.cursors:
        conn.executemany(
            "INSERT INTO pull_cursors (target, seq) VALUES (?, ?)"
            " ON CONFLICT (target) DO UPDATE SET seq = max(seq, excluded.seq)",
            list(batch.cursors.items()),
        )
    if batch.bases:
        conn.executemany(
            PORTAL_BASE_UPSERT,
            list(batch.bases.items()),
        )
    if batch.audited:
        audit.append(conn, batch.audited)
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('hlc', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (hlc,),
    )


def _idem_mismatch(k: IdemKey) -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body",
        fields={"Idempotency-Key": "already used with a different body; use a new key for a new request"},
    )


_PENDING = Result(0, "")
