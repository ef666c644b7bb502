"""The same field edited concurrently: one winner everywhere, the losing value recorded as a conflict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Doc

from adapters.base import Outgoing
from node.config import Config
from node.service import Merge
from sync import doc as ydoc
from sync.puller import Puller
from sync.record import digest, materialise
from sync.yupdate import decode_update, field_conflicts
from tests import factories
from tests.conftest import UNIT, running_node, valid_intake
from tests.test_pull import city, portal
from tests.upstreams import running_upstreams


class TestOnDocs:
    """Two writers set one field without seeing each other; both replicas agree on winner and loser."""

    def test_winner_and_loser_are_the_same_everywhere(self) -> None:
        base = factories.new_dossier(factories.code(1))
        state = base.get_update()
        one = ydoc.load_doc(factories.code(1), state, 501)
        two = ydoc.load_doc(factories.code(1), state, 502)
        u1 = ydoc.change(one, lambda d: ydoc.put_fields(d, {"Email": "mot@example.vn"}))
        u2 = ydoc.change(two, lambda d: ydoc.put_fields(d, {"Email": "hai@example.vn"}))
        one.apply_update(u2)
        two.apply_update(u1)
        r1, c1 = materialise(one)
        r2, c2 = materialise(two)
        assert r1["Email"] == r2["Email"]
        assert c1 == c2
        [conflict] = c1
        assert conflict["field"] == "Email" and conflict["kept"] == r1["Email"]
        assert {conflict["kept"], conflict["lost"]} == {"mot@example.vn", "hai@example.vn"}

    def test_a_knowing_overwrite_is_no_conflict(self) -> None:
        d = factories.new_dossier(factories.code(1))
        ydoc.change(d, lambda x: ydoc.put_fields(x, {"Email": "a@example.vn"}))
        ydoc.change(d, lambda x: ydoc.put_fields(x, {"Email": "b@example.vn"}))
        other = ydoc.load_doc(factories.code(1), d.get_update(), 9)
        ydoc.change(other, lambda x: ydoc.put_fields(x, {"Email": "c@example.vn"}))
        assert field_conflicts(other.get_update()) == []
        assert materialise(other)[1] == []


def _exchange(*docs: Doc) -> None:
    updates = [d.get_update() for d in docs]
    for d in docs:
        for u in updates:
            d.apply_update(u)


class TestOneWriter:
    """A Doc only one client wrote has a single line of writes: no field conflicts, whatever the history
    (materialise skips reading the history for them on that ground)."""

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(st.sampled_from(["Email", "SoDienThoai", "DiaChi"]), st.sampled_from(["a", "b", "c", None])),
            min_size=1,
            max_size=12,
        )
    )
    def test_no_conflicts_and_the_same_answer_as_the_full_reading(self, edits: list[tuple[str, str | None]]) -> None:
        doc = ydoc.new_doc(factories.code(7), 601)
        ydoc.change(doc, lambda d: ydoc.put_fields(d, {"MaHoSo": factories.code(7)}))
        for name, value in edits:

            def edit(d: Doc[Any], name: str = name, value: str | None = value) -> None:
                fields = ydoc.fields_map(d)
                if value is None:
                    fields.pop(name, None)
                else:
                    fields[name] = value

            ydoc.change(doc, edit)
            # Reloaded under the same client id, as a node reopening its store does.
            doc = ydoc.load_doc(factories.code(7), doc.get_update(), 601)
        assert doc.get_state()[:1] == b"\x01"
        assert field_conflicts(doc.get_update()) == []
        assert [c for c in materialise(doc)[1] if c.get("kind") != "illegal_transition"] == []

    def test_two_writers_are_still_read(self) -> None:
        """The shortcut stops at one writer: two concurrent writers still give their conflict."""
        base = ydoc.new_doc(factories.code(8), 701)
        ydoc.change(base, lambda d: ydoc.put_fields(d, {"MaHoSo": factories.code(8), "Email": "x@example.vn"}))
        other = ydoc.load_doc(factories.code(8), base.get_update(), 702)
        u1 = ydoc.change(base, lambda d: ydoc.put_fields(d, {"Email": "mot@example.vn"}))
        ydoc.change(other, lambda d: ydoc.put_fields(d, {"Email": "hai@example.vn"}))
        other.apply_update(u1)
        assert other.get_state()[:1] == b"\x02"
        assert [c["field"] for c in materialise(other)[1]] == ["Email"]


class TestEqualValuesAndCopies:
    """Equal values written by writers that had not seen each other are one edit, not a conflict."""

    def test_a_dossier_written_twice_with_equal_values_has_no_conflicts(self) -> None:
        # The receiving unit's Doc and a copy another node wrote from the portal's record, under its own id.
        code = factories.code(1)
        received, copied = ydoc.new_doc(code, 501), ydoc.new_doc(code, 502)
        for d in (received, copied):
            ydoc.change(d, lambda x: ydoc.put_fields(x, factories.base_fields(code)))
        _exchange(received, copied)
        assert field_conflicts(received.get_update()) == field_conflicts(copied.get_update()) == []

    @pytest.mark.parametrize(("editor", "copier", "edit_wins"), [(502, 501, True), (501, 502, False)])
    def test_a_later_edit_next_to_an_equal_copy(self, editor: int, copier: int, edit_wins: bool) -> None:
        """Two independent copies of one dossier: an edit of one copy is concurrent with the other copy's
        value, so Yjs may let the stale copy win (why a node takes the city's Doc rather than writing the
        portal's record again). Either way the equal values are no conflict, and a lost edit is listed."""
        code = factories.code(1)
        received, copied = ydoc.new_doc(code, editor), ydoc.new_doc(code, copier)
        for d in (received, copied):
            ydoc.change(d, lambda x: ydoc.put_fields(x, factories.base_fields(code)))
        ydoc.change(received, lambda x: ydoc.put_fields(x, {"ChuHoSo": "Nguyễn Văn Ân"}))
        _exchange(received, copied)
        record, conflicts = materialise(received)
        assert conflicts == materialise(copied)[1]
        if edit_wins:
            assert record["ChuHoSo"] == "Nguyễn Văn Ân" and conflicts == []
        else:
            assert record["ChuHoSo"] == "Nguyễn Văn An"
            assert conflicts == [{"kind": "field", "field": "ChuHoSo", "kept": "Nguyễn Văn An",
                                  "lost": "Nguyễn Văn Ân", "lost_writer": editor, "kept_writer": copier}]

    @pytest.mark.parametrize("ids", [(601, 602, 603), (603, 602, 601), (602, 603, 601), (601, 603, 602)])
    def test_a_portal_copy_of_a_concurrent_value_does_not_hide_the_loser(self, ids: tuple[int, int, int]) -> None:
        """A and B edit Email concurrently; A's portal writer then copies B's value from the portal's record
        (written knowing A's value). The loser is still A's value, listed once, the same on both replicas."""
        a_id, b_id, a_portal_id = ids
        code = factories.code(1)
        a = factories.new_dossier(code, client_id=a_id)
        b = ydoc.load_doc(code, a.get_update(), b_id)
        ydoc.change(a, lambda x: ydoc.put_fields(x, {"Email": "mot@example.vn"}))
        ydoc.change(b, lambda x: ydoc.put_fields(x, {"Email": "hai@example.vn"}))
        a_portal = ydoc.load_doc(code, a.get_update(), a_portal_id)
        ydoc.change(a_portal, lambda x: ydoc.put_fields(x, {"Email": "hai@example.vn"}))
        a.apply_update(a_portal.get_update())
        assert field_conflicts(a.get_update()) == []  # before B's own write arrives: an ordinary overwrite
        _exchange(a, b)
        [conflict] = field_conflicts(a.get_update())
        assert field_conflicts(b.get_update()) == [conflict]
        assert conflict["field"] == "Email" and conflict["kept"] == materialise(a)[0]["Email"] == "hai@example.vn"
        assert conflict["lost"] == "mot@example.vn" and conflict["lost_writer"] == a_id


class TestFirstSeenOnThePortal:
    """A dossier the node first sees on the portal is taken from the city's Doc, not written a second time."""

    async def test_the_city_doc_is_taken_and_only_the_portal_change_is_written(
        self, config: Config, tmp_path: Path
    ) -> None:
        code = factories.code(7)
        received = factories.new_dossier(code, client_id=4242, competent=factories.OTHER_UNIT)
        async with running_upstreams(tmp_path / "upstreams") as ups, running_node(config) as (node, _, _):
            nat, cty = portal(ups), city(ups)
            try:
                [res] = await cty.push([factories.outgoing(received)])
                assert res.outcome.value == "acked"
                record = dict(materialise(received)[0])
                record["NgayHenTra"] = "20261205170000"  # changed on the portal by an officer
                [res] = await nat.push([Outgoing(code, record, digest(record), b"")])
                assert res.outcome.value == "acked"
                portal_id = await node.service.client_id_for("national")
                puller = Puller(node.store, node.service, nat, unit=UNIT, portal_client_id=portal_id, doc_source=cty)
                assert await puller.pull_codes([code]) == [code]
            finally:
                await nat.close()
                await cty.close()
            row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            assert row is not None
            held = ydoc.load_doc(code, node.store.sealer.state(code, row[0]), 1)
        # The node holds the receiving unit's Doc plus one write under its portal writer: the portal's change.
        added = decode_update(held.get_update(received.get_state())).runs
        assert added == {portal_id: (0, 1)}
        merged, conflicts = materialise(held)
        assert merged["NgayHenTra"] == "20261205170000" and conflicts == []

    async def test_created_from_the_portal_record_when_the_city_lacks_it(self, config: Config, tmp_path: Path) -> None:
        code = factories.code(8)
        online = factories.new_dossier(code, client_id=4242, statuses=(1,), KenhThucHien=2)
        async with running_upstreams(tmp_path / "upstreams") as ups, running_node(config) as (node, url, s):
            nat, cty = portal(ups), city(ups)
            try:
                [res] = await nat.push([factories.outgoing(online)])
                assert res.outcome.value == "acked"
                portal_id = await node.service.client_id_for("national")
                puller = Puller(node.store, node.service, nat, unit=UNIT, portal_client_id=portal_id, doc_source=cty)
                assert await puller.pull_codes([code]) == [code]
            finally:
                await nat.close()
                await cty.close()
            async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                body = await r.json()
            assert body["digest"] == digest(materialise(online)[0]) and body.get("conflicts", []) == []
            row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            assert row is not None
            state = node.store.sealer.state(code, row[0])
        assert set(decode_update(state).runs) == {portal_id}


class TestThroughTheNode:
    """Two peers' concurrent edits merged by a node show in the dossier's conflicts."""

    async def test_conflict_visible_in_the_api(self, config: Config, tmp_path: Path) -> None:
        async with running_node(config) as (node, url, s):
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                code = (await r.json())["MaHoSo"]
            row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))
            state = bytes(row[0])
            peers = [ydoc.load_doc(code, state, cid) for cid in (7001, 7002)]
            updates = [
                ydoc.change(p, lambda d, v=v: ydoc.put_fields(d, {"ThongTinKhac": v}))
                for p, v in zip(peers, ("Ghi chú của quầy 1", "Ghi chú của quầy 2"), strict=True)
            ]
            for u in updates:
                await node.service.merge(Merge(code, u, "peer"))
            async with s.get(f"{url}/api/v1/dossiers/{code}") as r:
                body = await r.json()
            [conflict] = [c for c in body["conflicts"] if c["kind"] == "field"]
            assert conflict["field"] == "ThongTinKhac"
            assert conflict["kept"] == body["ThongTinKhac"]
            assert conflict["lost"] in ("Ghi chú của quầy 1", "Ghi chú của quầy 2")
            assert conflict["lost"] != conflict["kept"]
