"""Encryption at rest: dossier contents sealed with AES-GCM under a keyring kept outside the data directory.

What is sealed: a dossier's Doc state, its materialised record and conflicts, journal updates, the portal
base records and the answers kept for idempotency: everything that carries a citizen's data. What stays
in clear columns: codes, units, status, digests, sequence numbers and timestamps, which the node queries.

A sealed value is ``0x81 | key id (4 bytes, big-endian) | nonce (12) | ciphertext + tag (16)``, stored as
a BLOB. The associated data names the table, the column and the row (``dossiers.state`` + code, ``journal``
+ seq, ...), so a ciphertext moved to another row or column fails authentication. Key ids count from 1 and
stay below 2**24, so a sealed value starts ``0x81 0x00``: a canonical Y update can never start that way (a
varint byte with the continuation bit is never followed by a zero byte), and clear records are TEXT, so a
clear value is never mistaken for a sealed one while a store is being migrated.

Rotation: ``wardsync key rotate`` appends a key to the keyring; the running node sees the file change,
seals new writes under the new key and :class:`Resealer` re-encrypts older rows in small batches through
the single writer. A store stays readable under every key the keyring still holds.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from node.errors import ApiError
from node.secretfile import mode_problem

if TYPE_CHECKING:
    from node.store import Store

log = structlog.get_logger()

FORMAT = 0x81
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 5
MAX_KEY_ID = 2**24 - 1
KEYRING_FORMAT = "wardsync-keyring/1"

# Columns holding sealed values; the names are also part of each value's associated data.
STATE = "dossiers.state"
RECORD = "dossiers.record"
CONFLICTS = "dossiers.conflicts"
JOURNAL = "journal.update"
BASE = "portal_base.record"
IDEM = "idempotency.body"

# meta key telling whether the store holds sealed values: absent (clear), "migrating" or "complete".
META_KEY = "encryption"


class KeyringError(Exception):
    """The keyring is missing, unreadable, malformed, or does not open this store."""


class SealedValueError(ApiError):
    """A sealed value failed authentication (tampered, moved, or under a key the keyring lacks)."""

    def __init__(self, message: str) -> None:
        super().__init__(500, "sealed_value_refused", message)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


@dataclass(frozen=True)
class Keyring:
    """Versioned 256-bit keys; the highest id seals new values, every one still opens old ones."""

    keys: dict[int, bytes]
    active: int
    hash_key: bytes  # for keyed hashes of searchable terms; survives rotation so an index stays valid

    @classmethod
    def new(cls) -> Keyring:
        return cls({1: AESGCM.generate_key(bit_length=256)}, 1, secrets.token_bytes(32))

    def rotated(self) -> Keyring:
        new_id = max(self.keys) + 1
        if new_id > MAX_KEY_ID:
            raise KeyringError("the keyring has run out of key ids")
        return Keyring({**self.keys, new_id: AESGCM.generate_key(bit_length=256)}, new_id, self.hash_key)

    def without(self, ids: Sequence[int]) -> Keyring:
        if self.active in ids:
            raise KeyringError(f"key {self.active} is the active key and cannot be retired")
        return Keyring({k: v for k, v in self.keys.items() if k not in ids}, self.active, self.hash_key)

    def to_json(self) -> str:
        keys = [{"id": k, "key": _b64(v)} for k, v in sorted(self.keys.items())]
        doc = {"format": KEYRING_FORMAT, "active": self.active, "hash_key": _b64(self.hash_key), "keys": keys}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Keyring:
        try:
            doc = json.loads(text)
            if doc.get("format") != KEYRING_FORMAT:
                raise ValueError(f"format is not {KEYRING_FORMAT!r}")
            keys = {int(k["id"]): _unb64(k["key"]) for k in doc["keys"]}
            active, hash_key = int(doc["active"]), _unb64(doc["hash_key"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyringError(f"{where}: not a wardsync keyring ({exc})") from exc
        if active not in keys or any(len(v) != 32 for v in keys.values()) or len(hash_key) != 32:
            raise KeyringError(f"{where}: malformed keyring (keys must be 256-bit and include the active one)")
        if any(not 1 <= k <= MAX_KEY_ID for k in keys):
            raise KeyringError(f"{where}: key ids must be between 1 and {MAX_KEY_ID}")
        return cls(keys, active, hash_key)


def read_keyring(path: Path) -> Keyring:
    """Load a keyring file; refuses one that other users may read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise KeyringError(f"{path}: key file not found (create it with `wardsync key create --config FILE`)") from exc
    except OSError as exc:
        raise KeyringError(f"{path}: cannot be read ({exc.strerror})") from exc
    if problem := mode_problem(path, "the keyring encrypting the store"):
        raise KeyringError(problem)
    return Keyring.from_json(text, str(path))


def write_keyring(path: Path, keyring: Keyring) -> None:
    """Replace the keyring file atomically (a crash leaves the old or the new one, never half of each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=path.parent)
    try:
        # New keyrings are private to their owner; a replaced one keeps its mode (root:wardsync 640 on a server).
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
        os.fchmod(fd, mode & 0o770)
        with contextlib.suppress(OSError):
            if path.exists():
                st = path.stat()
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(keyring.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def key_id_of(value: object) -> int | None:
    """The key id a stored value is sealed under, or None for a clear value."""
    if isinstance(value, bytes | memoryview) and len(value) >= HEADER_BYTES + NONCE_BYTES + TAG_BYTES:
        head = bytes(value[:HEADER_BYTES])
        if head[0] == FORMAT and head[1] == 0:
            return int.from_bytes(head[1:5], "big")
    return None


class Sealer:
    """The one codec between the node and its stored dossier contents, held by the Store.

    Without a keyring it passes values through (a store in clear). With one it seals every value it is
    given and opens values sealed under any key of the keyring, as well as clear values of a store that
    is still being migrated; once a migration has completed (``strict``) a clear value is refused too.
    """

    def __init__(self, keyring: Keyring | None = None, path: Path | None = None) -> None:
        self._keyring = keyring
        self._ciphers: dict[int, AESGCM] = {}
        self.path = path
        self._mtime = self._stat_mtime()
        self.strict = False

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        return cls(read_keyring(path), path)

    @property
    def enabled(self) -> bool:
        return self._keyring is not None

    @property
    def active(self) -> int:
        return self._keyring.active if self._keyring is not None else 0

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    def _stat_mtime(self) -> int | None:
        if self.path is None:
            return None
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def reload(self) -> bool:
        """Re-read the keyring when its file changed; True when the active key changed."""
        if self.path is None or self._keyring is None:
            return False
        mtime = self._stat_mtime()
        if mtime is None or mtime == self._mtime:
            return False
        fresh = read_keyring(self.path)
        missing = set(self._keyring.keys) - set(fresh.keys)
        if missing or fresh.hash_key != self._keyring.hash_key:
            # Dropping a key the store may still use, or changing the hash key, is done by `wardsync key`
            # with the node stopped: a running node keeps what it has rather than lose access to rows.
            log.error("keyring_reload_refused", path=str(self.path), missing=sorted(missing))
            self._mtime = mtime
            return False
        changed = fresh.active != self._keyring.active
        self._keyring, self._mtime = fresh, mtime
        if changed:
            log.info("keyring_rotated", active=fresh.active, keys=sorted(fresh.keys))
        return changed

    def _cipher(self, key_id: int) -> AESGCM:
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            assert self._keyring is not None
            cipher = AESGCM(self._keyring.keys[key_id])
            self._ciphers[key_id] = cipher
        return cipher

    # -- sealing -------------------------------------------------------------------------------------
    def seal(self, column: str, row: str, plain: bytes) -> bytes:
        """``plain`` sealed under the active key, bound to ``column`` and ``row``."""
        keyring = self._keyring
        assert keyring is not None
        header = bytes([FORMAT]) + keyring.active.to_bytes(4, "big")
        nonce = secrets.token_bytes(NONCE_BYTES)
        return header + nonce + self._cipher(keyring.active).encrypt(nonce, plain, _aad(header, column, row))

    def seal_blob(self, column: str, row: str, value: bytes) -> bytes:
        return self.seal(column, row, value) if self._keyring is not None else value

    def seal_text(self, column: str, row: str, value: str) -> str | bytes:
        return self.seal(column, row, value.encode()) if self._keyring is not None else value

    # -- opening -------------------------------------------------------------------------------------
    def _open(self, column: str, row: str, value: bytes) -> bytes:
        key_id = key_id_of(value)
        assert key_id is not None
        keyring = self._keyring
        if keyring is None:
            raise self._refuse(column, row, "the store is encrypted but this node has no key_file configured")
        if key_id not in keyring.keys:
            raise self._refuse(column, row, f"it is sealed under key {key_id}, which the keyring does not hold")
        header, nonce, body = value[:HEADER_BYTES], value[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES], value[17:]
        try:
            return self._cipher(key_id).decrypt(nonce, body, _aad(header, column, row))
        except InvalidTag:
            raise self._refuse(column, row, "it failed authentication (altered, or moved from another row)") from None

    def _refuse(self, column: str, row: str, why: str) -> SealedValueError:
        log.error("sealed_value_refused", column=column, row=row, reason=why)
        return SealedValueError(f"the stored {column} of {row} is refused: {why}")

    def open_blob(self, column: str, row: str, value: object) -> bytes:
        """A stored BLOB (Doc state, Y update) in clear; raises SealedValueError on a bad one."""
        if isinstance(value, memoryview):
            value = bytes(value)
        if not isinstance(value, bytes):
            raise self._refuse(column, row, f"it is a {type(value).__name__}, not bytes")
        if key_id_of(value) is not None:
            return self._open(column, row, value)
        if self.strict:
            raise self._refuse(column, row, "it is not sealed, in a store whose values all are")
        return value

    def open_text(self, column: str, row: str, value: object) -> str:
        """A stored JSON text (record, conflicts, answer) in clear; raises SealedValueError on a bad one."""
        if isinstance(value, str):
            if self.strict:
                raise self._refuse(column, row, "it is not sealed, in a store whose values all are")
            return value
        if isinstance(value, bytes | memoryview) and key_id_of(value) is not None:
            try:
                return self._open(column, row, bytes(value)).decode()
            except UnicodeDecodeError:
                raise self._refuse(column, row, "it does not hold UTF-8 text") from None
        raise self._refuse(column, row, "it is neither text nor a sealed value")

    # Shorthands for the call sites that read dossier contents.
    def state(self, code: str, value: object) -> bytes:
        return self.open_blob(STATE, code, value)

    def record(self, code: str, value: object) -> str:
        return self.open_text(RECORD, code, value)

    def conflicts(self, code: str, value: object) -> str:
        return self.open_text(CONFLICTS, code, value)

    def base(self, code: str, value: object) -> str:
        return self.open_text(BASE, code, value)

    def idem_body(self, scope: str, key: str, value: object) -> str:
        return self.open_text(IDEM, idem_row(scope, key), value)

    def seal_base(self, code: str, record: str) -> str | bytes:
        return self.seal_text(BASE, code, record)

    # -- search --------------------------------------------------------------------------------------
    def keyed_hash(self, term: str) -> str:
        """A term as stored in a search index: HMAC-SHA256 under the keyring's hash key when sealing."""
        if self._keyring is None:
            return term
        return hmac.new(self._keyring.hash_key, term.encode(), hashlib.sha256).hexdigest()[:32]

    # -- one group commit ----------------------------------------------------------------------------
    def seal_batch(self, batch: Any) -> Any:
        """A copy of the dossier service's write batch with every dossier content sealed.

        Follows the row layouts of ``node.service._write_batch`` (dossier insert: state 4, record 5,
        conflicts 7 of 11; update: state 1, record 2, conflicts 4 of 9); a layout change fails loudly
        here rather than store a clear value.
        """
        if self._keyring is None:
            return batch
        if any(len(r) != 11 for r in batch.inserts.values()) or any(len(r) != 9 for r in batch.updates.values()):
            raise RuntimeError("the dossier row layout changed: update Sealer.seal_batch with it")
        b, t = self.seal, self.seal_text
        inserts = {
            c: (*r[:4], b(STATE, c, r[4]), t(RECORD, c, r[5]), r[6], t(CONFLICTS, c, r[7]), *r[8:])
            for c, r in batch.inserts.items()
        }
        updates = {
            c: (r[0], b(STATE, c, r[1]), t(RECORD, c, r[2]), r[3], t(CONFLICTS, c, r[4]), *r[5:])
            for c, r in batch.updates.items()
        }
        journal = [(seq, code, b(JOURNAL, str(seq), update), at) for seq, code, update, at in batch.journal]
        idem = [(s, k, h, st, t(IDEM, idem_row(s, k), body), at) for s, k, h, st, body, at in batch.idem]
        bases = {c: t(BASE, c, record) for c, record in batch.bases.items()}
        return dataclasses.replace(batch, inserts=inserts, updates=updates, journal=journal, idem=idem, bases=bases)


def idem_row(scope: str, key: str) -> str:
    return f"{scope}\x00{key}"


def _aad(header: bytes, column: str, row: str) -> bytes:
    return header + column.encode() + b"\x00" + row.encode()


def sealer_for(key_file: str) -> Sealer:
    """The node's sealer: clear without a key file, sealing under its keyring with one."""
    return Sealer.from_file(Path(key_file)) if key_file else Sealer()


async def bind(store: Store) -> None:
    """Check the keyring against the store at start and record that the store holds sealed values."""
    sealer = store.sealer
    state = await store.get_meta(META_KEY)
    if not sealer.enabled:
        if state is not None:
            raise KeyringError(
                f"the store {store.path} holds encrypted dossiers: set [node] key_file to its keyring to open it"
            )
        return
    sample = await store.fetchone("SELECT code, state FROM dossiers WHERE substr(state, 1, 1) = ? LIMIT 1", (b"\x81",))
    if sample is not None and key_id_of(sample[1]) is not None:
        try:
            sealer.open_blob(STATE, str(sample[0]), sample[1])
        except SealedValueError as exc:
            raise KeyringError(
                f"the keyring {sealer.path} does not open the store {store.path}: {exc.message}"
            ) from exc
    if state is None:
        await store.write(lambda c: c.execute("INSERT INTO meta (key, value) VALUES (?, 'migrating')", (META_KEY,)))
    sealer.strict = state == "complete"


@dataclass(frozen=True)
class _Table:
    """A table with sealed columns: how to page through it and how to name a row."""

    name: str
    order: tuple[str, ...]  # the primary key, also the paging cursor
    row: str  # SQL giving a row's name in the associated data
    columns: tuple[tuple[str, str, bool], ...]  # (SQL column, sealed column name, is text)


TABLES: tuple[_Table, ...] = (
    _Table(
        "dossiers", ("id",), "code", (("state", STATE, False), ("record", RECORD, True), ("conflicts", CONFLICTS, True))
    ),
    _Table("journal", ("seq",), "seq", (('"update"', JOURNAL, False),)),
    _Table("portal_base", ("code",), "code", (("record", BASE, True),)),
    _Table("idempotency", ("scope", "key"), "scope || char(0) || key", (("body", IDEM, True),)),
)


class Resealer:
    """Seals the clear values of a migrating store and re-seals values under older keys, in small batches.

    Each batch is one transaction on the store's single writer, so it never races a dossier write; a
    pass walks every table once, and a pass that left nothing to do marks the store complete (strict).
    """

    def __init__(self, store: Store, *, batch: int = 64) -> None:
        self.store = store
        self.sealer = store.sealer
        self.batch = batch
        self._cursors: dict[str, Any] = {}
        self._done_for = 0  # the key id the last complete pass ended under
        self.resealed = 0

    @property
    def done(self) -> bool:
        return self._done_for == self.sealer.active

    async def run_once(self) -> bool:
        """One batch; True while more work is waiting."""
        if self.sealer.reload():
            self._cursors.clear()
            self._done_for = 0
        if self.done:
            return False
        for table in TABLES:
            cursor = self._cursors.get(table.name)
            if cursor == "done":
                continue
            last, changed = await self.store.write(functools.partial(self._step, table=table, cursor=cursor))
            self.resealed += changed
            self._cursors[table.name] = "done" if last is None else last
            return True
        active = self.sealer.active
        if await self.store.get_meta(META_KEY) != "complete":
            await self.store.write(lambda c: c.execute("UPDATE meta SET value = 'complete' WHERE key = ?", (META_KEY,)))
        self.sealer.strict = True
        self._done_for = active
        self._cursors.clear()
        log.info("reseal_complete", active_key=active, resealed=self.resealed)
        return False

    def _step(self, conn: sqlite3.Connection, table: _Table, cursor: Any) -> tuple[Any, int]:
        """Re-seal one page of ``table`` after ``cursor``; (last key, or None at the end; rows changed)."""
        order = ", ".join(table.order)
        cols = ", ".join(c[0] for c in table.columns)
        marks = ", ".join("?" for _ in table.order)
        where = "" if cursor is None else f"WHERE ({order}) > ({marks})"
        rows = conn.execute(
            f"SELECT {order}, {table.row}, {cols} FROM {table.name} {where} ORDER BY {order} LIMIT ?",
            [*(cursor or ()), self.batch],
        ).fetchall()
        sealer, active, changed, n = self.sealer, self.sealer.active, 0, len(table.order)
        for found in rows:
            key, row, values = found[:n], str(found[n]), found[n + 1 :]
            fresh: list[Any] = []
            for (_, column, text), value in zip(table.columns, values, strict=True):
                if key_id_of(value) == active:
                    fresh.append(value)
                elif text:
                    fresh.append(sealer.seal(column, row, sealer.open_text(column, row, value).encode()))
                else:
                    fresh.append(sealer.seal(column, row, sealer.open_blob(column, row, value)))
            if fresh != list(values):
                sets = ", ".join(f"{c[0]} = ?" for c in table.columns)
                match = " AND ".join(f"{k} = ?" for k in table.order)
                conn.execute(f"UPDATE {table.name} SET {sets} WHERE {match}", [*fresh, *key])
                changed += 1
        last = tuple(rows[-1][:n]) if len(rows) == self.batch else None
        return last, changed


def count_key_usage(conn: sqlite3.Connection) -> dict[str, dict[int, int]]:
    """Per sealed column, how many values are under each key id (0: clear)."""
    out: dict[str, dict[int, int]] = {}
    for table in TABLES:
        for sql_col, column, _ in table.columns:
            counts: dict[int, int] = {}
            sql = (
                f"SELECT CASE WHEN typeof({sql_col}) = 'blob' AND substr({sql_col}, 1, 2) = x'8100'"
                f" THEN hex(substr({sql_col}, 2, 4)) ELSE '' END AS k, count(*) FROM {table.name} GROUP BY k"
            )
            for k, n in conn.execute(sql):
                counts[int(k, 16) if k else 0] = int(n)
            out[column] = counts
    return out
