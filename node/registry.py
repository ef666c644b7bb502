"""Registry of Ho Chi Minh City's commune-level units and agency-code checks.

The list comes from the ``vietnam-provinces`` package rather than being typed by hand, so
that it follows the official Resolution 1685/NQ-UBTVQH15 data when that package is updated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from vietnam_provinces import ProvinceCode, Ward

HCMC_PROVINCE_CODE = 79

# Decision 20/2020/QĐ-TTg codes such as 000.00.17.H29. The pattern forbids empty segments
# and leading/trailing dots; the length cap is checked separately to keep the regex simple.
# Anchored with \A...\Z so that .match() and .search() are as strict as .fullmatch().
AGENCY_CODE_RE = re.compile(r"\A[0-9A-Z]+(?:\.[0-9A-Z]+)*\Z")
AGENCY_CODE_MAX_LEN = 35


@dataclass(frozen=True)
class Unit:
    """A commune-level unit (phường, xã or đặc khu) of Ho Chi Minh City."""

    code: str
    name: str
    kind: str
    codename: str


@cache
def units() -> tuple[Unit, ...]:
    """Return all 168 HCMC commune-level units, ordered by code."""
    found = [
        Unit(
            code=f"{int(ward.code):05d}",
            # The upstream data has a few names with a doubled space.
            name=" ".join(ward.name.split()),
            kind=ward.division_type.value,
            codename=ward.codename,
        )
        for ward in Ward.iter_by_province(ProvinceCode(HCMC_PROVINCE_CODE))
    ]
    return tuple(sorted(found, key=lambda unit: unit.code))


@cache
def _by_code() -> dict[str, Unit]:
    return {unit.code: unit for unit in units()}


def get_unit(code: str) -> Unit | None:
    """Return the unit with this 5-digit code, or None if there is none."""
    if not isinstance(code, str):
        return None
    return _by_code().get(code)


def is_unit(code: str) -> bool:
    """Tell whether ``code`` is the 5-digit code of an HCMC commune-level unit."""
    return get_unit(code) is not None


def is_agency_code(s: str) -> bool:
    """Tell whether ``s`` is shaped like an electronic agency code (mã định danh)."""
    return isinstance(s, str) and len(s) <= AGENCY_CODE_MAX_LEN and AGENCY_CODE_RE.fullmatch(s) is not None
