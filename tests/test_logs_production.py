"""Production logs: more personal-data and credential shapes redacted, library logs included, one canonical
line per push batch from a real node."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from node.config import load_config
from node.logs import REDACTED, configure, redact_text
from tests.conftest import AGENCY, UNIT, running_node, valid_intake
from tests.upstreams import running_upstreams, target_overrides


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for h in [h for h in root.handlers if h.get_name() == "wardsync"]:
            root.removeHandler(h)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


class TestShapes:
    """What the desk and the upstreams actually write, in the forms people type them."""

    @pytest.mark.parametrize(
        "secret",
        [
            "079190001234",  # CCCD, 12 digits
            "023456789",  # CMND, 9 digits
            "0912 345 678",
            "0912.345.678",
            "0912-345-678",
            "+84 912 345 678",
            "84912345678",
            "02838291234",  # HCMC landline, 028 + 8 digits
        ],
    )
    def test_numbers(self, secret: str) -> None:
        out = redact_text(f"hồ sơ của {secret}, xin gọi lại")
        assert secret not in out
        assert out == f"hồ sơ của {REDACTED}, xin gọi lại"

    @pytest.mark.parametrize(
        ("text", "gone"),
        [
            ("upstream said: header Authorization: Bearer abc.def-ghi was refused", "abc.def-ghi"),
            ("token wst_Zx8_4kq-PL2 is revoked", "wst_Zx8_4kq-PL2"),
            ("GET https://ward26743:s3cr3t@portal.example/login failed", "s3cr3t"),
        ],
    )
    def test_credentials_in_text(self, text: str, gone: str) -> None:
        assert gone not in redact_text(text)

    @pytest.mark.parametrize(
        "kept",
        [
            "000.00.17.H29-250701-0361",  # dossier codes are what operators search by
            "2026-11-22T09:04:01.355Z",
            "000001795338112.00000",  # an HLC stamp
            "26743",
            "duration 0.123 s, 500 records",
        ],
    )
    def test_operational_values_survive(self, kept: str) -> None:
        assert redact_text(kept) == kept


class TestLibraryLogs:
    """Standard-library loggers (aiohttp, asyncio) go through the same format and redaction."""

    def test_stdlib_error_with_exception(self, stream: io.StringIO) -> None:
        try:
            raise ValueError("bad body from 0912345678 with SoGiayToChuHoSo 079190001234")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request from 079190001234")
        [event] = lines(stream)
        assert event["level"] == "error"
        assert "079190001234" not in stream.getvalue() and "0912345678" not in stream.getvalue()
        assert event["event"] == f"Error handling request from {REDACTED}"
        assert "ValueError" in event["exception"]


class TestMalformedRequests:
    """Bytes that are not HTTP make one short warning a second, never a traceback per connection."""

    async def test_garbage_does_not_fill_the_log(self, tmp_path: Path, stream: io.StringIO) -> None:
        node = {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "n")}
        config = load_config(env={}, overrides={"node": node})
        async with running_node(config) as (_, url, session):
            host, port = url.removeprefix("http://").rsplit(":", 1)
            for i in range(30):
                reader, writer = await asyncio.open_connection(host, int(port))
                # A bad header token is what aiohttp logged as an error with a traceback, each time.
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nBad\x01Header%d: y\r\n\r\n" % i)
                await writer.drain()
                answer = await reader.read(200)
                assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer
                writer.close()
                await writer.wait_closed()
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 200
        events = lines(stream)
        bad = [e for e in events if e["event"] == "malformed_http_request"]
        assert 1 <= len(bad) <= 5, bad  # the 30 came within a few seconds
        assert all(e["level"] == "warning" and "exception" not in e and e["detail"] for e in bad)
        assert "Traceback" not in stream.getvalue()
        assert not [e for e in events if e.get("logger", "").startswith("aiohttp") and e["level"] == "error"]


class TestPushBatchLine:
    """A real node pushing to both stand-ins writes one canonical JSON line per push call."""

    async def test_one_line_per_batch(self, tmp_path: Path, stream: io.StringIO) -> None:
        async with running_upstreams(tmp_path) as ups:
            config = load_config(
                env={},
                overrides={
                    "node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0",
                             "data_dir": str(tmp_path / "n")},
                    **target_overrides(ups),
                },
            )
            async with running_node(config) as (node, url, s):
                body = valid_intake(SoGiayToChuHoSo="079190004321", SoDienThoai="0987654321")
                async with s.post(f"{url}/api/v1/dossiers", json=body) as r:
                    assert r.status == 201
                for _ in range(200):
                    if all(rep.pushed >= 1 for rep in node.replicators.values()):
                        break
                    await asyncio.sleep(0.05)
        batches = [e for e in lines(stream) if e["event"] == "push_batch"]
        assert {e["target"] for e in batches} == {"national", "city"}
        for e in batches:
            assert e["level"] == "info"
            assert e["outcome"] == "ok"
            assert e["records"] == e["acked"] == 1
            assert isinstance(e["duration_ms"], float)
            assert e["lag_records"] == 0
            assert e["lag_s"] >= 0
            assert e["unit"] == UNIT
        assert len(batches) == 2  # one call per target: one line each
        text = stream.getvalue()
        assert "079190004321" not in text and "0987654321" not in text
