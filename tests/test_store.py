"""The SQLite store: migrations, durability settings, and a full disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from node.app import Node
from node.config import Config, ConfigError
from node.migrations import LATEST
from node.store import SchemaTooNew, Store, migrate
from tests.conftest import make_config, running_node, valid_intake

DOSSIERS = "/api/v1/dossiers"
STEP = {"TrangThai": 4, "NguoiXuLy": "Trần Văn Bình"}

# A row that is valid at each schema version, keyed by the version that introduced its table. A new
# migration needs an entry here, so that the upgrade from the version before it is tested with data.
_DOSSIER_ROW = {
    "code": "000.00.17.H29-250701-0001",
    "receiving_unit": "26743",
    "competent_unit": "26743",
    "status": 2,
    "state": b"\x00\x00",
    "record": '{"MaHoSo":"000.00.17.H29-250701-0001","TrangThaiHoSo":2}',
    "digest": "0" * 64,
    "conflicts": "[]",
    "created_at": "2025-07-01T01:00:00.000Z",
    "updated_at": "2025-07-01T01:00:00.000Z",
    "change_seq": 1,
}
SAMPLE_ROWS: dict[int, list[tuple[str, dict[str, Any]]]] = {
    1: [
        ("meta", {"key": "client_id", "value": "123456789"}),
        ("dossiers", _DOSSIER_ROW),
        (
            "journal",
            {"seq": 1, "code": _DOSSIER_ROW["code"], '"update"': b"\x01\x02", "at": "2025-07-01T01:00:00.000Z"},
        ),
        ("day_counters", {"agency": "000.00.17.H29", "day": "250701", "last": 1}),
    ],
    2: [
        (
            "idempotency",
            {
                "scope": "POST /api/v1/dossiers",
                "key": "k",
                "request_hash": "h",
                "status": 201,
                "body": "{}",
                "created_at": "2025-07-01T01:00:00.000Z",
            },
        ),
    ],
    3: [
        ("cursors", {"target": "national", "seq": 1}),
        (
            "replication",
            {
                "target": "national",
                "code": _DOSSIER_ROW["code"],
                "state": "synced",
                "updated_at": "2025-07-01T01:00:00.000Z",
            },
        ),
    ],
    4: [
        (
            "failover_events",
            {"at": "2025-07-01T01:00:00.000Z", "kind": "switch", "from_source": "national", "to_source": "city",
             "reason": "primary national is down"},
        ),
    ],
    5: [
        ("pull_cursors", {"target": "city", "seq": 3}),
        ("portal_base", {"code": _DOSSIER_ROW["code"], "record": "{}"}),
    ],
    6: [
        (
            "tokens",
            {"id": 1, "name": "desk-1", "roles": "clerk", "hash": "3" * 64, "created_at": "2025-07-01T01:00:00.000Z"},
        ),
    ],
    7: [
        (
            "audit_log",
            {
                "seq": 1,
                "at": "2025-07-01T01:00:00.000Z",
                "kind": "intake",
                "code": _DOSSIER_ROW["code"],
                "change": "1" * 64,
                "digest": "0" * 64,
                "prev_hash": "0" * 64,
                "hash": "2" * 64,
            },
        ),
    ],
    8: [
        (
            "document_fetches",
            {
                "sha256": "4" * 64,
                "code": _DOSSIER_ROW["code"],
                "url": "http://127.0.0.1:1/api/v1/dossiers/x/documents/" + "4" * 64,
                "size": 10,
                "created_at": "2025-07-01T01:00:00.000Z",
            },
        ),
    ],
    9: [
        (
            "search_index",
            {
                "code": _DOSSIER_ROW["code"],
                "id_number": "079190001234",
                "procedure": "1.001193",
                "received": "20250701080000",
            },
        ),
        ("search_terms", {"term": "nguyen", "code": _DOSSIER_ROW["code"]}),
    ],
}


async def user_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def schema(conn: aiosqlite.Connection) -> list[tuple[str, str, str]]:
    async with conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
    ) as cur:
        return [(r[0], r[1], " ".join(str(r[2]).split())) for r in await cur.fetchall()]


async def insert(conn: aiosqlite.Connection, table: str, row: dict[str, Any]) -> None:
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    await conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))


async def rows_of(conn: aiosqlite.Connection, table: str, row: dict[str, Any]) -> list[tuple[Any, ...]]:
    async with conn.execute(f"SELECT {', '.join(row)} FROM {table}") as cur:
        return [tuple(r) for r in await cur.fetchall()]


class TestMigrations:
    """The schema moves forward from any released version without losing rows."""

    async def test_empty_file_reaches_latest(self, tmp_path: Path) -> None:
        """An empty file is migrated to LATEST, and migrating again is a no-op."""
        async with aiosqlite.connect(tmp_path / "s.sqlite3", isolation_level=None) as conn:
            assert await migrate(conn) == 0
            assert await user_version(conn) == LATEST
            tables = {name for kind, name, _ in await schema(conn) if kind == "table"}
            assert {"meta", "dossiers", "journal", "day_counters", "idempotency"} <= tables
            before = await schema(conn)
            assert await migrate(conn) == LATEST
            assert await schema(conn) == before

    @pytest.mark.parametrize("version", range(1, LATEST))
    async def test_upgrade_keeps_rows(self, tmp_path: Path, version: int) -> None:
        """A store at an earlier version keeps its rows and ends with the same schema as a new store."""
        samples = [item for v in range(1, version + 1) for item in SAMPLE_ROWS[v]]
        async with aiosqlite.connect(tmp_path / "old.sqlite3", isolation_level=None) as conn:
            await migrate(conn, target=version)
            assert await user_version(conn) == version
            for table, row in samples:
                await insert(conn, table, row)
            assert await migrate(conn) == version
            assert await user_version(conn) == LATEST
            for table, row in samples:
                assert await rows_of(conn, table, row) == [tuple(row.values())]
            upgraded = await schema(conn)
        async with aiosqlite.connect(tmp_path / "new.sqlite3", isolation_level=None) as conn:
            await migrate(conn)
            assert upgraded == await schema(conn)

    async def test_every_version_has_a_sample_row(self) -> None:
        """Each migration has a sample row, so the upgrade test above covers it."""
        assert set(range(1, LATEST + 1)) <= set(SAMPLE_ROWS)

    async def test_newer_schema_is_refused(self, config: Config) -> None:
        """A store written by a newer release is refused and left untouched."""
        config.db_path.parent.mkdir(parents=True)
        with sqlite3.connect(config.db_path) as conn:
            conn.execute(f"PRAGMA user_version={LATEST + 1}")
        conn.close()
        with pytest.raises(SchemaTooNew):
            await Store(config.db_path).open()
        with pytest.raises(SchemaTooNew):
            async with Node(config):
                pass
        with sqlite3.connect(config.db_path) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST + 1
            assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        conn.close()


class TestDurability:
    """The store is set up so that an acknowledged commit survives a power cut."""

    async def test_wal_and_synchronous_full(self, config: Config) -> None:
        """Both connections run WAL with synchronous=FULL."""
        async with running_node(config) as (node, _, _):
            writer = await node.store.on_writer(
                lambda c: (
                    c.execute("PRAGMA journal_mode").fetchone()[0],
                    c.execute("PRAGMA synchronous").fetchone()[0],
                )
            )
            assert writer == ("wal", 2)
            async with node.store.reader.execute("PRAGMA journal_mode") as cur:
                assert (await cur.fetchone())[0] == "wal"
            async with node.store.reader.execute("PRAGMA synchronous") as cur:
                assert (await cur.fetchone())[0] == 2


class TestPageCache:
    """[node] sqlite_cache_kib sizes the page cache of both connections; bad values are refused."""

    async def test_both_connections_take_the_setting(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, sqlite_cache_kib=384)
        async with running_node(config) as (node, _, _):
            writer = await node.store.on_writer(lambda c: c.execute("PRAGMA cache_size").fetchone()[0])
            async with node.store.reader.execute("PRAGMA cache_size") as cur:
                reader = (await cur.fetchone())[0]
        assert (writer, reader) == (-384, -384)

    @pytest.mark.parametrize("value", [0, 63, 2**21])
    def test_out_of_range_is_refused(self, tmp_path: Path, value: int) -> None:
        with pytest.raises(ConfigError, match=r"\[node\] sqlite_cache_kib: must be between 64 and 1048576"):
            make_config(tmp_path, sqlite_cache_kib=value)


async def _post(session: Any, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


class TestDiskFull:
    """A full disk refuses writes cleanly and the node recovers when space returns."""

    async def test_full_disk_answers_507_and_recovers(self, config: Config) -> None:
        """Writes get 507 while full; nothing is lost, corrupted, reused or skipped; writes resume after."""
        # Large text fields so every intake needs fresh pages.
        body = valid_intake(ThongTinKhac="Ghi chú " * 240, TrichYeuHoSo="Trích yếu " * 90)
        async with running_node(config) as (node, base, session):
            url = base + DOSSIERS
            stored: dict[str, Any] = {}
            for _ in range(3):
                status, reply = await _post(session, url, body)
                assert status == 201, reply
                stored[reply["MaHoSo"]] = reply
            first = next(iter(stored))

            pages = await node.store.on_writer(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await node.store.on_writer(lambda c: c.execute(f"PRAGMA max_page_count={pages}"))

            refused = 0
            for _ in range(50):
                status, reply = await _post(session, url, body)
                if status == 201:  # still room in a partly used page
                    stored[reply["MaHoSo"]] = reply
                    continue
                assert status == 507, reply
                assert reply["error"]["code"] == "insufficient_storage"
                refused += 1
                if refused == 3:
                    break
            assert refused == 3, "the intakes never hit the page limit"
            status, reply = await _post(session, f"{url}/{first}/steps", STEP)
            assert (status, reply["error"]["code"]) == (507, "insufficient_storage")

            async with session.get(base + "/readyz") as resp:
                assert resp.status == 200
            for code, reply in stored.items():
                async with session.get(f"{url}/{code}") as resp:
                    assert resp.status == 200
                    got = await resp.json()
                got.pop("replication", None)
                got.pop("TinhTrangHan", None), got.pop("NgayHenTraHieuLuc", None)  # computed on reading
                assert got == reply
            assert await node.store.integrity_check() == "ok"

            await node.store.on_writer(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
            status, after = await _post(session, url, body)
            assert status == 201, after
            status, stepped = await _post(session, f"{url}/{first}/steps", STEP)
            assert status == 201, stepped
            assert stepped["TrangThaiHoSo"] == 4
            assert [s["TrangThai"] for s in stepped["QuaTrinhXuLy"]] == [2, 4]

            codes = [row[0] for row in await node.store.fetchall("SELECT code FROM dossiers ORDER BY id")]
            assert codes == [*stored, after["MaHoSo"]]
            assert [int(c.rsplit("-", 1)[1]) for c in codes] == list(range(1, len(codes) + 1))
            assert await node.store.integrity_check() == "ok"
        # And the store reopens cleanly with everything in it.
        async with running_node(config) as (node, base, session):
            assert await node.store.integrity_check() == "ok"
            row = await node.store.fetchone("SELECT count(*) FROM dossiers")
            assert row is not None and row[0] == len(codes)


class TestConcurrentDiskFull:
    """Concurrent writers hit a full disk: every 201 is stored, no code is ever given twice."""

    async def test_concurrent_intakes_against_a_filling_disk(self, config: Config) -> None:
        body = valid_intake(ThongTinKhac="Ghi chú " * 240, TrichYeuHoSo="Trích yếu " * 90)
        async with running_node(config) as (node, base, session):
            url = base + DOSSIERS
            for _ in range(3):
                status, _reply = await _post(session, url, body)
                assert status == 201
            pages = await node.store.on_writer(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await node.store.on_writer(lambda c: c.execute(f"PRAGMA max_page_count={pages + 6}"))
            replies = await asyncio.gather(*(_post(session, url, body) for _ in range(80)))
            statuses = {s for s, _ in replies}
            assert statuses <= {201, 507} and 507 in statuses, statuses
            accepted = [r["MaHoSo"] for s, r in replies if s == 201]
            await node.store.on_writer(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
            later = await asyncio.gather(*(_post(session, url, body) for _ in range(20)))
            assert {s for s, _ in later} == {201}
            stored = [r[0] for r in await node.store.fetchall("SELECT code FROM dossiers")]
            assert len(stored) == len(set(stored))
            assert set(accepted) | {r["MaHoSo"] for _, r in later} <= set(stored)
            assert await node.store.integrity_check() == "ok"
