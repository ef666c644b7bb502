"""Tamper-evident audit log: every change is chained in the same transaction; verify finds any tampering."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.audit import entry_hash
from node.cli import main
from tests.conftest import make_config, running_node, valid_intake

DOSSIERS = "/api/v1/dossiers"


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "wardsync.toml"
    path.write_text(
        f'[node]\nunit = "26743"\nagency_code = "000.00.17.H29"\nlisten = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def verify(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", "--config", str(config), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data" / "wardsync.sqlite3"


async def populate(tmp_path: Path, dossiers: int = 3) -> dict[str, Any]:
    """Accept a few dossiers, move the first into processing, fetch its receipt; the node then stops."""
    async with running_node(make_config(tmp_path)) as (_node, base, session):
        codes = []
        for i in range(dossiers):
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake(ChuHoSo=f"Nguyễn Văn {i}")) as r:
                assert r.status == 201
                codes.append((await r.json())["MaHoSo"])
        async with session.post(
            f"{base}{DOSSIERS}/{codes[0]}/steps", json={"TrangThai": 4, "NguoiXuLy": "Phạm Thu Hà"}
        ) as r:
            assert r.status == 201
        async with session.get(f"{base}{DOSSIERS}/{codes[-1]}/signed-receipt") as r:
            receipt = await r.json()
        async with session.get(f"{base}/api/v1/status") as r:
            status = await r.json()
    return {"codes": codes, "receipt": receipt, "status": status}


def rows(store: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT seq, kind, code, digest, prev_hash, hash FROM audit_log ORDER BY seq").fetchall()


def tamper(store: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    conn = sqlite3.connect(store)
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


class TestChain:
    """Each committed change has one chained entry; an untouched log verifies."""

    async def test_every_change_is_logged_and_the_chain_verifies(
        self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Three intakes and a step give four entries, chained from the genesis hash; verify exits 0."""
        done = await populate(tmp_path)
        entries = rows(store)
        assert [(e[0], e[1]) for e in entries] == [(1, "intake"), (2, "intake"), (3, "intake"), (4, "step")]
        assert entries[0][4] == "0" * 64
        assert all(entries[i][4] == entries[i - 1][5] for i in range(1, len(entries)))
        with sqlite3.connect(store) as conn:
            digests = dict(conn.execute("SELECT code, digest FROM dossiers").fetchall())
            journal = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        assert journal == len(entries)
        assert entries[3][2] == done["codes"][0] and entries[3][3] == digests[done["codes"][0]]
        # The status anchors the head outside the store.
        assert done["status"]["audit"]["anchor"] == f"4:{entries[3][5]}"
        code, out = verify(capsys, write_config(tmp_path), "--anchor", done["status"]["audit"]["anchor"])
        assert code == 0, out
        assert "audit log ok: 4 entries" in out


class TestTampering:
    """verify exits non-zero naming the first altered, removed or reordered entry."""

    async def test_altered_entry(self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Changing one entry's kind breaks its hash: entry 2 is named."""
        await populate(tmp_path)
        tamper(store, ("UPDATE audit_log SET kind = 'merge:city' WHERE seq = 2", ()))
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 1
        assert "entry 2" in out and "altered" in out

    async def test_removed_entry(self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Deleting entry 2 leaves a gap: entry 2 is named as missing."""
        await populate(tmp_path)
        tamper(store, ("DELETE FROM audit_log WHERE seq = 2", ()))
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 1
        assert "entry 2 is missing" in out

    async def test_swapped_entries(self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Swapping the contents of entries 2 and 3 is found at entry 2."""
        await populate(tmp_path)
        cols = "at, kind, code, change, digest, prev_hash, hash"
        with sqlite3.connect(store) as conn:
            two = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 2").fetchone()
            three = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 3").fetchone()
        sets = ", ".join(f"{c} = ?" for c in cols.split(", "))
        tamper(
            store,
            (f"UPDATE audit_log SET {sets} WHERE seq = 2", three),
            (f"UPDATE audit_log SET {sets} WHERE seq = 3", two),
        )
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 1
        assert "entry 2" in out

    async def test_truncated_tail(self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Removing the last entry leaves a valid chain, but the dossier it recorded no longer matches."""
        await populate(tmp_path)
        tamper(store, ("DELETE FROM audit_log WHERE seq = 4", ()))
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 1
        assert "entry 4" in out

    async def test_consistently_rewritten_chain_is_caught_by_a_receipt(
        self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Whoever rewrites every hash after an edit still cannot match the anchor a citizen holds."""
        done = await populate(tmp_path)
        receipt_file = tmp_path / "receipt.json"
        receipt_file.write_text(json.dumps(done["receipt"]), encoding="utf-8")
        # Rewrite entry 1 and re-chain everything after it.
        with sqlite3.connect(store) as conn:
            entries = conn.execute("SELECT seq, at, kind, code, change, digest FROM audit_log ORDER BY seq").fetchall()
            prev = "0" * 64
            for seq, at, kind, code_, change, digest in entries:
                if seq == 1:
                    change = hashlib.sha256(b"forged").hexdigest()
                content = {
                    "seq": seq,
                    "at": at,
                    "kind": kind,
                    "code": code_,
                    "change": change,
                    "digest": digest,
                    "prev_hash": prev,
                }
                prev = entry_hash(content)
                conn.execute(
                    "UPDATE audit_log SET change = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (change, content["prev_hash"], prev, seq),
                )
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 0, out  # the chain alone is consistent again...
        code, out = verify(capsys, write_config(tmp_path), "--receipt", str(receipt_file))
        assert code == 1  # ...but not with the receipt's anchor
        assert f"entry {done['receipt']['audit_seq']}" in out

    async def test_dossier_altered_outside_the_node(
        self, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A dossier row whose digest no audited change produced is reported."""
        done = await populate(tmp_path)
        tamper(store, ("UPDATE dossiers SET digest = ? WHERE code = ?", ("f" * 64, done["codes"][1])))
        code, out = verify(capsys, write_config(tmp_path))
        assert code == 1
        assert done["codes"][1] in out


class TestUnwritableLog:
    """When the log cannot be written, intake is refused with a 503 that says why, and nothing is stored."""

    async def test_intake_refused_while_the_log_is_unwritable(self, tmp_path: Path, store: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_node, base, session):
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake()) as r:
                assert r.status == 201
            # Another process makes the log refuse appends (as a full or read-only log would).
            tamper(
                store,
                (
                    "CREATE TRIGGER audit_blocked BEFORE INSERT ON audit_log"
                    " BEGIN SELECT RAISE(ABORT, 'audit log is read-only'); END",
                    (),
                ),
            )
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake(ChuHoSo="Lê Văn Tám")) as r:
                assert r.status == 503
                error = (await r.json())["error"]
            assert "audit log cannot be written" in error["message"]
            assert "read-only" in error["message"]
            with sqlite3.connect(store) as conn:
                assert conn.execute("SELECT count(*) FROM dossiers").fetchone()[0] == 1
                assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 1
                assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 1
            tamper(store, ("DROP TRIGGER audit_blocked", ()))
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake(ChuHoSo="Lê Văn Tám")) as r:
                assert r.status == 201
                # The code the refused intake would have had is not skipped.
                assert (await r.json())["MaHoSo"].endswith("-0002")
        assert [e[0] for e in rows(store)] == [1, 2]
