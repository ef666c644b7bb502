"""Submitted documents: streamed uploads stored by sha256, served with ranges, fetched by the competent unit.

Real nodes on loopback, real stand-ins, and the chaos proxy cutting the competent unit's link to the
receiving unit's node part-way through every transfer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.app import Node
from node.config import load_config, render_config
from node.crypto import Keyring, write_keyring
from node.documents import CHUNK_BYTES
from node.fetcher import FetchSettings
from node.service import Merge
from simulations.chaos_proxy import ChaosProxy, ModeError, parse_mode
from sync import doc as ydoc
from tests.conftest import eventually, make_config, provision_token, running_node, valid_intake
from tests.test_failover import FAST
from tests.upstreams import Upstreams, running_upstreams, target_overrides

A_UNIT, A_AGENCY = "26743", "000.00.17.H29"  # Phường Bến Thành receives
B_UNIT, B_AGENCY = "26740", "000.00.18.H29"  # Phường Sài Gòn is competent
Running = tuple[Node, str, aiohttp.ClientSession]


async def create(n: Running, **fields: Any) -> str:
    _, url, s = n
    async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(**fields)) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["MaHoSo"])


async def upload(
    n: Running, code: str, data: bytes | Path, *, filename: str = "to-khai.pdf", **fields: str
) -> tuple[int, dict[str, Any], Any]:
    _, url, s = n
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    with contextlib.ExitStack() as stack:
        payload: Any = stack.enter_context(data.open("rb")) if isinstance(data, Path) else data
        form.add_field("file", payload, filename=filename, content_type="application/pdf")
        async with s.post(f"{url}/api/v1/dossiers/{code}/documents", data=form) as r:
            return r.status, dict(await r.json()), r.headers


def on_disk(node: Node, sha: str) -> Path:
    return node.config.data_path / "documents" / sha[:2] / sha


def sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_random(path: Path, size: int) -> str:
    """A file of random bytes written in chunks (never whole in memory); returns its sha256."""
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()



class TestUpload:
    """The desk uploads a file: stored under its hash, recorded in TaiLieuNop, served back with ranges."""

    async def test_upload_records_and_serves_the_file(self, tmp_path: Path) -> None:
        data = os.urandom(300_000)
        sha = hashlib.sha256(data).hexdigest()
        async with running_node(make_config(tmp_path, public_url="http://desk.example:8080/")) as n:
            node, url, s = n
            code = await create(n)
            status, body, headers = await upload(
                n, code, data, TenTepDinhKem="Tờ khai đăng ký khai sinh", MaThanhPhanHoSo="TK01", DuocSoHoa="1"
            )
            assert status == 201, body
            link = f"http://desk.example:8080/api/v1/dossiers/{code}/documents/{sha}"
            assert body["TaiLieuNop"] == [
                {
                    "TepDinhKemId": sha,
                    "TenTepDinhKem": "Tờ khai đăng ký khai sinh",
                    "MaThanhPhanHoSo": "TK01",
                    "DuocSoHoa": 1,
                    "Sha256": sha,
                    "KichThuoc": len(data),
                    "DuongDanTaiTepTin": link,
                }
            ]
            assert headers["Location"] == link
            assert on_disk(node, sha).read_bytes() == data
            async with s.get(f"{url}/api/v1/dossiers/{code}/documents/{sha}") as r:
                assert r.status == 200 and await r.read() == data
                assert r.headers["Content-Type"] == "application/octet-stream"  # no extension in the name
            async with s.get(f"{url}/api/v1/dossiers/{code}/documents/{sha}", headers={"Range": "bytes=1000-"}) as r:
                assert r.status == 206 and await r.read() == data[1000:]
            async with s.get(f"{url}/api/v1/dossiers/{code}/documents") as r:
                assert [d["stored"] for d in (await r.json())["items"]] == [True]
            async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                assert (await r.json())["TaiLieuNop"][0]["Sha256"] == sha

    async def test_the_same_file_again_changes_nothing_and_other_metadata_is_refused(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as n:
            node, _, _ = n
            code = await create(n)
            assert (await upload(n, code, b"%PDF-1.4 giay to"))[0] == 201
            head = node.service.journal_head
            status, body, _ = await upload(n, code, b"%PDF-1.4 giay to")
            assert status == 200 and len(body["TaiLieuNop"]) == 1
            assert node.service.journal_head == head
            status, body, _ = await upload(n, code, b"%PDF-1.4 giay to", filename="khac.pdf")
            assert status == 409 and body["error"]["code"] == "document_exists"

    async def test_the_json_body_limit_does_not_apply_and_the_document_limit_does(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, max_body_bytes=1024, max_document_bytes=64 * 1024)
        async with running_node(config) as n:
            node, _, _ = n
            code = await create(n)
            status, body, _ = await upload(n, code, os.urandom(60 * 1024))
            assert status == 201, body
            head = node.service.journal_head
            status, body, _ = await upload(n, code, os.urandom(65 * 1024))
            assert status == 413 and body["error"]["code"] == "body_too_large"
            assert node.service.journal_head == head
            stored = [p for p in (node.config.data_path / "documents").rglob("*") if p.is_file()]
            assert len(stored) == 1  # the refused upload left no file behind, not even a partial one

    async def test_refusals(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as n:
            node, url, s = n
            code = await create(n)
            assert (await upload(n, "000.00.17.H29-200101-9999", b"x"))[0] == 404
            async with s.post(f"{url}/api/v1/dossiers/{code}/documents", json={"file": "x"}) as r:
                assert r.status == 415
            form = aiohttp.FormData(default_to_multipart=True)
            form.add_field("TenTepDinhKem", "a.pdf")
            async with s.post(f"{url}/api/v1/dossiers/{code}/documents", data=form) as r:
                assert r.status == 422 and "file" in (await r.json())["error"]["fields"]
            status, body, _ = await upload(n, code, b"x", DuocSoHoa="2")
            assert status == 422 and "DuocSoHoa" in body["error"]["fields"]
            status, body, _ = await upload(n, code, b"x", Sha256="00")
            assert status == 422 and "Sha256" in body["error"]["fields"]
            other = hashlib.sha256(b"not listed").hexdigest()
            async with s.get(f"{url}/api/v1/dossiers/{code}/documents/{other}") as r:
                assert r.status == 404
            assert not list((node.config.data_path / "documents").rglob("*.tmp"))


class TestFetch:
    """A node that lacks a listed file fetches it, resumes a partial one with Range and checks the hash."""

    async def test_a_partial_file_resumes_and_a_corrupt_source_is_never_installed(self, tmp_path: Path) -> None:
        data = os.urandom(500_000)
        sha = hashlib.sha256(data).hexdigest()
        async with running_node(make_config(tmp_path / "a", public_url="")) as a:
            a_node, _, _ = a
            code = await create(a, MaDonViXuLy=B_UNIT)
            assert (await upload(a, code, data))[0] == 201
            token = await a_node.auth.create_token(["peer"], name="b")
            row = await a_node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            b_config = load_config(env={}, overrides={"node": {
                "unit": B_UNIT, "agency_code": B_AGENCY, "listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "b"), "peer_token": token, "peer_urls": a[1]}})
            async with running_node(b_config) as b:
                b_node = b[0]
                b_node.loops["documents"].stop()  # this test runs the fetcher's steps itself
                # A failed file is due again at once.
                b_node.fetcher.settings = FetchSettings(attempts=2, wait_initial_s=0.01, retry_base_s=0, retry_cap_s=0)
                # The source's copy is damaged (same size): the fetched bytes never reach the blob store.
                source = on_disk(a_node, sha)
                source.write_bytes(b"\0" * len(data))
                # As the dossier would arrive from an upstream.
                await b_node.service.merge(Merge(code, bytes(row[0]), origin="city"))
                await b_node.fetcher.run_once()
                assert not on_disk(b_node, sha).exists()
                pending = await b_node.fetcher.pending()
                assert [p["sha256"] for p in pending] == [sha] and "sha256" in pending[0]["last_error"]
                # A partial file is resumed where it stopped: only the rest crosses the link.
                source.write_bytes(data)
                partial = b_node.config.data_path / "documents" / ".partial" / f"{sha}.part"
                partial.write_bytes(data[:200_000])
                before = dict(b_node.fetcher.stats)
                await b_node.fetcher.run_once()
                assert sha_of(on_disk(b_node, sha)) == sha
                assert b_node.fetcher.stats["resumed"] == before["resumed"] + 1
                assert b_node.fetcher.stats["bytes"] - before["bytes"] == len(data) - 200_000
                assert await b_node.fetcher.pending() == [] and not partial.exists()

    async def test_without_a_peer_token_the_fetch_is_refused_and_retried_later(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path / "a")) as a:
            a_node = a[0]
            code = await create(a, MaDonViXuLy=B_UNIT)
            status, body, _ = await upload(a, code, b"%PDF-1.4 ho so")
            assert status == 201
            sha = body["TaiLieuNop"][0]["Sha256"]
            row = await a_node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            b_config = load_config(env={}, overrides={"node": {
                "unit": B_UNIT, "agency_code": B_AGENCY, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / "b"),
                "peer_urls": a[1]}})
            async with running_node(b_config) as b:
                b_node = b[0]
                b_node.loops["documents"].stop()  # this test runs the fetcher's steps itself
                await b_node.service.merge(Merge(code, bytes(row[0]), origin="city"))
                await b_node.fetcher.run_once()
                pending = await b_node.fetcher.pending()
                assert not on_disk(b_node, sha).exists()
                assert pending[0]["attempts"] == 1 and "401" in pending[0]["last_error"]
                assert pending[0]["next_at"] > b_node.clock.ms()


class TestLinksTheFetcherFollows:
    """The fetcher sends its peer token only to a node's link for that very document, and never on."""

    async def test_other_addresses_and_redirects_get_no_token(self, tmp_path: Path) -> None:
        seen: list[str] = []

        async def steal(request: web.Request) -> web.Response:
            seen.append(request.headers.get("Authorization", ""))
            return web.Response(body=b"0123456789")

        async def moved(request: web.Request) -> web.Response:
            raise web.HTTPFound("/steal")

        trap = web.Application()
        trap.router.add_get("/steal", steal)
        trap.router.add_get("/api/v1/dossiers/{code}/documents/{sha}", moved)
        runner = web.AppRunner(trap)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        trap_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with running_node(make_config(tmp_path / "a")) as a:
                a_node = a[0]
                code = await create(a, MaDonViXuLy=B_UNIT)
                row = await a_node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
                # The record as a peer or an upstream could have altered it: two entries naming the trap.
                doc = ydoc.load_doc(code, bytes(row[0]), 4242)
                elsewhere, redirected = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
                links = {
                    elsewhere: f"{trap_url}/steal",
                    redirected: f"{trap_url}/api/v1/dossiers/{code}/documents/{redirected}",
                }

                def add(d: Any) -> None:
                    for sha, url in links.items():
                        ydoc.add_document(d, {"TepDinhKemId": sha, "TenTepDinhKem": "x.pdf", "DuocSoHoa": 0,
                                              "Sha256": sha, "KichThuoc": 10, "DuongDanTaiTepTin": url})

                ydoc.change(doc, add)
                b_config = load_config(env={}, overrides={"node": {
                    "unit": B_UNIT, "agency_code": B_AGENCY, "listen": "127.0.0.1:0",
                    "data_dir": str(tmp_path / "b"), "peer_token": "ws_secret_peer_token",
                    # The trap is listed as a peer: what protects the token here is the link's shape and
                    # the refusal to follow redirects.
                    "peer_urls": trap_url}})
                async with running_node(b_config) as b:
                    b_node = b[0]
                    b_node.loops["documents"].stop()  # this test runs the fetcher's steps itself
                    result = await b_node.service.merge(Merge(code, doc.get_update(), origin="city"))
                    assert result.status in (200, 201)
                    await b_node.fetcher.run_once()
                    pending = {p["sha256"]: p for p in await b_node.fetcher.pending()}
                    # Not a document link: never queued. A link that redirects: tried, not followed.
                    assert set(pending) == {redirected}
                    assert "302" in pending[redirected]["last_error"]
                    assert seen == []
        finally:
            await runner.cleanup()


class TestEncryptedStores:
    """With encryption at rest on both nodes, upload, download and the competent unit's fetch all work."""

    async def test_upload_download_and_fetch(self, tmp_path: Path) -> None:
        data = os.urandom(200_000)
        sha = hashlib.sha256(data).hexdigest()
        keys = {}
        for unit in ("a", "b"):
            keys[unit] = tmp_path / f"keys-{unit}" / "wardsync.key"
            write_keyring(keys[unit], Keyring.new())
        async with running_node(make_config(tmp_path / "a", public_url="", key_file=str(keys["a"]))) as a:
            a_node, a_url, a_s = a
            code = await create(a, MaDonViXuLy=B_UNIT)
            status, body, _ = await upload(a, code, data, TenTepDinhKem="Giấy chứng sinh")
            assert status == 201, body
            async with a_s.get(f"{a_url}/api/v1/dossiers/{code}/documents") as r:
                assert r.status == 200 and [d["stored"] for d in (await r.json())["items"]] == [True]
            async with a_s.get(f"{a_url}/api/v1/dossiers/{code}/documents/{sha}") as r:
                assert r.status == 200 and await r.read() == data
            # The record at rest is sealed: the fetcher cannot look into it with SQL.
            row = await a_node.store.fetchone("SELECT state, typeof(record) FROM dossiers WHERE code = ?", (code,))
            assert row is not None and row[1] == "blob"
            token = await a_node.auth.create_token(["peer"], name="b")
            b_config = load_config(env={}, overrides={"node": {
                "unit": B_UNIT, "agency_code": B_AGENCY, "listen": "127.0.0.1:0",
                "data_dir": str(tmp_path / "b"), "peer_token": token, "key_file": str(keys["b"]),
                "peer_urls": a_url}})
            async with running_node(b_config) as b:
                b_node = b[0]
                b_node.loops["documents"].stop()  # this test runs the fetcher's steps itself
                state = a_node.store.sealer.state(code, row[0])
                await b_node.service.merge(Merge(code, state, origin="city"))
                await b_node.fetcher.run_once()
                assert sha_of(on_disk(b_node, sha)) == sha
                assert await b_node.fetcher.pending() == []


def _two_unit_config(tmp_path: Path, ups: Upstreams, unit: str, agency: str, **node: Any) -> Any:
    overrides = target_overrides(ups, timeout_s=1.0)
    overrides["targets.national"] = {**overrides["targets.national"], "dstcode": agency, "madonvi": agency}
    return load_config(env={}, overrides={
        "node": {"unit": unit, "agency_code": agency, "listen": "127.0.0.1:0", "data_dir": str(tmp_path / unit),
                 **node},
        **overrides,
        "failover": {**FAST, "hold_s": 1.0},
    })


@contextlib.asynccontextmanager
async def proxied(a_config_of: Callable[[str], Any]) -> AsyncIterator[tuple[ChaosProxy, Running]]:
    """Node A behind a chaos proxy whose URL is A's public URL (A's port is known only once it listens)."""
    async with ChaosProxy("127.0.0.1", 9) as proxy, running_node(a_config_of(proxy.url)) as a:
        proxy.upstream_port = int(a[1].rsplit(":", 1)[1])
        yield proxy, a


class TestBoundaryFreeDocuments:
    """A large file uploaded at A reaches B, the competent unit, across a link that keeps breaking."""

    async def test_large_upload_streamed_and_fetched_across_a_failing_link(self, tmp_path: Path) -> None:
        size = 8 * 1024 * 1024
        source = tmp_path / "giay-to.pdf"
        sha = write_random(source, size)
        async with running_upstreams(tmp_path) as ups, proxied(
            lambda public: _two_unit_config(tmp_path, ups, A_UNIT, A_AGENCY, public_url=public)
        ) as (proxy, a):
            a_node = a[0]
            token = await a_node.auth.create_token(["peer"], name=f"unit {B_UNIT}")
            b_config = _two_unit_config(tmp_path, ups, B_UNIT, B_AGENCY, peer_token=token, peer_urls=proxy.url)
            async with running_node(b_config) as b:
                b_node = b[0]
                code = await create(a, MaDonViXuLy=B_UNIT)
                # Every connection through the link breaks after 1 MiB towards B.
                await proxy.set_mode("cut", after_bytes=1024 * 1024)
                tracemalloc.start()
                try:
                    status, body, _ = await upload(a, code, source, TenTepDinhKem="Giấy chứng sinh")
                    assert status == 201, body
                    assert sha_of(on_disk(a_node, sha)) == sha

                    async def b_holds_it() -> bool:
                        return on_disk(b_node, sha).is_file()

                    await eventually(b_holds_it, within_s=60, what="B fetches the file from A")
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                assert sha_of(on_disk(b_node, sha)) == sha
                stats = b_node.fetcher.stats
                assert proxy.counters.reset >= 4  # the link broke again and again
                assert stats["resumed"] >= 4  # and each time the fetch went on from where it stopped
                assert stats["bytes"] == size  # nothing fetched twice
                assert stats["largest_read"] <= CHUNK_BYTES
                # Neither the upload nor the fetch held the file in memory (both ran in this process).
                assert peak < size // 2, f"peak traced memory {peak} bytes for a {size}-byte file"

                # B serves the file it fetched, and every replica holds the same record.
                async with b[2].get(f"{b[1]}/api/v1/dossiers/{code}/documents/{sha}",
                                    headers={"Range": f"bytes={size - 10}-"}) as r:
                    assert r.status == 206 and len(await r.read()) == 10

                async def converged() -> bool:
                    digests = []
                    for _, url, s in (a, b):
                        async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                            digests.append((await r.json())["digest"] if r.status == 200 else None)
                    for target in ("national", "city"):
                        digests.append((await ups.dossiers(target, A_UNIT)).get(code))
                    return None not in digests and len(set(digests)) == 1

                await eventually(converged, what="A, B and both upstreams hold the same record")
                async with ups.http.get(f"{ups.national_url}/__inspect/dossiers", params={"unit": A_UNIT}) as r:
                    assert r.status == 200
                row = await b_node.store.fetchone("SELECT record FROM dossiers WHERE code = ?", (code,))
                (doc,) = json.loads(row[0])["TaiLieuNop"]
                assert doc["Sha256"] == sha and doc["KichThuoc"] == size
                assert doc["DuongDanTaiTepTin"].startswith(proxy.url)


async def portal_record(ups: Upstreams, agency: str, code: str) -> dict[str, Any]:
    """The record the national stand-in holds, looked up as a portal client does (TraCuuHoSo)."""
    from node.config import DEMO_PASSWORD, DEMO_USERNAME

    login = {"username": DEMO_USERNAME, "password": DEMO_PASSWORD}
    async with ups.http.post(f"{ups.national_url}/login", json=login, headers={"dstcode": agency}) as r:
        session = (await r.json())["session"]
    body = {"session": session, "madonvi": agency, "service": "TraCuuHoSo", "mahoso": code}
    async with ups.http.post(f"{ups.national_url}/integration", json=body) as r:
        answer = await r.json()
    assert str(answer["error_code"]) == "0", answer
    return dict(answer["data"])


class TestUpstreamsAndAccess:
    """An upload replicates: both stand-ins hold TaiLieuNop with a link that serves the file to a peer."""

    async def test_upload_reaches_both_upstreams_and_the_link_needs_a_peer_role(self, tmp_path: Path) -> None:
        data = os.urandom(150_000)
        sha = hashlib.sha256(data).hexdigest()
        async with running_upstreams(tmp_path) as ups:
            config = _two_unit_config(tmp_path, ups, A_UNIT, A_AGENCY)
            async with running_node(config) as a:
                a_node, a_url, _ = a
                code = await create(a)
                status, body, _ = await upload(a, code, data, TenTepDinhKem="Giấy chứng sinh", MaThanhPhanHoSo="GCS")
                assert status == 201, body
                digest = body["digest"]

                async def both_hold_it() -> bool:
                    held = [(await ups.dossiers(t, A_UNIT)).get(code) for t in ("national", "city")]
                    return held == [digest, digest]

                # Equal digests: the city system holds the same TaiLieuNop as the node.
                await eventually(both_hold_it, what="both upstreams hold the record with the document")
                (doc,) = (await portal_record(ups, A_AGENCY, code))["TaiLieuNop"]
                assert doc["TepDinhKemId"] == sha and doc["TenTepDinhKem"] == "Giấy chứng sinh"
                assert doc["MaThanhPhanHoSo"] == "GCS" and doc["KichThuoc"] == len(data)
                link = doc["DuongDanTaiTepTin"]
                assert link == f"{a_url}/api/v1/dossiers/{code}/documents/{sha}"

                # Whoever follows the link needs a token with a role that may read files.
                async with aiohttp.ClientSession() as other:
                    async with other.get(link) as r:
                        assert r.status == 401
                    for role, expected in (("peer", 200), ("clerk", 200), ("operator", 200), ("drill", 403),
                                           ("read-only", 403)):
                        token = await a_node.auth.create_token([role], name=role)
                        async with other.get(link, headers={"Authorization": f"Bearer {token}"}) as r:
                            assert r.status == expected, role
                            if expected == 200:
                                assert hashlib.sha256(await r.read()).hexdigest() == sha
                                assert r.headers["Repr-Digest"].startswith("sha-256=:")
                    # Another node may read files, never add them.
                    peer = await a_node.auth.create_token(["peer"], name="peer")
                    form = aiohttp.FormData()
                    form.add_field("file", b"%PDF-1.4 khac", filename="khac.pdf")
                    async with other.post(f"{a_url}/api/v1/dossiers/{code}/documents", data=form,
                                          headers={"Authorization": f"Bearer {peer}"}) as r:
                        assert r.status == 403


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss(pid: int, field: str = "VmHWM") -> int:
    """The process's peak (VmHWM) or current (VmRSS) resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def _reset_peak_rss(pid: int) -> int:
    """Start the process's peak resident set afresh from its current one (Linux), and return that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _rss(pid, "VmRSS")


class _Served:
    """``wardsync serve`` as a process of its own, so its memory is its own."""

    def __init__(self, root: Path, ups: Upstreams, unit: str, agency: str, node_extra: str) -> None:
        self.root = root
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        text = render_config(
            unit=unit,
            agency_code=agency,
            listen=f"127.0.0.1:{self.port}",
            data_dir=str(root / "data"),
            national_url=ups.national_url,
            city_url=ups.city_url,
        )
        fast = (
            "tick_s = 0.2\nretry_base_s = 0.05\nretry_cap_s = 0.5\npull_tick_s = 0.2\nstandby_pull_s = 0.5\n"
            "pull_idle_max_s = 0.8\n"
        )
        text = text.replace("[replication]\n", "[replication]\n" + fast, 1)
        text = text.replace("timeout_s = 10.0", "timeout_s = 2.0")
        text = text.replace("shutdown_timeout_s = 30.0\n", "shutdown_timeout_s = 2.0\n" + node_extra, 1)
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "wardsync.toml"
        self.config.write_text(text, encoding="utf-8")
        self.config.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    def token(self, roles: str) -> str:
        return provision_token(self.config, roles=roles)

    def spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
        with (self.root / "out.log").open("wb") as out, (self.root / "err.log").open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "serve", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=self.root,
            )

    async def start(self) -> None:
        self.spawn()

        async def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.logs()
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.base}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, within_s=30, what=f"node at {self.base} ready")

    def logs(self) -> str:
        return "".join((self.root / n).read_text(errors="replace")[-3000:] for n in ("out.log", "err.log"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@pytest.mark.slow  # two node processes, 48 MiB: 20 to 50 s here; TestBoundaryFreeDocuments is the short version
class TestLargeFileBetweenProcesses:
    """Tens of MiB uploaded to one node process and fetched by another through a link that keeps breaking;
    neither process's peak memory grows by anything like the file's size."""

    async def test_large_file_streams_and_resumes(self, tmp_path: Path) -> None:
        size = 48 * 1024 * 1024
        source = tmp_path / "ban-scan.pdf"
        sha = write_random(source, size)
        warm = os.urandom(512 * 1024)
        async with running_upstreams(tmp_path) as ups, ChaosProxy("127.0.0.1", 9) as proxy:
            a = _Served(tmp_path / "a", ups, A_UNIT, A_AGENCY,
                        f'max_document_bytes = {64 * 1024 * 1024}\npublic_url = "{proxy.url}"\n')
            proxy.upstream_port = a.port
            peer = a.token("peer")
            clerk = a.token("clerk")
            b = _Served(tmp_path / "b", ups, B_UNIT, B_AGENCY, f'peer_token = "{peer}"\npeer_urls = "{proxy.url}"\n')
            b_clerk = b.token("clerk")
            try:
                await a.start()
                await b.start()
                async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {clerk}"}) as s:
                    n: Running = (None, a.base, s)  # type: ignore[assignment]  # create/upload use url and session only
                    b_dir = tmp_path / "b" / "data" / "documents"

                    async def fetched(digest: str) -> Callable[[], Awaitable[bool]]:
                        async def check() -> bool:
                            return (b_dir / digest[:2] / digest).is_file()

                        return check

                    # Warm both processes up on a small file (code paths loaded, pools and caches filled).
                    code = await create(n, MaDonViXuLy=B_UNIT)
                    assert (await upload(n, code, warm))[0] == 201
                    await eventually(await fetched(hashlib.sha256(warm).hexdigest()), within_s=60,
                                     what="B fetches the small file")
                    # From here the peak counts only what the large file makes each process hold.
                    base_a, base_b = _reset_peak_rss(a.pid), _reset_peak_rss(b.pid)
                    assert _rss(a.pid) - base_a < 1024 * 1024  # the reset took

                    # Every connection on the link breaks after 4 MiB towards B.
                    await proxy.set_mode("cut", after_bytes=4 * 1024 * 1024)
                    down_before = proxy.counters.bytes_down
                    code = await create(n, MaDonViXuLy=B_UNIT)
                    started = time.monotonic()
                    status, body, _ = await upload(n, code, source, TenTepDinhKem="Bản scan hồ sơ")
                    uploaded_s = time.monotonic() - started
                    assert status == 201, body
                    assert body["TaiLieuNop"][0]["KichThuoc"] == size
                    await eventually(await fetched(sha), within_s=90, what="B fetches the large file")
                    fetched_s = time.monotonic() - started
                    grown_a, grown_b = _rss(a.pid) - base_a, _rss(b.pid) - base_b
                assert sha_of(b_dir / sha[:2] / sha) == sha
                assert sha_of(tmp_path / "a" / "data" / "documents" / sha[:2] / sha) == sha
                # 48 MiB through a link cut every 4 MiB: at least 11 broken connections. A fetch that started
                # over on each would never finish; each resumed with Range. The proxy counts bytes it handed to
                # the socket: a reset also throws away what sat unread in B's receive buffer, so somewhat more
                # than the file crossed, but nowhere near the file twice.
                assert proxy.counters.reset >= size // (4 * 1024 * 1024) - 1
                down = proxy.counters.bytes_down - down_before
                assert size <= down < size * 3 // 2, down
                print(
                    f"\n{size >> 20} MiB: upload {uploaded_s:.1f} s, fetched by B after {fetched_s:.1f} s across "
                    f"{proxy.counters.reset} cuts, {down} bytes through the link; peak RSS growth "
                    f"A {grown_a / 2**20:.1f} MiB, B {grown_b / 2**20:.1f} MiB"
                )
                assert grown_a < size // 4, f"A's peak RSS grew by {grown_a} bytes for a {size}-byte upload"
                assert grown_b < size // 4, f"B's peak RSS grew by {grown_b} bytes for a {size}-byte fetch"
                # B serves what it fetched to its own clerks.
                async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {b_clerk}"}) as s, s.get(
                    f"{b.base}/api/v1/dossiers/{code}/documents/{sha}", headers={"Range": f"bytes={size - 16}-"}
                ) as r:
                    assert r.status == 206 and len(await r.read()) == 16
            finally:
                a.stop()
                b.stop()


class TestCutMode:
    """The chaos proxy's cut mode: each connection is reset after a number of bytes towards the client."""

    def test_cut_needs_a_positive_byte_count(self) -> None:
        assert parse_mode({"mode": "cut", "after_bytes": 10}, 0.0).name == "cut"
        for spec in ({"mode": "cut"}, {"mode": "cut", "after_bytes": 0}, {"mode": "cut", "ms": 1}):
            with pytest.raises(ModeError):
                parse_mode(spec, 0.0)
