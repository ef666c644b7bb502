"""Submitted documents (TaiLieuNop): files stored by content hash, uploaded at the desk, served to peers.

A file lives at ``<data_dir>/documents/<sha256[:2]>/<sha256>``. It is written to a temporary file while it
streams in, hashed chunk by chunk, fsynced and renamed into place, so a file is either whole under its
hash or not there at all; the dossier's Doc records it only after that. Nothing holds a whole file in
memory: uploads are read part by part with ``request.multipart()`` in chunks, downloads are served with
``FileResponse`` (which also answers ``Range`` requests, so a peer resumes a broken fetch).
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import mimetypes
import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from node import api
from node.auth import requires
from node.config import Config
from node.domain.validation import validate_document
from node.errors import ApiError, validation_error
from node.store import fsync_dir

CHUNK_BYTES = 64 * 1024
HASH_FIELD = "Sha256"  # sha256 of the file's bytes, lowercase hex
SIZE_FIELD = "KichThuoc"  # the file's size in bytes
URL_FIELD = "DuongDanTaiTepTin"
SHA256 = re.compile(r"[0-9a-f]{64}")
# The form fields besides the file; each is short, so a few kilobytes is plenty.
FORM_FIELDS = ("TenTepDinhKem", "MaThanhPhanHoSo", "DuocSoHoa")
MAX_FORM_FIELD_BYTES = 4096
# Headers and boundaries of a form with a few fields: the Content-Length a file of the limit may come with.
FORM_OVERHEAD_BYTES = 64 * 1024
_PARTIAL_DIR = ".partial"


class TooLarge(Exception):
    """More bytes arrived than the limit allows."""


class BlobStore:
    """Content-addressed files under one directory; stateless apart from the files themselves."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self.path_of(sha).is_file()

    def partial_path(self, name: str) -> Path:
        # Temporary and resumable files share the store's file system, so the final rename is atomic.
        return self.root / _PARTIAL_DIR / name

    def temp_path(self) -> Path:
        return self.partial_path(f"upload-{secrets.token_hex(8)}.tmp")

    async def install(self, partial: PartialFile, sha: str) -> Path:
        """Make ``partial`` durable and move it into place under ``sha``; a copy already there wins."""
        final = self.path_of(sha)

        def move() -> None:
            partial.sync_and_close()
            if final.is_file():
                partial.path.unlink(missing_ok=True)
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial.path, final)
            # The rename is durable only once the directory holding the new name is on disk.
            fsync_dir(final.parent)

        await asyncio.to_thread(move)
        return final



class PartialFile:
    """A file being written chunk by chunk and hashed as it grows; never more than ``limit`` bytes."""

    def __init__(self, path: Path, fh: BinaryIO, limit: int, size: int, hasher: Any) -> None:
        self.path = path
        self._fh: BinaryIO | None = fh
        self.limit = limit
        self.size = size
        self._hasher = hasher
        self.largest_write = 0

    @classmethod
    async def open(cls, path: Path, limit: int, *, resume: bool = False) -> PartialFile:
        """A new file at ``path``, or with ``resume`` the bytes already there, hashed again from disk."""

        def opener() -> PartialFile:
            path.parent.mkdir(parents=True, exist_ok=True)
            hasher = hashlib.sha256()
            size = 0
            if resume and path.is_file() and path.stat().st_size <= limit:
                with path.open("rb") as existing:
                    while block := existing.read(CHUNK_BYTES * 16):
                        hasher.update(block)
                        size += len(block)
                return cls(path, path.open("ab"), limit, size, hasher)
            return cls(path, path.open("wb"), limit, 0, hasher)

        return await asyncio.to_thread(opener)

    def write(self, chunk: bytes) -> None:
        # Plain writes land in the page cache and are cheap; the fsync that waits for the disk runs in a
        # thread (install).
        if self._fh is None:
            raise ValueError("the file is closed")
        if self.size + len(chunk) > self.limit:
            raise TooLarge(self.limit)
        self._fh.write(chunk)
        self._hasher.update(chunk)
        self.size += len(chunk)
        self.largest_write = max(self.largest_write, len(chunk))

    def hexdigest(self) -> str:
        return str(self._hasher.hexdigest())

    def restart(self) -> None:
        """Drop what was written and start again from the first byte."""
        if self._fh is None:
            raise ValueError("the file is closed")
        self._fh.seek(0)
        self._fh.truncate()
        self._hasher = hashlib.sha256()
        self.size = 0

    def sync_and_close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Close, keeping what was written (a fetch resumes from it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def blob_store(config: Config) -> BlobStore:
    return BlobStore(config.data_path / "documents")


def public_base(config: Config, request: web.Request | None = None) -> str:
    """The absolute base URL other systems reach this node at: ``public_url``, else derived from listen."""
    if config.node.public_url:
        return config.node.public_url.rstrip("/")
    host, port = config.listen_host, config.listen_port
    if port and host not in ("0.0.0.0", "::", ""):
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if request is not None:
        # Listening on a wildcard address or an ephemeral port: the address this client reached works.
        return f"{request.scheme}://{request.host}"
    return f"http://{config.node.listen}"


def document_url(base: str, code: str, sha: str) -> str:
    return f"{base}/api/v1/dossiers/{quote(code, safe='')}/documents/{sha}"


def _storage_error(exc: OSError) -> ApiError:
    if exc.errno == errno.ENOSPC:
        return ApiError(507, "insufficient_storage", "the disk holding the documents is full; nothing was stored")
    return ApiError(503, "store_unavailable", f"the document could not be written: {exc.strerror or exc}")


async def _record_of(request: web.Request, code: str) -> dict[str, Any]:
    store = request.app[api.STORE]
    row = await store.fetchone("SELECT record FROM dossiers WHERE code = ?", (code,))
    if row is None:
        raise ApiError(404, "not_found", f"no dossier with code {code!r}")
    # Sealed when the store is encrypted at rest.
    record: dict[str, Any] = json.loads(store.sealer.record(code, row[0]))
    return record


async def _read_field(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(1024):
        data += chunk
        if len(data) > MAX_FORM_FIELD_BYTES:
            raise validation_error({name: f"must be at most {MAX_FORM_FIELD_BYTES} bytes"})
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise validation_error({name: "must be UTF-8 text"}) from exc


@requires("clerk", "operator")
async def upload(request: web.Request) -> web.Response:
    """Store a submitted document (multipart field ``file``) and record it in the dossier's TaiLieuNop."""
    code = request.match_info["code"]
    node = request.app[api.NODE]
    config: Config = node.config
    limit = config.node.max_document_bytes
    await _record_of(request, code)  # 404 before a byte of the file is read
    if request.content_type != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", f"send the document as multipart/form-data, not {request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > limit + FORM_OVERHEAD_BYTES:
        raise ApiError(413, "body_too_large", f"the document is larger than the {limit} bytes accepted")
    blobs = blob_store(config)
    form: dict[str, str] = {}
    partial: PartialFile | None = None
    filename: str | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, "malformed_multipart", "nested multipart bodies are not accepted")
            name = part.name
            if name == "file":
                if partial is not None:
                    raise validation_error({"file": "send exactly one file per request"})
                filename = part.filename
                partial = await PartialFile.open(blobs.temp_path(), limit)
                while chunk := await part.read_chunk(CHUNK_BYTES):
                    partial.write(chunk)
            elif name in FORM_FIELDS and name not in form:
                form[name] = await _read_field(part, name)
            else:
                raise validation_error({str(name or "<unnamed part>"): "unknown or repeated form field"})
        if partial is None:
            raise validation_error({"file": "required: the document, as a multipart part named file"})
        entry, errors = _entry(form, filename, partial.hexdigest())
        if errors:
            raise validation_error(errors)
        entry[SIZE_FIELD] = partial.size
        entry[URL_FIELD] = document_url(public_base(config, request), code, entry[HASH_FIELD])
        await blobs.install(partial, entry[HASH_FIELD])
        partial = None
    except TooLarge as exc:
        raise ApiError(413, "body_too_large", f"the document is larger than the {limit} bytes accepted") from exc
    except OSError as exc:
        raise _storage_error(exc) from exc
    except (ValueError, BadHttpMessage) as exc:
        # aiohttp's multipart reader reports a malformed body this way (BadHttpMessage: a part's headers).
        raise ApiError(400, "malformed_multipart", f"the multipart body is malformed: {exc}") from exc
    finally:
        if partial is not None:
            partial.discard()
    body = {k: v for k, v in entry.items() if k != URL_FIELD}
    idem = api.idempotency(request, f"POST /api/v1/dossiers/{code}/documents", body)
    result = await node.service.add_document(code, entry, idem)
    response = web.Response(status=result.status, text=result.body, content_type="application/json")
    response.headers["Location"] = entry[URL_FIELD]
    return response


def _entry(form: dict[str, str], filename: str | None, sha: str) -> tuple[dict[str, Any], dict[str, str]]:
    raw: dict[str, Any] = {"TepDinhKemId": sha, "TenTepDinhKem": form.get("TenTepDinhKem") or filename}
    if form.get("MaThanhPhanHoSo"):
        raw["MaThanhPhanHoSo"] = form["MaThanhPhanHoSo"]
    flag = form.get("DuocSoHoa")
    if flag:
        raw["DuocSoHoa"] = int(flag) if flag in ("0", "1") else flag
    clean, errors = validate_document(raw)
    if "TenTepDinhKem" in errors and raw["TenTepDinhKem"] is None:
        errors["TenTepDinhKem"] = "required: a form field, or the file part's filename"
    if not errors:
        clean[HASH_FIELD] = sha
    return clean, errors


def stored_documents(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The dossier's TaiLieuNop entries that carry a file hash (those this API stores and serves)."""
    return [
        d
        for d in record.get("TaiLieuNop") or []
        if isinstance(d, dict) and isinstance(d.get(HASH_FIELD), str) and SHA256.fullmatch(d[HASH_FIELD])
    ]


@requires("clerk", "operator", "peer", "read-only")
async def list_documents(request: web.Request) -> web.Response:
    """The dossier's submitted documents, each with whether this node holds its file."""
    code = request.match_info["code"]
    record = await _record_of(request, code)
    blobs = blob_store(request.app[api.NODE].config)
    items = []
    for d in record.get("TaiLieuNop") or []:
        sha = d.get(HASH_FIELD) if isinstance(d, dict) else None
        stored = isinstance(sha, str) and SHA256.fullmatch(sha) is not None and blobs.has(sha)
        items.append({**d, "stored": stored})
    return api.json_response({"items": items})


@requires("clerk", "operator", "peer")
async def download(request: web.Request) -> web.StreamResponse:
    """The file of one of the dossier's documents; ``Range`` requests get 206 with the rest."""
    code, sha = request.match_info["code"], request.match_info["sha256"]
    if not SHA256.fullmatch(sha):
        raise ApiError(404, "not_found", f"{sha!r} is not a sha256 in lowercase hex")
    record = await _record_of(request, code)
    # Only files the dossier lists: a hash alone is no key to every file the node holds.
    entry = next((d for d in stored_documents(record) if d[HASH_FIELD] == sha), None)
    if entry is None:
        raise ApiError(404, "not_found", f"dossier {code} has no document {sha}")
    path = blob_store(request.app[api.NODE].config).path_of(sha)
    if not path.is_file():
        raise ApiError(404, "not_stored", f"this node does not hold document {sha} yet")
    name = str(entry.get("TenTepDinhKem") or sha)
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    response = web.FileResponse(path, chunk_size=CHUNK_BYTES)
    response.content_type = ctype
    response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(name, safe='')}"
    # The representation's hash (RFC 9530), so a client can check a file it put together from ranges.
    response.headers["Repr-Digest"] = f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/dossiers/{code}/documents", upload)
    app.router.add_get("/api/v1/dossiers/{code}/documents", list_documents)
    app.router.add_get("/api/v1/dossiers/{code}/documents/{sha256}", download)
