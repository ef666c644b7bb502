"""Hardening, end to end (real loopback sockets, SQLite files, subprocesses): input limits, a full disk,
file modes, TLS and the peer token.

What tests/test_api.py, test_validation.py, test_ws.py and test_store.py already check is not repeated
here; this file covers what they leave open:

* the JSON depth limit at its boundary, on every route that reads a JSON body, with the limit named;
* the body-size limit without a Content-Length (a chunked body) on the write routes;
* Vietnamese text sent decomposed (NFD) stored composed (NFC) in the record *and* the Doc, through
  intake, steps, PATCH and a document's form fields, with lengths counted after composing;
* field lengths of DOMAIN.md (TrichYeuHoSo 1000, NguoiXuLy 50) at the boundary over HTTP, PATCH included;
* a full disk (a page-limited database, as TestDiskFull does) on every write route besides intake and
  steps (fees, PATCH, document upload): 507, the dossier unchanged and its audit log intact, an Idempotency-Key
  not burnt by the refusal, writes resuming once space returns;
* a really full file system (a small tmpfs mounted as the data directory; needs root, skipped otherwise):
  a document that does not fit and intakes that do not fit are 507 and leave nothing half-written;
* upstream TLS verification switched off is never silent in ``wardsync doctor`` either (tests/test_tls.py
  covers the warning at start and /api/v1/status);
* the keyring of an installed node (README, deploy/install.sh): written by root next to the configuration,
  it opens for the service's user once it is root:wardsync 640, and not as ``wardsync init`` leaves it;
* a configuration ``wardsync init`` writes with credentials in it is one ``serve`` accepts (mode 600);
* a backup (a copy of citizens' data), and a data directory the node creates, are its owner's only;
* the peer token and a document link on a host that is not in [node] peer_urls: never sent there;
* (slow) the intake benchmark's encryption-at-rest mode end to end: both node runs, their stores sealed
  and clear as configured, and the sealed/clear ratios reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pycrdt import Doc, Provider

from node import audit
from node.api import MAX_JSON_DEPTH
from node.app import Node
from node.config import Config, ConfigError, load_config, origin_of
from node.crypto import Keyring, count_key_usage, write_keyring
from node.ops import backup, doctor
from sync import doc as ydoc
from sync.doc import load_doc
from sync.record import record_from_doc
from tests import test_tls, test_ws
from tests.conftest import make_config, running_node, valid_intake

DOSSIERS = "/api/v1/dossiers"
Running = tuple[Node, str, aiohttp.ClientSession]

NAME = "Nguyễn Thị Phượng"  # every vowel here carries a diacritic NFD splits off
NAME_NFD = unicodedata.normalize("NFD", NAME)
OFFICER = "Trần Văn Dũng"
SUMMARY = "Đăng ký khai sinh cho con, cấp bản sao trích lục"


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


async def send(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any, Any]:
    if body is not None:
        kwargs["json"] = body
    async with session.request(method, url, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json(), resp.headers


async def create(running: Running, **fields: Any) -> dict[str, Any]:
    _, base, session = running
    status, reply, _ = await send(session, "POST", base + DOSSIERS, valid_intake(**fields))
    assert status == 201, reply
    return dict(reply)


async def read(running: Running, code: str) -> tuple[str, dict[str, Any]]:
    """(ETag, record without what is computed on reading) of one dossier."""
    _, base, session = running
    status, reply, headers = await send(session, "GET", f"{base}{DOSSIERS}/{code}")
    assert status == 200, reply
    for computed in ("replication", "TinhTrangHan", "NgayHenTraHieuLuc"):
        reply.pop(computed, None)
    return str(headers["ETag"]), dict(reply)


async def stored(node: Node, code: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dossier as the store holds it: (materialised record, record rebuilt from the Doc state)."""
    row = await node.store.fetchone("SELECT state, record FROM dossiers WHERE code = ?", (code,))
    assert row is not None
    sealer = node.store.sealer
    record = json.loads(sealer.record(code, row[1]))
    doc = load_doc(code, sealer.state(code, row[0]), client_id=1)
    return record, record_from_doc(doc)


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def nested_object(depth: int) -> str:
    """A JSON object ``depth`` levels deep: {"a":{"a":...{}}}."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


# -- JSON depth and body size ----------------------------------------------------------------------------


class TestJsonLimits:
    """The depth limit holds on every JSON route, exactly at its boundary; a body too large is a 413 even
    without a Content-Length."""

    async def test_depth_boundary_on_every_json_route(self, node_server: Running) -> None:
        node, base, session = node_server
        code = (await create(node_server))["MaHoSo"]
        etag, _ = await read(node_server, code)
        routes = [
            ("POST", DOSSIERS, {}),
            ("POST", f"{DOSSIERS}/{code}/steps", {}),
            ("POST", f"{DOSSIERS}/{code}/fees", {}),
            ("PATCH", f"{DOSSIERS}/{code}", {"If-Match": etag}),
            ("POST", "/api/v1/admin/faults", {}),
        ]
        journal = await node.store.fetchone("SELECT count(*) FROM journal")
        for method, path, headers in routes:
            hdrs = {"Content-Type": "application/json", **headers}
            # At the limit the body is parsed and answered by validation (422), one deeper it is not parsed.
            status, reply, _ = await send(
                session, method, base + path, data=nested_object(MAX_JSON_DEPTH), headers=hdrs
            )
            assert status == 422, (path, reply)
            status, reply, _ = await send(
                session, method, base + path, data=nested_object(MAX_JSON_DEPTH + 1), headers=hdrs
            )
            assert status == 400, (path, reply)
            assert reply["error"]["code"] == "malformed_json"
            assert f"deeper than {MAX_JSON_DEPTH} levels" in reply["error"]["message"], reply
        assert await node.store.fetchone("SELECT count(*) FROM journal") == journal

    async def test_chunked_body_over_the_limit_is_a_413(self, node_server: Running) -> None:
        """A body streamed without Content-Length is cut at max_body_bytes: 413 naming the limit, nothing stored."""
        node, base, session = node_server
        code = (await create(node_server))["MaHoSo"]
        etag, before = await read(node_server, code)
        limit = node.config.node.max_body_bytes

        async def chunks(body: dict[str, Any]) -> AsyncIterator[bytes]:
            raw = json.dumps(body).encode()
            for i in range(0, len(raw), 8192):
                yield raw[i : i + 8192]

        big = "x" * (limit + 1)
        cases = [
            ("POST", DOSSIERS, valid_intake(ThongTinKhac=big), {}),
            ("POST", f"{DOSSIERS}/{code}/steps", {"TrangThai": 4, "NguoiXuLy": "A", "NoiDungXuLy": big}, {}),
            ("PATCH", f"{DOSSIERS}/{code}", {"ThongTinKhac": big}, {"If-Match": etag}),
        ]
        for method, path, body, headers in cases:
            status, reply, _ = await send(
                session, method, base + path, data=chunks(body), headers={"Content-Type": "application/json", **headers}
            )
            assert status == 413, (path, reply)
            assert reply["error"]["code"] == "body_too_large"
            assert str(limit) in reply["error"]["message"]
        assert await read(node_server, code) == (etag, before)
        row = await node.store.fetchone("SELECT count(*) FROM dossiers")
        assert row == (1,)


# -- Unicode NFC and field lengths -----------------------------------------------------------------------


class TestNfc:
    """Decomposed Vietnamese arrives from some keyboards and systems; the store holds it composed."""

    async def test_nfd_input_is_stored_nfc_in_the_record_and_the_doc(self, node_server: Running) -> None:
        node, base, session = node_server
        reply = await create(node_server, ChuHoSo=NAME_NFD, TrichYeuHoSo=nfd(SUMMARY))
        code = reply["MaHoSo"]
        assert reply["ChuHoSo"] == NAME
        status, stepped, _ = await send(
            session, "POST", f"{base}{DOSSIERS}/{code}/steps", {"TrangThai": 4, "NguoiXuLy": nfd(OFFICER)}
        )
        assert status == 201, stepped
        etag, _ = await read(node_server, code)
        status, edited, _ = await send(
            session, "PATCH", f"{base}{DOSSIERS}/{code}", {"ThongTinKhac": nfd("Ghi chú: người nộp là mẹ")},
            headers={"If-Match": etag},
        )
        assert status == 200, edited
        form = aiohttp.FormData()
        form.add_field("TenTepDinhKem", nfd("Tờ khai đăng ký khai sinh"))
        form.add_field("file", b"%PDF-1.4 to khai", filename="to-khai.pdf", content_type="application/pdf")
        async with session.post(f"{base}{DOSSIERS}/{code}/documents", data=form) as resp:
            assert resp.status == 201, await resp.text()

        record, from_doc = await stored(node, code)
        for where in (record, from_doc):
            assert where["ChuHoSo"] == NAME
            assert where["TrichYeuHoSo"] == SUMMARY
            assert where["ThongTinKhac"] == "Ghi chú: người nộp là mẹ"
            assert [s["NguoiXuLy"] for s in where["QuaTrinhXuLy"]][-1] == OFFICER
            assert where["TaiLieuNop"][0]["TenTepDinhKem"] == "Tờ khai đăng ký khai sinh"
            not_nfc = [s for s in strings(where) if not unicodedata.is_normalized("NFC", s)]
            assert not_nfc == []
        # The composed and the decomposed spelling find the same dossier.
        for name in (NAME, NAME_NFD):
            status, found, _ = await send(session, "GET", f"{base}{DOSSIERS}/search", params={"name": name})
            assert status == 200, found
            assert [d["MaHoSo"] for d in found["items"]] == [code]

    async def test_lengths_are_counted_after_composing(self, node_server: Running) -> None:
        """NguoiXuLy (at most 50 characters, DOMAIN.md) and TrichYeuHoSo (at most 1000) at their limits over
        HTTP: a name of 50 composed characters sent as more than 50 code points passes, 51 do not."""
        _, base, session = node_server
        officer = ("Nguyễn Thị Phượng " * 3)[:50]
        assert len(nfd(officer)) > 50
        summary = ("Đăng ký khai sinh " * 60)[:1000]
        reply = await create(node_server, TrichYeuHoSo=nfd(summary))
        assert reply["TrichYeuHoSo"] == summary
        code = reply["MaHoSo"]
        status, stepped, _ = await send(
            session, "POST", f"{base}{DOSSIERS}/{code}/steps", {"TrangThai": 4, "NguoiXuLy": nfd(officer)}
        )
        assert status == 201, stepped
        assert stepped["QuaTrinhXuLy"][-1]["NguoiXuLy"] == officer

        status, reply, _ = await send(
            session, "POST", f"{base}{DOSSIERS}/{code}/steps", {"TrangThai": 5, "NguoiXuLy": officer + "a"}
        )
        assert (status, list(reply["error"]["fields"])) == (422, ["NguoiXuLy"])
        status, reply, _ = await send(session, "POST", base + DOSSIERS, valid_intake(TrichYeuHoSo=summary + "a"))
        assert (status, list(reply["error"]["fields"])) == (422, ["TrichYeuHoSo"])
        etag, _ = await read(node_server, code)
        status, reply, _ = await send(
            session, "PATCH", f"{base}{DOSSIERS}/{code}", {"TrichYeuHoSo": summary + "a"}, headers={"If-Match": etag}
        )
        assert (status, list(reply["error"]["fields"])) == (422, ["TrichYeuHoSo"])
        status, reply, _ = await send(
            session, "PATCH", f"{base}{DOSSIERS}/{code}", {"ChuHoSo": nfd("Lê " * 83)[:-1]}, headers={"If-Match": etag}
        )
        assert status == 200, reply  # 331 code points decomposed, 248 composed: within ChuHoSo's 250
        assert (await read(node_server, code))[1]["ChuHoSo"] == ("Lê " * 83).strip()


# -- a full disk -----------------------------------------------------------------------------------------

Write = Callable[[Running, str, int], Awaitable[tuple[int, Any]]]


async def _fee(running: Running, code: str, n: int) -> tuple[int, Any]:
    _, base, session = running
    body = {"TenPhiLePhi": f"Lệ phí sao y bản chính {n} " + "x" * 200, "MaPhiLePhi": f"LP-{n}", "Gia": 2000 + n}
    status, reply, _ = await send(session, "POST", f"{base}{DOSSIERS}/{code}/fees", body)
    return status, reply


async def _edit(running: Running, code: str, n: int) -> tuple[int, Any]:
    _, base, session = running
    etag, _ = await read(running, code)
    body = {"ThongTinKhac": f"Lần sửa {n}: " + "ghi chú bổ sung " * 60}
    status, reply, _ = await send(session, "PATCH", f"{base}{DOSSIERS}/{code}", body, headers={"If-Match": etag})
    return status, reply


async def _document(running: Running, code: str, n: int) -> tuple[int, Any]:
    _, base, session = running
    form = aiohttp.FormData()
    form.add_field("TenTepDinhKem", f"Bản sao giấy tờ {n} " + "x" * 200)
    form.add_field("file", f"%PDF-1.4 tài liệu {n}".encode(), filename=f"tai-lieu-{n}.pdf")
    async with session.post(f"{base}{DOSSIERS}/{code}/documents", data=form) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


WRITES: dict[str, Write] = {"fees": _fee, "PATCH": _edit, "documents": _document}
BIG = {"ThongTinKhac": "Ghi chú " * 240, "TrichYeuHoSo": "Trích yếu " * 90}


def _audit_ok(db: Path) -> audit.Report:
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as conn:
        return audit.verify(conn)


class TestDiskFullEveryRoute:
    """TestDiskFull (tests/test_store.py) covers intake and steps on a clear store; the other write routes
    behave alike, on a clear store and on one encrypted at rest (what ``wardsync init`` configures)."""

    @pytest.mark.parametrize("at_rest", ["clear", "sealed"])
    async def test_fees_edit_and_documents_answer_507_and_change_nothing(self, tmp_path: Path, at_rest: str) -> None:
        key_file = ""
        if at_rest == "sealed":
            key_file = str(tmp_path / "keys" / "wardsync.key")  # outside data_dir, as the config requires
            write_keyring(Path(key_file), Keyring.new())
        config = make_config(tmp_path, key_file=key_file)
        async with running_node(config) as running:
            node, base, session = running
            codes = [(await create(running, **BIG))["MaHoSo"] for _ in range(len(WRITES))]
            pages = await node.store.on_writer(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
            await node.store.on_writer(lambda c: c.execute(f"PRAGMA max_page_count={pages}"))
            # Use up what is left in partly filled pages: big intakes first, then small ones.
            for body in (valid_intake(**BIG), valid_intake()):
                refused = 0
                for _ in range(200):
                    status, reply, _ = await send(session, "POST", base + DOSSIERS, body)
                    assert status in (201, 507), reply
                    refused = refused + 1 if status == 507 else 0
                    if refused == 3:
                        break
                assert refused == 3, "intakes never hit the page limit"

            n = 0
            for (route, write), code in zip(WRITES.items(), codes, strict=True):
                for _ in range(100):  # a write may still fit in a partly used page; the next will not
                    before = await read(running, code)
                    n += 1
                    status, reply = await write(running, code, n)
                    if status not in (200, 201):
                        break
                assert status == 507, (route, reply)
                assert reply["error"]["code"] == "insufficient_storage", reply
                assert "full" in reply["error"]["message"] and "nothing" in reply["error"]["message"], reply
                assert await read(running, code) == before, route

            # The same Idempotency-Key, refused while full, is honoured once space returns (not replayed).
            key = {"Idempotency-Key": "hardening-disk-full-1"}
            status, reply, _ = await send(session, "POST", base + DOSSIERS, valid_intake(**BIG), headers=key)
            assert status == 507, reply
            assert await node.store.integrity_check() == "ok"
            assert _audit_ok(config.db_path).ok

            await node.store.on_writer(lambda c: c.execute("PRAGMA max_page_count=1073741823"))
            for (route, write), code in zip(WRITES.items(), codes, strict=True):
                n += 1
                status, reply = await write(running, code, n)
                assert status in (200, 201), (route, reply)
            status, first, _ = await send(session, "POST", base + DOSSIERS, valid_intake(**BIG), headers=key)
            assert status == 201, first
            status, again, _ = await send(session, "POST", base + DOSSIERS, valid_intake(**BIG), headers=key)
            assert (status, again["MaHoSo"]) == (201, first["MaHoSo"])
            assert await node.store.integrity_check() == "ok"
            report = _audit_ok(config.db_path)
            assert report.ok, report
        async with running_node(config) as (node, _, _):
            assert await node.store.integrity_check() == "ok"
            sealed = await node.store.on_writer(count_key_usage)
            assert all(bool(k) == (at_rest == "sealed") for c in sealed.values() for k, n in c.items() if n), sealed


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Any:
    """A tmpfs of ``size`` mounted at ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def _grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True, timeout=30)


class TestFullFileSystem:
    """The data directory on a file system that really fills up (ENOSPC), not only a page-limited database."""

    async def test_documents_and_intakes_on_a_full_file_system(self, tmp_path: Path) -> None:
        with small_filesystem(tmp_path / "data", "1536k") as data:
            config = make_config(tmp_path, data_dir=str(data))
            async with running_node(config) as running:
                node, base, session = running
                code = (await create(running))["MaHoSo"]
                before = await read(running, code)
                free = os.statvfs(data).f_bavail * os.statvfs(data).f_frsize
                # A document larger than the space left: refused while streaming, no partial file left behind.
                blob = os.urandom(free + 64 * 1024)
                form = aiohttp.FormData()
                form.add_field("file", io.BytesIO(blob), filename="scan.pdf", content_type="application/pdf")
                async with session.post(f"{base}{DOSSIERS}/{code}/documents", data=form) as resp:
                    reply = await resp.json()
                    assert resp.status == 507, reply
                assert reply["error"]["code"] == "insufficient_storage"
                assert "full" in reply["error"]["message"]
                assert [p for p in (data / "documents").rglob("*") if p.is_file()] == []
                assert await read(running, code) == before

                # Fill the rest with intakes until the file system refuses them.
                accepted: list[str] = []
                for _ in range(2000):
                    status, reply, _ = await send(session, "POST", base + DOSSIERS, valid_intake(**BIG))
                    if status == 507:
                        break
                    assert status == 201, reply
                    accepted.append(reply["MaHoSo"])
                assert status == 507, "the file system never filled up"
                assert accepted, "no intake fitted in the space the refused document left"
                assert reply["error"]["code"] == "insufficient_storage", reply
                async with session.get(base + "/readyz") as resp:
                    assert resp.status == 200
                assert await read(running, code) == before

                _grow(data, "64m")
                status, later, _ = await send(session, "POST", base + DOSSIERS, valid_intake())
                assert status == 201, later
                form = aiohttp.FormData()
                form.add_field("file", io.BytesIO(blob), filename="scan.pdf", content_type="application/pdf")
                async with session.post(f"{base}{DOSSIERS}/{code}/documents", data=form) as resp:
                    assert resp.status == 201, await resp.text()
                sha = hashlib.sha256(blob).hexdigest()
                assert (data / "documents" / sha[:2] / sha).read_bytes() == blob
                rows = await node.store.fetchall("SELECT code FROM dossiers ORDER BY id")
                assert [r[0] for r in rows] == [code, *accepted, later["MaHoSo"]]
                assert await node.store.integrity_check() == "ok"
                assert _audit_ok(config.db_path).ok


# -- TLS -------------------------------------------------------------------------------------------------

pki = test_tls.pki  # the throwaway CA and server certificate of tests/test_tls.py


class TestTlsNeverSilent:
    async def test_doctor_warns_when_upstream_verification_is_off(self, tmp_path: Path, pki: test_tls.Pki) -> None:
        """``wardsync doctor`` names a target whose certificate is not verified, and only that one."""
        async with test_tls.https_portal(tmp_path / "portal", pki) as url:
            unverified = test_tls.national(url, tls_verify="false")
            verified = test_tls.national(url, ca_bundle=str(pki.ca))
            off = test_tls.node_config(tmp_path / "off", {"targets.national": unverified})
            on = test_tls.node_config(tmp_path / "on", {"targets.national": verified})
            checks_off = await doctor.check_certificates(off, doctor.Thresholds(timeout_s=5.0))
            checks_on = await doctor.check_certificates(on, doctor.Thresholds(timeout_s=5.0))
        warned = [c for c in checks_off if c.name == "TLS verification (national)"]
        assert len(warned) == 1 and warned[0].status == doctor.WARNING, checks_off
        assert "tls_verify = false" in warned[0].detail and "ca_bundle" in warned[0].fix
        # Verified against the CA bundle: only the certificate's expiry (the test CA's lasts a day: a warning).
        assert [c.name for c in checks_on] == ["certificate (national)"]
        assert checks_on[0].status != doctor.FAILURE and "expires" in checks_on[0].detail, checks_on


# -- secrets in the configuration file ------------------------------------------------------------------


def test_init_with_credentials_writes_a_file_serve_accepts(tmp_path: Path) -> None:
    """``--national-url`` and ``--city-url`` put the stand-ins' credentials in the file: owner-only mode,
    so the configuration check that refuses secrets readable by others passes."""
    conf = tmp_path / "wardsync.toml"
    done = subprocess.run(
        [sys.executable, "-m", "node", "init", "--unit", "26743", "--agency-code", "000.00.17.H29",
         "--national-url", "http://127.0.0.1:8081", "--city-url", "http://127.0.0.1:8082",
         "--data-dir", str(tmp_path / "data"), "--out", str(conf)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert conf.stat().st_mode & 0o777 == 0o600
    config = load_config(conf, env={})
    assert config.national is not None and config.national.password
    assert config.city is not None and config.city.client_secret


# -- backups ------------------------------------------------------------------------------------------------


async def test_a_backup_is_for_its_owner_only(config: Config, tmp_path: Path) -> None:
    async with running_node(config) as running:
        await create(running)
        fresh = tmp_path / "backups" / "first"
        manifest = await asyncio.to_thread(backup.backup, config, fresh)
    assert manifest["counts"]["dossiers"] == 1
    assert fresh.stat().st_mode & 0o777 == 0o700
    assert (fresh / backup.DB_FILE).stat().st_mode & 0o777 == 0o600
    # A directory the operator made keeps its mode (a backup volume's group, say); the copy is still 600.
    own = tmp_path / "volume"
    own.mkdir()
    own.chmod(0o750)
    await asyncio.to_thread(backup.backup, config, own)
    assert own.stat().st_mode & 0o777 == 0o750
    assert (own / backup.DB_FILE).stat().st_mode & 0o777 == 0o600
    assert not list(own.glob("*.partial*"))


async def test_a_data_directory_the_node_creates_is_its_own(tmp_path: Path) -> None:
    config = make_config(tmp_path, data_dir=str(tmp_path / "srv" / "wardsync"))
    async with running_node(config) as running:
        await create(running)
    assert config.data_path.stat().st_mode & 0o777 == 0o700
    kept = tmp_path / "kept"
    kept.mkdir()
    kept.chmod(0o750)  # made by the installer for the service's group: left as it is
    async with running_node(make_config(tmp_path, data_dir=str(kept))):
        pass
    assert kept.stat().st_mode & 0o777 == 0o750


# -- the keyring of an installed node ---------------------------------------------------------------------

SERVICE_UID = SERVICE_GID = 65534  # nobody:nogroup stand in for the wardsync service user and group


def _as_service(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "wardsync"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "node"]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    return subprocess.run(
        ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_GID}", "--clear-groups", *cmd, *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False,
    )  # fmt: skip


class TestInstalledKeyring:
    def test_the_service_user_reads_the_keyring_only_with_the_install_modes(self) -> None:
        """As the install steps do it: root runs ``wardsync init`` into /etc/wardsync, then gives the
        configuration and the keyring to root:wardsync, mode 640; only then does the service user open it."""
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to act as the service user")
        import node

        program = Path(node.__file__).resolve().parent
        probe = subprocess.run(
            ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_GID}", "--clear-groups",
             "test", "-r", str(program / "cli.py")],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(f"the program under {program} is not readable by uid {SERVICE_UID} here")
        base = Path(tempfile.mkdtemp(prefix="wardsync-install-"))
        try:
            base.chmod(0o755)
            etc, data = base / "etc", base / "data"
            etc.mkdir(mode=0o750)
            os.chown(etc, 0, SERVICE_GID)
            data.mkdir(mode=0o750)
            os.chown(data, SERVICE_UID, SERVICE_GID)
            conf, key = etc / "wardsync.toml", etc / "wardsync.key"
            done = subprocess.run(
                [sys.executable, "-m", "node", "init", "--unit", "26743", "--agency-code", "000.00.17.H29",
                 "--data-dir", str(data), "--out", str(conf)],
                capture_output=True, text=True, timeout=60, cwd=base, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
            os.chown(conf, 0, SERVICE_GID)
            conf.chmod(0o640)

            refused = _as_service("key", "status", "--config", str(conf), cwd=base)
            assert refused.returncode != 0
            assert "cannot be read" in refused.stderr, refused.stderr

            os.chown(key, 0, SERVICE_GID)
            key.chmod(0o640)
            opened = _as_service("key", "status", "--config", str(conf), cwd=base)
            assert opened.returncode == 0, opened.stderr
            assert json.loads(opened.stdout)["active"] == 1

        finally:
            shutil.rmtree(base, ignore_errors=True)



# -- the peer token ----------------------------------------------------------------------------------------

PEER_TOKEN = "wst_the-peer-token-every-unit-accepts"


class TestPeerToken:
    def test_peer_urls_must_be_origins(self) -> None:
        """Each [node] peer_urls entry is an http(s) origin; a path, another scheme or credentials are refused."""
        bad = "ftp://unit-1.example, https://unit-2.example/api, https://user:pw@unit-3.example"
        with pytest.raises(ConfigError) as caught:
            load_config(env={}, overrides={"node": {"unit": "26743", "agency_code": "000.00.17.H29",
                                                    "peer_urls": bad + ", https://unit-4.example:8443"}})  # fmt: skip
        problems = [p for p in caught.value.problems if "peer_urls" in p]
        assert len(problems) == 3 and all(u in " ".join(problems) for u in ("ftp://", "/api", "user:pw"))
        assert origin_of("HTTPS://Unit-4.example/api/v1/x") == "https://unit-4.example:443"

    async def test_a_link_on_a_foreign_host_does_not_get_the_peer_token(self, tmp_path: Path) -> None:
        """A Yjs client writes a document entry whose link has the right shape but names a host that is not
        a node; the fetcher must not send it the token every unit's node accepts."""
        seen: list[str] = []

        async def trap(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Authorization", ""))
            return web.Response(body=b"%PDF-1.4 trap")

        app = web.Application()
        app.router.add_get("/{tail:.*}", trap)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            trap_base = f"http://127.0.0.1:{runner.addresses[0][1]}"
            other_peer = "http://127.0.0.1:1"  # the list names some other node, not the trap
            config = make_config(tmp_path, peer_token=PEER_TOKEN, peer_urls=other_peer)
            async with running_node(config) as running:
                node, base, session = running
                code = (await create(running))["MaHoSo"]
                body = b"%PDF-1.4 trap"
                sha = hashlib.sha256(body).hexdigest()
                entry = {"TepDinhKemId": sha, "TenTepDinhKem": "to-khai.pdf", "Sha256": sha, "KichThuoc": len(body),
                         "DuongDanTaiTepTin": f"{trap_base}/api/v1/dossiers/{code}/documents/{sha}"}  # fmt: skip
                doc: Doc[Any] = Doc(client_id=test_ws.PEER_ID, guid=code)
                async with (
                    session.ws_connect(f"{base}/sync/v1/{code}") as socket,
                    Provider(doc, test_ws.AiohttpChannel(socket, code)) as provider,
                ):
                    await asyncio.wait_for(provider.synced.wait(), 5)
                    with doc.transaction():
                        ydoc.add_document(doc, entry)
                    for _ in range(50):  # until the record with the entry is stored
                        if (await node.store.fetchone(
                            "SELECT 1 FROM dossiers WHERE code = ? AND change_seq > 1", (code,)
                        )) is not None:
                            break
                        await asyncio.sleep(0.05)
                    for _ in range(3):
                        await node.fetcher.run_once()  # scans the changed record and tries what it queued
                    row = await node.store.fetchone("SELECT 1 FROM document_fetches WHERE sha256 = ?", (sha,))
                    assert row is None  # not even queued: the link is not on a listed peer
        finally:
            await runner.cleanup()
        assert PEER_TOKEN not in " ".join(seen), seen


# -- the intake cost of encryption at rest (bench/intake.py --at-rest) -------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_intake_benchmark_measures_sealed_against_clear(tmp_path: Path) -> None:
    """``bench/intake.py --at-rest`` runs the node with and without a keyring and reports the ratios."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "intake.py"), "--at-rest", "--seconds", "1.5", "--warmup", "0.5",
         "--clients", "4", "--json", "--check", "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=280, cwd=root, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]  # 1: a throughput or p99 target missed, not a failure
    report = json.loads(done.stdout)
    assert list(report["servers"]) == ["node-clear", "node"]
    clear, sealed = report["servers"]["node-clear"], report["servers"]["node"]
    assert clear["at_rest"]["sealed_values"] == 0 and clear["at_rest"]["clear_values"] > 0
    assert sealed["at_rest"]["clear_values"] == 0 and sealed["at_rest"]["sealed_values"] > 0
    assert clear["durable_ok"] and sealed["durable_ok"]
    at_rest = report["at_rest"]
    assert at_rest["store_ok"] and len(at_rest["rounds"]) == 1
    ratio = at_rest["rounds"][0]["sealed_over_clear"]
    assert ratio["accepts_per_s"] == round(sealed["accepts_per_s"] / clear["accepts_per_s"], 3)
    assert at_rest["median_sealed_over_clear"] == ratio
    assert list(tmp_path.iterdir()) == []  # every temporary directory removed
