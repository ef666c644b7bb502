"""structlog set-up, done once at the edge (the CLI), and the redaction every log line passes through."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Citizen ID numbers (12-digit CCCD, 9-digit CMND) and Vietnamese phone numbers (mobile or landline,
# national or +84 form, digits optionally grouped by spaces, dots or hyphens) must never reach a log file.
_CITIZEN_ID = re.compile(r"(?<!\d)(?:\d{12}|\d{9})(?!\d)")
_PHONE = re.compile(r"(?<![\d.])(?:\+?84|0)(?:[ .-]?\d){9,10}(?![\d.])")
# Credentials that travel inside text: a bearer header echoed in an error, an API token, a password in a URL.
_CREDENTIAL = re.compile(r"(?i)(?:\bbearer\s+\S+|\bwst_[A-Za-z0-9_-]+|(?<=://)[^/\s:@]+:[^/\s@]+(?=@))")
_SECRET_KEYS = (
    "password",
    "secret",
    "token",
    "session",
    "authorization",
    "cookie",
    "csrf",
    "credential",
    "sogiayto",
    "sodienthoai",
)
REDACTED = "[redacted]"
_STDLIB_HANDLER = "wardsync"


# A secret written as an assignment inside text (an exception message, a query string): keep the name.
_ASSIGNED = re.compile(r"(?i)\b((?:client_)?secret|passw(?:or)?d|token|session)(\"?\s*[=:]\s*\"?)[^\s\"',;&)}]+")
# The configured credentials themselves, found wherever they appear (see register_secrets).
_KNOWN: set[str] = set()


def register_secrets(*values: str) -> None:
    """Redact these exact values (the node's configured credentials) from every log line."""
    _KNOWN.update(v for v in values if v and len(v) >= 4)


def redact_text(text: str) -> str:
    for known in _KNOWN:
        if known in text:
            text = text.replace(known, REDACTED)
    text = _ASSIGNED.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _PHONE.sub(REDACTED, _CITIZEN_ID.sub(REDACTED, _CREDENTIAL.sub(REDACTED, text)))


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    # Exceptions, URLs and other objects are rendered by their text, which may carry anything.
    return redact_text(str(value))


def _is_secret(key: object) -> bool:
    k = str(key).lower()
    return any(s in k for s in _SECRET_KEYS)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: secrets, citizen ID numbers and phone numbers become ``[redacted]``."""
    for key in list(event):
        event[key] = REDACTED if _is_secret(key) else _redact(event[key])
    return event


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stderr
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aiohttp's server errors, asyncio): the same format and
    # the same redaction, so an exception text quoting a request cannot leak what our own lines never do.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ExtraAdder(allow=("detail", "left_out_since_last")),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(MalformedRequests())
    handler.set_name(_STDLIB_HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _STDLIB_HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse as an error with a full traceback, before any of our code
    (or a token check) runs: anyone who can reach the port could fill the log that way. Such a record becomes
    one warning line without the traceback, at most one a second, with how many were left out since.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not record.name.startswith("aiohttp") or not isinstance(exc, HttpProcessingError):
            return True
        now = record.created
        if now - self._last < self.every_s:
            self.suppressed += 1
            return False
        self._last = now
        left_out, self.suppressed = self.suppressed, 0
        record.msg = "malformed_http_request"
        record.args = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        record.__dict__["detail"] = f"{type(exc).__name__}: {exc.message}"[:200]
        record.__dict__["left_out_since_last"] = left_out
        return True
