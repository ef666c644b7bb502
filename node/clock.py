"""Wall-clock time, injectable so that day changes can be tested without waiting for midnight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

# The portal's dates and the dossier code's day are in Vietnam's time zone; the tzdata package ships
# the zone so a server without system zone files still gets it right.
TZ = ZoneInfo("Asia/Ho_Chi_Minh")


class Clock:
    """The system clock, optionally shifted by a fixed offset."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def ms(self) -> int:
        return int(self.now().timestamp() * 1000)


def local(dt: datetime) -> datetime:
    return dt.astimezone(TZ)


def dvcqg(dt: datetime) -> str:
    """``yyyyMMddHHmmss`` in Asia/Ho_Chi_Minh."""
    return dt.astimezone(TZ).strftime("%Y%m%d%H%M%S")


def iso(dt: datetime) -> str:
    """UTC ISO 8601 with milliseconds, so that string order is time order."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
