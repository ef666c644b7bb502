"""The Yjs sync endpoint over a real loopback socket: a standard Yjs client, and peers it must refuse."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pycrdt import Array, Doc, Map, Provider, Text, create_update_message, write_var_uint

from node.app import Node
from node.clock import dvcqg
from sync import doc as ydoc
from sync.hlc import HLC, Stamp
from sync.record import HLC_FIELD, digest, record_from_doc
from sync.ws import CLOSE_NOT_FOUND, CLOSE_REFUSED, HUB, MAX_MESSAGE_BYTES, Refused, check_update
from tests.conftest import make_config, valid_intake
from tests.factories import new_dossier
from tests.factories import step as factory_step

Running = tuple[Node, str, aiohttp.ClientSession]
TIMEOUT_S = 5.0
PEER_ID = 424242  # the test client's own client id: a desk app's


@contextlib.asynccontextmanager
async def sync_node(tmp_path: Path) -> AsyncIterator[Running]:
    """A node on loopback, as tests/conftest.py's ``running_node``."""
    async with Node(make_config(tmp_path)) as node:
        assert HUB in node.app  # the node registers the sync route itself
        server = TestServer(node.app, host="127.0.0.1")
        await server.start_server()
        try:
            token = await node.auth.create_token(["peer", "clerk", "operator"], name="tests")
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
                yield node, str(server.make_url("")).rstrip("/"), session
        finally:
            await server.close()


class AiohttpChannel:
    """pycrdt's provider channel over an aiohttp client WebSocket: binary frames in and out."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, path: str) -> None:
        self._ws = socket
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> AiohttpChannel:
        return self

    async def __anext__(self) -> bytes:
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        raise StopAsyncIteration  # closed: the provider's receive loop ends

    async def recv(self) -> bytes:
        return await self.__anext__()

    async def send(self, message: bytes) -> None:
        await self._ws.send_bytes(message)


@contextlib.asynccontextmanager
async def yjs_client(running: Running, code: str, client_id: int = PEER_ID) -> AsyncIterator[Doc[Any]]:
    """A standard Yjs client (pycrdt's Provider) holding ``code``'s Doc, synced when this yields."""
    _, base, session = running
    doc: Doc[Any] = Doc(client_id=client_id, guid=code)
    async with (
        session.ws_connect(f"{base}/sync/v1/{code}") as socket,
        Provider(doc, AiohttpChannel(socket, code)) as provider,
    ):
        async with asyncio.timeout(TIMEOUT_S):
            await provider.synced.wait()
        yield doc


async def intake(running: Running) -> dict[str, Any]:
    _, base, session = running
    async with session.post(f"{base}/api/v1/dossiers", json=valid_intake()) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]


async def api_record(running: Running, code: str) -> dict[str, Any]:
    """The API's record of ``code``, and its digest under "digest"."""
    _, base, session = running
    async with session.get(f"{base}/api/v1/dossiers/{code}") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    body.pop("replication")
    body.pop("TinhTrangHan"), body.pop("NgayHenTraHieuLuc")  # the deadline standing, computed on reading
    return body


async def changes(running: Running) -> list[dict[str, Any]]:
    _, base, session = running
    async with session.get(f"{base}/api/v1/changes?since=0") as resp:
        assert resp.status == 200
        return (await resp.json())["items"]  # type: ignore[no-any-return]


async def stored(node: Node, code: str) -> tuple[bytes, int, int]:
    """The dossier's stored state and change_seq, and the journal's length: what a refusal must leave alone."""
    row = await node.store.fetchone("SELECT state, change_seq FROM dossiers WHERE code = ?", (code,))
    count = await node.store.fetchone("SELECT count(*) FROM journal")
    assert row is not None and count is not None
    return bytes(row[0]), int(row[1]), int(count[0])


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


def without_digest(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "digest"}


def next_stamp(doc: Doc[Any]) -> str:
    """An HLC stamp after every step the Doc holds, as a well-behaved client stamps its steps."""
    hlc = HLC()
    for value in ydoc.steps_map(doc).values():
        hlc.observe(Stamp.decode(value[HLC_FIELD]))
    return hlc.now().encode()


def new_step(code: str, status: int, note: str) -> dict[str, Any]:
    return {
        "MaHoSo": code,
        "ThoiDiemXuLy": dvcqg(datetime.now(UTC)),
        "TrangThai": status,
        "NguoiXuLy": "Lê Thị Bình",
        "NoiDungXuLy": note,
    }


async def refusal(running: Running, code: str, *frames: bytes | str) -> tuple[int, str]:
    """Send raw frames after the node's step 1; the close code and reason the node answers with."""
    _, base, session = running
    async with session.ws_connect(f"{base}/sync/v1/{code}") as socket:
        first = await socket.receive(timeout=TIMEOUT_S)
        assert first.type is aiohttp.WSMsgType.BINARY and first.data[:2] == b"\x00\x00"  # sync step 1
        for frame in frames:
            if isinstance(frame, str):
                await socket.send_str(frame)
            else:
                await socket.send_bytes(frame)
        while True:
            msg = await socket.receive(timeout=TIMEOUT_S)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                assert socket.close_code is not None
                return socket.close_code, str(msg.extra or "")


async def peer_update(node: Node, code: str, client_id: int, change: Callable[[Doc[Any]], None]) -> bytes:
    """The update a peer holding the dossier's stored state makes with ``change``, written as ``client_id``."""
    state, _, _ = await stored(node, code)
    doc = ydoc.load_doc(code, state, client_id)
    return ydoc.change(doc, change)


class TestSync:
    async def test_client_syncs_the_dossier_the_api_shows(self, tmp_path: Path) -> None:
        """A Yjs client's Doc materialises to the API's record, digest included."""
        async with sync_node(tmp_path) as running:
            code = (await intake(running))["MaHoSo"]
            async with yjs_client(running, code) as doc:
                record = record_from_doc(doc)
                api = await api_record(running, code)
                assert record == without_digest(api)
                assert digest(record) == api["digest"]

    async def test_client_step_is_merged_journaled_and_broadcast(self, tmp_path: Path) -> None:
        """A step a client adds moves the status in the API and the change feed, and reaches another client;
        a step added through the API reaches the clients too."""
        async with sync_node(tmp_path) as running:
            node, base, session = running
            code = (await intake(running))["MaHoSo"]
            seq_before = next(i["seq"] for i in await changes(running) if i["code"] == code)
            async with yjs_client(running, code) as desk, yjs_client(running, code, client_id=PEER_ID + 1) as other:
                ydoc.add_step(desk, new_step(code, 4, "Chuyển xử lý"), next_stamp(desk))

                async def status_is_4() -> bool:
                    return bool((await api_record(running, code))["TrangThaiHoSo"] == 4)

                await eventually(status_is_4, "the API shows the client's step")
                feed = [i for i in await changes(running) if i["code"] == code]
                assert len(feed) == 1 and feed[0]["status"] == 4 and feed[0]["seq"] > seq_before

                async def other_has_it() -> bool:
                    return record_from_doc(other) == without_digest(await api_record(running, code))

                await eventually(other_has_it, "the other client receives the step")

                body = {"TrangThai": 9, "NguoiXuLy": "Lê Thị Bình", "NoiDungXuLy": "Đã xử lý xong"}
                async with session.post(f"{base}/api/v1/dossiers/{code}/steps", json=body) as resp:
                    assert resp.status == 201, await resp.text()

                async def both_have_it() -> bool:
                    api = without_digest(await api_record(running, code))
                    return api["TrangThaiHoSo"] == 9 and record_from_doc(desk) == api == record_from_doc(other)

                await eventually(both_have_it, "both clients receive the desk's step")

            async def all_left() -> bool:
                return not node.app[HUB].rooms

            await eventually(all_left, "the node forgets closed connections")

    async def test_writes_under_the_nodes_client_ids_are_refused(self, tmp_path: Path) -> None:
        """An update forged under the node's own client id, or its id for the portal, changes nothing."""
        async with sync_node(tmp_path) as running:
            node, _, _ = running
            code = (await intake(running))["MaHoSo"]
            before = await stored(node, code)
            for client_id in (node.service.client_id, await node.service.client_id_for("national")):
                update = await peer_update(
                    node, code, client_id, lambda d: ydoc.put_fields(d, {"ChuHoSo": "Kẻ Mạo Danh"})
                )
                close_code, reason = await refusal(running, code, create_update_message(update))
                assert close_code == CLOSE_REFUSED
                assert reason.startswith("forbidden_writer:") and str(client_id) in reason
            assert await stored(node, code) == before
            assert (await api_record(running, code))["ChuHoSo"] == valid_intake()["ChuHoSo"]

    async def test_deleting_or_changing_a_step_is_refused(self, tmp_path: Path) -> None:
        """Steps are immutable: removing one or rewriting its value is refused whole."""
        async with sync_node(tmp_path) as running:
            node, _, _ = running
            code = (await intake(running))["MaHoSo"]
            before = await stored(node, code)

            def delete(d: Doc[Any]) -> None:
                steps = ydoc.steps_map(d)
                del steps[next(iter(steps.keys()))]

            def rewrite(d: Doc[Any]) -> None:
                steps = ydoc.steps_map(d)
                key = next(iter(steps.keys()))
                steps[key] = {**steps[key], "NoiDungXuLy": "Sửa lịch sử"}

            for change, expected in ((delete, "step_deleted:"), (rewrite, "step_changed:")):
                update = await peer_update(node, code, PEER_ID, change)
                close_code, reason = await refusal(running, code, create_update_message(update))
                assert (close_code, reason.split(" ")[0]) == (CLOSE_REFUSED, expected)
            assert await stored(node, code) == before

    async def test_an_illegal_status_history_is_refused(self, tmp_path: Path) -> None:
        """Returning a result that was never processed would be skipped in the merged order: refused."""
        async with sync_node(tmp_path) as running:
            node, _, _ = running
            code = (await intake(running))["MaHoSo"]
            before = await stored(node, code)

            def returned(d: Doc[Any]) -> None:
                ydoc.add_step(d, new_step(code, 10, "Trả kết quả"), next_stamp(d))

            update = await peer_update(node, code, PEER_ID, returned)
            close_code, reason = await refusal(running, code, create_update_message(update))
            assert close_code == CLOSE_REFUSED and reason.startswith("illegal_transition:")
            assert await stored(node, code) == before

    async def test_garbage_is_refused_and_the_node_keeps_serving(self, tmp_path: Path) -> None:
        """Random bytes, a corrupt update, a value nested past yrs's stack, a text frame: each is refused
        with 4400, nothing is stored, and the node still takes dossiers."""
        rng = random.Random(7)
        # 200,000 nested arrays in one map value: yrs overflows its stack (and kills the process) on this.
        bomb_value = bytes([117, 1]) * 200_000 + bytes([126])
        bomb = (
            write_var_uint(1) + write_var_uint(1) + write_var_uint(PEER_ID) + write_var_uint(0)
            + bytes([8 | 0x20]) + write_var_uint(1) + _string("fields") + _string("ChuHoSo")
            + write_var_uint(1) + bomb_value + write_var_uint(0)
        )  # fmt: skip
        frames: list[bytes | str] = [
            bytes(rng.randrange(256) for _ in range(64)),
            b"\x07\x01",  # an unknown message type
            create_update_message(bytes(rng.randrange(256) for _ in range(200))),
            b"\x00\x02\x05\x01\x01",  # an update shorter than it announces
            create_update_message(bomb),
            "hello",
        ]
        async with sync_node(tmp_path) as running:
            node, _, _ = running
            code = (await intake(running))["MaHoSo"]
            before = await stored(node, code)
            for frame in frames:
                close_code, reason = await refusal(running, code, frame)
                assert close_code == CLOSE_REFUSED, (frame[:16], reason)
                assert re.fullmatch(r"[a-z_]+: .+", reason), reason  # "<code>: <message>"
            assert await stored(node, code) == before
            assert (await intake(running))["MaHoSo"] != code  # still taking dossiers

    async def test_unknown_code_is_closed_with_4404(self, tmp_path: Path) -> None:
        async with sync_node(tmp_path) as running:
            _, base, session = running
            async with session.ws_connect(f"{base}/sync/v1/000.00.17.H29-260101-9999") as socket:
                msg = await socket.receive(timeout=TIMEOUT_S)
                assert msg.type is aiohttp.WSMsgType.CLOSE
                assert socket.close_code == CLOSE_NOT_FOUND
                assert str(msg.extra).startswith("not_found:")

    async def test_oversize_message_is_closed_politely(self, tmp_path: Path) -> None:
        """A message over the limit is closed with 1009 (message too big), and nothing is stored."""
        async with sync_node(tmp_path) as running:
            node, _, _ = running
            code = (await intake(running))["MaHoSo"]
            before = await stored(node, code)
            close_code, _ = await refusal(running, code, b"\x00\x02" + b"\x00" * MAX_MESSAGE_BYTES)
            assert close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            assert await stored(node, code) == before

    async def test_plain_get_is_told_to_upgrade(self, tmp_path: Path) -> None:
        async with sync_node(tmp_path) as running:
            _, base, session = running
            async with session.get(f"{base}/sync/v1/anything") as resp:
                assert resp.status == 426
                assert (await resp.json())["error"]["code"] == "upgrade_required"


def _string(text: str) -> bytes:
    raw = text.encode()
    return write_var_uint(len(raw)) + raw


class TestCheckUpdate:
    """The checks on a scratch copy, without a server: what a dossier's Doc may and may not receive."""

    CODE = "000.00.17.H29-261122-0001"
    NODE_ID = 4242

    def refuse(self, change: Callable[[Doc[Any]], object], client_id: int = PEER_ID) -> str:
        state = new_dossier(self.CODE, client_id=self.NODE_ID).get_update()
        doc = ydoc.load_doc(self.CODE, state, client_id)

        def run(d: Doc[Any]) -> None:
            change(d)

        update = ydoc.change(doc, run)
        with pytest.raises(Refused) as caught:
            check_update(self.CODE, state, update, forbidden=frozenset({self.NODE_ID}), now_ms=HLC().now().ms)
        return caught.value.code

    def test_plain_changes_are_accepted(self) -> None:
        state = new_dossier(self.CODE, client_id=self.NODE_ID).get_update()
        doc = ydoc.load_doc(self.CODE, state, PEER_ID)

        def change(d: Doc[Any]) -> None:
            ydoc.put_fields(d, {"SoDienThoai": "0987654321"})
            ydoc.add_step(d, factory_step(self.CODE, 4, "20261122100000"), next_stamp(d))
            ydoc.add_fee(d, {"MaPhiLePhi": "LP01", "TenPhiLePhi": "Lệ phí khai sinh", "Gia": 8000})
            ydoc.add_document(d, {"TepDinhKemId": "TD01", "TenTepDinhKem": "to-khai.pdf"})

        update = ydoc.change(doc, change)
        shape = check_update(self.CODE, state, update, forbidden=frozenset({self.NODE_ID}), now_ms=HLC().now().ms)
        assert shape is not None and set(shape.runs) == {PEER_ID}
        # Re-sending what the node already holds, its own writes included, is no change and no refusal.
        assert check_update(self.CODE, state, state, forbidden=frozenset({self.NODE_ID}), now_ms=0) is None

    @pytest.mark.parametrize(
        ("change", "code"),
        [
            (lambda d: ydoc.steps_map(d).__setitem__("k", Map({"a": 1})), "foreign_type"),
            (lambda d: ydoc.fields_map(d).__setitem__("GhiChu", Text("x")), "foreign_type"),
            (lambda d: d.get("extra", type=Array).append(1), "foreign_type"),
            (lambda d: d.get("audit", type=Map).__setitem__("k", 1), "foreign_type"),
            (lambda d: ydoc.fields_map(d).__setitem__("Tep", b"\x00"), "invalid_value"),
            (lambda d: ydoc.fields_map(d).__setitem__("ChuHoSo", {"Ten": "x"}), "invalid_value"),
            (lambda d: ydoc.fields_map(d).__setitem__("MaHoSo", "khac"), "not_a_dossier"),
            (lambda d: ydoc.fields_map(d).pop("ChuHoSo"), "entry_deleted"),
            (lambda d: ydoc.steps_map(d).__setitem__("k", {"MaHoSo": "x"}), "invalid_step"),
            (
                lambda d: ydoc.add_step(d, factory_step(TestCheckUpdate.CODE, 4, "20261122100000"), "soon"),
                "invalid_step",
            ),
            (
                lambda d: ydoc.add_step(
                    d, factory_step(TestCheckUpdate.CODE, 4, "20261122100000"), "999999999999999.00000"
                ),
                "invalid_step",
            ),
            (lambda d: ydoc.add_fee(d, {"MaPhiLePhi": "LP01", "TenPhiLePhi": "Lệ phí", "Gia": -1}), "invalid_value"),
        ],
    )
    def test_refusals(self, change: Callable[[Doc[Any]], object], code: str) -> None:
        assert self.refuse(change) == code

    def test_writes_under_a_forbidden_id_are_refused(self) -> None:
        assert self.refuse(lambda d: ydoc.put_fields(d, {"ChuHoSo": "x"}), client_id=self.NODE_ID) == "forbidden_writer"

    def test_updates_the_node_cannot_integrate_now_are_refused(self) -> None:
        """yrs would hold such updates pending in memory and apply them later, unchecked: refused instead."""
        state = new_dossier(self.CODE, client_id=self.NODE_ID).get_update()
        peer = ydoc.load_doc(self.CODE, state, PEER_ID)
        first = ydoc.change(peer, lambda d: ydoc.put_fields(d, {"SoDienThoai": "0987654321"}))
        gap = ydoc.change(peer, lambda d: ydoc.put_fields(d, {"Email": "lan@example.com"}))
        with pytest.raises(Refused) as caught:
            check_update(self.CODE, state, gap, forbidden=frozenset(), now_ms=0)
        assert caught.value.code == "incomplete_update"
        # A delete of the peer's field before the node holds it.
        other = ydoc.load_doc(self.CODE, state, PEER_ID + 1)
        other.apply_update(first)
        deleting = ydoc.change(other, lambda d: ydoc.fields_map(d).pop("SoDienThoai"))
        with pytest.raises(Refused) as caught:
            check_update(self.CODE, state, deleting, forbidden=frozenset(), now_ms=0)
        assert caught.value.code == "unknown_delete"
