"""The desk's routes: ``PATCH /api/v1/dossiers/{code}`` (edits with If-Match) and
``GET /api/v1/dossiers/search``.

Register with :func:`add_routes` *before* ``node.api.add_routes``: aiohttp matches routes in the order they
were added, and ``/api/v1/dossiers/{code}`` would otherwise take ``search`` for a dossier code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import date

from aiohttp import web

from node import api
from node.auth import requires
from node.desk import search as index
from node.desk.duedate import parse_dvcqg
from node.desk.edits import if_match_digests
from node.errors import ApiError

SEARCH_PARAMS = frozenset({"id_number", "name", "procedure", "status", "from", "to", "limit", "cursor"})
_PROCEDURE_RE = re.compile(r"[0-9]+(?:\.[0-9]+)+")
MAX_QUERY_CHARS = 250


@requires("clerk", "operator")
async def edit_dossier(request: web.Request) -> web.Response:
    """Correct editable fields of a dossier the clerk read at the digest given in If-Match."""
    code = request.match_info["code"]
    digests = if_match_digests(request.headers.get("If-Match"))
    body = await api.read_json(request)
    idem = api.idempotency(request, f"PATCH /api/v1/dossiers/{code}", {"body": body, "if_match": list(digests)})
    result = await request.app[api.SERVICE].edit(code, body, digests, idem)
    record = json.loads(result.body)
    # An edit answers 200 whether or not it changed anything; the service's 201 means "changed".
    response = api.json_response(result.body, status=200)
    response.headers["ETag"] = f'"{record["digest"]}"'
    return response


@requires("clerk", "operator")
async def search_dossiers(request: web.Request) -> web.Response:
    """Dossiers by ID number, name words, procedure, status and receipt dates; newest first, paginated."""
    query = request.query
    unknown = set(query) - SEARCH_PARAMS
    if unknown:
        raise _bad(
            f"unknown query parameter(s): {', '.join(sorted(unknown))}", {u: "unknown parameter" for u in unknown}
        )
    id_number = _text(request, "id_number")
    name = _text(request, "name")
    if name is not None and not index.name_terms(name):
        raise _bad("name has no letters or digits to search by", {"name": "one or more words of the name"})
    procedure = _text(request, "procedure")
    if procedure is not None and not _PROCEDURE_RE.fullmatch(procedure):
        raise _bad("procedure must be a procedure code", {"procedure": "a procedure code such as 1.001193"})
    status = api._int_param(request, "status", 0, 1, 10) if "status" in query else None
    received_from = _date(request, "from", end_of_day=False)
    received_to = _date(request, "to", end_of_day=True)
    limit = api._int_param(request, "limit", api.DEFAULT_PAGE, 1, api.MAX_PAGE)
    before = _cursor(query["cursor"]) if query.get("cursor") else None
    rows, more = await index.search(
        request.app[api.STORE],
        id_number=id_number,
        name=name,
        procedure=procedure,
        status=status,
        received_from=received_from,
        received_to=received_to,
        before_id=before,
        limit=limit,
    )
    node = request.app[api.NODE]
    now = node.clock.now()
    items = ",".join(
        f'{record[:-1]},"digest":"{digest}"{node.deadlines.json_tail(record, now)}}}' for _, _, record, digest in rows
    )
    nxt = json.dumps(_encode_cursor(rows[-1][0]) if more and rows else None)
    return api.json_response(f'{{"items":[{items}],"next_cursor":{nxt}}}')


def _bad(message: str, fields: dict[str, str]) -> ApiError:
    return ApiError(400, "invalid_parameter", message, fields=fields)


def _text(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    value = raw.strip()
    if not value or len(value) > MAX_QUERY_CHARS:
        raise _bad(f"{name} must be 1 to {MAX_QUERY_CHARS} characters", {name: f"1 to {MAX_QUERY_CHARS} characters"})
    return value


def _date(request: web.Request, name: str, *, end_of_day: bool) -> str | None:
    """A receipt-date bound as yyyyMMddHHmmss: YYYY-MM-DD (the whole day) or yyyyMMddHHmmss."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if re.fullmatch(r"[0-9]{14}", raw) and parse_dvcqg(raw) is not None:
        return raw
    try:
        day = date.fromisoformat(raw) if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw) else None
    except ValueError:
        day = None
    if day is None:
        raise _bad(
            f"{name} must be a date YYYY-MM-DD or yyyyMMddHHmmss",
            {name: "a receipt date, YYYY-MM-DD (the whole day) or yyyyMMddHHmmss"},
        )
    return day.strftime("%Y%m%d") + ("235959" if end_of_day else "000000")


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"search:{row_id}".encode()).decode().rstrip("=")


def _cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("search:") or not text[7:].isdigit():
        raise _bad(
            "cursor is not one this node issued", {"cursor": "pass back next_cursor from the previous page unchanged"}
        )
    return int(text[7:])


async def _backfill(app: web.Application) -> None:
    await index.backfill(app[api.STORE])


def add_routes(app: web.Application) -> None:
    """Register the desk's routes (before ``node.api.add_routes``, see the module docstring)."""
    app.router.add_get("/api/v1/dossiers/search", search_dossiers)
    app.router.add_patch("/api/v1/dossiers/{code}", edit_dossier)
    # Dossiers stored before the search index existed are indexed once the store is open.
    app.on_startup.append(_backfill)
