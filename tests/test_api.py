"""The node's HTTP API over a real loopback socket, backed by a real SQLite file."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from datetime import date, timedelta
from typing import Any

import aiohttp
import pytest

from node.app import Node
from node.clock import Clock, local
from node.registry import units
from node.store import Store
from sync.record import digest
from tests.conftest import AGENCY, UNIT, running_node, valid_intake

DOSSIERS = "/api/v1/dossiers"
OTHER_UNIT = next(u.code for u in units() if u.code != UNIT)
CODE_RE = re.compile(rf"^{re.escape(AGENCY)}-(\d{{6}})-(\d{{4,}})$")

Running = tuple[Node, str, aiohttp.ClientSession]


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | str | None = None,
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"headers": headers}
    if data is not None:
        kwargs["data"] = data
    elif body is not None:
        kwargs["json"] = body
    async with session.request(method, url, **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def intake(running: Running, body: dict[str, Any] | None = None, **headers: str) -> dict[str, Any]:
    _, base, session = running
    status, reply = await call(session, "POST", base + DOSSIERS, body or valid_intake(), headers=headers or None)
    assert status == 201, reply
    return reply  # type: ignore[no-any-return]


async def add_step(running: Running, code: str, step: dict[str, Any]) -> tuple[int, Any]:
    _, base, session = running
    return await call(session, "POST", f"{base}{DOSSIERS}/{code}/steps", step)


async def changes(running: Running, since: int = 0, limit: int = 1000) -> dict[str, Any]:
    _, base, session = running
    status, reply = await call(session, "GET", f"{base}/api/v1/changes?since={since}&limit={limit}")
    assert status == 200, reply
    return reply  # type: ignore[no-any-return]


async def fetch(running: Running, code: str) -> dict[str, Any]:
    """GET one dossier; its record part, without the per-target replication state."""
    _, base, session = running
    status, reply = await call(session, "GET", f"{base}{DOSSIERS}/{code}")
    assert status == 200, reply
    assert isinstance(reply.pop("replication"), dict)
    reply.pop("TinhTrangHan"), reply.pop("NgayHenTraHieuLuc")  # the deadline standing, computed on reading
    return reply  # type: ignore[no-any-return]


async def journal_length(node: Node) -> int:
    row = await node.store.fetchone("SELECT count(*) FROM journal")
    assert row is not None
    return int(row[0])


def sequence_of(code: str) -> int:
    match = CODE_RE.match(code)
    assert match, code
    return int(match.group(2))


def day_of(reply: dict[str, Any]) -> str:
    """The YYMMDD a dossier's code must carry: its receipt date (NgayTiepNhan is local time)."""
    return str(reply["NgayTiepNhan"][2:8])


def assert_envelope(status: int, reply: Any) -> dict[str, Any]:
    assert 400 <= status < 500, (status, reply)
    assert isinstance(reply, dict) and set(reply) == {"error"}, reply
    error = reply["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["fields"], dict)
    return error  # type: ignore[no-any-return]


class TestRoundTrip:
    """A dossier goes in once and reads back the same everywhere."""

    async def test_intake_answers_with_code_status_and_digest(self, node_server: Running) -> None:
        """The 201 carries the minted code, the receipt time, status 2 and the record's digest."""
        reply = await intake(node_server)
        assert reply["MaHoSo"] == f"{AGENCY}-{day_of(reply)}-0001"
        assert re.fullmatch(r"\d{14}", reply["NgayTiepNhan"])
        assert reply["TrangThaiHoSo"] == 2
        assert reply["MaDonViTiepNhan"] == UNIT
        assert reply["MaDonViXuLy"] == UNIT
        assert [s["TrangThai"] for s in reply["QuaTrinhXuLy"]] == [2]
        assert reply["ChuHoSo"] == valid_intake()["ChuHoSo"]
        record = {k: v for k, v in reply.items() if k != "digest"}
        assert reply["digest"] == digest(record)

    async def test_get_list_and_changes_show_the_same_dossier(self, node_server: Running) -> None:
        """GET by code, the list and the change feed all agree with the intake answer."""
        _, base, session = node_server
        created = await intake(node_server)
        code = created["MaHoSo"]

        status, got = await call(session, "GET", f"{base}{DOSSIERS}/{code}")
        assert status == 200
        assert got.pop("replication") == {}  # this node has no upstream targets
        assert got.pop("TinhTrangHan") == "on_time" and got.pop("NgayHenTraHieuLuc") == got["NgayHenTra"]
        assert got == created

        status, page = await call(session, "GET", base + DOSSIERS)
        assert status == 200
        assert page == {"items": [created], "next_cursor": None}

        feed = await changes(node_server)
        assert [(i["code"], i["status"], i["digest"]) for i in feed["items"]] == [(code, 2, created["digest"])]
        assert feed["next"] == feed["items"][0]["seq"]


class TestCodeMinting:
    """Dossier codes are unique, consecutive per day, and survive restarts."""

    async def test_thousand_concurrent_intakes_get_consecutive_codes_in_few_batches(self, config: Any) -> None:
        """1,000 concurrent intakes mint 0001..1000 once each, sharing group-commit transactions."""
        async with running_node(config, connections=100) as running:
            node = running[0]
            replies = await asyncio.gather(*(intake(running) for _ in range(1000)))
            codes = [r["MaHoSo"] for r in replies]
            assert len(set(codes)) == 1000
            days = {day_of(r) for r in replies}
            assert len(days) == 1, "the run crossed midnight"
            assert sorted(sequence_of(c) for c in codes) == list(range(1, 1001))
            assert all(CODE_RE.match(c).group(1) in days for c in codes)  # type: ignore[union-attr]
            assert node.service.writer.batches < 1000
            assert len((await changes(running))["items"]) == 1000

    async def test_sequence_continues_after_restart(self, config: Any) -> None:
        """A restarted node on the same store continues the day's sequence instead of reusing codes."""
        async with running_node(config) as running:
            first = [await intake(running) for _ in range(3)]
        async with running_node(config) as running:
            after = await intake(running)
            old = await fetch(running, first[0]["MaHoSo"])
        assert [sequence_of(r["MaHoSo"]) for r in first] == [1, 2, 3]
        assert after["MaHoSo"] == f"{AGENCY}-{day_of(first[0])}-0004"
        assert old == first[0]

    async def test_new_day_starts_at_0001_after_restart(self, config: Any) -> None:
        """A node restarted on the next day mints that day's first code."""
        async with running_node(config) as running:
            today = await intake(running)
            await intake(running)
        async with running_node(config, Clock(offset=timedelta(days=1))) as running:
            tomorrow = await intake(running)
        assert tomorrow["MaHoSo"] == f"{AGENCY}-{day_of(tomorrow)}-0001"
        as_date = [date(2000 + int(d[:2]), int(d[2:4]), int(d[4:])) for d in (day_of(today), day_of(tomorrow))]
        assert as_date[1] - as_date[0] == timedelta(days=1)

    async def test_new_day_starts_at_0001_on_a_running_node(self, node_server: Running) -> None:
        """When the clock passes midnight the running node starts the new day's sequence."""
        node = node_server[0]
        today = [await intake(node_server) for _ in range(2)]
        node.clock.offset = timedelta(days=1)
        tomorrow = [await intake(node_server) for _ in range(2)]
        assert day_of(tomorrow[0]) != day_of(today[0])
        assert [r["MaHoSo"] for r in tomorrow] == [f"{AGENCY}-{day_of(tomorrow[0])}-{n:04d}" for n in (1, 2)]

    async def test_sequence_widens_past_9999(self, config: Any) -> None:
        """Past 9,999 in a day the code grows a fifth digit; both codes are retrievable."""
        async with Store(config.db_path):
            pass  # create the schema
        day = local(Clock().now()).strftime("%y%m%d")
        with sqlite3.connect(config.db_path) as conn:
            conn.execute("INSERT INTO day_counters (agency, day, last) VALUES (?, ?, 9998)", (AGENCY, day))
        conn.close()
        async with running_node(config) as running:
            replies = [await intake(running) for _ in range(2)]
            assert [r["MaHoSo"] for r in replies] == [f"{AGENCY}-{day}-9999", f"{AGENCY}-{day}-10000"]
            for reply in replies:
                assert await fetch(running, reply["MaHoSo"]) == reply


class TestIdempotency:
    """An Idempotency-Key makes a retried intake safe."""

    async def test_retry_returns_first_answer_and_creates_nothing(self, node_server: Running) -> None:
        """The same key and body returns the identical first response and stores no second dossier."""
        _, base, session = node_server
        headers = {"Idempotency-Key": "desk-3:2025-07-01:17"}
        first = await call(session, "POST", base + DOSSIERS, valid_intake(), headers=headers)
        before = await changes(node_server)
        retry = await call(session, "POST", base + DOSSIERS, valid_intake(), headers=headers)
        assert first[0] == 201
        assert retry == first
        assert await changes(node_server) == before
        assert len(before["items"]) == 1

    async def test_same_key_other_body_is_refused(self, node_server: Running) -> None:
        """Reusing a key for a different body is a 422 idempotency_key_reused and stores nothing."""
        _, base, session = node_server
        headers = {"Idempotency-Key": "k-1"}
        await intake(node_server, valid_intake(), **headers)
        other = valid_intake(ChuHoSo="Lê Văn Tám")
        status, reply = await call(session, "POST", base + DOSSIERS, other, headers=headers)
        assert status == 422
        assert assert_envelope(status, reply)["code"] == "idempotency_key_reused"
        assert len((await changes(node_server))["items"]) == 1

    async def test_concurrent_requests_with_one_key_make_one_dossier(self, node_server: Running) -> None:
        """Requests racing with the same key all get the one dossier's code."""
        replies = await asyncio.gather(*(intake(node_server, valid_intake(), **{"Idempotency-Key": "race"})
                                         for _ in range(10)))
        assert len({r["MaHoSo"] for r in replies}) == 1
        assert len((await changes(node_server))["items"]) == 1

    async def test_malformed_key_is_a_400(self, node_server: Running) -> None:
        """A key with spaces is refused before anything is written."""
        _, base, session = node_server
        status, reply = await call(session, "POST", base + DOSSIERS, valid_intake(),
                                   headers={"Idempotency-Key": "has space"})
        assert status == 400
        assert assert_envelope(status, reply)["code"] == "invalid_idempotency_key"
        assert (await changes(node_server))["items"] == []


class TestSteps:
    """Processing steps follow the status machine."""

    async def test_legal_path_to_result_returned(self, node_server: Running) -> None:
        """2 → 4 → 9 → 10 ends in status 10 with NgayTra and NgayKetThucXuLy set."""
        code = (await intake(node_server))["MaHoSo"]
        times = {4: "20300101080000", 9: "20300102080000", 10: "20300103080000"}
        for status_code, at in times.items():
            status, reply = await add_step(node_server, code, {"TrangThai": status_code, "NguoiXuLy": "Trần Văn Bình",
                                                              "ThoiDiemXuLy": at})
            assert status == 201, reply
            assert reply["TrangThaiHoSo"] == status_code
        assert reply["NgayTra"] == times[10]
        assert reply["NgayKetThucXuLy"] == times[9]
        assert [s["TrangThai"] for s in reply["QuaTrinhXuLy"]] == [2, 4, 9, 10]
        assert reply["digest"] == digest({k: v for k, v in reply.items() if k != "digest"})
        assert await fetch(node_server, code) == reply

    async def test_illegal_transition_is_a_409_listing_allowed_statuses(self, node_server: Running) -> None:
        """2 → 9 is refused with the statuses allowed from 2, and nothing is journalled."""
        node = node_server[0]
        code = (await intake(node_server))["MaHoSo"]
        journal = await journal_length(node)
        status, reply = await add_step(node_server, code, {"TrangThai": 9, "NguoiXuLy": "Trần Văn Bình"})
        assert status == 409
        error = assert_envelope(status, reply)
        assert error["code"] == "illegal_transition"
        assert error["allowed"] == [4, 7]
        assert await journal_length(node) == journal

    async def test_repeated_step_is_a_200_without_a_new_journal_entry(self, node_server: Running) -> None:
        """Posting the same step twice answers 200 the second time and journals it once."""
        node = node_server[0]
        code = (await intake(node_server))["MaHoSo"]
        step = {"TrangThai": 4, "NguoiXuLy": "Trần Văn Bình", "ThoiDiemXuLy": "20300101080000"}
        first = await add_step(node_server, code, step)
        journal = await journal_length(node)
        again = await add_step(node_server, code, step)
        assert first[0] == 201
        assert again == (200, first[1])
        assert await journal_length(node) == journal

    async def test_step_on_unknown_dossier_is_a_404(self, node_server: Running) -> None:
        """A step for a code this node never stored is a 404."""
        status, reply = await add_step(node_server, f"{AGENCY}-250701-0042", {"TrangThai": 4, "NguoiXuLy": "A"})
        assert status == 404
        assert assert_envelope(status, reply)["code"] == "not_found"


class TestFees:
    """Fees are append-only."""

    async def test_add_repeat_and_conflict(self, node_server: Running) -> None:
        """A new fee is 201, the identical repeat 200, a different amount under the same code 409."""
        node, base, session = node_server
        code = (await intake(node_server))["MaHoSo"]
        fee = {"TenPhiLePhi": "Lệ phí đăng ký", "MaPhiLePhi": "LP01", "Gia": 8000, "HinhThucThu": 1}
        url = f"{base}{DOSSIERS}/{code}/fees"
        status, added = await call(session, "POST", url, fee)
        assert status == 201, added
        assert added["DanhSachLePhi"] == [fee]
        journal = await journal_length(node)

        assert await call(session, "POST", url, fee) == (200, added)
        status, reply = await call(session, "POST", url, {**fee, "Gia": 9000})
        assert status == 409
        assert assert_envelope(status, reply)["code"] == "fee_exists"
        assert await journal_length(node) == journal
        assert (await fetch(node_server, code))["DanhSachLePhi"] == [fee]


class TestListing:
    """Listing filters and pages; the change feed is ordered by local sequence."""

    async def test_filters(self, node_server: Running) -> None:
        """status, competent_unit and updated_since each select exactly the matching dossiers."""
        _, base, session = node_server
        own = await intake(node_server)
        other = await intake(node_server, valid_intake(MaDonViXuLy=OTHER_UNIT))
        await asyncio.sleep(0.01)  # updated_at has millisecond resolution
        moved = await intake(node_server)
        status, reply = await add_step(node_server, moved["MaHoSo"], {"TrangThai": 4, "NguoiXuLy": "Trần Văn Bình"})
        assert status == 201, reply
        updated_at = {i["code"]: i["updated_at"] for i in (await changes(node_server))["items"]}

        async def codes(query: str) -> list[str]:
            status, page = await call(session, "GET", f"{base}{DOSSIERS}?{query}")
            assert status == 200, page
            return [item["MaHoSo"] for item in page["items"]]

        assert await codes("status=4") == [moved["MaHoSo"]]
        assert await codes("status=2") == [own["MaHoSo"], other["MaHoSo"]]
        assert await codes(f"competent_unit={OTHER_UNIT}") == [other["MaHoSo"]]
        assert await codes(f"competent_unit={UNIT}") == [own["MaHoSo"], moved["MaHoSo"]]
        since = updated_at[moved["MaHoSo"]]
        assert await codes(f"updated_since={since}") == [moved["MaHoSo"]]
        assert await codes("updated_since=20000101000000") == [own["MaHoSo"], other["MaHoSo"], moved["MaHoSo"]]
        assert await codes("updated_since=2100-01-01T00:00:00%2B07:00") == []
        assert await codes(f"status=2&competent_unit={UNIT}") == [own["MaHoSo"]]

    async def test_cursor_pagination_visits_every_dossier_once(self, node_server: Running) -> None:
        """Following next_cursor with a small page size yields every dossier exactly once, in order."""
        _, base, session = node_server
        created = [(await intake(node_server))["MaHoSo"] for _ in range(23)]
        seen: list[str] = []
        url = f"{base}{DOSSIERS}?limit=5"
        pages = 0
        while True:
            status, page = await call(session, "GET", url)
            assert status == 200, page
            pages += 1
            assert len(page["items"]) <= 5
            seen += [item["MaHoSo"] for item in page["items"]]
            if page["next_cursor"] is None:
                break
            url = f"{base}{DOSSIERS}?limit=5&cursor={page['next_cursor']}"
        assert seen == created
        assert pages == 5

    async def test_changes_since_returns_only_later_changes_in_order(self, node_server: Running) -> None:
        """changes?since=N lists the dossiers changed after N, ordered by sequence."""
        first = [await intake(node_server) for _ in range(3)]
        mark = (await changes(node_server))["next"]
        status, _ = await add_step(node_server, first[0]["MaHoSo"], {"TrangThai": 4, "NguoiXuLy": "Trần Văn Bình"})
        assert status == 201
        later = await intake(node_server)

        feed = await changes(node_server, since=mark)
        assert [i["code"] for i in feed["items"]] == [first[0]["MaHoSo"], later["MaHoSo"]]
        assert [i["status"] for i in feed["items"]] == [4, 2]
        seqs = [i["seq"] for i in feed["items"]]
        assert seqs == sorted(seqs) and seqs[0] > mark
        assert feed["next"] == seqs[-1]
        assert (await changes(node_server, since=feed["next"]))["items"] == []
        paged = await changes(node_server, since=mark, limit=1)
        assert [i["code"] for i in paged["items"]] == [first[0]["MaHoSo"]]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_INTAKES: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    # (id, request kwargs, status, error code, field that must be named)
    ("malformed-json", {"data": '{"MaTTHC": ', "headers": {"Content-Type": "application/json"}}, 400,
     "malformed_json", None),
    ("not-utf8", {"data": b'{"ChuHoSo": "\xff"}', "headers": {"Content-Type": "application/json"}}, 400,
     "malformed_json", None),
    ("array-body", {"json": [valid_intake()]}, 422, "validation_failed", "$"),
    ("string-body", {"json": "hồ sơ"}, 422, "validation_failed", "$"),
    ("text-plain", {"data": "{}", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type", None),
    ("no-content-type", {"data": b"{}"}, 415, "unsupported_media_type", None),
    ("nested-10000", {"data": _nested(10000), "headers": {"Content-Type": "application/json"}}, 400,
     "malformed_json", None),
    ("nested-40", {"data": _nested(40), "headers": {"Content-Type": "application/json"}}, 400,
     "malformed_json", None),
    ("unknown-field", {"json": valid_intake(MaHoSoCu="x")}, 422, "validation_failed", "MaHoSoCu"),
    ("node-field", {"json": valid_intake(MaHoSo="000.00.17.H29-250701-0001")}, 422, "validation_failed", "MaHoSo"),
    ("bool-for-int", {"json": valid_intake(KenhThucHien=True)}, 422, "validation_failed", "KenhThucHien"),
    ("string-for-int", {"json": valid_intake(LoaiDoiTuong="1")}, 422, "validation_failed", "LoaiDoiTuong"),
    ("int-for-string", {"json": valid_intake(ChuHoSo=42)}, 422, "validation_failed", "ChuHoSo"),
    ("missing-required", {"json": {k: v for k, v in valid_intake().items() if k != "TrichYeuHoSo"}}, 422,
     "validation_failed", "TrichYeuHoSo"),
    ("bad-citizen-id", {"json": valid_intake(SoGiayToChuHoSo="07919")}, 422, "validation_failed",
     "SoGiayToChuHoSo"),
    ("unknown-competent-unit", {"json": valid_intake(MaDonViXuLy="99999")}, 422, "validation_failed",
     "MaDonViXuLy"),
]


BAD_QUERIES = [
    f"{DOSSIERS}?limit=abc",
    f"{DOSSIERS}?limit=0",
    f"{DOSSIERS}?limit=501",
    f"{DOSSIERS}?status=11",
    f"{DOSSIERS}?status=true",
    f"{DOSSIERS}?competent_unit=abc",
    f"{DOSSIERS}?updated_since=yesterday",
    f"{DOSSIERS}?cursor=not-a-cursor",
    f"{DOSSIERS}?colour=red",
    "/api/v1/changes?since=-1",
    "/api/v1/changes?since=1e3",
    "/api/v1/changes?limit=99999999999999999999999",
]


class TestBadInput:
    """Every bad request gets a 4xx JSON error envelope, never a 500, and stores nothing."""

    @pytest.mark.parametrize(("kwargs", "status", "code", "field"),
                             [case[1:] for case in BAD_INTAKES], ids=[case[0] for case in BAD_INTAKES])
    async def test_bad_intake_body(
        self, node_server: Running, kwargs: dict[str, Any], status: int, code: str, field: str | None
    ) -> None:
        """Each malformed or invalid intake body is refused with the right status, code and field."""
        _, base, session = node_server
        async with session.post(base + DOSSIERS, **kwargs) as resp:
            assert resp.content_type == "application/json"
            got, reply = resp.status, await resp.json()
        error = assert_envelope(got, reply)
        assert (got, error["code"]) == (status, code), reply
        if field is not None:
            assert field in error["fields"], error
        assert (await changes(node_server))["items"] == []

    async def test_every_problem_is_named_at_once(self, node_server: Running) -> None:
        """A body with several problems names each invalid field in error.fields."""
        _, base, session = node_server
        body = valid_intake(KenhThucHien=True, Extra=1)
        del body["ChuHoSo"]
        status, reply = await call(session, "POST", base + DOSSIERS, body)
        assert status == 422
        assert {"KenhThucHien", "Extra", "ChuHoSo"} <= set(assert_envelope(status, reply)["fields"])

    async def test_oversize_body_is_a_413(self, node_server: Running) -> None:
        """A body over max_body_bytes is refused with 413 before it is parsed."""
        node, base, session = node_server
        limit = node.config.node.max_body_bytes
        body = valid_intake(ThongTinKhac="x" * (limit + 1))
        status, reply = await call(session, "POST", base + DOSSIERS, body)
        assert status == 413
        assert assert_envelope(status, reply)["code"] == "body_too_large"
        assert (await changes(node_server))["items"] == []

    @pytest.mark.parametrize("path", BAD_QUERIES)
    async def test_bad_query_parameter(self, node_server: Running, path: str) -> None:
        """An unparseable, out-of-range or unknown query parameter is a 400 naming it."""
        _, base, session = node_server
        status, reply = await call(session, "GET", base + path)
        assert status == 400
        error = assert_envelope(status, reply)
        assert error["code"] == "invalid_parameter"
        assert error["fields"], error

    async def test_bad_step_and_fee_bodies(self, node_server: Running) -> None:
        """Step and fee bodies are validated like intakes: missing and mistyped fields are named."""
        _, base, session = node_server
        code = (await intake(node_server))["MaHoSo"]
        status, reply = await call(session, "POST", f"{base}{DOSSIERS}/{code}/steps", {"TrangThai": True})
        assert status == 422
        assert {"TrangThai", "NguoiXuLy"} <= set(assert_envelope(status, reply)["fields"])
        status, reply = await call(session, "POST", f"{base}{DOSSIERS}/{code}/fees",
                                   {"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 1.5})
        assert status == 422
        assert "Gia" in assert_envelope(status, reply)["fields"]
        status, reply = await call(session, "POST", f"{base}{DOSSIERS}/{code}/fees", data="[",
                                   headers={"Content-Type": "application/json"})
        assert assert_envelope(status, reply)["code"] == "malformed_json"

    @pytest.mark.parametrize(("method", "path", "status", "code"), [
        ("GET", f"{DOSSIERS}/{AGENCY}-250701-0001", 404, "not_found"),
        ("POST", f"{DOSSIERS}/{AGENCY}-250701-0001/fees", 404, "not_found"),
        ("GET", "/api/v2/dossiers", 404, "not_found"),
        ("GET", "/nothing-here", 404, "not_found"),  # "/" is the dashboard
        ("DELETE", DOSSIERS, 405, "method_not_allowed"),
        ("PUT", f"{DOSSIERS}/{AGENCY}-250701-0001", 405, "method_not_allowed"),
        ("POST", "/livez", 405, "method_not_allowed"),
    ])
    async def test_unknown_resources_and_methods(
        self, node_server: Running, method: str, path: str, status: int, code: str
    ) -> None:
        """Unknown dossiers and routes are 404, a wrong method is 405, all in the envelope."""
        _, base, session = node_server
        body = {"TenPhiLePhi": "Lệ phí", "MaPhiLePhi": "LP01", "Gia": 1} if method == "POST" else None
        got, reply = await call(session, method, base + path, body)
        assert got == status
        assert assert_envelope(got, reply)["code"] == code


class TestHealthAndDocs:
    """Probes and the API description."""

    async def test_livez_and_readyz(self, node_server: Running) -> None:
        """A running node is alive and ready."""
        _, base, session = node_server
        assert await call(session, "GET", base + "/livez") == (200, {"status": "ok"})
        assert await call(session, "GET", base + "/readyz") == (200, {"status": "ready", "unit": UNIT})

    async def test_openapi_documents_every_route(self, node_server: Running) -> None:
        """/openapi.json is OpenAPI 3.1 and documents exactly the routes the app registers."""
        node, base, session = node_server
        status, doc = await call(session, "GET", base + "/openapi.json")
        assert status == 200
        assert doc["openapi"].startswith("3.1")
        registered = {
            (route.resource.canonical, route.method.lower())
            for route in node.app.router.routes()
            if route.resource is not None and route.method != "HEAD"
        }
        documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
        assert registered == documented
        core = {("/api/v1/dossiers", "post"), ("/api/v1/dossiers/{code}/steps", "post"), ("/readyz", "get")}
        assert core <= registered

