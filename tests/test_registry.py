"""Tests for the HCMC commune-level unit registry and agency-code checks."""

from __future__ import annotations

import re
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from node.registry import AGENCY_CODE_RE, Unit, get_unit, is_agency_code, is_unit, units


class TestUnits:
    def test_count_is_168(self) -> None:
        """HCMC has 168 commune-level units since 1 July 2025."""
        assert len(units()) == 168

    def test_counts_by_kind(self) -> None:
        """113 phường, 54 xã and 1 đặc khu, per Resolution 1685/NQ-UBTVQH15."""
        assert Counter(unit.kind for unit in units()) == {"phường": 113, "xã": 54, "đặc khu": 1}

    def test_con_dao(self) -> None:
        """26732 is the special zone Côn Đảo."""
        unit = get_unit("26732")
        assert unit is not None
        assert unit == Unit(code="26732", name="Đặc khu Côn Đảo", kind="đặc khu", codename=unit.codename)
        assert unit.codename

    def test_names_have_normalised_whitespace(self) -> None:
        """No name has a doubled, leading or trailing space."""
        for unit in units():
            assert unit.name == " ".join(unit.name.split()), unit

    def test_known_doubled_space_names_are_fixed(self) -> None:
        """Names stored upstream with a doubled space come out with a single one."""
        names = {unit.name for unit in units()}
        assert "Phường Rạch Dừa" in names
        assert "Phường An Nhơn" in names

    def test_codes_are_unique_five_digit_strings_in_order(self) -> None:
        """Codes are zero-padded 5-digit strings, unique and sorted."""
        codes = [unit.code for unit in units()]
        assert all(re.fullmatch(r"[0-9]{5}", code) for code in codes)
        assert len(set(codes)) == len(codes)
        assert codes == sorted(codes)

    def test_name_starts_with_kind(self) -> None:
        """Each name is prefixed by its division type."""
        for unit in units():
            assert unit.name.lower().startswith(unit.kind), unit

    def test_units_are_cached(self) -> None:
        """units() returns the same tuple on every call."""
        assert units() is units()

    def test_units_are_frozen(self) -> None:
        """Unit records cannot be mutated."""
        unit = units()[0]
        try:
            unit.name = "x"  # type: ignore[misc]
        except AttributeError:
            pass
        else:
            raise AssertionError("Unit should be frozen")


class TestLookup:
    def test_every_unit_is_found(self) -> None:
        """get_unit finds each listed unit by its code."""
        for unit in units():
            assert get_unit(unit.code) is unit
            assert is_unit(unit.code)

    def test_unknown_codes(self) -> None:
        """Codes outside the registry, or not exact 5-digit strings, are not units."""
        for code in ["", "00000", "2673", "026732", " 26732", "26732 ", "99999", "00001"]:
            assert get_unit(code) is None, code
            assert not is_unit(code), code

    def test_non_string_code(self) -> None:
        """An int code is not accepted in place of the string form."""
        assert not is_unit(26732)  # type: ignore[arg-type]
        assert get_unit(None) is None  # type: ignore[arg-type]

    def test_unit_outside_hcmc(self) -> None:
        """A ward of another province (Hà Nội, Phường Ba Đình 00004) is not an HCMC unit."""
        assert not is_unit("00004")


class TestAgencyCode:
    def test_valid_codes(self) -> None:
        """Typical agency codes are accepted."""
        for code in ["000.00.17.H29", "000.00.06.H56", "H29", "G01.001", "A" * 35]:
            assert is_agency_code(code), code

    def test_invalid_codes(self) -> None:
        """Empty segments, lowercase, spaces, non-ASCII and overlong codes are refused."""
        for code in [
            "",
            ".",
            ".H29",
            "H29.",
            "000..17",
            "000.00.17.h29",
            "000 00",
            "000.00.17.H29\n",
            "H29-01",
            "\uff2829",  # fullwidth H
            "٣٣",
            "A" * 36,
        ]:
            assert not is_agency_code(code), code

    def test_non_string(self) -> None:
        """Non-strings are never agency codes."""
        assert not is_agency_code(29)  # type: ignore[arg-type]

    def test_regex_is_anchored(self) -> None:
        """AGENCY_CODE_RE.match is as strict as fullmatch."""
        assert AGENCY_CODE_RE.match("A..B") is None
        assert AGENCY_CODE_RE.match("H29\n") is None

    @settings(max_examples=200)
    @given(st.text(alphabet="09AZa. \n-", max_size=40))
    def test_matches_reference(self, s: str) -> None:
        """is_agency_code agrees with a segment-by-segment reference check."""
        allowed = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        segments = s.split(".")
        expected = len(s) <= 35 and all(seg and set(seg) <= allowed for seg in segments)
        assert is_agency_code(s) == expected
