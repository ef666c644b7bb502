"""Operations on a dossier's Doc.

One Doc per dossier (guid = code). Root types are Maps from a natural key to an immutable JSON value;
there are no nested shared types and never an Array, so concurrent writers can only ever add keys or
race on one scalar, which Yjs resolves the same way everywhere. A Doc only grows by applying Y updates or
by new operations; it is never rebuilt from plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pycrdt import Doc, Map

from sync.record import DOCUMENTS, FEES, FIELDS, HLC_FIELD, STEPS, step_key_of


def new_doc(code: str, client_id: int) -> Doc[Any]:
    # Garbage collection off: a value that lost a concurrent edit stays readable, so every replica can
    # report the same conflict (sync.yupdate.field_conflicts). Dossier Docs are small.
    doc: Doc[Any] = Doc(client_id=client_id, guid=code, skip_gc=True)
    for name in (FIELDS, STEPS, DOCUMENTS, FEES):
        doc.get(name, type=Map)
    return doc


def create(
    code: str,
    client_id: int,
    fields: Mapping[str, Any],
    steps: Mapping[str, Mapping[str, Any]],
    documents: Mapping[str, Mapping[str, Any]],
    fees: Mapping[str, Mapping[str, Any]],
) -> tuple[Doc[Any], bytes]:
    """A new dossier's Doc written in one transaction, and its first update (which is its whole state).

    The intake hot path: each root Map is looked up once and nothing is read back before writing.
    """
    doc: Doc[Any] = Doc(client_id=client_id, guid=code, skip_gc=True)
    with doc.transaction():
        # Integrating each root Map with its content in one call costs far less than key-by-key sets.
        for name, values in ((FIELDS, fields), (STEPS, steps), (DOCUMENTS, documents), (FEES, fees)):
            doc[name] = Map({k: v for k, v in values.items() if v is not None})
    return doc, doc.get_update()


def load_doc(code: str, state: bytes, client_id: int) -> Doc[Any]:
    """A Doc from its encoded state, writing under ``client_id`` from here on."""
    doc = new_doc(code, client_id)
    doc.apply_update(state)
    return doc


def change(doc: Doc[Any], fn: Callable[[Doc[Any]], None]) -> bytes:
    """Run ``fn`` in one Y transaction and return the update it produced (empty update if none)."""
    before = doc.get_state()
    with doc.transaction():
        fn(doc)
    return doc.get_update(before)


def fields_map(doc: Doc[Any]) -> Map[Any]:
    fields: Map[Any] = doc.get(FIELDS, type=Map)
    return fields


def steps_map(doc: Doc[Any]) -> Map[Any]:
    steps: Map[Any] = doc.get(STEPS, type=Map)
    return steps


def put_fields(doc: Doc[Any], values: Mapping[str, Any]) -> None:
    fields = fields_map(doc)
    for name, value in values.items():
        if value is not None and fields.get(name) != value:
            fields[name] = value


def add_step(doc: Doc[Any], step: Mapping[str, Any], stamp: str) -> str:
    """Add a step under its natural key; a step already present is left as it is."""
    key = step_key_of(step)
    steps = steps_map(doc)
    if key not in steps:
        steps[key] = {**step, HLC_FIELD: stamp}
    return key


def add_document(doc: Doc[Any], document: Mapping[str, Any]) -> str:
    key = str(document["TepDinhKemId"])
    docs = doc.get(DOCUMENTS, type=Map)
    if key not in docs:
        docs[key] = dict(document)
    return key


def add_fee(doc: Doc[Any], fee: Mapping[str, Any]) -> str:
    key = str(fee["MaPhiLePhi"])
    fees = doc.get(FEES, type=Map)
    if key not in fees:
        fees[key] = dict(fee)
    return key


def get_fee(doc: Doc[Any], key: str) -> Any:
    return doc.get(FEES, type=Map).get(key)


def get_document(doc: Doc[Any], key: str) -> Any:
    return doc.get(DOCUMENTS, type=Map).get(key)
