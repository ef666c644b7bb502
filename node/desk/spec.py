"""OpenAPI fragments for the desk's routes, merged into ``node/openapi.py``'s document."""

from __future__ import annotations

from typing import Any

from node.domain.validation import EDITABLE_FIELDS

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_DOSSIER = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Dossier"}}}}
_INT_FIELDS = {"LoaiDoiTuong", "HinhThuc"}

# The computed deadline standing that GET responses add to a record (never sent upstream).
DEADLINE_PROPERTIES: dict[str, Any] = {
    "TinhTrangHan": {
        "type": ["string", "null"],
        "enum": ["on_time", "at_risk", "late", None],
        "description": "Deadline standing by the portal's on-time rule, computed when read: late past "
        "NgayHenTraHieuLuc or after a second supplement request; at_risk with at most the catalogue's "
        "at_risk_working_hours left; null without NgayHenTra or once refused, withdrawn or stopped",
    },
    "NgayHenTraHieuLuc": {
        "type": ["string", "null"],
        "pattern": "^[0-9]{14}$",
        "description": "NgayHenTra moved by the working time spent waiting for the applicant's supplement",
    },
}


def edit_operation() -> dict[str, Any]:
    """``PATCH /api/v1/dossiers/{code}``."""
    props = {name: {"type": "integer" if name in _INT_FIELDS else "string"} for name in sorted(EDITABLE_FIELDS)}
    return {
        "summary": "Correct editable fields; If-Match must carry the digest (ETag) the clerk last read",
        "description": "Roles clerk or operator. The change is journaled and replicated like any other; it also "
        "revives a dossier an upstream dead-lettered. Fields that cannot be edited get 422.",
        "parameters": [
            {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "If-Match",
                "in": "header",
                "required": True,
                "schema": {"type": "string"},
                "description": 'The ETag of GET /api/v1/dossiers/{code}: "<digest>"',
            },
            {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": props}
                }
            },
        },
        "responses": {
            "200": {"description": "The dossier after the edit; ETag carries its new digest", **_DOSSIER},
            "400": {"description": "Malformed JSON or If-Match", **_ERROR},
            "404": {"description": "No such dossier", **_ERROR},
            "412": {
                "description": "The dossier changed since that digest; `error.record` is the current one",
                **_ERROR,
            },
            "415": {"description": "Body is not application/json", **_ERROR},
            "422": {"description": "Validation failed or a field that cannot be edited", **_ERROR},
            "428": {"description": "If-Match missing", **_ERROR},
        },
    }


def search_paths() -> dict[str, Any]:
    """``GET /api/v1/dossiers/search``."""
    q = "query"
    return {
        "/api/v1/dossiers/search": {
            "get": {
                "summary": "Search dossiers, newest first, with cursor pagination (roles clerk or operator)",
                "description": "Every parameter given must match. A name matches when every word of the query, "
                "without diacritics and case, equals a word of ChuHoSo.",
                "parameters": [
                    {"name": "id_number", "in": q, "schema": {"type": "string"}, "description": "SoGiayToChuHoSo"},
                    {"name": "name", "in": q, "schema": {"type": "string"}, "description": "words of ChuHoSo"},
                    {"name": "procedure", "in": q, "schema": {"type": "string"}, "description": "MaTTHC"},
                    {"name": "status", "in": q, "schema": {"type": "integer", "minimum": 1, "maximum": 10}},
                    {
                        "name": "from",
                        "in": q,
                        "schema": {"type": "string"},
                        "description": "received on or after: YYYY-MM-DD or yyyyMMddHHmmss",
                    },
                    {
                        "name": "to",
                        "in": q,
                        "schema": {"type": "string"},
                        "description": "received on or before: YYYY-MM-DD (the whole day) or yyyyMMddHHmmss",
                    },
                    {"name": "limit", "in": q, "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": q, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "items": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Dossier"},
                                        },
                                        "next_cursor": {"type": ["string", "null"]},
                                    },
                                }
                            }
                        },
                    },
                    "400": {"description": "Unknown or invalid query parameter", **_ERROR},
                },
            }
        }
    }
