"""The record a node stores is exactly what its Doc materialises to, on every write path."""

from __future__ import annotations

import json
from typing import Any

from node.config import Config
from sync.doc import load_doc
from sync.record import digest, materialise
from tests.conftest import running_node, valid_intake

BODIES: list[dict[str, Any]] = [
    valid_intake(),
    valid_intake(MaDonViXuLy="26740", NguoiTiepNhan="Võ Thị Sáu", Email="an@example.vn", SoDienThoai="0909123456"),
    valid_intake(
        TaiLieuNop=[
            {"TepDinhKemId": "tk-2", "TenTepDinhKem": "Tờ khai.pdf", "MaThanhPhanHoSo": "TP1", "DuocSoHoa": 1},
            {"TepDinhKemId": "tk-1", "TenTepDinhKem": "CCCD.pdf"},
        ],
        DanhSachLePhi=[{"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 8000, "HinhThucThu": 1}],
        NgayHenTra="20261130170000",
        HinhThuc=1,
    ),
]


class TestStoredRecordMatchesDoc:
    """Intake builds the record from the values it writes; it must equal materialising the stored Doc."""

    async def test_every_path(self, config: Config) -> None:
        async with running_node(config) as (node, url, s):
            for body in BODIES:
                async with s.post(f"{url}/api/v1/dossiers", json=body) as r:
                    assert r.status == 201, await r.text()
                    code = (await r.json())["MaHoSo"]
                async with s.post(f"{url}/api/v1/dossiers/{code}/steps", json={"TrangThai": 4, "NguoiXuLy": "A"}) as r:
                    assert r.status == 201
                async with s.post(
                    f"{url}/api/v1/dossiers/{code}/fees", json={"TenPhiLePhi": "Phí", "MaPhiLePhi": "P9", "Gia": 5000}
                ) as r:
                    assert r.status == 201
            rows = await node.store.fetchall("SELECT code, state, record, digest, conflicts FROM dossiers")
            assert len(rows) == len(BODIES)
            for code, state, record, stored_digest, conflicts in rows:
                doc = load_doc(code, bytes(state), client_id=1)
                expected, expected_conflicts = materialise(doc)
                assert json.loads(record) == expected
                assert stored_digest == digest(expected)
                assert json.loads(conflicts) == expected_conflicts

    async def test_fresh_intake_matches_before_any_change(self, config: Config) -> None:
        async with running_node(config) as (node, url, s):
            for body in BODIES:
                async with s.post(f"{url}/api/v1/dossiers", json=body) as r:
                    reply = await r.json()
                row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (reply["MaHoSo"],))
                record, _ = materialise(load_doc(reply["MaHoSo"], bytes(row[0]), client_id=1))
                assert {k: v for k, v in reply.items() if k != "digest"} == record
                assert reply["digest"] == digest(record)
