"""``wardsync doctor``: the checks for what usually breaks a ward server, each with its fix.

Each check gives ``ok``, ``warning`` or ``failure``, a detail and, unless ok, what to do about it. The
command exits 1 when any check fails. It reads the store through its own read-only connection, so it can
run beside a serving node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import ssl
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from adapters.base import Upstream, UpstreamError
from node import tls
from node.config import Config
from node.migrations import LATEST
from node.ops import lock

OK, WARNING, FAILURE = "ok", "warning", "failure"
CLOCK_WARN_S = 5.0  # the Date header has one-second resolution: below this is noise
CLOCK_FAIL_S = 60.0  # codes carry the local date and steps the local time: a minute off is a wrong record
CERT_WARN_DAYS = 21
LAG_WARN_S = 300.0
LAG_FAIL_S = 86_400.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    min_free_mb: float = 1024.0
    min_free_inodes: int = 10_000
    timeout_s: float = 5.0


def _existing(path: Path) -> Path:
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_running(config: Config) -> Check:
    holder = lock.holder(config.data_path)
    if holder:
        return Check("node", OK, f"{holder} holds {config.data_path}")
    return Check("node", WARNING, "no node is serving this store", "start it: systemctl start wardsync")


def check_data_dir(config: Config) -> Check:
    d = config.data_path
    if not d.exists():
        return Check("data directory", FAILURE, f"{d} does not exist",
                     f"create it: install -d -m 0750 -o wardsync -g wardsync {d}")
    if not d.is_dir():
        return Check("data directory", FAILURE, f"{d} is not a directory", "point [node] data_dir at a directory")
    if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
        return Check("data directory", FAILURE, f"{d} is not writable by this user (uid {os.getuid()})",
                     f"run as the service's user (sudo -u wardsync ...) or chown -R wardsync:wardsync {d}")
    writable, readable = [], []
    files = [d / n for n in ("wardsync.sqlite3", "wardsync.sqlite3-wal") if (d / n).exists()]
    for p in files:
        if not os.access(p, os.R_OK | os.W_OK):
            return Check("data directory", FAILURE, f"{p} is not readable and writable by this user",
                         f"chown wardsync:wardsync {p}")
    # SQLite creates its files 0644: harmless while the directory keeps other users out (no o+x).
    reachable = bool(d.stat().st_mode & stat.S_IXOTH)
    for p in [d, *(files if reachable else [])]:
        mode = p.stat().st_mode
        shown = f"{p} (mode {stat.S_IMODE(mode):o})"
        if mode & stat.S_IWOTH:
            writable.append(shown)
        elif mode & stat.S_IRWXO:
            readable.append(shown)
    if writable:
        # Any local user could replace the store or plant a file the node then trusts.
        return Check("data directory", FAILURE, f"writable by every user: {'; '.join(writable)}: any local"
                     " account can replace or delete the store", f"chmod -R o-rwx {d}")
    if readable:
        return Check("data directory", WARNING, f"open to all users: {'; '.join(readable)}: it holds citizens'"
                     " data", f"chmod -R o-rwx {d}")
    return Check("data directory", OK, f"{d} is writable and closed to other users")


def check_disk(config: Config, t: Thresholds) -> list[Check]:
    where = _existing(config.data_path)
    st = os.statvfs(where)
    free_mb = st.f_bavail * st.f_frsize / 2**20
    fix = f"free space on the filesystem of {where} (old logs, old backups) or move data_dir to a larger disk"
    if free_mb < t.min_free_mb:
        disk = Check("disk space", FAILURE, f"{free_mb:,.0f} MB free, below the {t.min_free_mb:,.0f} MB minimum", fix)
    elif free_mb < 4 * t.min_free_mb:
        disk = Check("disk space", WARNING, f"{free_mb:,.0f} MB free, less than 4x the minimum", fix)
    else:
        disk = Check("disk space", OK, f"{free_mb:,.0f} MB free")
    if st.f_files == 0:
        inodes = Check("inodes", OK, "the filesystem has no inode limit")
    elif st.f_favail < t.min_free_inodes:
        inodes = Check("inodes", FAILURE, f"{st.f_favail:,} inodes free, below {t.min_free_inodes:,}",
                       "delete many small files (old rotated logs, temporary files) on that filesystem")
    elif st.f_favail < 4 * t.min_free_inodes:
        inodes = Check("inodes", WARNING, f"{st.f_favail:,} inodes free", "delete unneeded small files")
    else:
        inodes = Check("inodes", OK, f"{st.f_favail:,} inodes free")
    return [disk, inodes]


def _connect_ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=5)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def check_store(config: Config) -> list[Check]:
    db = config.db_path
    if not db.exists():
        return [Check("store", WARNING, f"no store at {db} yet", "it is created at first start; if the node ran"
                      " before, the disk was lost: wardsync restore or wardsync bootstrap")]
    try:
        with contextlib.closing(_connect_ro(db)) as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            result = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(5)")]
    except sqlite3.Error as exc:
        return [Check("store", FAILURE, f"{db} cannot be read: {exc}",
                      "run as the service's user; if it is damaged, wardsync restore --from LAST_BACKUP")]
    checks = []
    if result == ["ok"]:
        checks.append(Check("store", OK, f"{db}: integrity ok"))
    else:
        checks.append(Check("store", FAILURE, f"{db}: {'; '.join(result)}",
                            "stop the node and run wardsync restore --from LAST_BACKUP (then merge-store the damaged"
                            " one if it still opens)"))
    if version > LATEST:
        checks.append(Check("schema", FAILURE, f"the store is at schema {version}, this release knows up to {LATEST}",
                            "run the release that wrote it, or restore the backup taken before the upgrade"))
    elif version < LATEST:
        checks.append(Check("schema", WARNING, f"schema {version}; this release migrates it to {LATEST} at start",
                            "take a backup first: wardsync backup --to DIR"))
    else:
        checks.append(Check("schema", OK, f"schema {version}"))
    return checks


def check_lag(config: Config) -> list[Check]:
    db = config.db_path
    targets = [n for n in ("national", "city") if getattr(config, n) is not None]
    if not targets or not db.exists():
        return []
    try:
        with contextlib.closing(_connect_ro(db)) as conn:
            head = int(conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0])
            out = []
            for target in targets:
                row = conn.execute("SELECT seq FROM cursors WHERE target = ?", (target,)).fetchone()
                cursor = int(row[0]) if row else 0
                pending, dead, parked = conn.execute(
                    "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'dead'),"
                    " count(*) FILTER (WHERE state = 'parked') FROM replication WHERE target = ?",
                    (target,),
                ).fetchone()
                oldest = conn.execute("SELECT min(at) FROM journal WHERE seq > ?", (cursor,)).fetchone()[0]
                out.append(_lag_check(target, max(0, head - cursor) + int(pending), oldest, int(dead), int(parked)))
            return out
    except sqlite3.Error as exc:
        return [Check("lag", WARNING, f"cannot read replication state: {exc}", "run as the service's user")]


def _lag_check(target: str, records: int, oldest: str | None, dead: int, parked: int) -> Check:
    age = 0.0
    if oldest:
        age = max(0.0, time.time() - datetime.fromisoformat(oldest.replace("Z", "+00:00")).timestamp())
    detail = f"{records} changes waiting" + (f", oldest {age:,.0f} s" if records else "")
    if dead or parked:
        detail += f"; {dead} dead, {parked} parked"
    fix = f"see wardsync status and /api/v1/dead-letters; check the {target} checks above"
    if age >= LAG_FAIL_S:
        return Check(f"lag {target}", FAILURE, detail, fix)
    if age >= LAG_WARN_S or dead or parked:
        return Check(f"lag {target}", WARNING, detail, fix)
    return Check(f"lag {target}", OK, detail)


async def check_clock(name: str, target: Any, unit: str, http: aiohttp.ClientSession, t: Thresholds) -> Check:
    url = f"{str(target.url).rstrip('/')}/feed"
    try:
        async with asyncio.timeout(t.timeout_s):
            sent = time.time()
            async with http.get(url, params={"unit": unit, "since": "0", "limit": "1"},
                                ssl=tls.client_context(target)) as resp:
                received = time.time()
                header = resp.headers.get("Date")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Check(f"clock vs {name}", WARNING, f"not measured: {exc or 'timed out'}", "see the reachability check")
    if not header:
        return Check(f"clock vs {name}", WARNING, "the upstream sent no Date header", "")
    try:
        theirs = parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return Check(f"clock vs {name}", WARNING, f"unreadable Date header {header!r}", "")
    # The header is truncated to the second: compare it with the middle of the exchange, plus half a second.
    offset = (sent + received) / 2 - (theirs + 0.5)
    shown = f"this server is {abs(offset):.1f} s {'ahead of' if offset > 0 else 'behind'} {name}"
    fix = "synchronise the clock: timedatectl set-ntp true (chrony or systemd-timesyncd must be running)"
    if abs(offset) >= CLOCK_FAIL_S:
        return Check(f"clock vs {name}", FAILURE, shown, fix)
    if abs(offset) >= CLOCK_WARN_S:
        return Check(f"clock vs {name}", WARNING, shown, fix)
    return Check(f"clock vs {name}", OK, shown)


async def check_upstream(up: Upstream, t: Thresholds) -> Check:
    section = f"[targets.{up.name}]"
    secret = "username/password" if up.name == "national" else "client_id/client_secret"
    try:
        async with asyncio.timeout(t.timeout_s):
            await up.probe()
    except TimeoutError:
        return Check(up.name, FAILURE, f"no answer within {t.timeout_s:g} s",
                     f"check {section} url, the network and the firewall; the node keeps accepting meanwhile")
    except UpstreamError as exc:
        # A refusal is an answer: a 401/403, or the portal's own "login refused". A login that never got an
        # answer (connection, certificate, timeout) says nothing about the password.
        if exc.status in (401, 403) or (exc.op == "login" and not exc.retriable and exc.status is None):
            return Check(up.name, FAILURE, f"credentials refused: {exc}",
                         f"fix {section} {secret} (or WARDSYNC_TARGETS_{up.name.upper()}_*), then reload: "
                         "systemctl reload wardsync")
        if _tls_failure(exc):
            return Check(up.name, FAILURE, f"TLS handshake failed: {exc}",
                         f"see the certificate ({up.name}) check; check {section} ca_bundle and this server's clock")
        if exc.status is None:
            return Check(up.name, FAILURE, f"unreachable: {exc}", f"check {section} url, DNS, routes and firewall")
        return Check(up.name, FAILURE, f"answers but fails: {exc}", "ask the upstream's operator; the node retries")
    return Check(up.name, OK, "reachable, credentials accepted")


def _tls_failure(exc: BaseException) -> bool:
    """Whether a certificate or handshake error is behind ``exc`` (its chain of causes)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError | aiohttp.ClientSSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cert_expiry(der: bytes) -> datetime:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).not_valid_after_utc


def _expiry_check(name: str, expires: datetime, fix: str) -> Check:
    days = (expires - datetime.now(UTC)).total_seconds() / 86400
    when = expires.strftime("%Y-%m-%d")
    if days < 0:
        return Check(name, FAILURE, f"expired on {when}", fix)
    if days < CERT_WARN_DAYS:
        return Check(name, WARNING, f"expires on {when}, in {days:.0f} days", fix)
    return Check(name, OK, f"valid until {when}")


async def check_certificates(config: Config, t: Thresholds) -> list[Check]:
    out = []
    if config.node.tls_cert:
        fix = "renew the certificate, write it to [node] tls_cert, then systemctl reload wardsync"
        try:
            from cryptography import x509

            pem = await asyncio.to_thread(Path(config.node.tls_cert).read_bytes)
            out.append(_expiry_check("certificate (node)", x509.load_pem_x509_certificate(pem).not_valid_after_utc,
                                     fix))
        except (OSError, ValueError) as exc:
            out.append(Check("certificate (node)", FAILURE, f"{config.node.tls_cert}: {exc}", fix))
    for name in ("national", "city"):
        target = getattr(config, name)
        if target is None:
            continue
        parts = urlsplit(str(target.url))
        if parts.scheme != "https":
            host = parts.hostname or ""
            local = host in ("localhost", "::1") or host.startswith("127.")
            out.append(Check(f"certificate ({name})", OK if local else WARNING, "plain http: no certificate",
                             "" if local else f"use the upstream's https:// URL in [targets.{name}] url"))
            continue
        if not target.tls_verify:
            out.append(Check(f"TLS verification ({name})", WARNING,
                             f"[targets.{name}] tls_verify = false: the upstream's certificate is not checked; anyone"
                             " on the path can read the credentials and the dossiers",
                             f"set tls_verify = true and name the upstream's CA in [targets.{name}] ca_bundle"))
        try:
            ctx = tls.client_context(target)
            async with asyncio.timeout(t.timeout_s):
                _, writer = await asyncio.open_connection(parts.hostname, parts.port or 443, ssl=ctx,
                                                          server_hostname=parts.hostname)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            out.append(_expiry_check(f"certificate ({name})", _cert_expiry(der),
                                     "the upstream must renew it: tell its operator"))
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            out.append(Check(f"certificate ({name})", FAILURE, f"TLS to {parts.hostname} failed: {exc}",
                             f"check [targets.{name}] ca_bundle and the server's clock"))
    return out


async def run_checks(config: Config, t: Thresholds) -> list[Check]:
    """Every check, in a fixed order."""
    from node.ops.recover import upstreams_of

    checks = [
        *_guarded("node", lambda: [check_running(config)]),
        *_guarded("data directory", lambda: [check_data_dir(config)]),
        *_guarded("disk space", lambda: check_disk(config, t)),
        *_guarded("store", lambda: check_store(config)),
    ]
    async with upstreams_of(config) as ups, aiohttp.ClientSession() as http:
        jobs: list[Awaitable[Check]] = []
        for up in ups:
            jobs.append(check_upstream(up, t))
            jobs.append(check_clock(up.name, getattr(config, up.name), config.node.unit, http, t))
        checks += await asyncio.gather(*jobs)
    checks += await check_certificates(config, t)
    checks += _guarded("lag", lambda: check_lag(config))
    return checks


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """``run()``, or one check saying what could not be looked at: doctor reports, it never crashes."""
    try:
        return run()
    except PermissionError as exc:
        # Typically doctor run as root's or an operator's own account instead of the service's.
        return [Check(name, WARNING, f"not checked: permission denied on {exc.filename or exc}",
                      f"run it as the service's user (this is uid {os.getuid()}):"
                      " runuser -u wardsync -- wardsync doctor")]
    except OSError as exc:
        return [Check(name, WARNING, f"not checked: {exc}", "see the data directory check")]


_STYLE = {OK: "green", WARNING: "yellow", FAILURE: "bold red"}


def print_table(checks: list[Check]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="wardsync doctor")
    for col in ("check", "status", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        # Escaped: "[targets.national]" in a fix would otherwise be taken for a style tag and vanish.
        table.add_row(escape(c.name), f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    console = Console(width=None if os.isatty(1) else 160)
    console.print(table)
    failed = sum(c.status == FAILURE for c in checks)
    warned = sum(c.status == WARNING for c in checks)
    console.print(f"{failed} failure(s), {warned} warning(s)")
