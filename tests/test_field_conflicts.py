"""The same field edited concurrently: one winner everywhere, the losing value recorded as a conflict."""

from __future__ import annotations

from pathlib import Path

from node.config import Config
from node.service import Merge
from sync import doc as ydoc
from sync.record import materialise
from sync.yupdate import field_conflicts
from tests import factories
from tests.conftest import running_node, valid_intake


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
