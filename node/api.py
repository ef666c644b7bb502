"""The node's HTTP API: JSON in DVCQG field names, one error envelope."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web

from failover.windows import MODES, WindowSpecError
from node import audit, tls
from node.auth import public, requires
from node.clock import TZ, iso
from node.domain.validation import validate_fee, validate_intake, validate_step
from node.errors import ApiError, validation_error
from node.openapi import openapi_document
from node.service import DossierService, IdemKey, Result, request_hash
from node.store import Store, StoreError
from sync import ws

log = structlog.get_logger()

SERVICE: web.AppKey[DossierService] = web.AppKey("service", DossierService)
STORE: web.AppKey[Store] = web.AppKey("store", Store)
UNIT: web.AppKey[str] = web.AppKey("unit", str)
NODE: web.AppKey[Any] = web.AppKey("node", object)
READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready", Callable[[], bool])  # type: ignore[arg-type]  # AppKey accepts any type object at runtime

MAX_JSON_DEPTH = 16
MAX_PAGE = 500
DEFAULT_PAGE = 100
_IDEM_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return web.Response(status=status, text=text, content_type=_JSON)


def error_response(err: ApiError) -> web.Response:
    return web.Response(
        status=err.status, body=err.body(), content_type=_JSON, charset="utf-8", headers=err.headers or None
    )


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the one JSON envelope; bad input never becomes a 500."""
    try:
        return await handler(request)
    except ApiError as err:
        return error_response(err)
    except StoreError as err:
        status, code = (507, "insufficient_storage") if err.disk_full else (503, "store_unavailable")
        log.error("store_error", error=str(err), path=request.path)
        return error_response(ApiError(status, code, str(err)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 413:
            message = f"the request body is larger than the {request.app._client_max_size} bytes accepted"
        elif exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        response = error_response(ApiError(exc.status, code, message))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


async def read_json(request: web.Request) -> Any:
    if request.content_type != _JSON:
        raise ApiError(415, "unsupported_media_type", f"send the body as {_JSON}, not {request.content_type!r}")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:
        raise ApiError(400, "malformed_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    if _depth(body) > MAX_JSON_DEPTH:
        raise ApiError(400, "malformed_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def idempotency(request: web.Request, scope: str, body: object) -> IdemKey | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEM_KEY.match(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 200 printable ASCII characters without spaces",
            fields={"Idempotency-Key": "1 to 200 printable ASCII characters"},
        )
    return IdemKey(scope, key, request_hash(body))


def _reply(result: Result) -> web.Response:
    return web.Response(status=result.status, text=result.body, content_type=_JSON)


@requires("clerk")
async def create_dossier(request: web.Request) -> web.Response:
    body = await read_json(request)
    clean, errors = validate_intake(body, own_unit=request.app[UNIT])
    if errors:
        raise validation_error(errors)
    idem = idempotency(request, "POST /api/v1/dossiers", body)
    return _reply(await request.app[SERVICE].intake(clean, idem))


async def _validated(
    request: web.Request, what: str, validate: Callable[[object], tuple[dict[str, Any], dict[str, str]]]
) -> tuple[str, dict[str, Any], IdemKey | None]:
    """(code, clean body, idempotency key) of a write to one dossier; 4xx for anything wrong."""
    code = request.match_info["code"]
    body = await read_json(request)
    clean, errors = validate(body)
    if errors:
        raise validation_error(errors)
    return code, clean, idempotency(request, f"POST /api/v1/dossiers/{code}/{what}", body)


@requires("clerk")
async def add_step(request: web.Request) -> web.Response:
    code, clean, idem = await _validated(request, "steps", validate_step)
    return _reply(await request.app[SERVICE].add_step(code, clean, idem))


@requires("clerk")
async def add_fee(request: web.Request) -> web.Response:
    code, clean, idem = await _validated(request, "fees", validate_fee)
    return _reply(await request.app[SERVICE].add_fee(code, clean, idem))


@requires("clerk")
async def forward(request: web.Request) -> web.Response:
    """The receiving unit hands a boundary-free dossier to its competent unit (forwarding 1 → 4)."""
    return await _forwarding(request, "forward")


@requires("clerk")
async def take_over(request: web.Request) -> web.Response:
    """The competent unit takes a forwarded dossier over (forwarding 4 → 2)."""
    return await _forwarding(request, "take-over")


async def _forwarding(request: web.Request, action: str) -> web.Response:
    code = request.match_info["code"]
    if request.can_read_body:
        body = await read_json(request)
        if body not in ({}, None):
            raise ApiError(
                422, "validation_failed", "this action takes no fields", fields={"$": "send an empty body or none"}
            )
    idem = idempotency(request, f"POST /api/v1/dossiers/{code}/{action}", {})
    return _reply(await request.app[SERVICE].forwarding(code, action, idem))


@requires("clerk", "operator", "read-only")
async def get_dossier(request: web.Request) -> web.Response:
    code = request.match_info["code"]
    row = await request.app[STORE].fetchone("SELECT record, digest, conflicts FROM dossiers WHERE code = ?", (code,))
    if row is None:
        raise ApiError(404, "not_found", f"no dossier with code {code!r}")
    record, digest, conflicts = row
    sealer = request.app[STORE].sealer
    record, conflicts = sealer.record(code, record), sealer.conflicts(code, conflicts)
    tail = f',"conflicts":{conflicts}' if conflicts and conflicts != "[]" else ""
    replication = await _replication_of(request, code, digest)
    tail += f',"replication":{json.dumps(replication, ensure_ascii=False)}'
    node = request.app[NODE]
    tail += node.deadlines.json_tail(record, node.clock.now())  # TinhTrangHan, NgayHenTraHieuLuc
    response = json_response(f'{record[:-1]},"digest":"{digest}"{tail}}}')
    response.headers["ETag"] = f'"{digest}"'  # what PATCH's If-Match carries
    return response


async def _replication_of(request: web.Request, code: str, digest: str) -> dict[str, Any]:
    """Per target: where this dossier stands (synced, pending, dead, parked)."""
    rows = await request.app[STORE].fetchall(
        "SELECT target, state, acked_digest, attempts, last_error, updated_at FROM replication WHERE code = ?", (code,)
    )
    known = {r[0]: r for r in rows}
    out: dict[str, Any] = {}
    for target in request.app[NODE].replicators:
        r = known.get(target)
        if r is None:
            out[target] = {
                "state": "pending",
                "acked_digest": None,
                "attempts": 0,
                "last_error": None,
                "updated_at": None,
            }
            continue
        state = r[1]
        if state == "synced" and r[2] != digest:
            state = "pending"  # acknowledged an earlier version; the newer one is on its way
        out[target] = {"state": state, "acked_digest": r[2], "attempts": r[3], "last_error": r[4], "updated_at": r[5]}
    return out


@requires("operator", "read-only")
async def dead_letters(request: web.Request) -> web.Response:
    target = request.query.get("target")
    if target is not None and target not in request.app[NODE].replicators:
        raise ApiError(
            400,
            "invalid_parameter",
            f"unknown target {target!r}",
            fields={"target": f"one of {sorted(request.app[NODE].replicators)}"},
        )
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    rows = await request.app[STORE].fetchall(
        "SELECT target, code, state, attempts, last_error, updated_at FROM replication"
        " WHERE state IN ('dead', 'parked') AND (? IS NULL OR target = ?) ORDER BY updated_at LIMIT ?",
        (target, target, limit),
    )
    items = [
        {"target": r[0], "code": r[1], "state": r[2], "attempts": r[3], "reason": r[4], "updated_at": r[5]}
        for r in rows
    ]
    return json_response({"items": items})


@requires("operator")
async def retry_dead_letter(request: web.Request) -> web.Response:
    target, code = request.match_info["target"], request.match_info["code"]
    rep = request.app[NODE].replicators.get(target)
    if rep is None:
        raise ApiError(404, "not_found", f"unknown target {target!r}")
    if not await rep.retry(code):
        raise ApiError(404, "not_found", f"{code!r} is neither dead-lettered nor parked for {target}")
    request.app[NODE].loops[target].wake.set()
    return json_response({"target": target, "code": code, "state": "pending"}, status=202)


@requires("clerk", "operator", "drill", "peer", "read-only")
async def status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    head = node.service.journal_head
    targets: dict[str, Any] = {}
    for name, rep in node.replicators.items():
        lag = await rep.lag(head)
        breaker = node.breakers[name]
        guarded = node.guarded[name]
        state = breaker.state.value
        if state == "open":
            health = "down"
        elif state == "half_open" or node.loops[name].errors or (guarded.last_error and not lag["last_ok_at"]):
            health = "degraded"
        else:
            health = "healthy"
        targets[name] = {
            "state": health,
            "breaker": state,
            "breaker_reason": breaker.last_reason,
            **lag,
            "last_error": node.loops[name].last_error or guarded.last_error,
            "fault_windows": [w for w in node.windows.describe() if w["target"] == name],
            "antientropy": _antientropy_of(node, name),
            "tls": tls.describe(node.config, name),
        }
    controller = node.controller
    body: dict[str, Any] = {
        "unit": request.app[UNIT],
        "journal_head": head,
        "active_source": controller.active if controller else None,
        "primary": controller.primary if controller else None,
        "offline": bool(controller) and controller.active is None,
        "forced": controller.describe()["forced"] if controller else None,
        "targets": targets,
        "events": controller.events if controller else [],
        "audit": await audit.describe(node.store),
    }
    return json_response(body)


def _antientropy_of(node: Any, name: str) -> dict[str, Any] | None:
    """Cumulative anti-entropy counts for one target, with its loop's last error; None when not running."""
    ae = node.antientropy.get(name)
    if ae is None:
        return None
    loop = node.loops.get(f"antientropy:{name}")
    return {**ae.stats(), "last_error": loop.last_error if loop is not None else None}


_SOURCES = ("national", "city", "auto")


@requires("drill")
async def admin_failover(request: web.Request) -> web.Response:
    """Force the active source for a while (drills), or release it with "auto"."""
    node = request.app[NODE]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "validation_failed", "the body must be a JSON object", fields={"$": "must be an object"})
    errors: dict[str, str] = {}
    unknown = set(body) - {"primary", "ttl_s"}
    for u in unknown:
        errors[u] = "unknown field"
    choice = body.get("primary")
    if node.controller is None:
        raise ApiError(409, "no_targets", "this node has no upstream targets configured")
    if choice not in _SOURCES or (choice != "auto" and choice not in node.breakers):
        errors["primary"] = f"must be one of {', '.join(s for s in _SOURCES if s == 'auto' or s in node.breakers)}"
    ttl = body.get("ttl_s", 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 7 * 24 * 3600:
        errors["ttl_s"] = "must be a number of seconds, more than 0 and at most 604800 (one week)"
    if errors:
        raise validation_error(errors)
    await node.controller.force(str(choice), float(ttl))
    return json_response(node.controller.describe())


@requires("drill")
async def admin_faults_open(request: web.Request) -> web.Response:
    """Open a local fault window in one target's path; it closes by itself."""
    node = request.app[NODE]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(422, "validation_failed", "the body must be a JSON object", fields={"$": "must be an object"})
    errors: dict[str, str] = {}
    target, mode, seconds = body.get("target"), body.get("mode"), body.get("seconds")
    if not isinstance(target, str) or target not in node.guarded:  # a list or an object is not a target (nor hashable)
        errors["target"] = f"must be one of {', '.join(node.guarded) or '(no targets configured)'}"
    if mode not in MODES:
        errors["mode"] = f"must be one of {', '.join(MODES)}"
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        errors["seconds"] = "required: how long the window stays open, in seconds"
    params: dict[str, float] = {}
    for key, value in body.items():
        if key in {"target", "mode", "seconds"}:
            continue
        if key not in {"ms", "rate"}:
            errors[key] = "unknown field"
        elif isinstance(value, bool) or not isinstance(value, int | float):
            errors[key] = "must be a number"
        else:
            params[key] = float(value)
    if errors:
        raise validation_error(errors)
    try:
        node.windows.open(str(target), str(mode), float(seconds or 0), **params)
    except WindowSpecError as exc:
        raise validation_error({exc.field: str(exc)}) from exc
    log.warning("fault_window_opened", target=target, mode=mode, seconds=seconds, **params)
    return json_response({"windows": node.windows.describe()}, status=201)


@requires("drill", "operator", "read-only")
async def admin_faults_list(request: web.Request) -> web.Response:
    return json_response({"windows": request.app[NODE].windows.describe()})


@requires("drill")
async def admin_faults_clear(request: web.Request) -> web.Response:
    target = request.query.get("target")
    closed = request.app[NODE].windows.clear(target)
    log.warning("fault_windows_closed", target=target, closed=closed)
    return json_response({"closed": closed, "windows": request.app[NODE].windows.describe()})


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d{1,18}", raw) or not lo <= int(raw) <= hi:
        raise ApiError(
            400,
            "invalid_parameter",
            f"{name} must be an integer from {lo} to {hi}",
            fields={name: f"an integer from {lo} to {hi}"},
        )
    return int(raw)


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{row_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("id:") or not text[3:].isdigit():
        raise ApiError(
            400,
            "invalid_parameter",
            "cursor is not one this node issued",
            fields={"cursor": "pass back next_cursor from the previous page unchanged"},
        )
    return int(text[3:])


def _parse_since(raw: str) -> str:
    """``updated_since`` as ISO 8601 (offset required or UTC assumed) or DVCQG ``yyyyMMddHHmmss``."""
    try:
        if re.fullmatch(r"\d{14}", raw):
            dt = datetime.strptime(raw, "%Y%m%d%H%M%S").replace(tzinfo=TZ)
        else:
            dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
    except ValueError as exc:
        raise ApiError(
            400,
            "invalid_parameter",
            "updated_since must be ISO 8601 or yyyyMMddHHmmss",
            fields={"updated_since": "ISO 8601 (e.g. 2026-11-22T08:00:00+07:00) or yyyyMMddHHmmss"},
        ) from exc
    return iso(dt)


_LIST_PARAMS = {"status", "competent_unit", "updated_since", "limit", "cursor"}


@requires("clerk", "operator", "read-only")
async def list_dossiers(request: web.Request) -> web.Response:
    unknown = set(request.query) - _LIST_PARAMS
    if unknown:
        raise ApiError(
            400,
            "invalid_parameter",
            f"unknown query parameter(s): {', '.join(sorted(unknown))}",
            fields={u: "unknown parameter" for u in unknown},
        )
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if "status" in request.query:
        where.append("status = ?")
        params.append(_int_param(request, "status", 0, 1, 10))
    if unit := request.query.get("competent_unit"):
        if not re.fullmatch(r"\d{5}", unit):
            raise ApiError(
                400,
                "invalid_parameter",
                "competent_unit must be a 5-digit unit code",
                fields={"competent_unit": "a 5-digit unit code"},
            )
        where.append("competent_unit = ?")
        params.append(unit)
    if since := request.query.get("updated_since"):
        where.append("updated_at >= ?")
        params.append(_parse_since(since))
    if cursor := request.query.get("cursor"):
        where.append("id > ?")
        params.append(_decode_cursor(cursor))
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    rows = await request.app[STORE].fetchall(
        f"SELECT id, record, digest, code FROM dossiers WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
        [*params, limit + 1],
    )
    more = len(rows) > limit
    rows = rows[:limit]
    opened = (request.app[STORE].sealer.record(r[3], r[1]) for r in rows)
    items = ",".join(f'{record[:-1]},"digest":"{r[2]}"}}' for r, record in zip(rows, opened, strict=True))
    nxt = json.dumps(_encode_cursor(rows[-1][0]) if more and rows else None)
    return json_response(f'{{"items":[{items}],"next_cursor":{nxt}}}')


@requires("clerk", "operator", "read-only")
async def changes(request: web.Request) -> web.Response:
    since = _int_param(request, "since", 0, 0, 2**62)
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE * 2)
    rows = await request.app[STORE].fetchall(
        "SELECT code, change_seq, status, digest, updated_at FROM dossiers WHERE change_seq > ?"
        " ORDER BY change_seq LIMIT ?",
        (since, limit),
    )
    items = [{"code": r[0], "seq": r[1], "status": r[2], "digest": r[3], "updated_at": r[4]} for r in rows]
    return json_response({"items": items, "next": rows[-1][1] if rows else since})


@public
async def livez(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@public
async def readyz(request: web.Request) -> web.Response:
    if not request.app[READY]():
        raise ApiError(503, "not_ready", "the node is starting or stopping")
    return json_response({"status": "ready", "unit": request.app[UNIT]})


@requires("clerk", "operator", "drill", "peer", "read-only")
async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/dossiers", create_dossier)
    app.router.add_get("/api/v1/dossiers", list_dossiers)
    app.router.add_get("/api/v1/dossiers/{code}", get_dossier)
    app.router.add_post("/api/v1/dossiers/{code}/steps", add_step)
    app.router.add_post("/api/v1/dossiers/{code}/fees", add_fee)
    app.router.add_post("/api/v1/dossiers/{code}/forward", forward)
    app.router.add_post("/api/v1/dossiers/{code}/take-over", take_over)
    app.router.add_get("/api/v1/changes", changes)
    app.router.add_get("/api/v1/status", status)
    app.router.add_get("/api/v1/dead-letters", dead_letters)
    app.router.add_post("/api/v1/dead-letters/{target}/{code}/retry", retry_dead_letter)
    app.router.add_post("/api/v1/admin/failover", admin_failover)
    app.router.add_post("/api/v1/admin/faults", admin_faults_open)
    app.router.add_get("/api/v1/admin/faults", admin_faults_list)
    app.router.add_delete("/api/v1/admin/faults", admin_faults_clear)
    ws.add_routes(app)  # GET /sync/v1/{code}: Yjs sync over a WebSocket
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
