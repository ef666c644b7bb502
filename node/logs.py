"""structlog set-up, done once at the edge (the CLI), and the redaction every log line passes through."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Citizen ID numbers (12 digits) and Vietnamese phone numbers must never reach a log file.
_CITIZEN_ID = re.compile(r"(?<!\d)\d{12}(?!\d)")
_PHONE = re.compile(r"(?<![\d.])(?:\+?84|0)\d{9,10}(?![\d.])")
_SECRET_KEYS = ("password", "secret", "token", "session", "authorization", "sogiayto", "sodienthoai")
REDACTED = "[redacted]"


def redact_text(text: str) -> str:
    return _PHONE.sub(REDACTED, _CITIZEN_ID.sub(REDACTED, text))


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


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
