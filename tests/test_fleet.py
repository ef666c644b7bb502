"""The fleet inventory and the fleet dashboard."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.fleet import FleetNode, InventoryError, load_inventory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestInventory:
    """The inventory file: one [[unit]] per node, every bad entry reported with its index."""

    def test_reads_tokens_inline_and_from_the_environment(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8080/"\ntoken = "abc"\n'
            '[[unit]]\nunit = "26732"\nurl = "https://node.example:8443"\ntoken_env = "TOK_26732"\n',
        )
        nodes = load_inventory(path, env={"TOK_26732": "  xyz\n"})
        assert nodes == [
            FleetNode("26743", "Phường Bến Thành", "http://127.0.0.1:8080", "abc"),
            FleetNode("26732", "Đặc khu Côn Đảo", "https://node.example:8443", "xyz"),
        ]
        assert "abc" not in repr(nodes[0])

    def test_lists_every_bad_entry_with_its_index(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8080"\ntoken = "a"\n'
            '[[unit]]\nunit = "26734"\nurl = "ftp://x"\ntoken = "b"\n'
            '[[unit]]\nunit = "26743"\nurl = "http://127.0.0.1:8081"\ntoken_env = "MISSING_VAR"\ncolour = 1\n'
            '[[unit]]\nurl = "http://127.0.0.1:8082"\ntoken = "c"\ntoken_env = "X"\n',
        )
        with pytest.raises(InventoryError) as info:
            load_inventory(path, env={})
        problems = info.value.problems
        assert isinstance(info.value, ValueError)
        assert any(p.startswith("unit[1] (26734): unit:") for p in problems)
        assert any(p.startswith("unit[1] (26734): url:") for p in problems)
        assert any(p.startswith("unit[2] (26743): unit: 26743 is already listed at unit[0]") for p in problems)
        assert any(p.startswith("unit[2] (26743): token_env:") and "MISSING_VAR" in p for p in problems)
        assert any(p.startswith("unit[2] (26743): colour: unknown key") for p in problems)
        assert any(p.startswith("unit[3]: unit: required") for p in problems)
        assert any(p.startswith("unit[3]: token, token_env:") for p in problems)
        assert not any(p.startswith("unit[0]") for p in problems)
        assert "unit[1]" in str(info.value)

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("", "no [[unit]] entries"),
            ("unit = 3\n", "array of tables"),
            ("[[unit]\n", "not valid TOML"),
            ('[fleet]\nx = 1\n[[unit]]\nunit = "26743"\nurl = "http://a"\ntoken = "t"\n', "fleet: unknown top-level"),
        ],
    )
    def test_refuses_a_malformed_file(self, tmp_path: Path, text: str, fragment: str) -> None:
        with pytest.raises(InventoryError, match=None) as info:
            load_inventory(write(tmp_path, text), env={})
        assert any(fragment in p for p in info.value.problems), info.value.problems

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(InventoryError, match="file not found"):
            load_inventory(tmp_path / "nope.toml")
