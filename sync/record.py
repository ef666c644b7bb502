"""The dossier Doc's record in DVCQG shape, and its digest.

Imported by the node and by both upstream stand-ins: equal digests on node, portal and city system is
what "converged" means, so everything here must be deterministic and independent of replica or order of
arrival.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pycrdt import Doc, Map

from node.domain.status import derive_status

FIELDS, STEPS, DOCUMENTS, FEES = "fields", "steps", "documents", "fees"

# The DVCQG processing-step fields (QuaTrinhXuLy); anything else on a step value is ours (the HLC stamp).
STEP_RECORD_FIELDS = (
    "MaHoSo",
    "NguoiXuLy",
    "ChucDanh",
    "ThoiDiemXuLy",
    "PhongBanXuLy",
    "NoiDungXuLy",
    "TrangThai",
    "NgayBatDau",
    "NgayKetThucTheoQuyDinh",
)
HLC_FIELD = "hlc"
DIGEST_VERSION = 1


def step_key(code: str, at: str, status: int, officer: str, content: str | None) -> str:
    """Natural key of a step: the same step from any path lands on the same key."""
    raw = json.dumps([code, at, int(status), officer, content or ""], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def step_key_of(step: Mapping[str, Any]) -> str:
    return step_key(
        str(step["MaHoSo"]),
        str(step["ThoiDiemXuLy"]),
        int(step["TrangThai"]),
        str(step["NguoiXuLy"]),
        step.get("NoiDungXuLy"),
    )


def normalise(value: Any) -> Any:
    """Y numbers read back as floats: integral floats become ints, recursively."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def _ordered_steps(steps: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    # Merged order is (HLC, key): every replica sorts the same set the same way.
    items = [(k, normalise(v)) for k, v in steps.items()]
    items.sort(key=lambda kv: (str(kv[1].get(HLC_FIELD, "")), kv[0]))
    return items


def read_roots(doc: Doc[Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The four root Maps as plain data (one conversion each), numbers normalised."""
    fields, steps, documents, fees = (
        normalise(doc.get(name, type=Map).to_py() or {}) for name in (FIELDS, STEPS, DOCUMENTS, FEES)
    )
    return fields, steps, documents, fees


def materialise(doc: Doc[Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The DVCQG-shaped record of a Doc and its conflicts: steps skipped as illegal in the merged order,
    and field values that lost a concurrent edit."""
    from sync.yupdate import Refused, field_conflicts

    fields, steps, documents, fees = read_roots(doc)
    record, conflicts = build_record(fields, _ordered_steps(steps), documents, fees)
    # Edits are concurrent only between writers: a Doc whose state vector names at most one client (its
    # first varint, the number of clients, below 2) has a single line of writes and no field conflicts,
    # and reading its whole history for them is the dearest part of a commit.
    if doc.get_state()[:1] in (b"\x00", b"\x01"):
        return record, conflicts
    # The state was checked when it came in; a shape this reader does not know adds no conflicts.
    with contextlib.suppress(Refused, ValueError):
        conflicts += field_conflicts(doc.get_update())
    return record, conflicts


def record_from_roots(
    fields: Mapping[str, Any], steps: Mapping[str, Any], documents: Mapping[str, Any], fees: Mapping[str, Any]
) -> dict[str, Any]:
    """The same record as :func:`record_from_doc`, from roots already read with :func:`read_roots`."""
    return build_record(fields, _ordered_steps(steps), documents, fees)[0]


def build_record(
    fields: Mapping[str, Any],
    ordered_steps: list[tuple[str, dict[str, Any]]],
    documents: Mapping[str, Any],
    fees: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    status, skipped = derive_status(int(s["TrangThai"]) for _, s in ordered_steps)
    skipped_set = set(skipped)
    record: dict[str, Any] = dict(fields)
    record["TrangThaiHoSo"] = status
    applied = [s for i, (_, s) in enumerate(ordered_steps) if i not in skipped_set]
    # The dates the portal reports for the end of processing and the return of the result follow from
    # the steps, so they are derived like the status and never edited directly.
    for s in applied:
        if s["TrangThai"] == 9:
            record["NgayKetThucXuLy"] = s["ThoiDiemXuLy"]
        elif s["TrangThai"] == 10:
            record["NgayTra"] = s["ThoiDiemXuLy"]
    record["QuaTrinhXuLy"] = [{k: s[k] for k in STEP_RECORD_FIELDS if k in s} for _, s in ordered_steps]
    record["TaiLieuNop"] = [documents[k] for k in sorted(documents)]
    record["DanhSachLePhi"] = [fees[k] for k in sorted(fees)]
    conflicts = [
        {
            "kind": "illegal_transition",
            "step": ordered_steps[i][0],
            "TrangThai": ordered_steps[i][1]["TrangThai"],
            "hlc": ordered_steps[i][1].get(HLC_FIELD),
        }
        for i in skipped
    ]
    return record, conflicts


def record_from_doc(doc: Doc[Any]) -> dict[str, Any]:
    """The DVCQG-shaped record: fields, boundary-free fields, derived status, steps, documents, fees."""
    return materialise(doc)[0]


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """``{"v": 1, ...}``, sorted keys, UTF-8, no spaces, numbers normalised, steps sorted by step key."""
    body: dict[str, Any] = normalise(dict(record))
    steps: Iterable[Mapping[str, Any]] = body.get("QuaTrinhXuLy") or []
    body["QuaTrinhXuLy"] = sorted(steps, key=step_key_of)
    body["v"] = DIGEST_VERSION
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def digest(record: Mapping[str, Any]) -> str:
    """sha256 of the record's canonical JSON."""
    return hashlib.sha256(canonical_json(record)).hexdigest()


def bucket_of(code: str, buckets: int) -> int:
    """The anti-entropy bucket of a dossier code: ``int(sha256(code)[:8], 16) % buckets``.

    Here because the node and both stand-ins must split a unit's dossiers the same way, or a bucket's
    digests would be compared against another bucket's. A hash of the code, not of the day or sequence
    inside it, so every bucket gets its share of each day's dossiers.
    """
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    return int(hashlib.sha256(code.encode()).hexdigest()[:8], 16) % buckets
