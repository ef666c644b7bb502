"""Dossier status machine (TrangThaiHoSo codes 1..10 of the national portal).

Steps from several nodes are merged into one order before the status is derived, so a step
that was legal where it was recorded may be illegal after the merge. ``derive_status``
skips such steps instead of failing, and reports them so they can be shown to an officer.
"""

from __future__ import annotations

from collections.abc import Iterable

REGISTERED = 1
ACCEPTED = 2
REFUSED = 3
IN_PROCESSING = 4
SUPPLEMENT_REQUESTED = 5
AWAITING_FEE = 6
WITHDRAWN = 7
STOPPED = 8
PROCESSED = 9
RETURNED = 10

STATUS_NAMES: dict[int, str] = {
    REGISTERED: "registered",
    ACCEPTED: "accepted",
    REFUSED: "refused",
    IN_PROCESSING: "in_processing",
    SUPPLEMENT_REQUESTED: "supplement_requested",
    AWAITING_FEE: "awaiting_fee",
    WITHDRAWN: "withdrawn",
    STOPPED: "stopped",
    PROCESSED: "processed",
    RETURNED: "returned",
}

STATUS_LABELS_VI: dict[int, str] = {
    REGISTERED: "Mới đăng ký",
    ACCEPTED: "Đã tiếp nhận",
    REFUSED: "Từ chối tiếp nhận",
    IN_PROCESSING: "Đang xử lý",
    SUPPLEMENT_REQUESTED: "Yêu cầu bổ sung giấy tờ",
    AWAITING_FEE: "Chờ thực hiện nghĩa vụ tài chính",
    WITHDRAWN: "Công dân rút hồ sơ",
    STOPPED: "Dừng xử lý",
    PROCESSED: "Đã xử lý xong",
    RETURNED: "Đã trả kết quả",
}

# Online registrations start at 1; dossiers received at the desk are accepted on the spot.
INITIAL: frozenset[int] = frozenset({REGISTERED, ACCEPTED})

TRANSITIONS: dict[int, frozenset[int]] = {
    REGISTERED: frozenset({ACCEPTED, REFUSED, WITHDRAWN}),
    ACCEPTED: frozenset({IN_PROCESSING, WITHDRAWN}),
    REFUSED: frozenset(),
    IN_PROCESSING: frozenset({SUPPLEMENT_REQUESTED, AWAITING_FEE, STOPPED, PROCESSED, WITHDRAWN}),
    SUPPLEMENT_REQUESTED: frozenset({IN_PROCESSING, WITHDRAWN}),
    AWAITING_FEE: frozenset({IN_PROCESSING, WITHDRAWN}),
    WITHDRAWN: frozenset(),
    STOPPED: frozenset(),
    PROCESSED: frozenset({RETURNED}),
    RETURNED: frozenset(),
}

FINAL: frozenset[int] = frozenset(code for code, nexts in TRANSITIONS.items() if not nexts)


def allowed_next(status: int | None) -> frozenset[int]:
    """Return the statuses reachable in one step; None (no step yet) gives INITIAL."""
    if status is None:
        return INITIAL
    return TRANSITIONS.get(status, frozenset())


def is_legal(current: int | None, nxt: int) -> bool:
    """Tell whether a step to ``nxt`` is allowed from ``current``."""
    # bool is an int subclass; True must not pass for status 1 when data comes off the wire.
    if type(nxt) is not int:
        return False
    return nxt in allowed_next(current)


def derive_status(statuses: Iterable[int]) -> tuple[int | None, list[int]]:
    """Fold step statuses in merged order; return the final status and skipped step indexes."""
    current: int | None = None
    skipped: list[int] = []
    for index, nxt in enumerate(statuses):
        if is_legal(current, nxt):
            current = nxt
        else:
            skipped.append(index)
    return current, skipped
