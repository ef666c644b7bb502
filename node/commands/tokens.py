"""``wardsync token create|list|revoke``: API tokens, stored as hashes in the node's store."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from node.auth import ROLES, Auth, parse_roles
from node.clock import Clock
from node.config import ConfigError, load_config
from node.logs import configure
from node.store import SchemaTooNew, Store, StoreError


def register(sub: Any) -> None:
    p = sub.add_parser("token", help="create, list or revoke API tokens")
    actions = p.add_subparsers(dest="token_action", required=True)

    c = actions.add_parser("create", help="create a token and print it once (only its hash is kept)")
    c.add_argument("--config", required=True, help="the node's TOML configuration file")
    c.add_argument("--role", required=True, help=f"role, or several separated by commas: {', '.join(ROLES)}")
    c.add_argument("--name", default="", help="who or what the token is for (shown in logs and lists)")
    c.add_argument("--data-dir", help="store directory, overrides the file (as for 'wardsync serve')")
    c.set_defaults(func=_create)

    a = actions.add_parser(
        "add",
        help="register a token made elsewhere, read from standard input (e.g. one peer token for every unit)",
    )
    a.add_argument("--config", required=True, help="the node's TOML configuration file")
    a.add_argument("--role", required=True, help=f"role, or several separated by commas: {', '.join(ROLES)}")
    a.add_argument("--name", default="", help="who or what the token is for (shown in logs and lists)")
    a.add_argument("--data-dir", help="store directory, overrides the file (as for 'wardsync serve')")
    a.set_defaults(func=_add)

    ls = actions.add_parser("list", help="list tokens (never their values)")
    ls.add_argument("--config", required=True)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    r = actions.add_parser("revoke", help="revoke a token by its id (see 'token list')")
    r.add_argument("--config", required=True)
    r.add_argument("id", type=int)
    r.set_defaults(func=_revoke)


async def _with_auth(config_path: str, data_dir: str | None, fn: Any) -> Any:
    config = load_config(config_path, overrides={"node": {"data_dir": data_dir}})
    async with Store(config.db_path) as store:
        return await fn(Auth(store, Clock()))


def _run(args: argparse.Namespace, fn: Any) -> Any:
    configure("warning", "auto")  # standard output carries only the answer (a token is read by scripts)
    try:
        return asyncio.run(_with_auth(args.config, getattr(args, "data_dir", None), fn))
    except (ConfigError, SchemaTooNew, StoreError, OSError) as exc:
        print(f"wardsync token: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


def _create(args: argparse.Namespace) -> int:
    try:
        roles = parse_roles(args.role)
    except ValueError as exc:
        print(f"wardsync token create: --role: {exc}", file=sys.stderr)
        return 2
    token = _run(args, lambda auth: auth.create_token(roles, name=args.name))
    print(token)
    if sys.stderr.isatty():
        print("Keep this token now: it is not stored and cannot be shown again.", file=sys.stderr)
    return 0


def _add(args: argparse.Namespace) -> int:
    """The token comes on standard input, never as an argument (arguments show in process lists)."""
    try:
        roles = parse_roles(args.role)
    except ValueError as exc:
        print(f"wardsync token add: --role: {exc}", file=sys.stderr)
        return 2
    token = sys.stdin.readline().strip()
    try:
        token_id = _run(args, lambda auth: auth.add_token(token, roles, name=args.name))
    except ValueError as exc:
        print(f"wardsync token add: {exc}", file=sys.stderr)
        return 1
    print(f"registered token {token_id} ({','.join(roles)})")
    return 0


def _list(args: argparse.Namespace) -> int:
    tokens = _run(args, lambda auth: auth.list_tokens())
    if args.json:
        print(json.dumps([t.__dict__ for t in tokens], ensure_ascii=False, indent=2))
        return 0
    for t in tokens:
        state = f"revoked {t.revoked_at}" if t.revoked_at else "active"
        print(f"{t.id:>4}  {t.name:<24} {','.join(t.roles):<40} {t.created_at}  {state}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    changed = _run(args, lambda auth: auth.revoke(args.id))
    if not changed:
        print(f"wardsync token revoke: no active token with id {args.id}", file=sys.stderr)
        return 1
    print(f"revoked token {args.id}")
    return 0
