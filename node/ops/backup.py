"""Online backups of the store and their restore.

A backup is a directory holding ``wardsync.sqlite3`` (a self-contained copy, rollback journal, no WAL)
and ``manifest.json`` (schema version, journal head, row counts, a fingerprint of every dossier's digest,
and the file's sha256). The copy is taken with SQLite's backup API from its own connection in one step, so
it is one consistent snapshot while the node's writer keeps committing beside it (WAL). It is written under
a temporary name, checked (``PRAGMA integrity_check``), renamed into place, and verified again from disk
against its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node import __version__
from node.config import Config
from node.migrations import LATEST
from node.ops import lock
from node.store import fsync_dir

DB_FILE = "wardsync.sqlite3"
MANIFEST = "manifest.json"
FORMAT = 1
BUSY_TIMEOUT_MS = 10_000
_MAX_CLIENT_ID = 2**53 - 1


class BackupError(Exception):
    """A backup could not be taken, verified or restored; the message says why and what to do."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@contextlib.contextmanager
def _connect(path: Path, *, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    # mode=rw/ro never creates a missing file, so a typo cannot leave an empty store behind.
    uri = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        yield conn
    finally:
        conn.close()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_store(conn: sqlite3.Connection) -> dict[str, Any]:
    """Schema version, journal head, row count per table and a fingerprint of all dossier digests."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    counts = {
        t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables if t != "sqlite_sequence"
    }
    head = 0
    if "journal" in tables:
        row = conn.execute(
            "SELECT max(coalesce((SELECT max(seq) FROM journal), 0),"
            " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'journal'), 0))"
        ).fetchone()
        head = int(row[0] or 0)
    h = hashlib.sha256()
    if "dossiers" in tables:
        for code, digest in conn.execute("SELECT code, digest FROM dossiers ORDER BY code"):
            h.update(f"{code}\t{digest}\n".encode())
    client_id = None
    if "meta" in tables:
        row = conn.execute("SELECT value FROM meta WHERE key = 'client_id'").fetchone()
        client_id = row[0] if row else None
    return {
        "schema_version": version,
        "journal_head": head,
        "counts": counts,
        "dossiers_fingerprint": h.hexdigest(),
        "client_id": client_id,
    }



def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def backup(config: Config, dest: Path, *, force: bool = False) -> dict[str, Any]:
    """Take a consistent copy of the node's store into ``dest``; returns the verified manifest."""
    db = config.db_path
    if not db.exists():
        raise BackupError(f"no store at {db}: check [node] data_dir (or --data-dir)")
    if (dest / MANIFEST).exists() and not force:
        raise BackupError(f"{dest} already holds a backup; pick a new directory or pass --force to replace it")
    # A copy of citizens' data: a new backup directory and the copy in it are for their owner only.
    created = not dest.is_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if created:
        dest.chmod(0o700)
    partial = dest / (DB_FILE + ".partial")
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)  # SQLite keeps the mode of the file it opens (and gives it to its journal)
    started = _now()
    with _connect(db) as src, contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as dst:
        src.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # pages=-1: the whole database in one step, under one read transaction: one snapshot, while the
        # node's writer goes on committing to the WAL beside it.
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode=DELETE")
        check = str(dst.execute("PRAGMA integrity_check").fetchone()[0])
        if check != "ok":
            raise BackupError(f"the copy failed its integrity check: {check}")
        described = describe_store(dst)
    _fsync_file(partial)
    manifest = {
        "format": FORMAT,
        "created_at": started,
        "wardsync": __version__,
        "unit": config.node.unit,
        "agency_code": config.node.agency_code,
        "file": DB_FILE,
        "bytes": partial.stat().st_size,
        "sha256": sha256_of(partial),
        **described,
    }
    os.replace(partial, dest / DB_FILE)
    tmp = dest / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, dest / MANIFEST)
    fsync_dir(dest)
    return verify(dest)


def verify(source: Path) -> dict[str, Any]:
    """Check a backup against its manifest (sha256, integrity, schema, counts); returns the manifest."""
    try:
        manifest: dict[str, Any] = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{source} holds no {MANIFEST}: not a wardsync backup") from None
    except ValueError as exc:
        raise BackupError(f"{source / MANIFEST} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{source} is backup format {manifest.get('format')!r}; this release reads {FORMAT}")
    db = source / str(manifest.get("file", DB_FILE))
    if not db.exists():
        raise BackupError(f"{db} is missing")
    if sha256_of(db) != manifest.get("sha256"):
        raise BackupError(f"{db} does not match its manifest (sha256 differs): the copy is damaged")
    with _connect(db, readonly=True) as conn:
        check = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        if check != "ok":
            raise BackupError(f"{db} fails its integrity check: {check}")
        described = describe_store(conn)
    for key in ("schema_version", "journal_head", "counts", "dossiers_fingerprint"):
        if described[key] != manifest.get(key):
            raise BackupError(f"{db}: {key} is {described[key]!r}, the manifest says {manifest.get(key)!r}")
    return manifest


@dataclass(frozen=True)
class Restored:
    manifest: dict[str, Any]
    replaced: Path | None  # where the store that was there before now lies


def restore_files(config: Config, source: Path, *, force: bool) -> Restored:
    """Put a verified backup in place of the node's store; the caller holds the data directory lock.

    The store that was there is moved aside (never deleted): its dossiers can still be merged back with
    ``wardsync merge-store``. The restored store gets new client ids, because the ids of the backup may
    have written Doc operations after it was taken that the restored node would otherwise write again
    with different content.
    """
    manifest = verify(source)
    version = int(manifest["schema_version"])
    if version > LATEST:
        raise BackupError(
            f"the backup is at schema version {version}, this release knows up to {LATEST}: "
            "restore it with the release that wrote it"
        )
    if manifest.get("unit") != config.node.unit:
        raise BackupError(
            f"the backup is of unit {manifest.get('unit')}, this node is unit {config.node.unit}: "
            "restore a backup of this unit"
        )
    data_dir, db = config.data_path, config.db_path
    if db.exists() and not force:
        raise BackupError(f"a store already exists at {db}; pass --force to replace it (it is kept aside, not deleted)")
    data_dir.mkdir(parents=True, exist_ok=True)
    replaced = set_aside(config)
    partial = data_dir / (DB_FILE + ".partial")
    shutil.copyfile(source / str(manifest.get("file", DB_FILE)), partial)
    _fsync_file(partial)
    with _connect(partial) as conn:
        new_id = secrets.randbelow(_MAX_CLIENT_ID - 1) + 1
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('client_id', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(new_id),),
        )
        conn.execute("DELETE FROM meta WHERE key LIKE 'client_id:%'")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('seed_counters', 'pending')"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        )
        restored = json.dumps({"from": str(source), "created_at": manifest.get("created_at"), "at": _now()})
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('restored', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (restored,),
        )
        conn.execute("COMMIT")
    _fsync_file(partial)
    os.replace(partial, db)
    fsync_dir(data_dir)
    return Restored(manifest, replaced)


def set_aside(config: Config, *, discard: bool = False) -> Path | None:
    """Move the store (with its WAL files) into ``replaced-<time>/`` in the data directory; or delete it."""
    db = config.db_path
    present = [p for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if p.exists()]
    if discard or not db.exists():
        for p in present:
            p.unlink()  # a stray -wal/-shm without its database belongs to nothing
        return None
    aside = config.data_path / f"replaced-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"
    aside.mkdir()
    for p in present:
        os.replace(p, aside / p.name)
    fsync_dir(config.data_path)
    return aside


def live_holder(config: Config) -> str | None:
    """Who serves this node's store right now (from the data directory lock), or None."""
    return lock.holder(config.data_path)
