"""Configuration: the TOML file, environment and explicit overrides, validation, and the CLI's use of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.cli import EXIT_CONFIG, main
from node.config import ConfigError, load_config, render_config
from tests.conftest import AGENCY, UNIT


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ: a WARDSYNC_* variable in the developer's shell must not leak in."""
    for name in list(os.environ):
        if name.startswith("WARDSYNC_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, **kwargs: str) -> Path:
    path = tmp_path / "wardsync.toml"
    path.write_text(render_config(unit=UNIT, agency_code=AGENCY, data_dir=str(tmp_path / "data"), **kwargs),
                    encoding="utf-8")
    return path


class TestLoading:
    """A rendered file loads, and the layers override each other in order."""

    def test_rendered_file_loads(self, tmp_path: Path) -> None:
        """The file render_config writes is valid and carries the values it was given."""
        path = write_config(tmp_path, listen="0.0.0.0:8181")
        config = load_config(path, env={})
        assert (config.node.unit, config.node.agency_code) == (UNIT, AGENCY)
        assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8181)
        assert config.db_path == tmp_path / "data" / "wardsync.sqlite3"
        assert config.source == str(path)

    def test_environment_beats_file(self, tmp_path: Path) -> None:
        """WARDSYNC_<SECTION>_<KEY> replaces the file's value, converted to the setting's type."""
        path = write_config(tmp_path)
        env = {"WARDSYNC_NODE_LISTEN": "127.0.0.1:9000", "WARDSYNC_NODE_MAX_BODY_BYTES": "4096",
               "WARDSYNC_LOG_LEVEL": "debug"}
        config = load_config(path, env=env)
        assert config.node.listen == "127.0.0.1:9000"
        assert config.node.max_body_bytes == 4096
        assert config.log.level == "debug"

    def test_explicit_overrides_beat_environment(self, tmp_path: Path) -> None:
        """An override (a command-line flag) replaces both the environment and the file."""
        path = write_config(tmp_path)
        config = load_config(path, env={"WARDSYNC_NODE_LISTEN": "127.0.0.1:9000"},
                             overrides={"node": {"listen": "127.0.0.1:9100", "data_dir": None}})
        assert config.node.listen == "127.0.0.1:9100"
        assert config.node.data_dir == str(tmp_path / "data")  # None means "not given"

    def test_process_environment_is_the_default(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without an explicit env mapping, os.environ is read."""
        monkeypatch.setenv("WARDSYNC_NODE_LISTEN", "127.0.0.1:9200")
        assert load_config(write_config(tmp_path)).node.listen == "127.0.0.1:9200"


class TestValidation:
    """Every problem is reported at once."""

    def test_every_problem_in_one_error(self, tmp_path: Path) -> None:
        """A bad unit, agency code, listen address and an unknown key are all listed in one ConfigError."""
        path = tmp_path / "bad.toml"
        path.write_text(
            '[node]\nunit = "99999"\nagency_code = "000.00.17.h29!"\nlisten = "nowhere"\ncolour = "red"\n',
            encoding="utf-8",
        )
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        problems = info.value.problems
        assert len(problems) == 4, problems
        for prefix in ("[node] unit:", "[node] agency_code:", "[node] listen:", "[node] colour:"):
            assert sum(p.startswith(prefix) for p in problems) == 1, (prefix, problems)
        assert all(p in str(info.value) for p in problems)

    def test_bad_environment_value_is_named(self, tmp_path: Path) -> None:
        """A value from the environment that is not the right type names the variable."""
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path), env={"WARDSYNC_NODE_MAX_BODY_BYTES": "lots"})
        assert any("WARDSYNC_NODE_MAX_BODY_BYTES" in p for p in info.value.problems)

    def test_missing_and_malformed_files(self, tmp_path: Path) -> None:
        """A missing file and a file that is not TOML are ConfigErrors, not tracebacks."""
        with pytest.raises(ConfigError, match="file not found"):
            load_config(tmp_path / "absent.toml", env={})
        broken = tmp_path / "broken.toml"
        broken.write_text("[node\nunit = ", encoding="utf-8")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(broken, env={})


class TestCli:
    """`wardsync init` and `wardsync serve` handle configuration the way an operator expects."""

    def test_init_writes_a_file_that_loads(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """init writes a commented file that loads as is."""
        out = tmp_path / "wardsync.toml"
        code = main(["init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(out),
                     "--data-dir", str(tmp_path / "data")])
        assert code == 0
        assert str(out) in capsys.readouterr().out
        config = load_config(out, env={})
        assert (config.node.unit, config.node.agency_code) == (UNIT, AGENCY)
        assert "Phường Bến Thành" in out.read_text(encoding="utf-8")

    def test_init_refuses_unknown_unit(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown unit code exits 2, says why, and writes nothing."""
        out = tmp_path / "wardsync.toml"
        code = main(["init", "--unit", "99999", "--agency-code", AGENCY, "--out", str(out)])
        assert code == EXIT_CONFIG == 2
        assert "99999" in capsys.readouterr().err
        assert not out.exists()

    def test_init_does_not_overwrite(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An existing file is kept unless --force is given."""
        out = tmp_path / "wardsync.toml"
        out.write_text("# mine\n", encoding="utf-8")
        assert main(["init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(out)]) != 0
        assert out.read_text(encoding="utf-8") == "# mine\n"
        assert main(["init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(out), "--force"]) == 0
        assert out.read_text(encoding="utf-8") != "# mine\n"
        capsys.readouterr()

    def test_serve_with_bad_config_lists_every_problem(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """serve on an invalid file exits 2 and prints each problem on stderr, without starting."""
        bad = tmp_path / "bad.toml"
        bad.write_text(
            f'[node]\nunit = "99999"\nagency_code = "not an agency"\nlisten = "nowhere"\n'
            f'data_dir = "{tmp_path / "data"}"\ncolour = "red"\n',
            encoding="utf-8",
        )
        code = main(["serve", "--config", str(bad)])
        err = capsys.readouterr().err
        assert code == 2
        for fragment in ("[node] unit:", "'99999'", "[node] agency_code:", "[node] listen:", "[node] colour:"):
            assert fragment in err, err
        assert not (tmp_path / "data").exists()

    def test_serve_with_missing_config_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """serve on a file that does not exist exits 2 and points at `wardsync init`."""
        code = main(["serve", "--config", str(tmp_path / "absent.toml")])
        assert code == 2
        assert "wardsync init" in capsys.readouterr().err
