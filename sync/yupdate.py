"""Reading a Yjs v1 update's shape from its bytes, without applying it.

A peer's or an upstream's update is checked here before yrs sees it: yrs decodes nested values
recursively and a deep enough one overflows its stack and kills the process, and a dossier's Doc can
only hold plain values under keys of its four root Maps.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sync.record import DOCUMENTS, FEES, FIELDS, STEPS, normalise

ROOTS = (FIELDS, STEPS, DOCUMENTS, FEES)

# Dossier values are shallow JSON (the API accepts 16 levels); yrs decodes nested values recursively
# and overflows its stack on a deep enough one (about 100,000 levels kill the process), so nesting is
# bounded here, before yrs sees the bytes.
MAX_VALUE_DEPTH = 32
# yrs clocks are 32-bit; Yjs client ids are at most 53 bits (they travel as JavaScript numbers).
_MAX_CLOCK = 2**32 - 1
_MAX_CLIENT = 2**53 - 1
_MAX_REASON_BYTES = 123  # a WebSocket close frame carries at most 125 bytes, two of them the code


class Refused(Exception):
    """An update (or message) the node will not take, with a code and a reason for the sender."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def reason(self) -> bytes:
        """The close reason: UTF-8, cut on a character boundary to fit a close frame."""
        raw = f"{self.code}: {self.message}".encode()
        if len(raw) <= _MAX_REASON_BYTES:
            return raw
        return raw[: _MAX_REASON_BYTES - 3].decode(errors="ignore").encode() + "…".encode()


class Reader:
    """lib0 decoding with bounds checks: every malformed input becomes a ``Refused``, never an IndexError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, detail: str) -> Refused:
        return Refused("malformed_message" if self.what == "message" else "corrupt_update", detail)

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail(f"the {self.what} is truncated at byte {self.pos}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise self.fail(f"a number in the {self.what} is longer than 64 bits")

    def signed(self) -> None:
        # lib0 signed varint: sign and six bits in the first byte, then seven bits per byte.
        byte = self.byte()
        while byte & 0x80:
            byte = self.byte()

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"the {self.what} is truncated: {n} bytes announced at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self) -> str:
        try:
            return self.take(self.uint()).decode()
        except UnicodeDecodeError as exc:
            raise self.fail(f"a string in the {self.what} is not UTF-8") from exc


@dataclass
class UpdateShape:
    """What an update writes and deletes, read from its bytes without applying it."""

    # client id → (first clock, clock after the last struct) of the update's run of structs
    runs: dict[int, tuple[int, int]] = field(default_factory=dict)
    # (client id, first clock, length) of each deleted range
    deletes: list[tuple[int, int, int]] = field(default_factory=list)


# Item content refs (Yjs encoding v1). Only plain values (Any) and deleted content fit a dossier's Maps.
_GC, _DELETED, _JSON, _BINARY, _STRING, _EMBED, _FORMAT, _TYPE, _ANY, _SUBDOC, _SKIP = range(11)
_FOREIGN_CONTENT = {
    _JSON: "legacy JSON content",
    _BINARY: "a binary value",
    _STRING: "text content",
    _EMBED: "a text embed",
    _FORMAT: "text formatting",
    _TYPE: "a nested shared type",
    _SUBDOC: "a subdocument",
}


def decode_update(update: bytes) -> UpdateShape:
    """The runs of structs and the delete set of a Yjs v1 update; refuses anything a dossier cannot hold.

    A dossier's Doc holds only the four root Maps with plain values under keys, so every item that names
    its parent must name one of them and a key; an item that names none inherits both from its origin,
    which is either in the Doc already (a key of a root Map) or earlier in this update (checked here).
    """
    r = Reader(update, "update")
    shape = UpdateShape()
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        if client > _MAX_CLIENT:
            raise r.fail(f"client id {client} is beyond 53 bits")
        if client in shape.runs:
            raise r.fail(f"client {client} appears twice in the update")
        start = clock
        for _ in range(count):
            clock += _struct_length(r)
            if clock > _MAX_CLOCK:
                raise r.fail(f"clock {clock} of client {client} is beyond 32 bits")
        shape.runs[client] = (start, clock)
    for _ in range(r.uint()):
        client = r.uint()
        for _ in range(r.uint()):
            clock, length = r.uint(), r.uint()
            if clock + length > _MAX_CLOCK:
                raise r.fail(f"a deleted range of client {client} reaches beyond 32-bit clocks")
            shape.deletes.append((client, clock, length))
    if not r.done():
        raise r.fail(f"{len(update) - r.pos} bytes follow the delete set")
    return shape


def _struct_length(r: Reader) -> int:
    info = r.byte()
    ref = info & 0x1F
    if ref in (_GC, _SKIP):
        return r.uint()
    has_origin, has_right_origin = info & 0x80, info & 0x40
    if has_origin:
        r.uint(), r.uint()
    if has_right_origin:
        r.uint(), r.uint()
    if not (has_origin or has_right_origin):
        if r.uint() != 1:
            r.uint(), r.uint()
            raise Refused("foreign_type", "the update writes inside a nested shared type")
        root = r.string()
        if root not in ROOTS:
            raise Refused(
                "foreign_type", f"the update writes to a root {root!r}; a dossier has only {', '.join(ROOTS)}"
            )
        if not info & 0x20:
            raise Refused("foreign_type", f"the update writes list or text content into the {root} Map")
        r.string()  # the key
    if ref == _DELETED:
        return r.uint()
    if ref == _ANY:
        count = r.uint()
        for _ in range(count):
            _skip_any(r, 1)
        return count
    if ref in _FOREIGN_CONTENT:
        raise Refused("foreign_type", f"the update holds {_FOREIGN_CONTENT[ref]}; dossier values are plain JSON")
    raise r.fail(f"unknown content type {ref}")


def _skip_any(r: Reader, depth: int) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise Refused("invalid_value", f"a value nests deeper than {MAX_VALUE_DEPTH} levels")
    tag = r.byte()
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return
    if tag == 125:
        r.signed()
    elif tag == 124:
        r.take(4)
    elif tag in (123, 122):  # float64, bigint64
        r.take(8)
    elif tag == 119:
        r.string()
    elif tag == 118:
        for _ in range(r.uint()):
            r.string()
            _skip_any(r, depth + 1)
    elif tag == 117:
        for _ in range(r.uint()):
            _skip_any(r, depth + 1)
    elif tag == 116:
        raise Refused("invalid_value", "a value holds binary data; dossier values are plain JSON")
    else:
        raise r.fail(f"unknown value tag {tag}")


# --- validation on a scratch copy -------------------------------------------------------------------




# --- concurrent edits of one field ------------------------------------------------------------------


@dataclass
class _MapItem:
    client: int
    clock: int
    length: int
    root: str | None
    key: str | None
    origin: tuple[int, int] | None
    value: Any


def _read_any(r: Reader, depth: int) -> Any:
    if depth > MAX_VALUE_DEPTH:
        raise Refused("invalid_value", f"a value nests deeper than {MAX_VALUE_DEPTH} levels")
    tag = r.byte()
    if tag in (127, 126):
        return None
    if tag in (121, 120):
        return tag == 120
    if tag == 125:
        return r.signed()
    if tag == 124:
        return struct.unpack(">f", r.take(4))[0]
    if tag == 123:
        return struct.unpack(">d", r.take(8))[0]
    if tag == 122:
        return int.from_bytes(r.take(8), "big", signed=True)
    if tag == 119:
        return r.string()
    if tag == 118:
        return {r.string(): _read_any(r, depth + 1) for _ in range(r.uint())}
    if tag == 117:
        return [_read_any(r, depth + 1) for _ in range(r.uint())]
    raise r.fail(f"unknown value tag {tag}")


def _map_items(state: bytes) -> tuple[list[_MapItem], list[tuple[int, int, int]]]:
    """Every item of a Doc's full state with its root, key, origin and value, and the delete set."""
    r = Reader(state, "state")
    items: list[_MapItem] = []
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        for _ in range(count):
            info = r.byte()
            ref = info & 0x1F
            if ref in (_GC, _SKIP):
                clock += r.uint()
                continue
            origin = (r.uint(), r.uint()) if info & 0x80 else None
            if info & 0x40:
                r.uint(), r.uint()
            root = key = None
            if not info & 0xC0:
                root = r.string() if r.uint() == 1 else None
                if info & 0x20:
                    key = r.string()
            if ref == _DELETED:
                values: list[Any] = [None] * r.uint()
            elif ref == _ANY:
                values = [_read_any(r, 1) for _ in range(r.uint())]
            else:
                raise r.fail(f"unexpected content type {ref} in a dossier")
            # Successive writes of one key by one writer are squashed into one item of several values:
            # value n was written after value n-1, as if it named it as its origin.
            for n, value in enumerate(values):
                items.append(_MapItem(client, clock + n, 1, root if n == 0 else None, key if n == 0 else None,
                                      origin if n == 0 else (client, clock + n - 1), value))
            clock += len(values)
    deletes: list[tuple[int, int, int]] = []
    for _ in range(r.uint()):
        client = r.uint()
        for _ in range(r.uint()):
            deletes.append((client, r.uint(), r.uint()))
    return items, deletes


def field_conflicts(state: bytes, root: str = "fields") -> list[dict[str, Any]]:
    """Values of ``root`` keys that lost a concurrent edit: replaced without their writer's successor
    having seen them. The same on every replica that holds the same state (the Doc keeps deleted values:
    Docs are created with garbage collection off for that reason).

    A value written again, equal, by another writer that had not seen the first write (a dossier created
    from the portal's record next to the receiving unit's Doc, or a portal value copied by a node's portal
    writer) is the same edit, not a conflict: a value equal to the kept one is never listed, a value one
    of whose independent copies was overwritten knowingly is not listed, and an overwrite that only copies
    a value written concurrently elsewhere does not hide the value it replaced. Each lost value of a key
    is listed once.
    """
    items, deletes = _map_items(state)
    by_id: dict[tuple[int, int], _MapItem] = {(i.client, i.clock): i for i in items}

    def find(ident: tuple[int, int]) -> _MapItem | None:
        client, clock = ident
        hit = by_id.get(ident)
        if hit is not None:
            return hit
        return next((i for i in items if i.client == client and i.clock <= clock < i.clock + i.length), None)

    # An item written after another one names it as origin and inherits its root and key.
    for item in items:
        if item.root is None and item.origin is not None:
            seen: set[tuple[int, int]] = set()
            cur = find(item.origin)
            while cur is not None and cur.root is None and cur.origin is not None and cur.origin not in seen:
                seen.add(cur.origin)
                cur = find(cur.origin)
            if cur is not None:
                item.root, item.key = cur.root, cur.key

    def deleted(i: _MapItem) -> bool:
        return any(c == i.client and k <= i.clock < k + n for c, k, n in deletes)

    by_key: dict[str, list[_MapItem]] = {}
    for i in items:
        if i.root == root and i.key is not None:
            by_key.setdefault(i.key, []).append(i)
    out: list[dict[str, Any]] = []
    for key, writes in by_key.items():
        live = [i for i in writes if not deleted(i)]
        if not live:
            continue  # the key was removed, not overwritten
        out += _lost_values(key, writes, live[-1], deleted, find)
    out.sort(key=lambda c: (c["field"], c["lost_writer"]))
    return out


def _value_key(value: Any) -> str:
    """Equal values give equal keys (a Y number reads back as a float, so 1.0 and 1 are one value)."""
    return json.dumps(normalise(value), sort_keys=True, ensure_ascii=False, default=str)


def _lost_values(
    key: str,
    writes: list[_MapItem],
    winner: _MapItem,
    deleted: Callable[[_MapItem], bool],
    find: Callable[[tuple[int, int]], _MapItem | None],
) -> list[dict[str, Any]]:
    """The conflicts of one key: its overwritten values that no writer replaced knowingly.

    The writes of a Map key form a tree: each names as origin the write it replaced, the value its writer
    saw. ``a`` was seen by ``b``'s writer when ``a`` is an ancestor of ``b`` in that tree.
    """
    n = len(writes)
    index = {(w.client, w.clock): k for k, w in enumerate(writes)}
    parent: list[int | None] = [None] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for k, w in enumerate(writes):
        origin = find(w.origin) if w.origin is not None else None
        p = index.get((origin.client, origin.clock)) if origin is not None else None
        if p is not None and p != k:
            parent[k] = p
            children[p].append(k)
    roots = [k for k in range(n) if parent[k] is None]
    if len(roots) == 1 and all(len(c) <= 1 for c in children):
        return []  # one line of writes, each made knowing the one before: nothing was concurrent
    # Entry and exit times of a depth-first walk: a is an ancestor of b when b's walk lies within a's.
    enter, leave = [0] * n, [0] * n
    tick = 0
    for r in roots:
        stack: list[tuple[int, bool]] = [(r, False)]
        while stack:
            k, done = stack.pop()
            tick += 1
            if done:
                leave[k] = tick
                continue
            enter[k] = tick
            stack.append((k, True))
            stack.extend((c, False) for c in children[k])

    def before(a: int, b: int) -> bool:  # a was seen by b's writer
        return enter[a] < enter[b] and leave[b] < leave[a]

    by_value: dict[str, list[int]] = {}
    for k, w in enumerate(writes):
        by_value.setdefault(_value_key(w.value), []).append(k)
    values = [_value_key(w.value) for w in writes]

    def copies(a: int) -> list[int]:
        """``a`` and the equal values written without either writer having seen the other."""
        return [b for b in by_value[values[a]] if b == a or not (before(a, b) or before(b, a))]

    def knows(b: int, a: int) -> bool:  # b's writer had seen a, or an independent copy of it
        return any(c == b or before(c, b) for c in copies(a))

    def replaced_knowingly(a: int) -> bool:
        for s in children[a]:
            # An overwrite that repeats a value written concurrently with ``a`` is a copy of that write
            # (a portal writer bringing another unit's edit), not a decision against ``a``.
            if not any(c != s and not knows(c, a) and not knows(a, c) for c in by_value[values[s]]):
                return True
        return False

    kept = _value_key(winner.value)
    lost: dict[str, dict[str, Any]] = {}
    for k in sorted(range(n), key=lambda j: (writes[j].client, writes[j].clock)):
        w = writes[k]
        if w is winner or values[k] == kept or values[k] in lost or not deleted(w):
            continue
        if any(replaced_knowingly(c) for c in copies(k)):
            continue
        lost[values[k]] = {"kind": "field", "field": key, "kept": winner.value, "lost": w.value,
                           "lost_writer": w.client, "kept_writer": winner.client}
    return list(lost.values())
