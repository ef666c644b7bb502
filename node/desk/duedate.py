"""Due dates (NgayHenTra) from the procedure catalogue, and whether a dossier is on time.

Working time is the catalogue's office hours on working days in Asia/Ho_Chi_Minh: Monday to Friday, less
Vietnam's public holidays as the ``holidays`` package knows them (Tết and the other statutory days, the
observed days when one falls on a weekend, the substituted days off, and the Saturdays worked in exchange),
less and plus the days the catalogue lists itself. A due date is the receipt time plus the procedure's
working days times the length of a working day, counted in that working time.

The portal's on-time rule (DOMAIN.md): processed no later than NgayHenTra, the time spent waiting for the
applicant's supplement not counted, more than one supplement request counts as late. The pause is the
working time between a supplement request (status 5) and the next step (the applicant's resubmission); it
moves the effective due date, never the stored NgayHenTra.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import holidays

from node.clock import TZ, dvcqg
from node.domain.status import (
    PROCESSED,
    REFUSED,
    RETURNED,
    STOPPED,
    SUPPLEMENT_REQUESTED,
    WITHDRAWN,
    derive_status,
)
from node.errors import validation_error

# Every walk over the calendar stops after this many days, so a bad catalogue cannot loop for ever.
MAX_SPAN_DAYS = 3660
MAX_WORKING_DAYS = 365

ON_TIME, AT_RISK, LATE = "on_time", "at_risk", "late"
# Statuses where no deadline applies any more: refused, withdrawn, stopped.
_NO_DEADLINE = frozenset({REFUSED, WITHDRAWN, STOPPED})

_PROCEDURE_RE = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_PERIOD_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-4]):([0-5][0-9])")
_DVCQG = "%Y%m%d%H%M%S"


def shipped_catalogue() -> Path:
    """The catalogue that ships with wardsync (``node/data/procedures.toml``)."""
    return Path(str(resources.files("node") / "data" / "procedures.toml"))


class CatalogueError(Exception):
    """A catalogue that cannot be used; ``problems`` lists every one found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Catalogue:
    """Processing time per procedure code, in working days, and the working calendar."""

    procedures: Mapping[str, float]
    periods: tuple[tuple[int, int], ...]  # office hours as (start, end) minutes after midnight
    days_off: frozenset[date]
    working_days: frozenset[date]
    at_risk_s: int

    @property
    def day_s(self) -> int:
        return sum(end - start for start, end in self.periods) * 60


def parse_catalogue(text: str, source: str = "catalogue") -> Catalogue:
    """A catalogue from its TOML text; CatalogueError lists every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError([f"{source}: not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    cal = raw.get("calendar", {})
    procs = raw.get("procedures", {})
    if not isinstance(cal, dict) or not isinstance(procs, dict):
        raise CatalogueError([f"{source}: [calendar] and [procedures] must be tables"])
    for key in set(raw) - {"calendar", "procedures"}:
        problems.append(f"{source}: [{key}]: unknown section (known: calendar, procedures)")
    for key in set(cal) - {"working_hours", "extra_days_off", "extra_working_days", "at_risk_working_hours"}:
        problems.append(f"{source}: [calendar] {key}: unknown setting")

    periods: list[tuple[int, int]] = []
    for spec in cal.get("working_hours", ["07:30-11:30", "13:00-17:00"]):
        m = _PERIOD_RE.fullmatch(spec) if isinstance(spec, str) else None
        if m is None:
            problems.append(f"{source}: [calendar] working_hours: {spec!r} is not HH:MM-HH:MM")
            continue
        start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if end <= start or end > 24 * 60 or (periods and start < periods[-1][1]):
            problems.append(f"{source}: [calendar] working_hours: {spec!r} must end after it starts, in order")
            continue
        periods.append((start, end))
    if not periods and not problems:
        problems.append(f"{source}: [calendar] working_hours: at least one period is needed")

    def days(name: str) -> frozenset[date]:
        out: set[date] = set()
        for value in cal.get(name, []):
            try:
                out.add(value if isinstance(value, date) else date.fromisoformat(str(value)))
            except ValueError:
                problems.append(f"{source}: [calendar] {name}: {value!r} is not a date YYYY-MM-DD")
        return frozenset(out)

    at_risk = cal.get("at_risk_working_hours", 8)
    if isinstance(at_risk, bool) or not isinstance(at_risk, int | float) or at_risk < 0:
        problems.append(f"{source}: [calendar] at_risk_working_hours: must be a number of hours, 0 or more")
        at_risk = 0

    procedures: dict[str, float] = {}
    for code, entry in procs.items():
        where = f"{source}: [procedures.{code!r}]"
        if _PROCEDURE_RE.fullmatch(code) is None:
            problems.append(f"{where}: not a procedure code (digits separated by dots, e.g. 1.001193)")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a table with working_days")
            continue
        for key in set(entry) - {"name", "working_days"}:
            problems.append(f"{where} {key}: unknown setting (known: name, working_days)")
        value = entry.get("working_days")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WORKING_DAYS:
            problems.append(f"{where} working_days: must be a number above 0 and at most {MAX_WORKING_DAYS}")
            continue
        procedures[code] = float(value)
    days_off, working_days = days("extra_days_off"), days("extra_working_days")
    if problems:
        raise CatalogueError(problems)
    return Catalogue(procedures, tuple(periods), days_off, working_days, int(float(at_risk) * 3600))


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """The catalogue at ``path``, or the shipped one when ``path`` is empty."""
    where = Path(path) if path else shipped_catalogue()
    try:
        text = where.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogueError([f"{where}: cannot be read ({exc.strerror or exc})"]) from exc
    return parse_catalogue(text, str(where))


def catalogue_problems(path: str | Path) -> list[str]:
    """Every problem with the catalogue at ``path`` (for the configuration check)."""
    try:
        load_catalogue(path)
    except CatalogueError as exc:
        return exc.problems
    return []


def parse_dvcqg(value: object) -> datetime | None:
    """A ``yyyyMMddHHmmss`` value in Asia/Ho_Chi_Minh, or None when it is not one."""
    if not isinstance(value, str) or len(value) != 14:
        return None
    try:
        return datetime.strptime(value, _DVCQG).replace(tzinfo=TZ)
    except ValueError:
        return None


class WorkCalendar:
    """Working time in Asia/Ho_Chi_Minh: the catalogue's office hours on Vietnam's working days."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        # Years are filled in on first use; the package also knows the Saturdays worked in exchange.
        self._holidays = holidays.country_holidays("VN")

    def is_working_day(self, day: date) -> bool:
        if day in self.catalogue.days_off:
            return False
        if day in self.catalogue.working_days:
            return True
        return bool(self._holidays.is_working_day(day))

    def _periods(self, day: date) -> list[tuple[datetime, datetime]]:
        if not self.is_working_day(day):
            return []
        midnight = datetime(day.year, day.month, day.day, tzinfo=TZ)
        return [
            (midnight + timedelta(minutes=start), midnight + timedelta(minutes=end))
            for start, end in self.catalogue.periods
        ]

    def add(self, start: datetime, seconds: float) -> datetime:
        """The moment ``seconds`` of working time after ``start`` (the end of a period, not the next start)."""
        start = start.astimezone(TZ)
        remaining = timedelta(seconds=seconds)
        if remaining <= timedelta(0):
            return start
        day = start.date()
        for _ in range(MAX_SPAN_DAYS):
            for begin, end in self._periods(day):
                begin = max(begin, start)
                if begin >= end:
                    continue
                if remaining <= end - begin:
                    return begin + remaining
                remaining -= end - begin
            day += timedelta(days=1)
        raise ValueError(f"no {seconds} s of working time within {MAX_SPAN_DAYS} days of {start}")

    def between(self, a: datetime, b: datetime) -> float:
        """Seconds of working time from ``a`` to ``b`` (0 when ``b`` is not after ``a``)."""
        a, b = a.astimezone(TZ), b.astimezone(TZ)
        total = timedelta(0)
        day = a.date()
        for _ in range(MAX_SPAN_DAYS):
            if day > b.date():
                break
            for begin, end in self._periods(day):
                lo, hi = max(begin, a), min(end, b)
                if hi > lo:
                    total += hi - lo
            day += timedelta(days=1)
        return total.total_seconds()


class Deadlines:
    """Due dates at intake and the deadline standing of a record, from one catalogue."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self.calendar = WorkCalendar(catalogue)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Deadlines:
        return cls(load_catalogue(path))

    def due_date(self, procedure: str, received: datetime) -> str | None:
        """NgayHenTra for a dossier of ``procedure`` received at ``received``; None when not in the catalogue."""
        days = self.catalogue.procedures.get(procedure)
        if days is None:
            return None
        # Counted from the receipt time as the record shows it (whole seconds), so the two agree exactly.
        start = parse_dvcqg(dvcqg(received))
        assert start is not None
        return dvcqg(self.calendar.add(start, days * self.catalogue.day_s))

    def intake_due_date(self, procedure: str, received: datetime) -> str:
        """NgayHenTra for an intake that left it out; 422 naming the field when it cannot be computed."""
        due = self.due_date(procedure, received)
        if due is None:
            raise validation_error(
                {
                    "NgayHenTra": f"required: procedure {procedure} is not in the procedure catalogue,"
                    " so the due date cannot be computed"
                }
            )
        return due

    def standing(self, record: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        """``TinhTrangHan`` (on_time, at_risk, late; null when no deadline applies) and ``NgayHenTraHieuLuc``
        (NgayHenTra moved by the working time spent waiting for the applicant's supplement)."""
        out: dict[str, Any] = {"TinhTrangHan": None, "NgayHenTraHieuLuc": None}
        due = parse_dvcqg(record.get("NgayHenTra"))
        status = record.get("TrangThaiHoSo")
        if due is None or status in _NO_DEADLINE:
            return out
        paused, supplements = self._pauses(record.get("QuaTrinhXuLy") or [], now)
        effective = self.calendar.add(due, paused) if paused else due
        out["NgayHenTraHieuLuc"] = dvcqg(effective)
        finished = parse_dvcqg(record.get("NgayKetThucXuLy")) if status in (PROCESSED, RETURNED) else None
        if supplements > 1:
            state = LATE
        elif finished is not None:
            state = ON_TIME if finished <= effective else LATE
        elif now > effective:
            state = LATE
        elif self.calendar.between(now, effective) <= self.catalogue.at_risk_s:
            state = AT_RISK
        else:
            state = ON_TIME
        out["TinhTrangHan"] = state
        return out

    def _pauses(self, steps: list[Any], now: datetime) -> tuple[float, int]:
        """Working seconds spent waiting for supplements, and how many supplement requests there were."""
        valid = [s for s in steps if isinstance(s, dict) and type(s.get("TrangThai")) is int]
        # Only the steps the status machine applied in merged order count, as for the status itself.
        _, skipped = derive_status(int(s["TrangThai"]) for s in valid)
        skipped_set = set(skipped)
        paused, supplements = 0.0, 0
        since: datetime | None = None
        for i, s in enumerate(valid):
            if i in skipped_set:
                continue
            at = parse_dvcqg(s.get("ThoiDiemXuLy"))
            if s["TrangThai"] == SUPPLEMENT_REQUESTED:
                supplements += 1
                since = at
            elif since is not None:
                if at is not None:
                    paused += self.calendar.between(since, at)
                since = None
        if since is not None:
            paused += self.calendar.between(since, now)  # still waiting: the clock stays stopped
        return paused, supplements

    def json_tail(self, record_json: str, now: datetime) -> str:
        """The standing as JSON members to splice into a record's JSON object (``,"TinhTrangHan":...``)."""
        try:
            record = json.loads(record_json)
        except ValueError:
            return ""
        standing = self.standing(record, now) if isinstance(record, dict) else {}
        return "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in standing.items())
