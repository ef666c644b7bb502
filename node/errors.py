"""The one error type the HTTP API answers with, and its JSON envelope."""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """A request that cannot be served: ``status`` and ``code`` drive the answer, never the message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        self.extra = extra or {}
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "fields": self.fields}
        error.update(self.extra)
        return {"error": error}

    def body(self) -> bytes:
        try:
            return json.dumps(self.envelope(), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # A field name or message echoing a lone surrogate the client sent (JSON's "\ud800" escape parses to
            # one): escaped, the envelope is still valid JSON instead of a 500.
            return json.dumps(self.envelope()).encode()


def validation_error(fields: dict[str, str]) -> ApiError:
    names = ", ".join(sorted(fields)[:5]) + (", ..." if len(fields) > 5 else "")
    return ApiError(422, "validation_failed", f"the request has {len(fields)} invalid field(s): {names}", fields=fields)
