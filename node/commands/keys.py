"""``wardsync key``: create, rotate, inspect and retire the keyring that encrypts dossiers at rest."""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
from pathlib import Path

from node.config import ConfigError, load_config
from node.crypto import Keyring, KeyringError, count_key_usage, read_keyring, write_keyring

EXIT_CONFIG = 2


def default_key_file(out: str | None) -> str:
    """Where ``wardsync init`` puts the keyring: beside the configuration file it writes."""
    if out in (None, "-"):
        return "wardsync.key"
    return str(Path(str(out)).parent / "wardsync.key")


def ensure_keyring(path: Path) -> bool:
    """Create a keyring at ``path`` unless one is there; True when it was created."""
    if path.exists():
        return False
    write_keyring(path, Keyring.new())
    return True


def _key_file(args: argparse.Namespace) -> Path | None:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"wardsync key: {exc}", file=sys.stderr)
        return None
    if not config.node.key_file:
        print(f"wardsync key: {args.config} sets no [node] key_file: encryption at rest is off", file=sys.stderr)
        return None
    args.db_path = config.db_path
    return Path(config.node.key_file)


def _usage(db_path: Path) -> dict[str, dict[int, int]] | None:
    """Values per key id and column in the store, read-only; None when there is no store yet."""
    if not db_path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as conn:
        return count_key_usage(conn)


def _cmd_create(args: argparse.Namespace) -> int:
    path = _key_file(args)
    if path is None:
        return EXIT_CONFIG
    if not ensure_keyring(path):
        print(f"wardsync key create: {path} exists; use `wardsync key rotate` to add a key", file=sys.stderr)
        return 1
    print(f"wrote {path} (key 1); keep a copy of it apart from the data: without it the store cannot be read")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    path = _key_file(args)
    if path is None:
        return EXIT_CONFIG
    try:
        keyring = read_keyring(path).rotated()
        write_keyring(path, keyring)
    except KeyringError as exc:
        print(f"wardsync key rotate: {exc}", file=sys.stderr)
        return 1
    print(
        f"key {keyring.active} is now active in {path}; a running node seals new writes with it and re-encrypts"
        " older rows in the background (see `wardsync key status`)"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    path = _key_file(args)
    if path is None:
        return EXIT_CONFIG
    try:
        keyring = read_keyring(path)
    except KeyringError as exc:
        print(f"wardsync key status: {exc}", file=sys.stderr)
        return 1
    usage = _usage(args.db_path)
    totals: dict[int, int] = {}
    for counts in (usage or {}).values():
        for key_id, n in counts.items():
            totals[key_id] = totals.get(key_id, 0) + n
    body = {
        "key_file": str(path),
        "active": keyring.active,
        "keys": sorted(keyring.keys),
        "values_per_key": {("clear" if k == 0 else str(k)): n for k, n in sorted(totals.items())},
        "columns": {
            c: {("clear" if k == 0 else str(k)): n for k, n in sorted(v.items())} for c, v in (usage or {}).items()
        },
    }
    print(json.dumps(body, indent=2))
    return 0


def _cmd_retire(args: argparse.Namespace) -> int:
    path = _key_file(args)
    if path is None:
        return EXIT_CONFIG
    try:
        keyring = read_keyring(path)
        usage = _usage(args.db_path) or {}
        used = {k for counts in usage.values() for k, n in counts.items() if n}
        unused = [k for k in keyring.keys if k != keyring.active and k not in used]
        if unused:
            write_keyring(path, keyring.without(unused))
    except KeyringError as exc:
        print(f"wardsync key retire: {exc}", file=sys.stderr)
        return 1
    still = sorted(k for k in keyring.keys if k != keyring.active and k in used)
    print(
        f"retired keys {unused or 'none'}"
        + (f"; keys {still} still seal stored values (re-encryption not finished)" if still else "")
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("key", help="the keyring that encrypts dossier contents at rest")
    actions = p.add_subparsers(dest="key_command", required=True)
    for name, func, text in (
        ("create", _cmd_create, "create the keyring named by [node] key_file"),
        ("rotate", _cmd_rotate, "add a new key; the node re-encrypts older rows with it in the background"),
        ("status", _cmd_status, "the keys, and how many stored values each one seals"),
        ("retire", _cmd_retire, "drop old keys that no stored value uses any more"),
    ):
        a = actions.add_parser(name, help=text)
        a.add_argument("--config", required=True, help="TOML configuration file")
        a.set_defaults(func=func)
