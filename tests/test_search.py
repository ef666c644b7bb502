"""GET /api/v1/dossiers/search: ID number, diacritic-insensitive name words, procedure, status, receipt
dates, cursor pagination, and who may search. Real nodes on loopback, in clear and encrypted at rest."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.app import Node
from node.clock import TZ, Clock
from node.crypto import Keyring, write_keyring
from tests.conftest import make_config, running_node, valid_intake

Running = tuple[Node, str, aiohttp.ClientSession]


class SettableClock(Clock):
    """The node's clock, moved by the test to the day a dossier is received on; it runs on from there."""

    def set(self, local: str) -> None:
        """Make now the Asia/Ho_Chi_Minh time ``local`` (yyyyMMddHHmmss)."""
        target = datetime.strptime(local, "%Y%m%d%H%M%S").replace(tzinfo=TZ)
        self.offset = target - datetime.now(UTC)


# (receipt time, applicant, ID number, procedure, steps after intake)
PEOPLE: list[tuple[str, str, str, str, list[int]]] = [
    ("20261123090000", "Nguyễn Văn An", "079190000001", "1.001193", []),
    ("20261124093000", "Nguyễn Văn Anh", "079190000002", "1.001193", [4]),
    ("20261125100000", "Trần Thị Đức", "079190000003", "2.000908", [4, 9]),
    ("20261126080000", "NGUYỄN  VĂN  AN", "079190000004", "1.000656", [4]),
    ("20261127150000", "Lê Hoàng Ân", "079190000005", "1.001193", []),
]


async def seed(running: Running, clock: SettableClock) -> dict[str, str]:
    """Accept PEOPLE on their days; name -> code (the last name wins for a repeated one)."""
    _, base, session = running
    codes: dict[str, str] = {}
    for received, name, id_number, procedure, steps in PEOPLE:
        clock.set(received)
        body = valid_intake(ChuHoSo=name, SoGiayToChuHoSo=id_number, MaTTHC=procedure)
        async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
            assert resp.status == 201, await resp.text()
            created = await resp.json()
        assert created["NgayTiepNhan"] == received
        for i, st in enumerate(steps):
            clock.set(received[:8] + f"{11 + i:02d}0000")
            step = {"TrangThai": st, "NguoiXuLy": "Phạm Thu Hà"}
            async with session.post(f"{base}/api/v1/dossiers/{created['MaHoSo']}/steps", json=step) as resp:
                assert resp.status == 201, await resp.text()
        codes[id_number] = created["MaHoSo"]
    return codes


async def search(running: Running, headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any]:
    _, base, session = running
    async with session.get(f"{base}/api/v1/dossiers/search", params=params, headers=headers) as resp:
        return resp.status, await resp.json()


async def names(running: Running, **params: Any) -> list[str]:
    status, body = await search(running, **params)
    assert status == 200, body
    assert body["next_cursor"] is None, "one page expected"
    return [d["ChuHoSo"] for d in body["items"]]


def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "wardsync.key"
    write_keyring(path, Keyring.new())
    return path


@pytest.fixture(params=["clear", "encrypted"])
def config_args(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    return {"key_file": str(keyring(tmp_path))} if request.param == "encrypted" else {}


class TestSearch:
    """Each criterion alone and together, newest first, in clear and with encryption at rest."""

    async def test_criteria(self, tmp_path: Path, config_args: dict[str, Any]) -> None:
        clock = SettableClock()
        async with running_node(make_config(tmp_path, **config_args), clock) as running:
            codes = await seed(running, clock)
            # The citizen ID, also typed with spaces.
            assert await names(running, id_number="079190000003") == ["Trần Thị Đức"]
            assert await names(running, id_number="0791 9000 0003") == ["Trần Thị Đức"]
            assert await names(running, id_number="079190009999") == []
            # Names without diacritics and case; every query word must be a whole word of the name.
            assert await names(running, name="nguyen van an") == ["NGUYỄN  VĂN  AN", "Nguyễn Văn An"]
            assert await names(running, name="Nguyễn Văn Anh") == ["Nguyễn Văn Anh"]
            an = await names(running, name="an")
            assert "Nguyễn Văn Anh" not in an
            # "Ân" folds to "an" as well: a clerk typing without diacritics finds it too.
            assert an == ["Lê Hoàng Ân", "NGUYỄN  VĂN  AN", "Nguyễn Văn An"]
            assert await names(running, name="tran thi duc") == ["Trần Thị Đức"]  # đ folds to d
            assert await names(running, name="duc tran") == ["Trần Thị Đức"]  # word order does not matter
            assert await names(running, name="nguyen van a") == []  # no prefixes
            # Procedure and status (the status the steps led to).
            assert await names(running, procedure="1.001193") == ["Lê Hoàng Ân", "Nguyễn Văn Anh", "Nguyễn Văn An"]
            assert await names(running, status=4) == ["NGUYỄN  VĂN  AN", "Nguyễn Văn Anh"]
            assert await names(running, status=9) == ["Trần Thị Đức"]
            assert await names(running, status=2) == ["Lê Hoàng Ân", "Nguyễn Văn An"]
            # Receipt dates: whole days inclusive, or exact times.
            assert await names(running, **{"from": "2026-11-24", "to": "2026-11-25"}) == [
                "Trần Thị Đức",
                "Nguyễn Văn Anh",
            ]
            assert await names(running, **{"from": "20261124093001"}) == [
                "Lê Hoàng Ân",
                "NGUYỄN  VĂN  AN",
                "Trần Thị Đức",
            ]
            assert await names(running, to="20261124093000") == ["Nguyễn Văn Anh", "Nguyễn Văn An"]
            # Criteria together must all hold.
            assert await names(running, name="nguyen van", status=4, procedure="1.001193") == ["Nguyễn Văn Anh"]
            assert await names(running, name="an", **{"from": "2026-11-26", "to": "2026-11-26"}) == ["NGUYỄN  VĂN  AN"]
            # Items are the dossiers as GET shows them, with digest and deadline standing.
            status, body = await search(running, id_number="079190000001")
            assert status == 200, body
            (item,) = body["items"]
            assert item["MaHoSo"] == codes["079190000001"]
            assert len(item["digest"]) == 64 and "TinhTrangHan" in item
            node = running[0]
            row = await node.store.fetchone("SELECT digest FROM dossiers WHERE code = ?", (item["MaHoSo"],))
            assert row is not None and item["digest"] == row[0]

    async def test_an_edit_reindexes(self, tmp_path: Path, config_args: dict[str, Any]) -> None:
        """A corrected name or ID number is found by its new value only."""
        async with running_node(make_config(tmp_path, **config_args)) as running:
            _, base, session = running
            body = valid_intake(ChuHoSo="Nguyễn Văn Anh", SoGiayToChuHoSo="079190000002")
            async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
                code = (await resp.json())["MaHoSo"]
            async with session.get(f"{base}/api/v1/dossiers/{code}") as resp:
                etag = resp.headers["ETag"]
            fix = {"ChuHoSo": "Nguyễn Văn An", "SoGiayToChuHoSo": "079190000001"}
            async with session.patch(f"{base}/api/v1/dossiers/{code}", json=fix, headers={"If-Match": etag}) as resp:
                assert resp.status == 200, await resp.text()
            assert await names(running, name="nguyen van an") == ["Nguyễn Văn An"]
            assert await names(running, name="anh") == []
            assert await names(running, id_number="079190000002") == []
            assert await names(running, id_number="079190000001") == ["Nguyễn Văn An"]


class TestEncryptedIndex:
    """With a keyring, the index holds keyed hashes: no ID number or name word in clear."""

    async def test_index_holds_no_clear_terms(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, key_file=str(keyring(tmp_path)))
        async with running_node(config) as running:
            _, base, session = running
            body = valid_intake(ChuHoSo="Nguyễn Văn Khôi", SoGiayToChuHoSo="079190123456")
            async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
                assert resp.status == 201
            assert await names(running, name="khoi") == ["Nguyễn Văn Khôi"]
            with sqlite3.connect(config.db_path) as conn:
                terms = [str(t) for (t,) in conn.execute("SELECT term FROM search_terms")]
                ids = [str(t) for (t,) in conn.execute("SELECT id_number FROM search_index")]
            conn.close()
            assert len(terms) == 3 and not {"nguyen", "van", "khoi"} & set(terms)
            assert ids and "079190123456" not in ids


class TestPagination:
    """Newest first, ``limit`` per page, ``next_cursor`` until the last page."""

    async def test_pages_cover_every_match_once(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as running:
            _, base, session = running
            made = []
            for i in range(7):
                body = valid_intake(ChuHoSo=f"Phạm Minh Tuấn {i}", SoGiayToChuHoSo=f"07919000010{i}")
                async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
                    made.append((await resp.json())["MaHoSo"])
            other = valid_intake(ChuHoSo="Võ Thị Sáu")
            async with session.post(f"{base}/api/v1/dossiers", json=other) as resp:
                assert resp.status == 201
            seen: list[str] = []
            cursor: str | None = None
            pages = 0
            while True:
                params: dict[str, Any] = {"name": "pham tuan", "limit": 3}
                if cursor:
                    params["cursor"] = cursor
                status, body = await search(running, **params)
                assert status == 200, body
                pages += 1
                seen += [d["MaHoSo"] for d in body["items"]]
                cursor = body["next_cursor"]
                if cursor is None:
                    break
                assert len(body["items"]) == 3
            assert pages == 3
            assert seen == list(reversed(made))  # newest first, each once, nothing else

    async def test_bad_parameters_are_400(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as running:
            cases: list[tuple[dict[str, Any], str]] = [
                ({"cursor": "not-a-cursor"}, "cursor"),
                ({"limit": 0}, "limit"),
                ({"status": 11}, "status"),
                ({"procedure": "khai sinh"}, "procedure"),
                ({"from": "23/11/2026"}, "from"),
                ({"to": "2026-02-30"}, "to"),
                ({"name": "  ...  "}, "name"),
                ({"ten": "an"}, "ten"),
            ]
            for params, field in cases:
                status, body = await search(running, **params)
                assert status == 400, (params, body)
                assert field in body["error"]["fields"], (params, body)


class TestAccess:
    """Clerks and operators search; other nodes, drills and read-only dashboards do not."""

    async def test_roles(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as running:
            node, base, _ = running
            url = f"{base}/api/v1/dossiers/search"
            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(url, params={"name": "an"}) as resp:
                    assert resp.status == 401, await resp.text()
                for role, expected in (
                    ("clerk", 200),
                    ("operator", 200),
                    ("peer", 403),
                    ("drill", 403),
                    ("read-only", 403),
                ):
                    token = await node.auth.create_token([role], name=role)
                    headers = {"Authorization": f"Bearer {token}"}
                    async with anonymous.get(url, params={"name": "an"}, headers=headers) as resp:
                        assert resp.status == expected, (role, await resp.text())
                        if expected == 403:
                            assert (await resp.json())["error"]["code"] == "forbidden"
