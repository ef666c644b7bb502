"""Merging the portal's record of a dossier into its Doc: a three-way diff against a base.

The portal speaks records, not CRDT updates. The base is the last record acknowledged by or pulled from
the portal; only what the portal changed since the base becomes an operation, written under this node's
own client id for the portal (never its main one: one writer per client id). The rules:

- a portal value equal to the local one is ignored;
- a field the portal did not change since the base is left alone (the local edit stands);
- the portal never deletes: a field it dropped, a step it does not list, stay;
- forward-only values never move back (the forwarding state 1 → 4 → 2 → 3); the status is derived from
  the steps and never written;
- a step new to the Doc gets an HLC stamp derived from its ThoiDiemXuLy, so it sorts where it happened.

A record without any step (:func:`lacks_steps`) is the portal's half of a push whose steps call failed.
Merged into a Doc that exists it adds what it has; a Doc must never be started from it (no step, no
status): the caller leaves such a dossier for later.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pycrdt import Doc, Map

from node.clock import TZ
from sync import doc as ydoc
from sync.hlc import HLC, Stamp
from sync.record import FIELDS, STEP_RECORD_FIELDS, normalise, step_key_of

# Derived from the steps or carried as lists: never copied from the portal as scalar fields.
NOT_FIELDS = frozenset({"TrangThaiHoSo", "NgayTra", "NgayKetThucXuLy", "QuaTrinhXuLy", "TaiLieuNop", "DanhSachLePhi"})
# Forwarding state order: received 1 → waiting for the competent unit 4 → processing 2 → returned 3.
FORWARD_ORDER = {1: 0, 4: 1, 2: 2, 3: 3}
FORWARD_ONLY = {"TrangThaiPhiDiaGioi": FORWARD_ORDER}
# The base is kept on every acknowledgement by the portal and on every pull from it.
PORTAL_BASE_UPSERT = (
    "INSERT INTO portal_base (code, record) VALUES (?, ?) ON CONFLICT (code) DO UPDATE SET record = excluded.record"
)


def lacks_steps(record: Mapping[str, Any]) -> bool:
    """Whether the portal's ``record`` carries no processing step (``QuaTrinhXuLy`` empty or missing).

    The portal stores a record and its steps in two calls; a record whose steps call failed has no step
    yet. A Doc built from it alone would have no status, which the portal refuses on every later push
    ("TrangThaiHoSo: bắt buộc") while the city system accepts it.
    """
    steps = record.get("QuaTrinhXuLy")
    return not (isinstance(steps, list) and any(isinstance(s, dict) for s in steps))


def stamp_of(when: str, hlc: HLC) -> str:
    """An HLC stamp for a portal step, from its ThoiDiemXuLy (clamped if it lies far in the future)."""
    try:
        ms = int(datetime.strptime(when, "%Y%m%d%H%M%S").replace(tzinfo=TZ).timestamp() * 1000)
    except (TypeError, ValueError):
        ms = 0
    return hlc.clamp(Stamp(ms, 0)).encode()


def _moves_back(name: str, local: Any, remote: Any) -> bool:
    order = FORWARD_ONLY.get(name)
    if order is None or local is None:
        return False
    return order.get(remote, -1) < order.get(local, -1)


def portal_operations(
    local: Mapping[str, Any], base: Mapping[str, Any] | None, remote: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(fields to set, new steps, new documents, new fees) that bring the portal's changes into ``local``."""
    remote, local = normalise(dict(remote)), normalise(dict(local))
    base = normalise(dict(base)) if base is not None else None
    fields: dict[str, Any] = {}
    for name, value in remote.items():
        if name in NOT_FIELDS or value is None or isinstance(value, dict | list):
            continue
        if local.get(name) == value:
            continue
        if base is not None and base.get(name) == value:
            continue  # the portal still has the base value: the change is ours, and it stands
        if _moves_back(name, local.get(name), value):
            continue
        fields[name] = value
    local_steps = {step_key_of(s) for s in local.get("QuaTrinhXuLy") or []}
    steps = [
        {k: s[k] for k in STEP_RECORD_FIELDS if k in s}
        for s in remote.get("QuaTrinhXuLy") or []
        if isinstance(s, dict) and step_key_of(s) not in local_steps
    ]
    have_docs = {str(d.get("TepDinhKemId")) for d in local.get("TaiLieuNop") or []}
    documents = [d for d in remote.get("TaiLieuNop") or [] if str(d.get("TepDinhKemId")) not in have_docs]
    have_fees = {str(f.get("MaPhiLePhi")) for f in local.get("DanhSachLePhi") or []}
    fees = [f for f in remote.get("DanhSachLePhi") or [] if str(f.get("MaPhiLePhi")) not in have_fees]
    return fields, steps, documents, fees


def portal_update(
    code: str,
    state: bytes | None,
    local: Mapping[str, Any] | None,
    base: Mapping[str, Any] | None,
    remote: Mapping[str, Any],
    *,
    client_id: int,
    hlc: HLC,
) -> bytes | None:
    """The Y update carrying the portal's changes, written under ``client_id``; None when nothing changed."""
    fields, steps, documents, fees = portal_operations(local or {}, base, remote)
    if not (fields or steps or documents or fees):
        return None
    scratch: Doc[Any] = ydoc.new_doc(code, client_id)
    if state:
        scratch.apply_update(state)
    before = scratch.get_state()
    with scratch.transaction():
        f: Map[Any] = scratch.get(FIELDS, type=Map)
        for name, value in fields.items():
            f[name] = value
        # The portal's times have one-second resolution: a step must never sort before a step the Doc
        # already holds from the same or an earlier second, and portal steps keep the portal's order.
        known = [
            (str(v.get("ThoiDiemXuLy", "")), Stamp.decode(str(v["hlc"])))
            for v in ydoc.steps_map(scratch).values()
            if isinstance(v, dict) and "hlc" in v
        ]
        for step in steps:
            when = str(step.get("ThoiDiemXuLy", ""))
            stamp = Stamp.decode(stamp_of(when, hlc))
            floor = max((st for t, st in known if t <= when), default=None)
            if floor is not None and stamp <= floor:
                stamp = Stamp(floor.ms, floor.counter + 1)
            known.append((when, stamp))
            ydoc.add_step(scratch, {**step, "MaHoSo": code}, stamp.encode())
        for d in documents:
            ydoc.add_document(scratch, d)
        for fee in fees:
            ydoc.add_fee(scratch, fee)
    update: bytes = scratch.get_update(before)
    return update
