"""Builders of real dossier Docs for tests that need records without running a node."""

from __future__ import annotations

from typing import Any

from pycrdt import Doc

from adapters.base import Outgoing
from sync import doc as ydoc
from sync.hlc import HLC
from sync.record import digest, materialise

AGENCY = "000.00.17.H29"
UNIT = "26743"
OTHER_UNIT = "26740"

_clock = HLC()


def base_fields(code: str, *, unit: str = UNIT, competent: str | None = None, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "MaHoSo": code,
        "MaTTHC": "1.000656",
        "TenTTHC": "Đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": "Nguyễn Văn An",
        "SoGiayToChuHoSo": "079123456789",
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": "Đăng ký khai sinh cho con",
        "HinhThuc": 0,
        "NgayTiepNhan": "20261122090000",
        "MaDonViTiepNhan": unit,
        "MaDonViXuLy": competent or unit,
    }
    if competent and competent != unit:
        fields["TrangThaiPhiDiaGioi"] = 1
    fields.update(extra)
    return fields


def step(code: str, status: int, at: str, officer: str = "Lê Thị Bình", note: str = "") -> dict[str, Any]:
    return {
        "MaHoSo": code,
        "NguoiXuLy": officer,
        "ThoiDiemXuLy": at,
        "TrangThai": status,
        "NoiDungXuLy": note or f"Chuyển trạng thái {status}",
        "PhongBanXuLy": "Bộ phận Một cửa",
    }


def new_dossier(
    code: str,
    *,
    client_id: int = 4242,
    unit: str = UNIT,
    competent: str | None = None,
    statuses: tuple[int, ...] = (2,),
    **extra: Any,
) -> Doc:
    """A Doc as a node's intake builds it, with steps for ``statuses`` (legal in that order)."""
    d = ydoc.new_doc(code, client_id)
    fields = base_fields(code, unit=unit, competent=competent, **extra)

    def write(x: Doc) -> None:
        ydoc.put_fields(x, fields)
        for i, s in enumerate(statuses):
            ydoc.add_step(x, step(code, s, f"202611220{9 + i // 60:01d}{i % 60:02d}00"), _clock.now().encode())

    ydoc.change(d, write)
    return d


def add_status(d: Doc, status: int, at: str) -> bytes:
    code = str(d.guid)
    return ydoc.change(d, lambda x: ydoc.add_step(x, step(code, status, at), _clock.now().encode()) and None)


def outgoing(d: Doc, ack: bytes | None = None) -> Outgoing:
    record, _ = materialise(d)
    return Outgoing(code=str(d.guid), record=record, digest=digest(record), state=d.get_update(), ack=ack)


def code(n: int, day: str = "261122") -> str:
    return f"{AGENCY}-{day}-{n:04d}"
