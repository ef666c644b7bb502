"""Tamper-evident audit log: every dossier change, hash-chained, in the same transaction as the change.

Each entry holds ``seq, at, kind, code, change`` (sha256 of the Y update), ``digest`` (the record's digest
after the change), ``prev_hash`` and ``hash`` = sha256 of the canonical JSON of all of these. The log is a
table of the store, written by the group commit that writes the change: a change without its entry (or an
entry without its change) can never be committed, which an append-only file fsynced beside the database
could not promise across a crash. If the entry cannot be written the whole transaction fails and the
caller gets a 503 naming the audit log.

Someone who can write the database could rewrite the whole chain consistently, so the head is anchored
outside it: every signed receipt carries the seq and hash of the entry that recorded its intake, and
``/api/v1/status`` shows the head. ``verify`` checks the chain, any anchors given, and that every dossier's
stored digest is the digest of its last audited change (which finds a truncated tail).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from node.store import StoreError, classify

GENESIS = "0" * 64

# (at, kind, code, Y update, record digest after the change): what the service hands over per change.
Change = tuple[str, str, str, bytes, str]


@dataclass(frozen=True)
class Entry:
    seq: int
    at: str
    kind: str
    code: str
    change: str
    digest: str
    prev_hash: str
    hash: str

    def content(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "code": self.code,
            "change": self.change,
            "digest": self.digest,
            "prev_hash": self.prev_hash,
        }

    def expected_hash(self) -> str:
        return entry_hash(self.content())


def entry_hash(content: dict[str, Any]) -> str:
    raw = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()


_COLUMNS = "seq, at, kind, code, change, digest, prev_hash, hash"


def append(conn: sqlite3.Connection, changes: Sequence[Change]) -> list[Entry]:
    """Append one entry per change, chained to the current head; runs inside the caller's transaction."""
    try:
        row = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (int(row[0]), str(row[1])) if row else (0, GENESIS)
        entries: list[Entry] = []
        for at, kind, code, update, digest in changes:
            seq += 1
            entry = Entry(seq, at, kind, code, hashlib.sha256(update).hexdigest(), digest, prev, "")
            prev = entry.expected_hash()
            entries.append(replace(entry, hash=prev))
        conn.executemany(
            f"INSERT INTO audit_log ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
            [(e.seq, e.at, e.kind, e.code, e.change, e.digest, e.prev_hash, e.hash) for e in entries],
        )
    except sqlite3.Error as exc:
        # Refuse the change rather than accept what the log cannot account for.
        full = classify(exc).disk_full
        reason = "the disk holding the store is full" if full else str(exc)
        raise StoreError(
            f"the audit log cannot be written ({reason}); changes are refused until it can be", disk_full=full
        ) from exc
    return entries


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(int(row[0]), *(str(v) for v in row[1:8]))


def head(conn: sqlite3.Connection) -> Entry | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    return _entry(row) if row else None


@dataclass(frozen=True)
class Report:
    entries: int
    head: Entry | None
    bad_seq: int | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_chain(rows: Iterable[Sequence[Any]]) -> Report:
    """Walk entries in seq order; the first altered, removed or reordered one ends the walk."""
    prev_seq, prev_hash, count, last = 0, GENESIS, 0, None
    for row in rows:
        e = _entry(row)
        if e.seq != prev_seq + 1:
            return Report(
                count, last, prev_seq + 1, f"entry {prev_seq + 1} is missing: the log jumps from {prev_seq} to {e.seq}"
            )
        if e.expected_hash() != e.hash:
            return Report(count, last, e.seq, f"entry {e.seq} was altered: its hash does not match its content")
        if e.prev_hash != prev_hash:
            return Report(
                count,
                last,
                e.seq,
                f"entry {e.seq} does not follow entry {prev_seq}: an entry was removed, reordered or rewritten",
            )
        prev_seq, prev_hash, count, last = e.seq, e.hash, count + 1, e
    return Report(count, last)


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as shown in a receipt or in /api/v1/status) -> (seq, hash)."""
    seq, sep, digest = text.partition(":")
    if not sep or not seq.isdigit() or len(digest) != 64:
        raise ValueError(f"an anchor is SEQ:HASH (a 64-character hex hash), got {text!r}")
    return int(seq), digest.lower()


def verify(conn: sqlite3.Connection, anchors: Sequence[tuple[int, str]] = ()) -> Report:
    """Check the chain, the anchors, and that each dossier's digest is that of its last audited change."""
    report = check_chain(conn.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq"))
    if not report.ok:
        return report
    for seq, digest in anchors:
        if seq == 0:
            continue
        row = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return Report(report.entries, report.head, seq, f"anchored entry {seq} is missing: the log was truncated")
        if str(row[0]) != digest:
            return Report(
                report.entries, report.head, seq, f"entry {seq} differs from its anchor: the log was rewritten"
            )
    row = conn.execute("SELECT max(change_seq) FROM audit_origin").fetchone()
    since = int(row[0]) if row and row[0] is not None else 0
    # Dossiers last changed before the log existed have no entry to compare with.
    stray = conn.execute(
        "SELECT d.code, d.digest, a.seq, a.digest FROM dossiers d LEFT JOIN audit_log a ON a.seq ="
        " (SELECT max(seq) FROM audit_log WHERE code = d.code) WHERE d.change_seq > ?"
        " AND (a.seq IS NULL OR a.digest != d.digest) ORDER BY a.seq LIMIT 1",
        (since,),
    ).fetchone()
    if stray is not None:
        code, _, seq, _ = stray
        if seq is None:
            return Report(report.entries, report.head, None, f"dossier {code} has no audit entry: entries were removed")
        # The chain itself is whole, so what is missing is its tail (or the row was edited behind the node).
        end = report.head.seq if report.head else 0
        return Report(
            report.entries,
            report.head,
            end + 1,
            f"entry {end + 1} onwards: the log ends at entry {end} but dossier {code} changed after its last"
            f" audit entry {seq}: the tail of the log was removed or the dossier was altered outside the node",
        )
    return report


def kind_of(op: object) -> str:
    """The entry kind of a service operation: intake, step, fee, document, forward, take-over, merge:ORIGIN."""
    name = type(op).__name__
    if name == "Merge":
        return f"merge:{getattr(op, 'origin', '')}"
    if name == "SetForwarding":
        return str(getattr(op, "action", "forwarding"))
    return {"Intake": "intake", "AddStep": "step", "AddFee": "fee", "AddDocument": "document"}.get(name, name.lower())


def collect(
    kind: str,
    journal: Sequence[tuple[int, str, bytes, str]],
    inserts: dict[str, tuple[Any, ...]],
    updates: dict[str, tuple[Any, ...]],
) -> list[Change]:
    """The changes one operation added to a batch, with each dossier's digest as that operation left it."""
    out: list[Change] = []
    for _, code, update, at in journal:
        row = inserts.get(code)
        digest = row[6] if row is not None else updates[code][3]
        out.append((at, kind, code, update, str(digest)))
    return out


async def describe(store: Any) -> dict[str, Any]:
    """The head of the log, for /api/v1/status: write ``seq:hash`` down to detect a later truncation."""
    row = await store.fetchone("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
    if row is None:
        return {"head_seq": 0, "head_hash": GENESIS, "anchor": f"0:{GENESIS}"}
    return {"head_seq": int(row[0]), "head_hash": str(row[1]), "anchor": f"{row[0]}:{row[1]}"}
