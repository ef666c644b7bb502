"""Tests for request-body validation in DVCQG field names."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.domain.validation import (
    DOCUMENT_FIELDS,
    DVCQG_DATETIME,
    FEE_FIELDS,
    INTAKE_FIELDS,
    INTAKE_REQUIRED,
    NODE_FIELDS,
    STEP_FIELDS,
    is_dvcqg_datetime,
    validate_fee,
    validate_intake,
    validate_step,
)
from node.registry import units

OWN = "26732"  # Côn Đảo
OTHER_UNIT = units()[0].code

Validator = Callable[[object], tuple[dict[str, Any], dict[str, str]]]


def intake(body: object) -> tuple[dict[str, Any], dict[str, str]]:
    return validate_intake(body, own_unit=OWN)


def base_intake(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "MaTTHC": "1.000656",
        "TenTTHC": "Đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": "Nguyễn Văn An",
        "SoGiayToChuHoSo": "079190000001",
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": "Đăng ký khai sinh cho con",
    }
    body.update(overrides)
    return body


def base_step(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"TrangThai": 4, "NguoiXuLy": "Trần Thị Bình"}
    body.update(overrides)
    return body


def base_fee(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 8000}
    body.update(overrides)
    return body


# --- strategies -----------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def junk_objects(names: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose keys are mostly real field names, so that field checks are exercised."""
    keys = st.sampled_from(sorted(names)) | st.text(max_size=8)
    return st.dictionaries(keys, json_values, max_size=8)


def _fits(max_len: int) -> Callable[[str], bool]:
    def check(s: str) -> bool:
        n = len(unicodedata.normalize("NFC", s).strip())
        return 0 < n <= max_len

    return check


def text(max_len: int) -> st.SearchStrategy[str]:
    """Valid free text: no control characters or surrogates, non-blank, fits after NFC."""
    chars = st.characters(blacklist_categories=("Cc", "Cs"))
    return st.text(chars, min_size=1, max_size=min(max_len, 20)).filter(_fits(max_len))


dvcqg_datetimes = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.strftime(DVCQG_DATETIME)
)


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s).strip()


documents: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"TepDinhKemId": text(100), "TenTepDinhKem": text(255)},
    optional={
        "MaThanhPhanHoSo": text(50),
        "DuongDanTaiTepTin": text(1000),
        "DuocSoHoa": st.sampled_from([0, 1]),
    },
)
fees: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "TenPhiLePhi": text(250),
        "MaPhiLePhi": text(50),
        "Gia": st.integers(min_value=0, max_value=10**12),
    },
    optional={
        "HinhThucThu": st.integers(min_value=1, max_value=9),
        "LoaiPhiLePhi": st.integers(min_value=1, max_value=9),
    },
)
steps: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {"TrangThai": st.integers(min_value=1, max_value=10), "NguoiXuLy": text(50)},
    optional={
        "ChucDanh": text(100),
        "ThoiDiemXuLy": dvcqg_datetimes,
        "PhongBanXuLy": text(250),
        "NoiDungXuLy": text(2000),
        "NgayBatDau": dvcqg_datetimes,
        "NgayKetThucTheoQuyDinh": dvcqg_datetimes,
    },
)


@st.composite
def intakes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid intake body, with optional fields sometimes present."""
    kind = draw(st.integers(min_value=1, max_value=4))
    if kind == 1:
        id_number = draw(st.from_regex(r"[0-9]{12}", fullmatch=True))
    else:
        id_number = draw(st.from_regex(r"[A-Za-z0-9/-]{1,50}", fullmatch=True))
    required: dict[str, st.SearchStrategy[Any]] = {
        "MaTTHC": st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,6}){1,3}", fullmatch=True),
        "TenTTHC": text(500),
        "MaLinhVuc": text(50),
        "TenLinhVuc": text(500),
        "KenhThucHien": st.sampled_from([1, 2, 3]),
        "ChuHoSo": text(250),
        "TrichYeuHoSo": text(1000),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "Email": st.from_regex(r"[a-z0-9._]{1,20}@[a-z0-9]{1,10}\.[a-z]{2,5}", fullmatch=True),
        "SoDienThoai": st.from_regex(r"(\+84|0)?[0-9]{9,10}", fullmatch=True),
        "ThongTinKhac": text(2000),
        "NgayHenTra": dvcqg_datetimes,
        "DonViXuLy": text(250),
        "HinhThuc": st.sampled_from([0, 1]),
        "MaDonViXuLy": st.sampled_from([u.code for u in units()]),
        "NguoiTiepNhan": text(50),
        "TaiLieuNop": st.lists(documents, max_size=3, unique_by=lambda d: _nfc(d["TepDinhKemId"])),
        "DanhSachLePhi": st.lists(fees, max_size=3, unique_by=lambda d: _nfc(d["MaPhiLePhi"])),
    }
    body: dict[str, Any] = draw(st.fixed_dictionaries(required, optional=optional))
    body["LoaiDoiTuong"] = kind
    body["SoGiayToChuHoSo"] = id_number
    return body


def assert_contract(validate: Validator, body: object) -> None:
    """Either errors with an empty clean dict, or a clean dict that is a fixed point."""
    clean, errors = validate(body)
    assert isinstance(clean, dict)
    assert isinstance(errors, dict)
    if errors:
        assert clean == {}
        for path, message in errors.items():
            assert isinstance(path, str) and path
            assert isinstance(message, str) and message
    else:
        assert validate(clean) == (clean, {})


# --- datetime helper ------------------------------------------------------------------------


class TestDatetime:
    def test_valid(self) -> None:
        """Real calendar date-times in yyyyMMddHHmmss are accepted."""
        for s in ["20250701083000", "20240229235959", "20000101000000"]:
            assert is_dvcqg_datetime(s), s

    def test_invalid(self) -> None:
        """Wrong shapes and impossible dates are refused."""
        for s in [
            "",
            "2025070108300",
            "202507010830000",
            "20250230083000",
            "20230229000000",
            "20251301000000",
            "20250701240000",
            "20250701086000",
            "20250701083060",
            "00000101000000",
            "2025-07-01 08:3",
            "٢٠٢٥٠٧٠١٠٨٣٠٠٠",
            " 20250701083000",
        ]:
            assert not is_dvcqg_datetime(s), s

    def test_non_string(self) -> None:
        """An int is not a date-time string."""
        assert not is_dvcqg_datetime(20250701083000)  # type: ignore[arg-type]


# --- intake ---------------------------------------------------------------------------------


class TestIntakeAccepts:
    def test_minimal_body(self) -> None:
        """The required fields alone are enough; defaults are filled in."""
        clean, errors = intake(base_intake())
        assert errors == {}
        assert clean == {**base_intake(), "HinhThuc": 0, "MaDonViXuLy": OWN}

    def test_full_body(self) -> None:
        """All optional fields are kept, lists cleaned item by item."""
        body = base_intake(
            Email="an@example.vn",
            SoDienThoai="+84912345678",
            ThongTinKhac="Ghi chú",
            NgayHenTra="20250715170000",
            DonViXuLy="UBND phường",
            HinhThuc=1,
            MaDonViXuLy=OTHER_UNIT,
            NguoiTiepNhan="Lê Văn C",
            TaiLieuNop=[{"TepDinhKemId": "f1", "TenTepDinhKem": "to-khai.pdf"}],
            DanhSachLePhi=[base_fee()],
        )
        clean, errors = intake(body)
        assert errors == {}
        assert clean["MaDonViXuLy"] == OTHER_UNIT
        assert clean["HinhThuc"] == 1
        assert clean["TaiLieuNop"] == [{"TepDinhKemId": "f1", "TenTepDinhKem": "to-khai.pdf", "DuocSoHoa": 0}]
        assert clean["DanhSachLePhi"] == [base_fee()]

    def test_strings_are_stripped_and_nfc(self) -> None:
        """Padding is removed and decomposed Vietnamese is composed."""
        decomposed = unicodedata.normalize("NFD", "Nguyễn Văn An")
        clean, errors = intake(base_intake(ChuHoSo=f"  {decomposed}\t"))
        assert errors == {}
        assert clean["ChuHoSo"] == "Nguyễn Văn An"

    def test_nfc_length_counts(self) -> None:
        """Length limits apply after composing, so decomposed text is not penalised."""
        composed = "ệ" * 50
        decomposed = unicodedata.normalize("NFD", composed)
        assert len(decomposed) > 50
        clean, errors = intake(base_intake(NguoiTiepNhan=decomposed))
        assert errors == {}
        assert clean["NguoiTiepNhan"] == composed

    def test_blank_and_null_optional_fields_are_dropped(self) -> None:
        """Blank strings and null in optional fields mean absent."""
        clean, errors = intake(base_intake(Email="  ", ThongTinKhac=None, NgayHenTra=""))
        assert errors == {}
        assert "Email" not in clean and "ThongTinKhac" not in clean and "NgayHenTra" not in clean

    def test_null_node_field_is_ignored(self) -> None:
        """A node-set field sent empty carries nothing and is tolerated."""
        clean, errors = intake(base_intake(MaHoSo=None, NgayTiepNhan=""))
        assert errors == {}
        assert "MaHoSo" not in clean

    @pytest.mark.parametrize(("kind", "id_number"), [(2, "0312345678-001"), (3, "12/QD-UBND"), (4, "B1234567")])
    def test_non_citizen_ids(self, kind: int, id_number: str) -> None:
        """Non-citizens may use other identifiers."""
        _, errors = intake(base_intake(LoaiDoiTuong=kind, SoGiayToChuHoSo=id_number))
        assert errors == {}

    @pytest.mark.parametrize("phone", ["0912345678", "912345678", "+84912345678", "02838123456"])
    def test_phone_numbers(self, phone: str) -> None:
        """Common Vietnamese phone formats are accepted as given."""
        clean, errors = intake(base_intake(SoDienThoai=phone))
        assert errors == {}
        assert clean["SoDienThoai"] == phone


class TestIntakeRejects:
    def test_non_object_bodies(self) -> None:
        """Bodies that are not objects get one error on "$"."""
        for body in [None, [], "x", 1, True, 1.5, [base_intake()]]:
            assert intake(body) == ({}, {"$": "must be a JSON object"})

    def test_empty_body_lists_required(self) -> None:
        """Every required field is reported as required."""
        _, errors = intake({})
        assert errors == {
            name: "required"
            for name in [
                "MaTTHC",
                "TenTTHC",
                "MaLinhVuc",
                "TenLinhVuc",
                "KenhThucHien",
                "ChuHoSo",
                "SoGiayToChuHoSo",
                "LoaiDoiTuong",
                "TrichYeuHoSo",
            ]
        }

    def test_unknown_field(self) -> None:
        """Unknown fields are errors, with a hint for case mistakes."""
        _, errors = intake(base_intake(Foo=1, chuHoSo="x"))
        assert errors == {"Foo": "unknown field", "chuHoSo": "unknown field; did you mean ChuHoSo?"}

    def test_node_fields_are_refused(self) -> None:
        """Fields the node sets cannot be sent by the client."""
        body = base_intake(**{name: "x" for name in NODE_FIELDS})
        _, errors = intake(body)
        assert errors == {name: "is set by the node and must not be sent" for name in NODE_FIELDS}

    @pytest.mark.parametrize("value", [True, 2.0, "1", 0, 4, -1, 10**40, None])
    def test_kenh_thuc_hien(self, value: object) -> None:
        """KenhThucHien must be the integer 1, 2 or 3; bools and floats are refused."""
        _, errors = intake(base_intake(KenhThucHien=value))
        expected = "required" if value is None else "must be one of 1, 2, 3"
        assert errors == {"KenhThucHien": expected}

    @pytest.mark.parametrize("value", ["abc", "1", "1.", ".1", "1..2", "1.000656 ", "1.2a", "1" + ".1" * 30])
    def test_procedure_code(self, value: str) -> None:
        """MaTTHC must be dotted digits of at most 50 characters."""
        _, errors = intake(base_intake(MaTTHC=value))
        if value.strip() == "1.000656":
            assert errors == {}
        else:
            assert set(errors) == {"MaTTHC"}

    @pytest.mark.parametrize("value", ["07919000000", "0791900000011", "07919000000a", "079 190 000 001"])
    def test_citizen_id(self, value: str) -> None:
        """A citizen's ID number is exactly 12 digits."""
        _, errors = intake(base_intake(SoGiayToChuHoSo=value))
        assert errors == {"SoGiayToChuHoSo": "must be a 12-digit citizen ID number when LoaiDoiTuong is 1"}

    @pytest.mark.parametrize("value", ["AB 12", "AB_12", "x" * 51, "Đ123"])
    def test_other_id(self, value: str) -> None:
        """Other identifiers are limited to letters, digits, '-' and '/'."""
        _, errors = intake(base_intake(LoaiDoiTuong=2, SoGiayToChuHoSo=value))
        assert set(errors) == {"SoGiayToChuHoSo"}

    @pytest.mark.parametrize("value", ["a@b", "@b.vn", "a b@c.vn", "a@b..vn", "a@@b.vn", "x" * 96 + "@b.vn"])
    def test_email(self, value: str) -> None:
        """Email must look like an address and fit in 100 characters."""
        _, errors = intake(base_intake(Email=value))
        assert set(errors) == {"Email"}

    @pytest.mark.parametrize("value", ["12345678", "091234567890", "+8409123456789", "0912-345-678", "84912345678a"])
    def test_phone(self, value: str) -> None:
        """Phone numbers outside the Vietnamese shapes are refused."""
        _, errors = intake(base_intake(SoDienThoai=value))
        assert set(errors) == {"SoDienThoai"}

    @pytest.mark.parametrize("value", ["20250230120000", "2025-07-15", 20250715170000])
    def test_ngay_hen_tra(self, value: object) -> None:
        """NgayHenTra must be a real yyyyMMddHHmmss date-time string."""
        _, errors = intake(base_intake(NgayHenTra=value))
        assert errors == {"NgayHenTra": "must be a date-time yyyyMMddHHmmss, e.g. 20250701083000"}

    @pytest.mark.parametrize("value", ["99999", "2673", 26732, "00004"])
    def test_unit_code(self, value: object) -> None:
        """MaDonViXuLy must be a unit of the registry."""
        _, errors = intake(base_intake(MaDonViXuLy=value))
        assert set(errors) == {"MaDonViXuLy"}

    @pytest.mark.parametrize("value", ["a\x00b", "a\nb", "a\x7fb", "a\x85b", "a\ud800b"])
    def test_control_characters(self, value: str) -> None:
        """Control characters and lone surrogates inside a string are refused."""
        _, errors = intake(base_intake(ChuHoSo=value))
        assert errors == {"ChuHoSo": "must not contain control characters or invalid Unicode"}

    def test_too_long(self) -> None:
        """Length limits are enforced with a message naming the limit."""
        _, errors = intake(base_intake(TrichYeuHoSo="x" * 1001))
        assert errors == {"TrichYeuHoSo": "must be a string of at most 1000 characters"}

    def test_string_field_given_a_number(self) -> None:
        """Numbers are not accepted where a string is expected."""
        _, errors = intake(base_intake(ChuHoSo=123))
        assert errors == {"ChuHoSo": "must be a string of at most 250 characters"}


class TestIntakeLists:
    def test_documents_must_be_a_list(self) -> None:
        """TaiLieuNop must be a list."""
        _, errors = intake(base_intake(TaiLieuNop={"TepDinhKemId": "f1"}))
        assert errors == {"TaiLieuNop": "must be a list of at most 100 documents"}

    def test_too_many_documents(self) -> None:
        """At most 100 documents."""
        docs = [{"TepDinhKemId": f"f{i}", "TenTepDinhKem": "a.pdf"} for i in range(101)]
        _, errors = intake(base_intake(TaiLieuNop=docs))
        assert set(errors) == {"TaiLieuNop"}

    def test_empty_list_is_kept(self) -> None:
        """An empty document list is valid and kept."""
        clean, errors = intake(base_intake(TaiLieuNop=[]))
        assert errors == {}
        assert clean["TaiLieuNop"] == []

    def test_item_errors_have_paths(self) -> None:
        """Errors inside list items are reported with indexed paths."""
        docs = [
            {"TepDinhKemId": "f1", "TenTepDinhKem": "a.pdf"},
            {"TepDinhKemId": "f2", "DuocSoHoa": True, "X": 1},
            "f3",
        ]
        _, errors = intake(base_intake(TaiLieuNop=docs))
        assert errors == {
            "TaiLieuNop[1].TenTepDinhKem": "required",
            "TaiLieuNop[1].DuocSoHoa": "must be one of 0, 1",
            "TaiLieuNop[1].X": "unknown field",
            "TaiLieuNop[2]": "must be a JSON object",
        }

    def test_duplicate_document_ids(self) -> None:
        """TepDinhKemId is unique within the list, compared after normalisation."""
        docs = [
            {"TepDinhKemId": "f1", "TenTepDinhKem": "a.pdf"},
            {"TepDinhKemId": " f1 ", "TenTepDinhKem": "b.pdf"},
        ]
        _, errors = intake(base_intake(TaiLieuNop=docs))
        assert errors == {
            "TaiLieuNop[1].TepDinhKemId": "must be unique in TaiLieuNop; it repeats TaiLieuNop[0].TepDinhKemId"
        }

    def test_duplicate_fee_codes(self) -> None:
        """MaPhiLePhi is unique within the fee list."""
        _, errors = intake(base_intake(DanhSachLePhi=[base_fee(), base_fee(Gia=0)]))
        assert set(errors) == {"DanhSachLePhi[1].MaPhiLePhi"}

    def test_fee_errors_have_paths(self) -> None:
        """Fee errors are prefixed with the fee's index."""
        _, errors = intake(base_intake(DanhSachLePhi=[base_fee(Gia=-1), 7]))
        assert errors == {
            "DanhSachLePhi[0].Gia": "must be an integer from 0 to 1000000000000",
            "DanhSachLePhi[1]": "must be a JSON object",
        }


DELETE = object()
_common_invalid = [DELETE, None, "", "   ", 7, True, 1.5, [], {}, "a\x00b"]


def _invalid_strings(max_len: int) -> st.SearchStrategy[object]:
    return st.sampled_from([*_common_invalid, "x" * (max_len + 1)])


def _invalid_ints(*extra: object) -> st.SearchStrategy[object]:
    base: list[object] = [DELETE, None, "", "1", 1.0, True, False, [], {}, -1, 10**30, *extra]
    return st.sampled_from(base)


INVALID_VALUES: dict[str, st.SearchStrategy[object]] = {
    "MaTTHC": st.sampled_from([*_common_invalid, "abc", "1", "1..2", "1." + "0" * 49, "\u0661.\u0662"]),
    "TenTTHC": _invalid_strings(500),
    "MaLinhVuc": _invalid_strings(50),
    "TenLinhVuc": _invalid_strings(500),
    "KenhThucHien": _invalid_ints(0, 4),
    "ChuHoSo": _invalid_strings(250),
    # Invalid whatever LoaiDoiTuong is.
    "SoGiayToChuHoSo": st.sampled_from([*_common_invalid, "12 34", "ab!", "x" * 51, "١٢٣٤٥٦٧٨٩٠١٢"]),
    "LoaiDoiTuong": _invalid_ints(0, 5),
    "TrichYeuHoSo": _invalid_strings(1000),
}


class TestIntakeProperties:
    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values)
    def test_never_raises_on_any_json(self, body: object) -> None:
        """Arbitrary JSON never crashes the validator and honours the contract."""
        assert_contract(intake, body)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(junk_objects(INTAKE_FIELDS | NODE_FIELDS))
    def test_never_raises_on_near_records(self, body: dict[str, Any]) -> None:
        """Objects with real field names and junk values honour the contract."""
        assert_contract(intake, body)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(intakes(), st.sampled_from(sorted(INTAKE_FIELDS | NODE_FIELDS)), json_values)
    def test_never_raises_on_one_junk_field(self, body: dict[str, Any], name: str, value: object) -> None:
        """A valid body with one field replaced by junk honours the contract."""
        body[name] = value
        assert_contract(intake, body)

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(intakes())
    def test_valid_body_is_accepted(self, body: dict[str, Any]) -> None:
        """Generated valid bodies pass and their clean form is a fixed point."""
        clean, errors = intake(body)
        assert errors == {}
        assert set(clean) == set(body) | {"HinhThuc", "MaDonViXuLy"}
        assert clean["MaDonViXuLy"] == body.get("MaDonViXuLy", OWN)
        assert intake(clean) == (clean, {})

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(intakes(), st.data())
    def test_one_invalid_required_field(self, body: dict[str, Any], data: st.DataObject) -> None:
        """Breaking one required field yields an error on exactly that field."""
        name = data.draw(st.sampled_from(sorted(INVALID_VALUES)))
        value = data.draw(INVALID_VALUES[name])
        if value is DELETE:
            del body[name]
        else:
            body[name] = value
        _, errors = intake(body)
        assert set(errors) == {name}

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(intakes(), documents, st.sampled_from(["TepDinhKemId", "TenTepDinhKem"]), st.data())
    def test_one_invalid_document_field(
        self, body: dict[str, Any], doc: dict[str, Any], name: str, data: st.DataObject
    ) -> None:
        """Breaking a required field of a document yields an error on exactly that path."""
        doc[name] = data.draw(st.sampled_from(["", None, 5, True, [], "x" * 256, "a\x01b"]))
        body["TaiLieuNop"] = [doc]
        _, errors = intake(body)
        assert set(errors) == {f"TaiLieuNop[0].{name}"}


def test_invalid_values_cover_required_fields() -> None:
    """The mutation table covers every required intake field."""
    assert set(INVALID_VALUES) == INTAKE_REQUIRED


# --- steps ----------------------------------------------------------------------------------


class TestStep:
    def test_minimal(self) -> None:
        """TrangThai and NguoiXuLy are enough."""
        assert validate_step(base_step()) == (base_step(), {})

    def test_full(self) -> None:
        """All optional fields are kept."""
        body = base_step(
            ChucDanh="Công chức",
            ThoiDiemXuLy="20250701083000",
            PhongBanXuLy="Bộ phận một cửa",
            NoiDungXuLy="Chuyển xử lý",
            NgayBatDau="20250701083000",
            NgayKetThucTheoQuyDinh="20250705170000",
        )
        assert validate_step(body) == (body, {})

    def test_ma_ho_so_is_refused(self) -> None:
        """MaHoSo is filled in by the node."""
        _, errors = validate_step(base_step(MaHoSo="000.00.17.H29-250701-0001"))
        assert errors == {"MaHoSo": "is set by the node and must not be sent"}

    @pytest.mark.parametrize("value", [0, 11, True, 4.0, "4", None])
    def test_trang_thai(self, value: object) -> None:
        """TrangThai is an integer status code 1..10."""
        _, errors = validate_step(base_step(TrangThai=value))
        expected = "required" if value is None else "must be an integer from 1 to 10"
        assert errors == {"TrangThai": expected}

    def test_officer_name_limit(self) -> None:
        """NguoiXuLy is at most 50 characters."""
        _, errors = validate_step(base_step(NguoiXuLy="x" * 51))
        assert errors == {"NguoiXuLy": "must be a string of at most 50 characters"}

    def test_bad_dates_and_unknown(self) -> None:
        """Date-times are checked and unknown fields reported."""
        _, errors = validate_step(base_step(NgayBatDau="20250732000000", Extra=1))
        assert set(errors) == {"NgayBatDau", "Extra"}

    def test_non_object(self) -> None:
        """A non-object body is reported on "$"."""
        assert validate_step([base_step()]) == ({}, {"$": "must be a JSON object"})

    @settings(max_examples=60, deadline=None)
    @given(json_values)
    def test_never_raises_on_any_json(self, body: object) -> None:
        """Arbitrary JSON honours the contract."""
        assert_contract(validate_step, body)

    @settings(max_examples=60, deadline=None)
    @given(junk_objects(STEP_FIELDS | {"MaHoSo"}))
    def test_never_raises_on_near_records(self, body: dict[str, Any]) -> None:
        """Objects with real field names and junk values honour the contract."""
        assert_contract(validate_step, body)

    @settings(max_examples=60, deadline=None)
    @given(steps)
    def test_valid_step_is_accepted(self, body: dict[str, Any]) -> None:
        """Generated valid steps pass and are fixed points."""
        clean, errors = validate_step(body)
        assert errors == {}
        assert set(clean) == set(body)
        assert validate_step(clean) == (clean, {})


# --- fees -----------------------------------------------------------------------------------


class TestFee:
    def test_minimal(self) -> None:
        """Name, code and amount are enough."""
        assert validate_fee(base_fee()) == (base_fee(), {})

    @pytest.mark.parametrize("value", [-1, 10**12 + 1, 1.0, True, "8000", 10**100])
    def test_amount(self, value: object) -> None:
        """Gia is an integer number of VND from 0 to 10**12."""
        _, errors = validate_fee(base_fee(Gia=value))
        assert errors == {"Gia": "must be an integer from 0 to 1000000000000"}

    def test_amount_bounds(self) -> None:
        """0 and 10**12 are both allowed."""
        assert validate_fee(base_fee(Gia=0))[1] == {}
        assert validate_fee(base_fee(Gia=10**12))[1] == {}

    @pytest.mark.parametrize("name", ["HinhThucThu", "LoaiPhiLePhi"])
    @pytest.mark.parametrize("value", [0, 10, True, 1.0])
    def test_small_codes(self, name: str, value: object) -> None:
        """HinhThucThu and LoaiPhiLePhi are integers 1..9."""
        _, errors = validate_fee(base_fee(**{name: value}))
        assert errors == {name: "must be an integer from 1 to 9"}

    def test_required(self) -> None:
        """All three required fields are reported when missing."""
        _, errors = validate_fee({})
        assert errors == {"TenPhiLePhi": "required", "MaPhiLePhi": "required", "Gia": "required"}

    @settings(max_examples=60, deadline=None)
    @given(json_values)
    def test_never_raises_on_any_json(self, body: object) -> None:
        """Arbitrary JSON honours the contract."""
        assert_contract(validate_fee, body)

    @settings(max_examples=60, deadline=None)
    @given(junk_objects(FEE_FIELDS))
    def test_never_raises_on_near_records(self, body: dict[str, Any]) -> None:
        """Objects with real field names and junk values honour the contract."""
        assert_contract(validate_fee, body)

    @settings(max_examples=60, deadline=None)
    @given(fees)
    def test_valid_fee_is_accepted(self, body: dict[str, Any]) -> None:
        """Generated valid fees pass and are fixed points."""
        clean, errors = validate_fee(body)
        assert errors == {}
        assert validate_fee(clean) == (clean, {})


class TestFieldSets:
    def test_sets_are_disjoint_and_complete(self) -> None:
        """Client and node field sets do not overlap and match the record format."""
        assert not INTAKE_FIELDS & NODE_FIELDS
        assert {"MaTTHC", "ChuHoSo", "TaiLieuNop", "DanhSachLePhi", "MaDonViXuLy"} <= INTAKE_FIELDS
        assert {"MaHoSo", "TrangThaiHoSo", "QuaTrinhXuLy", "NgayTiepNhan"} <= NODE_FIELDS
        assert "MaHoSo" not in STEP_FIELDS
        assert {
            "TepDinhKemId",
            "TenTepDinhKem",
            "MaThanhPhanHoSo",
            "DuongDanTaiTepTin",
            "DuocSoHoa",
        } == DOCUMENT_FIELDS
        assert {"TenPhiLePhi", "MaPhiLePhi", "HinhThucThu", "Gia", "LoaiPhiLePhi"} == FEE_FIELDS
