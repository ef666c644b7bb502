"""``wardsync import``: exports of the pre-merger units' systems loaded with their codes, mapped to the new unit."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import pty
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.cli import main
from node.commands.keys import ensure_keyring
from node.ops import lock
from node.registry import get_unit, units
from tests.conftest import UNIT, running_node
from tests.opshelp import cli, load, write_config
from tests.upstreams import Upstreams, running_upstreams

DATA = Path(__file__).parent / "data"
CSV_FILE = DATA / "legacy_phamngulao.csv"
JSON_FILE = DATA / "legacy_benthanh.json"
CSV_IMPORTED = {
    "000.31.12.H29-250612-0001": 2,
    "000.31.12.H29-250612-0002": 4,
    "000.31.12.H29-250613-0001": 10,
}
JSON_IMPORTED = {
    "000.31.01.H29-250620-0011": 9,
    "000.30.02.H29-250621-0003": 2,
    "000.31.01.H29-250622-0001": 1,
}


def _copy(src: Path, into: Path) -> Path:
    dst = into / src.name
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command reads WARDSYNC_* like any other; a variable of the developer's shell must not leak in.
    for name in [k for k in os.environ if k.upper().startswith("WARDSYNC_")]:
        monkeypatch.delenv(name)
    # Run in this process, the command must not configure logging: loggers cached on first use would keep
    # writing to the stream pytest captured for this test, and fail once it is closed.
    monkeypatch.setattr("node.logs.configure", lambda *args, **kwargs: None)


def _import(
    capsys: pytest.CaptureFixture[str], root: Path, export: Path, *extra: str
) -> tuple[int, dict[str, Any], str]:
    """``wardsync import EXPORT --json`` in this process (the round trip below also runs it as a process)."""
    status = main(["import", str(export), "--config", str(root / "wardsync.toml"), "--json", *extra])
    out = capsys.readouterr()
    # With logging left as it is, the node's own log lines may come first: the summary is the last object.
    lines = out.out.splitlines()
    start = max((i for i, line in enumerate(lines) if line == "{"), default=None)
    summary = json.loads("\n".join(lines[start:])) if start is not None else {}
    return status, summary, out.err


def _import_process(root: Path, export: Path) -> tuple[int, dict[str, Any], str]:
    """``wardsync import EXPORT --json`` run as the operator runs it."""
    done = cli("import", str(export), "--config", str(root / "wardsync.toml"), "--json", cwd=root)
    summary = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, summary, done.stderr


async def _get(session: aiohttp.ClientSession, base: str, code: str) -> dict[str, Any]:
    async with session.get(f"{base}/api/v1/dossiers/{code}") as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


def _store_state(root: Path) -> tuple[int, dict[str, str], int, int]:
    """Journal head, digests, audit entries and replication rows of a stopped node's store."""
    with contextlib.closing(sqlite3.connect(load(root / "wardsync.toml").db_path)) as conn:
        head = conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0]
        digests = {str(c): str(d) for c, d in conn.execute("SELECT code, digest FROM dossiers")}
        audit = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
        replication = conn.execute("SELECT count(*) FROM replication").fetchone()[0]
        return int(head), digests, int(audit), int(replication)


class TestRoundTrip:
    """Imported dossiers are readable through the API with their original codes and the new unit."""

    async def test_csv(self, tmp_path: Path) -> None:
        write_config(tmp_path)
        export = _copy(CSV_FILE, tmp_path)
        status, summary, err = _import_process(tmp_path, export)
        assert status == 1, err  # some rows are rejected on purpose
        assert summary == {
            "read": 8,
            "imported": 3,
            "already_present": 0,
            "rejected": 5,
            "dry_run": False,
            "rejects_file": str(tmp_path / "legacy_phamngulao.rejects.csv"),
        }
        async with running_node(load(tmp_path / "wardsync.toml")) as (_, base, session):
            for code, status_code in CSV_IMPORTED.items():
                record = await _get(session, base, code)
                assert record["MaHoSo"] == code
                assert record["MaDonViTiepNhan"] == UNIT and record["MaDonViXuLy"] == UNIT  # old 26749 -> 26743
                assert record["TrangThaiHoSo"] == status_code
            full = await _get(session, base, "000.31.12.H29-250612-0002")
            assert [s["TrangThai"] for s in full["QuaTrinhXuLy"]] == [2, 4]
            assert full["TaiLieuNop"][0]["TepDinhKemId"] == "GKS-0002"
            assert full["DanhSachLePhi"][0]["Gia"] == 8000
            assert full["SoGiayToChuHoSo"] == "079190000102"  # a CSV cell keeps its leading zero
            returned = await _get(session, base, "000.31.12.H29-250613-0001")
            assert returned["NgayTra"] == "20250617090000"  # derived from the step to status 10
            async with session.get(f"{base}/api/v1/dossiers/000.30.12.H29-250612-0006") as r:
                assert r.status == 404  # another unit's dossier

    async def test_json(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        export = _copy(JSON_FILE, tmp_path)
        status, summary, err = await asyncio.to_thread(_import, capsys, tmp_path, export)
        assert status == 1, err
        assert (summary["read"], summary["imported"], summary["rejected"]) == (4, 3, 1)
        async with running_node(load(tmp_path / "wardsync.toml")) as (node, base, session):
            for code, status_code in JSON_IMPORTED.items():
                assert (await _get(session, base, code))["TrangThaiHoSo"] == status_code
            married = await _get(session, base, "000.31.01.H29-250620-0011")
            assert married["NgayKetThucXuLy"] == "20250623150000"
            assert married["QuaTrinhXuLy"][1]["ChucDanh"] == "Công chức tư pháp"
            # Received at old Bến Nghé (now Sài Gòn), handled by old Nguyễn Thái Bình (now this unit).
            company = await _get(session, base, "000.30.02.H29-250621-0003")
            assert company["MaDonViTiepNhan"] == "26740" and company["MaDonViXuLy"] == UNIT
            assert get_unit(company["MaDonViTiepNhan"]) is not None
            assert company["LoaiDoiTuong"] == 2  # "2" in the export is read as the integer
            kinds = await node.store.fetchall("SELECT DISTINCT kind FROM audit_log")
            assert ("merge:legacy-import",) in {tuple(k) for k in kinds}

    def test_second_import_changes_nothing(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        export = _copy(CSV_FILE, tmp_path)
        assert _import(capsys, tmp_path, export)[0] == 1
        before = _store_state(tmp_path)
        status, summary, _ = _import(capsys, tmp_path, export)
        assert status == 1
        assert (summary["imported"], summary["already_present"], summary["rejected"]) == (0, 3, 5)
        after = _store_state(tmp_path)
        assert after == before  # no journal entry, no audit entry, the same digests
        assert (before[0], len(before[1]), before[3]) == (3, 3, 3)  # each held for the portal once

    def test_dry_run_writes_nothing(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        export = _copy(JSON_FILE, tmp_path)
        status, summary, _ = _import(capsys, tmp_path, export, "--dry-run")
        assert status == 1
        assert (summary["imported"], summary["rejected"], summary["dry_run"]) == (3, 1, True)
        head, digests, _, marks = _store_state(tmp_path)
        assert (head, digests, marks) == (0, {}, 0)


class TestEncryptedStore:
    """With encryption at rest, imported records are sealed and a second import still finds them."""

    async def test_sealed(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        key_file = tmp_path / "keys" / "wardsync.key"
        key_file.parent.mkdir()
        ensure_keyring(key_file)
        config = write_config(tmp_path)
        config.write_text(
            config.read_text(encoding="utf-8").replace("[node]\n", f'[node]\nkey_file = "{key_file}"\n', 1),
            encoding="utf-8",
        )
        export = _copy(JSON_FILE, tmp_path)
        assert (await asyncio.to_thread(_import, capsys, tmp_path, export))[1]["imported"] == 3
        status, summary, _ = await asyncio.to_thread(_import, capsys, tmp_path, export)
        assert (status, summary["imported"], summary["already_present"]) == (1, 0, 3)
        db = load(config).db_path
        stored = b"".join(f.read_bytes() for f in db.parent.glob(db.name + "*"))
        assert b"079190000201" not in stored and "Ngô Văn Long".encode() not in stored
        async with running_node(load(config)) as (_, base, session):
            assert (await _get(session, base, "000.31.01.H29-250620-0011"))["ChuHoSo"] == "Ngô Văn Long"


class TestRejects:
    """Rejected rows go to a file, each with the reason, and can be fixed and imported again."""

    def test_reasons_csv(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        export = _copy(CSV_FILE, tmp_path)
        rejects = tmp_path / "out" / "rejected.csv"
        rejects.parent.mkdir()
        status, summary, _ = _import(capsys, tmp_path, export, "--rejects", str(rejects))
        assert status == 1 and summary["rejects_file"] == str(rejects)
        assert rejects.stat().st_mode & 0o077 == 0  # ID and phone numbers: the operator's eyes only
        with rejects.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        reasons = {int(r["_line"]): r["_reason"] for r in rows}
        assert reasons == {
            4: "MaDonViTiepNhan: unknown unit code 99999: not in the conversion table of old communes",
            5: "NgayTiepNhan: must be a date-time yyyyMMddHHmmss, e.g. 20250612083000",
            6: "ChuHoSo: required",
            7: "belongs to unit 26740 (Phường Sài Gòn)",
            8: "duplicate row: 000.31.12.H29-250612-0001 is already on line 2",
        }
        assert rows[0]["MaHoSo"] == "000.31.12.H29-250612-0003" and rows[0]["MaDonViTiepNhan"] == "99999"

        # The rejects file is an export itself: fix a row and import it as it is.
        with rejects.open(encoding="utf-8", newline="") as f:
            fixed = list(csv.DictReader(f))
        header = list(fixed[0])
        fixed[0]["MaDonViTiepNhan"] = "26749"
        fixed[2]["ChuHoSo"] = "Võ Văn Sáu"
        with rejects.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, header, lineterminator="\n")
            w.writeheader()
            w.writerows(fixed)
        status, summary, _ = _import(capsys, tmp_path, rejects, "--rejects", str(tmp_path / "again.jsonl"))
        assert status == 1
        assert (summary["imported"], summary["already_present"], summary["rejected"]) == (2, 1, 2)
        again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [(r["MaHoSo"], r["reason"].split(":")[0]) for r in again] == [
            ("000.31.12.H29-250612-0004", "NgayTiepNhan"),
            ("000.30.12.H29-250612-0006", "belongs to unit 26740 (Phường Sài Gòn)"),
        ]

    def test_reasons_jsonl(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        records = json.loads(JSON_FILE.read_text(encoding="utf-8"))
        bad_step = dict(records[0], MaHoSo="000.31.01.H29-250620-0012")
        bad_step["QuaTrinhXuLy"] = [dict(records[0]["QuaTrinhXuLy"][0], MaHoSo="000.31.01.H29-250620-0012"),
                                    {"NguoiXuLy": "Trương Thị Ngọc", "ThoiDiemXuLy": "20250621080000", "TrangThai": 9}]
        records += [
            dict(records[2], MaHoSo="000.31.01.H29-250699-0001"),  # no 99th of June
            dict(records[2], MaHoSo="000.31.01.H29-250622-0009", MaDonViTiepNhan="26734"),  # old Tân Định
            {k: v for k, v in records[2].items() if k != "TrichYeuHoSo"} | {"MaHoSo": "000.31.01.H29-250622-0010"},
            bad_step,
            dict(records[2], MaHoSo="000.31.01.H29-250622-0011", Ghichu="x"),
            "not a record",
        ]
        export = tmp_path / "export.json"
        export.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        status, summary, _ = _import(capsys, tmp_path, export)
        assert status == 1
        assert (summary["read"], summary["imported"], summary["rejected"]) == (10, 3, 7)
        lines = (tmp_path / "export.rejects.jsonl").read_text(encoding="utf-8").splitlines()
        reasons = {r["line"]: r["reason"] for r in map(json.loads, lines)}
        assert reasons[4].startswith("TrangThaiHoSo: status 9 needs the processing steps")
        assert reasons[5] == "MaHoSo: has a date part that is not a real date"
        assert reasons[6] == "belongs to unit 26737 (Phường Tân Định)"
        assert reasons[7] == "TrichYeuHoSo: required"
        assert reasons[8].startswith("QuaTrinhXuLy: the step to status 9 at 20250621080000 is not a legal transition")
        assert reasons[9] == "Ghichu: unknown field"
        assert reasons[10] == "must be a JSON object"


class TestOutput:
    """A summary for people, and a progress bar on a terminal."""

    def test_summary_lines(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        export = _copy(CSV_FILE, tmp_path)
        assert main(["import", str(export), "--config", str(tmp_path / "wardsync.toml")]) == 1
        lines = capsys.readouterr().out.splitlines()
        summary = next(line for line in lines if line.startswith("read "))
        assert summary == "read 8, imported 3, already present 0, rejected 5"
        assert "  line 7 000.30.12.H29-250612-0006: belongs to unit 26740 (Phường Sài Gòn)" in lines

    def test_progress_bar_on_a_terminal(self, tmp_path: Path) -> None:
        write_config(tmp_path)
        export = _copy(CSV_FILE, tmp_path)
        leader, follower = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
        env.update(TERM="xterm-256color", COLUMNS="100")
        chunks: list[bytes] = []

        def drain() -> None:  # read while the command runs: a full terminal buffer would block it
            with contextlib.suppress(OSError):  # EIO once the command's end of the terminal is gone
                while chunk := os.read(leader, 65536):
                    chunks.append(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "node", "import", str(export), "--config", str(tmp_path / "wardsync.toml")],
                stdout=subprocess.PIPE, stderr=follower, cwd=tmp_path, env=env, timeout=60, check=False,
            )
        finally:
            os.close(follower)
            reader.join(timeout=10)
            os.close(leader)
        shown = b"".join(chunks)
        assert done.returncode == 1
        assert "importing" in shown.decode() and "8/8" in shown.decode()
        assert b"importing" not in done.stdout  # the bar stays off the summary's stream


class TestSplitCommunes:
    """An old commune split between new units goes to its main successor unless a row names another."""

    def test_successor_named_per_row(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        # Old Nguyễn Thái Bình (26746) went mostly to Bến Thành (26743), partly to Sài Gòn (26740).
        write_config(tmp_path, replace={'unit = "26743"': 'unit = "26740"'})
        base = json.loads(JSON_FILE.read_text(encoding="utf-8"))[2] | {"MaDonViTiepNhan": "26746"}
        rows = [
            base | {"MaHoSo": "000.31.02.H29-250622-0001", "MaDonViXuLyMoi": "26740"},
            base | {"MaHoSo": "000.31.02.H29-250622-0002"},
            base | {"MaHoSo": "000.31.02.H29-250622-0003", "MaDonViXuLyMoi": 26737},
        ]
        export = tmp_path / "nguyenthaibinh.json"
        export.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        status, summary, _ = _import(capsys, tmp_path, export)
        assert (status, summary["imported"], summary["rejected"]) == (1, 1, 2)
        lines = (tmp_path / "nguyenthaibinh.rejects.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["reason"] for line in lines] == [
            "belongs to unit 26743 (Phường Bến Thành)",
            "MaDonViXuLyMoi: must be one of the new units old 26746 went to: 26743, 26740",
        ]
        with contextlib.closing(sqlite3.connect(load(tmp_path / "wardsync.toml").db_path)) as conn:
            held = conn.execute("SELECT code, receiving_unit, competent_unit FROM dossiers").fetchall()
        assert held == [("000.31.02.H29-250622-0001", "26740", "26740")]


class TestExitStatus:
    """0 all in, 1 rows rejected, 2 unusable file or configuration, 3 the node holds the data directory."""

    def test_clean_file_exits_0(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        records = json.loads(JSON_FILE.read_text(encoding="utf-8"))[:3]
        export = tmp_path / "good.json"
        export.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        status, summary, _ = _import(capsys, tmp_path, export)
        assert (status, summary["imported"], summary["rejected"]) == (0, 3, 0)
        assert "rejects_file" not in summary and not (tmp_path / "good.rejects.jsonl").exists()
        assert _import(capsys, tmp_path, export)[:2] == (0, {**summary, "imported": 0, "already_present": 3})

    def test_unusable_input_exits_2(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
        (tmp_path / "headless.csv").write_text("", encoding="utf-8")
        for name in ("broken.json", "headless.csv"):
            status, _, err = _import(capsys, tmp_path, tmp_path / name)
            assert status == 2, (name, err)
        assert main(["import", str(JSON_FILE), "--config", str(tmp_path / "nothing.toml")]) == 2
        assert "file not found" in capsys.readouterr().err

    def test_running_node_exits_3(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        write_config(tmp_path)
        with lock.hold(tmp_path / "data", "serve"):
            status, _, err = _import(capsys, tmp_path, _copy(JSON_FILE, tmp_path))
        assert status == 3 and "stop the node" in err


# -- the collision rule against the portal stand-in -------------------------------------------------

PORTAL_HELD = "000.31.12.H29-250610-0001"  # the old system sent it; the portal moved it on since
PORTAL_LACKS = "000.31.12.H29-250610-0002"  # never reached the portal
OTHER_CITIZEN = "000.31.12.H29-250610-0003"  # the portal holds another citizen's dossier under this code


def _legacy_record(code: str, id_number: str, **extra: Any) -> dict[str, Any]:
    return {
        "MaHoSo": code,
        "NgayTiepNhan": "20250610080000",
        "MaDonViTiepNhan": "26749",
        "MaTTHC": "1.001193",
        "TenTTHC": "Thủ tục đăng ký khai sinh",
        "MaLinhVuc": "HT",
        "TenLinhVuc": "Hộ tịch",
        "KenhThucHien": 1,
        "ChuHoSo": "Trần Văn Lộc",
        "SoGiayToChuHoSo": id_number,
        "LoaiDoiTuong": 1,
        "TrichYeuHoSo": "Đăng ký khai sinh",
        "SoDienThoai": "0912000001",
        **extra,
    }


def _step(code: str, at: str, status: int, officer: str, note: str) -> dict[str, Any]:
    return {"MaHoSo": code, "NguoiXuLy": officer, "ThoiDiemXuLy": at, "TrangThai": status, "NoiDungXuLy": note}


class _Portal:
    """The portal stand-in spoken to the way the old units' systems did."""

    def __init__(self, ups: Upstreams) -> None:
        self.ups = ups
        self.session = ""

    async def call(self, service: str, **fields: Any) -> dict[str, Any]:
        if not self.session:
            async with self.ups.http.post(
                f"{self.ups.national_url}/login",
                json={"username": "wardsync", "password": "wardsync-demo"},
                headers={"dstcode": "000.31.12.H29"},
            ) as r:
                self.session = (await r.json())["session"]
        body = {"session": self.session, "madonvi": "000.31.12.H29", "service": service, **fields}
        async with self.ups.http.post(f"{self.ups.national_url}/integration", json=body) as r:
            return dict(await r.json())

    async def put(self, record: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        answer = await self.call("DongBoHoSoMC", isUpdating="False", data=[record])
        assert answer["error_code"] == 0, answer
        answer = await self.call("CapNhatTienDoHoSoMC", data=steps)
        assert answer["error_code"] == 0, answer

    async def lookup(self, code: str) -> dict[str, Any]:
        answer = await self.call("TraCuuHoSo", mahoso=code)
        assert answer["error_code"] == 0, answer
        return dict(answer["data"])


class TestPortalCollision:
    """Imported dossiers are looked up on the portal first: never a create over what it holds."""

    async def test_held_lacking_and_colliding(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            portal = _Portal(ups)
            intake = _step(PORTAL_HELD, "20250610080000", 2, "Bộ phận Một cửa", "Tiếp nhận hồ sơ")
            moved_on = _step(PORTAL_HELD, "20250611090000", 4, "Nguyễn Văn Bình", "Chuyển phòng Tư pháp")
            # What the old system sent: in processing, and the citizen's new phone number taken there.
            await portal.put(
                {**_legacy_record(PORTAL_HELD, "079190000301", SoDienThoai="0987000111"), "TrangThaiHoSo": 4},
                [intake, moved_on],
            )
            stranger = _legacy_record(OTHER_CITIZEN, "079190009999", ChuHoSo="Người Khác", TrangThaiHoSo=2)
            await portal.put(
                stranger, [_step(OTHER_CITIZEN, "20250610080000", 2, "Bộ phận Một cửa", "Tiếp nhận hồ sơ")]
            )
            stranger_before = await portal.lookup(OTHER_CITIZEN)

            # The export is older than the portal: it still shows the dossier as accepted, with the old phone.
            export = tmp_path / "export.json"
            export.write_text(
                json.dumps(
                    [
                        _legacy_record(PORTAL_HELD, "079190000301", TrangThaiHoSo=2),
                        _legacy_record(PORTAL_LACKS, "079190000302", TrangThaiHoSo=2),
                        _legacy_record(OTHER_CITIZEN, "079190000303", TrangThaiHoSo=2),
                    ],
                    ensure_ascii=False,
                ),
                encoding="utf-8",
            )
            write_config(tmp_path, ups)
            status, summary, err = await asyncio.to_thread(_import, capsys, tmp_path, export)
            assert (status, summary["imported"]) == (0, 3), err

            config = load(tmp_path / "wardsync.toml")
            async with running_node(config) as (node, base, session):
                states = await _wait_national(node, {PORTAL_HELD: "synced", PORTAL_LACKS: "synced",
                                                     OTHER_CITIZEN: "dead"})
                assert "collision" in states[OTHER_CITIZEN]

                held = await portal.lookup(PORTAL_HELD)
                assert held["TrangThaiHoSo"] == 4  # not moved back to the export's 2
                assert held["SoDienThoai"] == "0987000111"  # the portal's value stands
                assert [s["TrangThai"] for s in held["QuaTrinhXuLy"]] == [2, 4]
                assert held["MaDonViTiepNhan"] == UNIT  # the update carried the new unit
                local = await _get(session, base, PORTAL_HELD)
                assert (local["TrangThaiHoSo"], local["SoDienThoai"]) == (4, "0987000111")

                lacked = await portal.lookup(PORTAL_LACKS)
                assert lacked["MaDonViTiepNhan"] == UNIT and lacked["ChuHoSo"] == "Trần Văn Lộc"

                assert await portal.lookup(OTHER_CITIZEN) == stranger_before  # another citizen's dossier untouched
                dead = await _get(session, base, OTHER_CITIZEN)
                assert dead["replication"]["national"]["state"] == "dead"

                on_portal = await ups.dossiers("national", UNIT)
                for code in (PORTAL_HELD, PORTAL_LACKS):
                    assert on_portal[code] == (await _get(session, base, code))["digest"]  # converged
                stats = await ups.stats("national")
                # No create ever reached the portal for a code it holds ("đã tồn tại" makes a call partial).
                assert "DongBoHoSoMC:partial" not in stats["requests"], stats
                assert node.legacy_check is not None and node.legacy_check.collisions == 1


async def _wait_national(node: Any, wanted: dict[str, str], within_s: float = 20.0) -> dict[str, str]:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        rows = await node.store.fetchall(
            "SELECT r.code, r.state, r.last_error, r.acked_digest = d.digest FROM replication r"
            " JOIN dossiers d ON d.code = r.code WHERE r.target = 'national'"
        )
        got = {str(c): ("synced" if s == "synced" and ok else str(s)) for c, s, _, ok in rows}
        if all(got.get(code) == state for code, state in wanted.items()):
            return {str(c): str(e or "") for c, _, e, _ in rows}
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"national replication never reached {wanted}: {got}")
        await asyncio.sleep(0.1)


class TestPortalDown:
    """While the portal cannot be asked, imported dossiers stay held: nothing is pushed there unchecked."""

    async def test_held_until_the_portal_answers(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        async with running_upstreams(tmp_path / "ups") as ups:
            export = tmp_path / "export.json"
            export.write_text(json.dumps([_legacy_record(PORTAL_LACKS, "079190000302")], ensure_ascii=False),
                              encoding="utf-8")
            write_config(tmp_path, ups, replace={"[log]\n": "[failover]\nopen_base_s = 0.3\n\n[log]\n"})
            status, _, err = await asyncio.to_thread(_import, capsys, tmp_path, export)
            assert status == 0, err
            await ups.fault("national", mode="down")
            async with running_node(load(tmp_path / "wardsync.toml")) as (node, base, session):
                deadline = asyncio.get_running_loop().time() + 30
                while PORTAL_LACKS not in await ups.dossiers("city", UNIT):  # the city gets it meanwhile
                    assert asyncio.get_running_loop().time() < deadline, "never reached the city system"
                    await asyncio.sleep(0.1)
                record = await _get(session, base, PORTAL_LACKS)
                assert record["replication"]["national"]["state"] == "held"
                assert PORTAL_LACKS not in await ups.dossiers("national", UNIT)
                async with session.get(f"{base}/api/v1/status") as resp:
                    national = (await resp.json())["targets"]["national"]
                assert national["held"] == 1 and national["lag_records"] >= 1  # counted as not yet there
                await ups.clear("national")
                # The breaker's open time doubles with each failed probe: allow for a long outage's.
                await _wait_national(node, {PORTAL_LACKS: "synced"}, within_s=60)
                assert PORTAL_LACKS in await ups.dossiers("national", UNIT)


class TestConversionTable:
    """The shipped table maps every old commune to units of the registry."""

    def test_successors_are_units(self) -> None:
        from node.legacy import conversion_table, successor

        table = conversion_table()
        assert len(table) == 441
        for entry in table.values():
            assert get_unit(entry.new_code) is not None, entry
            assert all(get_unit(code) is not None for code in entry.also_to), entry
        # Every new unit succeeds an old commune but Côn Đảo, a district without communes before the merger:
        # its old systems' dossiers name no commune code, and the import cannot place them.
        assert {u.code for u in units()} - {e.new_code for e in table.values()} == {"26732"}
        # Old 26737 (Đa Kao) went mostly to Sài Gòn (26740), partly to Tân Định, whose new code is 26737.
        split = successor("26737")
        assert split is not None and (split.new_code, split.also_to) == ("26740", ("26737",))
        assert successor("26743") is not None and successor("99999") is None
