"""OpenAPI 3.1 description of the node's HTTP API, built once from the validators' field lists."""

from __future__ import annotations

import functools
from typing import Any

from node import __version__
from node.desk.spec import DEADLINE_PROPERTIES, edit_operation, search_paths
from node.domain.validation import (
    DOCUMENT_FIELDS,
    DOCUMENT_REQUIRED,
    FEE_FIELDS,
    FEE_REQUIRED,
    INTAKE_FIELDS,
    INTAKE_REQUIRED,
    STEP_FIELDS,
    STEP_REQUIRED,
)
from node.receipts import openapi_paths as receipt_paths

_DT = {"type": "string", "pattern": "^[0-9]{14}$", "description": "yyyyMMddHHmmss, Asia/Ho_Chi_Minh"}
_INT_FIELDS = {
    "KenhThucHien",
    "LoaiDoiTuong",
    "HinhThuc",
    "TrangThai",
    "DuocSoHoa",
    "HinhThucThu",
    "Gia",
    "LoaiPhiLePhi",
    "TrangThaiHoSo",
    "TrangThaiPhiDiaGioi",
}
_DT_FIELDS = {
    "NgayHenTra",
    "NgayTiepNhan",
    "NgayTra",
    "NgayKetThucXuLy",
    "ThoiDiemXuLy",
    "NgayBatDau",
    "NgayKetThucTheoQuyDinh",
}


def _props(names: frozenset[str], nested: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name in sorted(names):
        if nested and name in nested:
            props[name] = nested[name]
        elif name in _INT_FIELDS:
            props[name] = {"type": "integer"}
        elif name in _DT_FIELDS:
            props[name] = dict(_DT)
        else:
            props[name] = {"type": "string"}
    return props


def _obj(names: frozenset[str], required: frozenset[str], nested: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": sorted(required),
        "properties": _props(names, nested),
    }


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON, bad query parameter or Idempotency-Key",
        404: "No such dossier",
        409: "Illegal status transition (`error.allowed` lists the allowed next statuses) or conflicting fee",
        413: "Body larger than the configured limit",
        415: "Body is not application/json",
        422: "Validation failed (`error.fields` maps each invalid field to what is wrong) or Idempotency-Key "
        "reused with a different body",
        503: "Store unavailable or node not ready",
        507: "The disk holding the store is full; nothing was written",
    }
    return {str(s): {"description": text[s], **_json(_ref("Error"))} for s in statuses}


_IDEM = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 200},
    "description": "A retry with the same key and body returns the first response; another body gets a 422.",
}
_CODE = {
    "name": "code",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Dossier code {agency}-{YYMMDD}-{NNNN}",
}


_STORED_DOCUMENT = {
    "type": "object",
    "description": "A submitted document (TaiLieuNop item); an uploaded one carries its file's hash, size and URL",
    "required": ["TepDinhKemId", "TenTepDinhKem"],
    "properties": {
        "TepDinhKemId": {"type": "string", "description": "for an uploaded file, its sha256"},
        "TenTepDinhKem": {"type": "string"},
        "MaThanhPhanHoSo": {"type": "string"},
        "DuongDanTaiTepTin": {"type": "string", "description": "absolute download URL on the node that stored it"},
        "DuocSoHoa": {"type": "integer", "enum": [0, 1]},
        "Sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 of the file, hex"},
        "KichThuoc": {"type": "integer", "description": "size of the file in bytes"},
    },
}


def _document_paths() -> dict[str, Any]:
    """Submitted documents (upload, list, download) and the printable receipt."""
    sha = {"name": "sha256", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}
    form = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "at most max_document_bytes"},
                    "TenTepDinhKem": {"type": "string", "description": "defaults to the file part's filename"},
                    "MaThanhPhanHoSo": {"type": "string"},
                    "DuocSoHoa": {"type": "integer", "enum": [0, 1]},
                },
            }
        }
    }
    listed = {"allOf": [_ref("StoredDocument"), {"type": "object", "properties": {"stored": {"type": "boolean"}}}]}
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "/api/v1/dossiers/{code}/documents": {
            "post": {
                "summary": "Upload a submitted document (multipart, streamed, stored by sha256); added to TaiLieuNop",
                "description": "Roles clerk or operator. DuongDanTaiTepTin is built from [node] public_url.",
                "parameters": [_CODE, _IDEM],
                "requestBody": {"required": True, "content": form},
                "responses": {
                    "201": {"description": "Stored and recorded; Location is its URL", **_json(_ref("Dossier"))},
                    "200": {"description": "The same document was already recorded", **_json(_ref("Dossier"))},
                    "409": {"description": "The same file is recorded with other metadata", **_json(_ref("Error"))},
                    **_errors(400, 404, 413, 415, 422, 503, 507),
                },
            },
            "get": {
                "summary": "The dossier's documents, each with whether this node holds its file (stored)",
                "description": "Roles clerk, operator, peer or read-only.",
                "parameters": [_CODE],
                "responses": {
                    "200": {
                        "description": "Documents",
                        **_json({"type": "object", "properties": {"items": {"type": "array", "items": listed}}}),
                    },
                    **_errors(404),
                },
            },
        },
        "/api/v1/dossiers/{code}/documents/{sha256}": {
            "get": {
                "summary": "A document's file; Range requests get 206 (a broken fetch resumes); "
                "Repr-Digest has its hash",
                "description": "Roles clerk, operator or peer (other nodes and the upstreams follow "
                "DuongDanTaiTepTin with a peer token).",
                "parameters": [_CODE, sha],
                "responses": {
                    "200": {"description": "The file", "content": binary},
                    "206": {"description": "The requested range", "content": binary},
                    "404": {
                        "description": "No such dossier or document, or the file is not here yet (not_stored)",
                        **_json(_ref("Error")),
                    },
                },
            },
        },
        "/api/v1/dossiers/{code}/receipt": {
            "get": {
                "summary": "Printable receipt (phiếu tiếp nhận và hẹn trả kết quả): HTML, or PDF with ?format=pdf "
                "or Accept: application/pdf",
                "description": "Roles clerk or operator. The dossier code as a QR code, and the due date (NgayHenTra).",
                "parameters": [_CODE, {"name": "format", "in": "query", "schema": {"enum": ["html", "pdf"]}}],
                "responses": {
                    "200": {
                        "description": "The receipt",
                        "content": {"text/html": {"schema": {"type": "string"}}, "application/pdf": {}},
                    },
                    **_errors(400, 404),
                },
            },
        },
    }


_TARGET_STATUS = {
    "type": "object",
    "properties": {
        "state": {"enum": ["healthy", "degraded", "down"]},
        "breaker": {"enum": ["closed", "open", "half_open"]},
        "lag_records": {"type": "integer"},
        "lag_seconds": {"type": "number"},
        "pending": {"type": "integer"},
        "dead": {"type": "integer"},
        "parked": {"type": "integer"},
        "held": {"type": "integer", "description": "imported dossiers waiting for the portal check"},
        "last_ok_at": {"type": ["string", "null"]},
        "last_error": {"type": ["string", "null"]},
        "antientropy": {"type": ["object", "null"], "description": "checked, missing_remote, missing_local, "
                        "different, repaired, skipped (cumulative)"},
    },
}
_STATUS = {
    "type": "object",
    "required": ["unit", "active_source", "targets", "events"],
    "properties": {
        "unit": {"type": "string"},
        "active_source": {"enum": ["national", "city", None]},
        "offline": {"type": "boolean"},
        "targets": {"type": "object", "additionalProperties": _TARGET_STATUS},
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "at": {"type": "string"},
                    "kind": {"type": "string"},
                    "from": {"type": ["string", "null"]},
                    "to": {"type": ["string", "null"]},
                    "reason": {"type": "string"},
                },
            },
        },
    },
}


@functools.cache
def _dashboard_paths() -> dict[str, Any]:
    """The node dashboard and its sign-in page (HTML for browsers, see README "Dashboards")."""
    html = {"text/html": {"schema": {"type": "string"}}}
    form = {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "properties": {"token": {"type": "string"}, "csrf": {"type": "string"}, "next": {"type": "string"}},
            }
        }
    }
    return {
        "/": {"get": {"summary": "Node dashboard (signed-in browser; otherwise 303 to /login)",
                      "responses": {"200": {"description": "HTML page", "content": html}}}},
        "/dashboard/panels": {"get": {"summary": "The dashboard's live panels as an HTML fragment",
                                      "responses": {"200": {"description": "HTML fragment", "content": html}}}},
        "/dashboard/dossiers/{code}": {"get": {
            "summary": "One dossier as an HTML fragment (look-up by code)",
            "parameters": [_CODE],
            "responses": {"200": {"description": "HTML fragment", "content": html},
                          "404": {"description": "No such dossier (HTML fragment)", "content": html}},
        }},
        "/dashboard/static/{name}": {"get": {
            "summary": "The dashboards' CSS and JavaScript (public)",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "file"}, **_errors(404)},
        }},
        "/login": {
            "get": {"summary": "Sign-in form (public)", "responses": {"200": {"description": "HTML", "content": html}}},
            "post": {
                "summary": "Exchange a token for an HttpOnly, SameSite=Strict session cookie (public)",
                "requestBody": {"content": form},
                "responses": {
                    "303": {"description": "Signed in: cookie set, redirect to `next`"},
                    "401": {"description": "Unknown or revoked token (the form again)", "content": html},
                    "403": {"description": "Expired form or a token without a dashboard role", "content": html},
                    "429": {"description": "Too many failed attempts from this address", "content": html},
                },
            },
        },
        "/logout": {"post": {
            "summary": "End the browser session (form field `csrf` or header X-CSRF-Token)",
            "responses": {"303": {"description": "Signed out, redirect to /login"},
                          "403": {"description": "Missing or wrong CSRF token", **_json(_ref("Error"))}},
        }},
        "/api/v1/status/history": {"get": {
            "summary": "Replication lag, breaker and active source sampled every 10 s over the last hour",
            "responses": {"200": {"description": "Samples, oldest first", **_json({
                "type": "object",
                "properties": {
                    "interval_s": {"type": "number"},
                    "size": {"type": "integer"},
                    "points": {"type": "array", "items": {"type": "object", "properties": {
                        "at": {"type": "string"},
                        "journal_head": {"type": "integer"},
                        "active_source": {"type": ["string", "null"]},
                        "targets": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                            "lag_records": {"type": "integer"},
                            "lag_seconds": {"type": "number"},
                            "breaker": {"type": ["string", "null"]},
                        }}},
                    }}},
                },
            })}},
        }},
    }


def openapi_document() -> dict[str, Any]:
    step = _obj(STEP_FIELDS, STEP_REQUIRED)
    fee = _obj(FEE_FIELDS, FEE_REQUIRED)
    document = _obj(DOCUMENT_FIELDS, DOCUMENT_REQUIRED)
    intake = _obj(
        INTAKE_FIELDS,
        INTAKE_REQUIRED,
        {
            "TaiLieuNop": {"type": "array", "items": _ref("Document")},
            "DanhSachLePhi": {"type": "array", "items": _ref("Fee")},
        },
    )
    dossier = {
        "type": "object",
        "description": "The dossier's DVCQG-shaped record plus its digest.",
        "required": ["MaHoSo", "NgayTiepNhan", "TrangThaiHoSo", "digest"],
        "properties": {
            **_props(INTAKE_FIELDS - {"TaiLieuNop", "DanhSachLePhi", "NguoiTiepNhan"}),
            "MaHoSo": {"type": "string"},
            "NgayTiepNhan": dict(_DT),
            "NgayTra": dict(_DT),
            "NgayKetThucXuLy": dict(_DT),
            "TrangThaiHoSo": {"type": ["integer", "null"], "minimum": 1, "maximum": 10},
            "MaDonViTiepNhan": {"type": "string", "pattern": "^[0-9]{5}$"},
            "TrangThaiPhiDiaGioi": {"type": "integer", "enum": [1, 2, 3, 4]},
            "QuaTrinhXuLy": {"type": "array", "items": {"type": "object"}},
            "TaiLieuNop": {"type": "array", "items": _ref("StoredDocument")},
            "DanhSachLePhi": {"type": "array", "items": _ref("Fee")},
            "digest": {"type": "string", "description": "sha256 of the record's canonical JSON"},
            "replication": {
                "type": "object",
                "description": "Per target: state, acked_digest, attempts, "
                "last_error, updated_at (GET of one dossier only)",
            },
            "conflicts": {
                "type": "array",
                "items": {"type": "object"},
                "description": "Steps skipped as illegal in the merged order",
            },
            **DEADLINE_PROPERTIES,
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "fields"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "fields": {"type": "object", "additionalProperties": {"type": "string"}},
                    "current": {"type": ["integer", "null"]},
                    "allowed": {"type": "array", "items": {"type": "integer"}},
                },
            }
        },
    }
    change = {
        "type": "object",
        "properties": {
            "code": {"type": "string"},
            "seq": {"type": "integer"},
            "status": {"type": ["integer", "null"]},
            "digest": {"type": "string"},
            "updated_at": {"type": "string", "format": "date-time"},
        },
    }
    q = "query"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "wardsync node API",
            "version": __version__,
            "description": "Offline-first intake of administrative-procedure dossiers at one unit. Every route but "
            "/livez and /readyz needs 'Authorization: Bearer TOKEN' with a role the route admits (clerk, operator, "
            "drill, peer, read-only): 401 without a valid token, 403 with a role the route does not admit, 429 "
            "after repeated failures from one address.",
        },
        "security": [{"bearerAuth": []}],
        "paths": {
            "/api/v1/dossiers": {
                "post": {
                    "summary": "Accept a dossier at the desk (201 only after it is durably stored)",
                    "parameters": [_IDEM],
                    "requestBody": {"required": True, **_json(_ref("Intake"))},
                    "responses": {
                        "201": {"description": "Accepted", **_json(_ref("Dossier"))},
                        **_errors(400, 413, 415, 422, 503, 507),
                    },
                },
                "get": {
                    "summary": "List dossiers, oldest first, with cursor pagination",
                    "parameters": [
                        {"name": "status", "in": q, "schema": {"type": "integer", "minimum": 1, "maximum": 10}},
                        {"name": "competent_unit", "in": q, "schema": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        {
                            "name": "updated_since",
                            "in": q,
                            "schema": {"type": "string"},
                            "description": "ISO 8601 or yyyyMMddHHmmss",
                        },
                        {"name": "limit", "in": q, "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {"name": "cursor", "in": q, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {
                            "description": "A page",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "items": {"type": "array", "items": _ref("Dossier")},
                                        "next_cursor": {"type": ["string", "null"]},
                                    },
                                }
                            ),
                        },
                        **_errors(400),
                    },
                },
            },
            **search_paths(),
            "/api/v1/dossiers/{code}": {
                "get": {
                    "summary": "One dossier; ETag carries its digest, for PATCH's If-Match",
                    "parameters": [_CODE],
                    "responses": {"200": {"description": "The dossier", **_json(_ref("Dossier"))}, **_errors(404)},
                },
                "patch": edit_operation(),
            },
            "/api/v1/dossiers/{code}/steps": {
                "post": {
                    "summary": "Append a processing step (QuaTrinhXuLy); the status follows the status machine",
                    "parameters": [_CODE, _IDEM],
                    "requestBody": {"required": True, **_json(_ref("Step"))},
                    "responses": {
                        "201": {"description": "Step added", **_json(_ref("Dossier"))},
                        "200": {"description": "The same step was already recorded", **_json(_ref("Dossier"))},
                        **_errors(400, 404, 409, 413, 415, 422, 503, 507),
                    },
                },
            },
            "/api/v1/dossiers/{code}/fees": {
                "post": {
                    "summary": "Record a fee (DanhSachLePhi); fees are append-only",
                    "parameters": [_CODE, _IDEM],
                    "requestBody": {"required": True, **_json(_ref("Fee"))},
                    "responses": {
                        "201": {"description": "Fee added", **_json(_ref("Dossier"))},
                        "200": {"description": "The same fee was already recorded", **_json(_ref("Dossier"))},
                        **_errors(400, 404, 409, 413, 415, 422, 503, 507),
                    },
                },
            },
            **_document_paths(),
            "/api/v1/dossiers/{code}/forward": {
                "post": {
                    "summary": "Receiving unit forwards a boundary-free dossier to its competent unit (1 → 4)",
                    "parameters": [_CODE, _IDEM],
                    "responses": {
                        "201": {"description": "Forwarded", **_json(_ref("Dossier"))},
                        "200": {"description": "Already forwarded", **_json(_ref("Dossier"))},
                        "403": {"description": "This node is not the receiving unit", **_json(_ref("Error"))},
                        **_errors(404, 409, 422),
                    },
                },
            },
            "/api/v1/dossiers/{code}/take-over": {
                "post": {
                    "summary": "Competent unit takes a forwarded dossier over (4 → 2); returning its result sets 3",
                    "parameters": [_CODE, _IDEM],
                    "responses": {
                        "201": {"description": "Taken over", **_json(_ref("Dossier"))},
                        "200": {"description": "Already taken over", **_json(_ref("Dossier"))},
                        "403": {"description": "This node is not the competent unit", **_json(_ref("Error"))},
                        **_errors(404, 409, 422),
                    },
                },
            },
            "/api/v1/changes": {
                "get": {
                    "summary": "Dossiers changed after a local sequence number, in sequence order",
                    "parameters": [
                        {"name": "since", "in": q, "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": q, "schema": {"type": "integer", "minimum": 1}},
                    ],
                    "responses": {
                        "200": {
                            "description": "Changes",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "items": {"type": "array", "items": _ref("Change")},
                                        "next": {"type": "integer"},
                                    },
                                }
                            ),
                        },
                        **_errors(400),
                    },
                },
            },
            "/api/v1/status": {
                "get": {
                    "summary": "Replication and health per target, the active source and recent failover events",
                    "responses": {"200": {"description": "Status", **_json(_ref("Status"))}},
                },
            },
            "/api/v1/admin/failover": {
                "post": {
                    "summary": "Force the active source for ttl_s seconds (default 3600), or release it with auto",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["primary"],
                                "properties": {
                                    "primary": {"enum": ["national", "city", "auto"]},
                                    "ttl_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
                                },
                            }
                        ),
                    },
                    "responses": {
                        "200": {"description": "The choice now", **_json({"type": "object"})},
                        **_errors(400, 409, 415, 422),
                    },
                },
            },
            "/api/v1/admin/faults": {
                "post": {
                    "summary": "Open a local fault window in one target's path; it closes by itself after seconds",
                    "requestBody": {
                        "required": True,
                        **_json(
                            {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["target", "mode", "seconds"],
                                "properties": {
                                    "target": {"enum": ["national", "city"]},
                                    "mode": {"enum": ["down", "blackhole", "latency", "error_rate"]},
                                    "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
                                    "ms": {"type": "number"},
                                    "rate": {"type": "number"},
                                },
                            }
                        ),
                    },
                    "responses": {
                        "201": {"description": "Open windows", **_json({"type": "object"})},
                        **_errors(400, 415, 422),
                    },
                },
                "get": {
                    "summary": "Open fault windows",
                    "responses": {"200": {"description": "Open windows", **_json({"type": "object"})}},
                },
                "delete": {
                    "summary": "Close every fault window (or those of ?target=)",
                    "parameters": [{"name": "target", "in": q, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "Closed", **_json({"type": "object"})}},
                },
            },
            "/api/v1/dead-letters": {
                "get": {
                    "summary": "Dossiers dead-lettered or parked, oldest first",
                    "parameters": [
                        {"name": "target", "in": q, "schema": {"type": "string"}},
                        {"name": "limit", "in": q, "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    ],
                    "responses": {
                        "200": {
                            "description": "Dead letters",
                            **_json(
                                {
                                    "type": "object",
                                    "properties": {"items": {"type": "array", "items": {"type": "object"}}},
                                }
                            ),
                        },
                        **_errors(400),
                    },
                },
            },
            "/api/v1/dead-letters/{target}/{code}/retry": {
                "post": {
                    "summary": "Send a dead-lettered or parked dossier to its target again",
                    "parameters": [
                        {"name": "target", "in": "path", "required": True, "schema": {"type": "string"}},
                        _CODE,
                    ],
                    "responses": {"202": {"description": "Queued again", **_json({"type": "object"})}, **_errors(404)},
                },
            },
            "/sync/v1/{code}": {
                "get": {
                    "summary": "Yjs sync for one dossier: a WebSocket speaking the y-websocket protocol",
                    "parameters": [_CODE],
                    "responses": {
                        "101": {"description": "WebSocket open; refusals close with 4400, unknown code with 4404"},
                        "426": {"description": "Not a WebSocket upgrade", **_json(_ref("Error"))},
                    },
                },
            },
            "/livez": {
                "get": {"summary": "The process is alive", "security": [], "responses": {"200": {"description": "ok"}}}
            },
            "/readyz": {
                "get": {
                    "summary": "The node accepts dossiers",
                    "security": [],
                    "responses": {"200": {"description": "ready"}, **_errors(503)},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
            **_dashboard_paths(),
            **receipt_paths(),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format); roles operator or read-only",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from 'wardsync token create --role ROLE'; browsers sign in at /login",
                }
            },
            "schemas": {
                "Intake": intake,
                "Step": step,
                "Fee": fee,
                "Document": document,
                "StoredDocument": _STORED_DOCUMENT,
                "Dossier": dossier,
                "Status": _STATUS,
                "Error": error,
                "Change": change,
            }
        },
    }
