"""``wardsync verify-receipt`` and ``wardsync audit verify``: checks that need nothing but files.

verify-receipt exits 0 when the receipt's signature holds, 1 when it does not, 2 when it cannot be checked
(unreadable file, no key). audit verify exits 0 when the log is intact, 1 naming the first bad entry
otherwise, 2 when the store cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node import audit, receipts

EXIT_BAD = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    p = sub.add_parser("verify-receipt", help="check a signed dossier receipt offline")
    p.add_argument("file", help="the receipt (JSON, as served by /api/v1/dossiers/{code}/signed-receipt)")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", help="the unit's public key (PEM file, from /api/v1/keys/receipt)")
    key.add_argument("--url", help="fetch the public key from this node (base URL)")
    p.add_argument("--token", default=None, help="bearer token for --url (default: WARDSYNC_TOKEN)")
    p.add_argument("--ca-bundle", default=None, help="PEM CA bundle to verify an https --url with")
    p.set_defaults(func=_cmd_verify_receipt)

    p = sub.add_parser("audit", help="the tamper-evident audit log")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    v = audit_sub.add_parser(
        "verify", help="check the hash chain; exit 1 naming the first altered, removed or reordered entry"
    )
    v.add_argument("--config", required=True, help="TOML configuration file of the node")
    v.add_argument("--data-dir", help="store directory, overrides the file")
    v.add_argument("--anchor", action="append", default=[], help="SEQ:HASH written down earlier (repeatable)")
    v.add_argument("--receipt", action="append", default=[], help="a signed receipt whose audit entry must be there")
    v.set_defaults(func=_cmd_audit_verify)


def _fail(prefix: str, message: str, code: int) -> int:
    print(f"{prefix}: {message}", file=sys.stderr)
    return code


def _read_json(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _fetch_key(url: str, token: str | None, ca_bundle: str | None) -> bytes:
    request = urllib.request.Request(url.rstrip("/") + "/api/v1/keys/receipt")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=ca_bundle) if url.startswith("https://") else None
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        body = json.loads(answer.read())
    return str(body["public_key"]).encode()


def _cmd_verify_receipt(args: argparse.Namespace) -> int:
    prefix = "wardsync verify-receipt"
    try:
        receipt = _read_json(args.file)
    except (OSError, ValueError) as exc:
        return _fail(prefix, f"{args.file}: cannot read the receipt: {exc}", EXIT_USAGE)
    try:
        if args.public_key:
            pem = Path(args.public_key).read_bytes()
        else:
            token = args.token if args.token is not None else os.environ.get("WARDSYNC_TOKEN")
            pem = _fetch_key(args.url, token, args.ca_bundle)
    except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
        return _fail(prefix, f"cannot get the public key: {exc}", EXIT_USAGE)
    try:
        public = receipts.load_public_key(pem)
        receipts.verify(receipt, public)
    except receipts.InvalidReceipt as exc:
        return _fail(prefix, f"{args.file}: INVALID: {exc}", EXIT_BAD)
    print(
        f"{args.file}: valid receipt for {receipt['code']}, received {receipt['received_at']} at unit "
        f"{receipt['unit']} ({receipt['agency_code']}), digest {receipt['digest']}, key {receipt['key_id']}; "
        f"audit anchor {receipt['audit_seq']}:{receipt['audit_hash']}"
    )
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_config

    prefix = "wardsync audit verify"
    try:
        config = load_config(args.config, overrides={"node": {"data_dir": args.data_dir}})
        anchors = [audit.parse_anchor(a) for a in args.anchor]
        for path in args.receipt:
            r = _read_json(path)
            anchors.append((int(r["audit_seq"]), str(r["audit_hash"])))
    except ConfigError as exc:
        return _fail(prefix, str(exc), EXIT_USAGE)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _fail(prefix, str(exc), EXIT_USAGE)
    path = config.db_path
    if not path.is_file():
        return _fail(prefix, f"{path}: no store there", EXIT_USAGE)
    try:
        # Read-only: a check must never change what it checks; WAL lets it run beside a live node.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            report = audit.verify(conn, anchors)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return _fail(prefix, f"{path}: cannot read the audit log: {exc}", EXIT_USAGE)
    if not report.ok:
        where = f"entry {report.bad_seq}" if report.bad_seq is not None else "the store"
        return _fail(prefix, f"audit log BROKEN at {where}: {report.problem}", EXIT_BAD)
    head = report.head
    anchor = f"{head.seq}:{head.hash}" if head else f"0:{audit.GENESIS}"
    print(f"audit log ok: {report.entries} entries, {len(anchors)} anchor(s) found, head {anchor}")
    return 0
