"""``wardsync status``: a node's replication at a glance, with an exit status for scripts and monitoring.

Exit status: 0 healthy, 1 degraded, 2 offline (no upstream usable, or the node cannot be reached),
3 the node refused the token or gave an answer that is not a status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT = {"healthy": 0, "degraded": 1, "offline": 2}
EXIT_REFUSED = 3


class StatusUnavailable(Exception):
    """The node could not be asked; ``health`` says what that means for monitoring."""

    def __init__(self, message: str, health: str) -> None:
        super().__init__(message)
        self.health = health


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="replication per target, the active source and dead letters; exit 0 healthy, 1 degraded, 2 offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the node's base URL (default {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="bearer token (default: environment variable WARDSYNC_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the node's status JSON plus the computed health")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the node (default 5)")
    p.add_argument(
        "--max-lag-s", type=float, default=300.0, help="lag in seconds above which a target counts as degraded"
    )
    p.set_defaults(func=_cmd_status)


def fetch_status(url: str, token: str | None, timeout: float) -> dict[str, Any]:
    """The node's ``GET /api/v1/status`` answer."""
    request = urllib.request.Request(url.rstrip("/") + "/api/v1/status", headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise StatusUnavailable(
                f"the node at {url} refused the token (HTTP {exc.code}): pass --token or set WARDSYNC_TOKEN"
                " to a token with the operator or read-only role",
                "unknown",
            ) from exc
        raise StatusUnavailable(f"the node at {url} answered HTTP {exc.code}", "offline") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailable(f"cannot reach the node at {url}: {reason}", "offline") from exc
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise StatusUnavailable(f"the node at {url} did not answer with JSON", "unknown") from exc
    if not isinstance(body, dict) or not isinstance(body.get("targets"), dict):
        raise StatusUnavailable(f"{url} did not answer with a wardsync status", "unknown")
    return body


def assess(status: dict[str, Any], max_lag_s: float = 300.0) -> tuple[str, list[str]]:
    """``healthy``, ``degraded`` or ``offline``, with the reasons for anything but healthy."""
    targets: dict[str, Any] = status.get("targets") or {}
    if targets and status.get("offline"):
        return "offline", ["no upstream is usable: dossiers are accepted and kept until one is back"]
    reasons: list[str] = []
    for name, t in targets.items():
        if t.get("state") != "healthy":
            reasons.append(f"{name} is {t.get('state')} (breaker {t.get('breaker')})")
        if (t.get("lag_seconds") or 0) > max_lag_s:
            reasons.append(f"{name} lags {t['lag_seconds']:.0f} s ({t.get('lag_records')} records)")
        stuck = (t.get("dead") or 0) + (t.get("parked") or 0)
        if stuck:
            reasons.append(f"{name} has {t.get('dead') or 0} dead-lettered and {t.get('parked') or 0} parked dossiers")
    primary = status.get("primary")
    if targets and primary and status.get("active_source") not in (None, primary):
        reasons.append(f"reading from the backup {status.get('active_source')}, not the primary {primary}")
    return ("degraded" if reasons else "healthy"), reasons


def _cmd_status(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else os.environ.get("WARDSYNC_TOKEN")
    try:
        status = fetch_status(args.url, token, args.timeout)
    except StatusUnavailable as exc:
        if args.json:
            print(json.dumps({"health": exc.health, "error": str(exc)}, ensure_ascii=False))
        else:
            print(f"wardsync status: {exc}", file=sys.stderr)
        return EXIT.get(exc.health, EXIT_REFUSED)
    health, reasons = assess(status, args.max_lag_s)
    if args.json:
        print(json.dumps({**status, "health": health}, ensure_ascii=False, indent=2))
    else:
        render(status, health, reasons, Console())
    return EXIT[health]


_STYLE = {"healthy": "green", "degraded": "yellow", "down": "red", "offline": "red"}


def render(status: dict[str, Any], health: str, reasons: list[str], console: Console) -> None:
    """The status as a table per target, the active source and the reasons for the health."""
    active = status.get("active_source")
    forced = status.get("forced")
    console.print(
        f"unit [bold]{status.get('unit')}[/]  journal head {status.get('journal_head')}  "
        f"health [{_STYLE.get(health, 'red')}]{health}[/]"
    )
    source = active or "[red]none (offline)[/]"
    if forced:
        source += f" (forced until {forced.get('until')})"
    console.print(f"active source: {source}")
    table = Table(title="targets", title_justify="left")
    for col in ("target", "state", "breaker", "lag records", "lag s", "last success", "last error", "dead", "parked"):
        table.add_column(col, justify="right" if col.startswith(("lag", "dead", "parked")) else "left")
    for name, t in (status.get("targets") or {}).items():
        state = str(t.get("state"))
        table.add_row(
            name,
            f"[{_STYLE.get(state, 'red')}]{state}[/]",
            str(t.get("breaker")),
            str(t.get("lag_records")),
            f"{float(t.get('lag_seconds') or 0):.1f}",
            _ago(t.get("last_ok_at")),
            str(t.get("last_error") or "-"),
            str(t.get("dead") or 0),
            str(t.get("parked") or 0),
        )
    if status.get("targets"):
        console.print(table)
    else:
        console.print("no upstream targets configured: the node only accepts and stores dossiers")
    stuck = sum((t.get("dead") or 0) + (t.get("parked") or 0) for t in (status.get("targets") or {}).values())
    console.print(f"dead letters: {stuck}" + ("  (list: GET /api/v1/dead-letters)" if stuck else ""))
    for reason in reasons:
        console.print(f"  - {reason}")


def _ago(at: str | None) -> str:
    if not at:
        return "never"
    try:
        when = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        return at
    seconds = max(0.0, (datetime.now(UTC) - when).total_seconds())
    return f"{at} ({seconds:.0f} s ago)"
