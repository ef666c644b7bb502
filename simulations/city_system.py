"""Stand-in for the city's one-stop platform: CRDT-native, OAuth client credentials, msgpack sync.

A real aiohttp server with its own SQLite store (WAL) in a data directory. It keeps one Y Doc per
dossier and speaks the protocol the city adapter uses:

- ``POST /oauth/token``: client-credentials grant (form or JSON body, or HTTP Basic) → Bearer token.
- ``POST /api/v1/sync``: msgpack ``[[code, y_update], ...]`` (at most 500); each update is applied to a
  scratch copy of the stored Doc, validated as the city's platform would, and all accepted changes of
  the batch are committed in one transaction. Answer: msgpack
  ``{"results": [[code, state_vector, digest, error], ...]}``, one per item, in order.
- ``GET /api/v1/docs/{code}?sv=...``: the diff against a base64url state vector (or the full state).
- ``GET /feed?unit=&since=&limit=``: the unit's dossiers by the stand-in's own commit sequence, each item
  ``{"code", "seq", "sv"}`` with the base64url state vector of the Doc as it stands.
- ``GET /api/v1/digests?unit=&bucket=&buckets=``: ``{"digests": {code: digest}}`` of the unit's dossiers
  (received or competent) in one anti-entropy bucket (:func:`sync.record.bucket_of`).
- ``/__faults`` (see :mod:`simulations.faults`) and ``/__inspect/dossiers``, ``/__inspect/stats``;
  ``POST /__credentials`` ``{client_id?, client_secret?}`` rotates the client credentials and revokes
  every token issued so far.

Like the real platform it does not judge status transitions across calls: a merged history may arrive
in any order. It only refuses Docs no replica should ever produce.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information
import pycrdt
from aiohttp import web
from pycrdt import Array, Doc, Map

from simulations.faults import Faults, Handler, Stats
from simulations.serving import running
from sync.record import (
    DOCUMENTS,
    FEES,
    FIELDS,
    STEPS,
    bucket_of,
    digest,
    read_roots,
    record_from_roots,
    step_key_of,
)
from sync.statevector import decode_state_vector

DEFAULT_CLIENT_ID = "wardsync"
DEFAULT_CLIENT_SECRET = "wardsync-demo"
MAX_BATCH = 500
MAX_FEED_LIMIT = 1000
MAX_BUCKETS = 4096
DB_NAME = "city.sqlite3"
# A full batch of 500 Docs with attachments' metadata is well over aiohttp's 1 MiB default.
MAX_BODY_BYTES = 64 * 1024 * 1024
# In-flight requests get this long on shutdown; a blackholed one would otherwise hold it for an hour.

ROOTS = (FIELDS, STEPS, DOCUMENTS, FEES)
REQUIRED_FIELDS = ("MaHoSo", "MaTTHC", "ChuHoSo", "NgayTiepNhan", "MaDonViTiepNhan")
_UNIT_RE = re.compile(r"[0-9]{5}")
_DATETIME_RE = re.compile(r"[0-9]{14}")
_SCALARS = (str, int, float, bool)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dossiers (
    code            TEXT PRIMARY KEY,
    state           BLOB NOT NULL,
    state_vector    BLOB NOT NULL,
    digest          TEXT NOT NULL,
    status          INTEGER,
    receiving_unit  TEXT,
    competent_unit  TEXT,
    steps           INTEGER NOT NULL,
    step_duplicates INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dossiers_seq ON dossiers(seq);
CREATE INDEX IF NOT EXISTS dossiers_receiving ON dossiers(receiving_unit, seq);
CREATE INDEX IF NOT EXISTS dossiers_competent ON dossiers(competent_unit, seq)
"""

_UPSERT = """
INSERT INTO dossiers (code, state, state_vector, digest, status, receiving_unit, competent_unit, steps,
                      step_duplicates, seq, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(code) DO UPDATE SET
    state = excluded.state, state_vector = excluded.state_vector, digest = excluded.digest,
    status = excluded.status, receiving_unit = excluded.receiving_unit,
    competent_unit = excluded.competent_unit, steps = excluded.steps,
    step_duplicates = excluded.step_duplicates, seq = excluded.seq, updated_at = excluded.updated_at
"""


class InvalidDoc(ValueError):
    """The Doc an update would produce is not one the city platform accepts."""


def _load(state: bytes | None) -> Doc[Any]:
    # The stand-in never writes to a Doc, so the client id it would write under does not matter.
    doc: Doc[Any] = Doc(skip_gc=True)  # as the node's: values that lost a concurrent edit stay readable
    if state is not None:
        doc.apply_update(state)
    return doc


def _is_json_value(value: Any) -> bool:
    """Plain JSON data (what pycrdt gives back for an immutable value), never a nested shared type."""
    if value is None or isinstance(value, _SCALARS):
        return True
    if isinstance(value, list):
        return all(_is_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def validate(doc: Doc[Any], code: str, before_steps: frozenset[str]) -> dict[str, Any]:
    """The record of a Doc the city platform accepts for ``code``; raises :class:`InvalidDoc`."""
    extra = sorted(set(doc.keys()) - set(ROOTS))
    if extra:
        raise InvalidDoc(f"unknown root types {extra}")
    for name in ROOTS:
        # A Map root that also holds sequence content was written as another type by someone: refuse it.
        if len(doc.get(name, type=Array)) != 0:
            raise InvalidDoc(f"root {name!r} must be a Map")
    fields, steps, documents, fees = read_roots(doc)
    for name, value in fields.items():
        if value is not None and not isinstance(value, _SCALARS):
            raise InvalidDoc(f"field {name} must be a scalar")
    if fields.get("MaHoSo") != code:
        raise InvalidDoc(f"fields.MaHoSo must equal the dossier code {code!r}")
    missing = [name for name in REQUIRED_FIELDS if fields.get(name) in (None, "")]
    if missing:
        raise InvalidDoc(f"missing fields {missing}")
    if not _DATETIME_RE.fullmatch(str(fields["NgayTiepNhan"])):
        raise InvalidDoc("NgayTiepNhan must be yyyyMMddHHmmss")
    for unit_field in ("MaDonViTiepNhan", "MaDonViXuLy"):
        unit = fields.get(unit_field)
        if unit is not None and not _UNIT_RE.fullmatch(str(unit)):
            raise InvalidDoc(f"{unit_field} must be a 5-digit unit code")

    for key, value in steps.items():
        if not isinstance(value, dict) or not _is_json_value(value):
            raise InvalidDoc(f"step {key} must be a plain JSON object")
        if value.get("MaHoSo") != code:
            raise InvalidDoc(f"step {key} belongs to another dossier")
        if not _DATETIME_RE.fullmatch(str(value.get("ThoiDiemXuLy", ""))):
            raise InvalidDoc(f"step {key}: ThoiDiemXuLy must be yyyyMMddHHmmss")
        status = value.get("TrangThai")
        if not isinstance(status, int | float) or isinstance(status, bool) or status not in range(1, 11):
            raise InvalidDoc(f"step {key}: TrangThai must be a status code 1..10")
        if not isinstance(value.get("NguoiXuLy"), str):
            raise InvalidDoc(f"step {key}: NguoiXuLy is required")
        if step_key_of(value) != key:
            raise InvalidDoc(f"step {key} is not stored under its natural key")
    deleted = before_steps - steps.keys()
    if deleted:
        raise InvalidDoc(f"steps are never deleted ({len(deleted)} gone)")
    for name, items in ((DOCUMENTS, documents), (FEES, fees)):
        for key, value in items.items():
            if not isinstance(value, dict) or not _is_json_value(value):
                raise InvalidDoc(f"{name} {key} must be a plain JSON object")
    try:
        return record_from_roots(fields, steps, documents, fees)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidDoc(f"record cannot be built: {exc}") from exc


def _step_duplicates(record: Mapping[str, Any]) -> int:
    keys = [step_key_of(s) for s in record.get("QuaTrinhXuLy") or []]
    return len(keys) - len(set(keys))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json_error(
    status: int, error: str, description: str = "", headers: Mapping[str, str] | None = None
) -> web.Response:
    body = {"error": error, **({"error_description": description} if description else {})}
    return web.json_response(body, status=status, headers=headers)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _msgpack(body: Any) -> web.Response:
    return web.Response(body=msgpack.packb(body, use_bin_type=True), content_type="application/msgpack")


@dataclass
class _Token:
    issued_at: float
    expires_at: float


@dataclass
class _Work:
    """One dossier touched by a sync batch: its Doc as accepted so far and what it was when loaded."""

    doc: Doc[Any] | None
    sv: dict[int, int]
    digest: str | None
    steps: frozenset[str]
    changed: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def answer(self, code: str, error: str | None) -> list[Any]:
        """``[code, state_vector, digest, error]`` of the Doc as it stands now (``None``s when unknown)."""
        return [code, None if self.doc is None else self.doc.get_state(), self.digest, error]


class CitySystem:
    """The stand-in's state and handlers; one per application."""

    def __init__(
        self, data_dir: Path, *, client_id: str, client_secret: str, token_ttl_s: float, faults: Faults
    ) -> None:
        self.data_dir = data_dir
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl_s = token_ttl_s
        self.faults = faults
        self.stats = Stats()
        self.tokens_issued = 0
        # Bytes of Y updates received: what tells a client that sends diffs from one that resends whole Docs.
        self.update_bytes = 0
        self._tokens: dict[str, _Token] = {}
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Load-apply-store of a Doc must not interleave with another batch touching the same Doc.
        self._write_lock = asyncio.Lock()
        self._seq = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / DB_NAME
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=5000"):
                await writer.execute(f"PRAGMA {pragma}")
            await writer.executescript(_SCHEMA)
            async with writer.execute("SELECT coalesce(max(seq), 0) FROM dossiers") as cur:
                row = await cur.fetchone()
            self._seq = int(row[0]) if row else 0
            # Reads get their own connection so they never see a batch half-way through its transaction.
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            await writer.close()
            raise
        self._writer, self._reader = writer, reader

    async def close(self) -> None:
        """Close both connections; idempotent; re-raises the first error after trying both."""
        first: BaseException | None = None
        for conn in (self._writer, self._reader):
            if conn is None:
                continue
            try:
                await conn.close()
            except BaseException as exc:
                first = first or exc
        self._writer = self._reader = None
        if first is not None:
            raise first

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await self.open()
        try:
            yield
        finally:
            await self.close()

    @property
    def writer(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise RuntimeError("city system store is closed")
        return self._writer

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise RuntimeError("city system store is closed")
        return self._reader

    # -- request accounting ------------------------------------------------------------------------

    @web.middleware
    async def count_requests(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/__"):
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self.stats.request(_outcome(exc.status))
            raise
        except Exception:
            self.stats.request("error")
            raise
        self.stats.request(_outcome(response.status))
        return response

    # -- OAuth -------------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        params: dict[str, Any]
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                return _json_error(400, "invalid_request", "body is not JSON")
            params = body if isinstance(body, dict) else {}
        else:
            params = dict(await request.post())
        client_id, client_secret = params.get("client_id"), params.get("client_secret")
        basic = _basic_credentials(request.headers.get("Authorization", ""))
        if basic is not None:
            client_id, client_secret = basic
        if params.get("grant_type") != "client_credentials":
            return _json_error(400, "unsupported_grant_type", "only client_credentials is supported")
        if not (
            isinstance(client_id, str)
            and isinstance(client_secret, str)
            and hmac.compare_digest(client_id.encode(), self.client_id.encode())
            and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())
        ):
            return _json_error(401, "invalid_client", headers={"WWW-Authenticate": 'Basic realm="city"'})
        now = self.faults.clock()
        self._tokens = {t: v for t, v in self._tokens.items() if v.expires_at > now}
        token = secrets.token_urlsafe(32)
        self._tokens[token] = _Token(issued_at=now, expires_at=now + self.token_ttl_s)
        self.tokens_issued += 1
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": _seconds(self.token_ttl_s)},
            headers={"Cache-Control": "no-store"},
        )

    def _unauthorised(self, request: web.Request) -> web.Response | None:
        """``None`` when the request carries a live Bearer token, else the 401 to send."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None or self.faults.clock() >= entry.expires_at or self.faults.session_expired(entry.issued_at):
            return _json_error(
                401,
                "invalid_token",
                "the access token is unknown or expired",
                headers={"WWW-Authenticate": 'Bearer realm="city", error="invalid_token"'},
            )
        return None

    # -- sync --------------------------------------------------------------------------------------

    async def sync(self, request: web.Request) -> web.Response:
        refused = self._unauthorised(request)
        if refused is not None:
            return refused
        if request.content_type != "application/msgpack":
            return _json_error(415, "unsupported_media_type", "send application/msgpack")
        try:
            items = _parse_batch(msgpack.unpackb(await request.read(), raw=False))
        except (ValueError, msgpack.UnpackException) as exc:
            return _json_error(400, "invalid_request", str(exc))
        if len(items) > MAX_BATCH:
            return _json_error(413, "batch_too_large", f"at most {MAX_BATCH} Docs per request")
        failing = self.faults.partial_failures(len(items))
        # A client that hangs up must not cut a batch between its commit and the sequence bump (with
        # handler cancellation on): the batch runs to its end whatever happens to the request.
        results = await asyncio.shield(self._sync_batch(items, failing))
        return _msgpack({"results": results})

    async def _sync_batch(self, items: Sequence[tuple[str, bytes]], failing: set[int]) -> list[list[Any]]:
        async with self._write_lock:
            results, counts = await self._apply_batch(items, failing)
        self.stats.received += len(items)
        self.update_bytes += sum(len(update) for _, update in items)
        self.stats.resends += counts["resends"]
        self.stats.rejected += counts["rejected"]
        self.stats.steps_received += counts["steps"]
        return results

    async def _apply_batch(
        self, items: Sequence[tuple[str, bytes]], failing: set[int]
    ) -> tuple[list[list[Any]], dict[str, int]]:
        codes = sorted({code for code, _ in items})
        work = await self._load_work(codes)
        counts = {"resends": 0, "rejected": 0, "steps": 0}
        results: list[list[Any]] = []
        for i, (code, update) in enumerate(items):
            w = work[code]
            if i in failing:
                results.append(w.answer(code, "retry: temporarily unable to store"))
                continue
            error = self._apply_one(w, code, update, counts)
            if error is not None and error.startswith("invalid"):
                counts["rejected"] += 1
            results.append(w.answer(code, error))

        changed = [(code, w) for code, w in work.items() if w.changed]
        if changed:
            seq = self._seq
            now = _now()
            rows = []
            for code, w in changed:
                assert w.doc is not None  # changed implies a Doc was accepted
                seq += 1
                record = w.record
                rows.append(
                    (
                        # No legal step yet leaves the status unset; the city stores what arrived regardless.
                        code,
                        w.doc.get_update(),
                        w.doc.get_state(),
                        w.digest,
                        record.get("TrangThaiHoSo"),
                        record.get("MaDonViTiepNhan"),
                        record.get("MaDonViXuLy"),
                        len(record.get("QuaTrinhXuLy") or []),
                        _step_duplicates(record),
                        seq,
                        now,
                    )
                )
            conn = self.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                await conn.executemany(_UPSERT, rows)
                await conn.commit()
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await conn.rollback()
                raise
            self._seq = seq
        return results, counts

    async def _load_work(self, codes: Sequence[str]) -> dict[str, _Work]:
        work = {code: _Work(doc=None, sv={}, digest=None, steps=frozenset()) for code in codes}
        if not codes:
            return work
        marks = ",".join("?" * len(codes))
        async with self.writer.execute(
            f"SELECT code, state, digest FROM dossiers WHERE code IN ({marks})", list(codes)
        ) as cur:
            rows = await cur.fetchall()
        for code, state, stored_digest in rows:
            doc = _load(bytes(state))
            work[code] = _Work(
                doc=doc,
                sv=decode_state_vector(doc.get_state()),
                digest=str(stored_digest),
                steps=frozenset(doc.get(STEPS, type=Map).keys()),
            )
        return work

    def _apply_one(self, w: _Work, code: str, update: bytes, counts: dict[str, int]) -> str | None:
        """Apply one update to a scratch copy of the Doc; keep the copy only when it is valid."""
        try:
            scratch = _load(None if w.doc is None else w.doc.get_update())
            scratch.apply_update(update)
        except ValueError as exc:
            return f"invalid: corrupt update: {exc}"
        sv = decode_state_vector(scratch.get_state())
        if w.doc is None and not sv:
            # Nothing integrated: a diff against a state this system does not hold (or an empty one).
            # The sender's idea of what we have is wrong, not its dossier.
            return "retry: unknown dossier: send its full state"
        try:
            record = validate(scratch, code, w.steps)
        except InvalidDoc as exc:
            return f"invalid: {exc}"
        new_digest = digest(record)
        if sv == w.sv and new_digest == w.digest:
            counts["resends"] += 1
            return None
        counts["steps"] += len(set(scratch.get(STEPS, type=Map).keys()) - w.steps)
        w.doc, w.sv, w.digest, w.record, w.changed = scratch, sv, new_digest, record, True
        w.steps = frozenset(scratch.get(STEPS, type=Map).keys())
        return None

    # -- reads -------------------------------------------------------------------------------------

    async def get_doc(self, request: web.Request) -> web.Response:
        refused = self._unauthorised(request)
        if refused is not None:
            return refused
        code = request.match_info["code"]
        async with self.reader.execute(
            "SELECT state, state_vector, digest FROM dossiers WHERE code = ?", (code,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return _json_error(404, "not_found", f"no dossier {code}")
        state, sv, stored_digest = bytes(row[0]), bytes(row[1]), str(row[2])
        update = state
        if "sv" in request.query:
            try:
                raw = request.query["sv"]
                base = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
                update = pycrdt.get_update(state, base)
            except (binascii.Error, ValueError) as exc:
                return _json_error(400, "invalid_request", f"sv is not a base64url state vector: {exc}")
        return _msgpack({"update": update, "state_vector": sv, "digest": stored_digest})

    async def feed(self, request: web.Request) -> web.Response:
        refused = self._unauthorised(request)
        if refused is not None:
            return refused
        unit = request.query.get("unit", "")
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _json_error(400, "invalid_request", "since and limit must be integers")
        if not _UNIT_RE.fullmatch(unit) or since < 0 or not 1 <= limit <= MAX_FEED_LIMIT:
            return _json_error(
                400, "invalid_request", f"unit must be a 5-digit code, since >= 0, limit 1..{MAX_FEED_LIMIT}"
            )
        async with self.reader.execute(
            "SELECT code, seq, state_vector FROM dossiers WHERE receiving_unit = ? AND seq > ? "
            "UNION SELECT code, seq, state_vector FROM dossiers WHERE competent_unit = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (unit, since, unit, since, limit),
        ) as cur:
            rows = await cur.fetchall()
        items = [{"code": str(code), "seq": int(seq), "sv": _b64url(bytes(sv))} for code, seq, sv in rows]
        return web.json_response({"items": items, "next": items[-1]["seq"] if items else since})

    async def digests(self, request: web.Request) -> web.Response:
        refused = self._unauthorised(request)
        if refused is not None:
            return refused
        unit = request.query.get("unit", "")
        try:
            bucket = int(request.query.get("bucket", ""))
            buckets = int(request.query.get("buckets", ""))
        except ValueError:
            return _json_error(400, "invalid_request", "bucket and buckets must be integers")
        if not _UNIT_RE.fullmatch(unit) or not 1 <= buckets <= MAX_BUCKETS or not 0 <= bucket < buckets:
            return _json_error(
                400,
                "invalid_request",
                f"unit must be a 5-digit code, 1 <= buckets <= {MAX_BUCKETS}, 0 <= bucket < buckets",
            )
        # The stored digest is the one every sync answer reports, so it is what the node compares against.
        async with self.reader.execute(
            "SELECT code, digest FROM dossiers WHERE receiving_unit = ? UNION "
            "SELECT code, digest FROM dossiers WHERE competent_unit = ?",
            (unit, unit),
        ) as cur:
            rows = await cur.fetchall()
        found = {str(code): str(d) for code, d in rows if bucket_of(str(code), buckets) == bucket}
        return web.json_response({"digests": found})

    # -- inspection --------------------------------------------------------------------------------

    async def inspect_dossiers(self, request: web.Request) -> web.Response:
        unit = request.query.get("unit")
        sql = "SELECT code, digest, status, updated_at FROM dossiers"
        params: tuple[Any, ...] = ()
        if unit:
            sql += " WHERE receiving_unit = ? OR competent_unit = ?"
            params = (unit, unit)
        async with self.reader.execute(sql + " ORDER BY code", params) as cur:
            rows = await cur.fetchall()
        return web.json_response([{"code": c, "digest": d, "status": s, "updated_at": u} for c, d, s, u in rows])

    async def rotate_credentials(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        self.client_id = str(body.get("client_id", self.client_id))
        self.client_secret = str(body.get("client_secret", self.client_secret))
        self._tokens.clear()
        return web.json_response({"client_id": self.client_id, "tokens": 0})

    async def inspect_stats(self, request: web.Request) -> web.Response:
        async with self.reader.execute(
            "SELECT count(*), count(DISTINCT code), coalesce(sum(steps), 0), coalesce(sum(step_duplicates), 0) "
            "FROM dossiers"
        ) as cur:
            row = await cur.fetchone()
        dossiers, distinct, steps, step_dups = (int(v) for v in row) if row else (0, 0, 0, 0)
        # Counted from what is stored, not from what arrived: "stored twice" is a property of the store.
        self.stats.duplicates = (dossiers - distinct) + step_dups
        return web.json_response(
            {
                **self.stats.as_dict(),
                "dossiers": dossiers,
                "steps": steps,
                "tokens_issued": self.tokens_issued,
                "update_bytes": self.update_bytes,
                "seq": self._seq,
            }
        )


def _seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return {401: "unauthorized", 404: "not_found", 429: "throttled", 503: "unavailable"}.get(
        status, "server_error" if status >= 500 else "client_error"
    )


def _basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        client_id, sep, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (client_id, secret) if sep else None


def _parse_batch(body: Any) -> list[tuple[str, bytes]]:
    if not isinstance(body, list):
        raise ValueError("body must be a msgpack list of [code, update] pairs")
    items: list[tuple[str, bytes]] = []
    for n, item in enumerate(body):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not item[0]
            or not isinstance(item[1], bytes)
        ):
            raise ValueError(f"item {n} must be [code: str, update: bin]")
        items.append((item[0], item[1]))
    return items


CITY: web.AppKey[CitySystem] = web.AppKey("city", CitySystem)


def build_app(
    data_dir: Path,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    client_secret: str = DEFAULT_CLIENT_SECRET,
    token_ttl_s: float = 3600.0,
    faults: Faults | None = None,
) -> web.Application:
    """The stand-in's application; its store opens on startup and closes on cleanup."""
    faults = faults if faults is not None else Faults()
    city = CitySystem(
        Path(data_dir), client_id=client_id, client_secret=client_secret, token_ttl_s=token_ttl_s, faults=faults
    )
    # Counting sits outside the fault middleware so injected 429/500/503 answers are counted too.
    app = web.Application(middlewares=[city.count_requests, faults.middleware], client_max_size=MAX_BODY_BYTES)
    app[CITY] = city
    app.cleanup_ctx.append(city.lifespan)
    app.router.add_post("/oauth/token", city.token)
    app.router.add_post("/api/v1/sync", city.sync)
    app.router.add_get("/api/v1/docs/{code}", city.get_doc)
    app.router.add_get("/feed", city.feed)
    app.router.add_get("/api/v1/digests", city.digests)
    app.router.add_get("/__inspect/dossiers", city.inspect_dossiers)
    app.router.add_get("/__inspect/stats", city.inspect_stats)
    app.router.add_post("/__credentials", city.rotate_credentials)
    faults.add_routes(app)
    return app


async def serve(
    host: str,
    port: int,
    data_dir: Path,
    stop: asyncio.Event,
    announce: Callable[[str], object] = print,
    **options: Any,
) -> None:
    """Run the stand-in until ``stop`` is set; ``options`` go to :func:`build_app`."""
    async with running(build_app(data_dir, **options), host, port) as url:
        announce(f"city system stand-in listening on {url}")
        await stop.wait()
