"""Log redaction: citizen IDs, phone numbers and secrets never reach the log stream."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from node.logs import REDACTED, configure

CITIZEN_ID = "079190001234"
PHONE = "0912345678"
PASSWORD = "hunter2-ward-26743"
CODE = "000.00.17.H29-250701-0361"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        yield out
    finally:
        # configure() is process-wide; later tests must get structlog's defaults back.
        structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


class TestRedaction:
    """Personal data and secrets are replaced by [redacted] wherever they appear in an event."""

    def test_id_phone_and_password_are_redacted(self, stream: io.StringIO) -> None:
        """A citizen ID and phone in text, nested values and a password key never appear in the output."""
        log = structlog.get_logger()
        log.info(
            f"intake for {CITIZEN_ID}, call back on {PHONE}",
            code=CODE,
            password=PASSWORD,
            applicant={"id": CITIZEN_ID, "phones": [PHONE, f"+84{PHONE[1:]}"]},
            note=f"ID {CITIZEN_ID}; SĐT {PHONE}",
        )
        text = stream.getvalue()
        for secret in (CITIZEN_ID, PHONE, PHONE[1:], PASSWORD):
            assert secret not in text
        assert REDACTED in text
        [event] = lines(stream)
        assert event["password"] == REDACTED
        assert event["applicant"] == {"id": REDACTED, "phones": [REDACTED, REDACTED]}
        assert event["event"] == f"intake for {REDACTED}, call back on {REDACTED}"
        # Dossier codes are what operators search logs by: redaction must leave them alone.
        assert event["code"] == CODE
        assert event["level"] == "info"

    def test_secret_keys_are_redacted_whatever_their_value(self, stream: io.StringIO) -> None:
        """Keys naming tokens, sessions and the DVCQG ID and phone fields are redacted even when nested."""
        log = structlog.get_logger()
        log.warning("upstream_login", session="abc123", Authorization="Bearer xyz",
                    record={"SoGiayToChuHoSo": "B1234567", "SoDienThoai": 912345678, "ChuHoSo": "Nguyễn Thị Lan"})
        [event] = lines(stream)
        assert event["session"] == event["Authorization"] == REDACTED
        assert event["record"] == {"SoGiayToChuHoSo": REDACTED, "SoDienThoai": REDACTED, "ChuHoSo": "Nguyễn Thị Lan"}
        assert "abc123" not in stream.getvalue() and "B1234567" not in stream.getvalue()

    def test_level_filter(self, stream: io.StringIO) -> None:
        """Below the configured level nothing is written."""
        structlog.get_logger().debug("noisy", detail=CITIZEN_ID)
        assert stream.getvalue() == ""
