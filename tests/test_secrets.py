"""Secrets: a configuration file holding credentials must be private; credentials never reach a log line."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from node.app import Node
from node.config import ConfigError, load_config
from node.logs import REDACTED, configure
from tests.conftest import AGENCY, UNIT

PASSWORD = "portal-pass-7f3a9c"
CLIENT_SECRET = "city-secret-51be0d"


def config_file(tmp_path: Path, mode: int, *, secrets: bool = True) -> Path:
    path = tmp_path / "wardsync.toml"
    text = f'[node]\nunit = "{UNIT}"\nagency_code = "{AGENCY}"\ndata_dir = "{tmp_path / "data"}"\n'
    text += '\n[targets.national]\nurl = "http://127.0.0.1:9"\nusername = "u"\ndstcode = "d"\nmadonvi = "m"\n'
    text += f'password = "{PASSWORD}"\n' if secrets else ""
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure("info", "json", stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()


class TestConfigFileMode:
    """A file with credentials that others may read is refused with the command that fixes it."""

    @pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
    def test_open_file_with_secrets_is_refused(self, tmp_path: Path, mode: int) -> None:
        path = config_file(tmp_path, mode)
        with pytest.raises(ConfigError) as err:
            load_config(path, env={})
        text = str(err.value)
        assert f"chmod 600 {path}" in text and "targets.national.password" in text
        assert PASSWORD not in text

    def test_private_file_and_environment_secrets_are_accepted(self, tmp_path: Path) -> None:
        assert load_config(config_file(tmp_path, 0o600), env={}).national is not None
        # Without secrets in it the file may be readable; the password then comes from the environment.
        path = config_file(tmp_path, 0o644, secrets=False)
        config = load_config(path, env={"WARDSYNC_TARGETS_NATIONAL_PASSWORD": PASSWORD})
        assert config.national is not None and config.national.password == PASSWORD


class TestRedaction:
    """One processor redacts secrets, citizen IDs and phone numbers in every shape they arrive in."""

    def test_nested_headers_tokens_and_exception_text(self, stream: io.StringIO) -> None:
        log = structlog.get_logger()
        log.info(
            "call",
            request={"headers": {"Authorization": "Bearer wst_abcdef123456"}, "body": {"auth": {"client_secret": "x"}}},
            detail="retrying with token=abc123def and password: hunter22",
            error=ValueError(f"login refused for 079190001234 (password={PASSWORD})"),
        )
        try:
            raise RuntimeError("upstream said: session=sess-998877 expired; call 0912 345 678")
        except RuntimeError:
            log.exception("failed")
        text = stream.getvalue()
        for secret in ("wst_abcdef123456", "abc123def", "hunter22", "079190001234", PASSWORD, "sess-998877", "345 678"):
            assert secret not in text, secret
        first, second = (json.loads(line) for line in text.splitlines())
        assert first["request"]["headers"]["Authorization"] == REDACTED
        assert first["request"]["body"]["auth"]["client_secret"] == REDACTED
        assert first["detail"] == f"retrying with token={REDACTED} and password: {REDACTED}"
        assert "login refused for" in first["error"]
        assert "RuntimeError" in second["exception"]

    async def test_configured_credentials_are_redacted_anywhere(self, tmp_path: Path, stream: io.StringIO) -> None:
        """Once a node has its configuration, its password and client secret never appear in any form."""
        overrides = {
            "node": {"unit": UNIT, "agency_code": AGENCY, "data_dir": str(tmp_path / "data")},
            "targets.city": {"url": "http://127.0.0.1:9", "client_id": "c", "client_secret": CLIENT_SECRET},
        }
        Node(load_config(env={}, overrides=overrides))
        structlog.get_logger().warning("odd", url=f"http://c:{CLIENT_SECRET}@127.0.0.1/", note=f"{CLIENT_SECRET}!")
        assert CLIENT_SECRET not in stream.getvalue()
        assert json.loads(stream.getvalue())["note"] == f"{REDACTED}!"
