"""Signed receipts: proof, checkable offline, that this unit accepted a dossier with a given content.

The unit's Ed25519 key lives in ``<key_dir>/receipt-ed25519.pem`` (mode 0600), generated on first start.
``key_dir`` defaults to ``<data_dir>/keys``: the one directory a hardened service may write, so the key
exists wherever the store does; set ``[node] key_dir`` to keep it elsewhere (then a copy of the data
directory does not carry the private key).

A receipt is a flat JSON object: ``code``, ``received_at``, ``unit``, ``agency_code``, ``digest`` (the record
as accepted), ``key_id``, ``audit_seq`` and ``audit_hash`` (the audit entry that recorded the intake, which
anchors the audit log outside the node), and ``signature``: base64 of the Ed25519 signature over the
canonical JSON of every other field (sorted keys, no spaces, UTF-8). Ed25519 is deterministic, so the
receipt of a dossier is the same every time it is asked for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.auth import requires
from node.errors import ApiError

KEY_FILE = "receipt-ed25519.pem"
ALGORITHM = "Ed25519"
FIELDS = ("code", "received_at", "unit", "agency_code", "digest", "key_id", "audit_seq", "audit_hash")


class ReceiptKeyError(Exception):
    """The receipt key cannot be used (unreadable, not Ed25519, or readable by others)."""


class InvalidReceipt(Exception):
    """A receipt that does not verify; the message says why."""


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass(frozen=True)
class ReceiptKey:
    private: Ed25519PrivateKey
    path: Path

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public)

    def sign(self, content: dict[str, Any]) -> dict[str, Any]:
        body = {**content, "key_id": self.key_id}
        signature = base64.b64encode(self.private.sign(canonical(body))).decode()
        return {**body, "signature": signature}


def load_or_create(key_dir: Path) -> ReceiptKey:
    """The unit's key, generated (mode 0600) the first time; refused if others may read it."""
    path = key_dir / KEY_FILE
    if not path.exists():
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            # O_EXCL: two processes starting at once must not each write a different key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ReceiptKeyError(
                f"{path}: the receipt signing key is readable by others (mode {mode:o}); chmod 600 {path}"
            )
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ReceiptKeyError(f"{path}: cannot load the receipt signing key: {exc}") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise ReceiptKeyError(f"{path}: not an Ed25519 private key")
    return ReceiptKey(private, path)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise InvalidReceipt(f"the public key is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidReceipt("the public key is not an Ed25519 key")
    return key


def verify(receipt: object, public: Ed25519PublicKey) -> dict[str, Any]:
    """Check one receipt against a public key; returns it, raises InvalidReceipt saying why not."""
    if not isinstance(receipt, dict):
        raise InvalidReceipt("a receipt is a JSON object")
    missing = [f for f in (*FIELDS, "signature") if f not in receipt]
    if missing:
        raise InvalidReceipt(f"the receipt lacks {', '.join(missing)}")
    if receipt["key_id"] != key_id_of(public):
        raise InvalidReceipt(
            f"the receipt was signed with key {receipt['key_id']}, not with this public key ({key_id_of(public)})"
        )
    try:
        signature = base64.b64decode(str(receipt["signature"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidReceipt("the signature is not base64") from exc
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        public.verify(signature, canonical(body))
    except InvalidSignature as exc:
        raise InvalidReceipt("the signature does not match: the receipt was altered or signed by another key") from exc
    return receipt


def key_dir_of(config: Any) -> Path:
    return Path(config.node.key_dir) if getattr(config.node, "key_dir", "") else config.data_path / "keys"


# -- HTTP -------------------------------------------------------------------------------------------


def _node(request: web.Request) -> Any:
    from node.api import NODE

    return request.app[NODE]


def _key(node: Any) -> ReceiptKey:
    key: ReceiptKey | None = getattr(node, "receipt_key", None)
    if key is None:
        raise ApiError(503, "not_ready", "the node is starting: its receipt key is not loaded yet")
    return key


@requires("clerk", "operator", "read-only")
async def signed_receipt(request: web.Request) -> web.Response:
    """The signed receipt of a dossier accepted at this unit."""
    node = _node(request)
    code = request.match_info["code"]
    row = await node.store.fetchone(
        "SELECT seq, at, digest, hash FROM audit_log WHERE code = ? AND kind = 'intake' ORDER BY seq LIMIT 1", (code,)
    )
    if row is None:
        known = await node.store.fetchone("SELECT 1 FROM dossiers WHERE code = ?", (code,))
        if known is None:
            raise ApiError(404, "not_found", f"no dossier with code {code!r}")
        raise ApiError(
            404,
            "no_receipt",
            f"{code} was not accepted at this unit's desk since receipts were introduced (it came from elsewhere "
            "or predates them): there is no receipt to sign",
        )
    seq, at, digest, entry_hash = row
    content = {
        "code": code,
        "received_at": at,
        "unit": node.config.node.unit,
        "agency_code": node.config.node.agency_code,
        "digest": digest,
        "audit_seq": int(seq),
        "audit_hash": entry_hash,
    }
    return web.json_response(_key(node).sign(content), dumps=lambda v: json.dumps(v, ensure_ascii=False))


@requires("clerk", "operator", "drill", "peer", "read-only")
async def receipt_key(request: web.Request) -> web.Response:
    """The unit's public receipt key (PEM) and its id."""
    key = _key(_node(request))
    return web.json_response(
        {
            "algorithm": ALGORITHM,
            "key_id": key.key_id,
            "public_key": public_pem(key.public),
            "unit": _node(request).config.node.unit,
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/dossiers/{code}/signed-receipt", signed_receipt)
    app.router.add_get("/api/v1/keys/receipt", receipt_key)


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI description of the receipt routes."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    receipt = {
        "type": "object",
        "required": [*FIELDS, "signature"],
        "properties": {
            "code": {"type": "string"},
            "received_at": {"type": "string", "description": "commit time of the intake, ISO 8601 UTC"},
            "unit": {"type": "string"},
            "agency_code": {"type": "string"},
            "digest": {"type": "string", "description": "sha256 digest of the record as accepted"},
            "key_id": {"type": "string"},
            "audit_seq": {"type": "integer", "description": "the audit entry that recorded the intake"},
            "audit_hash": {"type": "string"},
            "signature": {
                "type": "string",
                "description": "base64 Ed25519 signature over the canonical JSON (sorted keys, no spaces, UTF-8)"
                " of every other field",
            },
        },
    }
    code = {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/api/v1/dossiers/{code}/signed-receipt": {
            "get": {
                "summary": "The receipt of a dossier accepted here, signed with the unit's Ed25519 key"
                " (roles clerk, operator, read-only); check it offline with `wardsync verify-receipt`",
                "parameters": [code],
                "responses": {
                    "200": {"description": "Signed receipt", "content": {"application/json": {"schema": receipt}}},
                    "404": {"description": "No such dossier, or not accepted at this unit (`no_receipt`)", **error},
                },
            }
        },
        "/api/v1/keys/receipt": {
            "get": {
                "summary": "The unit's public receipt key (any role)",
                "responses": {
                    "200": {
                        "description": "PEM public key and its id",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "algorithm": {"type": "string", "const": ALGORITHM},
                                        "key_id": {"type": "string"},
                                        "public_key": {"type": "string", "description": "PEM (SubjectPublicKeyInfo)"},
                                        "unit": {"type": "string"},
                                    },
                                }
                            }
                        },
                    }
                },
            }
        },
    }
