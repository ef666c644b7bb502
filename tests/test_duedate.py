"""Due dates in working hours across weekends, Tết and other holidays; the on-time rule with supplement pauses.

Every expected date below was counted by hand on a calendar: office hours 07:30-11:30 and 13:00-17:00,
Monday to Friday, Asia/Ho_Chi_Minh. The days off come from these sources (cited by tag in each case):

- [LC] Labour Code 2019 (Law 45/2019/QH14), art. 112: New Year's Day, Tết (5 days), Hùng Kings' day
  (10th day of the 3rd lunar month), 30 April, 1 May, 2 September and one day next to it; art. 111(3): a
  holiday that falls on the weekly rest day is taken on the next working day.
- [TET26] Vietnam News Agency, "Lịch nghỉ Tết Nguyên đán và Quốc khánh năm 2026" (17 October 2025): public
  servants off from Monday 16 to Friday 20 February 2026 (29 tháng Chạp to mùng 4), nine days with the weekends.
- [QK26] National Day 2026 as the government scheduled it (the source the holidays package cites,
  thuvienphapluat.vn): Monday 31 August off, worked on Saturday 22 August in exchange; 1 and 2 September off.
- [VHVN] Resolution 80-NQ/TW: 24 November, Vietnam Culture Day, a paid day off from 2026.
- [TET27] Tết 2027: day 1 (mùng 1 Tết Đinh Mùi) is Saturday 6 February 2027. No official schedule for
  public servants is used here; the days are the estimate by [LC]'s rule that the holidays package makes
  (eve and four days, the Saturday given back before and the Sunday after): Thursday 4 to Wednesday 10
  February. If the government's schedule differs, the city lists the difference in its catalogue
  (extra_days_off, extra_working_days; TestDueDates.test_catalogue_days_off_and_working_days).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from node.clock import TZ, Clock
from node.config import ConfigError
from node.desk.duedate import CatalogueError, Deadlines, load_catalogue, parse_catalogue, shipped_catalogue
from tests.conftest import make_config, running_node, valid_intake


def at(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=TZ)


class FixedClock(Clock):
    """The node's clock stopped at one instant, so the receipt time (and the due date) is known."""

    def __init__(self, when: datetime) -> None:
        super().__init__()
        self.when = when

    def now(self) -> datetime:
        return self.when


CATALOGUE = """
[calendar]
working_hours = ["07:30-11:30", "13:00-17:00"]
at_risk_working_hours = 8

[procedures."1.000001"]
working_days = 1
[procedures."1.000002"]
working_days = 2
[procedures."1.000003"]
working_days = 3
[procedures."1.000004"]
working_days = 0.5
"""


@pytest.fixture(scope="module")
def deadlines() -> Deadlines:
    return Deadlines(parse_catalogue(CATALOGUE))


class TestDueDates:
    """NgayHenTra = receipt + working days, counted in office hours on Vietnam's working days."""

    @pytest.mark.parametrize(
        ("received", "procedure", "due"),
        [
            # [TET26] Fri 13 Feb 2026 16:00: 1 h, Sat 14 to Sun 22 off, 4 h + 3 h on Mon 23.
            ("20260213160000", "1.000001", "20260223160000"),
            # [TET26] Thu 12 Feb 2026 09:00 + 2 days: 6.5 h Thu 12, 8 h Fri 13, 1.5 h Mon 23.
            ("20260212090000", "1.000002", "20260223090000"),
            # [TET27] Wed 3 Feb 2027 09:00: 6.5 h that day, Tết from Thu 4 to Wed 10, 1.5 h on Thu 11.
            ("20270203090000", "1.000001", "20270211090000"),
            # [TET27] 6.5 h on Wed 3, 8 h Thu 11, 8 h Fri 12, weekend, 1.5 h Mon 15.
            ("20270203090000", "1.000003", "20270215090000"),
            # [TET27] Received on Tết day 1 (a Saturday): counting starts Thu 11 07:30 and ends with that day.
            ("20270206100000", "1.000001", "20270211170000"),
            # [VHVN] Fri 20 Nov 2026 16:00: 1 h, weekend, 8 h Mon 23, Tue 24 is Vietnam Culture Day, 8 h Wed 25,
            # 4 h + 3 h Thu 26.
            ("20261120160000", "1.000003", "20261126160000"),
            # [LC] Fri 24 Apr 2026 10:00: 5.5 h, weekend, Hùng Kings' day (10/3 lunar) is Sun 26 Apr, so Mon 27
            # is off; 8 h Tue 28, 2.5 h Wed 29.
            ("20260424100000", "1.000002", "20260429100000"),
            # [QK26] Sat 22 Aug 2026 is worked in exchange for Mon 31 Aug: Fri 21 16:00 + 1 day ends that Saturday.
            ("20260821160000", "1.000001", "20260822160000"),
            # [QK26] Fri 28 Aug 2026 09:00: 6.5 h, weekend, Mon 31 Aug to Wed 2 Sep off, 1.5 h Thu 3 Sep.
            ("20260828090000", "1.000001", "20260903090000"),
            # [LC] 1 May 2027 is a Saturday, taken on Mon 3 May; 30 Apr is a Friday: Thu 29 Apr 2027 13:00 + 1 day
            # is 4 h Thu 29, then Tue 4 May 07:30 + 4 h.
            ("20270429130000", "1.000001", "20270504113000"),
            # Weekends only: received at lunch, half a day is the whole afternoon.
            ("20270301120000", "1.000004", "20270301170000"),
            # Received before opening on a Monday: one day is that whole day.
            ("20270301060000", "1.000001", "20270301170000"),
        ],
    )
    def test_hand_checked(self, deadlines: Deadlines, received: str, procedure: str, due: str) -> None:
        assert deadlines.due_date(procedure, at(received)) == due

    def test_unknown_procedure_has_none(self, deadlines: Deadlines) -> None:
        assert deadlines.due_date("9.999999", at("20270301080000")) is None

    def test_catalogue_days_off_and_working_days(self) -> None:
        """The city's own days off and swapped working days override the package."""
        extra = CATALOGUE.replace(
            "at_risk_working_hours = 8",
            'at_risk_working_hours = 8\nextra_days_off = ["2027-03-02"]\nextra_working_days = ["2027-03-06"]',
        )
        d = Deadlines(parse_catalogue(extra))
        # Mon 1 Mar 2027 09:00 + 2 days: 6.5 h, Tue 2 off, 8 h Wed 3, 1.5 h Thu 4.
        assert d.due_date("1.000002", at("20270301090000")) == "20270304090000"
        # Fri 5 Mar 16:00 + 1 day: 1 h, Sat 6 worked: 4 h + 3 h.
        assert d.due_date("1.000001", at("20270305160000")) == "20270306160000"


def record(due: str, steps: list[tuple[int, str]], **extra: Any) -> dict[str, Any]:
    """A record received Mon 1 Mar 2027 08:00 with these (TrangThai, ThoiDiemXuLy) steps after intake."""
    all_steps = [(2, "20270301080000"), *steps]
    rec: dict[str, Any] = {
        "NgayTiepNhan": "20270301080000",
        "NgayHenTra": due,
        "QuaTrinhXuLy": [{"TrangThai": s, "ThoiDiemXuLy": t} for s, t in all_steps],
    }
    status = None
    for s, _ in all_steps:
        status = s
    rec["TrangThaiHoSo"] = status
    for s, t in all_steps:
        if s == 9:
            rec["NgayKetThucXuLy"] = t
    rec.update(extra)
    return rec


# Received Mon 1 Mar 2027 08:00, 3 working days: 7.5 h Mon, 8 h Tue, 8 h Wed, 0.5 h Thu -> Thu 4 Mar 08:00.
DUE = "20270304080000"
# A supplement requested Tue 08:00 and resubmitted Wed 08:00 pauses 3.5 + 4 + 0.5 = 8 working hours:
# the effective due date moves to Fri 5 Mar 08:00.
PAUSED = [(4, "20270301090000"), (5, "20270302080000"), (4, "20270303080000")]


class TestStanding:
    """TinhTrangHan by the portal's on-time rule."""

    def test_due_date_of_the_fixture_is_hand_checked(self, deadlines: Deadlines) -> None:
        assert deadlines.due_date("1.000003", at("20270301080000")) == DUE

    def test_open_on_time_at_risk_late(self, deadlines: Deadlines) -> None:
        rec = record(DUE, [(4, "20270301090000")])
        assert deadlines.standing(rec, at("20270301090000")) == {
            "TinhTrangHan": "on_time",
            "NgayHenTraHieuLuc": DUE,
        }
        # Wed 3 Mar 08:00: 8 working hours left -> at risk.
        assert deadlines.standing(rec, at("20270303080000"))["TinhTrangHan"] == "at_risk"
        assert deadlines.standing(rec, at("20270304080001"))["TinhTrangHan"] == "late"

    def test_supplement_pause_moves_the_effective_due_date(self, deadlines: Deadlines) -> None:
        done = record(DUE, [*PAUSED, (9, "20270305070000")])
        standing = deadlines.standing(done, at("20270310080000"))
        assert standing == {"TinhTrangHan": "on_time", "NgayHenTraHieuLuc": "20270305080000"}
        without_pause = record(DUE, [(4, "20270301090000"), (9, "20270305070000")])
        assert deadlines.standing(without_pause, at("20270310080000"))["TinhTrangHan"] == "late"

    def test_clock_stops_while_waiting_for_the_applicant(self, deadlines: Deadlines) -> None:
        waiting = record(DUE, [(4, "20270301090000"), (5, "20270302080000")])
        # Two weeks later, still waiting: the 16 working hours left at the request are still left.
        standing = deadlines.standing(waiting, at("20270316080000"))
        assert standing["TinhTrangHan"] == "on_time"
        assert standing["NgayHenTraHieuLuc"] == "20270318080000"

    def test_second_supplement_request_is_late(self, deadlines: Deadlines) -> None:
        twice = record(DUE, [*PAUSED, (5, "20270303090000"), (4, "20270303100000")])
        assert deadlines.standing(twice, at("20270303100000"))["TinhTrangHan"] == "late"

    def test_no_deadline_when_refused_or_without_due_date(self, deadlines: Deadlines) -> None:
        withdrawn = record(DUE, [(7, "20270301090000")])
        assert deadlines.standing(withdrawn, at("20270310080000")) == {
            "TinhTrangHan": None,
            "NgayHenTraHieuLuc": None,
        }
        assert deadlines.standing({"TrangThaiHoSo": 4}, at("20270310080000"))["TinhTrangHan"] is None

    def test_illegal_steps_skipped_in_merged_order_do_not_pause(self, deadlines: Deadlines) -> None:
        """A supplement request the status machine skipped (5 straight after 2) is no pause."""
        rec = record(DUE, [(5, "20270301090000"), (4, "20270302090000")])
        rec["TrangThaiHoSo"] = 4
        assert deadlines.standing(rec, at("20270301100000"))["NgayHenTraHieuLuc"] == DUE


class TestCatalogue:
    """The shipped catalogue loads; a broken one is refused with every problem."""

    def test_shipped_catalogue_loads_and_has_the_desk_procedures(self) -> None:
        cat = load_catalogue(None)
        assert shipped_catalogue().is_file()
        assert {"1.001193", "1.000656", "2.000908"} <= set(cat.procedures)
        assert cat.day_s == 8 * 3600

    def test_problems_listed(self) -> None:
        bad = (
            '[calendar]\nworking_hours = ["17:00-07:30"]\nextra_days_off = ["30/4"]\n'
            '[procedures."x"]\nworking_days = 1\n'
        )
        with pytest.raises(CatalogueError) as err:
            parse_catalogue(bad)
        assert len(err.value.problems) == 3, err.value.problems

    def test_config_refuses_a_broken_city_catalogue(self, tmp_path: Path) -> None:
        path = tmp_path / "procedures.toml"
        path.write_text('[procedures."1.001193"]\nworking_days = -1\n', encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            make_config(tmp_path, procedure_catalogue=str(path))
        assert any("procedure_catalogue" in p and "working_days" in p for p in err.value.problems)


class TestIntake:
    """The node fills NgayHenTra in at intake when the desk leaves it out."""

    async def test_computed_across_tet_and_shown_on_reading(self, tmp_path: Path) -> None:
        clock = FixedClock(at("20270203090000"))  # Wednesday before Tết 2027
        city = tmp_path / "procedures.toml"
        city.write_text(
            shipped_catalogue()
            .read_text(encoding="utf-8")
            .replace('[procedures."2.000908"]', '[procedures."1.009999"]\nworking_days = 3\n\n[procedures."2.000908"]'),
            encoding="utf-8",
        )
        async with running_node(make_config(tmp_path, procedure_catalogue=str(city)), clock) as (_, base, session):
            body = valid_intake(MaTTHC="1.009999")
            del body["NgayHenTra"]
            async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
                assert resp.status == 201, await resp.text()
                created = await resp.json()
            assert created["NgayTiepNhan"] == "20270203090000"
            assert created["NgayHenTra"] == "20270215090000"
            async with session.get(f"{base}/api/v1/dossiers/{created['MaHoSo']}") as resp:
                got = await resp.json()
            assert got["TinhTrangHan"] == "on_time"
            assert got["NgayHenTraHieuLuc"] == "20270215090000"

            given = valid_intake(MaTTHC="9.999999", NgayHenTra="20270301170000")
            async with session.post(f"{base}/api/v1/dossiers", json=given) as resp:
                assert resp.status == 201
                assert (await resp.json())["NgayHenTra"] == "20270301170000"

            unknown = valid_intake(MaTTHC="9.999999")
            del unknown["NgayHenTra"]
            async with session.post(f"{base}/api/v1/dossiers", json=unknown) as resp:
                assert resp.status == 422
                error = (await resp.json())["error"]
            assert set(error["fields"]) == {"NgayHenTra"}
            assert "9.999999" in error["fields"]["NgayHenTra"]
            # The refused intake used up no code: the next one is the third of the day.
            async with session.post(f"{base}/api/v1/dossiers", json=given) as resp:
                assert (await resp.json())["MaHoSo"].endswith("-0003")


class TestReload:
    """The city edits its catalogue file; a reload (SIGHUP) applies it to later intakes, a broken one is refused."""

    async def test_catalogue_read_again_on_reload(self, tmp_path: Path) -> None:
        from node.ops.reload import reload

        clock = FixedClock(at("20270203090000"))
        city = tmp_path / "procedures.toml"
        shipped = shipped_catalogue().read_text(encoding="utf-8")
        city.write_text(shipped, encoding="utf-8")
        config = make_config(tmp_path, procedure_catalogue=str(city))
        async with running_node(config, clock) as (node, base, session):

            async def intake() -> tuple[int, Any]:
                body = valid_intake(MaTTHC="1.009999")
                del body["NgayHenTra"]
                async with session.post(f"{base}/api/v1/dossiers", json=body) as resp:
                    return resp.status, await resp.json()

            assert (await intake())[0] == 422  # not in the catalogue yet
            entry = '[procedures."1.009999"]\nworking_days = 3\n\n'
            added = shipped.replace('[procedures."2.000908"]', entry + '[procedures."2.000908"]')
            city.write_text(added, encoding="utf-8")
            assert await reload(node, lambda: config)  # the same configuration: only the file changed
            status, created = await intake()
            assert status == 201 and created["NgayHenTra"] == "20270215090000"

            city.write_text(added.replace("working_days = 3", "working_days = -3"), encoding="utf-8")
            assert not await reload(node, lambda: config)  # refused: the catalogue in force stays
            status, created = await intake()
            assert status == 201 and created["NgayHenTra"] == "20270215090000"

            city.write_text(added, encoding="utf-8")
            peers = make_config(tmp_path, procedure_catalogue=str(city), peer_urls="https://unit-26740.example")
            assert await reload(node, lambda: peers)
            assert node.fetcher.peers == {"https://unit-26740.example:443"}
            assert node.config.node.peer_urls == "https://unit-26740.example"
