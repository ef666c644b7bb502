"""Backup under load, verification, restore: refusal of a live store, and catching up with the upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from node.app import serve
from node.ops.backup import BackupError, backup, restore_files, verify
from node.ops.recover import after_restore
from tests.conftest import AGENCY, make_config, running_node, valid_intake
from tests.opshelp import accept, cli, digests, load, wait_synced, write_config
from tests.upstreams import running_upstreams


class TestBackupUnderLoad:
    async def test_snapshot_while_accepting_then_restore_and_compare(self, tmp_path: Path) -> None:
        """A backup taken while desks keep posting holds every dossier acknowledged before it, exactly."""
        config = make_config(tmp_path)
        dest = tmp_path / "backup"
        acked: list[tuple[str, str]] = []
        stop = asyncio.Event()
        async with running_node(config) as (node, base, session):

            async def desk(w: int) -> None:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    body = valid_intake(TrichYeuHoSo=f"tải {w}-{i}")
                    async with session.post(f"{base}/api/v1/dossiers", json=body) as r:
                        assert r.status == 201, await r.text()
                        rec = await r.json()
                        acked.append((rec["MaHoSo"], rec["digest"]))

            async with asyncio.TaskGroup() as tg:
                for w in range(4):
                    tg.create_task(desk(w))
                while len(acked) < 40:  # noqa: ASYNC110 - polling a list the desks append to
                    await asyncio.sleep(0.01)
                before = list(acked)
                manifest = await asyncio.to_thread(backup, config, dest)
                during = len(acked) - len(before)
                # The desks go on after the backup: wait for a few more answers, then stop them.
                target = len(acked) + 20
                while len(acked) < target:  # noqa: ASYNC110 - polling a list the desks append to
                    await asyncio.sleep(0.01)
                stop.set()
            live = await digests(node)
        assert manifest == verify(dest)
        with contextlib.closing(sqlite3.connect(dest / "wardsync.sqlite3")) as conn:
            copied = {c: d for c, d in conn.execute("SELECT code, digest FROM dossiers")}
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file
        assert manifest["counts"]["dossiers"] == len(copied)
        assert all(copied.get(code) == digest for code, digest in before), "an acknowledged dossier is missing"
        assert len(copied) >= len(before)
        assert len(live) > len(copied), f"the node accepted nothing after the backup ({during} during it)"
        assert all(live[c] == d for c, d in copied.items())

        # Restore into another server's data directory and compare what it serves.
        other = make_config(tmp_path / "other")
        restored = restore_files(other, dest, force=False)
        assert restored.replaced is None
        async with running_node(other) as (node2, base2, session2):
            assert await digests(node2) == copied
            code = sorted(copied)[0]
            async with session2.get(f"{base2}/api/v1/dossiers/{code}") as r:
                assert r.status == 200
                assert (await r.json())["digest"] == copied[code]
            assert node2.service.client_id != int(manifest["client_id"])  # a restored store writes under a new id


class TestVerify:
    async def test_damaged_copy_is_detected(self, tmp_path: Path) -> None:
        """A flipped byte in a backup is caught by its manifest before anything is restored."""
        config = make_config(tmp_path)
        async with running_node(config) as (_, base, session):
            await accept(session, base, 3)
        dest = tmp_path / "b"
        backup(config, dest)
        db = dest / "wardsync.sqlite3"
        data = bytearray(db.read_bytes())
        data[len(data) // 2] ^= 0xFF
        db.write_bytes(bytes(data))
        with pytest.raises(BackupError, match="sha256"):
            verify(dest)
        with pytest.raises(BackupError, match="sha256"):
            restore_files(make_config(tmp_path / "x"), dest, force=True)

    async def test_refuses_to_overwrite_a_backup(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        async with running_node(config):
            pass
        backup(config, tmp_path / "b")
        with pytest.raises(BackupError, match="already holds a backup"):
            backup(config, tmp_path / "b")


class TestRestoreRefusals:
    async def test_live_store_refused_existing_store_needs_force(self, tmp_path: Path) -> None:
        """restore refuses while a node serves the store, and replaces a stopped one only with --force."""
        path = write_config(tmp_path)
        config = load(path)
        async with running_node(config) as (_, base, session):
            await accept(session, base, 2)
        assert cli("backup", "--config", str(path), "--to", str(tmp_path / "b"), cwd=tmp_path).returncode == 0

        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop, announce=lambda _: None))
        try:
            for _ in range(200):
                if (config.data_path / "wardsync.lock").exists() and config.db_path.with_name(
                    "wardsync.sqlite3-wal"
                ).exists():
                    break
                await asyncio.sleep(0.02)
            done = await asyncio.to_thread(
                cli, "restore", "--config", str(path), "--from", str(tmp_path / "b"), "--force", cwd=tmp_path
            )
            assert done.returncode == 1, done.stdout
            assert "in use by wardsync serve" in done.stderr and "stop it first" in done.stderr
        finally:
            stop.set()
            await task

        done = cli("restore", "--config", str(path), "--from", str(tmp_path / "b"), cwd=tmp_path)
        assert done.returncode == 1 and "--force" in done.stderr
        done = cli("restore", "--config", str(path), "--from", str(tmp_path / "b"), "--force", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        kept = list(config.data_path.glob("replaced-*/wardsync.sqlite3"))
        assert len(kept) == 1  # the replaced store is set aside, never deleted


class TestRestoreCatchesUp:
    async def test_no_resend_and_no_code_reuse_after_restoring_an_older_backup(self, tmp_path: Path) -> None:
        """Dossiers pushed after the backup are not pushed again, and new codes continue past them."""
        async with running_upstreams(tmp_path / "ups") as ups:
            config = load(write_config(tmp_path, ups))
            await ups.fault("national", mode="down")
            async with running_node(config) as (node, base, session):
                first = await accept(session, base, 5, "a")
                await asyncio.to_thread(backup, config, tmp_path / "b")  # the portal has none of them yet
                await ups.clear("national")
                await accept(session, base, 3, "b")
                code1 = first[0]["MaHoSo"]
                step = {"TrangThai": 4, "NguoiXuLy": "Lê Văn Tám", "NoiDungXuLy": "Thụ lý",
                        "ThoiDiemXuLy": "20300101080000"}
                async with session.post(f"{base}/api/v1/dossiers/{code1}/steps", json=step) as r:
                    assert r.status == 201
                await wait_synced(node)
                before = await digests(node)
            stats = {t: await ups.stats(t) for t in ("national", "city")}

            restored = restore_files(config, tmp_path / "b", force=True)
            assert restored.replaced is not None
            report = await after_restore(config)
            assert report["complete"] and report["dossiers"] == 8

            async with running_node(config) as (node, base, session):
                assert await digests(node) == before  # the three later dossiers and the step came back
                for rep in node.replicators.values():
                    await rep.run_once()
                    lag = await rep.lag(node.service.journal_head)
                    assert lag["pending"] == 0, lag
                (new,) = await accept(session, base, 1, "c")
                day, n = new["MaHoSo"].rsplit("-", 2)[1:]
                used = {c for c in before if c.startswith(f"{AGENCY}-{day}-")}
                # Past a block left unused: a dossier accepted after the backup and never pushed may hold a code
                # just past the highest one the upstreams know.
                reserved = report["reserved"]
                assert reserved["first"] == f"{AGENCY}-{day}-{len(used) + 1:04d}"
                assert new["MaHoSo"] not in before and int(n) == len(used) + reserved["count"] + 1
                await wait_synced(node)
            after = {t: await ups.stats(t) for t in ("national", "city")}
        # Only the new dossier travelled: nothing the upstreams held was sent again.
        assert after["national"]["received"] - stats["national"]["received"] == 1
        assert after["national"]["resends"] == stats["national"]["resends"]
        assert after["city"]["received"] - stats["city"]["received"] == 1
        assert after["national"]["duplicates"] == after["city"]["duplicates"] == 0
        assert json.dumps(report)  # the report is plain JSON for --json
