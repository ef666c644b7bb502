"""Upgrades: the current node opens a store written at every earlier schema version (kept as files under
tests/fixtures/schemas/, written by scripts/make_schema_fixture.py), and refuses one newer than it knows.

tests/test_store.py checks each migration against rows inserted in code; here the stores are files as a
node at that version left them, opened the way an operator upgrades: the new release started on the old
data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.clock import Clock
from node.migrations import LATEST, MIGRATIONS
from tests.conftest import running_node, valid_intake
from tests.opshelp import cli, load, write_config

FIXTURES = Path(__file__).parent / "fixtures" / "schemas"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
RELEASED = range(1, LATEST)
# The fixtures' dossiers were taken on 1 July 2025; the node runs on that day so its counter is the one they used.
THAT_DAY = datetime(2025, 7, 1, 3, 0, tzinfo=UTC)


def schema_of(db: Path) -> list[tuple[str, str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        ).fetchall()
    return [(str(t), str(n), " ".join(str(s).split())) for t, n, s in rows]


def fresh_schema(tmp: Path, version: int = LATEST) -> list[tuple[str, str, str]]:
    """The schema of a new store migrated to ``version`` with the migrations as they are in the code."""
    db = tmp / f"fresh-{version}.sqlite3"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for v, sql in MIGRATIONS:
            if v > version:
                break
            conn.execute("BEGIN")
            for statement in (s.strip() for s in sql.split(";")):
                if statement:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={v}")
            conn.execute("COMMIT")
    return schema_of(db)


def count(db: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


def user_version(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


class TestFixtures:
    def test_one_fixture_per_released_version_at_that_version(self, tmp_path: Path) -> None:
        """Every released schema has its file, at its version, with that version's tables and nothing later."""
        assert sorted(int(v) for v in MANIFEST["versions"]) == list(RELEASED)
        for version in RELEASED:
            kept = FIXTURES / f"v{version}.sqlite3"
            assert kept.stat().st_size < 64 * 1024, f"{kept.name} is not small"
            # Read a copy: opening a store leaves -wal and -shm files beside it, never in the repository.
            db = Path(shutil.copyfile(kept, tmp_path / kept.name))
            assert user_version(db) == version
            assert schema_of(db) == fresh_schema(tmp_path, version), f"{db.name} is not schema {version}"
            for table, n in MANIFEST["versions"][str(version)]["tables"].items():
                assert count(db, table) == n, (db.name, table)


class TestUpgradeFromReleasedStores:
    @pytest.mark.parametrize("version", RELEASED)
    async def test_node_starts_and_serves_the_old_rows(self, tmp_path: Path, version: int) -> None:
        entry = MANIFEST["versions"][str(version)]
        path = write_config(tmp_path)
        config = load(path)
        config.data_path.mkdir(parents=True)
        shutil.copyfile(FIXTURES / f"v{version}.sqlite3", config.db_path)
        before = {t: count(config.db_path, t) for t in entry["tables"]}
        stepped = set(entry["stepped"])

        async with running_node(config, clock=Clock(THAT_DAY - datetime.now(UTC))) as (node, base, session):
            assert node.service.client_id == entry["client_id"]  # the node keeps its identity
            async with session.get(f"{base}/api/v1/dossiers", params={"limit": "100"}) as r:
                assert r.status == 200
                listed = {d["MaHoSo"]: d["digest"] for d in (await r.json())["items"]}
            assert listed == entry["dossiers"]
            for code, digest in entry["dossiers"].items():
                async with session.get(f"{base}/api/v1/dossiers/{code}") as r:
                    assert r.status == 200
                    record = await r.json()
                assert record["digest"] == digest
                assert record["TrangThaiHoSo"] == (4 if code in stepped else 2)
                assert len(record.get("QuaTrinhXuLy") or []) == (2 if code in stepped else 1)
            # Dossiers stored before the search index existed are found (indexed at start).
            citizen = entry["citizens"][1]
            async with session.get(
                f"{base}/api/v1/dossiers/search", params={"id_number": citizen["SoGiayToChuHoSo"]}
            ) as r:
                assert r.status == 200, await r.text()
                found = [d["ChuHoSo"] for d in (await r.json())["items"]]
            assert found == [citizen["ChuHoSo"]]
            # The day counter goes on from where the old store left it, and the old Docs still take changes.
            body = valid_intake(ChuHoSo="Võ Thị Sáu")
            async with session.post(f"{base}/api/v1/dossiers", json=body) as r:
                assert r.status == 201, await r.text()
                new_code = (await r.json())["MaHoSo"]
            day, last = next(iter(entry["day_counters"].items()))
            assert new_code == f"{entry['agency']}-{day}-{last + 1:04d}"
            other = sorted(set(entry["dossiers"]) - stepped)[0]
            async with session.post(
                f"{base}/api/v1/dossiers/{other}/steps", json={"TrangThai": 4, "NguoiXuLy": "Trần Văn Bình"}
            ) as r:
                assert r.status == 201, await r.text()
            if version >= 6:  # a token issued before the upgrade still opens the API
                headers = {"Authorization": f"Bearer {MANIFEST['token']}"}
                async with aiohttp.ClientSession(headers=headers) as desk, desk.get(f"{base}/api/v1/dossiers") as r:
                    assert r.status == 200

        assert user_version(config.db_path) == LATEST
        assert schema_of(config.db_path) == fresh_schema(tmp_path)  # as if created by this release
        kept = ("meta", "failover_events", "portal_base", "pull_cursors", "cursors", "replication", "idempotency",
                "audit_origin")
        for table in kept:
            if table in before:
                assert count(config.db_path, table) >= before[table], table
        for table, grown_by in (("dossiers", 1), ("day_counters", 0), ("tokens", 1)):
            if table in before:
                assert count(config.db_path, table) == before[table] + grown_by, table
        # The audit chain holds: entries written at the old version (7 on), and the changes made since.
        done = await asyncio.to_thread(cli, "audit", "verify", "--config", str(path), cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr


class TestDowngradeRefused:
    async def test_serve_refuses_a_store_from_a_newer_release(self, tmp_path: Path) -> None:
        """A store at LATEST+1 is refused by ``wardsync serve`` with a message, exit 1, and left untouched."""
        path = write_config(tmp_path)
        config = load(path)
        config.data_path.mkdir(parents=True)
        shutil.copyfile(FIXTURES / f"v{LATEST - 1}.sqlite3", config.db_path)
        with contextlib.closing(sqlite3.connect(config.db_path, isolation_level=None)) as conn:
            for _, sql in MIGRATIONS[LATEST - 1 :]:
                for statement in (s.strip() for s in sql.split(";")):
                    if statement:
                        conn.execute(statement)
            # What a later release might have added; this one cannot know what it means.
            conn.execute("CREATE TABLE from_the_future (x INTEGER)")
            conn.execute(f"PRAGMA user_version={LATEST + 1}")
        digest = hashlib.sha256(config.db_path.read_bytes()).hexdigest()

        done = await asyncio.to_thread(cli, "serve", "--config", str(path), cwd=tmp_path, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "listening on" not in done.stdout
        assert (
            f"wardsync serve: the store is at schema version {LATEST + 1} but this release knows only up to"
            f" {LATEST}; downgrading would lose data: run the newer release or restore a backup"
        ) in done.stderr
        assert "Traceback" not in done.stderr
        assert hashlib.sha256(config.db_path.read_bytes()).hexdigest() == digest
        assert user_version(config.db_path) == LATEST + 1
