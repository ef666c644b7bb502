"""Dossier search: citizen ID number, applicant name without diacritics, procedure, status, receipt dates.

The index is two tables that the service's write transaction keeps in step with the dossier rows:
``search_index`` (one row per dossier: ID number, procedure, receipt time) and ``search_terms`` (one row
per word of the applicant's name). What is stored for an ID number and for a name word comes only from
:func:`id_term` and :func:`name_terms`, which indexing and querying share, so both can become keyed hashes
(a blind index) in this one place. A name matches when every word of the query equals a word of the name:
"nguyen van an" finds "Nguyễn Văn An", "an" does not find "Anh".
"""

from __future__ import annotations

import json
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from node.store import Store

# đ/Đ is a letter of its own, not d with a combining mark: NFD leaves it whole.
_LETTERS = str.maketrans({"đ": "d", "Đ": "d"})
_WORD = re.compile(r"\w+")
BACKFILL_BATCH = 500
# meta key naming how the stored terms are written: "clear", or "keyed" (HMAC under the keyring's hash key)
MODE_KEY = "search_terms"


def _same(term: str) -> str:
    return term


def fold(text: str) -> str:
    """Lower case without diacritics: "Nguyễn Văn Đức" -> "nguyen van duc"."""
    decomposed = unicodedata.normalize("NFD", text.translate(_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def name_terms(name: object) -> list[str]:
    """The words a name is indexed and searched by (distinct, in order)."""
    if not isinstance(name, str):
        return []
    return list(dict.fromkeys(_WORD.findall(fold(name))))


def id_term(id_number: object) -> str | None:
    """What an ID number is indexed and searched by."""
    if not isinstance(id_number, str):
        return None
    term = "".join(id_number.split()).upper()
    return term or None


def index_terms(record: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """(ID number term, name terms) of a dossier record."""
    return id_term(record.get("SoGiayToChuHoSo")), name_terms(record.get("ChuHoSo"))


def index(
    conn: sqlite3.Connection, rows: Iterable[tuple[str, str]], hash_term: Callable[[str], str] | None = None
) -> None:
    """(Re)index dossiers given as (code, record JSON); runs inside the caller's write transaction.

    With ``hash_term`` (the sealer's keyed hash, when the store is encrypted at rest) the ID number and
    the name words are stored only as keyed hashes, so the index holds no citizen data in clear.
    """
    keyed = hash_term or _same
    entries: list[tuple[Any, ...]] = []
    terms: list[tuple[str, str]] = []
    codes: list[tuple[str]] = []
    for code, record_json in rows:
        record = json.loads(record_json)
        id_number, words = index_terms(record)
        entries.append(
            (code, None if id_number is None else keyed(id_number), record.get("MaTTHC"), record.get("NgayTiepNhan"))
        )
        codes.append((code,))
        terms += [(keyed(word), code) for word in words]
    if not entries:
        return
    conn.executemany(
        "INSERT INTO search_index (code, id_number, procedure, received) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (code) DO UPDATE SET id_number = excluded.id_number, procedure = excluded.procedure,"
        " received = excluded.received",
        entries,
    )
    conn.executemany("DELETE FROM search_terms WHERE code = ?", codes)
    conn.executemany("INSERT OR IGNORE INTO search_terms (term, code) VALUES (?, ?)", terms)


async def backfill(store: Store) -> int:
    """Index the dossiers the index lacks (those stored before it existed); the number indexed.

    An index written the other way (clear terms in a store now encrypted, or the reverse) is dropped and
    rebuilt here, so a search never compares a hash with a clear word.
    """
    mode = "keyed" if store.sealer.enabled else "clear"
    if await store.get_meta(MODE_KEY) != mode:
        await store.write(lambda conn: _reset(conn, mode))
    hash_term = store.sealer.keyed_hash if store.sealer.enabled else None
    done = 0
    # Bounded: every round indexes the rows it read, so each row is read at most once.
    for _ in range(1_000_000):
        rows = await store.fetchall(
            "SELECT d.code, d.record FROM dossiers d LEFT JOIN search_index s ON s.code = d.code"
            " WHERE s.code IS NULL ORDER BY d.id LIMIT ?",
            (BACKFILL_BATCH,),
        )
        if not rows:
            break
        batch = [(str(r[0]), open_record(store, str(r[0]), r[1])) for r in rows]
        await store.write(lambda conn, b=batch: index(conn, _still_missing(conn, b), hash_term))  # type: ignore[misc]
        done += len(batch)
    return done


def _reset(conn: sqlite3.Connection, mode: str) -> None:
    conn.execute("DELETE FROM search_terms")
    conn.execute("DELETE FROM search_index")
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (MODE_KEY, mode),
    )


def _still_missing(conn: sqlite3.Connection, batch: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # A dossier written since it was read was indexed by that write, with its newer record: leave it.
    return [
        (code, record)
        for code, record in batch
        if conn.execute("SELECT 1 FROM search_index WHERE code = ?", (code,)).fetchone() is None
    ]


# Column named in the associated data of a sealed record (node/crypto.py); records read here are opened
# with the store's sealer when it has one, so search works the same with encryption at rest.
_RECORD_COLUMN = "dossiers.record"


def open_record(store: Store, code: str, value: object) -> str:
    """A stored record's JSON text, unsealed when the store seals records."""
    return str(store.sealer.open_text(_RECORD_COLUMN, code, value))


async def search(
    store: Store,
    *,
    id_number: str | None = None,
    name: str | None = None,
    procedure: str | None = None,
    status: int | None = None,
    received_from: str | None = None,
    received_to: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> tuple[list[tuple[int, str, str, str]], bool]:
    """Matching dossiers newest first, as (row id, code, record JSON, digest), and whether more follow."""
    where: list[str] = []
    params: list[Any] = []
    keyed = store.sealer.keyed_hash if store.sealer.enabled else _same
    if id_number is not None:
        term = id_term(id_number)
        where.append("s.id_number = ?")
        params.append(None if term is None else keyed(term))
    for word in name_terms(name) if name is not None else []:
        where.append("s.code IN (SELECT code FROM search_terms WHERE term = ?)")
        params.append(keyed(word))
    if procedure is not None:
        where.append("s.procedure = ?")
        params.append(procedure)
    if status is not None:
        where.append("d.status = ?")
        params.append(status)
    if received_from is not None:
        where.append("s.received >= ?")
        params.append(received_from)
    if received_to is not None:
        where.append("s.received <= ?")
        params.append(received_to)
    if before_id is not None:
        where.append("d.id < ?")
        params.append(before_id)
    sql = (
        "SELECT d.id, d.code, d.record, d.digest FROM search_index s JOIN dossiers d ON d.code = s.code"
        f" WHERE {' AND '.join(where) or '1 = 1'} ORDER BY d.id DESC LIMIT ?"
    )
    rows = await store.fetchall(sql, [*params, limit + 1])
    items = [(int(r[0]), str(r[1]), open_record(store, str(r[1]), r[2]), str(r[3])) for r in rows[:limit]]
    return items, len(rows) > limit
