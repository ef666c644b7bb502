"""Write tests/fixtures/schemas/vN.sqlite3: a small store at schema version N, as a release at N wrote it.

Each fixture is an SQLite file whose schema is migrations 1..N (nothing later), holding representative rows
of every table that existed at N: three dossiers taken at the desk on 1 July 2025 (real Y Docs and records,
one with a step, one with an idempotency key), their journal, the day counter, replication and cursor rows
as a node with both upstreams keeps them, a failover event, portal bases, an API token, the audit log and
a pending document fetch. The rows are written by the node running this script (the fixtures of versions
1 to 8 by the release at version 9) and only the tables of version N are copied; a committed fixture is
kept as it is. ``manifest.json`` records what the fixtures hold (one entry per version), for
tests/test_upgrade.py to compare against after the upgrade.

Run it when a migration is added, for the version that was the latest before it (the files of released
versions never change):

    .venv/bin/python scripts/make_schema_fixture.py 9
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from node.app import Node  # noqa: E402
from node.auth import ROLES, token_hash  # noqa: E402
from node.clock import Clock  # noqa: E402
from node.config import load_config  # noqa: E402
from node.migrations import LATEST, MIGRATIONS  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "schemas"
UNIT = "26743"
AGENCY = "000.00.17.H29"
# When the fixture's dossiers were taken: 08:00 on 1 July 2025 in Ho Chi Minh City.
TAKEN_AT = datetime(2025, 7, 1, 1, 0, tzinfo=UTC)
# A token stored in every fixture from version 6 on; only its hash is in the file, as the node keeps it.
TOKEN = "wst_schema-fixture-token-not-a-secret-0000000000"
META_KEYS = ("client_id", "hlc")  # what the node kept in meta before later releases added keys
PAGE_SIZE = 512  # the smallest page SQLite allows: a file of twenty tables stays at tens of KiB

CITIZENS = [
    ("Nguyễn Thị Lan", "079190001234", "Đăng ký khai sinh cho con"),
    ("Trần Văn Bình", "079085004321", "Đăng ký khai sinh cho cháu"),
    ("Lê Thị Hoa", "079192007777", "Đăng ký khai sinh"),
]


def intake_body(name: str, id_number: str, summary: str) -> dict[str, Any]:
    return {
        "MaTTHC": "1.001193",
        "TenTTHC": "Thủ tục đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": name,
        "SoGiayToChuHoSo": id_number,
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": summary,
        "SoDienThoai": "0912345678",
        "NgayHenTra": "20250705170000",
    }


async def take_dossiers(data_dir: Path) -> Path:
    """Run a node (no upstreams) on 1 July 2025, take the dossiers, and add the rows upstreams would leave."""
    config = load_config(
        env={}, overrides={"node": {"unit": UNIT, "agency_code": AGENCY, "listen": "127.0.0.1:0",
                                    "data_dir": str(data_dir)}}
    )
    clock = Clock(TAKEN_AT - datetime.now(UTC))
    async with Node(config, clock=clock) as node:
        server = TestServer(node.app, host="127.0.0.1")
        await server.start_server()
        try:
            base = str(server.make_url("")).rstrip("/")
            token = await node.auth.create_token(ROLES, name="fixture-writer")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
                codes = []
                for i, citizen in enumerate(CITIZENS):
                    headers = {"Idempotency-Key": "desk-1-0001"} if i == 0 else {}
                    async with http.post(f"{base}/api/v1/dossiers", json=intake_body(*citizen), headers=headers) as r:
                        assert r.status == 201, await r.text()
                        codes.append((await r.json())["MaHoSo"])
                step = {"TrangThai": 4, "NguoiXuLy": "Phạm Văn Tâm", "NoiDungXuLy": "Thụ lý hồ sơ",
                        "ThoiDiemXuLy": "20250701090000"}
                async with http.post(f"{base}/api/v1/dossiers/{codes[0]}/steps", json=step) as r:
                    assert r.status == 201, await r.text()
        finally:
            await server.close()

        at = "2025-07-01T02:00:00.000Z"

        def upstream_rows(conn: sqlite3.Connection) -> None:
            # What a node with both upstreams keeps once they acknowledged everything.
            head = conn.execute("SELECT max(seq) FROM journal").fetchone()[0]
            rows = conn.execute("SELECT code, digest, record FROM dossiers ORDER BY id").fetchall()
            for target in ("national", "city"):
                conn.execute("INSERT INTO cursors (target, seq) VALUES (?, ?)", (target, head))
                conn.execute("INSERT INTO pull_cursors (target, seq) VALUES (?, ?)", (target, 3))
                conn.executemany(
                    "INSERT INTO replication (target, code, state, digest, acked_digest, ack, attempts, last_error,"
                    " next_at, updated_at) VALUES (?, ?, 'synced', ?, ?, NULL, 0, NULL, 0, ?)",
                    [(target, code, digest, digest, at) for code, digest, _ in rows],
                )
            conn.executemany(
                "INSERT INTO portal_base (code, record) VALUES (?, ?)", [(code, rec) for code, _, rec in rows]
            )
            conn.execute(
                "INSERT INTO failover_events (at, kind, from_source, to_source, reason)"
                " VALUES (?, 'switch', 'national', 'city', 'primary national is down')",
                (at,),
            )
            # A document another unit stores, still to be fetched (its server is gone: the fetch keeps failing).
            sha = "4" * 64
            conn.execute(
                "INSERT INTO document_fetches (sha256, code, url, size, attempts, last_error, next_at, created_at)"
                " VALUES (?, ?, ?, 10, 1, 'connection refused', 0, ?)",
                (sha, rows[1][0], f"http://127.0.0.1:9/api/v1/dossiers/{rows[1][0]}/documents/{sha}", at),
            )
            conn.execute("DELETE FROM tokens")
            conn.execute(
                "INSERT INTO tokens (id, name, roles, hash, created_at) VALUES (1, 'desk-1', ?, ?, ?)",
                (",".join(ROLES), token_hash(TOKEN), at),
            )

        await node.store.write(upstream_rows)
    return config.db_path


def statements(sql: str) -> list[str]:
    """A migration's statements, split as node.store.migrate splits them."""
    return [s.strip() for s in sql.split(";") if s.strip()]


def write_fixture(source: Path, version: int, out: Path) -> dict[str, Any]:
    if out.exists():
        out.unlink()
    with contextlib.closing(sqlite3.connect(out, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        for v, sql in MIGRATIONS:
            if v > version:
                break
            conn.execute("BEGIN IMMEDIATE")
            for statement in statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={v}")
            conn.execute("COMMIT")
        tables = [
            str(r[0])
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        conn.execute("ATTACH DATABASE ? AS src", (f"file:{source}?mode=ro",))
        counts: dict[str, int] = {}
        conn.execute("BEGIN IMMEDIATE")
        for table in tables:
            if table == "audit_origin":  # written by its migration, as in a store created at that version
                counts[table] = 1
                continue
            cols = ", ".join(f'"{r[1]}"' for r in conn.execute(f'PRAGMA main.table_info("{table}")'))
            where = f" WHERE key IN ({', '.join(repr(k) for k in META_KEYS)})" if table == "meta" else ""
            conn.execute(f'INSERT INTO main."{table}" ({cols}) SELECT {cols} FROM src."{table}"{where}')
            counts[table] = int(conn.execute(f'SELECT count(*) FROM main."{table}"').fetchone()[0])
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE src")
        conn.execute("VACUUM")
        # As a node leaves its store: write-ahead logging on, every transaction checkpointed into the file.
        conn.execute("PRAGMA journal_mode=WAL")
    assert not out.with_name(out.name + "-wal").exists()
    return counts


def describe(source: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as conn:
        dossiers = {str(c): str(d) for c, d in conn.execute("SELECT code, digest FROM dossiers ORDER BY code")}
        stepped = [str(c) for (c,) in conn.execute("SELECT code FROM dossiers WHERE status = 4")]
        return {
            "unit": UNIT,
            "agency": AGENCY,
            "client_id": int(conn.execute("SELECT value FROM meta WHERE key = 'client_id'").fetchone()[0]),
            "day_counters": {str(d): int(n) for d, n in conn.execute("SELECT day, last FROM day_counters")},
            "dossiers": dossiers,
            "stepped": stepped,
            "citizens": [{"ChuHoSo": n, "SoGiayToChuHoSo": i} for n, i, _ in CITIZENS],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", type=int, help=f"schema versions to write (default 1..{LATEST - 1})")
    parser.add_argument("--out", type=Path, default=OUT, help="directory of the fixtures")
    args = parser.parse_args(argv)
    versions = args.versions or list(range(1, LATEST))
    bad = [v for v in versions if not 1 <= v <= LATEST]
    if bad:
        parser.error(f"versions must lie in 1..{LATEST}: {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    # One entry per fixture: writing one version leaves the others' files and entries as they were.
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    entries: dict[str, Any] = dict(manifest.get("versions", {}))
    with tempfile.TemporaryDirectory(prefix="schema-fixture-") as tmp:
        source = asyncio.run(take_dossiers(Path(tmp) / "data"))
        described = describe(source)
        for version in versions:
            path = args.out / f"v{version}.sqlite3"
            entries[str(version)] = {**described, "tables": write_fixture(source, version, path)}
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            print(f"wrote {shown} ({path.stat().st_size} bytes, schema version {version})")
    manifest = {"token": TOKEN, "versions": dict(sorted(entries.items(), key=lambda kv: int(kv[0])))}
    manifest_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
