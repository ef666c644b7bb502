"""The Yjs sync endpoint: ``GET /sync/v1/{code}`` speaks the y-websocket protocol for one dossier.

Any standard Yjs client (y-websocket's ``WebsocketProvider``, pycrdt's ``Provider``) can hold a dossier's
Doc in sync with this node. Binary frames only, one message per frame:

- ``0`` sync: sub-type ``0`` step 1 (a state vector), ``1`` step 2 (the update answering a step 1),
  ``2`` update. On connect the node sends its step 1; it answers a client's step 1 with the diff the
  client lacks, and from then on pushes every committed change of the dossier (desk, pullers, other
  peers) to that client as an update.
- ``1`` awareness, ``2`` auth, ``3`` awareness query: ignored; a dossier has no cursors to share.

An update from a peer is applied to a scratch copy of the dossier's committed state and checked there
(:func:`check_update`); it is accepted whole, merged through ``DossierService.merge`` (so it is journaled
and replicated like any other change), or refused whole. A refusal closes the connection; nothing of the
update is kept. Close codes:

- ``4400``: refused. The close reason is ``"<code>: <message>"`` cut to the 123 bytes a close frame
  carries; the code is one of ``malformed_message``, ``corrupt_update``, ``incomplete_update``,
  ``unknown_delete``, ``forbidden_writer``, ``foreign_type``, ``step_deleted``, ``entry_deleted``,
  ``step_changed``, ``entry_changed``, ``invalid_step``, ``invalid_value``, ``forwarding_backwards``,
  ``illegal_transition``, ``not_a_dossier``. The full message is in the node's log.
- ``4404``: no dossier with that code (reason ``"not_found: ..."``).
- ``1009``: a message over :data:`MAX_MESSAGE_BYTES`.
- ``1013``: the client reads too slowly to keep up with the dossier's changes; reconnecting resyncs it.
- ``1011``: the store failed; reconnecting retries. ``1001``: the node is stopping.

A y-websocket client reconnects after any close and re-sends what the node lacks, so a refused change
comes back on every reconnect until the client drops it: refusals are logged, and the client's Doc must
be discarded by its user. That is the price of "accepted or refused whole" (see DESIGN, Yjs peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from pycrdt import YMessageType, YSyncMessageType, create_sync_message, create_update_message, write_message

from node.auth import requires
from node.domain.validation import is_dvcqg_datetime, validate_fee, validate_step
from node.errors import ApiError
from node.service import DossierService, Merge
from node.store import Store, StoreError
from sync import doc as ydoc
from sync.hlc import DEFAULT_MAX_OFFSET_MS, Stamp
from sync.merge import FORWARD_ONLY
from sync.record import DOCUMENTS, FEES, FIELDS, HLC_FIELD, STEPS, materialise, read_roots, step_key_of
from sync.statevector import decode_state_vector
from sync.yupdate import Reader, Refused, UpdateShape, decode_update

log = structlog.get_logger()

ROUTE = "/sync/v1/{code}"
ROOTS = (FIELDS, STEPS, DOCUMENTS, FEES)

# A dossier's whole state is a few kilobytes; a megabyte leaves room for documents' metadata and a long
# offline history while keeping one peer from making the node parse and hold arbitrary amounts.
MAX_MESSAGE_BYTES = 1 << 20
# Messages waiting for one slow client; past this it is closed (it resyncs when it reconnects) rather
# than making the node buffer without bound.
MAX_QUEUED = 256
HEARTBEAT_S = 30.0
CLOSE_TIMEOUT_S = 5.0

CLOSE_REFUSED = 4400
CLOSE_NOT_FOUND = 4404

# y-websocket message types beyond sync and awareness, ignored like awareness.
_AUTH, _QUERY_AWARENESS = 2, 3
EMPTY_UPDATE = b"\x00\x00"
# The Docs this module builds only read and diff; they never write, so their client id is never used.
_READ_ONLY_CLIENT_ID = 1


# --- the update's binary shape ----------------------------------------------------------------------


def encode_state_vector(clocks: Mapping[int, int]) -> bytes:
    """The Yjs encoding of ``{client: clock}`` (the inverse of ``decode_state_vector``)."""
    out = bytearray(_var_uint(len(clocks)))
    for client in sorted(clocks):
        out += _var_uint(client) + _var_uint(clocks[client])
    return bytes(out)


def _var_uint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def _covering(a: Mapping[int, int], b: Mapping[int, int]) -> dict[int, int]:
    return {c: max(a.get(c, 0), b.get(c, 0)) for c in a.keys() | b.keys()}


def check_update(
    code: str, state: bytes, update: bytes, *, forbidden: frozenset[int], now_ms: int
) -> UpdateShape | None:
    """Check a peer's update against the dossier's committed ``state``; the update's shape if it changes
    something, None if it changes nothing; raises :class:`Refused` for anything the node does not accept.

    ``forbidden`` are the client ids only this node writes under (its own and its upstreams'); ``now_ms``
    bounds the HLC stamps of new steps like the node's own clock bounds remote stamps.
    """
    shape = decode_update(update)
    scratch = ydoc.load_doc(code, state, _READ_ONLY_CLIENT_ID)
    before_sv = decode_state_vector(scratch.get_state())
    for client, (start, end) in shape.runs.items():
        have = before_sv.get(client, 0)
        if start > have:
            # yrs would keep such structs pending in memory and integrate them later, unchecked.
            raise Refused(
                "incomplete_update", f"structs of client {client} start at clock {start}; this node has {have}"
            )
        if client in forbidden and end > have:
            raise Refused(
                "forbidden_writer",
                f"the update writes under client id {client}, which only this node writes under",
            )
    for client, clock, length in shape.deletes:
        known = max(before_sv.get(client, 0), shape.runs.get(client, (0, 0))[1])
        if clock + length > known:
            # A delete of content not yet here would linger in memory and strike when that content arrives.
            raise Refused("unknown_delete", f"the update deletes content of client {client} this node does not hold")
    before = read_roots(scratch)
    before_conflicts = {c["step"] for c in materialise(scratch)[1]}
    before_roots = set(scratch.keys())
    try:
        scratch.apply_update(update)
    except Exception as exc:
        raise Refused("corrupt_update", f"the update cannot be applied: {exc}") from exc
    after_sv = decode_state_vector(scratch.get_state())
    for client, (_, end) in shape.runs.items():
        if after_sv.get(client, 0) < end:
            raise Refused("incomplete_update", f"structs of client {client} depend on content this node does not hold")
    for client in forbidden:
        if after_sv.get(client, 0) > before_sv.get(client, 0):
            raise Refused("forbidden_writer", f"the update writes under client id {client}")
    # The decoder already refuses items naming another root; this catches any other way yrs finds one.
    new_roots = set(scratch.keys()) - before_roots - set(ROOTS)
    if new_roots:
        raise Refused("foreign_type", f"the update adds root types {sorted(new_roots)}")
    after = read_roots(scratch)
    _check_roots(code, before, after, now_ms)
    if after_sv == before_sv:
        # Nothing new was written, and the only deletes that change a Map (removed keys) were refused above.
        return None
    record, conflicts = materialise(scratch)
    if record.get("MaHoSo") != code:
        raise Refused("not_a_dossier", f"fields.MaHoSo would be {record.get('MaHoSo')!r}, not {code!r}")
    for conflict in conflicts:
        if conflict["step"] not in before_conflicts:
            raise Refused(
                "illegal_transition",
                f"step {conflict['step']} (TrangThai {conflict['TrangThai']}) would be skipped as illegal"
                " in the merged order",
            )
    return shape


def _check_roots(
    code: str,
    before: tuple[dict[str, Any], ...],
    after: tuple[dict[str, Any], ...],
    now_ms: int,
) -> None:
    for name, old, new in zip(ROOTS, before, after, strict=True):
        for key in old.keys() - new.keys():
            # The node never removes a key, the portal cannot express a removal, and a removal is a
            # delete-only change that the node's merge would not journal.
            kind = "step_deleted" if name == STEPS else "entry_deleted"
            raise Refused(kind, f"the update removes {name}[{key!r}]; entries are never removed")
        for key, value in new.items():
            if key in old and old[key] == value:
                continue
            if name == FIELDS:
                _check_field(key, old.get(key), value)
            elif key in old:
                kind = "step_changed" if name == STEPS else "entry_changed"
                raise Refused(kind, f"the update changes {name}[{key!r}]; {name} entries are immutable")
            elif name == STEPS:
                _check_step(code, key, value, now_ms)
            else:
                _check_entry(name, key, value)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _is_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    return _is_scalar(value)


def _check_field(key: str, old: Any, value: Any) -> None:
    if not _is_scalar(value):
        raise Refused("invalid_value", f"fields[{key!r}] must be a scalar (text, number, boolean or null)")
    order = FORWARD_ONLY.get(key)
    if order is not None and old is not None and order.get(value, -1) < order.get(old, -1):
        raise Refused("forwarding_backwards", f"{key} may only move forward, not from {old} to {value}")


def _check_step(code: str, key: str, value: Any, now_ms: int) -> None:
    if not isinstance(value, dict):
        raise Refused("invalid_step", f"steps[{key!r}] must be an object")
    if value.get("MaHoSo") != code:
        raise Refused("invalid_step", f"steps[{key!r}].MaHoSo must be {code!r}")
    when = value.get("ThoiDiemXuLy")
    if not isinstance(when, str) or not is_dvcqg_datetime(when):
        raise Refused("invalid_step", f"steps[{key!r}].ThoiDiemXuLy must be a date-time yyyyMMddHHmmss")
    _, errors = validate_step({k: v for k, v in value.items() if k not in ("MaHoSo", HLC_FIELD)})
    if errors:
        where, what = next(iter(sorted(errors.items())))
        raise Refused("invalid_step", f"steps[{key!r}].{where}: {what}")
    if step_key_of(value) != key:
        raise Refused("invalid_step", f"steps[{key!r}] is not stored under its natural key {step_key_of(value)}")
    stamp = value.get(HLC_FIELD)
    try:
        decoded = Stamp.decode(stamp) if isinstance(stamp, str) else None
    except ValueError:
        decoded = None
    if decoded is None:
        raise Refused("invalid_step", f"steps[{key!r}].{HLC_FIELD} must be an HLC stamp such as 001751333400000.00000")
    if decoded.ms > now_ms + DEFAULT_MAX_OFFSET_MS:
        # A step stamped in the future would sort after every later step, on every replica, for ever.
        raise Refused(
            "invalid_step",
            f"steps[{key!r}].{HLC_FIELD} lies more than {DEFAULT_MAX_OFFSET_MS // 60_000} minutes ahead of"
            " this node's clock",
        )


# The natural key of each append-only Map other than steps (see sync.doc.add_document / add_fee).
_NATURAL_KEYS = {DOCUMENTS: "TepDinhKemId", FEES: "MaPhiLePhi"}


def _check_entry(name: str, key: str, value: Any) -> None:
    natural = _NATURAL_KEYS[name]
    if not isinstance(value, dict) or not _is_json(value):
        raise Refused("invalid_value", f"{name}[{key!r}] must be a JSON object")
    if str(value.get(natural)) != key:
        raise Refused("invalid_value", f"{name}[{key!r}] must be stored under its {natural}")
    if name == FEES:
        _, errors = validate_fee(value)
        if errors:
            where, what = next(iter(sorted(errors.items())))
            raise Refused("invalid_value", f"fees[{key!r}].{where}: {what}")


# --- messages ---------------------------------------------------------------------------------------


def parse_message(data: bytes) -> tuple[int, bytes] | None:
    """(sync sub-type, payload) of a sync message; None for a message type the node ignores."""
    r = Reader(data, "message")
    kind = r.uint()
    if kind in (YMessageType.AWARENESS, _AUTH, _QUERY_AWARENESS):
        return None
    if kind != YMessageType.SYNC:
        raise r.fail(f"unknown message type {kind}")
    sub = r.uint()
    if sub not in (YSyncMessageType.SYNC_STEP1, YSyncMessageType.SYNC_STEP2, YSyncMessageType.SYNC_UPDATE):
        raise r.fail(f"unknown sync message type {sub}")
    payload = r.take(r.uint())
    if not r.done():
        raise r.fail(f"{len(data) - r.pos} bytes follow the sync message")
    return sub, payload


def _step2_message(update: bytes) -> bytes:
    # pycrdt builds step 2 only inside handle_sync_message, which also applies updates: framed here.
    return bytes([YMessageType.SYNC, YSyncMessageType.SYNC_STEP2]) + write_message(update)


# --- connections and rooms --------------------------------------------------------------------------


class _Conn:
    """One client: its socket, a bounded queue of outgoing messages and the task that sends them."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        # Lower bound of what the client holds of the node's state; None until it sends its step 1, and
        # it gets no pushed updates before then (its step 2 will carry everything).
        self.synced: dict[int, int] | None = None
        self.seq = 0  # change_seq of the state the client was last brought up to
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED)
        self._sender = asyncio.create_task(self._send_all(), name=f"ws-send:{peer}")

    def post(self, message: bytes) -> None:
        """Queue a message; a client too slow to take it is closed so that it resyncs on reconnect."""
        if self.ws.closed or self._sender.done():
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("ws_client_too_slow", peer=self.peer, queued=MAX_QUEUED)
            # Closing from another task: the sender must not write after the close frame.
            self._sender.cancel()
            task = asyncio.create_task(
                self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow: reconnect to resync"),
                name=f"ws-close:{self.peer}",
            )
            _background.add(task)
            task.add_done_callback(_background.discard)

    async def _send_all(self) -> None:
        while True:
            message = await self._queue.get()
            try:
                await self.ws.send_bytes(message)
            except (ConnectionError, RuntimeError):
                return  # the socket is gone; the receive loop sees it too and cleans up

    async def close(self, code: int, reason: bytes) -> None:
        await self.stop()
        if not self.ws.closed:
            await self.ws.close(code=code, message=reason)

    async def stop(self) -> None:
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sender


# Close tasks started from synchronous code, kept referenced until they finish.
_background: set[asyncio.Task[Any]] = set()


@dataclass
class _Room:
    code: str
    seq: int
    conns: set[_Conn] = field(default_factory=set)
    # Serialises, per dossier, answering step 1, checking and merging peers' updates, and pushing changes:
    # each conn's ``synced`` and the check against committed state stay consistent.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SyncHub:
    """The open connections per dossier code, and the task pushing committed changes to them."""

    def __init__(self) -> None:
        self.rooms: dict[str, _Room] = {}
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._service: DossierService | None = None
        self._store: Store | None = None

    @property
    def service(self) -> DossierService:
        assert self._service is not None, "the sync hub is not started"
        return self._service

    @property
    def store(self) -> Store:
        assert self._store is not None, "the sync hub is not started"
        return self._store

    async def start(self, app: web.Application) -> None:
        # node.api registers this module's routes, so its keys are read here rather than imported at the top.
        from node.api import SERVICE, STORE

        self._service, self._store = app[SERVICE], app[STORE]
        # Set after every commit that wrote to the journal, whoever wrote it.
        self.service.listeners.append(self._wake)
        self._pump_task = asyncio.create_task(self._pump_loop(), name="ws-pump")

    async def shutdown(self, app: web.Application) -> None:
        """Close every client (aiohttp waits for open WebSocket handlers otherwise) and stop pushing."""
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None
        if self._service is not None and self._wake in self._service.listeners:
            self._service.listeners.remove(self._wake)
        conns = [conn for room in self.rooms.values() for conn in room.conns]
        await asyncio.gather(
            *(conn.close(WSCloseCode.GOING_AWAY, b"the node is stopping") for conn in conns),
            return_exceptions=True,
        )

    def join(self, code: str, seq: int, conn: _Conn) -> _Room:
        room = self.rooms.get(code)
        if room is None:
            room = self.rooms[code] = _Room(code, seq)
        room.conns.add(conn)
        return room

    def leave(self, room: _Room, conn: _Conn) -> None:
        room.conns.discard(conn)
        if not room.conns and self.rooms.get(room.code) is room:
            del self.rooms[room.code]

    async def forbidden_ids(self) -> frozenset[int]:
        """The client ids only this node writes under: its own, and one per upstream it writes for."""
        rows = await self.store.fetchall("SELECT value FROM meta WHERE substr(key, 1, 10) = 'client_id:'")
        return frozenset({self.service.client_id, *(int(r[0]) for r in rows)})

    async def load(self, code: str) -> tuple[bytes, int] | None:
        row = await self.store.fetchone("SELECT state, change_seq FROM dossiers WHERE code = ?", (code,))
        return (self.store.sealer.state(code, row[0]), int(row[1])) if row is not None else None

    # -- one client's messages ----------------------------------------------------------------------
    async def handle(self, room: _Room, conn: _Conn, data: bytes) -> None:
        parsed = parse_message(data)
        if parsed is None:
            return
        sub, payload = parsed
        if sub == YSyncMessageType.SYNC_STEP1:
            await self._answer_step1(room, conn, payload)
        elif payload != EMPTY_UPDATE:
            await self._take_update(room, conn, payload)

    async def _answer_step1(self, room: _Room, conn: _Conn, sv: bytes) -> None:
        try:
            theirs = decode_state_vector(sv)
        except ValueError as exc:
            raise Refused("malformed_message", f"the step 1 state vector is malformed: {exc}") from exc
        async with room.lock:
            loaded = await self.load(room.code)
            if loaded is None:
                raise Refused("not_a_dossier", f"dossier {room.code} is gone")
            state, seq = loaded
            doc = ydoc.load_doc(room.code, state, _READ_ONLY_CLIENT_ID)
            try:
                diff = doc.get_update(sv)
            except Exception as exc:
                raise Refused("malformed_message", f"the step 1 state vector is unusable: {exc}") from exc
            conn.post(_step2_message(diff))
            conn.synced = _covering(theirs, decode_state_vector(doc.get_state()))
            conn.seq = max(conn.seq, seq)

    async def _take_update(self, room: _Room, conn: _Conn, update: bytes) -> None:
        async with room.lock:
            loaded = await self.load(room.code)
            if loaded is None:
                raise Refused("not_a_dossier", f"dossier {room.code} is gone")
            forbidden = await self.forbidden_ids()
            shape = check_update(room.code, loaded[0], update, forbidden=forbidden, now_ms=self.service.clock.ms())
            if shape is None:
                return  # nothing this node lacks
            try:
                result = await self.service.merge(Merge(room.code, update, "peer"))
            except ApiError as exc:
                raise Refused(exc.code, exc.message) from exc
            log.info("ws_update_merged", code=room.code, peer=conn.peer, status=result.status, size=len(update))
            if conn.synced is not None:
                # The client holds what it sent: the push of this change need not echo it back.
                conn.synced = _covering(conn.synced, {c: end for c, (_, end) in shape.runs.items()})

    # -- pushing committed changes ------------------------------------------------------------------
    async def _pump_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._pump()
            except StoreError as exc:
                log.warning("ws_push_failed", error=str(exc))
            except Exception:
                log.exception("ws_push_failed")

    async def _pump(self) -> None:
        rooms = list(self.rooms.values())
        for i in range(0, len(rooms), 500):
            chunk = {room.code: room for room in rooms[i : i + 500]}
            marks = ",".join("?" for _ in chunk)
            rows = await self.store.fetchall(
                f"SELECT code, change_seq FROM dossiers WHERE code IN ({marks})", list(chunk)
            )
            for code, seq in rows:
                room = chunk[code]
                if int(seq) > room.seq:
                    await self._push(room)

    async def _push(self, room: _Room) -> None:
        async with room.lock:
            loaded = await self.load(room.code)
            if loaded is None or loaded[1] <= room.seq:
                return
            state, seq = loaded
            doc = ydoc.load_doc(room.code, state, _READ_ONLY_CLIENT_ID)
            have = decode_state_vector(doc.get_state())
            for conn in room.conns:
                if conn.synced is None or conn.seq >= seq:
                    continue
                diff = doc.get_update(encode_state_vector(conn.synced))
                if diff != EMPTY_UPDATE:
                    conn.post(create_update_message(diff))
                conn.synced = _covering(conn.synced, have)
                conn.seq = seq
            room.seq = seq


HUB: web.AppKey[SyncHub] = web.AppKey("sync_hub", SyncHub)


@requires("peer", "clerk")
async def sync_endpoint(request: web.Request) -> web.StreamResponse:
    """``GET /sync/v1/{code}``: a y-websocket connection to one dossier's Doc."""
    code = request.match_info["code"]
    hub = request.app[HUB]
    ws = web.WebSocketResponse(
        max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT_S, timeout=CLOSE_TIMEOUT_S, compress=False
    )
    if not ws.can_prepare(request).ok:
        raise ApiError(
            426,
            "upgrade_required",
            f"{request.path} is a WebSocket endpoint speaking the y-websocket protocol; connect with a Yjs client",
        )
    loaded = await hub.load(code)
    await ws.prepare(request)
    peer = f"{request.remote}#{id(ws):x}"
    if loaded is None:
        await ws.close(code=CLOSE_NOT_FOUND, message=Refused("not_found", f"no dossier with code {code!r}").reason())
        return ws
    state, seq = loaded
    conn = _Conn(ws, peer)
    room = hub.join(code, seq, conn)
    log.info("ws_connected", code=code, peer=peer, clients=len(room.conns))
    try:
        conn.post(create_sync_message(ydoc.load_doc(code, state, _READ_ONLY_CLIENT_ID)))
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                await hub.handle(room, conn, msg.data)
            elif msg.type is WSMsgType.TEXT:
                raise Refused("malformed_message", "y-websocket messages are binary frames")
            elif msg.type is WSMsgType.ERROR:
                # aiohttp has already closed the socket (1009 for an oversize message).
                log.warning("ws_error", code=code, peer=peer, close_code=ws.close_code, error=str(ws.exception()))
                break
    except Refused as refused:
        log.warning("ws_refused", code=code, peer=peer, reason=refused.code, message=refused.message)
        await conn.close(CLOSE_REFUSED, refused.reason())
    except StoreError as exc:
        log.error("ws_store_error", code=code, peer=peer, error=str(exc))
        await conn.close(WSCloseCode.INTERNAL_ERROR, b"store unavailable: reconnect later")
    except ConnectionError:
        pass  # the client went away mid-answer; nothing to tell it
    except Exception:
        log.exception("ws_failed", code=code, peer=peer)
        await conn.close(WSCloseCode.INTERNAL_ERROR, b"internal error")
    finally:
        hub.leave(room, conn)
        await conn.stop()
        log.info("ws_disconnected", code=code, peer=peer, close_code=ws.close_code)
    return ws


def add_routes(app: web.Application) -> None:
    """Register ``GET /sync/v1/{code}`` and the hub's start and stop on ``app``."""
    hub = SyncHub()
    app[HUB] = hub
    app.on_startup.append(hub.start)
    app.on_shutdown.append(hub.shutdown)
    app.router.add_get(ROUTE, sync_endpoint, allow_head=False)
