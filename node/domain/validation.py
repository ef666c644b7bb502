"""Validation of request bodies written with the national portal's (DVCQG) field names.

Every validator takes whatever the JSON parser produced and returns ``(clean, errors)``.
``errors`` maps a field path (``"ChuHoSo"``, ``"TaiLieuNop[0].TenTepDinhKem"``, or ``"$"``
for the body itself) to a message saying what is expected. ``clean`` holds the normalised
values and is empty whenever ``errors`` is not, so a caller cannot store half-checked data.
Validators never raise: bodies come from desk clients and other nodes, and a malformed one
must turn into a 400 answer, not a crash.

Rules shared by all fields:

* ``null`` and strings that are empty after stripping count as missing.
* Strings are stripped and normalised to NFC (Vietnamese text typed on some systems arrives
  decomposed, which would defeat equality and length checks); control characters and lone
  surrogates are refused.
* Integers must be JSON integers: ``true`` and ``2.0`` are refused, so that a client bug is
  reported instead of being silently coerced.
* Fields that are not part of the record are errors, so that misspelt names are not lost.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from node.registry import is_unit

Record = dict[str, Any]
Errors = dict[str, str]

DVCQG_DATETIME: Final = "%Y%m%d%H%M%S"

# Explicit ASCII classes: in Python regexes \d also matches non-ASCII digits such as "٣".
_DATETIME_RE = re.compile(r"[0-9]{14}")
_PROCEDURE_CODE_RE = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_CITIZEN_ID_RE = re.compile(r"[0-9]{12}")
_OTHER_ID_RE = re.compile(r"[A-Za-z0-9/-]{1,50}")
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_PHONE_RE = re.compile(r"(?:\+84|0)?[0-9]{9,10}")
_UNIT_CODE_RE = re.compile(r"[0-9]{5}")
# Cc covers U+0000-001F and U+007F-009F; lone surrogates cannot be encoded to UTF-8 later.
_FORBIDDEN_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

MAX_DOCUMENTS = 100
MAX_FEES = 50
MAX_FEE_AMOUNT = 10**12

_INVALID: Final = object()
_NO_DEFAULT: Final = object()

# (value, path, errors) -> clean value, or _INVALID after recording an error at ``path``.
_Checker = Callable[[Any, str, Errors], Any]


def is_dvcqg_datetime(s: str) -> bool:
    """Tell whether ``s`` is a real calendar date-time written as yyyyMMddHHmmss."""
    if not isinstance(s, str) or _DATETIME_RE.fullmatch(s) is None:
        return False
    try:
        datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    return True


def _normalise(value: str) -> str:
    return unicodedata.normalize("NFC", value).strip()


def _prepare(value: object) -> object:
    return _normalise(value) if isinstance(value, str) else value


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _string(
    max_len: int,
    *,
    pattern: re.Pattern[str] | None = None,
    expected: str | None = None,
    check: Callable[[str], bool] | None = None,
) -> _Checker:
    message = expected or f"must be a string of at most {max_len} characters"

    def checker(value: Any, path: str, errors: Errors) -> Any:
        if not isinstance(value, str) or len(value) > max_len:
            errors[path] = message
            return _INVALID
        if _FORBIDDEN_CHARS_RE.search(value):
            errors[path] = "must not contain control characters or invalid Unicode"
            return _INVALID
        if pattern is not None and pattern.fullmatch(value) is None:
            errors[path] = message
            return _INVALID
        if check is not None and not check(value):
            errors[path] = message
            return _INVALID
        return value

    return checker


def _integer(low: int, high: int) -> _Checker:
    if high - low < 5:
        message = "must be one of " + ", ".join(str(n) for n in range(low, high + 1))
    else:
        message = f"must be an integer from {low} to {high}"

    def checker(value: Any, path: str, errors: Errors) -> Any:
        # type() rather than isinstance(): bool is a subclass of int.
        if type(value) is not int or not low <= value <= high:
            errors[path] = message
            return _INVALID
        return value

    return checker


def _datetime() -> _Checker:
    return _string(
        14,
        expected="must be a date-time yyyyMMddHHmmss, e.g. 20250701083000",
        check=is_dvcqg_datetime,
    )


@dataclass(frozen=True)
class _Field:
    check: _Checker
    required: bool = False
    # Only immutable defaults: the same object is put into every clean record.
    default: Any = _NO_DEFAULT


@dataclass(frozen=True)
class _Schema:
    fields: Mapping[str, _Field]
    node_fields: frozenset[str] = frozenset()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.fields)

    @property
    def required(self) -> frozenset[str]:
        return frozenset(name for name, spec in self.fields.items() if spec.required)


def _unknown_message(key: str, known: frozenset[str]) -> str:
    # Field names are case-sensitive; a hint saves a round-trip for the commonest mistake.
    for name in sorted(known):
        if name.lower() == key.lower():
            return f"unknown field; did you mean {name}?"
    return "unknown field"


def _check_object(body: object, schema: _Schema, path: str, errors: Errors) -> Record | None:
    """Check one object against ``schema``; return its clean form, or None if it is no object."""
    if not isinstance(body, dict):
        errors[path or "$"] = "must be a JSON object"
        return None
    clean: Record = {}
    for key, raw in body.items():
        if key in schema.fields:
            continue
        if not isinstance(key, str):
            # Only reachable from Python callers; str() of some objects (huge ints) raises.
            errors[_join(path, "<non-string key>")] = "field names must be strings"
            continue
        # An empty name would otherwise be reported at the parent's path, or at "".
        key_path = _join(path, key or '""')
        if key in schema.node_fields:
            if not _is_missing(_prepare(raw)):
                errors[key_path] = "is set by the node and must not be sent"
        else:
            known = schema.names | schema.node_fields
            errors[key_path] = _unknown_message(key, known)
    for name, spec in schema.fields.items():
        field_path = _join(path, name)
        value = _prepare(body.get(name))
        if _is_missing(value):
            if spec.required:
                errors[field_path] = "required"
            elif spec.default is not _NO_DEFAULT:
                clean[name] = spec.default
            continue
        checked = spec.check(value, field_path, errors)
        if checked is not _INVALID:
            clean[name] = checked
    return clean


def _list_of(schema: _Schema, max_items: int, unique: str, what: str) -> _Checker:
    def checker(value: Any, path: str, errors: Errors) -> Any:
        if not isinstance(value, list) or len(value) > max_items:
            errors[path] = f"must be a list of at most {max_items} {what}"
            return _INVALID
        items: list[Record] = []
        seen: dict[object, int] = {}
        # Item errors go to a local dict first: a key already in ``errors`` (an odd top-level
        # name that looks like a path) must not hide that an item failed.
        local: Errors = {}
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            clean = _check_object(item, schema, item_path, local)
            if clean is None:
                continue
            key = clean.get(unique)
            if key is not None:
                if key in seen:
                    local[_join(item_path, unique)] = (
                        f"must be unique in {path}; it repeats {path}[{seen[key]}].{unique}"
                    )
                else:
                    seen[key] = index
            items.append(clean)
        errors.update(local)
        return _INVALID if local else items

    return checker


def _finish(clean: Record | None, errors: Errors) -> tuple[Record, Errors]:
    if errors or clean is None:
        return {}, errors
    return clean, errors


# --- fees -----------------------------------------------------------------------------------

_FEE_SCHEMA = _Schema(
    fields={
        "TenPhiLePhi": _Field(_string(250), required=True),
        "MaPhiLePhi": _Field(_string(50), required=True),
        "HinhThucThu": _Field(_integer(1, 9)),
        "Gia": _Field(_integer(0, MAX_FEE_AMOUNT), required=True),
        "LoaiPhiLePhi": _Field(_integer(1, 9)),
    }
)

FEE_FIELDS: frozenset[str] = _FEE_SCHEMA.names
FEE_REQUIRED: frozenset[str] = _FEE_SCHEMA.required


def validate_fee(body: object) -> tuple[Record, Errors]:
    """Validate one fee (DanhSachLePhi item); Gia is an integer amount in VND."""
    errors: Errors = {}
    clean = _check_object(body, _FEE_SCHEMA, "", errors)
    return _finish(clean, errors)


# --- submitted documents --------------------------------------------------------------------

_DOCUMENT_SCHEMA = _Schema(
    fields={
        "TepDinhKemId": _Field(_string(100), required=True),
        "TenTepDinhKem": _Field(_string(255), required=True),
        "MaThanhPhanHoSo": _Field(_string(50)),
        "DuongDanTaiTepTin": _Field(_string(1000)),
        "DuocSoHoa": _Field(_integer(0, 1), default=0),
    }
)

DOCUMENT_FIELDS: frozenset[str] = _DOCUMENT_SCHEMA.names
DOCUMENT_REQUIRED: frozenset[str] = _DOCUMENT_SCHEMA.required


def validate_document(body: object) -> tuple[Record, Errors]:
    """Validate one submitted document (TaiLieuNop item); DuocSoHoa defaults to 0."""
    errors: Errors = {}
    clean = _check_object(body, _DOCUMENT_SCHEMA, "", errors)
    return _finish(clean, errors)


# --- processing steps -----------------------------------------------------------------------

_STEP_SCHEMA = _Schema(
    fields={
        "TrangThai": _Field(_integer(1, 10), required=True),
        "NguoiXuLy": _Field(_string(50), required=True),
        "ChucDanh": _Field(_string(100)),
        "ThoiDiemXuLy": _Field(_datetime()),
        "PhongBanXuLy": _Field(_string(250)),
        "NoiDungXuLy": _Field(_string(2000)),
        "NgayBatDau": _Field(_datetime()),
        "NgayKetThucTheoQuyDinh": _Field(_datetime()),
    },
    node_fields=frozenset({"MaHoSo"}),
)

STEP_FIELDS: frozenset[str] = _STEP_SCHEMA.names
STEP_REQUIRED: frozenset[str] = _STEP_SCHEMA.required
STEP_NODE_FIELDS: frozenset[str] = _STEP_SCHEMA.node_fields


def validate_step(body: object) -> tuple[Record, Errors]:
    """Validate a processing step (QuaTrinhXuLy item); the node fills in MaHoSo."""
    errors: Errors = {}
    clean = _check_object(body, _STEP_SCHEMA, "", errors)
    return _finish(clean, errors)


# --- dossier intake -------------------------------------------------------------------------

_UNIT_CODE_MESSAGE = "must be the 5-digit code of a Ho Chi Minh City commune-level unit"
_ID_MESSAGE_CITIZEN = "must be a 12-digit citizen ID number when LoaiDoiTuong is 1"
_ID_MESSAGE_OTHER = "must be 1 to 50 characters: letters, digits, '-' or '/'"


def _unit_code(value: Any, path: str, errors: Errors) -> Any:
    if not isinstance(value, str) or _UNIT_CODE_RE.fullmatch(value) is None or not is_unit(value):
        errors[path] = _UNIT_CODE_MESSAGE
        return _INVALID
    return value


_INTAKE_SCHEMA = _Schema(
    fields={
        "MaTTHC": _Field(
            _string(
                50,
                pattern=_PROCEDURE_CODE_RE,
                expected="must be a procedure code of at most 50 characters, digits separated by dots such as 1.000656",
            ),
            required=True,
        ),
        "TenTTHC": _Field(_string(500), required=True),
        "MaLinhVuc": _Field(_string(50), required=True),
        "TenLinhVuc": _Field(_string(500), required=True),
        "KenhThucHien": _Field(_integer(1, 3), required=True),
        "ChuHoSo": _Field(_string(250), required=True),
        # Shape depends on LoaiDoiTuong, checked once both are known.
        "SoGiayToChuHoSo": _Field(
            _string(
                50,
                expected="must be a string: a 12-digit citizen ID number when LoaiDoiTuong is 1, "
                "otherwise 1 to 50 letters, digits, '-' or '/'",
            ),
            required=True,
        ),
        "LoaiDoiTuong": _Field(_integer(1, 4), required=True),
        "TrichYeuHoSo": _Field(_string(1000), required=True),
        "Email": _Field(
            _string(
                100,
                pattern=_EMAIL_RE,
                expected="must be an email address such as name@example.com, at most 100 characters",
            )
        ),
        "SoDienThoai": _Field(
            _string(
                13,
                pattern=_PHONE_RE,
                expected="must be a Vietnamese phone number: 9 or 10 digits, optionally preceded by 0 or +84",
            )
        ),
        "ThongTinKhac": _Field(_string(2000)),
        "NgayHenTra": _Field(_datetime()),
        "DonViXuLy": _Field(_string(250)),
        "HinhThuc": _Field(_integer(0, 1), default=0),
        # Default filled in by validate_intake: it depends on the receiving node.
        "MaDonViXuLy": _Field(_unit_code),
        "NguoiTiepNhan": _Field(_string(50)),
        "TaiLieuNop": _Field(_list_of(_DOCUMENT_SCHEMA, MAX_DOCUMENTS, "TepDinhKemId", "documents")),
        "DanhSachLePhi": _Field(_list_of(_FEE_SCHEMA, MAX_FEES, "MaPhiLePhi", "fees")),
    },
    node_fields=frozenset(
        {
            "MaHoSo",
            "NgayTiepNhan",
            "TrangThaiHoSo",
            "MaDonViTiepNhan",
            "TrangThaiPhiDiaGioi",
            "QuaTrinhXuLy",
            "NgayTra",
            "NgayKetThucXuLy",
        }
    ),
)

INTAKE_FIELDS: frozenset[str] = _INTAKE_SCHEMA.names
INTAKE_REQUIRED: frozenset[str] = _INTAKE_SCHEMA.required
NODE_FIELDS: frozenset[str] = _INTAKE_SCHEMA.node_fields


def validate_intake(body: object, *, own_unit: str) -> tuple[Record, Errors]:
    """Validate a new dossier; MaDonViXuLy defaults to ``own_unit``, HinhThuc to 0."""
    errors: Errors = {}
    clean = _check_object(body, _INTAKE_SCHEMA, "", errors)
    if clean is None:
        return {}, errors
    clean.setdefault("MaDonViXuLy", own_unit)
    id_number = clean.get("SoGiayToChuHoSo")
    if id_number is not None:
        if clean.get("LoaiDoiTuong") == 1:
            if _CITIZEN_ID_RE.fullmatch(id_number) is None:
                errors["SoGiayToChuHoSo"] = _ID_MESSAGE_CITIZEN
        elif _OTHER_ID_RE.fullmatch(id_number) is None:
            errors["SoGiayToChuHoSo"] = _ID_MESSAGE_OTHER
    return _finish(clean, errors)


# --- edits of an accepted dossier ------------------------------------------------------------

# What a clerk may correct after intake: the applicant's identity and contact, the summary, how the result
# is returned. Never the code, dates, units, procedure, channel or status (set by the node, derived from
# steps, or facts of the intake itself), nor documents and fees (append-only, with their own routes).
EDITABLE_FIELDS: frozenset[str] = frozenset(
    {"ChuHoSo", "SoGiayToChuHoSo", "LoaiDoiTuong", "Email", "SoDienThoai", "ThongTinKhac", "TrichYeuHoSo", "HinhThuc"}
)


def validate_edit(body: object, *, current: Mapping[str, Any]) -> tuple[Record, Errors]:
    """Validate a partial change of ``current``'s editable fields, each as intake checks it.

    ``null`` is refused: a field is never removed from a dossier (a removal cannot travel to the portal).
    The ID number is checked against the applicant kind the dossier ends up with.
    """
    errors: Errors = {}
    if not isinstance(body, dict):
        return {}, {"$": "must be a JSON object"}
    if not body:
        return {}, {"$": f"send at least one of {', '.join(sorted(EDITABLE_FIELDS))}"}
    clean: Record = {}
    for key, raw in body.items():
        if not isinstance(key, str):
            errors["<non-string key>"] = "field names must be strings"
            continue
        path = key or '""'
        if key not in EDITABLE_FIELDS:
            known = INTAKE_FIELDS | NODE_FIELDS
            errors[path] = "cannot be edited" if key in known else _unknown_message(key, EDITABLE_FIELDS)
            continue
        value = _prepare(raw)
        if _is_missing(value):
            errors[path] = "must have a value; a field cannot be removed from a dossier"
            continue
        checked = _INTAKE_SCHEMA.fields[key].check(value, path, errors)
        if checked is not _INVALID:
            clean[key] = checked
    if not errors and ("SoGiayToChuHoSo" in clean or "LoaiDoiTuong" in clean):
        id_number = clean.get("SoGiayToChuHoSo", current.get("SoGiayToChuHoSo"))
        kind = clean.get("LoaiDoiTuong", current.get("LoaiDoiTuong"))
        if isinstance(id_number, str):
            if kind == 1 and _CITIZEN_ID_RE.fullmatch(id_number) is None:
                errors["SoGiayToChuHoSo"] = _ID_MESSAGE_CITIZEN
            elif kind != 1 and _OTHER_ID_RE.fullmatch(id_number) is None:
                errors["SoGiayToChuHoSo"] = _ID_MESSAGE_OTHER
    return _finish(clean, errors)
