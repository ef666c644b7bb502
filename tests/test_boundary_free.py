"""Boundary-free intake (phi địa giới): unit A accepts, unit B handles, everyone converges.

Two real nodes against the same two stand-ins, with each upstream down in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.app import Node
from node.config import load_config
from tests.conftest import eventually, running_node, valid_intake
from tests.test_failover import FAST
from tests.upstreams import Upstreams, running_upstreams, target_overrides

A_UNIT, A_AGENCY = "26743", "000.00.17.H29"  # Phường Bến Thành receives
B_UNIT, B_AGENCY = "26740", "000.00.18.H29"  # Phường Sài Gòn is competent


def node_config(tmp_path: Path, ups: Upstreams, unit: str, agency: str) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    overrides["targets.national"] = {**overrides["targets.national"], "dstcode": agency, "madonvi": agency}
    return load_config(env={}, overrides={
        "node": {"unit": unit, "agency_code": agency, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / unit)},
        **overrides,
        "failover": {**FAST, "hold_s": 1.0},
    })


Running = tuple[Node, str, aiohttp.ClientSession]


@contextlib.asynccontextmanager
async def two_units(tmp_path: Path) -> AsyncIterator[tuple[Running, Running, Upstreams]]:
    async with running_upstreams(tmp_path) as ups, \
            running_node(node_config(tmp_path, ups, A_UNIT, A_AGENCY)) as a, \
            running_node(node_config(tmp_path, ups, B_UNIT, B_AGENCY)) as b:
        yield a, b, ups


async def get(n: Running, code: str) -> dict[str, Any] | None:
    _, url, s = n
    async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
        return dict(await r.json()) if r.status == 200 else None


async def post(n: Running, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    _, url, s = n
    async with s.post(f"{url}{path}", json=body if body is not None else {}) as r:
        return r.status, dict(await r.json())



async def all_converged(a: Running, b: Running, ups: Upstreams, code: str) -> bool:
    da, db = await get(a, code), await get(b, code)
    if da is None or db is None:
        return False
    remote = [(await ups.dossiers(t, A_UNIT)).get(code) for t in ("national", "city")]
    return da["digest"] == db["digest"] == remote[0] == remote[1]


class TestBoundaryFree:
    """A accepts for B; B pulls it, takes it over and returns the result; A, B and both upstreams agree."""

    @pytest.mark.parametrize("down", [None, "city", "national"])
    async def test_accept_forward_take_over_return(self, tmp_path: Path, down: str | None) -> None:
        async with two_units(tmp_path) as (a, b, ups):
            if down is not None:
                await ups.fault(down, mode="down")
            status, created = await post(a, "/api/v1/dossiers", valid_intake(MaDonViXuLy=B_UNIT))
            assert status == 201
            code = created["MaHoSo"]
            assert created["MaDonViTiepNhan"] == A_UNIT and created["TrangThaiPhiDiaGioi"] == 1
            assert code.startswith(A_AGENCY)  # the receiving unit's code, for good

            status, forwarded = await post(a, f"/api/v1/dossiers/{code}/forward")
            assert status == 201 and forwarded["TrangThaiPhiDiaGioi"] == 4

            async def b_sees_it_forwarded() -> bool:
                d = await get(b, code)
                return d is not None and d["TrangThaiPhiDiaGioi"] == 4

            await eventually(b_sees_it_forwarded, what=f"B pulls the forwarded dossier (upstream down: {down})")
            status, taken = await post(b, f"/api/v1/dossiers/{code}/take-over")
            assert status == 201 and taken["TrangThaiPhiDiaGioi"] == 2
            for st in (4, 9, 10):
                # An officer's steps lie seconds apart; the portal's times have one-second resolution.
                await asyncio.sleep(1.05)
                status, body = await post(b, f"/api/v1/dossiers/{code}/steps",
                                          {"TrangThai": st, "NguoiXuLy": "Cán bộ phường Sài Gòn"})
                assert status == 201, body
            assert body["TrangThaiHoSo"] == 10 and body["TrangThaiPhiDiaGioi"] == 3

            if down is not None:
                await ups.clear(down)

            async def a_sees_the_result() -> bool:
                d = await get(a, code)
                return d is not None and d["TrangThaiHoSo"] == 10 and d["TrangThaiPhiDiaGioi"] == 3

            await eventually(a_sees_the_result, what="A sees B's result")
            await eventually(lambda: all_converged(a, b, ups, code), what="A, B and both upstreams converge")
            # The code never changed hands, and each step is stored once everywhere.
            final = await get(a, code)
            assert final is not None and final["MaHoSo"] == code
            assert [s["TrangThai"] for s in final["QuaTrinhXuLy"]].count(10) == 1
            for t in ("national", "city"):
                assert (await ups.stats(t))["duplicates"] == 0

    async def test_only_the_right_unit_may_act(self, tmp_path: Path) -> None:
        async with two_units(tmp_path) as (a, b, _ups):
            _, created = await post(a, "/api/v1/dossiers", valid_intake(MaDonViXuLy=B_UNIT))
            code = created["MaHoSo"]
            status, body = await post(a, f"/api/v1/dossiers/{code}/take-over")
            assert status == 409 and body["error"]["code"] == "illegal_forwarding"
            await post(a, f"/api/v1/dossiers/{code}/forward")
            status, body = await post(a, f"/api/v1/dossiers/{code}/take-over")
            assert status == 403 and body["error"]["code"] == "wrong_unit"
            _, local = await post(a, "/api/v1/dossiers", valid_intake())
            status, body = await post(a, f"/api/v1/dossiers/{local['MaHoSo']}/forward")
            assert status == 409 and body["error"]["code"] == "not_boundary_free"
            assert b  # B took no part
