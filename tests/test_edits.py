"""PATCH /api/v1/dossiers/{code}: edits guarded by If-Match, validated like intake, replicated like any change."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Map

from node.app import Node
from node.config import load_config
from tests.conftest import eventually, running_node, valid_intake
from tests.test_failover import FAST
from tests.test_ws import yjs_client
from tests.upstreams import Upstreams, running_upstreams, target_overrides

Running = tuple[Node, str, aiohttp.ClientSession]


async def intake(running: Running) -> dict[str, Any]:
    _, base, session = running
    async with session.post(f"{base}/api/v1/dossiers", json=valid_intake()) as resp:
        assert resp.status == 201, await resp.text()
        return dict(await resp.json())


async def read(running: Running, code: str) -> tuple[str, dict[str, Any]]:
    """(ETag, body) of GET one dossier."""
    _, base, session = running
    async with session.get(f"{base}/api/v1/dossiers/{code}") as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["ETag"], dict(await resp.json())


async def patch(running: Running, code: str, body: Any, if_match: str | None) -> tuple[int, dict[str, Any], str | None]:
    _, base, session = running
    headers = {} if if_match is None else {"If-Match": if_match}
    async with session.patch(f"{base}/api/v1/dossiers/{code}", json=body, headers=headers) as resp:
        return resp.status, dict(await resp.json()), resp.headers.get("ETag")


async def journal_length(node: Node) -> int:
    row = await node.store.fetchone("SELECT count(*) FROM journal")
    assert row is not None
    return int(row[0])



class TestIfMatch:
    """The digest the clerk read guards the edit."""

    async def test_edit_with_current_digest(self, node_server: Running) -> None:
        node = node_server[0]
        code = (await intake(node_server))["MaHoSo"]
        etag, before = await read(node_server, code)
        assert etag == f'"{before["digest"]}"'
        journal = await journal_length(node)
        status, after, new_etag = await patch(
            node_server, code, {"SoDienThoai": "0987654321", "TrichYeuHoSo": "Đăng ký khai sinh cho con thứ hai"}, etag
        )
        assert status == 200, after
        assert after["SoDienThoai"] == "0987654321"
        assert after["TrichYeuHoSo"] == "Đăng ký khai sinh cho con thứ hai"
        assert after["digest"] != before["digest"]
        assert new_etag == f'"{after["digest"]}"'
        assert await journal_length(node) == journal + 1  # journaled: both replicators will push it
        _, stored = await read(node_server, code)
        assert stored["digest"] == after["digest"] and stored["SoDienThoai"] == "0987654321"
        # The same edit again changes nothing and writes nothing.
        status, again, _ = await patch(node_server, code, {"SoDienThoai": "0987654321"}, new_etag)
        assert (status, again["digest"]) == (200, after["digest"])
        assert await journal_length(node) == journal + 1

    async def test_stale_digest_gets_412_with_the_current_record(self, node_server: Running) -> None:
        node, base, session = node_server
        code = (await intake(node_server))["MaHoSo"]
        stale, _ = await read(node_server, code)
        step = {"TrangThai": 4, "NguoiXuLy": "Phạm Thu Hà", "ThoiDiemXuLy": "20300101080000"}
        async with session.post(f"{base}/api/v1/dossiers/{code}/steps", json=step) as resp:
            assert resp.status == 201
        current_etag, current = await read(node_server, code)
        journal = await journal_length(node)
        status, reply, etag = await patch(node_server, code, {"SoDienThoai": "0987654321"}, stale)
        assert status == 412, reply
        assert reply["error"]["code"] == "precondition_failed"
        assert etag == current_etag
        shown = reply["error"]["record"]
        assert shown["digest"] == current["digest"] and shown["TrangThaiHoSo"] == 4
        assert shown["SoDienThoai"] == "0912345678"
        assert await journal_length(node) == journal

    async def test_missing_if_match_is_428_and_garbage_is_400(self, node_server: Running) -> None:
        code = (await intake(node_server))["MaHoSo"]
        status, reply, _ = await patch(node_server, code, {"SoDienThoai": "0987654321"}, None)
        assert status == 428 and "If-Match" in reply["error"]["fields"]
        status, reply, _ = await patch(node_server, code, {"SoDienThoai": "0987654321"}, '"abc"')
        assert status == 400 and "If-Match" in reply["error"]["fields"]
        status, reply, _ = await patch(
            node_server, "000.00.17.H29-300101-9999", {"Email": "a@b.vn"}, '"' + "0" * 64 + '"'
        )
        assert status == 404

    async def test_two_clerks_at_once_one_wins(self, node_server: Running) -> None:
        """Both read the same digest; the writer checks it in the batch that applies the edit."""
        code = (await intake(node_server))["MaHoSo"]
        etag, _ = await read(node_server, code)
        results = await asyncio.gather(
            patch(node_server, code, {"SoDienThoai": "0911111111"}, etag),
            patch(node_server, code, {"SoDienThoai": "0922222222"}, etag),
        )
        assert sorted(r[0] for r in results) == [200, 412]
        winner = next(r[1] for r in results if r[0] == 200)
        _, stored = await read(node_server, code)
        assert stored["SoDienThoai"] == winner["SoDienThoai"]


class TestValidation:
    """Only editable fields, each checked as intake checks it."""

    async def test_refusals_name_the_field(self, node_server: Running) -> None:
        code = (await intake(node_server))["MaHoSo"]
        etag, before = await read(node_server, code)
        cases = [
            ({"MaHoSo": "x"}, "MaHoSo", "cannot be edited"),
            ({"MaDonViXuLy": "26740"}, "MaDonViXuLy", "cannot be edited"),
            ({"TrangThaiHoSo": 10}, "TrangThaiHoSo", "cannot be edited"),
            ({"MaTTHC": "1.000656"}, "MaTTHC", "cannot be edited"),
            ({"Email": None}, "Email", "cannot be removed"),
            ({"SoDienThoai": "12"}, "SoDienThoai", "phone"),
            ({"SoGiayToChuHoSo": "12345"}, "SoGiayToChuHoSo", "12-digit"),
            ({"sodienthoai": "0987654321"}, "sodienthoai", "did you mean SoDienThoai"),
            ({}, "$", "at least one"),
        ]
        for body, field, words in cases:
            status, reply, _ = await patch(node_server, code, body, etag)
            assert status == 422, (body, reply)
            assert words in reply["error"]["fields"][field], (body, reply)
        # A business (LoaiDoiTuong 2) may carry a registration number that is not a citizen ID.
        status, reply, _ = await patch(node_server, code, {"LoaiDoiTuong": 2, "SoGiayToChuHoSo": "41A8-012345"}, etag)
        assert status == 200, reply
        _, after = await read(node_server, code)
        assert after["digest"] != before["digest"]


def node_config(tmp_path: Path, ups: Any) -> Any:
    return load_config(
        env={},
        overrides={
            "node": {
                "unit": "26743",
                "agency_code": "000.00.17.H29",
                "listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "node"),
            },
            **target_overrides(ups, timeout_s=1.0),
            "replication": {"tick_s": 0.1, "retry_base_s": 0.05, "retry_cap_s": 0.2},
        },
    )


class TestDeadLetter:
    """A record the portal refuses is fixed by an edit and lands on both upstreams."""

    async def test_edit_fixes_a_rejected_dossier(self, tmp_path: Path) -> None:
        async with running_upstreams(tmp_path) as ups, running_node(node_config(tmp_path, ups)) as running:
            _, base, session = running
            code = (await intake(running))["MaHoSo"]
            # A desk app syncing the dossier as a Yjs peer writes a phone number the portal refuses (over 20
            # characters); the node takes any text there, the portal answers "invalid".
            async with yjs_client(running, code) as doc:
                doc.get("fields", type=Map)["SoDienThoai"] = "0912 345 678 / 0903 123 456"

                async def dead() -> bool:
                    _, body = await read(running, code)
                    return bool(body["replication"]["national"]["state"] == "dead")

                await eventually(dead, what="the portal dead-letters the record")
            etag, body = await read(running, code)
            assert "SoDienThoai" in body["replication"]["national"]["last_error"]
            status, fixed, _ = await patch(running, code, {"SoDienThoai": "0912345678"}, etag)
            assert status == 200, fixed
            async with session.post(f"{base}/api/v1/dead-letters/national/{code}/retry") as resp:
                # 404 only when the replicator already picked the changed record up on its own.
                assert resp.status in (202, 404), await resp.text()

            async def landed() -> bool:
                held = [(await ups.dossiers(t, "26743")).get(code) for t in ("national", "city")]
                _, body = await read(running, code)
                states = [body["replication"][t]["state"] for t in ("national", "city")]
                return held == [fixed["digest"], fixed["digest"]] and states == ["synced", "synced"]

            # The fix returns the phone number to what the portal already holds: nothing needs sending, and the
            # row must still end synced rather than pending for ever.
            await eventually(landed, within_s=5, what="the corrected record on both upstreams, acknowledged")


def unit_config(tmp_path: Path, ups: Upstreams, unit: str, agency: str, targets: tuple[str, ...]) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    overrides["targets.national"] = {**overrides["targets.national"], "dstcode": agency, "madonvi": agency}
    for target in {"national", "city"} - set(targets):
        del overrides[f"targets.{target}"]
    node = {"unit": unit, "agency_code": agency, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / unit)}
    return load_config(env={}, overrides={"node": node, **overrides, "failover": {**FAST, "hold_s": 1.0}})


async def concurrent_edits(tmp_path: Path, targets: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A receives a dossier for B; both edit Email while their upstreams are down; then the links return.
    The records A and B hold once they, and every upstream, agree."""
    a_unit, a_agency, b_unit, b_agency = "26743", "000.00.17.H29", "26740", "000.00.18.H29"
    async with (
        running_upstreams(tmp_path) as ups,
        running_node(unit_config(tmp_path, ups, a_unit, a_agency, targets)) as a,
        running_node(unit_config(tmp_path, ups, b_unit, b_agency, targets)) as b,
    ):
        _, a_base, a_session = a
        async with a_session.post(f"{a_base}/api/v1/dossiers", json=valid_intake(MaDonViXuLy=b_unit)) as resp:
            assert resp.status == 201
            code = (await resp.json())["MaHoSo"]

        async def b_has_it() -> bool:
            async with b[2].get(f"{b[1]}/api/v1/dossiers/{code}") as resp:
                return resp.status == 200

        await eventually(b_has_it, what="B pulls the dossier")
        for target in targets:
            await ups.fault(target, mode="down")
        a_etag, _ = await read(a, code)
        b_etag, _ = await read(b, code)
        status, _, _ = await patch(a, code, {"Email": "mot@example.vn"}, a_etag)
        assert status == 200
        status, _, _ = await patch(b, code, {"Email": "hai@example.vn"}, b_etag)
        assert status == 200
        for target in targets:
            await ups.clear(target)

        async def converged() -> tuple[dict[str, Any], dict[str, Any]] | None:
            _, da = await read(a, code)
            _, db = await read(b, code)
            held = {(await ups.dossiers(t, a_unit)).get(code) for t in targets}
            if held == {da["digest"]} == {db["digest"]} and "conflicts" in da and "conflicts" in db:
                return da, db
            return None

        found: tuple[dict[str, Any], dict[str, Any]] = await eventually(
            converged, within_s=30, what="A, B and the upstreams agree"
        )
        return found


class TestConcurrentEdits:
    """Two units edit one field of a boundary-free dossier while cut off from the upstreams."""

    @pytest.mark.parametrize("targets", [("city",), ("national", "city")], ids=["city", "both"])
    async def test_one_winner_everywhere(self, tmp_path: Path, targets: tuple[str, ...]) -> None:
        da, db = await concurrent_edits(tmp_path, targets)
        assert da["Email"] == db["Email"] in ("mot@example.vn", "hai@example.vn")
        assert da["conflicts"] == db["conflicts"]

    async def test_the_losing_value_is_kept_as_a_conflict(self, tmp_path: Path) -> None:
        """Through the city system (Yjs updates) the edit that lost is recorded, as for any concurrent change."""
        da, _ = await concurrent_edits(tmp_path, ("city",))
        assert da["conflicts"] == [{**da["conflicts"][0], "field": "Email", "kept": da["Email"]}]
        assert {da["conflicts"][0]["lost"], da["Email"]} == {"mot@example.vn", "hai@example.vn"}

    async def test_the_losing_value_is_kept_as_a_conflict_with_the_portal(self, tmp_path: Path) -> None:
        """The competent unit first sees the dossier on the portal; the portal's record brings the other
        unit's Email back as a copy. Only Email is listed, with the two concurrent values, on both units."""
        da, db = await concurrent_edits(tmp_path, ("national", "city"))
        assert [c["field"] for c in da["conflicts"]] == ["Email"]
        assert da["conflicts"][0]["kept"] == da["Email"]
        assert {da["conflicts"][0]["lost"], da["Email"]} == {"mot@example.vn", "hai@example.vn"}
        assert [(c["field"], c["kept"], c["lost"]) for c in db["conflicts"]] == [
            (c["field"], c["kept"], c["lost"]) for c in da["conflicts"]
        ]
